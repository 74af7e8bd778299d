"""The activation proxy and the sk_lookup program without CRIU: real kernel, real netns, real app.

A pod netns runs a small Python app (echo, with a "reset" command and a switch that stops it
reading); a client pod on the same node connects to the pod IP. The sk_lookup program is linked
into the pod's netns and hands SYNs to the proxy; the test plays the scaler: its wake function
waits for a gate the test opens, then turns the redirect off, as the real one does after a
restore. This isolates the relay's behaviour (held bytes, half-close, backpressure, resets,
long connections, hold timeout) from checkpoint/restore, which test_scale_to_zero.py covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import annotations
from dataplane import bpfsys
from dataplane.netns import in_netns
from scaletozero import sklookup
from scaletozero.activator import Activator, PodProxy
from scaletozero.state import ProbeResponse
from testbed.bed import Pod, TestBed

PORT = 9000

# The app: dual-stack listener; per connection, wait until the gate file exists (so a test can
# make it stop reading), then: a first chunk starting with b"RST" closes with a reset, anything
# else is echoed until EOF, then the app half-closes.
APP = r"""
import os, socket, struct, sys, threading, time
port, gate = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(128)
def serve(c):
    while not os.path.exists(gate):
        time.sleep(0.01)
    first = True
    while True:
        data = c.recv(65536)
        if not data:
            break
        if first and data.startswith(b"RST"):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            return
        first = False
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    c.close()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class Harness:
    """sk_lookup in the pod's netns + an Activator on a uvloop thread + a test-controlled wake."""

    def __init__(self, bed: TestBed, tmp: Path) -> None:
        import uvloop

        self.node = bed.add_node("n")
        self.pod: Pod = bed.add_pod(self.node, "app")
        self.client: Pod = bed.add_pod(self.node, "client")
        self.gate_file = tmp / "gate"
        self.gate_file.write_text("")
        self.app = self.pod.run([sys.executable, "-c", APP, str(PORT), str(self.gate_file)],
                                stdout=subprocess.PIPE, text=True)
        assert self.app.stdout is not None and self.app.stdout.readline() == "ready\n"
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sk = sklookup.SkLookup(max_pods=4, max_ports=16)
        self.sk.load()
        self.link = self.sk.attach(self.pod.netns_path)
        self.slot = self.sk.alloc_slot()
        self.wakes = 0
        self.fail_wake: Exception | None = None
        self.gate: asyncio.Event = self.call(self._event)
        self.activator = Activator(hold_timeout=30.0)
        self.proxy: PodProxy = self.call(self.activator.add, "test/app", self.pod.netns_path, self.wake)
        for family, sock in self.proxy.listeners.items():
            self.sk.set_listener(self.slot, family, sock.fileno())
        self.sk.set_ports(self.slot, [self.pod.ip4, self.pod.ip6], [PORT])
        self.sk.set_redirect(self.slot, True)

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    async def wake(self) -> None:
        self.wakes += 1
        await self.gate.wait()
        if self.fail_wake is not None:
            raise self.fail_wake
        self.sk.set_redirect(self.slot, False)

    def call(self, fn: Any, *args: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    def open_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)

    def connect(self, family: int = 4, timeout: float = 30.0) -> socket.socket:
        fd = os.open(self.client.netns_path, os.O_RDONLY)
        try:
            with in_netns(fd):
                fam = socket.AF_INET if family == 4 else socket.AF_INET6
                s = socket.socket(fam, socket.SOCK_STREAM)
        finally:
            os.close(fd)
        s.settimeout(timeout)
        s.connect((self.pod.ip(family), PORT))
        return s

    def wait(self, cond: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.activator.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self.link.close()
        self.sk.close()


@pytest.fixture
def h(testbed: TestBed, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(testbed, tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def read_to_eof(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


def total_retrans(s: socket.socket) -> int:
    return struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]


# --- the program's maps --------------------------------------------------------------------------


def test_ctypes_mirrors_match_bcc() -> None:
    sk = sklookup.SkLookup(max_pods=4, max_ports=16)
    sk.load()
    try:
        assert sk.bpf is not None
        for name, key, value in (("zp_s2z_ports", sklookup.PortKey, sklookup.PortValue),
                                 ("zp_s2z_pods", ctypes.c_uint32, sklookup.PodValue),
                                 ("zp_s2z_stats", ctypes.c_uint32, sklookup.StatsValue)):
            table = sk.bpf[name.encode()]
            assert ctypes.sizeof(table.Key) == ctypes.sizeof(key), name
            # a per-CPU map's Leaf is one value per possible CPU
            ncpu = bpfsys.possible_cpus() if name == "zp_s2z_stats" else 1
            assert ctypes.sizeof(table.Leaf) == ctypes.sizeof(value) * ncpu, name
    finally:
        sk.close()


# --- relay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_bytes_and_fin_sent_while_held_reach_the_app(h: Harness, family: int) -> None:
    """The client writes and half-closes before the wake; the app gets it all, answers, and the
    client reads the echo to the app's FIN: zero retransmits, the proxy accepted it."""
    s = h.connect(family)
    payload = os.urandom(200_000)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    h.wait(lambda: h.proxy.counters.held == 1, "the connection to be held")
    assert h.wakes == 1
    h.open_gate()
    echoed = read_to_eof(s)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert total_retrans(s) == 0
    s.close()
    c = h.proxy.counters
    assert (c.accepted, c.relayed, c.dropped) == (1, 1, 0)
    assert c.bytes_to_app == c.bytes_to_client == len(payload)
    st = h.sk.stats(h.slot)
    assert (st.assigned, st.no_listener, st.assign_fail) == (1, 0, 0)


def test_after_the_flip_connections_go_straight_to_the_app(h: Harness) -> None:
    h.open_gate()
    s = h.connect()
    s.sendall(b"one")
    assert s.recv(3) == b"one"
    h.wait(lambda: not h.sk.redirect(h.slot), "the flip")
    before = h.proxy.counters.accepted
    for _ in range(5):
        d = h.connect()
        d.sendall(b"direct")
        d.shutdown(socket.SHUT_WR)
        assert read_to_eof(d) == b"direct"
        d.close()
    assert h.proxy.counters.accepted == before  # the proxy saw none of them
    assert h.sk.stats(h.slot).lookups == 6  # the program saw all six SYNs
    s.close()


def test_backpressure_keeps_the_proxy_buffer_bounded(h: Harness) -> None:
    """The app stops reading: the client's sends must block instead of piling up in the proxy."""
    h.gate_file.unlink()  # the app accepts but does not read
    h.open_gate()
    s = h.connect()
    s.settimeout(60)
    payload = os.urandom(48 << 20)
    sent = threading.Event()

    def send() -> None:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        sent.set()

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    h.wait(lambda: h.proxy.counters.bytes_to_app > 0, "the relay to start")
    # Kernel buffers on both hops fill up, then everything stops: the sender stays blocked.
    h.wait(lambda: _stable(lambda: h.proxy.counters.bytes_to_app), "the relay to stall")
    assert not sent.is_set()
    assert h.proxy.counters.bytes_to_app < len(payload)
    assert h.proxy.counters.max_buffered <= 4 << 20, h.proxy.counters.max_buffered
    h.gate_file.write_text("")  # the app reads again
    echoed = bytearray()

    def read() -> None:
        echoed.extend(read_to_eof(s))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    writer.join(120)
    reader.join(120)
    assert sent.is_set() and hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert h.proxy.counters.max_buffered <= 4 << 20
    s.close()


def _stable(value: Any, period: float = 0.3) -> bool:
    """True when value() did not change over `period` (a stalled transfer)."""
    first = value()
    time.sleep(period)
    return value() == first


def test_long_idle_relay_is_not_cut(h: Harness) -> None:
    h.open_gate()
    s = h.connect()
    s.sendall(b"hello")
    assert s.recv(5) == b"hello"
    time.sleep(3)  # no idle timeout in the proxy: the relay outlives any quiet period
    s.sendall(b"again")
    assert s.recv(5) == b"again"
    assert h.proxy.counters.relaying == 1
    s.close()


def test_a_reset_from_the_app_reaches_the_client_as_a_reset(h: Harness) -> None:
    h.open_gate()
    s = h.connect()
    s.sendall(b"RST please")
    with pytest.raises(ConnectionResetError):
        read_to_eof(s)
    s.close()


def test_hold_timeout_resets_held_clients(h: Harness) -> None:
    """The wake never completes: after hold_timeout every held client gets a reset (not a FIN
    that would look like an empty answer), and the proxy counts them as dropped."""
    h.proxy.hold_timeout = 1.0
    socks = [h.connect() for _ in range(3)]
    for s in socks:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    t0 = time.monotonic()
    for s in socks:
        with pytest.raises(ConnectionResetError):
            read_to_eof(s)
        s.close()
    assert 1.0 <= time.monotonic() - t0 < 10.0  # the configured 1 s, generously bounded
    assert h.proxy.counters.dropped == 3 and h.proxy.counters.held == 0
    assert h.activator.metrics.registry.get_sample_value(
        "zeroproxy_s2z_connections_dropped_total", {"reason": "timeout"}) == 3


def test_failed_wake_resets_held_clients_with_the_reason(h: Harness) -> None:
    from scaletozero.activator import WakeError

    h.fail_wake = WakeError("restore failed: images gone", "no_images")
    s = h.connect()
    h.wait(lambda: h.proxy.counters.held == 1, "held")
    h.open_gate()
    with pytest.raises(ConnectionResetError):
        read_to_eof(s)
    s.close()
    assert h.activator.metrics.registry.get_sample_value(
        "zeroproxy_s2z_connections_dropped_total", {"reason": "no_images"}) == 1


def test_the_proxy_never_dials_itself_while_the_redirect_is_on(h: Harness) -> None:
    """Even with the redirect left on, the proxy's own connection reaches the app (over the
    pod's loopback, which the redirect never matches): one accept, not a loop."""

    async def wake_without_flip() -> None:
        h.wakes += 1

    h.proxy.wake = wake_without_flip
    s = h.connect()
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == b"ping"
    s.close()
    assert h.sk.redirect(h.slot)
    assert h.proxy.counters.accepted == 1 and h.sk.stats(h.slot).assigned == 1


def test_fifty_concurrent_held_connections_complete_without_retransmits(h: Harness) -> None:
    socks = [h.connect() for _ in range(50)]
    for i, s in enumerate(socks):
        s.sendall(f"conn {i}".encode())
        s.shutdown(socket.SHUT_WR)
    h.wait(lambda: h.proxy.counters.held == 50, "all 50 held")
    h.open_gate()
    for i, s in enumerate(socks):
        assert read_to_eof(s) == f"conn {i}".encode()
        assert total_retrans(s) == 0
        s.close()
    assert h.proxy.counters.relayed == 50 and h.proxy.counters.dropped == 0


# --- health probes (the client pod plays the node: its address is given as a node address) ------

KUBE_PROBE = b"GET /healthz HTTP/1.1\r\nHost: app\r\nUser-Agent: kube-probe/1.34\r\nConnection: close\r\n\r\n"


def probing(h: Harness, mode: ProbeResponse) -> None:
    h.proxy.probe = mode
    h.activator.set_node_addresses([h.client.ip4, h.client.ip6])


def test_http_probe_from_the_node_is_answered_and_wakes_nothing(h: Harness) -> None:
    probing(h, ProbeResponse.HTTP)
    s = h.connect()
    s.sendall(KUBE_PROBE)
    assert read_to_eof(s) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    s.close()
    c = h.proxy.counters
    assert (h.wakes, c.accepted, c.probes, c.held, c.relayed) == (0, 1, 1, 0, 0)
    assert h.activator.metrics.registry.get_sample_value(
        "zeroproxy_s2z_probes_answered_total", {"pod": "test/app", "kind": "http"}) == 1


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_probe_from_the_node_is_closed_with_a_fin(h: Harness, family: int) -> None:
    probing(h, ProbeResponse.TCP)
    s = h.connect(family)
    assert s.recv(16) == b""  # a FIN (a reset would raise)
    s.close()
    assert (h.wakes, h.proxy.counters.probes) == (0, 1)


@pytest.mark.parametrize("first", [
    b"\x16\x03\x01\x00\x05hello",  # not HTTP: decided at once
    b"GET / HTTP/1.1\r\nUser-Agent: curl/8.0\r\n\r\n",  # HTTP, not a probe
    KUBE_PROBE + b"more",  # a probe head with bytes after it: they are the app's
])
def test_other_bytes_from_the_node_wake_and_reach_the_app_in_full(h: Harness, first: bytes) -> None:
    probing(h, ProbeResponse.HTTP)
    h.open_gate()
    s = h.connect()
    rest = os.urandom(100_000)
    s.sendall(first + rest)
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == first + rest  # the app echoed what the proxy read while deciding, too
    s.close()
    c = h.proxy.counters
    assert (h.wakes, c.probes, c.relayed, c.bytes_to_app) == (1, 0, 1, len(first + rest))


def test_an_unfinished_head_wakes_after_the_read_timeout_and_loses_nothing(h: Harness) -> None:
    probing(h, ProbeResponse.HTTP)
    h.open_gate()
    s = h.connect()
    s.sendall(b"GET /slow HTTP/1.1\r\n")  # a head that does not end within PROBE_READ_TIMEOUT
    h.wait(lambda: h.wakes == 1, "the wake after the read timeout")
    s.sendall(b"User-Agent: kube-probe/1.34\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == b"GET /slow HTTP/1.1\r\nUser-Agent: kube-probe/1.34\r\n\r\n"
    s.close()
    assert h.proxy.counters.probes == 0


def test_probes_from_other_addresses_or_while_not_allowed_wake(h: Harness) -> None:
    h.proxy.probe = ProbeResponse.HTTP
    h.activator.set_node_addresses(["192.0.2.1"])  # not the client
    h.open_gate()
    s = h.connect()
    s.sendall(KUBE_PROBE)
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == KUBE_PROBE  # the echo app answered: it was relayed
    s.close()
    probing(h, ProbeResponse.HTTP)
    h.proxy.answer_probes = lambda: False  # what the scaler says for a failed pod
    h.sk.set_redirect(h.slot, True)
    s = h.connect()
    s.sendall(KUBE_PROBE)
    s.shutdown(socket.SHUT_WR)
    assert read_to_eof(s) == KUBE_PROBE
    s.close()
    assert (h.wakes, h.proxy.counters.probes, h.proxy.counters.relayed) == (2, 0, 2)


# --- pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("5m", 300.0), ("30s", 30.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1.5h", 5400.0), (" 2s ", 2.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert annotations.parse_duration(text) == seconds
    assert annotations.parse_duration(annotations.format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "-5m", "5 m", "5d", "m", "1h-2m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(annotations.DurationError):
        annotations.parse_duration(text)


@pytest.mark.parametrize(("given", "expect", "problem"), [
    ({}, None, ""),
    ({annotations.SCALE_TO_ZERO: "false"}, None, ""),
    ({annotations.SCALE_TO_ZERO: "True"}, annotations.ScaleToZero(300.0, 30.0), ""),
    (annotations.annotate("10s", "5s"), annotations.ScaleToZero(10.0, 5.0), ""),
    ({annotations.SCALE_TO_ZERO: "yes"}, None, 'expected "true", "false" or "dry-run"'),
    ({annotations.SCALE_TO_ZERO: "Dry-Run", annotations.IDLE_TIMEOUT: "1m"},
     annotations.ScaleToZero(60.0, 30.0, dry_run=True), ""),
    (annotations.annotate("0.5s"), None, "must be between 1s and 168h"),
    (annotations.annotate("five minutes"), None, "is not a duration"),
    (annotations.annotate("1m", "20m"), None, f"{annotations.RESTORE_TIMEOUT}='20m': must be between"),
])
def test_annotations(given: dict[str, str], expect: annotations.ScaleToZero | None, problem: str) -> None:
    cfg, problems = annotations.parse(given, "default/web")
    assert cfg == expect
    if problem:
        assert len(problems) == 1 and problem in problems[0] and problems[0].startswith("default/web: ")
    else:
        assert problems == []
