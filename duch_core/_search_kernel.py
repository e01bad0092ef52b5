# mypy: ignore-errors
# (numba-compiled code: typed by numba at compile time, not by mypy)
"""Numba kernel of :mod:`duch_core.search` (imported on first search; compiled once, cached).

See the module docstring of :mod:`duch_core.search` for the algorithm. Arrays:

* ``db`` ``(N * W,)`` and ``q`` ``(Q * W,)``: the row-major words of ``(N, W)`` and ``(Q, W)``
  code arrays, unsigned integers of one dtype (uint16/32/64, or uint8). Flat arrays give the
  compiler unit-stride loads, which it vectorises.
* ``out_d`` ``(Q, k)`` int32 and ``out_p`` ``(Q, k)`` int64: distances and positions, ranked by
  (distance, position).

The database (or the candidate list of a filtered search, :func:`gather_chunk`) is split into
chunks scanned by :func:`scan_chunk` on separate threads (it releases the GIL), then
:func:`merge_chunks` merges them. Threads come from a Python pool rather than
``numba.prange``: the same speed, about half the compile time, and no dependence on numba's
threading layer when several threads search at once.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# candidates ahead whose codes :func:`gather_chunk` asks the CPU to fetch, so the cache misses
# of a sparse gather overlap instead of queueing one after the other
_PREFETCH_AHEAD = 16

# consecutive candidate rows that :func:`gather_chunk` scans where they lie instead of copying
# them (about a cache line's worth of copying costs as much as scanning in place)
_RUN_IN_PLACE = 32


@intrinsic
def _popcount(typingctx, x):
    """Hardware popcount of an unsigned integer, as int64."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        val = args[0]
        cnt = builder.ctpop(val)
        if x.bitwidth < 64:
            return builder.zext(cnt, ir.IntType(64))
        return cnt

    return types.int64(x), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (never faults, returns nothing)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        if getattr(ptr.type, "is_opaque", False):
            name = "llvm.prefetch.p0"
        else:  # LLVM with typed pointers
            name, ptr = "llvm.prefetch.p0i8", builder.bitcast(ptr, ir.IntType(8).as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@njit(cache=True, inline="always")
def _dist(db, j, q, qi, w):
    d = 0
    for t in range(w):
        d += _popcount(db[j * w + t] ^ q[qi * w + t])
    return d


@njit(cache=True, inline="always")
def _block_min(db, b0, b1, q, qi, w, big):
    """Minimum distance of query ``qi`` to rows ``b0:b1``.

    Specialised for 1, 2 and 4 words per code so the loop is vectorised (unit or constant
    stride loads, vector popcount and min).
    """
    # a slice indexed from 0 lets the compiler drop negative-index handling and load directly
    seg = db[b0 * w : b1 * w]
    nb = b1 - b0
    mn = big
    if w == 1:
        q0 = q[qi]
        for j in range(nb):
            mn = min(mn, _popcount(seg[j] ^ q0))
    elif w == 2:
        q0 = q[2 * qi]
        q1 = q[2 * qi + 1]
        for j in range(nb):
            mn = min(mn, _popcount(seg[2 * j] ^ q0) + _popcount(seg[2 * j + 1] ^ q1))
    elif w == 4:
        q0 = q[4 * qi]
        q1 = q[4 * qi + 1]
        q2 = q[4 * qi + 2]
        q3 = q[4 * qi + 3]
        for j in range(nb):
            d = _popcount(seg[4 * j] ^ q0) + _popcount(seg[4 * j + 1] ^ q1)
            d += _popcount(seg[4 * j + 2] ^ q2) + _popcount(seg[4 * j + 3] ^ q3)
            mn = min(mn, d)
    else:
        for j in range(nb):
            mn = min(mn, _dist(seg, j, q, qi, w))
    return mn


@njit(cache=True, inline="always")
def _piece_dists(db, b0, b1, q, qi, w, out):
    """Distances of query ``qi`` to rows ``b0:b1`` into ``out[: b1 - b0]``, vectorised as
    :func:`_block_min` is (a piece is scanned item by item from these)."""
    seg = db[b0 * w : b1 * w]
    nb = b1 - b0
    if w == 1:
        q0 = q[qi]
        for j in range(nb):
            out[j] = _popcount(seg[j] ^ q0)
    elif w == 2:
        q0 = q[2 * qi]
        q1 = q[2 * qi + 1]
        for j in range(nb):
            out[j] = _popcount(seg[2 * j] ^ q0) + _popcount(seg[2 * j + 1] ^ q1)
    elif w == 4:
        q0 = q[4 * qi]
        q1 = q[4 * qi + 1]
        q2 = q[4 * qi + 2]
        q3 = q[4 * qi + 3]
        for j in range(nb):
            d = _popcount(seg[4 * j] ^ q0) + _popcount(seg[4 * j + 1] ^ q1)
            out[j] = d + _popcount(seg[4 * j + 2] ^ q2) + _popcount(seg[4 * j + 3] ^ q3)
    else:
        for j in range(nb):
            out[j] = _dist(seg, j, q, qi, w)


@njit(cache=True)
def _fail_bytes():
    """``(256,)`` uint64: for each byte of a class bitmap (8 rows), 8 bytes holding 1 for a
    row whose bit is clear (its class fails) and 0 for one whose bit is set."""
    out = np.zeros(256, np.uint64)
    for b in range(256):
        v = 0
        for r in range(8):
            if not (b >> r) & 1:
                v |= 1 << (8 * r)
        out[b] = np.uint64(v)
    return out


@njit(cache=True, inline="always")
def _piece_dists_bits(db, b0, b1, q, qi, w, out, bit_bytes, fail, spread, big):
    """:func:`_piece_dists`, then ``big`` added to the distance of each row whose bit in the
    class bitmap is clear (``bit_bytes``: its words as bytes), so that it never passes a
    threshold.

    The piece's bitmap bytes become one byte per row through ``fail`` (:func:`_fail_bytes`),
    written to ``spread`` (uint64, at least ``(b1 - b0 + 15) // 8 + 1`` words); adding those
    bytes is a vectorised loop, where shifting each row's bit out of its word is not (about
    six times slower).
    """
    _piece_dists(db, b0, b1, q, qi, w, out)
    first = b0 >> 3
    off = b0 & 7  # the piece's first row within its byte
    for u in range((off + b1 - b0 + 7) >> 3):
        spread[u] = fail[bit_bytes[first + u]]
    per_row = spread.view(np.uint8)
    for i in range(b1 - b0):
        out[i] += np.int64(per_row[off + i]) * big


@njit(cache=True, inline="always")
def _accept(cd, cp, qh, qi, n, d, j, own, lt, k, hist):
    """Adds the candidate at distance ``d``, position ``j`` to query ``qi``'s buffer
    (``cd``/``cp`` rows ``qi``, ``n`` entries) and keeps its threshold exact; returns the new
    ``(n, own, lt)``.

    ``own`` is the k-th smallest distance in the buffer (``bits + 1`` while it holds fewer than
    ``k``), so only ``d < own`` can still enter; ``qh[qi]`` counts the buffer's entries by
    distance and ``lt`` those below ``own``. Each entry added lowers ``own`` as soon as ``k``
    entries lie below it, not only when a full buffer is cut, so fewer pieces look close enough
    to scan item by item. A full buffer is cut back to ``k`` (:func:`_cut`): the entries above
    ``own`` and the surplus at ``own`` go, those below stay, so the counts below ``own`` hold.
    """
    cd[qi, n] = d
    cp[qi, n] = j
    n += 1
    qh[qi, d] += 1
    lt += 1
    while lt >= k:
        own -= 1
        lt -= qh[qi, own]
    if n == cd.shape[1]:
        _cut(cd[qi], cp[qi], n, k, hist)
        n = k
        qh[qi, own] = k - lt
        for v in range(own + 1, qh.shape[1]):
            qh[qi, v] = 0
    return n, own, lt


@njit(cache=True, inline="always")
def _any_test(tests):
    """Whether ``tests`` (see :func:`test_rows`) test anything."""
    return (
        tests[0].shape[0] > 0
        or tests[1].shape[0] > 0
        or tests[3].shape[0] > 0
        or tests[6].shape[0] > 0
        or tests[14].shape[0] > 0
    )


@njit(cache=True, inline="always")
def _zones_any(zones, shift, lo, hi):
    """Whether a zone (``2**shift`` rows) overlapping rows ``lo:hi`` is marked in ``zones``;
    always true when ``zones`` is empty (no zone map)."""
    if zones.shape[0] == 0:
        return True
    for z in range(lo >> shift, ((hi - 1) >> shift) + 1):
        if zones[z]:
            return True
    return False


@njit(cache=True, nogil=True)
def test_rows(lo, hi, tests, flags):
    """Sets ``flags[i]`` to whether row ``lo + i`` passes every test of ``tests``, for
    ``i < hi - lo``. ``tests`` is a tuple ``(mask, classes, class_ok, times, time_lo, time_hi,
    min_lon, min_lat, max_lon, max_lat, wraps, box, zones, zone_shift, class_bits)``; a test
    whose column is empty is not applied:

    * ``mask[j]`` (bool);
    * ``class_ok[classes[j]]`` (int32 row classes; -1, or a class past the end of
      ``class_ok``, never passes);
    * ``time_lo <= times[j] <= time_hi`` (int64);
    * the row's box (float64 columns, NaN unknown: never passes; ``wraps[j]``, or an empty
      ``wraps``: no row crosses the antimeridian) intersects ``box`` = ``(w, s, e, n)``, where
      ``w > e`` crosses the antimeridian, and longitudes -180 and 180 are one meridian
      (the rule of :mod:`duch_core.filters`);
    * bit ``j % 64`` of ``class_bits[j // 64]`` (uint64; :mod:`duch_core.row_bits`).

    ``zones`` (bool, one per zone of ``2**zone_shift`` rows; empty: none) is not a test of its
    own: it marks the zones that may hold a passing row (:mod:`duch_core.zone_maps`), and the
    scans skip the others. A row of an unmarked zone must fail the tests.

    Rows are tested a range at a time, column by column: a call per row would pay the
    reference counting of every array it is given, about 150 ns.
    """
    mask, classes, class_ok, times, time_lo, time_hi = tests[:6]
    min_lon, min_lat, max_lon, max_lat, wraps, box = tests[6:12]
    _test_range(lo, hi, mask, classes, class_ok, times, time_lo, time_hi,
                min_lon, min_lat, max_lon, max_lat, wraps, box, tests[14], flags)  # fmt: skip


@njit(cache=True, inline="always")
def _test_range(lo, hi, mask, classes, class_ok, times, time_lo, time_hi,
                min_lon, min_lat, max_lon, max_lat, wraps, box, bits, flags):  # fmt: skip
    """:func:`test_rows` with the tests unpacked (by the caller, once: a tuple unpacked per
    piece costs the reference counting of its arrays)."""
    nb = hi - lo
    for i in range(nb):
        flags[i] = True
    if mask.shape[0] > 0:
        for i in range(nb):
            flags[i] = mask[lo + i]
    # branch-free tests (``&``, ``|`` on bools): a row that passes at random would mispredict
    if classes.shape[0] > 0:
        nc = class_ok.shape[0]
        if nc == 0:
            for i in range(nb):
                flags[i] = False
        for i in range(nb if nc > 0 else 0):
            c = classes[lo + i]
            inside = (c >= 0) & (c < nc)
            flags[i] = flags[i] & inside & class_ok[c if inside else 0]
    if times.shape[0] > 0:
        for i in range(nb):
            t = times[lo + i]
            flags[i] = flags[i] & (t >= time_lo) & (t <= time_hi)
    if min_lon.shape[0] > 0:
        w, s, e, n = box[0], box[1], box[2], box[3]
        wrapped = wraps.shape[0] > 0
        east_180, west_180 = e == 180.0, w == -180.0
        for i in range(nb):
            j = lo + i
            x0 = min_lon[j]
            x1 = max_lon[j]
            lo_ok = x0 <= e  # the item starts west of the query's east edge
            hi_ok = x1 >= w  # and ends east of its west edge
            wr = wraps[j] if wrapped else False
            if w <= e:
                lon = (
                    (lo_ok & hi_ok)
                    | (wr & (lo_ok | hi_ok))
                    | (east_180 & (x0 == -180.0))
                    | (west_180 & (x1 == 180.0))
                )
            else:
                lon = lo_ok | hi_ok | wr
            flags[i] = flags[i] & lon & (min_lat[j] <= n) & (max_lat[j] >= s)
    if bits.shape[0] > 0:
        one = np.uint64(1)
        for i in range(nb):
            j = lo + i
            flags[i] = flags[i] & (((bits[j >> 6] >> np.uint64(j & 63)) & one) != 0)


@njit(cache=True, nogil=True)
def filter_rows(lo, hi, tests, out):
    """Writes the rows of ``lo:hi`` that pass ``tests`` (:func:`test_rows`) to ``out``, in
    order; returns their count (releases the GIL). Zones not marked are passed over."""
    mask, classes, class_ok, times, time_lo, time_hi = tests[:6]
    min_lon, min_lat, max_lon, max_lat, wraps, box, zones, zs, bits = tests[6:]
    step = 4096 if zones.shape[0] == 0 else 1 << zs
    flags = np.empty(step, np.bool_)
    m = 0
    for b0 in range(lo, hi, step):
        b1 = min(hi, b0 + step)
        if not _zones_any(zones, zs, b0, b1):
            continue
        _test_range(b0, b1, mask, classes, class_ok, times, time_lo, time_hi,
                    min_lon, min_lat, max_lon, max_lat, wraps, box, bits, flags)  # fmt: skip
        for i in range(b1 - b0):  # branch-free: a mispredicted branch per row costs more
            out[m] = b0 + i  # m <= b0 - lo + i < hi - lo: always inside ``out``
            m += flags[i]
    return m


@njit(cache=True, nogil=True)
def ascending_rows(rows, n, bits, out):
    """Writes the distinct ``rows`` (each in ``0:n``) to ``out`` in ascending order, through
    the bitset ``bits`` (``(n + 63) // 64`` uint64, all zero; left zero again): setting a bit
    per row, then reading the words. It costs ``len(rows) + n / 64`` steps, against
    ``len(rows) * log(len(rows))`` for a sort (100k of 10M rows: 0.3 ms against 4 ms);
    returns the count."""
    for r in rows:
        bits[r >> 6] |= np.uint64(1) << np.uint64(r & 63)
    m = 0
    for w in range(bits.shape[0]):
        word = bits[w]
        if word:
            bits[w] = 0
            base = w << 6
            while word:
                low = word & (~word + np.uint64(1))  # the lowest set bit
                out[m] = base + _bit_index(low)
                m += 1
                word ^= low
    return m


@njit(cache=True, inline="always")
def _bit_index(one):
    """Index of the single set bit of the uint64 ``one``."""
    return _popcount(one - np.uint64(1))


@njit(cache=True)
def _cut(bd, bp, n, k, hist):
    """Cut a candidate list (position order) to its best ``k``; returns the k-th distance.

    ``bd``/``bp`` hold ``n > k`` candidates; afterwards their first ``k`` entries are the
    survivors, still in position order.
    """
    hist[:] = 0
    for i in range(n):
        hist[bd[i]] += 1
    below = 0
    t = 0
    while below + hist[t] < k:
        below += hist[t]
        t += 1
    keep_eq = k - below
    m = 0
    for i in range(n):
        d = bd[i]
        if d < t or (d == t and keep_eq > 0):
            if d == t:
                keep_eq -= 1
            bd[m] = d
            bp[m] = bp[i]
            m += 1
    return t


@njit(cache=True, nogil=True)
def scan_chunk(db, q, w, k, bits, lo, hi, block, sub, tests, cd, cp, cn, shared, me):
    """Top-k candidates of every query among database rows ``lo:hi`` (releases the GIL).

    Walks ``block``-row blocks (kept in cache while every query visits them); within a block a
    query checks ``sub``-row pieces by their minimum distance and scans only a piece that can
    hold a candidate. A query accepts only distances below its threshold ``t``; a full buffer
    is cut back to ``k`` (:func:`_cut`) and ``t`` becomes the k-th distance.

    ``tests`` (a tuple, see :func:`test_rows`) keeps only the rows that pass them; with none given every
    row is kept. They are evaluated only in the pieces scanned item by item, and there only
    for a row closer than the threshold (the minimum over a piece, taken over all its rows, is
    still a lower bound for the rows that pass). Blocks and pieces in no marked zone are
    passed over unread. A class bitmap is read with the distances of such a piece
    (:func:`_piece_dists_bits`): a row of another class is then as far as no row can be, and
    is never tested alone, which for a label filter keeping a tenth of the rows saves about
    ten cache misses per row that enters the top-k (a threshold among the rows that pass
    settles as if ``k`` were ten times larger, so many more rows come close enough).

    Chunks scanned at the same time share their thresholds: ``shared`` ``(C, Q)`` int64 holds
    each chunk's k-th distance so far (``bits + 1`` until it has k candidates) and this chunk
    writes row ``me``. A row at distance ``d > t`` of another chunk can never enter the top-k
    (that chunk holds k rows at ``t`` or less), so a chunk accepts only ``d < t + 1`` of the
    others (``d = t`` can: a smaller position wins a tie). A value read stale is only looser. So
    each chunk's threshold settles as fast as if it had seen the rows of all of them, which
    matters most for a filter, whose threshold settles slowly (k rows must pass first).

    Fills ``cd`` ``(Q, cap)`` int16 distances and ``cp`` ``(Q, cap)`` int64 positions with up
    to ``k`` candidates per query, in position order, and ``cn`` ``(Q,)`` with their count
    (fewer than ``k`` only where the chunk has fewer candidates, or where another chunk holds
    ``k`` better).
    """
    mask, classes, class_ok, times, time_lo, time_hi = tests[:6]
    min_lon, min_lat, max_lon, max_lat, wraps, box, zones, zs, cbits = tests[6:]
    by_bits = cbits.shape[0] > 0
    # tests left for a row alone: all but the bitmap, read with the piece's distances
    masked = mask.shape[0] > 0 or classes.shape[0] > 0 or times.shape[0] > 0
    masked = masked or min_lon.shape[0] > 0
    no_bits = cbits[:0]
    bit_bytes = cbits.view(np.uint8)  # little-endian words: byte b holds rows 8b .. 8b + 7
    fail = _fail_bytes() if by_bits else np.zeros(0, np.uint64)
    spread = np.zeros((sub + 15) // 8 + 1 if by_bits else 0, np.uint64)
    flags = np.ones(1, np.bool_)
    nq = q.shape[0] // w
    big = bits + 1
    hist = np.empty(bits + 2, np.int64)
    qh = np.zeros((nq, bits + 2), np.int64)
    thr = np.full(nq, big, np.int64)
    lts = np.zeros(nq, np.int64)
    dl = np.empty(sub, np.int64)
    cn[:] = 0
    for b0 in range(lo, hi, block):
        b1 = min(hi, b0 + block)
        if by_bits:  # the next block's bitmap bytes, read only where a piece comes close
            for u in range((b1 >> 3) & ~63, min(bit_bytes.shape[0], (b1 + block + 7) >> 3), 64):
                _prefetch(bit_bytes, u)
        if not _zones_any(zones, zs, b0, b1):
            continue
        for qi in range(nq):
            own = thr[qi]
            lt = lts[qi]
            t = own
            for c in range(shared.shape[0]):
                if c != me:
                    t = min(t, shared[c, qi] + 1)
            n = cn[qi]
            for s0 in range(b0, b1, sub):
                s1 = min(b1, s0 + sub)
                if not _zones_any(zones, zs, s0, s1):
                    continue
                if _block_min(db, s0, s1, q, qi, w, big) >= t:
                    continue
                if by_bits:
                    _piece_dists_bits(db, s0, s1, q, qi, w, dl, bit_bytes, fail, spread, big)
                else:
                    _piece_dists(db, s0, s1, q, qi, w, dl)
                for i in range(s1 - s0):
                    d = dl[i]
                    if d < t:
                        j = s0 + i
                        if masked:  # tested only here: rare once the threshold settles
                            _test_range(j, j + 1, mask, classes, class_ok, times, time_lo,
                                        time_hi, min_lon, min_lat, max_lon, max_lat, wraps,
                                        box, no_bits, flags)  # fmt: skip
                            if not flags[0]:
                                continue
                        n, low, lt = _accept(cd, cp, qh, qi, n, d, j, own, lt, k, hist)
                        if low != own:
                            own = low
                            shared[me, qi] = own
                            t = min(t, own)
            cn[qi] = n
            thr[qi] = own
            lts[qi] = lt
    for qi in range(nq):
        if cn[qi] > k:
            _cut(cd[qi], cp[qi], cn[qi], k, hist)
            cn[qi] = k


@njit(cache=True, inline="always")
def _scan_gathered(src, off, nb, q, nq, w, k, sub, big, cand, b0, thr, lts, qh, dl, hist,
                   cd, cp, cn):  # fmt: skip
    """Every query scans the ``nb`` codes of ``src`` from row ``off`` on (those of
    ``cand[b0 : b0 + nb]``) by pieces, as :func:`scan_chunk` scans the database; positions
    reported are ``cand`` entries.

    This is :func:`scan_chunk`'s per-query loop without the mask and with the position looked
    up. One helper for both, with the mask and the lookup as runtime switches, made the masked
    scan about 10 % slower for a single query at 10M rows (6.7-7.0 ms against 6.1-6.4 ms), so
    the two loops stay separate: a change to one belongs in the other.
    """
    for qi in range(nq):
        t = thr[qi]
        lt = lts[qi]
        n = cn[qi]
        for s0 in range(0, nb, sub):
            s1 = min(nb, s0 + sub)
            if _block_min(src, off + s0, off + s1, q, qi, w, big) >= t:
                continue
            _piece_dists(src, off + s0, off + s1, q, qi, w, dl)
            for i in range(s1 - s0):
                d = dl[i]
                if d < t:
                    n, t, lt = _accept(cd, cp, qh, qi, n, d, cand[b0 + s0 + i], t, lt, k, hist)
        cn[qi] = n
        thr[qi] = t
        lts[qi] = lt


@njit(cache=True, nogil=True)
def gather_chunk(db, q, w, k, bits, n_rows, cand, lo, hi, block, sub, buf, cd, cp, cn):
    """:func:`scan_chunk` over the rows ``cand[lo:hi]`` only (releases the GIL).

    ``cand`` holds strictly increasing row positions, checked before any row is read. They are
    taken run by run (a run: consecutive rows, such as the chips of one scene). A run of at
    least ``_RUN_IN_PLACE`` rows is scanned where it lies; shorter ones are copied into ``buf``
    (``block * w`` words; the row ``_PREFETCH_AHEAD`` entries ahead is prefetched so that the
    cache misses overlap), which is scanned when full. Every query of the batch scans each
    piece contiguously, as :func:`scan_chunk` scans the database, and reported positions are
    ``cand`` entries, in order, so candidates stay in position order.

    Returns -1, or the index of the first entry of ``cand[lo:hi]`` that is out of ``0:n_rows``
    or not above the one before it (no row has been read; the outputs are then undefined).
    """
    prev = cand[lo - 1] if lo > 0 else -1
    for b0 in range(lo, hi, block):  # a loop without exits vectorises; look closer on failure
        b1 = min(hi, b0 + block)
        seg = cand[b0:b1]
        bad = 0
        for i in range(1, b1 - b0):
            bad += seg[i] <= seg[i - 1]
        if bad or seg[0] <= prev or seg[b1 - b0 - 1] >= n_rows:
            for i in range(b0, b1):
                if cand[i] <= prev or cand[i] >= n_rows:
                    return i
                prev = cand[i]
        prev = seg[b1 - b0 - 1]
    nq = q.shape[0] // w
    big = bits + 1
    hist = np.empty(bits + 2, np.int64)
    qh = np.zeros((nq, bits + 2), np.int64)
    thr = np.full(nq, big, np.int64)
    lts = np.zeros(nq, np.int64)
    dl = np.empty(sub, np.int64)
    cn[:] = 0
    nbuf = 0  # buf holds the codes of cand[i - nbuf : i]
    i = lo
    while i < hi:
        p = cand[i]
        if i + block <= hi and cand[i + block - 1] == p + block - 1:
            r = block  # strictly increasing: all consecutive, no need to look at each
        else:
            r = 1
            while i + r < hi and r < block and cand[i + r] == p + r:
                r += 1
        if r >= _RUN_IN_PLACE:
            if nbuf:
                _scan_gathered(buf, 0, nbuf, q, nq, w, k, sub, big, cand, i - nbuf,
                               thr, lts, qh, dl, hist, cd, cp, cn)  # fmt: skip
                nbuf = 0
            _scan_gathered(db, p, r, q, nq, w, k, sub, big, cand, i,
                           thr, lts, qh, dl, hist, cd, cp, cn)  # fmt: skip
            i += r
            continue
        if nbuf + r > block:
            _scan_gathered(buf, 0, nbuf, q, nq, w, k, sub, big, cand, i - nbuf,
                           thr, lts, qh, dl, hist, cd, cp, cn)  # fmt: skip
            nbuf = 0
        ahead = i + _PREFETCH_AHEAD
        if ahead < hi:
            _prefetch(db, cand[ahead] * w)
        src = p * w
        dst = nbuf * w
        for u in range(r * w):
            buf[dst + u] = db[src + u]
        nbuf += r
        i += r
    if nbuf:
        _scan_gathered(buf, 0, nbuf, q, nq, w, k, sub, big, cand, hi - nbuf,
                       thr, lts, qh, dl, hist, cd, cp, cn)  # fmt: skip
    for qi in range(nq):
        if cn[qi] > k:
            _cut(cd[qi], cp[qi], cn[qi], k, hist)
            cn[qi] = k
    return -1


@njit(cache=True, nogil=True)
def merge_chunks(cd, cp, cn, k, bits, out_d, out_p):
    """Global top-k from per-chunk candidates ``cd``/``cp`` ``(C, Q, cap)``, ``cn`` ``(C, Q)``.

    A stable counting sort by distance over the chunks in order (= position order), so ties
    stay in position order. Writes ``out_d`` ``(Q, k)`` int32 and ``out_p`` ``(Q, k)`` int64.
    """
    nc = cd.shape[0]
    nq = cd.shape[1]
    start = np.empty(bits + 2, np.int64)
    for qi in range(nq):
        start[:] = 0
        for c in range(nc):
            for i in range(cn[c, qi]):
                start[cd[c, qi, i] + 1] += 1
        for d in range(1, bits + 2):
            start[d] += start[d - 1]
        for c in range(nc):
            for i in range(cn[c, qi]):
                d = cd[c, qi, i]
                slot = start[d]
                start[d] = slot + 1
                if slot < k:
                    out_d[qi, slot] = d
                    out_p[qi, slot] = cp[c, qi, i]
