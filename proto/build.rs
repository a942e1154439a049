//! Compiles the kubelet protos with a vendored `protoc`, so building needs no system
//! protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "kubelet/deviceplugin/v1beta1/api.proto",
        "kubelet/pluginregistration/v1/api.proto",
        "kubelet/podresources/v1/api.proto",
        "kubelet/dra/v1/api.proto",
        "kubelet/dra/v1beta1/api.proto",
    ];
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["kubelet"])?;
    Ok(())
}
