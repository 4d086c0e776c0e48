#!/usr/bin/env bash
# Container images built here, without a registry or a daemon, cached outside the repo
# as single-layer docker-archive tars that `ctr images import` takes
# (scripts/cluster.sh load DIR NAME imports one into the node).
#
#   scripts/images.sh build NAME...   build what is missing; prints each tar's path
#   scripts/images.sh path NAME       the tar's path (built when missing)
#   scripts/images.sh ref NAME        the image reference pods use
#
# NAME is one of:
#   flow       Prefect 3.9.1 laid out like Prefect's official image (prefecthq/prefect):
#              root, no USER, WORKDIR /opt/prefect owned by root, `prefect` on PATH,
#              ENTRYPOINT tini -g -- /opt/prefect/entrypoint.sh (EXTRA_PIP_PACKAGES, then exec)
#   prefect1   the same layout with Prefect 1.4.1 (`prefect execute flow-run`)
#   operator   target/release/prefect-agent-operator (or $PAO_OPERATOR_BINARY, e.g. the
#              tests' debug build) in a minimal image: the binary, the libraries it links,
#              CA roots; user 65532, the Dockerfile's entrypoint
#   pause      the pod sandbox: a static binary that waits for a signal and reaps children
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${PAO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-agent-operator}"
IMAGES="$CACHE/images"
SUITE=bookworm
PREFECT3_VERSION=3.9.1
PREFECT1_VERSION=1.4.1
# Bumped when a recipe below changes, so that cached tars are rebuilt.
RECIPE=1
PREFECT1_RECIPE=2

log() { echo "images.sh: $*" >&2; }

need() { # command package
  command -v "$1" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}

ref() {
  case "$1" in
    flow) echo "docker.io/local/prefect:$PREFECT3_VERSION-r$RECIPE" ;;
    prefect1) echo "docker.io/local/prefect:$PREFECT1_VERSION-r$PREFECT1_RECIPE" ;;
    operator) echo "docker.io/local/prefect-agent-operator:dev" ;;
    pause) echo "docker.io/local/pause:3.2-r$RECIPE" ;;
    *) log "unknown image \`$1\` (flow, prefect1, operator, pause)"; exit 2 ;;
  esac
}

tar_path() { echo "$IMAGES/$(ref "$1" | sed 's|docker.io/local/||; s|[:/]|_|g').tar"; }

# A docker-archive tar of ROOTFS as one layer, with an image config built from the
# JSON object CONFIG (Entrypoint, Cmd, Env, User, WorkingDir).
archive() { # rootfs out ref config-json
  local rootfs="$1" out="$2" ref="$3" config="$4" work
  work="$(mktemp -d "$IMAGES/.archive.XXXXXX")"
  tar -C "$rootfs" --numeric-owner --xattrs -cf "$work/layer.tar" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./tmp/*' \
    --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' .
  python3 - "$work" "$ref" "$config" <<'PY'
import hashlib, json, sys
work, ref, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = hashlib.sha256()
with open(f"{work}/layer.tar", "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
image = {
    "architecture": "amd64", "os": "linux",
    "config": config,
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + h.hexdigest()]},
}
data = json.dumps(image).encode()
name = hashlib.sha256(data).hexdigest() + ".json"
open(f"{work}/{name}", "wb").write(data)
json.dump([{"Config": name, "RepoTags": [ref.removeprefix("docker.io/")], "Layers": ["layer.tar"]}],
          open(f"{work}/manifest.json", "w"))
PY
  tar -C "$work" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

# Debian bookworm with Python, as the base of both Prefect images (cached).
base_rootfs() {
  local base="$IMAGES/rootfs-$SUITE-python"
  if [ ! -f "$base/.complete" ]; then
    need debootstrap debootstrap
    log "debootstrap $SUITE (about a minute)"
    rm -rf "$base"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini,git \
      "$SUITE" "$base" http://deb.debian.org/debian >&2
    touch "$base/.complete"
  fi
  echo "$base"
}

# A Prefect image: the base, a venv with `pip install SPEC`, Prefect's entrypoint.
prefect_image() { # name pip-spec...
  local name="$1"; shift
  local out; out="$(tar_path "$name")"
  [ -f "$out" ] && return
  local base root
  base="$(base_rootfs)"
  root="$(mktemp -d "$IMAGES/.rootfs.XXXXXX")"
  cp -a "$base/." "$root/"
  rm -f "$root/.complete"
  # pip inside the chroot: the host's CA bundle (HTTPS here may be intercepted) and resolver.
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  log "$name: pip install $* (about a minute)"
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root" /bin/sh -ec "
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --quiet --no-cache-dir --cert /tmp/host-ca.crt --upgrade pip
    /opt/venv/bin/pip install --quiet --no-cache-dir --cert /tmp/host-ca.crt $*
    mkdir -p /opt/prefect
  " >&2
  rm -f "$root/tmp/host-ca.crt"
  : > "$root/etc/resolv.conf"
  # Prefect's official entrypoint: optional extra packages, then the command.
  cat > "$root/opt/prefect/entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ -n "$EXTRA_PIP_PACKAGES" ]; then
  echo "+pip install $EXTRA_PIP_PACKAGES"
  pip install $EXTRA_PIP_PACKAGES
fi
if [ -z "$*" ]; then
  echo "\
  ___ ___ ___ ___ ___ ___ _____
 | _ \ _ \ __| __| __/ __|_   _|
 |  _/   / _|| _|| _| (__  | |
 |_| |_|_\___|_| |___\___| |_|

"
  exec bash --login
else
  exec "$@"
fi
SH
  chmod 0755 "$root/opt/prefect/entrypoint.sh"
  chown -R 0:0 "$root/opt/prefect"
  archive "$root" "$out" "$(ref "$name")" '{
    "Entrypoint": ["/usr/bin/tini", "-g", "--", "/opt/prefect/entrypoint.sh"],
    "Env": ["PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "PYTHONUNBUFFERED=1"],
    "WorkingDir": "/opt/prefect"}'
  rm -rf "$root"
}

operator_image() {
  local out; out="$(tar_path operator)"
  local bin="${PAO_OPERATOR_BINARY:-}"
  if [ -z "$bin" ]; then
    bin=target/release/prefect-agent-operator
    log "operator: cargo build --release"
    cargo build --release --quiet --bin prefect-agent-operator >&2
  fi
  # Rebuilt whenever the binary changed.
  local sum; sum="$(sha256sum "$bin" | cut -c1-16)"
  if [ -f "$out" ] && [ "$(cat "$out.binary" 2>/dev/null)" = "$sum" ]; then return; fi
  local root lib
  root="$(mktemp -d "$IMAGES/.rootfs.XXXXXX")"
  mkdir -p "$root/etc/ssl/certs" "$root/tmp"
  chmod 1777 "$root/tmp"
  cp "$bin" "$root/prefect-agent-operator"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  # The Dockerfile's image is static (musl); this one carries the glibc it links.
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  archive "$root" "$out" "$(ref operator)" '{
    "Entrypoint": ["/prefect-agent-operator"], "Cmd": ["operator"],
    "User": "65532:65532", "ExposedPorts": {"8080/tcp": {}},
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}'
  echo "$sum" > "$out.binary"
  rm -rf "$root"
}

pause_image() {
  local out; out="$(tar_path pause)"
  [ -f "$out" ] && return
  local root; root="$(mktemp -d "$IMAGES/.rootfs.XXXXXX")"
  cat > "$root/pause.c" <<'C'
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void done(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, done); signal(SIGTERM, done); signal(SIGCHLD, reap);
  for (;;) pause();
}
C
  gcc -static -Os -o "$root/pause" "$root/pause.c"
  rm "$root/pause.c"
  archive "$root" "$out" "$(ref pause)" '{"Entrypoint": ["/pause"]}'
  rm -rf "$root"
}

build() {
  mkdir -p "$IMAGES"
  local name
  for name in "$@"; do
    case "$name" in
      flow) prefect_image flow "prefect==$PREFECT3_VERSION" ;;
      # Prefect 1.4.1 does not bound marshmallow; marshmallow 4 removed Schema.context, which
      # its serializers use ("'Nested' object has no attribute 'context'").
      prefect1) prefect_image prefect1 "prefect==$PREFECT1_VERSION" "'marshmallow<4'" ;;
      operator) operator_image ;;
      pause) pause_image ;;
      *) ref "$name" >/dev/null ;;
    esac
    tar_path "$name"
  done
}

case "${1:-}" in
  build) shift; build "$@" ;;
  path) build "$2" ;;
  ref) ref "$2" ;;
  *) echo "usage: $0 build NAME... | path NAME | ref NAME   (NAME: flow prefect1 operator pause)" >&2; exit 2 ;;
esac
