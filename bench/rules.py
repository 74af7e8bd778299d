"""Rule sets shaped like kube-proxy's iptables and nftables modes, for the baselines only.

zeroproxy itself never creates a netfilter rule. These texts exist so the benchmark can compare
against what a cluster would otherwise run; they are loaded only inside the benchmark's own
node namespaces (``iptables-restore`` / ``nft -f`` started in that netns) and removed after.

The shapes follow kube-proxy (v1.29+) for ClusterIP services with endpoints:

* iptables: ``PREROUTING/OUTPUT -> KUBE-SERVICES``, one rule per service port matching
  ``-d VIP -p tcp --dport P`` that jumps to ``KUBE-SVC-<hash>``; that chain marks off-cluster
  sources for masquerade and picks an endpoint with ``-m statistic --mode random`` (probability
  1/n, 1/(n-1), ..., last unconditional) jumping to ``KUBE-SEP-<hash>``, which marks hairpin
  traffic and DNATs. KUBE-SERVICES is evaluated rule by rule, so the last service costs N rules.
* nftables: table ``ip kube-proxy`` with a ``service-ips`` verdict map keyed by
  ``daddr . l4proto . dport`` that goes to ``service-<hash>-ns/name/tcp/port``; that chain picks
  an endpoint with ``numgen random mod n vmap``, and ``endpoint-...`` chains DNAT. The lookup is a
  hash, so first and last service should cost the same.

Names use kube-proxy's recipe (base32 of sha256, truncated), so chain-name lengths and hence
rule-set sizes match what kube-proxy would load.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from bench.services import Service

NFT_TABLE = "kube-proxy"
MASQ_MARK = "0x4000"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def _svc_port_name(svc: Service) -> str:
    return f"{svc.namespace}/{svc.name}:{svc.port_name}"


def svc_chain(svc: Service) -> str:
    """``KUBE-SVC-`` + 16 characters, as kube-proxy's servicePortChainName builds it."""
    return "KUBE-SVC-" + _hash(_svc_port_name(svc) + "tcp")[:16]


def sep_chain(svc: Service, ip: str, port: int) -> str:
    """``KUBE-SEP-`` + 16 characters, as kube-proxy's servicePortEndpointChainName builds it."""
    return "KUBE-SEP-" + _hash(_svc_port_name(svc) + "tcp" + f"{ip}:{port}")[:16]


# --- iptables ------------------------------------------------------------------------------------


def ext_chain(svc: Service) -> str:
    """``KUBE-EXT-<hash>``: where kube-proxy sends a service's external (NodePort) traffic."""
    return "KUBE-EXT-" + _hash(_svc_port_name(svc) + "tcp")[:16]


def _ipt_nodeport_rules(svc: Service) -> list[str]:
    """KUBE-NODEPORTS match (one rule per node port: evaluated in order) and the KUBE-EXT chain:
    external traffic of a Cluster-policy service is marked for masquerade, then load-balanced."""
    comment = _svc_port_name(svc)
    ext = ext_chain(svc)
    return [f'-A KUBE-NODEPORTS -p tcp -m comment --comment "{comment}" -m tcp --dport {svc.node_port} -j {ext}',
            f'-A {ext} -m comment --comment "masquerade traffic for {comment} external destinations" '
            "-j KUBE-MARK-MASQ",
            f"-A {ext} -j {svc_chain(svc)}"]


def _ipt_services_rule(svc: Service) -> str:
    return (f'-A KUBE-SERVICES -d {svc.vip}/32 -p tcp -m comment --comment "{_svc_port_name(svc)} cluster IP" '
            f"-m tcp --dport {svc.port} -j {svc_chain(svc)}")


def _ipt_svc_rules(svc: Service, cluster_cidr: str) -> list[str]:
    """The KUBE-SVC chain: masquerade mark for off-cluster sources, then the random endpoint pick."""
    comment = _svc_port_name(svc)
    name = svc_chain(svc)
    out = [f"-A {name} ! -s {cluster_cidr} -d {svc.vip}/32 -p tcp -m comment "
           f'--comment "{comment} cluster IP" -m tcp --dport {svc.port} -j KUBE-MARK-MASQ']
    n = len(svc.endpoints)
    for i, (ip, port) in enumerate(svc.endpoints):
        left = n - i
        prob = f" -m statistic --mode random --probability {1 / left:.11f}" if left > 1 else ""
        out.append(f'-A {name} -m comment --comment "{comment} -> {ip}:{port}"{prob} -j {sep_chain(svc, ip, port)}')
    return out


def _ipt_sep_rules(svc: Service, ip: str, port: int) -> list[str]:
    comment = _svc_port_name(svc)
    sep = sep_chain(svc, ip, port)
    return [f'-A {sep} -s {ip}/32 -m comment --comment "{comment}" -j KUBE-MARK-MASQ',
            f'-A {sep} -p tcp -m comment --comment "{comment}" -m tcp -j DNAT --to-destination {ip}:{port}']


_IPT_NODEPORTS_RULE = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                       'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')


def iptables_restore(services: Sequence[Service], cluster_cidr: str) -> str:
    """A complete ``iptables-restore`` input (nat + filter tables) for ``services``.

    ``cluster_cidr`` is the pod network; like kube-proxy with --cluster-cidr, traffic to a
    ClusterIP from outside it is marked for masquerade.
    """
    chains: list[str] = []
    svc_rules: list[str] = []
    for svc in services:
        chains.append(svc_chain(svc))
        chains.extend(sep_chain(svc, ip, port) for ip, port in svc.endpoints)
        svc_rules.append(_ipt_services_rule(svc))
        svc_rules.extend(_ipt_svc_rules(svc, cluster_cidr))
        for ip, port in svc.endpoints:
            svc_rules.extend(_ipt_sep_rules(svc, ip, port))
        if svc.node_port is not None:
            chains.append(ext_chain(svc))
            svc_rules.extend(_ipt_nodeport_rules(svc))
    nat = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        *(f":{c} - [0:0]" for c in chains),
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --set-xmark {MASQ_MARK}/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        *svc_rules,
        _IPT_NODEPORTS_RULE,
        "COMMIT",
    ]
    filt = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" "
        "-j KUBE-SERVICES",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" "
        "-j KUBE-SERVICES",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} '
        "-j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    return "\n".join([*filt, *nat]) + "\n"


def iptables_partial(services: Sequence[Service], old: Service, new: Service, cluster_cidr: str) -> str:
    """``iptables-restore --noflush`` input for one service whose endpoints changed old -> new.

    This is what kube-proxy's partial sync writes: KUBE-SERVICES always in full (so its cost
    still grows with N), the changed KUBE-SVC chain, new KUBE-SEP chains, and -X for removed ones.
    """
    added = [e for e in new.endpoints if e not in old.endpoints]
    removed = [e for e in old.endpoints if e not in new.endpoints]
    lines = ["*nat", ":KUBE-SERVICES - [0:0]", f":{svc_chain(new)} - [0:0]"]
    lines += [f":{sep_chain(new, ip, port)} - [0:0]" for ip, port in added + removed]
    lines += [_ipt_services_rule(s) for s in services]
    lines.append(_IPT_NODEPORTS_RULE)
    lines += _ipt_svc_rules(new, cluster_cidr)
    for ip, port in added:
        lines += _ipt_sep_rules(new, ip, port)
    lines += [f"-X {sep_chain(old, ip, port)}" for ip, port in removed]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_flush() -> str:
    """``iptables-restore`` input that empties both tables and deletes every chain in them."""
    return "*filter\nCOMMIT\n*nat\nCOMMIT\n"


def iptables_rule_count(services: Sequence[Service]) -> int:
    """Rules per the shape above: what grows with N (reported next to the load time)."""
    per_svc = sum(2 + 3 * len(s.endpoints) + (3 if s.node_port is not None else 0) for s in services)
    return per_svc + 14


# --- nftables ------------------------------------------------------------------------------------


def nft_service_chain(svc: Service) -> str:
    """``service-<8>-ns/name/tcp/port``, as kube-proxy's nftables mode names it."""
    base = f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}"
    return f"service-{_hash(_svc_port_name(svc) + 'tcp')[:8]}-{base}"


def nft_endpoint_chain(svc: Service, ip: str, port: int) -> str:
    base = f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}__{ip}/{port}"
    return f"endpoint-{_hash(_svc_port_name(svc) + 'tcp' + f'{ip}:{port}')[:8]}-{base}"


def nft_base(cluster_cidr: str) -> str:
    """The table, its sets/maps and hook chains; services are added by ``nft_services``."""
    t = f"ip {NFT_TABLE}"
    lines = [
        f"add table {t} {{ comment \"rules for kube-proxy\" ; }}",
        f"add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}",
        f"add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        "comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        f"add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; "
        "comment \"NodePort traffic\" ; }",
        f"add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        "comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        f"add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        "comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }",
        f"add chain {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}",
        f"add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}",
        f"add chain {t} filter-output {{ type filter hook output priority -110 ; }}",
        f"add chain {t} filter-output-post-dnat {{ type filter hook output priority -90 ; }}",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {t} nat-output {{ type nat hook output priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} cluster-ips-check",
        f"add chain {t} firewall-check",
        f"add chain {t} service-endpoints-check",
        f"add chain {t} mark-for-masquerade",
        f"add chain {t} masquerading",
        f"add chain {t} services",
        f"add rule {t} filter-prerouting ct state new jump firewall-check",
        f"add rule {t} filter-forward ct state new jump service-endpoints-check",
        f"add rule {t} filter-forward ct state new jump cluster-ips-check",
        f"add rule {t} filter-output ct state new jump service-endpoints-check",
        f"add rule {t} filter-output ct state new jump firewall-check",
        f"add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check",
        f"add rule {t} nat-prerouting jump services",
        f"add rule {t} nat-output jump services",
        f"add rule {t} nat-postrouting jump masquerading",
        f"add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment "
        "\"Reject traffic to invalid ports of ClusterIPs\"",
        f"add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
        f"add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"add rule {t} mark-for-masquerade meta mark set meta mark or {MASQ_MARK}",
        f"add rule {t} masquerading meta mark & {MASQ_MARK} == 0 return",
        f"add rule {t} masquerading meta mark set meta mark xor {MASQ_MARK}",
        f"add rule {t} masquerading masquerade fully-random",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport "
        "vmap @service-nodeports",
    ]
    del cluster_cidr  # part of the per-service rules; kept in the signature for symmetry
    return "\n".join(lines) + "\n"


def nft_external_chain(svc: Service) -> str:
    base = f"{svc.namespace}/{svc.name}/tcp/{svc.port_name}"
    return f"external-{_hash(_svc_port_name(svc) + 'tcp')[:8]}-{base}"


def _nft_endpoint_lines(svc: Service, ip: str, port: int) -> list[str]:
    t = f"ip {NFT_TABLE}"
    ep = nft_endpoint_chain(svc, ip, port)
    return [f"add chain {t} {ep}",
            f"add rule {t} {ep} ip saddr {ip} jump mark-for-masquerade",
            f"add rule {t} {ep} meta l4proto tcp dnat to {ip}:{port}"]


def _nft_service_rules(svc: Service, cluster_cidr: str) -> list[str]:
    t = f"ip {NFT_TABLE}"
    chain = nft_service_chain(svc)
    picks = ", ".join(f"{i} : goto {nft_endpoint_chain(svc, ip, port)}" for i, (ip, port) in enumerate(svc.endpoints))
    return [f"add rule {t} {chain} ip daddr {svc.vip} tcp dport {svc.port} ip saddr != {cluster_cidr} "
            "jump mark-for-masquerade",
            f"add rule {t} {chain} numgen random mod {len(svc.endpoints)} vmap {{ {picks} }}"]


def nft_services(services: Sequence[Service], cluster_cidr: str) -> str:
    """``nft -f`` input adding ``services`` to an existing table (see ``nft_base``)."""
    t = f"ip {NFT_TABLE}"
    lines: list[str] = []
    for svc in services:
        for ip, port in svc.endpoints:
            lines += _nft_endpoint_lines(svc, ip, port)
        lines.append(f"add chain {t} {nft_service_chain(svc)}")
        lines += _nft_service_rules(svc, cluster_cidr)
    if services:
        vips = ", ".join(s.vip for s in services)
        elements = ", ".join(f"{s.vip} . tcp . {s.port} : goto {nft_service_chain(s)}" for s in services)
        lines.append(f"add element {t} cluster-ips {{ {vips} }}")
        lines.append(f"add element {t} service-ips {{ {elements} }}")
    node_ports = [s for s in services if s.node_port is not None]
    for svc in node_ports:
        ext = nft_external_chain(svc)
        lines += [f"add chain {t} {ext}", f"add rule {t} {ext} jump mark-for-masquerade",
                  f"add rule {t} {ext} goto {nft_service_chain(svc)}"]
    if node_ports:
        elements = ", ".join(f"tcp . {s.node_port} : goto {nft_external_chain(s)}" for s in node_ports)
        lines.append(f"add element {t} service-nodeports {{ {elements} }}")
    return "\n".join(lines) + "\n"


def nft_update_service(old: Service, new: Service, cluster_cidr: str) -> str:
    """One transaction for a service whose endpoints changed, as kube-proxy's partial sync does:
    new endpoint chains, the service chain flushed and rewritten, removed endpoint chains deleted."""
    t = f"ip {NFT_TABLE}"
    added = [e for e in new.endpoints if e not in old.endpoints]
    removed = [e for e in old.endpoints if e not in new.endpoints]
    lines: list[str] = []
    for ip, port in added:
        lines += _nft_endpoint_lines(new, ip, port)
    lines.append(f"flush chain {t} {nft_service_chain(new)}")
    lines += _nft_service_rules(new, cluster_cidr)
    lines += [f"delete chain {t} {nft_endpoint_chain(old, ip, port)}" for ip, port in removed]
    return "\n".join(lines) + "\n"


def nft_delete() -> str:
    return f"delete table ip {NFT_TABLE}\n"


def nft_chain_count(services: Sequence[Service]) -> int:
    return sum(1 + len(s.endpoints) + (s.node_port is not None) for s in services) + 13
