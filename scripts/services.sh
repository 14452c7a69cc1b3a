#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672, guest/guest) and Redis (127.0.0.1:6379) are installed and
# running, as the tests and the local run expect. Safe to run again: it only starts what is down.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null || ! command -v rabbitmq-server >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server rabbitmq-server
fi

# The TLS tests (tests/tls.rs) make a throwaway PKI with openssl and put socat in front of the
# broker as a TLS terminator.
if ! command -v socat >/dev/null || ! command -v openssl >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat openssl >/dev/null
fi

# The status page tests (tests/status.rs) render the page in headless Chromium.
if ! command -v chromium >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server" >&2
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting rabbitmq-server" >&2
  as_root rabbitmq-server -detached
fi

# Both must answer before anything runs against them.
for _ in $(seq 1 120); do
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
  sleep 0.5
done
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null
