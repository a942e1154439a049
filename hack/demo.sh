#!/usr/bin/env bash
# The whole of aws-multi-eni on one machine: no AWS account, no cluster.
#
#   hack/demo.sh [up]     start everything, apply the sample NodeENIs, run a pod that asks
#                         for a DPDK ENI in its limits and gets a second ENI through Multus
#                         with a VPC address the controller assigned to that ENI (spec.ipam,
#                         cni-helper as IPAM), print what happened; leaves it running
#   hack/demo.sh down     delete the demo's pods, stop every process, delete every namespace
#   hack/demo.sh status   print the NodeENIs, attachments, capacity, the pod and interfaces again
#   hack/demo.sh kubelet-restart NODE   restart NODE's kubelet (containerd and pods keep running)
#   hack/demo.sh pod NAME                one more pod like the demo's on node-1 (it needs a free DPDK ENI)
#   hack/demo.sh [up] --dra   the DPDK ENIs through DRA instead of the device plugin:
#                         ResourceSlices, the node chart's DeviceClass, a claim selecting an
#                         ENI by CEL that the real kube-scheduler allocates, a pod whose
#                         kubelet prepares it through eni-manager, and the claim's network data
#
# Real binaries: etcd, kube-apiserver, kubectl, moto (EC2) behind hack/testkit's EC2 fault
# layer (ec2-faults: what EC2 does that moto does not), eni-controller, eni-manager
# (with its device plugin), a real kubelet and containerd + runc per node (hack/testkit's
# eni-kubelet runs them inside the node's network namespace), Multus (thin plugin, run by
# containerd), cni-helper and the Debian CNI plugins. The one simulated piece is
# hack/sim-nitro: it turns ENIs attached in moto into interfaces (veth ends) inside each
# node's network namespace and into fake ENA PCI devices in each node's fake sysfs tree.
#
# Root is needed (network namespaces). Everything listens on 127.0.0.1 only.
#
# Environment:
#   DEMO_DIR      state and logs (default <repo>/.demo)
#   DEMO_PREFIX   prefix of the network namespace names (default eni-demo)
#   DEMO_BIN_DIR  where eni-controller, eni-manager, cni-helper, eni-kubelet are (default
#                 $CARGO_TARGET_DIR/debug)
#   DEMO_QUIET=1  only the step lines (the end-to-end test uses it)
#   DEMO_KEEP_ON_FAILURE=1  leave everything running when a step fails, to debug it
#   DEMO_DRA=1    same as --dra

set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEMO_DIR=${DEMO_DIR:-$REPO_DIR/.demo}
DEMO_PREFIX=${DEMO_PREFIX:-eni-demo}
DEMO_BIN_DIR=${DEMO_BIN_DIR:-$CARGO_TARGET_DIR/debug}
DEMO_QUIET=${DEMO_QUIET:-0}
DEMO_DRA=${DEMO_DRA:-0}
DRA_DRIVER=eni.networking.k8s.aws
DRA_POD=eni-dra-pod
DRA_CLAIM=eni-dra-claim
LOGS=$DEMO_DIR/logs
PIDS=$DEMO_DIR/pids
PY=$ENI_CACHE_DIR/moto-venv/bin/python
SIM=$HACK_DIR/sim-nitro
CNI_PLUGINS=${CNI_PLUGINS:-/usr/lib/cni}
NODES=(node-1 node-2)
CLUSTER=demo
REGION=us-east-1
RESOURCE=intel.com/intel_sriov_netdevice
POD=eni-demo-pod
POD_IMAGE=localhost/eni-demo/busybox:1.0
POD_NS=default
PLAIN_IPAM='{"mode":"secondaryIPs","warmTarget":1,"maximumPerENI":1}'
KUBECTL=$ENI_BIN_DIR/kubectl

STEP="starting"
step() {
    STEP="$*"
    printf '\033[1;34m==>\033[0m [%3ds] %s\n' "$SECONDS" "$*" >&2
}
say() { [[ $DEMO_QUIET == 1 ]] || printf '%s\n' "$*"; }
fmt_cmd() { # a command line as a person would type it
    local a out=""
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'$a' "; fi
    done
    out=${out% }
    out=${out//$DEMO_DIR/\$DEMO_DIR}
    [[ $out == "kc "* ]] && out="kubectl ${out#kc }"
    printf '%s' "$out"
}
show() { # show <title> <command...>: print the command and its output
    local title=$1
    shift
    show_as "$(fmt_cmd "$@")" "$title" "$@"
}
show_as() { # show_as <displayed command> <title> <command...>
    local display=$1 title=$2
    shift 2
    if [[ $DEMO_QUIET == 1 ]]; then
        "$@" >/dev/null
        return
    fi
    printf '\n\033[1m--- %s\033[0m\n$ %s\n' "$title" "$display"
    "$@"
}
kc() { KUBECONFIG=$DEMO_DIR/kubeconfig "$KUBECTL" "$@"; }
node_ns() { echo "$DEMO_PREFIX-$1"; }
nitro_ns() { echo "$DEMO_PREFIX-nitro"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for <seconds> <description> <command...>: poll the command until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            printf '\033[1;31merror:\033[0m timed out after %ss waiting for %s\n' "$secs" "$what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# start <name> <command...>: a background process in its own session, output to its log.
start() {
    local name=$1
    shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$PIDS/$name.pid"
}

alive() { # alive <name>: the process is still running
    local pid
    pid=$(cat "$PIDS/$1.pid" 2>/dev/null) && pid_running "$pid"
}

on_exit() {
    local rc=$?
    trap - EXIT
    if ((rc != 0)); then
        printf '\n\033[1;31mFAILED\033[0m at step: %s\n' "$STEP" >&2
        printf 'Logs: %s/\n' "$LOGS" >&2
        # The logs of the processes that died, and of the failed step.
        local f name shown=" "
        for f in "$PIDS"/*.pid; do
            [[ -e $f ]] || continue
            name=$(basename "$f" .pid)
            alive "$name" || shown+="$LOGS/$name.log "
        done
        for f in $(grep -o "$LOGS/[^ ,)]*" <<<"$STEP"); do
            [[ $shown == *" $f "* ]] || shown+="$f "
        done
        for f in $shown; do
            [[ -s $f ]] || continue
            printf '\n--- last lines of %s\n' "$f" >&2
            tail -n 12 "$f" >&2
        done
        if [[ ${DEMO_KEEP_ON_FAILURE:-0} == 1 ]]; then
            printf '\nLeft running (DEMO_KEEP_ON_FAILURE=1); stop with: hack/demo.sh down\n' >&2
        else
            printf '\nCleaning up (set DEMO_KEEP_ON_FAILURE=1 to keep it running)\n' >&2
            down >&2 || true
        fi
    fi
    exit "$rc"
}

# ---- down ------------------------------------------------------------------------------

pid_running() { # a zombie (a child of this shell that exited) does not count
    [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

stop_procs() { # stop_procs <name>...: SIGTERM their process groups together, SIGKILL after 5 s
    local name f pid pids=()
    for name in "$@"; do
        f=$PIDS/$name.pid
        [[ -f $f ]] || continue
        pid=$(cat "$f")
        if pid_running "$pid"; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$f"
    done
    local end=$((SECONDS + 5)) left
    while ((${#pids[@]})); do
        left=()
        for pid in "${pids[@]}"; do
            pid_running "$pid" && left+=("$pid")
        done
        pids=("${left[@]+"${left[@]}"}")
        ((${#pids[@]})) || break
        if ((SECONDS >= end)); then
            for pid in "${pids[@]}"; do
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            done
            break
        fi
        sleep 0.1
    done
}

down() {
    step "down: stopping the demo in $DEMO_DIR"
    if [[ -d $PIDS ]]; then
        # The pods first, while the kubelets run: their CNI DEL gives the ENIs back.
        if alive kube-apiserver && [[ -f $DEMO_DIR/kubeconfig ]]; then
            kc delete pods -n $POD_NS --all --wait=true --timeout=30s >/dev/null 2>&1 || true
        fi
        # Consumers next; sim-nitro unplugs its interfaces when it stops; peers last
        # (kube-apiserver before etcd: without etcd it takes long to stop).
        stop_procs "${NODES[@]/#/eni-kubelet-}"
        stop_procs "${NODES[@]/#/eni-manager-}" eni-controller
        stop_procs sim-nitro
        stop_procs moto kube-apiserver
        stop_procs etcd
        local f rest=()
        for f in "$PIDS"/*.pid; do # anything else a newer version started
            [[ -e $f ]] && rest+=("$(basename "$f" .pid)")
        done
        stop_procs "${rest[@]+"${rest[@]}"}"
    fi
    for ns in "${NODES[@]/#/$DEMO_PREFIX-}" "$(nitro_ns)"; do
        if ip netns list | grep -qw "^$ns"; then
            ip netns del "$ns"
        fi
    done
    rm -rf "$DEMO_DIR/etcd" "$DEMO_DIR"/node-*/k/lib/containerd
    say "Stopped. Logs kept in $LOGS/."
}

# ---- up --------------------------------------------------------------------------------

preflight() {
    step "1/12 preflight: root, cached peers, built binaries"
    [[ $(id -u) == 0 ]] || die "the demo needs root (network namespaces): sudo make demo"
    local b
    for b in etcd kube-apiserver kubectl kubelet multus; do
        [[ -x $ENI_BIN_DIR/$b ]] || die "$ENI_BIN_DIR/$b missing: run make peers"
    done
    for b in /usr/bin/containerd /usr/bin/ctr /usr/sbin/runc /bin/busybox; do
        [[ -x $b ]] || die "$b missing: run make peers (it installs containerd, runc and busybox-static from Debian)"
    done
    [[ -x $PY ]] || die "moto venv missing ($PY): run make peers"
    if [[ $DEMO_DRA == 1 ]]; then
        for b in kube-scheduler helm; do
            [[ -x $ENI_BIN_DIR/$b ]] || die "$ENI_BIN_DIR/$b missing (needed by --dra): run make peers"
        done
    fi
    local help
    for b in eni-controller eni-manager cni-helper eni-kubelet ec2-faults; do
        [[ -x $DEMO_BIN_DIR/$b ]] || die "$DEMO_BIN_DIR/$b missing: run make build (or set DEMO_BIN_DIR)"
    done
    help=$("$DEMO_BIN_DIR/eni-manager" --help 2>/dev/null || true)
    [[ $help == *--enable-unsafe-noiommu-mode* ]] ||
        die "$DEMO_BIN_DIR/eni-manager is older than its no-IOMMU flag: run make build (or set DEMO_BIN_DIR)"
    "$DEMO_BIN_DIR/eni-manager" --simulate-pci-kernel=true --help >/dev/null 2>&1 ||
        die "$DEMO_BIN_DIR/eni-manager was built without the test-util feature the demo needs: run make build"
    for b in host-device ipvlan ptp host-local static loopback; do
        [[ -x $CNI_PLUGINS/$b ]] || die "CNI plugin $CNI_PLUGINS/$b missing (Debian: apt-get install containernetworking-plugins)"
    done
    if [[ -d $PIDS ]] && compgen -G "$PIDS/*.pid" >/dev/null; then
        say "A previous demo is still running: stopping it first."
        down
    fi
    for n in "${NODES[@]}" nitro; do
        ip netns del "$DEMO_PREFIX-$n" 2>/dev/null || true
    done
    # Device plugins bind Unix sockets (at most 107 bytes) under
    # $DEMO_DIR/node-N/k/lib/kubelet/device-plugins/.
    ((${#DEMO_DIR} <= 48)) || die "DEMO_DIR=$DEMO_DIR is longer than 48 characters: the device plugin's socket path under it would be too long for a Unix socket; set DEMO_DIR to a shorter path"
    rm -rf "$DEMO_DIR"
    mkdir -p "$LOGS" "$PIDS"
}

start_apiserver() {
    step "2/12 etcd + kube-apiserver on 127.0.0.1 (logs: $LOGS/etcd.log, kube-apiserver.log)"
    local d=$DEMO_DIR/apiserver etcd_port peer_port port
    mkdir -p "$d"
    etcd_port=$(free_port)
    peer_port=$(free_port)
    start etcd "$ENI_BIN_DIR/etcd" --name=demo --data-dir="$DEMO_DIR/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-cluster="demo=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level=warn
    openssl ecparam -genkey -name prime256v1 -noout -out "$d/sa.key" 2>/dev/null
    local token
    token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$token,admin,admin,\"system:masters\"" >"$d/tokens.csv"
    port=$(free_port)
    echo "$port" >"$DEMO_DIR/apiserver.port"
    # The API server reaches each kubelet (exec, logs) by the Node's name, which its own
    # private /etc/hosts resolves to 127.0.0.1 (each eni-kubelet forwards its port there).
    {
        echo "127.0.0.1 localhost"
        printf '127.0.0.1 %s\n' "${NODES[@]}"
    } >"$d/hosts"
    start kube-apiserver unshare --mount --propagation private -- \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$d/hosts" \
        "$ENI_BIN_DIR/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" \
        --secure-port="$port" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
        --endpoint-reconciler-type=none --cert-dir="$d/certs" \
        --service-account-issuer=https://kubernetes.default.svc \
        --service-account-key-file="$d/sa.key" --service-account-signing-key-file="$d/sa.key" \
        --service-cluster-ip-range=10.96.0.0/24 --authorization-mode=RBAC \
        --token-auth-file="$d/tokens.csv" --disable-admission-plugins=ServiceAccount \
        --allow-privileged=true --kubelet-preferred-address-types=Hostname --v=1
    cat >"$DEMO_DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: demo
  cluster:
    server: https://127.0.0.1:$port
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $token
contexts:
- name: demo
  context: {cluster: demo, user: admin}
current-context: demo
EOF
    wait_for 120 "kube-apiserver /readyz" kc get --raw /readyz
    alive etcd || die "etcd exited"
    kc apply -f "$REPO_DIR/charts/aws-multi-eni-controller/crds/" >/dev/null
    kc apply -f "$HACK_DIR/demo/nad-crd.yaml" >/dev/null
    wait_for 30 "the CRDs to be established" kc wait --for=condition=Established --timeout=1s \
        crd/nodeenis.networking.k8s.aws crd/network-attachment-definitions.k8s.cni.cncf.io
}

start_moto() {
    step "3/12 moto (EC2 emulator) behind the EC2 fault layer: VPC, subnets multi-eni-a + multi-eni-dpdk, security group, 2 x m5.large (log: $LOGS/moto.log)"
    local port
    port=$(free_port)
    echo "http://127.0.0.1:$port" >"$DEMO_DIR/moto.endpoint"
    start moto "$ENI_CACHE_DIR/moto-venv/bin/moto_server" -H 127.0.0.1 -p "$port"
    wait_for 60 "moto on port $port" python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)"
    # The controller talks to EC2 through the fault layer (hack/testkit's ec2-faults), which
    # does what real EC2 does and moto does not: the address-assignment rules (reserved
    # addresses, per-interface limits, prefixes, the answer shape), ENI limits, rate limits.
    local fport
    fport=$(free_port)
    start ec2-faults "$DEMO_BIN_DIR/ec2-faults" --upstream "http://127.0.0.1:$port" --listen "127.0.0.1:$fport"
    wait_for 30 "ec2-faults on port $fport (log: $LOGS/ec2-faults.log)" grep -q "listening on" "$LOGS/ec2-faults.log"
    echo "http://127.0.0.1:$fport" >"$DEMO_DIR/ec2.endpoint"
    "$PY" "$SIM" --endpoint "http://127.0.0.1:$port" --region "$REGION" world \
        --subnet multi-eni-a=10.0.1.0/24 --subnet multi-eni-dpdk=10.0.2.0/24 \
        --security-group multi-eni-demo --instances "${#NODES[@]}" --instance-type m5.large \
        >"$DEMO_DIR/world.json"
    say "$(jq -c '{vpc, subnets, securityGroup, instances: [.instances[].id]}' "$DEMO_DIR/world.json")"
}

make_nodes() {
    step "4/12 Node objects (providerID -> moto instances, label ng=multi-eni) and a network namespace per node"
    local i n inst az nodes_json="[]"
    az=$(jq -r .az "$DEMO_DIR/world.json")
    ip netns add "$(nitro_ns)"
    for i in "${!NODES[@]}"; do
        n=${NODES[$i]}
        inst=$(jq -r ".instances[$i].id" "$DEMO_DIR/world.json")
        kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $n
  labels: {ng: multi-eni, kubernetes.io/hostname: $n, topology.kubernetes.io/zone: $az}
spec:
  providerID: aws:///$az/$inst
EOF
        ip netns add "$(node_ns "$n")"
        ip -n "$(node_ns "$n")" link set lo up
        mkdir -p "$DEMO_DIR/$n"/{sys,dev,run,kubelet,devinfo,ipam,multus}
        nodes_json=$(jq -c --arg n "$n" --arg i "$inst" --arg ns "$(node_ns "$n")" \
            --arg sys "$DEMO_DIR/$n/sys" --arg dev "$DEMO_DIR/$n/dev" \
            '. + [{name: $n, instance: $i, netns: $ns, sysfs: $sys, dev: $dev}]' <<<"$nodes_json")
        say "  $n -> $inst, netns $(node_ns "$n"), fake sysfs $DEMO_DIR/$n/sys"
    done
    echo "$nodes_json" >"$DEMO_DIR/nodes.json"
}

start_sim() {
    step "5/12 sim-nitro: ENIs attached in moto become interfaces + fake PCI devices on the nodes (log: $LOGS/sim-nitro.log)"
    start sim-nitro "$PY" "$SIM" --endpoint "$(cat "$DEMO_DIR/moto.endpoint")" --region "$REGION" run \
        --nodes "$DEMO_DIR/nodes.json" --nitro-netns "$(nitro_ns)" \
        --forward-port "$(cat "$DEMO_DIR/apiserver.port")" --ready-file "$DEMO_DIR/sim-nitro.ready"
    wait_for 30 "sim-nitro's first poll" test -f "$DEMO_DIR/sim-nitro.ready"
    local n
    for n in "${NODES[@]}"; do
        wait_for 10 "the primary ENI (ens5) in $(node_ns "$n")" ip -n "$(node_ns "$n")" link show ens5
    done
}

start_controller() {
    step "6/12 eni-controller (log: $LOGS/eni-controller.log)"
    start eni-controller env KUBECONFIG="$DEMO_DIR/kubeconfig" CLUSTER_NAME=$CLUSTER AWS_REGION=$REGION \
        AWS_ENDPOINT_URL_EC2="$(cat "$DEMO_DIR/ec2.endpoint")" AWS_ACCESS_KEY_ID=testing \
        AWS_SECRET_ACCESS_KEY=testing RUST_LOG=info \
        "$DEMO_BIN_DIR/eni-controller" --leader-elect=false --metrics-addr="127.0.0.1:$(free_port)" \
        --in-flight-poll-interval=200ms --resync-period=1m
    sleep 0.5
    alive eni-controller || die "eni-controller exited"
}

# The CNI setup containerd uses on every node: Multus (thin plugin) as the only network
# config, delegating the pod network to ptp; cni-helper and the Debian plugins beside it.
setup_cni() {
    vpc_delegate >"$DEMO_DIR/vpc-delegate"
    mkdir -p "$DEMO_DIR/cni-bin"
    ln -sf "$DEMO_BIN_DIR/cni-helper" "$DEMO_DIR/cni-bin/cni-helper"
    ln -sf "$ENI_BIN_DIR/multus" "$DEMO_DIR/cni-bin/multus"
    local p i n
    for p in host-device ipvlan ptp host-local static loopback; do
        ln -sf "$CNI_PLUGINS/$p" "$DEMO_DIR/cni-bin/$p"
    done
    for i in "${!NODES[@]}"; do
        n=${NODES[$i]}
        jq -n --arg kc "$DEMO_DIR/kubeconfig" --arg bin "$DEMO_DIR/cni-bin" --arg d "$DEMO_DIR/$n" \
            --arg subnet "10.88.$((i + 1)).0/24" '{
            cniVersion: "1.0.0", name: "multus-cni-network", type: "multus",
            kubeconfig: $kc, binDir: $bin, cniDir: ($d + "/multus"),
            delegates: [{cniVersion: "1.0.0", name: "podnet", type: "ptp",
                ipam: {type: "host-local", subnet: $subnet, dataDir: ($d + "/ipam")}}]
        }' >"$DEMO_DIR/$n/multus.conf"
        # cni-helper's node-local config (the node chart writes /etc/aws-multi-eni/cni-helper.json
        # on a real node; a NAD cannot say where to look). It reaches cni-helper through
        # containerd's environment, which Multus passes on to its delegates.
        jq -n --arg s "$DEMO_DIR/$n/run" '{stateDir: $s}' >"$DEMO_DIR/$n/cni-helper.json"
    done
}

kubelet_ready() { # kubelet_ready <node>: the Node's Ready condition, set by its kubelet
    [[ $(kc get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
}

start_node_agents() {
    step "7/12 per node: a real kubelet + containerd in the node namespace, and eni-manager (logs: $LOGS/eni-kubelet-*.log, $DEMO_DIR/node-*/k/logs/, $LOGS/eni-manager-*.log)"
    setup_cni
    local i n d inst az
    az=$(jq -r .az "$DEMO_DIR/world.json")
    for i in "${!NODES[@]}"; do
        n=${NODES[$i]}
        d=$DEMO_DIR/$n
        inst=$(jq -r ".instances[$i].id" "$DEMO_DIR/world.json")
        free_port >"$d/kubelet.port"
        start "eni-kubelet-$n" env RUST_LOG=info "$DEMO_BIN_DIR/eni-kubelet" --node-name "$n" \
            --netns "/var/run/netns/$(node_ns "$n")" --dir "$d/k" \
            --kubeconfig "$DEMO_DIR/kubeconfig" --port "$(cat "$d/kubelet.port")" \
            --cni-conf "$d/multus.conf" --cni-bin-dir "$DEMO_DIR/cni-bin" \
            --sysfs "$d/sys" --dev "$d/dev" --provider-id "aws:///$az/$inst" \
            --containerd-env "CNI_HELPER_CONFIG=$d/cni-helper.json,AWS_EC2_METADATA_DISABLED=true"
    done
    local dra_flags=()
    for n in "${NODES[@]}"; do
        d=$DEMO_DIR/$n
        if [[ $DEMO_DRA == 1 ]]; then
            # The DPDK resource through DRA: the node's ResourceSlice, dra.sock registered in
            # its kubelet's plugins_registry; the device plugin no longer advertises it.
            dra_flags=(--dra-resources "$RESOURCE" --dra-plugins-dir "$d/k/lib/kubelet/plugins"
                --plugins-registry-dir "$d/k/lib/kubelet/plugins_registry" --cdi-dir "$d/cdi")
        fi
        wait_for 60 "the kubelet and containerd of $n (log: $LOGS/eni-kubelet-$n.log)" test -f "$d/k/ready"
        start "eni-manager-$n" env KUBECONFIG="$DEMO_DIR/kubeconfig" RUST_LOG=info \
            "$DEMO_BIN_DIR/eni-manager" --node-name "$n" --netns "/var/run/netns/$(node_ns "$n")" \
            --sysfs-root "$d/sys" --state-dir "$d/run" --simulate-pci-kernel --enable-unsafe-noiommu-mode \
            --pod-resources-socket "$d/k/lib/kubelet/pod-resources/kubelet.sock" \
            --device-plugin-dir "$d/k/lib/kubelet/device-plugins" --dev-root "$d/dev" \
            --devinfo-dir "$d/devinfo" --metrics-addr "127.0.0.1:$(free_port)" --resync-period 30s \
            "${dra_flags[@]}"
    done
    for n in "${NODES[@]}"; do
        wait_for 60 "$n Ready (its kubelet: $DEMO_DIR/$n/k/logs/)" kubelet_ready "$n"
        alive "eni-manager-$n" || die "eni-manager for $n exited (log: $LOGS/eni-manager-$n.log)"
        alive "eni-kubelet-$n" || die "eni-kubelet for $n exited (log: $LOGS/eni-kubelet-$n.log)"
    done
}

nodeeni_ready() {
    local want=$((${#NODES[@]}))
    for ne in multus-plain multus-dpdk; do
        [[ $(kc get nodeeni "$ne" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]] || return 1
        [[ $(kc get nodeeni "$ne" -o jsonpath='{.status.readyAttachments}') == "$want" ]] || return 1
    done
}

pool_filled() { # pool_filled <node>: the node daemon holds a pod address pool for an ENI
    jq -e '[.pools // {} | .[] | .addresses[]?] | length > 0' "$DEMO_DIR/$1/run/enis.json"
}

# ipvlan where the kernel has it (pods share the ENI), host-device otherwise (the ENI moves
# into the pod): the delegate of the eni-vpc network.
vpc_delegate() {
    local ns=$DEMO_PREFIX-probe kind=host-device
    ip netns add "$ns"
    if ip -n "$ns" link add pa type veth peer name pb 2>/dev/null &&
        ip -n "$ns" link add link pa name iv type ipvlan mode l2 2>/dev/null; then
        kind=ipvlan
    fi
    ip netns del "$ns"
    echo "$kind"
}

iface_ready() { # iface_ready <netns> <ifname>: up with MTU 9001
    ip -n "$1" -j link show "$2" | jq -e '.[0].mtu == 9001 and (.[0].flags | index("UP"))' >/dev/null
}

capacity_is() { # capacity_is <node> <n>
    [[ $(kc get node "$1" -o jsonpath="{.status.capacity.intel\.com/intel_sriov_netdevice}") == "$2" ]]
}

apply_nodeenis() {
    step "8/12 apply the sample NodeENIs (docs/examples/nodeeni-plain.yaml: MTU 9001, with spec.ipam (a VPC address for the pod using it); nodeeni-dpdk.yaml: DPDK) and wait for Ready, MTU, the address pool, capacity (logs: $LOGS/eni-controller.log $LOGS/eni-manager-*.log $LOGS/sim-nitro.log)"
    kc apply -f "$REPO_DIR/docs/examples/nodeeni-plain.yaml" -f "$REPO_DIR/docs/examples/nodeeni-dpdk.yaml" >/dev/null
    # One VPC address per plain ENI, assigned in EC2 by the controller: the pod on that ENI
    # gets it (docs/ipvlan-vpc.md). With host-device one pod has the whole ENI, so a pool of
    # one is enough; with ipvlan a bigger warmTarget serves more pods per ENI.
    kc patch nodeeni multus-plain --type merge -p "{\"spec\":{\"ipam\":$PLAIN_IPAM}}" >/dev/null
    wait_for 90 "both NodeENIs Ready with ${#NODES[@]} attachments each" nodeeni_ready
    local n
    for n in "${NODES[@]}"; do
        wait_for 30 "ens6 up with MTU 9001 in $(node_ns "$n")" iface_ready "$(node_ns "$n")" ens6
        wait_for 60 "the plain ENI's address pool in $n's state file ($DEMO_DIR/$n/run/enis.json)" pool_filled "$n"
        if [[ $DEMO_DRA == 1 ]]; then
            wait_for 30 "a ResourceSlice with 1 device for $n" slice_devices_is "$n" 1
        else
            wait_for 30 "capacity $RESOURCE=1 on $n" capacity_is "$n" 1
        fi
    done
}

slice_devices_is() { # slice_devices_is <node> <n>
    [[ $(kc get resourceslices --field-selector "spec.nodeName=$1" -o json | jq '[.items[].spec.devices // [] | length] | add // 0') == "$2" ]]
}

print_state() {
    step "9/12 what the system did"
    show "NodeENIs" kc get nodeeni -o wide
    show "Attachments (the older controller's custom-columns still work)" kc get nodeeni -o \
        'custom-columns=NODEENI:.metadata.name,NODE:.status.attachments[*].nodeID,ENI:.status.attachments[*].eniID,INDEX:.status.attachments[*].deviceIndex,MAC:.status.attachments[*].macAddress,MTU:.status.attachments[*].mtu,STATUS:.status.attachments[*].status'
    show "What each node daemon reports (status.nodeReports)" kc get nodeeni multus-dpdk -o \
        'custom-columns=NODE:.status.nodeReports[*].nodeName,PCI:.status.nodeReports[*].interfaces[*].pciAddress,DRIVER:.status.nodeReports[*].interfaces[*].driver,DPDK:.status.nodeReports[*].interfaces[*].dpdkBound'
    show_as "hack/sim-nitro --endpoint \$MOTO enis | jq ... (device index > 0)" "ENIs in EC2 (moto)" ec2_enis
    show "The Nodes: capacity and allocatable reported by each kubelet (our device plugin adds $RESOURCE)" \
        kc get nodes -o 'custom-columns=NODE:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,VERSION:.status.nodeInfo.kubeletVersion,RUNTIME:.status.nodeInfo.containerRuntimeVersion,CPU:.status.capacity.cpu,MEMORY:.status.capacity.memory,PODS:.status.capacity.pods,ENI-DPDK:.status.capacity.intel\.com/intel_sriov_netdevice,ALLOCATABLE-ENI-DPDK:.status.allocatable.intel\.com/intel_sriov_netdevice'
    show "The plain ENI in node-2's namespace: up, MTU 9001" ip -n "$(node_ns node-2)" -d link show ens6
    show "The DPDK ENI's PCI device in node-1's fake sysfs: bound to vfio-pci" \
        readlink "$DEMO_DIR/node-1/sys/bus/pci/devices/0000:00:07.0/driver"
    if [[ $DEMO_DRA == 1 ]]; then
        show "ResourceSlices (DRA): one pool per node, one device per DPDK ENI" kc get resourceslices
        show_as "kubectl get resourceslices --field-selector spec.nodeName=node-1 -o json | jq ..." \
            "node-1's device and the attributes CEL selectors see" slice_attributes node-1
    fi
}

slice_attributes() { # slice_attributes <node>
    kc get resourceslices --field-selector "spec.nodeName=$1" -o json |
        jq '.items[].spec.devices[] | {name, attributes: (.attributes | map_values(.string // .int // .bool))}'
}

dra_pod_scheduled() {
    [[ -n $(kc get pod -n $POD_NS $DRA_POD -o jsonpath='{.spec.nodeName}') ]]
}

dra_prepared() { # the claim's status.devices, written by eni-manager at prepare
    [[ -n $(kc get resourceclaim -n $POD_NS $DRA_CLAIM -o jsonpath='{.status.devices[0].networkData.hardwareAddress}') ]]
}

dra_pod() {
    step "10/12 DRA: the node chart's DeviceClass, kube-scheduler, a claim selecting the DPDK ENI by CEL and a pod using it; its kubelet prepares it through eni-manager (logs: $LOGS/kube-scheduler.log $DEMO_DIR/node-*/k/logs/ $LOGS/eni-manager-*.log)"
    "$ENI_BIN_DIR/helm" template aws-multi-eni-node "$REPO_DIR/charts/aws-multi-eni-node" \
        --kube-version 1.37.2 --set dra.enabled=true --show-only templates/deviceclass.yaml | kc apply -f - >/dev/null
    # No node lifecycle controller here lifts the not-ready taint the apiserver put on the
    # new Nodes; the scheduler would respect it.
    local n
    for n in "${NODES[@]}"; do
        kc patch node "$n" --type merge -p '{"spec":{"taints":null}}' >/dev/null
    done
    start kube-scheduler "$ENI_BIN_DIR/kube-scheduler" --kubeconfig "$DEMO_DIR/kubeconfig" \
        --authentication-kubeconfig "$DEMO_DIR/kubeconfig" --authorization-kubeconfig "$DEMO_DIR/kubeconfig" \
        --leader-elect=false --bind-address 127.0.0.1 --secure-port "$(free_port)"
    kc apply -f - >/dev/null <<EOF_DRA
apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata:
  name: $DRA_CLAIM
  namespace: $POD_NS
spec:
  devices:
    requests:
      - name: eni
        exactly:
          deviceClassName: dpdk.eni.networking.k8s.aws
          selectors:
            - cel:
                expression: >-
                  device.attributes['$DRA_DRIVER'].nodeENI == 'multus-dpdk' &&
                  device.attributes['$DRA_DRIVER'].deviceIndex == 2
---
apiVersion: v1
kind: Pod
metadata:
  name: $DRA_POD
  namespace: $POD_NS
spec:
  terminationGracePeriodSeconds: 1
  resourceClaims:
    - name: eni
      resourceClaimName: $DRA_CLAIM
  containers:
    - name: app
      image: $POD_IMAGE
      imagePullPolicy: Never
      command: [sleep, "2147483647"]
      resources:
        claims:
          - name: eni
EOF_DRA
    wait_for 60 "kube-scheduler to place $DRA_POD (log: $LOGS/kube-scheduler.log)" dra_pod_scheduled
    local node
    node=$(kc get pod -n $POD_NS $DRA_POD -o jsonpath='{.spec.nodeName}')
    wait_for 60 "the kubelet of $node to prepare $DRA_CLAIM through eni-manager (log: $LOGS/eni-manager-$node.log)" dra_prepared
    show "The DeviceClass (node chart, dra.enabled=true)" kc get deviceclass dpdk.eni.networking.k8s.aws \
        -o jsonpath='extendedResourceName: {.spec.extendedResourceName}{"\n"}selector: {.spec.selectors[0].cel.expression}{"\n"}'
    show "The claim, allocated by kube-scheduler" kc get resourceclaim -n $POD_NS $DRA_CLAIM \
        -o jsonpath='device: {.status.allocation.devices.results[0].device} (pool {.status.allocation.devices.results[0].pool}, driver {.status.allocation.devices.results[0].driver}){"\n"}reserved for: {.status.reservedFor[0].resource}/{.status.reservedFor[0].name}{"\n"}'
    show "The claim's network data (status.devices, written by eni-manager when $node's kubelet prepared it)" \
        kc get resourceclaim -n $POD_NS $DRA_CLAIM -o jsonpath='{range .status.devices[*]}{.device}: {.networkData}{"\n"}{end}'
    show "The CDI spec eni-manager wrote on $node (containerd >= 1.7 injects it; this demo's 1.6 has no CDI)" \
        sh -c "cat $DEMO_DIR/$node/cdi/$DRA_DRIVER-*.json"
    show "The pod" kc get pod -n $POD_NS $DRA_POD -o wide
}

ec2_enis() {
    "$PY" "$SIM" --endpoint "$(cat "$DEMO_DIR/moto.endpoint")" enis |
        jq -r '["ENI", "INSTANCE", "INDEX", "MAC", "STATUS"], (.[] | select(.deviceIndex != 0) | [.id, .instance, .deviceIndex, .mac, .status]) | @tsv' |
        column -t
}

pod_manifest() { # pod_manifest <name>: the demo pod, bound to node-1
    cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: $POD_NS
  annotations:
    # net1: the plain ENI at device index 1 (cni-helper resolves it to ens6) with a VPC
    # address of the ENI's pool; net2: the DPDK ENI the kubelet allocated to this pod
    # (Multus passes its PCI address).
    k8s.v1.cni.cncf.io/networks: eni-vpc, eni-dpdk
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: $POD_IMAGE
      imagePullPolicy: Never
      command: [sleep, "2147483647"]
      resources:
        limits:
          $RESOURCE: "1"
EOF
}

vpc_nad() { # vpc_nad <ipvlan|host-device>: the pod's VPC network on the plain ENI (docs/ipvlan-vpc.md)
    local extra=""
    [[ $1 == ipvlan ]] && extra='"mode": "l2",'
    cat <<EOF
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: eni-vpc
spec:
  config: |
    {
      "cniVersion": "1.0.0",
      "name": "eni-vpc",
      "type": "cni-helper",
      "deviceIndex": 1,
      "delegate": {"type": "$1", $extra "ipam": {"type": "cni-helper"}}
    }
EOF
}

pod_running() { # pod_running <name>
    [[ $(kc get pod -n $POD_NS "$1" -o jsonpath='{.status.phase}') == Running ]]
}

make_pod() {
    step "10/12 NetworkAttachmentDefinitions (eni-vpc: device index 1, $(cat "$DEMO_DIR/vpc-delegate") with cni-helper as IPAM; docs/examples/nad-dpdk.yaml: resourceName) + a Pod on node-1 asking for $RESOURCE: 1 in its limits (kubelet log: $DEMO_DIR/node-1/k/logs/)"
    vpc_nad "$(cat "$DEMO_DIR/vpc-delegate")" | kc apply -f - >/dev/null
    kc apply -f "$REPO_DIR/docs/examples/nad-dpdk.yaml" >/dev/null
    pod_manifest $POD | kc apply -f - >/dev/null
    wait_for 60 "pod $POD Running (kubectl describe pod $POD)" pod_running $POD
    show "The NetworkAttachmentDefinitions" kc get network-attachment-definitions \
        -o 'custom-columns=NAME:.metadata.name,RESOURCE:.metadata.annotations.k8s\.v1\.cni\.cncf\.io/resourceName,CONFIG:.spec.config'
}

print_pod() {
    step "11/12 the pod, as the kubelet, containerd and Multus set it up"
    show "The pod" kc get pod -n $POD_NS $POD -o wide
    show "Allocated by our device plugin (kubelet Allocate): the PCIDEVICE_* environment" \
        kc exec -n $POD_NS $POD -- sh -c 'env | grep ^PCIDEVICE_ | sort'
    show "The vfio device nodes the kubelet gave the pod" kc exec -n $POD_NS $POD -- ls -l /dev/vfio
    show "Interfaces in the pod: eth0 (pod network), net1 (the ENI at device index 1, MTU 9001, with a VPC address of its pool)" \
        kc exec -n $POD_NS $POD -- ip addr
    show "The plain ENIs' address pools (status.attachments[].ipam, assigned in EC2 by the controller)" kc get nodeeni multus-plain -o \
        'custom-columns=NODE:.status.attachments[*].nodeID,ENI:.status.attachments[*].eniID,POOL:.status.attachments[*].ipam.addresses,IN-USE:.status.attachments[*].ipam.inUse,FREE:.status.attachments[*].ipam.free'
    show "node-1's allocations (cni-helper, under the node's allocation lock)" jq -c '.allocations[]' "$DEMO_DIR/node-1/run/ipam.json"
    show "The pod's network-status annotation (written by Multus)" \
        kc get pod -n $POD_NS $POD -o jsonpath='{.metadata.annotations.k8s\.v1\.cni\.cncf\.io/network-status}{"\n"}'
}

file_changed() { [[ $(cat "$1") != "$2" ]]; }

kubelet_restart() { # kubelet_restart <node>: SIGHUP to its eni-kubelet restarts the kubelet
    local n=${1:?usage: hack/demo.sh kubelet-restart NODE} f before
    f=$DEMO_DIR/$n/k/kubelet-started
    [[ -f $PIDS/eni-kubelet-$n.pid ]] || die "no kubelet runs for $n"
    before=$(cat "$f")
    kill -HUP "$(cat "$PIDS/eni-kubelet-$n.pid")"
    wait_for 30 "the kubelet of $n to restart" file_changed "$f" "$before"
    say "kubelet of $n restarted ($(cat "$f"))"
}

write_env() {
    local nodes
    nodes=$(jq -c --arg dir "$DEMO_DIR" '[.[] | . + {
        stateDir: ($dir + "/" + .name + "/run"),
        kubeletDir: ($dir + "/" + .name + "/k")}]' "$DEMO_DIR/nodes.json")
    jq -n --arg dir "$DEMO_DIR" --arg moto "$(cat "$DEMO_DIR/moto.endpoint")" \
        --arg ec2 "$(cat "$DEMO_DIR/ec2.endpoint")" --arg vpcdelegate "$(cat "$DEMO_DIR/vpc-delegate")" \
        --arg prefix "$DEMO_PREFIX" --arg pod "$POD" --arg image "$POD_IMAGE" \
        --argjson nodes "$nodes" --slurpfile world "$DEMO_DIR/world.json" '{
        dir: $dir, kubeconfig: ($dir + "/kubeconfig"), moto: $moto, ec2: $ec2, prefix: $prefix,
        vpcNetwork: {nad: "eni-vpc", delegate: $vpcdelegate},
        resource: "intel.com/intel_sriov_netdevice",
        nodeENIs: {plain: "multus-plain", dpdk: "multus-dpdk"},
        nodes: $nodes,
        pod: {name: $pod, namespace: "default", node: "node-1", image: $image},
        world: $world[0]
    }' >"$DEMO_DIR/env.json"
}

summary() {
    step "12/12 done in ${SECONDS}s"
    say ""
    say "Summary"
    say "  - moto attached 2 ENIs to each of the 2 instances (multus-plain at index 1, multus-dpdk at index 2)"
    say "  - both NodeENIs are Ready; the node daemons brought ens6 up with MTU 9001"
    if [[ $DEMO_DRA == 1 ]]; then
        say "  - the DPDK ENI (00:07.0) is bound to vfio-pci and published in each node's ResourceSlice"
        say "    (DRA, --dra); kube-scheduler allocated $DRA_CLAIM (CEL on our attributes) for"
        say "    $DRA_POD; its kubelet prepared it through eni-manager (CDI spec, claim network data)"
    else
        say "  - the DPDK ENI (00:07.0) is bound to vfio-pci; the kubelets show $RESOURCE = 1 in capacity"
        say "  - $POD asked for $RESOURCE: 1; the kubelet called our device plugin's Allocate and"
        say "    containerd started it with the PCIDEVICE_* environment and /dev/vfio; Multus (run by"
        say "    containerd) + cni-helper + $(cat "$DEMO_DIR/vpc-delegate") gave it the ENI at device index 1 as net1,"
        say "    with an address the controller assigned to that ENI in EC2 (cni-helper as IPAM)"
    fi
    say ""
    say "Still running, all on 127.0.0.1. Try:"
    say "  export KUBECONFIG=$DEMO_DIR/kubeconfig; alias kubectl=$KUBECTL"
    say "  kubectl get nodes; kubectl describe node node-1; kubectl exec $POD -- ip addr"
    say "  kubectl delete pod $POD; kubectl get node node-1 -o jsonpath='{.status.allocatable}'"
    say "  ip -n $(node_ns node-1) link; hack/demo.sh status | kubelet-restart node-1"
    say "Logs: $LOGS/ and $DEMO_DIR/node-*/k/logs/   Stop everything: make demo-down"
}

up() {
    trap on_exit EXIT
    preflight
    start_apiserver
    start_moto
    make_nodes
    start_sim
    start_controller
    start_node_agents
    apply_nodeenis
    print_state
    if [[ $DEMO_DRA == 1 ]]; then
        dra_pod
        write_env
    else
        make_pod
        write_env
        print_pod
    fi
    summary
    trap - EXIT
}

args=()
for a in "$@"; do
    if [[ $a == --dra ]]; then DEMO_DRA=1; else args+=("$a"); fi
done
set -- "${args[@]+"${args[@]}"}"

case "${1:-up}" in
up) up ;;
down) down ;;
status)
    print_state
    if pod_running $POD 2>/dev/null; then print_pod; fi
    ;;
kubelet-restart) kubelet_restart "${2:-}" ;;
pod)
    name=${2:?usage: hack/demo.sh pod NAME}
    pod_manifest "$name" | kc apply -f - >/dev/null
    wait_for 60 "pod $name Running (kubectl describe pod $name)" pod_running "$name"
    say "pod $name Running on node-1"
    ;;
-h | --help | help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' ;;
*) die "unknown command $1 (up, down, status, kubelet-restart NODE, pod NAME)" ;;
esac
