"""The service table every source is translated into, and the dataplane is programmed from.

This module is the narrow interface between the watch side (sources + translation) and the
map-writing side (dataplane). It is plain, hashable data so that it can be compared to find
what changed, and serialised (msgpack) if the two sides ever become separate processes.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


@dataclass(frozen=True)
class ServiceEntry:
    """Everything the dataplane needs to program one frontend."""

    frontend: Frontend
    service: ServicePortName
    backends: tuple[Backend, ...] = ()  # already filtered to the ones to use, in a stable order
    # Later features (session affinity, traffic policies, scale to zero) add fields here with
    # defaults so that older callers keep working.
    extra: tuple[tuple[str, str], ...] = field(default=())
    # For an external frontend (NodePort, ExternalIP, LB IP) whose traffic policies give traffic
    # from the node and its pods other backends than traffic from outside (externalTrafficPolicy
    # Local, as kube-proxy: in-cluster clients use the internal policy's endpoints): those
    # backends. None = the same as ``backends``.
    internal_backends: tuple[Backend, ...] | None = None

    def extra_value(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.extra:
            if k == key:
                return v
        return default

    @property
    def affinity_timeout(self) -> int:
        """Seconds of ClientIP session affinity; 0 when the service has none."""
        if self.extra_value("sessionAffinity") != "ClientIP":
            return 0
        try:
            return max(1, min(int(self.extra_value("sessionAffinityTimeoutSeconds") or 10800), 86400))
        except ValueError:
            return 10800


# The complete desired state: frontend -> entry. A source + translation produces one of these;
# the dataplane makes the kernel maps equal to it.
ServiceTable = dict[Frontend, ServiceEntry]
