"""The YAML file source: change detection, replacement by rename, and keeping the last good state.

Real files in a temporary directory, real polling; nothing is faked. The asyncio tests wait for
events with a generous hang guard, never assert on time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from controlplane.filesource import FileSource
from controlplane.translate import translate

DATA = Path(__file__).parent / "data"
HANG_GUARD = 30.0  # seconds; only stops a broken test from hanging, never measures speed


def svc_yaml(name: str, ip: str, port: int = 80) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n"
        f"spec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: {port}\n"
    )


class Recorder:
    """The on_change callback: remembers every delivery."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def __call__(self, objects: list[dict[str, Any]]) -> None:
        self.calls.append(objects)

    def names(self, i: int = -1) -> list[str]:
        return [o["metadata"]["name"] for o in self.calls[i]]


def replace_by_rename(path: Path, text: str) -> None:
    """What editors and `kubectl ... > tmp && mv tmp file` do: a new inode under the old name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cluster.yaml"


def test_first_read_delivers_all_documents_then_nothing_until_a_change(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1") + "---\n" + svc_yaml("b", "10.96.0.2") + "---\n")
    rec = Recorder()
    src = FileSource(path, rec)
    assert src.read_once() is True
    assert rec.names() == ["a", "b"]  # the trailing empty document is dropped
    assert src.read_once() is False
    assert src.read_once() is False
    assert len(rec.calls) == 1
    assert src.objects == rec.calls[0]
    assert src.error is None


def test_write_in_place_is_noticed(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    path.write_text(svc_yaml("a", "10.96.0.1", port=8080))
    assert src.read_once() is True
    assert rec.calls[-1][0]["spec"]["ports"][0]["port"] == 8080


def test_same_size_rewrite_with_the_old_mtime_is_noticed(path: Path):
    """An in-place write that keeps size and (restored) mtime still changes ctime and content."""
    path.write_text(svc_yaml("a", "10.96.0.1"))
    old = os.stat(path)
    os.utime(path, ns=(old.st_atime_ns - 10**10, old.st_mtime_ns - 10**10))  # not racy any more
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    stamp = os.stat(path)
    path.write_text(svc_yaml("a", "10.96.0.2"))  # same length
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(path).st_size == stamp.st_size and os.stat(path).st_mtime_ns == stamp.st_mtime_ns
    assert src.read_once() is True
    assert rec.calls[-1][0]["spec"]["clusterIP"] == "10.96.0.2"


def test_replacement_by_rename_is_noticed(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    inode = os.stat(path).st_ino
    replace_by_rename(path, svc_yaml("b", "10.96.0.2"))
    assert os.stat(path).st_ino != inode
    assert src.read_once() is True
    assert rec.names() == ["b"]


def test_touch_and_comment_only_edits_deliver_nothing(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    path.touch()
    assert src.read_once() is False
    path.write_text("# the web service\n" + svc_yaml("a", "10.96.0.1"))
    assert src.read_once() is False
    assert len(rec.calls) == 1


def test_invalid_yaml_keeps_the_last_good_objects_and_logs_one_line(
    path: Path, caplog: pytest.LogCaptureFixture
):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    good = src.objects
    path.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n")
    with caplog.at_level(logging.INFO, logger="controlplane.filesource"):
        for _ in range(3):
            assert src.read_once() is False
    assert src.objects == good
    assert len(rec.calls) == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines  # once, not at every poll
    assert lines[0] == src.error
    assert lines[0].startswith(f"{path}: invalid YAML at line 5, column 1: ")
    assert lines[0].endswith("; keeping the last good state")
    assert "\n" not in lines[0]


def test_fixing_the_file_delivers_again_and_clears_the_error(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec)
    src.read_once()
    path.write_text("kind: Service\n  bad: indentation\n")
    src.read_once()
    assert src.error is not None and "invalid YAML at line 2" in src.error
    # Back to the content in force: nothing to deliver, but the error is gone.
    path.write_text(svc_yaml("a", "10.96.0.1"))
    assert src.read_once() is False
    assert src.error is None
    # Broken again, then fixed with new content: delivered.
    path.write_text(":\n- : [\n")
    assert src.read_once() is False
    replace_by_rename(path, svc_yaml("c", "10.96.0.3"))
    assert src.read_once() is True
    assert [rec.names(i) for i in range(len(rec.calls))] == [["a"], ["c"]]


def test_invalid_utf8_is_invalid_yaml(path: Path):
    rec = Recorder()
    src = FileSource(path, rec)
    path.write_bytes(b"kind: Service\nmetadata: {name: \xff\xfe}\n")
    assert src.read_once() is False
    assert src.error is not None and src.error.startswith(f"{path}: invalid YAML")
    assert rec.calls == [] and src.objects is None


def test_missing_file_keeps_state_and_is_picked_up_when_it_appears(
    path: Path, caplog: pytest.LogCaptureFixture
):
    rec = Recorder()
    src = FileSource(path, rec)
    with caplog.at_level(logging.ERROR, logger="controlplane.filesource"):
        assert src.read_once() is False
        assert src.read_once() is False
    assert [r.getMessage() for r in caplog.records] == [src.error]
    assert src.error == f"{path}: cannot read: No such file or directory; keeping the last good state"
    assert rec.calls == [] and src.objects is None

    path.write_text(svc_yaml("a", "10.96.0.1"))
    assert src.read_once() is True
    assert src.error is None
    path.unlink()
    assert src.read_once() is False
    assert src.objects == rec.calls[0]  # still in force
    assert src.error is not None and "No such file" in src.error
    path.write_text(svc_yaml("a", "10.96.0.1"))  # back with the same objects: nothing new
    assert src.read_once() is False
    assert src.error is None
    path.write_text(svc_yaml("b", "10.96.0.2"))
    assert src.read_once() is True
    assert len(rec.calls) == 2


def test_a_directory_in_place_of_the_file_is_an_error_not_a_crash(path: Path):
    path.mkdir()
    src = FileSource(path, Recorder())
    assert src.read_once() is False
    assert src.error is not None and src.error.startswith(f"{path}: cannot read: ")


def test_sample_file_feeds_translate(tmp_path: Path):
    """The file source's output is the translation's input: the sample becomes a full table."""
    path = tmp_path / "cluster.yaml"
    shutil.copy(DATA / "cluster.yaml", path)
    tables = []
    src = FileSource(path, lambda objs: tables.append(translate(objs, node_name="node-a")))
    assert src.read_once() is True
    (t,) = tables
    assert t.errors == []
    assert len(t.table) == 7
    assert sorted(t.nodes) == ["node-a", "node-b"]


def test_kind_list_documents_are_passed_through_for_translate(path: Path):
    path.write_text(
        "apiVersion: v1\n"
        "kind: List\n"
        "items:\n"
        "- apiVersion: v1\n"
        "  kind: Service\n"
        "  metadata: {name: a, namespace: default}\n"
        "  spec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n"
    )
    rec = Recorder()
    FileSource(path, rec).read_once()
    assert [o["kind"] for o in rec.calls[0]] == ["List"]
    t = translate(rec.calls[0])
    assert t.errors == []
    assert [str(f) for f in t.table] == ["10.96.0.1:80/TCP"]


# --- asyncio ---------------------------------------------------------------------------------


async def wait_for_calls(rec: Recorder, n: int) -> None:
    async def poll() -> None:
        while len(rec.calls) < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), HANG_GUARD)


def test_run_polls_until_stopped(path: Path):
    async def scenario() -> None:
        path.write_text(svc_yaml("a", "10.96.0.1"))
        rec = Recorder()
        src = FileSource(path, rec, poll_interval=0.05)
        task = asyncio.create_task(src.run())
        await wait_for_calls(rec, 1)
        replace_by_rename(path, svc_yaml("b", "10.96.0.2"))
        await wait_for_calls(rec, 2)
        path.write_text("{{{ not yaml")
        while src.error is None:
            await asyncio.sleep(0.01)
        path.write_text(svc_yaml("c", "10.96.0.3"))
        await wait_for_calls(rec, 3)
        src.stop()
        await asyncio.wait_for(task, HANG_GUARD)
        assert [rec.names(i) for i in range(3)] == [["a"], ["b"], ["c"]]

    asyncio.run(scenario())


def test_run_survives_a_failing_callback(path: Path, caplog: pytest.LogCaptureFixture):
    calls: list[list[str]] = []

    def on_change(objects: list[dict[str, Any]]) -> None:
        calls.append([o["metadata"]["name"] for o in objects])
        if len(calls) == 1:
            raise RuntimeError("dataplane write failed")

    async def scenario() -> None:
        path.write_text(svc_yaml("a", "10.96.0.1"))
        src = FileSource(path, on_change, poll_interval=0.05)
        task = asyncio.create_task(src.run())
        while not calls:
            await asyncio.sleep(0.01)
        path.write_text(svc_yaml("b", "10.96.0.2"))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        src.stop()
        await asyncio.wait_for(task, HANG_GUARD)

    with caplog.at_level(logging.ERROR, logger="controlplane.filesource"):
        asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD))
    assert calls == [["a"], ["b"]]
    assert any("applying the new content failed" in r.getMessage() for r in caplog.records)


def test_stop_before_run_returns_at_once_and_run_can_be_restarted(path: Path):
    path.write_text(svc_yaml("a", "10.96.0.1"))
    rec = Recorder()
    src = FileSource(path, rec, poll_interval=0.05)
    src.stop()
    asyncio.run(asyncio.wait_for(src.run(), HANG_GUARD))
    assert rec.calls == []

    async def again() -> None:  # a new event loop: the source must not hold the old one's Event
        task = asyncio.create_task(src.run())
        await wait_for_calls(rec, 1)
        src.stop()
        await asyncio.wait_for(task, HANG_GUARD)

    asyncio.run(again())
    assert rec.names() == ["a"]
