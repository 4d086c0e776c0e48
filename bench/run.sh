#!/usr/bin/env bash
# The benchmark in one command: this operator against Prefect's official Kubernetes worker
# on a real Prefect server and the real test API server. Prints the table and writes
# bench/results/results.{json,md,png}. Extra flags go to bench.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash bench/setup.sh)"
bash scripts/kube-apiserver.sh install >/dev/null
cargo build --release --quiet
exec "$VENV/bin/python" bench/bench.py --venv "$VENV" "$@"
