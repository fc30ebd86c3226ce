#!/usr/bin/env bash
# The latency the gateway adds: a three-node registry, one demo service and
# the gateway, all release binaries on loopback; then the same GET through
# the gateway (/v2/demo/echo) and straight to the demo service (/echo), with
# CLIENTS concurrent clients for SECONDS each. Prints figures; asserts
# nothing; cleans up after itself.
#
#   scripts/gateway-bench.sh [CLIENTS=32] [SECONDS=5]
set -euo pipefail
CLIENTS=${1:-32}; SECS=${2:-5}
cd "$(dirname "$0")/.."
# The same build as scripts/bench.sh when protoc is there (no rebuild between them).
FEATURES=(); if command -v protoc >/dev/null; then FEATURES=(--features etcd); fi
cargo build --release --quiet --bin vertice-register "${FEATURES[@]}"
BIN=target/release/vertice-register
load() { "$BIN" bench --targets "$1" --workloads get --clients "$2" --seconds "$SECS"; }
WORK=$(mktemp -d)
PEERS="1=127.0.0.1:18901,2=127.0.0.1:18902,3=127.0.0.1:18903"
REGISTRY="http://127.0.0.1:18901,http://127.0.0.1:18902,http://127.0.0.1:18903"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
for id in 1 2 3; do
  RUST_LOG=warn "$BIN" node --id "$id" --addr "127.0.0.1:1890$id" --data-dir "$WORK/n$id" \
    --peers "$PEERS" --cluster-secret bench >>"$WORK/n$id.log" 2>&1 &
  PIDS+=($!); disown "$!"
done
until curl -sf -o /dev/null http://127.0.0.1:18901/health; do sleep 0.05; done
RUST_LOG=warn "$BIN" demo-service --name demo --port 18910 --registry "$REGISTRY" >>"$WORK/demo.log" 2>&1 &
PIDS+=($!); disown "$!"
RUST_LOG=warn "$BIN" gateway --listen 127.0.0.1:18920 --registry "$REGISTRY" >>"$WORK/gateway.log" 2>&1 &
PIDS+=($!); disown "$!"
until curl -sf -o /dev/null http://127.0.0.1:18920/v2/demo/health; do sleep 0.1; done
echo "== GET /echo, $CLIENTS clients, ${SECS}s each"
echo -n "direct   "; load http://127.0.0.1:18910/echo "$CLIENTS"
echo -n "gateway  "; load http://127.0.0.1:18920/v2/demo/echo "$CLIENTS"
echo "== the same with 1 client (latency without queueing)"
echo -n "direct   "; load http://127.0.0.1:18910/echo 1
echo -n "gateway  "; load http://127.0.0.1:18920/v2/demo/echo 1
