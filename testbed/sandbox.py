"""Running a real agent process for the demo, tests and bench, and always removing it again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dataplane import netns
from dataplane.loader import cleanup
from testbed.k8sobjects import dump

BPFFS_ROOT = Path("/sys/fs/bpf")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (fixed ports would collide between runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """`zeroproxy agent` as a child process, with its source (a YAML file or a kubeconfig) and log.

    Runs in the host's netns (the socket programs work on the cgroup, whatever the netns), or in
    a node's netns (``netns``) when it also drives the node's devices (``devices``: NodePort).
    Its health and metrics servers listen on free loopback ports (``healthz_url``,
    ``metrics_url``), kept across restarts. close() kills it, detaches its programs and
    removes its pins, even after a failure.
    """

    def __init__(self, workdir: Path, cgroup: Path, *, node_name: str = "node-a",
                 extra_args: Iterable[str] = (), name: str = "agent", kubeconfig: Path | None = None,
                 netns: str | None = None, devices: Iterable[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cgroup = Path(cgroup)
        self.node_name = node_name
        self.extra_args = list(extra_args)
        self.pin_dir = BPFFS_ROOT / f"zp-{name}-{uuid.uuid4().hex[:8]}"
        self.source = self.workdir / "cluster.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.kubeconfig = kubeconfig  # set: --source kubernetes with this kubeconfig
        self.netns = netns
        self.devices = tuple(devices)
        self.healthz_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def healthz_url(self) -> str:
        return f"http://127.0.0.1:{self.healthz_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def write(self, objects: Iterable[dict[str, Any]]) -> None:
        """Replace the source file atomically, as an editor or `kubectl get -o yaml >` would."""
        self.write_text(dump(objects))

    def write_text(self, text: str) -> None:
        tmp = self.source.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.source)

    def argv(self) -> list[str]:
        source = ["--source", "kubernetes", "--kubeconfig", str(self.kubeconfig)] if self.kubeconfig else [
            "--source", f"file:{self.source}"]
        return [sys.executable, "-m", "zeroproxy", "agent", *source,
                "--cgroup", str(self.cgroup), "--bpffs", str(self.pin_dir), "--node-name", self.node_name,
                "--min-sync-period", "0.05", "--healthz-bind-address", f"127.0.0.1:{self.healthz_port}",
                "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
                *(["--devices", ",".join(self.devices)] if self.devices else []), *self.extra_args]

    def start(self, wait_synced: bool = True, timeout: float = 60.0) -> None:
        if self.kubeconfig is None and not self.source.exists():
            self.write([])
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            enter = None
            if self.netns is not None:
                netns_name = self.netns

                def enter() -> None:
                    netns.enter(netns_name)
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=enter)
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
        if self.devices:
            from dataplane import tc

            tc.detach(self.devices, self.netns)
        cleanup(self.cgroup if self.cgroup.exists() else None, self.pin_dir)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
