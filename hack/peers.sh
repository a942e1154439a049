#!/usr/bin/env bash
# Obtains the real peers the tests run against and caches them in $ENI_CACHE_DIR/bin.
# Idempotent: a peer is rebuilt only when its pinned module (hack/peers/*/go.mod) changes.
#
#   kube-apiserver, kubectl,         Go module proxy (hack/peers/kube)
#   kubelet, kube-scheduler,
#   kube-controller-manager v1.37.2
#   kubelet-dp harness               the kubelet's device manager (hack/peers/kube/kubelet-dp)
#   kubelet-dra harness              the kubelet's DRA manager (hack/peers/kube/kubelet-dra)
#   etcd v3.6                        Go module proxy (hack/peers/etcd)
#   helm v3, multus v4.3.0, cnitool  Go module proxy (hack/peers/{helm,multus,cnitool})
#   helm-docs v1.14                  Go module proxy (hack/peers/helm-docs): chart READMEs
#   CNI plugins, iproute2,           Debian packages
#   containerd, runc, busybox-static   (the kubelet's runtime and the pods' image)
#   moto[server]                     PyPI, in a venv under $ENI_CACHE_DIR
#
# Usage: hack/peers.sh [--print]   (--print only prints versions of what is cached)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
mkdir -p "$ENI_BIN_DIR"

MOTO_VERSION=5.2.1
K8S_VERSION=v1.37.2

# stamp NAME FILES... : true when the cached build of NAME matches the inputs' hash.
stamp_ok() {
  local name=$1; shift
  local want; want=$(cat "$@" | sha256sum | cut -c1-16)
  [[ -f $ENI_BIN_DIR/.$name.stamp && $(cat "$ENI_BIN_DIR/.$name.stamp") == "$want" ]]
}
stamp_write() {
  local name=$1; shift
  cat "$@" | sha256sum | cut -c1-16 > "$ENI_BIN_DIR/.$name.stamp"
}

build_go() { # name dir ldflags packages...
  local name=$1 dir=$2 ldflags=$3; shift 3
  local inputs=("$HACK_DIR/peers/$dir/go.mod" "$HACK_DIR/peers/$dir/go.sum")
  if [[ -d $HACK_DIR/peers/$dir/$name ]]; then
    inputs+=("$HACK_DIR"/peers/"$dir"/"$name"/*.go)
  fi
  if stamp_ok "$name" "${inputs[@]}"; then return; fi
  log "building $name (cached in $ENI_BIN_DIR; a cold build takes minutes)"
  (cd "$HACK_DIR/peers/$dir" && go build -trimpath -ldflags "$ldflags" -o "$ENI_BIN_DIR/$name" "$@")
  stamp_write "$name" "${inputs[@]}"
}

apt_ensure() { # package files...
  local pkg=$1; shift
  local f
  for f in "$@"; do [[ -e $f ]] || { missing=1; break; }; done
  if [[ ${missing:-0} == 1 ]]; then
    command -v apt-get >/dev/null || die "$pkg is missing and apt-get is not available"
    log "installing Debian package $pkg"
    if [[ $(id -u) != 0 ]]; then die "$pkg is missing: run as root or apt-get install $pkg"; fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  fi
  missing=0
}

moto_ensure() {
  local venv=$ENI_CACHE_DIR/moto-venv
  if [[ -x $venv/bin/moto_server ]] && "$venv/bin/python" -c "import moto,sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
    return
  fi
  log "installing moto[server]==$MOTO_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
}

if [[ ${1:-} != --print ]]; then
  KUBE_LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=37"
  build_go kube-apiserver kube "$KUBE_LDFLAGS" k8s.io/kubernetes/cmd/kube-apiserver
  build_go kubectl kube "$KUBE_LDFLAGS" k8s.io/kubernetes/cmd/kubectl
  build_go kubelet kube "$KUBE_LDFLAGS" k8s.io/kubernetes/cmd/kubelet
  build_go kube-scheduler kube "$KUBE_LDFLAGS" k8s.io/kubernetes/cmd/kube-scheduler
  build_go kube-controller-manager kube "$KUBE_LDFLAGS" k8s.io/kubernetes/cmd/kube-controller-manager
  if [[ -d $HACK_DIR/peers/kube/kubelet-dp ]]; then
    build_go kubelet-dp kube "-s -w" ./kubelet-dp
  fi
  if [[ -d $HACK_DIR/peers/kube/kubelet-dra ]]; then
    build_go kubelet-dra kube "-s -w" ./kubelet-dra
  fi
  build_go etcd etcd "-s -w" go.etcd.io/etcd/server/v3
  build_go helm helm "-s -w" helm.sh/helm/v3/cmd/helm
  build_go helm-docs helm-docs "-s -w" github.com/norwoodj/helm-docs/cmd/helm-docs
  build_go multus multus "-s -w" gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus
  build_go cnitool cnitool "-s -w" github.com/containernetworking/cni/cnitool
  apt_ensure containernetworking-plugins /usr/lib/cni/ipvlan /usr/lib/cni/macvlan /usr/lib/cni/host-device /usr/lib/cni/host-local
  apt_ensure iproute2 /usr/sbin/ip /usr/bin/ip
  apt_ensure containerd /usr/bin/containerd /usr/bin/ctr
  apt_ensure runc /usr/sbin/runc
  apt_ensure busybox-static /bin/busybox
  moto_ensure
fi

ver() { printf '  %-24s %s\n' "$1" "$2"; }
log "peers in $ENI_BIN_DIR"
ver kube-apiserver "$("$ENI_BIN_DIR/kube-apiserver" --version 2>&1 | head -1)"
ver kubectl "$("$ENI_BIN_DIR/kubectl" version --client 2>&1 | head -1)"
ver kubelet "$("$ENI_BIN_DIR/kubelet" --version 2>&1 | head -1)"
ver kube-scheduler "$("$ENI_BIN_DIR/kube-scheduler" --version 2>&1 | head -1)"
ver kube-controller-manager "$("$ENI_BIN_DIR/kube-controller-manager" --version 2>&1 | head -1)"
ver containerd "$(containerd --version 2>&1 | head -1)"
ver runc "$(runc --version 2>&1 | head -1)"
ver etcd "$("$ENI_BIN_DIR/etcd" --version 2>&1 | head -1)"
ver helm "$("$ENI_BIN_DIR/helm" version --short 2>&1)"
ver helm-docs "$(grep -m1 'norwoodj/helm-docs ' "$HACK_DIR/peers/helm-docs/go.mod" | awk '{print $NF}')"
ver multus "$("$ENI_BIN_DIR/multus" -version 2>&1 | head -1)"
ver cnitool "$(grep -m1 'containernetworking/cni ' "$HACK_DIR/peers/cnitool/go.mod" | awk '{print $3}')"
ver cni-plugins "$(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null || echo missing)"
ver iproute2 "$(ip -V 2>&1)"
ver moto "$("$ENI_CACHE_DIR/moto-venv/bin/python" -c 'import moto; print(moto.__version__)' 2>&1)"
if [[ -x $ENI_BIN_DIR/kubelet-dp ]]; then ver kubelet-dp "k8s.io/kubernetes $K8S_VERSION device manager"; fi
if [[ -x $ENI_BIN_DIR/kubelet-dra ]]; then ver kubelet-dra "k8s.io/kubernetes $K8S_VERSION DRA manager"; fi
