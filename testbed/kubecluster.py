"""A real kubeadm cluster on this machine: containerd, a kubelet and ``kubeadm init`` per node.

Everything zeroproxy proves in the netns bed has to hold where users run it: pods started by a
kubelet, EndpointSlices written by the controller-manager, kubelet probes, rolling updates. This
module builds that cluster from the Kubernetes 1.20.2 binaries ``scripts/build-k8s.sh`` makes and
the images ``scripts/build-images.sh`` makes, with no registry and no network.

Each node is a test-bed node (``testbed.bed``: a network namespace on the bed's underlay,
a cgroup subtree of the bed's own) plus two namespaces of its own, held by one small process:

- a private **mount namespace**. kubeadm and the kubelet hard-code ``/etc/kubernetes``,
  ``/var/lib/kubelet``, ``/var/log/pods`` and friends, so two nodes on one machine need their own
  copies: each such path is a bind mount of the node's directory, visible only inside the node.
  The node also gets a bpffs of its own on ``/sys/fs/bpf`` (two agents must not share pins), a
  resolv.conf that answers nothing, and its cgroup subtree bind-mounted at ``NODE_CGROUP2``,
  so the DaemonSet's ``cgroup`` hostPath is the same path on every node and still never the
  machine's root cgroup. Mounts made inside go away with the last process in the namespace.
- a **UTS namespace** whose hostname is the node's name, which kubeadm and the kubelet use.

containerd runs as a plain process (there is no systemd as PID 1), and the kubelet runs under a
small restart loop that stands in for ``kubelet.service`` and kubeadm's drop-in: it reads
``/var/lib/kubelet/kubeadm-flags.env`` and starts the kubelet once ``kubeadm`` wrote its config.
The kubelet's ``--cgroup-root`` is the node's own subtree (created first in every cgroup v1
hierarchy: kubelet and runc use v1 here, and runc mirrors the path into the v2 hierarchy), so
every pod process, hostNetwork and static pods included, lands under the node's cgroup.

Nodes talk to each other over the bed's underlay and route each other's pod CIDRs; the default
route points at an underlay address nobody has, so nothing leaves the bed's namespaces. The host
reaches the API server through ``testbed.relay.TCPRelay``, a loopback listener that dials from inside the
first node's namespace.

``close()`` tears down everything even after a failure: kubelet loop, ``kubeadm reset``,
containerd, every process in the nodes' cgroups and namespaces, the v1 cgroups, the bed (netns,
v2 cgroups) and every directory. ``cleanup_stale()`` finishes the job of a run that was killed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dataplane.netns import NETNS_DIR
from testbed import bed
from testbed.bed import CommandFailed, TestBed, built
from testbed.relay import TCPRelay

log = logging.getLogger(__name__)

K8S_VERSION = "1.20.2"
ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("ZP_CACHE_DIR", "/var/tmp/zeroproxy"))
BIN_DIR = CACHE_DIR / f"k8s-{K8S_VERSION}" / "bin"
NODE_PATH = f"{BIN_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # PATH in a node
IMAGES_DIR = CACHE_DIR / "images"
DATA_DIR = CACHE_DIR / "clusters"  # node directories (containerd's images and snapshots: disk)
STATE_DIR = Path("/run/zeroproxy-cluster")  # one JSON file per live cluster, for cleanup_stale()
KUBEADM_CONFIG = ROOT / "manifests" / "kubeadm" / "init-v1beta2.yaml"
IMAGE_REPOSITORY = "localhost/zp"
CNI_BIN_DIR = "/usr/lib/cni"

POD_SUBNET = "10.244.0.0/16"
SERVICE_SUBNET = "10.96.0.0/12"
DNS_DOMAIN = "cluster.local"
DNS_IP = "10.96.0.10"
# The next hop of every node's default route: on the underlay, owned by nobody.
BLACKHOLE_GATEWAY_OFFSET = 254

# Paths kubeadm, the kubelet, containerd and the CNI plugins hard-code or default to; each node
# gets its own directory bind-mounted over each of them, inside its private mount namespace.
NODE_PATHS = ("/etc/kubernetes", "/var/lib/kubelet", "/var/log/pods", "/var/log/containers",
              "/etc/cni/net.d", "/var/lib/cni", "/run/containerd", "/var/lib/containerd",
              # The etcd static pod's hostPath: Debian's etcd-server package may own a
              # non-empty one on the host, and kubeadm refuses to init over it.
              "/var/lib/etcd",
              # zeroproxy's hostPaths: the agent's state, the shim's sockets and images, and what
              # the DaemonSet's installer writes (the shim and CRIU in /opt/zeroproxy, the
              # runtime entry in containerd's config, CRIU's default config for runc).
              "/run/zeroproxy", "/var/lib/zeroproxy", "/etc/criu", "/etc/containerd", "/opt/zeroproxy")
# containerd's config on a node, where `zeroproxy node install` finds and edits it.
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
# Where each node sees its own cgroup v2 subtree (the DaemonSet's `cgroup` hostPath in the bed).
NODE_CGROUP2 = "/run/zeroproxy-node/cgroup2"
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
# The RuntimeClass handler of containerd-shim-zeroproxy-v2 (manifests/50-runtimeclass.yaml).
SHIM_HANDLER = "zeroproxy"

BRINGUP_TIMEOUT_S = 300.0
RESET_TIMEOUT_S = 60.0

_LOG_TAIL = 40


class ClusterError(RuntimeError):
    """The cluster could not be built or did something unexpected; the message says what."""


T = TypeVar("T")


def poll(cond: Callable[[], T], what: str, *, timeout: float, interval: float = 0.5,
         detail: Callable[[], str] | None = None) -> T:
    """bed.wait_until as the cluster polls: a failing poll (an API still starting) is "not yet",
    every half second, and running out of time is a ClusterError."""
    return bed.wait_until(cond, what, timeout=timeout, interval=interval, detail=detail,
                          tolerate=(Exception,), error=ClusterError)


def _tail(path: Path, n: int = _LOG_TAIL) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(lines[-n:])


def ensure_binaries() -> Path:
    """The node runtime packages and the Kubernetes binaries (built once, cached); their dir."""
    built("setup-cluster.sh")
    return built("build-k8s.sh") or BIN_DIR


def ensure_images() -> Path:
    """The node, e2e and zeroproxy images as docker archives (built once, cached)."""
    return built("build-images.sh") or IMAGES_DIR


# --- cgroup v1 ----------------------------------------------------------------------------------


def cgroup_v1_mounts(mountinfo: str | None = None) -> list[Path]:
    """Mount points of every cgroup v1 hierarchy (hybrid machines have several, v2 has none)."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup":
            mounts.append(Path(left.split()[4]))
    return mounts


def _v1_path(mount: Path, cgroup: str) -> Path:
    """A cgroup path (``/a/b``, as the kubelet's cgroupRoot) inside one v1 hierarchy."""
    return mount / cgroup.strip("/")


def _make_v1_cgroup(cgroup: str) -> None:
    """``cgroup`` in every v1 hierarchy; cpuset dirs get their parent's cpus and mems."""
    for mount in cgroup_v1_mounts():
        path = mount
        for part in Path(cgroup.strip("/")).parts:
            parent, path = path, path / part
            if path.is_dir():
                continue
            path.mkdir()
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (parent / knob).exists():
                    (path / knob).write_text((parent / knob).read_text())


def _v1_pids(cgroup: str) -> set[int]:
    pids: set[int] = set()
    for mount in cgroup_v1_mounts():
        top = _v1_path(mount, cgroup)
        if not top.is_dir():
            continue
        for dirpath, _, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()}
    return pids


def _remove_v1_cgroup(cgroup: str, timeout: float = 10.0) -> list[str]:
    """Remove ``cgroup`` and everything below it from every v1 hierarchy (deepest first)."""
    errors = []
    if not cgroup.strip("/"):
        raise ValueError(f"refusing to remove the root of every cgroup hierarchy ({cgroup!r})")
    for mount in cgroup_v1_mounts():
        top = _v1_path(mount, cgroup)
        if not top.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while top.exists():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if not top.exists():
                break
            if time.monotonic() > deadline:
                errors.append(f"cgroup {top} could not be removed")
                break
            time.sleep(0.1)
    return errors


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_with_ns(kind: str, inode: int) -> list[int]:
    """Processes whose ``kind`` namespace (mnt, uts, net) has this inode."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}/ns/{kind}").st_ino == inode:
                found.append(int(entry))
    return found


# --- the API server, seen from the host ---------------------------------------------------------


# --- nodes --------------------------------------------------------------------------------------


class KubeNode:
    """One kubeadm node: a bed node plus its mount/UTS namespaces, containerd and kubelet."""

    def __init__(self, cluster: KubeCluster, bed_node: bed.Node, index: int) -> None:
        self.cluster = cluster
        self.bed_node = bed_node
        self.index = index
        self.name = bed_node.name
        self.ip = bed_node.ip4
        self.dir = cluster.dir / self.name
        self.cgroup_root = f"/{cluster.bed.cgroup_root.name}/{bed_node.cgroup_path.name}"
        self.holder: subprocess.Popen[Any] | None = None
        self.containerd: subprocess.Popen[Any] | None = None
        self._containerd_path = NODE_PATH
        self.kubelet_loop: subprocess.Popen[Any] | None = None
        self.pod_cidr: str | None = None

    def __repr__(self) -> str:
        return f"<KubeNode {self.name} {self.ip}>"

    @property
    def netns(self) -> str:
        return self.bed_node.netns

    @property
    def containerd_socket(self) -> Path:
        """containerd's socket as the host sees it (the source of the node's /run/containerd)."""
        return self.dir / "run-containerd" / "containerd.sock"

    @property
    def containerd_log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def kubelet_log(self) -> Path:
        return self.dir / "kubelet.log"

    def _source(self, path: str) -> Path:
        return self.dir / path.strip("/").replace("/", "-")

    def host_path(self, path: str | Path) -> Path:
        """Where a path the node sees under one of its NODE_PATHS is on the host."""
        path = Path(path)
        for mount in sorted(NODE_PATHS, key=len, reverse=True):
            if path == Path(mount) or Path(mount) in path.parents:
                return self._source(mount) / path.relative_to(mount)
        raise ValueError(f"{path} is not under a node path of {self.name} ({', '.join(NODE_PATHS)})")

    def shim(self) -> Any:
        """A client of the zeroproxy shims' control sockets on this node (scaletozero.shimclient)."""
        from scaletozero.shimclient import DEFAULT_SOCKET_DIR, ShimClient

        # Through the node's mount namespace (/proc/<holder>/root): the host path of the
        # directory is too long for a unix socket address with a 64-hex container id.
        assert self.holder is not None
        return ShimClient(Path(f"/proc/{self.holder.pid}/root{DEFAULT_SOCKET_DIR}"))

    # -- namespaces and processes ----------------------------------------------------------------

    def start_namespaces(self) -> None:
        """Start the holder of the node's mount and UTS namespaces, with every mount in place."""
        self.dir.mkdir(parents=True)
        for path in NODE_PATHS:
            self._source(path).mkdir()
        # kubeadm's package ships it; a joined node's kubelet watches it for static pods.
        (self._source("/etc/kubernetes") / "manifests").mkdir()
        resolv = self.dir / "resolv.conf"
        # kubeadm's preflight resolves the node name; a resolver on loopback that nothing
        # answers fails at once instead of after a timeout, and nothing leaves the bed.
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        lines = ["set -eu", f"hostname {self.name}",
                 # Nothing of what follows may propagate to the host; then make the node's own
                 # mounts shared among themselves, as on a systemd host (containerd's CRI
                 # refuses HostToContainer propagation from a private mount).
                 "mount --make-rprivate /", "mount --make-rshared /"]
        for path in NODE_PATHS:
            lines.append(f"mount --bind {self._source(path)} {path}")
        lines += [f"mount --bind {resolv} /etc/resolv.conf",
                  "mount -t bpf bpf /sys/fs/bpf",
                  f"mount --bind {self.bed_node.cgroup_path} {NODE_CGROUP2}",
                  "echo ready", "exec sleep infinity"]
        self.holder = self.cluster.bed.spawn(
            self.netns, ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                         "\n".join(lines)],
            cgroup=self.bed_node.host_cgroup_path, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        bed.wait_for_line(self.holder, "ready", timeout=30)

    def ns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the node's mount and UTS namespaces (the netns comes from spawn)."""
        assert self.holder is not None
        pid = self.holder.pid
        return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", f"--uts=/proc/{pid}/ns/uts", "--", *argv]

    def spawn(self, argv: Sequence[str], *, log_to: Path | None = None,
              env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in the node (netns, mount and UTS namespaces, the node's host cgroup)."""
        if log_to is not None:
            out = open(log_to, "ab")  # handed to the child, closed below
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
        full_env = {"PATH": NODE_PATH,
                    "HOME": "/root", **(env or {})}
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        try:
            return self.cluster.bed.spawn(self.netns, self.ns_argv(argv), cgroup=self.bed_node.host_cgroup_path,
                                          env=full_env, **kwargs)
        finally:
            if log_to is not None:
                out.close()

    def run(self, argv: Sequence[str], *, timeout: float = 120.0, check: bool = True,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the node and wait for it; CommandFailed carries its stderr."""
        stdin = {"stdin": subprocess.PIPE} if input is not None else {}
        proc = self.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **stdin)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise CommandFailed(-9, list(argv), out, f"timed out after {timeout:.0f}s\n{err}") from None
        if check and proc.returncode:
            raise CommandFailed(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    # -- containerd ------------------------------------------------------------------------------

    def containerd_config(self) -> str:
        """containerd's config: the CRI plugin as kubeadm expects it, for this machine's limits."""
        return "\n".join([
            "version = 2",
            # Snapshots and images live on disk, in the node's own /var/lib/containerd.
            'root = "/var/lib/containerd"',
            'state = "/run/containerd"',
            "[grpc]",
            f'  address = "{CONTAINERD_SOCK}"',
            '[plugins."io.containerd.grpc.v1.cri"]',
            f'  sandbox_image = "{IMAGE_REPOSITORY}/pause:3.2"',
            # The VM withholds CAP_SYS_RESOURCE: without this every sandbox fails with
            # "can't get final child's PID from pipe: EOF" (runc cannot lower oom_score_adj).
            "  restrict_oom_score_adj = true",
            # Pod netns files under containerd's own state dir (the node's /run/containerd),
            # not in the machine's /var/run/netns.
            "  netns_mounts_under_state_dir = true",
            '  [plugins."io.containerd.grpc.v1.cri".containerd]',
            '    default_runtime_name = "runc"',
            '    snapshotter = "overlayfs"',
            '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
            '      runtime_type = "io.containerd.runc.v2"',
            # No `zeroproxy` runtime: the DaemonSet's init container adds it, as on any node
            # (scaletozero/nodeinstall.py), and deploy_zeroproxy restarts containerd as it says.
            '  [plugins."io.containerd.grpc.v1.cri".cni]',
            f'    bin_dir = "{CNI_BIN_DIR}"',
            '    conf_dir = "/etc/cni/net.d"',
            "",
        ])

    def restart_containerd(self) -> None:
        """Stop containerd (SIGTERM, as systemd does) and start it again on the same config;
        shims and containers keep running through it, as on a real node."""
        if self.containerd is not None:
            self.containerd.terminate()
            try:
                self.containerd.wait(30)
            except subprocess.TimeoutExpired:
                self.containerd.kill()
                self.containerd.wait(10)
        self.containerd = self.spawn(["containerd", "--config", CONTAINERD_CONFIG],
                                     log_to=self.containerd_log, env={"PATH": self._containerd_path})
        self._wait_containerd()

    def restart_kubelet(self) -> None:
        """Kill the kubelet; the loop starts it again, as systemd's Restart=always would."""
        _kill(self._pids_named("kubelet"))

    def _wait_containerd(self) -> None:
        poll(lambda: self.run(["ctr", "--address", CONTAINERD_SOCK, "version"], check=False).returncode == 0,
             f"containerd on {self.name}", timeout=30,
             detail=lambda: _tail(self.containerd_log))

    def start_containerd(self, images: Sequence[Path]) -> None:
        (self._source("/etc/containerd") / "config.toml").write_text(self.containerd_config())
        self.containerd = self.spawn(["containerd", "--config", CONTAINERD_CONFIG], log_to=self.containerd_log,
                                     env={"PATH": self._containerd_path})
        self._wait_containerd()
        for image in images:
            self.run(["ctr", "--address", CONTAINERD_SOCK, "-n", "k8s.io", "images", "import", str(image)],
                     timeout=300)

    # -- kubelet ---------------------------------------------------------------------------------

    def start_kubelet_loop(self) -> None:
        """The stand-in for kubelet.service with kubeadm's drop-in (10-kubeadm.conf).

        Like systemd's ``Restart=always``, the loop starts the kubelet again whenever it exits,
        and, like the drop-in, passes the kubeconfig and config flags, kubeadm's flags file and
        KUBELET_EXTRA_ARGS (the bed's: this node's cgroup root and address).
        """
        script = "\n".join([
            "while :; do",
            "  if [ -f /var/lib/kubelet/config.yaml ]; then",
            "    KUBELET_KUBEADM_ARGS=",
            "    [ -f /var/lib/kubelet/kubeadm-flags.env ] && . /var/lib/kubelet/kubeadm-flags.env",
            "    echo \"kubelet-loop: starting kubelet $(date -u +%FT%TZ)\"",
            "    kubelet --bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \\",
            "            --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml \\",
            "            $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS",
            "    echo \"kubelet-loop: kubelet exited with $?\"",
            "  fi",
            "  sleep 1",
            "done",
        ])
        extra = f"--cgroup-root={self.cgroup_root} --node-ip={self.ip}"
        self.kubelet_loop = self.spawn(["bash", "-c", script], log_to=self.kubelet_log,
                                       env={"KUBELET_EXTRA_ARGS": extra})

    def stop_kubelet(self) -> None:
        if self.kubelet_loop is None:
            return
        # The loop first (so nothing restarts the kubelet), then the kubelet itself.
        with contextlib.suppress(ProcessLookupError):
            self.kubelet_loop.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.kubelet_loop.wait(5)
        for pid in self._pids_named("kubelet"):
            _kill([pid])

    def _pids_named(self, comm: str) -> list[int]:
        if self.holder is None:
            return []
        try:
            mnt = os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino
        except OSError:
            return []
        out = []
        for pid in _pids_with_ns("mnt", mnt):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    out.append(pid)
        return out

    # -- CNI -------------------------------------------------------------------------------------

    def write_cni_config(self, pod_cidr: str) -> None:
        """A bridge network for this node's pod CIDR: gateway on the bridge, no masquerade.

        No ipMasq and no portmap, so the CNI plugins create no netfilter rule either; pods on
        other nodes are reached through the bed's routes between nodes.
        """
        self.pod_cidr = pod_cidr
        conf = {
            "cniVersion": "0.4.0",
            "name": "zeroproxy-bed",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }, {"type": "loopback"}],
        }
        path = self._source("/etc/cni/net.d") / "10-zeroproxy-bed.conflist"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(conf, indent=2))
        tmp.rename(path)

    # -- teardown --------------------------------------------------------------------------------

    def reset(self) -> list[str]:
        """kubeadm reset (containers, certificates, manifests), then stop every process."""
        errors: list[str] = []
        self.stop_kubelet()
        if self.holder is not None and self.holder.poll() is None:
            if (BIN_DIR / "kubeadm").exists() and self.containerd is not None:
                # The kubeconfig points nowhere on purpose: with a real one, reset of a control
                # plane node looks for etcd members for minutes once the mirror pods exist.
                try:
                    self.run(["kubeadm", "reset", "--force", "--kubeconfig", "/nonexistent/kubeconfig",
                              "--cri-socket", CONTAINERD_SOCK], timeout=RESET_TIMEOUT_S)
                except CommandFailed as exc:
                    errors.append(f"{self.name}: kubeadm reset failed: {exc}")
        if self.containerd is not None:
            with contextlib.suppress(ProcessLookupError):
                self.containerd.terminate()
            try:
                self.containerd.wait(10)
            except subprocess.TimeoutExpired:
                self.containerd.kill()
        return errors

    def kill_everything(self) -> None:
        """Every process of the node: its cgroups (v1 and v2), mount namespace and netns."""
        pids: set[int] = set(_v1_pids(self.cgroup_root))
        if self.holder is not None:
            with contextlib.suppress(OSError):
                pids |= set(_pids_with_ns("mnt", os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino))
        with contextlib.suppress(OSError):
            pids |= set(_pids_with_ns("net", os.stat(NETNS_DIR / self.netns).st_ino))
        pids.discard(os.getpid())
        _kill(sorted(pids))


# --- the cluster --------------------------------------------------------------------------------


class KubeCluster:
    """A kubeadm cluster of ``nodes`` nodes on this machine; ``close()`` removes all of it.

    ``up()`` builds it: containerd and the kubelet on every node, ``kubeadm init`` on the first
    with the repository's ``manifests/kubeadm/init-v1beta2.yaml`` (addresses filled in, phases
    ``addon/kube-proxy`` and ``addon/coredns`` skipped), ``kubeadm join`` on the others, a CNI
    bridge per node, and every node Ready. No service proxy runs yet: deploying one is the
    caller's (``deploy_zeroproxy``), as it is a user's.
    """

    PROXIES = ("none", "zeroproxy", "kube-proxy")

    def __init__(self, nodes: int = 1, *, proxy: str = "none", dns: bool = True, prefix: str = "zpk",
                 state_dir: Path = STATE_DIR) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes must be 1..9, got {nodes}")
        if proxy not in self.PROXIES:
            raise ValueError(f"proxy must be one of {', '.join(self.PROXIES)}, got {proxy!r}")
        self.n_nodes = nodes
        self.proxy = proxy
        self.dns = dns
        self.dns_server: subprocess.Popen[Any] | None = None
        self.image_tag = ""  # the zeroproxy image this cluster's nodes hold
        # The installer's log per node as deploy_zeroproxy last read it, before any restart it did
        # (a pod the kubelet re-creates afterwards runs the installer again, with a new log).
        self.install_logs_seen: dict[str, list[str]] = {}
        # The lock first: a cluster waiting for another must not have made anything yet (the
        # other one's teardown check would see it as its own leftover).
        self._lock = _one_cluster_lock(state_dir, f"(a new {prefix} cluster)")
        try:
            self.bed = TestBed(prefix)
        except BaseException:
            self._lock.close()
            raise
        self.id = self.bed.id
        self.dir = DATA_DIR / self.id
        self.nodes: list[KubeNode] = []
        self.forwarder: TCPRelay | None = None
        self._state_file = state_dir / f"cluster-{self.id}.json"
        self._closed = False
        self.token = f"{secrets.token_hex(3)}.{secrets.token_hex(8)}"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._write_state()
            self.dir.mkdir(parents=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> KubeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KubeCluster {self.id} nodes={[n.name for n in self.nodes]}>"

    @property
    def control_plane(self) -> KubeNode:
        return self.nodes[0]

    @property
    def admin_kubeconfig(self) -> Path:
        """The admin kubeconfig for the host: the API server through the loopback forwarder."""
        return self.dir / "admin.conf"

    @property
    def endpoint(self) -> str:
        return f"{self.control_plane.ip}:6443"

    def _write_state(self) -> None:
        self._state_file.write_text(json.dumps({
            "id": self.id, "pid": os.getpid(), "starttime": bed._proc_starttime(os.getpid()),
            "dir": str(self.dir),
            "cgroup_roots": [n.cgroup_root for n in self.nodes],
            "holders": [n.holder.pid for n in self.nodes if n.holder is not None],
        }))

    # -- bring-up --------------------------------------------------------------------------------

    def up(self) -> KubeCluster:
        """Build the cluster; on any failure everything built so far is removed and it raises."""
        try:
            self._up()
        except BaseException:
            log.error("cluster %s failed to come up; logs are in %s", self.id, self.dir)
            self.close()
            raise
        return self

    def _up(self) -> None:
        start = time.monotonic()
        bin_dir = ensure_binaries()
        if bin_dir != BIN_DIR:
            raise ClusterError(f"scripts/build-k8s.sh put the binaries in {bin_dir}, expected {BIN_DIR}")
        images = self._image_archives(ensure_images())
        for path in [*NODE_PATHS, NODE_CGROUP2]:
            self._mountpoint(Path(path))
        underlay = self.bed.underlay4
        gateway = str(underlay.network_address + BLACKHOLE_GATEWAY_OFFSET)
        for index in range(1, self.n_nodes + 1):
            # The controller-manager hands out pod CIDRs in the order nodes register: node N
            # gets 10.244.(N-1).0/24. The bed routes them between nodes up front; each node's
            # real podCIDR is checked against this once it registers.
            bed_node = self.bed.add_node(f"node{index}", pod_cidr4=f"10.244.{index - 1}.0/24",
                                         pod_cidr6=f"fd00:10:244:{index:x}::/64", pod_router=False)
            self.bed.iproute(bed_node.netns).route("add", dst="0.0.0.0/0", gateway=gateway)
            node = KubeNode(self, bed_node, index)
            self.nodes.append(node)
            _make_v1_cgroup(node.cgroup_root)
            node.start_namespaces()
            self._write_state()
            node.start_containerd(images)
            node.start_kubelet_loop()
        self._init(self.control_plane)
        for node in self.nodes[1:]:
            self._join(node)
        poll(self._all_ready, "every node Ready", timeout=BRINGUP_TIMEOUT_S, interval=1.0,
             detail=lambda: self.kubectl("get", "nodes", "-o", "wide", check=False).stdout)
        if self.dns:
            self._start_dns()
        if self.proxy == "zeroproxy":
            deploy_zeroproxy(self, self.image_tag)
        elif self.proxy == "kube-proxy":
            self._deploy_kube_proxy()
        log.info("cluster %s up in %.0fs (%d nodes)", self.id, time.monotonic() - start, len(self.nodes))

    def _image_archives(self, images_dir: Path) -> list[Path]:
        """The archives to load: every node and e2e image, and the newest zeroproxy image.

        Hard links in the cluster's directory, so a build running meanwhile (which prunes old
        archives) cannot take them away halfway through an import.
        """
        tags = image_tags(images_dir)
        newest = zeroproxy_image_tag(images_dir)
        chosen = {archive for tag, archive in tags.items()
                  if tag.rsplit(":", 1)[0] != ZEROPROXY_IMAGE or tag == f"{ZEROPROXY_IMAGE}:{newest}"}
        if not chosen:
            raise ClusterError(f"no image archives in {images_dir}")
        links = self.dir / "images"
        links.mkdir(exist_ok=True)
        out = []
        for archive in sorted(chosen):
            link = links / archive.name
            if not link.exists():
                os.link(archive, link)
            out.append(link)
        self.image_tag = newest
        return out

    def _start_dns(self) -> None:
        """The bed's cluster DNS (``testbed.clusterdns``) behind kube-system/kube-dns.

        Bookworm packages no CoreDNS, so the bed runs its own small server as a process on the
        control-plane node (listening on the node's address) and publishes the selector-less
        ``kube-dns`` Service at the kubelet's clusterDNS address with the server as its one
        endpoint. Pods reach it through whichever service proxy runs, like any Service.
        """
        node = self.control_plane
        self.dns_server = node.spawn(
            [str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else "python3",
             "-m", "testbed.clusterdns", "--kubeconfig", "/etc/kubernetes/admin.conf",
             "--listen", f"{node.ip}:53", "--domain", DNS_DOMAIN, "--publish", DNS_IP],
            log_to=node.dir / "clusterdns.log", cwd=str(ROOT))
        poll(lambda: self.kubectl("-n", "kube-system", "get", "endpoints", "kube-dns", "-o",
                                  "jsonpath={.subsets[0].addresses[0].ip}", check=False).stdout.strip()
             == node.ip, "the kube-dns Service and its endpoint", timeout=60,
             detail=lambda: _tail(node.dir / "clusterdns.log"))

    def _deploy_kube_proxy(self) -> None:
        """The real kube-proxy 1.20.2 (iptables mode), as kubeadm's addon phase installs it.

        Only for the e2e anchor run: its rules live in the bed's node namespaces and go with them.
        ``conntrack.maxPerCore: 0``: nf_conntrack_max is global and read-only outside the
        machine's root netns, so kube-proxy must not try to set it.
        """
        node = self.control_plane
        docs = self.kubeadm_config(node)
        docs.append({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
                     "mode": "iptables", "clusterCIDR": POD_SUBNET, "conntrack": {"maxPerCore": 0}})
        config = node.dir / "kubeadm-kube-proxy.yaml"
        config.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        node.run(["kubeadm", "init", "phase", "addon", "kube-proxy", "--config", str(config)], timeout=120)
        poll(lambda: rollout_done(self, "kube-system", "daemonset/kube-proxy"),
             "the kube-proxy DaemonSet rolled out on every node", timeout=BRINGUP_TIMEOUT_S, interval=1.0,
             detail=lambda: self.kubectl("-n", "kube-system", "get", "pods", "-o", "wide",
                                         check=False).stdout)

    def _mountpoint(self, path: Path) -> None:
        """A host directory the nodes mount over; created if missing, removed by the last cluster.

        Clusters on one machine share these directories (each mounts its own node directories
        over them, in its own mount namespaces), so they are recorded in one shared file and
        only the last live cluster removes them: removing a directory another mount namespace
        has a mount on would detach that mount.
        """
        with _shared_mountpoints() as created:
            missing = []
            p = path
            while not p.exists():
                missing.append(p)
                p = p.parent
            path.mkdir(parents=True, exist_ok=True)
            created.extend(str(d) for d in reversed(missing) if str(d) not in created)

    def kubeadm_config(self, node: KubeNode) -> list[dict[str, Any]]:
        """The repository's v1beta2 init config with the bed's addresses, names and kubelet."""
        docs = [d for d in yaml.safe_load_all(KUBEADM_CONFIG.read_text()) if d]
        for doc in docs:
            if doc["kind"] == "InitConfiguration":
                doc["localAPIEndpoint"]["advertiseAddress"] = node.ip
                doc["nodeRegistration"]["name"] = node.name
                doc["nodeRegistration"]["criSocket"] = CONTAINERD_SOCK
                doc["bootstrapTokens"] = [{"token": self.token, "ttl": "2h0m0s",
                                           "usages": ["signing", "authentication"],
                                           "groups": ["system:bootstrappers:kubeadm:default-node-token"]}]
            elif doc["kind"] == "ClusterConfiguration":
                doc["controlPlaneEndpoint"] = self.endpoint
                doc["imageRepository"] = IMAGE_REPOSITORY
                doc["kubernetesVersion"] = f"v{K8S_VERSION}"
                doc["networking"] = {"podSubnet": POD_SUBNET, "serviceSubnet": SERVICE_SUBNET,
                                     "dnsDomain": DNS_DOMAIN}
                # The host reaches the API server through a loopback forwarder.
                doc.setdefault("apiServer", {})["certSANs"] = ["127.0.0.1", node.ip]
        docs.append({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # No systemd here: the kubelet manages cgroups itself (runc does the same).
            "cgroupDriver": "cgroupfs",
            # kube-proxy's KUBE-MARK-* chains: nothing uses them without kube-proxy, and the
            # bed's nodes must hold no netfilter rule.
            "makeIPTablesUtilChains": False,
            # Pods with dnsPolicy Default get the node's resolver; this one answers nothing.
            "resolvConf": "/etc/resolv.conf",
            "clusterDNS": [DNS_IP], "clusterDomain": DNS_DOMAIN,
            "failSwapOn": False,
            # A shared 2-core VM: no eviction because the disk or memory of the machine is in use.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
        })
        return docs

    def _init(self, node: KubeNode) -> None:
        config = node.dir / "kubeadm-init.yaml"
        config.write_text(yaml.safe_dump_all(self.kubeadm_config(node), sort_keys=False))
        # kubeadm tries `systemctl` for the kubelet (there is none) and only warns: the loop
        # started above runs the kubelet as soon as kubeadm writes its config.
        result = node.run(["kubeadm", "init", "--config", str(config),
                           "--skip-phases=addon/kube-proxy,addon/coredns"], timeout=BRINGUP_TIMEOUT_S)
        (node.dir / "kubeadm-init.log").write_text(result.stdout + result.stderr)
        admin = node._source("/etc/kubernetes") / "admin.conf"
        # The API server listens only on the node's underlay address, inside the bed: the host
        # reaches it through a loopback listener whose upstream sockets are made in the node.
        self.forwarder = TCPRelay((node.ip, 6443), dial_netns=node.netns, name=f"api-forward-{self.id}")
        kubeconfig = yaml.safe_load(admin.read_text())
        for c in kubeconfig["clusters"]:
            c["cluster"]["server"] = f"https://127.0.0.1:{self.forwarder.port}"
        self.admin_kubeconfig.write_text(yaml.safe_dump(kubeconfig))
        self.admin_kubeconfig.chmod(0o600)
        self._wait_registered(node)
        # Two nodes are a small cluster: workloads may run on the control-plane node too.
        self.kubectl("taint", "nodes", node.name, "node-role.kubernetes.io/master:NoSchedule-")

    def _join(self, node: KubeNode) -> None:
        ca = (self.control_plane._source("/etc/kubernetes") / "pki" / "ca.crt").read_bytes()
        config = node.dir / "kubeadm-join.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeadm.k8s.io/v1beta2", "kind": "JoinConfiguration",
            "discovery": {"bootstrapToken": {"apiServerEndpoint": self.endpoint, "token": self.token,
                                             "caCertHashes": [f"sha256:{_spki_sha256(ca)}"]}},
            "nodeRegistration": {"name": node.name, "criSocket": CONTAINERD_SOCK},
        }, sort_keys=False))
        result = node.run(["kubeadm", "join", "--config", str(config)], timeout=BRINGUP_TIMEOUT_S)
        (node.dir / "kubeadm-join.log").write_text(result.stdout + result.stderr)
        self._wait_registered(node)

    def _wait_registered(self, node: KubeNode) -> None:
        def pod_cidr() -> str:
            out = self.kubectl("get", "node", node.name, "-o", "jsonpath={.spec.podCIDR}", check=False)
            return out.stdout.strip() if out.returncode == 0 else ""

        cidr = poll(pod_cidr, f"node {node.name} registered with a podCIDR", timeout=BRINGUP_TIMEOUT_S,
                    detail=lambda: _tail(node.kubelet_log),
                    interval=0.5)
        if ipaddress.ip_network(cidr) != node.bed_node.pod_cidr4:
            raise ClusterError(f"node {node.name} got podCIDR {cidr}, the bed routes {node.bed_node.pod_cidr4}")
        node.write_cni_config(cidr)

    def _all_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode:
            return False
        items = json.loads(out.stdout)["items"]
        ready = {i["metadata"]["name"] for i in items
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in i["status"]["conditions"])}
        return ready == {n.name for n in self.nodes}

    # -- using it --------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """kubectl on the host with the admin kubeconfig (through the forwarder)."""
        argv = [str(BIN_DIR / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), *args]
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(-9, argv, exc.stdout, f"timed out after {timeout:.0f}s") from None
        if check and proc.returncode:
            raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def api_client(self) -> Any:
        """An official-client ApiClient for the admin user (through the forwarder)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.admin_kubeconfig), client_configuration=configuration)
        return client.ApiClient(configuration)

    def node(self, name: str) -> KubeNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the cluster whatever state it is in; idempotent, never stops halfway."""
        if self._closed:
            return
        errors: list[str] = []
        if self.dns_server is not None:
            with contextlib.suppress(ProcessLookupError):
                self.dns_server.terminate()
        if self.forwarder is not None:
            self.forwarder.close()
        for node in reversed(self.nodes):
            try:
                errors += node.reset()
            except Exception as exc:
                errors.append(f"{node.name}: reset: {exc}")
        for _ in range(3):
            for node in self.nodes:
                node.kill_everything()
            time.sleep(0.2)
        for node in self.nodes:
            errors += _remove_v1_cgroup(node.cgroup_root)
        # The bed's own v1 parent (zeroproxy-bed-<id>) in every v1 hierarchy.
        if self.nodes:
            errors += _remove_v1_cgroup(self.nodes[0].cgroup_root.rsplit("/", 1)[0])
        self.bed.close()
        if self.dir.exists():
            _rmtree(self.dir, errors)
        if not self.dir.exists():
            with contextlib.suppress(FileNotFoundError):
                self._state_file.unlink()
        errors += _remove_mountpoints_if_last(self._state_file.parent)
        if errors:
            log.warning("cluster %s teardown: %s", self.id, "; ".join(errors))
        self._closed = True
        self._lock.close()  # the next cluster may start


ONE_CLUSTER_WAIT_S = 3600.0


def _one_cluster_lock(state_dir: Path, cluster_id: str) -> Any:
    """One cluster per machine at a time: an exclusive lock held for the cluster's life.

    Two clusters side by side were seen to cross (the second one's kubelet synced pods of the
    first: both name their nodes node1, node2 on the same bed addresses), and a teardown check
    cannot tell another cluster's objects from its own leftovers. So a second cluster waits.
    """
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    lock = open(state_dir / "one-cluster.lock", "a+")  # held until close(); not inherited
    deadline = time.monotonic() + ONE_CLUSTER_WAIT_S
    logged = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not logged:
                log.warning("cluster %s: another cluster is up on this machine (%s); waiting for it to go",
                            cluster_id, ", ".join(_live_clusters(state_dir)) or "unknown")
                logged = True
            if time.monotonic() > deadline:
                lock.close()
                raise ClusterError(f"another cluster held {state_dir}/one-cluster.lock for "
                                   f"{ONE_CLUSTER_WAIT_S:.0f}s: {', '.join(_live_clusters(state_dir))}") from None
            time.sleep(1)
    return lock


MOUNTPOINTS_FILE = STATE_DIR / "mountpoints.json"  # host directories some cluster created


@contextlib.contextmanager
def _shared_mountpoints() -> Iterator[list[str]]:
    """The shared list of created mountpoints, locked for the block; written back after it."""
    import fcntl

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "mountpoints.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            created = json.loads(MOUNTPOINTS_FILE.read_text())
        except (FileNotFoundError, ValueError):
            created = []
        yield created
        tmp = MOUNTPOINTS_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(created))
        tmp.rename(MOUNTPOINTS_FILE)


def _live_clusters(state_dir: Path) -> list[str]:
    live = []
    for path in state_dir.glob("cluster-*.json"):
        with contextlib.suppress(Exception):
            state = json.loads(path.read_text())
            if "starttime" in state and bed._proc_starttime(state["pid"]) == state["starttime"]:
                live.append(state["id"])
    return live


def _remove_mountpoints_if_last(state_dir: Path) -> list[str]:
    """rmdir the created mountpoints (deepest first) when no cluster is live any more."""
    errors: list[str] = []
    with _shared_mountpoints() as created:
        if _live_clusters(state_dir):
            return errors
        for d in sorted(created, key=len, reverse=True):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"could not remove {d}: {exc}")
        created[:] = [d for d in created if os.path.exists(d)]
    return errors


def _rmtree(path: Path, errors: list[str]) -> None:
    """Remove a node directory; overlay mounts left by a crash are unmounted first."""
    for attempt in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if attempt == 2:
                errors.append(f"could not remove {path}: {exc}")
                return
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                mnt = line.split()[4]
                if mnt.startswith(str(path) + "/"):
                    subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
            time.sleep(0.5)


def _spki_sha256(ca_pem: bytes) -> str:
    """kubeadm's CA pin: sha256 of the CA certificate's SubjectPublicKeyInfo (DER)."""
    der = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=ca_pem, check=True,
                         capture_output=True).stdout
    body = b"".join(line for line in der.splitlines() if not line.startswith(b"-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def cleanup_stale(state_dir: Path = STATE_DIR) -> list[str]:
    """Remove clusters whose creating process is gone (killed before it could clean up)."""
    removed = []
    if not state_dir.is_dir():
        return removed
    for path in sorted(state_dir.glob("cluster-*.json")):
        with contextlib.suppress(Exception):
            state = json.loads(path.read_text())
            if bed._proc_starttime(state["pid"]) == state["starttime"]:
                continue  # still owned by a live process
            for pid in state.get("holders", []):
                _kill([pid])
            for rel in state.get("cgroup_roots", []):
                _kill(sorted(_v1_pids(rel)))
            time.sleep(0.5)
            errors: list[str] = []
            for rel in state.get("cgroup_roots", []):
                errors += _remove_v1_cgroup(rel)
                errors += _remove_v1_cgroup(rel.rsplit("/", 1)[0])
            _rmtree(Path(state["dir"]), errors)
            path.unlink()
            removed.append(state["id"])
    bed.cleanup_stale("zpk")
    _remove_mountpoints_if_last(state_dir)
    return removed


@contextlib.contextmanager
def cluster(nodes: int = 1, **kwargs: Any) -> Iterator[KubeCluster]:
    """``with cluster(2) as c:`` a Ready cluster, removed afterwards whatever happened."""
    c = KubeCluster(nodes, **kwargs)
    try:
        c.up()
        yield c
    finally:
        c.close()


# --- deploying zeroproxy as a user would ----------------------------------------------------------

MANIFESTS = ROOT / "manifests"
ZEROPROXY_IMAGE = "localhost/zeroproxy"


def zeroproxy_overlay(cluster: KubeCluster, image_tag: str, directory: Path | None = None) -> Path:
    """A kustomize overlay of ``manifests/`` for this cluster; returns its directory.

    It changes exactly three things, the ones a user changes: the image tag, the API server
    address in the agent's config, and the DaemonSet's cgroup hostPath (each bed node sees its
    own cgroup subtree there, where a real node would use /sys/fs/cgroup).
    """
    directory = directory or cluster.dir / "overlay"
    directory.mkdir(parents=True, exist_ok=True)
    configmap = yaml.safe_load((MANIFESTS / "30-configmap.yaml").read_text())
    agent_config = yaml.safe_load(configmap["data"]["config.yaml"])
    agent_config["apiServer"] = f"https://{cluster.endpoint}"
    (directory / "configmap.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap["metadata"]["name"], "namespace": configmap["metadata"]["namespace"]},
        "data": {"config.yaml": yaml.safe_dump(agent_config, sort_keys=False)},
    }, sort_keys=False))
    (directory / "daemonset.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "zeroproxy", "namespace": "zeroproxy"},
        "spec": {"template": {"spec": {"volumes": [{"name": "cgroup", "hostPath": {"path": NODE_CGROUP2}}]}}},
    }, sort_keys=False))
    return _kustomization(directory, MANIFESTS, image_tag, patchesStrategicMerge=["configmap.yaml", "daemonset.yaml"])


def _kustomization(directory: Path, base: Path, image_tag: str, **more: Any) -> Path:
    """Write ``directory``'s kustomization.yaml: ``base`` with zeroproxy's image at ``image_tag``."""
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kubectl 1.20's kustomize takes a base outside the overlay by relative path.
        "bases": [os.path.relpath(base, directory)],
        "images": [{"name": ZEROPROXY_IMAGE, "newTag": image_tag}],
        **more,
    }, sort_keys=False))
    return directory


def uninstall_overlay(cluster: KubeCluster, image_tag: str) -> Path:
    """A kustomize overlay of ``manifests/uninstall`` that changes only the image tag."""
    directory = cluster.dir / "uninstall-overlay"
    directory.mkdir(parents=True, exist_ok=True)
    return _kustomization(directory, MANIFESTS / "uninstall", image_tag)


def image_tags(images_dir: Path = IMAGES_DIR) -> dict[str, Path]:
    """Every ``repo:tag`` in the image archives (their manifest.json RepoTags) -> its archive."""
    import tarfile

    tags: dict[str, Path] = {}
    for archive in sorted(images_dir.glob("*.tar")):
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                continue
            for entry in json.load(member):
                for tag in entry.get("RepoTags") or []:
                    tags[tag] = archive
    return tags


def zeroproxy_image_tag(images_dir: Path = IMAGES_DIR) -> str:
    """The tag of the zeroproxy image ``scripts/build-images.sh`` built (the newest archive)."""
    found = [(archive.stat().st_mtime, tag.rsplit(":", 1)[1]) for tag, archive in image_tags(images_dir).items()
             if tag.rsplit(":", 1)[0] == ZEROPROXY_IMAGE]
    if not found:
        raise ClusterError(f"no {ZEROPROXY_IMAGE} image in {images_dir}: run scripts/build-images.sh")
    return max(found)[1]


def rollout_done(cluster: KubeCluster, namespace: str, kind_name: str) -> bool:
    """``kubectl rollout status`` says the rollout finished (without blocking)."""
    out = cluster.kubectl("-n", namespace, "rollout", "status", kind_name, "--watch=false", check=False)
    return out.returncode == 0 and "successfully rolled out" in out.stdout


def deploy_zeroproxy(cluster: KubeCluster, image_tag: str, timeout: float = BRINGUP_TIMEOUT_S) -> Path:
    """``kubectl apply -k`` the overlay and wait until every node's zeroproxy pod is Ready."""
    overlay = zeroproxy_overlay(cluster, image_tag)
    cluster.kubectl("apply", "-k", str(overlay), timeout=120)
    _wait_zeroproxy_rolled_out(cluster, timeout)
    # What an operator does after the installer's first run on a node (docs/install.md): restart
    # containerd where it says so, so that RuntimeClass zeroproxy works there.
    restarted = []
    cluster.install_logs_seen = install_logs(cluster)
    for node, lines in cluster.install_logs_seen.items():
        if any(line.startswith("zeroproxy node install: RESTART REQUIRED") for line in lines):
            cluster.node(node).restart_containerd()
            restarted.append(node)
    if restarted:
        log.info("containerd restarted on %s, as zeroproxy's installer asked", ", ".join(restarted))
        _wait_zeroproxy_rolled_out(cluster, timeout)
    return overlay


def _wait_zeroproxy_rolled_out(cluster: KubeCluster, timeout: float) -> None:
    poll(lambda: rollout_done(cluster, "zeroproxy", "daemonset/zeroproxy"),
         "the zeroproxy DaemonSet rolled out on every node", timeout=timeout, interval=1.0,
         detail=lambda: cluster.kubectl("-n", "zeroproxy", "get", "pods", "-o", "wide", check=False).stdout
         + cluster.kubectl("-n", "zeroproxy", "logs", "daemonset/zeroproxy", "--all-containers", "--tail=30",
                           check=False).stdout)


def install_logs(cluster: KubeCluster, container: str = "install",
                 selector: str = "app.kubernetes.io/name=zeroproxy") -> dict[str, list[str]]:
    """Node name -> the log lines of the zeroproxy pod's init container there (``kubectl logs``)."""
    out = {}
    for pod in get(cluster, "pods", "-l", selector, namespace="zeroproxy")["items"]:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        logs = cluster.kubectl("-n", "zeroproxy", "logs", pod["metadata"]["name"], "-c", container).stdout
        out[pod["spec"]["nodeName"]] = logs.splitlines()
    return out


# --- helpers for tests and users ---------------------------------------------------------------

AGNHOST_IMAGE = f"{IMAGE_REPOSITORY}/e2e/agnhost:2.21"


def apply(cluster: KubeCluster, *objects: dict[str, Any], namespace: str | None = None) -> None:
    """``kubectl apply`` of objects given as dicts."""
    ns = ["-n", namespace] if namespace else []
    cluster.kubectl(*ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": list(objects)}))


def get(cluster: KubeCluster, *what: str, namespace: str | None = None) -> dict[str, Any]:
    ns = ["-n", namespace] if namespace else []
    return json.loads(cluster.kubectl(*ns, "get", *what, "-o", "json").stdout)


def ready_pods(cluster: KubeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    """Pods matching ``selector`` that are Ready and not being deleted."""
    pods = get(cluster, "pods", "-l", selector, namespace=namespace)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def wait_ready(cluster: KubeCluster, namespace: str, selector: str, count: int,
               timeout: float = 180.0) -> list[dict[str, Any]]:
    """Wait until exactly ``count`` pods matching ``selector`` are Ready; returns them."""
    return poll(lambda: (p if len(p := ready_pods(cluster, namespace, selector)) == count else None),
                f"{count} Ready pod(s) {selector} in {namespace}", timeout=timeout, interval=1.0,
                detail=lambda: cluster.kubectl("-n", namespace, "get", "pods,events", "-o", "wide",
                                           check=False).stdout)


def pod_exec(cluster: KubeCluster, namespace: str, pod: str, argv: Sequence[str],
             timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("-n", namespace, "exec", pod, "--", *argv, timeout=timeout, check=check)


def netns_inodes(cluster: KubeCluster) -> dict[int, str]:
    """Every network namespace of the cluster -> a /proc path to enter it.

    The host's, the bed's (underlay, nodes) and every pod's: found through the processes in the
    nodes' cgroup subtrees and mount namespaces, so pods the kubelet made are included.
    """
    found: dict[int, str] = {os.stat("/proc/self/ns/net").st_ino: "/proc/self/ns/net"}
    for name in [cluster.bed.underlay_netns, *(n.netns for n in cluster.nodes)]:
        found.setdefault(os.stat(NETNS_DIR / name).st_ino, str(NETNS_DIR / name))
    pids: set[int] = set()
    for node in cluster.nodes:
        for dirpath, _, files in os.walk(node.bed_node.cgroup_path):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()}
    for pid in sorted(pids):
        with contextlib.suppress(OSError):
            found.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, f"/proc/{pid}/ns/net")
    return found


def netfilter_rulesets(cluster: KubeCluster) -> dict[int, str]:
    """The nftables ruleset and the legacy iptables rules of every namespace of the cluster."""
    out: dict[int, str] = {}
    for inode, path in netns_inodes(cluster).items():
        text = []
        argvs = [["nft", "list", "ruleset"]]
        argvs += [[tool] for tool in ("iptables-legacy-save", "ip6tables-legacy-save") if shutil.which(tool)]
        for argv in argvs:
            proc = subprocess.run(["nsenter", f"--net={path}", "--", *argv], capture_output=True, text=True,
                                  timeout=30)
            if proc.returncode and "No such file" in proc.stderr:
                continue  # the namespace's process exited between listing and entering
            # iptables-save prints a timestamp comment; only tables, chains and rules matter.
            text += [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
        out[inode] = "\n".join(text)
    return out


def machine_snapshot() -> dict[str, list[str]]:
    """What a cluster could leave behind on this machine, as sorted lists (compare two).

    Network namespaces, cgroups (v2 and every v1 hierarchy, two levels deep), mounts of the
    host's mount namespace, bpffs pins, the kubeadm/kubelet/CNI/containerd paths, the bed's
    state and data directories, and processes of the cluster's programs.
    """
    snap: dict[str, list[str]] = {}
    snap["netns"] = sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []
    snap["root"] = sorted(os.listdir("/"))  # nothing may land at the top of the filesystem
    cgroups = []
    for mount in [*cgroup_v1_mounts(), bed.find_cgroup2_mount()]:
        for child in mount.iterdir():
            if child.is_dir():
                cgroups.append(str(child))
                cgroups += [str(g) for g in child.iterdir() if g.is_dir()]
    snap["cgroups"] = sorted(cgroups)
    snap["mounts"] = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    snap["bpffs"] = sorted(str(p) for p in Path("/sys/fs/bpf").rglob("*")) if Path("/sys/fs/bpf").is_dir() else []
    snap["paths"] = sorted(p for p in [*NODE_PATHS, NODE_CGROUP2, "/etc/cni", "/opt/cni"] if os.path.lexists(p))
    snap["state"] = sorted(str(p) for d in (STATE_DIR, DATA_DIR) if d.is_dir() for p in d.iterdir()
                           # Lock files stay: removing a flock'ed file is racy, and they hold nothing.
                           if p.name not in ("mountpoints.json", "mountpoints.lock", "one-cluster.lock"))
    names = ("kubelet", "containerd", "containerd-shim", "containerd-shim-runc-v2", "kube-apiserver",
             "kube-controller", "kube-scheduler", "etcd", "kube-proxy", "pause", "agnhost", "runc")
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm in names or comm.startswith("containerd-shim"):
                    procs.append(f"{comm}[{entry}]")
    snap["processes"] = sorted(procs)
    return snap
