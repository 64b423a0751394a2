#!/usr/bin/env bash
# Check that RabbitMQ and Postgres answer; start them if they are installed
# here but not running. Fails loudly, saying what is missing and how to fix it.
set -euo pipefail

AMQP_HOST=${AMQP_HOST:-127.0.0.1}
AMQP_PORT=${AMQP_PORT:-5672}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
MANAGEMENT_URL=${TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}

# On a fresh Debian/Ubuntu machine (as root, with INSTALL_MISSING=1, as
# scripts/test.sh sets it), install what is missing from Debian's packages.
install_missing() { # package
  [ "${INSTALL_MISSING:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  echo "installing $1 from Debian's packages..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

# A Postgres installed by us trusts local TCP connections, as the tests and
# the default DATABASE_URL expect (no password).
trust_local_postgres() {
  local hba
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -1)
  [ -n "$hba" ] || return 0
  sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # name host port seconds
  local i
  for ((i = 0; i < $4; i++)); do
    port_open "$2" "$3" && return 0
    sleep 1
  done
  return 1
}

if ! port_open "$PG_HOST" "$PG_PORT"; then
  if ! [ -d /etc/postgresql ] && install_missing postgresql; then
    trust_local_postgres
    # The package may have started the cluster already (systemd): make it
    # read the new pg_hba.conf.
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -n | tail -1)" main reload 2>/dev/null || true
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "Postgres is not answering on $PG_HOST:$PG_PORT; starting the local cluster..."
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -n | tail -1)" main start || true
  fi
  if ! wait_port postgres "$PG_HOST" "$PG_PORT" 30; then
    echo "ERROR: PostgreSQL is not reachable on $PG_HOST:$PG_PORT." >&2
    echo "       Install it (apt-get install postgresql) and allow trust auth for 127.0.0.1," >&2
    echo "       or point DATABASE_URL at a server you have." >&2
    exit 1
  fi
fi

# With the work queue and the event bus both in Postgres, nothing needs
# RabbitMQ (POSTGRES_ALONE=1, as scripts/run-local.sh sets it then).
if [ "${POSTGRES_ALONE:-0}" = 1 ]; then
  echo "Postgres ($PG_HOST:$PG_PORT) is reachable; RabbitMQ is not needed (work queue and events in Postgres)."
  exit 0
fi

if ! port_open "$AMQP_HOST" "$AMQP_PORT"; then
  command -v rabbitmq-server >/dev/null 2>&1 || install_missing rabbitmq-server || true
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is not answering on $AMQP_HOST:$AMQP_PORT; starting it..."
    rabbitmq-server -detached || true
  fi
  if ! wait_port rabbitmq "$AMQP_HOST" "$AMQP_PORT" 60; then
    echo "ERROR: RabbitMQ is not reachable on $AMQP_HOST:$AMQP_PORT." >&2
    echo "       Install it (apt-get install rabbitmq-server) or point AMQP_URL at a broker you have." >&2
    exit 1
  fi
fi
# The services apply their queue policies through the management API, so the
# broker must have the management plugin.
command -v curl >/dev/null 2>&1 || install_missing curl || {
  echo "ERROR: curl is missing (apt-get install curl); it checks RabbitMQ's management API." >&2
  exit 1
}
management_answers() { curl -fsS -o /dev/null --max-time 5 "$MANAGEMENT_URL/api/overview" 2>/dev/null; }
if ! management_answers; then
  if command -v rabbitmq-plugins >/dev/null 2>&1; then
    echo "RabbitMQ's management API does not answer at ${MANAGEMENT_URL#*@}; enabling the management plugin..."
    rabbitmq-plugins enable rabbitmq_management >/dev/null || true
  fi
  for ((i = 0; i < 60; i++)); do
    management_answers && break
    sleep 1
  done
  if ! management_answers; then
    echo "ERROR: RabbitMQ's management API does not answer at ${MANAGEMENT_URL#*@} (guest/guest)." >&2
    echo "       Enable the plugin (rabbitmq-plugins enable rabbitmq_management)," >&2
    echo "       or point TEST_MANAGEMENT_URL at the management API of your broker." >&2
    exit 1
  fi
fi
echo "RabbitMQ ($AMQP_HOST:$AMQP_PORT, management at ${MANAGEMENT_URL#*@}) and Postgres ($PG_HOST:$PG_PORT) are reachable."
