#!/usr/bin/env bash
# A guided tour of orderflow's messaging patterns, against a running
# orderflow (scripts/run-local.sh, or docker compose up). Each step says what
# the pattern is, makes it happen, checks that it did, and says where to look.
#
#   scripts/demo.sh
#
# ORDERFLOW_URL (default http://localhost:8080), ORDERFLOW_STATS_URL (order-stats,
# default http://localhost:8084), DEMO_API_KEY (a client key,
# default orderflow-demo-key) and DEMO_ADMIN_KEY (an admin key, default
# orderflow-demo-admin-key; run-local.sh makes both) point it elsewhere.
# Needs curl and python3. Exits 1 if any step did not do what it announced.
#
# It holds on either transport (docs/transports.md): it asks the running
# orderflow which way orders and events travel (WORK_QUEUE, EVENT_BUS: the
# `transports` of a /dashboard/queues sample) and looks at RabbitMQ's queues
# or at Postgres's jobs table and event log accordingly. Step 7 rebuilds
# order-stats' read model from the start of the log with a second
# order-stats (`--from first`) it runs itself: ORDER_STATS_BIN (default
# target/debug/order-stats) with DATABASE_URL and AMQP_URL as the services
# have them (run-local.sh's defaults unless exported).
set -euo pipefail

URL=${ORDERFLOW_URL:-http://localhost:8080}
KEY=${DEMO_API_KEY:-orderflow-demo-key}
ADMIN=${DEMO_ADMIN_KEY:-orderflow-demo-admin-key}
STATS=${ORDERFLOW_STATS_URL:-http://localhost:8084}
WAIT=${DEMO_WAIT_SECS:-180}
ORDER_STATS_BIN=${ORDER_STATS_BIN:-$(dirname "$0")/../target/debug/order-stats}
FAILED=()

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "ERROR: demo.sh needs $tool" >&2; exit 2; }
done

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
ok() { printf '  \033[32m✔ %s\033[0m\n' "$*"; }
bad() { printf '  \033[31m✘ %s\033[0m\n' "$*"; FAILED+=("$1"); }
look() { printf '  look at: %s\n' "$*"; }

# json EXPR: evaluate a Python expression over the JSON on stdin (as `j`);
# prints nothing when the answer is not what EXPR expects (an error, say),
# so the step that asked reports it instead of ending the tour.
json() {
  python3 -c "
import json, sys
try:
    j = json.load(sys.stdin)
    print($1)
except Exception:
    print('')"
}

call() { # method path [body] [extra curl args...] -> body on stdout
  local method=$1 path=$2 body=${3:-}
  shift 3 || shift $#
  curl -sS -X "$method" "$URL$path" -H "authorization: Bearer $KEY" \
    ${body:+-H 'content-type: application/json' --data "$body"} "$@" || true
}

admin() { # method path [body]
  curl -sS -X "$1" "$URL$2" -H "authorization: Bearer $ADMIN" \
    ${3:+-H 'content-type: application/json' --data "$3"} || true
}

order() { # customer [express] -> order id
  local express=${2:-false}
  call POST /orders "{\"customer_id\":\"$1\",\"email\":\"ada@example.com\",\"items\":[{\"sku\":\"WIDGET\",\"quantity\":1}],\"express\":$express}" |
    json 'j["id"]'
}

standings() { # ids... -> JSON list of where each stands
  local ids
  ids=$(IFS=,; echo "$*")
  admin GET "/dashboard/orders?ids=$ids"
}

# wait_until SECONDS COMMAND...: run COMMAND every second until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

all_done() { # ids...: every one decided, notified and audited
  [ "$(standings "$@" | json "sum(1 for o in j if o['status'] in ('processed', 'rejected') and o['notified'] and o['audited'])")" = "$#" ]
}

sample() { # one sample of /dashboard/queues, as JSON
  # The stream never ends by itself: curl stops at its time limit, or when
  # python has read one sample and gone.
  { curl -sSN --max-time 3 "$URL/dashboard/queues" -H "authorization: Bearer $ADMIN" 2>/dev/null || true; } |
    python3 -c '
import sys
for line in sys.stdin:
    if line.startswith("data:") and "queues" in line:
        print(line[5:].strip())
        break'
}

depths() { sample | json '"\n".join(q["name"] + " " + str(q["messages"]) for q in j["queues"])'; }

depth_of() { depths | awk -v q="$1" '$1 ~ q"$" {n += $2} END {print n + 0}'; }
# Dead letters (orders.dead, jobs.dead) wait for a person, not a consumer:
# not part of the backlog.
total_depth() { depths | awk '$1 !~ /\.dead$/ {n += $2} END {print n + 0}'; }

bold "orderflow tour against $URL"
curl -fsS "$URL/readyz" >/dev/null || { echo "ERROR: no ready orderflow at $URL (start scripts/run-local.sh first)" >&2; exit 2; }
[ "$(call GET /orders/00000000-0000-0000-0000-000000000000 "" -o /dev/null -w '%{http_code}')" = 404 ] ||
  { echo "ERROR: DEMO_API_KEY is not a live key of this orderflow" >&2; exit 2; }
case "$(curl -sS -o /dev/null -w '%{http_code}' "$URL/dashboard/dead-letters" -H "authorization: Bearer $ADMIN")" in
  200) ;;
  *) echo "ERROR: DEMO_ADMIN_KEY is not an admin key of this orderflow (api-keys create --client ops --scope admin)" >&2; exit 2 ;;
esac

# The one place that decides the mode: the running orderflow says which way
# orders (WORK_QUEUE) and events (EVENT_BUS) travel, so the tour cannot
# disagree with it; one too old to say runs on RabbitMQ.
read -r QUEUE BUS <<<"$(sample | json 'j.get("transports", {}).get("work_queue", "rabbitmq") + " " + j.get("transports", {}).get("event_bus", "rabbitmq")')"
QUEUE=${QUEUE:-rabbitmq} BUS=${BUS:-rabbitmq}
differs() { # name exported running
  [ -z "$2" ] || [ "$2" = "$3" ] ||
    echo "  note: $1=$2 is exported here, but the running orderflow uses $3: touring that" >&2
}
differs WORK_QUEUE "${WORK_QUEUE:-}" "$QUEUE"
differs EVENT_BUS "${EVENT_BUS:-}" "$BUS"
# by_queue RABBITMQ POSTGRES, by_bus RABBITMQ POSTGRES: the words (or
# names) that fit the work queue's, or the event bus's, transport.
by_queue() { if [ "$QUEUE" = postgres ]; then echo "$2"; else echo "$1"; fi; }
by_bus() { if [ "$BUS" = postgres ]; then echo "$2"; else echo "$1"; fi; }
STANDARD=$(by_queue orders.standard jobs.standard)
echo "Orders travel via $QUEUE (WORK_QUEUE), events via $BUS (EVENT_BUS)."
echo "Open $URL/ in a browser (admin key: the one in DEMO_ADMIN_KEY) to watch it live."
stats() { curl -fsS --max-time 5 "$STATS/stats?minutes=1440" 2>/dev/null; }
counted() { # decisions in order-stats' read model over the last day
  local body
  body=$(stats) || return 1
  json 'sum(r["orders"] + r["rejected"] for r in j["revenue"])' <<<"$body"
}
read_model() { # the read model over the last day, in a form to compare
  local body
  body=$(stats) || return 1
  json 'json.dumps([j["skus"], j["revenue"]], sort_keys=True)' <<<"$body"
}
counted_before=$(counted || true)
decided=0

# 1. Work queue, competing consumers ------------------------------------------
bold "1. Work queue with competing consumers"
echo "  $(by_queue "One queue, several processors: each order goes to exactly one of them, whichever is free." \
  "One jobs table, several processors claiming rows with SKIP LOCKED: each order goes to exactly one of them.")"
ids=()
for i in $(seq 1 30); do ids+=("$(order "tour-$((i % 5))")"); done
echo "  placed ${#ids[@]} orders"
if wait_until "$WAIT" all_done "${ids[@]}"; then
  shares=$(standings "${ids[@]}" | json "', '.join(f'{p}: {n}' for p, n in sorted(__import__('collections').Counter(o['processed_by'] for o in j).items()))")
  count=$(standings "${ids[@]}" | json "len({o['processed_by'] for o in j})")
  echo "  decided by: $shares"
  decided=$((decided + ${#ids[@]}))
  if [ "${count:-0}" -ge 2 ]; then ok "$count processors shared the 30 orders, each order decided once"
  else bad "work queue: only one processor took the orders (is only one running?)"; fi
else
  bad "work queue: the 30 orders were not all decided, notified and audited within ${WAIT}s"
fi
look "processor=processor-N in order-processor's log lines; the page's 'Throughput and competing consumers'"

# 2. Fan-out ------------------------------------------------------------------
bold "2. Publish/subscribe fan-out"
echo "  $(by_bus "One event on a fanout exchange, one queue per subscriber: each service gets its own copy." \
  "One event appended to the events table, read by each subscriber from its own position.")"
id=$(order c-fanout)
if wait_until "$WAIT" all_done "$id"; then
  decided=$((decided + 1))
  ok "order ${id:0:8}: one event, and both the notification-service (email) and the logging-service (audit row) handled it"
else
  bad "fan-out: order $id was not both notified and audited within ${WAIT}s"
fi
look "'email sent' (notification-service) and 'audit record written' (logging-service), both with order_id=$id"

# 3. Idempotency --------------------------------------------------------------
bold "3. An idempotent retry"
echo "  The client retries with the same Idempotency-Key: the first answer comes back, no second order."
key="tour-$(date +%s%N)"
body='{"customer_id":"c-twice","email":"ada@example.com","items":[{"sku":"WIDGET","quantity":1}]}'
first=$(call POST /orders "$body" -H "Idempotency-Key: $key" | json 'j["id"]')
second_headers=$(mktemp)
second=$(call POST /orders "$body" -H "Idempotency-Key: $key" -D "$second_headers" | json 'j["id"]')
if [ "$first" = "$second" ] && grep -qi '^idempotent-replayed: true' "$second_headers"; then
  ok "both answers name order ${first:0:8}; the second carries Idempotent-Replayed: true"
else
  bad "idempotency: first $first, second $second ($(tr -d '\r' <"$second_headers" | head -1))"
fi
rm -f "$second_headers"
look "order-api's 'replaying the stored response for a repeated idempotency key'"

# 4. Retry, dead letter, replay -----------------------------------------------
bold "4. Retries, then a dead letter, then a replay"
echo "  A transient failure is retried after a growing delay ($(by_queue "a retry queue per delay" "the job falls due again"));"
echo "  one that never succeeds is dead-lettered with its reason ($(by_queue "the dead-letter queue" "a job in state dead"))"
echo "  and a person can replay it."
flaky=$(order flaky-2)
processed() { [ "$(standings "$1" | json "j[0]['status']")" = processed ]; }
if wait_until "$WAIT" processed "$flaky"; then
  decided=$((decided + 1))
  ok "order ${flaky:0:8} (customer flaky-2) failed its payment twice, was retried, and is processed"
else
  bad "retry: order $flaky (flaky-2) was not processed within ${WAIT}s"
fi
look "'processing failed; retrying in 1s', then '2s', then 'order processed' for order_id=$flaky"
doomed=$(order doomed)
dead() { admin GET /dashboard/dead-letters | json "next((l['message_id'] for l in j if l['order_id'] == '$doomed'), '')" | grep .; }
if wait_until "$WAIT" dead >/dev/null && message=$(dead); then
  reason=$(admin GET /dashboard/dead-letters | json "next(l['reason'] for l in j if l['order_id'] == '$doomed')")
  ok "order ${doomed:0:8} (customer doomed) was dead-lettered: $reason"
  replayed=$(admin POST /dashboard/dead-letters/replay "{\"message_id\":\"$message\"}" | json 'len(j.get("replayed", []))')
  if [ "$replayed" = 1 ] && [ -z "$(dead || true)" ]; then
    ok "replayed onto its queue: it left the dead letters (it will fail again and come back: it is doomed)"
  else
    bad "replay: the dead letter of $doomed was not replayed"
  fi
else
  bad "dead letter: order $doomed (doomed) was not dead-lettered within ${WAIT}s"
fi
look "'message dead-lettered' with the reason; the page's 'Dead letters' table and its Replay button; $(by_queue "dead-letters list" "WORK_QUEUE=postgres dead-letters list")"

# 5. Express lane -------------------------------------------------------------
bold "5. An express order overtakes a backlog"
echo "  $(by_queue "Express orders have a queue of their own, consumed beside the standard one: a backlog there" \
  "Express jobs are claimed before standard ones: a backlog of standard jobs")"
echo "  does not delay them."
accepted=$(admin POST /dashboard/burst '{"count":500}' | json 'j["accepted"]')
accepted=${accepted:-0}
express=$(order c-express true)
echo "  placed $accepted standard orders, then express order ${express:0:8}"
if wait_until "$WAIT" processed "$express"; then
  waiting=$(depth_of "$STANDARD")
  if [ "$waiting" -gt 0 ]; then
    ok "the express order was processed while $waiting standard orders were still waiting in $STANDARD"
  else
    bad "express: processed, but the standard backlog had drained first (try PAYMENT_LATENCY_MS=500)"
  fi
else
  bad "express: order $express was not processed within ${WAIT}s"
fi
look "lane=express in order-api's 'order accepted' line; the $(by_queue orders.express jobs.express) line of the page's chart"
standard_drained() { [ "$(depth_of "$STANDARD")" = 0 ]; }
wait_until "$WAIT" standard_drained && decided=$((decided + accepted + 1))

# 6. Load levelling -----------------------------------------------------------
bold "6. A burst, levelled by the queue"
echo "  1,000 orders arrive at once; the $(by_queue queue "jobs table") takes them all at once and the processors work them"
echo "  off at their own pace: nothing is refused, nothing overloads the database."
started=$SECONDS
accepted=$(admin POST /dashboard/burst '{"count":1000}' | json 'j["accepted"]')
accepted=${accepted:-0}
echo "  $accepted orders accepted in $((SECONDS - started))s"
peak=0
depth=0
trace=""
deadline=$((SECONDS + WAIT))
while [ $SECONDS -lt $deadline ]; do
  depth=$(total_depth)
  [ "$depth" -gt "$peak" ] && peak=$depth
  trace="$trace $depth"
  [ "$depth" = 0 ] && [ "$peak" -gt 0 ] && break
  # A sample takes about a second (the stream's next event ends it).
  sleep 0.2
done
echo "  $(by_queue "ready messages" "jobs waiting or running"), once a second:$trace"
if [ "$peak" -gt 0 ] && [ "$depth" = 0 ]; then
  decided=$((decided + accepted))
  ok "the queues rose to $peak and drained back to 0 in $((SECONDS - started))s"
else
  bad "load levelling: the depth peaked at $peak and was $depth after ${WAIT}s"
fi
look "the page's queue-depth chart: $STANDARD rises at once, then falls at the processors' rate"

# 7. The event log -------------------------------------------------------------
bold "7. An event log that can be replayed"
echo "  $(by_bus "The events also go to a stream, a log that keeps them after they are read" \
  "The events table is a log that keeps the events after they are read"): order-stats reads"
echo "  it from its own stored position into per-minute counts, and a new reader can start at the beginning."
counted_all() { local n; n=$(counted) && [ "$n" -ge $((counted_before + decided)) ]; }
if [ -z "$counted_before" ]; then
  bad "event log: no order-stats at $STATS (run-local.sh and compose start it on :8084)"
elif wait_until "$WAIT" counted_all; then
  ok "order-stats counted the tour's $decided decisions from the log ($(counted) in its read model for the last day)"
else
  bad "event log: order-stats had counted $(counted || echo "?") decisions (from $counted_before) and not the tour's $decided within ${WAIT}s"
fi
# The rebuild: a second order-stats, --from first, empties the read model
# (shared with the running one: same database) and reads the log from its
# first event (the stream's first entry; in Postgres, its reader rewound):
# the read model must come back as it was. Nothing else may be deciding
# orders meanwhile (the tour's own are all decided by now): on RabbitMQ, an
# event the running order-stats counts moves the shared offset past history
# the rebuild has not read yet.
rebuilt=$(mktemp)
rebuild_started() { grep -q 'read model emptied' "$rebuilt"; }
rebuild_done() { [ "$(read_model)" = "$model" ]; }
settled() { local was; was=$(read_model) && sleep 2 && [ "$(read_model)" = "$was" ]; }
if [ -z "$counted_before" ]; then
  :
elif [ ! -x "$ORDER_STATS_BIN" ]; then
  echo "  not rebuilt: no order-stats at $ORDER_STATS_BIN (set ORDER_STATS_BIN, or restart order-stats with STATS_FROM=first)"
else
  wait_until 30 settled || true
  model=$(read_model)
  WORK_QUEUE=$QUEUE EVENT_BUS=$BUS STATS_FROM=first HTTP_PORT=0 \
    DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow} \
    AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f} "$ORDER_STATS_BIN" >"$rebuilt" 2>&1 &
  rebuilder=$!
  started=$SECONDS
  if wait_until 60 rebuild_started && wait_until "$WAIT" rebuild_done; then
    ok "rebuilt from the start of the log: 'order-stats --from first' emptied the read model and counted it back to the same $(counted) decisions in $((SECONDS - started))s"
  else
    bad "rebuild: order-stats --from first did not bring the read model back within ${WAIT}s (same DATABASE_URL as the services'?): $(tail -3 "$rebuilt" | tr '\n' ' ')"
  fi
  kill -TERM "$rebuilder" 2>/dev/null || true
  wait "$rebuilder" 2>/dev/null || true
fi
rm -f "$rebuilt"
look "$STATS/stats?minutes=10 (orders, units and revenue per SKU and minute); $(by_bus "the order-events.log stream" "the events and event_readers tables")"

bold "Done"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf '  did not happen: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "  every step did what it announced"
