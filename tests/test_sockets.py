"""scaletozero/sockets.py on real sockets: which ports a process listens on, and which of its
listeners have SO_REUSEADDR (read from the process's own sockets through pidfd_getfd)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from scaletozero.sockets import TIME_WAIT, NetnsSockets, process_listen_ports, process_listeners

SERVER = """
import socket, sys
out = []
for reuse in (1, 0, 1):
    s = socket.socket()
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    out.append((s.getsockname()[1], reuse))
    globals().setdefault("keep", []).append(s)
# A second listener on the first port, without SO_REUSEADDR, on another address: the port then
# counts as not all-REUSEADDR.
t = socket.socket()
t.bind(("127.0.0.2", out[2][0]))
t.listen()
print(" ".join(f"{p}:{r}" for p, r in out), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def server() -> Iterator[tuple[int, dict[int, bool]]]:
    """A process in a netns of its own, listening as SERVER says; (pid, port -> REUSEADDR)."""
    name = f"zp-sock-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c", SERVER],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ports = dict(map(int, item.split(":")) for item in proc.stdout.readline().split())
            yield proc.pid, {p: bool(r) for p, r in ports.items()}
        finally:
            proc.kill()
            proc.communicate()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_listeners_and_their_reuseaddr(server: tuple[int, dict[int, bool]]) -> None:
    pid, made = server
    reuse, plain, shared = list(made)
    assert process_listen_ports([pid]) == {reuse, plain, shared}
    assert process_listeners([pid]) == {reuse: True, plain: False, shared: False}
    assert process_listeners([pid], reuseaddr=False) == dict.fromkeys(made, False)
    with NetnsSockets(f"/proc/{pid}/ns/net") as sk:
        assert sk.tcp(TIME_WAIT) == []
    assert process_listeners([]) == {}
