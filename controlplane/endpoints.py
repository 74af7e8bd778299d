"""Which endpoints of a service port serve a frontend, and in what order (kube-proxy's topology.go).

Translation collects every endpoint its EndpointSlices list for one service port and address
family into an :data:`EndpointSet` (:func:`merge`: one endpoint per address:port), then asks
:func:`choose` once per frontend, because the frontend's kind decides which traffic policy
applies. Everything here is a pure function of its arguments, so the rules can be read and
tested on their own, apart from parsing and error reporting, which stay in translate.py.

The rules, in the order :func:`choose` applies them:

1. Node-local: under a ``Local`` traffic policy (and with a node name to compare with) only the
   endpoints on this node count, so a node without one has nothing to offer.
2. Readiness: the ready endpoints; when none is ready, the serving ones that are terminating
   (KEP-1669: a rollout's last pods keep the traffic rather than drop it); every endpoint when
   the Service publishes not-ready addresses.
2b. Topology-aware routing (KEP-2433, kube-proxy's ``canUseTopology``): when the Service asks
   for it and the policy is ``Cluster``, only the endpoints hinted for this node's zone, but all
   of them whenever any usable endpoint has no hints, none is hinted for the zone, or the node
   has no zone label.
3. Scale to zero (ours): endpoints whose pod is parked only when no chosen endpoint runs; then
   traffic reaches a parked pod's activation proxy and wakes it.
4. Order: by family, address, port, so the same endpoints always give the same slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controlplane import annotations
from controlplane.objects import ObjectKey
from dataplane.table import Backend, IPAddress


@dataclass(frozen=True, order=True)
class Endpoint:
    """One endpoint address:port of a service port, with what the choice rules look at."""

    address: IPAddress
    port: int
    node_name: str = ""  # "" = unknown: never this node's
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: ObjectKey = field(default=("", ""), compare=False)  # targetRef of kind Pod; ("", "") = none
    zones: frozenset[str] = field(default=frozenset(), compare=False)  # hints.forZones; empty = no hints
    nodes: frozenset[str] = field(default=frozenset(), compare=False)  # hints.forNodes (PreferSameNode)

    def rank(self) -> tuple[bool, bool, bool, str]:
        """When two slices list the same address:port, the higher rank (the healthier copy) wins."""
        return (self.ready, self.serving, not self.terminating, self.node_name)


# (address, port) -> the endpoint there: one service port's endpoints of one family
EndpointSet = dict[tuple[IPAddress, int], Endpoint]


def merge(into: EndpointSet, endpoint: Endpoint) -> None:
    """Add an endpoint; a second copy of the same address:port replaces the first only if healthier.

    Two slices of one service can list the same address while a pod moves between them; the
    result must not depend on which slice was read first.
    """
    old = into.get((endpoint.address, endpoint.port))
    if old is None or endpoint.rank() > old.rank():
        into[(endpoint.address, endpoint.port)] = endpoint


def on_node(endpoints: Iterable[Endpoint], node_name: str) -> list[Endpoint]:
    """The endpoints on this node (rule 1)."""
    return [e for e in endpoints if e.node_name == node_name]


def usable(endpoints: Iterable[Endpoint], publish_not_ready: bool = False) -> list[Endpoint]:
    """The ready endpoints, else the serving-and-terminating ones; all with publishNotReady (rule 2)."""
    eps = list(endpoints)
    if publish_not_ready:
        return eps
    return [e for e in eps if e.ready] or [e for e in eps if e.serving and e.terminating]


def by_topology(endpoints: Iterable[Endpoint], zone: str, node_name: str = "",
                same_node: bool = False) -> list[Endpoint] | None:
    """The endpoints hinted for this node (``same_node``: PreferSameNode's ``forNodes``) or
    else for its ``zone``, or None when hints cannot be used (rule 2b): an endpoint without
    hints of that kind (the controller had not finished, or gave up), no endpoint for this
    node or zone, or no zone label. ``endpoints`` are the ready ones."""
    eps = list(endpoints)
    if not eps:
        return None
    if same_node and node_name and all(e.nodes for e in eps):
        mine = [e for e in eps if node_name in e.nodes]
        if mine:
            return mine
    if not zone or any(not e.zones for e in eps):
        return None
    return [e for e in eps if zone in e.zones] or None


def prefer_running(endpoints: Iterable[Endpoint], states: Mapping[ObjectKey, str]) -> list[Endpoint]:
    """Endpoints whose pod is not parked; all of them when every one is parked (rule 3)."""
    eps = list(endpoints)
    running = [e for e in eps if not annotations.parked(states.get(e.pod))]
    return running or eps


def ordered(endpoints: Iterable[Endpoint]) -> tuple[Backend, ...]:
    """The chosen endpoints as the table's backends, in their stable order (rule 4)."""
    return tuple(
        Backend(e.address, e.port, e.node_name, e.ready, e.serving, e.terminating)
        for e in sorted(endpoints, key=lambda e: (e.address.version, e.address, e.port))
    )


def choose(
    endpoints: Iterable[Endpoint],
    *,
    local: bool = False,
    node_name: str = "",
    publish_not_ready: bool = False,
    states: Mapping[ObjectKey, str] | None = None,
    topology: str = "",
    zone: str = "",
) -> tuple[Backend, ...]:
    """The backends of one frontend.

    ``local`` is whether the traffic policy that governs this frontend is ``Local`` (the
    internal one for ClusterIP frontends, the external one for the others); it filters only
    when ``node_name`` says which node we are. ``states`` maps pods to their scale-to-zero state.
    ``topology`` is "" (no topology-aware routing), "zone" or "node" (PreferSameNode: node
    hints first); ``zone`` is this node's ``topology.kubernetes.io/zone`` label ("" = none).
    """
    eps = list(endpoints)
    if local and node_name:
        eps = on_node(eps, node_name)
    eps = usable(eps, publish_not_ready)
    if topology and not (local and node_name) and (publish_not_ready or all(e.ready for e in eps)):
        # not over the terminating fallback: kube-proxy looks at the ready endpoints only
        eps = by_topology(eps, zone, node_name, same_node=topology == "node") or eps
    if states:
        eps = prefer_running(eps, states)
    return ordered(eps)
