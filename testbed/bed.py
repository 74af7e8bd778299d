"""A throw-away cluster made of network namespaces, veth pairs and cgroup v2 subtrees.

zeroproxy's datapath is cgroup socket programs and TC programs, and neither can be tested honestly
without real kernel objects. The test bed builds them: *nodes* (a netns each, joined by an
*underlay* bridge in its own netns), *pods* (a netns behind a veth into their node, routed the way
Cilium and Calico do it) and *external hosts* (clients on the underlay that know no pod routes).
Each node and pod also gets a cgroup, because socket programs attach to cgroups, not namespaces:
a node's agent attaches to ``Node.cgroup_path`` and thereby affects the node's pods and its host
processes, and nothing outside the bed.

Everything carries a per-run id (``<prefix>-<6 hex>``) so parallel runs cannot collide, and
``close()`` removes it all even after a failure. A run that was killed before it could clean up
is swept by ``cleanup_stale()``: the creator's pid is recorded under ``/run/zeroproxy-testbed``.

Processes enter a pod with ``setns(CLONE_NEWNET)`` only, never ``ip netns exec``: the latter also
unshares a mount namespace, which CRIU (scale to zero) cannot dump.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import selectors
import signal
import subprocess
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from dataplane.netns import NETNS_DIR, in_netns
from dataplane.netns import cgroup2_mount as find_cgroup2_mount
from dataplane.netns import setns as _setns
from testbed import nettools

T = TypeVar("T")

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/zeroproxy-testbed")
CGROUP_DIR_PREFIX = "zeroproxy-bed-"
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253
DEFAULT_UNDERLAY4 = "192.168.100.0/24"
DEFAULT_UNDERLAY6 = "fd00:192::/64"
POD_GATEWAY6 = "fe80::1"  # on every pod's host-side veth; link-local, so one address serves all
FIRST_POD_OFFSET = 10  # pods get .10, .11, ...; low addresses stay free for routers and tests
NODE_OFFSET = 10  # node N gets underlay address .(10+N)
EXTERNAL_OFFSET = 100  # external host M gets underlay address .(100+M)
KILL_WAIT_S = 5.0

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")

_live_beds: weakref.WeakSet[TestBed] = weakref.WeakSet()


class CommandFailed(subprocess.CalledProcessError):
    """A command in the bed failed; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        err = self.stderr or ""
        tail = err[-2000:] if isinstance(err, str) else err[-2000:].decode(errors="replace")
        return f"{super().__str__()}\nstderr:\n{tail}"


# --- low-level helpers ---------------------------------------------------------------------------


def _set_sysctls(netns: str, values: dict[str, str]) -> None:
    with in_netns(netns):
        for key, value in values.items():
            Path("/proc/sys", key.replace(".", "/")).write_text(value)


def _proc_starttime(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks, which tells a live creator from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may contain spaces and parentheses; fields resume after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _netns_ids(names: Sequence[str]) -> dict[tuple[int, int], str]:
    ids = {}
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        ids[(st.st_dev, st.st_ino)] = name
    return ids


def _pids_in_netns(names: Sequence[str]) -> list[int]:
    """Processes whose network namespace is one of ``names`` (our own process is never one)."""
    ids = _netns_ids(names)
    if not ids:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a zombie (no namespaces left)
        if (st.st_dev, st.st_ino) in ids:
            pids.append(int(entry))
    return pids


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _cgroup_populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


def _kill_cgroup(path: Path) -> None:
    """Kill every process in the cgroup subtree and wait until it is empty, so it can be removed."""
    if not path.is_dir():
        return
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + KILL_WAIT_S
    while _cgroup_populated(path):
        if kill_file.exists():
            kill_file.write_text("1")
        else:  # kernels before 5.14: signal each member; repeat because members may fork
            for procs in path.rglob("cgroup.procs"):
                _kill_pids([int(p) for p in procs.read_text().split()])
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes in {path} survived SIGKILL for {KILL_WAIT_S} s")
        time.sleep(0.01)


def _remove_cgroup_tree(path: Path) -> None:
    """rmdir bottom-up; cgroup directories can only be removed once empty of children and tasks."""
    if not path.is_dir():
        return
    for dirpath, _dirnames, _files in os.walk(path, topdown=False):
        os.rmdir(dirpath)


def _remove_netns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        pr_netns.remove(name)


BPFFS = Path("/sys/fs/bpf")


def pin_root(bed_id: str) -> Path:
    """Where tests of a bed pin their programs and maps (/sys/fs/bpf/zp-test-<bed id>): removed
    with the bed, so pins left by a run that crashed before its own cleanup go with it."""
    return BPFFS / f"zp-test-{bed_id}"


def _remove_pins(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    root.rmdir()


def _remove_leftovers(bed_id: str, cgroup_dir: Path, netns_names: Sequence[str]) -> list[str]:
    """Tear down one bed's namespaces, cgroups and pins; returns the errors instead of stopping at one."""
    errors: list[str] = []

    def attempt(what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.warning("test bed %s: %s failed: %s", bed_id, what, exc)
            errors.append(f"{what}: {exc}")

    attempt("killing processes in cgroups", _kill_cgroup, cgroup_dir)
    attempt("killing processes in namespaces", _kill_pids, _pids_in_netns(netns_names))
    for name in netns_names:
        attempt(f"removing netns {name}", _remove_netns, name)
    attempt(f"removing cgroup {cgroup_dir}", _remove_cgroup_tree, cgroup_dir)
    attempt(f"removing pins {pin_root(bed_id)}", _remove_pins, pin_root(bed_id))
    return errors


def cleanup_stale(prefix: str = "zp", *, state_dir: Path = STATE_DIR) -> list[str]:
    """Remove what earlier runs with ``prefix`` left behind when their creator died unclean.

    A bed counts as stale when its state file is missing (it was written before anything else
    was created and is removed last) or names a creator that no longer runs. Beds of live
    processes are left alone, so this is safe to call while other test runs are in progress.
    Returns the ids of the beds removed.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    id_re = re.compile(rf"^({re.escape(prefix)}-[0-9a-f]{{6}})(-.*)?$")
    cgroup2 = find_cgroup2_mount()
    netns_by_bed: dict[str, list[str]] = {}
    for name in pr_netns.listnetns():
        m = id_re.match(name)
        if m:
            netns_by_bed.setdefault(m.group(1), []).append(name)
    bed_ids = set(netns_by_bed)
    for entry in cgroup2.iterdir():
        m = id_re.match(entry.name.removeprefix(CGROUP_DIR_PREFIX))
        if entry.name.startswith(CGROUP_DIR_PREFIX) and m and entry.is_dir():
            bed_ids.add(m.group(1))
    if state_dir.is_dir():
        bed_ids.update(p.stem for p in state_dir.glob("*.json") if id_re.match(p.stem))
    if BPFFS.is_dir():
        for entry in BPFFS.glob("zp-test-*"):
            m = id_re.match(entry.name.removeprefix("zp-test-"))
            if m and entry.name == f"zp-test-{m.group(1)}":
                bed_ids.add(m.group(1))

    removed = []
    for bed_id in sorted(bed_ids):
        state_file = state_dir / f"{bed_id}.json"
        try:
            state = json.loads(state_file.read_text())
            if _proc_starttime(state["pid"]) == state["starttime"]:
                continue  # its creator still runs; that bed is in use
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no or unreadable state: nobody owns it any more
        log.info("removing stale test bed %s", bed_id)
        _remove_leftovers(bed_id, cgroup2 / f"{CGROUP_DIR_PREFIX}{bed_id}", netns_by_bed.get(bed_id, []))
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()
        removed.append(bed_id)
    return removed


@atexit.register
def _close_live_beds() -> None:
    """Safety net for a bed whose owner forgot close() or was interrupted before reaching it."""
    for bed in list(_live_beds):
        bed.close()


# --- hosts ---------------------------------------------------------------------------------------


class Host:
    """Anything with its own network namespace that runs processes: a node, a pod, an external host."""

    role = "host"

    def __init__(self, bed: TestBed, name: str, netns: str, cgroup_path: Path,
                 ip4: str, ip6: str) -> None:
        self.bed = bed
        self.name = name
        self.netns = netns  # name under /run/netns
        self.cgroup_path = cgroup_path
        self.ip4 = ip4
        self.ip6 = ip6

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} netns={self.netns} ip4={self.ip4} ip6={self.ip6}>"

    @property
    def process_cgroup(self) -> Path:
        """Where ``run()`` puts processes (a node uses a ``host/`` child, see Node)."""
        return self.cgroup_path

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def netns_inode(self) -> int:
        """Inode of the namespace, equal to ``os.stat(f"/proc/{pid}/ns/net").st_ino`` of members."""
        return os.stat(self.netns_path).st_ino

    def ip(self, version: int) -> str:
        """The host's address of one family, for tests parametrised over 4 and 6."""
        if version not in (4, 6):
            raise ValueError(f"IP version must be 4 or 6, not {version}")
        return self.ip4 if version == 4 else self.ip6

    def ifindex(self, ifname: str) -> int:
        """Interface index inside this host's namespace (TC programs attach by index)."""
        found = self.bed.iproute(self.netns).link_lookup(ifname=ifname)
        if not found:
            raise KeyError(f"no interface {ifname!r} in {self.netns}")
        return int(found[0])

    def add_route(self, dst: str, via: str) -> None:
        """Add a route in this namespace, e.g. to let an external host reach a pod CIDR directly."""
        network = ipaddress.ip_network(dst, strict=False)
        self.bed.iproute(self.netns).route("add", dst=str(network), gateway=via)

    def run(self, argv: Sequence[str], *, in_cgroup: bool = True, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in this namespace (and cgroup, unless ``in_cgroup=False``).

        The child moves itself into the cgroup first and then joins the network namespace only,
        so it keeps the caller's mount namespace (which CRIU needs). The bed tracks the process
        and kills it at teardown. ``popen_kwargs`` go to subprocess.Popen.
        """
        cgroup = self.process_cgroup if in_cgroup else None
        return self.bed.spawn(self.netns, argv, cgroup=cgroup, **popen_kwargs)

    def check_output(self, argv: Sequence[str], *, timeout: float = 30.0, in_cgroup: bool = True,
                     input: str | None = None) -> str:
        """Run a command to completion and return its stdout; raises CommandFailed on non-zero exit."""
        proc = self.run(argv, in_cgroup=in_cgroup, stdin=subprocess.PIPE if input is not None else
                        subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return _communicate(proc, argv, timeout, input)

    def serve(self, name: str | None = None, *, tcp: Sequence[int] = (), udp: Sequence[int] = (),
              echo: bool = False, family: str = "both", timeout: float = 10.0) -> subprocess.Popen[str]:
        """Start a ``nettools serve`` here and return once it listens; the bed stops it at teardown."""
        argv = nettools.serve_argv(name or self.name, tcp=tcp, udp=udp, echo=echo, family=family)
        proc = self.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
        wait_for_line(proc, "ready", timeout)
        return proc

    def client(self, target: str, *, proto: str = "tcp", count: int = 1, concurrency: int = 1,
               interval: float = 0.0, timeout: float = 2.0, echo_bytes: int = 0,
               run_timeout: float | None = None) -> list[dict[str, Any]]:
        """Run a ``nettools client`` here and return its per-attempt records.

        Failed attempts are data, not exceptions (the client exits 1 then); only a client that
        crashes or cannot start raises.
        """
        argv = nettools.client_argv(target, proto=proto, count=count, concurrency=concurrency,
                                    interval=interval, timeout=timeout, echo_bytes=echo_bytes)
        if run_timeout is None:
            run_timeout = 30.0 + count * (3 * timeout + interval) / concurrency
        proc = self.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
        out = _communicate(proc, argv, run_timeout, None, ok_codes=(0, 1))
        return nettools.parse_results(out)


class Node(Host):
    """A node: a netns with ``eth0`` on the underlay, its pods behind ``lxc*`` veths, forwarding on.

    ``cgroup_path`` is where the node's agent attaches socket programs; it contains one child per
    pod and ``host/`` for the node's own processes started with ``run()``.
    """

    role = "node"

    def __init__(self, bed: TestBed, name: str, netns: str, cgroup_path: Path, ip4: str, ip6: str,
                 index: int, pod_cidr4: ipaddress.IPv4Network, pod_cidr6: ipaddress.IPv6Network) -> None:
        super().__init__(bed, name, netns, cgroup_path, ip4, ip6)
        self.index = index
        self.pod_cidr4 = pod_cidr4
        self.pod_cidr6 = pod_cidr6
        # Pods' IPv4 gateway; on the node's loopback, answered by ARP on every lxc device.
        self.router_ip4 = str(pod_cidr4.network_address + 1)
        self.router_ip6 = str(pod_cidr6.network_address + 1)
        self.underlay_ifname = "eth0"
        self.pods: dict[str, Pod] = {}

    @property
    def host_cgroup_path(self) -> Path:
        return self.cgroup_path / "host"

    @property
    def process_cgroup(self) -> Path:
        # cgroup v2 keeps processes in leaves; host/ is the leaf beside the pods
        return self.host_cgroup_path


class Pod(Host):
    """A pod: a netns with ``eth0`` whose peer ``host_ifname`` sits in the node's namespace."""

    role = "pod"

    def __init__(self, bed: TestBed, name: str, netns: str, cgroup_path: Path, ip4: str, ip6: str,
                 node: Node, host_ifname: str) -> None:
        super().__init__(bed, name, netns, cgroup_path, ip4, ip6)
        self.node = node
        self.host_ifname = host_ifname

    @property
    def host_ifindex(self) -> int:
        """Index of the pod's veth peer in the node namespace."""
        return self.node.ifindex(self.host_ifname)


class External(Host):
    """A client outside the cluster: on the underlay, with no route to any pod CIDR."""

    role = "external"


# --- the bed -------------------------------------------------------------------------------------


class TestBed:
    """Builds and owns nodes, pods and external hosts; ``close()`` (or ``with``) removes them all."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, prefix: str = "zp", *, underlay4: str = DEFAULT_UNDERLAY4,
                 underlay6: str = DEFAULT_UNDERLAY6, state_dir: Path = STATE_DIR) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: lower-case letters and digits, at most 16")
        self.id = f"{prefix}-{secrets.token_hex(3)}"
        self.underlay4 = ipaddress.IPv4Network(underlay4)
        self.underlay6 = ipaddress.IPv6Network(underlay6)
        self.cgroup2 = find_cgroup2_mount()
        self.cgroup_root = self.cgroup2 / f"{CGROUP_DIR_PREFIX}{self.id}"
        self.underlay_netns = f"{self.id}-underlay"
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.externals: dict[str, External] = {}
        self._state_file = state_dir / f"{self.id}.json"
        self._netns: list[str] = []
        self._iproutes: dict[str, IPRoute] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._ifseq = 0
        self._closed = False
        _live_beds.add(self)
        try:
            # The state file comes first: cleanup_stale() treats anything without one as orphaned.
            state_dir.mkdir(parents=True, exist_ok=True)
            self._state_file.write_text(json.dumps({
                "id": self.id, "pid": os.getpid(), "starttime": _proc_starttime(os.getpid()),
                "cgroup": str(self.cgroup_root),
            }))
            self.cgroup_root.mkdir()
            self._create_netns(self.underlay_netns)
            ul = self.iproute(self.underlay_netns)
            # No multicast snooping: NDP must reach every port even before MLD reports are seen.
            ul.link("add", ifname="br0", kind="bridge", br_mcast_snooping=0)
            ul.link("set", index=ul.link_lookup(ifname="br0")[0], state="up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TestBed {self.id} nodes={list(self.nodes)} pods={list(self.pods)}>"

    @property
    def pin_root(self) -> Path:
        """The bed's directory for tests' pins (removed with the bed): see :func:`pin_root`."""
        return pin_root(self.id)

    # -- building --------------------------------------------------------------------------------

    def iproute(self, netns: str) -> IPRoute:
        """A cached rtnetlink socket in one of the bed's namespaces (closed by ``close()``)."""
        self._check_open()
        if netns not in self._iproutes:
            self._iproutes[netns] = IPRoute(netns=netns, flags=0)
        return self._iproutes[netns]

    def add_node(self, name: str, pod_cidr4: str | None = None, pod_cidr6: str | None = None,
                 underlay_ip4: str | None = None, underlay_ip6: str | None = None, *,
                 pod_router: bool = True) -> Node:
        """Add a node; defaults for node N (1-based): 10.244.N.0/24, fd00:10:244:N::/64, .(10+N).

        Every node gets routes to every other node's pod CIDRs via that node's underlay address
        (direct routing), for nodes added before and after it. ``pod_router=False`` leaves the
        pods' gateway address off the node's loopback, for nodes whose pods are wired by someone
        else (a CNI bridge that owns the gateway address, as on a kubeadm node).
        """
        self._check_name(name, self.nodes)
        index = len(self.nodes) + 1
        cidr4 = ipaddress.IPv4Network(pod_cidr4 or f"10.244.{index}.0/24")
        cidr6 = ipaddress.IPv6Network(pod_cidr6 or f"fd00:10:244:{index:x}::/64")
        ip4 = self._underlay_addr(underlay_ip4, NODE_OFFSET + index, 4)
        ip6 = self._underlay_addr(underlay_ip6, NODE_OFFSET + index, 6)
        netns = f"{self.id}-node-{name}"
        cgroup = self.cgroup_root / f"node-{name}"
        node = Node(self, name, netns, cgroup, ip4, ip6, index, cidr4, cidr6)
        self.nodes[name] = node

        cgroup.mkdir()
        node.host_cgroup_path.mkdir()
        self._create_netns(netns, {
            "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.all.forwarding": "1",
            "net.ipv6.conf.default.forwarding": "1",
            # pods' ARP requests arrive on lxc devices without an IPv4 address of their own
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        })
        ipr = self.iproute(netns)
        if pod_router:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=lo, address=node.router_ip4, prefixlen=32)
            ipr.addr("add", index=lo, address=node.router_ip6, prefixlen=128, flags=IFA_F_NODAD)
        self._plug_into_underlay(node, f"vn{index}")
        for other in self.nodes.values():
            if other is not node:
                self._route_pod_cidrs(node, other)
                self._route_pod_cidrs(other, node)
        return node

    def add_pod(self, node: Node | str, name: str, ip4: str | None = None, ip6: str | None = None) -> Pod:
        """Add a pod on ``node``; addresses default to the next free ones of the node's pod CIDRs.

        Routing is Calico/Cilium-like: a /32 and /128 route per pod in the node, and in the pod
        a default route via the node's router address (IPv4) and fe80::1 (IPv6) on the veth.
        """
        if isinstance(node, str):
            node = self.nodes[node]
        self._check_name(name, self.pods)
        used = {ipaddress.ip_address(p.ip4) for p in node.pods.values()}
        used |= {ipaddress.ip_address(p.ip6) for p in node.pods.values()}
        offset = FIRST_POD_OFFSET
        while (node.pod_cidr4.network_address + offset in used
               or node.pod_cidr6.network_address + offset in used):
            offset += 1
        addr4 = ipaddress.IPv4Address(ip4) if ip4 else node.pod_cidr4.network_address + offset
        addr6 = ipaddress.IPv6Address(ip6) if ip6 else node.pod_cidr6.network_address + offset
        if addr4 not in node.pod_cidr4 or addr6 not in node.pod_cidr6:
            raise ValueError(f"pod {name}: {addr4}/{addr6} outside node {node.name}'s pod CIDRs")
        if addr4 in used or addr6 in used:
            raise ValueError(f"pod {name}: {addr4} or {addr6} already used on node {node.name}")
        self._ifseq += 1
        host_ifname = f"lxc{self._ifseq}"
        netns = f"{self.id}-pod-{name}"
        pod = Pod(self, name, netns, node.cgroup_path / f"pod-{name}", str(addr4), str(addr6), node,
                  host_ifname)
        self.pods[name] = pod
        node.pods[name] = pod

        pod.cgroup_path.mkdir()
        self._create_netns(netns)
        ipr = self.iproute(netns)
        ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": host_ifname, "net_ns_fd": node.netns})
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=eth0, state="up")
        ipr.addr("add", index=eth0, address=pod.ip4, prefixlen=32)
        ipr.addr("add", index=eth0, address=pod.ip6, prefixlen=128, flags=IFA_F_NODAD)
        ipr.route("add", dst=f"{node.router_ip4}/32", oif=eth0, scope=RT_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=node.router_ip4, oif=eth0)
        ipr.route("add", dst="::/0", gateway=POD_GATEWAY6, oif=eth0)

        nipr = self.iproute(node.netns)
        lxc = nipr.link_lookup(ifname=host_ifname)[0]
        nipr.link("set", index=lxc, state="up")
        nipr.addr("add", index=lxc, address=POD_GATEWAY6, prefixlen=64, flags=IFA_F_NODAD)
        nipr.route("add", dst=f"{pod.ip4}/32", oif=lxc, scope=RT_SCOPE_LINK)
        nipr.route("add", dst=f"{pod.ip6}/128", oif=lxc)
        return pod

    def remove_pod(self, pod: Pod | str) -> None:
        """Delete one pod: processes, veth (with the node's routes to it), netns and cgroup.

        The veth is deleted explicitly because the kernel destroys a namespace asynchronously;
        this way the node holds no trace of the pod once this returns.
        """
        if isinstance(pod, str):
            pod = self.pods[pod]
        _kill_cgroup(pod.cgroup_path)
        _kill_pids(_pids_in_netns([pod.netns]))
        self._reap()
        nipr = self.iproute(pod.node.netns)
        for index in nipr.link_lookup(ifname=pod.host_ifname):
            nipr.link("del", index=index)
        ipr = self._iproutes.pop(pod.netns, None)
        if ipr is not None:
            ipr.close()
        _remove_netns(pod.netns)
        self._netns.remove(pod.netns)
        _remove_cgroup_tree(pod.cgroup_path)
        del self.pods[pod.name]
        del pod.node.pods[pod.name]

    def add_external(self, name: str, ip4: str | None = None, ip6: str | None = None) -> External:
        """Add a host on the underlay that reaches node addresses only (like a NodePort client)."""
        self._check_name(name, self.externals)
        index = len(self.externals) + 1
        addr4 = self._underlay_addr(ip4, EXTERNAL_OFFSET + index, 4)
        addr6 = self._underlay_addr(ip6, EXTERNAL_OFFSET + index, 6)
        netns = f"{self.id}-ext-{name}"
        host = External(self, name, netns, self.cgroup_root / f"external-{name}", addr4, addr6)
        self.externals[name] = host
        host.cgroup_path.mkdir()
        self._create_netns(netns)
        self._plug_into_underlay(host, f"vx{index}")
        return host

    # -- processes -------------------------------------------------------------------------------

    def spawn(self, netns: str, argv: Sequence[str], *, cgroup: Path | None = None,
              **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``netns`` (and ``cgroup``); the process is killed at teardown.

        The cgroup is joined before the namespace, from a preexec hook that only does two
        syscalls on descriptors opened here, which keeps it safe next to threads.
        """
        self._check_open()
        self._reap()
        user_preexec = popen_kwargs.pop("preexec_fn", None)
        ns_fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        procs_fd = -1
        try:
            if cgroup is not None:
                procs_fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

            def enter() -> None:
                if procs_fd >= 0:
                    os.write(procs_fd, b"0")  # "0" moves the writer itself
                _setns(ns_fd)
                if user_preexec is not None:
                    user_preexec()

            proc = subprocess.Popen(list(argv), preexec_fn=enter, **popen_kwargs)
        finally:
            os.close(ns_fd)
            if procs_fd >= 0:
                os.close(procs_fd)
        self._procs.append(proc)
        return proc

    def run_in_netns(self, netns: str, argv: Sequence[str], *, check: bool = True,
                     timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a plain command (``ip``, ``ss``, ``tc``...) in one of the bed's namespaces."""
        proc = self.spawn(netns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        if check and proc.returncode:
            raise CommandFailed(proc.returncode, list(argv), out, err)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process, delete every namespace and cgroup; idempotent, never stops halfway.

        Each step logs its failure and the rest still runs; a second call retries what failed.
        """
        if self._closed:
            return
        log.debug("closing test bed %s", self.id)
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.kill()  # processes started outside our cgroups (in_cgroup=False)
        for ipr in self._iproutes.values():
            try:
                ipr.close()
            except Exception as exc:
                log.warning("test bed %s: closing rtnetlink socket failed: %s", self.id, exc)
        self._iproutes.clear()
        errors = _remove_leftovers(self.id, self.cgroup_root, list(self._netns))
        self._reap(wait=True)
        self._netns = [n for n in self._netns if (NETNS_DIR / n).exists()]
        if errors or self._netns or self.cgroup_root.exists():
            log.warning("test bed %s left things behind: %s", self.id, errors)
            return  # keep the state file, so a later close() or cleanup_stale() finishes the job
        with contextlib.suppress(FileNotFoundError):
            self._state_file.unlink()
        self._closed = True
        _live_beds.discard(self)

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"test bed {self.id} is closed")

    def _check_name(self, name: str, taken: dict[str, Any]) -> None:
        self._check_open()
        if not _NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: lower-case letters, digits and '-', at most 32")
        if name in taken:
            raise ValueError(f"name {name!r} is already used in test bed {self.id}")

    def _underlay_addr(self, given: str | None, offset: int, version: int) -> str:
        net = self.underlay4 if version == 4 else self.underlay6
        addr = ipaddress.ip_interface(given).ip if given else net.network_address + offset
        if addr not in net:
            raise ValueError(f"{addr} is outside the underlay subnet {net}")
        taken = {h.ip(version) for h in [*self.nodes.values(), *self.externals.values()]}
        if str(addr) in taken:
            raise ValueError(f"underlay address {addr} is already used")
        return str(addr)

    def _create_netns(self, name: str, sysctls: dict[str, str] | None = None) -> None:
        """Create a namespace with loopback up and DAD off, so IPv6 addresses work at once."""
        self._netns.append(name)  # recorded first: close() must remove even a half-made one
        pr_netns.create(name)
        _set_sysctls(name, {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            **(sysctls or {}),
        })
        ipr = self.iproute(name)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _plug_into_underlay(self, host: Host, port_name: str) -> None:
        ipr = self.iproute(host.netns)
        ipr.link("add", ifname="eth0", kind="veth",
                 peer={"ifname": port_name, "net_ns_fd": self.underlay_netns})
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=eth0, state="up")
        ipr.addr("add", index=eth0, address=host.ip4, prefixlen=self.underlay4.prefixlen)
        ipr.addr("add", index=eth0, address=host.ip6, prefixlen=self.underlay6.prefixlen, flags=IFA_F_NODAD)
        ul = self.iproute(self.underlay_netns)
        port = ul.link_lookup(ifname=port_name)[0]
        ul.link("set", index=port, master=ul.link_lookup(ifname="br0")[0], state="up")

    def _route_pod_cidrs(self, node: Node, to: Node) -> None:
        """In ``node``, route ``to``'s pod CIDRs via ``to``'s underlay addresses."""
        ipr = self.iproute(node.netns)
        try:
            ipr.route("add", dst=str(to.pod_cidr4), gateway=to.ip4)
            ipr.route("add", dst=str(to.pod_cidr6), gateway=to.ip6)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    def _reap(self, wait: bool = False) -> None:
        """Forget finished processes (collecting their exit status, so no zombies stay behind)."""
        alive = []
        for proc in self._procs:
            try:
                if wait:
                    proc.wait(timeout=KILL_WAIT_S)
                if proc.poll() is None:
                    alive.append(proc)
            except subprocess.TimeoutExpired:
                log.warning("test bed %s: pid %d did not exit", self.id, proc.pid)
                alive.append(proc)
        self._procs = alive


def built(script: str) -> Path | None:
    """Run ``scripts/<script>``, one of the cached builds (build-criu.sh, build-shim.sh, ...) that
    print what they built as their last line of stdout; that path, or None if it printed nothing.
    A failed build raises CalledProcessError (its stderr went to ours)."""
    out = subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "scripts" / script)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    return Path(out.splitlines()[-1]) if out else None


def shim_pids(marker: str) -> list[int]:
    """Processes of containerd-shim-zeroproxy-v2 with ``marker`` as one of their arguments
    (a containerd's address, a pod sandbox's id)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-zeroproxy-v2") and marker.encode() in argv:
            pids.append(int(entry.name))
    return pids


def wait_until(cond: Callable[[], T], what: str, *, timeout: float = 60.0, interval: float = 0.05,
               detail: Callable[[], str] | None = None, tolerate: tuple[type[BaseException], ...] = (),
               error: type[Exception] = AssertionError) -> T:
    """Poll ``cond`` until it returns something truthy, and return that; else raise ``error`` naming ``what``.

    ``detail`` (a log tail, say) is appended to the message; exceptions in ``tolerate`` count as
    "not yet" (an API that is still starting), and the last one is named if time runs out.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except tolerate as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            extra = f"; last error: {last_exc}" if last_exc else ""
            more = f"\n{detail()[-4000:]}" if detail else ""
            raise error(f"timed out after {timeout:g}s waiting for {what}{extra}{more}")
        time.sleep(interval)


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float) -> None:
    """Block until ``proc`` prints a line equal to ``expected``; raise if it exits or times out."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                raise TimeoutError(f"{proc.args!r} did not print {expected!r} within {timeout} s; "
                                   f"got {seen!r}")
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before printing "
                                   f"{expected!r}; stderr:\n{err}")
            if line.rstrip("\n") == expected:
                return
            seen.append(line)


def _communicate(proc: subprocess.Popen[str], argv: Sequence[str], timeout: float, input: str | None,
                 ok_codes: Sequence[int] = (0,)) -> str:
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode not in ok_codes:
        raise CommandFailed(proc.returncode, list(argv), out, err)
    return out
