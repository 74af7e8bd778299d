"""The activation proxy: holds connections for a checkpointed pod, wakes it once, relays them.

The sk_lookup program (scaletozero/sklookup.py) hands every new connection for a checkpointed
pod's app ports to a listener this module made *inside the pod's network namespace*. The
accepted socket therefore already has the pod address and the app's port as its local address:
one listener per family serves every port of a pod, and `getsockname()` says which port the
client wanted.

For each accepted connection the proxy stops reading (the client's bytes wait in the kernel,
so memory stays bounded), asks the scaler to wake the pod (one restore however many
connections wait), dials the app and relays both ways. The two legs are asyncio Protocols
coupled for backpressure (a full write buffer on one side pauses reading on the other) and
half-close (a FIN is passed on as a FIN, the other direction keeps flowing). Nothing cuts a
long connection off. A wake that fails or takes longer than `hold_timeout` closes the held
clients with a reset, so a client never mistakes the failure for an empty answer.

Health probes (annotation zeroproxy.io/probe-response): a connection from one of the node's own
addresses (where the kubelet probes from) can be answered without a wake. "tcp": accepted and
closed with a FIN, nothing read (a TCP-socket probe only wants the handshake). "http": the
request head is read (at most PROBE_HEAD_LIMIT bytes, for at most PROBE_READ_TIMEOUT) and, if it
is an HTTP request with a `kube-probe/` User-Agent, answered `200 OK` and closed. Anything else
takes the wake path, and the bytes read while deciding are replayed to the app first.

The proxy dials the app over the pod's loopback (127.0.0.1 / ::1). The redirect is keyed by the
pod's own addresses, so the proxy's connections can never be redirected back to itself, even
while the redirect flag is on (e.g. during a dump that then fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# setns() is per thread and a socket keeps the namespace it was made in: this is how a process
# in the host namespace makes sockets in pods.
from dataplane.netns import in_netns
from scaletozero.state import ProbeResponse

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

WakeFn = Callable[[], Awaitable[None]]

PROBE_HEAD_LIMIT = 8192  # a request head larger than this is not a probe (kubelet's are ~150 bytes)
PROBE_READ_TIMEOUT = 1.0  # seconds to wait for a whole head; then it is not a probe and wakes the pod
PROBE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_REQUEST_LINE = re.compile(rb"[A-Z]{1,16} [\x21-\x7e]+ HTTP/1\.[01]")
_METHOD_PREFIX = re.compile(rb"[A-Z]{0,16}( |$)")


def probe_verdict(data: bytes, limit: int = PROBE_HEAD_LIMIT) -> bool | None:
    """Is this the whole request of a kubelet HTTP probe? None: cannot tell yet, read more.

    True only for exactly one complete request head (no body, nothing after it) with a
    `User-Agent: kube-probe/...` header: answering anything more would swallow bytes meant for
    the app. False as early as possible (first bytes not an HTTP method) so that other traffic
    does not wait for the read timeout before its wake starts.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        first = data.split(b"\r\n", 1)
        if len(data) >= limit or not _METHOD_PREFIX.match(first[0][:17]):
            return False
        if len(first) == 2 and not _REQUEST_LINE.fullmatch(first[0]):
            return False
        return None
    if end + 4 != len(data) or end + 4 > limit:
        return False
    lines = data[:end].split(b"\r\n")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        return False
    agent = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return False  # not a header line: not HTTP we would answer
        key = name.lower()
        if key == b"user-agent":
            agent = value.strip()
        elif key == b"transfer-encoding" or (key == b"content-length" and value.strip() != b"0"):
            return False  # a body follows: not a probe
    return agent is not None and agent.startswith(b"kube-probe/")


def _address(text: str) -> str:
    """One spelling per address (no IPv6 scope, compressed) so peers compare with node addresses."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).compressed
    except ValueError:
        return text


class WakeError(Exception):
    """The pod could not be woken; `reason` is one line for logs, metrics and clients' fate."""

    def __init__(self, reason: str, kind: str = "restore_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        # short, bounded label for metrics: the runtime's FailureKind when the restore failed there
        self.kind = kind


# --- network namespaces --------------------------------------------------------------------


class Netns:
    """An open handle on a pod's network namespace (stays valid even if the name is removed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def socket(self, family: socket.AddressFamily, type: int = socket.SOCK_STREAM) -> socket.socket:
        with in_netns(self.fd):
            return socket.socket(family, type)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def make_listener(netns: Netns, family: socket.AddressFamily) -> socket.socket:
    """The proxy's listener of one family, inside the pod's netns, on a random loopback port.

    Its address does not matter to sk_lookup (any listener of the right family can be
    assigned); loopback keeps it unreachable for everything else. SO_REUSEADDR is required:
    the accepted sockets inherit it and hold the app's port as their local port, and the
    restored app can bind that port next to them only if they have it (docs/runtime.md).
    """
    sock = netns.socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((LOOPBACK[family], 0))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with a RST, never a FIN: SO_LINGER 0 first, because a plain close (and asyncio's
    abort) sends a FIN whenever the receive queue happens to be empty."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


# --- metrics --------------------------------------------------------------------------------


class ScaleMetrics:
    """Prometheus metrics of scale to zero; one registry per scaler so tests never collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        buckets = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
        self.checkpoint_seconds = Histogram(
            "zeroproxy_s2z_checkpoint_seconds", "Duration of successful CRIU checkpoints", buckets=buckets, registry=r
        )
        self.restore_seconds = Histogram(
            "zeroproxy_s2z_restore_seconds", "Duration of successful restores until the app listens",
            buckets=buckets, registry=r,
        )
        self.wake_first_byte_seconds = Histogram(
            "zeroproxy_s2z_wake_connect_seconds", "From accepting a held connection to its relay starting",
            buckets=buckets, registry=r,
        )
        self.wakes = Counter("zeroproxy_s2z_wakes", "Restores started by held connections", ["pod"], registry=r)
        self.checkpoints = Counter(
            "zeroproxy_s2z_checkpoints", "Checkpoint attempts by result", ["pod", "result"], registry=r
        )
        self.failures = Counter(
            "zeroproxy_s2z_failures", "Failed checkpoints/restores by short reason", ["op", "reason"], registry=r
        )
        self.held = Gauge("zeroproxy_s2z_connections_held", "Connections waiting for a wake", registry=r)
        self.accepted = Counter(
            "zeroproxy_s2z_connections_accepted", "Connections the activation proxy accepted", ["pod"], registry=r
        )
        self.closed_unserved = Counter(
            "zeroproxy_s2z_connections_dropped", "Held connections closed without a backend, by reason",
            ["reason"], registry=r,
        )
        self.bytes = Counter(
            "zeroproxy_s2z_bytes_relayed", "Bytes relayed by the activation proxy", ["direction"], registry=r
        )
        self.state = Gauge("zeroproxy_s2z_state", "1 for the state each opted-in pod is in", ["pod", "state"],
                           registry=r)
        self.probes = Counter(
            "zeroproxy_s2z_probes_answered", "Health probes from the node answered without a wake, by kind",
            ["pod", "kind"], registry=r,
        )


# --- relay ----------------------------------------------------------------------------------


@dataclass
class ProxyCounters:
    """What the proxy did for one pod (the CLI and tests read these)."""

    accepted: int = 0  # connections the listener accepted
    held: int = 0  # accepted, waiting for the wake or the dial
    relaying: int = 0  # relays with at least one leg open
    relayed: int = 0  # connections whose relay started
    dropped: int = 0  # held connections closed without a backend
    probes: int = 0  # connections answered as health probes (never held, never a wake)
    bytes_to_app: int = 0
    bytes_to_client: int = 0
    max_buffered: int = 0  # largest write buffer seen on any leg: proves backpressure works


class _Leg(asyncio.Protocol):
    """One side of a relay. `peer` is the other side; both are set before reading starts."""

    __slots__ = ("closed", "eof", "peer", "pending", "pod", "to_app", "transport", "waiter")

    def __init__(self, pod: PodProxy, to_app: bool) -> None:
        self.pod = pod
        self.to_app = to_app  # bytes read on this leg go to the app
        self.peer: _Leg | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # read before the relay started (see data_received)
        self.eof = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None  # set while a probe check waits for bytes

    def _wake_waiter(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            # Held: keep what was read and stop reading. uvloop starts reading right after
            # connection_made, so a pause there alone does not stick; this bounds the buffer
            # to what one read returns, the rest waits in the kernel.
            self.pending.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._wake_waiter()
            return
        if peer.closed:
            return
        peer.transport.write(data)  # type: ignore[union-attr]
        self.pod.count_bytes(self.to_app, len(data))
        buffered = peer.transport.get_write_buffer_size()  # type: ignore[union-attr]
        if buffered > self.pod.counters.max_buffered:
            self.pod.counters.max_buffered = buffered

    def pause_writing(self) -> None:
        # Our transport's buffer is full: stop reading the side that fills it.
        peer = self.peer
        if peer is not None and not peer.closed and not peer.transport.is_closing():  # type: ignore[union-attr]
            peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed and not peer.transport.is_closing():  # type: ignore[union-attr]
            peer.transport.resume_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            self._wake_waiter()
            return True  # held: the FIN is passed on once the relay starts
        if peer.closed:
            return False
        if peer.transport.can_write_eof():  # type: ignore[union-attr]
            peer.transport.write_eof()  # type: ignore[union-attr]  # half-close, after buffered bytes
        if peer.eof:  # both directions are finished
            self.transport.close()  # type: ignore[union-attr]
            peer.transport.close()  # type: ignore[union-attr]
        return True  # keep our side open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake_waiter()
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is None:
                peer.transport.close()  # type: ignore[union-attr]  # flushes, then FIN
            else:
                reset(peer.transport)  # a reset stays a reset
        self.pod.leg_lost(self)


class PodProxy:
    """The proxy's state for one pod: its listeners, its held connections, its counters."""

    def __init__(self, activator: Activator, name: str, netns: Path, wake: WakeFn,
                 hold_timeout: float | None = None, probe: ProbeResponse = ProbeResponse.OFF,
                 answer_probes: Callable[[], bool] | None = None) -> None:
        if probe not in tuple(ProbeResponse):
            raise ValueError(f"probe response {probe!r}: expected one of {', '.join(ProbeResponse)}")
        self.activator = activator
        self.name = name
        self.hold_timeout = activator.hold_timeout if hold_timeout is None else hold_timeout
        self.netns = Netns(netns)
        self.wake = wake
        self.probe = ProbeResponse(probe)
        # Asked per connection: the scaler says no while the pod failed, so that a broken pod is
        # not reported healthy (the probe then retries the restore like any connection).
        self.answer_probes = answer_probes
        self.listeners: dict[socket.AddressFamily, socket.socket] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.counters = ProxyCounters()
        self._legs: set[_Leg] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def listener_ports(self) -> set[int]:
        return {s.getsockname()[1] for s in self.listeners.values()}

    @property
    def busy(self) -> int:
        """Connections the proxy holds or relays: the pod is not idle while this is non-zero."""
        return self.counters.held + self.counters.relaying

    def count_bytes(self, to_app: bool, n: int) -> None:
        m = self.activator.metrics
        if to_app:
            self.counters.bytes_to_app += n
            m.bytes.labels("to_app").inc(n)
        else:
            self.counters.bytes_to_client += n
            m.bytes.labels("to_client").inc(n)

    def leg_lost(self, leg: _Leg) -> None:
        self._legs.discard(leg)
        if leg.to_app and leg.peer is not None:  # the client leg of a relay that had started
            self.counters.relaying -= 1

    # -- accept path --------------------------------------------------------------------------

    def accepted(self) -> _Leg:
        """Protocol factory of the listeners: a client leg that does not read until relayed."""
        leg = _HeldLeg(self)
        self._legs.add(leg)
        return leg

    def start_hold(self, leg: _Leg) -> None:
        self.counters.accepted += 1
        self.activator.metrics.accepted.labels(self.name).inc()
        if self._may_be_probe(leg):
            self._spawn(self._probe(leg))
        else:
            self._hold(leg)

    def _hold(self, leg: _Leg) -> None:
        self.counters.held += 1
        self.activator.metrics.held.inc()
        self._spawn(self._serve(leg, time.monotonic()))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _may_be_probe(self, leg: _Leg) -> bool:
        """Probe answering is on, allowed now, and the connection comes from the node itself."""
        if self.probe == ProbeResponse.OFF or (self.answer_probes is not None and not self.answer_probes()):
            return False
        peer = leg.transport.get_extra_info("peername") if leg.transport is not None else None
        return bool(peer) and _address(peer[0]) in self.activator.node_addresses

    async def _probe(self, client: _Leg) -> None:
        """Answer a health probe, or hand the connection to the wake path with what was read."""
        try:
            is_probe = True if self.probe == ProbeResponse.TCP else await self._read_probe(client)
        except asyncio.CancelledError:
            reset(client.transport)
            raise
        if client.closed:
            return  # gone while we read (a reset): nothing to answer, nothing to wake for
        if not is_probe:
            self._hold(client)
            return
        tr = client.transport
        assert tr is not None
        if self.probe == ProbeResponse.HTTP:
            tr.write(PROBE_ANSWER)
        tr.close()  # after the buffered answer: a FIN, not a reset
        self.counters.probes += 1
        self.activator.metrics.probes.labels(self.name, self.probe).inc()

    async def _read_probe(self, client: _Leg) -> bool:
        """Read a request head (bounded in size and time) and say whether it is a kubelet probe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROBE_READ_TIMEOUT
        while True:
            verdict = probe_verdict(b"".join(client.pending))
            if verdict is not None:
                return verdict
            remaining = deadline - loop.time()
            if client.eof or client.closed or remaining <= 0:
                return False
            client.waiter = loop.create_future()
            client.transport.resume_reading()  # type: ignore[union-attr]  # data_received pauses again
            try:
                await asyncio.wait_for(client.waiter, remaining)
            except TimeoutError:
                return False
            finally:
                client.waiter = None
                if not client.closed:
                    client.transport.pause_reading()  # type: ignore[union-attr]

    async def _serve(self, client: _Leg, t0: float) -> None:
        m = self.activator.metrics
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.counters.held -= 1
                m.held.dec()

        try:
            try:
                await asyncio.wait_for(self.wake(), self.hold_timeout)
            except TimeoutError:
                self._drop(client, "timeout", f"not woken within {self.hold_timeout:g} s")
                return
            except WakeError as e:
                self._drop(client, e.kind, e.reason)
                return
            if client.closed:
                self._drop(client, "client_gone", "client closed while held")
                return
            try:
                await self._relay(client)
            except OSError as e:
                self._drop(client, "dial_failed", f"cannot reach the app: {e}")
                return
            release()
            m.wake_first_byte_seconds.observe(time.monotonic() - t0)
        except asyncio.CancelledError:
            reset(client.transport)
            raise
        finally:
            release()

    async def _relay(self, client: _Leg) -> None:
        loop = asyncio.get_running_loop()
        tr = client.transport
        assert tr is not None
        sock = tr.get_extra_info("socket")
        family = socket.AddressFamily(sock.family)
        local = tr.get_extra_info("sockname")
        port = local[1]
        upstream_sock = await self._dial(family, port, local[0])
        try:
            _, upstream = await loop.create_connection(lambda: _Leg(self, to_app=False), sock=upstream_sock)
        except BaseException:
            upstream_sock.close()
            raise
        if client.closed:
            upstream.transport.abort()  # type: ignore[union-attr]
            raise ConnectionResetError("client closed while the relay was set up")
        self._legs.add(upstream)
        client.peer, upstream.peer = upstream, client
        self.counters.relayed += 1
        self.counters.relaying += 1
        for data in client.pending:
            upstream.transport.write(data)  # type: ignore[union-attr]
            self.count_bytes(True, len(data))
        client.pending = []
        if client.eof:
            upstream.transport.write_eof()  # type: ignore[union-attr]
        else:
            tr.resume_reading()

    async def _dial(self, family: socket.AddressFamily, port: int, original: str) -> socket.socket:
        """Connect to the app in the pod: over loopback first (never redirected), else the pod address.

        The pod address is tried only when loopback is refused (an app bound to the pod IP alone);
        by then the wake has turned the redirect off, so it reaches the app too.
        """
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for addr in dict.fromkeys((LOOPBACK[family], original)):
            sock = self.netns.socket(family)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (addr, port)), self.activator.connect_timeout)
                return sock
            except (OSError, TimeoutError) as e:
                sock.close()
                last = e if isinstance(e, OSError) else OSError(f"connect {addr}:{port} timed out")
        assert last is not None
        raise last

    def _drop(self, client: _Leg, kind: str, reason: str) -> None:
        self.counters.dropped += 1
        self.activator.metrics.closed_unserved.labels(kind).inc()
        log.warning("%s: closing a held connection: %s", self.name, reason)
        if not client.closed:
            reset(client.transport)  # RST: a failure must not look like an empty answer

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock = make_listener(self.netns, family)
            except OSError as e:
                if family == socket.AF_INET6:
                    log.info("%s: no IPv6 listener (%s); IPv6 connections will not be held", self.name, e)
                    continue
                raise
            self.listeners[family] = sock
            server = await loop.create_server(self.accepted, sock=sock, backlog=LISTEN_BACKLOG)
            self.servers.append(server)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for leg in list(self._legs):
            if not leg.closed:
                reset(leg.transport)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        self.netns.close()


class _HeldLeg(_Leg):
    """The client side: reading is paused from the first moment until the relay starts."""

    __slots__ = ()

    def __init__(self, pod: PodProxy) -> None:
        super().__init__(pod, to_app=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]  # enough on asyncio's own loop
        self.pod.start_hold(self)


class Activator:
    """The activation proxy of one node: a PodProxy per opted-in pod, on one asyncio loop."""

    def __init__(
        self,
        metrics: ScaleMetrics | None = None,
        *,
        hold_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        node_addresses: Iterable[str] = (),
    ) -> None:
        self.metrics = metrics or ScaleMetrics()
        self.hold_timeout = hold_timeout
        self.connect_timeout = connect_timeout
        self.node_addresses: frozenset[str] = frozenset()
        self.set_node_addresses(node_addresses)
        self.pods: dict[str, PodProxy] = {}

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """The node's own addresses: the only sources whose connections may be answered as probes."""
        self.node_addresses = frozenset(_address(str(a)) for a in addresses)

    async def add(self, name: str, netns: Path, wake: WakeFn, *, hold_timeout: float | None = None,
                  probe: ProbeResponse = ProbeResponse.OFF,
                  answer_probes: Callable[[], bool] | None = None) -> PodProxy:
        """Open the listeners of one pod; the caller puts them in the sockmap."""
        if name in self.pods:
            raise ValueError(f"pod {name!r} already has an activation proxy")
        pp = PodProxy(self, name, netns, wake, hold_timeout, probe, answer_probes)
        try:
            await pp.open()
        except BaseException:
            await pp.close()
            raise
        self.pods[name] = pp
        return pp

    async def remove(self, name: str) -> None:
        pp = self.pods.pop(name, None)
        if pp is not None:
            await pp.close()

    async def close(self) -> None:
        for name in list(self.pods):
            await self.remove(name)
