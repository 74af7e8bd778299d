"""Health servers over real HTTP on loopback (free ports): kube-proxy-compatible /healthz and
/livez, and healthCheckNodePort listeners. The agent-level checks (503 while an agent cannot get
its lists, healthCheckNodePort driven by EndpointSlices from the API) are in test_kube_agent.py."""

from __future__ import annotations

import datetime
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from controlplane.health import HealthServer, ProxyHealth, ServiceHealth, ServiceHealthServers
from testbed.sandbox import free_port


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Queue:
    """Stands in for the change tracker's queued_since: the health logic only reads this value."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.node_ok = True
        self.listed: float | None = float("-inf")  # when every kind was first listed; None: not yet


@pytest.fixture
def served() -> Iterator[tuple[Queue, ProxyHealth, str]]:
    q = Queue()
    health = ProxyHealth(0.5, lambda: q.since, lambda: q.node_ok, lambda: q.listed)
    server = HealthServer(f"127.0.0.1:{free_port()}", health)
    try:
        yield q, health, f"http://127.0.0.1:{server.address[1]}"
    finally:
        server.close()


def test_healthz_json_like_kube_proxy(served: tuple[Queue, ProxyHealth, str]) -> None:
    _, health, url = served
    health.updated()
    status, body = get(url + "/healthz")
    assert status == 200
    assert set(body) == {"lastUpdated", "currentTime", "nodeEligible"} and body["nodeEligible"] is True
    last = datetime.datetime.fromisoformat(body["lastUpdated"].replace("Z", "+00:00"))
    now = datetime.datetime.fromisoformat(body["currentTime"].replace("Z", "+00:00"))
    assert body["lastUpdated"].endswith("Z") and last <= now


def test_healthz_503_once_a_queued_change_waits_longer_than_the_timeout(
        served: tuple[Queue, ProxyHealth, str]) -> None:
    q, _, url = served
    q.since = time.monotonic()  # a change queued just now: still healthy
    assert get(url + "/healthz")[0] == 200
    q.since = time.monotonic() - 5  # queued 5 s ago, timeout 0.5 s
    assert get(url + "/healthz")[0] == 503
    assert get(url + "/livez")[0] == 503
    q.since = None  # the sync went through
    assert get(url + "/healthz")[0] == 200


def test_livez_does_not_count_the_wait_for_the_initial_lists(served: tuple[Queue, ProxyHealth, str]) -> None:
    """kube-proxy's rule for liveness: an agent whose lists keep failing (403, 404, no apiserver)
    is not restarted for it; /healthz (readiness) still says it has programmed nothing."""
    q, _, url = served
    q.since, q.listed = time.monotonic() - 5, None  # started 5 s ago, lists still not complete
    assert get(url + "/healthz")[0] == 503
    assert get(url + "/livez")[0] == 200
    q.listed = time.monotonic()  # the lists just completed: the first sync is due, not late
    assert get(url + "/livez")[0] == 200
    q.listed = time.monotonic() - 5  # listed 5 s ago and still nothing programmed: stuck
    assert get(url + "/livez")[0] == 503
    q.since = None  # the sync went through
    assert get(url + "/livez")[0] == 200 and get(url + "/healthz")[0] == 200


def test_node_being_deleted_fails_healthz_but_not_livez(served: tuple[Queue, ProxyHealth, str]) -> None:
    q, _, url = served
    q.node_ok = False
    status, body = get(url + "/healthz")
    assert status == 503 and body["nodeEligible"] is False
    status, body = get(url + "/livez")
    assert status == 200 and "nodeEligible" not in body
    assert get(url + "/nope")[0] == 404


def test_health_check_node_ports_open_answer_and_close() -> None:
    q = Queue()
    proxy = ProxyHealth(0.5, lambda: q.since)
    servers = ServiceHealthServers("127.0.0.1", proxy)
    p1, p2 = free_port(), free_port()
    try:
        servers.update({p1: ServiceHealth("ns", "one", 2), p2: ServiceHealth("ns", "two", 0)})
        assert servers.ports == sorted([p1, p2])
        status, body = get(f"http://127.0.0.1:{p1}/")
        assert status == 200
        assert body == {"service": {"namespace": "ns", "name": "one"}, "localEndpoints": 2,
                        "serviceProxyHealthy": True}
        assert get(f"http://127.0.0.1:{p2}/")[0] == 503
        q.since = time.monotonic() - 5  # the proxy is stuck: no node should get LB traffic
        status, body = get(f"http://127.0.0.1:{p1}/")
        assert status == 503 and body["serviceProxyHealthy"] is False
        q.since = None
        servers.update({p2: ServiceHealth("ns", "two", 1)})  # one gone, two got an endpoint
        assert get(f"http://127.0.0.1:{p2}/")[0] == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p1}/", timeout=2)
    finally:
        servers.close()
    assert servers.ports == []
