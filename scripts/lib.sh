# Shell helpers shared by scripts/kube-apiserver.sh and scripts/cluster.sh (sourced).

# wait_until SECONDS COMMAND...: runs COMMAND (quietly) every 0.2 s until it succeeds;
# fails once SECONDS have passed.
wait_until() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# pid_alive FILE: the process whose pid FILE holds is running.
pid_alive() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# kill_pidfile DIR NAME...: TERM to each process in DIR/NAME.pid, all at once (whoever
# stops us may not wait long: etcd alone takes seconds), KILL to those alive 15 s later;
# the pid files go.
kill_pidfile() {
  local dir="$1" name pid pids=(); shift
  for name in "$@"; do
    [ -f "$dir/$name.pid" ] || continue
    pid="$(cat "$dir/$name.pid")"
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$dir/$name.pid"
  done
  for pid in "${pids[@]}"; do
    wait_until 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  done
}
