#!/usr/bin/env bash
# The main job on an embedded default: a one-node cluster on this machine (kubelet,
# scheduler, containerd from Debian; images built here) and a local Prefect server, the
# operator running a PrefectAgent, its flow run launched as a Job, run in a real pod,
# COMPLETED in Prefect, shown by `kubectl get pods`, `kubectl logs` and `kubectl get pfa`.
# Where the machine cannot run a node, the dev job runner stands in for the kubelet.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }
VENV="$(bash scripts/setup-prefect.sh)"
if why="$(bash scripts/cluster.sh check 2>&1)"; then
  echo "==> Installing the one-node cluster and the Prefect image (cached after the first time)"
  bash scripts/cluster.sh install
  bash scripts/images.sh build flow >/dev/null
  node=1
else
  echo "$why" >&2
  echo "==> No node on this machine: falling back to the dev job runner (Jobs run as local processes)" >&2
  bash scripts/kube-apiserver.sh install >/dev/null
  node=0
fi
echo "==> Building prefect-agent-operator"
cargo build --quiet
PAO_QUICKSTART_NODE=$node PAO_AGENT_BIN="$PWD/target/debug/prefect-agent-operator" \
  exec "$VENV/bin/python" scripts/quickstart_operator.py
