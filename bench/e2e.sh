#!/usr/bin/env bash
# End to end on a real node (scripts/cluster.sh): scheduled -> pod Running -> flow RUNNING,
# this operator against Prefect's official worker and the node's own floor. Prints the
# table and writes bench/results/e2e.{json,md}. Extra flags go to bench/e2e.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash bench/setup.sh)"
bash scripts/cluster.sh install
bash scripts/images.sh build flow >/dev/null
cargo build --release --quiet
exec "$VENV/bin/python" bench/e2e.py --venv "$VENV" "$@"
