//! Which devices running pods hold, from the kubelet's PodResources API (`List` on the
//! kubelet's pod-resources socket). Asked before a device is given back to its kernel
//! driver: unbinding vfio-pci while a DPDK process holds the group blocks in the kernel,
//! and takes the device from under the pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eni_proto::podresources::v1 as api;

use crate::error::{Error, Result};

/// One container a device is allocated to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Extended resource the device was allocated as.
    pub resource: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} (container {}, resource {})",
            self.namespace, self.pod, self.container, self.resource
        )
    }
}

/// Device ID (for our devices: the PCI address) -> who holds it.
pub type Allocations = BTreeMap<String, Vec<Holder>>;

/// Turns a `List` answer into [`Allocations`].
pub fn allocations(list: &api::ListPodResourcesResponse) -> Allocations {
    let mut out = Allocations::new();
    for pod in &list.pod_resources {
        for c in &pod.containers {
            for d in &c.devices {
                for id in &d.device_ids {
                    out.entry(id.clone()).or_default().push(Holder {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                        resource: d.resource_name.clone(),
                    });
                }
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// A client of the kubelet's PodResources API.
#[derive(Debug, Clone)]
pub struct PodResources {
    socket: PathBuf,
    timeout: Duration,
}

impl PodResources {
    /// A client for the socket at `socket`; each call gives up after `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Which devices the kubelet has allocated to the containers of its pods.
    ///
    /// # Errors
    /// The socket cannot be reached, the call fails or takes longer than the timeout.
    pub async fn allocated(&self) -> Result<Allocations> {
        let call = async {
            let channel = eni_deviceplugin::connect_unix(&self.socket)
                .await
                .map_err(|e| e.to_string())?;
            let mut client =
                api::pod_resources_lister_client::PodResourcesListerClient::new(channel);
            client
                .list(api::ListPodResourcesRequest {})
                .await
                .map(|r| allocations(r.get_ref()))
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        };
        let reason = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(a)) => return Ok(a),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        Err(Error::PodResources {
            socket: self.socket.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_answer_maps_devices_to_their_pods() {
        let list = api::ListPodResourcesResponse {
            pod_resources: vec![api::PodResources {
                name: "dpdk-app".into(),
                namespace: "default".into(),
                containers: vec![api::ContainerResources {
                    name: "app".into(),
                    devices: vec![
                        api::ContainerDevices {
                            resource_name: "intel.com/intel_sriov_netdevice".into(),
                            device_ids: vec!["0000:00:07.0".into(), "0000:00:08.0".into()],
                            topology: None,
                        },
                        api::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec!["GPU-1".into()],
                            topology: None,
                        },
                    ],
                }],
            }],
        };
        let a = allocations(&list);
        assert_eq!(a.len(), 3);
        let h = &a["0000:00:07.0"][0];
        assert_eq!(
            h.to_string(),
            "pod default/dpdk-app (container app, resource intel.com/intel_sriov_netdevice)"
        );
    }
}
