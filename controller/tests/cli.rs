//! The real `eni-controller` binary parses its boolean flags and their environment
//! variables the way the chart and the docs use them. The `crd` subcommand prints the CRD
//! and exits after parsing every setting, so no cluster or AWS is needed.

use std::process::Command;

fn controller(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eni-controller"));
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run eni-controller")
}

#[test]
fn boolean_flags_take_the_three_forms_and_the_env_var() {
    for flag in [
        "--orphan-dry-run",
        "--leader-elect",
        "--enable-leader-election",
    ] {
        for form in [
            flag.to_string(),
            format!("{flag}=true"),
            format!("{flag}=false"),
        ] {
            let out = controller(&[&form, "crd"], &[]);
            assert!(
                out.status.success(),
                "{form}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("kind: CustomResourceDefinition")
            );
        }
        let out = controller(&[&format!("{flag}=ture"), "crd"], &[]);
        assert!(!out.status.success(), "{flag}=ture was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid value"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (name, value, ok) in [
        ("ENI_CONTROLLER_ORPHAN_DRY_RUN", "true", true),
        ("ENI_CONTROLLER_ORPHAN_DRY_RUN", "false", true),
        ("ORPHAN_DRY_RUN", "1", true),
        ("ENI_CONTROLLER_LEADER_ELECT", "no", true),
        ("LEADER_ELECT", "maybe", false),
        ("MAX_CONCURRENT_RECONCILES", "many", false),
    ] {
        let out = controller(&["crd"], &[(name, value)]);
        assert_eq!(
            out.status.success(),
            ok,
            "{name}={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
