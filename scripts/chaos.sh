#!/usr/bin/env bash
# The chaos suite alone: every fault case, each on its own private RabbitMQ
# node and Postgres cluster (temp dirs, free ports; the shared servers on
# 5672/5432 are never touched). Needs root (Postgres runs as the postgres
# user via runuser) and Debian's rabbitmq-server and postgresql packages.
# Each case prints the broker version, what it injected and the invariant
# counts it checked.
#
#   scripts/chaos.sh [--broker 3|4] [nextest arguments]
#
# --broker 3 (the default) runs the nodes on the host's RabbitMQ 3.10;
# --broker 4 on RabbitMQ 4.x in the chroot of scripts/rabbitmq4.sh (built
# on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
broker=3
if [ "${1:-}" = --broker ]; then
  broker=${2:?--broker takes 3 or 4}
  shift 2
fi
case "$broker" in
3) unset ORDERFLOW_TEST_BROKER ;;
4)
  scripts/rabbitmq4.sh ensure
  trap 'scripts/rabbitmq4.sh release' EXIT
  export ORDERFLOW_TEST_BROKER=4
  ;;
*)
  echo "--broker $broker: expected 3 or 4" >&2
  exit 2
  ;;
esac
cargo build --workspace --bins
cargo nextest run -p e2e --no-capture 'chaos::' "$@"
