"""Scale to zero from the control plane's side: Pods in, ScaledPods out, states back onto the Pods.

The scaler (scaletozero/) knows no Kubernetes: it manages :class:`~scaletozero.scaler.ScaledPod`
values and reports :class:`~scaletozero.state.ScaleState` changes. This module is the glue:

- which pods: a translated Pod (controlplane.translate.PodInfo) that opted in with the
  annotations of controlplane/annotations.py becomes a ScaledPod (:func:`scaled_pod`); the opted-in
  pods of one node, with their containers found in a runtime, are :func:`node_pods`;
- what a state change publishes: the ``zeroproxy.io/scale-state`` label and an Event
  (:func:`publication`);
- :class:`NodeScaler`, the scaler inside ``zeroproxy agent``: follows the agent's change tracker,
  applies every state change to this node's translation at once and, with the API source, hands
  label and Events to the PodStatePublisher.

``zeroproxy scale run`` (zeroproxy/scale_cli.py) uses :func:`node_pods` on the file source.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from controlplane import annotations
from scaletozero.activator import ScaleMetrics
from scaletozero.runtime import ContainerRuntime, RuntimeDriverError
from scaletozero.scaler import DRY_RUN_CHECKPOINT, DRY_RUN_WAKE, ScaledPod, Scaler
from scaletozero.state import ScaleState

log = logging.getLogger("zeroproxy.scale")


def publication(old: ScaleState | None, new: ScaleState | None, reason: str = "",
                seconds: float | None = None) -> tuple[str | None, tuple[str, str, str] | None]:
    """What a state change publishes: (label value or None to remove, (reason, message, type) of an
    Event or None).

    The label is :attr:`ScaleState.label` (``checkpointing`` publishes as running). Events mark
    what an operator wants in ``kubectl describe pod``: a checkpoint, a restore, a failed restore
    with its reason.
    """
    label = new.label if new is not None else None
    took = f" in {seconds:.3f} s" if seconds is not None else ""
    event = None
    if old == ScaleState.CHECKPOINTING and new == ScaleState.CHECKPOINTED:
        event = ("Checkpointed", f"idle: checkpointed with CRIU{took}; the next connection restores it", "Normal")
    elif old == ScaleState.RESTORING and new == ScaleState.RUNNING:
        event = ("Restored", f"restored by a connection and listening{took}", "Normal")
    elif old == new == ScaleState.RUNNING and reason.startswith(DRY_RUN_CHECKPOINT):
        event = ("WouldCheckpoint", f"dry run: {reason}; nothing was checkpointed", "Normal")
    elif old == new == ScaleState.RUNNING and reason.startswith(DRY_RUN_WAKE):
        event = ("WouldRestore", f"dry run: {reason}; it was running all along", "Normal")
    elif old == ScaleState.RESTORING and new == ScaleState.FAILED:
        event = ("RestoreFailed", f"restore failed: {reason}; held connections were reset, the next "
                 "connection tries again", "Warning")
    return label, event


def scaled_pod(pod: Any, container: str, netns: Path) -> tuple[ScaledPod | None, list[str]]:
    """A ScaledPod for a translated pod (controlplane.translate.PodInfo) if it opted in.

    Returns the problems with its annotations too (they name the pod and the annotation); a pod
    with a bad value is left running.
    """
    name = f"{pod.namespace}/{pod.name}"
    cfg, problems = annotations.parse(dict(pod.annotations), name)
    if cfg is None:
        return None, problems
    return ScaledPod(
        name=name,
        container_id=container,
        netns=netns,
        addresses=tuple(str(ip) for ip in pod.ips),
        idle_timeout=cfg.idle_timeout,
        restore_timeout=cfg.restore_timeout,
        probe=cfg.probe_response,
        dry_run=cfg.dry_run,
    ), problems


def node_pods(pods: Iterable[Any], node_name: str, runtime: ContainerRuntime) -> tuple[dict[str, ScaledPod],
                                                                                        list[str]]:
    """The ScaledPods of this node's opted-in pods (translated PodInfo) whose container the runtime
    has (``runtime.pod_container``); and every problem (bad annotations, an opted-in pod without
    its container), one line each, naming the pod.

    The pod's netns is the container's (``runtime.netns``): for runc the bundle's, for pods the
    kubelet runs the sandbox's.
    """
    want: dict[str, ScaledPod] = {}
    problems: list[str] = []
    for pod in pods:
        if pod.node_name != node_name or pod.terminating:
            continue
        if pod.phase in ("Pending", "Succeeded", "Failed"):
            continue  # no container yet (or any more); the Pod's next change brings it back here
        target, bad = scaled_pod(pod, "", Path("/nonexistent"))
        problems += bad
        if target is None:
            continue
        try:
            cid = runtime.pod_container(pod.namespace, pod.name)
            netns = runtime.netns(cid) if cid is not None else None
        except RuntimeDriverError as e:
            problems.append(f"{target.name}: opted in, but {e.reason}")
            continue
        if cid is None or netns is None:
            problems.append(f"{target.name}: opted in, but {runtime.describe_missing(pod.namespace, pod.name)}")
            continue
        want[target.name] = replace(target, container_id=cid, netns=netns)
    return want, problems


class NodeScaler:
    """Scale to zero as part of `zeroproxy agent`: the glue between the agent and a Scaler.

    - which pods: this node's opted-in pods, from the agent's change tracker (the Pods its source
      delivered), re-read whenever Pods change (:meth:`pods_changed`);
    - what the rest of the agent learns: every state change goes to the tracker at once
      (:meth:`ChangeTracker.set_local_state`, so this node's translation uses running endpoints
      only without waiting for a round trip through the apiserver) and, with the API source,
      to the :class:`PodStatePublisher` (label for every agent, Events for operators);
    - metrics on the agent's registry, state file for `zeroproxy scale status`.

    Runs on the agent's loop. Closing leaves checkpointed pods checkpointed and their labels as
    they are: the next agent adopts them.
    """

    def __init__(self, cfg: Any, node_name: str, tracker: Any, request_sync: Callable[[], None], *,
                 registry: Any = None, publisher: Any = None) -> None:
        self.cfg = cfg
        self.node_name = node_name
        self.tracker = tracker
        self.request_sync = request_sync
        self.publisher = publisher
        self.metrics = ScaleMetrics(registry)
        self.runtime: ContainerRuntime | None = None
        self.scaler: Scaler | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._problems: set[str] = set()
        self._published: dict[str, str | None] = {}

    async def start(self) -> None:
        if self.cfg.runtime == "shim":
            from scaletozero.shimruntime import ShimRuntime

            self.runtime = ShimRuntime(Path(self.cfg.shim_socket_dir))
        else:
            from scaletozero.runc import RuncRuntime

            self.runtime = RuncRuntime(Path(self.cfg.runtime_dir), Path(self.cfg.criu),
                                       cgroup_parent=self.cfg.cgroup_parent)
        self.scaler = Scaler(self.runtime, restore_timeout=self.cfg.restore_timeout,
                             poll_interval=self.cfg.poll_interval, state_file=Path(self.cfg.state_file),
                             metrics=self.metrics, on_state=self._on_state)
        await self.scaler.start()
        self._task = asyncio.get_running_loop().create_task(self._follow())
        log.info("scale to zero on: runtime %s (%s), state file %s", self.cfg.runtime,
                 self.cfg.shim_socket_dir if self.cfg.runtime == "shim" else self.cfg.runtime_dir,
                 self.cfg.state_file)

    def pods_changed(self) -> None:
        """The source delivered Pods: look again at which pods are opted in (cheap when none changed)."""
        self._changed.set()

    async def _follow(self) -> None:
        assert self.scaler is not None and self.runtime is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            if not self.tracker.synced:
                continue  # a partial view could opt pods out; the initial lists trigger us again
            want, problems = node_pods(self.tracker.pods.values(), self.node_name, self.runtime)
            for p in sorted(set(problems) - self._problems):
                log.error("scale to zero: %s", p)
            self._problems = set(problems)
            try:
                await self.scaler.reconcile(want)
            except Exception:
                log.exception("scale to zero: reconciling pods failed")

    def _on_state(self, name: str, old: ScaleState | None, new: ScaleState | None, reason: str,
                  seconds: float | None) -> None:
        from controlplane.kubesource import PodEvent

        label, event = publication(old, new, reason, seconds)
        namespace, _, pod = name.partition("/")
        changed = self._published.get(name, "") != label
        if new is None:
            self._published.pop(name, None)
        else:
            self._published[name] = label
        if changed and self.tracker.set_local_state(namespace, pod, label):
            self.request_sync()
        if self.publisher is not None and (changed or event is not None):
            self.publisher.publish(namespace, pod, label, PodEvent(*event) if event is not None else None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.scaler is not None:
            self.scaler.on_state = None  # shutting down is not opting out: labels stay as they are
            await self.scaler.close()
        if self.runtime is not None:
            self.runtime.close()
