"""Item metadata filters -> the candidate rows of a filtered Hamming search.

A filter spec is a mapping with any of these keys, all of which must hold (AND):

* ``bbox``: ``[min_lon, min_lat, max_lon, max_lat]`` in WGS84 degrees; an item passes when its
  own box intersects it (edges included; longitudes -180 and 180 are the same meridian). A box
  with ``min_lon > max_lon`` crosses the antimeridian (it covers ``min_lon .. 180`` and
  ``-180 .. max_lon``), for the query and for items alike.
* ``datetime``: ``"start/end"`` in ISO 8601, either end open as ``..`` (``"../2024-06-30"``,
  ``"2024-01-01/.."``), or a single instant. Ends are inclusive; a date without a time covers
  its whole day (UTC), so ``"../2024-06-30"`` keeps all of June 30. A time without a zone is
  UTC.
* ``label``, ``split``, ``sensor``: a string or a list of strings; the item's value must be one
  of them.

Items with an unknown value (NaN box, NaT datetime, missing string) never pass a filter on that
field. Bad specs raise :class:`FilterError`, whose ``field`` names the offending key.

Filters apply to an :class:`~duch_core.item_metadata.ItemMetadata` (the columns, one entry per
index row, and their indexes). :func:`build_candidates` returns what
:meth:`duch_core.search.HammingIndex.search` takes as ``candidates``.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from duch_core import row_bits
from duch_core.hamming_topk import ascending_positions
from duch_core.item_metadata import NAT_US, ItemMetadata, instant_us
from duch_core.row_filter import RowFilter

__all__ = [
    "FILTER_KEYS",
    "FilterError",
    "build_candidates",
    "candidate_positions",
    "filter_mask",
    "parse_datetime_range",
]

FILTER_KEYS = ("bbox", "datetime", "label", "split", "sensor")
_CATEGORICAL = ("label", "split", "sensor")
# once fewer rows than this fraction survive, the remaining predicates are evaluated on the
# survivors only (gathered) instead of on whole columns; an index (below) is used when it
# narrows the rows to less than this fraction
_GATHER_BELOW = 1 / 16
# a filter whose zone maps leave at most this share of its rows is tested in the scan over
# those zones, unless an index gives its positions
_ZONES_SCANNED_BELOW = 1 / 4
# class bitmaps built for a filter and kept for the next search with the same values, per
# metadata (1/8 byte per row each)
_BITS_KEPT = 8
_BITS_LOCK = threading.Lock()


class FilterError(ValueError):
    """A filter spec that cannot be applied. ``field`` is the offending key (``None`` when the
    spec itself is not a mapping)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"filter {field}: {message}" if field else f"filter: {message}")
        self.field = field


def _index_rows(
    meta: ItemMetadata, preds: list[tuple[str, Any]]
) -> tuple[np.ndarray | None, str | None]:
    """Ascending rows that may pass, from the most selective index, when one narrows the rows
    to less than ``_GATHER_BELOW`` of them, and the key of the predicate they answer exactly
    (a datetime range from the time order; the grid gives a superset); else ``None``s."""
    best = None  # (count, key, argument)
    for key, arg in preds:
        if key == "bbox" and meta.grid is not None:
            c = meta.grid.count(arg)
        elif key == "datetime" and meta.time_sorted and meta.datetime_us is not None:
            lo, hi = _time_slice(meta.datetime_us[: meta.timed], arg)
            c, arg = hi - lo, (lo, hi)
        elif key == "datetime" and meta.time_order is not None:
            lo, hi = _time_slice(meta.time_order[1], arg)
            c, arg = hi - lo, (lo, hi)
        else:
            continue
        if best is None or c < best[0]:
            best = (c, key, arg)
    if best is None or best[0] >= _GATHER_BELOW * meta.n:
        return None, None
    _, key, arg = best
    if key == "bbox" and meta.grid is not None:
        return meta.grid.rows_near(arg), None
    if meta.time_sorted:
        return np.arange(arg[0], arg[1], dtype=np.int64), "datetime"
    if meta.time_order is not None:
        return ascending_positions(meta.time_order[0][arg[0] : arg[1]]), "datetime"
    return None, None


def _time_slice(times: np.ndarray, bounds: tuple[int | None, int | None]) -> tuple[int, int]:
    """The slice of the sorted ``times`` within inclusive ``bounds`` (NaT, the smallest value,
    never included)."""
    lo, hi = bounds
    a = int(np.searchsorted(times, NAT_US + 1 if lo is None else lo, "left"))
    b = len(times) if hi is None else int(np.searchsorted(times, hi, "right"))
    return a, max(a, b)


# --------------------------------------------------------------------------------------------
# spec validation


def _check_bbox(value: Any) -> tuple[float, float, float, float]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise FilterError("bbox", f"must be [min_lon, min_lat, max_lon, max_lat], got {value!r}")
    vals = list(value)
    if len(vals) != 4 or not all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        for v in vals
    ):
        raise FilterError(
            "bbox", f"must be 4 numbers [min_lon, min_lat, max_lon, max_lat], got {value!r}"
        )
    w, s, e, n = (float(v) for v in vals)
    for name, v, lim in (
        ("min_lon", w, 180),
        ("max_lon", e, 180),
        ("min_lat", s, 90),
        ("max_lat", n, 90),
    ):
        if not (math.isfinite(v) and -lim <= v <= lim):
            raise FilterError("bbox", f"{name} {v} is outside [-{lim}, {lim}]")
    if s > n:
        raise FilterError("bbox", f"min_lat {s} is above max_lat {n}")
    return w, s, e, n


def _parse_instant(text: str, end: bool) -> int:
    """:func:`~duch_core.item_metadata.instant_us`, raising :class:`FilterError`."""
    try:
        return instant_us(text, end)
    except ValueError:
        raise FilterError("datetime", f"{text!r} is not an ISO 8601 date or date-time") from None


def parse_datetime_range(value: Any) -> tuple[int | None, int | None]:
    """``"start/end"``, open ends ``..``, or one instant -> inclusive epoch-microsecond bounds
    ``(start, end)``, ``None`` for an open end.

    Raises:
        FilterError: (``field="datetime"``) not a string, unparseable, both ends open, or
            start after end.
    """
    if not isinstance(value, str):
        raise FilterError("datetime", f"must be an ISO 8601 string 'start/end', got {value!r}")
    parts = value.split("/")
    if len(parts) == 1:
        if parts[0].strip() in ("", ".."):
            raise FilterError("datetime", f"{value!r} names no instant")
        return _parse_instant(parts[0], end=False), _parse_instant(parts[0], end=True)
    if len(parts) != 2:
        raise FilterError("datetime", f"{value!r} must be one instant or 'start/end'")
    lo_s, hi_s = (p.strip() for p in parts)
    lo = None if lo_s in ("", "..") else _parse_instant(lo_s, end=False)
    hi = None if hi_s in ("", "..") else _parse_instant(hi_s, end=True)
    if lo is None and hi is None:
        raise FilterError("datetime", f"{value!r}: at least one end must be given")
    if lo is not None and hi is not None and lo > hi:
        raise FilterError("datetime", f"{value!r}: start is after end")
    return lo, hi


def _check_strings(key: str, value: Any) -> list[str]:
    vals = [value] if isinstance(value, str) else value
    if not isinstance(vals, Sequence | np.ndarray) or isinstance(vals, bytes):
        raise FilterError(key, f"must be a string or a list of strings, got {value!r}")
    vals = list(vals)
    if not vals or not all(isinstance(v, str) for v in vals):
        raise FilterError(key, f"must be a string or a non-empty list of strings, got {value!r}")
    return vals


def _predicates(meta: ItemMetadata, spec: Any) -> list[tuple[str, Any]]:
    """Validated ``(key, argument)`` pairs, cheapest to evaluate first."""
    if not isinstance(spec, Mapping):
        raise FilterError(None, f"a filter must be a mapping of {FILTER_KEYS}, got {spec!r}")
    out: list[tuple[str, Any]] = []
    for key in spec:
        if key not in FILTER_KEYS:
            raise FilterError(str(key), f"unknown filter key; known: {', '.join(FILTER_KEYS)}")
    for key in (*_CATEGORICAL, "datetime", "bbox"):
        if key not in spec:
            continue
        value = spec[key]
        if key == "bbox":
            arg: Any = _check_bbox(value)
            have = meta.bbox is not None
        elif key == "datetime":
            arg = parse_datetime_range(value)
            have = meta.datetime_us is not None
        else:
            arg = _check_strings(key, value)
            have = key in meta.categorical
        if not have:
            raise FilterError(key, "this archive has no such metadata")
        out.append((key, arg))
    return out


# --------------------------------------------------------------------------------------------
# evaluation


def _rows(a: np.ndarray, rows: np.ndarray | slice | None) -> np.ndarray:
    return a if rows is None else a[rows]


def _eval(meta: ItemMetadata, key: str, arg: Any, rows: np.ndarray | slice | None) -> np.ndarray:
    """Bool flags of predicate ``key`` over every row (``rows`` None) or over ``rows`` (positions
    or a range)."""
    if key in _CATEGORICAL:
        codes, lookup = meta.categorical[key]
        c = _rows(codes, rows)
        want = sorted({lookup[v] for v in arg if v in lookup})
        if len(want) <= 4:
            hit = np.zeros(c.shape, np.bool_)
            for code in want:
                hit |= c == code
            return hit
        table = np.zeros(len(lookup) + 1, np.bool_)  # index -1 (missing) is the last: False
        table[want] = True
        return table[c]
    if key == "datetime":
        if meta.datetime_us is None:
            raise FilterError(key, "this archive has no such metadata")
        t = _rows(meta.datetime_us, rows)
        lo, hi = arg
        hit = t >= (NAT_US + 1 if lo is None else lo)  # NaT is the smallest int64: excluded
        if hi is not None:
            hit &= t <= hi
        return hit
    if meta.bbox is None:
        raise FilterError(key, "this archive has no such metadata")
    min_lon, min_lat, max_lon, max_lat = meta.bbox
    # float64 bounds: a float32 column is compared exactly, not against rounded bounds
    w, s, e, n = (np.float64(v) for v in arg)
    hit = _rows(min_lat, rows) <= n
    hit &= _rows(max_lat, rows) >= s
    lo_ok = _rows(min_lon, rows) <= e  # the item starts west of the query's east edge
    hi_ok = _rows(max_lon, rows) >= w  # and ends east of its west edge
    wraps = None if meta.lon_wraps is None else _rows(meta.lon_wraps, rows)
    if w <= e:
        # an ordinary item overlaps [w, e] when both hold; an item across the antimeridian
        # covers [min_lon, 180] and [-180, max_lon], and overlaps when either does
        lon = lo_ok & hi_ok
        if wraps is not None:
            lon |= wraps & (lo_ok | hi_ok)
        # -180 and 180 are one meridian: a query touching one touches items at the other
        if e == 180:
            lon |= _rows(min_lon, rows) == -180
        if w == -180:
            lon |= _rows(max_lon, rows) == 180
    else:
        # the query covers [w, 180] and [-180, e]: an ordinary item overlaps one of them when
        # it ends east of w or starts west of e; an item across the antimeridian always does
        lon = lo_ok | hi_ok
        if wraps is not None:
            lon |= wraps
    hit &= lon
    return hit


def _narrow(
    meta: ItemMetadata, preds: list[tuple[str, Any]], lo: int, hi: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows of ``lo:hi`` that pass ``preds``: ``(mask over lo:hi, None)`` or ``(None,
    ascending positions)``. Rows come from an index when one narrows them to a few, else from
    the columns of the range; once few survive, the remaining predicates are evaluated on the
    survivors alone."""
    rows, exact = _index_rows(meta, preds)
    if rows is not None and (lo, hi) != (0, meta.n):
        rows = rows[int(np.searchsorted(rows, lo)) : int(np.searchsorted(rows, hi))]
    mask = None
    for key, arg in preds:
        if key == exact:  # the index rows are exactly the rows this predicate keeps
            continue
        if rows is None:
            hit = _eval(meta, key, arg, slice(lo, hi))
            mask = hit if mask is None else np.logical_and(mask, hit, out=mask)
            if np.count_nonzero(mask) < _GATHER_BELOW * (hi - lo):
                rows, mask = lo + np.flatnonzero(mask), None
        else:
            rows = rows[_eval(meta, key, arg, rows)]
    return mask, rows


def _select(meta: ItemMetadata, spec: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(mask, None)`` or ``(None, positions)`` of the rows passing ``spec``; ``(None, None)``
    when the spec is empty (every row passes)."""
    preds = _predicates(meta, spec)
    if not preds:
        return None, None
    return _narrow(meta, preds, 0, meta.n)


def filter_mask(meta: ItemMetadata, spec: Any) -> np.ndarray:
    """``(n,)`` bool: the rows that pass ``spec``.

    Raises:
        FilterError: a bad spec (``field`` names the key).
    """
    mask, rows = _select(meta, spec)
    if rows is not None:
        mask = np.zeros(meta.n, np.bool_)
        mask[rows] = True
    return np.ones(meta.n, np.bool_) if mask is None else mask


def candidate_positions(meta: ItemMetadata, spec: Any) -> np.ndarray:
    """``(M,)`` int64, ascending: the positions of the rows that pass ``spec``.

    Raises:
        FilterError: a bad spec (``field`` names the key).
    """
    mask, rows = _select(meta, spec)
    if rows is not None:
        return rows
    return np.arange(meta.n, dtype=np.int64) if mask is None else np.flatnonzero(mask)


def build_candidates(meta: ItemMetadata, spec: Any) -> RowFilter | np.ndarray | None:
    """The ``candidates`` argument of :meth:`duch_core.search.HammingIndex.search` for ``spec``.

    Returns ``None`` for an empty spec (search unfiltered). Otherwise the cheapest form that
    builds in less time than the search takes:

    * a datetime range over an index in time order is a range of rows, found by binary
      search; the other predicates are applied within it;
    * when an upper bound on the rows that pass (exact for categorical predicates and a
      datetime range, from the spatial grid for a box) is under 1/16 of the rows: their
      ascending int64 positions, from an index (the grid, the time order) or from the columns
      within the range;
    * otherwise a :class:`~duch_core.row_filter.RowFilter`: the range and the predicates,
      which the search tests row by row inside the scan, only for rows close enough to enter
      the top-k. No column is read in full: at 10M rows a mask from whole columns costs
      6-40 ms, about as much as the scan it filters. It carries the zones of 256 rows that
      may hold a passing row (:mod:`duch_core.zone_maps`), and the scan passes over the
      others; a filter whose zones leave at most a quarter of its rows is planned this way
      even when it keeps few rows, unless an index gives its positions.

    An empty int64 array means no row passes.

    Raises:
        FilterError: a bad spec (``field`` names the key).
    """
    preds = _predicates(meta, spec)
    if not preds:
        return None
    lo, hi = 0, meta.n
    rest = []
    for key, arg in preds:
        if key == "datetime" and meta.time_sorted and meta.datetime_us is not None:
            lo, hi = _time_slice(meta.datetime_us[: meta.timed], arg)
        else:
            rest.append((key, arg))
    if hi <= lo:
        return np.zeros(0, np.int64)
    if not rest:
        return RowFilter(lo, hi)
    count = hi - lo  # an upper bound on the rows that pass
    cats = [(key, arg) for key, arg in rest if key in _CATEGORICAL]
    class_ok = _class_ok(meta, cats) if cats else None
    if class_ok is not None and meta.class_counts is not None:
        count = min(count, int(meta.class_counts[class_ok].sum()))
    for key, arg in rest:
        if key == "bbox" and meta.grid is not None:
            count = min(count, meta.grid.count(arg))
        elif key == "datetime" and meta.time_order is not None:
            a, b = _time_slice(meta.time_order[1], arg)
            count = min(count, b - a)
    times = boxes = None
    t_lo, t_hi, box = NAT_US + 1, np.iinfo(np.int64).max, (0.0, 0.0, 0.0, 0.0)
    for key, arg in rest:
        if key == "datetime":
            times = meta.datetime_us
            t_lo = NAT_US + 1 if arg[0] is None else arg[0]
            t_hi = t_hi if arg[1] is None else arg[1]
        elif key == "bbox":
            boxes, box = meta.bbox, arg
    zones, in_zones = None, hi - lo
    if meta.zones is not None and not (cats and class_ok is None):
        zones = meta.zones.passing(
            class_ok=class_ok,
            time_range=(int(t_lo), int(t_hi)) if times is not None else None,
            box=box if boxes is not None else None,
        )
        if zones is not None:
            in_zones = _rows_in_zones(zones, meta.zones.shift, lo, hi)
            count = min(count, in_zones)
            if in_zones == 0:
                return np.zeros(0, np.int64)
            if in_zones == hi - lo:  # every zone may pass: nothing to skip, no checks to pay
                zones = None
    # few rows pass and an index finds them: their positions (from the grid or the time order,
    # without a pass over any column)
    indexed = any(
        (key == "bbox" and meta.grid is not None)
        or (key == "datetime" and meta.time_order is not None)
        for key, _ in rest
    )
    if (indexed and count < _GATHER_BELOW * meta.n) or (cats and class_ok is None):
        return _positions_in(meta, rest, lo, hi)
    # else the zones' rows tested in the scan, when the zones leave few rows: positions would
    # cost a pass over whole columns, a few scans
    zoned = zones is not None and in_zones <= _ZONES_SCANNED_BELOW * (hi - lo)
    if not zoned and count < _GATHER_BELOW * meta.n:
        return _positions_in(meta, rest, lo, hi)
    return RowFilter(
        lo,
        hi,
        count / (hi - lo),
        classes=None if class_ok is None else meta.classes,
        class_ok=class_ok,
        times=times,
        time_lo=int(t_lo),
        time_hi=int(t_hi),
        boxes=boxes,
        wraps=meta.lon_wraps if boxes is not None else None,
        box=box,
        zones=zones,
        zone_shift=meta.zones.shift if meta.zones is not None else 8,
        zone_fraction=in_zones / (hi - lo),
        class_rows=meta.class_lists if class_ok is not None else None,
        class_bits=_class_bits(meta, cats) if class_ok is not None else None,
    )


def _rows_in_zones(zones: np.ndarray, shift: int, lo: int, hi: int) -> int:
    """Rows of ``lo:hi`` in the zones marked in ``zones`` (zones of ``2**shift`` rows)."""
    z0, z1 = lo >> shift, (hi - 1) >> shift
    inner = int(np.count_nonzero(zones[z0 : z1 + 1])) << shift
    # the first and last zones may stick out of lo:hi
    inner -= (lo - (z0 << shift)) if zones[z0] else 0
    inner -= (((z1 + 1) << shift) - hi) if zones[z1] else 0
    return max(0, inner)


def _picked(meta: ItemMetadata, key: str, arg: Any) -> np.ndarray:
    """``(V,)`` bool over the values of categorical column ``key``: those ``arg`` names."""
    lookup = meta.categorical[key][1]
    picked = np.zeros(len(lookup), np.bool_)
    picked[[lookup[v] for v in arg if v in lookup]] = True
    return picked


def _class_bits(meta: ItemMetadata, cats: list[tuple[str, Any]]) -> np.ndarray | None:
    """The rows that pass every categorical predicate of ``cats`` as a bitmap
    (:mod:`duch_core.row_bits`), from the value bitmaps; ``None`` when a column has none.

    One value of one column is that value's bitmap. Other combinations are built (two labels
    of 10M rows: about 0.4 ms once the scan has pushed the bitmaps out of cache, a sixth of
    the scan) and kept for the next search with the same values, in the last
    :data:`_BITS_KEPT` kept per metadata (a filter picked in a form is sent again and again).
    Never written: the kernels only read them."""
    if not all(key in meta.value_bits for key, _ in cats):
        return None
    picks = [(key, _picked(meta, key, arg)) for key, arg in cats]
    if len(picks) == 1 and int(picks[0][1].sum()) == 1:
        return row_bits.rows_with(meta.value_bits[picks[0][0]], picks[0][1])
    name = tuple((key, np.flatnonzero(picked).tobytes()) for key, picked in picks)
    with _BITS_LOCK:
        kept = meta.bits_kept.pop(name, None)
        if kept is not None:
            meta.bits_kept[name] = kept  # now the most recent
            return kept
    parts = (row_bits.rows_with(meta.value_bits[key], picked) for key, picked in picks)
    out: np.ndarray = functools.reduce(np.bitwise_and, parts)
    with _BITS_LOCK:
        meta.bits_kept[name] = out
        while len(meta.bits_kept) > _BITS_KEPT:
            del meta.bits_kept[next(iter(meta.bits_kept))]
    return out


def _class_ok(meta: ItemMetadata, cats: list[tuple[str, Any]]) -> np.ndarray | None:
    """``(C,)`` bool: the row classes that pass every categorical predicate of ``cats`` (a
    missing value never does); ``None`` without classes."""
    if meta.class_codes is None:
        return None
    ok = np.ones(meta.class_codes.shape[0], np.bool_)
    for key, arg in cats:
        table = np.append(_picked(meta, key, arg), False)  # code -1 (missing) is the last
        ok &= table[meta.class_codes[:, meta.class_columns.index(key)]]
    return ok


def _positions_in(meta: ItemMetadata, preds: list[tuple[str, Any]], lo: int, hi: int) -> np.ndarray:
    """Ascending int64 positions of the rows of ``lo:hi`` that pass ``preds``."""
    mask, rows = _narrow(meta, preds, lo, hi)
    if rows is None:
        assert mask is not None
        return lo + np.flatnonzero(mask)
    return rows.astype(np.int64, copy=False)
