//! CNI protocol pieces: commands, environment, error codes and the JSON we print.

use std::collections::HashMap;

use serde_json::{Value, json};

/// Spec versions this plugin accepts (the result is the delegate's, passed through).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest spec version implemented.
pub const CURRENT_VERSION: &str = "1.1.0";

/// CNI error codes (spec "Error" section); 100+ are plugin-specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 2: unsupported field in network configuration.
    UnsupportedField,
    /// 4: invalid necessary environment variables.
    InvalidEnv,
    /// 5: I/O failure.
    IoFailure,
    /// 6: failed to decode content.
    DecodeFailure,
    /// 7: invalid network configuration.
    InvalidConfig,
    /// 11: try again later.
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    NotAvailable,
    /// 100: the delegate plugin binary was not found in CNI_PATH.
    DelegateNotFound,
    /// 101: the delegate failed without printing a CNI error, or could not be run.
    DelegateFailed,
    /// 102: the ENI cannot serve this delegate (e.g. ipvlan on a DPDK-bound ENI).
    EniUnusable,
}

impl CniCode {
    /// The numeric code.
    pub fn as_u32(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::InvalidEnv => 4,
            Self::IoFailure => 5,
            Self::DecodeFailure => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::DelegateNotFound => 100,
            Self::DelegateFailed => 101,
            Self::EniUnusable => 102,
        }
    }
}

/// An error reported to the runtime as CNI error JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}", code = code.as_u32())]
pub struct CniError {
    /// The code.
    pub code: CniCode,
    /// A short message.
    pub msg: String,
    /// Longer details (what was tried).
    pub details: String,
}

impl CniError {
    /// A new error without details.
    pub fn new(code: CniCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error JSON for stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code.as_u32(),
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// The CNI operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// ADD.
    Add,
    /// DEL.
    Del,
    /// CHECK.
    Check,
    /// STATUS (1.1).
    Status,
    /// GC (1.1).
    Gc,
    /// VERSION.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ADD" => Some(Self::Add),
            "DEL" => Some(Self::Del),
            "CHECK" => Some(Self::Check),
            "STATUS" => Some(Self::Status),
            "GC" => Some(Self::Gc),
            "VERSION" => Some(Self::Version),
            _ => None,
        }
    }

    /// Environment variables the spec requires for this command.
    pub fn required_env(self) -> &'static [&'static str] {
        match self {
            Self::Add | Self::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
            Self::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Self::Status | Self::Gc => &["CNI_PATH"],
            Self::Version => &[],
        }
    }
}

/// The CNI environment, validated for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// The command.
    pub command: Command,
    /// `CNI_PATH`, split.
    pub path: Vec<String>,
}

impl CniEnv {
    /// Validates the environment (given as a map, for tests).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let raw = vars.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
        let command = Command::parse(raw).ok_or_else(|| {
            CniError::new(
                CniCode::InvalidEnv,
                format!("CNI_COMMAND {raw:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
            )
        })?;
        let missing: Vec<&str> = command
            .required_env()
            .iter()
            .copied()
            .filter(|k| vars.get(*k).is_none_or(|v| v.is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                CniCode::InvalidEnv,
                format!(
                    "{raw} requires environment variables {}",
                    missing.join(", ")
                ),
            ));
        }
        if let Some(ifname) = vars.get("CNI_IFNAME")
            && !ifname.is_empty()
            && (ifname.len() > 15
                || ifname.contains(['/', ' ', ':'])
                || ifname == "."
                || ifname == "..")
        {
            return Err(CniError::new(
                CniCode::InvalidEnv,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            ));
        }
        let path = vars
            .get("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self { command, path })
    }
}

/// The VERSION answer.
pub fn version_json() -> Value {
    json!({"cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

/// Whether `a` is at least `b` (dotted numeric versions).
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) >= parse(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn add_requires_its_variables() {
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "net1")]))
            .expect_err("missing");
        assert_eq!(e.code, CniCode::InvalidEnv);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        assert!(e.msg.contains("CNI_PATH"), "{}", e.msg);
        let ok = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
        ]))
        .expect("valid");
        assert_eq!(ok.command, Command::Add);
        assert_eq!(ok.path, vec!["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let ok = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .expect("valid");
        assert_eq!(ok.command, Command::Del);
    }

    #[test]
    fn bad_command_and_ifname() {
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "PUT")])).expect_err("bad");
        assert_eq!(e.code, CniCode::InvalidEnv);
        let e = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "a-very-long-interface-name"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .expect_err("bad");
        assert!(e.msg.contains("CNI_IFNAME"));
        assert!(CniEnv::from_vars(&vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(CniCode::TryAgainLater, "no ENI").with_details("tried x");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "no ENI", "details": "tried x"})
        );
        let e = CniError::new(CniCode::InvalidConfig, "bad");
        assert!(e.to_json("1.1.0").get("details").is_none());
    }

    #[test]
    fn codes_are_the_spec_numbers() {
        // CNI spec, "Error" section: 4 = invalid necessary environment variables,
        // 7 = invalid network configuration.
        for (code, n) in [
            (CniCode::IncompatibleVersion, 1),
            (CniCode::UnsupportedField, 2),
            (CniCode::InvalidEnv, 4),
            (CniCode::IoFailure, 5),
            (CniCode::DecodeFailure, 6),
            (CniCode::InvalidConfig, 7),
            (CniCode::TryAgainLater, 11),
            (CniCode::NotAvailable, 50),
        ] {
            assert_eq!(code.as_u32(), n, "{code:?}");
        }
        let missing = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "ADD")])).expect_err("missing");
        assert_eq!(missing.to_json("1.0.0")["code"], 4);
    }

    #[test]
    fn versions() {
        assert_eq!(version_json()["supportedVersions"][4], "1.1.0");
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.10.0", "1.1.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
        assert!(!version_at_least("0.4.0", "1.0.0"));
    }
}
