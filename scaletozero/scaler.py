"""Scale to zero: idle detection, checkpoint/restore orchestration and the BPF flip.

For every opted-in pod the scaler keeps: the sk_lookup link in the pod's netns, the activation
proxy's listeners (in the sockmap), and a small state machine

    running --idle--> checkpointing --ok--> checkpointed --connection--> restoring --ok--> running
                           |  dump failed: not idle after all                 | failed
                           v                                                  v
                        running                                             failed --connection--> restoring

The order of operations is what makes it lossless:

- checkpoint: learn the app's ports (LISTEN sockets of the netns), turn the redirect **on**,
  then dump (CRIU with `network-lock skip`). A SYN during the dump goes to the proxy, which
  waits for the dump and then wakes the pod. A connection the app got just before the flip
  makes the dump fail (in-flight / established): redirect off again, the pod stays running.
- wake: one restore per pod however many connections wait (a shared future), then wait until
  the app's ports LISTEN (read from the netns, never by connecting through the redirect), then
  turn the redirect **off**, and only then let the proxy dial: from here on new SYNs reach the
  app directly and the proxy only finishes the connections it already holds.

A pod is idle when, for its idle timeout, it had no established or half-open connection on an
app port, the sk_lookup program counted no new connection attempt, and the proxy held or
relayed nothing. Health probes the proxy answered for a parked pod (Backend.probe, from the
node's addresses) never wake it; the SYN counter is re-read at every wake, so the probes it
counted while the pod was parked do not count as activity either.

All runtime calls block (runc, CRIU); they run in threads. Everything else runs on one asyncio
loop (uvloop in the agent). `ScalerThread` runs a scaler on its own loop in a thread for tests,
benchmarks and synchronous callers.

Whoever embeds the scaler learns of every state change through ``on_state`` (the agent turns it
into the pod's ``zeroproxy.io/scale-state`` label, an Event, and the local translation);
:func:`publication` says what to publish for a change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dataplane.netns import in_netns
from scaletozero.activator import PROBE_OFF, Activator, Netns, PodProxy, ScaleMetrics, WakeError
from scaletozero.runtime import CheckpointError, ContainerRuntime, RuntimeDriverError
from scaletozero.sklookup import NetnsLink, SkLookup

log = logging.getLogger(__name__)

T = TypeVar("T")

TCP_ESTABLISHED = 0x01
TCP_SYN_RECV = 0x03
TCP_LISTEN = 0x0A


class PodState(enum.StrEnum):
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    CHECKPOINTED = "checkpointed"
    RESTORING = "restoring"
    FAILED = "failed"


@dataclass(frozen=True)
class Backend:
    """One opted-in pod as the scaler needs it."""

    name: str  # "namespace/name": logs, metrics, CLI
    container_id: str  # in the runtime
    netns: Path  # the pod's network namespace (persists while the container is checkpointed)
    addresses: tuple[str, ...]  # pod IPs: the addresses whose SYNs are caught
    idle_timeout: float = 300.0  # seconds without traffic before a checkpoint
    ports: tuple[int, ...] = ()  # app ports; empty = the ports the app listens on at checkpoint time
    restore_timeout: float | None = None  # how long held clients wait; None = the scaler's default
    probe: str = "off"  # health probes from the node answered while parked: "off", "tcp" or "http"


@dataclass
class PodStatus:
    """What the CLI, the state file and tests see of one pod."""

    name: str
    container: str
    state: str
    reason: str
    slot: int
    ports: list[int]
    addresses: list[str]
    idle_timeout: float
    idle_for: float
    checkpoints: int
    restores: int
    failures: int
    last_checkpoint_seconds: float | None
    last_restore_seconds: float | None
    redirect: bool
    lookups: int  # connection attempts the sk_lookup program saw on app ports
    assigned: int  # ... that it handed to the proxy
    accepted: int
    held: int
    relayed: int
    dropped: int
    bytes_to_app: int
    bytes_to_client: int
    probes: int = 0  # health probes the proxy answered without a wake


# on_state(pod "namespace/name", old state, new state (None: no longer managed), reason, seconds the
# step took (checkpoint, restore) or None)
StateListener = Callable[[str, "PodState | None", "PodState | None", str, "float | None"], None]


def publication(old: PodState | None, new: PodState | None, reason: str = "",
                seconds: float | None = None) -> tuple[str | None, tuple[str, str, str] | None]:
    """What a state change publishes: (label value or None to remove, (reason, message, type) of an
    Event or None).

    ``checkpointing`` publishes as running: the pod still serves, and a connection during the
    dump is held and wakes it right after. Events mark what an operator wants in
    ``kubectl describe pod``: a checkpoint, a restore, a failed restore with its reason.
    """
    from controlplane import annotations as a

    label = {None: None, PodState.RUNNING: a.STATE_RUNNING, PodState.CHECKPOINTING: a.STATE_RUNNING,
             PodState.CHECKPOINTED: a.STATE_CHECKPOINTED, PodState.RESTORING: a.STATE_RESTORING,
             PodState.FAILED: a.STATE_FAILED}[new]
    took = f" in {seconds:.3f} s" if seconds is not None else ""
    event = None
    if old == PodState.CHECKPOINTING and new == PodState.CHECKPOINTED:
        event = ("Checkpointed", f"idle: checkpointed with CRIU{took}; the next connection restores it", "Normal")
    elif old == PodState.RESTORING and new == PodState.RUNNING:
        event = ("Restored", f"restored by a connection and listening{took}", "Normal")
    elif old == PodState.RESTORING and new == PodState.FAILED:
        event = ("RestoreFailed", f"restore failed: {reason}; held connections were reset, the next "
                 "connection tries again", "Warning")
    return label, event


def classify(reason: str) -> str:
    """A short, bounded label for a failure reason (metrics labels must not be free text)."""
    table = (
        ("no checkpoint images", "no_images"),
        ("In-flight connection", "in_flight"),
        ("tcp-established", "established"),
        ("Address already in use", "addr_in_use"),
        ("timed out", "timeout"),
        ("not listening", "not_listening"),
        ("no listening ports", "no_ports"),
    )
    for needle, label in table:
        if needle in reason:
            return label
    return "criu_error" if "CRIU" in reason or "criu" in reason else "other"


# --- reading sockets of a netns --------------------------------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    state: int
    local_port: int
    inode: int


def read_tcp(netns_fd: int) -> list[TcpSocket]:
    """TCP sockets of one netns from /proc/thread-self/net/tcp{,6} (this thread joins it briefly).

    Cheaper than `ss` (no process), and independent of the container: the proxy's own
    sockets in the pod count too, which is what idle detection wants.
    """
    out = []
    with in_netns(netns_fd):
        for name in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            for line in lines:
                f = line.split()
                out.append(TcpSocket(int(f[3], 16), int(f[1].rsplit(":", 1)[1], 16), int(f[9])))
    return out


# --- the scaler ------------------------------------------------------------------------------


@dataclass
class _Pod:
    backend: Backend
    slot: int
    netns: Netns
    link: NetnsLink
    proxy: PodProxy
    state: PodState = PodState.RUNNING
    reason: str = ""
    ports: tuple[int, ...] = ()
    last_activity: float = field(default_factory=time.monotonic)
    last_lookups: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake_future: asyncio.Future[None] | None = None
    checkpoints: int = 0
    restores: int = 0
    failures: int = 0
    last_checkpoint_seconds: float | None = None
    last_restore_seconds: float | None = None


class Scaler:
    """Scale-to-zero for the opted-in pods of one node."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        *,
        restore_timeout: float = 30.0,
        ready_timeout: float = 10.0,
        poll_interval: float = 0.5,
        state_file: Path | None = None,
        metrics: ScaleMetrics | None = None,
        sklookup: SkLookup | None = None,
        on_state: StateListener | None = None,
        node_addresses: Iterable[str] | None = None,
    ) -> None:
        """node_addresses: where the kubelet's probes come from (Backend.probe); None = every
        address of the network namespace the scaler runs in (the node's, in the agent), read at start."""
        self.runtime = runtime
        self.on_state = on_state
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.state_file = state_file
        self.metrics = metrics or ScaleMetrics()
        self.sk = sklookup or SkLookup()
        self.activator = Activator(self.metrics, hold_timeout=restore_timeout, node_addresses=node_addresses or ())
        self._own_addresses = node_addresses is None
        self.pods: dict[str, _Pod] = {}
        self._idle_task: asyncio.Task[None] | None = None
        self._last_state_write = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Compile and load the sk_lookup program (about a second of bcc) and start idle checks."""
        if self._own_addresses:
            from dataplane import tc

            addrs = await asyncio.to_thread(tc.local_addresses)
            self.activator.set_node_addresses(str(a) for a in addrs)
        if self.sk.bpf is None:
            await asyncio.to_thread(self.sk.load)
        self.sk.set_node_addresses(self.activator.node_addresses)
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop())

    async def close(self) -> None:
        """Stop everything of ours: idle loop, proxies, links, program. Containers stay as they are."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
            self._idle_task = None
        for name in list(self.pods):
            await self.remove(name, wake=False)
        await self.activator.close()
        self.sk.close()

    async def add(self, backend: Backend) -> None:
        """Opt a pod in: link sk_lookup into its netns and open the proxy's listeners there.

        The redirect stays off until the first checkpoint; a pod whose container is already
        checkpointed (an agent restart) gets it on at once.
        """
        if backend.name in self.pods:
            raise ValueError(f"{backend.name} is already managed")
        slot = self.sk.alloc_slot()
        netns = link = proxy = None
        try:
            netns = Netns(backend.netns)
            link = self.sk.attach(backend.netns)
            proxy = await self.activator.add(backend.name, backend.netns, lambda: self.wake(backend.name),
                                             hold_timeout=backend.restore_timeout, probe=backend.probe,
                                             answer_probes=lambda: self._answers_probes(backend.name))
            for family, sock in proxy.listeners.items():
                self.sk.set_listener(slot, family, sock.fileno())
        except BaseException:
            if proxy is not None:
                await self.activator.remove(backend.name)
            if link is not None:
                link.close()
            if netns is not None:
                netns.close()
            self.sk.free_slot(slot)
            raise
        pod = _Pod(backend, slot, netns, link, proxy, ports=backend.ports)
        self.pods[backend.name] = pod
        state = await asyncio.to_thread(self.runtime.state, backend.container_id)
        if state.value in ("checkpointed", "failed"):
            pod.ports = pod.ports or tuple(sorted(_meta_ports(self.runtime, backend.container_id)))
            self.sk.set_ports(slot, backend.addresses, pod.ports)
            self.sk.set_redirect(slot, True)
            self._set_state(pod, PodState.CHECKPOINTED if state.value == "checkpointed" else PodState.FAILED)
        else:
            self._set_state(pod, PodState.RUNNING)
        log.info("%s: scale to zero on (container %s, idle %gs, slot %d)", backend.name,
                 backend.container_id, backend.idle_timeout, slot)

    def _answers_probes(self, name: str) -> bool:
        """Probes are answered for a pod that is (being) checkpointed or coming back, never for a
        failed one: a broken pod must not look healthy, its probe retries the restore instead."""
        pod = self.pods.get(name)
        return pod is not None and pod.state in (PodState.CHECKPOINTING, PodState.CHECKPOINTED, PodState.RESTORING)

    async def remove(self, name: str, *, wake: bool = True) -> None:
        """Opt a pod out: restore it first (wake=True) so nothing stays frozen with no one to wake
        it, then unlink; new SYNs reach whatever listens. The agent's shutdown passes wake=False:
        checkpointed pods stay checkpointed for the next agent."""
        pod = self.pods.get(name)
        if pod is None:
            return
        if wake and pod.state != PodState.RUNNING:
            try:
                await self.wake(name)
            except WakeError as e:
                log.error("%s: opted out while %s and the restore failed: %s", name, pod.state, e.reason)
        pod = self.pods.pop(name, None)
        if pod is None:
            return
        self.sk.free_slot(pod.slot)  # entries first: the program stops redirecting at once
        pod.link.close()
        await self.activator.remove(name)
        pod.netns.close()
        for state in PodState:
            with contextlib.suppress(KeyError):
                self.metrics.state.remove(name, state.value)
        self._write_state(force=True)
        self._notify(name, pod.state, None, "")

    async def reconcile(self, want: Mapping[str, Backend]) -> None:
        """Manage exactly these pods: opt out the others (restoring them first), re-add changed
        ones, add new ones. A pod that cannot be managed is logged and skipped, not fatal."""
        for name, pod in list(self.pods.items()):
            if want.get(name) != pod.backend:
                await self.remove(name)
        for name, backend in want.items():
            if name not in self.pods:
                try:
                    await self.add(backend)
                except Exception as e:
                    log.error("%s: cannot manage: %s", name, e)

    # -- state ----------------------------------------------------------------------------------

    def _set_state(self, pod: _Pod, state: PodState, reason: str = "", seconds: float | None = None) -> None:
        old = pod.state
        pod.state = state
        pod.reason = reason
        for s in PodState:
            self.metrics.state.labels(pod.backend.name, s.value).set(1 if s == state else 0)
        self._write_state(force=True)
        self._notify(pod.backend.name, old, state, reason, seconds)

    def _notify(self, name: str, old: PodState | None, new: PodState | None, reason: str,
                seconds: float | None = None) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(name, old, new, reason, seconds)
        except Exception:
            log.exception("%s: state listener failed", name)

    def status(self) -> list[PodStatus]:
        now = time.monotonic()
        out = []
        for pod in self.pods.values():
            st = self.sk.stats(pod.slot)
            c = pod.proxy.counters
            out.append(PodStatus(
                name=pod.backend.name, container=pod.backend.container_id, state=pod.state.value,
                reason=pod.reason, slot=pod.slot, ports=list(pod.ports), addresses=list(pod.backend.addresses),
                idle_timeout=pod.backend.idle_timeout, idle_for=round(now - pod.last_activity, 3),
                checkpoints=pod.checkpoints, restores=pod.restores, failures=pod.failures,
                last_checkpoint_seconds=pod.last_checkpoint_seconds, last_restore_seconds=pod.last_restore_seconds,
                redirect=self.sk.redirect(pod.slot), lookups=st.lookups, assigned=st.assigned,
                accepted=c.accepted, held=c.held, relayed=c.relayed, dropped=c.dropped,
                bytes_to_app=c.bytes_to_app, bytes_to_client=c.bytes_to_client, probes=c.probes,
            ))
        return out

    def _write_state(self, force: bool = False) -> None:
        """Write the status JSON for `zeroproxy scale status` (another process) atomically."""
        if self.state_file is None:
            return
        now = time.monotonic()
        if not force and now - self._last_state_write < 2.0:
            return
        self._last_state_write = now
        doc = {"pid": os.getpid(), "written": time.time(), "pods": [asdict(s) for s in self.status()]}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.state_file)

    # -- idle detection ------------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for pod in list(self.pods.values()):
                try:
                    await self._check_idle(pod)
                except Exception:
                    log.exception("%s: idle check failed", pod.backend.name)
            self._write_state()

    async def _check_idle(self, pod: _Pod) -> None:
        if pod.state != PodState.RUNNING or pod.lock.locked():
            return
        now = time.monotonic()
        lookups = self._activity(pod)
        if lookups != pod.last_lookups or pod.proxy.busy:
            pod.last_lookups = lookups
            pod.last_activity = now
            return
        if now - pod.last_activity < pod.backend.idle_timeout:
            return
        if await self._has_connections(pod):
            pod.last_activity = now
            return
        await self.checkpoint(pod.backend.name)

    def _activity(self, pod: _Pod) -> int:
        """Connection attempts that count as use: with probe answering on, the kubelet's probes
        (from the node's own addresses) do not keep a pod awake while it runs either."""
        st = self.sk.stats(pod.slot)
        return st.lookups - st.from_node if pod.backend.probe != PROBE_OFF else st.lookups

    async def _has_connections(self, pod: _Pod) -> bool:
        socks = await asyncio.to_thread(read_tcp, pod.netns.fd)
        proxy_ports = pod.proxy.listener_ports
        ports = set(pod.ports) or {s.local_port for s in socks if s.state == TCP_LISTEN} - proxy_ports
        return any(s.state in (TCP_ESTABLISHED, TCP_SYN_RECV) and s.local_port in ports for s in socks)

    async def _listen_ports(self, pod: _Pod) -> set[int]:
        socks = await asyncio.to_thread(read_tcp, pod.netns.fd)
        return {s.local_port for s in socks if s.state == TCP_LISTEN} - pod.proxy.listener_ports

    # -- checkpoint -----------------------------------------------------------------------------

    async def checkpoint(self, name: str) -> bool:
        """Checkpoint one running pod now; False (and still running) if it was not idle after all."""
        pod = self.pods[name]
        async with pod.lock:
            if pod.state != PodState.RUNNING:
                return False
            ports = tuple(sorted(pod.backend.ports or await self._listen_ports(pod)))
            if not ports:
                log.warning("%s: not checkpointed: no listening ports, nothing could wake it", name)
                pod.last_activity = time.monotonic()
                return False
            pod.ports = ports
            self._set_state(pod, PodState.CHECKPOINTING)
            self.sk.set_ports(pod.slot, pod.backend.addresses, ports)
            self.sk.set_redirect(pod.slot, True)  # before the dump: new SYNs now wait in the proxy
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.runtime.checkpoint, pod.backend.container_id)
            except RuntimeDriverError as e:
                self.sk.set_redirect(pod.slot, False)
                pod.last_activity = time.monotonic()
                label = classify(e.reason)
                self.metrics.checkpoints.labels(name, "not_idle" if label in ("in_flight", "established")
                                                else "failed").inc()
                self.metrics.failures.labels("checkpoint", label).inc()
                level = logging.INFO if isinstance(e, CheckpointError) and label != "criu_error" else logging.WARNING
                log.log(level, "%s: checkpoint refused, stays running: %s", name, e.reason)
                self._set_state(pod, PodState.RUNNING)
                return False
            pod.last_checkpoint_seconds = time.monotonic() - t0
            pod.checkpoints += 1
            self.metrics.checkpoint_seconds.observe(pod.last_checkpoint_seconds)
            self.metrics.checkpoints.labels(name, "ok").inc()
            self._set_state(pod, PodState.CHECKPOINTED, seconds=pod.last_checkpoint_seconds)
            log.info("%s: checkpointed in %.3f s (ports %s)", name, pod.last_checkpoint_seconds, list(ports))
            return True

    # -- wake -----------------------------------------------------------------------------------

    async def wake(self, name: str) -> None:
        """Make sure the pod runs and the redirect is off; one restore for all concurrent callers.

        Raises WakeError if the restore failed (the pod is then `failed`; the next call tries
        again). Cancelling a caller (the proxy's hold timeout) never cancels the restore.
        """
        pod = self.pods.get(name)
        if pod is None:
            raise WakeError(f"{name} is not managed by the scaler", "unknown_pod")
        if pod.state == PodState.RUNNING and not pod.lock.locked():
            return
        if pod.wake_future is None or pod.wake_future.done():
            pod.wake_future = asyncio.ensure_future(self._wake(pod))
        await asyncio.shield(pod.wake_future)

    async def _wake(self, pod: _Pod) -> None:
        name = pod.backend.name
        async with pod.lock:  # waits for a dump in progress to end, one way or the other
            if pod.state == PodState.RUNNING:
                return
            self.metrics.wakes.labels(name).inc()
            self._set_state(pod, PodState.RESTORING)
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.runtime.restore, pod.backend.container_id)
                await self._wait_listening(pod)
            except (RuntimeDriverError, WakeError) as e:
                reason = e.reason
                pod.failures += 1
                label = classify(reason)
                self.metrics.failures.labels("restore", label).inc()
                log.error("%s: restore failed: %s", name, reason)
                self._set_state(pod, PodState.FAILED, reason)  # the redirect stays on: the next SYN retries
                raise WakeError(reason, label) from e
            self.sk.set_redirect(pod.slot, False)  # the flip: new SYNs go straight to the app
            pod.last_restore_seconds = time.monotonic() - t0
            pod.restores += 1
            pod.last_activity = time.monotonic()
            pod.last_lookups = self._activity(pod)
            self.metrics.restore_seconds.observe(pod.last_restore_seconds)
            self._set_state(pod, PodState.RUNNING, seconds=pod.last_restore_seconds)
            log.info("%s: restored and listening in %.3f s", name, pod.last_restore_seconds)

    async def _wait_listening(self, pod: _Pod) -> None:
        """Until every app port LISTENs in the netns; read from the kernel, never by connecting."""
        deadline = time.monotonic() + self.ready_timeout
        want = set(pod.ports)
        while True:
            have = await self._listen_ports(pod)
            if want <= have:
                return
            if time.monotonic() > deadline:
                raise WakeError(f"restored, but ports {sorted(want - have)} not listening after "
                                f"{self.ready_timeout:g} s", "not_listening")
            await asyncio.sleep(0.002)


def _meta_ports(runtime: ContainerRuntime, container_id: str) -> set[int]:
    """Ports a checkpointed container listened on, if the runtime recorded them (RuncRuntime does)."""
    read = getattr(runtime, "_read_meta", None)
    if read is None:
        return set()
    return {int(p) for p in read(container_id).get("listen_ports") or []}


class ScalerThread:
    """A Scaler on its own uvloop loop in a daemon thread, driven from synchronous code.

    Tests and benchmarks use it: they drive the world with blocking calls (clients, sleeps)
    while the proxy keeps serving on its loop.
    """

    def __init__(self, runtime: ContainerRuntime, **kwargs: Any) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="zeroproxy-scaler", daemon=True)
        self._thread.start()
        self.scaler: Scaler = self.call(self._make, runtime, kwargs)
        try:
            self.call(self.scaler.start)
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _make(runtime: ContainerRuntime, kwargs: dict[str, Any]) -> Scaler:
        return Scaler(runtime, **kwargs)

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop)  # type: ignore[arg-type]

    def status(self) -> dict[str, PodStatus]:
        async def get() -> dict[str, PodStatus]:
            return {s.name: s for s in self.scaler.status()}

        return self.call(get)

    def close(self) -> None:
        """Close the scaler (links, listeners, program) and stop the loop; safe to call twice."""
        if self.loop.is_closed():
            return
        if hasattr(self, "scaler"):
            try:
                self.call(self.scaler.close, timeout=60)
            except Exception:
                log.exception("closing the scaler failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def container_id(namespace: str, name: str) -> str:
    """The RuncRuntime container id of a pod's backend container (runc allows [A-Za-z0-9_.+-])."""
    return f"{namespace}.{name}"


def container_netns(runtime_dir: Path, cid: str) -> Path | None:
    """The network namespace a RuncRuntime container joins, from its OCI bundle (None: no such container)."""
    try:
        config = json.loads((runtime_dir / "containers" / cid / "bundle" / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    for ns in config.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network" and ns.get("path"):
            return Path(ns["path"])
    return None


def node_backends(pods: Iterable[Any], node_name: str, runtime_dir: Path) -> tuple[dict[str, Backend], list[str]]:
    """The Backends of this node's opted-in pods (translated PodInfo) whose containers live in a
    RuncRuntime directory under the id ``<namespace>.<pod>``; and every problem (bad annotations,
    an opted-in pod without its container), one line each, naming the pod.

    This is where a containerd integration would differ: it would find the pod's container and
    netns through the CRI instead of a runtime directory.
    """
    want: dict[str, Backend] = {}
    problems: list[str] = []
    for pod in pods:
        if pod.node_name != node_name or pod.terminating:
            continue
        cid = container_id(pod.namespace, pod.name)
        netns = container_netns(runtime_dir, cid)
        backend, bad = backend_for_pod(pod, cid, netns or Path("/nonexistent"))
        problems += bad
        if backend is None:
            continue
        if netns is None:
            problems.append(f"{backend.name}: opted in, but there is no container {cid} in {runtime_dir}")
            continue
        want[backend.name] = backend
    return want, problems


def backend_for_pod(pod: Any, container_id: str, netns: Path) -> tuple[Backend | None, list[str]]:
    """A Backend for a translated pod (controlplane.translate.PodInfo) if it opted in.

    Returns the problems with its annotations too (they name the pod and the annotation); a pod
    with a bad value is left running.
    """
    from controlplane import annotations

    name = f"{pod.namespace}/{pod.name}"
    cfg, problems = annotations.parse(dict(pod.annotations), name)
    if cfg is None:
        return None, problems
    return Backend(
        name=name,
        container_id=container_id,
        netns=netns,
        addresses=tuple(str(ip) for ip in pod.ips),
        idle_timeout=cfg.idle_timeout,
        restore_timeout=cfg.restore_timeout,
        probe=cfg.probe_response,
    ), problems
