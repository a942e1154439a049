//! The ENI facts the DRA driver publishes beside the device plugin's: what each attached
//! ENI's NodeENI says about it (NodeENI name, subnet, MTU, addresses). Pure.

use std::collections::BTreeMap;

use eni_api::{AttachmentStatus, NodeENI};
use eni_deviceplugin::EniDetails;

/// Per ENI id, the details of the ENIs attached to `node` as the NodeENIs' status lists
/// them. The MTU follows the same precedence as the node daemon's (attachment, spec,
/// `default_mtu`). IPs are in CIDR form with the subnet's prefix length (`/32` when the
/// subnet's CIDR is not recorded).
pub fn details_from_nodeenis<'a>(
    nodeenis: impl IntoIterator<Item = &'a NodeENI>,
    node: &str,
    default_mtu: u32,
) -> BTreeMap<String, EniDetails> {
    let mut out = BTreeMap::new();
    for ne in nodeenis {
        let (Some(name), Some(status)) = (ne.metadata.name.as_deref(), ne.status.as_ref()) else {
            continue;
        };
        for a in &status.attachments {
            if a.node_id != node || a.status != AttachmentStatus::Attached.as_str() {
                continue;
            }
            let mtu = a
                .mtu
                .or(ne.spec.mtu)
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| *m > 0)
                .unwrap_or(default_mtu);
            let prefix = a
                .subnet_cidr
                .as_deref()
                .and_then(|c| c.split_once('/'))
                .map_or("32", |(_, p)| p);
            let ips = a
                .private_ip_address
                .iter()
                .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
                .map(|ip| format!("{ip}/{prefix}"))
                .collect();
            out.insert(
                a.eni_id.clone(),
                EniDetails {
                    node_eni: name.to_owned(),
                    subnet_id: Some(a.subnet_id.clone()).filter(|s| !s.is_empty()),
                    vpc_id: None,
                    mtu: Some(mtu),
                    ips,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use eni_api::{ENIAttachment, NodeENISpec, NodeENIStatus};

    fn nodeeni(name: &str, attachments: Vec<ENIAttachment>) -> NodeENI {
        let mut ne = NodeENI::new(
            name,
            NodeENISpec {
                mtu: Some(1500),
                ..Default::default()
            },
        );
        ne.status = Some(NodeENIStatus {
            attachments,
            ..Default::default()
        });
        ne
    }

    fn attachment(node: &str, eni: &str, status: &str) -> ENIAttachment {
        ENIAttachment {
            node_id: node.into(),
            eni_id: eni.into(),
            subnet_id: "subnet-1".into(),
            subnet_cidr: Some("10.0.1.0/24".into()),
            private_ip_address: Some("10.0.1.5".into()),
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn details_of_this_nodes_attached_enis() {
        let mut other_mtu = attachment("n1", "eni-b", "Attached");
        other_mtu.mtu = Some(9001);
        other_mtu.subnet_cidr = None;
        let nes = [
            nodeeni("a", vec![attachment("n1", "eni-a", "Attached")]),
            nodeeni(
                "b",
                vec![
                    other_mtu,
                    attachment("n2", "eni-c", "Attached"),
                    attachment("n1", "eni-d", "Attaching"),
                ],
            ),
        ];
        let d = details_from_nodeenis(&nes, "n1", 9001);
        assert_eq!(d.keys().collect::<Vec<_>>(), ["eni-a", "eni-b"]);
        assert_eq!(
            d["eni-a"],
            EniDetails {
                node_eni: "a".into(),
                subnet_id: Some("subnet-1".into()),
                vpc_id: None,
                mtu: Some(1500),
                ips: vec!["10.0.1.5/24".into()],
            }
        );
        assert_eq!(d["eni-b"].mtu, Some(9001));
        assert_eq!(d["eni-b"].ips, ["10.0.1.5/32"]);
        assert_eq!(d["eni-b"].node_eni, "b");
    }
}
