#!/usr/bin/env bash
# A PostgreSQL server of the project's own, for Prefect on its production database (no
# system service: a data directory of its own, loopback only, gone with the directory).
#
#   bash scripts/postgres.sh install        # Debian's PostgreSQL, if not there yet
#   bash scripts/postgres.sh run DIR PORT   # initdb into DIR if new, serve 127.0.0.1:PORT
#                                           # in the foreground until SIGTERM/SIGINT;
#                                           # DIR/ready appears once the database
#                                           # `prefect` (user `prefect`, trust) takes
#                                           # connections
#
# Prefect's URL is then postgresql+asyncpg://prefect@127.0.0.1:PORT/prefect.
set -euo pipefail

bin_dir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$d" ] && [ -x "$d/initdb" ] || return 1
  echo "$d"
}

# PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user
# Debian's package creates. setpriv execs, so that the server started in the background
# below is this script's own child (`$!`) and the signal reaches it.
as_owner=()
if [ "$(id -u)" = 0 ]; then
  as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

case "${1:-}" in
  install)
    if ! bin_dir >/dev/null; then
      echo "installing PostgreSQL (Debian's package)" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -qq postgresql >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
    fi
    bin_dir
    ;;
  run)
    dir="${2:?usage: postgres.sh run DIR PORT}"
    port="${3:?usage: postgres.sh run DIR PORT}"
    bin="$(bin_dir)" || { echo "error: PostgreSQL not installed: bash scripts/postgres.sh install" >&2; exit 1; }
    mkdir -p "$dir"
    rm -f "$dir/ready"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir"
      # The owner must reach DIR through its parents (temporary directories are 0700).
      parent="$(dirname "$dir")"
      while [ "$parent" != / ]; do chmod o+x "$parent"; parent="$(dirname "$parent")"; done
    fi
    chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      "${as_owner[@]}" "$bin/initdb" -D "$dir" -U prefect --auth=trust -E UTF8 --no-instructions >"$dir/../initdb.log" 2>&1 ||
        "${as_owner[@]}" "$bin/initdb" -D "$dir" -U prefect --auth=trust -E UTF8 >"$dir/../initdb.log" 2>&1 ||
        { cat "$dir/../initdb.log" >&2; exit 1; }
    fi
    # Prefect's server opens up to 15 connections per process (pool 5, overflow 10).
    "${as_owner[@]}" "$bin/postgres" -D "$dir" -h 127.0.0.1 -p "$port" -k "$dir" \
      -c max_connections=200 -c logging_collector=off &
    pid=$!
    # SIGQUIT: immediate shutdown, the server's own processes with it.
    trap 'kill -QUIT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 0' TERM INT
    for _ in $(seq 1 300); do
      if "${as_owner[@]}" "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U prefect -d postgres; then break; fi
      kill -0 "$pid" 2>/dev/null || { echo "error: postgres exited; see above" >&2; exit 1; }
      sleep 0.2
    done
    if ! "${as_owner[@]}" "$bin/psql" -h 127.0.0.1 -p "$port" -U prefect -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
      "${as_owner[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
    fi
    touch "$dir/ready"
    wait "$pid"
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
