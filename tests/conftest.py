"""Fixtures shared by all tests: a network-namespace test bed that is always torn down."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from zeroproxy.testbed import TestBed, cleanup_stale

BED_PREFIX = "zp"


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
