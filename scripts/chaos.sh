#!/usr/bin/env bash
# Runs every chaos script in process mode (real node processes on loopback)
# and exits non-zero if any fails. Each script prints what it did and
# measured, and PASS or FAIL.
#
#   scripts/chaos.sh            # process mode
#   scripts/chaos.sh --docker   # against the compose cluster (cluster/), local image,
#                               # plus stable_address.py (Docker mode only)
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin vertice-register || exit 1
if [ "${1:-}" = "--docker" ]; then
  export VR_CHAOS_MODE=docker
  bash scripts/docker-image.sh || exit 1
fi
scripts=(scripts/chaos/kill_nodes.py scripts/chaos/kill_leader.py scripts/chaos/pause_leader.py scripts/chaos/partition.py scripts/chaos/ttl_expiry.py)
if [ "${VR_CHAOS_MODE:-}" = docker ]; then
  scripts+=(scripts/chaos/stable_address.py)
fi
failed=()
started=$(date +%s)
for script in "${scripts[@]}"; do
  echo "== $script"
  if ! python3 "$script"; then
    failed+=("$script")
  fi
done
echo "== chaos suite took $(( $(date +%s) - started )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "chaos: ${#failed[@]} failed: ${failed[*]}"
  exit 1
fi
echo "chaos: all passed"
