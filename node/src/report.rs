//! `status.nodeReports[nodeName=<this node>]`: what the daemon did, per NodeENI.
//!
//! Written with server-side apply on the status subresource under the field manager
//! `eni-manager-<node>`. `nodeReports` is a list map keyed by `nodeName`, so each daemon
//! owns exactly its own entry and never conflicts with the controller (which owns every
//! other status field) or with other nodes. Applying a configuration without the entry
//! removes it. RBAC needed: get/list/watch `nodeenis`, patch `nodeenis/status`.

use eni_api::{InterfaceReport, NodeENI};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::error::Result;

/// Field manager of the daemon on `node` (at most 128 characters, as the API requires).
pub fn field_manager(node: &str) -> String {
    let mut m = format!("eni-manager-{node}");
    if m.len() > 128 {
        let mut end = 128;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
    }
    m
}

/// The interfaces this node's entry lists in `ne`'s status, if it has an entry.
pub fn current(ne: &NodeENI, node: &str) -> Option<Vec<InterfaceReport>> {
    ne.status
        .as_ref()?
        .node_reports
        .iter()
        .find(|r| r.node_name == node)
        .map(|r| r.interfaces.clone())
}

/// The apply configuration: this node's entry with `interfaces`, or no entry at all.
pub fn apply_body(
    name: &str,
    node: &str,
    interfaces: Option<&[InterfaceReport]>,
) -> serde_json::Value {
    let reports = match interfaces {
        Some(ifs) => serde_json::json!([{
            "nodeName": node,
            "lastUpdated": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "interfaces": ifs,
        }]),
        None => serde_json::json!([]),
    };
    serde_json::json!({
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "NodeENI",
        "metadata": {"name": name},
        "status": {"nodeReports": reports},
    })
}

/// Writes (or, with `None`, removes) this node's entry in `name`'s status.
pub async fn apply(
    api: &Api<NodeENI>,
    name: &str,
    node: &str,
    interfaces: Option<&[InterfaceReport]>,
) -> Result<()> {
    let pp = PatchParams::apply(&field_manager(node)).force();
    api.patch_status(name, &pp, &Patch::Apply(apply_body(name, node, interfaces)))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_holds_only_this_nodes_entry() {
        let r = InterfaceReport {
            eni_id: "eni-1".into(),
            mac_address: "02:00:00:00:00:01".into(),
            device_index: 2,
            interface_name: Some("ens7".into()),
            up: true,
            mtu: Some(9001),
            ..Default::default()
        };
        let b = apply_body("ne", "n1", Some(std::slice::from_ref(&r)));
        assert_eq!(b["status"]["nodeReports"][0]["nodeName"], "n1");
        assert_eq!(
            b["status"]["nodeReports"][0]["interfaces"][0]["interfaceName"],
            "ens7"
        );
        assert!(b["status"].get("attachments").is_none());
        assert_eq!(
            apply_body("ne", "n1", None)["status"]["nodeReports"],
            serde_json::json!([])
        );
        assert_eq!(field_manager(&"x".repeat(300)).len(), 128);
    }
}
