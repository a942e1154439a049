#!/bin/sh
# Prepares the Rust build stage of Dockerfile.controller / Dockerfile.node for
# cross-compiling to linux/$TARGETARCH from the build machine's own platform, and writes
# /cross.env, which later RUN steps source:
#   RUST_TARGET       <arch>-unknown-linux-gnu (eni-controller, eni-manager)
#   RUST_MUSL_TARGET  <arch>-unknown-linux-musl (cni-helper: static, runs on the host)
# plus the linker / C compiler variables cargo and the cc crate (ring, aws-lc-sys) read.
# A native build (TARGETARCH = the build machine's) installs nothing.
set -eu
case "${TARGETARCH:-}" in
  amd64) arch=x86_64 deb=amd64 ;;
  arm64) arch=aarch64 deb=arm64 ;;
  *) echo "unsupported platform linux/${TARGETARCH:-?}: use linux/amd64 or linux/arm64" >&2; exit 1 ;;
esac
gcc="$arch-linux-gnu-gcc"
if ! command -v "$gcc" >/dev/null 2>&1; then
  apt-get update
  apt-get install -y --no-install-recommends \
    "gcc-$(echo "$arch" | tr _ -)-linux-gnu" "libc6-dev-$deb-cross"
  rm -rf /var/lib/apt/lists/*
fi
rustup target add "$arch-unknown-linux-gnu" "$arch-unknown-linux-musl"
upper=$(echo "$arch" | tr '[:lower:]' '[:upper:]')
cat > /cross.env <<ENV
export RUST_TARGET=$arch-unknown-linux-gnu
export RUST_MUSL_TARGET=$arch-unknown-linux-musl
export CARGO_TARGET_${upper}_UNKNOWN_LINUX_GNU_LINKER=$gcc
export CARGO_TARGET_${upper}_UNKNOWN_LINUX_MUSL_LINKER=$gcc
export CC_${arch}_unknown_linux_gnu=$gcc
export AR_${arch}_unknown_linux_gnu=$arch-linux-gnu-ar
ENV
echo "building for linux/$TARGETARCH ($arch) on $(uname -m):"
cat /cross.env
