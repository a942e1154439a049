#!/usr/bin/env bash
# Benchmark of the node daemon (issue 5): hot-plug -> configured latency (median, p99
# over 50 plugs) and the daemon's idle RSS (target <= 20 MiB).
#
# Needs root (it creates a network namespace, deleted afterwards) and the peers from
# hack/peers.sh (etcd + kube-apiserver on loopback). Touches nothing else.
#
#   hack/bench-node.sh                    # release build of eni-manager (what ships)
#   BENCH_PROFILE=debug hack/bench-node.sh
set -euo pipefail
bin_override=${ENI_BIN_DIR:-}
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ -n $bin_override ]] && export ENI_BIN_DIR=$bin_override
[[ $(id -u) == 0 ]] || die "run as root (network namespaces)"
cd "$REPO_DIR"

profile=${BENCH_PROFILE:-release}
flags=(--locked -p eni-node)
[[ $profile == release ]] && flags+=(--release)
log "building eni-manager ($profile) and the benchmark driver"
cargo build "${flags[@]}" --bin eni-manager
cargo build --locked -p eni-node --example bench-hotplug
export ENI_MANAGER_BIN=$CARGO_TARGET_DIR/$profile/eni-manager
log "running: $ENI_MANAGER_BIN"
"$CARGO_TARGET_DIR/debug/examples/bench-hotplug"
