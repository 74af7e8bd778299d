"""TCP sockets of a network namespace, asked of the kernel with sock_diag: the one reader.

The scaler asks for idle detection (established and half-open connections on app ports) and for
the wake (until the app's ports LISTEN again); the runc driver asks which ports a container
listens on before it dumps it. Both go through :class:`NetnsSockets`.

Why sock_diag (pyroute2's ``DiagSocket``, what `ss` uses) and not /proc/net/tcp{,6}: the /proc
tables walk the kernel's whole established hash, sized by the machine's memory and shared by
every netns, while a sock_diag dump filtered to LISTEN walks only the listening hash. Measured
here (24 GiB, load ~10): /proc 27 ms per read (median), sock_diag LISTEN 1.6 ms; the wake polls
for LISTEN every 2 ms (docs/architecture-decisions.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyroute2 import DiagSocket
from pyroute2.netlink.exceptions import NetlinkError

from dataplane.netns import in_netns

log = logging.getLogger(__name__)

# TCP states (include/net/tcp_states.h) and their bits in a sock_diag state filter.
TCP_ESTABLISHED = 1
TCP_SYN_RECV = 3
TCP_TIME_WAIT = 6
TCP_LISTEN = 10
ESTABLISHED = 1 << TCP_ESTABLISHED
SYN_RECV = 1 << TCP_SYN_RECV
TIME_WAIT = 1 << TCP_TIME_WAIT
LISTEN = 1 << TCP_LISTEN


INET_DIAG_INFO = 1 << (2 - 1)  # the tcp_info extension of a sock_diag request (linux/inet_diag.h)


@dataclass(frozen=True)
class TcpSocket:
    state: int  # TCP_* above
    local_port: int
    inode: int  # the socket's inode: matches a process's fd link "socket:[inode]"
    cookie: int = 0  # the kernel's socket cookie: one connection, for as long as it lives
    # With info=True: milliseconds since the connection last sent or received data (tcp_info's
    # last_data_sent/last_data_recv, the smaller); None without it.
    quiet_ms: int | None = None


class NetnsSockets:
    """sock_diag queries on one network namespace, held open by fd (valid even if its name goes).

    Each query makes its netlink socket inside the netns, in the calling thread: a socket keeps
    the netns it was made in, and pyroute2 makes one socket per thread behind one object, so a
    socket kept between calls could be made in some other thread's netns. Making it costs about
    as much as the query (6 ms in all, median, against 27 ms for /proc, measured together).
    Blocks: asyncio code calls it with ``asyncio.to_thread``.
    """

    def __init__(self, netns: str | os.PathLike[str]) -> None:
        self.fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)

    def tcp(self, states: int, *, info: bool = False) -> list[TcpSocket]:
        """Every TCP socket (IPv4 and IPv6) in one of the states of the filter (LISTEN | ...);
        with ``info`` each also says how long it has carried no data (``quiet_ms``)."""
        out = []
        with in_netns(self.fd), DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    msgs = diag.get_sock_stats(family=family, states=states,
                                               extensions=INET_DIAG_INFO if info else 0)
                except NetlinkError:
                    if family == socket.AF_INET6:
                        continue  # no IPv6 in this kernel
                    raise
                for m in msgs:
                    tcpi = m.get_attr("INET_DIAG_INFO") if info else None
                    quiet = (min(tcpi["tcpi_last_data_recv"], tcpi["tcpi_last_data_sent"])
                             if tcpi is not None else None)
                    out.append(TcpSocket(m["idiag_state"], m["idiag_sport"], m["idiag_inode"],
                                         m["idiag_cookie"], quiet))
        return out

    def listening(self) -> set[int]:
        """The ports with a LISTEN socket."""
        return {s.local_port for s in self.tcp(LISTEN)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetnsSockets:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _socket_fds(pids: list[int]) -> dict[int, tuple[int, int]]:
    """Socket inode -> (pid, fd) of one process holding it, from the processes' fd tables."""
    found: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited meanwhile
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.setdefault(int(target[8:-1]), (pid, int(fd)))
    return found


def process_listen_ports(pids: list[int]) -> set[int]:
    """TCP ports these processes listen on (one netns: that of the first).

    Matches the socket inodes in the processes' fd tables with the LISTEN sockets of their netns,
    so other listeners in the same pod netns (the activation proxy's) are not counted.
    """
    return set(process_listeners(pids, reuseaddr=False))


_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike


def _reuseaddr(pid: int, fd: int) -> bool:
    """Whether another process's socket has SO_REUSEADDR: a copy of it through pidfd_getfd (Linux
    5.6; ptrace access to the process, which the agent has), asked and closed. False when it
    cannot be read: then the caller takes the careful path."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        copy = ctypes.CDLL(None, use_errno=True).syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            return False
        try:
            with socket.socket(fileno=os.dup(copy)) as s:
                return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
        finally:
            os.close(copy)
    finally:
        os.close(pidfd)


def process_listeners(pids: list[int], *, reuseaddr: bool = True) -> dict[int, bool]:
    """The TCP ports these processes listen on -> whether every listener there has SO_REUSEADDR
    (always False with ``reuseaddr=False``, which does not ask).

    A restore re-binds each listener with the options it had. One with SO_REUSEADDR binds next to
    the port's TIME_WAIT sockets; one without needs them cleared first (:func:`clear_time_wait`).
    """
    if not pids:
        return {}
    holders = _socket_fds(pids)
    out: dict[int, bool] = {}
    with NetnsSockets(Path(f"/proc/{pids[0]}/ns/net")) as sk:
        listeners = [s for s in sk.tcp(LISTEN) if s.inode in holders]
    for s in listeners:
        ok = reuseaddr and _reuseaddr(*holders[s.inode])
        out[s.local_port] = out.get(s.local_port, True) and ok
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (from /proc/<pid>/task/*/children), parents first; [] if it
    is gone. For a container whose processes are known only by its init's pid (the shim's)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue  # exited meanwhile
        out.append(p)
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
    return out


def clear_time_wait(netns: str | os.PathLike[str], ports: Iterable[int], *, what: str, timeout: float = 10.0) -> None:
    """Destroy the TIME_WAIT sockets on these local ports of a netns, before a restore.

    Connections the app (or the activation proxy, which accepts on the app's port) closed first
    leave TIME_WAIT sockets on that port for 60 s. CRIU re-binds the listener with the options it
    had; an app that did not set SO_REUSEADDR then fails to restore with EADDRINUSE. Dropping
    those sockets (sock_diag destroy, `ss -K`) is what SO_REUSEADDR would have tolerated anyway;
    callers pass only the container's own ports. A failure is logged (``what`` names the
    container), not raised: the restore then says what is wrong.
    """
    wanted = set(ports)
    if not wanted:
        return
    # Asked of sock_diag first (one dump, a few ms): `ss -K` is two processes per port, and on
    # most wakes there is nothing to clear (the client, not the app, closed first).
    try:
        with NetnsSockets(netns) as sk:
            wanted &= {s.local_port for s in sk.tcp(TIME_WAIT)}
    except (OSError, NetlinkError) as e:
        log.warning("restore %s: could not list TIME_WAIT sockets (%s); clearing ports %s anyway", what, e,
                    sorted(wanted))
    for port in sorted(wanted):
        res = subprocess.run(
            ["nsenter", f"--net={netns}", "ss", "-K", "-tan", "state", "time-wait", "sport", "=", f":{port}"],
            capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            log.warning("restore %s: could not clear TIME_WAIT on port %d: %s", what, port, res.stderr.strip())
