#!/usr/bin/env bash
# RabbitMQ 4.x for the tests, beside the host's 3.10: Debian trixie's
# rabbitmq-server (4.0.5, Erlang 27) in a chroot made with debootstrap, run as
# private nodes on free ports, each with its own epmd, so that the shared 3.10
# node and its epmd (4369) are never touched. Needs root.
#
#   scripts/rabbitmq4.sh ensure      build the chroot once (~2 min, ~600 MB), reuse it after
#                                    that, and mount /proc and /dev in it
#   scripts/rabbitmq4.sh mount       mount /proc and /dev in the chroot unless they are
#   eval "$(scripts/rabbitmq4.sh start)"
#                                    start one node with the management plugin; prints
#                                    `export` lines: TEST_AMQP_URL, TEST_MANAGEMENT_URL,
#                                    ORDERFLOW_RABBITMQ4_NODE (what `stop` takes)
#   scripts/rabbitmq4.sh stop NODE   stop that node and its epmd, delete its files, and release
#   scripts/rabbitmq4.sh release     unmount /proc and /dev unless a process still runs in the
#                                    chroot (a node of the tests' own, or anyone's)
#
# ORDERFLOW_RABBITMQ4_ROOT: where the chroot lives (default /var/tmp/orderflow-rabbitmq4).
# ORDERFLOW_DEBIAN_MIRROR: the Debian mirror debootstrap uses (default: its own).
set -euo pipefail

ROOT=${ORDERFLOW_RABBITMQ4_ROOT:-/var/tmp/orderflow-rabbitmq4}
# Written last by a complete build: a chroot without it is half-built.
MARKER=$ROOT/.orderflow-rabbitmq4-complete
BIN=/usr/lib/rabbitmq/bin

die() {
  echo "ERROR (RabbitMQ 4.x chroot at $ROOT): $*" >&2
  exit 1
}
say() { echo "rabbitmq4: $*" >&2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mount do); run it as root."
}

# Serialises mounting, unmounting and building between parallel callers.
lock() {
  mkdir -p "$(dirname "$ROOT")"
  exec 9>"$ROOT.lock"
  flock 9
}

# Processes whose root directory is inside the chroot: running nodes, their
# epmds, anyone's shell in it.
users() {
  local link root
  root=$(readlink -f "$ROOT")
  for link in /proc/[0-9]*/root; do
    case "$(readlink "$link" 2>/dev/null)" in
    "$root" | "$root"/*) echo "${link//[^0-9]/}" ;;
    esac
  done
}

mount_all() {
  local fs
  for fs in proc dev; do
    mkdir -p "$ROOT/$fs"
    if ! mountpoint -q "$ROOT/$fs"; then
      mount --bind "/$fs" "$ROOT/$fs" || die "cannot bind-mount /$fs into the chroot."
    fi
  done
}

unmount_all() {
  local fs
  for fs in dev proc; do
    while mountpoint -q "$ROOT/$fs"; do
      umount "$ROOT/$fs" || die "cannot unmount $ROOT/$fs."
    done
  done
}

build() {
  if [ -e "$ROOT" ]; then
    say "$ROOT is half-built (no $(basename "$MARKER")): building it again"
    [ -z "$(users)" ] || die "processes run inside the half-built chroot ($(users | tr '\n' ' ')); stop them first."
    # Ours (/proc, /dev) and whatever an interrupted debootstrap left
    # mounted, innermost first.
    awk -v root="$(readlink -f "$ROOT")/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r |
      while read -r mounted; do umount "$mounted" || die "cannot unmount $mounted."; done
    # --one-file-system: never follow a mount out of the chroot.
    rm -rf --one-file-system "$ROOT"
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and there is no apt-get to install it."
    say "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
      die "cannot install debootstrap (apt-get install debootstrap)."
  fi
  say "debootstrap --variant=minbase trixie $ROOT (takes a few minutes)"
  # shellcheck disable=SC2086 # an unset mirror is no argument at all
  debootstrap --variant=minbase trixie "$ROOT" ${ORDERFLOW_DEBIAN_MIRROR:-} >&2 ||
    die "debootstrap of Debian trixie failed (network? mirror? set ORDERFLOW_DEBIAN_MIRROR); see above."
  # Installing must not start a broker in the chroot: it would take the
  # host's ports 5672 and 4369.
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  mount_all
  say "installing rabbitmq-server in the chroot"
  chroot "$ROOT" apt-get update -qq >&2 || die "apt-get update in the chroot failed."
  chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    rabbitmq-server >&2 || die "installing rabbitmq-server in the chroot failed."
  [ -x "$ROOT$BIN/rabbitmq-server" ] && [ -n "$(ls -d "$ROOT"/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_management-* 2>/dev/null)" ] ||
    die "rabbitmq-server or its management plugin is missing after the install."
  chroot "$ROOT" dpkg-query -W -f '${Version}\n' rabbitmq-server >"$MARKER"
  say "built: rabbitmq-server $(cat "$MARKER")"
}

ensure() {
  need_root
  lock
  [ -f "$MARKER" ] || build
  mount_all
  say "ready: rabbitmq-server $(cat "$MARKER") in $ROOT"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port nothing listens on, below the range the tests pick theirs from
# (20000 and up) and the kernel's ephemeral range.
free_port() {
  local port
  while :; do
    port=$((10000 + RANDOM % 5000))
    case " $TAKEN " in *" $port "*) continue ;; esac
    port_open "$port" && continue
    echo "$port"
    return
  done
}

# The node answers the AMQP protocol header with connection.start (a method
# frame, type 1): it really accepts connections, which `rabbitmqctl wait`
# alone does not promise.
amqp_answers() {
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "AMQP\0\0\11\1" >&3
    [ "$(head -c 1 <&3 | od -An -tu1 | tr -d " ")" = 1 ]' _ "$1" 2>/dev/null
}

node_env() { # dir
  # shellcheck disable=SC1091
  . "$ROOT$1/node.env"
  export HOME=$1 ERL_EPMD_PORT=$EPMD_PORT RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_PORT=$AMQP_PORT \
    RABBITMQ_DIST_PORT=$DIST_PORT RABBITMQ_MNESIA_BASE=$1/mnesia RABBITMQ_LOG_BASE=$1/log \
    RABBITMQ_ENABLED_PLUGINS_FILE=$1/enabled_plugins RABBITMQ_CONFIG_FILE=$1/rabbitmq \
    RABBITMQ_PID_FILE=$1/pid
}

start() {
  need_root
  [ -f "$MARKER" ] || die "not built: run scripts/rabbitmq4.sh ensure first."
  (lock && mount_all)
  local dir=/var/tmp/orderflow-ci-$$-$RANDOM host i
  host=$ROOT$dir
  mkdir -p "$host"
  TAKEN=""
  local amqp dist epmd management
  amqp=$(free_port) && TAKEN="$TAKEN $amqp"
  dist=$(free_port) && TAKEN="$TAKEN $dist"
  epmd=$(free_port) && TAKEN="$TAKEN $epmd"
  management=$(free_port)
  printf 'NODE=ci%s@localhost\nAMQP_PORT=%s\nDIST_PORT=%s\nEPMD_PORT=%s\nMANAGEMENT_PORT=%s\n' \
    "$amqp" "$amqp" "$dist" "$epmd" "$management" >"$host/node.env"
  echo '[rabbitmq_management].' >"$host/enabled_plugins"
  printf 'loopback_users = none\nmanagement.tcp.port = %s\nmanagement.tcp.ip = 127.0.0.1\n' \
    "$management" >"$host/rabbitmq.conf"
  printf 'cookie-%s%s' "$RANDOM" "$RANDOM" >"$host/.erlang.cookie"
  chmod 400 "$host/.erlang.cookie"
  # From here on a failure must not leave the node or its epmd running.
  trap 'stop "$dir" >&2' EXIT
  node_env "$dir"
  # An epmd of the node's own, whose pid we know so that `stop` ends it;
  # the node finds it through ERL_EPMD_PORT.
  chroot "$ROOT" epmd -port "$epmd" -address 127.0.0.1 </dev/null >/dev/null 2>&1 &
  echo $! >"$host/epmd.pid"
  for ((i = 0; i < 100; i++)); do port_open "$epmd" && break || sleep 0.1; done
  chroot "$ROOT" "$BIN/rabbitmq-server" -detached >&2
  chroot "$ROOT" "$BIN/rabbitmqctl" -n "$NODE" wait --timeout 120 "$dir/pid" >&2 ||
    die "node $NODE did not start; its log: $host/log"
  for ((i = 0; i < 120; i++)); do amqp_answers "$amqp" && break || sleep 0.5; done
  amqp_answers "$amqp" || die "node $NODE does not accept AMQP connections on port $amqp."
  for ((i = 0; i < 120; i++)); do
    curl -fsS -o /dev/null "http://guest:guest@127.0.0.1:$management/api/overview" 2>/dev/null && break || sleep 0.5
  done
  curl -fsS -o /dev/null "http://guest:guest@127.0.0.1:$management/api/overview" ||
    die "the management API of $NODE does not answer on port $management."
  trap - EXIT
  say "node $NODE ($(chroot "$ROOT" "$BIN/rabbitmqctl" -n "$NODE" version)): AMQP on $amqp, management on $management"
  echo "export ORDERFLOW_RABBITMQ4_NODE=$dir"
  echo "export TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$amqp/%2f"
  echo "export TEST_MANAGEMENT_URL=http://guest:guest@127.0.0.1:$management"
}

stop() { # dir
  need_root
  local dir=${1:?usage: scripts/rabbitmq4.sh stop NODE} pid
  case "$dir" in /var/tmp/orderflow-ci-*) ;; *) die "$dir is not a node this script started." ;; esac
  local host=$ROOT$dir
  if [ -f "$host/node.env" ]; then
    (
      node_env "$dir"
      if [ -f "$host/pid" ] && ! chroot "$ROOT" "$BIN/rabbitmqctl" -n "$NODE" stop "$dir/pid" >/dev/null 2>&1; then
        pid=$(cat "$host/pid")
        say "rabbitmqctl stop failed: kill -9 $pid"
        kill -9 "$pid" 2>/dev/null || true
      fi
    )
  fi
  if [ -f "$host/epmd.pid" ]; then
    kill "$(cat "$host/epmd.pid")" 2>/dev/null || true
  fi
  rm -rf --one-file-system "$host"
  release
}

release() {
  need_root
  lock
  if [ -z "$(users)" ]; then
    unmount_all
  else
    say "leaving /proc and /dev mounted: processes still run in the chroot"
  fi
}

case "${1:-}" in
ensure) ensure ;;
mount) need_root && lock && mount_all ;;
start) start ;;
stop) stop "${2:-}" ;;
release) release ;;
*)
  echo "usage: scripts/rabbitmq4.sh ensure | mount | start | stop NODE | release" >&2
  exit 2
  ;;
esac
