#!/usr/bin/env bash
# The benchmark's Python side, cached outside the repo: the same Prefect as the tests plus
# the official Kubernetes worker (prefect-kubernetes) and matplotlib for the plot.
# Prints the venv's path.
set -euo pipefail
PREFECT_VERSION="${PREFECT_VERSION:-3.9.1}"
CACHE="${PAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-agent-operator}"
VENV="$CACHE/venv-bench-prefect-$PREFECT_VERSION"
PACKAGES="prefect==$PREFECT_VERSION prefect-kubernetes==0.8.0 matplotlib==3.10.7"
if [ -x "$VENV/bin/prefect" ] && [ "$(cat "$VENV/.complete" 2>/dev/null)" = "$PACKAGES" ]; then
  echo "$VENV"
  exit 0
fi
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv' >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
"$VENV/bin/pip" install --quiet --upgrade pip >&2 || true
"$VENV/bin/pip" install --quiet $PACKAGES >&2
echo "$PACKAGES" > "$VENV/.complete"
echo "$VENV"
