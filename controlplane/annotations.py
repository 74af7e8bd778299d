"""The Pod annotations through which a backend opts into scale to zero; their one home.

    metadata:
      annotations:
        zeroproxy.io/scale-to-zero: "true"     # opt in ("true" / "false", case-insensitive)
        zeroproxy.io/idle-timeout: "5m"        # optional; default 5m; Go-style duration
        zeroproxy.io/restore-timeout: "30s"    # optional; how long held clients wait; default 30s
        zeroproxy.io/probe-response: "http"    # optional; "off" (default), "tcp" or "http"

`probe-response` lets the activation proxy answer the kubelet's health probes of a checkpointed
pod without waking it (only connections from one of the node's own addresses): "tcp" accepts
and closes (a TCP-socket probe), "http" answers `200 OK` to an HTTP request whose User-Agent
starts with `kube-probe/` (an HTTP-GET probe); everything else wakes the pod as usual. A
Service's backends are its pods, so the per-service setting is this annotation on all of them.

Durations use the Go/Kubernetes form: a sequence of <number><unit> with units ms, s, m, h
("90s", "1m30s", "1.5h", "250ms"). Bounds keep typos from doing harm: the idle timeout must be
between 1 s and 7 days (tests use seconds; a checkpoint every few hundred ms would thrash), the
restore timeout between 1 s and 10 min.

Invalid values never raise: `parse` returns the problems as lines naming the pod and the
annotation, and the pod is then treated as not opted in (the safe side: it keeps running).

The scaler of the pod's node publishes the pod's state as a **label** (not an annotation), so
that every agent can watch exactly the pods that have one with a server-side label selector:

    metadata:
      labels:
        zeroproxy.io/scale-state: checkpointed   # running / checkpointed / restoring / failed

Translation reads it: an endpoint whose pod is parked (checkpointed, restoring, failed) gets new
connections only while no endpoint of the same service port runs. The values and the probe modes
are scale to zero's own enums (scaletozero/state.py); this module only names the keys and
parses the strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.config import DurationError, format_duration, parse_duration
from scaletozero.state import LABELS, ProbeResponse, ScaleState

PREFIX = "zeroproxy.io/"
SCALE_TO_ZERO = PREFIX + "scale-to-zero"
# Its value for a trial: idle tracking, the would-checkpoint and would-wake decisions, logs,
# metrics and Events, and never a checkpoint (zeropod's users ask for it: judge a workload first).
DRY_RUN = "dry-run"
IDLE_TIMEOUT = PREFIX + "idle-timeout"
RESTORE_TIMEOUT = PREFIX + "restore-timeout"
PROBE_RESPONSE = PREFIX + "probe-response"  # a scaletozero.state.ProbeResponse value
# The label the scaler publishes on its pods (the file source honours it too); its values are
# ScaleState.label (LABELS).
STATE = PREFIX + "scale-state"

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_RESTORE_TIMEOUT = 30.0
IDLE_TIMEOUT_BOUNDS = (1.0, 7 * 24 * 3600.0)
RESTORE_TIMEOUT_BOUNDS = (1.0, 600.0)

def parked(state: str | None) -> bool:
    """True when an endpoint in this published state should get traffic only if all others do too.

    Any value that is not a published state, or none, counts as running: the safe side is to keep
    using an endpoint, never to drop one because of a label we do not understand.
    """
    return state in LABELS and ScaleState(state).parked


@dataclass(frozen=True)
class ScaleToZero:
    """A pod's validated scale-to-zero settings."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    restore_timeout: float = DEFAULT_RESTORE_TIMEOUT
    probe_response: ProbeResponse = ProbeResponse.OFF
    dry_run: bool = False  # scale-to-zero: "dry-run": every decision made and reported, none carried out


def parse(annotations: Mapping[str, str], pod: str = "pod") -> tuple[ScaleToZero | None, list[str]]:
    """The settings if the pod opted in (None otherwise), and every problem found.

    A pod with an invalid value is not opted in: a bad idle timeout could otherwise freeze a
    busy service or never free an idle one.
    """
    problems: list[str] = []
    raw = annotations.get(SCALE_TO_ZERO)
    if raw is None:
        return None, problems
    flag = raw.strip().lower()
    if flag not in ("true", "false", DRY_RUN):
        problems.append(f"{pod}: annotation {SCALE_TO_ZERO}={raw!r}: expected \"true\", \"false\" or \"{DRY_RUN}\"")
        return None, problems
    if flag == "false":
        return None, problems

    def duration(key: str, default: float, bounds: tuple[float, float]) -> float | None:
        value = annotations.get(key)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except DurationError as e:
            problems.append(f"{pod}: annotation {key}: {e}")
            return None
        lo, hi = bounds
        if not lo <= seconds <= hi:
            problems.append(f"{pod}: annotation {key}={value!r}: must be between "
                            f"{format_duration(lo)} and {format_duration(hi)}")
            return None
        return seconds

    idle = duration(IDLE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, IDLE_TIMEOUT_BOUNDS)
    restore = duration(RESTORE_TIMEOUT, DEFAULT_RESTORE_TIMEOUT, RESTORE_TIMEOUT_BOUNDS)
    probe = annotations.get(PROBE_RESPONSE, ProbeResponse.OFF).strip().lower()
    if probe not in tuple(ProbeResponse):
        problems.append(f"{pod}: annotation {PROBE_RESPONSE}={annotations[PROBE_RESPONSE]!r}: expected one of "
                        + ", ".join(f'"{v}"' for v in ProbeResponse))
        return None, problems
    if idle is None or restore is None:
        return None, problems
    return ScaleToZero(idle_timeout=idle, restore_timeout=restore, probe_response=ProbeResponse(probe),
                       dry_run=flag == DRY_RUN), problems


def annotate(idle_timeout: str = "5m", restore_timeout: str | None = None,
             probe_response: str | None = None) -> dict[str, str]:
    """The annotations that opt a pod in (for tests, the demo and manifests)."""
    out = {SCALE_TO_ZERO: "true", IDLE_TIMEOUT: idle_timeout}
    if restore_timeout is not None:
        out[RESTORE_TIMEOUT] = restore_timeout
    if probe_response is not None:
        out[PROBE_RESPONSE] = probe_response
    return out
