//! Kubelet device plugin (deviceplugin/v1beta1) for DPDK-bound ENIs.

/// A device the node daemon has bound to a userspace-I/O driver, to be advertised to the
/// kubelet under `resource_name`. The node daemon publishes the full current set through a
/// `tokio::sync::watch` channel whenever it changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoundDevice {
    /// PCI address, e.g. `0000:00:07.0`; the device ID the kubelet sees.
    pub pci_address: String,
    /// Extended resource name, e.g. `intel.com/intel_sriov_netdevice`.
    pub resource_name: String,
    /// Driver the device is bound to (`vfio-pci`, ...).
    pub driver: String,
    /// The ENI.
    pub eni_id: String,
    /// The ENI's MAC address.
    pub mac_address: String,
    /// The ENI's device index.
    pub device_index: i32,
}
