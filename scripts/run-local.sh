#!/usr/bin/env bash
# Runs dedupd with ./proxy.toml against local RabbitMQ and Redis: starts them if needed and
# declares the example route's queues (orders.in with a dead-letter queue, orders.out).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo build --release --locked
./target/release/dedupd declare -c proxy.toml
exec ./target/release/dedupd run -c proxy.toml
