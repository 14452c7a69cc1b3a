#!/usr/bin/env bash
# Runs the whole test suite against local RabbitMQ and Redis, starting them if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
cargo test --locked "$@"
