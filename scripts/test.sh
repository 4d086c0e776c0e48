#!/usr/bin/env bash
# The one test command: formatting, lints, unit tests, and integration tests against a
# real Prefect server (installed into a cached venv by scripts/setup-prefect.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }

echo "==> Prefect venv"
PAO_PREFECT_VENV="$(bash scripts/setup-prefect.sh)"
export PAO_PREFECT_VENV
echo "using $PAO_PREFECT_VENV"

echo "==> kube-apiserver + etcd (built from Debian sources once, cached)"
bash scripts/kube-apiserver.sh install

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test"
start=$(date +%s)
cargo test --all-targets "$@"
echo "==> all tests passed in $(( $(date +%s) - start )) s"
