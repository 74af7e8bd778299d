"""The synthetic service set every mode is programmed with: N ClusterIPs, 3 endpoints each.

One definition feeds all modes (zeroproxy's service table, the iptables and nftables rule sets)
so that they describe exactly the same services in exactly the same order; "first" and "last"
service then mean the same thing everywhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName

NAMESPACE = "bench"
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")  # kube-apiserver's default service range
FIRST_VIP_OFFSET = 10  # leave the low addresses free, as a cluster keeps them for kubernetes/dns
SERVICE_PORT = 80
PORT_NAME = "http"
MAX_SERVICES = SERVICE_CIDR.num_addresses - FIRST_VIP_OFFSET - 1


@dataclass(frozen=True)
class Service:
    """One ClusterIP service port with its endpoints (IPv4, TCP)."""

    index: int  # position in rule order: 0 is first, N-1 last
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]  # (pod IP, target port)
    node_port: int | None = None  # set: also a NodePort service on this port (the NodePort scenario)

    @property
    def namespace(self) -> str:
        return NAMESPACE

    @property
    def name(self) -> str:
        return f"svc-{self.index:05d}"

    @property
    def port_name(self) -> str:
        return PORT_NAME

    @property
    def target(self) -> str:
        return f"{self.vip}:{self.port}"


def vip(index: int) -> str:
    """ClusterIP of service ``index``; deterministic so runs and modes agree."""
    if not 0 <= index < MAX_SERVICES:
        raise ValueError(f"service index {index} outside 0..{MAX_SERVICES - 1}")
    return str(SERVICE_CIDR.network_address + FIRST_VIP_OFFSET + index)


def make_services(count: int, endpoints: Sequence[tuple[str, int]]) -> list[Service]:
    """``count`` services, all served by the same endpoint pods.

    Sharing the endpoints keeps the test bed small (three nginx pods) while each mode still
    carries one rule chain / map entry per service *and* per endpoint, which is what grows
    with N and what the benchmark measures.
    """
    if count < 1:
        raise ValueError("at least one service")
    eps = tuple((str(ipaddress.IPv4Address(ip)), int(port)) for ip, port in endpoints)
    return [Service(i, vip(i), SERVICE_PORT, eps) for i in range(count)]


def make_node_port_services(count: int, endpoints: Sequence[tuple[str, int]],
                            local_endpoints: Sequence[tuple[str, int]], base_port: int) -> list[Service]:
    """``count`` NodePort services on ports ``base_port + i`` served by the remote ``endpoints``,
    plus one more (index ``count``, last in rule order) served by the node's ``local_endpoints``.

    The NodePort scenario measures the last remote service (``count - 1``) and the local one:
    both sit at the end of KUBE-SERVICES / KUBE-NODEPORTS, iptables' worst case.
    """
    remote = make_services(count, endpoints)
    local = make_services(count + 1, local_endpoints)[-1]
    return [Service(s.index, s.vip, s.port, s.endpoints, base_port + s.index) for s in [*remote, local]]


def service_entries(services: Sequence[Service]) -> list[ServiceEntry]:
    """The same services as zeroproxy's control plane would hand them to the dataplane.

    A service with a ``node_port`` also gets its NodePort frontend (unspecified address: the
    dataplane writes one entry per node address that accepts NodePorts).
    """
    out = []
    for s in services:
        name = ServicePortName(s.namespace, s.name, s.port_name)
        backends = tuple(Backend(ipaddress.IPv4Address(ip), port) for ip, port in s.endpoints)
        out.append(ServiceEntry(Frontend(ipaddress.IPv4Address(s.vip), s.port, Protocol.TCP), name, backends))
        if s.node_port is not None:
            out.append(ServiceEntry(Frontend(ipaddress.IPv4Address("0.0.0.0"), s.node_port, Protocol.TCP,
                                             FrontendKind.NODE_PORT), name, backends))
    return out
