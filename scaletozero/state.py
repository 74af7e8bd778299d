"""The words of scale to zero, defined once: a pod's state, a container's state, probe answering.

Everything that names a state or a probe mode uses these enums: the scaler's state machine, its
metrics and state file, the ``zeroproxy.io/scale-state`` label the control plane publishes
(:attr:`ScaleState.label`), the translation's choice of running endpoints (:data:`PARKED`), the
runtime drivers and the ``zeroproxy.io/probe-response`` annotation.

There are two state enums because they describe two things (docs/architecture-decisions.md):

- :class:`ScaleState` is the *scaler's* view of an opted-in pod: the decision it is in the middle
  of. ``checkpointing`` (the redirect is on and a dump runs) exists only there; a runtime cannot
  see it (runc is simply running, the shim reports Running throughout).
- :class:`ContainerState` is what a *runtime* reports of one container: the contract every driver
  answers (RuncRuntime, and the shim's control API, which the Python side mirrors). It has
  ``created`` and ``stopped``, which are never states of a managed pod.

The states both know share their values, and :meth:`ScaleState.adopt` is the one mapping from a
container a scaler finds to the state the scaler starts it in.
"""

from __future__ import annotations

import enum


class ScaleState(enum.StrEnum):
    """An opted-in pod, as the scaler manages it (docs/scale-to-zero.md, the state machine)."""

    RUNNING = "running"
    CHECKPOINTING = "checkpointing"  # redirect on, dump in progress; still serving
    CHECKPOINTED = "checkpointed"  # processes gone, images on disk, connections are held
    RESTORING = "restoring"
    FAILED = "failed"  # the last restore failed; the next connection tries again

    @property
    def label(self) -> str:
        """The value published in the ``zeroproxy.io/scale-state`` label.

        ``checkpointing`` publishes as ``running``: the pod still serves, and a connection during
        the dump is held and wakes it right after.
        """
        return ScaleState.RUNNING.value if self is ScaleState.CHECKPOINTING else self.value

    @property
    def parked(self) -> bool:
        """The pod's own process does not serve: a connection to it waits for a restore."""
        return self in PARKED

    @classmethod
    def adopt(cls, container: ContainerState) -> ScaleState:
        """The state a scaler starts a pod in whose container is found in this state (an agent
        restart adopts checkpointed containers). A container another process is restoring will
        run in a moment, so it counts as running, like every other state."""
        return {ContainerState.CHECKPOINTED: cls.CHECKPOINTED, ContainerState.FAILED: cls.FAILED}.get(
            container, cls.RUNNING)


# States in which the pod's own process does not serve.
PARKED = frozenset((ScaleState.CHECKPOINTED, ScaleState.RESTORING, ScaleState.FAILED))
# The values the state label takes (checkpointing is published as running).
LABELS = tuple(dict.fromkeys(s.label for s in ScaleState))


class ContainerState(enum.StrEnum):
    """One container as a runtime driver reports it (ContainerRuntime.state)."""

    CREATED = "created"  # created, process waiting for start
    RUNNING = ScaleState.RUNNING.value
    CHECKPOINTED = ScaleState.CHECKPOINTED.value  # processes gone, images on disk
    RESTORING = ScaleState.RESTORING.value
    FAILED = ScaleState.FAILED.value  # last restore failed; images kept so a later restore may retry
    STOPPED = "stopped"  # process exited, or never started


class ProbeResponse(enum.StrEnum):
    """How the activation proxy answers the kubelet's probes of a parked pod
    (annotation ``zeroproxy.io/probe-response``; docs/scale-to-zero.md, Health probes)."""

    OFF = "off"  # every connection wakes the pod, probes too
    TCP = "tcp"  # connections from the node are accepted and closed
    HTTP = "http"  # kube-probe/ HTTP requests from the node get 200 OK
