"""Health probes of checkpointed pods answered without a wake: real runc + CRIU, real sk_lookup, real netns.

One node, three opted-in busybox httpd pods, one per `zeroproxy.io/probe-response` mode, and a
client pod. The kubelet probes from the node's own network namespace, so "from the node" here
means a client process in the node's netns; the scaler gets that netns's addresses as the node
addresses. Each test waits until its pod is checkpointed (idle 1 s), then probes it.

The request-head parser is tested on its own at the end (pure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import annotations
from controlplane.scaling import scaled_pod
from controlplane.translate import PodInfo, translate
from dataplane import tc
from scaletozero.activator import PROBE_HEAD_LIMIT, probe_verdict
from scaletozero.runc import RuncRuntime
from scaletozero.runtime import ContainerSpec
from scaletozero.scaler import PodStatus, ScalerThread
from scaletozero.state import ContainerState, ProbeResponse
from testbed import k8sobjects, rootfs
from testbed.bed import CGROUP_DIR_PREFIX, Host, Pod, TestBed, wait_until

REPO = Path(__file__).resolve().parent.parent
PORT = 8080
KUBE_PROBE = "kube-probe/1.34"
MODES = {"web-http": "http", "web-tcp": "tcp", "web-off": None}  # None: no annotation (default off)

# A client: "get" sends one HTTP/1.1 GET with the given User-Agent and reads to EOF; "connect"
# connects and waits for the peer to close (what a kubelet TCP probe sees), reporting how.
CLIENT = r"""
import json, socket, sys
host, port, mode, ua = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=30)
out = {"source": s.getsockname()[0]}
try:
    if mode == "get":
        s.sendall(("GET /index.html HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: %s\r\nAccept: */*\r\n"
                   "Connection: close\r\n\r\n" % (host, port, ua)).encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    out.update(closed="fin", head=head.decode(errors="replace"), body=body.decode(errors="replace"))
except ConnectionResetError:
    out.update(closed="rst")
s.close()
print(json.dumps(out))
"""


def pids_in_netns(pod: Pod) -> list[int]:
    """Processes whose network namespace is the pod's: none while it is checkpointed."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == pod.netns_inode:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


class Bed:
    """A node with the three pods, their runc containers and a scaler fed from Pod annotations."""

    def __init__(self, bed: TestBed, criu: Path, workdir: Path) -> None:
        self.bed = bed
        self.node = bed.add_node("a")
        self.client = bed.add_pod(self.node, "client")
        self.web = {name: bed.add_pod(self.node, name) for name in MODES}
        self.runtime = RuncRuntime(workdir / "rt", criu,
                                   cgroup_parent=f"/{CGROUP_DIR_PREFIX}{bed.id}/node-a/runc")
        self.workdir = workdir
        self.scaler: ScalerThread | None = None

    def pod_object(self, pod: Pod, mode: str | None) -> dict[str, Any]:
        ann = annotations.annotate(idle_timeout="1s", restore_timeout="20s", probe_response=mode)
        return k8sobjects.pod(pod.name, "a", [pod.ip4, pod.ip6], annotations=ann)

    def start(self) -> None:
        for name, pod in self.web.items():
            fs = rootfs.build_busybox_rootfs(self.workdir / f"rootfs-{name}",
                                             {"/www/index.html": f"hello from {name}\n"})
            self.runtime.run(ContainerSpec(id=name, rootfs=fs.path, args=rootfs.httpd_command(PORT),
                                           netns=pod.netns_path, rootfs_mounts=fs.mounts))
        for name, pod in self.web.items():
            wait_until(lambda pod=pod: f":{PORT} " in pod.bed.run_in_netns(pod.netns, ["ss", "-Htln"]).stdout,
                       f"{name} listens")
        node_addresses = [str(a) for a in tc.local_addresses(self.node.netns)]
        self.scaler = ScalerThread(self.runtime, poll_interval=0.1, node_addresses=node_addresses)
        pods: dict[Any, PodInfo] = translate([self.pod_object(p, MODES[n]) for n, p in self.web.items()]).pods
        for info in pods.values():
            backend, problems = scaled_pod(info, info.name, self.web[info.name].netns_path)
            assert not problems and backend is not None, problems
            assert backend.probe == ProbeResponse(MODES[info.name] or "off")
            self.scaler.call(self.scaler.scaler.add, backend)

    def status(self, name: str) -> PodStatus:
        assert self.scaler is not None
        return self.scaler.status()[f"default/{name}"]

    def checkpointed(self, name: str) -> PodStatus:
        wait_until(lambda: self.status(name).state == "checkpointed", f"{name} checkpointed")
        assert self.runtime.state(name) == ContainerState.CHECKPOINTED
        assert pids_in_netns(self.web[name]) == []
        return self.status(name)

    def request(self, host: Host, name: str, mode: str = "get", ua: str = KUBE_PROBE) -> dict[str, Any]:
        out = host.check_output([sys.executable, "-c", CLIENT, self.web[name].ip4, str(PORT), mode, ua], timeout=60)
        return json.loads(out)

    def close(self) -> None:
        try:
            if self.scaler is not None:
                self.scaler.close()
        finally:
            self.runtime.delete_all()


@pytest.fixture(scope="module")
def bed(criu: Path, tmp_path_factory: pytest.TempPathFactory, stale_beds_removed: list[str]) -> Iterator[Bed]:
    tb = TestBed(prefix="zp")
    b = None
    try:
        b = Bed(tb, criu, tmp_path_factory.mktemp("probes"))
        b.start()
        yield b
    finally:
        try:
            if b is not None:
                b.close()
        finally:
            tb.close()


def test_http_probe_from_the_node_is_answered_without_a_wake(bed: Bed) -> None:
    before = bed.checkpointed("web-http")
    r = bed.request(bed.node, "web-http")
    assert r["source"] != bed.web["web-http"].ip4
    assert r["closed"] == "fin"
    assert r["head"].split("\r\n")[0] == "HTTP/1.1 200 OK", r
    assert "Content-Length: 0" in r["head"] and "Connection: close" in r["head"] and r["body"] == ""
    after = bed.status("web-http")
    assert (after.state, after.restores, after.probes) == ("checkpointed", before.restores, before.probes + 1)
    assert after.accepted == before.accepted + 1 and after.relayed == before.relayed
    assert bed.runtime.state("web-http") == ContainerState.CHECKPOINTED
    assert pids_in_netns(bed.web["web-http"]) == []
    m = bed.scaler.scaler.metrics  # type: ignore[union-attr]
    assert m.registry.get_sample_value("zeroproxy_s2z_probes_answered_total",
                                       {"pod": "default/web-http", "kind": "http"}) == after.probes


def test_a_normal_request_from_another_pod_wakes_it_and_gets_the_app(bed: Bed) -> None:
    before = bed.checkpointed("web-http")
    r = bed.request(bed.client, "web-http", ua="curl/8.0")
    assert r["head"].split("\r\n")[0].split()[1] == "200" and r["body"] == "hello from web-http\n", r
    after = bed.status("web-http")
    assert after.restores == before.restores + 1 and after.probes == before.probes


def test_a_kube_probe_user_agent_from_another_pod_wakes_it(bed: Bed) -> None:
    """Only the node's own addresses are trusted: the same request from a pod is real traffic."""
    before = bed.checkpointed("web-http")
    r = bed.request(bed.client, "web-http")
    assert r["body"] == "hello from web-http\n", r
    after = bed.status("web-http")
    assert after.restores == before.restores + 1 and after.probes == before.probes


def test_another_user_agent_from_the_node_wakes_it_and_its_bytes_reach_the_app(bed: Bed) -> None:
    """The proxy read the whole request to decide; the app still gets it (replayed) and answers."""
    before = bed.checkpointed("web-http")
    r = bed.request(bed.node, "web-http", ua="Mozilla/5.0")
    assert r["body"] == "hello from web-http\n", r
    after = bed.status("web-http")
    assert after.restores == before.restores + 1 and after.probes == before.probes
    assert after.bytes_to_app > before.bytes_to_app


def test_probes_while_checkpointed_do_not_keep_it_awake(bed: Bed) -> None:
    """Probes answered by the proxy, then a wake: the pod still goes idle and is checkpointed again."""
    before = bed.checkpointed("web-http")
    for _ in range(3):
        assert bed.request(bed.node, "web-http")["head"].startswith("HTTP/1.1 200 OK")
    r = bed.request(bed.client, "web-http", ua="curl/8.0")
    assert r["body"] == "hello from web-http\n"
    after = bed.checkpointed("web-http")
    assert after.checkpoints == before.checkpoints + 1 and after.probes == before.probes + 3


def test_tcp_probe_from_the_node_is_closed_cleanly_without_a_wake(bed: Bed) -> None:
    before = bed.checkpointed("web-tcp")
    r = bed.request(bed.node, "web-tcp", mode="connect")
    assert r["closed"] == "fin" and r["head"] == "", r
    after = bed.status("web-tcp")
    assert (after.state, after.restores, after.probes) == ("checkpointed", before.restores, before.probes + 1)
    assert pids_in_netns(bed.web["web-tcp"]) == []
    # from a pod, the same connect is real traffic: it wakes
    r = bed.request(bed.client, "web-tcp", ua="curl/8.0")
    assert r["body"] == "hello from web-tcp\n", r
    assert bed.status("web-tcp").restores == before.restores + 1


def test_without_the_annotation_a_probe_wakes_the_pod(bed: Bed) -> None:
    before = bed.checkpointed("web-off")
    r = bed.request(bed.node, "web-off")
    assert r["head"].split("\r\n")[0].split()[1] == "200" and r["body"] == "hello from web-off\n", r
    after = bed.status("web-off")
    assert after.restores == before.restores + 1 and after.probes == 0


def test_probes_from_the_node_do_not_keep_a_running_pod_awake(bed: Bed) -> None:
    """With probe answering on, the kubelet's probes are not use: the running pod still goes idle.
    (The sk_lookup program counts SYNs from the node's own addresses apart.)"""
    before = bed.checkpointed("web-http")
    assert bed.request(bed.client, "web-http", ua="curl/8.0")["body"] == "hello from web-http\n"
    deadline = time.monotonic() + 30
    probes = 0
    while bed.status("web-http").state != "checkpointed":
        assert time.monotonic() < deadline, "the node's probes kept the pod awake"
        # answered by the app while it runs, by the proxy once it is parked
        assert bed.request(bed.node, "web-http")["head"].startswith("HTTP/1.1 200 OK")
        probes += 1
        time.sleep(0.3)
    assert probes >= 2  # it really was probed while running (idle timeout 1 s)
    assert bed.status("web-http").checkpoints == before.checkpoints + 1


def test_without_probe_answering_probes_keep_a_running_pod_awake(bed: Bed) -> None:
    bed.checkpointed("web-off")
    assert bed.request(bed.client, "web-off", ua="curl/8.0")["body"] == "hello from web-off\n"
    for _ in range(8):  # ~4 s of probes every ~0.5 s, idle timeout 1 s
        assert bed.request(bed.node, "web-off")["body"] == "hello from web-off\n"
        assert bed.status("web-off").state == "running"
        time.sleep(0.3)


# --- the request-head parser (pure) ------------------------------------------------------------

PROBE = b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\n" \
        b"Connection: close\r\n\r\n"


@pytest.mark.parametrize(("data", "verdict"), [
    (PROBE, True),
    (b"HEAD / HTTP/1.0\r\nuser-agent:kube-probe/1.0\r\n\r\n", True),  # any method, header case, no space
    (b"GET / HTTP/1.1\r\nUser-Agent: kube-probe/1.34\r\nContent-Length: 0\r\n\r\n", True),
    (b"", None),  # nothing yet
    (b"GE", None),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", None),  # head not finished
    (PROBE[:-2], None),
    (b"GET / HTTP/1.1\r\nUser-Agent: curl/8.0\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # no User-Agent
    (b"GET / HTTP/1.1\r\nX-Agent: kube-probe/1.34\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nUser-Agent: not-kube-probe/1\r\n\r\n", False),
    (PROBE + b"GET / HTTP/1.1\r\n\r\n", False),  # pipelined: the rest is for the app
    (b"POST / HTTP/1.1\r\nUser-Agent: kube-probe/1.34\r\nContent-Length: 3\r\n\r\n", False),  # a body
    (b"POST / HTTP/1.1\r\nUser-Agent: kube-probe/1.34\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    (b"\x16\x03\x01\x02\x00\x01", False),  # a TLS ClientHello: not HTTP, decided at once
    (b"get / HTTP/1.1\r\n", False),  # methods are upper case
    (b"GET / SPDY/3\r\n", False),  # a finished first line that is not an HTTP/1.x request line
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nUser-Agent : kube-probe/1\r\n\r\n", False),  # whitespace before the colon
    (b"GET /" + b"a" * PROBE_HEAD_LIMIT, False),  # too long to be a probe
])
def test_probe_verdict(data: bytes, verdict: bool | None) -> None:
    assert probe_verdict(data) is verdict


def test_probe_response_annotation() -> None:
    cfg, problems = annotations.parse({**annotations.annotate(), annotations.PROBE_RESPONSE: " HTTP "})
    assert problems == [] and cfg is not None and cfg.probe_response == "http"
    cfg, problems = annotations.parse(annotations.annotate())
    assert problems == [] and cfg is not None and cfg.probe_response == ProbeResponse.OFF
    cfg, problems = annotations.parse({**annotations.annotate(), annotations.PROBE_RESPONSE: "grpc"}, "ns/p")
    assert cfg is None and problems == ['ns/p: annotation zeroproxy.io/probe-response=\'grpc\': expected one of '
                                        '"off", "tcp", "http"']
