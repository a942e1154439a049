//! The device plugin's own metric: devices handed to containers, by resource. The node
//! daemon registers it in its `/metrics` (`eni_manager_device_allocations_total`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Label of [`Allocations`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// Extended resource name, e.g. `intel.com/intel_sriov_netdevice`.
    pub resource: String,
}

/// Devices allocated to containers (`Allocate` calls that succeeded), by resource. A
/// handle: clones count into the same family; unregistered it counts for nobody.
#[derive(Clone, Debug, Default)]
pub struct Allocations(Family<ResourceLabels, Counter>);

impl Allocations {
    /// The family, to register in a registry.
    pub fn family(&self) -> Family<ResourceLabels, Counter> {
        self.0.clone()
    }

    /// Counts `devices` allocated from `resource`.
    pub fn record(&self, resource: &str, devices: usize) {
        self.0
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .inc_by(devices as u64);
    }

    /// Devices allocated so far from `resource`.
    pub fn get(&self, resource: &str) -> u64 {
        self.0
            .get(&ResourceLabels {
                resource: resource.to_string(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

// A metrics handle is not a setting: configs compare equal whatever handle they carry.
impl PartialEq for Allocations {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Allocations {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_count_together() {
        let a = Allocations::default();
        let b = a.clone();
        b.record("intel.com/x", 2);
        a.record("intel.com/x", 1);
        assert_eq!(a.get("intel.com/x"), 3);
        assert_eq!(a.get("intel.com/y"), 0);
    }
}
