"""Small traffic tools for functional tests: an identity/echo server and a request/reply client.

They run inside test-bed pods as ``python -m testbed.nettools serve|client ...``. The server tells
the client who answered and which peer address it saw, because that is what a load balancer test
has to check (which backend, was the source NATed). The client prints one JSON line per attempt,
so a test can assert on every single request instead of a summary, and never hangs: every socket
operation has a short timeout and a failure becomes an error line with the errno name.

Python costs a few hundred microseconds per request; that is fine for correctness tests, while
``bench/`` uses native tools for numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import itertools
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Linux value; Python 3.11's socket module does not export it.
# A script for `python -c` in a pod (host port count): `count` sequential HTTP/1.0 GETs of /, and
# per request the time from just before connect() to the first byte and to the end of the
# response, whether the status was 200, and the start of the body. The bench's and the demo's
# timed requests.
TIMED_GETS = r"""
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = s.recv(65536)
    t1 = time.perf_counter()
    while chunk := s.recv(65536):
        data += chunk
    t2 = time.perf_counter()
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    out.append({"first_byte": t1 - t0, "total": t2 - t0, "ok": head.split(b"\r\n", 1)[0].split()[1:2] == [b"200"],
                "body": body[:200].decode(errors="replace")})
print(json.dumps(out))
"""

IP_PKTINFO = 8
REQUEST = b"zeroproxy-request\n"
PROTOS = ("tcp", "udp-connected", "udp-unconnected")
FAMILIES = ("both", "4", "6")
# A TCP identity request without a newline is still answered once it reaches this size, so a
# client that sends arbitrary bytes gets a reply instead of a stalled connection.
MAX_LINE = 65536

Address = list[Any]  # [host, port] as it appears in the JSON lines


# --- helpers shared by tests, the demo and bench/ -----------------------------------------------


def format_target(host: str, port: int) -> str:
    """``host:port`` with brackets for IPv6, the form ``client --target`` accepts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(target: str) -> tuple[str, int, socket.AddressFamily]:
    """Split ``ADDR:PORT`` / ``[ADDR]:PORT`` into a literal address, port and address family."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad target {target!r}: expected [ADDR]:PORT")
    else:
        host, sep, port = target.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad target {target!r}: expected ADDR:PORT (IPv6 in brackets)")
    addr = ipaddress.ip_address(host)
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return str(addr), int(port), family


def serve_argv(
    name: str,
    *,
    tcp: Iterable[int] = (),
    udp: Iterable[int] = (),
    echo: bool = False,
    family: str = "both",
    bind: Iterable[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The command line that starts a server; kept next to the parser so the two cannot drift."""
    argv = [python, "-m", "testbed.nettools", "serve", "--name", name, "--family", family]
    argv += [x for port in tcp for x in ("--tcp", str(port))]
    argv += [x for port in udp for x in ("--udp", str(port))]
    argv += [x for addr in bind for x in ("--bind", addr)]
    if echo:
        argv.append("--echo")
    return argv


def client_argv(
    target: str,
    *,
    proto: str = "tcp",
    count: int = 1,
    concurrency: int = 1,
    interval: float = 0.0,
    timeout: float = 2.0,
    until_file: str | None = None,
    echo_bytes: int = 0,
    python: str = sys.executable,
) -> list[str]:
    """The command line that runs a client; see ``client --help`` for the meaning of each option."""
    argv = [python, "-m", "testbed.nettools", "client", "--target", target, "--proto", proto,
            "--count", str(count), "--concurrency", str(concurrency), "--interval", str(interval),
            "--timeout", str(timeout)]
    if until_file is not None:
        argv += ["--until-file", until_file]
    if echo_bytes:
        argv += ["--echo-bytes", str(echo_bytes)]
    return argv


def parse_results(stdout: str) -> list[dict[str, Any]]:
    """The per-attempt records of a client run, in output order, without the summary line.

    Raises ValueError on a line that is not JSON: the client prints nothing else, so such a line
    means something is broken and a test should say so rather than count fewer attempts.
    """
    results = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"not a result record: {line!r}")
        if not record.get("summary"):
            results.append(record)
    return results


def parse_summary(stdout: str) -> dict[str, Any] | None:
    """The final summary line of a client run, or None when the client did not finish."""
    for line in reversed(stdout.splitlines()):
        if line.strip():
            record = json.loads(line)
            return record if isinstance(record, dict) and record.get("summary") else None
    return None


def _addr(sockaddr: Sequence[Any]) -> Address:
    """[host, port] from a socket address; drops IPv6 flow info and scope, which tests never compare."""
    host = str(sockaddr[0]).split("%", 1)[0]
    return [host, int(sockaddr[1])]


def _errname(exc: BaseException) -> str:
    """A stable short name for a failure: the errno symbol when there is one."""
    if isinstance(exc, TimeoutError) and not exc.errno:
        return "ETIMEDOUT"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, ValueError):
        return "EBADMSG"  # the reply was not the JSON the server sends
    return type(exc).__name__


# --- server ------------------------------------------------------------------------------------


def _identity(name: str, proto: str, peer: Sequence[Any], local: Sequence[Any]) -> bytes:
    return (json.dumps({"server_name": name, "proto": proto, "peer": _addr(peer),
                        "local": _addr(local), "pid": os.getpid()}) + "\n").encode()


class _IdentityProtocol(asyncio.Protocol):
    """Answers each request line with the identity line; one connection can carry many requests."""

    __slots__ = ("_buf", "_name", "_reply", "_transport")

    def __init__(self, name: str) -> None:
        self._name = name
        self._buf = b""
        self._reply = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._reply = _identity(self._name, "tcp", transport.get_extra_info("peername"),
                                transport.get_extra_info("sockname"))

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        lines = self._buf.count(b"\n")
        if lines:
            self._transport.write(self._reply * lines)
            self._buf = self._buf[self._buf.rindex(b"\n") + 1:]
        if len(self._buf) >= MAX_LINE:
            self._transport.write(self._reply)
            self._buf = b""

    def eof_received(self) -> bool:
        if self._buf and self._transport is not None:
            self._transport.write(self._reply)
            self._buf = b""
        return False  # close our side once the reply is flushed


class _EchoProtocol(asyncio.Protocol):
    """Echoes bytes back; stops reading while the peer is not draining, so memory stays bounded."""

    __slots__ = ("_transport",)

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def pause_writing(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    def eof_received(self) -> bool:
        return False


def _udp_socket(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A UDP socket that learns each datagram's destination address, to reply from exactly it.

    Replying from the routed default source would break a client that checks the reply source
    whenever the server host has several addresses (a node with an underlay IP and a router IP).
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _udp_readable(sock: socket.socket, name: str) -> None:
    """Answer every queued datagram with the identity line, sent from the address it was sent to."""
    port = sock.getsockname()[1]
    while True:
        try:
            _data, ancdata, _flags, src = sock.recvmsg(65535, socket.CMSG_SPACE(64))
        except BlockingIOError:
            return
        except OSError:
            continue  # a queued ICMP error for an earlier reply; the next datagram is unaffected
        cmsgs = []
        local: list[Any] = list(sock.getsockname()[:2])
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                dst = data[8:12]  # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                local = [socket.inet_ntop(socket.AF_INET, dst), port]
                cmsgs.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst, bytes(4))))
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                dst = data[:16]  # struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
                local = [socket.inet_ntop(socket.AF_INET6, dst), port]
                cmsgs.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", dst, 0)))
        try:
            sock.sendmsg([_identity(name, "udp", src, local)], cmsgs, 0, src)
        except OSError:
            continue  # the client is gone; nothing to tell anyone


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    binds: list[tuple[socket.AddressFamily, str]] = []
    if args.bind:
        for host in args.bind:
            version = ipaddress.ip_address(host).version
            binds.append((socket.AF_INET6 if version == 6 else socket.AF_INET, host))
    else:
        if args.family in ("both", "4"):
            binds.append((socket.AF_INET, "0.0.0.0"))
        if args.family in ("both", "6"):
            binds.append((socket.AF_INET6, "::"))

    servers: list[asyncio.AbstractServer] = []
    udp_socks: list[socket.socket] = []
    protocol = _EchoProtocol if args.echo else (lambda: _IdentityProtocol(args.name))
    for family, host in binds:
        for port in args.tcp:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family: peers then show up as plain IPv4, not ::ffff:a.b.c.d.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            servers.append(await loop.create_server(protocol, sock=sock, backlog=1024))
        for port in args.udp:
            sock = _udp_socket(family, host, port)
            udp_socks.append(sock)
            loop.add_reader(sock.fileno(), _udp_readable, sock, args.name)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for sock in udp_socks:
        loop.remove_reader(sock.fileno())
        sock.close()


# --- client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClientOptions:
    host: str
    port: int
    family: socket.AddressFamily
    proto: str
    timeout: float
    echo_bytes: int


def _readline(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed before the reply")
        buf += chunk
    return buf


def _echo(sock: socket.socket, size: int, timeout: float) -> bool:
    """Send ``size`` bytes and read them back, interleaved so neither side's buffers can deadlock."""
    payload = os.urandom(size)
    received = bytearray()
    sent = 0
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while len(received) < size:
            events = sel.select(timeout)
            if not events:
                raise TimeoutError(errno.ETIMEDOUT, "echo stalled")
            _key, mask = events[0]
            if mask & selectors.EVENT_WRITE and sent < size:
                sent += sock.send(payload[sent:sent + 65536])
                if sent == size:
                    sel.modify(sock, selectors.EVENT_READ)
            if mask & selectors.EVENT_READ:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "connection closed during echo")
                received += chunk
    return bytes(received) == payload


def _apply_identity(result: dict[str, Any], reply: bytes) -> None:
    ident = json.loads(reply)
    result["server_name"] = ident["server_name"]
    result["peer_seen_by_server"] = ident["peer"]
    result["server_local"] = ident["local"]


def _attempt(opts: _ClientOptions, seq: int) -> dict[str, Any]:
    """One connect/request/reply/close cycle; every failure is recorded, never raised."""
    result: dict[str, Any] = {
        "seq": seq, "proto": opts.proto, "target": [opts.host, opts.port], "ok": False,
        "server_name": None, "peer_seen_by_server": None, "server_local": None, "getpeername": None,
        "sockname": None, "reply_source": None, "error": None, "connect_ms": None, "total_ms": None,
    }
    kind = socket.SOCK_STREAM if opts.proto == "tcp" else socket.SOCK_DGRAM
    target = (opts.host, opts.port)
    start = time.perf_counter()
    sock = socket.socket(opts.family, kind)
    try:
        sock.settimeout(opts.timeout)
        if opts.proto == "udp-unconnected":
            # connect_ms is the sendto() here: the first syscall a socket load balancer sees.
            try:
                sock.sendto(REQUEST, target)
            finally:
                result["connect_ms"] = (time.perf_counter() - start) * 1000
            result["sockname"] = _addr(sock.getsockname())
            reply, src = sock.recvfrom(65535)
            result["reply_source"] = _addr(src)
            _apply_identity(result, reply)
            # A DNS-style client drops a reply whose source is not where it sent the query.
            expected = [str(ipaddress.ip_address(opts.host)), opts.port]
            source = [str(ipaddress.ip_address(result["reply_source"][0])), result["reply_source"][1]]
            if source != expected:
                result["error"] = "source_mismatch"
                return result
        else:
            try:
                sock.connect(target)
            finally:
                result["connect_ms"] = (time.perf_counter() - start) * 1000
            result["getpeername"] = _addr(sock.getpeername())
            result["sockname"] = _addr(sock.getsockname())
            if opts.proto == "tcp" and opts.echo_bytes:
                if not _echo(sock, opts.echo_bytes, opts.timeout):
                    result["error"] = "echo_mismatch"
                    return result
            elif opts.proto == "tcp":
                sock.sendall(REQUEST)
                _apply_identity(result, _readline(sock))
            else:
                sock.send(REQUEST)
                _apply_identity(result, sock.recv(65535))
        result["ok"] = True
    except (OSError, ValueError, KeyError) as exc:
        result["error"] = _errname(exc)
    finally:
        sock.close()
        result["total_ms"] = (time.perf_counter() - start) * 1000
    return result


def _run_client(args: argparse.Namespace) -> int:
    host, port, family = parse_target(args.target)
    opts = _ClientOptions(host, port, family, args.proto, args.timeout, args.echo_bytes)
    seqs = itertools.count()
    lock = threading.Lock()
    results: list[dict[str, Any]] = []

    def worker() -> None:
        while True:
            if args.until_file and os.path.exists(args.until_file):
                return
            with lock:
                seq = next(seqs)
            if args.count and seq >= args.count:
                return
            result = _attempt(opts, seq)
            line = json.dumps(result)
            with lock:
                results.append(result)
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            if args.interval:
                time.sleep(args.interval)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = sum(1 for r in results if r["ok"])
    summary = {
        "summary": True, "attempts": len(results), "ok": ok, "failed": len(results) - ok,
        "errors": dict(Counter(r["error"] for r in results if r["error"])),
        "servers": dict(Counter(r["server_name"] for r in results if r["server_name"])),
        "elapsed_s": time.perf_counter() - started,
    }
    print(json.dumps(summary), flush=True)
    return 0 if ok == len(results) else 1


# --- command line ------------------------------------------------------------------------------


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.nettools",
        description="Identity/echo server and request/reply client for zeroproxy functional tests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python -m testbed.nettools serve --name web-1 --tcp 8080 --udp 5353
  python -m testbed.nettools serve --name echo --tcp 9000 --echo --family 6
  python -m testbed.nettools client --target 10.96.0.10:80 --proto tcp --count 600
  python -m testbed.nettools client --target [fd00:96::a]:53 --proto udp-unconnected --count 5
  python -m testbed.nettools client --target 10.96.0.10:80 --interval 0.01 --until-file /tmp/stop
""",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="answer TCP requests and UDP datagrams with the server identity")
    serve.add_argument("--name", required=True, help="identity reported to clients (e.g. the pod name)")
    serve.add_argument("--tcp", type=_port, action="append", default=[], metavar="PORT",
                       help="TCP port to listen on (repeatable)")
    serve.add_argument("--udp", type=_port, action="append", default=[], metavar="PORT",
                       help="UDP port to listen on (repeatable)")
    serve.add_argument("--family", choices=FAMILIES, default="both",
                       help="address families to listen on when --bind is not given (default: both)")
    serve.add_argument("--ipv6", dest="family", action="store_const", const="6",
                       help="shorthand for --family 6 (IPv6 only)")
    serve.add_argument("--bind", action="append", default=[], metavar="ADDR",
                       help="listen on this address only (repeatable); overrides --family")
    serve.add_argument("--echo", action="store_true",
                       help="TCP echoes every byte back instead of answering with the identity")

    client = sub.add_parser("client", help="run request/reply cycles and print one JSON line each")
    client.add_argument("--target", required=True, help="ADDR:PORT or [ADDR]:PORT")
    client.add_argument("--proto", choices=PROTOS, default="tcp")
    client.add_argument("--count", type=int, default=1,
                        help="number of attempts; 0 = until --until-file appears (default: 1)")
    client.add_argument("--concurrency", type=int, default=1, help="parallel workers (default: 1)")
    client.add_argument("--interval", type=float, default=0.0,
                        help="seconds each worker sleeps between attempts (default: 0)")
    client.add_argument("--timeout", type=float, default=2.0,
                        help="seconds allowed for each socket operation (default: 2)")
    client.add_argument("--until-file", metavar="PATH",
                        help="stop once this file exists (checked before every attempt)")
    client.add_argument("--echo-bytes", type=int, default=0, metavar="N",
                        help="TCP only: send N random bytes to an --echo server and verify them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.tcp and not args.udp:
            parser.error("serve needs at least one --tcp or --udp port")
        try:
            asyncio.run(_serve(args))
        except KeyboardInterrupt:
            pass
        return 0
    if args.count < 0 or args.concurrency < 1 or args.timeout <= 0:
        parser.error("--count must be >= 0, --concurrency >= 1, --timeout > 0")
    if args.count == 0 and not args.until_file:
        parser.error("--count 0 needs --until-file")
    if args.echo_bytes and args.proto != "tcp":
        parser.error("--echo-bytes only works with --proto tcp")
    try:
        parse_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    return _run_client(args)


if __name__ == "__main__":
    sys.exit(main())
