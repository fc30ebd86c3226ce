#!/usr/bin/env bash
# Quick figures for vertice-register alone: `scripts/bench.sh` without etcd
# and without the fill (three release nodes on loopback; failover over ROUNDS
# leader kills, then register / heartbeat / heartbeat-cold / lookup /
# consistent-lookup with CLIENTS clients for SECONDS each). Prints one table;
# asserts nothing; cleans up after itself.
#
#   scripts/quick-bench.sh [ROUNDS=5] [CLIENTS=32] [SECONDS=5]
set -euo pipefail
exec "$(dirname "$0")/bench.sh" --skip-etcd --fill 0 --rounds "${1:-5}" --clients "${2:-32}" \
  --seconds "${3:-5}" --workloads register,heartbeat,heartbeat-cold,lookup,consistent-lookup
