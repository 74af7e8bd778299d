"""The runc runtime driver against real runc 1.1.5, real CRIU 4.2.1 and real network namespaces.

Each test gets a pod netns and a client netns joined by a veth pair (both created here with
unique names and deleted afterwards), a runtime whose state, images and cgroups live in a
per-test place, and real HTTP traffic from the client netns to the container.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataplane.netns import in_netns
from scaletozero.runc import RuncRuntime, failure
from scaletozero.runtime import (
    CRIU_CONFIG_ANNOTATION,
    CheckpointError,
    ContainerNotFound,
    ContainerSpec,
    FailureKind,
    RestoreError,
    cgroup_mounts,
)
from scaletozero.state import ContainerState
from testbed import rootfs

REPO = Path(__file__).resolve().parent.parent
POD_IP = "10.99.0.2"
CLIENT_IP = "10.99.0.1"
PORT = 8080
BODY = "hello from a checkpointed pod\n"



@dataclass
class Pod:
    """A pod netns reachable at POD_IP from a client netns."""

    name: str
    client: str

    @property
    def path(self) -> Path:
        return Path("/var/run/netns") / self.name

    @property
    def client_path(self) -> Path:
        return Path("/var/run/netns") / self.client


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def pod() -> Iterator[Pod]:
    """Two fresh netns joined by a veth; `ip netns add` only makes the namespaces themselves."""
    tag = uuid.uuid4().hex[:8]
    p = Pod(name=f"zprt-pod-{tag}", client=f"zprt-cli-{tag}")
    try:
        _ip("netns", "add", p.name)
        _ip("netns", "add", p.client)
        _ip("-n", p.client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", p.name)
        for ns, addr in ((p.client, CLIENT_IP), (p.name, POD_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield p
    finally:
        for ns in (p.name, p.client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def runtime(criu: Path, tmp_path: Path) -> Iterator[RuncRuntime]:
    """A runtime with its own runc root and cgroup parent; delete_all() removes all it made."""
    rt = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=f"/zeroproxy-test-{uuid.uuid4().hex[:8]}")
    try:
        yield rt
    finally:
        rt.delete_all()
        leftovers = [
            m / rt.cgroup_parent.lstrip("/") for m in cgroup_mounts() if (m / rt.cgroup_parent.lstrip("/")).exists()
        ]
        assert not leftovers, f"cgroups left behind: {leftovers}"


def curl(pod: Pod, path: str = "/") -> subprocess.CompletedProcess[str]:
    """GET from the client netns through the veth, as a pod on another host would."""
    return subprocess.run(
        [
            "nsenter",
            f"--net={pod.client_path}",
            "curl",
            "-sS",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            f"http://{POD_IP}:{PORT}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_serves(pod: Pod, body: str = BODY) -> None:
    res = curl(pod)
    assert res.returncode == 0, res.stderr
    got, _, code = res.stdout.rpartition("\n")
    assert (code, got) == ("200", body)


def http_get_until_server_closes(pod: Pod) -> tuple[int, str]:
    """GET over a socket that reads to EOF before closing, so the server closes first.

    The side that closes first keeps the TIME_WAIT socket; curl may close first or not.
    """
    with in_netns(pod.client_path):
        conn = socket.create_connection((POD_IP, PORT), timeout=10)
    with conn:
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {POD_IP}\r\n\r\n".encode())
        return parse_response(read_to_eof(conn))


def read_to_eof(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def parse_response(data: bytes) -> tuple[int, str]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b"\r\n")[0].split()[1]), body.decode()


def wait_listening(pod: Pod) -> None:
    """Wait until the container's server listens: runc start returns before the app binds."""
    for _ in range(200):
        if f":{PORT} " in ss(pod.path, "state", "listening"):
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"nothing listens on :{PORT} in {pod.name}: {ss(pod.path)}")


def wait_accepted(pod: Pod) -> None:
    """Wait until the server has accepted the client's connection (a process owns the socket).

    A connection still in the listener's backlog belongs to no process; the tests are about
    one the app holds.
    """
    for _ in range(200):
        if "users:" in ss(pod.path, "-p", "state", "established", "sport", "=", f":{PORT}"):
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"connection never accepted in {pod.name}: {ss(pod.path, '-p')}")


def process_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (host init reaps orphans only after a while)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def busybox_spec(tmp_path: Path, pod: Pod, cid: str = "web", **kw: object) -> ContainerSpec:
    fs = rootfs.build_busybox_rootfs(tmp_path / f"rootfs-{cid}", {"/www/index.html": BODY})
    return ContainerSpec(
        id=cid, rootfs=fs.path, args=rootfs.httpd_command(PORT), netns=pod.path, rootfs_mounts=fs.mounts, **kw
    )  # type: ignore[arg-type]


def ss(netns: Path, *args: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns}", "ss", "-Htan", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


# --- tests -----------------------------------------------------------------------------------


def test_bundle_uses_pod_netns_own_pid_ns_pipes_and_network_lock_skip(
    runtime: RuncRuntime, pod: Pod, tmp_path: Path
) -> None:
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    cdir = runtime.base_dir / "containers" / "web"
    config = json.loads((cdir / "bundle" / "config.json").read_text())
    namespaces = {ns["type"]: ns.get("path") for ns in config["linux"]["namespaces"]}
    assert namespaces["network"] == str(pod.path)
    assert runtime.netns("web") == pod.path and runtime.netns("nope") is None
    assert "pid" in namespaces and namespaces["pid"] is None
    assert config["process"]["terminal"] is False
    criu_conf = Path(config["annotations"][CRIU_CONFIG_ANNOTATION])
    assert "network-lock skip" in criu_conf.read_text().splitlines()

    pid = runtime.pid("web")
    assert pid is not None
    # The container really is in the pod netns and has its own PID namespace ...
    assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{pod.path.stat().st_ino}]"
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    # ... and its stdio are pipes, not a terminal or a /dev/null from some mount.
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:["), fd
    assert_serves(pod)


def test_checkpoint_restore_three_times(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    assert runtime.state("web") == ContainerState.RUNNING
    assert_serves(pod)

    for _ in range(3):
        pid = runtime.pid("web")
        assert pid is not None
        assert runtime.listen_ports("web") == {PORT}  # read from its processes
        images = runtime.checkpoint("web")

        assert runtime.state("web") == ContainerState.CHECKPOINTED
        assert runtime.listen_ports("web") == {PORT}  # recorded at the dump: what a scaler must catch
        assert runtime.pid("web") is None
        assert not process_alive(pid)
        assert (images / "inventory.img").is_file()
        assert list(images.glob("pages-*.img")), sorted(p.name for p in images.iterdir())
        # Nothing listens in the pod any more: the kernel refuses (curl exit 7), no iptables
        # rule or CRIU network lock is involved.
        assert curl(pod).returncode == 7

        runtime.restore("web")
        assert runtime.state("web") == ContainerState.RUNNING
        new_pid = runtime.pid("web")
        assert new_pid is not None and process_alive(new_pid)
        assert os.readlink(f"/proc/{new_pid}/ns/net") == f"net:[{pod.path.stat().st_ino}]"
        assert_serves(pod)

    ops = [(r.op, r.ok) for r in runtime.history if r.op in ("checkpoint", "restore")]
    assert ops == [("checkpoint", True), ("restore", True)] * 3
    assert all(r.seconds > 0 for r in runtime.history)
    meta = json.loads((runtime.base_dir / "containers/web/meta.json").read_text())
    assert meta["last_restore"]["ok"] and meta["last_checkpoint"]["ok"]


def test_restore_without_images_fails_clearly_then_state_is_failed(
    runtime: RuncRuntime, pod: Pod, tmp_path: Path
) -> None:
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    images = runtime.checkpoint("web")
    shutil.rmtree(images)

    with pytest.raises(RestoreError, match="no checkpoint images") as exc:
        runtime.restore("web")
    assert exc.value.kind == FailureKind.NO_IMAGES
    assert str(images) in str(exc.value)
    assert runtime.state("web") == ContainerState.FAILED
    assert "no checkpoint images" in runtime.reason("web")
    assert runtime.pid("web") is None
    assert curl(pod).returncode == 7
    assert [(r.op, r.ok) for r in runtime.history][-1] == ("restore", False)


def test_restore_failure_carries_criu_error_and_can_be_retried(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    """Someone else listening on the port makes CRIU's bind fail; after it goes, a retry works."""
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    runtime.checkpoint("web")

    with in_netns(pod.path):
        squatter = socket.socket()
    try:
        squatter.bind(("0.0.0.0", PORT))
        squatter.listen()
        with pytest.raises(RestoreError) as exc:
            runtime.restore("web")
    finally:
        squatter.close()
    err = exc.value
    assert err.kind == FailureKind.ADDR_IN_USE
    assert "Address already in use" in err.reason
    assert "CRIU: Error (" in err.reason
    assert "Address already in use" in err.log_tail and err.log_tail in str(err)
    assert runtime.state("web") == ContainerState.FAILED
    assert "Address already in use" in runtime.reason("web")

    runtime.restore("web")
    assert runtime.state("web") == ContainerState.RUNNING
    assert runtime.reason("web") == ""
    assert_serves(pod)


def test_established_connection_needs_tcp_established(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    """Without the option a dump refuses open connections and the container keeps serving."""
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    with in_netns(pod.client_path):
        conn = socket.create_connection((POD_IP, PORT), timeout=10)
    try:
        wait_accepted(pod)
        with pytest.raises(CheckpointError) as exc:
            runtime.checkpoint("web")
    finally:
        conn.close()
    assert "CRIU: Error (" in exc.value.reason
    assert exc.value.kind == FailureKind.ESTABLISHED and exc.value.kind.not_idle
    assert "tcp-established" in exc.value.log_tail
    assert runtime.state("web") == ContainerState.RUNNING
    assert not (runtime.base_dir / "containers/web/checkpoint").exists()
    assert_serves(pod)


def test_tcp_established_connection_survives_checkpoint(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    runtime.run(busybox_spec(tmp_path, pod, tcp_established=True))
    wait_listening(pod)
    with in_netns(pod.client_path):
        conn = socket.create_connection((POD_IP, PORT), timeout=10)
    try:
        wait_accepted(pod)
        runtime.checkpoint("web")
        assert runtime.state("web") == ContainerState.CHECKPOINTED
        runtime.restore("web")
        # The request goes over the connection opened before the dump.
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {POD_IP}\r\n\r\n".encode())
        data = read_to_eof(conn)
    finally:
        conn.close()
    assert parse_response(data) == (200, BODY)
    assert_serves(pod)


def test_listener_without_reuseaddr_restores_despite_time_wait(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    """Server-closed connections leave TIME_WAIT on the app's port; restore clears them."""
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs-py", {"/www/index.html": BODY})
    spec = ContainerSpec(
        id="py",
        rootfs=fs.path,
        args=rootfs.python_server_command(PORT, reuseaddr=False),
        netns=pod.path,
        rootfs_mounts=fs.mounts,
    )
    runtime.run(spec)
    wait_listening(pod)

    for _ in range(2):
        assert http_get_until_server_closes(pod) == (200, BODY)
        assert f"{POD_IP}:{PORT} " in ss(pod.path, "state", "time-wait")
        runtime.checkpoint("py")
        runtime.restore("py")
        assert runtime.state("py") == ContainerState.RUNNING
    assert_serves(pod)


# An app that never closes a connection whose peer went away without a request.
HOLDER_APP = f"""
import socket, threading
held = []
def serve(c):
    try:
        data = c.recv(4096)
    except OSError:
        data = b""
    if not data:
        held.append(c)
        return
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: {len(BODY)}\\r\\n\\r\\n{BODY.strip()}\\n")
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def test_app_holding_a_reset_connection_restores(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    """A socket reset by its peer but still open in the app dumps as TCP_CLOSE; it must restore.

    CRIU dumps it without complaint and then refuses to restore it ("Connected TCP socket in
    image") unless told tcp-close, which the runtime adds on restore.
    """
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs-holder", {"/app/holder.py": HOLDER_APP})
    spec = ContainerSpec(
        id="holder",
        rootfs=fs.path,
        args=["/usr/bin/python3", "-I", "-B", "/app/holder.py"],
        netns=pod.path,
        rootfs_mounts=fs.mounts,
    )
    runtime.run(spec)
    wait_listening(pod)
    with in_netns(pod.client_path):
        conn = socket.create_connection((POD_IP, PORT), timeout=10)
    wait_accepted(pod)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST
    for _ in range(200):
        if not ss(pod.path, "state", "established", "sport", "=", f":{PORT}").strip():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    else:
        raise AssertionError("the server side never saw the reset")

    runtime.checkpoint("holder")
    runtime.restore("holder")
    assert runtime.state("holder") == ContainerState.RUNNING
    assert http_get_until_server_closes(pod) == (200, BODY)


def test_dump_refuses_connection_waiting_in_accept_queue(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    """A connection the app has not accepted yet must not be lost: the checkpoint fails instead."""
    app = f"import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', {PORT}))\ns.listen()\ntime.sleep(1e9)\n"
    fs = rootfs.build_python_rootfs(tmp_path / "rootfs-lazy", {"/app/lazy.py": app})
    spec = ContainerSpec(
        id="lazy",
        rootfs=fs.path,
        args=["/usr/bin/python3", "-I", "-B", "/app/lazy.py"],
        netns=pod.path,
        rootfs_mounts=fs.mounts,
    )
    runtime.run(spec)
    wait_listening(pod)
    with in_netns(pod.client_path):
        conn = socket.create_connection((POD_IP, PORT), timeout=10)
    try:
        # The handshake completed in the kernel; the connection waits in the listener's queue.
        assert ss(pod.path, "state", "listening", "sport", "=", f":{PORT}").split()[0] == "1"
        with pytest.raises(CheckpointError) as exc:
            runtime.checkpoint("lazy")
        assert "In-flight connection" in exc.value.reason
        assert exc.value.kind == FailureKind.IN_FLIGHT and exc.value.kind.not_idle
        assert runtime.state("lazy") == ContainerState.RUNNING
        # ... and the queued connection is still there for the app to accept.
        assert ss(pod.path, "state", "listening", "sport", "=", f":{PORT}").split()[0] == "1"
    finally:
        conn.close()


def test_wrong_state_and_unknown_container(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    with pytest.raises(RestoreError, match="it is running") as exc:
        runtime.restore("web")
    assert exc.value.kind == FailureKind.OTHER
    runtime.checkpoint("web")
    with pytest.raises(CheckpointError, match="it is checkpointed"):
        runtime.checkpoint("web")
    with pytest.raises(ContainerNotFound):
        runtime.state("nope")
    assert runtime.containers() == ["web"]
    runtime.delete("web")
    assert runtime.containers() == []
    with pytest.raises(ContainerNotFound):
        runtime.state("web")


def test_delete_running_container_stops_it(runtime: RuncRuntime, pod: Pod, tmp_path: Path) -> None:
    runtime.run(busybox_spec(tmp_path, pod))
    wait_listening(pod)
    pid = runtime.pid("web")
    assert pid is not None and process_alive(pid)
    runtime.delete("web")
    assert not process_alive(pid)
    assert curl(pod).returncode == 7
    assert not (runtime.base_dir / "containers" / "web").exists()


def test_cgroup_parent_inside_someone_elses_subtree(criu: Path, pod: Pod, tmp_path: Path) -> None:
    """Containers can live under a node's cgroup v2 subtree (where the socket programs attach).

    The container must be in that subtree before and after a restore, and teardown removes
    only the directories runc made, never the owner's.
    """
    v2 = next(m for m in cgroup_mounts() if (m / "cgroup.controllers").exists())
    owner = v2 / f"zeroproxy-test-owner-{uuid.uuid4().hex[:8]}"
    owner.mkdir()
    parent = f"/{owner.name}/node1/containers"
    rt = RuncRuntime(tmp_path / "rt", criu, cgroup_parent=parent)
    try:
        rt.run(busybox_spec(tmp_path, pod))
        wait_listening(pod)
        for _ in range(2):
            pid = rt.pid("web")
            assert pid is not None
            assert f"0::{parent}/web\n" in Path(f"/proc/{pid}/cgroup").read_text()
            rt.checkpoint("web")
            rt.restore("web")
            assert_serves(pod)
        rt.delete_all()
        assert owner.is_dir()
        assert not [p for p in owner.iterdir() if p.is_dir()]
        assert not [m for m in cgroup_mounts() if m != v2 and (m / owner.name).exists()]
    finally:
        rt.delete_all()
        for d in sorted((p for p in owner.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        owner.rmdir()


# --- the one parser of runc's and CRIU's output (pure) ----------------------------------------

RUNC_CRIU_FAILED = 'time="2026-01-01T00:00:00Z" level=error msg="criu failed: type NOTIFY errno 0\\nlog file: /x.log"'
RLIMIT = "(00.001) Error (criu/cr-restore.c:1): setrlimit RLIMIT_NOFILE: rlimit Operation not permitted\n"


@pytest.mark.parametrize(("runc_log", "criu_log", "kind"), [
    (RUNC_CRIU_FAILED, RLIMIT + "(00.1) Error (criu/sk-inet.c:1): inet: In-flight connection (l) for 10.0.0.2:80\n",
     FailureKind.IN_FLIGHT),
    (RUNC_CRIU_FAILED, "(00.1) Error (criu/sk-tcp.c:1): tcp: Connected TCP socket, consider using --tcp-established "
     "option.\n", FailureKind.ESTABLISHED),
    (RUNC_CRIU_FAILED, "(00.1) Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 18): Address already in "
     "use\n(00.2) Error (criu/cr-restore.c:2): Restoring FAILED.\n", FailureKind.ADDR_IN_USE),
    (RUNC_CRIU_FAILED, "", FailureKind.CRIU_ERROR),  # runc says CRIU failed; no log to say why
    (RUNC_CRIU_FAILED, RLIMIT + "(00.1) Error (criu/files.c:1): Can't open vdso\n", FailureKind.CRIU_ERROR),
    ('time="x" level=error msg="container \\"web\\" does not exist"', "", FailureKind.OTHER),
])
def test_failure_line_and_kind(runc_log: str, criu_log: str, kind: FailureKind) -> None:
    reason, got = failure("runc restore web", "", runc_log, criu_log)
    assert got == kind
    assert reason.startswith("runc restore web failed: ") and "\n" not in reason
    first = next((line for line in criu_log.splitlines() if "Error (" in line and "rlimit" not in line), None)
    if first is not None:  # CRIU's first real error is quoted, never the harmless rlimit one
        assert reason.endswith("; CRIU: " + first[first.index("Error ("):])
    assert "rlimit" not in reason
