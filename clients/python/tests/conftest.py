"""Fixtures: real vertice-register nodes (the release binary, from VR_BIN) on
free loopback ports in a temp dir. Every wait polls with a deadline; every
process started here is killed at the end, also when a test fails."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
BIN = os.path.abspath(os.environ.get("VR_BIN") or os.path.join(REPO, "target", "release", "vertice-register"))
SECRET = "pyclient-test-secret"
TOKEN = "pyclient-test-token-0123456789"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http(method, url, body=None, timeout=3.0, token=TOKEN):
    """(status, parsed JSON or text); status None when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Registry-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (urllib.error.URLError, OSError):
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(what, check, timeout=15.0, interval=0.05):
    """Polls check() until it returns something truthy; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Nodes:
    """n registry nodes forming one cluster (n=1: a one-node cluster)."""

    def __init__(self, n, tokens_file=None, ports=None):
        if not os.path.exists(BIN):
            pytest.fail(f"no vertice-register binary at {BIN}: build it (cargo build --release) or set VR_BIN")
        self.dir = tempfile.mkdtemp(prefix="vr-pyclient-")
        self.ids = list(range(1, n + 1))
        self.ports = dict(zip(self.ids, ports or free_ports(n)))
        self.peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in self.ports.items())
        self.tokens_file = tokens_file
        self.procs = {}

    def url(self, i):
        return f"http://127.0.0.1:{self.ports[i]}"

    @property
    def urls(self):
        return [self.url(i) for i in self.ids]

    def start(self, i):
        args = [BIN, "node", "--id", str(i), "--addr", f"127.0.0.1:{self.ports[i]}",
                "--data-dir", os.path.join(self.dir, f"n{i}")]
        if len(self.ids) > 1:
            args += ["--peers", self.peers, "--cluster-secret", SECRET]
        if self.tokens_file:
            args += ["--tokens", self.tokens_file]
        log = open(os.path.join(self.dir, f"node{i}.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.procs[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        log.close()

    def start_all(self):
        for i in self.ids:
            self.start(i)
        return self.wait_for_leader()

    def kill(self, i):
        p = self.procs.pop(i, None)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def running(self):
        return [i for i, p in self.procs.items() if p.poll() is None]

    def health(self, i):
        status, body = http("GET", self.url(i) + "/health", timeout=1.0, token=None)
        return body if isinstance(body, dict) else None

    def leader(self):
        """The leader's id if every running node names the same running one."""
        running = self.running()
        seen = [self.health(i) for i in running]
        if not running or not all(seen):
            return None
        ids = {h.get("leader_id") for h in seen}
        if len(ids) == 1 and all(h.get("status") == "healthy" for h in seen):
            (leader,) = ids
            return leader if leader in running else None
        return None

    def wait_for_leader(self, timeout=20.0):
        return wait_for("an agreed leader", self.leader, timeout=timeout)

    def close(self):
        for i in list(self.procs):
            self.kill(i)
        if os.environ.get("VR_KEEP_LOGS"):
            print(f"node logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def _tokens_file(directory):
    path = os.path.join(directory, "tokens.json")
    with open(path, "w") as f:
        json.dump({"tokens": [{"id": "pyclient-tests", "token": TOKEN, "role": "admin"}]}, f)
    return path


@pytest.fixture(scope="session")
def cluster():
    """Three nodes for the whole session, with an API token file: every
    request but /health needs the token, so a test passing also shows the
    client's X-Registry-Token reached the server."""
    tokens_dir = tempfile.mkdtemp(prefix="vr-pyclient-tokens-")
    nodes = Nodes(3, tokens_file=_tokens_file(tokens_dir))
    try:
        nodes.start_all()
        yield nodes
    finally:
        nodes.close()
        shutil.rmtree(tokens_dir, ignore_errors=True)


@pytest.fixture
def make_nodes():
    """Builds extra clusters inside a test (started by the test); all killed after it."""
    made = []

    def make(n, ports=None):
        nodes = Nodes(n, ports=ports)
        made.append(nodes)
        return nodes

    yield make
    for nodes in made:
        nodes.close()
