"""Shared helpers for the chaos scripts: a cluster of real node processes on
loopback ports in a temp dir, fault injection by signal, and HTTP with the
standard library only. Every script starts its own cluster, prints what it
did and measured, ends with PASS or FAIL, and kills everything it started."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("VR_BIN", os.path.join(ROOT, "target", "release", "vertice-register"))
SECRET = "chaos-secret"


def ensure_binary():
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "vertice-register"], cwd=ROOT, check=True)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http(method, url, body=None, timeout=5.0, headers=None):
    """Returns (status, parsed JSON or text, headers); status None on a
    connection failure or timeout."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, _parse(raw), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, _parse(e.read()), dict(e.headers)
    except (urllib.error.URLError, OSError) as e:
        return None, str(e), {}


def _parse(raw):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class Cluster:
    def __init__(self, n=3, extra_args=(), own_addresses=False):
        """own_addresses: every node listens on, and connects from, its own
        loopback address (127.0.0.11, .12, ...), so that firewall rules can
        cut nodes apart on one machine."""
        ensure_binary()
        self.dir = tempfile.mkdtemp(prefix="vr-chaos-")
        self.ids = list(range(1, n + 1))
        self.ports = dict(zip(self.ids, free_ports(n)))
        self.hosts = {i: (f"127.0.0.{10 + i}" if own_addresses else "127.0.0.1") for i in self.ids}
        self.own_addresses = own_addresses
        self.extra = list(extra_args)
        self.procs = {}
        self.others = []
        self.peers = ",".join(f"{i}={self.hosts[i]}:{p}" for i, p in self.ports.items())
        self.leader_wait = 5.0
        for k, a in enumerate(self.extra):
            if a == "--leader-wait-ms":
                self.leader_wait = int(self.extra[k + 1]) / 1000
        self.chain = f"VR_CHAOS_{os.getpid()}"
        self.cut_active = False

    def __enter__(self):
        for i in self.ids:
            self.spawn(i)
        return self

    def __exit__(self, *exc):
        self.close()

    def url(self, i):
        return f"http://{self.hosts[i]}:{self.ports[i]}"

    def urls(self):
        return ",".join(self.url(i) for i in self.ids)

    def spawn(self, i):
        log = open(os.path.join(self.dir, f"node{i}.log"), "ab")
        args = [BIN, "node", "--id", str(i), "--addr", f"{self.hosts[i]}:{self.ports[i]}",
                "--data-dir", os.path.join(self.dir, f"n{i}"), "--peers", self.peers,
                "--cluster-secret", SECRET] + self.extra
        if self.own_addresses:
            args += ["--source-addr", self.hosts[i]]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)

    def start_other(self, args, name):
        """Starts another process (gateway, demo service); killed on close."""
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        p = subprocess.Popen([BIN] + args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        self.others.append(p)
        return p

    def running(self):
        return [i for i, p in self.procs.items() if p is not None and p.poll() is None]

    def registry_urls_inside(self):
        """Registry URLs as a process started by start_other sees them."""
        return self.urls()

    def cut(self, node, others):
        """Cuts `node` off from `others` (iptables on loopback; needs
        own_addresses=True, root and iptables)."""
        def ipt(*args):
            subprocess.run(["iptables", "-w", *args], check=True, capture_output=True, text=True)
        ipt("-N", self.chain)
        self.cut_active = True
        ipt("-I", "INPUT", "-i", "lo", "-j", self.chain)
        for o in others:
            a, b = self.hosts[node], self.hosts[o]
            ipt("-A", self.chain, "-s", a, "-d", b, "-j", "DROP")
            ipt("-A", self.chain, "-s", b, "-d", a, "-j", "DROP")

    def heal(self):
        if not self.cut_active:
            return
        for args in (["-D", "INPUT", "-i", "lo", "-j", self.chain], ["-F", self.chain], ["-X", self.chain]):
            subprocess.run(["iptables", "-w", *args], capture_output=True)
        self.cut_active = False

    def start_gateway(self):
        port = free_ports(1)[0]
        self.start_other(["gateway", "--listen", f"127.0.0.1:{port}", "--registry", self.urls()], "gateway")
        return f"http://127.0.0.1:{port}"

    def start_demo(self, name, ttl):
        """Starts a demo service; returns a function that kills it (-9)."""
        port = free_ports(1)[0]
        p = self.start_other(["demo-service", "--name", name, "--port", str(port), "--registry", self.urls(),
                              "--ttl-seconds", str(ttl)], f"demo-{name}")

        def kill():
            p.kill()
            p.wait()
        return kill

    def kill9(self, i):
        p = self.procs.get(i)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        self.procs[i] = None

    def pause(self, i):
        os.kill(self.procs[i].pid, signal.SIGSTOP)

    def resume(self, i):
        os.kill(self.procs[i].pid, signal.SIGCONT)

    def health(self, i, timeout=1.0):
        status, body, _ = http("GET", self.url(i) + "/health", timeout=timeout)
        return body if isinstance(body, dict) else None

    def leader(self, among=None, timeout=30.0):
        """The leader id once every node in `among` (default: running) names
        the same one, and it is among them."""
        among = among or self.running()
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen = [self.health(i) for i in among]
            ids = {h.get("leader_id") for h in seen if h}
            if len(ids) == 1 and all(seen):
                (l,) = ids
                if l in among:
                    return l
            time.sleep(0.05)
        raise TimeoutError(f"no agreed leader among {among} within {timeout}s")

    def register(self, i, name, port=80, ttl=None, timeout=5.0):
        body = {"service_name": name, "port": port, "host": "10.0.0.1"}
        if ttl:
            body["ttl_seconds"] = ttl
        return http("POST", self.url(i) + "/register", body, timeout=timeout)

    def services(self, i, consistent=False, timeout=10.0):
        q = "?consistent=true" if consistent else ""
        return http("GET", self.url(i) + "/services" + q, timeout=timeout)

    def close(self):
        self.heal()
        for p in self.others:
            if p.poll() is None:
                p.kill()
                p.wait()
        for i in list(self.procs):
            p = self.procs[i]
            if p is not None and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except OSError:
                    pass
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class DockerCluster:
    """The same interface as Cluster, over the compose project of
    cluster/docker-compose.yml (scripts/compose.sh): nodes are the
    registry-N containers, published on 127.0.0.1:8881-8883; faults are
    `docker kill`, `docker pause` and `docker network disconnect`. Each use
    starts from empty volumes and removes everything afterwards.

    `project` (default $COMPOSE_PROJECT_NAME or `vertice`) and `ports`
    ({1: .., 2: .., 3: .., "registry": .., "gateway": ..}, default the
    compose file's) run a separate cluster beside another one."""

    STABLE_ALIASES = ("vertice-register-lb", "vertice-register")

    def __init__(self, n=3, extra_args=(), own_addresses=False, project=None, ports=None):
        self.ids = [1, 2, 3]
        self.hosts = {i: "127.0.0.1" for i in self.ids}
        ports = ports or {}
        env_port = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        self.ports = {i: ports.get(i, env_port(f"REGISTRY_{i}_PUBLISH_PORT", 8880 + i)) for i in self.ids}
        self.registry_port = ports.get("registry", env_port("REGISTRY_PUBLISH_PORT", 8888))
        self.gateway_port = ports.get("gateway", env_port("GATEWAY_PUBLISH_PORT", 8000))
        self.project = project or os.environ.get("COMPOSE_PROJECT_NAME", "vertice")
        self.network = f"{self.project}_default"
        self.image = os.environ.get("REGISTRY_IMAGE", "vertice-register:local")
        self.env = dict(os.environ, COMPOSE_PROJECT_NAME=self.project,
                        REGISTRY_PUBLISH_PORT=str(self.registry_port), GATEWAY_PUBLISH_PORT=str(self.gateway_port),
                        **{f"REGISTRY_{i}_PUBLISH_PORT": str(p) for i, p in self.ports.items()})
        self.leader_wait = 5.0
        self.down = set()
        self.cut_off = []
        self.others = []

    def compose(self, *args, check=True):
        return subprocess.run(["bash", os.path.join(ROOT, "scripts", "compose.sh"), *args],
                              check=check, capture_output=True, text=True, env=self.env)

    def env_file(self):
        """The cluster.env the compose project reads (the cluster secret)."""
        return os.path.join(ROOT, "cluster", os.environ.get("REGISTRY_ENV_FILE", "cluster.env"))

    def container(self, i):
        return self.container_of(f"registry-{i}")

    def container_of(self, service):
        out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                              "--filter", f"label=com.docker.compose.service={service}"],
                             capture_output=True, text=True).stdout.split()
        return out[0] if out else None

    def __enter__(self):
        self.compose("down", "-v", check=False)
        try:
            r = self.compose("up")
        except subprocess.CalledProcessError as e:
            self.close()
            raise RuntimeError(f"compose up failed:\n{e.stdout}\n{e.stderr}") from e
        print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "compose up", flush=True)
        return self

    def __exit__(self, *exc):
        self.close()

    def url(self, i):
        return f"http://127.0.0.1:{self.ports[i]}"

    def urls(self):
        return ",".join(self.url(i) for i in self.ids)

    def registry_url(self):
        """The stable address on the host: the gateway's registry listener."""
        return f"http://127.0.0.1:{self.registry_port}"

    def registry_urls_inside(self):
        return ",".join(f"http://registry-{i}:8888" for i in self.ids)

    def docker(self, *args, timeout=120):
        return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=timeout)

    def run_inside(self, *args, timeout=60):
        """Runs the image once on the compose network, with the cluster's
        env file: (exit code, stdout + stderr)."""
        r = subprocess.run(["docker", "run", "--rm", "--network", self.network, "--env-file", self.env_file(),
                            self.image, *args], capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()

    def spawn(self, i):
        self.docker("start", self.container(i))
        self.docker("update", "--restart", "unless-stopped", self.container(i))
        self.down.discard(i)

    def kill9(self, i):
        # No restart by the daemon: this is a crash the script controls.
        self.docker("update", "--restart", "no", self.container(i))
        self.docker("kill", "-s", "KILL", self.container(i))
        self.down.add(i)

    def stop(self, i):
        """`docker stop`: SIGTERM, a graceful stop (the daemon does not
        restart a container stopped so)."""
        self.docker("stop", "-t", "10", self.container(i))
        self.down.add(i)

    def pause(self, i):
        self.docker("pause", self.container(i))

    def resume(self, i):
        self.docker("unpause", self.container(i))

    def running(self):
        return [i for i in self.ids if i not in self.down]

    def cut(self, node, others):
        """Disconnects the node's container from the compose network: cut
        off from every other node (and from the host's published port)."""
        self.docker("network", "disconnect", self.network, self.container(node))
        self.cut_off.append(node)

    def heal(self):
        for node in self.cut_off:
            aliases = [a for name in (f"registry-{node}",) + self.STABLE_ALIASES for a in ("--alias", name)]
            subprocess.run(["docker", "network", "connect", *aliases, self.network, self.container(node)],
                           capture_output=True)
        self.cut_off = []

    def start_gateway(self):
        return f"http://127.0.0.1:{self.gateway_port}"

    def start_demo(self, name, ttl, registry=None, env=()):
        """A demo service container on the compose network; `registry`:
        the URLs it knows (default every node by name)."""
        cname = f"vertice-chaos-{name}-{os.getpid()}"
        extra = [a for kv in env for a in ("-e", kv)]
        self.docker("run", "-d", "--name", cname, "--network", self.network, *extra, self.image, "demo-service",
                    "--name", name, "--port", "9000", "--host", "0.0.0.0",
                    "--registry", registry or self.registry_urls_inside(), "--ttl-seconds", str(ttl))
        self.others.append(cname)

        def kill():
            subprocess.run(["docker", "kill", "-s", "KILL", cname], capture_output=True)
        return kill

    def logs(self, cname):
        r = subprocess.run(["docker", "logs", cname], capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    health = Cluster.health
    leader = Cluster.leader
    register = Cluster.register
    services = Cluster.services

    def close(self):
        self.heal()
        for i in self.ids:
            subprocess.run(["docker", "unpause", self.container(i) or "none"], capture_output=True)
        for cname in self.others:
            # -v: the image's /data volume too, else one is left per container.
            subprocess.run(["docker", "rm", "-f", "-v", cname], capture_output=True)
        self.compose("down", "-v", check=False)


if os.environ.get("VR_CHAOS_MODE") == "docker":
    Cluster = DockerCluster  # noqa: F811 -- every script then runs against Docker


class Writer(threading.Thread):
    """A steady write load: registers svc-N through every running node in
    turn, remembering what was acknowledged and when."""

    def __init__(self, cluster, prefix="w", pause=0.01):
        super().__init__(daemon=True)
        self.c, self.prefix, self.pause = cluster, prefix, pause
        self.acked = []  # (acknowledged at, name)
        self.started_acked = []  # (sent at, acknowledged at)
        self.errors = {}
        self.stop_flag = threading.Event()

    def run(self):
        n = 0
        while not self.stop_flag.is_set():
            running = self.c.running()
            if not running:
                time.sleep(0.05)
                continue
            node = running[n % len(running)]
            name = f"{self.prefix}-{n}"
            sent = time.time()
            status, body, _ = self.c.register(node, name, timeout=6.0)
            if status == 200:
                self.acked.append((time.time(), name))
                self.started_acked.append((sent, time.time()))
                n += 1
            else:
                key = str(status)
                self.errors[key] = self.errors.get(key, 0) + 1
                n += 1
            time.sleep(self.pause)

    def first_ack_after(self, t, timeout=30.0):
        """When the first write sent after `t` was acknowledged (a write in
        flight at `t` does not count)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            after = [a for s, a in self.started_acked if s >= t]
            if after:
                return min(after)
            time.sleep(0.005)
        return None

    def stop(self):
        self.stop_flag.set()
        self.join(timeout=10)


class Verdict:
    def __init__(self, name):
        self.name = name
        self.failures = []
        self.started = time.time()

    def say(self, msg):
        print(f"[{self.name}] {msg}", flush=True)

    def check(self, cond, msg):
        if cond:
            self.say(f"ok: {msg}")
        else:
            self.say(f"FAILED: {msg}")
            self.failures.append(msg)
        return cond

    def finish(self):
        took = time.time() - self.started
        if self.failures:
            print(f"[{self.name}] FAIL ({len(self.failures)} failed checks, {took:.1f}s)", flush=True)
            sys.exit(1)
        print(f"[{self.name}] PASS ({took:.1f}s)", flush=True)
        sys.exit(0)


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def all_present(c, names, nodes=None, timeout=30.0):
    """Checks, with a consistent read on each node, that every name is there.
    Returns {node: [missing names]}."""
    missing = {}
    for i in nodes or c.running():
        deadline = time.time() + timeout
        while True:
            status, body, _ = c.services(i, consistent=True)
            if status == 200:
                have = set(body)
                missing[i] = [n for n in names if n not in have]
                break
            if time.time() > deadline:
                missing[i] = list(names)
                break
            time.sleep(0.1)
    return missing


def wait_steps_down(c, old, timeout=15.0):
    """True once node `old` reports itself a follower of another node."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = c.health(old)
        if h and h.get("role") == "follower" and h.get("leader_id") not in (None, old):
            return True
        time.sleep(0.05)
    return False


def stop_and_check_nothing_lost(v, c, w):
    """Stops the writer and checks, with a consistent read on every node,
    that every acknowledged write is there. Returns the acknowledged names."""
    time.sleep(0.5)
    w.stop()
    names = [n for _, n in w.acked]
    v.say(f"{len(names)} writes acknowledged, {sum(w.errors.values())} refused or timed out ({w.errors})")
    for node, gone in all_present(c, names).items():
        v.check(not gone, f"node {node} has all {len(names)} acknowledged writes (missing {gone[:5]})")
    return names
