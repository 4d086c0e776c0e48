#!/usr/bin/env bash
# The benchmark in one command: this operator against Prefect's official Kubernetes worker
# on a real Prefect server and the real test API server (bench/bench.py), then end to end
# on the real one-node cluster (bench/e2e.py). Prints the tables and writes
# bench/results/results.{json,md,png}, sync.json and e2e.{json,md}. Extra flags go to bench.py
# (--help lists them); with flags, the end-to-end part is left out (bench/e2e.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash bench/setup.sh)"
bash scripts/kube-apiserver.sh install >/dev/null
cargo build --release --quiet
"$VENV/bin/python" bench/bench.py --venv "$VENV" "$@"
if [ "$#" -eq 0 ]; then
  # PrefectDeployments synced, 10 and 100 in one namespace (bench/results/sync.json).
  "$VENV/bin/python" bench/sync.py
  bash bench/e2e.sh
fi
