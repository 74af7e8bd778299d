"""Kubernetes objects -> the service table, with kube-proxy's semantics.

Every source (the YAML file now, the API server later) hands this module the objects it has as
camelCase dicts, the shape ``kubectl get -o yaml`` prints and ``ApiClient().
sanitize_for_serialization`` returns. Keeping this a pure function of those dicts means both
sources get the same semantics and the same error messages, and it can be tested without a
cluster or a kernel.

Bad input never raises. Each problem becomes an :class:`ObjectError` naming the object and the
field, and only the smallest sensible unit is dropped: one port of a Service when only that
port is wrong, the whole object when something it can't work without is wrong (its IP, its
traffic policy), never anything else.

Semantics followed (kube-proxy's, from the API reference and KEP-1669):

* ClusterIP frontends: every ``spec.clusterIPs`` entry (or ``spec.clusterIP``) x every port.
  Headless (``clusterIP: None`` or label ``service.kubernetes.io/headless``), ExternalName, and
  services whose ``service.kubernetes.io/service-proxy-name`` label names another proxy get no
  frontends.
* NodePort frontends (address 0.0.0.0 / ::) per IP family of the service for NodePort and
  LoadBalancer services; ExternalIP frontends for ``spec.externalIPs``; LoadBalancer frontends
  for ``status.loadBalancer.ingress[].ip`` (not for ``ipMode: Proxy``, where the load balancer
  itself proxies and the node must not capture the address).
* EndpointSlices join by the ``kubernetes.io/service-name`` label in the service's namespace;
  their addressType selects the frontend family; ports match by name and protocol. Both
  ``discovery.k8s.io/v1`` and ``v1beta1`` (what Kubernetes up to 1.20 serves) are read: v1beta1
  has no ``nodeName`` unless a feature gate was on, so an endpoint's node is then its
  ``topology["kubernetes.io/hostname"]``, as kube-proxy 1.20 reads it.
* Endpoint choice (the rules live in controlplane/endpoints.py, kube-proxy's topology.go):
  ready ones; if none, serving-and-terminating ones; all of them for
  ``publishNotReadyAddresses``. With a ``node_name``, a frontend under a ``Local`` traffic
  policy (internal for ClusterIP, external for the others) makes the same choice among this
  node's endpoints only, so a node without local endpoints programs the frontend with no
  backends.
* Scale to zero (ours): an endpoint whose Pod (``endpoints[].targetRef``) is parked -- label
  ``zeroproxy.io/scale-state`` checkpointed / restoring / failed, or a state the caller knows
  better (``scale_states``) -- is chosen only when no endpoint of the same choice is running.
  A parked pod keeps its netns and IP, so such traffic reaches the activation proxy there and
  wakes it; while another endpoint runs, nobody waits for a restore.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane import annotations
from controlplane.endpoints import Endpoint, EndpointSet, choose, merge
from controlplane.objects import (
    Fields,
    ObjectError,
    ObjectKey,
    ObjectRef,
    Severity,
    describe,
    ip_family,
    join,
    parse_endpoint_ip,
    parse_frontend_ip,
    parse_ip,
)
from dataplane.table import (
    DEFAULT_NODE_PORT_RANGE,
    MAX_AFFINITY_TIMEOUT,
    Backend,
    Frontend,
    FrontendKind,
    IPAddress,
    Protocol,
    ServiceEntry,
    ServicePortName,
    ServiceTable,
)

DEFAULT_AFFINITY_TIMEOUT_SECONDS = 10800  # the API server's default for ClientIP affinity
MAX_AFFINITY_TIMEOUT_SECONDS = MAX_AFFINITY_TIMEOUT  # the API server's upper bound

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"

API_VERSIONS: dict[str, tuple[str, ...]] = {  # kind -> the versions we read, preferred first
    "Service": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
    "Node": ("v1",),
    "Pod": ("v1",),
    "List": ("v1",),
}
ENDPOINTSLICE_V1BETA1 = "discovery.k8s.io/v1beta1"
HOSTNAME_TOPOLOGY_KEY = "kubernetes.io/hostname"  # v1beta1 endpoint.topology: the node's name
ZONE_LABEL = "topology.kubernetes.io/zone"  # the Node label topology-aware routing compares hints with
TOPOLOGY_MODE_ANNOTATION = "service.kubernetes.io/topology-mode"  # 1.27+
TOPOLOGY_HINTS_ANNOTATION = "service.kubernetes.io/topology-aware-hints"  # 1.21-1.26, still honoured
TRAFFIC_DISTRIBUTIONS = {"PreferClose": "zone", "PreferSameZone": "zone", "PreferSameNode": "node"}
CLUSTER_SCOPED = {"Node"}
MAX_LIST_DEPTH = 8  # kind: List inside kind: List is legal; a deeper nest is a mistake

PROTOCOLS = {p.name: p for p in Protocol}
FAMILIES = ("IPv4", "IPv6")
UNSPECIFIED: dict[str, IPAddress] = {
    "IPv4": ipaddress.IPv4Address(0),
    "IPv6": ipaddress.IPv6Address(0),
}
EXTERNAL_KINDS = (FrontendKind.NODE_PORT, FrontendKind.EXTERNAL_IP, FrontendKind.LOAD_BALANCER)


@dataclass(frozen=True)
class NodeInfo:
    """What NodePort handling needs to know about a node."""

    name: str
    internal_ips: tuple[IPAddress, ...] = ()
    external_ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PodInfo:
    """A pod as scale-to-zero needs it: which IPs it has, where it runs, what it opted into."""

    namespace: str
    name: str
    node_name: str = ""
    ips: tuple[IPAddress, ...] = ()
    phase: str = ""
    terminating: bool = False  # metadata.deletionTimestamp is set
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str, default: str | None = None) -> str | None:
        return dict(self.annotations).get(key, default)

    @property
    def scale_state(self) -> str:
        """The state the pod's scaler published (label ``zeroproxy.io/scale-state``); "" = none."""
        return dict(self.labels).get(annotations.STATE, "")


@dataclass
class Translation:
    """The result of one translation: the desired table plus everything that was wrong."""

    table: ServiceTable = field(default_factory=dict)
    errors: list[ObjectError] = field(default_factory=list)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    pods: dict[ObjectKey, PodInfo] = field(default_factory=dict)

    @property
    def problems(self) -> list[ObjectError]:
        """Only the errors (what was dropped), without the warnings."""
        return [e for e in self.errors if e.severity is Severity.ERROR]


def translate(
    objects: Iterable[Any],
    node_name: str = "",
    *,
    node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
    proxy_name: str = "",
    scale_states: Mapping[ObjectKey, str] | None = None,
    external_ip_cidrs: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
    node_zone: str | None = None,
) -> Translation:
    """Translate Kubernetes objects into a service table; never raises on any input.

    ``node_name`` is the node this agent runs on; it only matters for ``Local`` traffic
    policies. ``proxy_name`` is the ``service.kubernetes.io/service-proxy-name`` value that
    means "us"; any other non-empty value means another proxy owns the service.
    ``scale_states`` maps pods (namespace, name) to their scale-to-zero state when the caller
    knows it without Pod objects in ``objects`` (the change tracker keeps them; the node's own
    scaler knows its pods before the label round trip); it wins over a Pod's label.
    ``external_ip_cidrs``, when given, are the only ranges ``spec.externalIPs`` may come from
    (any user who can create a Service can name any address there: CVE-2020-8554); ``None``
    admits every address, as kube-proxy does.
    ``node_zone`` is this node's zone label for topology-aware routing ("" = none); ``None``
    reads it from this node's Node among ``objects``.
    """
    return _Translator(node_name, node_port_range, proxy_name, scale_states, external_ip_cidrs,
                       node_zone).run(objects)


# --- internal records ------------------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def created(body: Mapping[str, Any]) -> str:
    """An object's creationTimestamp as text (RFC 3339 UTC sorts as text); "~" sorts after every
    date (a file's objects have none). Who was first to claim a frontend (here and changes.py)."""
    meta = body.get("metadata")
    value = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    return value if isinstance(value, str) and value else "~"


@dataclass
class _Object:
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]
    ref: ObjectRef


@dataclass
class _Port:
    index: int
    name: str
    protocol: Protocol
    port: int
    node_port: int | None


@dataclass
class _Service:
    obj: _Object
    fields: Fields
    type: str
    cluster_ips: list[tuple[IPAddress, str]]  # (ip, field path it came from)
    families: list[str]
    ports: list[_Port]
    external_ips: list[tuple[IPAddress, str]]
    lb_ips: list[tuple[IPAddress, str]]
    external_policy: str
    internal_policy: str
    publish_not_ready: bool
    affinity_timeout: int  # seconds, 0 = no ClientIP affinity
    health_check_node_port: int  # 0 = none, or not externalTrafficPolicy: Local
    topology: str = ""  # "" = all endpoints; "zone" / "node": follow the slices' hints
    source_ranges: tuple[IPNetwork, ...] = ()  # for LB IPs only


# (port name, protocol, family) -> that service port's endpoints of that family
_EndpointMap = dict[tuple[str, Protocol, str], EndpointSet]


class _Translator:
    def __init__(self, node_name: str, node_port_range: tuple[int, int], proxy_name: str,
                 scale_states: Mapping[ObjectKey, str] | None = None,
                 external_ip_cidrs: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
                 node_zone: str | None = None) -> None:
        self.node_name = node_name if isinstance(node_name, str) else ""
        self.given_zone = node_zone
        self.zone = ""
        self.external_ip_cidrs = None if external_ip_cidrs is None else tuple(external_ip_cidrs)
        self.node_port_range = node_port_range
        self.proxy_name = proxy_name
        self.given_states = scale_states or {}
        self.states: dict[ObjectKey, str] = {}  # pod -> scale-to-zero state, filled after the Pods
        self.out = Translation()

    # -- driver ---------------------------------------------------------------------------------

    def run(self, objects: Iterable[Any]) -> Translation:
        by_key: dict[tuple[str, str, str], _Object] = {}
        try:
            items = list(objects) if objects is not None else []
        except Exception as e:  # a generator from a source that failed half-way
            self._internal(ObjectRef("input"), e)
            items = []
        for i, raw in enumerate(items):
            self._collect(raw, f"#{i}", 0, by_key)

        kinds: dict[str, list[_Object]] = {}
        for obj in by_key.values():
            kinds.setdefault(obj.kind, []).append(obj)
        for obj in kinds.get("Node", []):
            self._guarded(obj.ref, self._node, obj)
        for obj in kinds.get("Pod", []):
            self._guarded(obj.ref, self._pod, obj)
        if self.given_zone is not None:
            self.zone = self.given_zone
        elif self.node_name in self.out.nodes:
            self.zone = node_zone(self.out.nodes[self.node_name])
        self.states = {key: pod.scale_state for key, pod in self.out.pods.items() if pod.scale_state}
        self.states.update(self.given_states)

        services: dict[ObjectKey, _Service | None] = {}
        for obj in sorted(kinds.get("Service", []), key=lambda o: (o.namespace, o.name)):
            # None = known but programs nothing (headless, another proxy's, invalid): slices for
            # it are expected and not an error.
            services[(obj.namespace, obj.name)] = self._guarded(obj.ref, self._service, obj)

        endpoints: dict[ObjectKey, _EndpointMap] = {}
        for obj in sorted(kinds.get("EndpointSlice", []), key=lambda o: (o.namespace, o.name)):
            self._guarded(obj.ref, self._slice, obj, services, endpoints)

        # Who gets a contested address:port: what the cluster allocated before any user-set
        # externalIP, then the older Service (the one that had it first), then the name.
        claimed: dict[tuple[IPAddress, int, Protocol], ServicePortName] = {}
        ordered = sorted((key for key, svc in services.items() if svc is not None),
                         key=lambda k: (created(services[k].obj.body), k))  # type: ignore[union-attr]
        for user_set in (False, True):
            for key in ordered:
                svc = services[key]
                assert svc is not None
                self._guarded(svc.obj.ref, self._program, svc, endpoints.get(key, {}), claimed, user_set)
        return self.out

    def _guarded(self, ref: ObjectRef, fn: Any, *args: Any) -> Any:
        """Run one object's step so that a bug in it costs that object, not the whole table."""
        try:
            return fn(*args)
        except Exception as e:
            self._internal(ref, e)
            return None

    def _internal(self, ref: ObjectRef, e: Exception) -> None:
        self.out.errors.append(
            ObjectError(ref, "", f"internal error while translating: {type(e).__name__}: {e}")
        )

    def _error(self, ref: ObjectRef, path: str, msg: str, sev: Severity = Severity.ERROR) -> None:
        self.out.errors.append(ObjectError(ref, path, msg, sev))

    # -- pass 1: flatten Lists, identify, drop duplicates -----------------------------------------

    def _collect(self, raw: Any, location: str, depth: int, by_key: dict[Any, _Object]) -> None:
        if raw is None:
            return  # an empty YAML document ("---" followed by nothing) is not a mistake
        if not isinstance(raw, Mapping):
            self._error(ObjectRef("", location=location), "", f"must be a mapping, got {describe(raw)}")
            return
        kind = raw.get("kind")
        meta = raw.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
        ref = ObjectRef(kind if isinstance(kind, str) else "", namespace, name, location)
        if not isinstance(kind, str) or not kind:
            self._error(ref, "kind", f"must be a non-empty string, got {describe(kind)}")
            return
        if kind not in API_VERSIONS:
            known = ", ".join(sorted(API_VERSIONS))
            self._error(ref, "kind", f"unknown kind {describe(kind)} (known: {known}); object ignored")
            return
        api_version = raw.get("apiVersion")
        # Missing is accepted: items of an API list response come without apiVersion and kind.
        if api_version is not None and api_version not in API_VERSIONS[kind]:
            self._error(
                ref,
                "apiVersion",
                f"must be {' or '.join(API_VERSIONS[kind])} for kind {kind}, got {describe(api_version)}",
            )
            return
        if kind == "List":
            if depth >= MAX_LIST_DEPTH:
                self._error(ref, "items", f"Lists nested deeper than {MAX_LIST_DEPTH} levels are ignored")
                return
            items = raw.get("items")
            if items is None:
                return
            if not isinstance(items, list | tuple):
                self._error(ref, "items", f"must be a list, got {describe(items)}")
                return
            for j, item in enumerate(items):
                self._collect(item, f"{location}.items[{j}]", depth + 1, by_key)
            return

        fields = Fields(ref, self.out.errors)
        if "metadata" in raw and not isinstance(raw.get("metadata"), Mapping):
            fields.error("metadata", f"must be a mapping, got {describe(raw.get('metadata'))}")
            return
        if not name:
            fields.error("metadata.name", f"must be a non-empty string, got {describe(meta.get('name'))}")
            return
        if kind in CLUSTER_SCOPED:
            namespace = ""
        else:
            if meta.get("namespace") is not None and not isinstance(meta.get("namespace"), str):
                fields.error("metadata.namespace", f"must be a string, got {describe(meta.get('namespace'))}")
                return
            namespace = namespace or "default"  # what kubectl apply would do
        ref = ObjectRef(kind, namespace, name, location)
        key = (kind, namespace, name)
        if key in by_key:
            self._error(
                ref,
                "",
                f"defined more than once (first at {by_key[key].ref.location}); the last one is used",
                Severity.WARNING,
            )
            del by_key[key]  # re-insert so that iteration order follows the winning copy
        by_key[key] = _Object(kind, namespace, name, dict(raw), ref)

    # -- Nodes and Pods -------------------------------------------------------------------------

    def _node(self, obj: _Object) -> None:
        f = Fields(obj.ref, self.out.errors)
        internal: list[IPAddress] = []
        external: list[IPAddress] = []
        status = f.mapping(obj.body, "status", "")
        for i, addr in enumerate(f.sequence(status, "addresses", "status")):
            path = f"status.addresses[{i}]"
            if not isinstance(addr, Mapping):
                f.error(path, f"must be a mapping, got {describe(addr)}")
                continue
            typ = f.string(addr, "type", path)
            if typ not in ("InternalIP", "ExternalIP"):
                continue  # Hostname, InternalDNS, ExternalDNS: not addresses we can match on
            ip, why = parse_ip(addr.get("address"))
            if ip is None:
                f.error(join(path, "address"), why)
                continue
            target = internal if typ == "InternalIP" else external
            if ip not in target:
                target.append(ip)
        spec = f.mapping(obj.body, "spec", "")
        cidrs_raw: list[tuple[Any, str]] = [
            (c, f"spec.podCIDRs[{i}]") for i, c in enumerate(f.sequence(spec, "podCIDRs", "spec"))
        ]
        if not cidrs_raw and spec.get("podCIDR") is not None:
            cidrs_raw = [(spec.get("podCIDR"), "spec.podCIDR")]
        cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw, path in cidrs_raw:
            try:
                if not isinstance(raw, str):
                    raise ValueError
                net = ipaddress.ip_network(raw)
            except ValueError:
                f.error(path, f"is not a valid CIDR: {describe(raw)}")
                continue
            if net not in cidrs:
                cidrs.append(net)
        labels = f.string_map(f.mapping(obj.body, "metadata", ""), "labels", "metadata")
        self.out.nodes[obj.name] = NodeInfo(
            obj.name, tuple(internal), tuple(external), tuple(cidrs), tuple(sorted(labels.items()))
        )

    def _pod(self, obj: _Object) -> None:
        f = Fields(obj.ref, self.out.errors)
        meta = f.mapping(obj.body, "metadata", "")
        spec = f.mapping(obj.body, "spec", "")
        status = f.mapping(obj.body, "status", "")
        ips: list[IPAddress] = []
        raw_ips: list[tuple[Any, str]] = []
        for i, entry in enumerate(f.sequence(status, "podIPs", "status")):
            if isinstance(entry, Mapping):
                raw_ips.append((entry.get("ip"), f"status.podIPs[{i}].ip"))
            else:
                f.error(f"status.podIPs[{i}]", f"must be a mapping, got {describe(entry)}")
        if status.get("podIP") is not None:
            raw_ips.insert(0, (status.get("podIP"), "status.podIP"))
        for raw, path in raw_ips:
            ip, why = parse_ip(raw)
            if ip is None:
                f.error(path, why)
            elif ip not in ips:
                ips.append(ip)
        self.out.pods[(obj.namespace, obj.name)] = PodInfo(
            namespace=obj.namespace,
            name=obj.name,
            node_name=f.string(spec, "nodeName", "spec"),
            ips=tuple(ips),
            phase=f.string(status, "phase", "status"),
            terminating=meta.get("deletionTimestamp") is not None,
            labels=tuple(sorted(f.string_map(meta, "labels", "metadata").items())),
            annotations=tuple(sorted(f.string_map(meta, "annotations", "metadata").items())),
        )

    # -- Services -------------------------------------------------------------------------------

    def _service(self, obj: _Object) -> _Service | None:
        f = Fields(obj.ref, self.out.errors)
        meta = f.mapping(obj.body, "metadata", "")
        labels = f.string_map(meta, "labels", "metadata")
        if HEADLESS_LABEL in labels:
            return None
        proxy = labels.get(SERVICE_PROXY_NAME_LABEL, "")
        if proxy and proxy != self.proxy_name:
            return None
        if not isinstance(obj.body.get("spec"), Mapping):
            f.error("spec", f"must be a mapping, got {describe(obj.body.get('spec'))}; service ignored")
            return None
        spec = dict(obj.body["spec"])
        svc_type = f.string(spec, "type", "spec", "ClusterIP")
        if svc_type == "ExternalName":
            return None
        if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
            f.error("spec.type", f"unknown service type {describe(svc_type)}; service ignored")
            return None

        cluster_ips = self._cluster_ips(f, spec)
        if cluster_ips is None:
            return None  # headless, or invalid (already reported)
        families = [ip_family(ip) for ip, _ in cluster_ips]
        if not families:
            f.warn(
                "spec.clusterIP",
                "missing: the service has no ClusterIP frontend "
                "(a file source does not allocate ClusterIPs; set one)",
            )
            for i, fam in enumerate(f.sequence(spec, "ipFamilies", "spec")):
                if fam not in FAMILIES:
                    f.error(f"spec.ipFamilies[{i}]", f"must be IPv4 or IPv6, got {describe(fam)}")
                    return None
                if fam not in families:
                    families.append(fam)
            families = families or ["IPv4"]

        external_policy = self._policy(f, spec, "externalTrafficPolicy")
        internal_policy = self._policy(f, spec, "internalTrafficPolicy")
        affinity = f.string(spec, "sessionAffinity", "spec", "None")
        if affinity not in ("None", "ClientIP"):
            f.error("spec.sessionAffinity", f"must be None or ClientIP, got {describe(affinity)}")
        affinity_cfg = f.mapping(spec, "sessionAffinityConfig", "spec")
        client_ip = f.mapping(affinity_cfg, "clientIP", "spec.sessionAffinityConfig")
        timeout = f.integer(
            client_ip,
            "timeoutSeconds",
            "spec.sessionAffinityConfig.clientIP",
            1,
            MAX_AFFINITY_TIMEOUT_SECONDS,
        )
        health_port = f.integer(spec, "healthCheckNodePort", "spec", 0, 65535)
        publish = f.boolean(spec, "publishNotReadyAddresses", "spec", False)
        if f.failed:
            f.error("", "service ignored because of the errors above")
            return None

        affinity_timeout = 0
        if affinity == "ClientIP":
            # validated to 1..MAX above; the clamp keeps a ServiceEntry valid whatever changes there
            affinity_timeout = max(1, min(timeout or DEFAULT_AFFINITY_TIMEOUT_SECONDS, MAX_AFFINITY_TIMEOUT_SECONDS))
        # healthCheckNodePort only means something under externalTrafficPolicy: Local (the API
        # server allocates it only then); a file source may carry a stale one, which serves nothing.
        health_check_node_port = (health_port or 0) if external_policy == "Local" else 0

        ports = self._ports(f, spec, svc_type)
        external_ips = self._addresses(
            f,
            [(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(f.sequence(spec, "externalIPs", "spec"))],
        )
        if self.external_ip_cidrs is not None:
            allowed = self.external_ip_cidrs
            for ip, path in [a for a in external_ips if not any(a[0] in net for net in allowed)]:
                ranges = ", ".join(str(n) for n in allowed) or "none"
                f.errors.append(ObjectError(f.ref, path, f"{ip} is outside the allowed externalIP CIDRs "
                                                         f"({ranges}); address ignored"))
                external_ips.remove((ip, path))
        lb_ips: list[tuple[IPAddress, str]] = []
        if svc_type == "LoadBalancer":
            status = f.mapping(obj.body, "status", "")
            lb = f.mapping(status, "loadBalancer", "status")
            raw: list[tuple[Any, str]] = []
            for i, ing in enumerate(f.sequence(lb, "ingress", "status.loadBalancer")):
                path = f"status.loadBalancer.ingress[{i}]"
                if not isinstance(ing, Mapping):
                    f.error(path, f"must be a mapping, got {describe(ing)}")
                elif ing.get("ip") is not None and ing.get("ipMode") != "Proxy":
                    raw.append((ing.get("ip"), join(path, "ip")))
            lb_ips = self._addresses(f, raw)
        return _Service(
            obj=obj,
            fields=f,
            type=svc_type,
            cluster_ips=cluster_ips,
            families=families,
            ports=ports,
            external_ips=external_ips,
            lb_ips=lb_ips,
            external_policy=external_policy,
            internal_policy=internal_policy,
            publish_not_ready=bool(publish),
            affinity_timeout=affinity_timeout,
            health_check_node_port=health_check_node_port,
            topology=self._topology(f, meta, spec),
            source_ranges=self._source_ranges(f, spec, lb_ips) if svc_type == "LoadBalancer" else (),
        )

    @staticmethod
    def _source_ranges(f: Fields, spec: dict[str, Any],
                       lb_ips: list[tuple[IPAddress, str]]) -> tuple[IPNetwork, ...]:
        """spec.loadBalancerSourceRanges, as kube-proxy reads them (surrounding spaces allowed).
        A bad entry is an error and drops only itself; the others still restrict (never open)."""
        out: list[IPNetwork] = []
        raw = f.sequence(spec, "loadBalancerSourceRanges", "spec")
        for i, item in enumerate(raw):
            path = f"spec.loadBalancerSourceRanges[{i}]"
            try:
                if not isinstance(item, str):
                    raise ValueError
                net = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                f.error(path, f"is not a CIDR (like 203.0.113.0/24): {describe(item)}; range ignored")
                continue
            if net not in out:
                out.append(net)
        if raw and not out:
            # every entry was bad: still restricted (to nobody) rather than open to everyone
            f.error("spec.loadBalancerSourceRanges", "no valid range: the LoadBalancer IPs refuse every source")
            return (ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128"))
        families = {n.version for n in out}
        for ip, path in lb_ips:
            if out and ip.version not in families:
                f.warn(path, f"no IPv{ip.version} range in spec.loadBalancerSourceRanges: every IPv{ip.version} "
                             "source is refused")
        return tuple(out)

    @staticmethod
    def _topology(f: Fields, meta: dict[str, Any], spec: dict[str, Any]) -> str:
        """Whether the Service asked for topology-aware routing, and at which level: "" (no),
        "zone", or "node". spec.trafficDistribution first, then the topology-mode annotation,
        then the older topology-aware-hints one (kube-proxy reads the same two)."""
        wanted = spec.get("trafficDistribution")
        if wanted is not None:
            if wanted in TRAFFIC_DISTRIBUTIONS:
                return TRAFFIC_DISTRIBUTIONS[wanted]
            f.warn("spec.trafficDistribution", f"must be one of {', '.join(TRAFFIC_DISTRIBUTIONS)}, got "
                                               f"{describe(wanted)}; all endpoints are used")
        notes = f.string_map(meta, "annotations", "metadata")
        for key in (TOPOLOGY_MODE_ANNOTATION, TOPOLOGY_HINTS_ANNOTATION):
            value = notes.get(key, "")
            if not value:
                continue
            if value in ("Auto", "auto"):
                return "zone"
            if value not in ("Disabled", "disabled"):
                f.warn(f"metadata.annotations[{key}]",
                       f"must be Auto or Disabled, got {describe(value)}; all endpoints are used")
            return ""
        return ""

    def _cluster_ips(self, f: Fields, spec: dict[str, Any]) -> list[tuple[IPAddress, str]] | None:
        """The service's cluster IPs in order, [] when unset, None when headless or invalid."""
        single = spec.get("clusterIP")
        many = spec.get("clusterIPs")
        if single == "None" or (isinstance(many, list) and many[:1] == ["None"]):
            return None
        raw: list[tuple[Any, str]] = []
        if many is not None:
            if not isinstance(many, list | tuple):
                f.error("spec.clusterIPs", f"must be a list, got {describe(many)}; service ignored")
                return None
            raw = [(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(many)]
        if not raw and single not in (None, ""):
            raw = [(single, "spec.clusterIP")]
        out: list[tuple[IPAddress, str]] = []
        for value, path in raw:
            ip, why = parse_frontend_ip(value)
            if ip is None:
                f.error(path, f"{why}; service ignored")
                return None
            if any(ip_family(ip) == ip_family(o) for o, _ in out):
                f.error(path, f"a second {ip_family(ip)} address; service ignored")
                return None
            out.append((ip, path))
        if single not in (None, "") and out and single != str(out[0][0]):
            ip, why = parse_ip(single)
            if ip != out[0][0]:
                f.error(
                    "spec.clusterIP",
                    f"must equal spec.clusterIPs[0] ({out[0][0]}), got {describe(single)}; service ignored",
                )
                return None
        return out

    def _policy(self, f: Fields, spec: dict[str, Any], key: str) -> str:
        value = f.string(spec, key, "spec", "Cluster")
        if value not in ("Cluster", "Local"):
            f.error(f"spec.{key}", f"must be Cluster or Local, got {describe(value)}")
        return value

    def _addresses(self, f: Fields, raw: list[tuple[Any, str]]) -> list[tuple[IPAddress, str]]:
        """Extra VIPs (externalIPs, LB ingress): a bad one drops only itself."""
        out: list[tuple[IPAddress, str]] = []
        for value, path in raw:
            ip, why = parse_frontend_ip(value)
            if ip is None:
                f.errors.append(ObjectError(f.ref, path, f"{why}; address ignored"))
            elif ip not in [o for o, _ in out]:
                out.append((ip, path))
        return out

    def _ports(self, f: Fields, spec: dict[str, Any], svc_type: str) -> list[_Port]:
        ports: list[_Port] = []
        raw_ports = f.sequence(spec, "ports", "spec")
        if not raw_ports:
            f.errors.append(ObjectError(f.ref, "spec.ports", "no ports: the service has no frontends"))
        lo, hi = self.node_port_range
        names: dict[str, int] = {}
        numbers: dict[tuple[int, Protocol], int] = {}
        node_ports: dict[tuple[int, Protocol], int] = {}
        for i, raw in enumerate(raw_ports):
            path = f"spec.ports[{i}]"
            if not isinstance(raw, Mapping):
                self._port_error(f, path, f"must be a mapping, got {describe(raw)}")
                continue
            # A separate Fields per port: an error here drops this port, not the service.
            pf = Fields(f.ref, f.errors)
            name, protocol = _name_and_protocol(pf, raw, path)
            port = pf.integer(raw, "port", path, 1, 65535)
            if port is None and raw.get("port") is None:
                pf.error(join(path, "port"), "missing")
            node_port = None
            if svc_type in ("NodePort", "LoadBalancer") and raw.get("nodePort") not in (None, 0):
                node_port = pf.integer(raw, "nodePort", path, lo, hi)
            if pf.failed or protocol is None or port is None:
                self._port_error(f, path, "port ignored because of the errors above")
                continue
            if name in names:
                which = f"name {describe(name)}" if name else "no name"
                self._port_error(
                    f, join(path, "name"), f"{which} again (as spec.ports[{names[name]}]); port ignored"
                )
                continue
            if (port, protocol) in numbers:
                self._port_error(
                    f,
                    join(path, "port"),
                    f"{port}/{protocol.name} again (as spec.ports[{numbers[(port, protocol)]}]); "
                    "port ignored",
                )
                continue
            if node_port is not None and (node_port, protocol) in node_ports:
                self._port_error(
                    f,
                    join(path, "nodePort"),
                    f"{node_port}/{protocol.name} again (as "
                    f"spec.ports[{node_ports[(node_port, protocol)]}]); port ignored",
                )
                continue
            names[name] = i
            numbers[(port, protocol)] = i
            if node_port is not None:
                node_ports[(node_port, protocol)] = i
            ports.append(_Port(i, name, protocol, port, node_port))
        return ports

    @staticmethod
    def _port_error(f: Fields, path: str, message: str) -> None:
        # Recorded without setting f.failed: the rest of the service stays.
        f.errors.append(ObjectError(f.ref, path, message))

    # -- EndpointSlices -------------------------------------------------------------------------

    def _slice(
        self,
        obj: _Object,
        services: dict[ObjectKey, _Service | None],
        endpoints: dict[ObjectKey, _EndpointMap],
    ) -> None:
        f = Fields(obj.ref, self.out.errors)
        meta = f.mapping(obj.body, "metadata", "")
        labels = f.string_map(meta, "labels", "metadata")
        label_path = join("metadata.labels", SERVICE_NAME_LABEL)
        service = labels.get(SERVICE_NAME_LABEL, "")
        if not service:
            f.error(label_path, "missing: the slice belongs to no service; slice ignored")
            return
        key = (obj.namespace, service)
        if key not in services:
            f.warn(label_path, f"Service {obj.namespace}/{service} not found; slice ignored")
            return
        family = obj.body.get("addressType")
        if family == "FQDN":
            return  # not proxyable; kube-proxy ignores them too
        if family not in FAMILIES:
            f.error("addressType", f"must be IPv4, IPv6 or FQDN, got {describe(family)}; slice ignored")
            return
        if services[key] is None:
            return  # headless / another proxy's / invalid: nothing to join, nothing wrong

        ports: list[tuple[str, Protocol, int]] = []
        for i, raw in enumerate(f.sequence(obj.body, "ports", "")):
            path = f"ports[{i}]"
            if not isinstance(raw, Mapping):
                f.error(path, f"must be a mapping, got {describe(raw)}")
                continue
            pf = Fields(f.ref, f.errors)
            name, protocol = _name_and_protocol(pf, raw, path)
            number = pf.integer(raw, "port", path, 1, 65535)
            if number is None or protocol is None or pf.failed:
                continue  # a nil port means "all ports" for non-proxyable uses: nothing for us
            ports.append((name, protocol, number))

        eps: list[tuple[IPAddress, str, bool, bool, bool, ObjectKey, frozenset[str], frozenset[str]]] = []
        for i, raw in enumerate(f.sequence(obj.body, "endpoints", "")):
            path = f"endpoints[{i}]"
            if not isinstance(raw, Mapping):
                f.error(path, f"must be a mapping, got {describe(raw)}; endpoint ignored")
                continue
            ef = Fields(f.ref, f.errors)
            addresses = ef.sequence(raw, "addresses", path)
            if not addresses and not ef.failed:
                ef.error(join(path, "addresses"), "missing or empty; endpoint ignored")
                continue
            if ef.failed:
                continue
            # Consumers use the first address; the rest are for other kinds of consumers.
            ip, why = parse_endpoint_ip(addresses[0], family)
            if ip is None:
                ef.error(f"{path}.addresses[0]", f"{why}; endpoint ignored")
                continue
            cond = ef.mapping(raw, "conditions", path)
            cpath = join(path, "conditions")
            ready = ef.boolean(cond, "ready", cpath)
            serving = ef.boolean(cond, "serving", cpath)
            terminating = ef.boolean(cond, "terminating", cpath)
            node = ef.string(raw, "nodeName", path)
            if not node and obj.body.get("apiVersion") == ENDPOINTSLICE_V1BETA1:
                # 1.20 fills nodeName only with the EndpointSliceNodeName gate on; topology always.
                node = ef.string_map(raw, "topology", path).get(HOSTNAME_TOPOLOGY_KEY, "")
            if ef.failed:
                ef.errors.append(ObjectError(f.ref, path, "endpoint ignored because of the errors above"))
                continue
            # API docs: nil ready and nil serving mean true, nil terminating means false.
            pod = self._target_pod(f, raw.get("targetRef"), obj.namespace, join(path, "targetRef"))
            zones, nodes = self._hints(f, raw, path)
            eps.append((ip, node, ready is not False, serving is not False, terminating is True, pod, zones, nodes))

        merged = endpoints.setdefault(key, {})
        for name, protocol, number in ports:
            bucket = merged.setdefault((name, protocol, family), {})
            for ip, node, ready, serving, terminating, pod, zones, nodes in eps:
                merge(bucket, Endpoint(ip, number, node, ready, serving, terminating, pod, zones, nodes))

    @staticmethod
    def _hints(f: Fields, raw: Mapping[str, Any], path: str) -> tuple[frozenset[str], frozenset[str]]:
        """hints.forZones and hints.forNodes names; a malformed hint is a warning and counts as
        no hint (so the service falls back to all endpoints, as with a missing one)."""
        hints = raw.get("hints")
        if hints is None:
            return frozenset(), frozenset()
        hpath = join(path, "hints")
        if not isinstance(hints, Mapping):
            f.warn(hpath, f"must be a mapping, got {describe(hints)}; hints ignored")
            return frozenset(), frozenset()
        out = []
        for key in ("forZones", "forNodes"):
            names: set[str] = set()
            items = hints.get(key)
            if items is not None and not isinstance(items, list):
                f.warn(join(hpath, key), f"must be a list, got {describe(items)}; hints ignored")
                items = None
            for i, item in enumerate(items or ()):
                name = item.get("name") if isinstance(item, Mapping) else None
                if not isinstance(name, str) or not name:
                    f.warn(f"{hpath}.{key}[{i}]", "needs a name; hints ignored")
                    names = set()
                    break
                names.add(name)
            out.append(frozenset(names))
        return out[0], out[1]

    @staticmethod
    def _target_pod(f: Fields, ref: Any, namespace: str, path: str) -> ObjectKey:
        """The Pod an endpoint points at, for its scale-to-zero state; ("", "") when none.

        Only a warning when malformed: the endpoint itself is fine, it just cannot be matched
        to a pod's state (and so counts as running).
        """
        if ref is None:
            return ("", "")
        if not isinstance(ref, Mapping):
            f.warn(path, f"must be a mapping, got {describe(ref)}; no pod state for this endpoint")
            return ("", "")
        if ref.get("kind") != "Pod":
            return ("", "")
        name, ns = ref.get("name"), ref.get("namespace")
        if not isinstance(name, str) or not name or not isinstance(ns, str | None):
            f.warn(path, "a Pod reference needs a name (and a string namespace); no pod state for this endpoint")
            return ("", "")
        return (ns or namespace, name)

    # -- the table ------------------------------------------------------------------------------

    def _program(
        self,
        svc: _Service,
        endpoints: _EndpointMap,
        claimed: dict[tuple[IPAddress, int, Protocol], ServicePortName],
        user_set: bool = False,
    ) -> None:
        """The frontends of one Service: those the cluster allocated, or (``user_set``) its
        externalIPs, which come second so that they can never take an allocated address."""
        obj = svc.obj
        for p in svc.ports:
            spn = ServicePortName(obj.namespace, obj.name, p.name)
            frontends: list[tuple[Frontend, str]] = []
            ppath = f"spec.ports[{p.index}]"
            for ip, path in svc.cluster_ips:
                frontends.append((Frontend(ip, p.port, p.protocol, FrontendKind.CLUSTER_IP), path))
            if p.node_port is not None:
                for fam in svc.families:
                    fe = Frontend(UNSPECIFIED[fam], p.node_port, p.protocol, FrontendKind.NODE_PORT)
                    frontends.append((fe, join(ppath, "nodePort")))
            for ip, path in svc.external_ips:
                frontends.append((Frontend(ip, p.port, p.protocol, FrontendKind.EXTERNAL_IP), path))
            for ip, path in svc.lb_ips:
                frontends.append((Frontend(ip, p.port, p.protocol, FrontendKind.LOAD_BALANCER), path))

            for fe, path in frontends:
                if (fe.kind is FrontendKind.EXTERNAL_IP) is not user_set:
                    continue
                # The datapath keys by address:port/protocol, so two kinds on one address clash.
                slot = (fe.address, fe.port, fe.protocol)
                owner = claimed.get(slot)
                if owner is not None:
                    same = (owner.namespace, owner.name) == (obj.namespace, obj.name)
                    whose = (
                        f"port {owner.port or '(unnamed)'} of this service" if same else f"Service {owner}"
                    )
                    self._error(
                        obj.ref,
                        path,
                        f"frontend {fe} ({fe.kind.value}) is already used by {whose}; frontend ignored",
                    )
                    continue
                claimed[slot] = spn
                family = ip_family(fe.address)
                bucket = endpoints.get((p.name, p.protocol, family), {})
                backends = self._choose(svc, fe.kind, list(bucket.values()))
                internal = None
                local_only = fe.kind in EXTERNAL_KINDS and svc.external_policy == "Local"
                if local_only and self.node_name:
                    # kube-proxy: the node's own processes and its pods reaching an external
                    # address are in-cluster clients; they get the internal policy's endpoints
                    internal = self._choose(svc, FrontendKind.CLUSTER_IP, list(bucket.values()))
                self.out.table[fe] = ServiceEntry(
                    fe, spn, backends, internal,
                    affinity_timeout=svc.affinity_timeout,
                    local_only=local_only,
                    health_check_node_port=svc.health_check_node_port,
                    source_ranges=svc.source_ranges if fe.kind is FrontendKind.LOAD_BALANCER else (),
                )

    def _choose(self, svc: _Service, kind: FrontendKind, eps: list[Endpoint]) -> tuple[Backend, ...]:
        """The frontend kind picks the traffic policy; controlplane.endpoints does the rest."""
        policy = svc.external_policy if kind in EXTERNAL_KINDS else svc.internal_policy
        return choose(eps, local=policy == "Local", node_name=self.node_name,
                      publish_not_ready=svc.publish_not_ready, states=self.states,
                      topology=svc.topology, zone=self.zone)


def node_zone(node: NodeInfo) -> str:
    """A Node's topology.kubernetes.io/zone label ("" without one)."""
    return dict(node.labels).get(ZONE_LABEL, "")


def _name_and_protocol(pf: Fields, raw: Mapping[str, Any], path: str) -> tuple[str, Protocol | None]:
    """A port's name and protocol, as Service and EndpointSlice ports both spell them."""
    name = pf.string(raw, "name", path)
    proto_name = pf.string(raw, "protocol", path, "TCP")
    protocol = PROTOCOLS.get(proto_name)
    if protocol is None and not pf.failed:
        pf.error(join(path, "protocol"), f"must be TCP, UDP or SCTP, got {describe(proto_name)}")
    return name, protocol
