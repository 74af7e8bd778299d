"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium's loadBalancer.algorithm=maglev.

A lookup table of M entries (a prime) is filled from each backend's own permutation of 0..M-1,
the backends taking turns, so every backend owns about M/N entries and removing one moves only
the entries it owned (about 1/N of the flows), while the others keep theirs. The permutations
depend only on the backends' names and a seed, never on the node, so every node builds the same
table and sends the same flow to the same backend; the datapath indexes it with a hash of the
flow's 5-tuple that does not depend on the node either (bpf/lib/nodeport.h).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

M = 16381  # ZP_MAGLEV_M in bpf/lib/common.h: the table size (a prime; Cilium's default)
SEED = b"zeroproxy-maglev"  # the same on every node: the tables must agree


def _offset_skip(name: str, m: int, seed: bytes) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed).digest()
    h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    return h1 % m, h2 % (m - 1) + 1


def table(names: Sequence[str], m: int = M, seed: bytes = SEED) -> list[int]:
    """The lookup table: entry i is the index in ``names`` of the backend that serves the flows
    hashing to i. ``names`` must be distinct (order does not matter); [] without backends."""
    n = len(names)
    if n == 0:
        return []
    if len(set(names)) != n:
        raise ValueError("backend names must be distinct")
    # Sorting makes the table independent of the order the caller happened to list them in.
    order = sorted(range(n), key=lambda i: names[i])
    params = [_offset_skip(names[i], m, seed) for i in order]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for k in range(n):
            offset, skip = params[k]
            c = (offset + nxt[k] * skip) % m
            while entry[c] >= 0:
                nxt[k] += 1
                c = (offset + nxt[k] * skip) % m
            entry[c] = order[k]
            nxt[k] += 1
            filled += 1
            if filled == m:
                return entry
