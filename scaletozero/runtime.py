"""The runtime contract of scale to zero: what the scaler needs from whatever runs the containers.

The scaler, the idle tracker and the activation proxy talk only to :class:`ContainerRuntime`.
Drivers implement it beside this file: ``scaletozero/runc.py`` (:class:`RuncRuntime`, runc 1.1.5
and CRIU, containers zeroproxy starts itself) and, for pods the kubelet runs, a driver that talks
to the containerd shim's control socket (docs/runtime.md, issue 12). A driver:

- names containers by id and never owns their network namespace (the pod's, made by someone
  else; it survives checkpoint and restore, and so does the eBPF state attached to it);
- reports states as :class:`~scaletozero.state.ContainerState`;
- raises :class:`RuntimeDriverError` subclasses whose ``kind`` (a :class:`FailureKind`) it sets
  where it reads the cause, at the one place that parses runc's or CRIU's output, so nobody
  above it matches message text;
- blocks (subprocesses, sockets): asyncio callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletozero.state import ContainerState

CRIU_CONFIG_ANNOTATION = "org.criu.config"


class FailureKind(enum.StrEnum):
    """Why a checkpoint or restore failed: a short, bounded value (a metrics label), set by the
    driver where it raises."""

    NO_IMAGES = "no_images"  # restore: the checkpoint's images are missing
    IN_FLIGHT = "in_flight"  # dump: a connection waits in an accept queue (not idle after all)
    ESTABLISHED = "established"  # dump: an open connection, and tcp_established is off (not idle)
    ADDR_IN_USE = "addr_in_use"  # restore: something else holds the app's port
    TIMEOUT = "timeout"  # the runtime did not answer in time
    NOT_LISTENING = "not_listening"  # restored, but the app's ports never listened (the scaler's check)
    CRIU_ERROR = "criu_error"  # any other CRIU failure
    OTHER = "other"  # not a CRIU failure (wrong state, runc itself, ...)

    @classmethod
    def of(cls, line: str) -> FailureKind:
        """The kind of a runc/CRIU failure from its one-line message: the one table of their
        texts (runc 1.1.5, CRIU 4.2.1), for the runc driver and the shim's answers alike."""
        for needle, kind in _CAUSES:
            if needle in line:
                return kind
        return cls.CRIU_ERROR if "criu" in line.lower() else cls.OTHER

    @property
    def not_idle(self) -> bool:
        """A dump refused because the pod was in use: it stays running, nothing is wrong."""
        return self in (FailureKind.IN_FLIGHT, FailureKind.ESTABLISHED)


# Causes in runc's message or CRIU's first error line -> kind.
_CAUSES = (
    ("In-flight connection", FailureKind.IN_FLIGHT),  # dump: a connection in a listener's accept queue
    ("tcp-established", FailureKind.ESTABLISHED),  # dump: "Connected TCP socket, consider using --tcp-established"
    ("Address already in use", FailureKind.ADDR_IN_USE),  # restore: bind of the app's listener
)


class RuntimeDriverError(Exception):
    """A runtime operation failed.

    ``reason`` is one line for logs, metrics and Kubernetes Events; ``kind`` says why, for code;
    ``log_tail`` holds the end of the runtime's (runc's, CRIU's) log.
    """

    def __init__(self, message: str, log_tail: str = "", kind: FailureKind = FailureKind.OTHER) -> None:
        super().__init__(message + (f"\n--- log tail ---\n{log_tail}" if log_tail else ""))
        self.reason = message
        self.log_tail = log_tail
        self.kind = kind


class ContainerNotFound(RuntimeDriverError):
    """No container (running or checkpointed) with that id."""


class CheckpointError(RuntimeDriverError):
    """The dump failed; the container keeps running if CRIU got that far."""


class RestoreError(RuntimeDriverError):
    """The restore failed; the container is FAILED and its images are still there."""


@dataclass(frozen=True)
class ContainerSpec:
    """What a backend container is: its rootfs, command and the pod netns it joins.

    rootfs_mounts are extra OCI mounts the rootfs needs (see testbed.rootfs.Rootfs.mounts).
    tcp_established lets CRIU dump and restore established TCP connections; without it a dump
    with open connections fails, which is what scale-to-zero wants unless asked otherwise.
    """

    id: str
    rootfs: Path
    args: Sequence[str]
    netns: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    rootfs_mounts: Sequence[Mapping[str, Any]] = ()
    tcp_established: bool = False
    hostname: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OpRecord:
    """One timed runtime operation, for metrics (duration histograms, failures by reason)."""

    container: str
    op: str  # "create", "start", "checkpoint", "restore", "delete"
    seconds: float
    ok: bool
    reason: str = ""


class ContainerRuntime(abc.ABC):
    """The verbs scale-to-zero needs from a container runtime."""

    @abc.abstractmethod
    def create(self, spec: ContainerSpec) -> None:
        """Set the container up without starting its process."""

    @abc.abstractmethod
    def start(self, container_id: str) -> None:
        """Start a created container's process."""

    def run(self, spec: ContainerSpec) -> None:
        """Create and start."""
        self.create(spec)
        self.start(spec.id)

    @abc.abstractmethod
    def state(self, container_id: str) -> ContainerState:
        """Current state; raises ContainerNotFound for an unknown id."""

    @abc.abstractmethod
    def pid(self, container_id: str) -> int | None:
        """Host PID of the container's init, None unless running."""

    @abc.abstractmethod
    def netns(self, container_id: str) -> Path | None:
        """The network namespace the container joins; None when there is no such container."""

    @abc.abstractmethod
    def listen_ports(self, container_id: str) -> set[int]:
        """TCP ports the container's own processes listen on: now if it runs, at its last
        checkpoint if it is parked (what a scaler adopting a checkpointed pod must catch)."""

    def pod_container(self, namespace: str, pod: str) -> str | None:
        """The id of the pod's container in this runtime, None if it has none. By default
        ``<namespace>.<pod>``, the name zeroproxy gives the containers it starts itself (runc
        allows [A-Za-z0-9_.+-]; a namespace has no dot, so the first one separates them)."""
        cid = f"{namespace}.{pod}"
        return cid if cid in self.containers() else None

    def describe_missing(self, namespace: str, pod: str) -> str:
        """Why pod_container found nothing, for the problem line an opted-in pod gets."""
        return f"the runtime has no container {namespace}.{pod}"

    @abc.abstractmethod
    def checkpoint(self, container_id: str) -> Path:
        """Dump a running container and stop it; return the image directory."""

    @abc.abstractmethod
    def restore(self, container_id: str) -> None:
        """Bring a checkpointed (or failed) container back; return once it is running."""

    @abc.abstractmethod
    def delete(self, container_id: str) -> None:
        """Stop the container if needed and forget it, images included."""

    @abc.abstractmethod
    def containers(self) -> list[str]:
        """Ids of every container this runtime knows, in any state."""

    def close(self) -> None:  # noqa: B027 -- a default, not a required verb
        """Release what the driver holds in this process; containers keep running or stay parked."""


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and v2), from mountinfo: where a
    driver's container cgroups (and their leftovers, for tests) are."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] in ("cgroup", "cgroup2"):
                out.append(Path(pre.split()[4]))
    return out
