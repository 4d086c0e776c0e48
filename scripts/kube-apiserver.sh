#!/usr/bin/env bash
# A real Kubernetes API server (+ etcd, optionally the controller manager) on loopback,
# built from Debian's own `kubernetes` source package and cached outside the repo.
#
#   scripts/kube-apiserver.sh install          build once (cached), print the bin dir
#   scripts/kube-apiserver.sh start DIR [--controller-manager]
#                                              start in DIR; writes DIR/kubeconfig, DIR/env
#   scripts/kube-apiserver.sh stop DIR         stop what `start DIR` started
#   scripts/kube-apiserver.sh run DIR [...]    start, stay in the foreground, stop on TERM/INT/exit
#                                              (what the test harness uses)
#   scripts/kube-apiserver.sh stop-apiserver DIR / start-apiserver DIR
#                                              take only the API server away and bring it
#                                              back (etcd keeps the state): fault injection
#
# Environment (scripts/cluster.sh sets them for a one-node cluster):
#   PAO_APISERVER_ADDRESS   the address to serve on (default 127.0.0.1)
#   PAO_CONTROLLERS         more kube-controller-manager controllers (comma-separated)
set -euo pipefail

CACHE="${PAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-agent-operator}"
PKG_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
BIN="$CACHE/kube-$PKG_VERSION/bin"

log() { echo "kube-apiserver.sh: $*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then echo sudo; else log "apt-get needs root"; exit 1; fi
  fi
}

# kubelet and kube-scheduler come from the same tree and build (scripts/cluster.sh runs a node).
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet"

have_bins() {
  local b
  for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done
}

install() {
  if have_bins && command -v etcd >/dev/null && command -v kubectl >/dev/null; then
    echo "$BIN"
    return
  fi
  local sudo; sudo="$(need_root)"
  # kubectl: use the one there is (1.32 on these machines), else Debian's, which matches the server.
  if ! command -v kubectl >/dev/null; then
    $sudo apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >&2
  fi
  if have_bins && command -v etcd >/dev/null; then
    echo "$BIN"
    return
  fi
  # Source packages: a deb-src entry beside the machine's own Debian entry.
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
    $sudo tee /etc/apt/sources.list.d/pao-deb-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  log "installing build dependencies (apt)"
  $sudo apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go etcd-server etcd-client \
    golang-github-modern-go-reflect2-dev dpkg-dev rsync openssl curl >&2
  local src="$CACHE/kube-src"
  rm -rf "$src" && mkdir -p "$src"
  (cd "$src" && apt-get source -qq "kubernetes=$PKG_VERSION" >&2)
  local tree; tree="$(find "$src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)"
  [ -n "$tree" ] || { log "apt-get source kubernetes gave no tree"; exit 1; }
  # The vendored reflect2 does not build with Go 1.19; Debian's own copy does.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  log "building $BINARIES (about 7 minutes on 2 cores)"
  (
    cd "$tree"
    mkdir -p .go/src/k8s.io .home
    ln -sfn ../../.. .go/src/k8s.io/kubernetes
    export GOPATH="$PWD/.go" CGO_ENABLED=0 GO111MODULE=off HOME="$PWD/.home"
    cd .go/src/k8s.io/kubernetes
    make WHAT="$(printf 'cmd/%s ' $BINARIES)" >&2
  )
  mkdir -p "$BIN"
  local b
  for b in $BINARIES; do cp "$tree/_output/bin/$b" "$BIN/"; done
  rm -rf "$src"
  echo "$BIN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

launch_apiserver() {
  local dir="$1" args
  mapfile -t args < "$dir/apiserver.args"
  "${args[@]}" >> "$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"
}

apiserver_ready() {
  wait_until 60 curl -skf -H "Authorization: Bearer $(cat "$1/apiserver.token")" "$(cat "$1/apiserver.url")/readyz"
}

# Fault injection: the API server crashes (SIGKILL; a TERM drains watches for long
# seconds); etcd and the data stay ...
stop_apiserver() {
  local dir="$1"
  touch "$dir/apiserver.paused"
  local pid; pid="$(cat "$dir/apiserver.pid")"
  kill -9 "$pid" 2>/dev/null || true
  wait_until 15 bash -c "! kill -0 $pid" || true
}

# ... and comes back on the same address with the same state.
start_apiserver() {
  local dir="$1"
  launch_apiserver "$dir"
  if ! apiserver_ready "$dir"; then
    log "API server not ready after 60 s; see $dir/apiserver.log"; exit 1
  fi
  rm -f "$dir/apiserver.paused"
}

start() {
  local dir="$1" cm="${2:-}"
  local bin; bin="$(install)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  local etcd_port peer_port api_port token address="${PAO_APISERVER_ADDRESS:-127.0.0.1}"
  local controllers="job,garbagecollector,ttl-after-finished,serviceaccount,serviceaccount-token,namespace"
  [ -z "${PAO_CONTROLLERS:-}" ] || controllers="$controllers,$PAO_CONTROLLERS"
  etcd_port="$(free_port)"; peer_port="$(free_port)"; api_port="$(free_port)"
  token="$(openssl rand -hex 16)"
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  echo "$token,admin,1,\"system:masters\"" > "$dir/tokens.csv"
  etcd --data-dir "$dir/etcd" --name default \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" > "$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"
  # Kept so that `stop-apiserver`/`start-apiserver` can bring the same server back.
  printf '%s\n' "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address "$address" \
    --secure-port "$api_port" --cert-dir "$dir/certs" --token-auth-file "$dir/tokens.csv" \
    --authorization-mode RBAC --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.96.0.0/24 --feature-gates TTLAfterFinished=true > "$dir/apiserver.args"
  echo "https://$address:$api_port" > "$dir/apiserver.url"
  echo "$token" > "$dir/apiserver.token"
  launch_apiserver "$dir"
  cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://$address:$api_port", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KC
  if ! apiserver_ready "$dir"; then
    log "API server not ready after 60 s; see $dir/apiserver.log"; stop "$dir"; exit 1
  fi
  if [ "$cm" = "--controller-manager" ]; then
    "$bin/kube-controller-manager" --kubeconfig "$dir/kubeconfig" --bind-address 127.0.0.1 \
      --secure-port 0 --port 0 --leader-elect=false \
      --controllers "$controllers" \
      --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/certs/apiserver.crt" \
      --feature-gates TTLAfterFinished=true > "$dir/controller-manager.log" 2>&1 &
    echo $! > "$dir/controller-manager.pid"
  fi
  echo "KUBECONFIG=$dir/kubeconfig" > "$dir/env"
  echo "$dir/kubeconfig"
}

stop() {
  kill_pidfile "$1" controller-manager apiserver etcd
}

run() {
  local dir="$1"
  # Throwaway servers: the etcd data (tens of MB) goes with them; the logs stay.
  trap 'stop "$dir"; rm -rf "$dir/etcd"' EXIT
  trap 'exit 0' TERM INT
  start "$@" >/dev/null
  echo "ready" > "$dir/ready"
  # Wake up regularly so a TERM is handled promptly.
  while [ -f "$dir/apiserver.paused" ] || kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null; do sleep 1; done
  log "API server exited; see $dir/apiserver.log"
  exit 1
}

case "${1:-}" in
  install) install ;;
  run) shift; run "$@" ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  stop-apiserver) shift; stop_apiserver "$@" ;;
  start-apiserver) shift; start_apiserver "$@" ;;
  *) echo "usage: $0 install | start DIR [--controller-manager] | stop DIR | run DIR [--controller-manager] | stop-apiserver DIR | start-apiserver DIR" >&2; exit 2 ;;
esac
