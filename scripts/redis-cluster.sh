#!/usr/bin/env bash
# Starts (start) or stops (stop) a throwaway 3-node Redis Cluster on 127.0.0.1:30001-30003 for
# the store tests' cluster suite. Nothing is kept on disk beyond /tmp/dedupd-test-cluster.
set -euo pipefail
ports=(30001 30002 30003)
dir=/tmp/dedupd-test-cluster

case "${1:-start}" in
start)
  mkdir -p "$dir"
  for p in "${ports[@]}"; do
    if ! redis-cli -p "$p" ping >/dev/null 2>&1; then
      rm -f "$dir/nodes-$p.conf"
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file "$dir/nodes-$p.conf" --save "" --appendonly no \
        --daemonize yes --dir "$dir" --logfile "$dir/$p.log"
    fi
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  if ! redis-cli -p 30001 cluster info | grep -q "cluster_state:ok"; then
    redis-cli --cluster create 127.0.0.1:30001 127.0.0.1:30002 127.0.0.1:30003 \
      --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 1 100); do
      redis-cli -p 30001 cluster info | grep -q "cluster_state:ok" && break
      sleep 0.1
    done
  fi
  redis-cli -p 30001 cluster info | grep -q "cluster_state:ok"
  echo "redis://127.0.0.1:30001,redis://127.0.0.1:30002,redis://127.0.0.1:30003"
  ;;
stop)
  for p in "${ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$dir"
  ;;
esac
