#!/usr/bin/env bash
# The main job on an embedded default: a local Prefect server and kube-apiserver, the
# operator running a PrefectAgent, its flow run launched as a Job, executed by the dev job
# runner, COMPLETED in Prefect, counted in `kubectl get pfa`.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }
VENV="$(bash scripts/setup-prefect.sh)"
bash scripts/kube-apiserver.sh install >/dev/null
echo "==> Building prefect-agent-operator"
cargo build --quiet
PAO_AGENT_BIN="$PWD/target/debug/prefect-agent-operator" exec "$VENV/bin/python" scripts/quickstart_operator.py
