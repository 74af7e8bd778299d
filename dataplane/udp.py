"""Connected UDP sockets left pointing at a backend that left its service: found and destroyed.

The socket hooks translate a connected UDP socket once, at connect(). When that backend goes
(a DNS pod restarted), the socket keeps sending into the void and never notices. Cilium hit
this and destroys such sockets; so do we, with sock_diag's SOCK_DESTROY (what `ss -K` sends;
kernel CONFIG_INET_DIAG_DESTROY): the kernel aborts the socket, the application's next recv()
fails with ECONNABORTED, and its next socket is translated afresh to a live backend.

Only sockets the hooks connected through that very frontend are touched: a socket is a
candidate when it is a connected UDP socket whose peer is the gone backend, and it is destroyed
only when the reverse-NAT map holds (its cookie, that backend) -> that frontend. A pod talking
to the backend's address directly keeps its socket.

sock_diag sees one network namespace at a time, so the namespaces are those of the processes
in the agent's cgroup tree (every pod and host process the socket hooks serve).

bpf_sock_destroy() from a socket iterator (kernel 6.5) would do the same in BPF, but bcc 0.26
can neither load iterator programs with kfunc calls nor pin their links; the netlink way needs
nothing but CAP_NET_ADMIN (see docs/socket-lb.md).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DESTROY, inet_diag_req
from pyroute2.netlink.exceptions import NetlinkError

from dataplane import maps
from dataplane.netns import in_netns

log = logging.getLogger(__name__)

UDP_CONNECTED = 1 << 1  # sk_state TCP_ESTABLISHED (1): what a connected UDP socket reports

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (frontend address, frontend port, backend address, backend port) of a UDP service port whose
# backend is gone from that frontend
StalePair = tuple[IPAddress, int, IPAddress, int]
# (cookie, backend address, backend port) -> (frontend address, frontend port), or None
RnatLookup = Callable[[int, IPAddress, int], tuple[IPAddress, int] | None]


@dataclass(frozen=True)
class Destroyed:
    pid: int  # a process of the network namespace the socket was in
    local: str
    peer: str
    frontend: str


def namespaces(cgroup: Path) -> list[int]:
    """One pid per network namespace of the processes in ``cgroup`` and below."""
    seen: dict[tuple[int, int], int] = {}
    for procs in sorted(Path(cgroup).rglob("cgroup.procs")):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            continue  # the cgroup went meanwhile
        for pid in pids:
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue  # exited
            seen.setdefault((st.st_dev, st.st_ino), pid)
    return sorted(seen.values())


def _unmapped(addr: IPAddress) -> IPAddress:
    return addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped else addr


def _words(addr: IPAddress) -> tuple[int, int, int, int]:
    if addr.version == 4:
        return (int.from_bytes(addr.packed, "big"), 0, 0, 0)
    return struct.unpack(">4I", addr.packed)


def destroy_stale(cgroup: Path, pairs: Iterable[StalePair], rnat: RnatLookup) -> list[Destroyed]:
    """Destroy the connected UDP sockets that the socket hooks sent to a backend in ``pairs``
    through that pair's frontend. Returns what was destroyed; a namespace that cannot be read
    is logged and skipped (its process may have exited meanwhile)."""
    wanted = {(_unmapped(b), bport): set() for _, _, b, bport in pairs}
    for f, fport, b, bport in pairs:
        wanted[(_unmapped(b), bport)].add((_unmapped(f), fport))
    if not wanted:
        return []
    out: list[Destroyed] = []
    for pid in namespaces(cgroup):
        try:
            out += _destroy_in(pid, wanted, rnat)
        except (OSError, NetlinkError) as e:
            log.debug("stale UDP sockets: netns of pid %d: %s", pid, e)
    return out


def _destroy_in(pid: int, wanted: dict[tuple[IPAddress, int], set[tuple[IPAddress, int]]],
                rnat: RnatLookup) -> list[Destroyed]:
    out = []
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with in_netns(fd), DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for m in diag.get_sock_stats(family=family, states=UDP_CONNECTED, protocol=socket.IPPROTO_UDP):
                    peer = ipaddress.ip_address(m["idiag_dst"])
                    key = (_unmapped(peer), m["idiag_dport"])
                    fronts = wanted.get(key)
                    if fronts is None:
                        continue
                    via = rnat(m["idiag_cookie"], *key)
                    if via is None or (_unmapped(via[0]), via[1]) not in fronts:
                        continue  # not connected through that frontend: someone talking to the pod itself
                    local = ipaddress.ip_address(m["idiag_src"])
                    req = inet_diag_req()
                    req["sdiag_family"] = family
                    req["sdiag_protocol"] = socket.IPPROTO_UDP
                    req["idiag_states"] = UDP_CONNECTED
                    req["idiag_sport"] = m["idiag_sport"]
                    req["idiag_dport"] = m["idiag_dport"]
                    req["idiag_src"] = _words(local)
                    req["idiag_dst"] = _words(peer)
                    req["idiag_if"] = m["idiag_if"]
                    req["idiag_cookie"] = m["idiag_cookie"]
                    try:
                        tuple(diag.nlm_request(req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK))
                    except NetlinkError as e:
                        if e.code == 2:  # ENOENT: closed meanwhile
                            continue
                        raise
                    out.append(Destroyed(pid, f"{local}:{m['idiag_sport']}", f"{peer}:{m['idiag_dport']}",
                                         f"{via[0]}:{via[1]}"))
    finally:
        os.close(fd)
    return out


def rnat_lookup(v4_table, v6_table) -> RnatLookup:
    """A lookup in the socket hooks' reverse-NAT maps (bcc tables of zp_rnat4 / zp_rnat6)."""

    def lookup(cookie: int, backend: IPAddress, port: int) -> tuple[IPAddress, int] | None:
        key_t, value_t, table = ((maps.Rnat4Key, maps.Rnat4Value, v4_table) if backend.version == 4
                                 else (maps.Rnat6Key, maps.Rnat6Value, v6_table))
        key = key_t(cookie=cookie, port=maps.htons(port))
        ctypes.memmove(key.address, backend.packed, len(backend.packed))
        try:
            raw = table[table.Key.from_buffer_copy(bytes(key))]
        except KeyError:
            return None
        v = value_t.from_buffer_copy(bytes(raw))
        return ipaddress.ip_address(bytes(v.address)), maps.ntohs(v.port)

    return lookup
