//! The state of one resource as advertised to the kubelet.

use std::collections::BTreeMap;

use eni_proto::deviceplugin::v1beta1 as api;

use crate::BoundDevice;
use crate::device::{DeviceFacts, DeviceKind, DeviceProbe, Health, evaluate_health};

/// One advertised device with what the host says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// What the node daemon published.
    pub device: BoundDevice,
    /// How it is handed to containers.
    pub kind: DeviceKind,
    /// What sysfs and `/dev` say.
    pub facts: DeviceFacts,
    /// Health derived from the facts.
    pub health: Health,
}

impl DeviceEntry {
    /// Entry for `device` given `facts`.
    pub fn new(device: BoundDevice, facts: DeviceFacts) -> Self {
        let health = evaluate_health(&device, &facts);
        Self {
            kind: DeviceKind::for_driver(&device.driver),
            device,
            facts,
            health,
        }
    }
}

/// All devices of one resource, keyed by PCI address (the kubelet's device ID).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Devices by ID.
    pub devices: BTreeMap<String, DeviceEntry>,
}

impl Snapshot {
    /// Probes every device and builds the snapshot.
    pub fn probe<'a>(
        devices: impl IntoIterator<Item = &'a BoundDevice>,
        probe: &dyn DeviceProbe,
    ) -> Self {
        let devices = devices
            .into_iter()
            .map(|d| {
                let facts = probe.probe(&d.pci_address);
                (d.pci_address.clone(), DeviceEntry::new(d.clone(), facts))
            })
            .collect();
        Self { devices }
    }

    /// The full list as sent on `ListAndWatch`.
    pub fn list_response(&self) -> api::ListAndWatchResponse {
        api::ListAndWatchResponse {
            devices: self
                .devices
                .values()
                .map(|e| api::Device {
                    id: e.device.pci_address.clone(),
                    health: e.health.as_kubelet_str().to_owned(),
                    topology: e.facts.numa_node.map(|n| api::TopologyInfo {
                        nodes: vec![api::NumaNode { id: n }],
                    }),
                })
                .collect(),
        }
    }
}

/// Groups devices by resource name, applying the netdev policy: devices bound to a
/// kernel driver are kept only under `netdev_resource`. Returns the kept groups and the
/// devices that were dropped.
pub fn group_by_resource<'a>(
    devices: &'a [BoundDevice],
    netdev_resource: Option<&str>,
) -> (
    BTreeMap<&'a str, Vec<&'a BoundDevice>>,
    Vec<&'a BoundDevice>,
) {
    let mut groups: BTreeMap<&str, Vec<&BoundDevice>> = BTreeMap::new();
    let mut dropped = Vec::new();
    for d in devices {
        let keep = match DeviceKind::for_driver(&d.driver) {
            DeviceKind::Vfio => true,
            DeviceKind::Netdev => netdev_resource == Some(d.resource_name.as_str()),
        };
        if keep && !d.resource_name.is_empty() && !d.pci_address.is_empty() {
            groups.entry(d.resource_name.as_str()).or_default().push(d);
        } else {
            dropped.push(d);
        }
    }
    (groups, dropped)
}
