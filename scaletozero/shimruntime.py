"""The runtime contract over containerd-shim-zeroproxy-v2: scale to zero for pods the kubelet runs.

The kubelet creates such pods through containerd (``runtimeClassName: zeroproxy``); the shim runs
their containers and, asked on its control socket (scaletozero/shimclient.py), checkpoints one to
disk with its process gone while containerd keeps seeing it Running, and restores it in place.
This driver is that socket in the contract's terms, so the scaler, the activation proxy and the
Kubernetes glue above it run unchanged:

- ids are containerd's container ids (the CRI plugin's); :meth:`pod_container` finds a pod's one
  app container from the CRI annotations the shim reports (``io.kubernetes.cri.sandbox-namespace``,
  ``-name``, ``container-type``), so the pod's sandbox (pause) container is never touched;
- the pod's netns is the one the container's OCI spec joins: under the CRI plugin
  ``/proc/<sandbox pid>/ns/net``, so the agent must see the host's pids (``hostPID: true``);
- listening ports are read from the container's process tree while it runs, and remembered at
  each checkpoint in ``state_dir`` so an agent restarted while the pod is parked adopts it;
- create, start and delete belong to containerd and the kubelet: this driver refuses them.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from scaletozero.runtime import (
    CheckpointError,
    ContainerNotFound,
    ContainerRuntime,
    ContainerSpec,
    OpRecord,
    RestoreError,
    RuntimeDriverError,
)
from scaletozero.shimclient import OpResult, ShimClient, ShimError, ShimState, ShimUnreachable
from scaletozero.sockets import clear_time_wait, process_listen_ports, process_listeners, process_tree
from scaletozero.state import ContainerState

# The CRI plugin's annotations in every container's OCI spec (containerd pkg/cri/annotations).
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" or "container"
CRI_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_POD_NAME = "io.kubernetes.cri.sandbox-name"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"

DEFAULT_STATE_DIR = Path("/var/lib/zeroproxy/shim-runtime")


class ShimRuntime(ContainerRuntime):
    """Containers of this node's zeroproxy shims, driven through their control sockets."""

    def __init__(self, socket_dir: Path | None = None, state_dir: Path = DEFAULT_STATE_DIR, *,
                 timeout: float | None = None) -> None:
        self.client = ShimClient(socket_dir) if timeout is None else ShimClient(socket_dir, timeout=timeout)
        self.state_dir = state_dir
        self.history: list[OpRecord] = []
        self.last: dict[str, OpResult] = {}  # the shim's last timed answer per container (bench, tests)
        self._mu = threading.Lock()
        self._known: dict[str, Mapping[str, str]] = {}  # container id -> its spec's annotations

    # -- finding containers ---------------------------------------------------------------------

    def _annotations(self) -> dict[str, Mapping[str, str]]:
        """Every container with a control socket -> its spec's annotations. A container's spec
        never changes, so only ids not seen before are asked (node_pods asks this for each
        opted-in pod on every Pod change of the node)."""
        ids = self.client.container_ids()
        with self._mu:
            known = {cid: self._known[cid] for cid in ids if cid in self._known}
        for cid in ids:
            if cid not in known:
                try:
                    known[cid] = self.client.state(cid).annotations
                except ShimUnreachable:
                    continue  # a dead shim's socket: containerd's cleanup removes it
        with self._mu:
            self._known = known
        return known

    def containers(self) -> list[str]:
        """The app containers (never a pod's sandbox) the shims of this node run."""
        return sorted(cid for cid, a in self._annotations().items() if a.get(CRI_CONTAINER_TYPE) != "sandbox")

    def pod_container(self, namespace: str, pod: str) -> str | None:
        """The id of the pod's app container under the shim; None if the pod has none there (it
        does not use the RuntimeClass, or is not on this node). A pod with several app
        containers is refused: its containers would need checkpointing together."""
        candidates = [cid for cid, a in self._annotations().items()
                      if a.get(CRI_CONTAINER_TYPE) == "container"
                      and a.get(CRI_POD_NAMESPACE) == namespace and a.get(CRI_POD_NAME) == pod]
        found = []
        for cid in candidates:  # the kubelet keeps a restarted pod's exited container a while
            with contextlib.suppress(ShimUnreachable):
                if (st := self.client.state(cid)).state != ContainerState.STOPPED:
                    found.append(st)
        if len(found) > 1:
            names = sorted(s.annotations.get(CRI_CONTAINER_NAME, s.id) for s in found)
            raise RuntimeDriverError(f"pod {namespace}/{pod} has {len(found)} containers under the zeroproxy "
                                     f"runtime ({', '.join(names)}); scale to zero takes pods with one")
        return found[0].id if found else None

    def describe_missing(self, namespace: str, pod: str) -> str:
        return ("no container of it runs under the zeroproxy runtime on this node "
                "(its pod needs runtimeClassName: zeroproxy)")

    def _state(self, container_id: str) -> ShimState:
        try:
            return self.client.state(container_id)
        except ShimUnreachable as e:
            raise ContainerNotFound(f"no container {container_id!r} under the zeroproxy shim: {e.reason}") from None
        except ShimError as e:
            raise RuntimeDriverError(str(e)) from None

    # -- the contract -----------------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> None:
        raise RuntimeDriverError(f"cannot create {spec.id!r}: containerd creates the zeroproxy shim's containers "
                                 "(the kubelet, for a pod with runtimeClassName: zeroproxy)")

    def start(self, container_id: str) -> None:
        raise RuntimeDriverError(f"cannot start {container_id!r}: containerd starts the zeroproxy shim's containers")

    def delete(self, container_id: str) -> None:
        raise RuntimeDriverError(f"cannot delete {container_id!r}: the kubelet deletes its pods' containers "
                                 "(and the shim their images)")

    def state(self, container_id: str) -> ContainerState:
        return self._state(container_id).state

    def pid(self, container_id: str) -> int | None:
        return self._state(container_id).pid

    def netns(self, container_id: str) -> Path | None:
        try:
            st = self._state(container_id)
        except ContainerNotFound:
            return None
        if not st.netns:
            return None
        path = Path(st.netns)
        if not path.exists():
            raise RuntimeDriverError(f"container {container_id}: its network namespace {path} is not visible here"
                                     + (" (the agent needs hostPID: true to see the pod's sandbox process)"
                                        if st.netns.startswith("/proc/") else ""))
        return path

    def _ports_file(self, container_id: str) -> Path:
        return self.state_dir / f"{container_id}.json"

    def _recorded(self, container_id: str) -> dict[str, set[int]]:
        """What the last checkpoint recorded of the container's listeners ({} if nothing)."""
        try:
            doc = json.loads(self._ports_file(container_id).read_text())
            return {key: {int(p) for p in doc.get(key, [])} for key in ("listen_ports", "reuseaddr_ports")}
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return {}

    def listen_ports(self, container_id: str) -> set[int]:
        st = self._state(container_id)
        if st.state == ContainerState.RUNNING and st.pid:
            return process_listen_ports(process_tree(st.pid))
        return self._recorded(container_id).get("listen_ports", set())

    def checkpoint(self, container_id: str) -> Path:
        t0 = time.monotonic()
        st = self._state(container_id)
        if st.state != ContainerState.RUNNING or not st.pid:
            raise CheckpointError(f"cannot checkpoint {container_id!r}: it is {st.state}")
        # Remembered for restore (TIME_WAIT on these ports) and for an agent adopting a parked pod.
        listeners = process_listeners(process_tree(st.pid))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._ports_file(container_id).with_suffix(".tmp")
        tmp.write_text(json.dumps({"listen_ports": sorted(listeners),
                                   "reuseaddr_ports": sorted(p for p, ok in listeners.items() if ok)}))
        tmp.replace(self._ports_file(container_id))
        result = self._op(container_id, "checkpoint", t0, self.client.checkpoint, CheckpointError)
        if result.images is None:
            raise CheckpointError(f"checkpoint of {container_id!r}: the shim named no images")
        return result.images

    def restore(self, container_id: str) -> None:
        t0 = time.monotonic()
        st = self._state(container_id)
        if st.state not in (ContainerState.CHECKPOINTED, ContainerState.FAILED):
            raise RestoreError(f"cannot restore {container_id!r}: it is {st.state}")
        # Only listeners without SO_REUSEADDR need the port's TIME_WAIT sockets gone to re-bind
        # (most servers set it: Go's net, busybox, nginx); the others' wakes skip the check.
        recorded = self._recorded(container_id)  # parked: the dump's record (no second state call)
        if st.netns and (ports := recorded.get("listen_ports", set()) - recorded.get("reuseaddr_ports", set())):
            clear_time_wait(st.netns, sorted(ports), what=container_id)
        self._op(container_id, "restore", t0, self.client.restore, RestoreError)

    def _op(self, cid: str, op: str, t0: float, call: Callable[[str], OpResult],
            error: type[RuntimeDriverError]) -> OpResult:
        """One verb of the shim, recorded; its failure as the contract's error with its kind."""
        try:
            result = call(cid)
        except ShimError as e:
            self._record(cid, op, t0, False, e.reason, e.result)
            raise error(e.reason, e.criu_error, kind=e.failure) from None
        self._record(cid, op, t0, True, result=result)
        return result

    def forget(self, container_id: str) -> None:
        """Drop what this driver remembers of a container containerd deleted (its ports file)."""
        self._ports_file(container_id).unlink(missing_ok=True)

    def _record(self, cid: str, op: str, t0: float, ok: bool, reason: str = "",
                result: OpResult | None = None) -> None:
        with self._mu:
            self.history.append(OpRecord(cid, op, time.monotonic() - t0, ok, reason))
            if result is not None:
                self.last[cid] = result

    def close(self) -> None:
        """Ports files of containers no shim runs any more are dropped (pods deleted meanwhile)."""
        live = set(self.client.container_ids())
        try:
            files = list(self.state_dir.glob("*.json"))
        except OSError:
            return
        for f in files:
            if f.stem not in live:
                with contextlib.suppress(OSError):
                    f.unlink()
