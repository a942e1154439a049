//! `cni-helper nad`: a ready NetworkAttachmentDefinition for an ENI device index.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use crate::config::{DelegateKind, MAX_INDEX, NetConf};

/// Annotation Multus reads to map a device plugin resource to the network.
pub const RESOURCE_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";

/// Errors in the `nad` arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NadError {
    /// An argument is invalid.
    #[error("--{arg}: {problem}")]
    Invalid {
        /// The flag.
        arg: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The generated config does not pass cni-helper's own validation (a bug).
    #[error("generated config is invalid: {0}")]
    Generated(String),
}

fn invalid(arg: &'static str, problem: impl Into<String>) -> NadError {
    NadError::Invalid {
        arg,
        problem: problem.into(),
    }
}

/// host-local IPAM settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLocal {
    /// CIDR.
    pub subnet: String,
    /// First address handed out.
    pub range_start: Option<String>,
    /// Last address handed out.
    pub range_end: Option<String>,
    /// Gateway.
    pub gateway: Option<String>,
}

/// What the NAD should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NadSpec {
    /// NAD (and network) name.
    pub name: String,
    /// Namespace (None: leave it to kubectl).
    pub namespace: Option<String>,
    /// ENI device index.
    pub device_index: u64,
    /// Network card index (None: 0, omitted).
    pub network_card_index: Option<u64>,
    /// Delegate.
    pub kind: DelegateKind,
    /// ipvlan / macvlan mode (None: l2 / bridge).
    pub mode: Option<String>,
    /// Delegate MTU.
    pub mtu: Option<u32>,
    /// `cniVersion`.
    pub cni_version: String,
    /// host-local IPAM (None: no IPAM).
    pub ipam: Option<HostLocal>,
    /// Device plugin resource (DPDK / host-device).
    pub resource_name: Option<String>,
}

fn dns_label(s: &str, max: usize, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
        && (dots || !s.contains('.'))
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

impl NadSpec {
    /// The CNI config (the NAD's `spec.config`), validated by the plugin's own parser.
    pub fn config(&self) -> Result<Value, NadError> {
        if !dns_label(&self.name, 253, true) {
            return Err(invalid(
                "name",
                format!("{:?} is not a DNS-1123 subdomain", self.name),
            ));
        }
        if let Some(ns) = &self.namespace
            && !dns_label(ns, 63, false)
        {
            return Err(invalid(
                "namespace",
                format!("{ns:?} is not a DNS-1123 label"),
            ));
        }
        if self.device_index > MAX_INDEX {
            return Err(invalid("device-index", format!("must be 0..={MAX_INDEX}")));
        }
        let mut delegate = Map::new();
        delegate.insert("type".into(), json!(self.kind.as_str()));
        let modes: &[&str] = match self.kind {
            DelegateKind::Ipvlan => &["l2", "l3", "l3s"],
            DelegateKind::Macvlan => &["bridge", "private", "vepa", "passthru"],
            DelegateKind::HostDevice => &[],
        };
        match (&self.mode, modes.first()) {
            (Some(m), _) if !modes.contains(&m.as_str()) => {
                return Err(invalid(
                    "mode",
                    format!(
                        "{m:?} is not a {} mode (valid: {})",
                        self.kind.as_str(),
                        modes.join(", ")
                    ),
                ));
            }
            (Some(m), _) => {
                delegate.insert("mode".into(), json!(m));
            }
            (None, Some(default)) => {
                delegate.insert("mode".into(), json!(default));
            }
            (None, None) => {}
        }
        if let Some(mtu) = self.mtu {
            if self.kind == DelegateKind::HostDevice {
                return Err(invalid("mtu", "host-device keeps the ENI's MTU"));
            }
            delegate.insert("mtu".into(), json!(mtu));
        }
        if let Some(rn) = &self.resource_name {
            if self.kind != DelegateKind::HostDevice {
                return Err(invalid(
                    "resource-name",
                    "only host-device networks (whole or DPDK-bound ENIs) use a device plugin resource",
                ));
            }
            let ok = rn
                .split_once('/')
                .is_some_and(|(d, n)| dns_label(d, 253, true) && !n.is_empty() && !n.contains('/'));
            if !ok {
                return Err(invalid(
                    "resource-name",
                    format!("{rn:?} is not <domain>/<name>"),
                ));
            }
        }
        if let Some(ipam) = &self.ipam {
            let (net, _) = parse_cidr(&ipam.subnet)
                .ok_or_else(|| invalid("subnet", format!("{:?} is not a CIDR", ipam.subnet)))?;
            let mut obj = Map::new();
            obj.insert("type".into(), json!("host-local"));
            obj.insert("subnet".into(), json!(ipam.subnet));
            for (arg, key, v) in [
                ("range-start", "rangeStart", &ipam.range_start),
                ("range-end", "rangeEnd", &ipam.range_end),
                ("gateway", "gateway", &ipam.gateway),
            ] {
                if let Some(v) = v {
                    let ip: IpAddr = v
                        .parse()
                        .map_err(|_| invalid(arg, format!("{v:?} is not an IP address")))?;
                    if ip.is_ipv4() != net.is_ipv4() {
                        return Err(invalid(arg, "address family differs from --subnet"));
                    }
                    obj.insert(key.into(), json!(v));
                }
            }
            delegate.insert("ipam".into(), Value::Object(obj));
        }
        let mut config = json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "type": "cni-helper",
            "deviceIndex": self.device_index,
            "delegate": delegate,
        });
        if let Some(card) = self.network_card_index {
            config["networkCardIndex"] = json!(card);
        }
        NetConf::parse(config.to_string().as_bytes()).map_err(|e| match e {
            crate::config::ConfigError::UnsupportedVersion(_) => {
                invalid("cni-version", e.to_string())
            }
            crate::config::ConfigError::Invalid {
                field: "deviceIndex",
                problem,
            } => invalid("device-index", problem),
            other => NadError::Generated(other.to_string()),
        })?;
        Ok(config)
    }

    /// The NetworkAttachmentDefinition YAML.
    pub fn render(&self) -> Result<String, NadError> {
        let config = self.config()?;
        let pretty = serde_json::to_string_pretty(&config)
            .map_err(|e| NadError::Generated(e.to_string()))?;
        let mut out = String::new();
        out.push_str(
            "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n",
        );
        out.push_str(&format!("  name: {}\n", self.name));
        if let Some(ns) = &self.namespace {
            out.push_str(&format!("  namespace: {ns}\n"));
        }
        if let Some(rn) = &self.resource_name {
            // A JSON string is a valid YAML double-quoted scalar.
            out.push_str(&format!(
                "  annotations:\n    {RESOURCE_ANNOTATION}: {}\n",
                json!(rn)
            ));
        }
        out.push_str("spec:\n  config: |\n");
        for line in pretty.lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: DelegateKind) -> NadSpec {
        NadSpec {
            name: "eni-net".into(),
            namespace: Some("default".into()),
            device_index: 2,
            network_card_index: None,
            kind,
            mode: None,
            mtu: None,
            cni_version: "1.0.0".into(),
            ipam: None,
            resource_name: None,
        }
    }

    fn parse_yaml(s: &str) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(s).expect("valid YAML")
    }

    #[test]
    fn ipvlan_with_host_local() {
        let mut s = spec(DelegateKind::Ipvlan);
        s.ipam = Some(HostLocal {
            subnet: "10.1.0.0/24".into(),
            range_start: Some("10.1.0.10".into()),
            range_end: Some("10.1.0.50".into()),
            gateway: Some("10.1.0.1".into()),
        });
        let y = parse_yaml(&s.render().expect("renders"));
        assert_eq!(y["apiVersion"].as_str(), Some("k8s.cni.cncf.io/v1"));
        assert_eq!(y["kind"].as_str(), Some("NetworkAttachmentDefinition"));
        assert_eq!(y["metadata"]["name"].as_str(), Some("eni-net"));
        assert_eq!(y["metadata"]["namespace"].as_str(), Some("default"));
        assert!(y["metadata"].get("annotations").is_none());
        let config: Value =
            serde_json::from_str(y["spec"]["config"].as_str().expect("string")).expect("json");
        assert_eq!(config["type"], "cni-helper");
        assert_eq!(config["deviceIndex"], 2);
        assert_eq!(config["delegate"]["type"], "ipvlan");
        assert_eq!(config["delegate"]["mode"], "l2");
        assert_eq!(config["delegate"]["ipam"]["rangeStart"], "10.1.0.10");
        assert_eq!(config["delegate"]["ipam"]["gateway"], "10.1.0.1");
        // The plugin accepts what the CLI generates.
        NetConf::parse(config.to_string().as_bytes()).expect("plugin accepts it");
    }

    #[test]
    fn dpdk_host_device_has_the_resource_annotation() {
        let mut s = spec(DelegateKind::HostDevice);
        s.resource_name = Some("intel.com/intel_sriov_netdevice".into());
        s.network_card_index = Some(1);
        let y = parse_yaml(&s.render().expect("renders"));
        assert_eq!(
            y["metadata"]["annotations"][RESOURCE_ANNOTATION].as_str(),
            Some("intel.com/intel_sriov_netdevice")
        );
        let config: Value =
            serde_json::from_str(y["spec"]["config"].as_str().expect("string")).expect("json");
        assert_eq!(config["networkCardIndex"], 1);
        assert_eq!(config["delegate"], json!({"type": "host-device"}));
    }

    #[test]
    fn rejects_bad_arguments() {
        type Mutation = Box<dyn Fn(&mut NadSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.name = "Bad_Name".into()), "--name"),
            (
                Box::new(|s| s.namespace = Some("a.b".into())),
                "--namespace",
            ),
            (Box::new(|s| s.mode = Some("l9".into())), "--mode"),
            (
                Box::new(|s| s.resource_name = Some("intel.com/x".into())),
                "--resource-name",
            ),
            (Box::new(|s| s.device_index = 999), "--device-index"),
            (
                Box::new(|s| s.cni_version = "9.9.9".into()),
                "--cni-version",
            ),
            (
                Box::new(|s| {
                    s.ipam = Some(HostLocal {
                        subnet: "10.0.0.0/33".into(),
                        ..Default::default()
                    })
                }),
                "--subnet",
            ),
            (
                Box::new(|s| {
                    s.ipam = Some(HostLocal {
                        subnet: "10.0.0.0/24".into(),
                        gateway: Some("fe80::1".into()),
                        ..Default::default()
                    })
                }),
                "--gateway",
            ),
        ];
        for (mutate, flag) in cases {
            let mut s = spec(DelegateKind::Ipvlan);
            mutate(&mut s);
            let e = s.render().expect_err(flag);
            assert!(e.to_string().starts_with(flag), "{flag}: {e}");
        }
        let mut s = spec(DelegateKind::HostDevice);
        s.device_index = 0;
        assert!(
            s.render()
                .expect_err("primary")
                .to_string()
                .starts_with("--device-index")
        );
        let mut s = spec(DelegateKind::HostDevice);
        s.resource_name = Some("noslash".into());
        assert!(s.render().is_err());
    }
}
