# mypy: ignore-errors
# (numba-compiled code: typed by numba at compile time, not by mypy)
"""Numba kernel of multi-index hashing (:class:`duch_core.search.HammingIndex` with MIH on).

A ``bits``-bit code (its big-endian bit string) is cut into ``m`` consecutive substrings;
substring ``j`` starts at bit ``starts[j]`` and is ``lens[j]`` bits long (at most 24; about
``log2 N`` bits, so a bucket holds a few codes). Table ``j`` lists every database position by its
substring value: ``offsets[j, v] .. offsets[j, v + 1]`` index ``items[j]``, positions ascending.

A query probes radius ``s = 0, 1, 2, ...``: for each table ``j`` in turn, every bucket whose
value differs from the query's substring in exactly ``s`` bits (the masks are enumerated in
order with Gosper's method). A candidate's full distance is the sum of its substring distances;
it is new only at the (radius, table) where it is first reachable, its smallest substring
distance in the first table having it, so no visited set is needed. By the pigeonhole principle
an item not yet seen after radius ``s`` of tables ``0..j`` is at distance at least
``m * s + j + 1``; once the k-th best distance is below that, the top-k is exact, ties included
(ranked by (distance, position)).

A query that would examine more than ``budget`` buckets and candidates stops and is reported
not done; the caller answers it with the exhaustive scan.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from duch_core._search_kernel import _popcount


@njit(cache=True, inline="always")
def _substring(codes, p, start, length):
    """Bits ``start .. start + length`` (at most 24) of row ``p`` of ``codes`` (uint8, packed
    big-endian), as an int64."""
    b0 = start >> 3
    b1 = (start + length - 1) >> 3
    v = np.int64(0)
    for b in range(b0, b1 + 1):
        v = (v << 8) | np.int64(codes[p, b])
    tail = (b1 + 1) * 8 - (start + length)
    return (v >> tail) & ((np.int64(1) << length) - 1)


@njit(cache=True, nogil=True)
def build_tables(codes, starts, lens, offsets, items):
    """Fill ``offsets`` ``(m, 2**max(lens) + 1)`` (int32 or int64) and ``items`` ``(m, N)`` int32 (a
    counting sort per substring; positions ascending in every bucket)."""
    n = codes.shape[0]
    m = starts.shape[0]
    for j in range(m):
        size = np.int64(1) << lens[j]
        off = offsets[j]
        off[:] = 0
        for p in range(n):
            off[_substring(codes, p, starts[j], lens[j]) + 1] += 1
        for v in range(size):
            off[v + 1] += off[v]
        fill = off[:size].copy()
        for p in range(n):
            v = _substring(codes, p, starts[j], lens[j])
            items[j, fill[v]] = p
            fill[v] += 1


@njit(cache=True, nogil=True)
def search_range(
    codes, starts, lens, offsets, items, queries, q0, q1, k, budget, out_d, out_p, done
):
    """Top-``k`` of queries ``q0:q1`` (rows of ``queries`` uint8) into ``out_d``, ``out_p``
    (``(Q, k)``); ``done[i]`` is False for a query that ran out of ``budget``."""
    m = starts.shape[0]
    maxlen = 0
    for j in range(m):
        maxlen = max(maxlen, lens[j])
    big_d = np.int32(1 << 30)
    qs = np.empty(m, np.int64)
    bd = np.empty(k, np.int32)
    bp = np.empty(k, np.int64)
    for qi in range(q0, q1):
        for j in range(m):
            qs[j] = _substring(queries, qi, starts[j], lens[j])
        bd[:] = big_d
        bp[:] = -1
        cnt = 0
        work = 0
        finished = False
        over = False
        for s in range(maxlen + 1):
            for j in range(m):
                if s <= lens[j]:
                    off = offsets[j]
                    qj = qs[j]
                    limit = np.int64(1) << lens[j]
                    mask = (np.int64(1) << s) - 1  # the first mask with s bits set
                    while mask < limit:
                        v = qj ^ mask
                        r0 = off[v]
                        r1 = off[v + 1]
                        work += 1 + (r1 - r0)
                        for r in range(r0, r1):
                            p = np.int64(items[j, r])
                            d = 0
                            first_s = 99
                            first_j = -1
                            for jj in range(m):
                                dj = _popcount(_substring(codes, p, starts[jj], lens[jj]) ^ qs[jj])
                                d += dj
                                if dj < first_s:
                                    first_s = dj
                                    first_j = jj
                            if first_s != s or first_j != j:
                                continue  # reached earlier, at a smaller radius or table
                            if cnt < k or d < bd[k - 1] or (d == bd[k - 1] and p < bp[k - 1]):
                                i = cnt if cnt < k else k - 1  # insert, dropping the last if full
                                while i > 0 and (
                                    bd[i - 1] > d or (bd[i - 1] == d and bp[i - 1] > p)
                                ):
                                    bd[i] = bd[i - 1]
                                    bp[i] = bp[i - 1]
                                    i -= 1
                                bd[i] = d
                                bp[i] = p
                                if cnt < k:
                                    cnt += 1
                        if work > budget:
                            over = True
                            break
                        if s == 0:
                            break
                        # next mask with the same number of bits set (Gosper)
                        u = mask & -mask
                        w = mask + u
                        mask = w + (((w ^ mask) // u) >> 2)
                    if over:
                        break
                # unseen items are now at distance >= m * s + j + 1
                if cnt == k and bd[k - 1] < m * s + j + 1:
                    finished = True
                    break
            if finished or over:
                break
        if over:
            done[qi] = False
            continue
        # every bucket probed or the bound reached: the list is exact
        done[qi] = True
        for i in range(k):
            out_d[qi, i] = bd[i]
            out_p[qi, i] = bp[i]
