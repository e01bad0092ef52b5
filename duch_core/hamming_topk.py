"""Exact Hamming top-k over packed code arrays: the kernel driver under :mod:`duch_core.search`.

Thread pool, kernel loading, the blocked scan and gather, MIH layout and choice, candidate
checks, the numpy reference and the merge of per-shard lists; kept apart from the index class
so the numeric plumbing can be read and tuned on its own.

How the kernel works (:mod:`duch_core._search_kernel`, numba, compiled on first use for each word
type and cached on disk; :func:`warmup` does it ahead of the first request):

* The ``(N, bits // 8)`` uint8 codes are viewed, without a copy, as ``(N, W)`` words of the
  widest unsigned integer type dividing ``bits // 8`` (uint64 for 64, 128, 256 bits; uint32 and
  uint16 for 32 and 16 bits), so memory stays exactly ``bits // 8`` bytes per code. The distance
  of two codes is the sum of the hardware popcounts of the XORs of their words.
* Codes are kept sorted by id, so the tie-break by id is a tie-break by position. Ids that are
  positions (or a contiguous range) are not stored: the index holds the codes alone.
* The database is split into one contiguous chunk per thread (:func:`set_num_threads`; the
  kernel releases the GIL), for a single query too. Each thread walks its chunk in blocks of
  about 16 KiB and runs every query of the batch against a block while it is in L1. Per query,
  the minimum distance over a 2 KiB piece of the block is a vectorised reduction (AVX-512
  popcount where the CPU has it); the piece is scanned item by item only when that minimum is
  below the query's threshold, which is rare once the threshold has settled.
* Top-k selection never sorts: each query keeps a candidate buffer of up to ``2k + 16`` items
  in position order, a count of its items per distance (distances are integers in
  ``0..bits``) and a threshold ``t``, the k-th smallest distance in the buffer (accept only
  ``d < t``: a later item at distance ``t`` has a larger id than the ``k`` kept, so it can
  never enter). Each item accepted lowers ``t`` as soon as ``k`` items lie below it, so fewer
  pieces look close enough to scan row by row; a full buffer is cut back to exactly ``k``
  items with a counting select. (Lowering ``t`` only at the cuts, as before, made a 10 %
  filter 15-40 % slower at 10M rows; a smaller buffer instead made the cuts too frequent on
  clustered codes.) A piece scanned row by row has its distances computed vectorised first.
  The threads scanning a batch share their thresholds
  (:func:`duch_core._search_kernel.scan_chunk`). The per-thread lists are merged by a stable
  counting sort on distance, so ties stay in position order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from duch_core.row_filter import RowFilter

__all__ = [
    "DENSE_FRACTION",
    "SearchError",
    "choose_mih",
    "get_num_threads",
    "kernel_tests",
    "merge_topk",
    "mih_layout",
    "search_reference",
    "set_num_threads",
]

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

# database items per cache block, for one 64-bit word per item (scaled by the code width so a
# block stays about 16 KiB, well inside L1)
_BLOCK_BYTES = 16384
# database rows checked together by their minimum distance before an item-by-item scan (bytes)
_SUB_BYTES = 2048
# chunks smaller than this are not split across threads (thread start-up would dominate)
_MIN_CHUNK = 32768
# ... and a scan in place is split only where each thread gets at least this many row-queries
# (rows x queries of the batch): waking a thread costs 0.15-0.3 ms, the time one thread scans
# about a million 64-bit rows for one query (a 100k-row range for a single query: 0.21 ms on two
# threads, 0.05 ms on one; a 1M-row range 0.29 and 0.20 ms)
_MIN_SCAN_WORK = 1 << 20
# the same for a candidate list (a gathered candidate costs several scanned rows)
_MIN_GATHER_CHUNK = 8192
# the same for candidates packed in runs (spanning less than twice their count): scanned in
# place, each costs about a scanned row, and waking a thread (0.2-0.5 ms here) would cost more
# than the rows it takes over
_MIN_RUN_CHUNK = 131072
# Filtered search: sorted candidate positions are gathered, a bool mask is scanned with the
# database. For a single query a list is the faster form below this fraction of the rows (the
# gather reads 8 bytes of position per candidate and the cache lines holding the candidates;
# the masked scan reads every code), a mask above it (bench/search.py measures both).
DENSE_FRACTION = 0.15
# A mask is turned into positions (np.flatnonzero) and gathered when it keeps less than this
# fraction (the masked scan's threshold settles slowly when few rows pass), or when the batch
# is large enough to repay the conversion: in units of one scanned code, converting costs about
# _NONZERO_COST per row, gathering about _GATHER_COST per candidate, and every query then scans
# the fraction f of the rows that pass instead of all of them.
_MASK_GATHER_FRACTION = 0.05
_NONZERO_COST = 2.5
_GATHER_COST = 3.5
# the mask's fraction is estimated from _MASK_SAMPLES evenly spread runs of _MASK_RUN rows
# a row filter turned into positions: the pass over its columns costs about this many scans of
# its range (37-50 ms at 10M rows against 5-7 ms), and searching the positions about this many
# scans per query for each share of the rows kept (measured: 32 queries, half the rows kept)
_FILTER_ROWS_COST = 8.0
_GATHER_PER_ROW = 1.9
# the same from the class row lists (no pass over the rows): concatenating a tenth of the rows
# and putting them in order (bench/search.py, label filters)
_CLASS_ROWS_COST = 3.0
_MASK_SAMPLES = 64
# rows put in order through a bitset (ascending_positions) rather than sorted: at least this
# many, and at most this many bitset words (64 rows each) per row
_BITSET_SORT_MIN = 4096
_BITSET_SORT_WORDS = 8
_MASK_RUN = 1024
# bound on the per-call candidate state (bytes), used to split very large query batches
_STATE_BYTES = 64 << 20
# one call in _MIH_RETRY uses the method that has been slower so far, to follow changes
_MIH_RETRY = 16
# MIH substrings: about log2(N) bits, within these bounds
_MIH_MIN_BITS = 8
_MIH_MAX_BITS = 24


class SearchError(ValueError):
    """Bad input to the search index: wrong code width, bad k, mismatched ids, bad index file."""


def _check_codes(codes: Any, bits: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise SearchError(f"{what} must be uint8 packed codes, got dtype {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != bits // 8:
        raise SearchError(
            f"{what} must have shape (n, {bits // 8}) for {bits}-bit codes, got {codes.shape}"
        )
    return np.ascontiguousarray(codes)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _word_dtype(nbytes: int) -> np.dtype:
    """The widest unsigned integer type whose size divides ``nbytes``."""
    for size, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if nbytes % size == 0:
            return np.dtype(dt)
    return np.dtype(np.uint8)


def _as_words(codes: np.ndarray, nbytes: int) -> np.ndarray:
    """``(n, nbytes)`` C-contiguous uint8 -> ``(n, W)`` words (a view, no copy)."""
    return np.asarray(codes).view(_word_dtype(nbytes))


# --------------------------------------------------------------------------------------------
# kernel driver (numba is imported on first search, never at module import)

_STATE: dict[str, Any] = {"threads": None, "pool": None, "pool_size": 0, "pid": 0}
_LOCK = threading.Lock()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None) -> None:
    """Threads one search uses (``None``: every CPU this process may run on)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SearchError(f"thread count must be a positive integer or None, got {n!r}")
    _STATE["threads"] = n


def get_num_threads() -> int:
    """Threads one search uses."""
    n = _STATE["threads"]
    return int(n) if n is not None else _default_threads()


def _pool(n: int) -> ThreadPoolExecutor:
    """The shared worker pool (at least ``n`` threads; a fresh one after a fork)."""
    with _LOCK:
        if _STATE["pool"] is None or _STATE["pool_size"] < n or _STATE["pid"] != os.getpid():
            old = _STATE["pool"]
            _STATE["pool"] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="hamming")
            _STATE["pool_size"] = n
            if old is not None and _STATE["pid"] == os.getpid():
                old.shutdown(wait=False)
            _STATE["pid"] = os.getpid()
        pool: ThreadPoolExecutor = _STATE["pool"]
        return pool


def _kernel() -> Any:
    kern = _STATE.get("kernel")
    if kern is None:
        from duch_core import _search_kernel as kern

        _STATE["kernel"] = kern
    return kern


def _mih_kernel() -> Any:
    from duch_core import _mih_kernel

    return _mih_kernel


def mih_layout(bits: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """MIH substrings for ``n`` codes of ``bits`` bits: ``(starts, lens)``, consecutive and of
    nearly equal length, about ``log2(n)`` bits each (Norouzi et al.'s choice: a bucket then
    holds about one code)."""
    target = int(np.clip(round(np.log2(max(n, 2))), _MIH_MIN_BITS, _MIH_MAX_BITS))
    m = max(1, -(-bits // target))
    lens = np.full(m, bits // m, np.int64)
    lens[: bits % m] += 1
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return starts, lens


def choose_mih(t_mih: float | None, t_scan: float | None, call: int) -> bool:
    """Whether a search uses MIH, from the running seconds per query of each method (``None``:
    not measured yet). Unmeasured methods go first (MIH, then the scan); then the faster one,
    except that every ``_MIH_RETRY``-th call uses the other."""
    if t_mih is None:
        return True
    if t_scan is None:
        return False
    faster = t_mih <= t_scan
    return (not faster) if call % _MIH_RETRY == 0 else faster


def _chunk_count(nthreads: int, total: int, nq: int, cand: np.ndarray | None) -> int:
    """Threads a search of ``nq`` queries over ``total`` rows (``cand``: the candidates, or
    ``None`` for a range scanned in place) is split across."""
    nq = max(1, nq)
    if cand is None:
        min_chunk = max(_MIN_CHUNK, _MIN_SCAN_WORK // nq)
    elif total and int(cand[-1]) - int(cand[0]) < 2 * total:
        min_chunk = max(_MIN_RUN_CHUNK, _MIN_SCAN_WORK // nq)
    else:
        min_chunk = _MIN_GATHER_CHUNK
    return int(max(1, min(nthreads, total // min_chunk)))


def _search_positions(
    db: np.ndarray,
    queries: np.ndarray,
    k: int,
    bits: int,
    cand: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    rows: RowFilter | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k positions of ``queries`` ``(Q, W)`` in ``db`` ``(N, W)`` (same word dtype).

    Every row is a candidate, or only the rows ``cand`` (``(M,)`` int64, strictly increasing;
    gathered, so only they are read), or only the rows where ``mask`` (``(N,)`` bool) is True
    (the database is scanned and the mask read where a row could enter the top-k), or only
    the rows of ``rows`` (its range scanned, its tests applied as the mask is).

    Returns ``(dist (Q, kk) int32, pos (Q, kk) int64)``, ranked by (distance, position), where
    ``kk = min(k, number of candidates)``; requires ``1 <= k``.
    """
    kern = _kernel()
    n, w = db.shape
    nthreads = get_num_threads()
    first = 0 if rows is None else rows.lo
    total = (n if rows is None else rows.hi - rows.lo) if cand is None else cand.shape[0]
    nchunks = _chunk_count(nthreads, total, queries.shape[0], cand)
    bounds = [first * (cand is None) + total * c // nchunks for c in range(nchunks + 1)]
    row_bytes = max(1, w * db.itemsize)
    block = max(64, _BLOCK_BYTES // row_bytes)
    sub = max(16, _SUB_BYTES // row_bytes)
    cap = 2 * k + 16
    per_query = nchunks * cap * 10 + k * 12
    qb = max(1, _STATE_BYTES // per_query)
    flat = db.reshape(-1)
    tests = kernel_tests(mask=mask) if rows is None else rows.kernel_tests(mask)
    bufs = [np.empty(block * w, db.dtype) for _ in range(nchunks)] if cand is not None else []
    nq = queries.shape[0]
    dist = np.empty((nq, k), np.int32)
    pos = np.empty((nq, k), np.int64)
    filled = k
    for s in range(0, nq, qb):
        e = min(nq, s + qb)
        q = np.ascontiguousarray(queries[s:e]).reshape(-1)
        if not q.flags.writeable:  # one compiled variant: writeable arrays only
            q = q.copy()
        cd = np.empty((nchunks, e - s, cap), np.int16 if bits < 32767 else np.int32)
        cp = np.empty((nchunks, e - s, cap), np.int64)
        cn = np.zeros((nchunks, e - s), np.int64)
        shared = np.full((nchunks, e - s), bits + 1, np.int64)  # thresholds the chunks share

        def scan(
            c: int,
            q: np.ndarray = q,
            cd: np.ndarray = cd,
            cp: np.ndarray = cp,
            cn: np.ndarray = cn,
            shared: np.ndarray = shared,
        ) -> None:
            lo, hi = bounds[c], bounds[c + 1]
            if cand is None:
                kern.scan_chunk(flat, q, w, k, bits, lo, hi, block, sub, tests,
                                cd[c], cp[c], cn[c], shared, c)  # fmt: skip
                return
            bad = kern.gather_chunk(
                flat, q, w, k, bits, n, cand, lo, hi, block, sub, bufs[c], cd[c], cp[c], cn[c]
            )
            if bad >= 0:
                raise SearchError(
                    f"candidates must be strictly increasing row positions in 0..{n - 1}; "
                    f"entry {bad} is {cand[bad]}" + (f" after {cand[bad - 1]}" if bad > 0 else "")
                )

        if nchunks == 1:
            scan(0)
        else:  # the calling thread takes the first chunk: one thread less to wake and wait for
            futures = [_pool(nthreads).submit(scan, c) for c in range(1, nchunks)]
            try:
                scan(0)
            finally:  # never return while a chunk still runs
                wait(futures)
            for f in futures:
                f.result()
        # every query keeps min(k, candidates in the chunk) per chunk: the same count for all
        filled = min(k, int(cn[:, 0].sum())) if e > s else k
        kern.merge_chunks(cd, cp, cn, k, bits, dist[s:e], pos[s:e])
    return dist[:, :filled], pos[:, :filled]


# --------------------------------------------------------------------------------------------
# reference


def search_reference(
    codes: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slow, obvious exact top-k (numpy): byte popcount table, full lexsort by (distance, id).

    Args:
        codes: ``(N, B)`` uint8; ids: ``(N,)`` int64; queries: ``(Q, B)`` uint8; k >= 1.

    Returns:
        ``(dist, ids)``, both ``(Q, min(k, N))``: int32 distances ascending, int64 ids.
    """
    k = _check_k(k)
    codes = np.asarray(codes, np.uint8)
    ids = np.asarray(ids, np.int64)
    kk = min(k, codes.shape[0])
    nq = queries.shape[0]
    dist = np.empty((nq, kk), np.int32)
    out = np.empty((nq, kk), np.int64)
    for i in range(nq):
        d = _POPCOUNT8[np.bitwise_xor(codes, queries[i])].sum(axis=1, dtype=np.int32)
        order = np.lexsort((ids, d))[:kk]
        dist[i] = d[order]
        out[i] = ids[order]
    return dist, out


# --------------------------------------------------------------------------------------------
# candidates of a filtered search (the row filter itself: :mod:`duch_core.row_filter`)


_I64_MIN = int(np.iinfo(np.int64).min)
_I64_MAX = int(np.iinfo(np.int64).max)


def _kernel_column(a: np.ndarray | None, dtype: Any) -> np.ndarray:
    """A column as the kernel takes it (contiguous, ``dtype``, writeable: one compiled variant);
    no copy for a column already so, an empty array for none."""
    if a is None:
        return np.zeros(0, dtype)
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def kernel_tests(
    *,
    mask: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    class_ok: np.ndarray | None = None,
    times: np.ndarray | None = None,
    time_lo: int = _I64_MIN,
    time_hi: int = _I64_MAX,
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    wraps: np.ndarray | None = None,
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    zones: np.ndarray | None = None,
    zone_shift: int = 8,
    class_bits: np.ndarray | None = None,
) -> tuple[Any, ...]:
    """The row tests as the scan kernels take them (:func:`duch_core._search_kernel.test_rows`
    gives their meaning): a column left out is an empty array, a test not applied; none given
    is the unfiltered scan."""
    return (
        _kernel_column(mask, np.bool_),
        _kernel_column(classes, np.int32),
        _kernel_column(class_ok, np.bool_),
        _kernel_column(times, np.int64),
        np.int64(time_lo),
        np.int64(time_hi),
        *(_kernel_column(c, np.float64) for c in boxes or (None, None, None, None)),
        _kernel_column(wraps, np.bool_),
        np.asarray(box, np.float64),
        _kernel_column(zones, np.bool_),
        np.int64(zone_shift),
        _kernel_column(class_bits, np.uint64),
    )


def ascending_positions(rows: np.ndarray) -> np.ndarray:
    """Distinct non-negative ``rows`` in ascending order, as int64. Rows in order already are
    only checked; many rows out of order are sorted through a bitset
    (:func:`duch_core._search_kernel.ascending_rows`, linear), few by ``np.sort``."""
    rows = np.asarray(rows).astype(np.int64, copy=False)
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        return rows
    if int(rows.min()) < 0:
        raise SearchError("ascending_positions: negative rows")
    words = (int(rows.max()) >> 6) + 1
    if rows.size < _BITSET_SORT_MIN or words > _BITSET_SORT_WORDS * rows.size:
        return np.sort(rows)
    out = np.empty(rows.size, np.int64)
    m = _kernel().ascending_rows(rows, words << 6, np.zeros(words, np.uint64), out)
    if m != rows.size:
        raise SearchError(f"ascending_positions: {rows.size - m} rows repeat")
    return out


def _check_candidates(candidates: Any, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(positions, None)`` or ``(None, mask)`` from the ``candidates`` of a search.

    Positions are returned as int64 but not checked here (the gather kernel checks each as it
    reads it); use :func:`_check_positions` where no kernel runs.
    """
    a = np.asarray(candidates)
    if a.dtype == np.bool_:
        if a.shape != (n,):
            raise SearchError(
                f"a candidate mask must have shape ({n},) (one flag per row), got {a.shape}"
            )
        a = np.ascontiguousarray(a)
        return None, (a if a.flags.writeable else a.copy())  # one compiled kernel variant
    if a.ndim == 1 and a.size == 0:
        return np.zeros(0, np.int64), None
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise SearchError(
            "candidates must be a 1-D integer array of row positions or a bool mask of shape "
            f"({n},), got {a.dtype} {a.shape}"
        )
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and int(a.max()) >= n:
        raise SearchError(f"candidates must be row positions in 0..{n - 1}, got {int(a.max())}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    return a if a.flags.writeable else a.copy(), None


def _check_positions(cand: np.ndarray, n: int) -> None:
    """Raise unless ``cand`` is strictly increasing within ``0:n`` (numpy; no kernel)."""
    if cand.size and (cand[0] < 0 or cand[-1] >= n or bool(np.any(cand[1:] <= cand[:-1]))):
        raise SearchError(f"candidates must be strictly increasing row positions in 0..{n - 1}")


def _mask_gathers(fraction: float, nq: int) -> bool:
    """Whether a mask keeping ``fraction`` of the rows is searched faster for ``nq`` queries
    by converting it to positions and gathering (else by the masked scan)."""
    if fraction < _MASK_GATHER_FRACTION:
        return True
    return nq * (1.0 - fraction) > _NONZERO_COST + _GATHER_COST * fraction


def _filter_gathers(
    fraction: float, nq: int, zone_fraction: float = 1.0, by_class: bool = False
) -> bool:
    """Whether a :class:`~duch_core.row_filter.RowFilter` keeping ``fraction`` of its rows, ``zone_fraction`` of them
    in zones it marks, is searched faster for ``nq`` queries by turning it into positions
    first (a pass over the marked rows' columns, about :data:`_FILTER_ROWS_COST` scans of
    them, or, ``by_class``, the class row lists put in order, about :data:`_CLASS_ROWS_COST`)
    and gathering them (about :data:`_GATHER_PER_ROW` scans per query and kept share) than by
    testing rows in the scan (about one scan of the marked rows per query)."""
    if fraction < _MASK_GATHER_FRACTION * zone_fraction:  # sparse in what is scanned
        return True
    cost = _CLASS_ROWS_COST if by_class else _FILTER_ROWS_COST * zone_fraction
    return nq * (zone_fraction - _GATHER_PER_ROW * fraction) > cost


def _mask_fraction(mask: np.ndarray) -> float:
    """Fraction of True in ``mask``: exact for small masks, else from evenly spread runs."""
    n = mask.shape[0]
    if n <= 4 * _MASK_SAMPLES * _MASK_RUN:
        return np.count_nonzero(mask) / max(n, 1)
    step = (n - _MASK_RUN) // (_MASK_SAMPLES - 1)
    runs = np.lib.stride_tricks.as_strided(
        mask, shape=(_MASK_SAMPLES, _MASK_RUN), strides=(step, 1), writeable=False
    )  # a view: run i starts at row i * step
    return np.count_nonzero(runs) / runs.size


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard ``(dist, ids)`` top-k lists, each ``(Q, k_i)``.

    Returns:
        The global top-``k`` ``(dist, ids)``, ``(Q, min(k, sum k_i))`` int32 / int64, ranked by
        (distance, id).
    """
    k = _check_k(k)
    if not parts:
        raise SearchError("merge_topk needs at least one part")
    ds = [np.asarray(p[0]) for p in parts]
    ids_ = [np.asarray(p[1]) for p in parts]
    nq = ds[0].shape[0] if ds[0].ndim == 2 else -1
    for i, (d, j) in enumerate(zip(ds, ids_, strict=True)):
        if d.ndim != 2 or d.shape[0] != nq or d.shape != j.shape:
            raise SearchError(
                f"merge_topk part {i}: dist {d.shape} and ids {j.shape} must both be (Q, k_i) "
                f"with the same Q as part 0 ({nq})"
            )
    dist = np.concatenate([d.astype(np.int32, copy=False) for d in ds], axis=1)
    ids = np.concatenate([j.astype(np.int64, copy=False) for j in ids_], axis=1)
    kk = min(k, dist.shape[1])
    order = np.lexsort((ids, dist), axis=-1)[:, :kk]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
