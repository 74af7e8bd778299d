"""Scale to zero inside `zeroproxy agent`, end to end: a real kube-apiserver (DevCluster), a real
agent process with `--scale-to-zero`, real runc + CRIU backends in test-bed pod netns, the real
sk_lookup program and activation proxy, real ClusterIP traffic from a pod.

What it shows, in one scenario (each step builds on the last, so it is one test):

- the agent checkpoints an idle opted-in pod and publishes ``zeroproxy.io/scale-state`` on the
  Pod and a ``Checkpointed`` Event, through the apiserver;
- a service with one running and one checkpointed endpoint sends every new connection to the
  running one (the checkpointed pod is not woken);
- when both are checkpointed, a connection wakes one of them (a ``Restored`` Event), gets its
  answer without a retransmission, and the other stays checkpointed;
- `zeroproxy scale status` reads the agent's state file; the metrics are on the agent's /metrics.

The file source (label in the YAML honoured, the agent's own state applied locally) is in
tests/test_scale_running_only.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controlplane import annotations
from dataplane import inspect
from scaletozero.runc import RuncRuntime
from scaletozero.runtime import ContainerSpec
from scaletozero.state import ContainerState
from testbed import rootfs
from testbed.bed import CGROUP_DIR_PREFIX, Pod, TestBed, wait_until
from testbed.devcluster import DevCluster
from testbed.k8sobjects import endpoint_slice
from testbed.sandbox import AgentProcess

pytestmark = pytest.mark.timeout(900)  # a fresh machine builds kube-apiserver and CRIU first

REPO = Path(__file__).resolve().parent.parent
PORT = 8080

# One HTTP/1.0 GET from inside a pod; prints status, body and TCP_INFO tcpi_total_retrans.
GET = r"""
import json, socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
head, _, body = data.partition(b"\r\n\r\n")
retrans = struct.unpack_from("I", info, 100)[0]
print(json.dumps({"status": int(head.split()[1]), "body": body.decode(), "retrans": retrans}))
"""


def _json(resp: Any) -> dict[str, Any]:
    try:
        return json.loads(resp.data)
    finally:
        resp.release_conn()


def get(pod: Pod, addr: str, port: int) -> dict[str, Any]:
    return json.loads(pod.check_output([sys.executable, "-c", GET, addr, str(port)], timeout=90))


class World:
    """One node of the test bed with two busybox httpd containers, and their API objects."""

    def __init__(self, cluster: DevCluster, bed: TestBed, criu: Path, tmp: Path) -> None:
        self.api = cluster.api_client()
        self.core = client.CoreV1Api(self.api)
        self.disc = client.DiscoveryV1Api(self.api)
        self.node = bed.add_node("a")
        self.web = {name: bed.add_pod(self.node, name) for name in ("web-1", "web-2")}
        self.client = bed.add_pod(self.node, "client")
        self.ns = f"zp-{uuid.uuid4().hex[:8]}"
        self.rt_dir = tmp / "rt"
        self.cgroup_parent = f"/{CGROUP_DIR_PREFIX}{bed.id}/node-a/runc"
        self.runtime = RuncRuntime(self.rt_dir, criu, cgroup_parent=self.cgroup_parent)
        self.state_file = tmp / "s2z.json"
        self.agent = AgentProcess(tmp, self.node.cgroup_path, node_name="a", kubeconfig=cluster.kubeconfig_path,
                                  extra_args=["--scale-to-zero", "--runtime-dir", str(self.rt_dir), "--criu", str(criu),
                                              "--s2z-cgroup-parent", self.cgroup_parent,
                                              "--scale-state-file", str(self.state_file)])
        self.tmp = tmp

    def cid(self, name: str) -> str:
        return f"{self.ns}.{name}"

    def start_containers(self) -> None:
        for name, pod in self.web.items():
            fs = rootfs.build_busybox_rootfs(self.tmp / f"rootfs-{name}", {"/www/index.html": f"hello from {name}\n"})
            self.runtime.run(ContainerSpec(id=self.cid(name), rootfs=fs.path, args=rootfs.httpd_command(PORT),
                                           netns=pod.netns_path, rootfs_mounts=fs.mounts))

    def create_objects(self, opted_in: set[str]) -> str:
        """Namespace, Pods (with IPs in their status), the Service and its slice; returns the ClusterIP."""
        self.core.create_namespace({"metadata": {"name": self.ns}})
        # no controller-manager: the ServiceAccount admission wants the default account to exist
        _json(self.core.create_namespaced_service_account(self.ns, {"metadata": {"name": "default"}},
                                                          _preload_content=False))
        for name, pod in self.web.items():
            meta: dict[str, Any] = {"name": name}
            if name in opted_in:
                meta["annotations"] = annotations.annotate(idle_timeout="1s", restore_timeout="20s")
            _json(self.core.create_namespaced_pod(self.ns, {
                "metadata": meta, "spec": {"nodeName": "a", "automountServiceAccountToken": False,
                                           "containers": [{"name": "httpd", "image": "busybox"}]}},
                _preload_content=False))
            _json(self.core.patch_namespaced_pod_status(name, self.ns, {"status": {
                "phase": "Running", "podIP": pod.ip4, "podIPs": [{"ip": pod.ip4}, {"ip": pod.ip6}]}},
                _preload_content=False))
        svc = _json(self.core.create_namespaced_service(self.ns, {
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]}},
            _preload_content=False))
        body = endpoint_slice("web", [p.ip4 for p in self.web.values()], [{"name": "http", "port": PORT,
                                                                            "protocol": "TCP"}],
                              namespace=self.ns, name="web-1", node_name="a")
        for ep, name in zip(body["endpoints"], self.web, strict=True):
            ep["targetRef"] = {"kind": "Pod", "namespace": self.ns, "name": name}
        _json(self.disc.create_namespaced_endpoint_slice(self.ns, body, _preload_content=False))
        return str(svc["spec"]["clusterIP"])

    def pod(self, name: str) -> dict[str, Any]:
        return _json(self.core.read_namespaced_pod(name, self.ns, _preload_content=False))

    def label(self, name: str) -> str | None:
        return (self.pod(name)["metadata"].get("labels") or {}).get(annotations.STATE)

    def events(self, name: str) -> list[dict[str, Any]]:
        return _json(self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.name={name}", _preload_content=False))["items"]

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]

    def status(self) -> dict[str, dict[str, Any]]:
        try:
            return {p["name"]: p for p in json.loads(self.state_file.read_text())["pods"]}
        except (FileNotFoundError, ValueError):
            return {}

    def programmed(self, vip: str) -> list[str] | None:
        return {s.frontend: sorted(s.backends) for s in inspect.service_list(self.agent.pin_dir)}.get(f"{vip}:80/TCP")

    def close(self) -> None:
        try:
            self.agent.close()
        finally:
            try:
                self.runtime.delete_all()
            finally:
                self.api.close()


@pytest.fixture
def world(criu: Path, tmp_path: Path, stale_beds_removed: list[str]) -> Iterator[World]:
    with DevCluster() as cluster:
        bed = TestBed(prefix="zp")
        try:
            w = World(cluster, bed, criu, tmp_path)
            try:
                yield w
            finally:
                w.close()
        finally:
            bed.close()


def test_agent_checkpoints_publishes_and_routes_to_running_endpoints(world: World) -> None:
    w = world
    w.start_containers()
    vip = w.create_objects(opted_in={"web-1"})
    w.agent.start()
    log = w.agent.log_text
    ip = {name: f"{pod.ip4}:{PORT}" for name, pod in w.web.items()}

    # 1. web-1 goes idle: checkpointed by the agent, published on the Pod with an Event
    wait_until(lambda: w.label("web-1") == "checkpointed", "web-1 labelled checkpointed", detail=log)
    assert w.runtime.state(w.cid("web-1")) == ContainerState.CHECKPOINTED
    assert w.label("web-2") is None  # not opted in: never labelled
    uid = w.pod("web-1")["metadata"]["uid"]
    event = wait_until(lambda: [e for e in w.events("web-1") if e["reason"] == "Checkpointed"], "Checkpointed event",
                       detail=log)[0]
    assert event["involvedObject"]["uid"] == uid and event["type"] == "Normal"
    assert event["source"] == {"component": "zeroproxy", "host": "a"}

    # 2. one running, one checkpointed: only the running one gets connections, nothing wakes
    wait_until(lambda: w.programmed(vip) == [ip["web-2"]], "only web-2 programmed", detail=log)
    for _ in range(10):
        r = get(w.client, vip, 80)
        assert (r["status"], r["body"], r["retrans"]) == (200, "hello from web-2\n", 0)
    st = w.status()[f"{w.ns}/web-1"]
    assert st["state"] == "checkpointed" and st["restores"] == 0 and st["accepted"] == 0
    assert w.runtime.state(w.cid("web-1")) == ContainerState.CHECKPOINTED

    # 3. web-2 opts in too: both checkpointed, so both are programmed, and a connection wakes one
    _json(w.core.patch_namespaced_pod("web-2", w.ns, {"metadata": {"annotations": annotations.annotate("1s")}},
                                      _preload_content=False))
    wait_until(lambda: w.label("web-2") == "checkpointed", "web-2 labelled checkpointed", detail=log)
    wait_until(lambda: w.programmed(vip) == sorted(ip.values()), "both programmed (all parked)", detail=log)
    before = {name: w.status()[f"{w.ns}/{name}"]["restores"] for name in w.web}
    r = get(w.client, vip, 80)
    assert r["status"] == 200 and r["retrans"] == 0
    woke = r["body"].removeprefix("hello from ").strip()
    other = ({"web-1", "web-2"} - {woke}).pop()
    after = w.status()
    assert after[f"{w.ns}/{woke}"]["restores"] == before[woke] + 1
    assert after[f"{w.ns}/{other}"]["restores"] == before[other]  # the other slept on
    wait_until(lambda: "Restored" in w.reasons(woke), f"Restored event on {woke}", detail=log)
    assert "Restored" not in w.reasons(other)

    # 4. the CLI reads the agent's state file; the scaler's metrics are on the agent's /metrics
    out = subprocess.run([sys.executable, "-m", "zeroproxy", "scale", "status", "--state-file", str(w.state_file),
                          "-o", "json"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert {p["name"] for p in json.loads(out)["pods"]} == {f"{w.ns}/web-1", f"{w.ns}/web-2"}
    metrics = urllib.request.urlopen(w.agent.metrics_url, timeout=10).read().decode()
    assert f'zeroproxy_s2z_wakes_total{{pod="{w.ns}/{woke}"}} 1.0' in metrics
    assert "zeroproxy_syncs_total" in metrics  # the same registry as the agent's own metrics
