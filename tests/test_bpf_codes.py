"""The BPF programs' vocabulary: inner result codes and counter reasons (bpf/lib/common.h).

Userspace mirrors both lists (dataplane.maps.Code, dataplane.maps.Reason); these tests parse the
header itself, so the two can never drift. Then every code goes through the one verdict function
of each path in the kernel (BPF_PROG_TEST_RUN of a SCHED_CLS wrapper around it), as a table of
code -> expected verdict and counter: an unknown code is rejected/dropped and counted as
UNKNOWN, never as STALE_BACKEND.
"""

from __future__ import annotations

import ctypes
import errno
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import loader, maps, tc
from dataplane.loader import BPF_DIR
from scaletozero import sklookup

COMMON_H = BPF_DIR / "lib" / "common.h"
TC_ACT_OK, TC_ACT_SHOT = 0, 2
SYS_REJECT, SYS_PROCEED = 0, 1
UNKNOWN_CODE = -999  # no ZP_E* has this value
FRAME = bytes(64)  # BPF_PROG_TEST_RUN wants at least an Ethernet header; the wrappers ignore it


def header_codes() -> dict[str, int]:
    """ZP_OK and every ZP_E* of common.h, values resolved through the errno names they use."""
    text = COMMON_H.read_text()
    out = {}
    for name, value in re.findall(r"^#define ZP_(OK|E[A-Z0-9]+)\s+(\S+)", text, re.M):
        m = re.fullmatch(r"\(-(E[A-Z0-9]+)\)", value)
        out[name] = -getattr(errno, m.group(1)) if m else int(value)
    return out


def header_reasons() -> dict[str, int]:
    body = re.search(r"enum zp_reason \{(.*?)\};", COMMON_H.read_text(), re.S)
    assert body, "enum zp_reason not found in common.h"
    return {n: int(v) for n, v in re.findall(r"^\s*ZP_REASON_([A-Z0-9_]+)\s*=\s*(\d+)", body.group(1), re.M)}


def header_define(name: str) -> int:
    m = re.search(rf"^#define {name}\s+(\d+)", COMMON_H.read_text(), re.M)
    assert m, f"{name} not found in common.h"
    return int(m.group(1))


def test_code_mirror_equals_common_h() -> None:
    codes = header_codes()
    assert codes == {c.name: c.value for c in maps.Code}
    assert len(set(codes.values())) == len(codes), "two codes share a value: each must have one meaning"


def test_reason_mirror_equals_common_h() -> None:
    assert header_reasons() == {r.name: r.value for r in maps.Reason}
    assert (maps.STAT_MAX, maps.NP_STAT_MAX) == (header_define("ZP_STAT_MAX"), header_define("ZP_NP_STAT_MAX"))
    assert max(maps.SOCK_REASONS) < maps.STAT_MAX and max(maps.NP_REASONS) < maps.NP_STAT_MAX
    # scale to zero's per-pod counters are one field per S2Z_* reason, in the same order
    fields = [f for f, _ in sklookup.StatsValue._fields_]
    assert fields == [r.name.removeprefix("S2Z_").lower() for r in maps.S2Z_REASONS]


def test_no_code_or_reason_is_defined_outside_common_h() -> None:
    """One home: no other header or program defines a ZP_E* code or a counter enum."""
    for path in sorted(BPF_DIR.rglob("*.[ch]")):
        if path == COMMON_H:
            continue
        text = path.read_text()
        assert not re.search(r"^#define ZP_(OK|E[A-Z0-9]+)\b", text, re.M), path
        assert not re.search(r"^enum zp_(\w+_)?(stats?|reason) \{", text, re.M), path


# ---- every code through each path's verdict function ------------------------------------------

# (code, verdict, reason counted or None): the socket hooks' __sock_account
SOCK_TABLE: list[tuple[int, int, maps.Reason | None]] = [
    (maps.Code.OK, SYS_PROCEED, maps.Reason.XLATE_OK),
    (maps.Code.ENOTSVC, SYS_PROCEED, None),
    (maps.Code.ENOBACKEND, SYS_REJECT, maps.Reason.NO_BACKEND),
    (maps.Code.ESTALE, SYS_REJECT, maps.Reason.STALE_BACKEND),
    (maps.Code.EFIB, SYS_REJECT, maps.Reason.UNKNOWN),  # a code the socket path never returns
    (UNKNOWN_CODE, SYS_REJECT, maps.Reason.UNKNOWN),
]
# the TC path's __np_verdict
NP_TABLE: list[tuple[int, int, maps.Reason | None]] = [
    (maps.Code.ENOTSVC, TC_ACT_OK, None),
    (maps.Code.EREFUSE, TC_ACT_OK, maps.Reason.NO_BACKEND),
    (maps.Code.ENOBACKEND, TC_ACT_SHOT, maps.Reason.NO_BACKEND),
    (maps.Code.ESTALE, TC_ACT_SHOT, maps.Reason.STALE_BACKEND),
    (maps.Code.ENOSNATPORT, TC_ACT_SHOT, maps.Reason.SNAT_EXHAUSTED),
    (maps.Code.ECTGONE, TC_ACT_SHOT, maps.Reason.BACKEND_GONE),
    (maps.Code.ECTMISS, TC_ACT_SHOT, maps.Reason.CT_MISS),
    (maps.Code.EFIB, TC_ACT_SHOT, maps.Reason.FIB_FAIL),
    (maps.Code.EREWRITE, TC_ACT_SHOT, maps.Reason.REWRITE_FAIL),
    (maps.Code.EMAPWRITE, TC_ACT_SHOT, maps.Reason.MAP_WRITE),
    (maps.Code.ECTSTALE, TC_ACT_OK, maps.Reason.STALE_REPLY),
    (maps.Code.EDIRECT, TC_ACT_SHOT, maps.Reason.UNKNOWN),  # scale to zero's code, unknown here
    (UNKNOWN_CODE, TC_ACT_SHOT, maps.Reason.UNKNOWN),
]

# A SCHED_CLS wrapper that feeds skb->mark, negated, to a verdict function: the socket hooks'
# program type has no BPF_PROG_TEST_RUN, the function itself does not care who calls it.
WRAPPERS = {
    "sock": ("sock.c", "zp_test_sock_account", "__sock_account", "zp_stats", maps.SOCK_REASONS),
    "np": ("nodeport.c", "zp_test_np_verdict", "__np_verdict", "zp_np_stats", maps.NP_REASONS),
}


class Verdicts:
    def __init__(self, bpf: Any, prog: Any, table: str, reasons: tuple[maps.Reason, ...]) -> None:
        self.bpf, self.prog, self.table, self.reasons = bpf, prog, table, reasons

    def counters(self) -> dict[maps.Reason, int]:
        t = self.bpf[self.table.encode()]
        return {r: sum(t[ctypes.c_uint32(r)]) for r in self.reasons}

    def run(self, code: int) -> tuple[int, dict[maps.Reason, int]]:
        before = self.counters()
        verdict, _ = tc.prog_test_run(self.prog.fd, FRAME, mark=ctypes.c_uint32(-code).value)
        after = self.counters()
        return verdict, {r: after[r] - before[r] for r in self.reasons if after[r] != before[r]}


@pytest.fixture(scope="module", params=sorted(WRAPPERS))
def verdicts(request: pytest.FixtureRequest) -> Iterator[Verdicts]:
    import bcc

    source, fn, inner, table, reasons = WRAPPERS[request.param]
    pin = Path("/sys/fs/bpf") / f"zp-codes-{uuid.uuid4().hex[:8]}"
    pin.mkdir()
    b = None
    try:
        text = loader.inline_includes(BPF_DIR / source)
        text += f"\nint {fn}(struct __sk_buff *skb) {{ return {inner}(-(int)skb->mark); }}\n"
        cflags = [f'-DZP_PIN_DIR="{pin}/"', "-Wno-unused-function", "-Wno-macro-redefined"]
        b = bcc.BPF(text=text.encode(), cflags=cflags)
        yield Verdicts(b, b.load_func(fn.encode(), bcc.BPF.SCHED_CLS), table, reasons)
    finally:
        if b is not None:
            b.cleanup()
        loader.cleanup(None, pin)


def test_each_code_gets_its_verdict_and_counter(verdicts: Verdicts) -> None:
    table = SOCK_TABLE if verdicts.table == "zp_stats" else NP_TABLE
    got = [(code, *verdicts.run(code)) for code, _, _ in table]
    want = [(code, verdict, {reason: 1} if reason is not None else {}) for code, verdict, reason in table]
    assert got == want


def test_an_unknown_code_is_not_counted_as_stale(verdicts: Verdicts) -> None:
    verdict, moved = verdicts.run(UNKNOWN_CODE)
    assert verdict in (SYS_REJECT, TC_ACT_SHOT)
    assert moved == {maps.Reason.UNKNOWN: 1}, moved  # STALE_BACKEND did not move
