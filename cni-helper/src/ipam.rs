//! cni-helper as an IPAM plugin: pod addresses from the ENI's own VPC addresses.
//!
//! Used as the `ipam` of the ipvlan (or host-device) delegate of a cni-helper network
//! (`"ipam": {"type": "cni-helper"}`); the wrapper fills in the ENI's `deviceIndex` and
//! `networkCardIndex`, so the delegate runs this with them. The pool comes from the node
//! daemon's state file (`enis.json` `pools`: the addresses and /28 prefixes the controller
//! assigned to the ENI in EC2); allocations live in `ipam.json`, changed only under the
//! allocation lock (see [`eni_state::alloc`]). Nothing here talks to EC2 or the API
//! server: an ADD is a lock, two small file reads and one atomic write.
//!
//! * ADD: a free address of the ENI's pool, with the subnet's prefix length, the VPC
//!   router as gateway and the configured `routes`. An empty (or not yet published) pool
//!   is CNI error 11, "try again later": the controller refills it.
//! * DEL: frees what the container's interface holds (idempotent).
//! * CHECK: the container's interface holds an address of this network.
//! * GC (spec 1.1): frees this network's allocations not in `cni.dev/valid-attachments`.

use std::collections::HashMap;
use std::path::Path;

use eni_state::alloc::{self, Allocation};
use serde_json::{Map, Value, json};

use crate::cni::{CniCode, CniError, Command};

/// Plugin type name in an `ipam` section.
pub const TYPE: &str = "cni-helper";

/// Whether a network config asks for this plugin as IPAM (the runtime or a delegate runs
/// cni-helper with the delegate's config: its `type` is the delegate's).
pub fn is_ipam_call(stdin: &[u8]) -> bool {
    let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(stdin) else {
        return false;
    };
    v.get("type").and_then(Value::as_str) != Some(TYPE)
        && v.get("ipam")
            .and_then(|i| i.get("type"))
            .and_then(Value::as_str)
            == Some(TYPE)
}

/// The parts of the config and environment an IPAM call uses.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamCall {
    /// `cniVersion`.
    pub cni_version: String,
    /// Network name (`name`).
    pub network: String,
    /// `ipam.deviceIndex`.
    pub device_index: i32,
    /// `ipam.networkCardIndex` (default 0).
    pub network_card_index: i32,
    /// `ipam.routes`, passed into the result.
    pub routes: Vec<Value>,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// From `CNI_ARGS`: `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`.
    pub pod: (String, String, String),
    /// GC: `cni.dev/valid-attachments` as (container ID, interface).
    pub valid: Vec<(String, String)>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(CniCode::InvalidConfig, msg)
}

impl IpamCall {
    /// Parses stdin and the environment.
    pub fn parse(stdin: &[u8], vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let v: Map<String, Value> = match serde_json::from_slice(stdin) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(CniError::new(
                    CniCode::DecodeFailure,
                    "config is not an object",
                ));
            }
            Err(e) => return Err(CniError::new(CniCode::DecodeFailure, e.to_string())),
        };
        let cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("cniVersion is required"))?
            .to_string();
        if !crate::cni::SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                CniCode::IncompatibleVersion,
                format!("cniVersion {cni_version} is not supported"),
            ));
        }
        let network = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ipam = v
            .get("ipam")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("ipam section missing"))?;
        let index = |k: &str| -> Result<Option<i32>, CniError> {
            match ipam.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| i32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        invalid(format!("ipam.{k} must be a small non-negative integer"))
                    }),
            }
        };
        let device_index = index("deviceIndex")?.ok_or_else(|| {
            invalid("ipam.deviceIndex missing: use cni-helper as the ipam of a cni-helper network's delegate (it fills it in), or set it")
        })?;
        let network_card_index = index("networkCardIndex")?.unwrap_or(0);
        let routes = match ipam.get("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(invalid("ipam.routes must be a list")),
        };
        let args: HashMap<&str, &str> = vars
            .get("CNI_ARGS")
            .map(|a| a.split(';').filter_map(|kv| kv.split_once('=')).collect())
            .unwrap_or_default();
        let arg = |k: &str| args.get(k).copied().unwrap_or_default().to_string();
        let valid = v
            .get("cni.dev/valid-attachments")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| {
                        Some((
                            x.get("containerID")?.as_str()?.to_string(),
                            x.get("ifname")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            cni_version,
            network,
            device_index,
            network_card_index,
            routes,
            container_id: vars.get("CNI_CONTAINERID").cloned().unwrap_or_default(),
            if_name: vars.get("CNI_IFNAME").cloned().unwrap_or_default(),
            pod: (
                arg("K8S_POD_NAMESPACE"),
                arg("K8S_POD_NAME"),
                arg("K8S_POD_UID"),
            ),
            valid,
        })
    }
}

fn io(e: eni_state::Error) -> CniError {
    CniError::new(CniCode::IoFailure, e.to_string())
}

/// Runs one IPAM command against `state_dir`; returns the result JSON (None: nothing to
/// print).
pub fn run(command: Command, call: &IpamCall, state_dir: &Path) -> Result<Option<Value>, CniError> {
    match command {
        Command::Add => add(call, state_dir).map(Some),
        Command::Del => {
            let mut locked = alloc::lock(state_dir).map_err(io)?;
            if locked
                .allocations
                .release(&call.container_id, &call.if_name)
                .is_some()
            {
                locked.save().map_err(io)?;
            }
            Ok(None)
        }
        Command::Check => {
            let locked = alloc::lock(state_dir).map_err(io)?;
            match locked.allocations.find(&call.container_id, &call.if_name) {
                Some(a) if a.network == call.network || a.network.is_empty() => Ok(None),
                _ => Err(CniError::new(
                    CniCode::InvalidConfig,
                    format!(
                        "no address of network {} is allocated to {}/{}",
                        call.network, call.container_id, call.if_name
                    ),
                )),
            }
        }
        Command::Gc => {
            let mut locked = alloc::lock(state_dir).map_err(io)?;
            let gone = locked.allocations.retain(|a| {
                a.network != call.network
                    || call
                        .valid
                        .iter()
                        .any(|(c, i)| *c == a.container_id && *i == a.if_name)
            });
            if !gone.is_empty() {
                locked.save().map_err(io)?;
            }
            Ok(None)
        }
        Command::Status | Command::Version => Ok(None),
    }
}

fn add(call: &IpamCall, state_dir: &Path) -> Result<Value, CniError> {
    let mut locked = alloc::lock(state_dir).map_err(io)?;
    // Read the pool under the lock: the node daemon rewrites it under the same lock.
    let state = eni_state::load(&eni_state::path(state_dir))
        .map_err(io)?
        .ok_or_else(|| {
            CniError::new(
                CniCode::TryAgainLater,
                "the node daemon has not written its state file yet",
            )
        })?;
    let eni = state
        .find(call.device_index, call.network_card_index)
        .ok_or_else(|| {
            CniError::new(
                CniCode::TryAgainLater,
                format!(
                    "no ENI at device index {} (network card {}) on this node yet",
                    call.device_index, call.network_card_index
                ),
            )
        })?;
    let pool = state.pools.get(&eni.eni_id).ok_or_else(|| {
        CniError::new(
            CniCode::TryAgainLater,
            format!(
                "ENI {} has no pod address pool yet (is ipam set on its NodeENI?)",
                eni.eni_id
            ),
        )
    })?;
    let prefix_len = pool
        .subnet_cidr
        .split_once('/')
        .map(|(_, l)| l.to_string())
        .ok_or_else(|| {
            CniError::new(
                CniCode::TryAgainLater,
                format!("ENI {} has no subnet CIDR yet", eni.eni_id),
            )
        })?;
    let (ns, name, uid) = call.pod.clone();
    let address = locked
        .allocations
        .allocate(
            pool,
            Allocation {
                eni_id: eni.eni_id.clone(),
                address: String::new(),
                container_id: call.container_id.clone(),
                if_name: call.if_name.clone(),
                network: call.network.clone(),
                pod_namespace: ns,
                pod_name: name,
                pod_uid: uid,
            },
        )
        .ok_or_else(|| {
            CniError::new(
                CniCode::TryAgainLater,
                format!(
                    "the pod address pool of ENI {} is empty; the controller refills it",
                    eni.eni_id
                ),
            )
        })?;
    locked.save().map_err(io)?;
    drop(locked);
    Ok(result(
        call,
        &format!("{address}/{prefix_len}"),
        &pool.gateway,
    ))
}

/// The IPAM result in the call's spec version.
fn result(call: &IpamCall, address: &str, gateway: &str) -> Value {
    let mut ip = json!({"address": address});
    if !gateway.is_empty() {
        ip["gateway"] = Value::String(gateway.to_string());
    }
    if !crate::cni::version_at_least(&call.cni_version, "1.0.0") {
        ip["version"] = Value::String("4".into());
    }
    let mut r = json!({
        "cniVersion": call.cni_version,
        "ips": [ip],
        "dns": {},
    });
    if !call.routes.is_empty() {
        r["routes"] = Value::Array(call.routes.clone());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use eni_state::{EniState, PodPool, StateFile};

    fn vars(container: &str) -> HashMap<String, String> {
        HashMap::from([
            ("CNI_CONTAINERID".to_string(), container.to_string()),
            ("CNI_IFNAME".to_string(), "net1".to_string()),
            (
                "CNI_ARGS".to_string(),
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u1".to_string(),
            ),
        ])
    }

    fn conf(version: &str) -> Vec<u8> {
        json!({
            "cniVersion": version, "name": "vpc", "type": "ipvlan", "master": "ens6",
            "ipam": {"type": "cni-helper", "deviceIndex": 2,
                     "routes": [{"dst": "10.0.0.0/16"}]}
        })
        .to_string()
        .into_bytes()
    }

    fn seed(dir: &Path, addresses: &[&str]) -> Result<(), eni_state::Error> {
        let mut s = StateFile::empty("n1");
        s.enis.push(EniState {
            eni_id: "eni-1".into(),
            mac_address: "02:00:00:00:00:01".into(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: Some("ens6".into()),
            pci_address: None,
            driver: None,
            dpdk_bound: false,
            resource_name: None,
        });
        s.pools.insert(
            "eni-1".into(),
            PodPool {
                subnet_cidr: "10.0.1.0/24".into(),
                gateway: "10.0.1.1".into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                prefixes: Vec::new(),
            },
        );
        eni_state::save(&eni_state::path(dir), &s)
    }

    #[test]
    fn recognises_an_ipam_call() {
        assert!(is_ipam_call(&conf("1.0.0")));
        assert!(!is_ipam_call(
            br#"{"type":"cni-helper","ipam":{"type":"cni-helper"}}"#
        ));
        assert!(!is_ipam_call(
            br#"{"type":"ipvlan","ipam":{"type":"host-local"}}"#
        ));
        assert!(!is_ipam_call(b"nonsense"));
    }

    #[test]
    fn add_del_check_gc() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        seed(dir.path(), &["10.0.1.20", "10.0.1.21"])?;
        let c1 = IpamCall::parse(&conf("1.0.0"), &vars("c1"))?;
        assert_eq!(c1.pod, ("ns".into(), "p".into(), "u1".into()));
        let r = run(Command::Add, &c1, dir.path())?.ok_or("no result")?;
        assert_eq!(r["ips"][0]["address"], "10.0.1.20/24");
        assert_eq!(r["ips"][0]["gateway"], "10.0.1.1");
        assert_eq!(r["routes"][0]["dst"], "10.0.0.0/16");
        assert!(r["ips"][0].get("version").is_none());
        run(Command::Check, &c1, dir.path())?;

        // 0.4.0 results carry the IP version.
        let c2 = IpamCall::parse(&conf("0.4.0"), &vars("c2"))?;
        let r = run(Command::Add, &c2, dir.path())?.ok_or("no result")?;
        assert_eq!(r["ips"][0]["address"], "10.0.1.21/24");
        assert_eq!(r["ips"][0]["version"], "4");

        // Empty pool: try again later.
        let c3 = IpamCall::parse(&conf("1.0.0"), &vars("c3"))?;
        let e = run(Command::Add, &c3, dir.path()).expect_err("pool empty");
        assert_eq!(e.code, CniCode::TryAgainLater);
        assert_eq!(e.code.as_u32(), 11);
        assert!(run(Command::Check, &c3, dir.path()).is_err());

        // DEL frees (twice is fine), the address comes back.
        run(Command::Del, &c1, dir.path())?;
        run(Command::Del, &c1, dir.path())?;
        let r = run(Command::Add, &c3, dir.path())?.ok_or("no result")?;
        assert_eq!(r["ips"][0]["address"], "10.0.1.20/24");

        // GC keeps only valid attachments of this network.
        let mut gc = IpamCall::parse(&conf("1.1.0"), &vars(""))?;
        gc.valid = vec![("c3".into(), "net1".into())];
        run(Command::Gc, &gc, dir.path())?;
        let held = alloc::lock(dir.path())?.allocations.held("eni-1");
        assert_eq!(held.into_iter().collect::<Vec<_>>(), ["10.0.1.20"]);
        Ok(())
    }

    #[test]
    fn no_pool_or_no_eni_is_try_again_later() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let c = IpamCall::parse(&conf("1.0.0"), &vars("c1"))?;
        assert_eq!(
            run(Command::Add, &c, dir.path()).map_err(|e| e.code),
            Err(CniCode::TryAgainLater)
        );
        let mut s = StateFile::empty("n1");
        s.enis.push(EniState {
            eni_id: "eni-1".into(),
            mac_address: String::new(),
            device_index: 2,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: Some("ens6".into()),
            pci_address: None,
            driver: None,
            dpdk_bound: false,
            resource_name: None,
        });
        eni_state::save(&eni_state::path(dir.path()), &s)?;
        assert_eq!(
            run(Command::Add, &c, dir.path()).map_err(|e| e.code),
            Err(CniCode::TryAgainLater)
        );
        Ok(())
    }

    #[test]
    fn config_errors() {
        let v = vars("c1");
        let e = IpamCall::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"ipvlan","ipam":{"type":"cni-helper"}}"#,
            &v,
        )
        .expect_err("no device index");
        assert_eq!(e.code, CniCode::InvalidConfig);
        let e = IpamCall::parse(
            br#"{"cniVersion":"9.9.9","name":"n","type":"ipvlan","ipam":{"type":"cni-helper","deviceIndex":2}}"#,
            &v,
        )
        .expect_err("version");
        assert_eq!(e.code, CniCode::IncompatibleVersion);
    }
}
