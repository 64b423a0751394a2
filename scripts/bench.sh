#!/usr/bin/env bash
# Measure orderflow on this machine, beside the raw bounds of its broker and
# database, in one run:
#
#   scripts/bench.sh           # the full run (~25 minutes): writes bench/RESULTS.md,
#                              # bench/results.json, bench/burst.csv and bench/burst.png
#   scripts/bench.sh --quick   # every part briefly (about 3 minutes), into
#                              # target/bench-quick/: proves the tool works
#
# The end-to-end, processor-count, low-load and burst stages run on both
# transports (WORK_QUEUE and EVENT_BUS both rabbitmq, then both postgres),
# set side by side in RESULTS.md.
#
# A full run sets the run it replaces (bench/results.json) beside itself in
# RESULTS.md's before/after table; more with --before LABEL=PATH (an earlier
# results.json, e.g. from `git show REV:bench/results.json`).
#
# Needs RabbitMQ and Postgres on 127.0.0.1 (override with AMQP_URL and
# BENCH_POSTGRES_URL, a Postgres URL without a database name); each part
# runs on its own database and topology and drops them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=
before=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --before) [ $# -ge 2 ] || { echo "--before needs LABEL=PATH" >&2; exit 64; }
      before+=(--before "$2"); shift 2 ;;
    *) echo "usage: scripts/bench.sh [--quick] [--before LABEL=PATH]..." >&2; exit 64 ;;
  esac
done

scripts/wait-for-services.sh

if [ -n "$quick" ]; then
  out=${BENCH_OUT:-target/bench-quick}
  # The quick run only proves the tool works: the debug build the tests use will do.
  profile=${PROFILE:-dev}
  command_line="scripts/bench.sh --quick"
else
  out=${BENCH_OUT:-bench}
  profile=${PROFILE:-release}
  command_line="scripts/bench.sh"
fi
target_dir=target/$([ "$profile" = dev ] && echo debug || echo "$profile")

echo "building the services and the benchmark ($profile profile)..."
cargo build --profile "$profile" --bins -q

tools=target/tools-venv
if [ ! -x "$tools/bin/python" ] || ! "$tools/bin/python" -c 'import matplotlib' 2>/dev/null; then
  echo "installing matplotlib into $tools (draws burst.png)..."
  if ! python3 -m venv "$tools" 2>/dev/null; then
    [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$tools"
  fi
  "$tools/bin/pip" install -q matplotlib
fi

args=(--out "$out" --command-line "$command_line")
[ -n "$quick" ] && args+=(--quick)
if [ -z "$quick" ] && [ -f "$out/results.json" ]; then
  args+=(--before "the previous run=$out/results.json")
fi
args+=("${before[@]}")
"$target_dir/orderflow-bench" "${args[@]}"
"$tools/bin/python" crates/bench/plot_burst.py "$out/burst.csv" "$out/burst.png"
echo "results: $out/RESULTS.md"
