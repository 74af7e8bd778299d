"""Client of containerd-shim-zeroproxy-v2's control API (shim/task/control.go).

On a containerd node the kubelet creates pods, so zeroproxy cannot checkpoint them with runc
itself: the shim does, keeping the container Running to containerd meanwhile. The agent asks it
over a unix socket per container, ``<socket_dir>/<container-id>.sock``, speaking HTTP with JSON
bodies, so this module needs only the standard library:

    GET  /v1/state        -> ShimState
    POST /v1/checkpoint   -> OpResult   (body {"tcp_established": bool})
    POST /v1/restore      -> OpResult

The shim's state strings are `scaletozero.state.ContainerState`'s values: the shim's API defines
them (shim/task/container.go) and this side mirrors them, one vocabulary for both runtimes.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaletozero.runtime import FailureKind
from scaletozero.state import ContainerState

ENV_SOCKET_DIR = "ZP_SHIM_SOCKET_DIR"  # the shim reads the same variable
DEFAULT_SOCKET_DIR = Path("/run/zeroproxy/shim")
# A checkpoint or restore is one runc + CRIU run: well under a second for small apps, but a large
# heap takes as long as writing it to disk does.
DEFAULT_TIMEOUT_S = 120.0


def default_socket_dir() -> Path:
    """The directory the shim puts its sockets in, honouring the same override it does."""
    return Path(os.environ.get(ENV_SOCKET_DIR) or DEFAULT_SOCKET_DIR)


class ShimError(Exception):
    """A control call failed; the message names the container, and ``reason`` is one log line.

    ``kind`` is the shim's error kind (``failed_precondition``, ``not_found``, ``failed``, ...,
    ``unreachable`` when no shim answered, ``timeout`` when it did not answer in time),
    ``criu_error`` CRIU's first error line, if any; ``failure`` maps it all to FailureKind.
    """

    def __init__(self, container: str, reason: str, *, kind: str = "failed", status: int = 0,
                 criu_error: str = "", result: OpResult | None = None) -> None:
        super().__init__(f"shim control of container {container}: {reason}"
                         + (f" (CRIU: {criu_error})" if criu_error and criu_error not in reason else ""))
        self.container = container
        self.reason = reason
        self.kind = kind
        self.status = status
        self.criu_error = criu_error
        self.result = result

    @property
    def failure(self) -> FailureKind:
        """The failure in the runtime contract's terms (a metrics label; ``not_idle`` for dumps
        refused because the pod was in use). Under the shim the same runc and CRIU write the
        same texts as under the runc driver: FailureKind.of classifies them."""
        if self.kind == "not_found" and self.result is not None and self.result.op == "restore":
            return FailureKind.NO_IMAGES
        if self.kind == "timeout":
            return FailureKind.TIMEOUT
        if self.kind == "failed":
            return FailureKind.of(f"{self.reason} {self.criu_error}")
        return FailureKind.OTHER


class ShimUnreachable(ShimError):
    """No shim serves that container's socket (not ours, not created yet, or already deleted)."""


class ShimRefused(ShimError):
    """The container is not in a state for that verb (e.g. restore while running)."""


class ShimOpFailed(ShimError):
    """runc or CRIU failed; ``criu_error`` usually says why."""


@dataclass(frozen=True)
class OpResult:
    """One checkpoint or restore as the shim timed it."""

    op: str
    ok: bool
    state: ContainerState  # after the operation
    pid: int | None  # host pid of the container's init; None unless running
    timings_ms: Mapping[str, float] = field(default_factory=dict)  # "total", "dump"/"restore", ...
    images: Path | None = None
    error: str = ""
    criu_error: str = ""
    criu_log: Path | None = None
    at: str = ""  # RFC 3339, the shim's clock

    @property
    def total_ms(self) -> float:
        return self.timings_ms.get("total", 0.0)


@dataclass(frozen=True)
class ShimState:
    """What the shim knows of one container."""

    id: str
    namespace: str  # containerd's namespace ("k8s.io" for the CRI plugin's containers)
    bundle: str
    netns: str  # the OCI spec's network namespace path; "" when the container made its own
    annotations: Mapping[str, str]  # the spec's io.kubernetes.cri.* and zeroproxy.io/* annotations
    state: ContainerState
    dumping: bool  # a checkpoint is running (state stays running until it succeeds)
    pid: int | None
    images: Path | None
    checkpoints: int
    restores: int
    last: OpResult | None


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], container: str,
           default: Any = None) -> Any:
    value = obj.get(name, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ShimError(container, f"bad answer: field {name!r} is {value!r}")
    return value


def _state(value: Any, container: str) -> ContainerState:
    try:
        return ContainerState(value)
    except ValueError:
        raise ShimError(container, f"bad answer: field 'state' is {value!r}, not one of "
                                   f"{[s.value for s in ContainerState]}") from None


def _op_result(obj: Mapping[str, Any], container: str) -> OpResult:
    timings = _field(obj, "timings_ms", dict, container, {})
    if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in timings.items()):
        raise ShimError(container, f"bad answer: field 'timings_ms' is {timings!r}")
    pid = _field(obj, "pid", int, container, 0)
    images = _field(obj, "images", str, container, "")
    log = _field(obj, "criu_log", str, container, "")
    return OpResult(
        op=_field(obj, "op", str, container), ok=_field(obj, "ok", bool, container, False),
        state=_state(obj.get("state"), container), pid=pid or None,
        timings_ms={k: float(v) for k, v in timings.items()},
        images=Path(images) if images else None, error=_field(obj, "error", str, container, ""),
        criu_error=_field(obj, "criu_error", str, container, ""), criu_log=Path(log) if log else None,
        at=_field(obj, "at", str, container, ""))


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: http.client only lacks the connect."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ShimClient:
    """Calls the control API of the shims on this node; one short connection per call."""

    def __init__(self, socket_dir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_dir = socket_dir if socket_dir is not None else default_socket_dir()
        self.timeout = timeout

    def socket_path(self, container_id: str) -> Path:
        if not container_id or "/" in container_id or container_id in (".", ".."):
            raise ValueError(f"bad container id {container_id!r}")
        return self.socket_dir / f"{container_id}.sock"

    def container_ids(self) -> list[str]:
        """The ids of the containers whose control sockets are in the directory (a socket left by
        a dead shim included: its calls raise ShimUnreachable)."""
        try:
            return sorted(p.name[:-5] for p in self.socket_dir.iterdir() if p.name.endswith(".sock"))
        except FileNotFoundError:
            return []

    def state(self, container_id: str) -> ShimState:
        obj = self._call(container_id, "GET", "/v1/state")
        last = obj.get("last")
        images = _field(obj, "images", str, container_id, "")
        pid = _field(obj, "pid", int, container_id, 0)
        annotations = _field(obj, "annotations", dict, container_id, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ShimError(container_id, f"bad answer: field 'annotations' is {annotations!r}")
        return ShimState(
            id=_field(obj, "id", str, container_id), namespace=_field(obj, "namespace", str, container_id),
            bundle=_field(obj, "bundle", str, container_id, ""), netns=_field(obj, "netns", str, container_id, ""),
            annotations=annotations,
            state=_state(obj.get("state"), container_id), dumping=_field(obj, "dumping", bool, container_id, False),
            pid=pid or None, images=Path(images) if images else None,
            checkpoints=_field(obj, "checkpoints", int, container_id, 0),
            restores=_field(obj, "restores", int, container_id, 0),
            last=_op_result(last, container_id) if isinstance(last, dict) else None)

    def checkpoint(self, container_id: str, *, tcp_established: bool = False) -> OpResult:
        """Dump the container to disk and let its process go; it stays Running to containerd."""
        return self._op(container_id, "/v1/checkpoint", {"tcp_established": tcp_established})

    def restore(self, container_id: str) -> OpResult:
        """Bring it back in place (same netns, same IP); returns once the process runs."""
        return self._op(container_id, "/v1/restore", None)

    def _op(self, container_id: str, path: str, body: Mapping[str, Any] | None) -> OpResult:
        obj = self._call(container_id, "POST", path, body, ok_only=False)
        result = _op_result(obj, container_id)
        status = obj["_status"]
        if status == 200 and result.ok:
            return result
        kind = _field(obj, "kind", str, container_id, "") or {409: "failed_precondition", 404: "not_found",
                                                               400: "invalid_argument"}.get(status, "failed")
        cls = ShimRefused if status == 409 else ShimOpFailed
        raise cls(container_id, result.error or f"HTTP {status}", kind=kind, status=status,
                  criu_error=result.criu_error, result=result)

    def _call(self, container_id: str, method: str, path: str, body: Mapping[str, Any] | None = None,
              *, ok_only: bool = True) -> dict[str, Any]:
        sock = self.socket_path(container_id)
        conn = _UnixConnection(sock, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise ShimError(container_id, f"{method} {path} on {sock}: no answer within {self.timeout:g}s",
                            kind="timeout") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ShimUnreachable(container_id, f"no shim on {sock}: {exc.strerror or exc}",
                                  kind="unreachable") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ShimUnreachable(container_id, f"{method} {path} on {sock}: {exc}", kind="unreachable") from None
        finally:
            conn.close()
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ShimError(container_id, f"{method} {path}: HTTP {resp.status}, not JSON: {raw[:200]!r}",
                            status=resp.status) from None
        if not isinstance(obj, dict):
            raise ShimError(container_id, f"{method} {path}: HTTP {resp.status}, not an object: {raw[:200]!r}",
                            status=resp.status)
        if ok_only and resp.status != 200:
            raise ShimError(container_id, f"{method} {path}: HTTP {resp.status}: {obj.get('error', raw[:200])}",
                            status=resp.status)
        obj["_status"] = resp.status
        return obj
