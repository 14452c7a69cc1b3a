#!/usr/bin/env bash
# Runs the whole test suite against local RabbitMQ and Redis (started if needed) and a
# throwaway 3-node Redis Cluster for the store's cluster suite (stopped afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
DEDUPD_TEST_REDIS_CLUSTER=$(./scripts/redis-cluster.sh start)
export DEDUPD_TEST_REDIS_CLUSTER
trap './scripts/redis-cluster.sh stop' EXIT
cargo test --locked "$@"
