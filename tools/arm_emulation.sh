#!/usr/bin/env bash
# Run aarch64 TVM libraries without an ARM board: an emulated aarch64 Python with TVM, serving
# TVM's RPC protocol on 127.0.0.1, so `graphopt` can upload a cross-compiled library and run it
# (graphopt.backends.tvm: remote="127.0.0.1:PORT", or GRAPHOPT_TVM_REMOTE=127.0.0.1:PORT).
#
#   tools/arm_emulation.sh setup          # once per machine, as root (~1 min the first time)
#   tools/arm_emulation.sh start [PORT]   # start the RPC server (default port 9190), wait ready
#   tools/arm_emulation.sh status         # "ready 127.0.0.1:PORT" / "set up" / "not set up"
#   tools/arm_emulation.sh stop           # stop the server and its workers
#
# What `setup` does (Debian/Ubuntu, as root; no chroot, the host's dpkg state is untouched):
# 1. installs the cross compiler and qemu if missing (gcc/g++-aarch64-linux-gnu, qemu-user,
#    qemu-user-static, binfmt-support);
# 2. mounts binfmt_misc and enables qemu-aarch64, so aarch64 programs (the RPC server's worker
#    processes too) start under qemu; containers lose this at reboot, so `start` does it again;
# 3. downloads arm64 python3.11 and its libraries with a private apt configuration (its own
#    lists, cache and status files, APT::Architecture "arm64") and unpacks them into a sysroot;
# 4. downloads the aarch64 wheels of the host's TVM version (apache-tvm, apache-tvm-ffi, numpy
#    and the few packages TVM's RPC server imports) and unpacks them onto a PYTHONPATH folder;
#    the host Python (`$PYTHON`, default python3) must have graphopt's `tvm` extra installed;
# 5. byte-compiles both with the host Python when it is a 3.11 too (otherwise under emulation):
#    without .pyc files every emulated `import tvm` compiles TVM's sources again, which doubles
#    the server's start-up;
# 6. checks once that the emulated Python imports tvm. A second `setup` only re-checks the host
#    packages and binfmt_misc (a few seconds), and refetches the wheels if the host's TVM changed.
# Everything lives in $GRAPHOPT_ARM_DIR (default ~/.cache/graphopt-arm). Timings of code run
# under emulation mean nothing; use it to check numbers. The server takes 20-70 s to start (two
# emulated Pythons import tvm: the server and its worker).
set -euo pipefail

ROOT="${GRAPHOPT_ARM_DIR:-$HOME/.cache/graphopt-arm}"
SYSROOT="$ROOT/sysroot"
SITE="$ROOT/site-packages"
PIDFILE="$ROOT/rpc.pid"
PORTFILE="$ROOT/rpc.port"
LOG="$ROOT/rpc.log"
HOST_PYTHON="${PYTHON:-python3}"
ARM_PYTHON="$SYSROOT/usr/bin/python3.11"
BEGAN=$(date +%s)

say() { echo "arm_emulation [$(($(date +%s) - BEGAN)) s]: $*" >&2; }
die() {
  say "$*"
  exit 1
}

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 needs root (run it with sudo)"
}

# an aarch64 Python: binfmt_misc starts it (and its children) under qemu; QEMU_LD_PREFIX is the
# sysroot for its loader and libraries (qemu-aarch64 -L would not reach the child processes)
arm_python() {
  QEMU_LD_PREFIX="$SYSROOT" PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 "$ARM_PYTHON" "$@"
}

host_tvm_version() {
  "$HOST_PYTHON" -c "from importlib.metadata import version as v; print(v('apache-tvm'), v('apache-tvm-ffi'))" \
    2>/dev/null || die "$HOST_PYTHON has no apache-tvm: install graphopt's tvm extra (pip install -e '.[tvm]') or set PYTHON"
}

install_host_packages() {
  local missing=()
  command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
  command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
  [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -e /usr/bin/qemu-aarch64-static ] \
    || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  if [ ${#missing[@]} -gt 0 ]; then
    need_root "installing ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      >/dev/null
  fi
}

enable_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    need_root "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    need_root "enabling qemu-aarch64 in binfmt_misc"
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64
    grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "cannot enable qemu-aarch64"
  fi
}

make_sysroot() {
  [ -f "$ROOT/sysroot.done" ] && return
  local apt="$ROOT/apt" debs="$ROOT/debs"
  rm -rf "$SYSROOT" "$debs" "$ROOT/compiled.done" "$ROOT/checked"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$debs" "$SYSROOT"
  : >"$apt/status"
  local opts=(-o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
    -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
    -o "Dir::Cache=$apt/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -q)
  say "fetching arm64 package lists"
  apt-get "${opts[@]}" update >/dev/null
  # the dependency closure of python3.11 and libstdc++6 (arm64), without recommends
  local packages
  packages=$(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends \
    python3.11 libstdc++6 libgomp1 | grep -E '^[a-z0-9]' | grep -v ':' | sort -u)
  say "downloading $(echo "$packages" | wc -w) arm64 packages"
  # shellcheck disable=SC2086  # one word per package
  (
    cd "$debs"  # one call; if one package fails, each on its own (python3.11 is checked below)
    apt-get "${opts[@]}" download $packages >/dev/null 2>&1 \
      || for p in $packages; do apt-get "${opts[@]}" download "$p" >/dev/null 2>&1 || true; done
  )
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  # the sysroot's absolute symlinks (lib -> usr/lib on merged-/usr systems) must stay inside it
  [ -e "$SYSROOT/lib" ] || ln -s usr/lib "$SYSROOT/lib"
  [ -x "$ARM_PYTHON" ] || die "python3.11 was not unpacked (see $debs)"
  rm -rf "$debs"
  touch "$ROOT/sysroot.done"
}

fetch_wheels() {
  local versions tvm ffi wheels="$ROOT/wheels"
  versions=$(host_tvm_version)
  read -r tvm ffi <<<"$versions"
  [ -f "$ROOT/site.done" ] && [ "$(cat "$ROOT/site.done")" = "$versions" ] && return
  rm -rf "$SITE" "$wheels" "$ROOT/site.done" "$ROOT/checked"
  mkdir -p "$wheels" "$SITE"
  say "downloading aarch64 wheels (apache-tvm $tvm, apache-tvm-ffi $ffi)"
  "$HOST_PYTHON" -m pip download -q --disable-pip-version-check --no-cache-dir \
    --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp -d "$wheels" "apache-tvm==$tvm" "apache-tvm-ffi==$ffi" numpy ml_dtypes \
    typing_extensions psutil cloudpickle 2> >(grep -v "^WARNING: Location 'file:" >&2)
  say "unpacking $(find "$wheels" -name '*.whl' | wc -l) wheels"
  for wheel in "$wheels"/*.whl; do
    "$HOST_PYTHON" -m zipfile -e "$wheel" "$SITE"
  done
  rm -rf "$wheels"
  echo "$versions" >"$ROOT/site.done"
}

byte_compile() {
  [ -f "$ROOT/compiled.done" ] && [ "$(cat "$ROOT/compiled.done")" = "$(cat "$ROOT/site.done")" ] \
    && return
  local python=("$HOST_PYTHON")
  # .pyc files are the same on every machine for one Python version (3.11: cache tag cpython-311)
  if [ "$("$HOST_PYTHON" -c 'import sys; print(sys.implementation.cache_tag)')" != cpython-311 ]; then
    python=(arm_python)
  fi
  say "byte-compiling the aarch64 Python's libraries"
  "${python[@]}" -m compileall -q -j 0 "$SITE" "$SYSROOT/usr/lib/python3.11" >/dev/null \
    || say "some files did not compile (harmless: they are then compiled at import)"
  cat "$ROOT/site.done" >"$ROOT/compiled.done"
}

check_arm_python() {
  [ -f "$ROOT/checked" ] && return
  say "checking that the emulated Python imports tvm"
  arm_python -c "import tvm, numpy; print('aarch64 python: tvm', tvm.__version__)" \
    || die "the emulated aarch64 Python cannot import tvm"
  touch "$ROOT/checked"
}

is_set_up() {
  [ -x "$ARM_PYTHON" ] && [ -f "$ROOT/sysroot.done" ] && [ -f "$ROOT/site.done" ] \
    && [ -f "$ROOT/checked" ]
}

# the pid of the RPC server this script started, if it still runs
server_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q tvm.exec.rpc_server \
    && echo "$pid"
}

port_open() {
  "$HOST_PYTHON" -c "import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(('127.0.0.1', $1)))"
}

start() {
  local port="${1:-9190}" pid
  is_set_up || die "not set up: run tools/arm_emulation.sh setup"
  enable_binfmt
  if pid=$(server_pid); then
    say "already running (pid $pid, port $(cat "$PORTFILE"))"
    return
  fi
  port_open "$port" && die "port $port is in use by another program"
  # a new session, so that `stop` can end the server and its worker processes together
  QEMU_LD_PREFIX="$SYSROOT" PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 setsid \
    "$ARM_PYTHON" -m tvm.exec.rpc_server --host 127.0.0.1 --port "$port" \
    --port-end "$((port + 1))" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  echo "$port" >"$PORTFILE"
  local began waited=0
  began=$(date +%s)
  until port_open "$port"; do
    sleep 1
    waited=$(($(date +%s) - began))
    if ! server_pid >/dev/null || [ $waited -ge 300 ]; then
      say "the RPC server did not start in ${waited} s; log:"
      cat "$LOG" >&2
      stop
      exit 1
    fi
  done
  say "RPC server ready on 127.0.0.1:$port after ${waited} s (pid $(cat "$PIDFILE"))"
}

# whether a process of session $1 (the server's) still runs, zombies aside; /proc, not procps
session_alive() {
  local file stat fields
  for file in /proc/[0-9]*/stat; do
    stat=$(cat "$file" 2>/dev/null) || continue
    read -r -a fields <<<"${stat##*) }"  # state ppid pgrp session ...
    [ "${fields[3]}" = "$1" ] && [ "${fields[0]}" != Z ] && return 0
  done
  return 1
}

stop() {
  local pid
  if pid=$(server_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true  # server and workers
    for _ in $(seq 50); do
      session_alive "$pid" || break
      sleep 0.2
    done
    if session_alive "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    say "stopped (pid $pid)"
  fi
  rm -f "$PIDFILE" "$PORTFILE"
}

status() {
  if server_pid >/dev/null && port_open "$(cat "$PORTFILE")"; then
    echo "ready 127.0.0.1:$(cat "$PORTFILE")"
  elif is_set_up; then
    echo "set up"
  else
    echo "not set up"
  fi
}

mkdir -p "$ROOT"
case "${1:-}" in
  setup)
    install_host_packages
    enable_binfmt
    make_sysroot
    fetch_wheels
    byte_compile
    check_arm_python
    say "set up ($ROOT)"
    ;;
  start) start "${2:-9190}" ;;
  stop) stop ;;
  status) status ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
