"""A small Kubernetes cluster DNS for the test bed. **Not part of the product.**

zeroproxy is a kube-proxy replacement; it ships no DNS server and users keep CoreDNS. The test
bed's kubeadm cluster needs *some* cluster DNS (15 of the e2e Services tests reach Services by
name or look ExternalNames up), and Debian packages no CoreDNS: bookworm, trixie, sid and
experimental have no coredns source package, and sid has only some of its Go dependencies
(golang-github-coredns-caddy-dev, miekg/dns, dnstap, ...; not infobloxopen/go-trees, zipkin-go).
So the bed runs this instead: a DNS server on dnslib that watches Services and EndpointSlices
with the official ``kubernetes`` client and answers the records of Kubernetes' DNS
specification (kubernetes/dns, docs/specification.md):

- ``dns-version.<zone>`` TXT: the schema version;
- ``<svc>.<ns>.svc.<zone>`` A/AAAA: the ClusterIPs, or for a headless Service every ready
  endpoint (NXDOMAIN when it has none); ``<host>.<svc>.<ns>.svc.<zone>`` per ready endpoint of a
  headless Service, ``<host>`` being the endpoint's ``hostname`` or its address with dashes;
- ``_<port>._<proto>.<svc>.<ns>.svc.<zone>`` SRV for named ports (one per ready endpoint of a
  headless Service), with the targets' addresses in the additional section;
- ExternalName Services as CNAME. Nothing outside the zone is ever resolved (the bed has no
  network); a target inside the zone is followed, as a resolver would have to ask us anyway;
- PTR for ClusterIPs and for ready endpoints of headless Services;
- the deprecated ``a-b-c-d.<ns>.pod.<zone>`` A records the specification still requires.

Names in the zone that do not exist get NXDOMAIN, names that exist without the asked type get
an empty NOERROR, both with the zone's SOA in the authority section, straight from in-memory
dicts: pods' ``ndots:5`` search path makes most queries ones for names that do not exist.
Names outside the zone (and reverse names of addresses we do not know) get REFUSED at once;
there is no upstream to forward to. Until the first list of both kinds has arrived every
query gets SERVFAIL, so that a client retries rather than caching a wrong NXDOMAIN.

EndpointSlices are read as ``discovery.k8s.io/v1`` where the server serves it and as
``v1beta1`` otherwise (Kubernetes 1.20, which the bed runs, serves only v1beta1), found by API
discovery. The watchers follow the informer protocol: list, watch from the list's
resourceVersion, relist on 410 Gone, retry anything else with a capped exponential backoff.

:func:`publish_kube_dns` writes the selector-less ``kube-system/kube-dns`` Service at the
kubeadm ``clusterDNS`` address with Endpoints and an EndpointSlice pointing at this server, so
that pods reach it through the proxy under test. Run it as::

    python -m testbed.clusterdns --kubeconfig K --listen 10.0.0.2:53 --domain cluster.local \\
        [--publish 10.96.0.10]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

log = logging.getLogger("testbed.clusterdns")

SCHEMA_VERSION = "1.0.1"  # of the Kubernetes DNS specification that these records follow
DEFAULT_TTL = 5  # seconds, as CoreDNS's kubernetes plugin: Services change often in tests
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "clusterdns.zeroproxy.io"
TOLERATE_UNREADY = "service.alpha.kubernetes.io/tolerate-unready-endpoints"
MAX_UDP_PAYLOAD = 1232  # the EDNS size DNS flag day 2020 settled on: no IP fragmentation
CNAME_CHAIN_LIMIT = 8
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may keep a connection open without asking
LIST_PAGE_SIZE = 500
WATCH_TIMEOUT_RANGE = (240, 300)  # seconds; randomised so the two watches do not renew together
CONNECT_TIMEOUT = 10.0
READ_SLACK = 30.0
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClusterDNSError(RuntimeError):
    """Bad input (the message names the object and field) or a server that cannot start."""


# --- what the records are built from -----------------------------------------------------------

@dataclass(frozen=True)
class Port:
    name: str  # lower case; "" for an unnamed port (no SRV record)
    protocol: str  # lower case: tcp, udp, sctp
    port: int


@dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    kind: str  # "ClusterIP" (any Service with cluster IPs), "Headless" or "ExternalName"
    cluster_ips: tuple[Address, ...]
    external_name: str  # lower case, no trailing dot; ExternalName only
    ports: tuple[Port, ...]
    publish_not_ready: bool  # spec.publishNotReadyAddresses or the old tolerate-unready annotation


@dataclass(frozen=True)
class EndpointInfo:
    addresses: tuple[Address, ...]
    ready: bool
    hostname: str  # lower case; "" when the endpoint has none


@dataclass(frozen=True)
class SliceInfo:
    namespace: str
    service: str
    endpoints: tuple[EndpointInfo, ...]
    ports: tuple[Port, ...]


def _where(obj: dict[str, Any], kind: str) -> str:
    meta = obj.get("metadata") or {}
    return f"{kind} {meta.get('namespace', '')}/{meta.get('name', '?')}"


def _address(value: Any, what: str) -> Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ClusterDNSError(f"{what}: {value!r} is not an IP address") from None


def _ports(items: Any, what: str) -> tuple[Port, ...]:
    out = []
    for i, p in enumerate(items or ()):
        number = p.get("port")
        if number is None:  # an EndpointSlice port without a number means "all ports"
            continue
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ClusterDNSError(f"{what}[{i}].port: {number!r} is not a port number")
        out.append(Port(str(p.get("name") or "").lower(), str(p.get("protocol") or "TCP").lower(), number))
    return tuple(out)


def parse_service(obj: dict[str, Any]) -> ServiceInfo:
    """The DNS view of a core/v1 Service dict (camelCase, as the API sends it)."""
    where = _where(obj, "Service")
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    if not ns or not name:
        raise ClusterDNSError(f"{where} metadata: namespace and name are required")
    annotations = meta.get("annotations") or {}
    publish = bool(spec.get("publishNotReadyAddresses")) or annotations.get(TOLERATE_UNREADY) == "true"
    ports = _ports(spec.get("ports"), f"{where} spec.ports")
    if spec.get("type") == "ExternalName":
        target = str(spec.get("externalName") or "").strip().rstrip(".").lower()
        if not target:
            raise ClusterDNSError(f"{where} spec.externalName: required for type ExternalName")
        return ServiceInfo(ns, name.lower(), "ExternalName", (), target, ports, publish)
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not ips or ips[0] == "None":
        return ServiceInfo(ns, name.lower(), "Headless", (), "", ports, publish)
    field_name = "spec.clusterIPs" if spec.get("clusterIPs") else "spec.clusterIP"
    addresses = tuple(_address(ip, f"{where} {field_name}[{i}]") for i, ip in enumerate(ips))
    return ServiceInfo(ns, name.lower(), "ClusterIP", addresses, "", ports, publish)


def parse_endpointslice(obj: dict[str, Any]) -> SliceInfo | None:
    """The DNS view of a discovery.k8s.io v1 or v1beta1 EndpointSlice (the fields used here are
    the same in both); None for a slice that belongs to no Service or carries FQDNs."""
    where = _where(obj, "EndpointSlice")
    meta = obj.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    if not service or address_type not in ("IPv4", "IPv6"):
        return None
    endpoints = []
    for i, ep in enumerate(obj.get("endpoints") or ()):
        addresses = tuple(_address(a, f"{where} endpoints[{i}].addresses[{j}]")
                          for j, a in enumerate(ep.get("addresses") or ()))
        ready = (ep.get("conditions") or {}).get("ready")
        endpoints.append(EndpointInfo(addresses, ready is not False,  # unset means ready (API docs)
                                      str(ep.get("hostname") or "").lower()))
    return SliceInfo(str(meta.get("namespace") or ""), str(service).lower(), tuple(endpoints),
                     _ports(obj.get("ports"), f"{where} ports"))


def dashed(address: Address) -> str:
    """An endpoint's hostname when it has none of its own: its address with dashes."""
    return str(address).replace(".", "-").replace(":", "-")


# --- the cluster state the watchers keep --------------------------------------------------------

class ClusterState:
    """Services and EndpointSlices by key, written by the watcher threads, read by queries.

    Objects are stored already parsed (frozen dataclasses), so a query only takes the lock
    for a few dict reads.
    """

    KINDS = ("Service", "EndpointSlice")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: dict[tuple[str, str], ServiceInfo] = {}
        self.slices: dict[tuple[str, str], SliceInfo] = {}
        self.slices_by_service: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        self.services_per_namespace: dict[str, int] = defaultdict(int)
        self.synced: set[str] = set()
        self.generation = 0
        self.synced_event = threading.Event()

    def replace(self, kind: str, objects: Iterable[dict[str, Any]]) -> None:
        """A complete list: what is not in it is gone (a relist also catches missed deletes)."""
        parsed = [(self._key(o), self._parse(kind, o)) for o in objects]
        with self.lock:
            for key in list(self.services if kind == "Service" else self.slices):
                self._remove(kind, key)
            for key, info in parsed:
                if info is not None:
                    self._put(kind, key, info)
            self.synced.add(kind)
            self.generation += 1
            if self.synced.issuperset(self.KINDS):
                self.synced_event.set()

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        key = self._key(obj)
        info = None if event == "DELETED" else self._parse(kind, obj)
        with self.lock:
            self._remove(kind, key)
            if info is not None:
                self._put(kind, key, info)
            self.generation += 1

    @staticmethod
    def _key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace") or ""), str(meta.get("name") or "").lower()

    @staticmethod
    def _parse(kind: str, obj: dict[str, Any]) -> ServiceInfo | SliceInfo | None:
        try:
            return parse_service(obj) if kind == "Service" else parse_endpointslice(obj)
        except ClusterDNSError as e:
            log.warning("ignoring %s", e)
            return None

    def _put(self, kind: str, key: tuple[str, str], info: ServiceInfo | SliceInfo) -> None:
        if isinstance(info, ServiceInfo):
            self.services[key] = info
            self.services_per_namespace[key[0]] += 1
        else:
            self.slices[key] = info
            self.slices_by_service[(info.namespace, info.service)].add(key)

    def _remove(self, kind: str, key: tuple[str, str]) -> None:
        if kind == "Service":
            if self.services.pop(key, None) is not None:
                self.services_per_namespace[key[0]] -= 1
                if not self.services_per_namespace[key[0]]:
                    del self.services_per_namespace[key[0]]
            return
        old = self.slices.pop(key, None)
        if old is not None:
            owner = (old.namespace, old.service)
            self.slices_by_service[owner].discard(key)
            if not self.slices_by_service[owner]:
                del self.slices_by_service[owner]

    def endpoints(self, svc: ServiceInfo) -> list[tuple[SliceInfo, EndpointInfo]]:
        """The endpoints DNS publishes for a Service (ready ones, or all if it says so).

        Called with the lock held."""
        out = []
        for key in sorted(self.slices_by_service.get((svc.namespace, svc.name), ())):
            sl = self.slices[key]
            out.extend((sl, ep) for ep in sl.endpoints if ep.addresses and (ep.ready or svc.publish_not_ready))
        return out


# --- answering ---------------------------------------------------------------------------------

@dataclass
class Node:
    """What one name holds: records by type (empty for a name with only names below it)."""

    records: dict[int, list[Any]] = field(default_factory=dict)
    additional: list[tuple[str, int, Any]] = field(default_factory=list)  # (name, type, rdata)

    def add(self, qtype: int, rdata: Any) -> None:
        self.records.setdefault(qtype, []).append(rdata)


def _address_record(ip: Address) -> tuple[int, Any]:
    return (QTYPE.A, A(str(ip))) if ip.version == 4 else (QTYPE.AAAA, AAAA(str(ip)))


class ClusterResolver:
    """Turns a question into an answer from a :class:`ClusterState`."""

    def __init__(self, state: ClusterState, domain: str = "cluster.local", ttl: int = DEFAULT_TTL) -> None:
        self.state = state
        self.domain = domain.strip(".").lower()
        if not self.domain:
            raise ClusterDNSError("domain: must not be empty")
        self.zone = tuple(self.domain.split("."))
        self.ttl = ttl
        self.started = int(time.time())
        self._ptr_generation = -1
        self._ptr: dict[Address, list[str]] = {}

    # Called from the server threads, concurrently.
    def resolve(self, request: DNSRecord) -> DNSRecord:
        reply = request.reply(ra=0, aa=1)
        if request.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return reply
        if len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        q = request.q
        labels = tuple(bytes(lb).decode("ascii", "replace").lower() for lb in q.qname.label)
        if q.qclass != 1 and q.qclass != 255:
            return self._refuse(reply)
        if labels[-2:] in (("in-addr", "arpa"), ("ip6", "arpa")):
            return self._reverse(reply, q.qname, labels, q.qtype)
        if labels[len(labels) - len(self.zone):] != self.zone:
            return self._refuse(reply)
        if not self.state.synced_event.is_set():
            reply.header.rcode = RCODE.SERVFAIL
            reply.header.aa = 0
            return reply
        self._answer(reply, q.qname, labels[:len(labels) - len(self.zone)], q.qtype, CNAME_CHAIN_LIMIT)
        return reply

    def _refuse(self, reply: DNSRecord) -> DNSRecord:
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0
        return reply

    def _answer(self, reply: DNSRecord, qname: DNSLabel, rel: tuple[str, ...], qtype: int, depth: int) -> None:
        with self.state.lock:
            node = self._node(rel)
        if node is None:
            reply.header.rcode = RCODE.NXDOMAIN
            self._add_soa(reply)
            return
        cname = node.records.get(QTYPE.CNAME)
        if cname and qtype not in (QTYPE.CNAME, QTYPE.ANY):
            target: DNSLabel = cname[0].label
            reply.add_answer(RR(qname, QTYPE.CNAME, ttl=self.ttl, rdata=cname[0]))
            tlabels = tuple(bytes(lb).decode("ascii", "replace").lower() for lb in target.label)
            if depth > 0 and tlabels[len(tlabels) - len(self.zone):] == self.zone:
                self._answer(reply, target, tlabels[:len(tlabels) - len(self.zone)], qtype, depth - 1)
            return
        types = list(node.records) if qtype == QTYPE.ANY else [qtype]
        before = len(reply.rr)
        for t in types:
            for rdata in node.records.get(t, ()):
                reply.add_answer(RR(qname, t, ttl=self.ttl, rdata=rdata))
        if len(reply.rr) == before:  # the name exists, not with this type: NODATA
            self._add_soa(reply)
            return
        if qtype in (QTYPE.SRV, QTYPE.ANY):
            for name, t, rdata in node.additional:
                reply.add_ar(RR(name, t, ttl=self.ttl, rdata=rdata))

    def _soa(self) -> SOA:
        # minimum = negative-caching TTL (RFC 2308); keep it as short as the records' TTL.
        serial = (self.started + self.state.generation) % (1 << 32)
        return SOA(f"ns.dns.{self.domain}.", f"hostmaster.{self.domain}.",
                   (serial, 7200, 1800, 86400, self.ttl))

    def _add_soa(self, reply: DNSRecord) -> None:
        reply.add_auth(RR(f"{self.domain}.", QTYPE.SOA, ttl=self.ttl, rdata=self._soa()))

    def _fqdn(self, *labels: str) -> str:
        return ".".join((*labels, self.domain)) + "."

    def _node(self, rel: tuple[str, ...]) -> Node | None:
        """The records at ``rel`` + zone, None if no such name exists. Lock held."""
        state = self.state
        n = len(rel)
        if n == 0:
            node = Node()
            node.add(QTYPE.SOA, self._soa())
            node.add(QTYPE.NS, NS(self._fqdn("ns", "dns")))
            return node
        if rel == ("dns-version",):
            node = Node()
            node.add(QTYPE.TXT, TXT(SCHEMA_VERSION))
            return node
        if rel[-1] == "pod":
            return self._pod(rel)
        if rel[-1] != "svc":
            return None
        if n == 1:
            return Node()
        if n == 2:
            return Node() if rel[0] in state.services_per_namespace else None
        svc = state.services.get((rel[-2], rel[-3]))
        if svc is None:
            return None
        if n == 3:
            return self._service(svc)
        if svc.kind == "ExternalName":
            return None  # names below an alias do not exist (RFC 6672 aside, nothing is there)
        if n == 4 and rel[0].startswith("_"):
            protocols = {p.protocol for p in self._srv_ports(svc) if p.name}
            return Node() if rel[0][1:] in protocols else None
        if n == 4:
            return self._endpoint_host(svc, rel[0]) if svc.kind == "Headless" else None
        if n == 5 and rel[0].startswith("_") and rel[1].startswith("_"):
            return self._srv(svc, rel[0][1:], rel[1][1:])
        return None

    def _service(self, svc: ServiceInfo) -> Node | None:
        node = Node()
        if svc.kind == "ExternalName":
            node.add(QTYPE.CNAME, CNAME(svc.external_name + "."))
        elif svc.kind == "ClusterIP":
            for ip in svc.cluster_ips:
                node.add(*_address_record(ip))
        else:
            seen: set[Address] = set()
            for _, ep in self.state.endpoints(svc):
                for ip in ep.addresses:
                    if ip not in seen:
                        seen.add(ip)
                        node.add(*_address_record(ip))
            if not seen:
                return None  # the specification: NXDOMAIN for a headless Service with no ready endpoint
        return node

    def _hosts(self, svc: ServiceInfo) -> dict[str, list[Address]]:
        hosts: dict[str, list[Address]] = {}
        for _, ep in self.state.endpoints(svc):
            for ip in ep.addresses:
                addresses = hosts.setdefault(ep.hostname or dashed(ip), [])
                if ip not in addresses:
                    addresses.append(ip)
        return hosts

    def _endpoint_host(self, svc: ServiceInfo, host: str) -> Node | None:
        addresses = self._hosts(svc).get(host)
        if not addresses:
            return None
        node = Node()
        for ip in addresses:
            node.add(*_address_record(ip))
        return node

    def _srv_ports(self, svc: ServiceInfo) -> list[Port]:
        """A headless Service's clients connect to the endpoints' own ports, so its SRV records
        carry those (from the slices); a ClusterIP Service's carry the Service's ports."""
        if svc.kind != "Headless":
            return list(svc.ports)
        return [p for sl, _ in self.state.endpoints(svc) for p in sl.ports]

    def _srv(self, svc: ServiceInfo, port_name: str, protocol: str) -> Node | None:
        node = Node()
        if svc.kind == "ClusterIP":
            target = self._fqdn(svc.name, svc.namespace, "svc")
            ports = sorted({p.port for p in svc.ports if p.name == port_name and p.protocol == protocol})
            for number in ports:
                node.add(QTYPE.SRV, SRV(0, 100, number, target))
            for ip in svc.cluster_ips:
                node.additional.append((target, *_address_record(ip)))
            return node if ports else None
        targets: dict[tuple[str, int], list[Address]] = {}
        for sl, ep in self.state.endpoints(svc):
            for p in sl.ports:
                if p.name == port_name and p.protocol == protocol:
                    for ip in ep.addresses:
                        addrs = targets.setdefault((ep.hostname or dashed(ip), p.port), [])
                        if ip not in addrs:
                            addrs.append(ip)
        if not targets:
            return None
        weight = max(1, 100 // len(targets))
        for (host, number), addresses in sorted(targets.items()):
            target = self._fqdn(host, svc.name, svc.namespace, "svc")
            node.add(QTYPE.SRV, SRV(0, weight, number, target))
            node.additional.extend((target, *_address_record(ip)) for ip in addresses)
        return node

    def _pod(self, rel: tuple[str, ...]) -> Node | None:
        if len(rel) < 3:
            return Node()
        if len(rel) > 3:
            return None
        text = rel[0]
        candidate = text.replace("-", ".") if text.count("-") == 3 else text.replace("-", ":")
        try:
            ip = ipaddress.ip_address(candidate)
        except ValueError:
            return None
        node = Node()
        node.add(*_address_record(ip))
        return node

    def _reverse(self, reply: DNSRecord, qname: DNSLabel, labels: tuple[str, ...], qtype: int) -> DNSRecord:
        """PTR for the addresses we know; REFUSED for the rest, whose owner we are not."""
        try:
            if labels[-2] == "in-addr":
                ip: Address = ipaddress.IPv4Address(".".join(reversed(labels[:-2])))
            else:
                nibbles = "".join(reversed(labels[:-2]))
                ip = ipaddress.IPv6Address(":".join(nibbles[i:i + 4] for i in range(0, 32, 4)))
        except (ValueError, IndexError):
            return self._refuse(reply)
        if not self.state.synced_event.is_set():
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        names = self._ptr_names().get(ip)
        if not names:
            return self._refuse(reply)
        if qtype in (QTYPE.PTR, QTYPE.ANY):
            for name in names:
                reply.add_answer(RR(qname, QTYPE.PTR, ttl=self.ttl, rdata=PTR(name)))
        return reply

    def _ptr_names(self) -> dict[Address, list[str]]:
        with self.state.lock:
            if self._ptr_generation != self.state.generation:
                ptr: dict[Address, list[str]] = defaultdict(list)
                for svc in self.state.services.values():
                    if svc.kind == "ClusterIP":
                        for ip in svc.cluster_ips:
                            ptr[ip].append(self._fqdn(svc.name, svc.namespace, "svc"))
                    elif svc.kind == "Headless":
                        for host, addresses in self._hosts(svc).items():
                            for ip in addresses:
                                ptr[ip].append(self._fqdn(host, svc.name, svc.namespace, "svc"))
                self._ptr, self._ptr_generation = dict(ptr), self.state.generation
            return self._ptr


# --- serving -----------------------------------------------------------------------------------

class _Handler(socketserver.BaseRequestHandler):
    """One UDP query, or every query on one TCP connection.

    Not dnslib's DNSHandler: that one answers a single query per TCP connection (glibc sends
    A and AAAA over the same one after a truncated answer) and never truncates UDP answers.
    Here UDP answers are cut to the client's EDNS size (512 bytes without EDNS).
    """

    server: _UDPServer | _TCPServer

    def handle(self) -> None:
        if isinstance(self.request, socket.socket):
            self.request.settimeout(TCP_IDLE_TIMEOUT)
            try:
                while True:
                    head = self._recv(2)
                    data = self._recv(int.from_bytes(head, "big")) if head else b""
                    if not data:
                        return
                    reply = self._reply(data, "tcp")
                    if reply:
                        self.request.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError as e:  # timeout, reset: the client is gone
                log.debug("tcp %s: %s", self.client_address[0], e)
            return
        data, sock = self.request
        reply = self._reply(data, "udp")
        if reply:
            sock.sendto(reply, self.client_address)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.request.recv(n - len(buf))
            if not chunk:
                return b""
            buf += chunk
        return buf

    def _reply(self, data: bytes, protocol: str) -> bytes:
        try:
            request = DNSRecord.parse(data)
        except DNSError as e:
            log.debug("%s %s: unparsable query: %s", protocol, self.client_address[0], e)
            if len(data) < 12:
                return b""
            header = DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1, rcode=RCODE.FORMERR)
            return bytes(DNSRecord(header).pack())
        if request.header.qr:
            return b""  # a response sent to us: never answer those
        try:
            reply = self.server.resolver.resolve(request)
        except Exception:  # a bug here must cost one SERVFAIL, not a client's timeout
            log.exception("answering %s %s", request.q.qname, QTYPE.get(request.q.qtype))
            reply = request.reply(ra=0, aa=0)
            reply.header.rcode = RCODE.SERVFAIL
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=MAX_UDP_PAYLOAD))
        packed = reply.pack()
        if protocol == "udp":
            limit = min(max(512, opt.rclass), MAX_UDP_PAYLOAD) if opt is not None else 512
            if len(packed) > limit:
                short = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap), q=request.q)
                short.header.tc = 1
                if opt is not None:
                    short.add_ar(EDNS0(udp_len=MAX_UDP_PAYLOAD))
                packed = short.pack()
        log.debug("%s %s %s %s -> %s, %d answers", protocol, self.client_address[0], request.q.qname,
                  QTYPE.get(request.q.qtype), RCODE.get(reply.header.rcode), len(reply.rr))
        return bytes(packed)


class _UDPServer(socketserver.UDPServer):
    """Answers in its one thread: an answer is a few dict reads and never waits on anything,
    so a thread per datagram (ThreadingMixIn) would only add its start-up cost to each query."""

    resolver: ClusterResolver
    allow_reuse_address = False  # SO_REUSEADDR on UDP would let a second server share the port


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    resolver: ClusterResolver
    daemon_threads = True
    allow_reuse_address = True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind(host: str, port: int, resolver: ClusterResolver) -> tuple[_UDPServer, _TCPServer]:
    """UDP and TCP servers on the same port; port 0 picks one that is free for both."""
    for _ in range(20):
        udp_cls = type("UDP", (_UDPServer,), {"address_family": _family(host)})
        tcp_cls = type("TCP", (_TCPServer,), {"address_family": _family(host)})
        udp = udp_cls((host, port), _Handler)
        try:
            tcp = tcp_cls((host, udp.server_address[1]), _Handler)
        except OSError:
            udp.server_close()
            if port:
                raise
            continue
        udp.resolver = tcp.resolver = resolver
        return udp, tcp
    raise ClusterDNSError(f"no port free for both UDP and TCP on {host}")


# --- watching the API --------------------------------------------------------------------------

def endpointslice_version(api_client: Any) -> str:
    """``v1`` if the apiserver serves discovery.k8s.io/v1, else ``v1beta1`` if that is served."""
    from kubernetes import client

    for group in client.ApisApi(api_client).get_api_versions().groups or ():
        if group.name == "discovery.k8s.io":
            versions = {v.version for v in group.versions}
            for version in ("v1", "v1beta1"):
                if version in versions:
                    return version
            raise ClusterDNSError(f"discovery.k8s.io serves {sorted(versions)}, neither v1 nor v1beta1")
    raise ClusterDNSError("the apiserver does not serve the discovery.k8s.io API group (EndpointSlices)")


@dataclass
class WatchStats:
    lists: int = 0
    relists_gone: int = 0
    failures: int = 0
    events: int = 0


class Watcher:
    """List+watch of one kind into a :class:`ClusterState`, in a daemon thread."""

    def __init__(self, kind: str, api_client: Any, state: ClusterState, stop: threading.Event,
                 backoff_cap: float = BACKOFF_CAP) -> None:
        self.kind = kind
        self.api_client = api_client
        self.state = state
        self.stop_event = stop
        self.backoff_cap = backoff_cap
        self.stats = WatchStats()
        self.version = ""  # EndpointSlice API version in use
        self.thread = threading.Thread(target=self._run, name=f"clusterdns-{kind}", daemon=True)

    def _list_fn(self) -> Callable[..., Any]:
        from kubernetes import client

        if self.kind == "Service":
            return client.CoreV1Api(self.api_client).list_service_for_all_namespaces
        if not self.version:
            self.version = endpointslice_version(self.api_client)
            log.info("EndpointSlices: discovery.k8s.io/%s", self.version)
        custom = client.CustomObjectsApi(self.api_client)
        version = self.version

        def list_slices(**kwargs: Any) -> Any:
            return custom.list_cluster_custom_object("discovery.k8s.io", version, "endpointslices", **kwargs)
        list_slices.__doc__ = custom.list_cluster_custom_object.__doc__  # Watch reads return types from it
        return list_slices

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        rv = ""
        delay = BACKOFF_INITIAL
        while not self.stop_event.is_set():
            try:
                if not rv:
                    rv = self._list()
                started = time.monotonic()
                rv = self._watch(rv)
                if time.monotonic() - started > 1.0:
                    delay = BACKOFF_INITIAL
                    continue
                # A watch that ends as soon as it starts, without an error, must not spin.
                reason = "the watch ended at once"
            except ApiException as e:
                if e.status == 410:
                    self.stats.relists_gone += 1
                    log.info("%s: resourceVersion %s is gone (410); relisting", self.kind, rv)
                    rv = ""
                    continue
                if e.status == 404 and self.kind == "EndpointSlice":
                    # Served versions changed (an upgrade, a CRD removed): discover and list again.
                    self.version, rv = "", ""
                reason = f"HTTP {e.status} {e.reason}"
            except ClusterDNSError as e:
                reason = str(e)
            except Exception as e:  # urllib3/ssl/socket errors: the apiserver is away
                reason = f"{type(e).__name__}: {e}"
            if self.stop_event.is_set():
                return  # closing: the broken watch is ours
            self.stats.failures += 1
            log.warning("%s: %s; retrying in %.1fs", self.kind, reason, delay)
            self.stop_event.wait(delay * random.uniform(0.8, 1.2))
            delay = min(self.backoff_cap, delay * 2)

    def _list(self) -> str:
        fn = self._list_fn()
        items: list[dict[str, Any]] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE_SIZE, "_preload_content": False,
                                      "_request_timeout": (CONNECT_TIMEOUT, 60)}
            if token:
                kwargs["_continue"] = token
            body = json.loads(fn(**kwargs).data)
            items.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.state.replace(self.kind, items)
        self.stats.lists += 1
        log.info("%s: listed %d at resourceVersion %s", self.kind, len(items), meta.get("resourceVersion"))
        return str(meta.get("resourceVersion") or "")

    def _watch(self, rv: str) -> str:
        from kubernetes import watch

        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        w = watch.Watch(return_type="object")
        for event in w.stream(self._list_fn(), resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=timeout, _request_timeout=(CONNECT_TIMEOUT, timeout + READ_SLACK)):
            obj = event.get("raw_object") or {}
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                self.stats.events += 1
                self.state.apply(self.kind, event["type"], obj)
                log.debug("%s %s %s/%s", self.kind, event["type"], obj["metadata"].get("namespace"),
                          obj["metadata"].get("name"))
            if self.stop_event.is_set():
                w.stop()
        return rv


class ClusterDNS:
    """The server: watchers + UDP and TCP listeners. ``start()``, then ``close()``."""

    def __init__(self, kubeconfig: str, host: str = "127.0.0.1", port: int = 53, domain: str = "cluster.local",
                 ttl: int = DEFAULT_TTL, backoff_cap: float = BACKOFF_CAP,
                 netns: str | os.PathLike[str] | None = None) -> None:
        """``netns`` (a /run/netns name or a path): listen inside that network namespace while
        the API is reached from the caller's, e.g. a pod-like netns whose resolv.conf points at
        127.0.0.1 while the apiserver is on the host's loopback."""
        self.kubeconfig = kubeconfig
        self.host, self.port = host, port
        self.netns = netns
        self.state = ClusterState()
        self.resolver = ClusterResolver(self.state, domain, ttl)
        self.backoff_cap = backoff_cap
        self._stop = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.watchers: dict[str, Watcher] = {}

    def __enter__(self) -> ClusterDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> ClusterDNS:
        from kubernetes import config

        try:
            udp, tcp = self._bind()
        except OSError as e:
            where = f" in netns {self.netns}" if self.netns else ""
            raise ClusterDNSError(f"--listen {self.host}:{self.port}{where}: {e.strerror or e}") from None
        self._servers = [udp, tcp]
        self.port = udp.server_address[1]
        for server in self._servers:
            t = threading.Thread(target=server.serve_forever, name=f"clusterdns-{type(server).__name__}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        for kind in ClusterState.KINDS:
            # One ApiClient per thread: each watch holds its own connection.
            api = config.new_client_from_config(config_file=self.kubeconfig)
            self.watchers[kind] = Watcher(kind, api, self.state, self._stop, self.backoff_cap)
            self.watchers[kind].thread.start()
        log.info("serving %s on %s port %d (UDP and TCP)", self.resolver.domain, self.host, self.port)
        return self

    def _bind(self) -> tuple[_UDPServer, _TCPServer]:
        if self.netns is None:
            return _bind(self.host, self.port, self.resolver)
        # setns() moves only the calling thread: a throwaway thread makes the sockets there (a
        # socket stays in the namespace it was made in) and every other thread stays here.
        from dataplane.netns import enter

        netns = self.netns
        result: list[tuple[_UDPServer, _TCPServer]] = []
        error: list[BaseException] = []

        def bind_there() -> None:
            try:
                enter(netns)
                result.append(_bind(self.host, self.port, self.resolver))
            except BaseException as e:  # handed to the caller below
                error.append(e)

        t = threading.Thread(target=bind_there, name="clusterdns-bind")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def wait_synced(self, timeout: float) -> bool:
        """True once both kinds were listed (until then queries get SERVFAIL)."""
        return self.state.synced_event.wait(timeout)

    def close(self) -> None:
        """Stop answering at once; the watch threads are daemons and end with their request."""
        self._stop.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        for t in self._threads:
            t.join(5)


# --- the kube-dns Service in front of it -------------------------------------------------------

def publish_kube_dns(api_client: Any, dns_ip: str, server_ip: str, server_port: int = 53, *,
                     namespace: str = "kube-system", name: str = "kube-dns") -> None:
    """Create or update the selector-less ``kube-dns`` Service at ``dns_ip`` (the kubelet's
    clusterDNS), its Endpoints and an EndpointSlice (v1 or v1beta1, whichever is served), all
    pointing at ``server_ip:server_port``, where this server listens.

    The Endpoints carry ``endpointslice.kubernetes.io/skip-mirror`` so that the controller-
    manager's mirroring controller does not add a second slice next to ours. A Service whose
    ClusterIP is not ``dns_ip`` is deleted and created again: the field is immutable.
    """
    from kubernetes import client

    cluster_ip = str(_address(dns_ip, "publish_kube_dns dns_ip"))
    server = _address(server_ip, "publish_kube_dns server_ip")
    if not 0 < server_port < 65536:
        raise ClusterDNSError(f"publish_kube_dns server_port: {server_port!r} is not a port number")
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "KubeDNS", "app.kubernetes.io/managed-by": MANAGED_BY}
    core = client.CoreV1Api(api_client)
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"clusterIP": cluster_ip, "ports": [
            {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": server_port},
            {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": server_port}]},
    }
    try:
        current = json.loads(core.read_namespaced_service(name, namespace, _preload_content=False).data)
    except client.ApiException as e:
        if e.status != 404:
            raise
        current = None
    if current is not None and current["spec"].get("clusterIP") != cluster_ip:
        log.info("%s/%s has ClusterIP %s, not %s: recreating it", namespace, name,
                 current["spec"].get("clusterIP"), cluster_ip)
        core.delete_namespaced_service(name, namespace)
        current = None
    if current is None:
        core.create_namespaced_service(namespace, service)
    else:
        service["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        core.replace_namespaced_service(name, namespace, service)

    ports = [{"name": "dns", "protocol": "UDP", "port": server_port},
             {"name": "dns-tcp", "protocol": "TCP", "port": server_port}]
    endpoints = {
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {**labels, "endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": str(server)}], "ports": ports}],
    }
    _create_or_replace(lambda: core.create_namespaced_endpoints(namespace, endpoints),
                       lambda: core.read_namespaced_endpoints(name, namespace, _preload_content=False),
                       lambda rv: core.replace_namespaced_endpoints(name, namespace, _with_rv(endpoints, rv)))

    version = endpointslice_version(api_client)
    slice_name = f"{name}-clusterdns"
    body = {
        "apiVersion": f"discovery.k8s.io/{version}", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": namespace,
                     "labels": {**labels, SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}},
        "addressType": "IPv4" if server.version == 4 else "IPv6",
        "endpoints": [{"addresses": [str(server)], "conditions": {"ready": True}}],
        "ports": ports,
    }
    custom = client.CustomObjectsApi(api_client)
    args = ("discovery.k8s.io", version, namespace, "endpointslices")
    _create_or_replace(lambda: custom.create_namespaced_custom_object(*args, body),
                       lambda: custom.get_namespaced_custom_object(*args, slice_name, _preload_content=False),
                       lambda rv: custom.replace_namespaced_custom_object(*args, slice_name, _with_rv(body, rv)))
    log.info("published %s/%s at %s -> %s port %d (EndpointSlice %s)", namespace, name, cluster_ip, server,
             server_port, version)


def _with_rv(obj: dict[str, Any], rv: str) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}}


def _create_or_replace(create: Callable[[], Any], read: Callable[[], Any], replace: Callable[[str], Any]) -> None:
    from kubernetes import client

    try:
        create()
    except client.ApiException as e:
        if e.status != 409:
            raise
        replace(json.loads(read().data)["metadata"]["resourceVersion"])


# --- command line ------------------------------------------------------------------------------

def parse_hostport(text: str, what: str = "--listen") -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ClusterDNSError(f"{what}: {text!r} is not ADDR:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    _address(host, what)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ClusterDNSError(f"{what}: {port!r} is not a port number")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.clusterdns",
        description="Cluster DNS for zeroproxy's test bed (not part of zeroproxy): answers the "
                    "Kubernetes DNS specification's records from Services and EndpointSlices.",
        epilog="examples:\n"
               "  python -m testbed.clusterdns --kubeconfig admin.conf --listen 10.0.0.2:53\n"
               "  python -m testbed.clusterdns --kubeconfig admin.conf --listen 10.0.0.2:53 "
               "--publish 10.96.0.10\n"
               "  dig @10.0.0.2 kubernetes.default.svc.cluster.local",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig file of the cluster to watch")
    parser.add_argument("--listen", default="127.0.0.1:53", help="ADDR:PORT for UDP and TCP (default %(default)s)")
    parser.add_argument("--domain", default="cluster.local", help="cluster domain (default %(default)s)")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="record TTL in seconds (default %(default)s)")
    parser.add_argument("--netns", help="listen inside this network namespace (/run/netns name or path); "
                                         "the API is reached from the current one")
    parser.add_argument("--publish", metavar="DNS_IP",
                        help="also create/update kube-system/kube-dns at this ClusterIP pointing at --listen")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s clusterdns %(levelname)s %(message)s")
    try:
        host, port = parse_hostport(args.listen)
        server = ClusterDNS(args.kubeconfig, host, port, args.domain, args.ttl, netns=args.netns).start()
    except ClusterDNSError as e:
        log.error("%s", e)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if args.publish:
            from kubernetes import config

            with config.new_client_from_config(config_file=args.kubeconfig) as api:
                publish_kube_dns(api, args.publish, host, server.port)
        while not stop.wait(1):
            pass
        log.info("stopping")
    except Exception as e:
        log.error("%s: %s", type(e).__name__, e)
        return 1
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
