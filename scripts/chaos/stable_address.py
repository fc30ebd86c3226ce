#!/usr/bin/env python3
"""Old services know ONE registry URL (issue 15 item 3). Docker mode only
(scripts/chaos.sh --docker); in process mode it prints SKIP.

Brings up the compose cluster under a project of its own (host ports of its
own, so a running `vertice` project is left alone), then stops each node in
turn (`docker stop`, `docker kill` for the second), keeps it down a while and
starts it again, while two clients that each know one URL keep going:

  (a) on the host, a plain client (urllib, no retries) that knows only
      http://127.0.0.1:<port> (the gateway's --registry-listen): registers
      in the old wire format and heartbeats, one request every 0.2 s;
  (b) inside the compose network, the image's own demo-service that knows
      only http://vertice-register-lb:80 (the nodes' network alias), TTL 6 s
      so a heartbeat every 3 s; its instance is watched from the host.

Passes when (a) never goes longer than VR_STABLE_MAX_GAP seconds (default 5)
without a success, (b)'s instance never disappears, never registers anew
(its lease never lapsed) and its last heartbeat is never older than its TTL,
and `cluster status` through both stable names works with each node down.

Environment: REGISTRY_PUBLISH_PORT (the host port of the stable address;
default 8888, a free one if 8888 is taken), VR_STABLE_DOWN_SECS (default 8),
VR_STABLE_MAX_GAP (default 5), REGISTRY_IMAGE."""

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaoslib import DockerCluster, Verdict, free_ports, http, percentile  # noqa: E402

NAME = "stable-address"
if os.environ.get("VR_CHAOS_MODE") != "docker":
    print(f"[{NAME}] SKIP: Docker mode only (scripts/chaos.sh --docker)", flush=True)
    sys.exit(0)

DOWN_SECS = float(os.environ.get("VR_STABLE_DOWN_SECS", "8"))
MAX_GAP = float(os.environ.get("VR_STABLE_MAX_GAP", "5"))
NET_TTL = 6
OLD_WIRE = {"service_name": "stable-host", "endpoint": "http://somehost:9000",
            "health_endpoint": "/health", "metadata": {}}


def port_is_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def header(headers, name):
    return next((v for k, v in headers.items() if k.lower() == name), None)


def epoch(ts):
    """An RFC 3339 time (`...Z`) or epoch seconds, as epoch seconds."""
    if isinstance(ts, (int, float)):
        return float(ts)
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class HostClient(threading.Thread):
    """(a): register, heartbeat, register, ... through the one URL."""

    def __init__(self, url, body):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.ops = []  # (sent at, took, kind, status, answering node)
        self.stop_flag = threading.Event()

    def run(self):
        n = 0
        while not self.stop_flag.is_set():
            kind = "register" if n % 2 == 0 else "heartbeat"
            body = self.body if kind == "register" else {"service_name": self.body["service_name"]}
            t = time.time()
            status, _, headers = http("POST", f"{self.url}/{kind}", body, timeout=10)
            self.ops.append((t, time.time() - t, kind, status, header(headers, "x-gateway-registry-node")))
            n += 1
            self.stop_flag.wait(0.2)

    def stop(self):
        self.stop_flag.set()
        self.join(timeout=15)


class Watcher(threading.Thread):
    """Watches (b)'s instance from the host, every 0.5 s."""

    def __init__(self, url, service):
        super().__init__(daemon=True)
        self.url, self.service = url, service
        self.seen = []  # (at, status, registered_at, last_heartbeat)
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            t = time.time()
            status, body, _ = http("GET", f"{self.url}/services/{self.service}", timeout=5)
            inst = (body.get("instances") or [None])[0] if status == 200 and isinstance(body, dict) else None
            if inst:
                self.seen.append((t, status, inst["registered_at"], epoch(inst["last_heartbeat"])))
            else:
                self.seen.append((t, status, None, None))
            self.stop_flag.wait(0.5)

    def stop(self):
        self.stop_flag.set()
        self.join(timeout=15)


def longest_gap(ops, start, end):
    """Longest time without a successful op in [start, end]."""
    oks = [t + took for t, took, _, s, _ in ops if s is not None and 200 <= s < 300 and start <= t <= end]
    marks = [start] + oks + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


def wait_until(what, cond, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def container_ip(cid):
    out = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid],
                         capture_output=True, text=True).stdout.split()
    return out[0] if out else None


def connected_nodes(c, cname):
    """The nodes the container `cname` holds a connection to on port 80,
    from /proc/<pid>/net/tcp of its network namespace; None if unreadable."""
    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", cname],
                         capture_output=True, text=True).stdout.strip()
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    ips = set()
    for line in lines:
        fields = line.split()
        remote, state = fields[2], fields[3]
        ip_hex, port_hex = remote.split(":")
        if state == "01" and int(port_hex, 16) == 80:
            ips.add(".".join(str(int(ip_hex[k:k + 2], 16)) for k in (6, 4, 2, 0)))
    by_ip = {container_ip(c.container(i)): i for i in c.running()}
    return sorted(by_ip.get(ip, ip) for ip in ips)


def metric_lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def main():
    v = Verdict(NAME)
    wanted = int(os.environ.get("REGISTRY_PUBLISH_PORT", "8888"))
    stable = wanted if port_is_free(wanted) else free_ports(1)[0]
    if stable != wanted:
        v.say(f"host port {wanted} is taken; the stable address is published on {stable} instead")
    p1, p2, p3, gw = free_ports(4)
    project = f"vrstable{os.getpid()}"
    c = DockerCluster(project=project, ports={1: p1, 2: p2, 3: p3, "registry": stable, "gateway": gw})
    lb = c.registry_url()
    v.say(f"project {project}: stable address {lb} on the host, http://vertice-register-lb:80 inside")
    with c:
        wait_until("the stable address answers /health", lambda: http("GET", f"{lb}/health", timeout=2)[0] == 200, 60)

        # The names, from inside the network, before any fault.
        for name in ("http://vertice-register-lb:80", "http://vertice-register:8888"):
            rc, out = c.run_inside("cluster", "status", "--registry", name)
            v.check(rc == 0, f"`cluster status --registry {name}` inside the network (rc {rc})")
            if rc != 0:
                v.say(out[-500:])

        # The wire format: the old one if the nodes take it.
        body = dict(OLD_WIRE)
        status, answer, _ = http("POST", f"{lb}/register", body)
        if status == 400:
            v.say(f"the nodes refuse the old wire format ({answer}); adding host and port")
            body = dict(OLD_WIRE, host="somehost", port=9000)
            status, answer, _ = http("POST", f"{lb}/register", body)
        if status == 400:
            v.say(f"refused again ({answer}); sending host and port without endpoint")
            body = {k: x for k, x in body.items() if k != "endpoint"}
            status, answer, _ = http("POST", f"{lb}/register", body)
        v.check(status == 200, f"(a) registers through {lb} with {sorted(body)} (status {status})")
        v.say(f"(a) wire format: {'old (endpoint only)' if 'port' not in body else 'with host/port'}")

        # Whose address a registration without `host` gets: the original
        # client's once nodes trust X-Registry-Caller, else the gateway's.
        status, _, _ = http("POST", f"{lb}/register", {"service_name": "stable-caller", "port": 9001})
        _, got, _ = http("GET", f"{lb}/services/stable-caller")
        host = got.get("instances", [{}])[0].get("host") if isinstance(got, dict) else None
        gateway_ip = container_ip(c.container_of("gateway"))
        v.say(f"(a) registered without host ({status}): recorded host {host} "
              f"({'the gateway container, not the caller' if host == gateway_ip else 'the caller as the gateway saw it'})")

        c.start_demo("stable-net", NET_TTL, registry="http://vertice-register-lb:80",
                     env=["RUST_LOG=info,vertice_register::client=debug"])
        demo = c.others[-1]
        watcher = Watcher(lb, "stable-net")
        wait_until("(b) the demo service registers through vertice-register-lb:80",
                   lambda: http("GET", f"{lb}/services/stable-net", timeout=2)[0] == 200, 60)
        client = HostClient(lb, body)
        client.start()
        watcher.start()
        time.sleep(3)

        phases = []
        hit = 0
        for i, how in ((1, "stop"), (2, "kill"), (3, "stop")):
            on = connected_nodes(c, demo)
            hit += bool(on and i in on)
            t_down = time.time()
            (c.stop if how == "stop" else c.kill9)(i)
            v.say(f"node {i}: docker {how} ({time.time() - t_down:.1f} s)")
            time.sleep(DOWN_SECS / 2)
            rc_lb, out_lb = c.run_inside("cluster", "status", "--registry", "http://vertice-register-lb:80")
            rc_rv, _ = c.run_inside("cluster", "status", "--registry", "http://vertice-register:8888")
            v.check(rc_lb == 0 and rc_rv == 0,
                    f"node {i} down: `cluster status` through both names (rc {rc_lb}, {rc_rv})")
            if rc_lb != 0:
                v.say(out_lb[-500:])
            time.sleep(max(0.0, t_down + DOWN_SECS - time.time()))
            t_up = time.time()
            c.spawn(i)
            wait_until(f"node {i} to answer /health again",
                       lambda: http("GET", f"{c.url(i)}/health", timeout=2)[0] == 200, 60)
            v.say(f"node {i}: started again, healthy after {time.time() - t_up:.1f} s")
            time.sleep(2)
            v.say(f"(b) the demo's connections through vertice-register-lb:80: to node(s) {on} before node {i} "
                  f"went down, {connected_nodes(c, demo)} now")
            phases.append((i, how, t_down, time.time()))
        time.sleep(2)
        client.stop()
        watcher.stop()

        # (a): the host client.
        ops = client.ops
        ok = [o for o in ops if o[3] is not None and 200 <= o[3] < 300]
        failed = [o for o in ops if o not in ok]
        v.say(f"(a) {len(ops)} requests through {lb}: {len(ok)} ok, {len(failed)} failed "
              f"{sorted(set((o[2], o[3]) for o in failed))}")
        lat = [o[1] * 1000 for o in ok]
        v.say(f"(a) latency ms: p50 {percentile(lat, 0.5):.0f}, p99 {percentile(lat, 0.99):.0f}, "
              f"max {max(lat) if lat else float('nan'):.0f}")
        for i, how, start, end in phases:
            in_phase = [o for o in ops if start <= o[0] <= end]
            nodes = {}
            for o in in_phase:
                if o[4]:
                    key = o[4].replace("http://", "")
                    nodes[key] = nodes.get(key, 0) + 1
            gap = longest_gap(ops, start, end)
            bad = [o for o in in_phase if o not in ok]
            v.check(gap <= MAX_GAP, f"(a) node {i} down (docker {how}): longest time without a success {gap:.1f} s "
                    f"(<= {MAX_GAP:.0f} s); {len(in_phase) - len(bad)}/{len(in_phase)} ok; answered by {nodes}")
        # (b): the in-network client, as the registry saw it.
        seen = watcher.seen
        present = [s for s in seen if s[2] is not None]
        v.check(len(present) == len(seen) and seen,
                f"(b) the demo's instance was there at each of {len(seen)} looks "
                f"({len(seen) - len(present)} misses: {sorted(set(s[1] for s in seen if s[2] is None))})")
        registrations = sorted(set(s[2] for s in present))
        v.check(len(registrations) == 1,
                f"(b) registered once, never again (registered_at values: {registrations})")
        ages = [t - hb for t, _, _, hb in present]
        worst = max(ages) if ages else float("nan")
        v.check(ages and worst <= NET_TTL,
                f"(b) oldest last heartbeat seen: {worst:.1f} s (TTL {NET_TTL} s, heartbeat every {NET_TTL / 2:.0f} s)")
        v.check(hit > 0, f"(b) the demo was connected to the node that went down in {hit} of 3 rounds "
                "(so it had to find another through the name)")
        logs = c.logs(demo)
        retried = logs.count("trying the next node")
        warned = logs.count("heartbeat failed")
        v.say(f"(b) demo-service log: {retried} request attempts retried by its client, {warned} heartbeat warnings")

        status, text, _ = http("GET", f"{c.start_gateway()}/gateway/metrics")
        for line in metric_lines(text if isinstance(text, str) else "", "gateway_registry_proxy_"):
            v.say(f"gateway: {line}")
    v.finish()


if __name__ == "__main__":
    def terminated(*_):
        raise RuntimeError("terminated by SIGTERM")

    # A TERM (CI's timeout) unwinds like an error: the cluster comes down.
    signal.signal(signal.SIGTERM, terminated)
    started = time.time()
    try:
        main()
    except (TimeoutError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"[{NAME}] FAIL: {e} ({time.time() - started:.1f}s)", flush=True)
        sys.exit(1)
