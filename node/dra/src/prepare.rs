//! Pure logic of NodePrepareResources: which of this node's devices a claim's allocation
//! names (refusing anything else), and the claim status (network data) to write.

use std::collections::BTreeMap;

use eni_deviceplugin::device::Health;
use eni_deviceplugin::snapshot::DeviceEntry;
use k8s_openapi::api::resource::v1::{AllocatedDeviceStatus, NetworkDeviceData, ResourceClaim};

/// Why a claim cannot be prepared on this node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The claim in the API server is another object than the kubelet asked for.
    #[error(
        "claim {namespace}/{name}: UID {found} in the API server, the kubelet asked for {want}"
    )]
    UidMismatch {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// UID the kubelet sent.
        want: String,
        /// UID in the API server.
        found: String,
    },
    /// The claim is not allocated.
    #[error("claim {namespace}/{name} is not allocated")]
    NotAllocated {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An allocated device of our driver is in another pool (another node's).
    #[error(
        "claim {claim}: device {device} of pool {pool} is not on this node (pool {ours}); refusing to prepare it"
    )]
    OtherPool {
        /// `namespace/name`.
        claim: String,
        /// Device name.
        device: String,
        /// Its pool.
        pool: String,
        /// This node's pool.
        ours: String,
    },
    /// An allocated device this node does not (or no longer) publish.
    #[error(
        "claim {claim}: device {device} is not one of this node's devices (it may have been detached)"
    )]
    UnknownDevice {
        /// `namespace/name`.
        claim: String,
        /// Device name.
        device: String,
    },
    /// An allocated device that is unhealthy now.
    #[error("claim {claim}: device {device} is unhealthy: {reason}")]
    Unhealthy {
        /// `namespace/name`.
        claim: String,
        /// Device name.
        device: String,
        /// Why.
        reason: String,
    },
}

/// One device of the claim's allocation that is ours, with the requests it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocated<'a> {
    /// The claim's requests served by this device.
    pub request_names: Vec<String>,
    /// Device name.
    pub device: String,
    /// Inventory entry.
    pub entry: &'a DeviceEntry,
}

/// Resolves the claim's allocation results of `driver` to this node's devices
/// (`inventory` keyed by device name; pool `pool`). Results of other drivers are
/// ignored; a claim with none of ours resolves to no devices.
///
/// # Errors
/// [`PrepareError`]: wrong UID, not allocated, a device of another pool, unknown or
/// unhealthy.
pub fn resolve<'a>(
    claim: &ResourceClaim,
    want_uid: &str,
    driver: &str,
    pool: &str,
    inventory: &'a BTreeMap<String, DeviceEntry>,
) -> Result<Vec<Allocated<'a>>, PrepareError> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let found = claim.metadata.uid.clone().unwrap_or_default();
    if found != want_uid {
        return Err(PrepareError::UidMismatch {
            namespace,
            name,
            want: want_uid.to_owned(),
            found,
        });
    }
    let Some(alloc) = claim.status.as_ref().and_then(|s| s.allocation.as_ref()) else {
        return Err(PrepareError::NotAllocated { namespace, name });
    };
    let label = format!("{namespace}/{name}");
    let mut out: Vec<Allocated<'a>> = Vec::new();
    for r in alloc
        .devices
        .as_ref()
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| r.driver == driver)
    {
        if r.pool != pool {
            return Err(PrepareError::OtherPool {
                claim: label,
                device: r.device.clone(),
                pool: r.pool.clone(),
                ours: pool.to_owned(),
            });
        }
        let entry = inventory
            .get(&r.device)
            .ok_or_else(|| PrepareError::UnknownDevice {
                claim: label.clone(),
                device: r.device.clone(),
            })?;
        if let Health::Unhealthy(reason) = &entry.health {
            return Err(PrepareError::Unhealthy {
                claim: label,
                device: r.device.clone(),
                reason: reason.clone(),
            });
        }
        match out.iter_mut().find(|a| a.device == r.device) {
            Some(a) => a.request_names.push(r.request.clone()),
            None => out.push(Allocated {
                request_names: vec![r.request.clone()],
                device: r.device.clone(),
                entry,
            }),
        }
    }
    Ok(out)
}

/// The claim's `status.devices` entries for our devices: network data with the
/// interface (the PCI address for a DPDK device, which has no netdev), the MAC and the
/// ENI's addresses.
pub fn device_statuses(
    driver: &str,
    pool: &str,
    devices: &[Allocated<'_>],
) -> Vec<AllocatedDeviceStatus> {
    devices
        .iter()
        .map(|a| {
            let d = &a.entry.device;
            // The PCI address: a DPDK device has no netdev, and a netdev ENI's name in
            // the pod is chosen later by the CNI plugin that moves it.
            let interface = d.pci_address.clone();
            AllocatedDeviceStatus {
                driver: driver.to_owned(),
                pool: pool.to_owned(),
                device: a.device.clone(),
                network_data: Some(NetworkDeviceData {
                    interface_name: Some(interface),
                    hardware_address: Some(d.mac_address.to_ascii_lowercase()),
                    ips: Some(d.details.ips.clone()).filter(|v| !v.is_empty()),
                }),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use eni_deviceplugin::BoundDevice;
    use eni_deviceplugin::device::DeviceFacts;

    fn entry(pci: &str, releasing: bool) -> DeviceEntry {
        DeviceEntry::new(
            BoundDevice {
                pci_address: pci.into(),
                resource_name: "intel.com/intel_sriov_netdevice".into(),
                driver: "vfio-pci".into(),
                eni_id: "eni-1".into(),
                mac_address: "02:AB:00:00:00:01".into(),
                device_index: 2,
                releasing,
                details: eni_deviceplugin::EniDetails {
                    ips: vec!["10.0.1.5/24".into()],
                    ..Default::default()
                },
            },
            DeviceFacts {
                present: true,
                driver: Some("vfio-pci".into()),
                iommu_group: Some("3".into()),
                noiommu: true,
                numa_node: None,
                group_device_present: true,
                vfio_container_present: true,
            },
        )
    }

    fn claim(uid: &str, results: serde_json::Value) -> ResourceClaim {
        let mut c = serde_json::json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ns", "uid": uid},
            "spec": {}
        });
        if !results.is_null() {
            c["status"] = serde_json::json!({"allocation": {"devices": {"results": results}}});
        }
        serde_json::from_value(c).expect("claim")
    }

    fn result(driver: &str, pool: &str, device: &str, request: &str) -> serde_json::Value {
        serde_json::json!({"driver": driver, "pool": pool, "device": device, "request": request})
    }

    #[test]
    fn resolves_our_devices_only() {
        let inv = BTreeMap::from([
            ("eni-a".to_owned(), entry("0000:00:07.0", false)),
            ("eni-b".to_owned(), entry("0000:00:08.0", true)),
        ]);
        let c = claim(
            "u1",
            serde_json::json!([
                result("d", "n1", "eni-a", "r1"),
                result("d", "n1", "eni-a", "r2"),
                result("gpu.example.com", "n1", "gpu-0", "r3"),
            ]),
        );
        let got = resolve(&c, "u1", "d", "n1", &inv).expect("resolves");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].request_names, ["r1", "r2"]);
        assert_eq!(got[0].entry.device.pci_address, "0000:00:07.0");

        let st = device_statuses("d", "n1", &got);
        let nd = st[0].network_data.as_ref().expect("network data");
        assert_eq!(nd.interface_name.as_deref(), Some("0000:00:07.0"));
        assert_eq!(nd.hardware_address.as_deref(), Some("02:ab:00:00:00:01"));
        assert_eq!(nd.ips.as_deref(), Some(&["10.0.1.5/24".to_owned()][..]));
        assert_eq!(
            (
                st[0].driver.as_str(),
                st[0].pool.as_str(),
                st[0].device.as_str()
            ),
            ("d", "n1", "eni-a")
        );
    }

    #[test]
    fn refusals() {
        let inv = BTreeMap::from([
            ("eni-a".to_owned(), entry("0000:00:07.0", false)),
            ("eni-b".to_owned(), entry("0000:00:08.0", true)),
        ]);
        let one = |r| claim("u1", serde_json::json!([r]));
        let e = resolve(&one(result("d", "n2", "eni-a", "r")), "u1", "d", "n1", &inv);
        assert!(matches!(e, Err(PrepareError::OtherPool { .. })), "{e:?}");
        let e = resolve(&one(result("d", "n1", "eni-z", "r")), "u1", "d", "n1", &inv);
        assert!(
            matches!(e, Err(PrepareError::UnknownDevice { .. })),
            "{e:?}"
        );
        let e = resolve(&one(result("d", "n1", "eni-b", "r")), "u1", "d", "n1", &inv);
        assert!(matches!(e, Err(PrepareError::Unhealthy { .. })), "{e:?}");
        let e = resolve(&one(result("d", "n1", "eni-a", "r")), "u2", "d", "n1", &inv);
        assert!(matches!(e, Err(PrepareError::UidMismatch { .. })), "{e:?}");
        let e = resolve(&claim("u1", serde_json::Value::Null), "u1", "d", "n1", &inv);
        assert!(matches!(e, Err(PrepareError::NotAllocated { .. })), "{e:?}");
        let msg = resolve(&one(result("d", "n2", "eni-a", "r")), "u1", "d", "n1", &inv)
            .expect_err("other pool")
            .to_string();
        assert!(msg.contains("not on this node"), "{msg}");
    }
}
