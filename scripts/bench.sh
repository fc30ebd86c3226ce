#!/usr/bin/env bash
# vertice-register against etcd on this machine: a three-node cluster of each
# on loopback, the same workloads driven by `vertice-register bench`, then
# failover (kill -9 of the leader → next successful write), startup with the
# filled data set (process start → first read at the index before the kill),
# memory per node and size on disk with 10,000 and 100,000 instances. Prints
# progress on stderr and ONE markdown table on stdout. Installs what is
# missing (protobuf-compiler for the etcd client, etcd-server, python3) with
# apt-get; kills everything it starts and removes its temp dir on exit.
#
#   scripts/bench.sh [--seconds 10] [--clients 32] [--workloads a,b,..]
#                    [--rounds 10] [--fill 100000] [--skip-etcd] [--keep DIR]
#                    [--node-args "FLAGS"] [--fleet N:PERIOD[:SERVICES]]
#                    [--max-in-flight 2048] [--fleet-ttl SECS]
#                    [--largest START:PERIOD[:MAX[:HALVINGS]]]
#
# --workloads: any of lookup,consistent-lookup,list,heartbeat,heartbeat-cold,
#   mixed,register (default all, in that order), and fleet (not in the
#   default: open loop, N instances over SERVICES services (default 100)
#   each renewed every PERIOD seconds for --seconds, at most --max-in-flight
#   heartbeats outstanding; --fleet default 10000:30; --fleet-ttl: the TTL
#   they register with, default 3 periods: raise it when a system takes
#   longer than that to register the fleet); --largest: find each system's
#   largest fleet at a PERIOD s cadence with p99 < 50 ms, no errors and none
#   missing: fleets of START, 2×START, ... instances (up to MAX, default
#   1280000), each run for --seconds, side by side, until a run fails, then
#   HALVINGS (default 2) bisection steps between the last pass and the first
#   failure, rounded to 10,000 (TTL --fleet-ttl, default 600 s here so slow
#   registrations expire nothing);
#   --rounds: leader kills per
#   system (0 skips failover); --fill: instances for the memory, disk and
#   startup figures (0 skips them; memory is also taken at 10,000 when the
#   fill is larger); --keep DIR: copy the raw JSON reports there;
#   --node-args: extra flags for every vertice-register node (e.g.
#   "--unsafe-no-fsync" to measure what the fsyncs cost).
set -euo pipefail
SECS=10; CLIENTS=32; ROUNDS=10; FILL=100000; SKIP_ETCD=0; KEEP=""; NODE_ARGS=""
FLEET=10000:30; MAX_IN_FLIGHT=2048; FLEET_TTL=""; LARGEST=""
WORKLOADS=lookup,consistent-lookup,list,heartbeat,heartbeat-cold,mixed,register
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECS=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --fill) FILL=$2; shift 2 ;;
    --skip-etcd) SKIP_ETCD=1; shift ;;
    --keep) KEEP=$2; shift 2 ;;
    --node-args) NODE_ARGS=$2; shift 2 ;;
    --fleet) FLEET=$2; shift 2 ;;
    --max-in-flight) MAX_IN_FLIGHT=$2; shift 2 ;;
    --fleet-ttl) FLEET_TTL=$2; shift 2 ;;
    --largest) LARGEST=$2; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
IFS=: read -r FLEET_N FLEET_PERIOD FLEET_SERVICES <<<"$FLEET"
FLEET_SERVICES=${FLEET_SERVICES:-100}
[[ "$FLEET_N" =~ ^[0-9]+$ && "$FLEET_PERIOD" =~ ^[0-9]*\.?[0-9]+$ && "$FLEET_SERVICES" =~ ^[0-9]+$ ]] || {
  echo "--fleet wants N:PERIOD[:SERVICES], e.g. 10000:30 or 10000:0.5:100, not $FLEET" >&2; exit 2; }
cd "$(dirname "$0")/.."
START_TS=$(date +%s)
log() { echo "[bench +$(( $(date +%s) - START_TS ))s] $*" >&2; }

# --- what we need -----------------------------------------------------------
apt_install() {
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  log "installing $* with apt-get"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
command -v python3 >/dev/null || apt_install python3
FEATURES=()
if [ "$SKIP_ETCD" = 0 ]; then
  command -v protoc >/dev/null || apt_install protobuf-compiler
  command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || apt_install etcd-server
  ETCD=$(command -v etcd || echo /usr/bin/etcd)
fi
# With protoc at hand, always the etcd build: switching features rebuilds.
if command -v protoc >/dev/null; then FEATURES=(--features etcd); fi
log "building the release binary ${FEATURES[*]}"
cargo build --release --quiet --bin vertice-register "${FEATURES[@]}"
BIN=$PWD/target/release/vertice-register

WORK=$(mktemp -d)
declare -A PIDS
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    for f in "$WORK"/*.log; do [ -s "$f" ] && { echo "== last lines of $(basename "$f")"; tail -5 "$f"; }; done >&2
  fi
  [ -z "$KEEP" ] || { mkdir -p "$KEEP"; cp "$WORK"/*.json "$WORK"/*.jsonl "$KEEP"/ 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() {  # N loopback ports free now and below the ephemeral range, so
  # that no outgoing connection takes one while its node is down.
  python3 -c 'import random,socket,sys
lo=int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
out=[]
while len(out) < int(sys.argv[1]):
    p=random.randrange(10000, max(10001, lo))
    s=socket.socket()
    try: s.bind(("127.0.0.1",p)); out.append(p) if p not in out else None
    except OSError: pass
    finally: s.close()
print(" ".join(map(str,out)))' "$1"
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
bench() { "$BIN" bench "$@"; }
now_ms() { date +%s%3N; }

# --- the two systems, behind the same functions -------------------------------
# SYS=reg|etcd selects one (use_sys); its node N has the client URL
# URL[$SYS$N], its process PIDS[$SYS$N], its data DATA[$SYS]/$SYS$N.
declare -A URL PEER DATA
use_sys() { SYS=$1; if [ "$1" = reg ]; then BACKEND=registry; else BACKEND=etcd; fi; }
setup() {  # new ports for system $SYS
  local p; read -r -a p <<<"$(free_ports 6)"
  for id in 1 2 3; do
    URL[$SYS$id]="http://127.0.0.1:${p[$((id - 1))]}"
    PEER[$SYS$id]="http://127.0.0.1:${p[$((id + 2))]}"
  done
}
start_node() {
  local id=$1 dir="${DATA[$SYS]}/$SYS$1"
  if [ "$SYS" = reg ]; then
    local peers="1=${URL[reg1]#http://},2=${URL[reg2]#http://},3=${URL[reg3]#http://}"
    RUST_LOG=warn "$BIN" node --id "$id" --addr "${URL[$SYS$id]#http://}" --data-dir "$dir" \
      --peers "$peers" --cluster-secret bench $NODE_ARGS >>"$WORK/$SYS$id.log" 2>&1 &
  else
    "$ETCD" --name "e$id" --data-dir "$dir" --log-level error \
      --listen-client-urls "${URL[$SYS$id]}" --advertise-client-urls "${URL[$SYS$id]}" \
      --listen-peer-urls "${PEER[$SYS$id]}" --initial-advertise-peer-urls "${PEER[$SYS$id]}" \
      --initial-cluster "e1=${PEER[etcd1]},e2=${PEER[etcd2]},e3=${PEER[etcd3]}" \
      --initial-cluster-state new --initial-cluster-token bench >>"$WORK/$SYS$id.log" 2>&1 &
  fi
  PIDS[$SYS$id]=$!
  disown "$!"  # no job-control noise when it is killed
}
all_urls() { echo "${URL[${SYS}1]},${URL[${SYS}2]},${URL[${SYS}3]}"; }
others() { local out=(); for id in 1 2 3; do [ "$id" = "$1" ] || out+=("${URL[$SYS$id]}"); done; (IFS=,; echo "${out[*]}"); }
id_of() { for id in 1 2 3; do if [ "${URL[$SYS$id]}" = "$1" ]; then echo "$id"; fi; done; }
sysbench() { bench --backend "$BACKEND" "$@"; }
start_cluster() {
  log "$SYS: starting three nodes ($1)"
  setup
  DATA[$SYS]=$WORK/data-$SYS-$1; mkdir -p "${DATA[$SYS]}"
  for id in 1 2 3; do start_node "$id"; done
  sysbench --targets "$(all_urls)" leader >/dev/null
  for id in 1 2 3; do sysbench --targets "${URL[$SYS$id]}" ready --with-leader >/dev/null; done
}
gone() {  # waits until every thread of process $1 has exited (up to 30 s): a
  # killed process's leader thread turns zombie while others still exit
  # (and hold its sockets), e.g. from a disk flush.
  local t alive
  for _ in $(seq 1 3000); do
    alive=0
    for t in /proc/"$1"/task/*/stat; do
      [ -e "$t" ] && [ "$(awk '{print $3}' "$t" 2>/dev/null)" != Z ] && alive=1
    done
    [ "$alive" = 1 ] || return 0
    sleep 0.01
  done
}
stop_cluster() {
  for id in 1 2 3; do
    kill -9 "${PIDS[$SYS$id]}" 2>/dev/null || true; gone "${PIDS[$SYS$id]}"; unset "PIDS[$SYS$id]"
  done
}

run_failover() {
  local times=()
  for r in $(seq 1 "$ROUNDS"); do
    local leader id ms
    leader=$(sysbench --targets "$(all_urls)" leader)
    id=$(id_of "$leader")
    ms=$(sysbench --targets "$(others "$id")" failover --kill-pid "${PIDS[$SYS$id]}")
    times+=("$ms")
    log "$SYS: failover round $r: leader $id killed, next write after $ms ms"
    gone "${PIDS[$SYS$id]}"
    start_node "$id"
    sysbench --targets "${URL[$SYS$id]}" ready --with-leader >/dev/null
  done
  printf '%s\n' "${times[@]}" | python3 -c 'import json,sys; print(json.dumps({"failover_ms":[float(x) for x in sys.stdin.read().split()]}))' \
    >"$WORK/$SYS-failover.json"
}

run_workload() {
  local extra=()
  if [ "$1" = fleet ]; then
    log "$SYS: fleet, $FLEET_N instances over $FLEET_SERVICES services every ${FLEET_PERIOD}s, open loop, ${SECS}s"
    extra=(--fleet-instances "$FLEET_N" --fleet-period-secs "$FLEET_PERIOD"
           --fleet-services "$FLEET_SERVICES" --max-in-flight "$MAX_IN_FLIGHT"
           ${FLEET_TTL:+--fleet-ttl-secs "$FLEET_TTL"})
  else
    log "$SYS: $1, $CLIENTS clients, ${SECS}s"
  fi
  sysbench --targets "$(all_urls)" --clients "$CLIENTS" --seconds "$SECS" --workloads "$1" "${extra[@]}" --json \
    >"$WORK/$SYS-w-$1.json"
}

largest_run() {  # N: one fleet run of N instances; true if it met the bar
  local n=$1 out="$WORK/$SYS-largest-$1.json"
  log "$SYS: largest fleet: $n instances every ${L_PERIOD}s, open loop, ${SECS}s"
  sysbench --targets "$(all_urls)" --seconds "$SECS" --workloads fleet \
    --fleet-instances "$n" --fleet-period-secs "$L_PERIOD" --fleet-services 100 \
    --max-in-flight "$MAX_IN_FLIGHT" --fleet-ttl-secs "${FLEET_TTL:-600}" --json >"$out" || true
  python3 - "$out" "$SYS" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["results"][0]
except Exception as e:
    print(f"[bench] {sys.argv[2]}: no report ({e})"); sys.exit(1)
f = r["fleet"]
ok = r["p99_ms"] < 50 and r["errors"] == 0 and (f["missing"] or 0) == 0
print(f"[bench] {sys.argv[2]}: {f['instances']:,} instances: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
      f"{r['errors']} errors, {f['missing']} missing, {f['leader_changes']} leader changes: {'pass' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
}

measure_memory() {  # INSTANCES: RSS and disk per node now
  local rss=() disk=()
  for id in 1 2 3; do
    rss+=("$(rss_kib "${PIDS[$SYS$id]}")")
    disk+=("$(du -sb "${DATA[$SYS]}/$SYS$id" | cut -f1)")
  done
  log "$SYS: $1 instances: RSS ${rss[*]} KiB, disk ${disk[*]} B"
  echo "{\"instances\":$1,\"rss_kib\":[${rss[0]},${rss[1]},${rss[2]}],\"disk_bytes\":[${disk[0]},${disk[1]},${disk[2]}]}" \
    >>"$WORK/$SYS-memory.jsonl"
}

run_fill_and_startup() {
  local first=$FILL
  [ "$FILL" -gt 10000 ] && first=10000
  log "$SYS: filling $first instances"
  sysbench --targets "$(all_urls)" --clients "$CLIENTS" --json fill --count "$first" >"$WORK/$SYS-fill1.json"
  sleep 1  # let the followers apply the last entries before RSS is read
  measure_memory "$first"
  if [ "$FILL" -gt "$first" ]; then
    log "$SYS: filling up to $FILL instances"
    sysbench --targets "$(all_urls)" --clients "$CLIENTS" --json fill \
      --count $((FILL - first)) --offset "$first" >"$WORK/$SYS-fill2.json"
    sleep 1
    measure_memory "$FILL"
  fi
  local times=()
  for r in 1 2 3; do
    local leader lid id idx t0 ms
    leader=$(sysbench --targets "$(all_urls)" leader)
    lid=$(id_of "$leader"); id=$(( lid % 3 + 1 ))  # a follower
    idx=$(sysbench --targets "$(all_urls)" index)
    kill -9 "${PIDS[$SYS$id]}"; gone "${PIDS[$SYS$id]}"
    t0=$(now_ms)
    start_node "$id"
    ms=$(sysbench --targets "${URL[$SYS$id]}" ready --min-index "$idx" --since-unix-ms "$t0")
    times+=("$ms")
    log "$SYS: startup round $r: node $id (kill -9, $FILL instances) served a read at index >= $idx after $ms ms"
    sysbench --targets "${URL[$SYS$id]}" ready --with-leader >/dev/null
  done
  printf '%s\n' "${times[@]}" | python3 -c 'import json,sys; print(json.dumps({"startup_ms":[float(x) for x in sys.stdin.read().split()]}))' \
    >"$WORK/$SYS-startup.json"
}

SYSTEMS=(reg); [ "$SKIP_ETCD" = 1 ] || { SYSTEMS+=(etcd); log "etcd: $("$ETCD" --version | head -1)"; }
# Both clusters run side by side (an idle one costs about 1% of a core per
# node) and each workload runs on one right after the other, so that the
# load other processes put on the machine hits both alike. Failover first:
# leases left by etcd's register workload expire a minute later.
for s in "${SYSTEMS[@]}"; do use_sys "$s"; start_cluster load; done
if [ "$ROUNDS" -gt 0 ]; then
  for s in "${SYSTEMS[@]}"; do use_sys "$s"; run_failover; done
fi
for w in ${WORKLOADS//,/ }; do
  for s in "${SYSTEMS[@]}"; do
    # On etcd heartbeat-cold is the same keepalive as heartbeat.
    [ "$s/$w" = etcd/heartbeat-cold ] && continue
    use_sys "$s"; run_workload "$w"
  done
done
if [ -n "$LARGEST" ]; then
  IFS=: read -r L_START L_PERIOD L_MAX L_HALVINGS <<<"$LARGEST"
  L_MAX=${L_MAX:-1280000}; L_HALVINGS=${L_HALVINGS:-2}
  declare -A L_BEST L_DONE L_FAIL
  n=$L_START
  while [ "$n" -le "$L_MAX" ]; do
    any=0
    for s in "${SYSTEMS[@]}"; do
      [ -n "${L_DONE[$s]:-}" ] && continue
      use_sys "$s"; any=1
      if largest_run "$n"; then L_BEST[$s]=$n; else L_DONE[$s]=1; L_FAIL[$s]=$n; fi
    done
    [ "$any" = 1 ] || break
    n=$((n * 2))
  done
  # Bisection between the last fleet that passed and the first that failed.
  for s in "${SYSTEMS[@]}"; do
    [ -n "${L_FAIL[$s]:-}" ] && [ -n "${L_BEST[$s]:-}" ] || continue
    use_sys "$s"
    for _ in $(seq 1 "$L_HALVINGS"); do
      m=$(( (${L_BEST[$s]} + ${L_FAIL[$s]}) / 20000 * 10000 ))
      [ "$m" -gt "${L_BEST[$s]}" ] && [ "$m" -lt "${L_FAIL[$s]}" ] || break
      if largest_run "$m"; then L_BEST[$s]=$m; else L_FAIL[$s]=$m; fi
    done
  done
  for s in "${SYSTEMS[@]}"; do
    echo "{\"period_secs\":$L_PERIOD,\"largest\":${L_BEST[$s]:-0},\"first_failure\":${L_FAIL[$s]:-null},\"limit_reached\":$([ -z "${L_DONE[$s]:-}" ] && echo true || echo false)}" \
      >"$WORK/$s-largest.json"
  done
fi
for s in "${SYSTEMS[@]}"; do use_sys "$s"; stop_cluster; done
if [ "$FILL" -gt 0 ]; then
  for s in "${SYSTEMS[@]}"; do
    use_sys "$s"; start_cluster fill; run_fill_and_startup; stop_cluster
  done
fi

# --- the table ----------------------------------------------------------------
log "done; the table:"
python3 - "$WORK" "$CLIENTS" "$SECS" "$FILL" "$SKIP_ETCD" <<'EOF'
import json, math, os, sys
work, clients, secs, fill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with_etcd = sys.argv[5] != "1"
def row(*cells):  # label, ours[, etcd, ratio]
    print("| " + " | ".join(cells if with_etcd else cells[:2]) + " |")
def load(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else None
def loadl(name):
    p = os.path.join(work, name)
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def results(sys_):
    out = {}
    for f in sorted(os.listdir(work)):
        if f.startswith(f"{sys_}-w-") and f.endswith(".json"):
            for x in load(f)["results"]:
                out[x["workload"]] = x
    return out
ours, etcd = results("reg"), results("etcd")
def rate(x):
    if not x: return "—"
    s = f"{x['ops_per_sec']:,.0f}/s, p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms"
    return s + (f", **{x['errors']} errors**" if x["errors"] else "")
def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "—"
etcd_name = {"lookup": "serializable get", "consistent-lookup": "linearizable get",
             "register": "lease grant + put", "heartbeat": "lease keepalive",
             "heartbeat-cold": "lease keepalive (same op)", "list": "keys-only prefix get",
             "mixed": "same mix"}
row(f"{clients} clients, {secs} s each", "vertice-register", "etcd", "× (>1: vertice-register better)")
print("|" + "---|" * (4 if with_etcd else 2))
for w in ["register", "heartbeat", "heartbeat-cold", "lookup", "consistent-lookup", "list", "mixed"]:
    if w not in ours and w not in etcd and not (w == "heartbeat-cold" and "heartbeat" in etcd and w in ours):
        continue
    e = etcd.get("heartbeat") if w == "heartbeat-cold" else etcd.get(w)
    o = ours.get(w)
    label = f"{w} (etcd: {etcd_name[w]})" if with_etcd else w
    row(label, rate(o), rate(e), ratio(o and o['ops_per_sec'], e and e['ops_per_sec']))
for x, y in [(ours.get("fleet"), etcd.get("fleet"))]:
    if not (x or y): continue
    f = (x or y)["fleet"]
    def fleet(x):
        if not x: return "—"
        g = x["fleet"]
        na = lambda v: "n/a" if v is None else f"{v:,}"
        s = (f"{g['achieved_per_sec']:,.0f}/s, p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms, "
             f"max {x['max_ms']:.1f} ms, {x['errors']} errors, {na(g['missing'])} missing, "
             f"{na(g['leader_changes'])} leader changes")
        cpu = g.get("cpu_ms_per_heartbeat")
        s += f", node CPU {cpu:.3f} ms/heartbeat" if cpu is not None else ""

        return s + (f", {g['waited_for_slot']:,} waited for a slot" if g["waited_for_slot"] else "")
    label = (f"fleet (open loop): {f['instances']:,} instances / {f['period_secs']:g} s, "
             f"offered {f['offered_per_sec']:,.0f}/s" + (" (etcd: lease keepalive per instance)" if with_etcd else ""))
    row(label, fleet(x), fleet(y), ratio(y and y['p99_ms'], x and x['p99_ms']) + " (p99)")
for name, first in [("fill2", 10000), ("fill1", 0)]:
    fo, fe = load(f"reg-{name}.json"), load(f"etcd-{name}.json")
    if not (fo or fe): continue
    def filled(r):
        if not r: return "—"
        x = r["results"][0]
        lc = x.get("leader_changes")
        return rate(x) + ("" if lc is None else f", {lc} leader changes")
    xo, xe = (r and r["results"][0] for r in (fo, fe))
    row(f"fill: registering instances {first:,} to {fill:,}" + (" (etcd: lease grant + put)" if with_etcd else ""),
        filled(fo), filled(fe), ratio(xo and xo["ops_per_sec"], xe and xe["ops_per_sec"]))
    break
def pct(v, p):
    v = sorted(v)
    return v[max(1, math.ceil(p / 100 * len(v))) - 1] if v else None
def times(sys_, key):
    r = load(f"{sys_}-{key.split('_')[0]}.json")
    return r[key] if r else []
for key, what in [("failover_ms", "failover: kill -9 of the leader → next successful write"),
                  ("startup_ms", f"startup with {fill:,} instances: process start → first read at the pre-kill index")]:
    o, e = times("reg", key), times("etcd", key)
    if not o and not e: continue
    fmt = lambda v: (f"p50 {pct(v,50):,.0f} ms, p99 {pct(v,99):,.0f} ms, max {max(v):,.0f} ms ({len(v)} run{'s' if len(v) != 1 else ''})" if v else "—")
    row(what, fmt(o), fmt(e), ratio(pct(e,99) if e else None, pct(o,99) if o else None) + " (p99)")
lo, le = load("reg-largest.json"), load("etcd-largest.json")
if lo or le:
    def big(x):
        if not x: return "—"
        fail = x.get("first_failure")
        return f"{x['largest']:,} instances" + (" (the search's limit)" if x["limit_reached"] else "") + \
            (f" ({fail:,} failed)" if fail else "")
    p = (lo or le)["period_secs"]
    row(f"largest fleet at a {p:g} s cadence with p99 < 50 ms, no errors, none missing (doubling, then bisection)",
        big(lo), big(le), ratio(lo and lo["largest"], le and le["largest"]))
mo, me = {m["instances"]: m for m in loadl("reg-memory.jsonl")}, {m["instances"]: m for m in loadl("etcd-memory.jsonl")}
for n in sorted(set(mo) | set(me)):
    for key, what, unit in [("rss_kib", "RSS per node", 1024), ("disk_bytes", "size on disk per node", 1024 * 1024)]:
        def cell(m):
            if n not in m: return "—", None
            v = m[n][key]
            avg = sum(v) / len(v) / unit
            return f"{avg:,.1f} MiB (min {min(v)/unit:,.1f}, max {max(v)/unit:,.1f})", avg
        (co, ao), (ce, ae) = cell(mo), cell(me)
        row(f"{what}, {n:,} instances", co, ce, ratio(ae, ao))
EOF
