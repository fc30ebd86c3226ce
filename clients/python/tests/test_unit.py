"""The client's logic against fake registries (httpx.MockTransport): what it
sends, failover, re-registration, standalone mode, configuration. No network."""

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

import vertice_registry_client as vrc
from vertice_registry_client import RegistryClient, auto_register_service

pytestmark = pytest.mark.anyio


class FakeRegistry:
    """A registry in memory behind a MockTransport. `down` holds base URLs
    that refuse connections, `answer_503` those that answer 503."""

    def __init__(self):
        self.requests = []  # (base url, method, path, query, json body, headers)
        self.instances = {}  # (service, instance_id) -> body
        self.down = set()
        self.answer_503 = set()

    def transport(self):
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        self.requests.append(
            (base, request.method, request.url.path, dict(request.url.params), body, request.headers)
        )
        if base in self.answer_503:
            return httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "no_leader", "message": "x"})
        path = request.url.path
        if request.method == "POST" and path == "/register":
            iid = body.get("instance_id") or body["endpoint"].split("//", 1)[1]
            self.instances[(body["service_name"], iid)] = body
            return httpx.Response(200, json=dict(body, message="Service registered successfully"))
        if request.method == "POST" and path == "/heartbeat":
            keys = [k for k in self.instances if k[0] == body["service_name"]
                    and body.get("instance_id") in (None, k[1])]
            if not keys:
                return httpx.Response(404, json={"error": "not_found", "message": "register again"})
            return httpx.Response(200, json={"message": "ok", "service_name": body["service_name"],
                                             "renewed": len(keys)})
        if request.method == "DELETE" and path.startswith("/deregister/"):
            name = path.rsplit("/", 1)[1]
            iid = request.url.params.get("instance_id")
            keys = [k for k in self.instances if k[0] == name and iid in (None, k[1])]
            for k in keys:
                del self.instances[k]
            if not keys:
                return httpx.Response(404, json={"error": "not_found", "message": "unknown"})
            return httpx.Response(200, json={"message": "deregistered", "service_name": name})
        if request.method == "GET" and path == "/services":
            return httpx.Response(200, json=sorted({k[0] for k in self.instances}))
        if request.method == "GET" and path.startswith("/services/"):
            name = path.rsplit("/", 1)[1]
            found = [b for k, b in self.instances.items() if k[0] == name]
            if not found:
                return httpx.Response(404, json={"error": "not_found", "message": "unknown"})
            return httpx.Response(200, json={"service_name": name, "endpoint": found[-1]["endpoint"],
                                             "instances": found})
        return httpx.Response(404, json={"error": "not_found", "message": path})

    def calls(self, method=None, path=None):
        return [r for r in self.requests if (method is None or r[1] == method)
                and (path is None or r[2] == path)]


A, B, C = "http://reg-a:8881", "http://reg-b:8882", "http://reg-c:8883"


@pytest.fixture
def fake():
    return FakeRegistry()


def client(fake, urls=(A,), **kw):
    kw.setdefault("hostname", "svc-host")
    kw.setdefault("token", "s3cret-token-value")
    return RegistryClient(list(urls), transport=fake.transport(), **kw)


async def test_register_sends_the_old_body_plus_instance_id(fake):
    c = client(fake)
    assert await c.register("osint_service", 8049, metadata={"v": "1"}) is True
    (base, method, path, _, body, headers), = fake.requests
    assert (base, method, path) == (A, "POST", "/register")
    assert body == {
        "service_name": "osint_service",
        "endpoint": "http://svc-host:8049",
        "health_endpoint": "/health",
        "metadata": {"v": "1"},
        "instance_id": "svc-host:8049",
    }
    assert headers["x-registry-token"] == "s3cret-token-value"


async def test_ttl_is_sent_only_when_asked_for(fake):
    c = client(fake, ttl_seconds=7)
    await c.register("a", 1)
    await c.register("b", 2, ttl_seconds=9)
    assert [r[4].get("ttl_seconds") for r in fake.requests] == [7, 9]
    assert c._interval_for("a", None) == pytest.approx(7 / 3)


async def test_heartbeat_and_deregister_name_this_instance(fake):
    c = client(fake)
    await c.register("svc", 8000)
    assert await c.heartbeat("svc") is True
    assert fake.calls("POST", "/heartbeat")[0][4] == {"service_name": "svc", "instance_id": "svc-host:8000"}
    assert await c.deregister("svc") is True
    (_, _, path, query, _, _), = fake.calls("DELETE")
    assert (path, query) == ("/deregister/svc", {"instance_id": "svc-host:8000"})


async def test_unknown_names_use_the_old_requests(fake):
    """A name this client never registered: heartbeat and deregister as the
    old module sent them (the whole service)."""
    other = client(fake, hostname="other")
    await other.register("svc", 8000)
    c = client(fake)
    assert await c.heartbeat("svc") is True
    assert fake.calls("POST", "/heartbeat")[-1][4] == {"service_name": "svc"}
    assert await c.deregister("svc") is True
    assert fake.calls("DELETE")[-1][3] == {}


async def test_failover_on_refused_connections_and_503(fake):
    fake.down.add(A)
    fake.answer_503.add(B)
    c = client(fake, urls=(A, B, C))
    assert await c.register("svc", 1) is True
    assert [r[0] for r in fake.requests] == [B, C]  # A refused, B said 503
    # The node that answered is tried first from then on.
    assert await c.heartbeat("svc") is True
    assert fake.requests[-1][0] == C


async def test_every_node_answering_503_is_a_failure_not_an_exception(fake):
    fake.answer_503.update({A, B})
    c = client(fake, urls=(A, B), timeout=0.5)
    assert await c.register("svc", 1) is False
    assert not c.is_registered("svc")
    assert await c.get_service("svc") is None
    assert await c.list_services() == []


async def test_a_404_heartbeat_registers_again(fake):
    """Guards re-registration: with the re-register on 404 removed from
    RegistryClient.heartbeat, this fails (heartbeat returns False and no
    second /register is sent)."""
    c = client(fake)
    await c.register("svc", 8000, metadata={"k": "v"})
    fake.instances.clear()  # expired, or deregistered by someone else
    assert await c.heartbeat("svc") is True
    first, again = fake.calls("POST", "/register")
    assert first[4] == again[4]
    assert ("svc", "svc-host:8000") in fake.instances


async def test_no_reregistration_after_own_deregister(fake):
    c = client(fake)
    await c.register("svc", 8000)
    await c.deregister("svc")
    assert await c.heartbeat("svc") is False
    assert len(fake.calls("POST", "/register")) == 1


async def test_standalone_mode_registers_once_the_registry_answers(fake):
    fake.down.update({A, B})
    c = client(fake, urls=(A, B), timeout=0.3)
    task = await auto_register_service("svc", 8000, client=c, heartbeat_interval=0.05)
    try:
        assert not task.done() and not c.is_registered("svc")
        assert fake.requests == []
        fake.down.clear()
        for _ in range(200):
            if c.is_registered("svc"):
                break
            await asyncio.sleep(0.02)
        assert c.is_registered("svc")
        assert ("svc", "svc-host:8000") in fake.instances
    finally:
        task.cancel()
    # As the old loop did, a cancelled loop ends quietly.
    assert await task is None


async def test_calls_on_the_class_use_the_shared_client(fake):
    """The seed's lifespan, unchanged: auto_register_service, then at shutdown
    cancel the task and RegistryClient.deregister(name), which removes only
    the instance that was registered."""
    RegistryClient.set_default(client(fake))
    try:
        task = await auto_register_service(service_name="my_service", port=8000, health_endpoint="/health")
        assert isinstance(task, asyncio.Task)
        assert await RegistryClient.heartbeat("my_service") is True
        assert (await RegistryClient.get_service("my_service"))["endpoint"] == "http://svc-host:8000"
        assert await RegistryClient.list_services() == ["my_service"]
        task.cancel()
        assert await RegistryClient.deregister("my_service") is True
        assert fake.calls("DELETE")[0][3] == {"instance_id": "svc-host:8000"}
        assert await RegistryClient.get_service("my_service") is None
        await RegistryClient.close()
    finally:
        RegistryClient.set_default(None)


def test_old_private_helpers_still_answer():
    c = RegistryClient(["http://x:1"], hostname="h", token="t")
    assert c._build_endpoint(8080) == "http://h:8080"
    assert c._get_headers() == {"X-Registry-Token": "t"}


def test_parse_registry_urls():
    assert vrc.parse_registry_urls("http://a:1, http://b:2/,,http://c:3") == [
        "http://a:1", "http://b:2", "http://c:3"]
    assert vrc.parse_registry_urls(["http://a:1/"]) == ["http://a:1"]


def _config_in_subprocess(env):
    code = ("import json, vertice_registry_client as m; print(json.dumps([m.REGISTRY_URLS, "
            "m.REGISTRY_AUTH_TOKEN, m.HEARTBEAT_INTERVAL, m.REGISTRATION_TIMEOUT, m.RegistryClient().urls]))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("VERTICE_REGISTRY_URL", "VERTICE_REGISTRY_TOKEN", "REGISTRY_AUTH_TOKEN",
                          "REGISTRY_HEARTBEAT_INTERVAL", "REGISTRY_TIMEOUT")}
    clean["PYTHONPATH"] = os.pathsep.join([os.path.dirname(vrc.__file__), clean.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_configuration_from_the_old_environment_variables():
    assert _config_in_subprocess({}) == [
        ["http://vertice-register-lb:80"], "titanium-registry-token", 30, 5, ["http://vertice-register-lb:80"]]
    urls, token, interval, timeout, client_urls = _config_in_subprocess({
        "VERTICE_REGISTRY_URL": "http://r1:8888,http://r2:8888",
        "REGISTRY_AUTH_TOKEN": "second-choice",
        "REGISTRY_HEARTBEAT_INTERVAL": "10",
        "REGISTRY_TIMEOUT": "2",
    })
    assert urls == client_urls == ["http://r1:8888", "http://r2:8888"]
    assert (token, interval, timeout) == ("second-choice", 10, 2)
    assert _config_in_subprocess({"VERTICE_REGISTRY_TOKEN": "first", "REGISTRY_AUTH_TOKEN": "second"})[1] == "first"
