#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672, guest/guest), Redis (127.0.0.1:6379) and PostgreSQL
# (127.0.0.1:5432, user postgres) are installed and running, as the tests and the local run expect. Safe to run again: it only starts what is down.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# What the proxy and the tests need, installed from Debian's packages in one go when missing:
# the broker and Redis; openssl and socat for the TLS tests (a throwaway PKI, a TLS terminator in
# front of the broker); prometheus (with promtool) for the deploy tests, without recommends (no
# node exporter); chromium for the status page tests.
missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
command -v socat >/dev/null || missing+=(socat)
command -v chromium >/dev/null || missing+=(chromium)
lean=()
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || lean+=(prometheus)
if [ "${#missing[@]}" -gt 0 ] || [ "${#lean[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} ${lean[*]}" >&2
  as_root apt-get update -qq
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ "${#lean[@]}" -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${lean[@]}" >/dev/null
  fi
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server" >&2
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting rabbitmq-server" >&2
  as_root rabbitmq-server -detached
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  # The first cluster Debian's tools know of (15/main on Debian 12).
  read -r pg_version pg_cluster _ < <(pg_lsclusters -h | head -n 1)
  echo "starting postgresql $pg_version/$pg_cluster" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_cluster" start
fi

# All must answer before anything runs against them.
for _ in $(seq 1 120); do
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
  sleep 0.5
done
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null
for _ in $(seq 1 120); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p 5432
