"""Health endpoints, compatible with kube-proxy's so that probes and load balancers need no change.

* ``/healthz`` (default ``0.0.0.0:10256``): JSON ``{"lastUpdated", "currentTime",
  "nodeEligible"}``; 503 when a change has been queued for longer than the health timeout
  without reaching the kernel (the initial sync counts as queued from start-up, so an agent
  that never gets its first lists is unhealthy too), or when this node is being deleted (cloud
  load balancers use it to drain the node). 200 otherwise.
  This is the readiness probe: stricter than kube-proxy 1.20's ``/healthz``, which reports
  healthy until its informers have synced however long that takes (its own code calls that
  "useless as a readinessProbe"); a zeroproxy pod that has programmed nothing is not Ready,
  so a DaemonSet rollout of a broken agent stops at the first node.
* ``/livez`` (the liveness probe): kube-proxy's rule -- the time before every watched kind was
  listed once does not count, and then 503 only when a change waits longer than the health
  timeout; no node check. An agent that cannot list (RBAC refuses, the API version is not
  served, the apiserver is away) is waiting, not wedged: a restart would not fix it, and
  kube-proxy, which the kubeadm DaemonSet runs without any liveness probe, keeps retrying
  too. So this is 200 while the lists retry (the log says why, at warning level), and 503 when
  the agent's own sync is stuck or failing, which a restart may cure.
* healthCheckNodePort servers: one listener per ``externalTrafficPolicy: Local`` service that
  has a ``healthCheckNodePort``; a load balancer probes it to learn whether this node has local
  endpoints: 200 with ``{"service": {...}, "localEndpoints": N, "serviceProxyHealthy": true}``
  when N > 0, 503 otherwise (also when the proxy itself is unhealthy).

The servers run in threads (``ThreadingHTTPServer``): they must answer while the agent's loop
is busy with a large sync, which is exactly when a probe must not time out. They only read a
few attributes the loop writes; no locking is needed for that.
"""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.config import split_host_port

log = logging.getLogger("zeroproxy.health")


def _rfc3339(wall: float | None) -> str:
    if wall is None:
        return ""
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class ProxyHealth:
    """What /healthz reports; the agent updates it after every sync."""

    def __init__(self, timeout: float, queued_since: Callable[[], float | None],
                 node_eligible: Callable[[], bool] = lambda: True,
                 listed_since: Callable[[], float | None] = lambda: float("-inf")) -> None:
        self.timeout = timeout
        self.queued_since = queued_since  # monotonic time of the oldest unprogrammed change
        self.node_eligible = node_eligible
        self.listed_since = listed_since  # monotonic time every kind was first listed; None: not yet
        self.last_updated: float | None = None  # wall time of the last successful sync

    def updated(self) -> None:
        self.last_updated = time.time()

    def healthy(self) -> bool:
        """Readiness: nothing has waited too long, the initial lists (counted from start-up) included."""
        queued = self.queued_since()
        return queued is None or time.monotonic() - queued <= self.timeout

    def alive(self) -> bool:
        """Liveness: as :meth:`healthy`, but waiting for the initial lists does not count."""
        listed = self.listed_since()
        queued = self.queued_since()
        if listed is None or queued is None:
            return True
        return time.monotonic() - max(queued, listed) <= self.timeout

    def report(self, check_node: bool) -> tuple[int, dict[str, Any]]:
        """/healthz (``check_node``) or /livez."""
        eligible = bool(self.node_eligible())
        ok = self.healthy() and eligible if check_node else self.alive()
        body: dict[str, Any] = {"lastUpdated": _rfc3339(self.last_updated), "currentTime": _rfc3339(time.time())}
        if check_node:
            body["nodeEligible"] = eligible
        return (200 if ok else 503), body


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 app: Callable[[str], tuple[int, dict[str, Any]]]) -> None:
        import socket

        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "zeroproxy"
    sys_version = ""

    def do_GET(self) -> None:
        code, body = self.server.app(self.path.split("?", 1)[0])
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the agent's log


def _serve(address: tuple[str, int], app: Callable[[str], tuple[int, dict[str, Any]]], name: str) -> _Server:
    server = _Server(address, _Handler, app)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


class HealthServer:
    """/healthz and /livez on the healthz bind address."""

    def __init__(self, bind_address: str, health: ProxyHealth) -> None:
        host, port = split_host_port(bind_address)
        self.health = health
        self._server = _serve((host, port), self._app, "healthz")
        self.address = self._server.server_address[:2]
        log.info("health server listening on %s", bind_address)

    def _app(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/healthz":
            return self.health.report(check_node=True)
        if path == "/livez":
            return self.health.report(check_node=False)
        return 404, {"error": f"no such path {path}; try /healthz or /livez"}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class ServiceHealth:
    """One healthCheckNodePort service as its probe sees it."""

    namespace: str
    name: str
    local_endpoints: int


class ServiceHealthServers:
    """One listener per healthCheckNodePort, opened and closed as services come and go."""

    def __init__(self, address: str, proxy: ProxyHealth) -> None:
        self.address = address
        self.proxy = proxy
        self.services: dict[int, ServiceHealth] = {}
        self._servers: dict[int, _Server] = {}
        self._failed: set[int] = set()  # ports whose bind failed, logged once

    def update(self, services: dict[int, ServiceHealth]) -> None:
        """Make the listeners match ``services`` (port -> state); state changes apply at once."""
        self.services = dict(services)
        for port in [p for p in self._servers if p not in services]:
            server = self._servers.pop(port)
            server.shutdown()
            server.server_close()
            log.info("healthCheckNodePort %d closed", port)
        for port, svc in services.items():
            if port in self._servers:
                continue
            try:
                self._servers[port] = _serve((self.address, port), self._app_for(port), f"hcnp-{port}")
            except OSError as e:
                if port not in self._failed:
                    log.error("Service %s/%s: cannot listen on healthCheckNodePort %s:%d: %s; will retry",
                              svc.namespace, svc.name, self.address, port, e.strerror or e)
                self._failed.add(port)
                continue
            self._failed.discard(port)
            log.info("Service %s/%s: healthCheckNodePort %d serving", svc.namespace, svc.name, port)

    def _app_for(self, port: int) -> Callable[[str], tuple[int, dict[str, Any]]]:
        def app(path: str) -> tuple[int, dict[str, Any]]:
            svc = self.services.get(port)
            if svc is None:
                return 503, {"error": "service gone"}
            proxy_ok = self.proxy.healthy()
            body = {"service": {"namespace": svc.namespace, "name": svc.name},
                    "localEndpoints": svc.local_endpoints, "serviceProxyHealthy": proxy_ok}
            return (200 if svc.local_endpoints > 0 and proxy_ok else 503), body
        return app

    @property
    def ports(self) -> list[int]:
        return sorted(self._servers)

    def close(self) -> None:
        self.update({})
