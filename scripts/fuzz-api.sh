#!/usr/bin/env bash
# Property-based fuzzing of order-api against its own OpenAPI document:
#   scripts/fuzz-api.sh            (after cargo build --bins)
# Starts target/debug/order-api on a free port with a fresh database
# (orderflow_fuzz_<random> on TEST_DATABASE_URL's server) and a random
# topology prefix, makes a client key with target/debug/api-keys, and runs
# schemathesis (pinned, installed once into a cached venv) against
# /openapi.json. It fails on any server error, any schema-valid request
# refused, any answer whose status, content type, headers or body the
# document does not declare, and any keyed operation that works without a
# key. Then it stops order-api and drops the database.
#
# FUZZ_MAX_EXAMPLES (default 60) bounds the cases per operation and phase;
# FUZZ_SEED picks the run (default: one fixed seed, so a CI run is
# repeatable; FUZZ_SEED=random explores a new one, printed at the start).
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/orderflow/schemathesis-$ST_VERSION
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-60}
SEED=${FUZZ_SEED:-20261123}
[ "$SEED" != random ] || SEED=$((RANDOM * 32768 + RANDOM))
TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
TEST_AMQP_URL=${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
TEST_MANAGEMENT_URL=${TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}

fail() {
  echo "ERROR: $*" >&2
  exit 1
}

for bin in order-api api-keys; do
  [ -x "target/debug/$bin" ] || fail "target/debug/$bin is missing: run cargo build --bins first"
done
command -v psql >/dev/null 2>&1 || fail "psql is needed to create and drop the fuzz database"
command -v curl >/dev/null 2>&1 || fail "curl is needed to wait for order-api"

# The venv is complete once the marker exists: an interrupted install is
# redone rather than half used.
if [ ! -e "$VENV/.installed" ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian splits venv (and ensurepip) out of python3.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
      fail "python3 -m venv does not work here; install python3-venv (Debian: apt-get install python3-venv, as root)"
    fi
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed"
  "$VENV/bin/pip" install -q "schemathesis==$ST_VERSION" || fail "installing schemathesis $ST_VERSION from PyPI failed"
  touch "$VENV/.installed"
fi

WORK=$(mktemp -d)
DB=orderflow_fuzz_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
DATABASE_URL="${TEST_DATABASE_URL%/*}/$DB"
PREFIX=fuzz-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
API_PID=""

# Everything under the prefix, through the management API (queues expire
# on their own anyway: TOPOLOGY_QUEUE_EXPIRES_MS).
delete_topology() {
  local kind name
  for kind in queues exchanges; do
    curl -fsS --max-time 10 "$TEST_MANAGEMENT_URL/api/$kind/%2f" 2>/dev/null |
      python3 -c 'import json, sys; [print(x["name"]) for x in json.load(sys.stdin) if x["name"].startswith(sys.argv[1] + ".")]' "$PREFIX" |
      while read -r name; do
        curl -fsS --max-time 10 -X DELETE "$TEST_MANAGEMENT_URL/api/$kind/%2f/$name" >/dev/null 2>&1 || true
      done
  done
}

cleanup() {
  if [ -n "$API_PID" ]; then
    kill "$API_PID" 2>/dev/null || true
    wait "$API_PID" 2>/dev/null || true
  fi
  psql "$TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  delete_topology || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql "$TEST_DATABASE_URL" -qc "CREATE DATABASE \"$DB\"" >/dev/null

# High rate limits: the fuzzer is one key sending as fast as it can, and a
# 429 would hide what the request itself gets. Short SSE streams: an order
# never reaches a final status here (no processors run), so its event
# stream ends only at SSE_MAX_LIFETIME_SECS. A long header timeout: it also
# closes idle keep-alive connections, and one closed just as the fuzzer
# reuses it would be reported as the server not answering (the timeout has
# its own test).
DATABASE_URL=$DATABASE_URL AMQP_URL=$TEST_AMQP_URL RABBITMQ_MANAGEMENT_URL=$TEST_MANAGEMENT_URL \
  TOPOLOGY_PREFIX=$PREFIX TOPOLOGY_QUEUE_EXPIRES_MS=600000 HTTP_HOST=127.0.0.1 HTTP_PORT=$PORT \
  RATE_LIMIT_PER_SECOND=100000 RATE_LIMIT_BURST=100000 SSE_MAX_LIFETIME_SECS=1 \
  HTTP_HEADER_TIMEOUT_MS=600000 \
  LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info} \
  target/debug/order-api >"$WORK/order-api.log" 2>&1 &
API_PID=$!

BASE=http://127.0.0.1:$PORT
for _ in $(seq 120); do
  curl -fsS --max-time 2 "$BASE/healthz" >/dev/null 2>&1 && break
  kill -0 "$API_PID" 2>/dev/null || { cat "$WORK/order-api.log" >&2; fail "order-api exited"; }
  sleep 0.5
done
curl -fsS --max-time 2 "$BASE/healthz" >/dev/null || { cat "$WORK/order-api.log" >&2; fail "order-api did not answer on $BASE"; }

KEY=$(DATABASE_URL=$DATABASE_URL target/debug/api-keys create --client fuzz --quiet)
FUZZ_KNOWN_SKUS=$(psql "$DATABASE_URL" -Atc "SELECT string_agg(sku, ',') FROM inventory")
export FUZZ_KNOWN_SKUS

# Checks: every one that applies to this API. Left out: negative_data_rejection
# (the server is lenient on purpose where the document gives the canonical
# form: it trims whitespace around ids, emails and SKUs, takes currency in
# lower case and any URL WHATWG parses, so some schema-invalid requests are
# rightly accepted); use_after_free and ensure_resource_availability (there
# is no DELETE); object_level_authorization (needs a second client's key; the
# API tests cover it: security::another_clients_order_...).
# Data-dependent refusals of schema-valid orders (unknown SKU, a SKU twice,
# a reused Idempotency-Key) are told apart, and verified, in
# scripts/fuzz-api-hooks.py.
#
# Every path is fuzzed, the event streams too: with SSE_MAX_LIFETIME_SECS=1
# they end, and their events are checked against the document. GET /events
# is for admin keys and never ends for one, so it is fuzzed with the client
# key and answers 403 (schemathesis warns that it saw only 401/403 there).
# /metrics, /healthz, /readyz and /docs are not in the document.
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance
CHECKS+=,response_headers_conformance,response_schema_conformance,positive_data_acceptance
CHECKS+=,missing_required_header,unsupported_method,ignored_auth,allow_header_conformance

echo "schemathesis $ST_VERSION against $BASE/openapi.json: seed $SEED, up to $MAX_EXAMPLES examples per operation and phase"
status=0
# Run from target/fuzz-api: schemathesis keeps its caches (.hypothesis,
# .schemathesis, what `st replay <id>` reads) in the working directory.
mkdir -p target/fuzz-api
HOOKS=$PWD/scripts/fuzz-api-hooks.py
(cd target/fuzz-api && SCHEMATHESIS_HOOKS=$HOOKS "$VENV/bin/st" run "$BASE/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks "$CHECKS" \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 2 \
  --request-timeout 20 \
  --generation-database none \
  --no-color) || status=$?

if [ "$status" -ne 0 ]; then
  kill -0 "$API_PID" 2>/dev/null || echo "order-api is no longer running" >&2
  cp "$WORK/order-api.log" target/fuzz-api-order-api.log
  echo "--- the end of order-api's log (all of it: target/fuzz-api-order-api.log)" >&2
  tail -n 30 "$WORK/order-api.log" >&2
  fail "schemathesis found problems (exit $status); replay with FUZZ_SEED=$SEED scripts/fuzz-api.sh"
fi
