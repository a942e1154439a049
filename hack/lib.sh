# Shared settings for hack/ scripts. Source it; do not run it.
#
# Everything built or downloaded lives in $ENI_CACHE_DIR (outside the checkout), so a
# fresh clone reuses the peers, Go caches and cargo target dir of earlier runs.

ENI_CACHE_DIR=${ENI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/aws-multi-eni}
ENI_BIN_DIR=$ENI_CACHE_DIR/bin
export ENI_CACHE_DIR ENI_BIN_DIR
export GOCACHE=${GOCACHE_OVERRIDE:-$ENI_CACHE_DIR/go-build}
export GOMODCACHE=${GOMODCACHE_OVERRIDE:-$ENI_CACHE_DIR/go-mod}
export GOFLAGS=-mod=mod
export GOTOOLCHAIN=local
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ENI_CACHE_DIR/target}
# Never talk to real AWS from a dev or test script.
export AWS_EC2_METADATA_DISABLED=true

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HACK_DIR/.." && pwd)
export HACK_DIR REPO_DIR

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }
