#!/usr/bin/env bash
# Quick figures for a three-node cluster of the release binary on loopback:
# time from `kill -9` of the leader to the next successful write (ROUNDS
# tries), then register / heartbeat / lookup / consistent-lookup rates with CLIENTS
# concurrent clients. Prints figures; asserts nothing. Cleans up after itself.
#
#   scripts/quick-bench.sh [ROUNDS=5] [CLIENTS=32] [SECONDS=5]
set -euo pipefail
ROUNDS=${1:-5}; CLIENTS=${2:-32}; SECS=${3:-5}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin vertice-register --example loadgen
BIN=target/release/vertice-register
LOADGEN=target/release/examples/loadgen
WORK=$(mktemp -d)
PORTS=(0 18891 18892 18893)
PEERS="1=127.0.0.1:${PORTS[1]},2=127.0.0.1:${PORTS[2]},3=127.0.0.1:${PORTS[3]}"
declare -A PIDS
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

start() {
  local id=$1
  RUST_LOG=warn "$BIN" node --id "$id" --addr "127.0.0.1:${PORTS[$id]}" --data-dir "$WORK/n$id" \
    --peers "$PEERS" --cluster-secret bench >>"$WORK/n$id.log" 2>&1 &
  PIDS[$id]=$!
  disown "$!"  # no job-control noise when we kill it
}
url() { echo "http://127.0.0.1:${PORTS[$1]}"; }
leader() {  # prints the leader id once a node reports one
  for _ in $(seq 1 300); do
    for id in 1 2 3; do
      l=$(curl -sf "$(url "$id")/health" 2>/dev/null | sed -n 's/.*"leader_id":\([0-9]*\).*/\1/p')
      if [ -n "$l" ]; then echo "$l"; return; fi
    done
    sleep 0.05
  done
  echo "no leader" >&2; exit 1
}
now_ms() { date +%s%3N; }

for id in 1 2 3; do start "$id"; done
leader >/dev/null
echo "== failover: kill -9 of the leader → next successful write (through a survivor)"
times=()
for r in $(seq 1 "$ROUNDS"); do
  L=$(leader); S=$(( L % 3 + 1 ))
  kill -9 "${PIDS[$L]}"; t0=$(now_ms)
  until curl -sf -o /dev/null -XPOST "$(url "$S")/register" -H 'content-type: application/json' \
        -d "{\"service_name\":\"failover\",\"port\":$r}"; do sleep 0.005; done
  t=$(( $(now_ms) - t0 )); times+=("$t")
  echo "round $r: leader $L killed, write through node $S after ${t} ms"
  start "$L"
  until curl -sf -o /dev/null "$(url "$L")/health"; do sleep 0.05; done
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
echo "failover ms: min $(echo "$sorted" | head -1), median $(echo "$sorted" | sed -n "$(( (ROUNDS + 1) / 2 ))p"), max $(echo "$sorted" | tail -1)"

URLS="$(url 1),$(url 2),$(url 3)"
echo "== rates ($CLIENTS clients over all three nodes, ${SECS}s each)"
for w in register heartbeat heartbeat-cold lookup consistent-lookup; do "$LOADGEN" "$URLS" "$w" "$CLIENTS" "$SECS"; done
