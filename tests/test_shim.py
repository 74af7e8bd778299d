"""containerd-shim-zeroproxy-v2 under a real containerd 1.6.20, runc 1.1.5 and CRIU 4.2.1.

Each test starts its own containerd as a plain process: its own root, state and sockets under a
temporary directory, and its own mount namespace in which that directory is bind-mounted over
/run/containerd, where containerd 1.6 puts shim sockets and runc's state whatever its config says.
The namespace is a slave of the host's, so pod netns mounted later under /run/netns (a shared
mount) still appear in it, and nothing mounted in it leaks out.
The system's containerd paths are never used. The shim is registered by name: containerd runs
``containerd-shim-zeroproxy-v2`` from the PATH it was given, for containers created with
``--runtime io.containerd.zeroproxy.v2``. Containers are busybox httpd in a test-bed pod netns
(``ctr run --rootfs DIR --with-ns network:/run/netns/...``), their cgroups under a parent of the
test's own in every hierarchy. ``ctr`` plays containerd's client, as the kubelet's CRI would.

Everything is removed even when a test fails: tasks, containers, the containerd, every shim of it
(found by its containerd address), the cgroups, the temporary directory, and, by the test bed,
the netns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scaletozero import nodeinstall as ni
from scaletozero.runtime import (
    ContainerNotFound,
    ContainerSpec,
    FailureKind,
    RestoreError,
    RuntimeDriverError,
    cgroup_mounts,
)
from scaletozero.shimclient import ShimClient, ShimOpFailed, ShimRefused, ShimUnreachable
from scaletozero.shimruntime import CRI_CONTAINER_TYPE, CRI_POD_NAME, CRI_POD_NAMESPACE, ShimRuntime
from scaletozero.state import ContainerState
from testbed.bed import Node, Pod, TestBed, shim_pids, wait_until
from testbed.rootfs import build_busybox_rootfs

REPO = Path(__file__).resolve().parent.parent
RUNTIME = "io.containerd.zeroproxy.v2"
NAMESPACE = "zptest"
PORT = 8080


@pytest.fixture(scope="session")
def shim_binary() -> Path:
    """The shim from scripts/build-shim.sh (cached after the first build)."""
    res = subprocess.run(["bash", str(REPO / "scripts/build-shim.sh")], capture_output=True, text=True,
                         check=False, timeout=900)
    assert res.returncode == 0, f"build-shim.sh failed:\n{res.stderr[-3000:]}"
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.name == "containerd-shim-zeroproxy-v2" and os.access(path, os.X_OK), path
    return path


@dataclass
class Event:
    topic: str
    body: dict[str, Any]


@dataclass
class Containerd:
    """One private containerd and the ctr commands the tests need."""

    dir: Path
    address: Path
    socket_dir: Path
    image_dir: Path
    options_file: Path
    criu_conf: Path
    shim_dir: Path
    cgroup_parent: str
    proc: subprocess.Popen[bytes] | None = None
    events: list[Event] = field(default_factory=list)
    _watchers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def start(self) -> None:
        """Start containerd (again) in a fresh mount namespace over the same directories."""
        env = {"PATH": f"{self.shim_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "ZP_SHIM_SOCKET_DIR": str(self.socket_dir), "ZP_SHIM_IMAGE_DIR": str(self.image_dir)}
        d = self.dir
        script = f"mount --bind {d}/run /run/containerd && exec containerd --config {d}/config.toml"
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
                                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.proc = proc
        wait_until(lambda: proc.poll() is None and self.ctr("version", check=False).returncode == 0,
                   "the test's containerd to answer", timeout=30, interval=0.2, detail=lambda: _tail(self.log))

    def stop(self) -> None:
        """Stop containerd only: its shims, and their containers, keep running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.ctr_argv(*args), capture_output=True, text=True, check=False, timeout=timeout)
        if check and res.returncode:
            raise AssertionError(f"ctr {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}\n"
                                 f"containerd log:\n{_tail(self.log)}")
        return res

    def run_args(self, cid: str, rootfs: Path, pod: Pod, *, detach: bool = True,
                 annotations: dict[str, str] | None = None, runtime: str = RUNTIME) -> list[str]:
        """``ctr run`` arguments for busybox httpd in the pod's netns on our runtime.

        Output goes to a file (``--log-uri``): it outlives ctr and needs no FIFO, which the shim,
        in containerd's mount namespace, could not open in the host's /run/containerd.
        """
        return [
            "run", *(["--detach"] if detach else []), "--rootfs", "--runtime", runtime,
            "--runtime-config-path", str(self.options_file),
            "--with-ns", f"network:{pod.netns_path}", "--cgroup", f"{self.cgroup_parent}/{cid}",
            "--annotation", f"org.criu.config={self.criu_conf}",
            "--annotation", f"zeroproxy.io/test-id={cid}",
            *[f"--annotation={k}={v}" for k, v in (annotations or {}).items()],
            "--log-uri", f"file://{self.dir / (cid + '.log')}",
            str(rootfs), cid, "/bin/busybox", "httpd", "-f", "-v", "-p", str(PORT), "-h", "/www"]

    def task(self, cid: str) -> tuple[int, str] | None:
        """(pid, status) from ``ctr task ls``, None if there is no task."""
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) == 3 and parts[0] == cid:
                return int(parts[1]), parts[2]
        return None

    def watch_events(self) -> None:
        """Collect containerd's events (``ctr events``) from now on, in a thread."""
        proc = subprocess.Popen(["ctr", "--address", str(self.address), "events"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        self._watchers.append(proc)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = re.search(r" (/\S+) (\{.*\})\s*$", line)
                if m:
                    with contextlib.suppress(ValueError):
                        self.events.append(Event(m.group(1), json.loads(m.group(2))))

        threading.Thread(target=read, daemon=True).start()

    def exits(self, cid: str) -> list[dict[str, Any]]:
        """TaskExit events of a container's init process."""
        return [e.body for e in list(self.events)
                if e.topic == "/tasks/exit" and e.body.get("container_id") == cid and e.body.get("id") == cid]

    def shim_pids(self) -> list[int]:
        """Shims of this containerd: their command line carries its address."""
        return shim_pids(str(self.address))


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _containerd_config(d: Path) -> str:
    """No CRI (the kubelet is not part of these tests) and no snapshotters that probe the host."""
    return "\n".join([
        "version = 2",
        f'root = "{d}/root"',
        f'state = "{d}/state"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",',
        '  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",',
        '  "io.containerd.snapshotter.v1.aufs"]',
        "[grpc]",
        f'  address = "{d}/containerd.sock"',
        "[ttrpc]",
        f'  address = "{d}/containerd.sock.ttrpc"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{d}/opt"',
        "",
    ])


@pytest.fixture
def containerd(shim_binary: Path, criu: Path) -> Iterator[Containerd]:
    """A containerd with the shim on its PATH; everything it and its shims made is removed after."""
    d = Path(tempfile.mkdtemp(prefix="zp-shim-", dir="/tmp"))
    (d / "run").mkdir()
    (d / "config.toml").write_text(_containerd_config(d))
    options_file = d / "shim.toml"
    options_file.write_text(f'CriuPath = "{criu}"\n')
    criu_conf = d / "criu.conf"
    # zeroproxy's eBPF redirect, not iptables, keeps new connections away from a dumping process.
    criu_conf.write_text("network-lock skip\n")
    cd = Containerd(dir=d, address=d / "containerd.sock", socket_dir=d / "ctl", image_dir=d / "images",
                    options_file=options_file, criu_conf=criu_conf, shim_dir=shim_binary.parent,
                    cgroup_parent=f"/zeroproxy-shimtest-{uuid.uuid4().hex[:8]}")
    # containerd 1.6 uses /run/containerd whatever its config says; ours gets the test's own
    # directory bind-mounted there, which needs the mount point (made here if missing, then removed).
    made_run = not os.path.isdir("/run/containerd")
    os.makedirs("/run/containerd", exist_ok=True)
    try:
        cd.start()
        yield cd
    finally:
        _teardown(cd)
        if made_run:
            with contextlib.suppress(OSError):
                os.rmdir("/run/containerd")


def _teardown(cd: Containerd) -> None:
    """Remove everything, each step whatever the previous one did."""
    if cd.proc is not None and cd.proc.poll() is None:
        with contextlib.suppress(Exception):
            ids = cd.ctr("containers", "ls", "-q", check=False, timeout=20).stdout.split()
            for cid in ids:
                cd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False, timeout=20)
                cd.ctr("task", "delete", "--force", cid, check=False, timeout=20)
                cd.ctr("containers", "rm", cid, check=False, timeout=20)
    cd.stop()
    for w in cd._watchers:
        w.kill()
        w.wait(10)
    for pid in cd.shim_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Container processes left by a killed shim, then the cgroups runc made for them.
    for mnt in cgroup_mounts():
        top = mnt / cd.cgroup_parent.lstrip("/")
        if not top.is_dir():
            continue
        dirs = sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts))
        for cg in dirs:
            with contextlib.suppress(OSError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for cg in dirs:
            with contextlib.suppress(OSError):
                wait_until(lambda cg=cg: not (cg / "cgroup.procs").read_text().strip(), f"{cg} empty", timeout=5)
                cg.rmdir()
    shutil.rmtree(cd.dir, ignore_errors=True)
    leftovers = [m / cd.cgroup_parent.lstrip("/") for m in cgroup_mounts()
                 if (m / cd.cgroup_parent.lstrip("/")).exists()]
    assert not leftovers, f"cgroups left behind: {leftovers}"
    assert not cd.shim_pids(), "shims left behind"
    assert not cd.dir.exists(), f"{cd.dir} left behind"


# -- helpers -------------------------------------------------------------------------------------


def pids_in_netns(pod: Pod) -> list[int]:
    """Every process in the pod's network namespace."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns/net").st_ino == pod.netns_inode:
                    found.append(int(entry.name))
    return found


def http_get(node: Node, pod: Pod) -> str:
    """GET / on the pod's IP from its node, as the kubelet's probe or a client pod would."""
    return node.check_output(["curl", "-sS", "--max-time", "5", f"http://{pod.ip4}:{PORT}/"], timeout=15)


def serving(node: Node, pod: Pod, body: str) -> bool:
    try:
        return http_get(node, pod) == body
    except Exception:
        return False


@dataclass
class Web:
    node: Node
    pod: Pod
    body: str
    rootfs: Path


def make_web(testbed: TestBed, cd: Containerd, name: str) -> Web:
    node = testbed.add_node(f"{name}n")
    pod = testbed.add_pod(node, name)
    body = f"served by {name} {uuid.uuid4().hex[:8]}\n"
    rootfs = build_busybox_rootfs(cd.dir / f"rootfs-{name}", {"/www/index.html": body}).path
    return Web(node, pod, body, rootfs)


# -- tests ---------------------------------------------------------------------------------------


def test_checkpoint_restore_cycles_kill_while_checkpointed_and_delete(containerd: Containerd,
                                                                    testbed: TestBed) -> None:
    cd = containerd
    web = make_web(testbed, cd, "web")
    cd.watch_events()
    cd.ctr(*cd.run_args("web", web.rootfs, web.pod))
    wait_until(lambda: serving(web.node, web.pod, web.body), "busybox httpd answering in the pod", timeout=30,
               detail=lambda: _tail(cd.log))
    task = cd.task("web")
    assert task is not None and task[1] == "RUNNING"
    assert task[0] in pids_in_netns(web.pod)

    client = ShimClient(cd.socket_dir)
    st = client.state("web")
    assert (st.id, st.namespace, st.state, st.pid) == ("web", NAMESPACE, ContainerState.RUNNING, task[0])
    # What the agent finds a pod's container by: the spec's netns and its CRI/zeroproxy annotations
    # (only those: org.criu.config is not passed on).
    assert (st.netns, dict(st.annotations)) == (str(web.pod.netns_path), {"zeroproxy.io/test-id": "web"}), st
    assert st.bundle.endswith(f"/{NAMESPACE}/web"), st
    assert client.container_ids() == ["web"]
    with pytest.raises(ShimRefused, match="web is running, not checkpointed"):
        client.restore("web")

    log = cd.dir / "web.log"
    for cycle in range(1, 4):
        cp = client.checkpoint("web")
        assert cp.ok and cp.state is ContainerState.CHECKPOINTED and cp.pid is None, cp
        assert cp.images is not None and (cp.images / "inventory.img").is_file(), cp
        assert {"dump", "total"} <= set(cp.timings_ms), cp.timings_ms
        # The process is gone, but containerd (and so the kubelet) still sees it running.
        assert not pids_in_netns(web.pod)
        pid, status = cd.task("web") or (0, "none")
        assert status == "RUNNING", (pid, status)
        assert client.state("web").state is ContainerState.CHECKPOINTED
        with pytest.raises(ShimRefused):
            client.checkpoint("web")
        # What the kubelet polls keeps answering: no processes, empty metrics, not an error.
        assert cd.ctr("task", "ps", "web").stdout.split() == ["PID", "INFO"]
        cd.ctr("task", "metrics", "web")

        before = log.read_text()
        rs = client.restore("web")
        assert rs.ok and rs.state is ContainerState.RUNNING and rs.pid, rs
        assert {"restore", "total"} <= set(rs.timings_ms), rs.timings_ms
        # Restored in place: the same address in the same netns answers with the same content.
        assert http_get(web.node, web.pod) == web.body
        assert rs.pid in pids_in_netns(web.pod)
        assert cd.task("web") == (rs.pid, "RUNNING")
        st = client.state("web")
        assert (st.state, st.checkpoints, st.restores) == (ContainerState.RUNNING, cycle, cycle)
        # stdout/stderr continue in the same log across restores.
        wait_until(lambda before=before: len(log.read_text()) > len(before),
                   "httpd's log line for the request after restore", timeout=10)
    assert not cd.exits("web"), "a checkpoint leaked a TaskExit"

    # Exec into a scaled-down container restores it first.
    client.checkpoint("web")
    cd.ctr("task", "exec", "--exec-id", "probe", "--log-uri", f"file://{cd.dir / 'exec.log'}",
           "web", "/bin/busybox", "true")
    assert client.state("web").state is ContainerState.RUNNING
    assert http_get(web.node, web.pod) == web.body

    # A stop while checkpointed: the real exit, as if the process had got the signal.
    images = client.checkpoint("web").images
    assert images is not None
    cd.ctr("task", "kill", "web")  # SIGTERM, as a kubelet's stop sends first
    wait_until(lambda: cd.task("web") is not None and cd.task("web")[1] == "STOPPED", "task STOPPED", timeout=10)  # type: ignore[index]
    exits = wait_until(lambda: cd.exits("web"), "a TaskExit for web", timeout=10)
    assert [e["exit_status"] for e in exits] == [128 + signal.SIGTERM]
    assert client.state("web").state is ContainerState.STOPPED
    assert images.is_dir()

    cd.ctr("task", "delete", "web")
    assert not images.exists() and not (cd.image_dir / NAMESPACE / "web").exists()
    with pytest.raises(ShimUnreachable):
        client.state("web")
    cd.ctr("containers", "rm", "web")
    wait_until(lambda: not cd.shim_pids(), "the shim to exit after its last container", timeout=15)
    assert not pids_in_netns(web.pod)


def test_wait_outlives_checkpoints_and_returns_the_real_exit(containerd: Containerd, testbed: TestBed) -> None:
    """containerd's Wait (what CRI's exit monitor uses) must not return for a checkpoint."""
    cd = containerd
    web = make_web(testbed, cd, "waiter")
    attached = subprocess.Popen(cd.ctr_argv(*cd.run_args("waiter", web.rootfs, web.pod, detach=False)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30,
                   detail=lambda: _tail(cd.log))
        client = ShimClient(cd.socket_dir)
        client.checkpoint("waiter")
        client.restore("waiter")
        assert http_get(web.node, web.pod) == web.body
        client.checkpoint("waiter")
        assert attached.poll() is None, attached.communicate()
        cd.ctr("task", "kill", "--signal", "SIGKILL", "waiter")
        out, err = attached.communicate(timeout=30)
        assert attached.returncode == 128 + signal.SIGKILL, (out, err)
        # ctr run deleted the task when Wait returned; that removed the images too.
        assert not (cd.image_dir / NAMESPACE / "waiter").exists()
    finally:
        if attached.poll() is None:
            attached.kill()
            attached.communicate()


def test_restore_failure_names_criu_error_stays_running_and_retries(containerd: Containerd,
                                                                     testbed: TestBed) -> None:
    cd = containerd
    web = make_web(testbed, cd, "blocked")
    cd.ctr(*cd.run_args("blocked", web.rootfs, web.pod))
    wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30,
               detail=lambda: _tail(cd.log))
    client = ShimClient(cd.socket_dir)
    client.checkpoint("blocked")
    # Another listener on the app's port: CRIU's bind of the app's socket fails. (SO_REUSEADDR
    # lets it bind next to the TIME_WAIT the curl left; without SO_REUSEPORT it excludes CRIU's.)
    listen = ("import socket, sys\ns = socket.socket()\n"
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              f"s.bind(('0.0.0.0', {PORT})); s.listen()\nprint('ready', flush=True); sys.stdin.read()")
    blocker = web.pod.run(["python3", "-c", listen],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "ready"
        with pytest.raises(ShimOpFailed) as info:
            client.restore("blocked")
        err = info.value
        assert err.container == "blocked" and "blocked" in str(err)
        assert err.criu_error.startswith("Error ("), err.criu_error
        assert "Address already in use" in err.criu_error, err.criu_error
        assert "\n" not in err.reason, err.reason  # one line, for logs and Events
        assert err.failure is FailureKind.ADDR_IN_USE
        assert err.result is not None and err.result.state is ContainerState.FAILED
        assert client.state("blocked").state is ContainerState.FAILED
        task = cd.task("blocked")
        assert task is not None and task[1] == "RUNNING", task
    finally:
        blocker.kill()
        blocker.communicate()
    # The images were kept: the next wake retries and works.
    rs = client.restore("blocked")
    assert rs.ok and rs.state is ContainerState.RUNNING
    assert http_get(web.node, web.pod) == web.body
    cd.ctr("task", "kill", "--signal", "SIGKILL", "blocked")
    wait_until(lambda: cd.task("blocked") is not None and cd.task("blocked")[1] == "STOPPED",  # type: ignore[index]
               "task STOPPED", timeout=10)
    cd.ctr("task", "delete", "blocked")
    cd.ctr("containers", "rm", "blocked")
    assert not (cd.image_dir / NAMESPACE / "blocked").exists()


def test_containerd_restart_while_checkpointed(containerd: Containerd, testbed: TestBed) -> None:
    """The shim outlives its containerd; the restarted one finds the task Running, and it wakes."""
    cd = containerd
    web = make_web(testbed, cd, "survivor")
    cd.ctr(*cd.run_args("survivor", web.rootfs, web.pod))
    wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30)
    client = ShimClient(cd.socket_dir)
    client.checkpoint("survivor")
    cd.stop()
    assert cd.shim_pids(), "the shim went with containerd"
    cd.start()
    assert cd.task("survivor") is not None and cd.task("survivor")[1] == "RUNNING"  # type: ignore[index]
    rs = client.restore("survivor")
    assert http_get(web.node, web.pod) == web.body
    assert cd.task("survivor") == (rs.pid, "RUNNING")
    cd.ctr("task", "kill", "--signal", "SIGKILL", "survivor")
    wait_until(lambda: cd.task("survivor") is not None and cd.task("survivor")[1] == "STOPPED",  # type: ignore[index]
               "task STOPPED", timeout=10)
    cd.ctr("task", "delete", "survivor")
    cd.ctr("containers", "rm", "survivor")


def test_node_install_says_when_containerd_must_restart_and_its_criu_checkpoints(
        containerd: Containerd, testbed: TestBed, shim_binary: Path, criu: Path) -> None:
    """`zeroproxy node install` against this running containerd's config, then a checkpoint and
    restore with the CRIU it installed (its own loader and libraries, run by runc as `criu swrk`)."""
    cd = containerd
    paths = ni.Paths(host_root=Path("/"), prefix=str(cd.dir / "opt-zp"), containerd_config=str(cd.dir / "config.toml"),
                     criu_config=str(cd.dir / "etc-criu" / "runc.conf"), socket_dir=str(cd.socket_dir))
    assert cd.proc is not None
    original = (cd.dir / "config.toml").read_text()
    report = ni.install(paths, shim=shim_binary, criu=criu)
    assert report.config_changed
    # The containerd reading that very file is found (by inode, through its own root) and named.
    assert report.restart.startswith(f"RESTART REQUIRED: containerd (pid {cd.proc.pid}, started "), report.restart
    # Run again before the restart: nothing changes, and it still says so.
    again = ni.install(paths, shim=shim_binary, criu=criu)
    assert again.changes == [] and again.restart.startswith("RESTART REQUIRED"), again
    cd.stop()
    cd.start()
    assert ni.install(paths, shim=shim_binary, criu=criu).lines() == ["nothing to change",
                                                                      "containerd: no restart needed"]

    # The runtime as installed (the shim by its absolute path, the way containerd 1.6 finds it;
    # not the copy on this containerd's PATH), its options and CRIU's config.
    entry = tomllib.loads((cd.dir / "config.toml").read_text())["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"]["runtimes"]["zeroproxy"]
    assert entry["runtime_type"] == paths.shim
    cd.options_file = Path(entry["options"]["ConfigPath"])
    cd.criu_conf = Path(paths.criu_config)
    web = make_web(testbed, cd, "installed")
    cd.ctr(*cd.run_args("installed", web.rootfs, web.pod, runtime=entry["runtime_type"]))
    wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30)
    client = ShimClient(cd.socket_dir)
    cp = client.checkpoint("installed")
    assert cp.ok and not pids_in_netns(web.pod), cp
    rs = client.restore("installed")
    assert rs.ok and http_get(web.node, web.pod) == web.body, rs

    # Uninstall refuses while the shim serves a container, and names it.
    with pytest.raises(ni.NodeInstallError, match=r"1 container\(s\) still run under containerd-shim-zeroproxy-v2 "
                                                  r"on this node: \?/\?/installed \(running\)"):
        ni.uninstall(paths)
    cd.ctr("task", "kill", "--signal", "SIGKILL", "installed")
    wait_until(lambda: cd.task("installed") is not None and cd.task("installed")[1] == "STOPPED",  # type: ignore[index]
               "task STOPPED", timeout=10)
    cd.ctr("task", "delete", "installed")
    cd.ctr("containers", "rm", "installed")
    wait_until(lambda: not cd.shim_pids(), "the shim to exit after its last container", timeout=15)
    report = ni.uninstall(paths)
    assert report.restart.startswith(f"RESTART REQUIRED: containerd (pid {cd.proc.pid}, ") \
        and report.restart.endswith("to be gone; running containers keep running"), report.restart
    assert (cd.dir / "config.toml").read_text() == original
    assert not any((cd.dir / "opt-zp").rglob("*")) and not (cd.dir / "etc-criu" / "runc.conf").exists()
    # Run again before the restart (a retried init container): nothing to remove, and the
    # running containerd still has the runtime loaded, so it still says so.
    again = ni.uninstall(paths)
    assert again.changes == [] and again.restart.startswith(f"RESTART REQUIRED: containerd (pid {cd.proc.pid}, "), \
        again
    cd.stop()
    cd.start()
    assert ni.uninstall(paths).lines() == ["nothing to change", "containerd: no restart needed"]


def test_a_dead_shim_leaves_no_images_or_socket(containerd: Containerd, testbed: TestBed) -> None:
    """containerd runs the shim binary's delete after a shim died; that removes what the shim made."""
    cd = containerd
    web = make_web(testbed, cd, "orphan")
    cd.ctr(*cd.run_args("orphan", web.rootfs, web.pod))
    wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30)
    ShimClient(cd.socket_dir).checkpoint("orphan")
    assert (cd.image_dir / NAMESPACE / "orphan" / "checkpoint" / "inventory.img").is_file()

    def one_shim() -> list[int] | None:
        pids = cd.shim_pids()  # a moment's second match is a child of it between fork and exec
        return pids if len(pids) == 1 else None

    (pid,) = wait_until(one_shim, "exactly one shim", timeout=10)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: cd.task("orphan") is None or cd.task("orphan")[1] == "STOPPED",  # type: ignore[index]
               "containerd to notice the dead shim", timeout=20, detail=lambda: _tail(cd.log))
    wait_until(lambda: not (cd.image_dir / NAMESPACE / "orphan").exists(), "the images removed", timeout=20,
               detail=lambda: _tail(cd.log))
    assert not (cd.socket_dir / "orphan.sock").exists()
    cd.ctr("task", "delete", "orphan", check=False)
    cd.ctr("containers", "rm", "orphan")


def test_control_socket_and_options_reject_bad_input(containerd: Containerd, testbed: TestBed) -> None:
    cd = containerd
    with pytest.raises(ShimUnreachable, match="container nosuch"):
        ShimClient(cd.socket_dir).state("nosuch")
    web = make_web(testbed, cd, "api")
    bad = cd.dir / "bad.toml"
    bad.write_text('CriuPth = "/nowhere"\n')
    args = cd.run_args("badopts", web.rootfs, web.pod)
    args[args.index(str(cd.options_file))] = str(bad)
    res = cd.ctr(*args, check=False)
    assert res.returncode != 0 and "unknown key \"CriuPth\"" in res.stderr and "badopts" in res.stderr, res.stderr
    cd.ctr("containers", "rm", "badopts")
    cd.ctr(*cd.run_args("api", web.rootfs, web.pod))
    wait_until(lambda: serving(web.node, web.pod, web.body), "httpd answering", timeout=30)
    sock = cd.socket_dir / "api.sock"
    assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
    status, body = _raw_post(sock, "/v1/checkpoint", b'{"tcp_establishd": true}')
    assert status == 400 and "api" in body["error"] and "tcp_establishd" in body["error"], body
    client = ShimClient(cd.socket_dir)
    assert client.state("api").state is ContainerState.RUNNING
    # Images gone behind the shim's back: a restore says so, typed, and the container stays Running.
    images = client.checkpoint("api").images
    assert images is not None
    shutil.rmtree(images)
    with pytest.raises(ShimOpFailed, match="api: no checkpoint images") as info:
        client.restore("api")
    assert info.value.failure is FailureKind.NO_IMAGES and info.value.status == 404
    assert client.state("api").state is ContainerState.FAILED
    task = cd.task("api")
    assert task is not None and task[1] == "RUNNING", task


def _raw_post(sock: Path, path: str, payload: bytes) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (path.encode(), len(payload), payload))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


def test_shim_runtime_is_the_runtime_contract_over_the_shim(containerd: Containerd, testbed: TestBed,
                                                            tmp_path: Path) -> None:
    """ShimRuntime, what the agent's scaler drives: it finds a pod's container by the CRI plugin's
    annotations (never the sandbox), its netns and ports, and checkpoints and restores it through
    the shim; an agent started while the container is parked still knows its ports."""
    cd = containerd
    web = make_web(testbed, cd, "rt")
    sandbox = make_web(testbed, cd, "rtpause")
    pod_of = {CRI_POD_NAMESPACE: "ns1", CRI_POD_NAME: "pod1"}
    cd.ctr(*cd.run_args("rtpause", sandbox.rootfs, sandbox.pod, annotations={**pod_of, CRI_CONTAINER_TYPE: "sandbox"}))
    cd.ctr(*cd.run_args("rt", web.rootfs, web.pod, annotations={**pod_of, CRI_CONTAINER_TYPE: "container"}))
    wait_until(lambda: serving(web.node, web.pod, web.body), "busybox httpd answering in the pod", timeout=30,
               detail=lambda: _tail(cd.log))
    rt = ShimRuntime(cd.socket_dir, tmp_path / "state")
    assert rt.pod_container("ns1", "pod1") == "rt"
    assert rt.pod_container("ns1", "pod2") is None and rt.pod_container("ns2", "pod1") is None
    assert rt.containers() == ["rt"]  # the sandbox is not a container to scale
    assert rt.netns("rt") == web.pod.netns_path and rt.netns("nonesuch") is None
    assert rt.state("rt") is ContainerState.RUNNING and rt.pid("rt") in pids_in_netns(web.pod)
    assert rt.listen_ports("rt") == {PORT}
    with pytest.raises(ContainerNotFound, match="nonesuch"):
        rt.state("nonesuch")
    with pytest.raises(RuntimeDriverError, match="containerd creates"):
        rt.create(ContainerSpec(id="x", rootfs=web.rootfs, args=["true"], netns=web.pod.netns_path))
    with pytest.raises(RestoreError, match="it is running"):
        rt.restore("rt")

    images = rt.checkpoint("rt")
    assert (images / "inventory.img").is_file()
    # busybox's listener has SO_REUSEADDR (read from the app's own socket): its wakes need no
    # TIME_WAIT clearing.
    assert json.loads((tmp_path / "state" / "rt.json").read_text()) == {"listen_ports": [PORT],
                                                                      "reuseaddr_ports": [PORT]}
    assert rt.state("rt") is ContainerState.CHECKPOINTED and rt.pid("rt") is None
    assert not pids_in_netns(web.pod)
    # A new agent (a new driver, same state directory) adopting the parked container.
    adopter = ShimRuntime(cd.socket_dir, tmp_path / "state")
    assert adopter.listen_ports("rt") == {PORT} and adopter.pod_container("ns1", "pod1") == "rt"
    adopter.restore("rt")
    assert http_get(web.node, web.pod) == web.body
    assert [(r.op, r.ok) for r in adopter.history] == [("restore", True)]
    assert adopter.last["rt"].timings_ms["restore"] > 0
    with pytest.raises(RuntimeDriverError, match="the kubelet deletes"):
        rt.delete("rt")
    # Two app containers of one pod: refused with both names, not one picked at random.
    other = make_web(testbed, cd, "rt2")
    cd.ctr(*cd.run_args("rt2", other.rootfs, other.pod, annotations={**pod_of, CRI_CONTAINER_TYPE: "container"}))
    with pytest.raises(RuntimeDriverError, match="pod ns1/pod1 has 2 containers"):
        rt.pod_container("ns1", "pod1")
