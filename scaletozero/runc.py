"""The runc driver of the runtime contract: containers zeroproxy runs itself with runc and CRIU.

`RuncRuntime` implements `scaletozero.runtime.ContainerRuntime` with runc 1.1.5 and a CRIU built
by scripts/build-criu.sh. The driver for pods the kubelet runs (through the containerd shim) sits
beside this file and implements the same contract (docs/runtime.md).

What the runc implementation takes care of, each learnt the hard way on these machines:

- Containers join a network namespace made beforehand (the pod netns), so checkpoint/restore
  never creates or destroys the netns the dataplane's eBPF state is attached to; runc passes it
  to CRIU as an external namespace.
- Each container has its own PID namespace: a restore needs its old PIDs, and a host PID may
  still be held by a zombie that the host's init has not reaped yet.
- stdio are pipes, drained by a small `cat` into a log file. CRIU cannot dump a terminal that
  runc no longer holds, nor a /dev/null from a mount namespace that is gone.
- CRIU runs with `network-lock skip` (a CRIU config file named by the OCI annotation
  `org.criu.config`; runc 1.1.5 has no flag for it): zeroproxy's eBPF state, not iptables,
  keeps traffic away from a dumping process. Restores add `tcp-close` (_write_criu_conf).
- Restores first drop TIME_WAIT sockets on the app's ports, which would make the bind of an
  app without SO_REUSEADDR fail (_clear_time_wait).

All methods block (runc and CRIU are subprocesses); asyncio callers use `asyncio.to_thread`.
Operations on one container are serialised by a lock file, so two processes (agent and CLI)
cannot dump and restore the same container at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from scaletozero.runtime import (
    CRIU_CONFIG_ANNOTATION,
    CheckpointError,
    ContainerNotFound,
    ContainerRuntime,
    ContainerSpec,
    FailureKind,
    OpRecord,
    RestoreError,
    RuntimeDriverError,
    cgroup_mounts,
)
from scaletozero.sockets import clear_time_wait, process_listen_ports
from scaletozero.state import ContainerState

log = logging.getLogger(__name__)

# Lines of CRIU's log put into an exception: enough to show the failing step and its cause.
LOG_TAIL_LINES = 25


def _tail(path: Path, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    """Last lines of path from byte offset start on ('' if missing): the error is near the end."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def failure(what: str, stderr: str, runc_log: str, criu_log: str) -> tuple[str, FailureKind]:
    """Why a runc command failed: one line (runc's own message plus CRIU's first real error, if
    any) and its kind. The one place that reads runc's and CRIU's output.

    The line goes to logs, metrics and Kubernetes Events, so it must make sense without the
    full logs. CRIU's first error is the cause (later ones are the unwinding it triggered);
    the rlimit error CRIU always logs here is harmless and skipped. ``criu_log`` is the text of
    CRIU's log ('' when the command ran no CRIU).
    """
    msg = ""
    for line in reversed((stderr + "\n" + runc_log).strip().splitlines()):
        m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
        msg = (m.group(1).replace("\\n", "; ").replace('\\"', '"') if m else line).strip()
        if msg:
            break
    out = f"{what} failed: {msg or 'no message'}"
    criu_error = next((line[line.index("Error ("):] for line in criu_log.splitlines()
                       if "Error (" in line and "rlimit" not in line), "")
    if criu_error:
        out += "; CRIU: " + criu_error
    return out, FailureKind.of(out)


class RuncRuntime(ContainerRuntime):
    """runc 1.1.5 + CRIU >= 4.2.1.

    base_dir holds per-container directories (bundle, criu config, images, logs, meta.json)
    and runc's own state (`runc --root`), so several runtimes (tests, nodes of a test bed)
    never see each other's containers. Containers' cgroups go under cgroup_parent (an absolute
    path in every hierarchy), which `remove_cgroup_parent` deletes once empty (`delete_all` does both).
    """

    def __init__(
        self,
        base_dir: Path,
        criu: Path,
        *,
        runc: str = "runc",
        cgroup_parent: str = "/zeroproxy",
        on_op: Callable[[OpRecord], None] | None = None,
        timeout: float = 120.0,
    ) -> None:
        if not cgroup_parent.startswith("/") or cgroup_parent.rstrip("/") == "":
            raise ValueError("cgroup_parent must be an absolute path below the hierarchy root")
        self.base_dir = base_dir
        self.criu = criu
        self.runc = runc
        self.cgroup_parent = cgroup_parent.rstrip("/")
        self.on_op = on_op
        self.timeout = timeout
        self.history: list[OpRecord] = []
        self._pumps: dict[str, subprocess.Popen[bytes]] = {}
        self._draining: list[subprocess.Popen[bytes]] = []
        self._mu = threading.Lock()
        self._cgroup_dirs_before = self._existing_cgroup_dirs()
        (self.base_dir / "containers").mkdir(parents=True, exist_ok=True)
        (self.base_dir / "runc").mkdir(parents=True, exist_ok=True)

    # --- paths and bookkeeping -------------------------------------------------------------

    def _dir(self, cid: str) -> Path:
        if not cid or "/" in cid or cid.startswith("."):
            raise ValueError(f"bad container id {cid!r}")
        return self.base_dir / "containers" / cid

    def images_dir(self, container_id: str) -> Path:
        """Where the latest checkpoint of the container lives (present only after one)."""
        return self._dir(container_id) / "checkpoint"

    def output_log(self, container_id: str) -> Path:
        """The container's stdout and stderr, across restores."""
        return self._dir(container_id) / "output.log"

    def _read_meta(self, cid: str) -> dict[str, Any]:
        try:
            return json.loads((self._dir(cid) / "meta.json").read_text())
        except FileNotFoundError:
            return {}

    def _write_meta(self, cid: str, **updates: Any) -> None:
        """Update meta.json atomically: another process may read it (state) at any moment."""
        meta = self._read_meta(cid)
        meta.update(updates)
        path = self._dir(cid) / "meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        tmp.rename(path)

    @contextlib.contextmanager
    def _locked(self, cid: str) -> Iterator[None]:
        cdir = self._dir(cid)
        if not cdir.is_dir():
            raise ContainerNotFound(f"no container {cid!r} in {self.base_dir}")
        with open(cdir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _record(self, cid: str, op: str, t0: float, ok: bool, reason: str = "") -> None:
        rec = OpRecord(container=cid, op=op, seconds=time.monotonic() - t0, ok=ok, reason=reason)
        with self._mu:
            self.history.append(rec)
        with contextlib.suppress(FileNotFoundError):
            self._write_meta(cid, **{f"last_{op}": {"seconds": rec.seconds, "ok": ok, "reason": reason}})
        log.info(
            "%s %s: %s in %.3f s%s", op, cid, "ok" if ok else "FAILED", rec.seconds, f" ({reason})" if reason else ""
        )
        if self.on_op is not None:
            self.on_op(rec)

    # --- runc invocation -------------------------------------------------------------------

    def _runc_cmd(self, cid: str, *args: str) -> list[str]:
        return [
            self.runc,
            "--root",
            str(self.base_dir / "runc"),
            "--criu",
            str(self.criu),
            "--log",
            str(self._dir(cid) / "runc.log"),
            *args,
        ]

    def _runc(
        self, cid: str, *args: str, error: type[RuntimeDriverError] = RuntimeDriverError, criu_log: Path | None = None
    ) -> str:
        """Run a runc command that does not hand stdio to a container; raise with the logs."""
        runc_log = self._dir(cid) / "runc.log"
        start = _size(runc_log)
        res = self._run(error, cid, args, criu_log, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode != 0:
            raise self._failed(error, cid, args[0], res.stderr, runc_log, start, criu_log)
        return res.stdout

    def _run(self, error: type[RuntimeDriverError], cid: str, args: tuple[str, ...], criu_log: Path | None,
             **popen: Any) -> subprocess.CompletedProcess[Any]:
        """runc ``args`` for ``cid`` within the driver's timeout; a timeout raises ``error`` of kind TIMEOUT."""
        try:
            return subprocess.run(self._runc_cmd(cid, *args), timeout=self.timeout, check=False, **popen)
        except subprocess.TimeoutExpired as e:
            raise error(f"runc {args[0]} {cid}: timed out after {self.timeout} s",
                        _tail(criu_log) if criu_log else "", FailureKind.TIMEOUT) from e

    @staticmethod
    def _failed(error: type[RuntimeDriverError], cid: str, verb: str, stderr: str, runc_log: Path, start: int,
                criu_log: Path | None) -> RuntimeDriverError:
        """The exception for a failed runc command, with its one line, kind and CRIU's log tail."""
        reason, kind = failure(f"runc {verb} {cid}", stderr, _tail(runc_log, 5, start),
                               _tail(criu_log, 100_000) if criu_log is not None else "")
        return error(reason, _tail(criu_log) if criu_log else "", kind)

    def _runc_with_stdio(
        self, cid: str, *args: str, error: type[RuntimeDriverError] = RuntimeDriverError, criu_log: Path | None = None
    ) -> None:
        """Run runc create/restore with fresh stdio pipes the container keeps.

        stdout and stderr go into one pipe drained by `cat` into output.log; stdin is a pipe
        whose writer is closed at once (EOF). runc's own errors come from its --log file, because
        its stderr becomes the container's.
        """
        cdir = self._dir(cid)
        runc_log = cdir / "runc.log"
        start = _size(runc_log)
        self._reap_pump(cid)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        os.close(in_w)
        try:
            with open(cdir / "output.log", "ab") as sink:
                pump = subprocess.Popen(["cat"], stdin=out_r, stdout=sink, stderr=subprocess.DEVNULL)
            os.close(out_r)
            out_r = -1
            with self._mu:
                self._pumps[cid] = pump
            res = self._run(error, cid, args, criu_log, stdin=in_r, stdout=out_w, stderr=out_w)
        finally:
            for fd in (in_r, out_w, out_r):
                if fd >= 0:
                    os.close(fd)
        if res.returncode != 0:
            raise self._failed(error, cid, args[0], "", runc_log, start, criu_log)

    def _reap_pump(self, cid: str, wait: float = 0.0) -> None:
        """Collect the log pump of a previous run; it exits on its own once the pipe closes.

        A pump still draining after `wait` (its container's last bytes, or a container that
        lives on) moves to a list that later calls and close() collect.
        """
        with self._mu:
            pump = self._pumps.pop(cid, None)
            if pump is not None:
                self._draining.append(pump)
            draining = list(self._draining)
        for p in draining:
            if p is pump and wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=wait)
            else:
                p.poll()
        with self._mu:
            self._draining = [p for p in self._draining if p.returncode is None]

    def _runc_state(self, cid: str) -> dict[str, Any] | None:
        """runc's view of the container, None when runc does not know it (e.g. checkpointed)."""
        if not (self.base_dir / "runc" / cid).exists():
            return None
        res = subprocess.run(
            self._runc_cmd(cid, "state", cid), capture_output=True, text=True, timeout=self.timeout, check=False
        )
        if res.returncode != 0:
            return None
        return json.loads(res.stdout)

    # --- the OCI bundle --------------------------------------------------------------------

    def _oci_config(self, spec: ContainerSpec, criu_conf: Path) -> dict[str, Any]:
        """A config.json close to `runc spec`'s, minus what CRIU or the pod model does not need.

        No /sys and no /sys/fs/cgroup mounts: the backends need neither, and every mount is one
        more thing CRIU must dump and put back.
        """
        caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **spec.env}
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": list(spec.args),
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": spec.cwd,
                "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": True,
            },
            "root": {"path": str(spec.rootfs), "readonly": True},
            "hostname": spec.hostname or spec.id[:63],
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {
                    "destination": "/dev",
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
                },
                {
                    "destination": "/dev/pts",
                    "type": "devpts",
                    "source": "devpts",
                    "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
                },
                {
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
                },
                {
                    "destination": "/dev/mqueue",
                    "type": "mqueue",
                    "source": "mqueue",
                    "options": ["nosuid", "noexec", "nodev"],
                },
                {
                    "destination": "/tmp",
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777", "size=16m"],
                },
                *[dict(m) for m in spec.rootfs_mounts],
            ],
            "annotations": {**spec.annotations, CRIU_CONFIG_ANNOTATION: str(criu_conf)},
            "linux": {
                "cgroupsPath": f"{self.cgroup_parent}/{spec.id}",
                "resources": {"devices": [{"allow": False, "access": "rwm"}]},
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": str(spec.netns)},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "mount"},
                ],
                "maskedPaths": [
                    "/proc/acpi",
                    "/proc/asound",
                    "/proc/kcore",
                    "/proc/keys",
                    "/proc/latency_stats",
                    "/proc/timer_list",
                    "/proc/timer_stats",
                    "/proc/sched_debug",
                    "/proc/scsi",
                ],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        }

    def _write_criu_conf(self, cid: str, *, restore: bool, tcp_established: bool) -> None:
        """Write the CRIU config file runc names in `org.criu.config`, for the coming operation.

        runc passes one path for dump and restore alike, and CRIU reads the file at each call,
        so its content is rewritten (under the container's lock) before each one:

        - network-lock skip, always: no iptables/nftables rule is ever made; zeroproxy's eBPF
          state keeps traffic away from the process during a dump instead.
        - tcp-close, on restore without tcp-established: a connection the app still holds but
          whose peer has gone (TCP_CLOSE, e.g. reset by the client) dumps fine yet makes the
          restore fail with "Connected TCP socket in image"; restoring it closed is what the
          app would have seen anyway. Not on dump: there it would let CRIU kill live
          connections instead of refusing the checkpoint.
        """
        lines = ["network-lock skip"]
        if restore and not tcp_established:
            lines.append("tcp-close")
        (self._dir(cid) / "criu.conf").write_text("\n".join(lines) + "\n")

    # --- the interface -----------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> None:
        cdir = self._dir(spec.id)
        if not spec.netns.exists():
            raise RuntimeDriverError(f"network namespace {spec.netns} does not exist")
        if cdir.exists():
            raise RuntimeDriverError(f"container {spec.id!r} already exists in {self.base_dir}")
        t0 = time.monotonic()
        (cdir / "bundle").mkdir(parents=True)
        criu_conf = cdir / "criu.conf"
        self._write_criu_conf(spec.id, restore=False, tcp_established=spec.tcp_established)
        config = self._oci_config(spec, criu_conf)
        (cdir / "bundle" / "config.json").write_text(json.dumps(config, indent=1))
        self._write_meta(spec.id, phase="created", tcp_established=spec.tcp_established)
        with self._locked(spec.id):
            try:
                self._runc_with_stdio(spec.id, "create", "--bundle", str(cdir / "bundle"), spec.id)
            except RuntimeDriverError as e:
                self._record(spec.id, "create", t0, False, e.reason)
                raise
            self._write_meta(spec.id, phase="created")
        self._record(spec.id, "create", t0, True)

    def start(self, container_id: str) -> None:
        t0 = time.monotonic()
        with self._locked(container_id):
            try:
                self._runc(container_id, "start", container_id)
            except RuntimeDriverError as e:
                self._record(container_id, "start", t0, False, e.reason)
                raise
            self._write_meta(container_id, phase="running")
        self._record(container_id, "start", t0, True)

    def state(self, container_id: str) -> ContainerState:
        cdir = self._dir(container_id)
        if not cdir.is_dir():
            raise ContainerNotFound(f"no container {container_id!r} in {self.base_dir}")
        meta = self._read_meta(container_id)
        phase = meta.get("phase")
        if phase == "restoring":
            pid = meta.get("restorer_pid", 0)
            if pid and Path(f"/proc/{pid}").exists():
                return ContainerState.RESTORING
            return ContainerState.FAILED  # the restoring process died half-way
        st = self._runc_state(container_id)
        if st is not None:
            return {
                "created": ContainerState.CREATED,
                "running": ContainerState.RUNNING,
                "paused": ContainerState.RUNNING,
                "creating": ContainerState.CREATED,
            }.get(st.get("status", ""), ContainerState.STOPPED)
        if phase == "checkpointed":
            return ContainerState.CHECKPOINTED
        if phase == "failed":
            return ContainerState.FAILED
        return ContainerState.STOPPED

    def reason(self, container_id: str) -> str:
        """Why the container is FAILED ('' otherwise): kept in meta.json for CLI and events."""
        return str(self._read_meta(container_id).get("reason", ""))

    def pid(self, container_id: str) -> int | None:
        st = self._runc_state(container_id)
        if st is None or st.get("status") not in ("running", "created", "paused"):
            return None
        return int(st["pid"]) or None

    def checkpoint(self, container_id: str) -> Path:
        t0 = time.monotonic()
        with self._locked(container_id):
            st = self.state(container_id)
            if st != ContainerState.RUNNING:
                raise CheckpointError(f"cannot checkpoint {container_id!r}: it is {st}")
            cdir = self._dir(container_id)
            images, new = cdir / "checkpoint", cdir / "checkpoint.new"
            work = cdir / "criu"
            shutil.rmtree(new, ignore_errors=True)
            work.mkdir(exist_ok=True)
            (work / "dump.log").unlink(missing_ok=True)
            # Remembered for restore, which frees these ports from TIME_WAIT (see _clear_time_wait).
            self._write_meta(container_id, listen_ports=sorted(process_listen_ports(self._pids(container_id))))
            args = ["checkpoint", "--image-path", str(new), "--work-path", str(work)]
            tcp_established = bool(self._read_meta(container_id).get("tcp_established"))
            if tcp_established:
                args.append("--tcp-established")
            self._write_criu_conf(container_id, restore=False, tcp_established=tcp_established)
            try:
                self._runc(container_id, *args, container_id, error=CheckpointError, criu_log=work / "dump.log")
            except CheckpointError as e:
                shutil.rmtree(new, ignore_errors=True)
                self._record(container_id, "checkpoint", t0, False, e.reason)
                raise
            # Replace the previous checkpoint only once the new one is complete.
            shutil.rmtree(images, ignore_errors=True)
            new.rename(images)
            self._write_meta(container_id, phase="checkpointed", reason="")
            self._reap_pump(container_id, wait=5.0)
        self._record(container_id, "checkpoint", t0, True)
        return images

    def restore(self, container_id: str) -> None:
        t0 = time.monotonic()
        with self._locked(container_id):
            st = self.state(container_id)
            if st not in (ContainerState.CHECKPOINTED, ContainerState.FAILED):
                raise RestoreError(f"cannot restore {container_id!r}: it is {st}")
            self._write_meta(container_id, phase="restoring", restorer_pid=os.getpid())
            try:
                self._restore_locked(container_id)
            except RestoreError as e:
                self._write_meta(container_id, phase="failed", reason=e.reason)
                self._record(container_id, "restore", t0, False, e.reason)
                raise
            self._write_meta(container_id, phase="running", reason="")
        self._record(container_id, "restore", t0, True)

    def _restore_locked(self, cid: str) -> None:
        cdir = self._dir(cid)
        images, work = cdir / "checkpoint", cdir / "criu"
        if not (images / "inventory.img").is_file():
            raise RestoreError(f"no checkpoint images for {cid!r}: {images}/inventory.img is missing",
                               kind=FailureKind.NO_IMAGES)
        # A failed attempt can leave runc's record of the container behind; it would make
        # `runc restore` refuse the id.
        if self._runc_state(cid) is not None:
            self._runc(cid, "delete", "--force", cid, error=RestoreError)
        self._clear_time_wait(cid)
        work.mkdir(exist_ok=True)
        (work / "restore.log").unlink(missing_ok=True)
        args = [
            "restore",
            "--detach",
            "--image-path",
            str(images),
            "--work-path",
            str(work),
            "--bundle",
            str(cdir / "bundle"),
        ]
        tcp_established = bool(self._read_meta(cid).get("tcp_established"))
        if tcp_established:
            args.append("--tcp-established")
        self._write_criu_conf(cid, restore=True, tcp_established=tcp_established)
        try:
            self._runc_with_stdio(cid, *args, cid, error=RestoreError, criu_log=work / "restore.log")
        except RestoreError:
            with contextlib.suppress(RuntimeDriverError):
                if self._runc_state(cid) is not None:
                    self._runc(cid, "delete", "--force", cid)
            raise
        # runc restore -d returns after CRIU has resumed the tree; confirm runc agrees.
        deadline = time.monotonic() + 10.0
        while True:
            st = self._runc_state(cid)
            status = st.get("status") if st else None
            if status == "running":
                return
            if time.monotonic() > deadline or status == "stopped":
                raise RestoreError(
                    f"restored {cid!r} is {status or 'unknown to runc'}, not running", _tail(work / "restore.log")
                )
            time.sleep(0.01)

    def _pids(self, cid: str) -> list[int]:
        """Host PIDs of every process in the container (init first)."""
        out = self._runc(cid, "ps", "--format", "json", cid)
        return [int(p) for p in json.loads(out or "[]")]

    def _clear_time_wait(self, cid: str) -> None:
        """Free the ports the container listened on before its dump (sockets.clear_time_wait)."""
        ports = self._read_meta(cid).get("listen_ports") or []
        netns = self.netns(cid)
        if ports and netns is not None:
            clear_time_wait(netns, ports, what=cid, timeout=self.timeout)

    def netns(self, container_id: str) -> Path | None:
        """The netns path in the container's OCI bundle (None: no such container)."""
        try:
            config = json.loads((self._dir(container_id) / "bundle" / "config.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        for ns in config.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return Path(ns["path"])
        return None

    def listen_ports(self, container_id: str) -> set[int]:
        """Read from the running processes; for a parked container, what checkpoint recorded."""
        if self.state(container_id) == ContainerState.RUNNING:
            return process_listen_ports(self._pids(container_id))
        return {int(p) for p in self._read_meta(container_id).get("listen_ports") or []}

    def delete(self, container_id: str) -> None:
        t0 = time.monotonic()
        cdir = self._dir(container_id)
        if not cdir.is_dir():
            raise ContainerNotFound(f"no container {container_id!r} in {self.base_dir}")
        with self._locked(container_id):
            if self._runc_state(container_id) is not None:
                self._runc(container_id, "delete", "--force", container_id)
            self._reap_pump(container_id, wait=5.0)
            shutil.rmtree(cdir)
        with self._mu:
            self.history.append(OpRecord(container_id, "delete", time.monotonic() - t0, True))

    def containers(self) -> list[str]:
        return sorted(p.name for p in (self.base_dir / "containers").iterdir() if p.is_dir())

    # --- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the log pumps (agent shutdown); containers keep running or stay checkpointed."""
        with self._mu:
            pumps = [*self._pumps.values(), *self._draining]
            self._pumps, self._draining = {}, []
        for pump in pumps:
            # A pump of a live container only ends with it; it is reparented to init, not lost.
            with contextlib.suppress(subprocess.TimeoutExpired):
                pump.wait(timeout=0.5)

    def delete_all(self) -> None:
        """Delete every container (images included) and remove the cgroup parent: test teardown."""
        errors = []
        for cid in self.containers():
            try:
                self.delete(cid)
            except RuntimeDriverError as e:
                errors.append(str(e))
        self.close()
        self.remove_cgroup_parent()
        if errors:
            raise RuntimeDriverError("delete_all: " + "; ".join(errors))

    def remove_cgroup_parent(self) -> None:
        """rmdir the cgroup directories runc made for cgroup_parent, in every hierarchy.

        runc removes each container's own cgroup on delete and after a checkpoint, but not the
        parents it created on the way (in each v1 controller hierarchy and in the v2 one). Only
        directories that did not exist when this runtime was made are removed, so a parent
        inside someone else's subtree (a test bed's node cgroup) leaves that subtree alone.
        """
        for mnt in cgroup_mounts():
            top = mnt / self.cgroup_parent.lstrip("/")
            if top.is_dir():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
            rel = top.relative_to(mnt)
            for d in (rel, *rel.parents[:-1]):  # parents[-1] is ".", the hierarchy's root
                if mnt / d in self._cgroup_dirs_before:
                    break
                with contextlib.suppress(OSError):
                    (mnt / d).rmdir()

    def _existing_cgroup_dirs(self) -> set[Path]:
        """cgroup_parent and its ancestors, in every hierarchy, as far as they exist now."""
        rel = Path(self.cgroup_parent.lstrip("/"))
        found = set()
        for mnt in cgroup_mounts():
            for d in (rel, *rel.parents):
                if d != Path(".") and (mnt / d).is_dir():
                    found.add(mnt / d)
        return found
