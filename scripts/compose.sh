#!/usr/bin/env bash
# A thin wrapper around docker compose for cluster/docker-compose.yml
# (project name ${COMPOSE_PROJECT_NAME:-vertice}), run from anywhere:
#
#   scripts/compose.sh up [ARGS]     # image + cluster/cluster.env if missing, up -d, wait for 3 healthy nodes
#   scripts/compose.sh down [--keep-data]
#                                    # removes what up created: containers, network and the
#                                    # data volumes (--keep-data keeps the volumes); the image
#                                    # and cluster/cluster.env stay for the next up
#   scripts/compose.sh stop | start  # stop the containers, keeping everything; start them again
#   scripts/compose.sh ps | logs [ARGS]
#
# REGISTRY_IMAGE (default vertice-register:local) names the image;
# COMPOSE_WAIT_SECS (default 120) bounds the wait for healthy nodes, 0 skips it;
# COMPOSE_PROJECT_NAME runs a second, separate cluster (move its host ports
# too: see the variables at the top of cluster/docker-compose.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=cluster/docker-compose.yml
PROJECT=${COMPOSE_PROJECT_NAME:-vertice}
IMAGE=${REGISTRY_IMAGE:-vertice-register:local}
WAIT=${COMPOSE_WAIT_SECS:-120}

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
dc() { "${compose[@]}" -f "$FILE" -p "$PROJECT" "$@"; }

ensure_env() {
  local env=cluster/${REGISTRY_ENV_FILE:-cluster.env}
  [ -f "$env" ] && return
  local secret
  secret=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  (umask 077; sed "s/^REGISTRY_CLUSTER_SECRET=.*/REGISTRY_CLUSTER_SECRET=$secret/" \
    cluster/cluster.env.example > "$env")
  echo "created $env with a random cluster secret"
}

health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null || echo missing; }

wait_healthy() {
  [ "$WAIT" -gt 0 ] || return 0
  local deadline=$((SECONDS + WAIT)) line ok id
  while :; do
    ok=0; line=""
    for n in 1 2 3; do
      id=$(dc ps -q "registry-$n" 2>/dev/null || true)
      s=$([ -n "$id" ] && health "$id" || echo missing)
      line+="registry-$n=$s "
      [ "$s" = healthy ] && ok=$((ok + 1))
    done
    if [ "$ok" = 3 ]; then echo "healthy: $line"; return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then echo "not healthy after ${WAIT}s: $line" >&2; return 1; fi
    sleep 1
  done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    # (Re)build the image when it is missing or older than the compiled binary.
    created=$(docker image inspect -f '{{.Created}}' "$IMAGE" 2>/dev/null || true)
    bin=target/release/vertice-register
    if [ -n "$created" ] && [ -f "$bin" ] && [ "$(date -d "$created" +%s)" -ge "$(stat -c %Y "$bin")" ]; then
      echo "image $IMAGE present (newer than $bin)"
    else
      REGISTRY_IMAGE=$IMAGE bash scripts/docker-image.sh
    fi
    ensure_env
    start=$SECONDS
    dc up -d "$@"
    wait_healthy
    echo "up in $((SECONDS - start))s: registry http://127.0.0.1:${REGISTRY_PUBLISH_PORT:-8888} (any live node)," \
      "nodes :${REGISTRY_1_PUBLISH_PORT:-8881} :${REGISTRY_2_PUBLISH_PORT:-8882} :${REGISTRY_3_PUBLISH_PORT:-8883}," \
      "gateway http://127.0.0.1:${GATEWAY_PUBLISH_PORT:-8000}"
    ;;
  down)
    volumes=(-v)
    for a in "$@"; do
      case "$a" in
        --keep-data) volumes=() ;;
        -v|--volumes) ;;  # the default; accepted for earlier callers
        *) echo "down takes only --keep-data (got $a)" >&2; exit 2 ;;
      esac
    done
    dc down --remove-orphans "${volumes[@]}"
    if [ ${#volumes[@]} -eq 0 ]; then
      echo "data volumes kept (scripts/compose.sh up reuses them; down without --keep-data removes them)"
    fi
    echo "kept for the next up: image $IMAGE, cluster/${REGISTRY_ENV_FILE:-cluster.env}"
    ;;
  stop|start|ps|logs)
    dc "$cmd" "$@"
    ;;
  *)
    echo "usage: $0 up|down [--keep-data]|stop|start|ps|logs [ARGS]" >&2
    exit 2
    ;;
esac
