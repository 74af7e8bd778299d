"""The watchers on their own against a real kube-apiserver (DevCluster): the list+watch protocol,
client configuration (kubeconfig, $KUBECONFIG, in-cluster, explicit server) and this-node-only
Node/Pod selection. The agent-level behaviour with traffic is in test_kube_agent.py."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from controlplane import kubesource
from controlplane.kubesource import KubeSource, Resource, load_configuration, resources
from testbed.devcluster import DevCluster

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster() as c:
        yield c


@pytest.fixture(scope="module")
def beta_cluster() -> Iterator[DevCluster]:
    """The 1.20 API as a kubeadm cluster serves it: EndpointSlice discovery.k8s.io/v1beta1 only."""
    with DevCluster(endpointslice_api="v1beta1") as c:
        yield c


@pytest.fixture
def namespaces() -> Iterator[Callable[[DevCluster], str]]:
    """Makes fresh namespaces (in either cluster); each is deleted, with its objects, afterwards."""
    made: list[tuple[DevCluster, str]] = []

    def make(cluster: DevCluster) -> str:
        name = f"zp-{uuid.uuid4().hex[:8]}"
        with cluster.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespace({"metadata": {"name": name}})
            made.append((cluster, name))
            # No controller-manager: the ServiceAccount admission plugin needs this for pods.
            core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
        return name

    yield make
    for cluster, name in made:
        cluster.delete_namespace(name)


@pytest.fixture
def namespace(cluster: DevCluster, namespaces: Callable[[DevCluster], str]) -> str:
    return namespaces(cluster)


class Recorder:
    """Runs a KubeSource on an asyncio loop in a thread and records what it delivers, in order."""

    def __init__(self, configuration: Any, res: list[Resource]) -> None:
        self.lists: list[tuple[str, list[dict[str, Any]]]] = []
        self.events: list[tuple[str, str, str]] = []  # kind, type, namespace/name
        self.statuses: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.source = KubeSource(configuration, res, self._on_list, self._on_event, self._on_status, backoff_cap=2)
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self.source.run(),), daemon=True)
        self._thread.start()

    def _on_list(self, kind: str, objects: list[dict[str, Any]], received: float) -> None:
        self.lists.append((kind, objects))

    def _on_event(self, kind: str, event: str, obj: dict[str, Any], received: float) -> None:
        meta = obj["metadata"]
        self.events.append((kind, event, f"{meta.get('namespace', '')}/{meta['name']}"))

    def _on_status(self, kind: str, what: str, detail: str) -> None:
        self.statuses.append((kind, what))

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: lists {[(k, len(o)) for k, o in self.lists]}, events {self.events}, "
                                     f"statuses {self.statuses}")
            time.sleep(0.05)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.source.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the source did not stop"
        self.loop.close()


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for r in made:
        r.close()


def svc_body(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80, "name": "http"}]}}


def _read(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


def test_list_then_watch_delivers_every_change_in_order(cluster: DevCluster, namespace: str,
                                                        recorders: list[Recorder]) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        _read(core.create_namespaced_service(namespace, svc_body("before"), _preload_content=False))
        rec = Recorder(load_configuration(str(cluster.kubeconfig_path)), resources("a"))
        recorders.append(rec)
        rec.wait(lambda: {k for k, _ in rec.lists} == {"Service", "EndpointSlice", "Node"}, "initial lists")
        services = dict(rec.lists)["Service"]
        assert f"{namespace}/before" in {f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in services}
        # List items carry kind/apiVersion (the API omits them) and no managedFields.
        assert all(o["kind"] == "Service" and o["apiVersion"] == "v1" for o in services)
        assert all("managedFields" not in o["metadata"] for o in services)

        _read(core.create_namespaced_service(namespace, svc_body("during"), _preload_content=False))
        svc = _read(core.read_namespaced_service("during", namespace, _preload_content=False))
        svc["metadata"]["labels"] = {"changed": "yes"}
        _read(core.replace_namespaced_service("during", namespace, svc, _preload_content=False))
        _read(core.delete_namespaced_service("before", namespace, _preload_content=False))
    mine = lambda: [(t, n) for k, t, n in rec.events if k == "Service" and n.startswith(namespace)]  # noqa: E731
    rec.wait(lambda: len(mine()) == 3, "three Service events")
    assert mine() == [("ADDED", f"{namespace}/during"), ("MODIFIED", f"{namespace}/during"),
                      ("DELETED", f"{namespace}/before")]
    watcher = rec.source.watchers["Service"]
    assert watcher.stats.lists == 1 and watcher.stats.relists_gone == 0
    assert int(watcher.stats.resource_version) > 0


def test_outage_backs_off_and_resumes_then_410_relists_once(cluster: DevCluster, namespace: str,
                                                            recorders: list[Recorder]) -> None:
    rec = Recorder(load_configuration(str(cluster.kubeconfig_path)), resources("a"))
    recorders.append(rec)
    rec.wait(lambda: len(rec.lists) == 3, "initial lists")
    watcher = rec.source.watchers["Service"]
    cluster.stop_apiserver(kill=True)
    rec.wait(lambda: watcher.backoff.failures >= 3, "three failed reconnects")
    assert sum(watcher.stats.errors.values()) >= 3 and ("Service", "watch_error") in rec.statuses
    with cluster.api_client() as api:
        # the apiserver is down: this only runs once it is back
        cluster.start_apiserver()
        _read(client.CoreV1Api(api).create_namespaced_service(namespace, svc_body("back"), _preload_content=False))
    rec.wait(lambda: any(n == f"{namespace}/back" for _, _, n in rec.events), "an event after the outage")
    assert watcher.backoff.failures == 0  # reset by the success
    gone = watcher.stats.relists_gone
    lists = watcher.stats.lists
    with cluster.api_client() as api:
        for i in range(3):  # move etcd past the watcher's version, then compact it away
            _read(client.CoreV1Api(api).create_namespaced_config_map(namespace, {"metadata": {"name": f"c{i}"}},
                                                                     _preload_content=False))
    cluster.compact_etcd()
    cluster.restart_apiserver()
    rec.wait(lambda: watcher.stats.relists_gone == gone + 1 and watcher.stats.lists == lists + 1, "one relist")
    with cluster.api_client() as api:
        _read(client.CoreV1Api(api).create_namespaced_service(namespace, svc_body("after"), _preload_content=False))
    rec.wait(lambda: any(n == f"{namespace}/after" for _, _, n in rec.events), "an event after the relist")
    assert watcher.stats.relists_gone == gone + 1 and watcher.stats.lists == lists + 1  # no flapping


def test_node_and_pods_are_this_nodes_only(cluster: DevCluster, namespace: str, recorders: list[Recorder]) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        for name in ("node-a", "node-b"):
            _read(core.create_node({"metadata": {"name": name}}, _preload_content=False))
        for pod, node in (("p-a", "node-a"), ("p-b", "node-b")):
            _read(core.create_namespaced_pod(namespace, {
                "metadata": {"name": pod},
                "spec": {"nodeName": node, "automountServiceAccountToken": False,
                         "containers": [{"name": "c", "image": "busybox"}]}}, _preload_content=False))
    rec = Recorder(load_configuration(str(cluster.kubeconfig_path)), resources("node-a", watch_pods=True))
    recorders.append(rec)
    rec.wait(lambda: len(rec.lists) == 4, "four initial lists")
    lists = dict(rec.lists)
    assert [o["metadata"]["name"] for o in lists["Node"]] == ["node-a"]
    assert [o["metadata"]["name"] for o in lists["Pod"]] == ["p-a"]
    assert lists["Pod"][0]["kind"] == "Pod"


def test_configuration_sources(cluster: DevCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.config import incluster_config

    def can_list(cfg: Any) -> bool:
        with client.ApiClient(cfg) as api:
            return bool(client.CoreV1Api(api).list_namespace().items)

    # $KUBECONFIG, as outside a cluster
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
    assert can_list(load_configuration())
    # an explicit server overrides a kubeconfig that points elsewhere
    wrong = yaml.safe_load(cluster.kubeconfig_path.read_text())
    wrong["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    bad = tmp_path / "wrong.kubeconfig"
    bad.write_text(yaml.safe_dump(wrong))
    assert load_configuration(str(bad)).host == "https://127.0.0.1:1"
    assert can_list(load_configuration(str(bad), api_server=cluster.url))
    # in-cluster: a mounted token and CA, the server from the environment or given explicitly
    monkeypatch.delenv("KUBECONFIG")
    token = tmp_path / "token"
    token.write_text(cluster.admin_token)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cluster.ca_cert_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(cluster.apiserver_port))
    cfg = load_configuration()
    assert cfg.host == cluster.url and can_list(cfg)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT")
    cfg = load_configuration(api_server=cluster.url)  # the DaemonSet's explicit apiserver address
    assert cfg.host == cluster.url and can_list(cfg)


def _create_slice(cluster: DevCluster, namespace: str, name: str) -> None:
    body = {"apiVersion": cluster.endpointslice_api_version, "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.1"]}]}
    path = cluster.endpointslice_path.replace("/endpointslices", f"/namespaces/{namespace}/endpointslices")
    with cluster.api_client() as api:
        _read(api.call_api(path, "POST", body=body, header_params={"Content-Type": "application/json"},
                           auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True))


@pytest.mark.parametrize("which", ["v1", "v1beta1"])
def test_endpointslice_version_comes_from_api_discovery(which: str, request: pytest.FixtureRequest,
                                                        recorders: list[Recorder],
                                                        namespaces: Callable[[DevCluster], str]) -> None:
    c: DevCluster = request.getfixturevalue("cluster" if which == "v1" else "beta_cluster")
    ns = namespaces(c)
    _create_slice(c, ns, "before")
    rec = Recorder(load_configuration(str(c.kubeconfig_path)), resources("a"))
    recorders.append(rec)
    rec.wait(lambda: {k for k, _ in rec.lists} == {"Service", "EndpointSlice", "Node"}, "initial lists")
    watcher = rec.source.watchers["EndpointSlice"]
    assert (watcher.api_version, watcher.path) == (c.endpointslice_api_version, c.endpointslice_path)
    listed = [o for o in dict(rec.lists)["EndpointSlice"] if o["metadata"]["namespace"] == ns]
    assert [(o["apiVersion"], o["metadata"]["name"]) for o in listed] == [(c.endpointslice_api_version, "before")]
    _create_slice(c, ns, "during")  # the watch is on the same version
    rec.wait(lambda: ("EndpointSlice", "ADDED", f"{ns}/during") in rec.events, "a watched slice")
    assert not watcher.stats.errors, watcher.stats.errors  # found by asking, not by a failed request


def _warnings(caplog: pytest.LogCaptureFixture, resource: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zeroproxy.kubesource"
            and r.levelno == logging.WARNING and r.getMessage().startswith(f"{resource}: ")]


def test_a_failing_list_keeps_warning_and_names_path_and_status(beta_cluster: DevCluster, recorders: list[Recorder],
                                                                caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 asked of a 1.20 apiserver (no fallback): 404 on every try. The log must say so
    again and again, at warning level, not once and then fall silent."""
    monkeypatch.setattr(kubesource, "WARN_INTERVAL", 1.0)
    caplog.set_level(logging.DEBUG, logger="zeroproxy.kubesource")
    path = "/apis/discovery.k8s.io/v1/endpointslices"
    rec = Recorder(load_configuration(str(beta_cluster.kubeconfig_path)),
                   [Resource("EndpointSlice", "discovery.k8s.io/v1", path)])
    recorders.append(rec)
    rec.wait(lambda: len(_warnings(caplog, "EndpointSlice")) >= 3, "three warnings")
    first, *again = _warnings(caplog, "EndpointSlice")
    assert first.startswith(f"EndpointSlice: list GET {path} failed: HTTP 404: ") and "retrying with backoff" in first
    for line in again:
        assert line.startswith(f"EndpointSlice: list GET {path} still failing (") and ": HTTP 404: " in line, line
    # rate-limited: the watcher failed more often than it warned (backoff capped at 2 s here)
    assert sum(rec.source.watchers["EndpointSlice"].stats.errors.values()) >= len(again) + 1
    assert rec.lists == []


def test_outage_warns_while_it_lasts_and_recovery_is_logged(cluster: DevCluster, namespace: str,
                                                             recorders: list[Recorder],
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubesource, "WARN_INTERVAL", 1.0)
    caplog.set_level(logging.DEBUG, logger="zeroproxy.kubesource")
    rec = Recorder(load_configuration(str(cluster.kubeconfig_path)), [resources("a")[0]])  # Services
    recorders.append(rec)
    rec.wait(lambda: len(rec.lists) == 1, "the list")
    cluster.stop_apiserver(kill=True)
    try:
        rec.wait(lambda: len(_warnings(caplog, "Service")) >= 2, "repeated warnings")
    finally:
        cluster.start_apiserver()
    assert all("/api/v1/services" in w for w in _warnings(caplog, "Service"))
    with cluster.api_client() as api:
        _read(client.CoreV1Api(api).create_namespaced_service(namespace, svc_body("back"), _preload_content=False))
    infos = lambda: [r.getMessage() for r in caplog.records  # noqa: E731
                     if r.levelno == logging.INFO and "works again" in r.getMessage()]
    rec.wait(lambda: bool(infos()), "the recovery at info level")
    assert infos()[0].startswith("Service: GET /api/v1/services works again, after ")
