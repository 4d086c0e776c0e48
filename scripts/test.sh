#!/usr/bin/env bash
# The one test command: formatting, lints, unit tests, and integration tests against a
# real Prefect 3 and Prefect 2 server and Helm's engine (cached venvs from
# scripts/setup-prefect.sh),
# PostgreSQL (scripts/postgres.sh), a real kube-apiserver (scripts/kube-apiserver.sh), a real one-node cluster with images
# built here (scripts/cluster.sh, scripts/images.sh) and Lua 5.1 (Debian's lua5.1).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup first" >&2; exit 1; }

echo "==> Prefect venv"
PAO_PREFECT_VENV="$(bash scripts/setup-prefect.sh)"
export PAO_PREFECT_VENV
echo "using $PAO_PREFECT_VENV"
PAO_PREFECT2_VENV="$(bash scripts/setup-prefect.sh 2)"
export PAO_PREFECT2_VENV
echo "and $PAO_PREFECT2_VENV (Prefect 2 servers)"

echo "==> kube-apiserver, etcd, kubelet, kube-scheduler (built from Debian sources once, cached)"
bash scripts/kube-apiserver.sh install

echo "==> one-node cluster: containerd, CNI, the Prefect image (built once, cached)"
bash scripts/cluster.sh install
bash scripts/images.sh build flow prefect1

echo "==> PostgreSQL (Prefect on its production database; a server of the tests' own)"
bash scripts/postgres.sh install >/dev/null

echo "==> lua5.1 (runs the Argo CD health check)"
if ! command -v lua5.1 >/dev/null; then
  apt-get install -y -qq lua5.1 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq lua5.1 >/dev/null; }
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> cargo test"
start=$(date +%s)
cargo test --all-targets "$@"
echo "==> all tests passed in $(( $(date +%s) - start )) s"
