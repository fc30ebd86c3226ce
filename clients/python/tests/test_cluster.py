"""The client against a real three-node cluster of the release binary (see
conftest.py): the old module's calls, failover, re-registration, replicas,
standalone mode."""

import asyncio
import inspect
import socket
import time

import httpx
import pytest

from conftest import TOKEN, http
from vertice_registry_client import RegistryClient, auto_register_service

pytestmark = pytest.mark.anyio


def new_client(urls, **kw):
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout", 2.0)
    return RegistryClient(urls, **kw)


async def until(what, check, timeout=15.0, interval=0.1):
    """Awaits check() until it returns something truthy; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def instance_ids(nodes, name, node=1):
    status, body = http("GET", f"{nodes.url(node)}/services/{name}?consistent=true")
    if status == 404:
        return set()
    assert status == 200, (status, body)
    return {i["instance_id"] for i in body["instances"]}


def dead_url():
    """A loopback URL nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


async def test_the_old_module_s_requests_as_they_were(cluster):
    """Exactly what the old shared/vertice_registry_client.py sent: endpoint
    without host or port, X-Registry-Token, heartbeat and deregister by name."""
    headers = {"X-Registry-Token": TOKEN}
    base = cluster.url(2)
    async with httpx.AsyncClient(timeout=5) as h:
        r = await h.post(f"{base}/register", headers=headers, json={
            "service_name": "legacy_service", "endpoint": "http://legacy-host:8049",
            "health_endpoint": "/health", "metadata": {}})
        r.raise_for_status()
        assert (r.json()["host"], r.json()["port"]) == ("legacy-host", 8049)
        r = await h.post(f"{base}/heartbeat", headers=headers, json={"service_name": "legacy_service"})
        r.raise_for_status()
        assert r.json()["service_name"] == "legacy_service" and "message" in r.json()
        r = await h.get(f"{cluster.url(3)}/services/legacy_service?consistent=true", headers=headers)
        r.raise_for_status()
        body = r.json()
        assert body["endpoint"] == "http://legacy-host:8049"
        assert isinstance(body["registered_at"], (int, float)) and isinstance(body["last_heartbeat"], (int, float))
        assert isinstance(body["ttl_remaining"], int)
        r = await h.delete(f"{base}/deregister/legacy_service", headers=headers)
        r.raise_for_status()
        assert "message" in r.json()
        # A token the server does not know is refused: the header is checked.
        r = await h.post(f"{base}/heartbeat", headers={"X-Registry-Token": "not-the-token-at-all"},
                         json={"service_name": "legacy_service"})
        assert r.status_code in (401, 403)


async def test_the_seed_lifespan_on_the_shared_client(cluster):
    """The seed's calls on the class, through RegistryClient.default()."""
    RegistryClient.set_default(new_client(cluster.urls))
    try:
        task = await auto_register_service(service_name="osint_service", port=8049, health_endpoint="/health")
        assert isinstance(task, asyncio.Task)
        assert await RegistryClient.heartbeat("osint_service") is True
        info = await RegistryClient.get_service("osint_service", consistent=True)
        assert info["endpoint"] == f"http://{socket.gethostname()}:8049"
        assert info["instances"][0]["instance_id"] == f"{socket.gethostname()}:8049"
        assert "osint_service" in await RegistryClient.list_services(consistent=True)
        task.cancel()
        assert await task is None
        assert await RegistryClient.deregister("osint_service") is True
        assert await RegistryClient.get_service("osint_service", consistent=True) is None
        await RegistryClient.close()
    finally:
        RegistryClient.set_default(None)


async def test_failover_past_a_dead_url(cluster):
    async with new_client([dead_url(), dead_url()] + cluster.urls, hostname="fo-host") as c:
        assert await c.register("failover_service", 9000, ttl_seconds=30) is True
        assert await c.heartbeat("failover_service") is True
        assert (await c.get_service("failover_service", consistent=True))["endpoint"] == "http://fo-host:9000"
        assert await c.deregister("failover_service") is True


async def test_failover_when_the_node_in_use_is_killed(cluster):
    """The client sticks to the node that answered; kill that node (the
    leader, so an election happens too) and it carries on with the others."""
    leader = cluster.wait_for_leader()
    order = [leader] + [i for i in cluster.ids if i != leader]
    async with new_client([cluster.url(i) for i in order], hostname="kill-host") as c:
        try:
            assert await c.register("kill_service", 9001, ttl_seconds=30) is True
            cluster.kill(leader)
            # A write during the election may get 503 from every node; it
            # comes right within a few seconds.
            await until("a heartbeat through the surviving nodes", lambda: c.heartbeat("kill_service"))
            assert c.urls[c._preferred] != cluster.url(leader)
            assert await c.deregister("kill_service") is True
        finally:
            cluster.start(leader)
            cluster.wait_for_leader()


async def test_a_heartbeat_answered_404_registers_again(cluster):
    """Someone deregisters the instance through the HTTP API; the next
    heartbeat gets 404 and the client registers it again.

    Shown to guard the feature: with the re-registration in
    RegistryClient.heartbeat disabled (a temporary patch returning False on
    404), this test failed at `assert await c.heartbeat(...) is True`."""
    async with new_client(cluster.urls, hostname="re-host") as c:
        assert await c.register("reregister_service", 9002, metadata={"build": "7"}, ttl_seconds=30) is True
        status, _ = http("DELETE", f"{cluster.url(3)}/deregister/reregister_service")
        assert status == 200
        assert instance_ids(cluster, "reregister_service") == set()
        assert await c.heartbeat("reregister_service") is True
        assert instance_ids(cluster, "reregister_service") == {"re-host:9002"}
        status, body = http("GET", f"{cluster.url(2)}/services/reregister_service?consistent=true")
        assert body["metadata"] == {"build": "7"}
        await c.deregister("reregister_service")


async def test_the_heartbeat_loop_brings_a_removed_instance_back(cluster):
    """The same through auto_register_service's loop (this one, too, failed
    with re-registration disabled: the loop only logged failed heartbeats)."""
    async with new_client(cluster.urls, hostname="loop-host") as c:
        task = await auto_register_service("loop_service", 9003, client=c, ttl_seconds=5,
                                           heartbeat_interval=0.2)
        try:
            assert instance_ids(cluster, "loop_service") == {"loop-host:9003"}
            status, _ = http("DELETE", f"{cluster.url(1)}/deregister/loop_service?instance_id=loop-host:9003")
            assert status == 200
            await until("the loop to register again",
                        lambda: instance_ids(cluster, "loop_service") == {"loop-host:9003"}, timeout=10)
        finally:
            task.cancel()
            await task
        await c.deregister("loop_service")


async def test_two_replicas_one_deregisters_the_other_stays(cluster):
    """Two replicas of one service on different hosts, same port: each is its
    own instance, and the seed's shutdown (RegistryClient.deregister(name))
    in one of them removes only that one."""
    a = new_client(cluster.urls, hostname="replica-a")
    b = new_client(list(reversed(cluster.urls)), hostname="replica-b")
    try:
        ta = await auto_register_service("replicated_service", 8000, client=a, ttl_seconds=10)
        tb = await auto_register_service("replicated_service", 8000, client=b, ttl_seconds=10)
        assert instance_ids(cluster, "replicated_service") == {"replica-a:8000", "replica-b:8000"}
        ta.cancel()
        assert await a.deregister("replicated_service") is True
        assert instance_ids(cluster, "replicated_service") == {"replica-b:8000"}
        assert await b.heartbeat("replicated_service") is True
        info = await a.get_service("replicated_service", consistent=True)
        assert info["endpoint"] == "http://replica-b:8000"
        tb.cancel()
        assert await b.deregister("replicated_service") is True
        assert instance_ids(cluster, "replicated_service") == set()
    finally:
        await a.close()
        await b.close()


async def test_standalone_until_the_registry_starts(make_nodes):
    """No registry at start: auto_register_service returns its task without
    raising, and the loop registers the service once a node comes up."""
    nodes = make_nodes(1)
    async with RegistryClient(nodes.urls, hostname="lonely-host", timeout=1.0) as c:
        task = await auto_register_service("standalone_service", 9004, client=c, ttl_seconds=10,
                                           heartbeat_interval=0.2)
        try:
            assert not task.done() and not c.is_registered("standalone_service")
            nodes.start_all()
            await until("registration once the node is up",
                        lambda: c.is_registered("standalone_service"), timeout=15)
            status, body = http("GET", f"{nodes.url(1)}/services/standalone_service", token=None)
            assert status == 200 and body["endpoint"] == "http://lonely-host:9004"
        finally:
            task.cancel()
            await task
