"""The service table every source is translated into, and the dataplane is programmed from.

This module is the narrow interface between the watch side (sources + translation) and the
map-writing side (dataplane). It is plain, hashable data so that it can be compared to find
what changed, and serialised (msgpack) if the two sides ever become separate processes.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import KW_ONLY, dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# kube-apiserver's default --service-node-port-range, the one copy: the config's default, the
# range translation checks nodePorts against, and the one the TC path's SNAT ports must avoid.
DEFAULT_NODE_PORT_RANGE = (30000, 32767)
# The TC path's SNAT source ports, the one copy (the config's default): above Linux's default
# ip_local_port_range (32768-60999), so a SNATed flow never shares a port with a connection the
# node opened itself, and above the NodePort range.
DEFAULT_SNAT_PORTS = (61000, 65535)


class Protocol(enum.IntEnum):
    """IP protocol numbers, as the kernel and the BPF maps use them."""

    TCP = 6
    UDP = 17
    SCTP = 132


class FrontendKind(enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


@dataclass(frozen=True, order=True)
class ServicePortName:
    """Identity of one port of one Service: namespace/name:port (port name may be empty)."""

    namespace: str
    name: str
    port: str = ""

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, order=True)
class Frontend:
    """An address:port/protocol that clients use to reach a service port.

    For NodePort frontends the address is the unspecified address of the family (0.0.0.0 / ::)
    and the dataplane matches it against the node's NodePort addresses.
    """

    address: IPAddress
    port: int
    protocol: Protocol
    kind: FrontendKind = FrontendKind.CLUSTER_IP

    def __str__(self) -> str:
        addr = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{addr}:{self.port}/{self.protocol.name}"

    @property
    def sort_key(self) -> tuple[int, bytes, int, int, str]:
        """A total order across address families (ipaddress refuses to compare v4 with v6)."""
        return (self.address.version, self.address.packed, self.port, int(self.protocol), self.kind.value)


@dataclass(frozen=True, order=True)
class Backend:
    """One endpoint address:port serving a service port."""

    address: IPAddress
    port: int
    node_name: str = ""  # EndpointSlice endpoint.nodeName; "" when unknown
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    def __str__(self) -> str:
        addr = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{addr}:{self.port}"


MAX_AFFINITY_TIMEOUT = 86400  # seconds; the API server's upper bound for ClientIP affinity


@dataclass(frozen=True)
class ServiceEntry:
    """Everything the dataplane needs to program one frontend.

    Typed fields, not Kubernetes vocabulary: the control plane decides what a Service's policies
    mean for this frontend (which backends, how long a client sticks, whether only this node's
    backends serve outside clients) and the dataplane only writes that down.
    """

    frontend: Frontend
    service: ServicePortName
    backends: tuple[Backend, ...] = ()  # already filtered to the ones to use, in a stable order
    # For an external frontend (NodePort, ExternalIP, LB IP) whose traffic policies give traffic
    # from the node and its pods other backends than traffic from outside (externalTrafficPolicy
    # Local, as kube-proxy: in-cluster clients use the internal policy's endpoints): those
    # backends. None = the same as ``backends``.
    internal_backends: tuple[Backend, ...] | None = None
    _: KW_ONLY
    affinity_timeout: int = 0  # seconds of ClientIP session affinity, 1..MAX_AFFINITY_TIMEOUT; 0 = none
    # External frontend of an externalTrafficPolicy: Local service: outside clients reach only this
    # node's backends (``backends``) and keep their source address; the TC programs mark it LOCAL.
    local_only: bool = False
    # The service's healthCheckNodePort when it is externalTrafficPolicy: Local, else 0. Not a map
    # field: the agent's health servers read it from the table; the map writer ignores it.
    health_check_node_port: int = 0
    # LoadBalancer frontend of a Service with loadBalancerSourceRanges: the only sources that may
    # use it (every family's; a source of a family with none listed is refused). () = anyone.
    source_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        # A programming error on the sending side, not bad user input (translate validates that):
        # refuse it here rather than write a timeout the datapath would misread.
        if not 0 <= self.affinity_timeout <= MAX_AFFINITY_TIMEOUT:
            raise ValueError(f"{self.frontend}: affinity_timeout {self.affinity_timeout} is outside "
                             f"0..{MAX_AFFINITY_TIMEOUT}")
        if self.source_ranges and self.frontend.kind is not FrontendKind.LOAD_BALANCER:
            raise ValueError(f"{self.frontend}: source_ranges on a {self.frontend.kind.value} frontend")
        if not 0 <= self.health_check_node_port <= 65535:
            raise ValueError(f"{self.frontend}: health_check_node_port {self.health_check_node_port} "
                             "is not a port")


# The complete desired state: frontend -> entry. A source + translation produces one of these;
# the dataplane makes the kernel maps equal to it.
ServiceTable = dict[Frontend, ServiceEntry]
