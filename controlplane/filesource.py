"""A source of Kubernetes objects that is a multi-document YAML file, re-read when it changes.

It is the first source of the agent (``--source file:PATH``) and the one tests and the demo use,
so it must behave like a good API source: hand over a complete set of objects, only when they
changed, and never hand over a broken state. A file that stops parsing or disappears keeps the
last good objects in force (the dataplane keeps serving) and says so once in the log.

Change detection polls ``os.stat``: inode and device catch editors and ``mv`` that replace the
file by rename, size and mtime catch writes in place. Polling is enough for a file the size of
a cluster's services and avoids inotify's loss of the watch on rename. The content hash decides
whether anything really changed, so ``touch`` or a rewrite with the same bytes costs one read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# A file modified this recently may be modified again within the same mtime tick without its
# size changing (git calls this "racily clean"): until it is older, compare content every poll.
RACY_SECONDS = 2.0

# libyaml's loader is several times faster; both accept exactly the safe subset of YAML.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

OnChange = Callable[[list[dict[str, Any]]], None]


@dataclass(frozen=True)
class _Stat:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stat:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileSource:
    """Watch one YAML file of Kubernetes objects and report each new valid content once.

    ``on_change`` receives every document of the file (``None`` documents from empty ``---``
    sections dropped), in file order; interpreting them (``kind: List``, unknown kinds, bad
    fields) is the translation's job, so the file source and the API source report object
    problems the same way.
    """

    def __init__(self, path: str | os.PathLike[str], on_change: OnChange, poll_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.objects: list[dict[str, Any]] | None = None  # last good content; None until one was read
        self.error: str | None = None  # why the current file content is not in force, or None
        self._stat: _Stat | None = None  # stat of the last content read (good or bad)
        self._digest: bytes | None = None  # hash of the last content read (good or bad)
        self._stopping = False
        self._wake: asyncio.Event | None = None  # created by run(): an Event belongs to one loop

    def read_once(self) -> bool:
        """Check the file now; call ``on_change`` and return True if a new valid content was read.

        Never raises for file or YAML problems (they are logged and kept in ``self.error``);
        exceptions from ``on_change`` itself propagate to the caller.
        """
        objects = self._check()
        if objects is None:
            return False
        self.on_change(objects)
        return True

    async def run(self) -> None:
        """Poll until :meth:`stop`; a failing ``on_change`` is logged and does not end the loop.

        Reading and parsing run in a worker thread (a large file takes a while to parse and the
        agent's loop must keep serving); ``on_change`` runs on the loop, like every other event.
        """
        self._wake = asyncio.Event()
        try:
            while not self._stopping:
                try:
                    objects = await asyncio.to_thread(self._check)
                    if objects is not None and not self._stopping:
                        self.on_change(objects)
                except Exception:
                    log.exception("%s: applying the new content failed", self.path)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                except TimeoutError:
                    pass
        finally:
            self._wake = None
            self._stopping = False

    def stop(self) -> None:
        """End :meth:`run` at its next wake-up (at once if it is sleeping). Call it on the loop."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

    def _check(self) -> list[dict[str, Any]] | None:
        """Read the file if it may have changed; return its objects if they are new and valid."""
        try:
            st = _Stat.of(os.stat(self.path))
        except OSError as e:
            self._fail(f"{self.path}: cannot read: {e.strerror or e}; keeping the last good state")
            self._stat = self._digest = None  # so the file is read again as soon as it is back
            return None
        if st == self._stat and not self._racy(st):
            return None
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self._fail(f"{self.path}: cannot read: {e.strerror or e}; keeping the last good state")
            self._stat = self._digest = None
            return None
        self._stat = st
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            docs = list(yaml.load_all(data, Loader=_Loader))
        except yaml.YAMLError as e:
            self._fail(f"{self.path}: invalid YAML{_position(e)}: {_problem(e)}; keeping the last good state")
            return None
        except (RecursionError, ValueError, TypeError, OverflowError) as e:
            # PyYAML's constructors can raise these on pathological input (deep nesting, bad
            # timestamps or binary values); they are invalid input all the same.
            self._fail(f"{self.path}: invalid YAML: {type(e).__name__}: {e}; keeping the last good state")
            return None
        objects = [d for d in docs if d is not None]
        if self.error is not None:
            log.info("%s: valid again", self.path)
            self.error = None
        if objects == self.objects:
            return None  # comments or formatting changed, the objects did not
        self.objects = objects
        log.info("%s: %d objects loaded", self.path, len(objects))
        return objects

    def _fail(self, message: str) -> None:
        """Record why the file is not in force; log it once, not at every poll."""
        if message != self.error:
            log.error("%s", message)
        self.error = message

    @staticmethod
    def _racy(st: _Stat) -> bool:
        return time.time_ns() - st.mtime_ns < RACY_SECONDS * 1e9


def _position(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, yaml.reader.ReaderError):
        return f" at byte {e.position}"
    return ""


def _problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        context = e.context or ""
        if context and e.context_mark is not None and e.problem_mark is not None:
            if (e.context_mark.line, e.context_mark.column) != (e.problem_mark.line, e.problem_mark.column):
                mark = e.context_mark
                context += f" (from line {mark.line + 1}, column {mark.column + 1})"
        parts = [p for p in (context, e.problem) if p]
        return ", ".join(parts) or type(e).__name__
    if isinstance(e, yaml.reader.ReaderError):
        return str(e.reason)
    return " ".join(str(e).split())
