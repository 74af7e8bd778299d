"""Scale to zero end to end: real runc + CRIU backends, real sk_lookup eBPF, real netns traffic.

A two-node test bed: an opted-in busybox httpd container in pod web-a on node A and in web-b
on node B, a client pod on each node, an external host on the underlay. Each node has what its
agent would run: the socket programs (ClusterIP) and the TC programs (NodePort) programmed from
the same Kubernetes objects, a runc runtime whose containers sit in the node's cgroup, and a
scaler (sk_lookup program + activation proxy) for its opted-in pods, fed from the Pod
annotations through the real translation.

The backends go idle within a second; tests wait for states, never for fixed times.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane import annotations
from controlplane.scaling import publication, scaled_pod
from controlplane.translate import translate
from dataplane import loader, tc
from dataplane.loader import SockDatapath
from dataplane.services import ServiceMaps
from scaletozero.activator import ScaleMetrics
from scaletozero.runc import RuncRuntime
from scaletozero.runtime import ContainerSpec
from scaletozero.scaler import DRY_RUN_CHECKPOINT, DRY_RUN_WAKE, PodStatus, ScaledPod, ScalerThread
from scaletozero.state import ContainerState, ScaleState
from testbed import k8sobjects, rootfs
from testbed.bed import CGROUP_DIR_PREFIX, Host, Node, Pod, TestBed, wait_until
from testbed.k8sobjects import endpoint_slice, node, service

REPO = Path(__file__).resolve().parent.parent
PORT = 8080
VIP = "10.96.5.10"
NODE_PORT = 30580
IDLE = "1s"
BIG = bytes((i * 7 + i // 251) % 256 for i in range(300_000))  # the "correct bytes" of every test
BIG_SHA = hashlib.sha256(BIG).hexdigest()

# A client run inside a pod netns: `n` connections opened at once (a barrier), each an HTTP/1.0
# GET read to EOF; reports status, body hash and TCP_INFO tcpi_total_retrans (offset 100), which
# counts SYN retransmissions too.
CLIENT = r"""
import hashlib, json, socket, struct, sys, threading
host, port, n, path, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
barrier = threading.Barrier(n)
out = [None] * n
def one(i):
    try:
        barrier.wait()
        s = socket.create_connection((host, port), timeout=timeout)
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        out[i] = {"ok": True, "status": int(head.split()[1]), "sha": hashlib.sha256(body).hexdigest(),
                  "body": body[:64].decode(errors="replace"), "len": len(body),
                  "retrans": struct.unpack_from("I", info, 100)[0]}
    except Exception as e:
        out[i] = {"ok": False, "error": repr(e)}
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def http(host: Host, addr: str, port: int = PORT, *, n: int = 1, path: str = "/index.html",
         timeout: float = 60.0) -> list[dict[str, Any]]:
    """n concurrent GETs from inside host (its netns and cgroup, so ClusterIP translation applies)."""
    out = host.check_output([sys.executable, "-c", CLIENT, addr, str(port), str(n), path, str(timeout)],
                            timeout=timeout + 60)
    return json.loads(out)


def assert_served(results: list[dict[str, Any]], path: str = "/index.html",
                  bodies: tuple[str, ...] = ("hello from web-a\n", "hello from web-b\n")) -> None:
    bad = [r for r in results if not r["ok"] or r["status"] != 200]
    assert not bad, f"{len(bad)} of {len(results)} failed: {bad[:3]}"
    if path == "/big.bin":
        assert {(r["sha"], r["len"]) for r in results} == {(BIG_SHA, len(BIG))}
    else:
        assert {r["body"] for r in results} <= set(bodies), results
    assert [r["retrans"] for r in results] == [0] * len(results), "SYN/data retransmissions seen"


class NodeSide:
    """What the agent of one node runs: socket + TC datapath, runtime, scaler."""

    def __init__(self, cluster: Cluster, n: Node) -> None:
        self.node = n
        self.pin_dir = Path(f"/sys/fs/bpf/zp-s2z-{cluster.bed.id}/{n.name}")
        self.sock: SockDatapath | None = None
        self.tc: tc.NodeDatapath | None = None
        self.runtime = RuncRuntime(
            cluster.workdir / f"rt-{n.name}", cluster.criu,
            cgroup_parent=f"/{CGROUP_DIR_PREFIX}{cluster.bed.id}/node-{n.name}/runc",
        )
        self.scaler: ScalerThread | None = None

    def start_datapath(self, objects: list[dict[str, Any]]) -> None:
        self.sock = SockDatapath(self.node.cgroup_path, self.pin_dir)
        self.sock.load()
        self.sock.attach()
        self.tc = tc.NodeDatapath(self.pin_dir, ["eth0"], netns=self.node.netns)
        self.tc.load()
        self.tc.attach()
        maps = ServiceMaps(self.sock)
        maps.set_node_port_addresses(tc.node_port_addresses([], tc.local_addresses(self.node.netns)))
        result = maps.sync(translate(objects, self.node.name).table.values())
        assert not result.conflicts, result.conflicts

    def close(self) -> None:
        errors = []
        for step in (self._close_scaler, self.runtime.delete_all, self._close_datapath):
            try:
                step()
            except Exception as e:  # every step runs, whatever failed before
                errors.append(f"{step.__name__}: {e}")
        assert not errors, errors

    def _close_scaler(self) -> None:
        if self.scaler is not None:
            self.scaler.close()

    def _close_datapath(self) -> None:
        if self.tc is not None:
            self.tc.detach()
            self.tc.close()
        if self.sock is not None:
            self.sock.close()
        loader.cleanup(self.node.cgroup_path, self.pin_dir)
        loader.cleanup(None, self.pin_dir.parent)


class Cluster:
    def __init__(self, bed: TestBed, criu: Path, workdir: Path) -> None:
        self.bed = bed
        self.criu = criu
        self.workdir = workdir
        self.a = bed.add_node("a")
        self.b = bed.add_node("b")
        self.web = {"web-a": bed.add_pod(self.a, "web-a"), "web-b": bed.add_pod(self.b, "web-b")}
        self.client_a = bed.add_pod(self.a, "client-a")
        self.client_b = bed.add_pod(self.b, "client-b")
        self.ext = bed.add_external("ext")
        self.sides = {"a": NodeSide(self, self.a), "b": NodeSide(self, self.b)}

    def objects(self) -> list[dict[str, Any]]:
        http_port = [{"name": "http", "port": PORT, "protocol": "TCP"}]
        return [
            node("a", [self.a.ip4]),
            node("b", [self.b.ip4]),
            service("web", [VIP], [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP",
                                    "nodePort": NODE_PORT}], type="NodePort"),
            endpoint_slice("web", [self.web["web-a"].ip4], http_port, name="web-a", node_name="a"),
            endpoint_slice("web", [self.web["web-b"].ip4], http_port, name="web-b", node_name="b"),
            *(k8sobjects.pod(p.name, p.node.name, [p.ip4, p.ip6],
                             annotations=annotations.annotate(idle_timeout=IDLE, restore_timeout="20s"))
              for p in self.web.values()),
            *(k8sobjects.pod(c.name, c.node.name, [c.ip4, c.ip6]) for c in (self.client_a, self.client_b)),
        ]

    def start(self) -> None:
        objects = self.objects()
        for side in self.sides.values():
            side.start_datapath(objects)
        for name, pod in self.web.items():
            side = self.sides[pod.node.name]
            fs = rootfs.build_busybox_rootfs(self.workdir / f"rootfs-{name}",
                                             {"/www/index.html": f"hello from {name}\n", "/www/big.bin": BIG})
            side.runtime.run(ContainerSpec(id=name, rootfs=fs.path, args=rootfs.httpd_command(PORT),
                                           netns=pod.netns_path, rootfs_mounts=fs.mounts))
        for name, pod in self.web.items():
            wait_until(lambda pod=pod: f":{PORT} " in listening(pod), f"{name} listens")
        pods = translate(objects).pods
        for side in self.sides.values():
            side.scaler = ScalerThread(side.runtime, poll_interval=0.1,
                                       state_file=self.workdir / f"scale-{side.node.name}.json")
        for info in pods.values():
            if info.name in self.web:  # the client pods did not opt in
                backend, problems = scaled_pod(info, info.name, self.web[info.name].netns_path)
                assert not problems and backend is not None, problems
                scaler = self.sides[info.node_name].scaler
                assert scaler is not None
                scaler.call(scaler.scaler.add, backend)
            else:
                assert scaled_pod(info, info.name, Path("/unused")) == (None, [])

    def side_of(self, name: str) -> NodeSide:
        return self.sides[self.web[name].node.name]

    def status(self, name: str) -> PodStatus:
        side = self.side_of(name)
        assert side.scaler is not None
        return side.scaler.status()[f"default/{name}"]

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> PodStatus:
        wait_until(lambda: self.status(name).state == state, f"{name} {state}", timeout=timeout)
        return self.status(name)

    def close(self) -> None:
        errors = []
        for side in self.sides.values():
            try:
                side.close()
            except Exception as e:
                errors.append(str(e))
        assert not errors, errors


def listening(pod: Pod) -> str:
    return pod.bed.run_in_netns(pod.netns, ["ss", "-Htln"]).stdout


def accept_queue(pod: Pod) -> int:
    """Connections waiting in the app's listener (ss shows them as Recv-Q of a LISTEN socket)."""
    out = pod.bed.run_in_netns(pod.netns, ["ss", "-Htn", "state", "listening", "sport", "=", f":{PORT}"]).stdout
    return int(out.split()[0]) if out.strip() else -1


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def cluster(criu: Path, tmp_path_factory: pytest.TempPathFactory,
            stale_beds_removed: list[str]) -> Iterator[Cluster]:
    bed = TestBed(prefix="zp")
    c = None
    try:
        c = Cluster(bed, criu, tmp_path_factory.mktemp("s2z"))
        c.start()
        yield c
    finally:
        try:
            if c is not None:
                c.close()
        finally:
            bed.close()


def both_checkpointed(c: Cluster) -> dict[str, PodStatus]:
    return {name: c.wait_state(name, "checkpointed") for name in c.web}


# --- tests -----------------------------------------------------------------------------------


def test_idle_backends_on_both_nodes_are_checkpointed(cluster: Cluster) -> None:
    c = cluster
    pids = {name: c.side_of(name).runtime.pid(name) for name in c.web}
    st = both_checkpointed(c)
    for name, pod in c.web.items():
        runtime = c.side_of(name).runtime
        assert runtime.state(name) == ContainerState.CHECKPOINTED
        assert runtime.pid(name) is None
        old = pids[name]
        assert old is None or not process_alive(old)  # None: a previous test left it checkpointed
        images = runtime.images_dir(name)
        assert (images / "inventory.img").is_file() and list(images.glob("pages-*.img"))
        assert st[name].redirect and st[name].ports == [PORT]
        assert f":{PORT} " not in listening(pod)  # nothing of the app is left in the pod
    # the CLI's view: the state file another process reads
    doc = json.loads((c.workdir / "scale-a.json").read_text())
    assert {p["name"]: p["state"] for p in doc["pods"]} == {"default/web-a": "checkpointed"}


def test_clusterip_from_a_pod_on_the_other_node_wakes_the_service(cluster: Cluster) -> None:
    """Connections from client-b to the ClusterIP until web-a (node A) has answered one.

    The socket programs pick a backend at random per connection; each attempt wakes the
    checkpointed backend it lands on and must get that backend's answer.
    """
    c = cluster
    before = {name: s.restores for name, s in both_checkpointed(c).items()}
    seen: list[str] = []
    for _ in range(30):
        r = http(c.client_b, VIP, 80)
        assert_served(r)
        seen.append(r[0]["body"])
        if "hello from web-a\n" in seen:
            break
    assert "hello from web-a\n" in seen
    assert c.status("web-a").state == "running"
    assert c.status("web-a").restores == before["web-a"] + 1
    if "hello from web-b\n" not in seen:
        assert c.status("web-b").state == "checkpointed"  # only what was connected to woke up


def test_pod_ip_directly_wakes_the_pod(cluster: Cluster) -> None:
    c = cluster
    before = both_checkpointed(c)["web-b"]
    assert_served(http(c.client_a, c.web["web-b"].ip4), bodies=("hello from web-b\n",))
    after = c.status("web-b")
    assert after.state == "running" and after.restores == before.restores + 1
    assert after.accepted == before.accepted + 1 and after.relayed == before.relayed + 1
    # IPv6 pod address, after the next idle period
    before = c.wait_state("web-b", "checkpointed")
    assert_served(http(c.client_a, c.web["web-b"].ip6), bodies=("hello from web-b\n",))
    assert c.status("web-b").restores == before.restores + 1


def test_nodeport_from_outside_wakes_the_service(cluster: Cluster) -> None:
    c = cluster
    before = both_checkpointed(c)
    r = http(c.ext, c.a.ip4, NODE_PORT)
    assert_served(r)
    woke = "web-a" if r[0]["body"] == "hello from web-a\n" else "web-b"
    assert c.status(woke).state == "running"
    assert c.status(woke).restores == before[woke].restores + 1


def test_fifty_concurrent_connections_during_one_restore(cluster: Cluster) -> None:
    """All 50 complete with the right bytes, one restore, no SYN retransmit, no reset."""
    c = cluster
    before = both_checkpointed(c)
    r = http(c.client_b, c.web["web-a"].ip4, n=50, path="/big.bin")
    assert_served(r, path="/big.bin")
    after = c.status("web-a")
    assert after.restores == before["web-a"].restores + 1
    assert after.accepted - before["web-a"].accepted == 50
    assert after.relayed - before["web-a"].relayed == 50
    assert after.dropped == before["web-a"].dropped
    assert after.bytes_to_client - before["web-a"].bytes_to_client >= 50 * len(BIG)
    assert c.status("web-b").restores == before["web-b"].restores  # the other backend slept on


def test_after_the_wake_new_connections_bypass_the_proxy(cluster: Cluster) -> None:
    c = cluster
    c.wait_state("web-a", "checkpointed")
    assert_served(http(c.client_b, c.web["web-a"].ip4))
    woke = c.status("web-a")
    assert woke.state == "running" and not woke.redirect
    r = http(c.client_b, c.web["web-a"].ip4, n=8, path="/big.bin")  # busybox httpd: backlog 9
    assert_served(r, path="/big.bin")
    after = c.status("web-a")
    # the program saw the 8 SYNs and handed none to the proxy; the proxy saw nothing
    assert after.lookups - woke.lookups == 8
    assert (after.assigned, after.accepted, after.relayed, after.bytes_to_client) == (
        woke.assigned, woke.accepted, woke.relayed, woke.bytes_to_client)
    assert after.restores == woke.restores


def test_five_idle_checkpoint_wake_cycles(cluster: Cluster) -> None:
    c = cluster
    st = c.wait_state("web-b", "checkpointed")
    first = st
    for _ in range(5):
        assert_served(http(c.client_a, c.web["web-b"].ip4, path="/big.bin"), path="/big.bin")
        woke = c.status("web-b")
        assert woke.state == "running" and woke.restores == st.restores + 1
        wait_until(lambda woke=woke: c.status("web-b").checkpoints == woke.checkpoints + 1
                   and c.status("web-b").state == "checkpointed", "the next idle checkpoint")
        st = c.status("web-b")
        assert c.side_of("web-b").runtime.pid("web-b") is None
    assert (st.restores, st.checkpoints, st.failures) == (first.restores + 5, first.checkpoints + 5, first.failures)


@contextlib.contextmanager
def images_moved_away(runtime: RuncRuntime, cid: str) -> Iterator[None]:
    images = runtime.images_dir(cid)
    aside = images.with_name("checkpoint.aside")
    images.rename(aside)
    try:
        yield
    finally:
        shutil.rmtree(images, ignore_errors=True)
        aside.rename(images)


def test_restore_failure_closes_held_clients_and_records_the_reason(cluster: Cluster) -> None:
    """Images gone: the held clients are reset (not left hanging), the pod is `failed` with the
    reason, and once the images are back the next connection wakes it."""
    c = cluster
    side = c.side_of("web-a")
    before = c.wait_state("web-a", "checkpointed")
    with images_moved_away(side.runtime, "web-a"):
        t0 = time.monotonic()
        r = http(c.client_b, c.web["web-a"].ip4, n=5, timeout=60)
        elapsed = time.monotonic() - t0
        assert [x["ok"] for x in r] == [False] * 5
        assert all("ConnectionResetError" in x["error"] for x in r), r
        assert elapsed < 20.0, "held clients must be closed within the configured restore timeout (20s)"
        st = c.status("web-a")
        assert st.state == "failed"
        assert "no checkpoint images" in st.reason
        # one restore per wake; a connection accepted after a failure may start the next attempt
        assert st.failures >= before.failures + 1 and st.dropped == before.dropped + 5
        assert st.redirect  # still caught: the next connection tries again
        assert side.runtime.state("web-a") == ContainerState.FAILED
        assert side.scaler is not None
        metrics = side.scaler.scaler.metrics.registry
        assert metrics.get_sample_value("zeroproxy_s2z_failures_total",
                                        {"op": "restore", "reason": "no_images"}) >= 1
    assert_served(http(c.client_b, c.web["web-a"].ip4), bodies=("hello from web-a\n",))
    assert c.status("web-a").state == "running"


def test_a_restore_slower_than_the_timeout_closes_held_clients_in_time(cluster: Cluster) -> None:
    """A restore that hangs (the container's lock is held) must not hang the clients: they are
    reset after the pod's restore timeout, and the restore completes afterwards."""
    c = cluster
    side = c.side_of("web-b")
    assert side.scaler is not None
    c.wait_state("web-b", "checkpointed")
    scaler = side.scaler.scaler
    pp = scaler.activator.pods["default/web-b"]
    old_timeout, pp.hold_timeout = pp.hold_timeout, 2.0
    lock = open(side.runtime.base_dir / "containers" / "web-b" / "lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        r = http(c.client_a, c.web["web-b"].ip4, n=3, timeout=60)
        elapsed = time.monotonic() - t0
        assert all(not x["ok"] and "ConnectionResetError" in x["error"] for x in r), r
        assert 2.0 <= elapsed < 15.0, elapsed  # the configured 2 s, with a generous margin
        assert c.status("web-b").state == "restoring"
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        pp.hold_timeout = old_timeout
    c.wait_state("web-b", "running")
    assert_served(http(c.client_a, c.web["web-b"].ip4), bodies=("hello from web-b\n",))


def test_app_without_so_reuseaddr_restores_while_proxy_holds_its_port(criu: Path, testbed: TestBed,
                                                                       tmp_path: Path) -> None:
    """The proxy's accepted sockets hold the app's port while CRIU re-binds the app's listener.

    The python server listens without SO_REUSEADDR; the proxy's listener has it, which is what
    the accepted sockets inherit, so the restore binds next to them (docs/runtime.md).
    """
    n = testbed.add_node("n")
    pod = testbed.add_pod(n, "py")
    client = testbed.add_pod(n, "cli")
    runtime = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=f"/zeroproxy-test-{uuid.uuid4().hex[:8]}")
    scaler = None
    try:
        fs = rootfs.build_python_rootfs(tmp_path / "rootfs", {"/www/big.bin": BIG})
        runtime.run(ContainerSpec(id="py", rootfs=fs.path, args=rootfs.python_server_command(PORT, reuseaddr=False),
                                  netns=pod.netns_path, rootfs_mounts=fs.mounts))
        wait_until(lambda: f":{PORT} " in listening(pod), "python server listens")
        scaler = ScalerThread(runtime, poll_interval=0.1)
        scaler.call(scaler.scaler.add, ScaledPod("default/py", "py", pod.netns_path, (pod.ip4, pod.ip6),
                                               idle_timeout=1.0))
        for _ in range(2):
            wait_until(lambda: scaler.status()["default/py"].state == "checkpointed", "py checkpointed")
            assert_served(http(client, pod.ip4, n=10, path="/big.bin"), path="/big.bin")
            st = scaler.status()["default/py"]
            assert st.state == "running" and st.failures == 0
    finally:
        if scaler is not None:
            scaler.close()
        runtime.delete_all()


def test_dump_with_a_connection_in_flight_keeps_the_pod_running(criu: Path, testbed: TestBed,
                                                                 tmp_path: Path) -> None:
    """A connection the app has not accepted makes the dump fail: not idle, redirect off again,
    the connection is served, and a later idle period checkpoints it."""
    n = testbed.add_node("n")
    pod = testbed.add_pod(n, "lazy")
    client = testbed.add_pod(n, "cli")
    # accepts only when /tmp/go exists, so a connection can sit in its queue during the dump
    app = ("import os, socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
           f"s.bind(('0.0.0.0', {PORT}))\ns.listen()\n"
           "while True:\n    while not os.path.exists('/app/go'):\n        time.sleep(0.02)\n"
           "    c, _ = s.accept()\n    c.recv(4096)\n"
           "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nhello from lazy\\n')\n    c.close()\n")
    runtime = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=f"/zeroproxy-test-{uuid.uuid4().hex[:8]}")
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs", {"/app/lazy.py": app})
    scaler = None
    conn = None
    try:
        runtime.run(ContainerSpec(id="lazy", rootfs=fs.path, args=["/usr/bin/python3", "-I", "-B", "/app/lazy.py"],
                                  netns=pod.netns_path, rootfs_mounts=fs.mounts))
        wait_until(lambda: f":{PORT} " in listening(pod), "lazy listens")
        scaler = ScalerThread(runtime, poll_interval=0.1)
        scaler.call(scaler.scaler.add, ScaledPod("default/lazy", "lazy", pod.netns_path, (pod.ip4,),
                                               idle_timeout=3600.0, ports=(PORT,)))
        conn = client.run([sys.executable, "-c", CLIENT, pod.ip4, str(PORT), "1", "/", "60"],
                          stdout=subprocess.PIPE, text=True)
        wait_until(lambda: accept_queue(pod) == 1, "the connection waits in the app's accept queue")
        assert scaler.call(scaler.scaler.checkpoint, "default/lazy") is False
        st = scaler.status()["default/lazy"]
        assert st.state == "running" and not st.redirect and st.checkpoints == 0
        assert runtime.state("lazy") == ContainerState.RUNNING
        (fs.path / "app" / "go").write_text("")
        out, _ = conn.communicate(timeout=60)
        assert_served(json.loads(out), bodies=("hello from lazy\n",))
        assert scaler.call(scaler.scaler.checkpoint, "default/lazy") is True
        assert runtime.state("lazy") == ContainerState.CHECKPOINTED
    finally:
        if conn is not None and conn.poll() is None:
            conn.kill()
        if scaler is not None:
            scaler.close()
        runtime.delete_all()


ECHO_APP = (
    "import socket, threading\n"
    "s = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {PORT}))\ns.listen()\n"
    "def serve(c):\n    while (d := c.recv(4096)):\n        c.sendall(d)\n    c.close()\n"
    "while True:\n    c, _ = s.accept()\n    threading.Thread(target=serve, args=(c,), daemon=True).start()\n")

# One connection (one SYN), one byte each way every `gap` seconds for `duration`, then closed;
# prints the monotonic time (one clock for every netns) of the last byte it got back.
TRICKLE_CLIENT = r"""
import json, socket, sys, time
host, port, duration, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
end = time.monotonic() + duration
while True:
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    last = time.monotonic()
    if last >= end:
        break
    time.sleep(gap)
s.close()
print(json.dumps({"last": last}))
"""


def test_idle_means_no_byte_either_a_busy_connection_keeps_the_pod_up(criu: Path, testbed: TestBed,
                                                                         tmp_path: Path) -> None:
    """zeropod's issue #84: a pod checkpointed although a connection had just carried data. One
    connection (a single SYN, at the start) carries a byte every 0.2 s for 1.5 idle timeouts and
    then closes: no checkpoint while it carries data, and the checkpoint comes no sooner than a
    whole idle timeout after its last byte. (Counting SYNs and open connections only would
    checkpoint half a timeout after the close.)"""
    idle = 3.0
    n = testbed.add_node("n")
    pod = testbed.add_pod(n, "echo")
    client = testbed.add_pod(n, "cli")
    runtime = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=f"/zeroproxy-test-{uuid.uuid4().hex[:8]}")
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs", {"/app/echo.py": ECHO_APP})
    changes: list[tuple[float, str | None]] = []
    scaler = None
    try:
        runtime.run(ContainerSpec(id="echo", rootfs=fs.path, args=["/usr/bin/python3", "-I", "-B", "/app/echo.py"],
                                  netns=pod.netns_path, rootfs_mounts=fs.mounts))
        wait_until(lambda: f":{PORT} " in listening(pod), "the echo app listens")
        scaler = ScalerThread(runtime, poll_interval=0.1,
                              on_state=lambda _n, _o, new, _r, _s: changes.append(
                                  (time.monotonic(), new.value if new is not None else None)))
        scaler.call(scaler.scaler.add, ScaledPod("default/echo", "echo", pod.netns_path, (pod.ip4,),
                                               idle_timeout=idle))
        out = client.run([sys.executable, "-c", TRICKLE_CLIENT, pod.ip4, str(PORT), str(1.5 * idle), "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = out.communicate(timeout=60)
        assert out.returncode == 0, stderr
        last_byte = json.loads(stdout)["last"]
        assert [c for c in changes if c[1] != "running"] == [], "checkpointed while a connection carried data"
        wait_until(lambda: scaler.status()["default/echo"].state == "checkpointed", "echo checkpointed", timeout=60)
        began = next(t for t, state in changes if state == "checkpointing")
        assert began - last_byte >= idle, (began - last_byte, changes)
        assert scaler.status()["default/echo"].checkpoints == 1
    finally:
        if scaler is not None:
            scaler.close()
        runtime.delete_all()


def test_dry_run_decides_and_reports_but_never_checkpoints(criu: Path, testbed: TestBed, tmp_path: Path) -> None:
    """zeroproxy.io/scale-to-zero: "dry-run" (zeropod's issue #194): the idle decision, a
    connection's would-wake, logs, metrics and the Events' state changes all happen; the
    container keeps running, is never dumped, and the redirect never turns on."""
    n = testbed.add_node("n")
    pod = testbed.add_pod(n, "echo")
    client = testbed.add_pod(n, "cli")
    runtime = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=f"/zeroproxy-test-{uuid.uuid4().hex[:8]}")
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs", {"/app/echo.py": ECHO_APP})
    changes: list[tuple[str | None, str | None, str]] = []
    registry = CollectorRegistry()
    scaler = None
    try:
        runtime.run(ContainerSpec(id="echo", rootfs=fs.path, args=["/usr/bin/python3", "-I", "-B", "/app/echo.py"],
                                  netns=pod.netns_path, rootfs_mounts=fs.mounts))
        wait_until(lambda: f":{PORT} " in listening(pod), "the echo app listens")
        scaler = ScalerThread(runtime, poll_interval=0.1, metrics=ScaleMetrics(registry),
                              on_state=lambda _n, old, new, reason, _s: changes.append(
                                  (old and old.value, new and new.value, reason)))
        pod_cfg, problems = annotations.parse({annotations.SCALE_TO_ZERO: annotations.DRY_RUN,
                                               annotations.IDLE_TIMEOUT: "1s"}, "default/echo")
        assert problems == [] and pod_cfg is not None and pod_cfg.dry_run
        scaler.call(scaler.scaler.add, ScaledPod("default/echo", "echo", pod.netns_path, (pod.ip4,),
                                               idle_timeout=pod_cfg.idle_timeout, dry_run=True))
        wait_until(lambda: scaler.status()["default/echo"].would_checkpoints == 1, "a would-checkpoint")
        out = client.run([sys.executable, "-c", TRICKLE_CLIENT, pod.ip4, str(PORT), "0", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert out.communicate(timeout=60)[1] == "" and out.returncode == 0
        wait_until(lambda: scaler.status()["default/echo"].would_wakes == 1, "a would-wake")
        st = scaler.status()["default/echo"]
        assert (st.state, st.checkpoints, st.restores, st.redirect, st.dry_run) == ("running", 0, 0, False, True)
        assert runtime.state("echo") == ContainerState.RUNNING
        assert [r.op for r in runtime.history] == ["create", "start"]  # never a checkpoint
        decisions = [(old, new, reason.split(" after ")[0].split(" by ")[0]) for old, new, reason in changes if reason]
        assert decisions[:2] == [("running", "running", DRY_RUN_CHECKPOINT), ("running", "running", DRY_RUN_WAKE)]
        assert registry.get_sample_value("zeroproxy_s2z_checkpoints_total",
                                         {"pod": "default/echo", "result": "dry_run"}) >= 1
        assert registry.get_sample_value("zeroproxy_s2z_wakes_total", {"pod": "default/echo"}) == 1
        # What the agent publishes for them: an Event each, no label change.
        reasons = [reason for _, _, reason in changes if reason]
        label, event = publication(ScaleState.RUNNING, ScaleState.RUNNING, reasons[0])
        assert label == "running" and event is not None and event[0] == "WouldCheckpoint", event
        assert (publication(ScaleState.RUNNING, ScaleState.RUNNING, reasons[1])[1] or ("",))[0] == "WouldRestore"
    finally:
        if scaler is not None:
            scaler.close()
        runtime.delete_all()


def test_annotations_feed_the_scaler(cluster: Cluster) -> None:
    """The pods' annotations reached the scaler: idle timeout 1 s, restore timeout 20 s."""
    c = cluster
    for name in c.web:
        st = c.status(name)
        assert st.idle_timeout == 1.0
        assert c.side_of(name).scaler.scaler.activator.pods[f"default/{name}"].hold_timeout == 20.0
    assert os.path.exists(c.workdir / "scale-b.json")


def test_scale_run_daemon_follows_pod_annotations_and_status_shows_it(criu: Path, testbed: TestBed,
                                                                      tmp_path: Path) -> None:
    """`zeroproxy scale run` as its own process on a file source: the annotated pod is managed,
    checkpointed when idle and woken by a client; `scale status` and the metrics endpoint show
    it; removing the annotation restores the pod and hands it back."""
    import yaml

    n = testbed.add_node("n")
    pod = testbed.add_pod(n, "web")
    client = testbed.add_pod(n, "cli")
    rt_dir = tmp_path / "rt"
    parent = f"/zeroproxy-test-{uuid.uuid4().hex[:8]}"
    runtime = RuncRuntime(rt_dir, criu, cgroup_parent=parent)
    cid = "default.web"
    fs = rootfs.build_busybox_rootfs(tmp_path / "rootfs", {"/www/index.html": "hello from web\n"})
    runtime.run(ContainerSpec(id=cid, rootfs=fs.path, args=rootfs.httpd_command(PORT), netns=pod.netns_path,
                              rootfs_mounts=fs.mounts))
    source = tmp_path / "cluster.yaml"
    state_file = tmp_path / "state.json"

    def write(annotated: bool) -> None:
        obj = k8sobjects.pod(pod.name, pod.node.name, [pod.ip4, pod.ip6],
                             annotations=annotations.annotate("1s") if annotated else {})
        obj["metadata"]["namespace"] = "default"
        tmp = source.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all([node("n", [n.ip4]), obj]))
        tmp.replace(source)

    def state() -> dict[str, Any]:
        try:
            pods = json.loads(state_file.read_text())["pods"]
        except (FileNotFoundError, ValueError):
            return {}
        return pods[0] if pods else {}

    with socket_port() as metrics_port:
        pass
    write(True)
    log = open(tmp_path / "scale.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zeroproxy.scale_cli", "scale", "run", "--source", f"file:{source}",
         "--node-name", "n", "--runtime-dir", str(rt_dir), "--criu", str(criu), "--cgroup-parent", parent,
         "--state-file", str(state_file), "--metrics-port", str(metrics_port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: state().get("state") == "checkpointed" or proc.poll() is not None,
                   "checkpointed", timeout=60)
        assert proc.poll() is None, (tmp_path / "scale.log").read_text()[-3000:]
        assert runtime.state(cid) == ContainerState.CHECKPOINTED
        assert_served(http(client, pod.ip4), bodies=("hello from web\n",))
        wait_until(lambda: state().get("restores") == 1, "the state file shows the restore")

        table = subprocess.run([sys.executable, "-m", "zeroproxy.scale_cli", "scale", "status", "--state-file",
                                str(state_file)], capture_output=True, text=True, check=True, cwd=REPO).stdout
        assert "default/web" in table and "STATE" in table
        as_json = json.loads(subprocess.run(
            [sys.executable, "-m", "zeroproxy.scale_cli", "scale", "status", "--state-file", str(state_file),
             "-o", "json"], capture_output=True, text=True, check=True, cwd=REPO).stdout)
        assert as_json["pods"][0]["name"] == "default/web" and as_json["pods"][0]["restores"] >= 1
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "zeroproxy_s2z_restore_seconds_count 1.0" in metrics
        assert 'zeroproxy_s2z_wakes_total{pod="default/web"} 1.0' in metrics

        # opt out while checkpointed: the pod is restored and no longer managed
        wait_until(lambda: state().get("state") == "checkpointed", "checkpointed again", timeout=60)
        write(False)
        wait_until(lambda: json.loads(state_file.read_text())["pods"] == [], "opted out", timeout=60)
        assert runtime.state(cid) == ContainerState.RUNNING
        assert_served(http(client, pod.ip4), bodies=("hello from web\n",))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        runtime.delete_all()
    assert proc.returncode == 0, (tmp_path / "scale.log").read_text()[-3000:]


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A free TCP port on loopback (for the metrics endpoint)."""
    import socket as _socket

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
