#!/usr/bin/env bash
# Runs the whole test suite against local RabbitMQ and Redis (started if needed) and a
# throwaway 3-node Redis Cluster for the store's cluster suite (stopped afterwards), then
# prints one total line.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
DEDUPD_TEST_REDIS_CLUSTER=$(./scripts/redis-cluster.sh start)
export DEDUPD_TEST_REDIS_CLUSTER
trap './scripts/redis-cluster.sh stop' EXIT
log=$(mktemp)
status=0
cargo test --locked --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntotal: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
