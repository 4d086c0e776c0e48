#!/usr/bin/env bash
# The process path: a local Prefect server, the example flow deployed to
# a process work pool, the agent launching its run as a local process, the run COMPLETED.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }
VENV="$(bash scripts/setup-prefect.sh)"
echo "==> Building the agent"
cargo build --quiet
PAO_AGENT_BIN="$PWD/target/debug/prefect-agent-operator" exec "$VENV/bin/python" scripts/quickstart_process.py
