//! Integration tests (root): cni-helper in test-made network namespaces with the real
//! Debian CNI plugins as delegates. Run with `make test-integration`
//! (`cargo test --workspace -- --ignored`).
//!
//! Each test makes a "node" namespace holding `ens7` (a veth end with a known MAC, the ENI
//! stand-in at device index 2) and a "pod" namespace, and runs the plugin with
//! `ip netns exec <node>` so that it (and its delegates, and sysfs) see the node.

mod common;

use common::netns::*;
use serde_json::{Value, json};

fn with_prev_result(mut config: Value, result: &Value) -> Value {
    config["prevResult"] = result.clone();
    config
}

/// ADD, CHECK, DEL (twice) with an ipvlan or macvlan delegate; `net1` sits on ens7.
fn slave_lifecycle(kind: &str, extra: Value) {
    let node = Node::new(&kind[..3]);
    node.write_state();
    let pod = Netns::new(&format!("{}-p", &kind[..3]));
    let mut delegate = json!({"type": kind});
    if let (Some(d), Some(e)) = (delegate.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    let mut config = node.config(delegate, DEAD_IMDS);
    // Multus-style runtimeConfig reaches the delegate: macvlan takes the pod's MAC from it.
    let pod_mac = "02:aa:bb:cc:dd:01";
    if kind == "macvlan" {
        config["runtimeConfig"] = json!({"mac": pod_mac});
    }

    let result = node.cni("ADD", &config, &pod).ok();
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    assert_eq!(result["interfaces"][0]["name"], "net1", "{result}");
    let ip0 = result["ips"][0]["address"].as_str().expect("an IP");
    assert!(ip0.starts_with("10.77.0."), "{ip0}");

    let net1 = pod.link("net1").expect("net1 in the pod");
    assert_eq!(net1["linkinfo"]["info_kind"], kind, "{net1}");
    assert_eq!(
        net1["link_index"].as_u64(),
        Some(node.ens7_ifindex()),
        "master is ens7: {net1}"
    );
    if kind == "macvlan" {
        assert_eq!(net1["address"], pod_mac, "runtimeConfig.mac applied");
    }
    assert_eq!(node.reserved_ips().len(), 1);

    node.cni("CHECK", &with_prev_result(config.clone(), &result), &pod)
        .ok();

    node.cni("DEL", &with_prev_result(config.clone(), &result), &pod)
        .ok();
    assert!(pod.link("net1").is_none(), "net1 removed");
    assert!(node.reserved_ips().is_empty(), "IP released");
    assert!(node.ns.link("ens7").is_some(), "ENI untouched");
    // Idempotent.
    node.cni("DEL", &config, &pod).ok();
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn ipvlan_add_check_del() {
    if kernel_has_ipvlan() {
        slave_lifecycle("ipvlan", json!({"mode": "l2"}));
        return;
    }
    // Without CONFIG_IPVLAN the real ipvlan plugin fails: cni-helper must have called it with
    // master ens7, pass its CNI error through unchanged and leave nothing behind.
    assert!(
        std::env::var_os("CNI_HELPER_REQUIRE_IPVLAN").is_none(),
        "CNI_HELPER_REQUIRE_IPVLAN is set but this kernel cannot create ipvlan links"
    );
    eprintln!(
        "NOTE: kernel without ipvlan support: checking the ipvlan call and error pass-through only"
    );
    let node = Node::new("ipv");
    node.write_state();
    let pod = Netns::new("ipv-p");
    let config = node.config(json!({"type": "ipvlan", "mode": "l2"}), DEAD_IMDS);
    // Record what cni-helper hands the real ipvlan plugin.
    let wrap = tempfile::tempdir().expect("tempdir");
    let seen = wrap.path().join("ipvlan-stdin.json");
    let script = wrap.path().join("ipvlan");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntee {} | exec {DEBIAN_CNI_DIR}/ipvlan\n",
            seen.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod wrapper");
    let path = format!("{}:{DEBIAN_CNI_DIR}", wrap.path().display());
    let run = node.cni_with_path("ADD", &config, &pod, &path);
    let given: Value = serde_json::from_slice(&std::fs::read(&seen).expect("ipvlan was called"))
        .expect("delegate config");
    assert_eq!(given["master"], "ens7", "{given}");
    assert_eq!(given["mode"], "l2", "{given}");
    assert_eq!(given["name"], "eni-net", "{given}");
    let e = run.err();
    assert!(
        run.stderr.contains("-> ens7 (from state file)"),
        "{}",
        run.stderr
    );
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("ipvlan")),
        "the delegate's own error: {e}"
    );
    assert_ne!(
        e["code"], 101,
        "a CNI error from ipvlan, passed through: {e}"
    );
    assert_eq!(pod.links(), vec!["lo"]);
    assert!(node.reserved_ips().is_empty());
    node.cni("DEL", &config, &pod).ok();
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn macvlan_add_check_del() {
    slave_lifecycle("macvlan", json!({"mode": "bridge"}));
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn host_device_moves_the_eni_in_and_back() {
    let node = Node::new("hd");
    node.write_state();
    let pod = Netns::new("hd-p");
    let config = node.config(json!({"type": "host-device"}), DEAD_IMDS);

    let result = node.cni("ADD", &config, &pod).ok();
    assert_eq!(result["interfaces"][0]["name"], "net1", "{result}");
    assert!(node.ns.link("ens7").is_none(), "ens7 left the node");
    let net1 = pod.link("net1").expect("net1 in the pod");
    assert_eq!(net1["address"], ENS7_MAC);

    node.cni("CHECK", &with_prev_result(config.clone(), &result), &pod)
        .ok();

    node.cni("DEL", &with_prev_result(config.clone(), &result), &pod)
        .ok();
    assert!(pod.link("net1").is_none());
    let ens7 = node.ns.link("ens7").expect("ens7 back on the node");
    assert_eq!(ens7["address"], ENS7_MAC);
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn bad_configs_fail_cleanly() {
    let node = Node::new("bad");
    node.write_state();
    let pod = Netns::new("bad-p");
    let good = node.config(json!({"type": "ipvlan"}), DEAD_IMDS);

    let mut missing = good.clone();
    missing
        .as_object_mut()
        .expect("object")
        .remove("deviceIndex");
    let e = node.cni("ADD", &missing, &pod).err();
    assert_eq!(e["code"], 7, "{e}");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("deviceIndex")),
        "{e}"
    );

    let mut unknown = good.clone();
    unknown["delegate"]["type"] = json!("bridge");
    let e = node.cni("ADD", &unknown, &pod).err();
    assert_eq!(e["code"], 7, "{e}");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("\"bridge\"")),
        "{e}"
    );

    let mut no_eni = good.clone();
    no_eni["deviceIndex"] = json!(5);
    let e = node.cni("ADD", &no_eni, &pod).err();
    assert_eq!(e["code"], 11, "{e}");
    let details = e["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("enis.json") && details.contains("eni-0test@2/0"),
        "{e}"
    );
    assert!(details.contains(DEAD_IMDS), "IMDS was tried: {e}");

    let e = node
        .cni(
            "ADD",
            &json!({"cniVersion": "1.0.0", "name": "x", "delegate": "nope"}),
            &pod,
        )
        .err();
    assert_eq!(e["code"], 7, "{e}");

    // Nothing left behind.
    assert_eq!(pod.links(), vec!["lo"]);
    assert!(node.ns.link("ens7").is_some());
    assert!(node.reserved_ips().is_empty());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn del_succeeds_when_the_eni_is_gone() {
    let node = Node::new("gone");
    node.write_state();
    let pod = Netns::new("gone-p");
    let config = node.config(json!({"type": "macvlan"}), DEAD_IMDS);
    let result = node.cni("ADD", &config, &pod).ok();

    // The ENI is detached: its interface and the state entry disappear.
    ip(&["-n", &node.ns.name, "link", "del", "ens7"]);
    std::fs::remove_file(node.state_dir.path().join("enis.json")).expect("rm state");

    let del = node.cni("DEL", &with_prev_result(config.clone(), &result), &pod);
    del.ok();
    assert!(
        del.stderr.contains("DEL without a resolved ENI"),
        "{}",
        del.stderr
    );
    assert!(pod.link("net1").is_none());
    // macvlan's DEL does not need master, so the delegate still released the address.
    assert!(node.reserved_ips().is_empty(), "{:?}", node.reserved_ips());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins, loopback fake IMDS"]
fn resolves_through_imds_and_sysfs() {
    let node = Node::new("imds");
    // No state file: resolution goes to IMDS (served inside the node namespace).
    let imds = ImdsChild::start(&node.ns, &[(ETH0_MAC, 0), (ENS7_MAC, 2)]);
    assert!(imds.url.starts_with("http://127.0.0.1:"), "{}", imds.url);

    // The CLI face, in the node namespace.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(bin())
        .args(["resolve", "2", "--state-dir"])
        .arg(node.state_dir.path())
        .args(["--imds-endpoint", &imds.url])
        .env_remove("CNI_COMMAND")
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .output()
        .expect("run resolve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ens7");
    // AWS_EC2_METADATA_DISABLED=true turns IMDS off, as in the AWS SDKs.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(bin())
        .args(["resolve", "2", "--state-dir"])
        .arg(node.state_dir.path())
        .args(["--imds-endpoint", &imds.url])
        .env_remove("CNI_COMMAND")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run resolve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("disabled by AWS_EC2_METADATA_DISABLED"),
        "{stderr}"
    );

    // macvlan through IMDS (ipvlan takes the same path; this kernel may lack ipvlan).
    let pod = Netns::new("imds-p");
    let config = node.config(json!({"type": "macvlan"}), &imds.url);
    let add = node.cni("ADD", &config, &pod);
    let result = add.ok();
    assert!(add.stderr.contains("-> ens7 (from IMDS)"), "{}", add.stderr);
    let net1 = pod.link("net1").expect("net1");
    assert_eq!(net1["link_index"].as_u64(), Some(node.ens7_ifindex()));
    node.cni("DEL", &with_prev_result(config, &result), &pod)
        .ok();
    assert!(pod.link("net1").is_none());

    // host-device through IMDS: once ens7 is in the pod, CHECK and DEL find it by MAC.
    let config = node.config(json!({"type": "host-device"}), &imds.url);
    let result = node.cni("ADD", &config, &pod).ok();
    assert!(node.ns.link("ens7").is_none());
    node.cni("CHECK", &with_prev_result(config.clone(), &result), &pod)
        .ok();
    node.cni("DEL", &with_prev_result(config, &result), &pod)
        .ok();
    assert!(node.ns.link("ens7").is_some(), "ens7 back on the node");

    // An index IMDS does not have: the error lists IMDS's answer.
    let mut none = node.config(json!({"type": "ipvlan"}), &imds.url);
    none["deviceIndex"] = json!(4);
    let e = node.cni("ADD", &none, &pod).err();
    assert_eq!(e["code"], 11);
    assert!(
        e["details"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("{ENS7_MAC}@2/0"))),
        "{e}"
    );
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins, cnitool"]
fn cnitool_drives_the_plugin() {
    let cnitool = cnitool_path();
    let node = Node::new("tool");
    node.write_state();
    let pod = Netns::new("tool-p");

    // cnitool finds plugins by type in CNI_PATH: cni-helper first, the delegates after.
    let plugin_dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(bin(), plugin_dir.path().join("cni-helper")).expect("symlink");
    let netconf_dir = tempfile::tempdir().expect("tempdir");
    let mut conf = node.config(json!({"type": "macvlan", "mode": "bridge"}), DEAD_IMDS);
    conf.as_object_mut().expect("object").remove("cniVersion");
    conf.as_object_mut().expect("object").remove("name");
    let list = json!({"cniVersion": "1.0.0", "name": "eni-net", "plugins": [conf]});
    std::fs::write(
        netconf_dir.path().join("10-eni-net.conflist"),
        list.to_string(),
    )
    .expect("write conflist");

    let run = |cmd: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node.ns.name])
            .arg(&cnitool)
            .args([cmd, "eni-net", &pod.path()])
            .env("NETCONFPATH", netconf_dir.path())
            .env(
                "CNI_PATH",
                format!("{}:{DEBIAN_CNI_DIR}", plugin_dir.path().display()),
            )
            .env("CNI_IFNAME", "net1")
            .env("CNI_HELPER_CONFIG", node.node_config_path())
            .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .output()
            .expect("run cnitool");
        assert!(
            out.status.success(),
            "cnitool {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let result: Value = serde_json::from_str(&run("add")).expect("result");
    assert_eq!(result["interfaces"][0]["name"], "net1", "{result}");
    let net1 = pod.link("net1").expect("net1");
    assert_eq!(net1["linkinfo"]["info_kind"], "macvlan");
    assert_eq!(net1["link_index"].as_u64(), Some(node.ens7_ifindex()));
    run("check");
    run("del");
    assert!(pod.link("net1").is_none());
    assert!(node.reserved_ips().is_empty());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins, multus"]
fn multus_thin_plugin_delegates_to_cni_helper() {
    // Multus without a kubeconfig runs its static `delegates`: enough to check that it can
    // exec cni-helper as a delegate (binDir), with its CNI_ARGS, and use its result.
    let multus = peer_path("multus");
    let node = Node::new("mul");
    node.write_state();
    let pod = Netns::new("mul-p");
    let bin_dir = tempfile::tempdir().expect("tempdir");
    for (name, target) in [
        ("cni-helper", bin()),
        (
            "macvlan",
            std::path::Path::new(DEBIAN_CNI_DIR).join("macvlan"),
        ),
        (
            "host-local",
            std::path::Path::new(DEBIAN_CNI_DIR).join("host-local"),
        ),
    ] {
        std::os::unix::fs::symlink(target, bin_dir.path().join(name)).expect("symlink");
    }
    let cache = tempfile::tempdir().expect("tempdir");
    let delegate = node.config(json!({"type": "macvlan", "mode": "bridge"}), DEAD_IMDS);
    let conf = json!({
        "cniVersion": "1.0.0", "name": "multus-test", "type": "multus",
        "binDir": bin_dir.path(), "cniDir": cache.path(),
        "delegates": [delegate],
    });
    let run = |cmd: &str| {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &node.ns.name])
            .arg(&multus)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", "multus-ctr")
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", bin_dir.path())
            .env("CNI_HELPER_CONFIG", node.node_config_path())
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=true;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
            )
            .env_remove("AWS_EC2_METADATA_DISABLED")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn multus");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("stdin"),
            conf.to_string().as_bytes(),
        )
        .expect("write config");
        let out = child.wait_with_output().expect("wait multus");
        assert!(
            out.status.success(),
            "multus {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let result: Value = serde_json::from_str(&run("ADD")).expect("result");
    assert_eq!(result["interfaces"][0]["name"], "net1", "{result}");
    let net1 = pod.link("net1").expect("net1");
    assert_eq!(net1["link_index"].as_u64(), Some(node.ens7_ifindex()));
    run("DEL");
    assert!(pod.link("net1").is_none());
    assert!(node.reserved_ips().is_empty());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins"]
fn a_nad_cannot_choose_the_state_dir_or_imds() {
    // The NAD author writes a state file of their own (say, in a volume of their pod)
    // mapping device index 2 to the node's uplink, and points the NAD at it.
    let node = Node::new("loc");
    node.write_state();
    node.add_uplink();
    let pod = Netns::new("loc-p");
    let evil = tempfile::tempdir().expect("tempdir");
    write_state_file(evil.path(), "eth0", ETH0_MAC);
    let mut config = node.config(json!({"type": "host-device"}), DEAD_IMDS);
    config["stateDir"] = json!(evil.path());
    let e = node.cni("ADD", &config, &pod).err();
    assert_eq!(e["code"], 7, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .is_some_and(|m| m.contains("stateDir") && m.contains("node-local")),
        "{e}"
    );
    let mut config = node.config(json!({"type": "host-device"}), DEAD_IMDS);
    config["imdsEndpoint"] = json!("http://127.0.0.1:9");
    let e = node.cni("ADD", &config, &pod).err();
    assert_eq!(e["code"], 7, "{e}");
    assert!(
        node.ns.link("eth0").is_some(),
        "the uplink stayed on the node"
    );
    assert_eq!(pod.links(), vec!["lo"]);

    // The node-local config file is where they belong: with it, the ENI resolves.
    let config = node.config(json!({"type": "host-device"}), DEAD_IMDS);
    let result = node.cni("ADD", &config, &pod).ok();
    assert!(pod.link("net1").is_some(), "{result}");
    node.cni("DEL", &with_prev_result(config, &result), &pod)
        .ok();
    assert!(node.ns.link("ens7").is_some());
}

#[test]
#[ignore = "integration: root, network namespaces, Debian CNI plugins, loopback fake IMDS"]
fn host_device_never_takes_the_primary_interface() {
    let node = Node::new("pri");
    node.add_uplink();
    let pod = Netns::new("pri-p");
    // A stale or forged (node-local) state file says device index 2 is eth0, which
    // carries the default route.
    write_state_file(node.state_dir.path(), "eth0", ETH0_MAC);
    let config = node.config(json!({"type": "host-device"}), DEAD_IMDS);
    let e = node.cni("ADD", &config, &pod).err();
    assert_eq!(e["code"], 102, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .is_some_and(|m| m.contains("default route")),
        "{e}"
    );
    assert!(node.ns.link("eth0").is_some(), "eth0 stayed on the node");
    assert_eq!(pod.links(), vec!["lo"]);

    // Without the default route, eth0 is still the ENI at device index 0 (IMDS says so).
    ip(&["-n", &node.ns.name, "route", "del", "default"]);
    let imds = ImdsChild::start(&node.ns, &[(ETH0_MAC, 0), (ENS7_MAC, 2)]);
    let config = node.config(json!({"type": "host-device"}), &imds.url);
    let e = node.cni("ADD", &config, &pod).err();
    assert_eq!(e["code"], 102, "{e}");
    assert!(
        e["msg"]
            .as_str()
            .is_some_and(|m| m.contains("device index 0")),
        "{e}"
    );
    assert!(node.ns.link("eth0").is_some(), "eth0 stayed on the node");

    // The real ENI at device index 2 still moves.
    write_state_file(node.state_dir.path(), "ens7", ENS7_MAC);
    let result = node.cni("ADD", &config, &pod).ok();
    assert_eq!(pod.link("net1").expect("net1")["address"], ENS7_MAC);
    node.cni("DEL", &with_prev_result(config, &result), &pod)
        .ok();
    assert!(node.ns.link("ens7").is_some());
}

#[test]
#[ignore = "integration: root, network namespaces"]
fn missing_cni_variables_are_error_4() {
    let node = Node::new("env");
    node.write_state();
    let config = node.config(json!({"type": "macvlan"}), DEAD_IMDS);
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(bin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_HELPER_CONFIG", node.node_config_path())
        .env_remove("CNI_NETNS")
        .env_remove("CNI_CONTAINERID")
        .env_remove("CNI_IFNAME")
        .env_remove("CNI_PATH")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        config.to_string().as_bytes(),
    )
    .expect("write");
    let out = child.wait_with_output().expect("wait");
    let e: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert_eq!(e["code"], 4, "{e}");
    assert!(
        e["msg"].as_str().is_some_and(|m| m.contains("CNI_NETNS")),
        "{e}"
    );
}

fn cnitool_path() -> std::path::PathBuf {
    peer_path("cnitool")
}

/// A peer binary from `hack/peers.sh` (`$ENI_BIN_DIR`, default ~/.cache/aws-multi-eni/bin).
fn peer_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("ENI_BIN_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/aws-multi-eni/bin"))
        })
        .expect("ENI_BIN_DIR or HOME");
    let p = dir.join(name);
    assert!(p.is_file(), "{} missing: run hack/peers.sh", p.display());
    p
}

/// Not a test: the fake IMDS server process that [`ImdsChild`] starts inside a namespace.
/// Without its environment variable it does nothing.
#[test]
#[ignore = "integration: helper process for the IMDS test (no-op on its own)"]
fn fake_imds_child() {
    fake_imds_child_main();
}
