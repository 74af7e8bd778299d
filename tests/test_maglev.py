"""Maglev for external traffic (lbAlgorithm: maglev): the same flow gets the same backend on
every node, and removing one of N backends moves only about 1/N of the flows.

The numbers come from the TC programs of two nodes, each with its own maps written by its own
ServiceMaps (so the backend ids differ between them), fed the same 2000 flows to one LoadBalancer
IP through BPF_PROG_TEST_RUN; the chosen backend is read from the rewritten packet.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import loader, maglev
from dataplane.netns import in_netns
from dataplane.services import ServiceMaps
from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName
from dataplane.tc import NodeDatapath, prog_test_run
from testbed.bed import TestBed, pin_root

LB_IP = "192.0.2.90"
FLOWS = 2000
N = 5
TC_ACT_REDIRECT = 7


def test_table_is_balanced_order_free_and_moves_only_the_removed_backends_share() -> None:
    names = [f"10.244.3.{i}:8080" for i in range(1, N + 1)]
    t = maglev.table(names)
    assert len(t) == maglev.M
    share = collections.Counter(t)
    assert max(share.values()) - min(share.values()) <= 1, share  # M/N each, give or take one
    rev = list(reversed(names))
    assert [rev[i] for i in maglev.table(rev)] == [names[i] for i in t]  # the order given does not matter
    fewer = names[:2] + names[3:]
    t2 = maglev.table(fewer)
    moved_others = sum(1 for a, b in zip(t, t2, strict=True) if names[a] != names[2] and names[a] != fewer[b])
    assert moved_others / maglev.M < 0.02, moved_others  # the paper's bound is small; here ~0.6%
    assert maglev.table([]) == []
    with pytest.raises(ValueError):
        maglev.table(["a", "a"])


def _syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    def csum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + ip + tcp


class _Node:
    def __init__(self, bed: TestBed, name: str, backend_node: object, pin_dir: Path, backends: list[str]) -> None:
        self.node = bed.add_node(name)
        self.eth0 = self.node.ifindex("eth0")
        bed.iproute(self.node.netns).neigh("replace", dst=backend_node.ip4, lladdr="02:00:00:00:00:0c",  # type: ignore[attr-defined]
                                           ifindex=self.eth0, state=0x80)
        self.datapath = NodeDatapath(pin_dir, ["eth0"], netns=self.node.netns,
                                     map_sizes={"ZP_CT_MAP_SIZE": 8192, "ZP_NAT_MAP_SIZE": 8192})
        self.datapath.load()
        self.datapath.attach()
        self.maps = ServiceMaps(self.datapath)
        self.maps.maglev = True
        self.backends = backends

    def program(self, backends: list[str], noise: list[str]) -> None:
        """The LB entry, after other services whose backends take ids first (in another order on
        each node, so that the ids really differ)."""
        spn = ServicePortName("default", "lb")
        other = [ServiceEntry(Frontend(ipaddress.ip_address(f"10.96.9.{i}"), 80, Protocol.TCP),
                              ServicePortName("default", f"other-{i}"), (Backend(ipaddress.ip_address(a), 8080),))
                 for i, a in enumerate(noise, 1)]
        lb = ServiceEntry(Frontend(ipaddress.ip_address(LB_IP), 80, Protocol.TCP, FrontendKind.LOAD_BALANCER), spn,
                          tuple(Backend(ipaddress.ip_address(a), 8080) for a in backends))
        self.maps.sync(other)
        entries = [*other, lb]
        self.maps.sync(entries)
        self.datapath.sync_maglev(self.maps.maglev_tables(entries), live=self.maps.live_rev_nat_ids())
        for name in ("zp_ct4", "zp_snat4"):  # every round starts with no flows
            table = self.datapath.table(name)
            for k in list(table.keys()):
                del table[k]

    def choose(self, flows: list[tuple[str, int]]) -> list[str]:
        prog = self.datapath.prog_fd("zp_np4_ingress")
        out = []
        with in_netns(self.node.netns):
            for src, sport in flows:
                verdict, frame = prog_test_run(prog, _syn(src, sport, LB_IP, 80), ifindex=self.eth0)
                assert verdict == TC_ACT_REDIRECT, verdict
                out.append(socket.inet_ntoa(frame[30:34]))
        return out

    def close(self) -> None:
        self.datapath.close()


@pytest.fixture
def two_nodes(stale_beds_removed: list[str]) -> Iterator[tuple[_Node, _Node, list[str]]]:
    bed = TestBed(prefix="zp")
    nodes: list[_Node] = []
    pins = pin_root(bed.id)
    try:
        c = bed.add_node("c")
        backends = [str(c.pod_cidr4.network_address + 10 + i) for i in range(N)]
        nodes = [_Node(bed, name, c, pins / name, backends) for name in ("a", "b")]
        yield nodes[0], nodes[1], backends
    finally:
        for n in nodes:
            n.close()
        loader.cleanup(None, pins)
        bed.close()


def test_two_nodes_agree_per_flow_and_a_removed_backend_moves_about_one_in_n(
        two_nodes: tuple[_Node, _Node, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    a, b, backends = two_nodes
    flows = [(f"198.51.100.{1 + i % 200}", 20000 + i) for i in range(FLOWS)]
    a.program(backends, noise=["10.9.0.1", "10.9.0.2", "10.9.0.3"])
    b.program(backends, noise=["10.9.0.3"])
    assert a.maps.v4.backends != b.maps.v4.backends  # the ids differ between the nodes...
    on_a, on_b = a.choose(flows), b.choose(flows)
    agree = sum(x == y for x, y in zip(on_a, on_b, strict=True)) / FLOWS
    assert agree == 1.0, agree  # ...and every flow still gets the same backend on both
    spread = collections.Counter(on_a)
    assert set(spread) == set(backends) and min(spread.values()) > FLOWS / N / 2, spread

    gone = backends[2]
    for n in (a, b):
        n.program([x for x in backends if x != gone], noise=[])
    after_a, after_b = a.choose(flows), b.choose(flows)
    assert after_a == after_b
    moved = sum(x != y for x, y in zip(on_a, after_a, strict=True)) / FLOWS
    moved_others = sum(x != y and x != gone for x, y in zip(on_a, after_a, strict=True)) / FLOWS
    had_gone = spread[gone] / FLOWS
    assert gone not in after_a
    assert moved_others <= 0.02, moved_others  # only the removed backend's flows move...
    assert abs(moved - 1 / N) < 0.05, moved  # ...which is about 1/N of them
    with capsys.disabled():
        print(f"\nmaglev, {FLOWS} flows, {N} backends, two nodes: same backend on both nodes for "
              f"{agree:.1%}; one backend removed: {moved:.1%} of flows moved ({had_gone:.1%} were on it, "
              f"{moved_others:.2%} of the others moved)")


def test_random_algorithm_for_contrast_does_not_agree_across_nodes(two_nodes: tuple[_Node, _Node, list[str]]) -> None:
    """Without Maglev the two nodes pick independently: the agreement above is Maglev's doing."""
    a, b, backends = two_nodes
    for n in (a, b):
        n.maps.maglev = False
        n.program(backends, noise=[])
    flows = [(f"198.51.100.{1 + i % 200}", 30000 + i) for i in range(FLOWS)]
    agree = sum(x == y for x, y in zip(a.choose(flows), b.choose(flows), strict=True)) / FLOWS
    assert agree < 0.5, agree  # chance alone: about 1/N
