"""The TC programs under BPF_PROG_TEST_RUN: crafted packets + map state -> verdict and headers.

The programs run in the kernel on packets built here, inside a test-bed node's namespace (so
bpf_fib_lookup sees real routes and, thanks to permanent neighbour entries, known MACs). Each
case is a list of steps; a step sends one packet through the ingress or egress program and
checks the verdict, every rewritten header field, the checksums, and the counters that moved.
Flows carry over between the steps of a case (SYN, then the reply, then the next packet), and
every case starts from empty conntrack and SNAT maps.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dataplane import loader, maps, tc
from dataplane.conntrack import read_flows, read_reverse
from dataplane.netns import in_netns
from dataplane.services import ServiceMaps
from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName
from dataplane.tc import CtTimeouts, NodeDatapath, node_port_addresses, prog_test_run
from testbed.bed import TestBed, pin_root

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

CLIENT = "192.168.100.101"
NODE_B = "192.168.100.12"
POD_A = "10.244.1.10"
POD_B = "10.244.2.10"
POD_B2 = "10.244.2.11"
EXT_IP = "192.168.200.10"
CLUSTER_IP = "10.96.0.10"
MAC_CLIENT = "02:00:00:00:00:c1"
MAC_NODE_B = "02:00:00:00:00:0b"
MAC_POD_A = "02:00:00:00:00:a1"
SNAT_PORTS = (61000, 65535)
DEFAULT_TIMEOUTS = CtTimeouts()
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

# ---- packets -------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass
class Pkt:
    """An Ethernet/IPv4/TCP-or-UDP packet, built and parsed with real checksums."""

    src: str
    sport: int
    dst: str
    dport: int
    proto: int = TCP
    flags: int = SYN
    payload: bytes = b"hello"
    smac: str = "02:00:00:00:00:01"
    dmac: str = "02:00:00:00:00:02"
    udp_csum_zero: bool = False
    frag: bool = False

    def build(self) -> bytes:
        src, dst = socket.inet_aton(self.src), socket.inet_aton(self.dst)
        if self.proto == TCP:
            l4 = struct.pack("!HHIIBBHHH", self.sport, self.dport, 1, 0, 5 << 4, self.flags, 65535, 0, 0)
        else:
            l4 = struct.pack("!HHHH", self.sport, self.dport, 8 + len(self.payload), 0)
        l4 += self.payload
        pseudo = src + dst + struct.pack("!BBH", 0, self.proto, len(l4))
        check = _csum(pseudo + l4)
        if self.proto == UDP and self.udp_csum_zero:
            check = 0
        elif self.proto == UDP and check == 0:
            check = 0xFFFF
        off = 16 if self.proto == TCP else 6
        l4 = l4[:off] + struct.pack("!H", check) + l4[off + 2:]
        frag = 0x2000 if self.frag else 0  # MF
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, self.proto, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return _mac(self.dmac) + _mac(self.smac) + b"\x08\x00" + ip + l4


@dataclass(frozen=True)
class Seen:
    """A packet as the program left it."""

    dmac: str
    smac: str
    src: str
    sport: int
    dst: str
    dport: int
    ip_csum_ok: bool
    l4_csum_ok: bool
    l4_csum: int


def parse(frame: bytes) -> Seen:
    ip = frame[14:34]
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    total = struct.unpack("!H", ip[2:4])[0]
    l4 = frame[34:14 + total]
    sport, dport = struct.unpack("!HH", l4[:4])
    off = 16 if proto == TCP else 6
    l4_csum = struct.unpack("!H", l4[off:off + 2])[0]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    l4_ok = (proto == UDP and l4_csum == 0) or _csum(pseudo + l4) == 0
    return Seen(frame[0:6].hex(":"), frame[6:12].hex(":"), src, sport, dst, dport, _csum(ip) == 0, l4_ok, l4_csum)


# ---- the kernel side ---------------------------------------------------------------------------


@dataclass
class Rig:
    """A node namespace with the TC programs loaded and the service maps in reach."""

    bed: TestBed
    datapath: NodeDatapath
    services: ServiceMaps
    netns: str
    node_ip: str
    eth0: int
    eth0_mac: str
    lxc: int
    lxc_mac: str
    pin_dir: Path

    def run(self, direction: str, pkt: Pkt) -> tuple[int, bytes]:
        prog = "zp_np4_ingress" if direction == "in" else "zp_np4_egress"
        with in_netns(self.netns):
            return prog_test_run(self.datapath.prog_fd(prog), pkt.build(), ifindex=self.eth0)

    def stats(self) -> dict[maps.Reason, int]:
        return self.datapath.stats()

    def configure(self, snat_ports: tuple[int, int] = SNAT_PORTS, timeouts: CtTimeouts = DEFAULT_TIMEOUTS) -> None:
        self.datapath.snat_ports = snat_ports
        self.datapath.timeouts = timeouts
        self.datapath.write_config()

    def reset(self) -> None:
        for name in ("zp_ct4", "zp_snat4"):
            table = self.datapath.table(name)
            for k in list(table.keys()):
                del table[k]
        self.configure()


@pytest.fixture(scope="module")
def rig(stale_beds_removed: list[str]) -> Iterator[Rig]:
    bed = TestBed(prefix="zp")
    pin_dir = pin_root(bed.id) / "a"
    datapath = None
    try:
        node = bed.add_node("a")
        bed.add_node("b")
        pod = bed.add_pod(node, "a1", ip4=POD_A)
        ipr = bed.iproute(node.netns)
        eth0 = node.ifindex("eth0")
        lxc = pod.host_ifindex
        # Permanent neighbours: fib lookups then return known MACs without any ARP.
        for dst, mac, index in ((CLIENT, MAC_CLIENT, eth0), (NODE_B, MAC_NODE_B, eth0), (POD_A, MAC_POD_A, lxc)):
            ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=index, state=0x80)  # NUD_PERMANENT
        datapath = NodeDatapath(pin_dir, ["eth0"], netns=node.netns,
                                map_sizes={"ZP_CT_MAP_SIZE": 4096, "ZP_NAT_MAP_SIZE": 4096})
        datapath.load()
        datapath.attach()  # fills the device map; the filters themselves are not exercised here
        services = ServiceMaps(datapath)
        services.set_node_port_addresses([ipaddress.ip_address(node.ip4)])
        link = {i: ipr.get_links(i)[0].get_attr("IFLA_ADDRESS") for i in (eth0, lxc)}
        yield Rig(bed, datapath, services, node.netns, node.ip4, eth0, link[eth0], lxc, link[lxc], pin_dir)
    finally:
        if datapath is not None:
            datapath.close()
        loader.cleanup(None, pin_dir.parent)
        bed.close()


def _entry(kind: FrontendKind, addr: str, port: int, proto: Protocol, backends: list[str],
           name: str, local: bool = False, internal: list[str] | None = None) -> ServiceEntry:
    return ServiceEntry(
        Frontend(ipaddress.ip_address(addr), port, proto, kind),
        ServicePortName("default", name),
        tuple(Backend(ipaddress.ip_address(b), 8080) for b in backends),
        None if internal is None else tuple(Backend(ipaddress.ip_address(b), 8080) for b in internal),
        local_only=local,
    )


def services(web: list[str], *, udp: list[str] | None = None, ext: list[str] | None = None,
             local: list[str] | None = None, local_internal: list[str] | None = None) -> list[ServiceEntry]:
    """The service table of a case: NodePort 30080/TCP is `web`, the others are optional."""
    out = [
        _entry(FrontendKind.NODE_PORT, "0.0.0.0", 30080, Protocol.TCP, web, "web"),
        _entry(FrontendKind.CLUSTER_IP, CLUSTER_IP, 80, Protocol.TCP, web, "web"),
    ]
    if udp is not None:
        out.append(_entry(FrontendKind.NODE_PORT, "0.0.0.0", 30053, Protocol.UDP, udp, "dns"))
    if ext is not None:
        out.append(_entry(FrontendKind.EXTERNAL_IP, EXT_IP, 80, Protocol.TCP, ext, "ext"))
    if local is not None:
        out.append(_entry(FrontendKind.NODE_PORT, "0.0.0.0", 30081, Protocol.TCP, local, "loc", local=True,
                          internal=local_internal))
    return out


# ---- the table ---------------------------------------------------------------------------------


@dataclass
class Step:
    """Send pkt through one program; expect a verdict and header fields (None = unchanged)."""

    direction: str  # "in" (ingress program) or "out" (egress program)
    pkt: Pkt | Callable[[dict[str, Any]], Pkt]  # a callable gets what earlier steps recorded
    verdict: int
    src: str | None = None
    sport: int | tuple[int, int] | None = None  # a (lo, hi) range for SNAT ports
    dst: str | None = None
    dport: int | None = None
    dmac: str | None = None
    smac: str | None = None
    stats: dict[maps.Reason, int] = field(default_factory=dict)  # counters that must move by this much
    record: str | None = None  # remember the output's source port under this name
    sync: list[ServiceEntry] | None = None  # service table to program before this step
    config: dict[str, Any] | None = None  # Rig.configure() arguments before this step
    unchanged: bool = False  # the packet must come out byte for byte as it went in


def c2n(sport: int = 40000, flags: int = SYN, port: int = 30080, proto: int = TCP, dst: str = "") -> Pkt:
    """Client -> node address (the node's IP is filled in at run time when dst is "")."""
    return Pkt(CLIENT, sport, dst, port, proto=proto, flags=flags)


def case_remote_tcp() -> list[Step]:
    """NodePort to a remote backend: DNAT + SNAT, the reply un-NATed and sent to the client."""
    return [
        Step("in", c2n(), TC_ACT_REDIRECT, src="NODE", sport=SNAT_PORTS, dst=POD_B, dport=8080, dmac=MAC_NODE_B,
             smac="ETH0", stats={maps.Reason.NEW_FLOW: 1}, record="snat", sync=services([POD_B])),
        Step("in", lambda r: Pkt(POD_B, 8080, "NODE", r["snat"], flags=SYN | ACK), TC_ACT_REDIRECT, src="NODE",
             sport=30080, dst=CLIENT, dport=40000, dmac=MAC_CLIENT, smac="ETH0", stats={maps.Reason.REPLY: 1}),
        Step("in", c2n(flags=ACK), TC_ACT_REDIRECT, src="NODE", sport="snat", dst=POD_B, dport=8080,
             stats={maps.Reason.FWD: 1}),
    ]


def case_local_tcp() -> list[Step]:
    """NodePort to a local backend: DNAT only (client IP kept), reply fixed at egress."""
    return [
        Step("in", c2n(), TC_ACT_REDIRECT, src=CLIENT, sport=40000, dst=POD_A, dport=8080, dmac=MAC_POD_A,
             smac="LXC", stats={maps.Reason.NEW_FLOW: 1}, sync=services([POD_A])),
        Step("out", Pkt(POD_A, 8080, CLIENT, 40000, flags=SYN | ACK), TC_ACT_OK, src="NODE", sport=30080,
             dst=CLIENT, dport=40000, stats={maps.Reason.REPLY: 1}),
    ]


def case_udp() -> list[Step]:
    """UDP NodePort to a remote backend, including a datagram without a checksum."""
    zero = Pkt(CLIENT, 5353, "NODE", 30053, proto=UDP, udp_csum_zero=True)
    return [
        Step("in", c2n(5353, port=30053, proto=UDP), TC_ACT_REDIRECT, src="NODE", sport=SNAT_PORTS, dst=POD_B,
             dport=8080, stats={maps.Reason.NEW_FLOW: 1}, record="snat", sync=services([POD_B], udp=[POD_B])),
        Step("in", lambda r: Pkt(POD_B, 8080, "NODE", r["snat"], proto=UDP), TC_ACT_REDIRECT, src="NODE",
             sport=30053, dst=CLIENT, dport=5353, stats={maps.Reason.REPLY: 1}),
        Step("in", zero, TC_ACT_REDIRECT, src="NODE", sport="snat", dst=POD_B, dport=8080,
             stats={maps.Reason.FWD: 1}),
    ]


def case_external_ip() -> list[Step]:
    """An ExternalIP behaves like a NodePort on its own address and the service port."""
    return [
        Step("in", Pkt(CLIENT, 40001, EXT_IP, 80), TC_ACT_REDIRECT, src="NODE", sport=SNAT_PORTS, dst=POD_B,
             dport=8080, stats={maps.Reason.NEW_FLOW: 1}, record="snat", sync=services([POD_A], ext=[POD_B])),
        Step("in", lambda r: Pkt(POD_B, 8080, "NODE", r["snat"], flags=SYN | ACK), TC_ACT_REDIRECT, src=EXT_IP,
             sport=80, dst=CLIENT, dport=40001, stats={maps.Reason.REPLY: 1}),
    ]


def case_pass_through() -> list[Step]:
    """Not ours: other ports, a ClusterIP from outside, fragments, unrelated replies."""
    table = services([POD_B])
    return [
        Step("in", c2n(port=22), TC_ACT_OK, unchanged=True, sync=table),
        Step("in", Pkt(CLIENT, 40000, CLUSTER_IP, 80), TC_ACT_OK, unchanged=True),
        Step("in", Pkt(CLIENT, 40000, "NODE", 30080, frag=True), TC_ACT_OK, unchanged=True),
        Step("out", Pkt(POD_A, 8080, CLIENT, 40000, flags=ACK), TC_ACT_OK, unchanged=True),
        Step("in", Pkt(POD_B, 8080, "NODE", 61000, flags=ACK), TC_ACT_OK, unchanged=True),
    ]


def case_midstream_without_flow() -> list[Step]:
    """A TCP segment of a flow we never saw is dropped, not sent to some backend."""
    return [Step("in", c2n(flags=ACK), TC_ACT_SHOT, stats={maps.Reason.CT_MISS: 1}, sync=services([POD_B]))]


def case_backend_set_changes() -> list[Step]:
    """An established flow keeps its backend while it exists, whatever else changes."""
    steps = [Step("in", c2n(), TC_ACT_REDIRECT, dst=POD_B, record="snat", sync=services([POD_B])),
             Step("in", c2n(flags=ACK), TC_ACT_REDIRECT, dst=POD_B, sport="snat",
                  sync=services([POD_A, POD_B2, POD_B]))]
    steps += [Step("in", c2n(flags=ACK), TC_ACT_REDIRECT, dst=POD_B, sport="snat") for _ in range(20)]
    return steps


def case_backend_deleted() -> list[Step]:
    """A flow whose backend is deleted is dropped mid-stream; its next SYN starts over elsewhere."""
    return [
        Step("in", c2n(), TC_ACT_REDIRECT, dst=POD_B, sync=services([POD_B])),
        Step("in", c2n(flags=ACK), TC_ACT_SHOT, stats={maps.Reason.BACKEND_GONE: 1}, sync=services([POD_A])),
        Step("in", c2n(flags=ACK), TC_ACT_SHOT, stats={maps.Reason.CT_MISS: 1}),
        Step("in", c2n(), TC_ACT_REDIRECT, src=CLIENT, dst=POD_A, stats={maps.Reason.NEW_FLOW: 1}),
    ]


def case_snat_exhausted() -> list[Step]:
    """Two SNAT ports: two flows get one each (colliding hashes are retried), the third is
    dropped and counted; closing one flow (RST, no close grace here) frees its port."""
    small = {"snat_ports": (61000, 61001), "timeouts": CtTimeouts(closing=0)}
    return [
        Step("in", c2n(41000), TC_ACT_REDIRECT, dst=POD_B, sport=(61000, 61001), record="p0",
             sync=services([POD_B]), config=small),
        Step("in", c2n(41001), TC_ACT_REDIRECT, dst=POD_B, sport=(61000, 61001)),
        Step("in", c2n(41002), TC_ACT_SHOT, stats={maps.Reason.SNAT_EXHAUSTED: 1}),
        Step("in", c2n(41000, flags=RST | ACK), TC_ACT_REDIRECT, dst=POD_B, sport="p0"),
        Step("in", c2n(41002), TC_ACT_REDIRECT, dst=POD_B, sport="p0", stats={maps.Reason.NEW_FLOW: 1}),
    ]


def case_closed_flow_frees_port() -> list[Step]:
    """FIN both ways closes a flow; once its grace time is over the port is reusable."""
    small = {"snat_ports": (61000, 61000), "timeouts": CtTimeouts(closing=0)}
    return [
        Step("in", c2n(42000), TC_ACT_REDIRECT, sport=61000, sync=services([POD_B]), config=small),
        Step("in", Pkt(POD_B, 8080, "NODE", 61000, flags=SYN | ACK), TC_ACT_REDIRECT, dst=CLIENT),
        Step("in", c2n(42001), TC_ACT_SHOT, stats={maps.Reason.SNAT_EXHAUSTED: 1}),
        Step("in", c2n(42000, flags=FIN | ACK), TC_ACT_REDIRECT, sport=61000),
        Step("in", c2n(42001), TC_ACT_SHOT, stats={maps.Reason.SNAT_EXHAUSTED: 1}),  # half closed: still in use
        Step("in", Pkt(POD_B, 8080, "NODE", 61000, flags=FIN | ACK), TC_ACT_REDIRECT, dst=CLIENT),
        Step("in", c2n(42001), TC_ACT_REDIRECT, sport=61000, stats={maps.Reason.NEW_FLOW: 1}),
    ]


def case_expired_reply() -> list[Step]:
    """A reply after its flow expired is left alone (the node answers it with RST)."""
    gone = {"timeouts": CtTimeouts(syn=0)}
    return [
        Step("in", c2n(43000), TC_ACT_REDIRECT, record="snat", sync=services([POD_B]), config=gone),
        Step("in", lambda r: Pkt(POD_B, 8080, "NODE", r["snat"], flags=SYN | ACK), TC_ACT_OK, unchanged=True,
             stats={maps.Reason.STALE_REPLY: 1}),
    ]


def case_no_backend() -> list[Step]:
    """No backend: a NodePort (here eTP=Local without local endpoints) goes to the node's
    stack, which refuses; an ExternalIP is dropped."""
    return [
        Step("in", c2n(port=30081), TC_ACT_OK, unchanged=True, stats={maps.Reason.NO_BACKEND: 1},
             sync=services([POD_B], ext=[], local=[])),
        Step("in", Pkt(CLIENT, 40000, EXT_IP, 80), TC_ACT_SHOT, stats={maps.Reason.NO_BACKEND: 1}),
    ]


def case_local_policy() -> list[Step]:
    """externalTrafficPolicy Local never SNATs: the backend sees the client."""
    return [Step("in", c2n(port=30081), TC_ACT_REDIRECT, src=CLIENT, sport=40000, dst=POD_A, dport=8080,
                 sync=services([POD_B], local=[POD_A]))]


def case_local_policy_two_views() -> list[Step]:
    """eTP=Local with the node's own view (the internal policy's endpoints, for the socket hooks)
    in the same map: the TC path takes the external view — local backends only, or none."""
    return [
        Step("in", c2n(port=30081), TC_ACT_REDIRECT, src=CLIENT, sport=40000, dst=POD_A, dport=8080,
             sync=services([POD_B], local=[POD_A], local_internal=[POD_A, POD_B])),
        Step("in", c2n(sport=40001, port=30081), TC_ACT_OK, unchanged=True, stats={maps.Reason.NO_BACKEND: 1},
             sync=services([POD_B], local=[], local_internal=[POD_B])),
    ]


LB_IP = "192.168.200.20"
OTHER_CLIENT = "198.51.100.9"  # outside the ranges; routed like CLIENT (the default route)


def _lb(ranges: list[str], backends: list[str]) -> list[ServiceEntry]:
    """A LoadBalancer IP with loadBalancerSourceRanges (and its ClusterIP, which has none)."""
    lb = ServiceEntry(Frontend(ipaddress.ip_address(LB_IP), 80, Protocol.TCP, FrontendKind.LOAD_BALANCER),
                      ServicePortName("default", "lb"), tuple(Backend(ipaddress.ip_address(b), 8080) for b in backends),
                      source_ranges=tuple(ipaddress.ip_network(r) for r in ranges))
    return [*services([POD_B]), lb]


def case_source_ranges() -> list[Step]:
    """loadBalancerSourceRanges: a source inside passes, one outside is dropped and counted, a
    narrowed list cuts an established flow, and without ranges everyone passes again."""
    inside = [f"{CLIENT}/32", "203.0.113.0/24"]
    return [
        Step("in", Pkt(CLIENT, 44000, LB_IP, 80), TC_ACT_REDIRECT, src="NODE", dst=POD_B, dport=8080,
             stats={maps.Reason.NEW_FLOW: 1}, sync=_lb(inside, [POD_B])),
        Step("in", Pkt(OTHER_CLIENT, 44000, LB_IP, 80), TC_ACT_SHOT, stats={maps.Reason.SRC_RANGE: 1}),
        Step("in", Pkt(CLIENT, 44000, LB_IP, 80, flags=ACK), TC_ACT_REDIRECT, dst=POD_B,
             stats={maps.Reason.FWD: 1}),
        Step("in", Pkt(CLIENT, 44000, LB_IP, 80, flags=ACK), TC_ACT_SHOT, stats={maps.Reason.SRC_RANGE: 1},
             sync=_lb(["203.0.113.0/24"], [POD_B])),
        Step("in", Pkt(OTHER_CLIENT, 44001, LB_IP, 80), TC_ACT_REDIRECT, dst=POD_B,
             stats={maps.Reason.NEW_FLOW: 1}, sync=_lb([], [POD_B])),
        Step("in", Pkt(CLIENT, 44002, LB_IP, 80), TC_ACT_SHOT, stats={maps.Reason.SRC_RANGE: 1},
             sync=_lb(["fd00::/8"], [POD_B])),  # ranges of the other family only: every IPv4 source refused
    ]


CASES = {
    "source-ranges": case_source_ranges,
    "remote-tcp": case_remote_tcp,
    "local-tcp": case_local_tcp,
    "udp": case_udp,
    "external-ip": case_external_ip,
    "pass-through": case_pass_through,
    "midstream-without-flow": case_midstream_without_flow,
    "backend-set-changes": case_backend_set_changes,
    "backend-deleted": case_backend_deleted,
    "snat-exhausted": case_snat_exhausted,
    "closed-flow-frees-port": case_closed_flow_frees_port,
    "expired-reply": case_expired_reply,
    "no-backend": case_no_backend,
    "local-policy": case_local_policy,
    "local-policy-two-views": case_local_policy_two_views,
}


def _resolve(rig: Rig, value: Any, recorded: dict[str, Any]) -> Any:
    if value == "NODE":
        return rig.node_ip
    if value == "ETH0":
        return rig.eth0_mac
    if value == "LXC":
        return rig.lxc_mac
    if isinstance(value, str) and value in recorded:
        return recorded[value]
    return value


@pytest.mark.parametrize("name", list(CASES))
def test_tc_program_table(rig: Rig, name: str) -> None:
    rig.reset()
    recorded: dict[str, Any] = {}
    for i, step in enumerate(CASES[name]()):
        where = f"{name} step {i}"
        if step.config is not None:
            rig.configure(**step.config)
        if step.sync is not None:
            rig.services.sync(step.sync)
        pkt = step.pkt(recorded) if callable(step.pkt) else step.pkt
        pkt.src, pkt.dst = _resolve(rig, pkt.src, recorded), _resolve(rig, pkt.dst, recorded) or rig.node_ip
        before = rig.stats()
        verdict, out = rig.run(step.direction, pkt)
        after = rig.stats()
        assert verdict == step.verdict, f"{where}: verdict {verdict}, expected {step.verdict}"
        moved = {s: after[s] - before[s] for s in maps.NP_REASONS if after[s] != before[s]}
        for stat, delta in step.stats.items():
            assert moved.get(stat, 0) == delta, f"{where}: {stat.name} moved {moved}"
        if step.unchanged:
            assert out == pkt.build(), f"{where}: the packet was modified"
            continue
        if verdict == TC_ACT_SHOT:
            continue
        seen = parse(out)
        assert seen.ip_csum_ok and seen.l4_csum_ok, f"{where}: bad checksum in {seen}"
        if pkt.proto == UDP and pkt.udp_csum_zero:
            assert seen.l4_csum == 0, f"{where}: a UDP datagram without checksum got one"
        for attr in ("src", "dst", "dport", "dmac", "smac"):
            want = _resolve(rig, getattr(step, attr), recorded)
            if want is not None:
                assert getattr(seen, attr) == want, f"{where}: {attr} {getattr(seen, attr)}, expected {want}"
        sport = _resolve(rig, step.sport, recorded)
        if isinstance(sport, tuple):
            assert sport[0] <= seen.sport <= sport[1], f"{where}: SNAT port {seen.sport} outside {sport}"
        elif sport is not None:
            assert seen.sport == sport, f"{where}: sport {seen.sport}, expected {sport}"
        if step.record:
            recorded[step.record] = seen.sport


def test_conntrack_reader_shows_flows(rig: Rig) -> None:
    """The reader behind the CLI shows the client, frontend, backend, SNAT and state of a flow."""
    rig.reset()
    rig.services.sync(services([POD_B]))
    verdict, out = rig.run("in", c2n(44000, dst=rig.node_ip))
    assert verdict == TC_ACT_REDIRECT
    snat_port = parse(out).sport
    rig.run("in", Pkt(POD_B, 8080, rig.node_ip, snat_port, flags=SYN | ACK))
    flows = read_flows(rig.pin_dir)
    assert [(f.proto, f.client, f.frontend, f.backend, f.snat, f.state) for f in flows] == [
        ("TCP", f"{CLIENT}:44000", f"{rig.node_ip}:30080", f"{POD_B}:8080", f"{rig.node_ip}:{snat_port}",
         "ESTABLISHED")]
    assert 0 < flows[0].expires_in_s <= DEFAULT_TIMEOUTS.established
    rev = read_reverse(rig.pin_dir)
    assert [(e.reply_from, e.reply_to, e.client, e.frontend, e.snat) for e in rev] == [
        (f"{POD_B}:8080", f"{rig.node_ip}:{snat_port}", f"{CLIENT}:44000", f"{rig.node_ip}:30080", True)]


def test_client_ip_affinity_on_the_tc_path(rig: Rig) -> None:
    """sessionAffinity ClientIP holds for external clients too, keyed by the client's address:
    every new flow of one client lands on the backend its first flow got."""
    rig.reset()
    fe = Frontend(ipaddress.ip_address("0.0.0.0"), 30080, Protocol.TCP, FrontendKind.NODE_PORT)
    both = (Backend(ipaddress.ip_address(POD_A), 8080), Backend(ipaddress.ip_address(POD_B), 8080))
    sticky = ServiceEntry(fe, ServicePortName("default", "web"), both, affinity_timeout=60)

    def destinations(sports: range) -> set[str]:
        out = set()
        for sport in sports:
            verdict, frame = rig.run("in", c2n(sport, dst=rig.node_ip))
            assert verdict == TC_ACT_REDIRECT
            out.add(parse(frame).dst)
        return out

    rig.services.sync([sticky])
    assert len(destinations(range(41000, 41024))) == 1
    client_id = maps.AFFINITY_CLIENT_IP4 | int.from_bytes(socket.inet_aton(CLIENT), "little")
    keys = [maps.AffinityKey.from_buffer_copy(bytes(k)) for k in rig.datapath.table("zp_lb_affinity").keys()]
    assert [(k.netns_cookie, k.family) for k in keys] == [(client_id, 4)]  # v1's byte layout, kept
    assert [(bytes(k.client_ip4), k.tc_client) for k in keys] == [(socket.inet_aton(CLIENT), maps.AFFINITY_TC_CLIENT)]
    # slot 0 carries the timeout in the union's other name for the same four bytes
    head = next(v for k, v in rig.datapath.table("zp_lb4_svc").items() if k.slot == 0 and v.count == 2)
    assert head.affinity_timeout == head.backend_id == 60
    # without affinity the same client spreads over both backends
    rig.reset()
    rig.services.sync([ServiceEntry(fe, ServicePortName("default", "web"), both)])
    assert destinations(range(42000, 42032)) == {POD_A, POD_B}


def test_map_mirrors_match_bcc(rig: Rig) -> None:
    """Each ctypes mirror of a TC map key/value has the size bcc generated from the C struct."""
    for name in ("zp_ct4", "zp_snat4", "zp_np_cfg", "zp_np_dev4", "zp_ct6", "zp_snat6", "zp_np_dev6"):
        table = rig.datapath.table(name)
        key_t, value_t = maps.MAP_TYPES[name]
        assert ctypes.sizeof(key_t) == ctypes.sizeof(table.Key), name
        assert ctypes.sizeof(value_t) == ctypes.sizeof(table.Leaf), name
    assert max(maps.NP_REASONS) < maps.NP_STAT_MAX == rig.datapath.table("zp_np_stats").max_entries
    for name in ("zp_ct4", "zp_snat4", "zp_np_cfg", "zp_np_dev4", "zp_np_stats", "zp_ct6", "zp_snat6", "zp_np_dev6"):
        assert (rig.pin_dir / maps.MAP_PINS[name]).exists(), name


def test_detach_and_attach_leave_other_programs_filters_alone(rig: Rig) -> None:
    """Another program's tc filters on the device survive zeroproxy's detach (and so does the
    clsact qdisc they hang on); a foreign filter in zeroproxy's own slot is refused, not replaced."""
    tc_ = ["tc", "filter"]
    # classic BPF "accept everything" filters, standing in for another tool's programs
    foreign = ["bpf", "bytecode", "1,6 0 0 4294967295,", "classid", "1"]

    def shown(hook: str) -> str:
        return rig.bed.run_in_netns(rig.netns, [*tc_, "show", "dev", "eth0", hook]).stdout

    try:
        rig.bed.run_in_netns(rig.netns, [*tc_, "add", "dev", "eth0", "ingress", "prio", "5", "handle", "7", *foreign])
        assert tc.attached(["eth0"], rig.netns) == {"eth0": ["ingress:zp_np4_ingress", "egress:zp_np4_egress"]}
        said = rig.datapath.detach()
        assert said == ["removed zp_np4_ingress from eth0 ingress", "removed zp_np4_egress from eth0 egress",
                        "kept the clsact qdisc of eth0: 1 other filter(s) on it"]
        assert tc.attached(["eth0"], rig.netns) == {"eth0": []}
        assert "handle 0x7" in shown("ingress") and "zp_np" not in shown("ingress") + shown("egress")

        rig.bed.run_in_netns(rig.netns, [*tc_, "add", "dev", "eth0", "ingress", "prio", "1", "handle", "1", *foreign])
        with pytest.raises(RuntimeError, match=r"eth0 ingress: tc filter pref 1 handle 0x1 belongs to another "
                                               r"program \(unnamed\); zeroproxy will not replace it"):
            rig.datapath.attach()
        assert "zp_np" not in shown("ingress")
    finally:
        for prio in ("1", "5"):
            rig.bed.run_in_netns(rig.netns, [*tc_, "del", "dev", "eth0", "ingress", "prio", prio], check=False)
        rig.datapath.attach()
    assert tc.attached(["eth0"], rig.netns) == {"eth0": ["ingress:zp_np4_ingress", "egress:zp_np4_egress"]}
    # with only our filters left, detach removes the qdisc too; attach puts everything back
    assert rig.datapath.detach()[-1] == "removed clsact qdisc from eth0"
    assert "clsact" not in rig.bed.run_in_netns(rig.netns, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    rig.datapath.attach()


@pytest.mark.parametrize(("spec", "expected"), [
    ([], ["10.244.1.1", "127.0.0.1", "192.168.100.11", "fd00:192::b"]),
    (["192.168.100.0/24"], ["192.168.100.11"]),
    (["127.0.0.0/8", "fd00:192::/64"], ["127.0.0.1", "fd00:192::b"]),
    (["primary"], ["192.168.100.11"]),
    (["::1/128"], []),
])
def test_node_port_addresses(spec: list[str], expected: list[str]) -> None:
    """kube-proxy's nodePortAddresses: all local addresses, CIDR-selected ones, or `primary`;
    never IPv6 loopback or link-local addresses."""
    local = [ipaddress.ip_address(a) for a in
             ("127.0.0.1", "::1", "10.244.1.1", "192.168.100.11", "fd00:192::b", "fe80::1")]
    primary = [ipaddress.ip_address("192.168.100.11")]
    got = node_port_addresses(spec, local, primary)
    assert got == [ipaddress.ip_address(a) for a in expected]


# ---- IPv6 -----------------------------------------------------------------------------------------

CLIENT6 = "fd00:192::65"  # on the underlay prefix, like CLIENT


def _pkt6(src: str, sport: int, dst: str, dport: int, proto: int = TCP, flags: int = SYN) -> bytes:
    """An Ethernet/IPv6/TCP-or-UDP frame with a correct L4 checksum."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    if proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + b"hello"
        off = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + 5, 0) + b"hello"
        off = 6
    pseudo = s + d + struct.pack("!IxxxB", len(l4), proto)
    l4 = l4[:off] + struct.pack("!H", _csum(pseudo + l4) or 0xFFFF) + l4[off + 2:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s, d)
    return _mac("02:00:00:00:00:02") + _mac("02:00:00:00:00:01") + b"\x86\xdd" + ip + l4


def _parse6(frame: bytes) -> tuple[str, int, str, int, bool]:
    """(src, sport, dst, dport, L4 checksum ok) of an IPv6 frame."""
    ip = frame[14:54]
    proto, plen = ip[6], struct.unpack("!H", ip[4:6])[0]
    l4 = frame[54:54 + plen]
    src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
    sport, dport = struct.unpack("!HH", l4[:4])
    ok = _csum(ip[8:40] + struct.pack("!IxxxB", len(l4), proto) + l4) == 0
    return src, sport, dst, dport, ok


def _run6(rig: Rig, direction: str, frame: bytes) -> tuple[int, bytes]:
    prog = "zp_np4_ingress" if direction == "in" else "zp_np4_egress"  # both dispatch IPv6 onward
    with in_netns(rig.netns):
        return prog_test_run(rig.datapath.prog_fd(prog), frame, ifindex=rig.eth0)


def test_ipv6_nodeport_remote_local_and_udp(rig: Rig) -> None:
    """The IPv6 path: a remote backend is DNATed and SNATed to the device's IPv6 address and its
    reply un-NATed back to the client; a local one keeps the client's address and its reply is
    fixed at egress; UDP likewise; a packet to no frontend passes untouched; the counters are
    the IPv4 path's."""
    node_a, node_b = rig.bed.nodes["a"], rig.bed.nodes["b"]
    pod_a6 = rig.bed.pods["a1"].ip6
    pod_b6 = str(node_b.pod_cidr6.network_address + 0x10)
    ipr = rig.bed.iproute(rig.netns)
    for dst, mac, index in ((CLIENT6, MAC_CLIENT, rig.eth0), (node_b.ip6, MAC_NODE_B, rig.eth0),
                            (pod_a6, MAC_POD_A, rig.lxc)):
        ipr.neigh("replace", dst=dst, lladdr=mac, ifindex=index, state=0x80, family=socket.AF_INET6)
    rig.reset()
    for name in ("zp_ct6", "zp_snat6"):
        table = rig.datapath.table(name)
        for k in list(table.keys()):
            del table[k]
    rig.services.set_node_port_addresses([ipaddress.ip_address(rig.node_ip), ipaddress.ip_address(node_a.ip6)])

    def entry(port: int, proto: Protocol, backend: str, name: str) -> ServiceEntry:
        return ServiceEntry(Frontend(ipaddress.ip_address("::"), port, proto, FrontendKind.NODE_PORT),
                            ServicePortName("default", name), (Backend(ipaddress.ip_address(backend), 8080),))

    rig.services.sync([entry(30080, Protocol.TCP, pod_b6, "remote"), entry(30081, Protocol.TCP, pod_a6, "local"),
                       entry(30053, Protocol.UDP, pod_b6, "dns")])
    before = rig.stats()

    verdict, out = _run6(rig, "in", _pkt6(CLIENT6, 40000, node_a.ip6, 30080))
    assert verdict == TC_ACT_REDIRECT, verdict
    src, sport, dst, dport, ok = _parse6(out)
    assert (src, dst, dport, ok) == (node_a.ip6, pod_b6, 8080, True) and SNAT_PORTS[0] <= sport <= SNAT_PORTS[1]
    assert out[0:6].hex(":") == MAC_NODE_B  # towards node b, the remote backend's node
    verdict, out = _run6(rig, "in", _pkt6(pod_b6, 8080, node_a.ip6, sport, flags=SYN | ACK))
    assert verdict == TC_ACT_REDIRECT
    assert _parse6(out) == (node_a.ip6, 30080, CLIENT6, 40000, True)

    verdict, out = _run6(rig, "in", _pkt6(CLIENT6, 40001, node_a.ip6, 30081))
    assert verdict == TC_ACT_REDIRECT
    assert _parse6(out) == (CLIENT6, 40001, pod_a6, 8080, True)
    verdict, out = _run6(rig, "out", _pkt6(pod_a6, 8080, CLIENT6, 40001, flags=SYN | ACK))
    assert verdict == TC_ACT_OK
    assert _parse6(out) == (node_a.ip6, 30081, CLIENT6, 40001, True)

    verdict, out = _run6(rig, "in", _pkt6(CLIENT6, 5353, node_a.ip6, 30053, proto=UDP))
    assert verdict == TC_ACT_REDIRECT
    src, usport, dst, dport, ok = _parse6(out)
    assert (src, dst, dport, ok) == (node_a.ip6, pod_b6, 8080, True)
    verdict, out = _run6(rig, "in", _pkt6(pod_b6, 8080, node_a.ip6, usport, proto=UDP))
    assert verdict == TC_ACT_REDIRECT and _parse6(out) == (node_a.ip6, 30053, CLIENT6, 5353, True)

    frame = _pkt6(CLIENT6, 40002, node_a.ip6, 22)
    assert _run6(rig, "in", frame) == (TC_ACT_OK, frame)  # not a frontend: untouched
    verdict, _ = _run6(rig, "in", _pkt6(CLIENT6, 40003, node_a.ip6, 30080, flags=ACK))
    assert verdict == TC_ACT_SHOT  # mid-stream without a flow
    after = rig.stats()
    moved = {r: after[r] - before[r] for r in maps.NP_REASONS if after[r] != before[r]}
    assert moved == {maps.Reason.NEW_FLOW: 3, maps.Reason.REPLY: 3, maps.Reason.CT_MISS: 1}, moved
    from dataplane.conntrack import read_flows as flows_of

    v6 = [f for f in flows_of(rig.pin_dir) if f.client.startswith("[")]
    assert sorted((f.proto, f.client, f.backend) for f in v6) == [
        ("TCP", f"[{CLIENT6}]:40000", f"[{pod_b6}]:8080"), ("TCP", f"[{CLIENT6}]:40001", f"[{pod_a6}]:8080"),
        ("UDP", f"[{CLIENT6}]:5353", f"[{pod_b6}]:8080")]
    rig.services.set_node_port_addresses([ipaddress.ip_address(rig.node_ip)])  # as the other cases expect
