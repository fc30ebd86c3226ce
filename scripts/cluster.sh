#!/usr/bin/env bash
# A three-node cluster (plus the gateway) as local processes on 127.0.0.1:
# the quickest way to try the project. Data, logs and pids live under one
# folder, $VR_HOME (default ./.vr).
#
#   scripts/cluster.sh up | down [--purge] | status | kill-leader | restart ID | logs [ID|gateway]
#
# Nodes listen on 8881-8883 (VR_BASE_PORT=8881), the gateway on 8000
# (VR_GATEWAY_PORT). The cluster secret is in $VR_HOME/secret.
set -euo pipefail
cd "$(dirname "$0")/.."
VR_HOME=${VR_HOME:-.vr}
BASE=${VR_BASE_PORT:-8881}
GW_PORT=${VR_GATEWAY_PORT:-8000}
BIN=target/release/vertice-register
mkdir -p "$VR_HOME"
[ -f "$VR_HOME/secret" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$VR_HOME/secret"
SECRET=$(cat "$VR_HOME/secret")
PEERS="1=127.0.0.1:$BASE,2=127.0.0.1:$((BASE + 1)),3=127.0.0.1:$((BASE + 2))"
REGISTRY="http://127.0.0.1:$BASE,http://127.0.0.1:$((BASE + 1)),http://127.0.0.1:$((BASE + 2))"

port() { echo $((BASE + $1 - 1)); }
alive() { [ -f "$VR_HOME/$1.pid" ] && kill -0 "$(cat "$VR_HOME/$1.pid")" 2>/dev/null; }

start_node() {
  local id=$1
  if alive "node$id"; then echo "node $id already running"; return; fi
  REGISTRY_CLUSTER_SECRET=$SECRET "$BIN" node --id "$id" --addr "127.0.0.1:$(port "$id")" \
    --data-dir "$VR_HOME/node$id" --peers "$PEERS" >>"$VR_HOME/node$id.log" 2>&1 &
  echo $! > "$VR_HOME/node$id.pid"
  echo "node $id: http://127.0.0.1:$(port "$id") (pid $!, log $VR_HOME/node$id.log)"
}

start_gateway() {
  if alive gateway; then echo "gateway already running"; return; fi
  "$BIN" gateway --listen "127.0.0.1:$GW_PORT" --registry "$REGISTRY" >>"$VR_HOME/gateway.log" 2>&1 &
  echo $! > "$VR_HOME/gateway.pid"
  echo "gateway: http://127.0.0.1:$GW_PORT (pid $!, log $VR_HOME/gateway.log)"
}

stop() {
  local name=$1
  if alive "$name"; then
    local pid; pid=$(cat "$VR_HOME/$name.pid")
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "stopped $name"
  fi
  rm -f "$VR_HOME/$name.pid"
}

leader() {
  for id in 1 2 3; do
    l=$(curl -sf "http://127.0.0.1:$(port "$id")/health" 2>/dev/null | sed -n 's/.*"leader_id":\([0-9]*\).*/\1/p')
    if [ -n "$l" ]; then echo "$l"; return 0; fi
  done
  return 1
}

case "${1:-}" in
  up)
    [ -x "$BIN" ] || cargo build --release --bin vertice-register
    for id in 1 2 3; do start_node "$id"; done
    start_gateway
    for _ in $(seq 1 100); do leader >/dev/null && break; sleep 0.1; done
    echo "leader: node $(leader || echo '?')"
    echo "try: curl -s -X POST 127.0.0.1:$BASE/register -H 'Content-Type: application/json' -d '{\"service_name\":\"demo\",\"port\":9000}'"
    ;;
  down)
    for n in gateway node1 node2 node3; do stop "$n"; done
    if [ "${2:-}" = "--purge" ]; then rm -rf "$VR_HOME"; echo "removed $VR_HOME"; fi
    ;;
  status)
    REGISTRY_CLUSTER_SECRET=$SECRET "$BIN" cluster status --registry "$REGISTRY"
    ;;
  kill-leader)
    l=$(leader) || { echo "no leader known" >&2; exit 1; }
    kill -9 "$(cat "$VR_HOME/node$l.pid")"
    rm -f "$VR_HOME/node$l.pid"
    echo "kill -9 of leader node $l"
    ;;
  restart)
    id=${2:?usage: restart ID}
    stop "node$id"
    start_node "$id"
    ;;
  logs)
    name=${2:-}
    case "$name" in
      "") tail -n 20 "$VR_HOME"/*.log ;;
      gateway) tail -n 50 -f "$VR_HOME/gateway.log" ;;
      *) tail -n 50 -f "$VR_HOME/node$name.log" ;;
    esac
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
