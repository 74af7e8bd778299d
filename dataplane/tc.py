"""The TC half of the datapath: NodePort, ExternalIP and LoadBalancer IPs for traffic from outside.

``NodeDatapath`` compiles bpf/nodeport.c with the same pin directory as the socket programs, so
both share the service maps that ``ServiceMaps`` writes, and attaches its two programs to the
clsact qdisc of each external device (ingress and egress) inside the node's network namespace.
Conntrack and SNAT maps are pinned too: a restarted agent adopts the flows in progress, and
``attach()`` replaces the filters in place, so traffic never sees a moment without a program.

Which node addresses accept NodePort traffic follows kube-proxy's ``nodePortAddresses``:
``node_port_addresses()`` turns the setting plus the node's addresses into the list
``ServiceMaps.set_node_port_addresses()`` wants.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dataplane import bpfsys, maps
from dataplane.loader import BPF_DIR, check_paths, inline_includes
from dataplane.table import DEFAULT_NODE_PORT_RANGE, DEFAULT_SNAT_PORTS

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROG_PREFIX = "zp_np"
INGRESS_PROG = "zp_np4_ingress"
EGRESS_PROG = "zp_np4_egress"
# The IPv6 path's programs, tail-called from the two above (bpf/lib/nodeport6.h), by index in
# zp_np6_progs.
IPV6_PROGS = ("zp_np6_ingress", "zp_np6_service", "zp_np6_egress")
CLSACT_INGRESS = "ffff:fff2"  # clsact's ingress and egress hooks, as pyroute2 wants the parents
CLSACT_EGRESS = "ffff:fff3"
FILTER_PRIO = 1  # one filter per hook; replacing it at this priority/handle is atomic
FILTER_HANDLE = 1

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)


@dataclass(frozen=True)
class CtTimeouts:
    """Conntrack lifetimes in seconds, per state (Cilium's defaults, kube-proxy's order)."""

    syn: int = 60  # TCP until the backend answers
    established: int = 21600  # TCP idle
    closing: int = 10  # after RST or FIN both ways: late packets still translate, then the port is free
    udp: int = 60  # UDP idle


# ---- nodePortAddresses ---------------------------------------------------------------------


def node_port_addresses(spec: Sequence[str], local: Iterable[IPAddress],
                        primary: Iterable[IPAddress] = ()) -> list[IPAddress]:
    """The node addresses that accept NodePort connections, with kube-proxy's semantics.

    ``spec`` is kube-proxy's ``nodePortAddresses``: empty means every local address (IPv4
    loopback included, so ``127.0.0.1:<nodePort>`` works as with kube-proxy's default
    ``--iptables-localhost-nodeports``); otherwise a list of CIDRs selecting local addresses,
    and the special value ``primary`` selecting the node's primary addresses (its InternalIPs).
    IPv6 loopback never accepts NodePorts (kube-proxy does not allow it either).
    """
    local = list(local)
    if not spec:
        chosen = [a for a in local if not (a.version == 6 and a.is_loopback) and not a.is_link_local]
    else:
        cidrs = []
        chosen = []
        for item in spec:
            if item == "primary":
                chosen.extend(primary)
                continue
            cidrs.append(ipaddress.ip_network(item, strict=False))
        chosen.extend(a for a in local if any(a.version == c.version and a in c for c in cidrs)
                      and not (a.version == 6 and a.is_loopback))
    return sorted(set(chosen), key=lambda a: (a.version, a))


def local_addresses(netns: str | None = None) -> list[IPAddress]:
    """Every address configured in a network namespace (the current one by default)."""
    with _iproute(netns) as ipr:
        return sorted({ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()},
                      key=lambda a: (a.version, a))


def default_route_devices(netns: str | None = None) -> tuple[str, ...]:
    """Names of the interfaces the namespace's IPv4/IPv6 default routes leave by, sorted.

    What ``devices: auto`` resolves to: on a node that is the interface external clients reach
    it through (eth0, ens5, bond0 ...), never loopback, a pod veth or the CNI bridge.
    """
    with _iproute(netns) as ipr:
        indexes = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family, table=254):
                if route["dst_len"] == 0 and route.get_attr("RTA_OIF") is not None:
                    indexes.add(route.get_attr("RTA_OIF"))
                for hop in route.get_attr("RTA_MULTIPATH") or []:
                    if route["dst_len"] == 0:
                        indexes.add(hop["oif"])
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link["index"] in indexes}
    return tuple(sorted(n for n in names if n and n != "lo"))


# ---- namespaces --------------------------------------------------------------------------------


@contextlib.contextmanager
def _iproute(netns: str | None) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.x."""

    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class SkBuffCtx(ctypes.Structure):
    """The leading part of struct __sk_buff that BPF_PROG_TEST_RUN lets a caller set."""

    _fields_ = (
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    )


_libbpf.bpf_prog_test_run_opts.argtypes = (ctypes.c_int, ctypes.POINTER(_TestRunOpts))


def prog_test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0, mark: int = 0) -> tuple[int, bytes]:
    """Run a SCHED_CLS program once on a packet; returns (verdict, packet as the program left it).

    ``ifindex`` picks the device the packet appears on, in the caller's network namespace
    (see in_netns); 0 means loopback. ``mark`` is the skb's mark (test programs read inputs there).
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = SkBuffCtx(ifindex=ifindex, mark=mark)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = len(data_out)
    if ifindex or mark:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = 1
    ret = _libbpf.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(code, f"BPF_PROG_TEST_RUN: {os.strerror(code)}")
    return opts.retval, data_out.raw[: opts.data_size_out]


# ---- the datapath ------------------------------------------------------------------------------


def nodeport_source(pin_dir: Path, extra_defines: dict[str, int] | None = None) -> tuple[str, list[str]]:
    """The C text and cflags of the TC programs whose maps live under pin_dir."""
    text = inline_includes(BPF_DIR / "nodeport.c")
    cflags = [f'-DZP_PIN_DIR="{pin_dir}/"', "-Wno-unused-function", "-Wno-macro-redefined"]
    cflags += [f"-D{k}={v}" for k, v in (extra_defines or {}).items()]
    return text, cflags


class NodeDatapath:
    """The TC programs of one node: ingress and egress on each external device.

    ``devices`` are the node's external interfaces (where NodePort traffic arrives and where
    remote backends are reached); a backend routed out of one of them is remote, and its flows
    are SNATed to that device's IPv4 address (``snat_addresses`` overrides the choice). The
    object lives in the agent's namespace; ``netns`` names the node's namespace when the two
    differ (tests).
    """

    def __init__(self, pin_dir: Path, devices: Sequence[str], *, netns: str | None = None,
                 snat_ports: tuple[int, int] = DEFAULT_SNAT_PORTS,
                 node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
                 timeouts: CtTimeouts = CtTimeouts(),
                 snat_addresses: dict[str, ipaddress.IPv4Address] | None = None,
                 map_sizes: dict[str, int] | None = None) -> None:
        lo, hi = snat_ports
        if not 0 < lo <= hi <= 0xFFFF:
            raise ValueError(f"SNAT port range {lo}-{hi} is not within 1-65535")
        np_lo, np_hi = node_port_range
        if lo <= np_hi and np_lo <= hi:
            raise ValueError(f"SNAT port range {lo}-{hi} overlaps the NodePort range {np_lo}-{np_hi}")
        if not devices:
            raise ValueError("NodePort needs at least one external device")
        self.pin_dir = Path(pin_dir)
        self.devices = tuple(devices)
        self.netns = netns
        self.snat_ports = (lo, hi)
        self.node_port_range = node_port_range
        self.timeouts = timeouts
        self.snat_addresses = dict(snat_addresses or {})
        self.map_sizes = dict(map_sizes or {})
        self.bpf = None  # bcc.BPF once loaded
        self._fns: dict[str, object] = {}
        # (rev-NAT id, scope) -> the backends its Maglev table was built from; empty after a
        # restart, so the first sync rebuilds every table (a few ms each)
        self._maglev: dict[tuple[int, int], list[tuple[str, int]]] = {}

    def load(self) -> None:
        """Compile; creates the pinned maps or adopts the existing ones, then writes the settings."""
        import bcc  # deferred, as in loader.py: importing bcc is slow

        check_paths(None, self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        text, cflags = nodeport_source(self.pin_dir, self.map_sizes)
        self.bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        for name in (INGRESS_PROG, EGRESS_PROG, *IPV6_PROGS):
            self._fns[name] = self.bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS)
        progs = self.table("zp_np6_progs")
        for index, name in enumerate(IPV6_PROGS):
            progs[ctypes.c_int(index)] = ctypes.c_int(self._fns[name].fd)  # type: ignore[attr-defined]
        self.write_config()

    def write_config(self) -> None:
        lo, hi = self.snat_ports
        t = self.timeouts
        self.table("zp_np_cfg")[ctypes.c_uint32(0)] = maps.NpConfig(
            snat_port_min=lo, snat_port_max=hi, syn_timeout=t.syn, est_timeout=t.established,
            close_timeout=t.closing, udp_timeout=t.udp)

    def sync_maglev(self, tables: dict[tuple[int, int], list[tuple[str, int]]], live: set[int] | None = None) -> int:
        """Make zp_maglev hold a Maglev table for each (rev-NAT id, scope) in ``tables`` (its
        backends as (name, id)); with ``live``, drop the tables of service ports not in it. A
        changed table is swapped in whole: a flow sees the old table or the new one. Returns
        how many tables were written."""
        from dataplane import maglev

        outer = self.table("zp_maglev")
        written = 0
        for (rev, scope), backends in sorted(tables.items()):
            key = outer.Key(rev, scope, 0)
            if self._maglev.get((rev, scope)) == backends:
                continue
            if not backends:
                self._maglev_delete(outer, key, (rev, scope))
                continue
            names = [n for n, _ in backends]
            ids = [backends[i][1] for i in maglev.table(names)]
            inner = bpfsys.u32_array("zp_maglev_t", ids)
            try:
                outer[key] = ctypes.c_int(inner)
            finally:
                os.close(inner)  # the outer map holds it now
            self._maglev[(rev, scope)] = backends
            written += 1
        if live is not None:
            for rev, scope in [k for k in self._maglev_keys(outer) if k[0] not in live]:
                self._maglev_delete(outer, outer.Key(rev, scope, 0), (rev, scope))
        return written

    def _maglev_keys(self, outer: Any) -> list[tuple[int, int]]:
        return [(k.rev_nat_id, k.scope) for k in outer.keys()]

    def _maglev_delete(self, outer: Any, key: Any, shadow_key: tuple[int, int]) -> None:
        try:
            del outer[key]
        except KeyError:
            pass
        self._maglev.pop(shadow_key, None)

    def prog_fd(self, name: str) -> int:
        return self._fns[name].fd

    def table(self, name: str):
        assert self.bpf is not None, "load() first"
        return self.bpf[name.encode()]  # bcc warns on str names

    def attach(self) -> None:
        """Register the devices and put both programs on each, replacing earlier filters."""
        devs = self.table("zp_np_dev4")
        devs6 = self.table("zp_np_dev6")
        with _iproute(self.netns) as ipr:
            wanted = set()
            for ifname in self.devices:
                index = _ifindex(ipr, ifname)
                addr = self.snat_addresses.get(ifname) or _first_ipv4(ipr, index)
                if addr is None:
                    raise RuntimeError(f"device {ifname} has no IPv4 address to SNAT to")
                devs[ctypes.c_uint32(index)] = maps.NpDev4(addr=(ctypes.c_uint8 * 4)(*addr.packed))
                addr6 = _first_global_ipv6(ipr, index)
                if addr6 is not None:  # without one, IPv6 flows to remote backends are not SNATed
                    devs6[ctypes.c_uint32(index)] = maps.NpDev6(addr=(ctypes.c_uint8 * 16)(*addr6.packed))
                wanted.add(index)
                try:
                    ipr.tc("add", "clsact", index)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                for f in _filters(ipr, index):
                    if (f.prio, f.handle) == (FILTER_PRIO, FILTER_HANDLE) and not f.ours:
                        raise RuntimeError(
                            f"{ifname} {f.hook}: tc filter pref {f.prio} handle {f.handle:#x} belongs to another "
                            f"program ({f.name or 'unnamed'}); zeroproxy will not replace it — remove it or "
                            "leave this device out of --devices")
                for name, parent in ((INGRESS_PROG, CLSACT_INGRESS), (EGRESS_PROG, CLSACT_EGRESS)):
                    fn = self._fns[name]
                    ipr.tc("replace-filter", "bpf", index, FILTER_HANDLE, fd=fn.fd, name=fn.name,
                           parent=parent, prio=FILTER_PRIO, classid=1, direct_action=True)
            for table in (devs, devs6):
                for key in list(table.keys()):
                    if key.value not in wanted:
                        del table[key]
        log.info("attached NodePort programs to %s", ", ".join(self.devices))

    def detach(self) -> list[str]:
        """Remove the programs from every device (see detach())."""
        return detach(self.devices, self.netns)

    def stats(self) -> dict[maps.Reason, int]:
        """The TC path's counters (zp_np_stats), summed over CPUs."""
        table = self.table("zp_np_stats")
        return {reason: sum(table[ctypes.c_uint32(reason)]) for reason in maps.NP_REASONS}

    def close(self) -> None:
        """Release this process's handles; filters and pins stay for the next agent."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


@dataclass(frozen=True)
class _Filter:
    hook: str  # "ingress" / "egress"
    parent: str  # the clsact hook as pyroute2 wants it
    prio: int
    handle: int
    name: str | None  # the BPF program's name; None for classic BPF or other classifiers

    @property
    def ours(self) -> bool:
        return bool(self.name and self.name.startswith(PROG_PREFIX))


def _filters(ipr: IPRoute, index: int) -> list[_Filter]:
    """Every filter on the device's clsact hooks (none when it has no clsact qdisc)."""
    out = []
    for parent, hook in ((CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")):
        try:
            found = ipr.get_filters(index=index, parent=parent)
        except NetlinkError as e:
            if e.code in (errno.EINVAL, errno.ENOENT):
                continue  # no clsact qdisc
            raise
        for f in found:
            if not f["handle"]:
                continue  # the head of a priority's chain, not a filter
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            out.append(_Filter(hook, parent, f["info"] >> 16, f["handle"], name))
    return out


def attached(devices: Sequence[str], netns: str | None = None) -> dict[str, list[str]]:
    """zeroproxy TC programs on each device, as "ingress:<name>" / "egress:<name>"."""
    with _iproute(netns) as ipr:
        return {ifname: [f"{f.hook}:{f.name}" for f in _filters(ipr, _ifindex(ipr, ifname)) if f.ours]
                for ifname in devices}


def detach(devices: Sequence[str], netns: str | None = None) -> list[str]:
    """Delete zeroproxy's filters from each device, and its clsact qdisc when nothing else uses
    it; another program's filters (and so the qdisc) stay. Safe to run twice."""
    done = []
    with _iproute(netns) as ipr:
        for ifname in devices:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                continue
            index = found[0]
            for f in _filters(ipr, index):
                if f.ours:
                    try:
                        ipr.tc("del-filter", "bpf", index, f.handle, parent=f.parent, prio=f.prio)
                        done.append(f"removed {f.name} from {ifname} {f.hook}")
                    except NetlinkError as e:
                        if e.code != errno.ENOENT:
                            raise
            others = _filters(ipr, index)
            if others:
                done.append(f"kept the clsact qdisc of {ifname}: {len(others)} other filter(s) on it")
                continue
            try:
                ipr.tc("del", "clsact", index)
                done.append(f"removed clsact qdisc from {ifname}")
            except NetlinkError as e:
                if e.code not in (errno.EINVAL, errno.ENOENT):
                    raise
    return done


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"no device {ifname!r}")
    return int(found[0])


def _first_global_ipv6(ipr: IPRoute, index: int) -> ipaddress.IPv6Address | None:
    for a in ipr.get_addr(index=index, family=socket.AF_INET6):
        addr = ipaddress.IPv6Address(a.get_attr("IFA_ADDRESS"))
        if not addr.is_link_local:
            return addr
    return None


def _first_ipv4(ipr: IPRoute, index: int) -> ipaddress.IPv4Address | None:
    for a in ipr.get_addr(index=index, family=2):
        return ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS"))
    return None
