#!/usr/bin/env bash
# Start RabbitMQ, then give each ProxyMQ role its own broker user (docs/operating.md#broker-users)
# and remove guest. Used by compose.yml and by the Helm chart's bundled broker; run as the
# container's command (the image's entrypoint stays), as the rabbitmq user.
#
# Passwords come from the environment: RABBITMQ_<ROLE>_PASSWORD for ROLE in GATEWAY,
# WORKERS, MONITORING, OBSERVER; a role whose password is empty is skipped. They are handed
# to rabbitmqctl on standard input, never on a command line. Safe on every start: existing
# users get the current password, tags and permissions. The vhost is PROXYMQ_BROKER_VHOST
# (default "/"). Until everything is set, /tmp/proxymq-users-ready is absent: the health
# check waits for it.
set -euo pipefail

ready=/tmp/proxymq-users-ready
vhost=${PROXYMQ_BROKER_VHOST:-/}
rm -f "$ready"

rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit $?' TERM INT

until rabbitmqctl -q await_startup >/dev/null 2>&1; do
  kill -0 "$server" 2>/dev/null || { wait "$server"; exit $?; }
  sleep 1
done

# role password tags configure write read
user() {
  local name=$1 password=$2 tags=$3
  if [ -z "$password" ]; then
    echo "proxymq: no password for broker user $name, not created"
    return
  fi
  if rabbitmqctl -q list_users --no-table-headers | cut -f1 | grep -qxF "$name"; then
    printf '%s' "$password" | rabbitmqctl -q change_password "$name" >/dev/null
  else
    printf '%s' "$password" | rabbitmqctl -q add_user "$name" >/dev/null
  fi
  # shellcheck disable=SC2086  # tags: none or several words
  rabbitmqctl -q set_user_tags "$name" $tags >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" "$name" "$4" "$5" "$6" >/dev/null
  echo "proxymq: broker user $name ready (tags: ${tags:-none})"
}

setup() {
  rabbitmqctl -q add_vhost "$vhost" >/dev/null 2>&1 || true
  # gateway: its own server-named exclusive queues (replies; services' states, bound to the
  # proxymq.status exchange, which it may declare), publishing to the default exchange.
  user gateway "${RABBITMQ_GATEWAY_PASSWORD:-}" "" \
    '^(amq\.gen-.*|proxymq\.status)$' \
    '^(amq\.default|amq\.gen-.*)$' \
    '^(amq\.gen-.*|proxymq\.status)$'
  # workers: service queues and their .dead queues, replies and dead letters through the
  # default exchange, Celery's exchanges and queues for remote control (pidbox), task events
  # (celeryev) and gossip/mingle; and each connection's own proxymq.cancel.<hex> queue,
  # where gateways send the cancel of a streamed answer; and the proxymq.status exchange,
  # where they announce each service's state.
  user workers "${RABBITMQ_WORKERS_PASSWORD:-}" "" \
    '^(.*_requests|.*_requests\.dead|.*_callbacks|.*_callbacks\.retry\.[0-9]+|proxymq\.cancel\..*|proxymq\.status|celery|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$' \
    '^(amq\.default|.*_requests|proxymq\.status|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$' \
    '^(.*_requests|.*_callbacks|.*_callbacks\.retry\.[0-9]+|proxymq\.cancel\..*|celery|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$'
  # monitoring: read-only. Management API (Flower's broker tab, the UI) and passive queue
  # declares (KEDA, queue depths); no AMQP resource at all.
  user monitoring "${RABBITMQ_MONITORING_PASSWORD:-}" "monitoring" \
    '^$' \
    '^$' \
    '^$'
  # observer: Flower and celery-exporter over AMQP. Consumes task events from its own
  # celeryev.<id> queue and asks workers over Celery's pidbox (inspect), with replies on
  # <id>.reply.celery.pidbox. Writing to celery.pidbox also lets it send any remote-control
  # command (shutdown, revoke, cancel_consumer): Celery has no finer grain.
  user observer "${RABBITMQ_OBSERVER_PASSWORD:-}" "" \
    '^(celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.reply\.celery\.pidbox)$' \
    '^(celery\.pidbox|celeryev\..*|.*\.reply\.celery\.pidbox)$' \
    '^(celeryev|celeryev\..*|reply\.celery\.pidbox|.*\.reply\.celery\.pidbox)$'
  if rabbitmqctl -q list_users --no-table-headers | cut -f1 | grep -qxF guest; then
    rabbitmqctl -q delete_user guest >/dev/null
    echo "proxymq: deleted the guest user"
  fi
}

if ! setup; then
  echo "proxymq: setting up the broker users failed; stopping" >&2
  kill -TERM "$server"
  wait "$server" || true
  exit 1
fi
touch "$ready"
wait "$server"
