#!/usr/bin/env bash
# The fault-injection suite at full size, printing its table: the operator SIGKILLed at
# random moments during a burst (default 500 runs, 5 kills), on the real API server and
# the real Prefect server. Sizes: PAO_FAULT_RUNS, PAO_FAULT_ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
PAO_PREFECT_VENV="$(bash scripts/setup-prefect.sh)"
export PAO_PREFECT_VENV
bash scripts/kube-apiserver.sh install
export PAO_FAULT_RUNS="${PAO_FAULT_RUNS:-500}" PAO_FAULT_ROUNDS="${PAO_FAULT_ROUNDS:-5}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
cargo test --release --test faults -- --nocapture --test-threads 1 >"$out" 2>&1 || status=$?
grep -E '^\|' "$out" || { tail -40 "$out"; }
[ "$status" -eq 0 ] || { echo "fault suite FAILED (see above)"; tail -40 "$out"; }
exit "$status"
