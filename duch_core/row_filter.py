"""Row filters: the candidates of a filtered search given as a row range and tests on metadata
columns, applied inside the scan (:class:`RowFilter`).

:func:`duch_core.filters.build_candidates` makes them from a request's filter;
:meth:`duch_core.search.HammingIndex.search` takes them as its ``candidates``, and searches
them in the scan or turns them into positions first (:meth:`RowFilter.positions`), whichever
costs less (:func:`duch_core.hamming_topk._filter_gathers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from duch_core import hamming_topk as H
from duch_core.hamming_topk import _I64_MAX, _I64_MIN, SearchError, ascending_positions

__all__ = ["RowFilter"]


@dataclass(frozen=True)
class RowFilter:
    """Candidates of a filtered search given as the rows ``lo:hi`` that pass tests evaluated
    inside the scan, row by row, only where a row is close enough to enter the top-k.

    It costs nothing to build: no mask or position list over the database is made, so a filter
    that keeps many rows is searched at about the cost of an unfiltered scan of its range, and a
    range alone (the rows of one time span in an index in time order) is scanned where it lies.
    :func:`duch_core.filters.build_candidates` makes them; the semantics of each test are those
    of :func:`duch_core._search_kernel.test_rows`.

    Attributes:
        lo, hi: the rows scanned, ``0 <= lo <= hi <= N``.
        fraction: an upper bound on the share of the rows ``lo:hi`` that pass (1.0 when
            unknown); the search turns the filter into positions first when that is cheaper
            (few rows pass, or a batch large enough repays it).
        classes, class_ok: ``(N,)`` int32 row classes (-1: none) and ``(C,)`` bool, the classes
            that pass; a class outside ``0 .. C - 1`` never passes.
        times, time_lo, time_hi: ``(N,)`` int64 and inclusive bounds.
        boxes: ``(min_lon, min_lat, max_lon, max_lat)``, ``(N,)`` float64 each (NaN: unknown,
            never passes); ``wraps``: ``(N,)`` bool, rows across the antimeridian (None: none
            are); ``box``: the query box ``(w, s, e, n)``, crossing the antimeridian when
            ``w > e``.
        zones, zone_shift: ``(Z,)`` bool, one per zone of ``2**zone_shift`` rows
            (``Z = ceil(N / 2**zone_shift)``): the zones that may hold a row that passes
            (:meth:`duch_core.zone_maps.ZoneMaps.passing`); the scan passes over the others
            unread. ``None``: every zone may. A row in a zone left out must fail the tests.
        zone_fraction: the share of the rows ``lo:hi`` in marked zones (1.0 without zones):
            about the share of an unfiltered scan that the filtered scan costs.
        class_rows: ``(rows, starts)``: the rows grouped by class, ascending within a class,
            class ``c``'s being ``rows[starts[c]:starts[c + 1]]``
            (:attr:`duch_core.item_metadata.ItemMetadata.class_rows`). A filter whose only
            test is the class then finds its rows without a pass over the range.
        class_bits: ``(ceil(N / 64),)`` uint64, the rows whose class passes as a bitmap (row
            ``j`` is bit ``j % 64`` of word ``j // 64``, :mod:`duch_core.row_bits`); it must
            agree with ``class_ok[classes]``, which it stands in for in the kernels: the scan
            reads a row's bit with its code, so a row of another class is never tested alone.
    """

    lo: int
    hi: int
    fraction: float = 1.0
    classes: np.ndarray | None = None
    class_ok: np.ndarray | None = None
    times: np.ndarray | None = None
    time_lo: int = _I64_MIN
    time_hi: int = _I64_MAX
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    wraps: np.ndarray | None = None
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    zones: np.ndarray | None = None
    zone_shift: int = 8
    zone_fraction: float = 1.0
    class_rows: tuple[np.ndarray, np.ndarray] | None = None
    class_bits: np.ndarray | None = None

    @property
    def tested(self) -> bool:
        """Whether any test applies (else every row of the range passes)."""
        return self.classes is not None or self.times is not None or self.boxes is not None

    def check(self, n: int) -> None:
        """Raise :class:`SearchError` unless the range and every column fit ``n`` rows."""
        if not 0 <= self.lo <= self.hi <= n:
            raise SearchError(f"a row filter's range must lie in 0..{n}, got {self.lo}:{self.hi}")
        if (self.classes is None) != (self.class_ok is None):
            raise SearchError("a row filter gives classes and class_ok together")
        cols = {"classes": self.classes, "times": self.times, "wraps": self.wraps}
        for i, c in enumerate(self.boxes or ()):
            cols[f"boxes[{i}]"] = c
        if self.wraps is not None and self.boxes is None:
            raise SearchError("a row filter gives wraps only with boxes")
        for name, col in cols.items():
            if col is not None and np.shape(col) != (n,):
                raise SearchError(f"row filter column {name} must have shape ({n},)")
        if self.class_rows is not None:
            rows, starts = self.class_rows
            if self.class_ok is None or np.shape(rows) != (n,) or np.ndim(starts) != 1:
                raise SearchError(
                    f"row filter class_rows must be ({n},) rows and their class starts, "
                    "with classes and class_ok"
                )
            if len(starts) < 1 or starts[0] != 0 or starts[-1] != n:
                raise SearchError(f"row filter class starts must run from 0 to {n}")
        if self.class_bits is not None:
            words = (n + 63) // 64
            if self.class_ok is None or np.shape(self.class_bits) != (words,):
                raise SearchError(
                    f"row filter class_bits must be a ({words},) bitmap, with classes and class_ok"
                )
        if self.zones is not None:
            if not self.tested:
                raise SearchError("a row filter gives zones only with a test")
            if not 0 <= self.zone_shift < 63:
                raise SearchError(f"a row filter's zone_shift must be 0..62, not {self.zone_shift}")
            z = (n + (1 << self.zone_shift) - 1) >> self.zone_shift
            if np.shape(self.zones) != (z,):
                raise SearchError(f"row filter zones must have shape ({z},) for {n} rows")

    def _class_positions(self) -> np.ndarray:
        assert self.class_rows is not None and self.class_ok is not None
        rows, starts = self.class_rows
        ok = np.flatnonzero(np.asarray(self.class_ok)[: max(0, len(starts) - 1)])
        parts = [rows[starts[c] : starts[c + 1]] for c in ok.tolist()]
        if (self.lo, self.hi) != (0, rows.shape[0]):  # each part ascends: cut it to the range
            parts = [
                p[int(np.searchsorted(p, self.lo)) : int(np.searchsorted(p, self.hi))]
                for p in parts
            ]
        parts = [p for p in parts if p.size]
        if not parts:
            return np.zeros(0, np.int64)
        if len(parts) == 1:
            return parts[0].astype(np.int64)
        return ascending_positions(np.concatenate(parts))

    def kernel_tests(self, mask: np.ndarray | None = None) -> tuple[Any, ...]:
        """The tests as the scan kernels take them (:func:`~duch_core.hamming_topk.kernel_tests`),
        with ``mask`` (``(N,)`` bool) as one more test."""
        by_bits = self.class_bits is not None  # the bitmap stands in for the class column
        return H.kernel_tests(
            mask=mask,
            classes=None if by_bits else self.classes,
            class_ok=self.class_ok,
            times=self.times,
            time_lo=self.time_lo,
            time_hi=self.time_hi,
            boxes=self.boxes,
            wraps=self.wraps,
            box=self.box,
            zones=self.zones,
            zone_shift=self.zone_shift,
            class_bits=self.class_bits,
        )

    @property
    def by_class(self) -> bool:
        """Whether :meth:`positions` takes the rows from :attr:`class_rows` (the class is the
        only test) rather than from a pass over the range."""
        return self.class_rows is not None and self.times is None and self.boxes is None

    def positions(self) -> np.ndarray:
        """``(M,)`` int64, ascending: the rows that pass (from the class row lists, or a pass
        over the range)."""
        if not self.tested:
            return np.arange(self.lo, self.hi, dtype=np.int64)
        if self.by_class:
            return self._class_positions()
        out = np.empty(self.hi - self.lo, np.int64)
        tests, kern = self.kernel_tests(), H._kernel()
        threads = min(H.get_num_threads(), (self.hi - self.lo) // H._MIN_CHUNK)
        if threads <= 1:
            m = kern.filter_rows(self.lo, self.hi, tests, out)
            return out[:m].copy() if m < out.shape[0] // 2 else out[:m]
        # one piece of the range per thread, each written to its own part of ``out``; then the
        # parts close up. Pieces after the first start on a zone edge, so each block
        # filter_rows tests lies in whole zones, as in one pass over the range
        unit = 1 << self.zone_shift if self.zones is not None else 4096
        step = -(-(self.hi - self.lo) // threads)
        cuts = [self.lo] + [-(-(self.lo + t * step) // unit) * unit for t in range(1, threads)]
        cuts = sorted({c for c in cuts if c < self.hi})
        bounds = list(zip(cuts, [*cuts[1:], self.hi], strict=True))
        parts = [out[a - self.lo : b - self.lo] for a, b in bounds]
        done = list(
            H._pool(len(bounds)).map(
                lambda i: kern.filter_rows(*bounds[i], tests, parts[i]), range(len(bounds))
            )
        )
        return np.concatenate([part[:m] for part, m in zip(parts, done, strict=True)])
