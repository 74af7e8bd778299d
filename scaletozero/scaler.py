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

A pod is idle when, for its whole idle timeout, no connection on an app port carried a byte
(tcp_info, read a few times per timeout; a connection that closed counts as used until it went),
the sk_lookup program counted no new connection attempt and the proxy held or relayed nothing,
and at its end no connection is open at all. Health probes the proxy answered for a parked pod
(ScaledPod.probe, from the node's addresses) never wake it; the SYN counter is re-read at every
wake, so the probes it counted while the pod was parked do not count as activity either. A
dry-run pod (ScaledPod.dry_run) goes through the same decisions and reports them, and is never
checkpointed.

All runtime calls block (runc, CRIU); they run in threads. Everything else runs on one asyncio
loop (uvloop in the agent). `ScalerThread` runs a scaler on its own loop in a thread for tests,
benchmarks and synchronous callers.

The scaler knows pods only as :class:`ScaledPod` (what to catch, where, and how long to wait);
whoever embeds it builds those (controlplane/scaling.py, from Pods and their annotations) and
learns of every state change through ``on_state`` (the agent turns it into the pod's
``zeroproxy.io/scale-state`` label, an Event, and the local translation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scaletozero.activator import Activator, PodProxy, ScaleMetrics, WakeError
from scaletozero.runtime import CheckpointError, ContainerRuntime, FailureKind, RuntimeDriverError
from scaletozero.sklookup import NetnsLink, SkLookup
from scaletozero.sockets import ESTABLISHED, LISTEN, SYN_RECV, TCP_LISTEN, NetnsSockets
from scaletozero.state import ProbeResponse, ScaleState

log = logging.getLogger(__name__)

T = TypeVar("T")

# How a dry-run pod's decisions begin their reason (on_state running -> running).
DRY_RUN_CHECKPOINT = "would checkpoint"
DRY_RUN_WAKE = "would restore"


@dataclass(frozen=True)
class ScaledPod:
    """One opted-in pod as the scaler needs it: what to catch, where, and how long to wait.

    Not to be confused with dataplane.table.Backend (an endpoint of a service frontend): a
    scaled pod may back many services, and the scaler never sees them.
    """

    name: str  # "namespace/name": logs, metrics, CLI
    container_id: str  # in the runtime
    netns: Path  # the pod's network namespace (persists while the container is checkpointed)
    addresses: tuple[str, ...]  # pod IPs: the addresses whose SYNs are caught
    idle_timeout: float = 300.0  # seconds without traffic before a checkpoint
    ports: tuple[int, ...] = ()  # app ports; empty = the ports the app listens on at checkpoint time
    restore_timeout: float | None = None  # how long held clients wait; None = the scaler's default
    probe: ProbeResponse = ProbeResponse.OFF  # health probes from the node answered while parked
    # Decide and report (logs, metrics, on_state with a DRY_RUN_* reason) but never checkpoint.
    dry_run: bool = False


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
    dry_run: bool = False
    would_checkpoints: int = 0  # dry run: idle periods that would have ended in a checkpoint
    would_wakes: int = 0  # dry run: connections that would have woken it


# on_state(pod "namespace/name", old state, new state (None: no longer managed), reason, seconds the
# step took (checkpoint, restore) or None). A dry-run pod's decisions come as running -> running
# with a reason that starts with DRY_RUN_CHECKPOINT or DRY_RUN_WAKE.
StateListener = Callable[[str, "ScaleState | None", "ScaleState | None", str, "float | None"], None]


# --- the scaler ------------------------------------------------------------------------------


@dataclass
class _Pod:
    spec: ScaledPod
    slot: int
    sockets: NetnsSockets  # sock_diag in the pod's netns: its connections and listeners
    link: NetnsLink
    proxy: PodProxy
    state: ScaleState = ScaleState.RUNNING
    reason: str = ""
    ports: tuple[int, ...] = ()
    last_activity: float = field(default_factory=time.monotonic)
    last_lookups: int = 0
    # The app-port connections (socket cookies) the last look at them found, and when to look
    # next: a connection that is gone since was used until then (see Scaler._look).
    connections: frozenset[int] = frozenset()
    next_look: float = 0.0
    would_be_parked: bool = False  # dry run: it would be checkpointed now
    would_checkpoints: int = 0
    would_wakes: int = 0
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
        """node_addresses: where the kubelet's probes come from (ScaledPod.probe); None = every
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

    async def add(self, target: ScaledPod) -> None:
        """Opt a pod in: link sk_lookup into its netns and open the proxy's listeners there.

        The redirect stays off until the first checkpoint; a pod whose container is already
        checkpointed (an agent restart) gets it on at once.
        """
        if target.name in self.pods:
            raise ValueError(f"{target.name} is already managed")
        slot = self.sk.alloc_slot()
        sockets = link = proxy = None
        try:
            sockets = NetnsSockets(target.netns)
            link = self.sk.attach(target.netns)
            proxy = await self.activator.add(target.name, target.netns, lambda: self.wake(target.name),
                                             hold_timeout=target.restore_timeout, probe=target.probe,
                                             answer_probes=lambda: self._answers_probes(target.name))
            for family, sock in proxy.listeners.items():
                self.sk.set_listener(slot, family, sock.fileno())
        except BaseException:
            if proxy is not None:
                await self.activator.remove(target.name)
            if link is not None:
                link.close()
            if sockets is not None:
                sockets.close()
            self.sk.free_slot(slot)
            raise
        pod = _Pod(target, slot, sockets, link, proxy, ports=target.ports)
        self.pods[target.name] = pod
        state = ScaleState.adopt(await asyncio.to_thread(self.runtime.state, target.container_id))
        if state.parked:
            if not pod.ports:
                found = await asyncio.to_thread(self.runtime.listen_ports, target.container_id)
                pod.ports = tuple(sorted(found))
            self.sk.set_ports(slot, target.addresses, pod.ports)
            self.sk.set_redirect(slot, True)
        self._set_state(pod, state)
        log.info("%s: scale to zero on (container %s, idle %gs, slot %d)", target.name,
                 target.container_id, target.idle_timeout, slot)

    def _answers_probes(self, name: str) -> bool:
        """Probes are answered for a pod that is (being) checkpointed or coming back, never for a
        failed one: a broken pod must not look healthy, its probe retries the restore instead."""
        pod = self.pods.get(name)
        return pod is not None and pod.state in (ScaleState.CHECKPOINTING, ScaleState.CHECKPOINTED,
                                                 ScaleState.RESTORING)

    async def remove(self, name: str, *, wake: bool = True) -> None:
        """Opt a pod out: restore it first (wake=True) so nothing stays frozen with no one to wake
        it, then unlink; new SYNs reach whatever listens. The agent's shutdown passes wake=False:
        checkpointed pods stay checkpointed for the next agent."""
        pod = self.pods.get(name)
        if pod is None:
            return
        if wake and pod.state != ScaleState.RUNNING:
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
        pod.sockets.close()
        for state in ScaleState:
            with contextlib.suppress(KeyError):
                self.metrics.state.remove(name, state.value)
        self._write_state(force=True)
        self._notify(name, pod.state, None, "")

    async def reconcile(self, want: Mapping[str, ScaledPod]) -> None:
        """Manage exactly these pods: opt out the others (restoring them first), re-add changed
        ones, add new ones. A pod that cannot be managed is logged and skipped, not fatal."""
        for name, pod in list(self.pods.items()):
            if want.get(name) != pod.spec:
                await self.remove(name)
        for name, target in want.items():
            if name not in self.pods:
                try:
                    await self.add(target)
                except Exception as e:
                    log.error("%s: cannot manage: %s", name, e)

    # -- state ----------------------------------------------------------------------------------

    def _set_state(self, pod: _Pod, state: ScaleState, reason: str = "", seconds: float | None = None) -> None:
        old = pod.state
        pod.state = state
        pod.reason = reason
        for s in ScaleState:
            self.metrics.state.labels(pod.spec.name, s.value).set(1 if s == state else 0)
        self._write_state(force=True)
        self._notify(pod.spec.name, old, state, reason, seconds)

    def _notify(self, name: str, old: ScaleState | None, new: ScaleState | None, reason: str,
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
                name=pod.spec.name, container=pod.spec.container_id, state=pod.state.value,
                reason=pod.reason, slot=pod.slot, ports=list(pod.ports), addresses=list(pod.spec.addresses),
                idle_timeout=pod.spec.idle_timeout, idle_for=round(now - pod.last_activity, 3),
                checkpoints=pod.checkpoints, restores=pod.restores, failures=pod.failures,
                last_checkpoint_seconds=pod.last_checkpoint_seconds, last_restore_seconds=pod.last_restore_seconds,
                redirect=self.sk.redirect(pod.slot), lookups=st.lookups, assigned=st.assigned,
                accepted=c.accepted, held=c.held, relayed=c.relayed, dropped=c.dropped,
                bytes_to_app=c.bytes_to_app, bytes_to_client=c.bytes_to_client, probes=c.probes,
                dry_run=pod.spec.dry_run, would_checkpoints=pod.would_checkpoints, would_wakes=pod.would_wakes,
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
                    log.exception("%s: idle check failed", pod.spec.name)
            self._write_state()

    async def _check_idle(self, pod: _Pod) -> None:
        if pod.state != ScaleState.RUNNING or pod.lock.locked():
            return
        now = time.monotonic()
        lookups = self._activity(pod)
        if lookups != pod.last_lookups or pod.proxy.busy:
            pod.last_lookups = lookups
            pod.last_activity = now
            if pod.would_be_parked:
                self._would_wake(pod)
            return
        if pod.would_be_parked:
            return
        expired = now - pod.last_activity >= pod.spec.idle_timeout
        if not expired and now < pod.next_look:
            return
        # Connections are looked at a few times per idle timeout, and always before a checkpoint.
        pod.next_look = now + max(self.poll_interval, pod.spec.idle_timeout / 4)
        if await self._look(pod, now) and expired:
            pod.last_activity = now  # an open connection, even a silent one: not idle
            return
        if now - pod.last_activity >= pod.spec.idle_timeout:
            if pod.spec.dry_run:
                await self._would_checkpoint(pod, now)
            else:
                await self.checkpoint(pod.spec.name)

    async def _would_checkpoint(self, pod: _Pod, now: float) -> None:
        """Dry run: everything a checkpoint decision does but the checkpoint. The program counts
        SYNs to the app's ports from now on (the redirect stays off), so a would-wake is seen."""
        ports = tuple(sorted(pod.spec.ports or await self._listen_ports(pod)))
        if not ports:
            log.warning("%s: would not checkpoint: no listening ports, nothing could wake it", pod.spec.name)
            pod.last_activity = now
            return
        pod.ports = ports
        self.sk.set_ports(pod.slot, pod.spec.addresses, ports)
        pod.last_lookups = self._activity(pod)
        pod.would_be_parked = True
        pod.would_checkpoints += 1
        self.metrics.checkpoints.labels(pod.spec.name, "dry_run").inc()
        reason = f"{DRY_RUN_CHECKPOINT} after {now - pod.last_activity:.1f} s without a connection or a byte"
        log.info("%s: %s (dry run)", pod.spec.name, reason)
        self._notify(pod.spec.name, ScaleState.RUNNING, ScaleState.RUNNING, reason)

    def _would_wake(self, pod: _Pod) -> None:
        """Dry run: a connection to a pod that would be checkpointed would have restored it."""
        pod.would_be_parked = False
        pod.would_wakes += 1
        self.metrics.wakes.labels(pod.spec.name).inc()
        reason = f"{DRY_RUN_WAKE} by a connection"
        log.info("%s: %s (dry run)", pod.spec.name, reason)
        self._notify(pod.spec.name, ScaleState.RUNNING, ScaleState.RUNNING, reason)

    def _activity(self, pod: _Pod) -> int:
        """Connection attempts that count as use: with probe answering on, the kubelet's probes
        (from the node's own addresses) do not keep a pod awake while it runs either."""
        st = self.sk.stats(pod.slot)
        return st.lookups - st.from_node if pod.spec.probe != ProbeResponse.OFF else st.lookups

    async def _look(self, pod: _Pod, now: float) -> bool:
        """Idle means no SYN *and* no byte for the whole idle timeout (zeropod's issue #84: a pod
        checkpointed although a connection had just carried data). New connections are the SYN
        counter's; this is the bytes': each app-port connection's last data (tcp_info) moves
        ``last_activity`` forward, and one that closed since the last look carried its FIN after
        that look, so it counts as activity now. Returns whether any connection is open."""
        socks = await asyncio.to_thread(pod.sockets.tcp, ESTABLISHED | SYN_RECV | (0 if pod.ports else LISTEN),
                                        info=True)
        ports = set(pod.ports) or {s.local_port for s in socks if s.state == TCP_LISTEN} - pod.proxy.listener_ports
        conns = {s.cookie: s for s in socks if s.state != TCP_LISTEN and s.local_port in ports}
        if pod.connections - conns.keys():
            pod.last_activity = now
        for s in conns.values():
            if s.quiet_ms is not None:
                pod.last_activity = max(pod.last_activity, now - s.quiet_ms / 1000)
        pod.connections = frozenset(conns)
        return bool(conns)

    async def _listen_ports(self, pod: _Pod) -> set[int]:
        """The app's listening ports, from the netns (every 2 ms during a wake: no process, no runc)."""
        return await asyncio.to_thread(pod.sockets.listening) - pod.proxy.listener_ports

    # -- checkpoint -----------------------------------------------------------------------------

    async def checkpoint(self, name: str) -> bool:
        """Checkpoint one running pod now; False (and still running) if it was not idle after all."""
        pod = self.pods[name]
        async with pod.lock:
            if pod.state != ScaleState.RUNNING:
                return False
            ports = tuple(sorted(pod.spec.ports or await self._listen_ports(pod)))
            if not ports:
                log.warning("%s: not checkpointed: no listening ports, nothing could wake it", name)
                pod.last_activity = time.monotonic()
                return False
            pod.ports = ports
            self._set_state(pod, ScaleState.CHECKPOINTING)
            self.sk.set_ports(pod.slot, pod.spec.addresses, ports)
            self.sk.set_redirect(pod.slot, True)  # before the dump: new SYNs now wait in the proxy
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.runtime.checkpoint, pod.spec.container_id)
            except RuntimeDriverError as e:
                self.sk.set_redirect(pod.slot, False)
                pod.last_activity = time.monotonic()
                self.metrics.checkpoints.labels(name, "not_idle" if e.kind.not_idle else "failed").inc()
                self.metrics.failures.labels("checkpoint", e.kind).inc()
                level = (logging.INFO if isinstance(e, CheckpointError) and e.kind != FailureKind.CRIU_ERROR
                         else logging.WARNING)
                log.log(level, "%s: checkpoint refused, stays running: %s", name, e.reason)
                self._set_state(pod, ScaleState.RUNNING)
                return False
            pod.last_checkpoint_seconds = time.monotonic() - t0
            pod.checkpoints += 1
            pod.connections = frozenset()
            self.metrics.checkpoint_seconds.observe(pod.last_checkpoint_seconds)
            self.metrics.checkpoints.labels(name, "ok").inc()
            self._set_state(pod, ScaleState.CHECKPOINTED, seconds=pod.last_checkpoint_seconds)
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
        if pod.state == ScaleState.RUNNING and not pod.lock.locked():
            return
        if pod.wake_future is None or pod.wake_future.done():
            pod.wake_future = asyncio.ensure_future(self._wake(pod))
        await asyncio.shield(pod.wake_future)

    async def _wake(self, pod: _Pod) -> None:
        name = pod.spec.name
        async with pod.lock:  # waits for a dump in progress to end, one way or the other
            if pod.state == ScaleState.RUNNING:
                return
            self.metrics.wakes.labels(name).inc()
            self._set_state(pod, ScaleState.RESTORING)
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(self.runtime.restore, pod.spec.container_id)
                await self._wait_listening(pod)
            except (RuntimeDriverError, WakeError) as e:
                reason = e.reason
                pod.failures += 1
                self.metrics.failures.labels("restore", e.kind).inc()
                log.error("%s: restore failed: %s", name, reason)
                self._set_state(pod, ScaleState.FAILED, reason)  # the redirect stays on: the next SYN retries
                raise WakeError(reason, e.kind) from e
            self.sk.set_redirect(pod.slot, False)  # the flip: new SYNs go straight to the app
            pod.last_restore_seconds = time.monotonic() - t0
            pod.restores += 1
            pod.last_activity = time.monotonic()
            pod.last_lookups = self._activity(pod)
            self.metrics.restore_seconds.observe(pod.last_restore_seconds)
            self._set_state(pod, ScaleState.RUNNING, seconds=pod.last_restore_seconds)
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
                                f"{self.ready_timeout:g} s", FailureKind.NOT_LISTENING)
            await asyncio.sleep(0.002)


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
