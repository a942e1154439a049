//! The CNI plugin face: one command in, the delegate's result (or a CNI error) out.

use serde_json::Value;

use crate::cni::{self, CniCode, CniEnv, CniError, Command};
use crate::config::{DelegateKind, NetConf, Target};
use crate::exec::{Delegates, ExecError, Output};
use crate::resolve::{Resolution, ResolveError};

/// Interface named in the delegate config on DEL when the ENI is gone (see `del`).
pub const CLEANUP_PLACEHOLDER: &str = "lo";

/// Resolves an ENI (implemented by [`crate::resolve::Resolver`]; stubbed in tests).
pub trait ResolveEni {
    /// Resolves `(device_index, network_card_index)`.
    fn resolve_eni(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<Resolution, ResolveError>;

    /// Refuses a target that is the node's primary interface (see
    /// [`crate::resolve::Resolver::refuse_primary`]).
    fn refuse_primary(&self, target: &Target) -> Result<(), String>;

    /// Refuses a PCI device named in the network config that the node daemon does not
    /// manage (see [`crate::resolve::Resolver::refuse_unmanaged`]).
    fn refuse_unmanaged(&self, pci: &str) -> Result<(), String>;
}

impl<S, M, N> ResolveEni for crate::resolve::Resolver<S, M, N>
where
    S: crate::state::StateSource,
    M: crate::imds::Metadata,
    N: crate::sysfs::NetDevices,
{
    fn resolve_eni(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<Resolution, ResolveError> {
        self.resolve(device_index, network_card_index)
    }

    fn refuse_primary(&self, target: &Target) -> Result<(), String> {
        crate::resolve::Resolver::refuse_primary(self, target)
    }

    fn refuse_unmanaged(&self, pci: &str) -> Result<(), String> {
        crate::resolve::Resolver::refuse_unmanaged(self, pci)
    }
}

/// What to print on stdout and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Bytes for stdout.
    pub stdout: Vec<u8>,
    /// Process exit code.
    pub exit: i32,
    /// Lines for stderr (the runtime's log).
    pub log: Vec<String>,
}

impl Reply {
    fn ok(stdout: Vec<u8>) -> Self {
        Self {
            stdout,
            exit: 0,
            log: Vec::new(),
        }
    }

    fn error(e: &CniError, cni_version: &str) -> Self {
        Self {
            stdout: e.to_json(cni_version).to_string().into_bytes(),
            exit: 1,
            log: vec![format!("cni-helper: {}{}", e.msg, details_suffix(e))],
        }
    }

    fn with_logs(mut self, mut lines: Vec<String>) -> Self {
        lines.append(&mut self.log);
        self.log = lines;
        self
    }
}

fn details_suffix(e: &CniError) -> String {
    if e.details.is_empty() {
        String::new()
    } else {
        format!(" ({})", e.details)
    }
}

/// The `cniVersion` of a config we could not parse, for the error JSON.
fn version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| cni::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| cni::CURRENT_VERSION.to_owned())
}

/// Runs one CNI command. `resolver` builds the resolution sources for the parsed config.
pub fn run(
    env: &CniEnv,
    stdin: &[u8],
    resolver: &dyn Fn(&NetConf) -> Box<dyn ResolveEni>,
    delegates: &dyn Delegates,
) -> Reply {
    if env.command == Command::Version {
        return Reply::ok(cni::version_json().to_string().into_bytes());
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            return Reply::error(&CniError::new(e.code(), e.to_string()), &version_of(stdin));
        }
    };
    let v = conf.cni_version.clone();
    match env.command {
        Command::Version => Reply::ok(cni::version_json().to_string().into_bytes()),
        Command::Add => {
            add(&conf, resolver(&conf).as_ref(), delegates).unwrap_or_else(|e| Reply::error(&e, &v))
        }
        Command::Check => check(&conf, resolver(&conf).as_ref(), delegates)
            .unwrap_or_else(|e| Reply::error(&e, &v)),
        Command::Del => del(&conf, resolver(&conf).as_ref(), delegates),
        Command::Status | Command::Gc => forward_if_supported(&conf, env.command, delegates)
            .unwrap_or_else(|e| Reply::error(&e, &v)),
    }
}

fn describe(conf: &NetConf, r: &Resolution) -> String {
    format!(
        "cni-helper: {}: deviceIndex {} (network card {}) -> {} (from {})",
        conf.name, conf.device_index, conf.network_card_index, r.target, r.source
    )
}

/// The ENI this call works on, and what to log about it.
///
/// For host-device with a device the kubelet allocated to the pod (Multus passes it for NADs
/// with a resourceName annotation), that device wins: handing the pod the device at
/// `deviceIndex` instead could take a device allocated to another pod. A disagreement is
/// logged.
fn find_target(
    conf: &NetConf,
    resolver: &dyn ResolveEni,
) -> (Result<Target, ResolveError>, Vec<String>) {
    let res = resolver.resolve_eni(conf.device_index, conf.network_card_index);
    if conf.kind == DelegateKind::HostDevice
        && let Some(allocated) = &conf.allocated_device
    {
        let line = match &res {
            Ok(r) if matches!(&r.target, Target::Pci(p) if p.eq_ignore_ascii_case(allocated)) => {
                describe(conf, r)
            }
            Ok(r) => format!(
                "cni-helper: {}: warning: using the device allocated to the pod, {allocated}; deviceIndex {} is {} (from {})",
                conf.name, conf.device_index, r.target, r.source
            ),
            Err(e) => format!(
                "cni-helper: {}: using the device allocated to the pod, {allocated} ({e})",
                conf.name
            ),
        };
        return (Ok(Target::Pci(allocated.clone())), vec![line]);
    }
    match res {
        Ok(r) => {
            let line = describe(conf, &r);
            (Ok(r.target), vec![line])
        }
        Err(e) => (Err(e), Vec::new()),
    }
}

fn add(
    conf: &NetConf,
    resolver: &dyn ResolveEni,
    delegates: &dyn Delegates,
) -> Result<Reply, CniError> {
    let (target, log) = find_target(conf, resolver);
    let target = target.map_err(|e| e.to_cni())?;
    if let Target::Mac(_) = target {
        return Err(CniError::new(
            CniCode::TryAgainLater,
            format!("ENI {target} has no usable interface"),
        ));
    }
    // host-device moves the device into the pod: never the node's own uplink, whatever
    // the config (or a device named in it) says.
    if conf.kind == DelegateKind::HostDevice {
        let checked = match &conf.allocated_device {
            Some(pci) => resolver.refuse_unmanaged(pci),
            None => Ok(()),
        }
        .and_then(|()| resolver.refuse_primary(&target));
        if let Err(why) = checked {
            return Err(CniError::new(
                CniCode::EniUnusable,
                format!("refusing to move {target} into the pod: {why}"),
            ));
        }
    }
    let cfg = conf
        .delegate_config(Some(&target))
        .map_err(|e| CniError::new(e.code(), e.to_string()))?;
    let out = call(delegates, conf, "ADD", &cfg)?;
    Ok(pass_through(conf, out)?.with_logs(log))
}

fn check(
    conf: &NetConf,
    resolver: &dyn ResolveEni,
    delegates: &dyn Delegates,
) -> Result<Reply, CniError> {
    // CHECK works with the MAC alone (host-device moved the ENI into the pod).
    let (target, mut log) = find_target(conf, resolver);
    let target = match target {
        Ok(t) => t,
        Err(ResolveError {
            partial: Some(t), ..
        }) => {
            log.push(format!("cni-helper: {}: ENI only known as {t}", conf.name));
            t
        }
        Err(e) => return Err(e.to_cni()),
    };
    let cfg = conf
        .delegate_config(Some(&target))
        .map_err(|e| CniError::new(e.code(), e.to_string()))?;
    let out = call(delegates, conf, "CHECK", &cfg)?;
    Ok(pass_through(conf, out)?.with_logs(log))
}

/// DEL is best-effort and idempotent: the delegate is always called when it exists, with
/// whatever is still known about the ENI (its interface, or for host-device its PCI address
/// or MAC; when nothing is, the placeholder [`CLEANUP_PLACEHOLDER`], so the delegate can still
/// release its IPAM allocation and remove the pod's interface). When the ENI is gone, a
/// delegate failure is logged and DEL succeeds.
fn del(conf: &NetConf, resolver: &dyn ResolveEni, delegates: &dyn Delegates) -> Reply {
    let (found, mut log) = find_target(conf, resolver);
    let (target, resolved) = match found {
        Ok(t) => (Some(t), true),
        Err(e) => {
            log.push(format!(
                "cni-helper: {}: DEL without a resolved ENI: {e}",
                conf.name
            ));
            (e.partial, false)
        }
    };
    let target = match (conf.kind, target) {
        (DelegateKind::HostDevice, Some(t)) => Some(t),
        (_, Some(Target::Netdev(n))) => Some(Target::Netdev(n)),
        // The ENI has no interface on the node any more. The delegates only validate this
        // field on DEL (their cleanup works on CNI_IFNAME in the pod and on IPAM), but
        // refuse an empty one, so hand them an interface every namespace has.
        _ => {
            log.push(format!(
                "cni-helper: {}: the ENI has no interface here; calling {} DEL with placeholder {CLEANUP_PLACEHOLDER:?}",
                conf.name,
                conf.kind.as_str()
            ));
            Some(Target::Netdev(CLEANUP_PLACEHOLDER.to_owned()))
        }
    };
    let cfg = match conf.delegate_config(target.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            return Reply::error(&CniError::new(e.code(), e.to_string()), &conf.cni_version);
        }
    };
    let reply = match call(delegates, conf, "DEL", &cfg) {
        Ok(out) if out.success() => Ok(Reply::ok(out.stdout)),
        Ok(out) if resolved => pass_through(conf, out),
        Ok(out) => {
            log.push(format!(
                "cni-helper: {}: delegate DEL failed ({}) for an ENI that is gone; treating as deleted",
                conf.name,
                String::from_utf8_lossy(&out.stdout).trim()
            ));
            Ok(Reply::ok(Vec::new()))
        }
        Err(e) if e.code == CniCode::DelegateNotFound => {
            log.push(format!(
                "cni-helper: {}: {}; nothing to delete",
                conf.name, e.msg
            ));
            Ok(Reply::ok(Vec::new()))
        }
        Err(e) => Err(e),
    };
    let mut reply = reply.unwrap_or_else(|e| Reply::error(&e, &conf.cni_version));
    log.append(&mut reply.log);
    reply.log = log;
    reply
}

/// STATUS and GC: the delegate must exist; they are forwarded when it speaks spec 1.1+.
fn forward_if_supported(
    conf: &NetConf,
    command: Command,
    delegates: &dyn Delegates,
) -> Result<Reply, CniError> {
    let plugin = conf.kind.as_str();
    if let Err(e) = delegates.find(plugin) {
        let code = if command == Command::Status {
            CniCode::NotAvailable
        } else {
            CniCode::DelegateNotFound
        };
        return Err(CniError::new(code, e.to_string()));
    }
    let version_query = serde_json::json!({"cniVersion": conf.cni_version}).to_string();
    let supported = delegates
        .run(plugin, "VERSION", version_query.as_bytes())
        .ok()
        .filter(Output::success)
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| {
            v.get("supportedVersions")?.as_array().map(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some(conf.cni_version.as_str()))
            })
        })
        .unwrap_or(false);
    if !supported || !cni::version_at_least(&conf.cni_version, "1.1.0") {
        return Ok(Reply::ok(Vec::new()));
    }
    let cfg = conf
        .delegate_config(None)
        .map_err(|e| CniError::new(e.code(), e.to_string()))?;
    let name = if command == Command::Status {
        "STATUS"
    } else {
        "GC"
    };
    let out = call(delegates, conf, name, &cfg)?;
    pass_through(conf, out)
}

fn call(
    delegates: &dyn Delegates,
    conf: &NetConf,
    command: &str,
    cfg: &Value,
) -> Result<Output, CniError> {
    delegates
        .run(conf.kind.as_str(), command, cfg.to_string().as_bytes())
        .map_err(|e: ExecError| e.to_cni())
}

/// The delegate's stdout unchanged; a failure without CNI error JSON becomes one.
fn pass_through(conf: &NetConf, out: Output) -> Result<Reply, CniError> {
    if out.success() {
        return Ok(Reply::ok(out.stdout));
    }
    let is_cni_error = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .is_some_and(|v| v.get("code").is_some_and(Value::is_u64) && v.get("msg").is_some());
    if is_cni_error {
        return Ok(Reply {
            stdout: out.stdout,
            exit: out.code.filter(|c| *c != 0).unwrap_or(1),
            log: vec![format!(
                "cni-helper: {}: delegate {} failed",
                conf.name,
                conf.kind.as_str()
            )],
        });
    }
    let status = out
        .code
        .map_or_else(|| "a signal".to_owned(), |c| format!("status {c}"));
    Err(CniError::new(
        CniCode::DelegateFailed,
        format!(
            "delegate {} exited with {status} without a CNI error",
            conf.kind.as_str()
        ),
    )
    .with_details(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Resolver, stubs::*};
    use serde_json::json;
    use std::cell::RefCell;
    use std::path::PathBuf;

    /// Records calls; answers with a canned output.
    #[derive(Debug)]
    struct FakeDelegates {
        present: bool,
        reply: Output,
        version: Vec<&'static str>,
        calls: RefCell<Vec<(String, String, Value)>>,
    }

    impl FakeDelegates {
        fn ok(stdout: &str) -> Self {
            Self {
                present: true,
                reply: Output {
                    code: Some(0),
                    stdout: stdout.as_bytes().to_vec(),
                },
                version: vec!["0.4.0", "1.0.0"],
                calls: RefCell::default(),
            }
        }
        fn failing(code: i32, stdout: &str) -> Self {
            let mut f = Self::ok(stdout);
            f.reply.code = Some(code);
            f
        }
    }

    impl Delegates for FakeDelegates {
        fn find(&self, plugin: &str) -> Result<PathBuf, ExecError> {
            if self.present {
                Ok(PathBuf::from("/fake").join(plugin))
            } else {
                Err(ExecError::NotFound {
                    plugin: plugin.into(),
                    dirs: vec!["/fake".into()],
                })
            }
        }
        fn run(&self, plugin: &str, command: &str, stdin: &[u8]) -> Result<Output, ExecError> {
            self.find(plugin)?;
            let cfg: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
            self.calls
                .borrow_mut()
                .push((plugin.into(), command.into(), cfg));
            if command == "VERSION" {
                return Ok(Output {
                    code: Some(0),
                    stdout: json!({"cniVersion": "1.0.0", "supportedVersions": self.version})
                        .to_string()
                        .into_bytes(),
                });
            }
            Ok(self.reply.clone())
        }
    }

    const STATE: &str = r#"{"version":1,"node":"n","enis":[{"eniID":"eni-a","macAddress":"02:00:00:00:00:02","deviceIndex":2,"networkCardIndex":0,"nodeENI":"x","interfaceName":"ens7","pciAddress":null,"driver":"ena","dpdkBound":false,"resourceName":null}]}"#;

    fn env(cmd: Command) -> CniEnv {
        CniEnv {
            command: cmd,
            path: vec!["/fake".into()],
        }
    }

    fn resolver_with(state: Option<&'static str>) -> impl Fn(&NetConf) -> Box<dyn ResolveEni> {
        move |_| {
            Box::new(Resolver {
                state: StubState(state),
                metadata: None::<StubImds>,
                netdevs: StubNet(vec![]),
            })
        }
    }

    fn config(delegate: Value) -> Vec<u8> {
        json!({"cniVersion": "1.0.0", "name": "eni", "type": "cni-helper", "deviceIndex": 2,
               "runtimeConfig": {"ips": ["10.0.0.5/24"]}, "delegate": delegate})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn version() {
        let d = FakeDelegates::ok("");
        let r = run(&env(Command::Version), b"", &resolver_with(None), &d);
        assert_eq!(r.exit, 0);
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["supportedVersions"], json!(cni::SUPPORTED_VERSIONS));
    }

    #[test]
    fn add_fills_master_and_passes_the_result_through() {
        let result = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"net1"}]}"#;
        let d = FakeDelegates::ok(result);
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "ipvlan", "mode": "l2"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        assert_eq!(r.exit, 0, "{:?}", String::from_utf8_lossy(&r.stdout));
        assert_eq!(r.stdout, result.as_bytes());
        let calls = d.calls.borrow();
        let (plugin, cmd, cfg) = &calls[0];
        assert_eq!((plugin.as_str(), cmd.as_str()), ("ipvlan", "ADD"));
        assert_eq!(cfg["master"], "ens7");
        assert_eq!(cfg["name"], "eni");
        assert_eq!(cfg["runtimeConfig"]["ips"][0], "10.0.0.5/24");
        assert!(
            r.log[0].contains("-> ens7 (from state file)"),
            "{:?}",
            r.log
        );
    }

    #[test]
    fn add_without_eni_is_try_again_later_and_calls_nothing() {
        let d = FakeDelegates::ok("");
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "macvlan"})),
            &resolver_with(None),
            &d,
        );
        assert_eq!(r.exit, 1);
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(
            v["details"]
                .as_str()
                .is_some_and(|s| s.contains("enis.json")),
            "{v}"
        );
        assert!(d.calls.borrow().is_empty());
    }

    #[test]
    fn bad_config_is_error_7_and_calls_nothing() {
        let d = FakeDelegates::ok("");
        let r = run(
            &env(Command::Add),
            br#"{"cniVersion":"1.0.0","name":"x","delegate":{"type":"ipvlan"}}"#,
            &resolver_with(Some(STATE)),
            &d,
        );
        assert_eq!(r.exit, 1);
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 7);
        assert!(v["msg"].as_str().is_some_and(|s| s.contains("deviceIndex")));
        assert!(d.calls.borrow().is_empty());
    }

    #[test]
    fn delegate_cni_errors_pass_through_and_others_are_wrapped() {
        let err = r#"{"cniVersion":"1.0.0","code":7,"msg":"bad"}"#;
        let d = FakeDelegates::failing(3, err);
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "ipvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        assert_eq!((r.exit, r.stdout.as_slice()), (3, err.as_bytes()));

        let d = FakeDelegates::failing(2, "panic: oops");
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "ipvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 101);
        assert_eq!(v["details"], "panic: oops");
    }

    #[test]
    fn missing_delegate_binary() {
        let mut d = FakeDelegates::ok("");
        d.present = false;
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "ipvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 100);
        // DEL of something whose plugin is gone succeeds.
        let r = run(
            &env(Command::Del),
            &config(json!({"type": "ipvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        assert_eq!(r.exit, 0);
        // STATUS says "not available".
        let r = run(
            &env(Command::Status),
            &config(json!({"type": "ipvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 50);
    }

    #[test]
    fn del_is_best_effort_when_the_eni_is_gone() {
        let d = FakeDelegates::failing(
            1,
            r#"{"cniVersion":"1.0.0","code":999,"msg":"master gone"}"#,
        );
        let r = run(
            &env(Command::Del),
            &config(json!({"type": "macvlan"})),
            &resolver_with(None),
            &d,
        );
        assert_eq!(r.exit, 0);
        assert!(r.stdout.is_empty());
        let calls = d.calls.borrow();
        assert_eq!(calls.len(), 1, "delegate still called");
        assert_eq!(calls[0].2["master"], CLEANUP_PLACEHOLDER);
        assert!(
            r.log.iter().any(|l| l.contains("treating as deleted")),
            "{:?}",
            r.log
        );
    }

    #[test]
    fn del_failure_with_a_resolved_eni_is_reported() {
        let err = r#"{"cniVersion":"1.0.0","code":5,"msg":"io"}"#;
        let d = FakeDelegates::failing(1, err);
        let r = run(
            &env(Command::Del),
            &config(json!({"type": "macvlan"})),
            &resolver_with(Some(STATE)),
            &d,
        );
        assert_eq!(r.exit, 1);
        assert_eq!(r.stdout, err.as_bytes());
    }

    #[test]
    fn check_uses_the_mac_when_the_interface_moved() {
        let d = FakeDelegates::ok("");
        let resolver = |_: &NetConf| -> Box<dyn ResolveEni> {
            Box::new(Resolver {
                state: StubState(None),
                metadata: Some(StubImds(
                    vec![crate::imds::ImdsEni {
                        mac: "02:00:00:00:00:07".into(),
                        device_number: 2,
                        network_card_index: 0,
                    }],
                    Default::default(),
                )),
                netdevs: StubNet(vec![]),
            })
        };
        let r = run(
            &env(Command::Check),
            &config(json!({"type": "host-device"})),
            &resolver,
            &d,
        );
        assert_eq!(r.exit, 0, "{}", String::from_utf8_lossy(&r.stdout));
        assert_eq!(d.calls.borrow()[0].2["hwaddr"], "02:00:00:00:00:07");
        // ADD refuses: there is no interface to hand over.
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "host-device"})),
            &resolver,
            &d,
        );
        let v: Value = serde_json::from_slice(&r.stdout).expect("json");
        assert_eq!(v["code"], 11);
    }

    #[test]
    fn host_device_uses_the_device_allocated_to_the_pod() {
        const DPDK: &str = r#"{"version":1,"node":"n","enis":[{"eniID":"eni-d","macAddress":"02:00:00:00:00:02","deviceIndex":2,"networkCardIndex":0,"nodeENI":"x","interfaceName":null,"pciAddress":"0000:00:07.0","driver":"vfio-pci","dpdkBound":true,"resourceName":"intel.com/x"},
            {"eniID":"eni-e","macAddress":"02:00:00:00:00:03","deviceIndex":3,"networkCardIndex":0,"nodeENI":"x","interfaceName":null,"pciAddress":"0000:00:09.0","driver":"vfio-pci","dpdkBound":true,"resourceName":"intel.com/x"}]}"#;
        let body = |extra: Value| {
            let mut v = json!({"cniVersion": "1.0.0", "name": "eni", "deviceIndex": 2,
                               "delegate": {"type": "host-device"}});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            v.to_string().into_bytes()
        };
        // Agreement: pciBusID from the state file, no warning.
        let d = FakeDelegates::ok("{}");
        let r = run(
            &env(Command::Add),
            &body(json!({"deviceID": "0000:00:07.0", "pciBusID": "0000:00:07.0"})),
            &resolver_with(Some(DPDK)),
            &d,
        );
        assert_eq!(r.exit, 0);
        assert_eq!(d.calls.borrow()[0].2["pciBusID"], "0000:00:07.0");
        assert!(!r.log.iter().any(|l| l.contains("warning")), "{:?}", r.log);
        // Disagreement: the allocated device wins, with a warning.
        let d = FakeDelegates::ok("{}");
        let r = run(
            &env(Command::Add),
            &body(json!({"deviceID": "0000:00:09.0", "pciBusID": "0000:00:09.0"})),
            &resolver_with(Some(DPDK)),
            &d,
        );
        assert_eq!(r.exit, 0);
        assert_eq!(d.calls.borrow()[0].2["pciBusID"], "0000:00:09.0");
        assert!(r.log.iter().any(|l| l.contains("warning")), "{:?}", r.log);
        // Unresolvable index, but an allocated device the daemon manages: still works.
        let d = FakeDelegates::ok("{}");
        let mut v: Value = serde_json::from_slice(&body(
            json!({"runtimeConfig": {"deviceID": "0000:00:09.0"}}),
        ))
        .expect("json");
        v["deviceIndex"] = json!(7);
        let r = run(
            &env(Command::Add),
            v.to_string().as_bytes(),
            &resolver_with(Some(DPDK)),
            &d,
        );
        assert_eq!(r.exit, 0, "{}", String::from_utf8_lossy(&r.stdout));
        assert_eq!(d.calls.borrow()[0].2["pciBusID"], "0000:00:09.0");
    }

    #[test]
    fn a_device_named_in_the_config_must_be_one_the_daemon_manages() {
        // Any other PCI device (another tenant's ENI, a VPC CNI ENI, a disk) was written
        // into the NAD by hand: the device plugin only allocates state-file devices.
        for (state, pci) in [(Some(STATE), "0000:00:1f.0"), (None, "0000:00:07.0")] {
            let d = FakeDelegates::ok("{}");
            let v = json!({"cniVersion": "1.0.0", "name": "eni", "deviceIndex": 2,
                           "delegate": {"type": "host-device"}, "pciBusID": pci});
            let r = run(
                &env(Command::Add),
                v.to_string().as_bytes(),
                &resolver_with(state),
                &d,
            );
            let out: Value = serde_json::from_slice(&r.stdout).expect("json");
            assert_eq!(out["code"], 102, "{out}");
            assert!(
                out["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("node daemon manages")),
                "{out}"
            );
            assert!(d.calls.borrow().is_empty());
        }
    }

    #[test]
    fn a_device_named_in_the_config_is_never_the_primary_eni() {
        // deviceIndex 2 passes the config's index-0 check; the top-level pciBusID and
        // deviceID (which Multus also writes) name the PCI device behind the uplink, which
        // a stale state file still lists as a managed ENI.
        const STALE: &str = r#"{"version":1,"node":"n","enis":[
            {"eniID":"eni-a","macAddress":"02:00:00:00:00:02","deviceIndex":2,"interfaceName":"ens7"},
            {"eniID":"eni-old","macAddress":"02:00:00:00:00:01","deviceIndex":4,"pciAddress":"0000:00:05.0"}]}"#;
        let resolver = |_: &NetConf| -> Box<dyn ResolveEni> {
            Box::new(Resolver {
                state: StubState(Some(STALE)),
                metadata: None::<StubImds>,
                netdevs: StubNode {
                    links: vec![("02:00:00:00:00:01", "ens5"), ("02:00:00:00:00:02", "ens7")],
                    routes: vec!["ens5"],
                    pci: vec![("0000:00:05.0", "ens5")],
                    routes_unreadable: false,
                },
            })
        };
        for extra in [
            json!({"pciBusID": "0000:00:05.0"}),
            json!({"deviceID": "0000:00:05.0"}),
            json!({"runtimeConfig": {"deviceID": "0000:00:05.0"}}),
        ] {
            let mut v = json!({"cniVersion": "1.0.0", "name": "eni", "deviceIndex": 2,
                               "delegate": {"type": "host-device"}});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            let d = FakeDelegates::ok("{}");
            let r = run(&env(Command::Add), v.to_string().as_bytes(), &resolver, &d);
            let out: Value = serde_json::from_slice(&r.stdout).expect("json");
            assert_eq!(out["code"], 102, "{extra}: {out}");
            assert!(
                out["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("default route")),
                "{out}"
            );
            assert!(
                d.calls.borrow().is_empty(),
                "host-device was called: {extra}"
            );
        }
        // The state file's own answer for a host-device config still works.
        let d = FakeDelegates::ok("{}");
        let r = run(
            &env(Command::Add),
            &config(json!({"type": "host-device"})),
            &resolver,
            &d,
        );
        assert_eq!(r.exit, 0, "{}", String::from_utf8_lossy(&r.stdout));
        assert_eq!(d.calls.borrow()[0].2["device"], "ens7");
    }

    #[test]
    fn status_and_gc_forward_only_to_1_1_delegates() {
        let body = |v: &str| {
            json!({"cniVersion": v, "name": "eni", "deviceIndex": 2, "delegate": {"type": "ipvlan"}})
                .to_string()
                .into_bytes()
        };
        let d = FakeDelegates::ok("");
        let r = run(
            &env(Command::Status),
            &body("1.1.0"),
            &resolver_with(None),
            &d,
        );
        assert_eq!(r.exit, 0);
        assert_eq!(d.calls.borrow().len(), 1, "only VERSION asked");
        let mut d = FakeDelegates::ok("");
        d.version = vec!["1.0.0", "1.1.0"];
        let r = run(&env(Command::Gc), &body("1.1.0"), &resolver_with(None), &d);
        assert_eq!(r.exit, 0);
        let calls = d.calls.borrow();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].1, "GC");
    }
}
