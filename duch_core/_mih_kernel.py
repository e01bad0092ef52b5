# mypy: ignore-errors
# (numba-compiled code: typed by numba at compile time, not by mypy)
"""Numba kernel of multi-index hashing (:class:`duch_core.search.HammingIndex` with MIH on).

A ``bits``-bit code is cut into ``m = bits // 16`` substrings of 16 bits (bytes ``2j, 2j + 1``
of the packed big-endian code). Table ``j`` lists every database position by its substring
``j`` value: ``offsets[j, v] .. offsets[j, v + 1]`` index ``items[j]``, positions ascending.

A query probes radius ``s = 0, 1, 2, ...``: for each table ``j`` in turn, every bucket whose
value differs from the query's substring ``j`` in exactly ``s`` bits (``masks`` lists all 16-bit
masks by popcount, ``pop_off[s]`` where popcount ``s`` starts). A candidate's full distance is
the sum of its 16-bit substring distances; it is new only at the (radius, table) where it is
first reachable: its smallest substring distance, in the first table having it, so no visited
set is needed. By the pigeonhole principle an item not yet seen after radius ``s`` of tables
``0..j`` is at distance at least ``m * s + j + 1``; once the k-th best distance is below that,
the top-k is exact, ties included (ranked by (distance, position)).

A query that would examine more than ``budget`` candidates and buckets stops and is reported
not done; the caller answers it with the exhaustive scan.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def build_tables(codes, offsets, items):
    """Fill ``offsets`` ``(m, 65537)`` int64 and ``items`` ``(m, N)`` int32 from ``codes``
    ``(N, 2m)`` uint8 (counting sort per substring; positions ascending in every bucket)."""
    n = codes.shape[0]
    m = offsets.shape[0]
    for j in range(m):
        off = offsets[j]
        off[:] = 0
        for p in range(n):
            v = (np.int64(codes[p, 2 * j]) << 8) | np.int64(codes[p, 2 * j + 1])
            off[v + 1] += 1
        for v in range(65536):
            off[v + 1] += off[v]
        fill = off[:65536].copy()
        for p in range(n):
            v = (np.int64(codes[p, 2 * j]) << 8) | np.int64(codes[p, 2 * j + 1])
            items[j, fill[v]] = p
            fill[v] += 1


@njit(cache=True, nogil=True)
def search_range(
    codes, offsets, items, masks, pop_off, pop16, queries, q0, q1, k, budget, out_d, out_p, done
):
    """Top-``k`` of queries ``q0:q1`` (rows of ``queries`` ``(Q, 2m)`` uint8) into ``out_d``,
    ``out_p`` (``(Q, k)``); ``done[i]`` is False for a query that ran out of ``budget``."""
    m = offsets.shape[0]
    big_d = np.int32(1 << 30)
    qs = np.empty(m, np.int64)
    bd = np.empty(k, np.int32)
    bp = np.empty(k, np.int64)
    for qi in range(q0, q1):
        for j in range(m):
            qs[j] = (np.int64(queries[qi, 2 * j]) << 8) | np.int64(queries[qi, 2 * j + 1])
        bd[:] = big_d
        bp[:] = -1
        cnt = 0
        work = 0
        finished = False
        over = False
        for s in range(17):
            for j in range(m):
                off = offsets[j]
                qj = qs[j]
                for t in range(pop_off[s], pop_off[s + 1]):
                    v = qj ^ np.int64(masks[t])
                    r0 = off[v]
                    r1 = off[v + 1]
                    work += 1 + (r1 - r0)
                    for r in range(r0, r1):
                        p = np.int64(items[j, r])
                        d = 0
                        first_s = 99
                        first_j = -1
                        for jj in range(m):
                            sv = (np.int64(codes[p, 2 * jj]) << 8) | np.int64(codes[p, 2 * jj + 1])
                            dj = np.int64(pop16[sv ^ qs[jj]])
                            d += dj
                            if dj < first_s:
                                first_s = dj
                                first_j = jj
                        if first_s != s or first_j != j:
                            continue  # reached earlier, at a smaller radius or table
                        if cnt < k or d < bd[k - 1] or (d == bd[k - 1] and p < bp[k - 1]):
                            # insert (d, p) into the ranked list, dropping the last if full
                            i = cnt if cnt < k else k - 1
                            while i > 0 and (bd[i - 1] > d or (bd[i - 1] == d and bp[i - 1] > p)):
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
        # every bucket probed (s = 16) or the bound reached: the list is exact
        done[qi] = True
        for i in range(k):
            out_d[qi, i] = bd[i]
            out_p[qi, i] = bp[i]
