#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler (scripts/kube-apiserver.sh builds them with the
# kubelet from Debian's `kubernetes` source package), containerd and runc from Debian,
# the CNI bridge, and images built here (scripts/images.sh). Pods run for real.
#
#   scripts/cluster.sh install            apt packages, binaries, the pause image (cached)
#   scripts/cluster.sh check              can this machine run a node? one error line if not
#   scripts/cluster.sh start DIR          start it all in DIR; writes DIR/kubeconfig and
#                                         DIR/env (KUBECONFIG, PAO_NODE_HOST_IP: the host's
#                                         address as pods see it; bind servers pods use there)
#   scripts/cluster.sh load DIR NAME...   import images (scripts/images.sh names) into the node
#   scripts/cluster.sh stop DIR           end everything start started, undo its side effects
#   scripts/cluster.sh run DIR [NAME...]  start, load images, stay in the foreground, stop on
#                                         TERM/INT/exit (what the test harness uses)
#
# One node per machine: the kubelet owns fixed paths and ports (10250). Needs root.
# The API server serves on the bridge address (not 127.0.0.1) so that pods reach it;
# the `kubernetes` Service's address is forwarded there by one iptables rule, as
# kube-proxy would (there is no kube-proxy).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-agent-operator}"
BRIDGE=pao0
SUBNET=10.244.77.0/24
HOST_IP=10.244.77.1
SERVICE_IP=10.96.0.1
STATE=/run/prefect-agent-operator-node
# Paths the kubelet writes outside its root dir; removed on stop unless they were there.
KUBELET_PATHS="/var/lib/kubelet /var/log/pods /var/log/containers /usr/libexec/kubernetes /var/lib/cni /var/run/netns"
SYSCTLS="vm.overcommit_memory kernel.panic kernel.panic_on_oops"

log() { echo "cluster.sh: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

# The node in $STATE is gone, or its owner is not stopping it and its kubelet is dead.
settled() { [ ! -f "$STATE" ] || { [ ! -f "$1/stopping" ] && ! pid_alive "$1/kubelet.pid"; }; }

check() {
  [ "$(id -u)" -eq 0 ] || die "a node needs root (mounts, cgroups, network): run as root"
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || die "this machine cannot run a node: no overlayfs in the kernel (/proc/filesystems)"
  local c
  for c in cpu memory pids devices freezer; do
    [ -d "/sys/fs/cgroup/$c" ] || [ -f /sys/fs/cgroup/cgroup.controllers ] \
      || die "this machine cannot run a node: cgroup controller \`$c\` is not mounted under /sys/fs/cgroup"
  done
  if [ -f /sys/fs/cgroup/cgroup.controllers ] && [ ! -d /sys/fs/cgroup/memory ]; then
    die "this machine cannot run a node: cgroup v2 only; this kubelet (1.20, cgroupfs driver) needs cgroup v1"
  fi
  command -v ip >/dev/null || die "this machine cannot run a node: \`ip\` (iproute2) is missing"
}

install() {
  check
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v socat >/dev/null || missing+=(socat)
  command -v ethtool >/dev/null || missing+=(ethtool)
  command -v gcc >/dev/null || missing+=(gcc)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
  bash scripts/kube-apiserver.sh install >/dev/null
  bash scripts/images.sh build pause >/dev/null
}

bin_dir() { bash scripts/kube-apiserver.sh install; }

# containerd's CLI against this node's socket, in the namespace the kubelet uses.
ctr_() { ctr -a "$1/containerd/containerd.sock" -n k8s.io "${@:2}"; }

load() {
  local dir="$1"; shift
  local name tar
  for name in "$@"; do
    tar="$(bash scripts/images.sh path "$name")"
    log "importing $name ($(du -m "$tar" | cut -f1) MB)"
    ctr_ "$dir" images import --no-unpack "$tar" >/dev/null \
      || die "could not import $tar into the node's containerd; see $dir/containerd.log"
  done
}

start() {
  local dir="$1"
  install
  if [ -f "$STATE" ]; then
    local other; other="$(cat "$STATE")"
    # A node being stopped (e.g. by the previous test binary) is waited for.
    wait_until 60 settled "$other" || true
    if [ -f "$STATE" ]; then
      if pid_alive "$other/kubelet.pid"; then
        die "a node already runs here (started in $other); stop it first: scripts/cluster.sh stop $other"
      fi
      log "cleaning up after a node that was not stopped ($other)"
      stop "$other" || true
    fi
  fi
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  echo "$dir" > "$STATE"
  local bin; bin="$(bin_dir)"

  # What we change on the host, recorded so that stop puts it back.
  local p s
  : > "$dir/created-paths"
  for p in $KUBELET_PATHS; do [ -e "$p" ] || echo "$p" >> "$dir/created-paths"; done
  : > "$dir/sysctls"
  for s in $SYSCTLS; do echo "$s=$(sysctl -n "$s")" >> "$dir/sysctls"; done

  # The bridge first: the API server serves on its address.
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$HOST_IP/${SUBNET#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up

  PAO_APISERVER_ADDRESS="$HOST_IP" PAO_CONTROLLERS="nodelifecycle,podgc,deployment,replicaset,endpoint,endpointslice,disruption" \
    bash scripts/kube-apiserver.sh start "$dir" --controller-manager >/dev/null
  local api_port; api_port="$(sed 's/.*://' "$dir/apiserver.url")"
  # kube-proxy's one job here: the `kubernetes` Service's address reaches the API server.
  local rule=(-s "$SUBNET" -d "$SERVICE_IP" -p tcp --dport 443 -m comment --comment "pao-node $dir"
    -j DNAT --to-destination "$HOST_IP:$api_port")
  printf '%s\n' "${rule[@]}" > "$dir/iptables-rule"
  iptables -t nat -A PREROUTING "${rule[@]}"

  # containerd (CRI), everything under DIR.
  mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/cni/ipam"
  cat > "$dir/containerd/config.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$(bash scripts/images.sh ref pause)"
  # root here lacks CAP_SYS_RESOURCE: the kubelet's negative oom_score_adj would fail every start
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
TOML
  cat > "$dir/cni/net.d/10-pao.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "pao", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam", "ranges": [[{"subnet": "$SUBNET", "gateway": "$HOST_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
  containerd --config "$dir/containerd/config.toml" > "$dir/containerd.log" 2>&1 &
  echo $! > "$dir/containerd.pid"
  wait_until 30 ctr_ "$dir" version || die "containerd did not start; see $dir/containerd.log"
  load "$dir" pause

  # kube-scheduler: without it pods stay Pending.
  "$bin/kube-scheduler" --kubeconfig "$dir/kubeconfig" --leader-elect=false --port 0 --secure-port 0 \
    > "$dir/scheduler.log" 2>&1 &
  echo $! > "$dir/scheduler.pid"

  # kubelet, loopback only (anonymous + AlwaysAllow is safe there), named localhost so
  # that the API server reaches it for `kubectl logs`.
  mkdir -p "$dir/kubelet"
  cat > "$dir/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: []
serializeImagePulls: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
makeIPTablesUtilChains: false
YAML
  "$bin/kubelet" --config "$dir/kubelet-config.yaml" --kubeconfig "$dir/kubeconfig" \
    --hostname-override localhost --container-runtime remote \
    --container-runtime-endpoint "unix://$dir/containerd/containerd.sock" \
    --image-service-endpoint "unix://$dir/containerd/containerd.sock" \
    --pod-infra-container-image "$(bash scripts/images.sh ref pause)" \
    --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet/pki" > "$dir/kubelet.log" 2>&1 &
  echo $! > "$dir/kubelet.pid"

  # Ready and schedulable: the not-ready taint gone (the nodelifecycle controller).
  local k="kubectl --kubeconfig $dir/kubeconfig"
  wait_until 90 bash -c "$k get node localhost -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" \
    || die "the node did not become Ready in 90 s; see $dir/kubelet.log"
  wait_until 60 bash -c "! $k get node localhost -o jsonpath='{.spec.taints}' | grep -q not-ready" \
    || die "the node kept its not-ready taint for 60 s; see $dir/controller-manager.log"
  wait_until 60 $k -n default get serviceaccount default \
    || die "no default ServiceAccount after 60 s; see $dir/controller-manager.log"
  { echo "KUBECONFIG=$dir/kubeconfig"; echo "PAO_NODE_HOST_IP=$HOST_IP"; } > "$dir/env"
  echo "$dir/kubeconfig"
}

stop() {
  local dir="$1"
  dir="$(cd "$dir" 2>/dev/null && pwd)" || { log "nothing to stop in $1"; return 0; }
  touch "$dir/stopping"
  kill_pidfile "$dir" kubelet scheduler
  # Every container and sandbox goes, then containerd and its shims.
  if [ -S "$dir/containerd/containerd.sock" ]; then
    local id
    for id in $(ctr_ "$dir" tasks ls -q 2>/dev/null); do ctr_ "$dir" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_ "$dir" tasks ls -q 2>/dev/null); do ctr_ "$dir" tasks rm -f "$id" >/dev/null 2>&1 || true; done
  fi
  kill_pidfile "$dir" containerd
  local pid
  for pid in $(pgrep -f "containerd-shim.*$dir/containerd" || true); do kill -9 "$pid" 2>/dev/null || true; done
  bash scripts/kube-apiserver.sh stop "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir/etcd"

  # Mounts: container rootfs, pod volumes, the kubelet's bind mount of its root dir,
  # sandbox network namespaces.
  local m
  for m in $(awk -v d="$dir" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for m in $(awk '$2 ~ "^/(var/)?run/netns/cni-" {print $2}' /proc/self/mounts); do
    umount -l "$m" 2>/dev/null || true; rm -f "$m"
  done
  # cgroups the kubelet made in every hierarchy (empty once the processes are gone).
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h/kubepods" ] || continue
    wait_until 10 bash -c "find '$h/kubepods' -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d '$h/kubepods' ]" \
      || log "could not remove cgroup $h/kubepods"
  done
  if [ -f "$dir/iptables-rule" ]; then
    local rule; mapfile -t rule < "$dir/iptables-rule"
    iptables -t nat -D PREROUTING "${rule[@]}" 2>/dev/null || log "could not remove the iptables rule ${rule[*]}"
    rm -f "$dir/iptables-rule"
  fi
  ip link del "$BRIDGE" 2>/dev/null || true
  if [ -f "$dir/sysctls" ]; then
    while IFS= read -r s; do sysctl -qw "$s" >/dev/null 2>&1 || true; done < "$dir/sysctls"
    rm -f "$dir/sysctls"
  fi
  if [ -f "$dir/created-paths" ]; then
    while IFS= read -r p; do rm -rf "$p"; done < "$dir/created-paths"
    rm -f "$dir/created-paths"
  fi
  # Container filesystems are big; the logs stay for a look.
  rm -rf "$dir/containerd/root" "$dir/containerd/state" "$dir/kubelet"
  [ "$(cat "$STATE" 2>/dev/null)" != "$dir" ] || rm -f "$STATE"
  rm -f "$dir/stopping"
}

run() {
  local dir="$1"; shift
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  trap 'stop "$dir"' EXIT
  trap 'exit 0' TERM INT
  start "$dir" >/dev/null
  [ "$#" -eq 0 ] || load "$dir" "$@"
  echo ready > "$dir/ready"
  while pid_alive "$dir/kubelet.pid" && pid_alive "$dir/apiserver.pid"; do
    sleep 1
  done
  log "the kubelet or the API server exited; see $dir/*.log"
  exit 1
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  start) start "$2" ;;
  load) shift; dir="$1"; shift; load "$dir" "$@" ;;
  stop) stop "$2" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 install | check | start DIR | load DIR NAME... | stop DIR | run DIR [NAME...]" >&2; exit 2 ;;
esac
