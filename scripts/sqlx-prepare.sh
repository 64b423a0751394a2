#!/usr/bin/env bash
# The offline data of orderflow's compile-checked SQL (`sqlx::query!` and
# its kin), kept in .sqlx/ so that building orderflow needs no database:
#
#   scripts/sqlx-prepare.sh          write .sqlx/ anew (commit it with the change)
#   scripts/sqlx-prepare.sh --check  fail if .sqlx/ is not what the code and
#                                    the migrations make (CI runs this)
#
# What `cargo sqlx prepare --workspace [--check]` does, without installing
# sqlx-cli. Each database is made fresh from its migrations (orderflow's in
# migrations/, the payment provider's in crates/payment-provider/migrations/)
# on the Postgres at $TEST_DATABASE_URL, and the crates that query it are
# checked with the macros online: a temporary .env beside each such crate
# names its database, and sqlx writes what each statement takes and returns
# into SQLX_OFFLINE_DIR. A statement that does not fit its schema fails
# here, with Postgres's error.
set -euo pipefail
cd "$(dirname "$0")/.."

check=""
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

server=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if ! command -v psql >/dev/null 2>&1; then
  echo "ERROR: psql is needed to make the databases the statements are checked against (apt-get install postgresql-client)." >&2
  exit 1
fi
if ! psql "$server" -qAtc 'SELECT 1' >/dev/null; then
  echo "ERROR: Postgres does not answer at $server (set TEST_DATABASE_URL)." >&2
  exit 1
fi

# The crates whose statements run against the payment provider's database;
# every other crate's run against orderflow's.
provider_crates=(payment-provider)

suffix="sqlx_prepare_$$"
databases=()
envs=()
out=$(mktemp -d)
cleanup() {
  rm -f "${envs[@]}"
  for db in "${databases[@]}"; do
    psql "$server" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$out"
}
trap cleanup EXIT

# A fresh database with `migrations` applied, each file in one transaction
# and in version order, as sqlx::migrate! applies them; prints its URL.
fresh_database() { # name migrations-dir
  local db="orderflow_$1_$suffix" url file
  psql "$server" -qc "CREATE DATABASE \"$db\"" >/dev/null
  databases+=("$db")
  url="${server%/*}/$db"
  for file in "$2"/*.sql; do
    psql "$url" -q -v ON_ERROR_STOP=1 --single-transaction -f "$file" >/dev/null
  done
  echo "$url"
}
orderflow_url=$(fresh_database main migrations)
provider_url=$(fresh_database provider crates/payment-provider/migrations)

# The crates that use the macros, each told its database; their sources are
# touched so that cargo checks them again and the macros run.
macro_crates=$(grep -rlE 'sqlx::query(_as|_scalar)?!' crates --include='*.rs' | cut -d/ -f2 | sort -u)
if [ -z "$macro_crates" ]; then
  echo "no crate uses sqlx's query macros"
  exit 0
fi
for crate in $macro_crates; do
  url=$orderflow_url
  [[ " ${provider_crates[*]} " == *" $crate "* ]] && url=$provider_url
  if [ -e "crates/$crate/.env" ]; then
    echo "ERROR: crates/$crate/.env exists; this script writes its own there. Move it away and run this again." >&2
    exit 1
  fi
  printf 'DATABASE_URL=%s\n' "$url" >"crates/$crate/.env"
  envs+=("crates/$crate/.env")
  find "crates/$crate" -name '*.rs' -not -path '*/node_modules/*' -exec touch {} +
done
echo "checking the statements of: $(echo $macro_crates)"
env -u DATABASE_URL -u SQLX_OFFLINE SQLX_OFFLINE_DIR="$out" \
  cargo check --quiet --workspace --all-targets

if [ -n "$check" ]; then
  if ! diff -r .sqlx "$out" >/dev/null 2>&1; then
    echo "ERROR: .sqlx/ is not what the code and the migrations make:" >&2
    diff -rq .sqlx "$out" | sed "s|$out|(made now)|" >&2 || true
    echo "Run scripts/sqlx-prepare.sh and commit .sqlx/." >&2
    exit 1
  fi
  echo ".sqlx/ is up to date: $(ls .sqlx | wc -l) statements"
else
  rm -rf .sqlx
  mkdir .sqlx
  cp "$out"/*.json .sqlx/
  echo "wrote .sqlx/: $(ls .sqlx | wc -l) statements"
fi
