//! The plugin's network configuration: parsing, validation and the delegate's config.
//!
//! Everything here is pure (no I/O), so it is unit tested and fuzzed.

use serde_json::{Map, Value};

use crate::cni::{self, CniCode};

/// Keys older configs had that belong to the node-local config file
/// ([`crate::nodeconf`]) and are refused in a network config.
pub const NODE_LOCAL_KEYS: [&str; 2] = ["stateDir", "imdsEndpoint"];
/// Largest device / network card index accepted (EC2 uses far smaller ones).
pub const MAX_INDEX: u64 = 255;

/// Top-level keys the runtime (or Multus) adds that are passed to the delegate as they are:
/// `runtimeConfig` (capability args), `prevResult` (CHECK/DEL, chaining), `args`
/// (conventions), and `deviceID` (Multus adds the allocated device of a NAD with a
/// `k8s.v1.cni.cncf.io/resourceName` annotation).
/// `cni.dev/valid-attachments` is what a spec 1.1 runtime sends with GC.
pub const PASSTHROUGH_KEYS: [&str; 5] = [
    "runtimeConfig",
    "prevResult",
    "args",
    "deviceID",
    "cni.dev/valid-attachments",
];

/// Errors in the network configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Not JSON, or not a JSON object.
    #[error("network config is not a JSON object: {0}")]
    NotJson(String),
    /// A required field is missing.
    #[error("network config: \"{0}\" is required")]
    Missing(&'static str),
    /// A field has the wrong type or an invalid value.
    #[error("network config: \"{field}\" {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The CNI version is not one we speak.
    #[error("cniVersion {0:?} is not supported; supported: {supported}", supported = cni::SUPPORTED_VERSIONS.join(", "))]
    UnsupportedVersion(String),
    /// The delegate plugin type is not one cni-helper knows how to fill in.
    #[error(
        "delegate.type {0:?} is not supported: cni-helper fills \"master\" for ipvlan and macvlan and \"device\"/\"pciBusID\" for host-device"
    )]
    UnsupportedDelegate(String),
    /// A node-local setting in the network config.
    #[error(
        "network config: \"{0}\" cannot be set in a network config (NetworkAttachmentDefinition); it is node-local: set it in {path} on the node",
        path = crate::nodeconf::DEFAULT_PATH
    )]
    NodeLocal(&'static str),
    /// The delegate sets a field cni-helper owns.
    #[error(
        "delegate.{field} must not be set: cni-helper fills it from deviceIndex {device_index}"
    )]
    DelegateOwnsField {
        /// The field.
        field: &'static str,
        /// The configured device index.
        device_index: u64,
    },
}

impl ConfigError {
    /// The CNI error code for this error.
    pub fn code(&self) -> CniCode {
        match self {
            ConfigError::UnsupportedVersion(_) => CniCode::IncompatibleVersion,
            ConfigError::NotJson(_) => CniCode::DecodeFailure,
            _ => CniCode::InvalidConfig,
        }
    }
}

/// The delegate plugins cni-helper knows how to point at an ENI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegateKind {
    /// `ipvlan`: fills `master`.
    Ipvlan,
    /// `macvlan`: fills `master`.
    Macvlan,
    /// `host-device`: fills `device`, `pciBusID` or `hwaddr`.
    HostDevice,
}

impl DelegateKind {
    /// Parses a delegate `type`.
    pub fn from_type(t: &str) -> Option<Self> {
        match t {
            "ipvlan" => Some(Self::Ipvlan),
            "macvlan" => Some(Self::Macvlan),
            "host-device" => Some(Self::HostDevice),
            _ => None,
        }
    }

    /// The plugin type (its binary name in CNI_PATH).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipvlan => "ipvlan",
            Self::Macvlan => "macvlan",
            Self::HostDevice => "host-device",
        }
    }

    /// Fields of the delegate config cni-helper owns (the user must not set them).
    pub fn owned_fields(self) -> &'static [&'static str] {
        match self {
            Self::Ipvlan | Self::Macvlan => &["master"],
            Self::HostDevice => &["device", "hwaddr", "kernelpath", "pciBusID"],
        }
    }
}

/// A parsed and validated cni-helper network config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`.
    pub name: String,
    /// `deviceIndex`: the ENI's device index on the instance.
    pub device_index: u64,
    /// `networkCardIndex` (default 0).
    pub network_card_index: u64,
    /// The delegate's kind.
    pub kind: DelegateKind,
    /// The delegate's config object, as the user wrote it.
    pub delegate: Map<String, Value>,
    /// Top-level keys passed through to the delegate (see [`PASSTHROUGH_KEYS`]).
    pub passthrough: Map<String, Value>,
    /// The device the kubelet allocated to the pod for this network, as the runtime passed
    /// it: `runtimeConfig.deviceID`, else Multus's top-level `deviceID` / `pciBusID` (NADs
    /// with a `k8s.v1.cni.cncf.io/resourceName` annotation).
    pub allocated_device: Option<String>,
}

impl NetConf {
    /// Parses and validates a network config from the bytes on stdin.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotJson(format!("got {}", kind_of(&value))));
        };
        Self::from_map(obj)
    }

    /// Validates an already-decoded config object.
    pub fn from_map(obj: Map<String, Value>) -> Result<Self, ConfigError> {
        let cni_version = required_str(&obj, "cniVersion")?;
        if !cni::SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(ConfigError::UnsupportedVersion(cni_version));
        }
        let name = required_str(&obj, "name")?;
        if name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        let device_index = match obj.get("deviceIndex") {
            None | Some(Value::Null) => return Err(ConfigError::Missing("deviceIndex")),
            Some(v) => index(v, "deviceIndex")?,
        };
        let network_card_index = match obj.get("networkCardIndex") {
            None | Some(Value::Null) => 0,
            Some(v) => index(v, "networkCardIndex")?,
        };
        // Where the node's ENIs are looked up is the node's business: a NAD that could
        // point resolution at files or servers its author controls could hand a pod any
        // interface of the node.
        for field in NODE_LOCAL_KEYS {
            if obj.contains_key(field) {
                return Err(ConfigError::NodeLocal(field));
            }
        }

        let delegate = match obj.get("delegate") {
            None | Some(Value::Null) => return Err(ConfigError::Missing("delegate")),
            Some(Value::Object(d)) => d.clone(),
            Some(other) => {
                return Err(invalid(
                    "delegate",
                    format!(
                        "must be an object (a plugin config), got {}",
                        kind_of(other)
                    ),
                ));
            }
        };
        let kind = match delegate.get("type") {
            None | Some(Value::Null) => return Err(ConfigError::Missing("delegate.type")),
            Some(Value::String(t)) => DelegateKind::from_type(t)
                .ok_or_else(|| ConfigError::UnsupportedDelegate(t.clone()))?,
            Some(other) => {
                return Err(invalid(
                    "delegate.type",
                    format!("must be a string, got {}", kind_of(other)),
                ));
            }
        };
        for field in kind.owned_fields() {
            if delegate.contains_key(*field) {
                return Err(ConfigError::DelegateOwnsField {
                    field,
                    device_index,
                });
            }
        }
        if kind == DelegateKind::HostDevice && device_index == 0 && network_card_index == 0 {
            return Err(invalid(
                "deviceIndex",
                "0 is the node's primary ENI; host-device would move it into the pod",
            ));
        }

        let passthrough = PASSTHROUGH_KEYS
            .iter()
            .filter_map(|k| obj.get(*k).map(|v| ((*k).to_owned(), v.clone())))
            .collect();
        let text = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let allocated_device = text(obj.get("runtimeConfig").and_then(|r| r.get("deviceID")))
            .or_else(|| text(obj.get("deviceID")))
            .or_else(|| text(obj.get("pciBusID")));

        Ok(Self {
            cni_version,
            name,
            device_index,
            network_card_index,
            kind,
            delegate,
            passthrough,
            allocated_device,
        })
    }

    /// Builds the delegate's config for a resolved ENI (`None`: not resolvable, DEL only).
    ///
    /// The delegate inherits `cniVersion` and `name`, receives `runtimeConfig`, `prevResult`
    /// and `args` as the runtime passed them, and gets the ENI filled in.
    pub fn delegate_config(&self, target: Option<&Target>) -> Result<Value, TargetError> {
        let mut d = self.delegate.clone();
        d.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        d.insert("name".into(), Value::String(self.name.clone()));
        for (k, v) in &self.passthrough {
            d.insert(k.clone(), v.clone());
        }
        // cni-helper as the delegate's IPAM: tell it which ENI (unless the config did).
        if let Some(Value::Object(ipam)) = d.get_mut("ipam")
            && ipam.get("type").and_then(Value::as_str) == Some(crate::ipam::TYPE)
        {
            ipam.entry("deviceIndex")
                .or_insert_with(|| Value::from(self.device_index));
            ipam.entry("networkCardIndex")
                .or_insert_with(|| Value::from(self.network_card_index));
        }
        match (self.kind, target) {
            (_, None) => {}
            (DelegateKind::Ipvlan | DelegateKind::Macvlan, Some(Target::Netdev(name))) => {
                d.insert("master".into(), Value::String(name.clone()));
            }
            (DelegateKind::Ipvlan | DelegateKind::Macvlan, Some(Target::Pci(pci))) => {
                return Err(TargetError::NoNetdev {
                    kind: self.kind,
                    pci: pci.clone(),
                });
            }
            // The ENI is known (by MAC) but has no netdev here: ipvlan and macvlan do not
            // need `master` to clean up, so leave it out.
            (DelegateKind::Ipvlan | DelegateKind::Macvlan, Some(Target::Mac(_))) => {}
            (DelegateKind::HostDevice, Some(Target::Netdev(name))) => {
                d.insert("device".into(), Value::String(name.clone()));
            }
            (DelegateKind::HostDevice, Some(Target::Pci(pci))) => {
                d.insert("pciBusID".into(), Value::String(pci.clone()));
            }
            (DelegateKind::HostDevice, Some(Target::Mac(mac))) => {
                d.insert("hwaddr".into(), Value::String(mac.clone()));
            }
        }
        Ok(Value::Object(d))
    }
}

/// What an ENI resolved to on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A kernel network interface name.
    Netdev(String),
    /// A PCI address (the ENI is bound to a userspace driver such as vfio-pci).
    Pci(String),
    /// Only the ENI's MAC is known: it has no netdev in this namespace (for instance it was
    /// moved into a pod by host-device). Good enough for CHECK and DEL, not for ADD.
    Mac(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Netdev(n) => f.write_str(n),
            Target::Pci(p) => f.write_str(p),
            Target::Mac(m) => write!(f, "MAC {m} (no interface in this namespace)"),
        }
    }
}

/// The resolved ENI cannot be used with the configured delegate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// ipvlan/macvlan on a DPDK-bound ENI.
    #[error("the ENI is bound to a userspace driver at PCI {pci} and has no interface for {kind}; use a host-device delegate", kind = kind.as_str())]
    NoNetdev {
        /// The delegate.
        kind: DelegateKind,
        /// The ENI's PCI address.
        pci: String,
    },
}

impl TargetError {
    /// The CNI error code for this error.
    pub fn code(&self) -> CniCode {
        CniCode::EniUnusable
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn required_str(obj: &Map<String, Value>, field: &'static str) -> Result<String, ConfigError> {
    optional_str(obj, field)?.ok_or(ConfigError::Missing(field))
}

fn optional_str(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(
            field,
            format!("must be a string, got {}", kind_of(other)),
        )),
    }
}

fn index(v: &Value, field: &'static str) -> Result<u64, ConfigError> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        // Tolerate "2": NADs are hand-written and YAML tooling quotes numbers.
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= MAX_INDEX => Ok(n),
        Some(n) => Err(invalid(
            field,
            format!("{n} is out of range 0..={MAX_INDEX}"),
        )),
        None => Err(invalid(
            field,
            format!("must be a non-negative integer, got {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> Result<NetConf, ConfigError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "eni-net",
            "type": "cni-helper",
            "deviceIndex": 2,
            "delegate": {"type": "ipvlan", "mode": "l2", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}
        })
    }

    #[test]
    fn parses_minimal_config() {
        let c = conf(base()).expect("valid");
        assert_eq!(c.device_index, 2);
        assert_eq!(c.network_card_index, 0);
        assert_eq!(c.kind, DelegateKind::Ipvlan);
        assert!(c.passthrough.is_empty());
    }

    #[test]
    fn parses_all_fields() {
        let mut v = base();
        v["networkCardIndex"] = json!(1);
        v["runtimeConfig"] = json!({"deviceID": "0000:00:07.0"});
        v["prevResult"] = json!({"cniVersion": "1.0.0"});
        let c = conf(v).expect("valid");
        assert_eq!(c.network_card_index, 1);
        assert_eq!(c.passthrough.len(), 2);
    }

    #[test]
    fn string_index_is_accepted() {
        let mut v = base();
        v["deviceIndex"] = json!("3");
        assert_eq!(conf(v).expect("valid").device_index, 3);
    }

    #[test]
    fn missing_device_index() {
        let mut v = base();
        v.as_object_mut().expect("object").remove("deviceIndex");
        let e = conf(v).expect_err("invalid");
        assert_eq!(e, ConfigError::Missing("deviceIndex"));
        assert_eq!(e.code(), CniCode::InvalidConfig);
        assert!(e.to_string().contains("deviceIndex"));
    }

    #[test]
    fn bad_index_values() {
        for bad in [
            json!(-1),
            json!(1.5),
            json!(256),
            json!("two"),
            json!(true),
            json!([2]),
        ] {
            let mut v = base();
            v["deviceIndex"] = bad.clone();
            let e = conf(v).expect_err("invalid");
            assert_eq!(e.code(), CniCode::InvalidConfig, "{bad}");
            assert!(e.to_string().contains("deviceIndex"), "{e}");
        }
    }

    #[test]
    fn unknown_delegate_type() {
        let mut v = base();
        v["delegate"]["type"] = json!("bridge");
        let e = conf(v).expect_err("invalid");
        assert_eq!(e, ConfigError::UnsupportedDelegate("bridge".into()));
        assert_eq!(e.code(), CniCode::InvalidConfig);
        assert!(e.to_string().contains("\"bridge\""));
    }

    #[test]
    fn delegate_must_be_an_object_with_type() {
        let mut v = base();
        v["delegate"] = json!("ipvlan");
        assert!(matches!(
            conf(v),
            Err(ConfigError::Invalid {
                field: "delegate",
                ..
            })
        ));
        let mut v = base();
        v["delegate"] = json!({"mode": "l2"});
        assert_eq!(conf(v), Err(ConfigError::Missing("delegate.type")));
        let mut v = base();
        v.as_object_mut().expect("object").remove("delegate");
        assert_eq!(conf(v), Err(ConfigError::Missing("delegate")));
    }

    #[test]
    fn delegate_must_not_set_owned_fields() {
        let mut v = base();
        v["delegate"]["master"] = json!("eth2");
        assert!(matches!(
            conf(v),
            Err(ConfigError::DelegateOwnsField {
                field: "master",
                ..
            })
        ));
        let mut v = base();
        v["delegate"] = json!({"type": "host-device", "pciBusID": "0000:00:07.0"});
        assert!(matches!(
            conf(v),
            Err(ConfigError::DelegateOwnsField {
                field: "pciBusID",
                ..
            })
        ));
    }

    #[test]
    fn host_device_refuses_primary_eni() {
        let mut v = base();
        v["deviceIndex"] = json!(0);
        v["delegate"] = json!({"type": "host-device"});
        assert!(matches!(
            conf(v),
            Err(ConfigError::Invalid {
                field: "deviceIndex",
                ..
            })
        ));
    }

    #[test]
    fn version_and_json_errors() {
        let mut v = base();
        v["cniVersion"] = json!("0.2.0");
        let e = conf(v).expect_err("invalid");
        assert_eq!(e.code(), CniCode::IncompatibleVersion);
        let e = NetConf::parse(b"{not json").expect_err("invalid");
        assert_eq!(e.code(), CniCode::DecodeFailure);
        let e = NetConf::parse(b"[]").expect_err("invalid");
        assert_eq!(e.code(), CniCode::DecodeFailure);
    }

    #[test]
    fn state_dir_and_imds_endpoint_are_node_local_not_nad_settings() {
        // A NAD author must not be able to point resolution at files or servers they
        // control (it could map the ENI's index to the node's primary interface).
        for (field, value) in [
            ("stateDir", json!("/var/lib/kubelet/pods/x/volumes/evil")),
            ("stateDir", json!("/run/aws-multi-eni")),
            ("imdsEndpoint", json!("http://10.0.0.66")),
        ] {
            let mut v = base();
            v[field] = value;
            let e = conf(v).expect_err("node-local");
            assert!(matches!(e, ConfigError::NodeLocal(f) if f == field), "{e}");
            assert_eq!(e.code(), CniCode::InvalidConfig);
            assert!(e.to_string().contains(crate::nodeconf::DEFAULT_PATH), "{e}");
        }
    }

    #[test]
    fn delegate_config_for_ipvlan() {
        let mut v = base();
        v["runtimeConfig"] = json!({"mac": "02:00:00:00:00:01"});
        v["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": []});
        v["args"] = json!({"cni": {"x": 1}});
        let c = conf(v).expect("valid");
        let d = c
            .delegate_config(Some(&Target::Netdev("ens7".into())))
            .expect("fits");
        assert_eq!(
            d,
            json!({
                "cniVersion": "1.0.0",
                "name": "eni-net",
                "type": "ipvlan",
                "mode": "l2",
                "master": "ens7",
                "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
                "runtimeConfig": {"mac": "02:00:00:00:00:01"},
                "prevResult": {"cniVersion": "1.0.0", "interfaces": []},
                "args": {"cni": {"x": 1}}
            })
        );
        assert!(matches!(
            c.delegate_config(Some(&Target::Pci("0000:00:07.0".into()))),
            Err(TargetError::NoNetdev { .. })
        ));
        let d = c
            .delegate_config(Some(&Target::Mac("02:00:00:00:00:07".into())))
            .expect("fits");
        assert!(d.get("master").is_none());
        let d = c.delegate_config(None).expect("fits");
        assert!(d.get("master").is_none());
    }

    #[test]
    fn delegate_config_for_host_device() {
        let mut v = base();
        v["delegate"] = json!({"type": "host-device"});
        let c = conf(v).expect("valid");
        let netdev = c
            .delegate_config(Some(&Target::Netdev("ens7".into())))
            .expect("fits");
        assert_eq!(netdev["device"], "ens7");
        let pci = c
            .delegate_config(Some(&Target::Pci("0000:00:07.0".into())))
            .expect("fits");
        assert_eq!(pci["pciBusID"], "0000:00:07.0");
        assert!(pci.get("device").is_none());
        let mac = c
            .delegate_config(Some(&Target::Mac("02:00:00:00:00:07".into())))
            .expect("fits");
        assert_eq!(mac["hwaddr"], "02:00:00:00:00:07");
    }

    #[test]
    fn multus_device_id_is_passed_through() {
        let mut v = base();
        v["delegate"] = json!({"type": "host-device"});
        v["deviceID"] = json!("0000:00:08.0");
        v["runtimeConfig"] = json!({"deviceID": "0000:00:08.0"});
        let c = conf(v).expect("valid");
        let d = c
            .delegate_config(Some(&Target::Pci("0000:00:08.0".into())))
            .expect("fits");
        assert_eq!(d["deviceID"], "0000:00:08.0");
        assert_eq!(d["runtimeConfig"]["deviceID"], "0000:00:08.0");
        assert_eq!(d["pciBusID"], "0000:00:08.0");
        assert_eq!(c.allocated_device.as_deref(), Some("0000:00:08.0"));
    }

    #[test]
    fn allocated_device_sources() {
        let with = |extra: Value| {
            let mut v = base();
            v["delegate"] = json!({"type": "host-device"});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            conf(v).expect("valid").allocated_device
        };
        assert_eq!(with(json!({})), None);
        assert_eq!(
            with(json!({"pciBusID": "0000:00:09.0"})).as_deref(),
            Some("0000:00:09.0")
        );
        assert_eq!(
            with(json!({"pciBusID": "a", "deviceID": "b"})).as_deref(),
            Some("b")
        );
        assert_eq!(
            with(json!({"deviceID": "b", "runtimeConfig": {"deviceID": "c"}})).as_deref(),
            Some("c")
        );
        assert_eq!(with(json!({"deviceID": ""})), None);
    }

    #[test]
    fn delegate_cni_version_and_name_are_inherited() {
        let mut v = base();
        v["delegate"]["cniVersion"] = json!("0.3.1");
        v["delegate"]["name"] = json!("other");
        let c = conf(v).expect("valid");
        let d = c.delegate_config(None).expect("fits");
        assert_eq!(d["cniVersion"], "1.0.0");
        assert_eq!(d["name"], "eni-net");
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests over the parser: it never panics, whatever the input, and every
    //! config it accepts produces a delegate config of the right shape.
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Bounded so `cargo test` (and CI) stays fast: 512 cases per property.
    const CASES: u32 = 512;

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-z0-9:./ -]{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("ipvlan"),
                Just("macvlan"),
                Just("host-device"),
                Just("1.0.0"),
                Just("1.1.0")
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("master".to_owned()),
                        Just("device".to_owned()),
                        Just("ipam".to_owned()),
                        "[a-zA-Z]{1,8}"
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_config() -> impl Strategy<Value = Value> {
        let field = |s: &'static str| Just(s.to_owned());
        prop::collection::btree_map(
            prop_oneof![
                field("cniVersion"),
                field("name"),
                field("deviceIndex"),
                field("networkCardIndex"),
                field("stateDir"),
                field("imdsEndpoint"),
                field("delegate"),
                field("runtimeConfig"),
                field("prevResult"),
                "[a-z]{1,6}",
            ],
            arb_json(),
            0..9,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = NetConf::parse(&bytes);
        }

        #[test]
        fn accepted_configs_are_consistent(v in arb_config(), name in "[a-z]{0,4}") {
            let bytes = v.to_string();
            let parsed = NetConf::parse(bytes.as_bytes());
            if let Ok(c) = parsed {
                prop_assert!(c.device_index <= MAX_INDEX);
                prop_assert!(cni::SUPPORTED_VERSIONS.contains(&c.cni_version.as_str()));
                let target = Target::Netdev(format!("ens{name}"));
                if let Ok(Value::Object(d)) = c.delegate_config(Some(&target)) {
                    prop_assert_eq!(d.get("type").and_then(Value::as_str), Some(c.kind.as_str()));
                    prop_assert_eq!(d.get("name").and_then(Value::as_str), Some(c.name.as_str()));
                }
            } else if let Err(e) = parsed {
                // Every error has a message and maps to a spec code.
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(matches!(
                    e.code(),
                    CniCode::InvalidConfig | CniCode::IncompatibleVersion | CniCode::DecodeFailure
                ));
            }
        }

        #[test]
        fn valid_configs_parse(
            idx in 0u64..=MAX_INDEX,
            card in 0u64..=MAX_INDEX,
            kind in prop_oneof![Just("ipvlan"), Just("macvlan"), Just("host-device")],
            version in prop_oneof![Just("0.4.0"), Just("1.0.0"), Just("1.1.0")],
            extra in arb_json(),
        ) {
            let v = json!({
                "cniVersion": version, "name": "n", "type": "cni-helper",
                "deviceIndex": idx, "networkCardIndex": card,
                "delegate": {"type": kind, "extra": extra},
            });
            let parsed = NetConf::parse(v.to_string().as_bytes());
            if kind == "host-device" && idx == 0 && card == 0 {
                prop_assert!(parsed.is_err());
            } else {
                let c = parsed.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(c.device_index, idx);
                prop_assert_eq!(c.network_card_index, card);
            }
        }
    }
}
