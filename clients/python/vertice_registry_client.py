"""Python client for vertice-register, a drop-in for the old
``shared/vertice_registry_client.py``.

An old FastAPI service keeps its code as it is::

    from vertice_registry_client import auto_register_service, RegistryClient

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        heartbeat_task = await auto_register_service(
            service_name="my_service", port=8000, health_endpoint="/health"
        )
        yield
        heartbeat_task.cancel()
        await RegistryClient.deregister("my_service")

The old module's names, signatures, environment variables and defaults all
still hold (``VERTICE_REGISTRY_URL``, ``VERTICE_REGISTRY_TOKEN`` or
``REGISTRY_AUTH_TOKEN``, ``REGISTRY_HEARTBEAT_INTERVAL``, ``REGISTRY_TIMEOUT``;
the ``X-Registry-Token`` header; ``register``/``heartbeat``/``deregister``
return ``True``/``False`` and never raise). What is new:

* Several registry URLs with failover: ``VERTICE_REGISTRY_URL`` may be a
  comma-separated list, or pass ``urls=[...]`` to ``RegistryClient(...)``. A
  request goes to the URL that answered last, and on a connection error, a
  timeout or a ``5xx`` (``503`` while the cluster has no leader) to the next.
* Every replica of a service is its own instance, ``<hostname>:<port>`` by
  default (what the server derives from the endpoint too): register,
  heartbeat and deregister name it, so a replica that stops removes only
  itself.
* A heartbeat answered ``404`` (the instance expired, or someone deregistered
  it) registers the instance again.
* Standalone mode: if the registry is down at start, the service runs anyway
  and the heartbeat loop keeps trying, registering once a node answers.

``RegistryClient``'s methods work on the class, as in the old module (they use
one shared client built from the environment, ``RegistryClient.default()``),
and on an instance built with its own URLs, token, hostname or timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import quote

import httpx

__version__ = "1.0.0"

__all__ = [
    "DEFAULT_REGISTRY_TOKEN",
    "DEFAULT_REGISTRY_URL",
    "HEARTBEAT_INTERVAL",
    "REGISTRATION_TIMEOUT",
    "REGISTRY_AUTH_TOKEN",
    "REGISTRY_TOKEN_HEADER",
    "REGISTRY_URL",
    "REGISTRY_URLS",
    "RETRY_INTERVAL",
    "RegistryClient",
    "RegistryUnavailable",
    "auto_register_service",
    "logger",
    "parse_registry_urls",
]

logger = logging.getLogger(__name__)


def parse_registry_urls(value: Union[str, Sequence[str], None]) -> List[str]:
    """A list of base URLs from a comma- (or space-) separated string or a
    sequence; trailing slashes dropped, empty items skipped."""
    if value is None:
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    return [u.strip().rstrip("/") for u in items if u and u.strip()]


# Configuration, read once at import as the old module did. The shared client
# reads these module attributes when it is first built, so assigning them
# before first use (as tests of the old module did) still works.
DEFAULT_REGISTRY_URL = "http://vertice-register-lb:80"
DEFAULT_REGISTRY_TOKEN = "titanium-registry-token"
REGISTRY_URL = os.getenv("VERTICE_REGISTRY_URL", DEFAULT_REGISTRY_URL)
REGISTRY_URLS = parse_registry_urls(REGISTRY_URL) or [DEFAULT_REGISTRY_URL]
REGISTRY_AUTH_TOKEN = (
    os.getenv("VERTICE_REGISTRY_TOKEN") or os.getenv("REGISTRY_AUTH_TOKEN") or DEFAULT_REGISTRY_TOKEN
)
HEARTBEAT_INTERVAL = int(os.getenv("REGISTRY_HEARTBEAT_INTERVAL", "30"))  # seconds
REGISTRATION_TIMEOUT = int(os.getenv("REGISTRY_TIMEOUT", "5"))  # seconds
REGISTRY_TOKEN_HEADER = "X-Registry-Token"

# After a failed heartbeat or registration the loop tries again this soon
# (or after its interval, if that is shorter) rather than a whole interval
# later: with the old 30 s interval and 60 s TTL, one more miss would expire
# the instance.
RETRY_INTERVAL = 5.0

# Rounds over the URL list before a request gives up, and the longest pause
# between rounds (a 503 carries Retry-After; an election takes about a second).
_ROUNDS = 3
_MAX_PAUSE = 1.0

_warned_default_token = False


class RegistryUnavailable(httpx.TransportError):
    """No registry URL answered (each refused, timed out or failed)."""


@dataclass
class _Registration:
    """What this client registered under one service name, so that it can
    heartbeat, register again and deregister exactly its own instance."""

    service_name: str
    port: int
    health_endpoint: str
    metadata: Dict[str, str]
    instance_id: str
    endpoint: str
    ttl_seconds: Optional[int] = None
    heartbeat_interval: Optional[float] = None
    registered: bool = False  # False: standalone mode, the loop keeps trying
    last_response: Optional[Dict[str, Any]] = field(default=None, repr=False)

    def payload(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {
            "service_name": self.service_name,
            "endpoint": self.endpoint,
            "health_endpoint": self.health_endpoint,
            "metadata": self.metadata,
            "instance_id": self.instance_id,
        }
        if self.ttl_seconds is not None:
            body["ttl_seconds"] = self.ttl_seconds
        return body


class _shared_or_own:
    """A method that, called on the class (``RegistryClient.register(...)``,
    as the old module's classmethods were), runs on the shared default client,
    and called on an instance runs on that instance."""

    def __init__(self, func):
        self.__func__ = func
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__
        self.__wrapped__ = func

    def __get__(self, obj, objtype=None):
        if obj is None:
            obj = objtype.default()
        return self.__func__.__get__(obj, type(obj))


class RegistryClient:
    """Client for vertice-register. See the module's docstring."""

    def __init__(
        self,
        urls: Union[str, Sequence[str], None] = None,
        *,
        token: Optional[str] = None,
        hostname: Optional[str] = None,
        timeout: Optional[float] = None,
        heartbeat_interval: Optional[float] = None,
        ttl_seconds: Optional[int] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ):
        """
        Args:
            urls: registry base URLs, a list or a comma-separated string
                (default: ``VERTICE_REGISTRY_URL``, itself a list or one URL).
            token: sent as ``X-Registry-Token`` (default:
                ``VERTICE_REGISTRY_TOKEN``, else ``REGISTRY_AUTH_TOKEN``, else
                ``titanium-registry-token``).
            hostname: the host name in the endpoint ``http://<hostname>:<port>``
                and in the default instance id (default: ``socket.gethostname()``).
            timeout: seconds per request to one URL (default ``REGISTRY_TIMEOUT``, 5).
            heartbeat_interval: seconds between heartbeats (default
                ``REGISTRY_HEARTBEAT_INTERVAL``, 30; at most a third of a
                registration's ``ttl_seconds``).
            ttl_seconds: TTL asked for at registration (default: the server's, 60).
            transport: an httpx transport, for tests.
        """
        global _warned_default_token
        self.urls: List[str] = parse_registry_urls(urls if urls is not None else REGISTRY_URL)
        if not self.urls:
            self.urls = [DEFAULT_REGISTRY_URL]
        self.token: str = token if token is not None else REGISTRY_AUTH_TOKEN
        self.hostname: str = hostname or socket.gethostname()
        self.timeout: float = float(timeout if timeout is not None else REGISTRATION_TIMEOUT)
        self.heartbeat_interval: float = float(
            heartbeat_interval if heartbeat_interval is not None else HEARTBEAT_INTERVAL
        )
        self.ttl_seconds = ttl_seconds
        self._transport = transport
        self._registrations: Dict[str, _Registration] = {}
        self._http: Optional[httpx.AsyncClient] = None
        self._http_loop: Optional[asyncio.AbstractEventLoop] = None
        self._preferred = 0  # index in urls of the node that answered last
        if self.token == DEFAULT_REGISTRY_TOKEN and not _warned_default_token:
            _warned_default_token = True
            logger.warning(
                "Using default registry token. Set VERTICE_REGISTRY_TOKEN to a unique value "
                "for production deployments."
            )

    def __repr__(self) -> str:
        return f"RegistryClient(urls={self.urls!r}, hostname={self.hostname!r})"

    # -- the shared client used by calls on the class ------------------------

    @classmethod
    def default(cls) -> "RegistryClient":
        """The shared client that calls on the class use, built from the
        module's configuration the first time it is needed."""
        inst = cls.__dict__.get("_default_instance")
        if inst is None:
            inst = cls()
            setattr(cls, "_default_instance", inst)
        return inst

    @classmethod
    def set_default(cls, client: Optional["RegistryClient"]) -> None:
        """Replaces the shared client (``None``: build a new one from the
        module's configuration on next use). Does not close the old one."""
        setattr(cls, "_default_instance", client)

    # -- HTTP ---------------------------------------------------------------

    @_shared_or_own
    def _get_client(self) -> httpx.AsyncClient:
        """The HTTP client, one per event loop: an httpx client's connections
        belong to the loop they were opened on, and a test suite, or a program
        calling ``asyncio.run`` twice, runs several loops one after another."""
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._http is None or self._http.is_closed or self._http_loop is not loop:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 2.0)),
                follow_redirects=True,
                transport=self._transport,
            )
            self._http_loop = loop
        return self._http

    @_shared_or_own
    def _get_headers(self) -> Dict[str, str]:
        """Headers sent with every request."""
        return {REGISTRY_TOKEN_HEADER: self.token} if self.token else {}

    @_shared_or_own
    async def close(self) -> None:
        """Closes the HTTP client (a later call opens a new one)."""
        if self._http is not None and not self._http.is_closed:
            try:
                await self._http.aclose()
            except RuntimeError:  # opened on an event loop that is gone
                pass
        self._http = None

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Sends a request to the registry, failing over between the URLs.

        Starts with the URL that answered last. A connection error, a timeout
        or a 5xx moves on to the next URL; after a whole round of failures it
        pauses (as long as a 503's ``Retry-After`` says, at most a second) and
        tries another round, ``_ROUNDS`` in all, while that fits in about one
        request timeout. Returns the first answer below
        500; if every answer was a 5xx, the last one; raises
        ``RegistryUnavailable`` if no URL answered at all. Every request here
        may be repeated safely: a register overwrites the same instance and a
        heartbeat only renews it."""
        client = self._get_client()
        headers = self._get_headers()
        n = len(self.urls)
        loop = asyncio.get_running_loop()
        started = loop.time()
        last_error: Optional[Exception] = None
        last_response: Optional[httpx.Response] = None
        for round_ in range(_ROUNDS):
            pause = 0.2
            for k in range(n):
                i = (self._preferred + k) % n
                url = self.urls[i] + path
                try:
                    resp = await client.request(method, url, headers=headers, **kwargs)
                except httpx.TransportError as e:
                    logger.debug("registry %s unreachable: %s: %s", self.urls[i], type(e).__name__, e)
                    last_error = e
                    continue
                if resp.status_code >= 500:
                    logger.debug("registry %s answered %s to %s %s", self.urls[i], resp.status_code, method, path)
                    last_response = resp
                    pause = max(pause, _retry_after(resp))
                    continue
                self._preferred = i
                return resp
            pause = min(pause, _MAX_PAUSE)
            # Another round only while it fits in about one request's timeout:
            # a round of timeouts has used that up already.
            if round_ + 1 < _ROUNDS and loop.time() - started + pause < self.timeout:
                await asyncio.sleep(pause)
            else:
                break
        if last_response is not None:
            return last_response
        raise RegistryUnavailable(
            f"no registry answered ({', '.join(self.urls)}): {type(last_error).__name__}: {last_error}"
        )

    # -- the old module's API -------------------------------------------------

    @_shared_or_own
    def _get_hostname(self) -> str:
        """This host's (container's) name, as the registry will know it."""
        return self.hostname

    @_shared_or_own
    def _build_endpoint(self, port: int) -> str:
        """The service's URL: ``http://<hostname>:<port>``."""
        return f"http://{self._get_hostname()}:{port}"

    @_shared_or_own
    async def register(
        self,
        service_name: str,
        port: int,
        health_endpoint: str = "/health",
        metadata: Optional[Dict[str, str]] = None,
        *,
        instance_id: Optional[str] = None,
        ttl_seconds: Optional[int] = None,
        heartbeat_interval: Optional[float] = None,
    ) -> bool:
        """Registers this instance of a service.

        Args:
            service_name: the service's name
            port: the port the service listens on (in this host or container)
            health_endpoint: health check path
            metadata: string-to-string metadata
            instance_id: this replica's id (default ``<hostname>:<port>``)
            ttl_seconds: the instance's TTL (default: the client's, else the server's 60 s)
            heartbeat_interval: for ``heartbeat_loop`` (default: the client's,
                at most a third of the TTL)

        Returns:
            True if the registry accepted it; False otherwise (logged). If no
            registry answered, the service runs standalone and
            ``heartbeat``/``heartbeat_loop`` keep trying to register it.
        """
        endpoint = self._build_endpoint(port)
        reg = _Registration(
            service_name=service_name,
            port=port,
            health_endpoint=health_endpoint,
            metadata=dict(metadata or {}),
            instance_id=instance_id or f"{self._get_hostname()}:{port}",
            endpoint=endpoint,
            ttl_seconds=ttl_seconds if ttl_seconds is not None else self.ttl_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        self._registrations[service_name] = reg
        return await self._register(reg)

    async def _register(self, reg: _Registration) -> bool:
        name = reg.service_name
        try:
            response = await self._send("POST", "/register", json=reg.payload())
            response.raise_for_status()
        except httpx.HTTPStatusError as e:
            reg.registered = False
            logger.error(
                "Failed to register '%s': HTTP %s - %s", name, e.response.status_code, e.response.text
            )
            if e.response.status_code >= 500:
                logger.warning("Service will operate WITHOUT registry (standalone mode) until it answers")
            return False
        except httpx.HTTPError as e:
            reg.registered = False
            logger.error("Failed to register '%s': Registry unreachable - %s: %s", name, type(e).__name__, e)
            logger.warning("Service will operate WITHOUT registry (standalone mode) until it answers")
            return False
        except Exception as e:  # the old module never raised from register
            reg.registered = False
            logger.error("Unexpected error registering '%s': %s", name, e)
            return False
        reg.registered = True
        reg.last_response = _json_or_none(response)
        logger.info(
            "Service '%s' registered with registry: %s (instance %s)", name, reg.endpoint, reg.instance_id
        )
        return True

    @_shared_or_own
    async def heartbeat(self, service_name: str) -> bool:
        """Renews this instance's TTL.

        Sends ``{"service_name", "instance_id"}`` for a service this client
        registered, ``{"service_name"}`` (every instance) otherwise. If the
        registry answers ``404`` (the instance expired, or was deregistered by
        someone else), or if the service never got registered (standalone
        mode), registers it again.

        Returns:
            True if the instance is registered and renewed; False otherwise.
        """
        reg = self._registrations.get(service_name)
        if reg is not None and not reg.registered:
            logger.info("Registering '%s' (standalone until now)", service_name)
            return await self._register(reg)
        payload: Dict[str, Any] = {"service_name": service_name}
        if reg is not None:
            payload["instance_id"] = reg.instance_id
        try:
            response = await self._send("POST", "/heartbeat", json=payload)
            if response.status_code == 404 and reg is not None:
                logger.warning(
                    "Registry does not know '%s' instance %s (expired or deregistered); registering again",
                    service_name,
                    reg.instance_id,
                )
                return await self._register(reg)
            response.raise_for_status()
        except Exception as e:
            logger.warning("Heartbeat failed for '%s': %s", service_name, e)
            return False
        body = _json_or_none(response)
        if isinstance(body, dict) and body.get("revived"):
            logger.info("Heartbeat for '%s' revived expired instance(s): %s", service_name, body["revived"])
        logger.debug("Heartbeat sent for '%s'", service_name)
        return True

    @_shared_or_own
    async def heartbeat_loop(self, service_name: str, interval: Optional[float] = None) -> None:
        """Background task: a heartbeat every interval, for ever.

        After a failure the next try comes sooner (``RETRY_INTERVAL``). Ends
        quietly when cancelled (as the old module's did: awaiting the
        cancelled task returns ``None``)."""
        interval = self._interval_for(service_name, interval)
        logger.info("Starting heartbeat loop for '%s' (interval=%ss)", service_name, interval)
        ok = True
        while True:
            try:
                await asyncio.sleep(interval if ok else min(interval, RETRY_INTERVAL))
                ok = await self.heartbeat(service_name)
                if not ok:
                    logger.warning(
                        "Heartbeat failed for '%s', service may be deregistered soon", service_name
                    )
            except asyncio.CancelledError:
                logger.info("Heartbeat loop cancelled for '%s'", service_name)
                break
            except Exception as e:
                ok = False
                logger.error("Heartbeat loop error for '%s': %s", service_name, e)

    def _interval_for(self, service_name: str, interval: Optional[float]) -> float:
        if interval is not None:
            return float(interval)
        reg = self._registrations.get(service_name)
        if reg is not None and reg.heartbeat_interval is not None:
            return float(reg.heartbeat_interval)
        chosen = self.heartbeat_interval
        ttl = reg.ttl_seconds if reg is not None else None
        if ttl:
            chosen = min(chosen, ttl / 3.0)
        return chosen

    @_shared_or_own
    async def deregister(self, service_name: str, *, instance_id: Optional[str] = None) -> bool:
        """Deregisters this client's instance of a service.

        Sends ``DELETE /deregister/{name}?instance_id=<this instance>`` for a
        service this client registered, so the other replicas stay; for any
        other name (or with no instance known) the whole service, as the old
        module did. A later heartbeat for it no longer registers it again.

        Returns:
            True if the registry removed it; False otherwise (logged).
        """
        reg = self._registrations.pop(service_name, None)
        instance = instance_id or (reg.instance_id if reg is not None else None)
        params = {"instance_id": instance} if instance else None
        try:
            response = await self._send(
                "DELETE", f"/deregister/{quote(service_name, safe='')}", params=params
            )
            response.raise_for_status()
        except Exception as e:
            logger.warning("Failed to deregister '%s': %s", service_name, e)
            return False
        logger.info(
            "Service '%s' deregistered from registry%s",
            service_name,
            f" (instance {instance})" if instance else "",
        )
        return True

    @_shared_or_own
    async def get_service(self, service_name: str, *, consistent: bool = False) -> Optional[Dict]:
        """Looks a service up.

        The node that answers reads its own replica, which may trail the
        leader by a moment; ``consistent=True`` asks for a linearizable read
        (it sees every write acknowledged before it).

        Returns:
            The registry's answer (``endpoint``, ``instances``, ``host``,
            ``port``, ``url``, ...), or None if unknown or unreachable.
        """
        try:
            response = await self._send(
                "GET", f"/services/{quote(service_name, safe='')}", params=_read_params(consistent)
            )
            response.raise_for_status()
            return response.json()
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 404:
                logger.debug("Service '%s' not found in registry", service_name)
            else:
                logger.error("Failed to lookup '%s': HTTP %s", service_name, e.response.status_code)
            return None
        except Exception as e:
            logger.error("Failed to lookup '%s': %s", service_name, e)
            return None

    @_shared_or_own
    async def list_services(self, *, consistent: bool = False) -> list:
        """The names of every registered service ([] if unreachable);
        ``consistent`` as for ``get_service``."""
        try:
            response = await self._send("GET", "/services", params=_read_params(consistent))
            response.raise_for_status()
            return response.json()
        except Exception as e:
            logger.error("Failed to list services: %s", e)
            return []

    @_shared_or_own
    def is_registered(self, service_name: str) -> bool:
        """Whether this client's instance of the service is registered as far
        as it knows (False: not registered by it, or standalone mode)."""
        reg = self._registrations.get(service_name)
        return reg is not None and reg.registered


def _read_params(consistent: bool) -> Optional[Dict[str, str]]:
    return {"consistent": "true"} if consistent else None


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


async def auto_register_service(
    service_name: str,
    port: int,
    health_endpoint: str = "/health",
    metadata: Optional[Dict[str, str]] = None,
    *,
    client: Optional[RegistryClient] = None,
    instance_id: Optional[str] = None,
    ttl_seconds: Optional[int] = None,
    heartbeat_interval: Optional[float] = None,
) -> asyncio.Task:
    """Registers the service and starts its heartbeat loop.

    Never raises because of the registry: if it is down, the service runs
    standalone and the loop registers it once a node answers.

    Args:
        service_name, port, health_endpoint, metadata: as for ``register``
        client: the client to use (default: the shared one, so that
            ``RegistryClient.deregister(service_name)`` later removes this
            instance)
        instance_id, ttl_seconds, heartbeat_interval: as for ``register``

    Returns:
        The heartbeat task: cancel it at shutdown, then call
        ``RegistryClient.deregister(service_name)``.
    """
    client = client or RegistryClient.default()
    await client.register(
        service_name=service_name,
        port=port,
        health_endpoint=health_endpoint,
        metadata=metadata,
        instance_id=instance_id,
        ttl_seconds=ttl_seconds,
        heartbeat_interval=heartbeat_interval,
    )
    return asyncio.create_task(
        client.heartbeat_loop(service_name), name=f"registry-heartbeat-{service_name}"
    )
