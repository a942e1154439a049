//! Kubelet gRPC APIs used by the node daemon.
//!
//! * [`deviceplugin::v1beta1`]: the device plugin API (`Registration` served by the
//!   kubelet, `DevicePlugin` served by plugins).
//! * [`pluginregistration::v1`]: the plugin-watcher registration API served by a plugin
//!   on a socket in the kubelet's `plugins_registry` directory.
//! * [`podresources::v1`]: the kubelet's PodResources API (`List`: which devices the
//!   running pods hold), served on the kubelet's pod-resources socket.
//! * [`dra::v1`]: the kubelet DRA plugin API (`NodePrepareResources`,
//!   `NodeUnprepareResources`), served by a DRA driver on its `dra.sock`; [`dra::v1beta1`]
//!   the same for kubelets before 1.34.
//!
//! The `.proto` files live in `proto/kubelet/` and are compiled at build time with a
//! vendored `protoc`, so no system protobuf compiler is needed.

/// Device plugin API.
pub mod deviceplugin {
    /// `deviceplugin/v1beta1`.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");

        /// API version string sent in `RegisterRequest.version`.
        pub const VERSION: &str = "v1beta1";
        /// Socket the kubelet serves `Registration` on, relative to the plugin directory.
        pub const KUBELET_SOCKET: &str = "kubelet.sock";
        /// Default device-plugin directory of the kubelet.
        pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins";
        /// `Device.health` value for a usable device.
        pub const HEALTHY: &str = "Healthy";
        /// `Device.health` value for an unusable device.
        pub const UNHEALTHY: &str = "Unhealthy";
    }
}

/// Plugin watcher registration API.
pub mod pluginregistration {
    /// `pluginregistration/v1`.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("pluginregistration");

        /// `PluginInfo.type` for device plugins.
        pub const DEVICE_PLUGIN: &str = "DevicePlugin";
        /// `PluginInfo.type` for DRA drivers.
        pub const DRA_PLUGIN: &str = "DRAPlugin";
        /// Default plugin-watcher directory of the kubelet.
        pub const PLUGINS_REGISTRY_PATH: &str = "/var/lib/kubelet/plugins_registry";
    }
}

/// PodResources API.
pub mod podresources {
    /// `podresources/v1` (the subset the node daemon reads).
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("v1");

        /// Default path of the kubelet's pod-resources socket.
        pub const KUBELET_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
    }
}

/// Kubelet DRA plugin API.
pub mod dra {
    /// `k8s.io.kubelet.pkg.apis.dra.v1`.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");

        /// Service name advertised in `PluginInfo.supported_versions`.
        pub const SERVICE: &str = "v1.DRAPlugin";
        /// Default directory of the kubelet's plugin sockets (`<dir>/<driver>/dra.sock`).
        pub const PLUGINS_PATH: &str = "/var/lib/kubelet/plugins";
    }

    /// `k8s.io.kubelet.pkg.apis.dra.v1beta1`: the same messages as [`v1`] (without
    /// `Device.share_id`), spoken by kubelets before 1.34.
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v1beta1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");

        /// Service name advertised in `PluginInfo.supported_versions`.
        pub const SERVICE: &str = "v1beta1.DRAPlugin";
    }
}
