#!/usr/bin/env bash
# Installs a pinned Prefect 3 into a venv cached outside the repo and prints its path,
# plus what the tests need besides: graphql-core (the fake Prefect 1 server) and
# helm-python-sdk (Helm v4's engine, to render and lint the chart).
#   bash scripts/setup-prefect.sh          Prefect 3.9.1 and the extras
#   bash scripts/setup-prefect.sh 2        Prefect 2.20.27 alone (the Prefect 2 tests' server)
# Re-running is cheap: the venv is reused when it already has the pinned versions.
set -euo pipefail

case "${1:-}" in
  "") PREFECT_VERSION="${PREFECT_VERSION:-3.9.1}"
      EXTRAS="graphql-core==3.2.6 helm-python-sdk==0.2.2" ;;
  2)  PREFECT_VERSION="2.20.27"
      # Prefect 2 no longer moves, its dependencies do: pinned to a set that works.
      CONSTRAINTS="$(dirname "$0")/constraints-prefect2.txt"
      EXTRAS="" ;;
  *)  echo "usage: $0 [2]" >&2; exit 2 ;;
esac
CACHE="${PAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-agent-operator}"
VENV="$CACHE/venv-prefect-$PREFECT_VERSION"

if [ -x "$VENV/bin/prefect" ] && [ -f "$VENV/.complete" ]; then
  if [ "$(cat "$VENV/.complete")" != "$EXTRAS" ]; then
    [ -z "$EXTRAS" ] || "$VENV/bin/pip" install --quiet $EXTRAS >&2
    echo "$EXTRAS" > "$VENV/.complete"
  fi
  echo "$VENV"
  exit 0
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv' >/dev/null 2>&1; then
  # Debian splits venv out of the interpreter package.
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
  fi
fi

mkdir -p "$CACHE"
rm -rf "$VENV"
"$PY" -m venv "$VENV" >&2
"$VENV/bin/pip" install --quiet --upgrade pip >&2 || true
"$VENV/bin/pip" install --quiet ${CONSTRAINTS:+-c "$CONSTRAINTS"} "prefect==$PREFECT_VERSION" $EXTRAS >&2
echo "$EXTRAS" > "$VENV/.complete"
echo "$VENV"
