"""Fixtures shared by all tests: a network-namespace test bed that is always torn down, and CRIU."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bed import TestBed, cleanup_stale

BED_PREFIX = "zp"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stale_beds_removed() -> list[str]:
    """Sweep leftovers of earlier runs that were killed before they could clean up.

    Only beds whose creating process is gone are touched, so parallel test runs are safe.
    """
    if os.geteuid() != 0:
        pytest.fail("these tests build network namespaces and cgroups: run them as root")
    return cleanup_stale(BED_PREFIX)


@pytest.fixture
def testbed(stale_beds_removed: list[str]) -> Iterator[TestBed]:
    """An empty TestBed; everything the test builds in it is removed afterwards, pass or fail."""
    bed = TestBed(prefix=BED_PREFIX)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture(scope="session")
def criu() -> Path:
    """CRIU 4.2.1 from scripts/build-criu.sh (cached after the first build; it also installs runc).

    Only that build works on this kernel (Debian's 3.17 does not); the runtime passes it to runc
    as ``--criu``.
    """
    res = subprocess.run(["bash", str(REPO / "scripts/build-criu.sh")], capture_output=True, text=True,
                         check=False, timeout=900)
    assert res.returncode == 0, f"build-criu.sh failed:\n{res.stderr[-3000:]}"
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and os.access(path, os.X_OK), path
    return path
