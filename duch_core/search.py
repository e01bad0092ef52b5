"""Exact Hamming top-k search over packed hash codes.

Ranking: ascending Hamming distance, ties broken by ascending item id, so results are
deterministic whatever the insertion order or sharding. The index class, its files and
:func:`warmup` live here; the kernel driver is :mod:`duch_core.hamming_topk`.

Multi-index hashing (Norouzi, Punjani and Fleet), opt-in with :meth:`HammingIndex.enable_mih`
(:mod:`duch_core._mih_kernel`): ``m`` tables index every code by one of ``m`` substrings of about
``log2 N`` bits (:func:`~duch_core.hamming_topk.mih_layout`); a query probes buckets at growing substring radius and stops as soon as the pigeonhole bound
proves its top-k exact. It examines a small fraction of the database when neighbours are near,
as with a trained model's codes, and gives up for queries that would examine more than
``N / 64`` candidates, which the scan then answers. The index times both methods and uses the
faster one for each batch size. Results are the same either way.

Filtered search (``candidates`` of :meth:`HammingIndex.search`) ranks only the rows that pass a
metadata filter, exactly. Sorted candidate positions are taken run by run: a run of consecutive
rows (a filter on place or time keeps whole scenes, whose chips are consecutive rows) is scanned
where it lies; scattered rows are gathered into a small buffer (the codes a few candidates ahead
are prefetched, so cache misses overlap) and scanned as in :mod:`duch_core.hamming_topk`. A bool
mask, or a :class:`~duch_core.row_filter.RowFilter` (a row range and tests on metadata
columns), is applied inside the scan, only to a row close enough to enter the top-k; a row
filter's categorical tests come as a bitmap of the passing rows, read with the codes of the
pieces scanned row by row, so that a row of another class is never looked up alone
(:mod:`duch_core.row_bits`). The cost of positions follows the number of candidates; that of a
mask or row filter the size of the scanned range (a row filter builds in microseconds, where a
mask over 10M rows takes milliseconds); see :data:`~duch_core.hamming_topk.DENSE_FRACTION`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from duch_core.codes import check_bits
from duch_core.hamming_topk import (
    _BITSET_SORT_MIN,
    SearchError,
    _as_words,
    _check_candidates,
    _check_codes,
    _check_k,
    _check_positions,
    _filter_gathers,
    _mask_fraction,
    _mask_gathers,
    _mih_kernel,
    _pool,
    _search_positions,
    ascending_positions,
    choose_mih,
    get_num_threads,
    mih_layout,
    search_reference,
)
from duch_core.row_filter import RowFilter

__all__ = ["HammingIndex", "warmup"]

FORMAT_VERSION = 2
_META_NAME = "index.json"
_CODES_NAME = "codes.npy"
_IDS_NAME = "ids.npy"

# multi-index hashing: a query gives up (and is answered by the scan) after examining this many
# buckets and candidates, at least _MIH_MIN_BUDGET; a candidate costs about as much as scanning
# a hundred codes, since it is a random access
_MIH_BUDGET_DIV = 64
_MIH_MIN_BUDGET = 4096


_WARM: set[int] = set()  # code lengths whose kernels this process has compiled or loaded


def warmup(bits: int) -> None:
    """Compile (or load from the on-disk cache) every kernel a search of ``bits``-bit codes can
    call: the scan, the gather, the masked scan and the row-filter variants. Compiling them
    takes about 10 s on 2 cores without the cache (a server does it before it takes requests,
    not on the first filtered query); a second call in the same process returns at once."""
    nb = check_bits(bits) // 8
    if bits in _WARM:
        return
    idx = HammingIndex.from_arrays(np.zeros((2, nb), np.uint8), None, bits)
    q = np.zeros((1, nb), np.uint8)
    idx.search(q, 1)
    idx.search(q, 1, candidates=np.array([1]))  # the gather kernel
    idx.search(q, 1, candidates=np.ones(2, np.bool_))  # the masked scan
    # the row tests in the scan and in a pass over the rows
    classes = np.zeros(2, np.int32)
    tests = RowFilter(0, 2, classes=classes, class_ok=np.ones(1, np.bool_))
    idx.search(q, 1, candidates=tests)
    tests.positions()
    ascending_positions(np.arange(_BITSET_SORT_MIN, 0, -1))  # rows put in order by a bitset
    _WARM.add(bits)


def _read_id_file(path: Path) -> tuple[np.dtype, tuple[int, ...], bool, bool, int]:
    """``(dtype, shape, sorted, contiguous, first)`` of an ``ids.npy``, read in pieces through
    the file rather than a mapping, so checking it leaves nothing resident."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype != np.int64 or len(shape) != 1 or fortran:
            return dtype, shape, False, False, 0
        left = shape[0]
        ok, contiguous, first, last = True, True, 0, None
        while left:
            part = np.fromfile(f, np.int64, count=min(left, 1 << 20))
            if part.size == 0:
                raise SearchError(f"{path}: file ends before its {shape[0]} ids")
            left -= part.size
            if last is None:
                first = int(part[0])
            else:
                part = np.concatenate([[last], part])
            step = np.diff(part)
            ok = ok and bool(np.all(step >= 0))
            contiguous = contiguous and bool(np.all(step == 1))
            last = int(part[-1])
        return dtype, shape, ok, contiguous and ok, first


# --------------------------------------------------------------------------------------------
# index


class HammingIndex:
    """Exact Hamming index over ``bits``-bit packed codes.

    Memory: the ``(N, bits // 8)`` uint8 codes, kept sorted by id (an :meth:`add` with ids
    below the current maximum re-sorts once). Ids that are row positions (the default,
    ``ids=None``) or any contiguous range ``base .. base + N - 1`` cost nothing: an id is
    ``base + position``. Other ids are an ``(N,)`` int64 array, held in memory, or, in an
    index loaded with ``mmap=True``, mapped from its file and read only for the rows a search
    returns. A loaded index may map its codes read-only (:meth:`load`); adding to it copies
    into memory.

    Filtered search (:meth:`search` with ``candidates``) ranks only the rows that pass a filter
    (:mod:`duch_core.filters` builds them from item metadata); a row position is the row's rank
    in id order, which :meth:`positions_of` gives for ids.
    """

    def __init__(self, bits: int) -> None:
        try:
            check_bits(bits)
        except Exception as e:
            raise SearchError(str(e)) from e
        self.bits = int(bits)
        self._nbytes = self.bits // 8
        self._codes = np.zeros((0, self._nbytes), np.uint8)
        # None: the id of a row is _id_base + its position
        self._ids: np.ndarray | None = None
        self._id_base = 0
        # (codes, ids or None for running positions, ntotal when added)
        self._pending: list[tuple[np.ndarray, np.ndarray | None, int]] = []
        self._npending = 0
        self._mih_on = False
        # (starts, lens, offsets, items), built from the codes on first use
        self._mih_tables: tuple[np.ndarray, ...] | None = None
        # running seconds per query of MIH (with its fallbacks) and of the scan, by batch size
        # and k
        self._mih_time: dict[tuple[int, int], list[float | None]] = {}
        self._mih_calls = 0
        # queries searched, calls that tried MIH, queries MIH finished, queries scanned
        self.mih_stats = {"queries": 0, "mih_calls": 0, "mih_finished": 0, "scanned": 0}

    @property
    def ntotal(self) -> int:
        return int(self._codes.shape[0]) + self._npending

    @property
    def nbytes(self) -> int:
        """Bytes the index holds for its rows: the codes (mapped or in memory), plus 8 per row
        for ids held in memory. Positional or contiguous ids take none; ids mapped from a file
        by :meth:`load` are not counted, since a search reads only the returned rows' ids."""
        self._consolidate()
        ids = self._ids
        held = 0 if ids is None or isinstance(ids, np.memmap) else ids.nbytes
        return int(self._codes.nbytes + held)

    @property
    def ids_are_positions(self) -> bool:
        """True when ids are ``base + position`` and no id array is held."""
        self._consolidate()
        return self._ids is None

    @classmethod
    def from_arrays(cls, codes: np.ndarray, ids: np.ndarray | None, bits: int) -> HammingIndex:
        """An index over ``(N, bits // 8)`` uint8 ``codes`` with ``(N,)`` integer ``ids``
        (``None``: ids are row positions ``0 .. N - 1`` and no id array is kept)."""
        idx = cls(bits)
        idx.add(codes, ids)
        return idx

    @classmethod
    def from_shards(
        cls, manifest: Any, modality: str, shards: Sequence[int] | None = None
    ) -> HammingIndex:
        """An index over one modality of some (``None``: all) shards of an index version.

        Ids are the global row ids of :func:`duch_core.index_store.load_codes`.
        """
        from duch_core.index_store import load_codes

        codes, _, _, rows = load_codes(manifest, modality, shards)
        return cls.from_arrays(codes, rows, int(manifest.bits))

    def add(self, codes: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append ``(n, bits // 8)`` uint8 codes with ``(n,)`` integer ``ids``.

        ``ids`` default to running positions ``ntotal .. ntotal + n - 1``.
        """
        codes = _check_codes(codes, self.bits, "codes")
        n = codes.shape[0]
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (n,):
                raise SearchError(f"ids must have shape ({n},), got {ids.shape}")
            if n and ids.dtype.kind not in "iu":
                raise SearchError(f"ids must be integers, got dtype {ids.dtype}")
            ids = ids.astype(np.int64)
        if n == 0:
            return
        self._pending.append((codes.copy(), ids, self.ntotal))
        self._npending += n

    def _id_array(self) -> np.ndarray:
        """The ``(N,)`` int64 ids of the consolidated rows (materialised when positional)."""
        if self._ids is None:
            return np.arange(self._id_base, self._id_base + self._codes.shape[0], dtype=np.int64)
        return np.asarray(self._ids)

    def _set_ids(self, ids: np.ndarray | None) -> None:
        """Keep ``ids`` (sorted), or only their first value when they are contiguous."""
        if ids is not None and (
            ids.size == 0
            or (int(ids[-1]) - int(ids[0]) == ids.size - 1 and bool(np.all(np.diff(ids) == 1)))
        ):
            self._id_base = int(ids[0]) if ids.size else 0
            ids = None
        elif ids is None:
            self._id_base = 0
        self._ids = ids

    def _consolidate(self) -> None:
        if not self._pending:
            return
        pending = self._pending
        if self._codes.shape[0] == 0 and len(pending) == 1:
            codes = pending[0][0]  # already a private copy
        else:
            codes = np.concatenate([self._codes, *(c for c, _, _ in pending)])
        positional = self._ids is None and self._id_base == 0
        if positional and all(i is None for _, i, _ in pending):
            ids = None
        else:
            ids = np.concatenate(
                [self._id_array()]
                + [
                    i if i is not None else np.arange(at, at + c.shape[0], dtype=np.int64)
                    for c, i, at in pending
                ]
            )
            if ids.size > 1 and bool(np.any(ids[1:] < ids[:-1])):
                order = np.argsort(ids, kind="stable")
                codes = codes[order]
                ids = ids[order]
        self._pending = []
        self._npending = 0
        self._mih_tables = None  # rebuilt on the next search that uses them
        self._codes = codes
        self._set_ids(ids)

    def _resolve(self, pos: np.ndarray) -> np.ndarray:
        """Ids of the rows at positions ``pos`` (any shape, int64)."""
        if self._ids is None:
            return pos + self._id_base if self._id_base else pos
        return np.asarray(self._ids[pos])

    def positions_of(self, ids: Any) -> np.ndarray:
        """Row positions (int64, same shape) of the rows with these ``ids``; sorted ids give
        sorted positions, as :meth:`search`'s ``candidates`` need.

        Raises:
            SearchError: an id is not in the index.
        """
        self._consolidate()
        a = np.asarray(ids)
        if a.size and a.dtype.kind not in "iu":
            raise SearchError(f"ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
        n = self._codes.shape[0]
        if self._ids is None:
            pos = a - self._id_base
            bad = (pos < 0) | (pos >= n)
        else:
            pos = np.searchsorted(self._ids, a)
            bad = pos >= n
            inside = ~bad
            bad[inside] = np.asarray(self._ids[pos[inside]]) != a[inside]
        if bool(np.any(bad)):
            raise SearchError(f"id {int(a[bad].flat[0])} is not in the index")
        return pos.astype(np.int64, copy=False)

    def codes_at(self, positions: Any) -> np.ndarray:
        """The packed codes ``(len(positions), bits // 8)`` uint8 of the rows at ``positions``
        (ranks in id order, see :meth:`positions_of`).

        Raises:
            SearchError: a position outside ``0 .. ntotal - 1``.
        """
        self._consolidate()
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = self._codes.shape[0]
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise SearchError(f"positions must be in 0 .. {n - 1}")
        return np.array(self._codes[pos], dtype=np.uint8)

    def enable_mih(self, on: bool = True) -> None:
        """Use multi-index hashing (Norouzi et al.) where it is faster than the scan.

        MIH finds the top-k of a query by probing substring tables at growing radius, exactly, and is much faster when the k-th neighbour is near (codes of a trained model
        cluster). A query for which it would examine more than ``N / 64`` buckets and candidates
        gives up and is answered by the scan. Each search uses whichever method has been faster
        per query so far for its ``k`` and batch size (1, up to 63, 64 and more), and the other
        one every 16th call. Results are identical either way.

        Memory: ``m`` tables (:func:`mih_layout`: substrings of about ``log2 N`` bits) of ``N``
        int32 positions plus ``2**len + 1`` int32 offsets each (:attr:`mih_nbytes`), built on
        the first search after enabling or after an :meth:`add`.
        """
        self._mih_on = bool(on)
        if not on:
            self._mih_tables = None

    @property
    def mih_nbytes(self) -> int:
        """Bytes held by the MIH tables (0 when off or not built yet)."""
        if self._mih_tables is None:
            return 0
        return int(sum(a.nbytes for a in self._mih_tables[2:]))

    def _mih(self) -> tuple[np.ndarray, ...]:
        """``(starts, lens, offsets, items)`` of the MIH tables, built on first use."""
        if self._mih_tables is None:
            n = self._codes.shape[0]
            starts, lens = mih_layout(self.bits, n)
            odt = np.int32 if n < 2**31 - 1 else np.int64
            offsets = np.empty((len(lens), (1 << int(lens.max())) + 1), odt)
            items = np.empty((len(lens), n), np.int32)
            _mih_kernel().build_tables(np.asarray(self._codes), starts, lens, offsets, items)
            self._mih_tables = (starts, lens, offsets, items)
            self._mih_time = {}
        return self._mih_tables

    def _mih_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MIH top-k positions of ``queries`` ``(Q, bits // 8)`` uint8: ``(dist, pos, done)``;
        rows where ``done`` is False gave up and hold nothing."""
        starts, lens, offsets, items = self._mih()
        kern = _mih_kernel()
        codes = np.asarray(self._codes)  # a plain array view of a mapped file
        nq = queries.shape[0]
        q = queries if queries.flags.writeable else queries.copy()  # one compiled variant
        dist = np.zeros((nq, k), np.int32)
        pos = np.zeros((nq, k), np.int64)
        done = np.zeros(nq, np.bool_)
        budget = max(_MIH_MIN_BUDGET, self._codes.shape[0] // _MIH_BUDGET_DIV)
        nthreads = int(max(1, min(get_num_threads(), nq // 8)))
        bounds = np.linspace(0, nq, nthreads + 1).astype(np.int64)

        def run(c: int) -> None:
            kern.search_range(
                codes, starts, lens, offsets, items, q,
                bounds[c], bounds[c + 1], k, budget, dist, pos, done,
            )  # fmt: skip

        if nthreads == 1:
            run(0)
        else:
            for f in [_pool(nthreads).submit(run, c) for c in range(nthreads)]:
                f.result()
        return dist, pos, done

    def search(
        self, queries: np.ndarray, k: int, candidates: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of each query, among every row or only among ``candidates``.

        Unfiltered, by MIH where enabled and faster (see :meth:`enable_mih`), otherwise by the
        blocked scan. Filtered, by one of two kernels, both exact:

        * sorted positions: only the candidates' codes are read (runs of consecutive rows in
          place, scattered rows gathered block by block, both scanned like the database); the
          cost follows the number of candidates, and is lowest when they come in runs;
        * a bool mask: the database is scanned and the mask read only where a row could enter
          the top-k, so the cost is about that of an unfiltered scan. A mask keeping under
          5 % of the rows, or searched by a batch large enough to repay the conversion, is
          turned into positions first.

        :data:`DENSE_FRACTION` is where the two forms cost the same for a single query once
        both exist; :func:`duch_core.filters.build_candidates` gives positions when an index
        yields them and the mask otherwise (converting it would cost more than the search).

        Args:
            queries: ``(Q, bits // 8)`` uint8 packed codes.
            k: positive int.
            candidates: ``None`` (every row), ``(M,)`` integer row positions, strictly
                increasing, in ``0 .. ntotal - 1`` (positions are ranks in id order, see
                :meth:`positions_of`), an ``(ntotal,)`` bool mask, or a
                :class:`~duch_core.row_filter.RowFilter` (a row range and tests applied in
                the scan, as the mask is; turned into positions first when it keeps few rows
                or the batch is large). One set for the batch.

        Returns:
            ``(dist, ids)``, both ``(Q, min(k, C))`` where ``C`` is the number of candidates
            (``ntotal`` without a filter): int32 distances ascending, int64 ids ascending
            within equal distances. Nothing is padded: with fewer than ``k`` candidates every
            one of them is returned, and every query has the same number of results.

        Raises:
            SearchError: bad queries, ``k`` or ``candidates`` (positions out of range,
                unsorted or repeated; a mask of the wrong length).
        """
        queries = _check_codes(queries, self.bits, "queries")
        k = _check_k(k)
        if candidates is not None:
            self._consolidate()
            return self._search_filtered(queries, k, candidates)
        k = min(k, self.ntotal)
        nq = queries.shape[0]
        if k == 0 or nq == 0:
            return np.zeros((nq, k), np.int32), np.zeros((nq, k), np.int64)
        self._consolidate()
        self.mih_stats["queries"] += nq
        if self._mih_on:
            dist, pos = self._search_choosing(queries, k)
        else:
            self.mih_stats["scanned"] += nq
            dist, pos = self._scan(queries, k)
        return dist, self._resolve(pos)

    def _search_filtered(
        self, queries: np.ndarray, k: int, candidates: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        n = self._codes.shape[0]
        nq = queries.shape[0]
        rows = None
        if isinstance(candidates, RowFilter):
            candidates.check(n)
            cand, mask = None, None
            rows = candidates
            span = rows.hi - rows.lo
            if not rows.tested or span == 0:
                k = min(k, span)
            elif nq == 0 or (
                span and _filter_gathers(rows.fraction, nq, rows.zone_fraction, rows.by_class)
            ):
                cand, rows = rows.positions(), None
        else:
            cand, mask = _check_candidates(candidates, n)
        if mask is not None and nq and _mask_gathers(_mask_fraction(mask), nq):
            cand, mask = np.flatnonzero(mask), None
        if cand is not None:
            k = min(k, cand.shape[0])
        elif nq == 0 and mask is not None:
            k = min(k, int(np.count_nonzero(mask)))
        if k == 0 or nq == 0:
            if cand is not None:
                _check_positions(cand, n)  # no kernel runs to check them
            return np.zeros((nq, k), np.int32), np.zeros((nq, k), np.int64)
        self.mih_stats["queries"] += nq
        self.mih_stats["scanned"] += nq
        db = _as_words(self._codes, self._nbytes)
        q = _as_words(queries, self._nbytes)
        dist, pos = _search_positions(db, q, k, self.bits, cand=cand, mask=mask, rows=rows)
        return dist, self._resolve(pos)

    def _scan(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k positions of ``queries`` by the blocked scan."""
        db = _as_words(self._codes, self._nbytes)
        return _search_positions(db, _as_words(queries, self._nbytes), k, self.bits)

    def _search_choosing(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k positions by MIH or the scan, whichever has been faster for this batch size and
        ``k`` (:func:`choose_mih`), timing the one used."""
        nq = queries.shape[0]
        self._mih_calls += 1
        times = self._mih_time.setdefault((0 if nq == 1 else 1 if nq < 64 else 2, k), [None, None])
        use_mih = choose_mih(times[0], times[1], self._mih_calls)
        t0 = time.perf_counter()
        if use_mih:
            dist, pos, done = self._mih_search(queries, k)
            rest = np.flatnonzero(~done)
            if rest.size:  # the queries MIH gave up on
                dist[rest], pos[rest] = self._scan(np.ascontiguousarray(queries[rest]), k)
            self.mih_stats["mih_calls"] += 1
            self.mih_stats["mih_finished"] += nq - int(rest.size)
            self.mih_stats["scanned"] += int(rest.size)
        else:
            dist, pos = self._scan(queries, k)
            self.mih_stats["scanned"] += nq
        per_query = (time.perf_counter() - t0) / nq
        slot = 0 if use_mih else 1
        old = times[slot]
        times[slot] = per_query if old is None else 0.7 * old + 0.3 * per_query
        return dist, pos

    def reference_search(
        self, queries: np.ndarray, k: int, candidates: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` by :func:`search_reference` over the candidate rows (slow; for tests
        and benchmarks)."""
        queries = _check_codes(queries, self.bits, "queries")
        k = _check_k(k)
        self._consolidate()
        codes, ids = self._codes, self._id_array()
        if isinstance(candidates, RowFilter):
            candidates.check(codes.shape[0])
            rows = candidates.positions()
            codes, ids = codes[rows], ids[rows]
        elif candidates is not None:
            cand, mask = _check_candidates(candidates, codes.shape[0])
            picked = np.flatnonzero(mask) if mask is not None else cand
            if picked is not None:
                _check_positions(picked, codes.shape[0])
                codes, ids = codes[picked], ids[picked]
        return search_reference(codes, ids, queries, k)

    # ----------------------------------------------------------------------------------------
    # files

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index into directory ``path`` (created if needed).

        Files: ``codes.npy`` ``(N, bits // 8)`` uint8; ``ids.npy`` ``(N,)`` int64 (sorted),
        only when ids are neither positions nor a contiguous range; and ``index.json`` (written
        last) with bits, count, format version and ``ids``: ``"positions"`` (an id is
        ``id_base + position``) or ``"file"``.
        """
        self._consolidate()
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        np.save(root / _CODES_NAME, np.ascontiguousarray(self._codes))
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "bits": self.bits,
            "ntotal": self.ntotal,
        }
        if self._ids is None:
            meta.update(ids="positions", id_base=self._id_base)
        else:
            np.save(root / _IDS_NAME, np.ascontiguousarray(self._ids))
            meta.update(ids="file")
        tmp = root / (_META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(root / _META_NAME)

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = True) -> HammingIndex:
        """Read an index written by :meth:`save`; ``mmap=True`` maps the files (never written).

        With ``mmap=True`` an id file stays on disk, mapped, and a search reads only the ids of
        the rows it returns (the file is checked by reading it through, not by mapping it).

        Raises:
            FileNotFoundError: no index at ``path``.
            SearchError: the files do not form a valid index.
        """
        root = Path(path)
        meta_path = root / _META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no search index at {root} (missing {_META_NAME})")
        try:
            meta = json.loads(meta_path.read_text())
            bits = int(meta["bits"])
            ntotal = int(meta["ntotal"])
            fmt = int(meta.get("format_version", FORMAT_VERSION))
            id_kind = str(meta.get("ids", "file"))  # format 1 always wrote ids.npy
            id_base = int(meta.get("id_base", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise SearchError(f"{meta_path}: not a valid search index manifest ({e!r})") from e
        if fmt > FORMAT_VERSION:
            raise SearchError(f"{meta_path}: format_version {fmt} is newer than {FORMAT_VERSION}")
        if id_kind not in ("positions", "file"):
            raise SearchError(f"{meta_path}: ids must be 'positions' or 'file', got {id_kind!r}")
        ids_path = root / _IDS_NAME
        try:
            # copy-on-write mapping: never written, but typed like an in-memory array, so
            # the kernel compiled for in-memory codes serves it (no read-only variant)
            codes = np.load(root / _CODES_NAME, mmap_mode="c" if mmap else None, allow_pickle=False)
            ids: np.ndarray | None = None
            ok = True  # the id file is sorted (checked here when mapped)
            if id_kind == "file":
                if mmap:
                    dtype, shape, ok, contiguous, first = _read_id_file(ids_path)
                    if contiguous:
                        id_kind, id_base = "positions", first
                    else:
                        ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
                else:
                    ids = np.load(ids_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SearchError(f"{root}: unreadable index arrays ({e})") from e
        idx = cls(bits)
        if codes.dtype != np.uint8 or codes.shape != (ntotal, bits // 8):
            raise SearchError(
                f"{root}: codes are {codes.dtype} {codes.shape}, expected uint8 "
                f"({ntotal}, {bits // 8})"
            )
        if ids is not None:
            if ids.dtype != np.int64 or ids.shape != (ntotal,):
                raise SearchError(
                    f"{root}: ids are {ids.dtype} {ids.shape}, expected int64 ({ntotal},)"
                )
            if not mmap:
                ok = ntotal < 2 or not bool(np.any(ids[1:] < ids[:-1]))
            if not ok:
                raise SearchError(f"{root}: ids are not sorted; the file was not written by save()")
        idx._codes = codes
        if ids is None:
            idx._ids, idx._id_base = None, id_base
        elif mmap:
            idx._ids = ids  # kept mapped (contiguous files were turned into a base above)
        else:
            idx._set_ids(ids)
        return idx
