#!/bin/bash
# Container health check without curl: GET a path on dedupd's metrics listener through bash's
# /dev/tcp and succeed only on HTTP status 200.
#   dedupd-healthcheck [PATH] [PORT]     PATH default /healthz, PORT default $DEDUPD_METRICS_PORT or 9187
# Exit 0 healthy, 1 otherwise (the status line or the connection error on stderr).
set -u
path=${1:-/healthz}
port=${2:-${DEDUPD_METRICS_PORT:-9187}}
if ! exec 3<>"/dev/tcp/127.0.0.1/$port"; then
  echo "dedupd-healthcheck: nothing listens on 127.0.0.1:$port" >&2
  exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS=' ' read -r -t 3 _ status rest <&3 || true
exec 3<&-
if [ "${status:-}" = 200 ]; then
  exit 0
fi
echo "dedupd-healthcheck: GET $path on port $port answered: ${status:-nothing} ${rest:-}" >&2
exit 1
