"""The agent on the real Kubernetes API, end to end: a real kube-apiserver + etcd (DevCluster), a
real agent process watching it, real eBPF in the kernel, real traffic between network namespaces.

One DevCluster, one test bed and one agent serve the whole module (each start costs seconds);
every test works in a namespace of its own, so the objects of one test never meet another's.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from dataplane import inspect
from testbed import nettools
from testbed.bed import Node, Pod, TestBed
from testbed.devcluster import DevCluster
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

pytestmark = pytest.mark.timeout(900)  # a fresh machine builds kube-apiserver in the first fixture

PORT = 8080
HEALTH_TIMEOUT = 2.0  # short, so a stuck agent shows within the test; real default is 2 x syncPeriod
HTTP = [{"name": "http", "port": PORT, "protocol": "TCP"}]


class Env:
    def __init__(self, cluster: DevCluster, bed: TestBed, tmp: Path) -> None:
        self.cluster = cluster
        self.bed = bed
        self.tmp = tmp
        self.api = cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self.node: Node = bed.add_node("a")
        self.client: Pod = bed.add_pod(self.node, "client")
        self.backends: list[Pod] = [bed.add_pod(self.node, f"web-{i}") for i in range(1, 5)]
        self.namespaces: list[str] = []  # made by the running test; its fixture deletes them
        for p in self.backends:
            p.serve(p.name, tcp=[PORT])
        self.agent = AgentProcess(tmp, self.node.cgroup_path, node_name="a", kubeconfig=cluster.kubeconfig_path,
                                  extra_args=["--health-timeout", f"{HEALTH_TIMEOUT}s",
                                              "--healthcheck-nodeport-address", "127.0.0.1"])

    # ---- the API side -----------------------------------------------------------------------------

    def namespace(self) -> str:
        name = f"zp-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.namespaces.append(name)
        return name

    def delete_namespaces(self) -> None:
        """The test's namespaces and everything in them, so the next test starts from an empty
        API (its agent would otherwise still program the last test's services)."""
        if not self.cluster.apiserver_running:
            self.cluster.start_apiserver()
        while self.namespaces:
            self.cluster.delete_namespace(self.namespaces.pop())

    def create_service(self, ns: str, name: str, port: int = 80, labels: dict[str, str] | None = None,
                       **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels or {}},
                "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": PORT}],
                         **spec}}
        return _json(self.core.create_namespaced_service(ns, body, _preload_content=False))

    def replace_service(self, ns: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        svc = _json(self.core.read_namespaced_service(name, ns, _preload_content=False))
        change(svc)
        return _json(self.core.replace_namespaced_service(name, ns, svc, _preload_content=False))

    def delete_service(self, ns: str, name: str) -> None:
        # 1.20 answers with a Status the typed client cannot parse: read it raw.
        _json(self.core.delete_namespaced_service(name, ns, _preload_content=False))

    def _slices(self, method: str, ns: str, name: str = "", body: Any = None) -> dict[str, Any]:
        """EndpointSlice requests in the cluster's version (the typed client has no v1beta1)."""
        path = self.cluster.endpointslice_path.replace("/endpointslices", f"/namespaces/{ns}/endpointslices")
        return _json(self.api.call_api(
            path + (f"/{name}" if name else ""), method, body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True))

    def put_slice(self, ns: str, svc: str, endpoints: list[tuple[Pod, dict[str, bool], str]],
                  name: str | None = None, zones: dict[str, str] | None = None) -> dict[str, Any]:
        """Create or replace a slice whose endpoints are (pod, conditions, node name); returns
        it as the apiserver stored it. ``zones`` hints pods (by name) for a zone.

        v1 says the node in ``nodeName``; v1beta1 as 1.20's controller writes it, in
        ``topology`` (its nodeName is an alpha field that the apiserver drops)."""
        body = endpoint_slice(svc, [], HTTP, namespace=ns, name=name or f"{svc}-1")
        body["apiVersion"] = self.cluster.endpointslice_api_version
        beta = self.cluster.endpointslice_api == "v1beta1"
        body["endpoints"] = [{"addresses": [pod.ip4], "conditions": cond,
                              **({"topology": {"kubernetes.io/hostname": node}} if beta else {"nodeName": node}),
                              **({"hints": {"forZones": [{"name": zones[pod.name]}]}}
                                 if zones and pod.name in zones else {})}
                             for pod, cond, node in endpoints]
        try:
            return self._slices("POST", ns, body=body)
        except client.ApiException as e:
            if e.status != 409:
                raise
            old = self._slices("GET", ns, body["metadata"]["name"])
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            return self._slices("PUT", ns, body["metadata"]["name"], body)

    def delete_slice(self, ns: str, name: str) -> None:
        self._slices("DELETE", ns, name)

    # ---- the kernel side --------------------------------------------------------------------------

    def programmed(self) -> dict[str, list[str]]:
        return {s.frontend: sorted(s.backends) for s in inspect.service_list(self.agent.pin_dir)}

    def wait_programmed(self, frontend: str, backends: list[Pod] | None, timeout: float = 20.0) -> None:
        """Wait until the maps hold ``frontend`` with exactly these backends (None: not at all)."""
        want = None if backends is None else sorted(f"{p.ip4}:{PORT}" for p in backends)
        deadline = time.monotonic() + timeout
        have: Any = None
        while time.monotonic() < deadline:
            have = self.programmed().get(frontend)
            if have == want:
                return
            time.sleep(0.05)
        raise AssertionError(f"{frontend}: want {want}, maps hold {have}\n{self.agent.log_text()[-3000:]}")

    def traffic(self, vip: str, port: int = 80, count: int = 60, timeout: float = 2.0) -> list[dict[str, Any]]:
        return self.client.client(nettools.format_target(vip, port), count=count, concurrency=4, timeout=timeout)

    # ---- the agent's servers ------------------------------------------------------------------------

    def get(self, url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as "name{labels}" -> value."""
        status, text = self.get(self.agent.metrics_url)
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def _json(resp: Any) -> dict[str, Any]:
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def ok_names(records: list[dict[str, Any]]) -> collections.Counter[str]:
    bad = [r for r in records if not r["ok"]]
    assert not bad, f"{len(bad)} of {len(records)} attempts failed, first: {bad[:3]}"
    return collections.Counter(r["server_name"] for r in records)


READY = {"ready": True, "serving": True, "terminating": False}
NOT_READY = {"ready": False, "serving": False, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
TERMINATING_NOT_SERVING = {"ready": False, "serving": False, "terminating": True}


def _env(tmp: Path, endpointslice_api: str) -> Iterator[Env]:
    with DevCluster(endpointslice_api=endpointslice_api) as cluster:
        bed = TestBed(prefix="zp")
        try:
            e = Env(cluster, bed, tmp)
            try:
                e.agent.start()
                yield e
            finally:
                e.agent.close()
                e.api.close()
        finally:
            bed.close()


def _running(env: Env) -> Env:
    if not env.cluster.apiserver_running:
        env.cluster.start_apiserver()
    if env.agent.proc is None or env.agent.proc.poll() is not None:
        env.agent.start()
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, stale_beds_removed: list[str]) -> Iterator[Env]:
    """EndpointSlice v1 (DevCluster's CRD), as Kubernetes 1.21 and later serve it."""
    yield from _env(tmp_path_factory.mktemp("kube-agent"), "v1")


@pytest.fixture
def agent_env(env: Env) -> Iterator[Env]:
    """The module's Env with the apiserver and the agent running (an earlier test may have
    stopped them); the namespaces the test made are deleted after it, pass or fail."""
    try:
        yield _running(env)
    finally:
        env.delete_namespaces()


@pytest.fixture(scope="module")
def beta_env(tmp_path_factory: pytest.TempPathFactory, stale_beds_removed: list[str]) -> Iterator[Env]:
    """The API exactly as 1.20 serves it: EndpointSlice discovery.k8s.io/v1beta1 only."""
    yield from _env(tmp_path_factory.mktemp("kube-agent-v1beta1"), "v1beta1")


@pytest.fixture
def beta_agent_env(beta_env: Env) -> Iterator[Env]:
    try:
        yield _running(beta_env)
    finally:
        beta_env.delete_namespaces()


def test_endpointslice_version_is_chosen_by_discovery(agent_env: Env) -> None:
    log = agent_env.agent.log_text(since_start=False)
    assert "EndpointSlice: using discovery.k8s.io/v1 (the server serves v1 of discovery.k8s.io)" in log, log[-3000:]


def test_services_and_slices_follow_the_api(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, web3, web4 = e.backends
    vip = e.create_service(ns, "web")["spec"]["clusterIP"]
    fe = f"{vip}:80/TCP"
    e.wait_programmed(fe, [])  # a service without slices: a frontend that refuses
    refused = e.traffic(vip, count=5)
    assert all(r["error"] == "ECONNREFUSED" for r in refused), refused

    e.put_slice(ns, "web", [(p, READY, "a") for p in (web1, web2, web3)])
    e.wait_programmed(fe, [web1, web2, web3])
    assert set(ok_names(e.traffic(vip, count=90))) == {"web-1", "web-2", "web-3"}

    e.put_slice(ns, "web", [(web1, READY, "a"), (web4, READY, "a")])  # update: swap backends
    e.wait_programmed(fe, [web1, web4])
    assert set(ok_names(e.traffic(vip, count=60))) == {"web-1", "web-4"}

    e.put_slice(ns, "web", [(web2, READY, "a")], name="web-2")  # a second slice adds to the first
    e.wait_programmed(fe, [web1, web2, web4])

    e.replace_service(ns, "web", lambda s: s["spec"]["ports"][0].update(port=8000))  # change the port
    e.wait_programmed(f"{vip}:8000/TCP", [web1, web2, web4])
    e.wait_programmed(fe, None)
    assert set(ok_names(e.traffic(vip, 8000, count=30))) == {"web-1", "web-2", "web-4"}
    old = e.traffic(vip, 80, count=3, timeout=1)
    assert not any(r["ok"] for r in old), "the old service port still reaches a backend"

    e.delete_slice(ns, "web-1")
    e.delete_slice(ns, "web-2")
    e.wait_programmed(f"{vip}:8000/TCP", [])
    assert all(r["error"] == "ECONNREFUSED" for r in e.traffic(vip, 8000, count=5))

    e.delete_service(ns, "web")
    e.wait_programmed(f"{vip}:8000/TCP", None)


def test_terminating_endpoints_serve_only_when_none_is_ready(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, web3, _ = e.backends
    vip = e.create_service(ns, "roll")["spec"]["clusterIP"]
    fe = f"{vip}:80/TCP"
    # A rollout's last moment: nothing ready, one old pod still serving while it terminates.
    e.put_slice(ns, "roll", [(web1, TERMINATING, "a"), (web2, TERMINATING_NOT_SERVING, "a"),
                             (web3, NOT_READY, "a")])
    e.wait_programmed(fe, [web1])
    assert ok_names(e.traffic(vip, count=20)) == {"web-1": 20}
    # The new pod becomes ready: terminating endpoints stop getting new connections.
    e.put_slice(ns, "roll", [(web1, TERMINATING, "a"), (web3, READY, "a")])
    e.wait_programmed(fe, [web3])
    assert ok_names(e.traffic(vip, count=20)) == {"web-3": 20}


def test_service_of_another_proxy_is_ignored(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1 = e.backends[0]
    other = e.create_service(ns, "theirs", labels={"service.kubernetes.io/service-proxy-name": "other-proxy"})
    ours = e.create_service(ns, "ours")
    for name in ("theirs", "ours"):
        e.put_slice(ns, name, [(web1, READY, "a")])
    e.wait_programmed(f"{ours['spec']['clusterIP']}:80/TCP", [web1])
    # Both synced together (same namespace, same moment); the labelled one was left alone.
    assert f"{other['spec']['clusterIP']}:80/TCP" not in e.programmed()
    assert not any(r["ok"] for r in e.traffic(other["spec"]["clusterIP"], count=3, timeout=1))
    # Dropping the label hands it to us.
    e.replace_service(ns, "theirs", lambda s: s["metadata"].pop("labels"))
    e.wait_programmed(f"{other['spec']['clusterIP']}:80/TCP", [web1])


def test_health_check_node_port_counts_local_ready_endpoints(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, _, _ = e.backends
    svc = e.create_service(ns, "lb", type="LoadBalancer", externalTrafficPolicy="Local")
    hcnp = svc["spec"]["healthCheckNodePort"]
    url = f"http://127.0.0.1:{hcnp}/"
    e.put_slice(ns, "lb", [(web1, READY, "a"), (web2, READY, "b")])
    e.wait_programmed(f"{svc['spec']['clusterIP']}:80/TCP", [web1, web2])  # ClusterIP: every node's

    def wait_health(code: int, local: int) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        got: Any = None
        while time.monotonic() < deadline:
            try:
                got = e.get(url)
            except OSError as err:  # not listening yet
                got = err
            if isinstance(got, tuple) and got[0] == code and json.loads(got[1])["localEndpoints"] == local:
                return json.loads(got[1])
            time.sleep(0.1)
        raise AssertionError(f"healthCheckNodePort {hcnp}: want {code}/{local}, got {got}")

    body = wait_health(200, 1)
    assert body["service"] == {"namespace": ns, "name": "lb"} and body["serviceProxyHealthy"] is True
    e.put_slice(ns, "lb", [(web1, NOT_READY, "a"), (web2, READY, "b")])  # no ready endpoint here
    wait_health(503, 0)
    e.delete_service(ns, "lb")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            e.get(url)
        except OSError:
            break  # the listener closed with its service
        time.sleep(0.1)
    else:
        raise AssertionError(f"healthCheckNodePort {hcnp} still listening after the service was deleted")


def _counter(metrics: dict[str, float], name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return metrics.get(f"{name}{{{inner}}}" if inner else name, 0.0)


def _api_failures(metrics: dict[str, float]) -> float:
    """List and watch requests the agent saw fail (the source's error counter)."""
    return sum(_counter(metrics, "zeroproxy_errors_total", kind=k) for k in ("list", "watch"))


def _wait_api_failures(e: Env, more_than: float, timeout: float = 60.0) -> dict[str, float]:
    """Wait for the condition itself (the agent saw the API fail), not for a log line about it.
    The agent listens from its first second, but a just-started process may not yet: until the
    deadline a refused connection is "not yet"."""
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            m = e.metrics()
        except OSError as exc:
            seen = exc
        else:
            seen = _api_failures(m)
            if seen > more_than:
                return m
        time.sleep(0.1)
    raise AssertionError(f"no failed list/watch counted after {timeout}s (last: {seen!r})\n"
                         f"{e.agent.log_text()[-3000:]}")


def test_apiserver_restart_converges_without_rewriting_unchanged_services(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, web3, _ = e.backends
    vips = {}
    for i in range(5):
        vips[i] = e.create_service(ns, f"s{i}")["spec"]["clusterIP"]
        e.put_slice(ns, f"s{i}", [(web1, READY, "a"), (web2, READY, "a")])
    for vip in vips.values():
        e.wait_programmed(f"{vip}:80/TCP", [web1, web2])
    before = e.metrics()

    failures = _api_failures(e.metrics())
    e.cluster.stop_apiserver(kill=True)  # mid-watch, no goodbye
    _wait_api_failures(e, failures)
    assert set(ok_names(e.traffic(vips[0], count=20))) <= {"web-1", "web-2"}  # dataplane keeps serving
    e.cluster.start_apiserver()
    e.put_slice(ns, "s4", [(web3, READY, "a")])  # the one change made after the outage
    e.wait_programmed(f"{vips[4]}:80/TCP", [web3], timeout=60)  # watchers may still be backing off
    assert ok_names(e.traffic(vips[4], count=10)) == {"web-3": 10}
    after = e.metrics()

    def delta(what: str) -> float:
        return (_counter(after, "zeroproxy_map_writes_total", what=what)
                - _counter(before, "zeroproxy_map_writes_total", what=what))

    # Only s4's frontend was rewritten: the relist brought back the other services unchanged
    # and the change tracker dropped them before the map side saw them.
    assert delta("frontends_written") == 1, e.agent.log_text()[-3000:]
    assert delta("frontends_deleted") == 0
    assert _counter(after, "zeroproxy_syncs_total", mode="full") == _counter(before, "zeroproxy_syncs_total",
                                                                              mode="full")
    for i in range(4):
        assert e.programmed()[f"{vips[i]}:80/TCP"] == sorted(f"{p.ip4}:{PORT}" for p in (web1, web2))


def test_forced_410_relists_once_without_flapping(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, _, _ = e.backends
    vip = e.create_service(ns, "gone")["spec"]["clusterIP"]
    e.put_slice(ns, "gone", [(web1, READY, "a")])
    e.wait_programmed(f"{vip}:80/TCP", [web1])
    before = e.metrics()
    # Writes no watcher sees move etcd past every watcher's resourceVersion; compaction then makes
    # those versions unreadable and a restarted apiserver's watch cache starts after them.
    for i in range(3):
        _json(e.core.create_namespaced_config_map(ns, {"metadata": {"name": f"bump-{i}"}},
                                                  _preload_content=False))
    gones = e.agent.log_text().count("410 Gone")
    e.cluster.compact_etcd()
    e.cluster.restart_apiserver()
    e.agent.wait_log("410 Gone", count=gones + 1, timeout=60)
    e.put_slice(ns, "gone", [(web2, READY, "a")])  # the relisted watch still delivers
    e.wait_programmed(f"{vip}:80/TCP", [web2], timeout=60)
    time.sleep(3)  # a flapping watcher would relist again and again in this time
    after = e.metrics()
    for kind in ("Service", "EndpointSlice"):
        relists = (_counter(after, "zeroproxy_watch_relists_total", resource=kind)
                   - _counter(before, "zeroproxy_watch_relists_total", resource=kind))
        assert relists == 1, (kind, relists, e.agent.log_text()[-3000:])
    log = e.agent.log_text()
    assert len(re.findall(r"Service: relist of \d+ objects", log)) >= 1
    assert ok_names(e.traffic(vip, count=10)) == {"web-2": 10}


def test_agent_sigkill_restart_under_traffic_keeps_stale_until_resync(agent_env: Env, tmp_path: Path) -> None:
    e = agent_env
    ns = e.namespace()
    web1, web2, web3, _ = e.backends
    keep = e.create_service(ns, "keep")["spec"]["clusterIP"]
    stale = e.create_service(ns, "stale")["spec"]["clusterIP"]
    e.put_slice(ns, "keep", [(web1, READY, "a"), (web2, READY, "a")])
    e.put_slice(ns, "stale", [(web3, READY, "a")])
    e.wait_programmed(f"{keep}:80/TCP", [web1, web2])
    e.wait_programmed(f"{stale}:80/TCP", [web3])

    stop = tmp_path / "stop"
    argv = nettools.client_argv(nettools.format_target(keep, 80), count=0, interval=0.005, timeout=2,
                                until_file=str(stop))
    loop = e.client.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        e.agent.kill()  # SIGKILL: no chance to clean anything up
        e.delete_service(ns, "stale")  # ...and the world changes while no agent watches
        e.cluster.stop_apiserver()
        e.agent.start(wait_synced=False)
        # The new agent adopted the maps and cannot list: the stale service must stay (it might
        # still exist for all the agent knows) and the agent must say it is stuck, once the
        # initial list has waited longer than the health timeout. The health server listens
        # before the programs compile: once the agent answers at all, every probe is answered
        # (a refused connection would fail the test), 200 until the timeout, then 503.
        _wait_api_failures(e, 0)
        deadline = time.monotonic() + HEALTH_TIMEOUT + 30
        while True:
            status, body = e.get(e.agent.healthz_url + "/healthz")
            if status == 503 or time.monotonic() > deadline:
                break
            assert status == 200 and json.loads(body)["lastUpdated"] == "", body
            time.sleep(0.2)
        assert status == 503, body
        started = e.agent.log_text()  # this run's log: the probes listened before the maps were adopted
        assert -1 < started.find("health server listening") < started.find("adopted "), started[-3000:]
        assert -1 < started.find("metrics server listening") < started.find("adopted "), started[-3000:]
        report = json.loads(body)
        assert set(report) == {"lastUpdated", "currentTime", "nodeEligible"} and report["lastUpdated"] == ""
        # ...but it is not wedged: a restart cannot bring the apiserver back, so liveness holds
        # (kube-proxy's rule: waiting for the initial lists does not count).
        assert e.get(e.agent.healthz_url + "/livez")[0] == 200
        assert e.programmed()[f"{stale}:80/TCP"] == [f"{web3.ip4}:{PORT}"]
        stuck = e.metrics()  # nothing is programmed before the initial lists: not one sync ran
        assert [_counter(stuck, "zeroproxy_syncs_total", mode=m) for m in ("full", "partial")] == [0, 0]

        e.cluster.start_apiserver()
        e.agent.wait_log("initial sync done", timeout=60)
        e.wait_programmed(f"{stale}:80/TCP", None, timeout=1)  # removed by the resync itself
        status, body = e.get(e.agent.healthz_url + "/healthz")
        assert status == 200 and json.loads(body)["lastUpdated"] != "", body
        time.sleep(1.0)
    finally:
        stop.touch()
        out, err = loop.communicate(timeout=60)
    records = nettools.parse_results(out)
    assert len(records) > 100, (len(records), err[-500:])
    names = ok_names(records)  # zero failed requests across the kill, the outage and the restart
    assert set(names) == {"web-1", "web-2"}
    log = e.agent.log_text()
    assert re.search(r"sync \(full\): [^\n]*frontends written, 1 deleted;", log), log[-3000:]


def test_the_first_owner_keeps_a_contested_frontend_across_an_agent_restart(agent_env: Env) -> None:
    """Through the real API: a Service created later that names a serving address in its
    externalIPs (another's allocated ClusterIP, or an externalIP already in use) takes nothing,
    however its name sorts; a restarted agent, which saw neither claim first, decides the same
    way from the Services' creationTimestamps."""
    import signal

    e = agent_env
    ns = e.namespace()
    web1, web2, web3, _ = e.backends
    vip = e.create_service(ns, "web")["spec"]["clusterIP"]
    e.put_slice(ns, "web", [(web1, READY, "a")])
    ext = "198.51.100.7"
    first = e.create_service(ns, "z-first", externalIPs=[ext])
    e.put_slice(ns, "z-first", [(web2, READY, "a")])
    e.wait_programmed(f"{ext}:80/TCP", [web2])
    # creationTimestamp has whole seconds: make "later" visible in it
    created = first["metadata"]["creationTimestamp"]
    while time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) <= created:
        time.sleep(0.05)
    late_vip = e.create_service(ns, "a-late", externalIPs=[ext, vip])["spec"]["clusterIP"]
    e.put_slice(ns, "a-late", [(web3, READY, "a")])
    e.wait_programmed(f"{late_vip}:80/TCP", [web3])  # a-late is programmed, bar what it may not have

    def check() -> None:
        have = e.programmed()
        assert have[f"{ext}:80/TCP"] == [f"{web2.ip4}:{PORT}"] and have[f"{vip}:80/TCP"] == [f"{web1.ip4}:{PORT}"]
        assert ok_names(e.traffic(ext, count=20)) == {"web-2": 20}
        assert ok_names(e.traffic(vip, count=20)) == {"web-1": 20}
        assert _counter(e.metrics(), "zeroproxy_frontend_conflicts") == 2

    check()
    log = e.agent.log_text()
    assert (f"Service {ns}/a-late: frontend {ext}:80/TCP (ExternalIP) is not programmed: it was in use first "
            f"by Service {ns}/z-first (ExternalIP)") in log, log[-3000:]
    assert (f"Service {ns}/a-late: frontend {vip}:80/TCP (ExternalIP) is not programmed: the cluster "
            f"allocated it to Service {ns}/web (ClusterIP)") in log, log[-3000:]
    e.agent.kill(signal.SIGTERM)
    e.agent.start()
    check()


ZONE_LABEL = "topology.kubernetes.io/zone"


def _topology_service(e: Env, ns: str, name: str) -> dict[str, Any]:
    """A Service asking for topology-aware routing both ways: the topology-mode annotation and
    spec.trafficDistribution (1.30+); returns it as the apiserver stored it."""
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}],
                     "trafficDistribution": "PreferClose"}}
    return _json(e.core.create_namespaced_service(ns, body, _preload_content=False))


def _label_zone(e: Env, zone: str | None) -> None:
    """Node "a" (the agent's) with this zone label, created the first time."""
    labels = {ZONE_LABEL: zone}
    try:
        e.core.patch_node("a", {"metadata": {"labels": labels}})
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        e.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a", "labels": labels}})


def _delete_node(e: Env) -> None:
    try:
        e.core.delete_node("a")
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def test_topology_hints_through_the_api_follow_this_nodes_zone(agent_env: Env) -> None:
    """EndpointSlice v1 keeps hints.forZones: the agent uses the endpoint hinted for its Node's
    zone, follows a relabelled Node, and uses all endpoints once the node has no zone."""
    e = agent_env
    ns = e.namespace()
    web1, web2, _, _ = e.backends
    try:
        _label_zone(e, "z1")
        svc = _topology_service(e, ns, "near")
        vip = svc["spec"]["clusterIP"]
        stored = e.put_slice(ns, "near", [(web1, READY, "a"), (web2, READY, "b")],
                             zones={"web-1": "z1", "web-2": "z2"})
        assert [ep["hints"] for ep in stored["endpoints"]] == [{"forZones": [{"name": "z1"}]},
                                                               {"forZones": [{"name": "z2"}]}]
        e.wait_programmed(f"{vip}:80/TCP", [web1])
        assert ok_names(e.traffic(vip, count=20)) == {"web-1": 20}
        _label_zone(e, "z2")
        e.wait_programmed(f"{vip}:80/TCP", [web2])
        assert ok_names(e.traffic(vip, count=20)) == {"web-2": 20}
        e.core.patch_node("a", {"metadata": {"labels": {ZONE_LABEL: None}}})  # no zone: every endpoint
        e.wait_programmed(f"{vip}:80/TCP", [web1, web2])
        assert set(ok_names(e.traffic(vip, count=40))) == {"web-1", "web-2"}
    finally:
        _delete_node(e)


def test_kube_apiserver_1_20_drops_hints_and_traffic_distribution(beta_agent_env: Env) -> None:
    """What 1.20 keeps of topology-aware routing: the annotation and the Node's zone label, but
    not spec.trafficDistribution (1.30) nor v1beta1's endpoints[].hints (1.21). Without hints
    the agent falls back to every endpoint, as kube-proxy; the file source covers the rest
    (tests/test_topology.py)."""
    e = beta_agent_env
    ns = e.namespace()
    web1, web2, _, _ = e.backends
    try:
        _label_zone(e, "z1")
        assert e.core.read_node("a").metadata.labels[ZONE_LABEL] == "z1"
        svc = _topology_service(e, ns, "near")
        assert svc["metadata"]["annotations"]["service.kubernetes.io/topology-mode"] == "Auto"
        assert "trafficDistribution" not in svc["spec"], svc["spec"]
        stored = e.put_slice(ns, "near", [(web1, READY, "a"), (web2, READY, "b")],
                             zones={"web-1": "z1", "web-2": "z2"})
        assert stored["apiVersion"] == "discovery.k8s.io/v1beta1"
        assert [sorted(ep) for ep in stored["endpoints"]] == [["addresses", "conditions", "topology"]] * 2
        vip = svc["spec"]["clusterIP"]
        e.wait_programmed(f"{vip}:80/TCP", [web1, web2])
        assert set(ok_names(e.traffic(vip, count=40))) == {"web-1", "web-2"}
    finally:
        _delete_node(e)


def test_metrics_expose_the_listed_series(agent_env: Env) -> None:
    e = agent_env
    ns = e.namespace()
    vip = e.create_service(ns, "m")["spec"]["clusterIP"]
    e.put_slice(ns, "m", [(e.backends[0], READY, "a")])
    e.wait_programmed(f"{vip}:80/TCP", [e.backends[0]])
    e.traffic(vip, count=5)
    e.delete_slice(ns, "m-1")
    e.wait_programmed(f"{vip}:80/TCP", [])
    e.traffic(vip, count=3)  # refused: a no_backend drop in the datapath
    m = e.metrics()
    names = {k.split("{")[0] for k in m}
    for series in (
        "zeroproxy_sync_proxy_rules_duration_seconds_bucket",
        "zeroproxy_network_programming_duration_seconds_bucket",
        "zeroproxy_sync_proxy_rules_last_timestamp_seconds",
        "zeroproxy_services_programmed",
        "zeroproxy_frontends_programmed",
        "zeroproxy_backends_programmed",
        "zeroproxy_map_fill_ratio",
        "zeroproxy_datapath_drops_total",
        "zeroproxy_errors_total",
        "zeroproxy_watch_relists_total",
    ):
        assert series in names, series
    assert _counter(m, "zeroproxy_datapath_drops_total", reason="no_backend") >= 3
    assert _counter(m, "zeroproxy_datapath_events_total", event="xlate_ok") >= 5
    assert _counter(m, "zeroproxy_network_programming_duration_seconds_count") >= 2
    assert m["zeroproxy_frontends_programmed"] == len(e.programmed())
    assert 0 < _counter(m, "zeroproxy_map_fill_ratio", map="zp_lb4_svc") < 1
    assert _counter(m, "zeroproxy_errors_total", kind="sync") == 0


def test_internal_traffic_policy_local(agent_env: Env) -> None:
    """iTP=Local sends a node's clients to that node's endpoints only.

    kube-apiserver 1.20 (the newest that can be built here) predates the field and drops it on
    write -- checked first, so this test notices the day DevCluster serves it. Until then the
    same agent code (change tracker, translation, maps) is driven from the file source on a
    second node of the bed, with real traffic.
    """
    e = agent_env
    ns = e.namespace()
    stored = e.create_service(ns, "local", internalTrafficPolicy="Local")
    assert "internalTrafficPolicy" not in stored["spec"], "the apiserver keeps iTP now: drive this test by the API"

    node_b = e.bed.add_node("b")
    client_b = e.bed.add_pod(node_b, "client-b")
    local_b = e.bed.add_pod(node_b, "local-b")
    local_b.serve("local-b", tcp=[PORT])
    remote = e.backends[0]  # web-1, on node a
    vip = "10.96.200.1"
    objects = [
        service("local", [vip], [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}],
                internalTrafficPolicy="Local"),
        endpoint_slice("local", [local_b.ip4], HTTP, name="local-b", node_name="b"),
        endpoint_slice("local", [remote.ip4], HTTP, name="local-a", node_name="a"),
        service("cluster", ["10.96.200.2"], [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}]),
        endpoint_slice("cluster", [local_b.ip4], HTTP, name="cluster-b", node_name="b"),
        endpoint_slice("cluster", [remote.ip4], HTTP, name="cluster-a", node_name="a"),
    ]
    with AgentProcess(e.tmp / "node-b", node_b.cgroup_path, node_name="b", name="agent-b") as agent_b:
        agent_b.write(objects)
        agent_b.start()
        have = {s.frontend: sorted(s.backends) for s in inspect.service_list(agent_b.pin_dir)}
        assert have[f"{vip}:80/TCP"] == [f"{local_b.ip4}:{PORT}"]
        assert have["10.96.200.2:80/TCP"] == sorted([f"{local_b.ip4}:{PORT}", f"{remote.ip4}:{PORT}"])
        local = client_b.client(nettools.format_target(vip, 80), count=40, concurrency=4)
        assert ok_names(local) == {"local-b": 40}
        spread = client_b.client(nettools.format_target("10.96.200.2", 80), count=60, concurrency=4)
        assert set(ok_names(spread)) == {"local-b", "web-1"}  # the Cluster policy still spreads
        # No local endpoint left: the frontend refuses rather than leaving the node.
        agent_b.write(objects[:1] + objects[2:])
        deadline = time.monotonic() + 20
        while {s.frontend: s.backends for s in inspect.service_list(agent_b.pin_dir)}.get(f"{vip}:80/TCP"):
            assert time.monotonic() < deadline, agent_b.log_text()[-2000:]
            time.sleep(0.05)
        refused = client_b.client(nettools.format_target(vip, 80), count=5)
        assert all(r["error"] == "ECONNREFUSED" for r in refused), refused


def test_session_affinity_holds_then_expires(agent_env: Env) -> None:
    """sessionAffinity: ClientIP from the API: a client pod sticks to one backend across
    connections, and chooses afresh once it was idle longer than timeoutSeconds."""
    e = agent_env
    ns = e.namespace()
    svc = e.create_service(ns, "sticky", sessionAffinity="ClientIP",
                           sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}})
    assert svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == 1
    vip = svc["spec"]["clusterIP"]
    e.put_slice(ns, "sticky", [(p, READY, "a") for p in e.backends[:3]])
    e.wait_programmed(f"{vip}:80/TCP", e.backends[:3])
    target = nettools.format_target(vip, 80)
    chosen = []
    for _ in range(12):
        burst = ok_names(e.client.client(target, count=5))
        assert sum(burst.values()) == 5 and len(burst) == 1, burst  # sticky within the timeout
        chosen.append(next(iter(burst)))
        time.sleep(1.3)  # idle past timeoutSeconds
    # twelve fresh random choices among three backends all alike has probability 3^-11
    assert len(set(chosen)) > 1, chosen


# ---- discovery.k8s.io/v1beta1: the API of a real 1.20 cluster ---------------------------------------


def test_v1beta1_slices_are_found_by_discovery_and_followed(beta_agent_env: Env) -> None:
    """A 1.20 apiserver serves EndpointSlices as v1beta1 only, with the node in topology: the
    agent finds the version by discovery, and Services, slices, updates, node locality
    (healthCheckNodePort counts this node's endpoints) and deletes all reach the kernel."""
    e = beta_agent_env
    log = e.agent.log_text(since_start=False)
    assert "EndpointSlice: using discovery.k8s.io/v1beta1 (the server serves v1beta1 of discovery.k8s.io)" in log
    # decided by discovery, not by trying v1 first: not one list failed (a 404 would be one)
    assert _counter(e.metrics(), "zeroproxy_errors_total", kind="list") == 0, log[-3000:]
    ns = e.namespace()
    web1, web2, web3, _ = e.backends
    vip = e.create_service(ns, "web")["spec"]["clusterIP"]
    fe = f"{vip}:80/TCP"
    e.put_slice(ns, "web", [(web1, READY, "a"), (web2, READY, "b")])
    e.wait_programmed(fe, [web1, web2])
    assert set(ok_names(e.traffic(vip, count=60))) == {"web-1", "web-2"}
    e.put_slice(ns, "web", [(web3, READY, "a"), (web2, NOT_READY, "b")])
    e.wait_programmed(fe, [web3])
    assert ok_names(e.traffic(vip, count=20)) == {"web-3": 20}

    svc = e.create_service(ns, "lb", type="LoadBalancer", externalTrafficPolicy="Local")
    url = f"http://127.0.0.1:{svc['spec']['healthCheckNodePort']}/"
    e.put_slice(ns, "lb", [(web1, READY, "a"), (web2, READY, "b"), (web3, READY, "b")])
    e.wait_programmed(f"{svc['spec']['clusterIP']}:80/TCP", [web1, web2, web3])
    deadline = time.monotonic() + 20
    got: Any = None
    while time.monotonic() < deadline:
        try:
            got = e.get(url)
        except OSError as err:  # not listening yet
            got = err
        if isinstance(got, tuple) and got[0] == 200:
            break
        time.sleep(0.1)
    assert isinstance(got, tuple) and json.loads(got[1])["localEndpoints"] == 1, got  # web-1: topology says "a"

    e.delete_slice(ns, "web-1")
    e.wait_programmed(fe, [])
    assert all(r["error"] == "ECONNREFUSED" for r in e.traffic(vip, count=5))
    e.delete_service(ns, "web")
    e.wait_programmed(fe, None)


def test_v1beta1_watch_survives_an_apiserver_restart(beta_agent_env: Env) -> None:
    """The relist after an outage rediscovers the version and the watch resumes on v1beta1."""
    e = beta_agent_env
    ns = e.namespace()
    web1, web2, _, _ = e.backends
    vip = e.create_service(ns, "again")["spec"]["clusterIP"]
    e.put_slice(ns, "again", [(web1, READY, "a")])
    e.wait_programmed(f"{vip}:80/TCP", [web1])
    failures = _api_failures(e.metrics())
    e.cluster.stop_apiserver(kill=True)
    _wait_api_failures(e, failures)
    e.cluster.start_apiserver()
    e.put_slice(ns, "again", [(web2, READY, "a")])
    e.wait_programmed(f"{vip}:80/TCP", [web2], timeout=60)
    assert ok_names(e.traffic(vip, count=10)) == {"web-2": 10}
    e.agent.wait_log("works again")
