"""Running a real agent process for the demo, tests and bench, and always removing it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dataplane.loader import cleanup
from zeroproxy.k8sobjects import dump

BPFFS_ROOT = Path("/sys/fs/bpf")


class AgentProcess:
    """`zeroproxy agent --source file:...` as a child process, with its YAML file and log.

    Runs in the host's netns (the socket programs work on the cgroup, whatever the netns).
    close() kills it, detaches its programs and removes its pins, even after a failure.
    """

    def __init__(self, workdir: Path, cgroup: Path, *, node_name: str = "node-a",
                 extra_args: Iterable[str] = (), name: str = "agent") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cgroup = Path(cgroup)
        self.node_name = node_name
        self.extra_args = list(extra_args)
        self.pin_dir = BPFFS_ROOT / f"zp-{name}-{uuid.uuid4().hex[:8]}"
        self.source = self.workdir / "cluster.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def write(self, objects: Iterable[dict[str, Any]]) -> None:
        """Replace the source file atomically, as an editor or `kubectl get -o yaml >` would."""
        self.write_text(dump(objects))

    def write_text(self, text: str) -> None:
        tmp = self.source.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.source)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "zeroproxy", "agent", "--source", f"file:{self.source}",
                "--cgroup", str(self.cgroup), "--bpffs", str(self.pin_dir), "--node-name", self.node_name,
                "--min-sync-period", "0.05", *self.extra_args]

    def start(self, wait_synced: bool = True, timeout: float = 60.0) -> None:
        if not self.source.exists():
            self.write([])
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        if wait_synced:
            self.wait_log("initial sync done", timeout=timeout)

    def log_text(self, since_start: bool = True) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        return data[self._log_offset if since_start else 0:].decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> str:
        """Wait until text appears (count times) in this run's log; fail with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if log.count(text) >= count:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{log[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"agent log has no {text!r} after {timeout}s:\n{self.log_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        cleanup(self.cgroup if self.cgroup.exists() else None, self.pin_dir)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
