#!/usr/bin/env bash
# Device-plugin benchmark: Allocate latency p50/p99 over 10 000 calls (Rust tonic client
# and the kubelet's own Go plugin client) and re-registration time after simulated
# kubelet restarts (real kubelet device-manager code in hack/peers/kube/kubelet-dp).
# Temp dirs and Unix sockets only. Extra args go to the benchmark binary
# (--calls N, --restarts N).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if [[ ! -x $ENI_BIN_DIR/kubelet-dp ]]; then
  log "building kubelet-dp (hack/peers/kube/kubelet-dp)"
  mkdir -p "$ENI_BIN_DIR"
  (cd "$HACK_DIR/peers/kube" && go build -trimpath -ldflags "-s -w" -o "$ENI_BIN_DIR/" ./kubelet-dp)
fi
cd "$REPO_DIR"
log "running the device-plugin benchmark (release build)"
cargo run --quiet --release -p eni-deviceplugin --example bench-deviceplugin -- "$@"
