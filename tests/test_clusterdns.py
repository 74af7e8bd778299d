"""The test bed's cluster DNS (testbed/clusterdns.py, not part of the product) against a real
kube-apiserver 1.20.2 (DevCluster), queried over UDP and TCP on loopback with dnslib's client.

Every test runs twice: with EndpointSlices served as discovery.k8s.io/v1 (DevCluster's CRD,
what current clusters serve) and as 1.20's own v1beta1 (what the bed's kubeadm cluster serves),
so the server's API discovery picks each. The apiserver runs with dual-stack Services."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord
from kubernetes import client

from testbed.bed import TestBed
from testbed.clusterdns import ClusterDNS, endpointslice_version, publish_kube_dns
from testbed.devcluster import ENDPOINTSLICE_APIS, REPO_ROOT, DevCluster

pytestmark = pytest.mark.timeout(600)

DOMAIN = "cluster.local"
SERVICE_RANGE = "10.96.0.0/12,fd00:10:96::/112"
T = TypeVar("T")


@pytest.fixture(scope="module", params=ENDPOINTSLICE_APIS)
def cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    with DevCluster(endpointslice_api=request.param, service_cluster_ip_range=SERVICE_RANGE,
                    extra_apiserver_args=["--feature-gates=IPv6DualStack=true"]) as c:
        yield c


@pytest.fixture(scope="module")
def dns(cluster: DevCluster) -> Iterator[ClusterDNS]:
    with ClusterDNS(str(cluster.kubeconfig_path), "127.0.0.1", 0, DOMAIN, backoff_cap=1.0) as server:
        assert server.wait_synced(60), "no initial list of Services and EndpointSlices within 60 s"
        yield server


@pytest.fixture(scope="module")
def api(cluster: DevCluster) -> Iterator[Any]:
    with cluster.api_client() as a:
        yield a


@pytest.fixture
def ns(api: Any, cluster: DevCluster) -> Iterator[str]:
    name = f"zp-dns-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    slices = ("discovery.k8s.io", cluster.endpointslice_api, name, "endpointslices")
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        # No controller-manager: the namespace controller would never empty it; delete its
        # objects first, then the namespace (which then stays Terminating, harmlessly).
        for svc in core.list_namespaced_service(name).items:
            core.delete_namespaced_service(svc.metadata.name, name)
        for sl in custom.list_namespaced_custom_object(*slices)["items"]:
            custom.delete_namespaced_custom_object(*slices, sl["metadata"]["name"])
        core.delete_namespace(name)


def query(dns: ClusterDNS, name: str, qtype: str, *, tcp: bool = False, edns: bool = False) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    return DNSRecord.parse(q.send("127.0.0.1", dns.port, tcp=tcp, timeout=5))


def values(reply: DNSRecord, qtype: str) -> set[str]:
    return {str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)}


def wait_for(fn: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll until ``fn()`` is truthy; on the deadline fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout:.0f}s")
        time.sleep(0.05)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        assert chunk, "the server closed the TCP connection"
        buf += chunk
    return buf


def fqdn(*labels: str) -> str:
    return ".".join((*labels, DOMAIN)) + "."


def create_slice(api: Any, cluster: DevCluster, ns: str, name: str, service: str, address_type: str,
                 endpoints: list[dict[str, Any]], ports: list[dict[str, Any]]) -> None:
    body = {"apiVersion": cluster.endpointslice_api_version, "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type, "endpoints": endpoints, "ports": ports}
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "discovery.k8s.io", cluster.endpointslice_api, ns, "endpointslices", body)


def patch_slice(api: Any, cluster: DevCluster, ns: str, name: str, patch: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        "discovery.k8s.io", cluster.endpointslice_api, ns, "endpointslices", name, patch)


def delete_slice(api: Any, cluster: DevCluster, ns: str, name: str) -> None:
    client.CustomObjectsApi(api).delete_namespaced_custom_object(
        "discovery.k8s.io", cluster.endpointslice_api, ns, "endpointslices", name)


def test_endpointslice_version_is_found_by_discovery(cluster: DevCluster, api: Any, dns: ClusterDNS) -> None:
    assert endpointslice_version(api) == cluster.endpointslice_api
    assert dns.watchers["EndpointSlice"].version == cluster.endpointslice_api


def test_dual_stack_clusterip_a_aaaa_srv_ptr_over_udp_and_tcp(api: Any, dns: ClusterDNS, ns: str) -> None:
    core = client.CoreV1Api(api)
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "ipFamilyPolicy": "RequireDualStack",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"},
                  {"name": "metrics", "port": 9100}]}})
    ips = svc.spec.cluster_i_ps
    v4 = next(ip for ip in ips if ":" not in ip)
    v6 = next(ip for ip in ips if ":" in ip)
    name = fqdn("web", ns, "svc")
    wait_for(lambda: values(query(dns, name, "A"), "A"), "A record of the new Service")
    for tcp in (False, True):
        a = query(dns, name, "A", tcp=tcp)
        assert a.header.rcode == RCODE.NOERROR and a.header.aa == 1
        assert values(a, "A") == {v4}
        assert all(rr.ttl == 5 for rr in a.rr)
        assert values(query(dns, name, "AAAA", tcp=tcp), "AAAA") == {v6}
        srv = query(dns, fqdn("_http", "_tcp", "web", ns, "svc"), "SRV", tcp=tcp)
        assert [(r.rdata.port, str(r.rdata.target)) for r in srv.rr] == [(80, name)]
        assert {str(r.rdata) for r in srv.ar} == {v4, v6}, "the target's addresses in the additional section"
    assert [r.rdata.port for r in query(dns, fqdn("_dns", "_udp", "web", ns, "svc"), "SRV").rr] == [53]
    # Names are compared case-insensitively; the answer keeps the question's spelling.
    upper = query(dns, f"WEB.{ns.upper()}.SVC.Cluster.Local.", "A")
    assert values(upper, "A") == {v4} and str(upper.rr[0].rname) == f"WEB.{ns.upper()}.SVC.Cluster.Local."
    # A port name with the other protocol does not exist; the protocol level exists while a port uses it.
    assert query(dns, fqdn("_http", "_udp", "web", ns, "svc"), "SRV").header.rcode == RCODE.NXDOMAIN
    assert query(dns, fqdn("_udp", "web", ns, "svc"), "SRV").header.rcode == RCODE.NOERROR
    assert query(dns, fqdn("_sctp", "web", ns, "svc"), "SRV").header.rcode == RCODE.NXDOMAIN
    # Several queries on one TCP connection, as glibc sends A and AAAA after a truncated answer.
    with socket.create_connection(("127.0.0.1", dns.port), timeout=5) as conn:
        for qtype, want in (("A", {v4}), ("AAAA", {v6}), ("A", {v4})):
            packed = DNSRecord.question(name, qtype).pack()
            conn.sendall(len(packed).to_bytes(2, "big") + packed)
            size = int.from_bytes(_recv_exactly(conn, 2), "big")
            assert values(DNSRecord.parse(_recv_exactly(conn, size)), qtype) == want
    # PTR for both ClusterIPs.
    ptr4 = query(dns, ".".join(reversed(v4.split("."))) + ".in-addr.arpa.", "PTR")
    assert values(ptr4, "PTR") == {name}
    ptr6 = query(dns, ipaddress.ip_address(v6).reverse_pointer + ".", "PTR", tcp=True)
    assert values(ptr6, "PTR") == {name}


def test_headless_endpoints_hostnames_and_srv_follow_readiness(api: Any, cluster: DevCluster, dns: ClusterDNS,
                                                               ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "db"}, "spec": {
        "clusterIP": "None", "ipFamilyPolicy": "RequireDualStack",
        "ports": [{"name": "pg", "port": 5432, "targetPort": 15432}]}})
    name = fqdn("db", ns, "svc")
    # The specification: a headless Service with no ready endpoint is NXDOMAIN.
    assert query(dns, name, "A").header.rcode == RCODE.NXDOMAIN
    ports = [{"name": "pg", "port": 15432, "protocol": "TCP"}]
    create_slice(api, cluster, ns, "db-v4", "db", "IPv4", [
        {"addresses": ["10.244.1.10"], "hostname": "db-0", "conditions": {"ready": True}},
        {"addresses": ["10.244.1.11"], "hostname": "db-1", "conditions": {"ready": True}},
        {"addresses": ["10.244.1.12"]},  # no hostname, readiness unset (= ready)
        {"addresses": ["10.244.1.13"], "hostname": "db-3", "conditions": {"ready": False}},
    ], ports)
    create_slice(api, cluster, ns, "db-v6", "db", "IPv6", [
        {"addresses": ["fd00:10:244:1::10"], "hostname": "db-0", "conditions": {"ready": True}},
    ], ports)
    wait_for(lambda: len(values(query(dns, name, "A"), "A")) == 3 and values(query(dns, name, "AAAA"), "AAAA"),
             "both slices seen")
    for tcp in (False, True):
        assert values(query(dns, name, "A", tcp=tcp), "A") == {"10.244.1.10", "10.244.1.11", "10.244.1.12"}
        assert values(query(dns, name, "AAAA", tcp=tcp), "AAAA") == {"fd00:10:244:1::10"}
    host0 = fqdn("db-0", "db", ns, "svc")
    assert values(query(dns, host0, "A"), "A") == {"10.244.1.10"}
    assert values(query(dns, host0, "AAAA"), "AAAA") == {"fd00:10:244:1::10"}
    # An endpoint without a hostname is named by its address; a not-ready one does not exist.
    assert values(query(dns, fqdn("10-244-1-12", "db", ns, "svc"), "A"), "A") == {"10.244.1.12"}
    assert query(dns, fqdn("db-3", "db", ns, "svc"), "A").header.rcode == RCODE.NXDOMAIN
    # SRV: one per ready endpoint, with the endpoints' port (clients connect to the pods).
    srv = query(dns, fqdn("_pg", "_tcp", "db", ns, "svc"), "SRV")
    assert {(r.rdata.port, str(r.rdata.target)) for r in srv.rr} == {
        (15432, host0), (15432, fqdn("db-1", "db", ns, "svc")), (15432, fqdn("10-244-1-12", "db", ns, "svc"))}
    assert {(str(r.rname), str(r.rdata)) for r in srv.ar} >= {(host0, "10.244.1.10"), (host0, "fd00:10:244:1::10")}
    ptr = query(dns, "10.1.244.10.in-addr.arpa.", "PTR")
    assert values(ptr, "PTR") == {host0}

    # Readiness changes are seen: db-1 goes unready, db-3 becomes ready.
    patch_slice(api, cluster, ns, "db-v4", {"endpoints": [
        {"addresses": ["10.244.1.10"], "hostname": "db-0", "conditions": {"ready": True}},
        {"addresses": ["10.244.1.11"], "hostname": "db-1", "conditions": {"ready": False}},
        {"addresses": ["10.244.1.13"], "hostname": "db-3", "conditions": {"ready": True}}]})
    wait_for(lambda: values(query(dns, name, "A"), "A") == {"10.244.1.10", "10.244.1.13"},
             "A records after the readiness change")
    assert query(dns, fqdn("db-1", "db", ns, "svc"), "A").header.rcode == RCODE.NXDOMAIN
    assert values(query(dns, fqdn("db-3", "db", ns, "svc"), "A", tcp=True), "A") == {"10.244.1.13"}

    # publishNotReadyAddresses publishes the unready one too.
    core.patch_namespaced_service("db", ns, {"spec": {"publishNotReadyAddresses": True}})
    wait_for(lambda: "10.244.1.11" in values(query(dns, name, "A"), "A"), "unready endpoint published")

    # Slices gone: the headless name is gone.
    delete_slice(api, cluster, ns, "db-v4")
    delete_slice(api, cluster, ns, "db-v6")
    wait_for(lambda: query(dns, name, "A").header.rcode == RCODE.NXDOMAIN, "NXDOMAIN once the slices are gone")


def test_externalname_is_a_cname_and_follows_changes(api: Any, dns: ClusterDNS, ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "ext"},
                                        "spec": {"type": "ExternalName", "externalName": "www.example.com"}})
    name = fqdn("ext", ns, "svc")
    reply = wait_for(lambda: (r := query(dns, name, "A")).rr and r, "CNAME of the ExternalName Service")
    # Outside the cluster domain nothing more is resolved: just the alias.
    assert [(QTYPE[r.rtype], str(r.rdata)) for r in reply.rr] == [("CNAME", "www.example.com.")]
    assert reply.header.rcode == RCODE.NOERROR
    assert values(query(dns, name, "CNAME", tcp=True), "CNAME") == {"www.example.com."}
    assert query(dns, "www.example.com.", "A").header.rcode == RCODE.REFUSED

    # A target inside the zone is followed, as a resolver would ask us next anyway.
    web = core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    core.patch_namespaced_service("ext", ns, {"spec": {"externalName": fqdn("web", ns, "svc")}})
    reply = wait_for(lambda: (r := query(dns, name, "A")) and len(r.rr) == 2 and r, "CNAME chain into the zone")
    assert [(QTYPE[r.rtype], str(r.rdata)) for r in reply.rr] == [
        ("CNAME", fqdn("web", ns, "svc")), ("A", web.spec.cluster_ip)]

    # ExternalName -> ClusterIP: the CNAME turns into the A record.
    ext = core.patch_namespaced_service("ext", ns, {"spec": {"type": "ClusterIP", "externalName": None,
                                                             "ports": [{"port": 80}]}})
    reply = wait_for(lambda: (r := query(dns, name, "A")) and not values(r, "CNAME") and r,
                     "no CNAME after the type change")
    assert values(reply, "A") == {ext.spec.cluster_ip}


def test_negative_answers_are_fast_and_carry_the_soa(api: Any, dns: ClusterDNS, ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "only4"}, "spec": {"ports": [{"port": 80}]}})
    wait_for(lambda: values(query(dns, fqdn("only4", ns, "svc"), "A"), "A"), "the Service")

    def soa_of(reply: DNSRecord) -> Any:
        assert not reply.rr and len(reply.auth) == 1 and reply.auth[0].rtype == QTYPE.SOA, reply
        assert str(reply.auth[0].rname) == f"{DOMAIN}."
        return reply.auth[0]

    for tcp in (False, True):
        nx = query(dns, fqdn("nope", ns, "svc"), "A", tcp=tcp)
        assert nx.header.rcode == RCODE.NXDOMAIN and nx.header.aa == 1
        soa = soa_of(nx)
        assert str(soa.rdata.mname) == f"ns.dns.{DOMAIN}." and str(soa.rdata.rname) == f"hostmaster.{DOMAIN}."
        assert soa.rdata.times[4] == 5 and soa.ttl == 5, "negative answers are cached for the records' TTL only"
    # What a pod's search path asks for a name that exists: the expanded forms are NXDOMAIN.
    for name in (fqdn("only4", ns, "svc", ns, "svc"), fqdn("only4", ns, "svc", "svc"), fqdn("only4", ns, "svc")
                 .rstrip(".") + f".{DOMAIN}.", fqdn("www", "example", "com", ns, "svc"),
                 fqdn("not-an-ip", ns, "pod"), fqdn("only4", "nosuchns", "svc")):
        r = query(dns, name, "A")
        assert r.header.rcode == RCODE.NXDOMAIN, name
        soa_of(r)
    # A name that exists without the asked type: NOERROR, no answer, SOA (NODATA).
    nodata = query(dns, fqdn("only4", ns, "svc"), "AAAA")
    assert nodata.header.rcode == RCODE.NOERROR
    soa_of(nodata)
    # Names with names below them exist: the namespace, svc, the zone apex.
    for name in (fqdn(ns, "svc"), fqdn("svc"), f"{DOMAIN}."):
        r = query(dns, name, "A")
        assert r.header.rcode == RCODE.NOERROR, name
        soa_of(r)
    apex = query(dns, f"{DOMAIN}.", "SOA")
    assert [QTYPE[r.rtype] for r in apex.rr] == ["SOA"]
    # Outside the zone: REFUSED, no upstream.
    for name, qtype in (("example.com.", "A"), ("local.", "A"), (".", "NS"), ("10.0.0.1.in-addr.arpa.", "PTR")):
        r = query(dns, name, qtype)
        assert r.header.rcode == RCODE.REFUSED and not r.rr, name
    # Garbage gets FORMERR, not silence and not a crash.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"\x12\x34" + b"\x01\x00\x00\x01" + b"\xff" * 20, ("127.0.0.1", dns.port))
        bad = DNSRecord.parse(sock.recv(512))
        assert bad.header.id == 0x1234 and bad.header.rcode == RCODE.FORMERR
    # The schema version, and the (deprecated, still required) pod A records.
    assert values(query(dns, f"dns-version.{DOMAIN}.", "TXT"), "TXT") == {'"1.0.1"'}
    assert values(query(dns, fqdn("10-244-0-7", ns, "pod"), "A"), "A") == {"10.244.0.7"}
    assert query(dns, fqdn("10-244-0-777", ns, "pod"), "A").header.rcode == RCODE.NXDOMAIN


def test_service_changes_and_deletion_are_seen(api: Any, dns: ClusterDNS, ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "app"},
                                        "spec": {"ports": [{"name": "http", "port": 80}]}})
    srv_name = fqdn("_http", "_tcp", "app", ns, "svc")
    wait_for(lambda: [r.rdata.port for r in query(dns, srv_name, "SRV").rr] == [80], "SRV for port 80")
    core.patch_namespaced_service("app", ns, [{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}])
    wait_for(lambda: [r.rdata.port for r in query(dns, srv_name, "SRV").rr] == [8080], "SRV after the port change")
    core.delete_namespaced_service("app", ns)
    wait_for(lambda: query(dns, fqdn("app", ns, "svc"), "A").header.rcode == RCODE.NXDOMAIN, "NXDOMAIN after delete")
    assert query(dns, srv_name, "SRV", tcp=True).header.rcode == RCODE.NXDOMAIN
    # The namespace has no Service left, so it is no name either.
    assert query(dns, fqdn(ns, "svc"), "A").header.rcode == RCODE.NXDOMAIN


def test_large_answers_truncate_over_udp_and_come_whole_over_tcp(api: Any, cluster: DevCluster,
                                                                 dns: ClusterDNS, ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "many"}, "spec": {"clusterIP": "None"}})
    addresses = [f"10.244.2.{i}" for i in range(1, 101)]
    create_slice(api, cluster, ns, "many", "many", "IPv4",
                 [{"addresses": [a], "conditions": {"ready": True}} for a in addresses], [])
    name = fqdn("many", ns, "svc")
    whole = wait_for(lambda: (r := query(dns, name, "A", tcp=True)) and len(r.rr) == 100 and r, "100 A records")
    assert values(whole, "A") == set(addresses)
    for edns in (False, True):
        udp = query(dns, name, "A", edns=edns)
        assert udp.header.tc == 1 and not udp.rr, "too big for UDP: truncated so the client retries over TCP"
        assert str(udp.q.qname) == name


def test_watches_survive_an_apiserver_restart_after_compaction(api: Any, cluster: DevCluster, dns: ClusterDNS,
                                                               ns: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "before"}, "spec": {"ports": [{"port": 80}]}})
    wait_for(lambda: values(query(dns, fqdn("before", ns, "svc"), "A"), "A"), "Service before the restart")
    gone = {k: w.stats.relists_gone for k, w in dns.watchers.items()}
    lists = {k: w.stats.lists for k, w in dns.watchers.items()}
    cluster.compact_etcd()
    cluster.restart_apiserver(kill=True)
    # While it was away the old answers stayed; afterwards new objects show up again.
    assert values(query(dns, fqdn("before", ns, "svc"), "A"), "A")
    core.create_namespaced_service(ns, {"metadata": {"name": "after"}, "spec": {"ports": [{"port": 80}]}})
    wait_for(lambda: values(query(dns, fqdn("after", ns, "svc"), "A"), "A"), "Service created after the restart",
             timeout=60)
    create_slice(api, cluster, ns, "after-slice", "hl", "IPv4", [{"addresses": ["10.244.3.1"]}], [])
    core.create_namespaced_service(ns, {"metadata": {"name": "hl"}, "spec": {"clusterIP": "None"}})
    wait_for(lambda: values(query(dns, fqdn("hl", ns, "svc"), "A"), "A") == {"10.244.3.1"},
             "EndpointSlice created after the restart", timeout=60)
    # The restarted apiserver's watch cache starts after the compaction: resuming the old watch
    # is 410 Gone, and each watcher relisted.
    assert {k: w.stats.relists_gone - gone[k] for k, w in dns.watchers.items()} == {"Service": 1, "EndpointSlice": 1}
    assert all(w.stats.lists > lists[k] for k, w in dns.watchers.items())


def test_publish_kube_dns_points_the_service_at_this_server(api: Any, cluster: DevCluster, dns: ClusterDNS) -> None:
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    slices = ("discovery.k8s.io", cluster.endpointslice_api, "kube-system", "endpointslices")
    try:
        # Endpoints may not be loopback: the address is only data here, nothing is sent to it.
        publish_kube_dns(api, "10.96.0.10", "10.0.0.53", 5353)
        publish_kube_dns(api, "10.96.0.10", "10.0.0.54", 53)  # again: an update, not a conflict
        svc = core.read_namespaced_service("kube-dns", "kube-system")
        assert svc.spec.cluster_ip == "10.96.0.10" and not svc.spec.selector
        assert {(p.name, p.protocol, p.port) for p in svc.spec.ports} == {("dns", "UDP", 53), ("dns-tcp", "TCP", 53)}
        ep = core.read_namespaced_endpoints("kube-dns", "kube-system")
        assert [a.ip for a in ep.subsets[0].addresses] == ["10.0.0.54"]
        assert ep.metadata.labels["endpointslice.kubernetes.io/skip-mirror"] == "true"
        sl = custom.get_namespaced_custom_object(*slices, "kube-dns-clusterdns")
        assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
        assert sl["endpoints"][0]["addresses"] == ["10.0.0.54"] and {p["port"] for p in sl["ports"]} == {53}
        wait_for(lambda: values(query(dns, fqdn("kube-dns", "kube-system", "svc"), "A"), "A") == {"10.96.0.10"},
                 "kube-dns resolves to the DNS IP")
        # A different DNS IP: the Service is made again (ClusterIP is immutable).
        publish_kube_dns(api, "10.96.0.11", "10.0.0.54", 53)
        assert core.read_namespaced_service("kube-dns", "kube-system").spec.cluster_ip == "10.96.0.11"
    finally:
        for delete in (lambda: core.delete_namespaced_service("kube-dns", "kube-system"),
                       lambda: core.delete_namespaced_endpoints("kube-dns", "kube-system"),
                       lambda: custom.delete_namespaced_custom_object(*slices, "kube-dns-clusterdns")):
            try:
                delete()
            except client.ApiException as e:
                if e.status != 404:
                    raise


def _free_port() -> int:
    """A loopback port that was free for both UDP and TCP a moment ago."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def test_cli_serves_and_exits_cleanly_on_sigterm(cluster: DevCluster, tmp_path: Any) -> None:
    port = _free_port()
    stderr = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "testbed.clusterdns", "--kubeconfig",
                             str(cluster.kubeconfig_path), "--listen", f"127.0.0.1:{port}", "--domain", DOMAIN],
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        def kubernetes_a() -> set[str]:
            if proc.poll() is not None:
                stderr.seek(0)
                raise AssertionError(f"exited {proc.returncode}: {stderr.read()}")
            try:
                reply = DNSRecord.parse(DNSRecord.question(f"kubernetes.default.svc.{DOMAIN}", "A")
                                        .send("127.0.0.1", port, timeout=1))
            except OSError:
                return set()
            return values(reply, "A")
        assert wait_for(kubernetes_a, "the CLI answers for default/kubernetes") == {"10.96.0.1"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        log = stderr.read()
        stderr.close()
    assert "serving cluster.local on 127.0.0.1 port" in log and "stopping" in log, log


def test_glibc_resolves_through_a_pods_search_path(api: Any, cluster: DevCluster, ns: str, testbed: TestBed,
                                                   tmp_path: Any) -> None:
    """What pods really do: glibc's resolver, a kubelet-style resolv.conf (search path, ndots:5)
    and port 53, in a netns of the bed's whose loopback the server listens on."""
    core = client.CoreV1Api(api)
    web = core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}})
    v4 = next(ip for ip in web.spec.cluster_i_ps if ":" not in ip)
    v6 = next(ip for ip in web.spec.cluster_i_ps if ":" in ip)
    core.create_namespaced_service(ns, {"metadata": {"name": "alias"}, "spec": {
        "type": "ExternalName", "externalName": f"web.{ns}.svc.{DOMAIN}"}})
    pod = testbed.add_external("pod")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\nsearch {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\n"
                      "options ndots:5 attempts:2 timeout:2\n")

    def getent_lines(*args: str) -> tuple[int, list[list[str]]]:
        # A private mount namespace: the bind mount over /etc/resolv.conf is seen by getent only.
        proc = testbed.run_in_netns(pod.netns, [
            "unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec getent "$@"',
            str(resolv), *args], check=False)
        return proc.returncode, [line.split() for line in proc.stdout.splitlines() if line.strip()]

    def getent(*args: str) -> tuple[int, set[str]]:
        code, lines = getent_lines(*args)
        return code, {fields[0] for fields in lines}

    with ClusterDNS(str(cluster.kubeconfig_path), "127.0.0.1", 53, DOMAIN, netns=pod.netns) as server:
        assert server.wait_synced(60)
        # Services arrive in the order they were made: once the alias resolves, web is there too.
        assert wait_for(lambda: getent("ahostsv4", "alias"), "the alias through the search path") == (0, {v4})
        assert getent("ahostsv4", "web") == (0, {v4})
        assert getent("ahostsv6", "web") == (0, {v6})
        assert getent("ahosts", f"web.{ns}") == (0, {v4, v6})
        assert getent("ahostsv4", f"web.{ns}.svc") == (0, {v4})
        # The ExternalName's CNAME into the zone came with the target's address (above); the
        # canonical name glibc reports is the target's.
        code, lines = getent_lines("ahostsv4", "alias")
        assert code == 0 and f"web.{ns}.svc.{DOMAIN}" in lines[0]
        # Unknown names: every search-path candidate is NXDOMAIN, then the name itself REFUSED.
        assert getent("hosts", "nope")[0] == 2
        assert getent("hosts", "www.example.com")[0] == 2
        # Reverse lookup of the ClusterIP.
        assert getent_lines("hosts", v4) == (0, [[v4, f"web.{ns}.svc.{DOMAIN}"]])
