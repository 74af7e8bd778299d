"""A bounded-frequency sync runner, after kube-proxy's BoundedFrequencyRunner.

Event handlers only call request(); one task runs the sync function, never more often than
min_interval (bursts coalesce into one run), at least every max_interval (a periodic full
reconcile), and again after retry_interval when a run fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class SyncRunner:
    def __init__(
        self,
        fn: Callable[[], Awaitable[None] | None],
        *,
        min_interval: float = 0.0,
        max_interval: float = 3600.0,
        retry_interval: float = 1.0,
        name: str = "sync",
    ) -> None:
        self.fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_interval = retry_interval
        self.name = name
        self._wake = asyncio.Event()
        self._stopped = False
        self._last_run = float("-inf")
        self.runs = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self.pending_since: float | None = None  # monotonic time of the oldest unserved request

    def request(self) -> None:
        """Ask for a run soon; cheap and safe to call from any event handler on the loop."""
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.max_interval)
            except TimeoutError:
                pass  # periodic reconcile
            if self._stopped:
                return
            wait = self._last_run + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce: requests during the wait join this run
            self._wake.clear()
            served = self.pending_since
            self.pending_since = None
            self._last_run = time.monotonic()
            try:
                res = self.fn()
                if asyncio.iscoroutine(res):
                    await res
                self.runs += 1
                self.last_error = None
            except Exception as e:  # the loop must survive any failure of one run
                self.failures += 1
                self.last_error = e
                log.exception("%s failed; retrying in %.1fs", self.name, self.retry_interval)
                if self.pending_since is None:
                    self.pending_since = served
                asyncio.get_running_loop().call_later(self.retry_interval, self.request)
