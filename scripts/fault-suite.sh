#!/usr/bin/env bash
# The fault-injection suite at full size, printing its table: during a burst of runs
# (default 500) something breaks at random moments (default 5 rounds): the operator, the
# leader of two replicas, the Prefect server, the Kubernetes API server. On the real API
# server and the real Prefect server, on SQLite and on PostgreSQL (PAO_FAULT_DATABASES,
# default both). Sizes: PAO_FAULT_RUNS, PAO_FAULT_ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
PAO_PREFECT_VENV="$(bash scripts/setup-prefect.sh)"
export PAO_PREFECT_VENV
bash scripts/kube-apiserver.sh install
bash scripts/postgres.sh install
export PAO_FAULT_RUNS="${PAO_FAULT_RUNS:-500}" PAO_FAULT_ROUNDS="${PAO_FAULT_ROUNDS:-5}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
for db in ${PAO_FAULT_DATABASES:-sqlite postgres}; do
  PAO_FAULT_DATABASE="$db" cargo test --release --test faults -- --nocapture --test-threads 1 >>"$out" 2>&1 || status=$?
done
echo "| scenario | Prefect's database | rounds | runs | duplicate Jobs | never launched | never finished | key leaks | max recovery | wall time |"
echo "|---|---|---|---|---|---|---|---|---|---|"
grep -E '^\| ' "$out" || { tail -40 "$out"; }
[ "$status" -eq 0 ] || { echo "fault suite FAILED (see above)"; tail -40 "$out"; }
exit "$status"
