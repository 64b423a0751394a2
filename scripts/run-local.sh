#!/usr/bin/env bash
# Run every orderflow service as a local process (three order-processors)
# against the RabbitMQ and Postgres on this host. Ctrl-C stops them all.
#
#   scripts/run-local.sh            # debug build
#   PROFILE=release scripts/run-local.sh
#
# Defaults: RabbitMQ amqp://guest:guest@127.0.0.1:5672, Postgres
# postgres://postgres@127.0.0.1:5432/orderflow (created if missing);
# override with AMQP_URL / DATABASE_URL. order-api listens on :8080. The
# stand-in payment provider listens on :8085 with its books in
# PROVIDER_DATABASE_URL (default: database payment_provider, created).
#
# With Postgres alone (the jobs table as the work queue, the event log as
# the event bus; RabbitMQ is then neither needed nor touched):
#
#   WORK_QUEUE=postgres EVENT_BUS=postgres scripts/run-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-dev}
PROCESSORS=${PROCESSORS:-3}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow}
PROVIDER_DATABASE_URL=${PROVIDER_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/payment_provider}
# The provider's latency and demo failures: customer "flaky-2" fails
# payment twice, then succeeds; "doomed" always fails.
export PAYMENT_LATENCY_MS=${PAYMENT_LATENCY_MS:-200}
export DEMO_FAILURES=${DEMO_FAILURES:-true}
export PAYMENT_PROVIDER_URL=${PAYMENT_PROVIDER_URL:-http://127.0.0.1:8085}
# Four attempts (three retries, 1 s, 2 s, 4 s): "doomed" reaches the
# dead-letter queue in seconds, not the minute and a half of the default.
export RETRY_MAX_ATTEMPTS=${RETRY_MAX_ATTEMPTS:-4}

export WORK_QUEUE=${WORK_QUEUE:-rabbitmq}
export EVENT_BUS=${EVENT_BUS:-rabbitmq}
if [ "$WORK_QUEUE" = postgres ] && [ "$EVENT_BUS" = postgres ]; then
  POSTGRES_ALONE=1 scripts/wait-for-services.sh
else
  scripts/wait-for-services.sh
fi

echo "building the services ($PROFILE profile)..."
cargo build --profile "$PROFILE" --bins -q
target_dir=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

pids=()
stopping=
stop() {
  trap - INT TERM EXIT
  stopping=1
  echo
  echo "stopping ${#pids[@]} services..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  echo "all stopped"
}
trap stop INT TERM EXIT

start() { "$target_dir/$1" & pids+=($!); }

# order-api first: it applies the migrations the others would otherwise race for.
HTTP_PORT=8080 start order-api
DATABASE_URL=$PROVIDER_DATABASE_URL HTTP_PORT=8085 start payment-provider
for i in $(seq 1 "$PROCESSORS"); do
  HTTP_PORT=$((8090 + i)) INSTANCE_ID=processor-$i start order-processor
done
HTTP_PORT=8082 start notification-service
HTTP_PORT=8083 start logging-service
HTTP_PORT=8084 start order-stats

for _ in $(seq 1 60); do
  curl -fsS localhost:8080/readyz >/dev/null 2>&1 && break
  sleep 1
done
# The demo client's key (set DEMO_API_KEY to choose it); made once, kept.
API_KEY=${DEMO_API_KEY:-orderflow-demo-key} "$target_dir/api-keys" create --client demo
# An admin key for the live page and the tour (DEMO_ADMIN_KEY to choose it).
API_KEY=${DEMO_ADMIN_KEY:-orderflow-demo-admin-key} "$target_dir/api-keys" create --client ops --scope admin
cat <<MSG

orderflow is running. Watch it at http://localhost:8080/ (admin key:
${DEMO_ADMIN_KEY:-orderflow-demo-admin-key}); take the tour with scripts/demo.sh; the event
log's read model is at http://localhost:8084/stats. Place an order:
  curl -s localhost:8080/orders -H 'authorization: Bearer ${DEMO_API_KEY:-orderflow-demo-key}' \\
    -H 'content-type: application/json' \\
    -d '{"customer_id":"c-42","email":"ada@example.com","items":[{"sku":"WIDGET","quantity":2}]}'
Ctrl-C stops every service.

MSG
wait -n "${pids[@]}" || true
[ -n "$stopping" ] || echo "a service exited; stopping the rest"
