"""The node agent: source of Kubernetes objects -> translation -> sync loop -> kernel maps.

The watch side (a source plus translate()) and the map-writing side (ServiceMaps) meet at one
interface, the desired ServiceTable. Handlers only store the newest table and request a sync;
the sync runner writes what differs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.filesource import FileSource
from controlplane.model import ServiceTable
from controlplane.sync import SyncRunner
from controlplane.translate import translate
from dataplane.loader import SockDatapath
from dataplane.services import ServiceMaps

log = logging.getLogger("zeroproxy.agent")

DEFAULT_BPFFS_DIR = Path("/sys/fs/bpf/zeroproxy")


@dataclass
class AgentConfig:
    source: str  # "file:PATH"
    cgroup: Path
    bpffs_dir: Path = DEFAULT_BPFFS_DIR
    node_name: str = field(default_factory=socket.gethostname)
    devices: tuple[str, ...] = ()
    min_sync_interval: float = 0.1
    max_sync_interval: float = 60.0
    retry_interval: float = 1.0
    poll_interval: float = 0.3


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.datapath = SockDatapath(config.cgroup, config.bpffs_dir)
        self.maps: ServiceMaps | None = None
        self.desired: ServiceTable | None = None  # None until the source delivered a full set
        self.runner = SyncRunner(
            self._sync,
            min_interval=config.min_sync_interval,
            max_interval=config.max_sync_interval,
            retry_interval=config.retry_interval,
        )
        self._logged_errors: set[str] = set()
        self._source: Any = None
        self.synced = asyncio.Event()

    # ---- watch side -------------------------------------------------------------------
    def on_objects(self, objects: list[dict[str, Any]]) -> None:
        """A source delivered a complete, new set of objects."""
        started = time.monotonic()
        tr = translate(objects, self.config.node_name)
        errors = {str(e): e for e in tr.errors}
        for text in sorted(errors.keys() - self._logged_errors):
            sev = errors[text].severity.name
            (log.error if sev == "ERROR" else log.warning)("invalid input: %s", text)
        self._logged_errors = set(errors)
        self.desired = tr.table
        log.info(
            "source: %d objects -> %d frontends (%d problems) in %.0f ms",
            len(objects), len(tr.table), len(tr.problems), (time.monotonic() - started) * 1000,
        )
        self.runner.request()

    # ---- map side ---------------------------------------------------------------------
    def _sync(self) -> None:
        if self.desired is None or self.maps is None:
            return  # nothing is written before the source's first complete read
        started = time.monotonic()
        result = self.maps.sync(self.desired.values())
        for c in result.conflicts:
            log.error("frontend conflict: %s", c)
        if result.changed:
            log.info(
                "sync: %d frontends written, %d deleted; %d backends written, %d deleted; "
                "now %d frontends, %d backends (%.1f ms)",
                result.frontends_written, result.frontends_deleted, result.backends_written,
                result.backends_deleted, self.maps.frontend_count, self.maps.backend_count,
                (time.monotonic() - started) * 1000,
            )
        if not self.synced.is_set():
            log.info("initial sync done")
            self.synced.set()

    # ---- lifecycle --------------------------------------------------------------------
    def _make_source(self):
        kind, _, arg = self.config.source.partition(":")
        if kind == "file" and arg:
            return FileSource(arg, self.on_objects, poll_interval=self.config.poll_interval)
        raise ValueError(f"--source {self.config.source!r}: expected file:PATH")

    async def run(self) -> None:
        self._source = self._make_source()
        self.datapath.load()
        self.maps = ServiceMaps(self.datapath)
        log.info(
            "adopted %d frontends, %d backends from %s",
            self.maps.frontend_count, self.maps.backend_count, self.config.bpffs_dir,
        )
        self.datapath.attach()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._source.run()), asyncio.create_task(self.runner.run())]
        try:
            await stop.wait()
        finally:
            log.info("stopping; programs and maps stay in place for the next agent")
            self._source.stop()
            self.runner.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.datapath.close()
