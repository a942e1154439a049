//! The node daemon's one device inventory, feeding both the device plugin and the DRA
//! driver: the devices (from the state file) and what each attached ENI's NodeENI says
//! about it (NodeENI name, subnet, MTU, addresses). Pure.

use std::collections::{BTreeMap, BTreeSet};

use eni_api::{AttachmentStatus, NodeENI};
use eni_deviceplugin::device::DeviceKind;
use eni_deviceplugin::{BoundDevice, EniDetails};
use eni_state::EniState;

/// The devices to publish from the state file's ENIs: every DPDK-bound ENI under its
/// resource name, and, when `netdev_resource` is set, every ENI still on its kernel
/// driver whose netdev is in the node's namespace under that name (the DRA driver serves
/// it: the device plugin never advertises netdev ENIs). A netdev ENI moved into a pod is
/// not in the node's namespace, so it leaves the inventory until it comes back. Devices
/// in `releasing` are marked so; `details` (per ENI id) are added, sorted.
pub fn bound_devices(
    enis: &[EniState],
    releasing: &BTreeSet<String>,
    details: &BTreeMap<String, EniDetails>,
    netdev_resource: Option<&str>,
) -> Vec<BoundDevice> {
    let mut devices: Vec<BoundDevice> = enis
        .iter()
        .filter(|e| e.device_index != 0)
        .filter_map(|e| {
            let pci_address = e.pci_address.clone()?;
            let driver = e.driver.clone()?;
            let resource_name = if e.dpdk_bound {
                e.resource_name.clone()?
            } else {
                // A netdev ENI: on a kernel driver, its interface seen by the daemon.
                let resource = netdev_resource?;
                let on_kernel_driver = DeviceKind::for_driver(&driver) == DeviceKind::Netdev;
                (on_kernel_driver && e.interface_name.is_some()).then(|| resource.to_owned())?
            };
            Some(BoundDevice {
                releasing: releasing.contains(&pci_address),
                pci_address,
                resource_name,
                driver,
                eni_id: e.eni_id.clone(),
                mac_address: e.mac_address.clone(),
                device_index: e.device_index,
                details: details
                    .get(&e.eni_id)
                    .cloned()
                    .unwrap_or_else(|| EniDetails {
                        node_eni: e.node_eni.clone(),
                        ..EniDetails::default()
                    }),
            })
        })
        .collect();
    devices.sort();
    devices
}

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
                    vpc_id: a.vpc_id.clone().filter(|v| !v.is_empty()),
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

    fn eni(id: &str, index: i32, driver: &str, dpdk: bool, ifname: Option<&str>) -> EniState {
        EniState {
            eni_id: id.into(),
            mac_address: format!("02:00:00:00:00:{index:02x}"),
            device_index: index,
            network_card_index: 0,
            node_eni: "ne".into(),
            interface_name: ifname.map(Into::into),
            pci_address: Some(format!("0000:00:{index:02x}.0")),
            driver: Some(driver.into()),
            dpdk_bound: dpdk,
            resource_name: dpdk.then(|| "intel.com/intel_sriov_netdevice".into()),
        }
    }

    #[test]
    fn dpdk_enis_always_netdev_enis_when_enabled() {
        let enis = [
            eni("eni-p", 0, "ena", false, Some("eth0")),
            eni("eni-d", 2, "vfio-pci", true, None),
            eni("eni-n", 3, "ena", false, Some("eth3")),
            // Its netdev is in a pod (host-device moved it): not offered again.
            eni("eni-gone", 4, "ena", false, None),
            // Being unbound from vfio-pci: neither DPDK nor a netdev yet.
            eni("eni-x", 5, "vfio-pci", false, None),
        ];
        let releasing = BTreeSet::from(["0000:00:02.0".to_owned()]);
        let mut details = BTreeMap::new();
        details.insert(
            "eni-n".to_owned(),
            EniDetails {
                node_eni: "plain".into(),
                mtu: Some(9001),
                ..EniDetails::default()
            },
        );
        let dpdk_only = bound_devices(&enis, &releasing, &details, None);
        assert_eq!(dpdk_only.len(), 1);
        assert_eq!(dpdk_only[0].eni_id, "eni-d");
        assert_eq!(
            dpdk_only[0].resource_name,
            "intel.com/intel_sriov_netdevice"
        );
        assert!(dpdk_only[0].releasing);
        assert_eq!(dpdk_only[0].details.node_eni, "ne");

        let both = bound_devices(&enis, &releasing, &details, Some("networking.k8s.aws/eni"));
        let ids: Vec<(&str, &str, &str)> = both
            .iter()
            .map(|d| {
                (
                    d.eni_id.as_str(),
                    d.resource_name.as_str(),
                    d.driver.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("eni-d", "intel.com/intel_sriov_netdevice", "vfio-pci"),
                ("eni-n", "networking.k8s.aws/eni", "ena"),
            ]
        );
        assert_eq!(both[1].pci_address, "0000:00:03.0");
        assert!(!both[1].releasing);
        assert_eq!(both[1].details.mtu, Some(9001));
        assert_eq!(DeviceKind::for_driver(&both[1].driver), DeviceKind::Netdev);
    }

    #[test]
    fn details_of_this_nodes_attached_enis() {
        let mut other_mtu = attachment("n1", "eni-b", "Attached");
        other_mtu.mtu = Some(9001);
        other_mtu.subnet_cidr = None;
        let mut with_vpc = attachment("n1", "eni-a", "Attached");
        with_vpc.vpc_id = Some("vpc-0123".into());
        let nes = [
            nodeeni("a", vec![with_vpc]),
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
                vpc_id: Some("vpc-0123".into()),
                mtu: Some(1500),
                ips: vec!["10.0.1.5/24".into()],
            }
        );
        assert_eq!(d["eni-b"].mtu, Some(9001));
        assert_eq!(d["eni-b"].ips, ["10.0.1.5/32"]);
        assert_eq!(d["eni-b"].node_eni, "b");
    }
}
