#!/usr/bin/env bash
# The chaos suite alone: seven fault cases, each on its own private RabbitMQ
# node and Postgres cluster (temp dirs, free ports; the shared servers on
# 5672/5432 are never touched). Needs root (Postgres runs as the postgres
# user via runuser) and Debian's rabbitmq-server and postgresql packages.
# Each case prints what it injected and the invariant counts it checked.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo nextest run -p e2e --no-capture 'chaos::' "$@"
