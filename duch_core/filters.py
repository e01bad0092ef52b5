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

:class:`ItemMetadata` holds the columns, one entry per index row in row-position order, ready to
filter (strings dictionary-encoded once). :func:`build_candidates` returns what
:meth:`duch_core.search.HammingIndex.search` takes as ``candidates``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, timedelta
from datetime import datetime as DateTime
from typing import Any

import numpy as np

from duch_core.hamming_topk import RowFilter

__all__ = [
    "FILTER_KEYS",
    "FilterError",
    "ItemMetadata",
    "build_candidates",
    "candidate_positions",
    "datetime_us",
    "empty_metadata",
    "filter_mask",
    "metadata_from_table",
    "parse_datetime_range",
]

FILTER_KEYS = ("bbox", "datetime", "label", "split", "sensor")
_CATEGORICAL = ("label", "split", "sensor")
# int64 epoch microseconds of NaT: the value of an unknown datetime
NAT_US = np.iinfo(np.int64).min
_EPOCH = DateTime(1970, 1, 1, tzinfo=UTC)
# once fewer rows than this fraction survive, the remaining predicates are evaluated on the
# survivors only (gathered) instead of on whole columns; an index (below) is used when it
# narrows the rows to less than this fraction
_GATHER_BELOW = 1 / 16
# side of a spatial grid cell, degrees
_GRID_CELL = 1.0


class FilterError(ValueError):
    """A filter spec that cannot be applied. ``field`` is the offending key (``None`` when the
    spec itself is not a mapping)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"filter {field}: {message}" if field else f"filter: {message}")
        self.field = field


@dataclass(frozen=True)
class ItemMetadata:
    """Item metadata as columns, entry ``i`` describing index row ``i``.

    Build it with :meth:`from_columns`. Attributes: ``n`` rows; ``bbox``: the ``(n,)`` float
    columns ``(min_lon, min_lat, max_lon, max_lat)`` (NaN: unknown) or ``None``;
    ``datetime_us``: ``(n,)`` int64 epoch microseconds (:data:`NAT_US`: unknown) or ``None``;
    ``categorical``: per string column, its ``(n,)`` integer codes (-1: missing) and the code
    of each value.
    """

    n: int
    bbox: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    datetime_us: np.ndarray | None = None
    categorical: dict[str, tuple[np.ndarray, dict[str, int]]] = field(default_factory=dict)
    # rows whose box crosses the antimeridian (min_lon > max_lon); None when no row does
    lon_wraps: np.ndarray | None = None
    grid: _Grid | None = None
    # (rows in datetime order, their datetimes): a range is a slice; None when the rows are in
    # datetime order themselves (``time_sorted``) or without the indexes
    time_order: tuple[np.ndarray, np.ndarray] | None = None
    # rows 0:timed have a datetime, non-decreasing, and the rest none (an index in time order):
    # a datetime range is a range of rows
    time_sorted: bool = False
    timed: int = 0
    # each row's combination of categorical values, numbered: ``classes`` (n,) int32, and per
    # class its code in each of ``class_columns`` (``class_codes`` (C, len(class_columns)),
    # -1 missing) and its number of rows, so that any mix of categorical predicates is one
    # lookup per row, and its exact count is known before any row is read
    classes: np.ndarray | None = None
    class_columns: tuple[str, ...] = ()
    class_codes: np.ndarray | None = None
    class_counts: np.ndarray | None = None

    @classmethod
    def from_columns(
        cls,
        *,
        min_lon: Any = None,
        min_lat: Any = None,
        max_lon: Any = None,
        max_lat: Any = None,
        datetime: Any = None,
        label: Any = None,
        split: Any = None,
        sensor: Any = None,
        index: bool = True,
    ) -> ItemMetadata:
        """Columns in row order (numpy arrays, pyarrow arrays or sequences; any may be left
        out, then filters on it are refused).

        Args:
            min_lon, min_lat, max_lon, max_lat: ``(n,)`` floats, WGS84 degrees, NaN unknown;
                all four or none.
            datetime: ``(n,)`` numpy ``datetime64`` (NaT unknown) or int64 epoch microseconds
                (:data:`NAT_US` unknown).
            label, split, sensor: ``(n,)`` strings, ``None`` for missing.
            index: also build a spatial grid over the boxes and the datetime order, so that a
                selective bbox or datetime filter reads only the rows near it (about 4 and 12
                bytes per row; rows already in datetime order need no datetime index). The row
                classes (4 bytes per row, see the attributes) are always built.

        Raises:
            ValueError: columns of different lengths, or only some of the bbox columns.
        """
        boxes = [min_lon, min_lat, max_lon, max_lat]
        given = [b is not None for b in boxes]
        if any(given) and not all(given):
            raise ValueError("give all four bbox columns (min_lon, min_lat, max_lon, max_lat)")
        lengths: dict[str, int] = {}
        bbox = None
        if all(given):
            cols = []
            for name, col in zip(("min_lon", "min_lat", "max_lon", "max_lat"), boxes, strict=True):
                a = _to_numpy(col)
                cols.append(a)
                lengths[name] = a.shape[0]
            bbox = (cols[0], cols[1], cols[2], cols[3])
        dt = None
        if datetime is not None:
            dt = _datetime_column(datetime)
            lengths["datetime"] = dt.shape[0]
        cats: dict[str, tuple[np.ndarray, dict[str, int]]] = {}
        for name, col in (("label", label), ("split", split), ("sensor", sensor)):
            if col is not None:
                cats[name] = _encode_strings(col)
                lengths[name] = cats[name][0].shape[0]
        if len(set(lengths.values())) > 1:
            raise ValueError(f"metadata columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
        wraps = grid = order = None
        if bbox is not None:
            c64 = [_writeable(np.asarray(c, np.float64)) for c in bbox]
            bbox = (c64[0], c64[1], c64[2], c64[3])
            w = bbox[0] > bbox[2]
            wraps = w if bool(w.any()) else None
            grid = _Grid.build(bbox, _GRID_CELL) if index else None
        sorted_, timed = False, 0
        if dt is not None:
            dt = _writeable(dt)
            sorted_, timed = _time_sorted(dt)
            if index and not sorted_:
                rows = np.argsort(dt, kind="stable").astype(_row_dtype(n))
                order = (rows, dt[rows])
        classes, codes, counts = _classes(
            [cats[c][0] for c in cats], [len(cats[c][1]) for c in cats], n
        )
        return cls(n, bbox, dt, cats, wraps, grid, order, sorted_, timed, classes, tuple(cats),
                   codes, counts)  # fmt: skip


METADATA_COLUMNS = ("bbox", "datetime", "label", "split", "sensor")
"""Catalog columns :func:`metadata_from_table` reads (any may be absent)."""


def metadata_from_table(table: Any, index: bool = True) -> ItemMetadata:
    """:class:`ItemMetadata` from catalog-shaped rows (a ``pyarrow.Table``, row ``i`` describing
    index row ``i``): ``bbox`` a list of 4 WGS84 numbers, ``datetime`` an ISO 8601 string (UTC
    when it names no zone) or a timestamp, ``label``/``split``/``sensor`` strings. Every
    filterable field is present in the result: an absent column is unknown for every row (so a
    filter on it keeps nothing), as is a null or malformed value.
    """
    import pyarrow as pa

    n = table.num_rows
    names = set(table.column_names)
    boxes = np.full((4, n), np.nan)
    if "bbox" in names and n:
        col = table.column("bbox").combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            import pyarrow.compute as pc

            four = pc.equal(pc.list_value_length(col), 4).fill_null(False)
            rows = np.flatnonzero(four.to_numpy(zero_copy_only=False))
            flat = pc.list_flatten(col.filter(four)).cast(pa.float64())
            vals = flat.to_numpy(zero_copy_only=False).reshape(-1, 4)  # nulls become NaN
            whole = ~np.isnan(vals).any(axis=1)
            boxes[:, rows[whole]] = vals[whole].T
    dt = datetime_us(table)

    def strings(name: str) -> Any:
        if name not in names:
            return pa.nulls(n, pa.string())
        return table.column(name).cast(pa.string())

    return ItemMetadata.from_columns(
        min_lon=boxes[0],
        min_lat=boxes[1],
        max_lon=boxes[2],
        max_lat=boxes[3],
        datetime=dt,
        label=strings("label"),
        split=strings("split"),
        sensor=strings("sensor"),
        index=index,
    )


def datetime_us(table: Any) -> np.ndarray:
    """The ``datetime`` column of catalog-shaped rows as ``(n,)`` int64 epoch microseconds.

    ISO 8601 strings (UTC when they name no zone) or timestamps; null, malformed or an absent
    column give :data:`NAT_US`.
    """
    import pyarrow as pa

    n = table.num_rows
    if "datetime" not in table.column_names or not n:
        return np.full(n, NAT_US, np.int64)
    col = table.column("datetime").combine_chunks()
    if pa.types.is_timestamp(col.type):
        us = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
        return us.fill_null(NAT_US).to_numpy(zero_copy_only=False).astype(np.int64)
    return _iso_column(col.cast(pa.string()).to_pylist())


def _iso_column(values: list[str | None]) -> np.ndarray:
    """ISO 8601 strings -> int64 epoch microseconds (:data:`NAT_US` for null or unparseable)."""
    out = np.full(len(values), NAT_US, np.int64)
    for i, v in enumerate(values):
        if v:
            try:
                out[i] = _parse_instant(v.replace("Z", "+00:00"), end=False)
            except FilterError:
                pass
    return out


def empty_metadata() -> ItemMetadata:
    """Metadata of no rows with every field: :func:`filter_mask` on it checks a spec alone."""
    import pyarrow as pa

    return metadata_from_table(pa.table({"item_id": pa.array([], pa.string())}), index=False)


def _row_dtype(n: int) -> type[np.signedinteger[Any]]:
    return np.int32 if n < 2**31 else np.int64


@dataclass(frozen=True)
class _Grid:
    """Boxes filed by the grid cell of their south-west corner.

    Only boxes at most one cell wide and high are filed, so a query needs the cells of its own
    box widened by one cell to the west and south; the others (wider, across or touching the
    antimeridian, unknown) are ``loose`` and always checked. Cells are numbered row by row
    (``lat_cell * nlon + lon_cell``), so the cells of one latitude band and a longitude range
    are one slice of ``rows``.
    """

    cell: float
    nlon: int
    nlat: int
    offsets: np.ndarray  # (nlon * nlat + 1,) int64: rows[offsets[c]:offsets[c + 1]] is cell c
    rows: np.ndarray  # filed rows by cell, ascending within a cell
    loose: np.ndarray  # rows not filed, ascending

    @classmethod
    def build(cls, bbox: tuple[np.ndarray, ...], cell: float) -> _Grid:
        w, s, e, n = bbox
        nlon, nlat = round(360 / cell), round(180 / cell)
        filed = (w <= e) & (e - w <= cell) & (n - s <= cell) & (w > -180) & (e < 180)  # not NaN
        inside = np.flatnonzero(filed)
        ix = np.minimum(((w[inside] + 180) / cell).astype(np.int64), nlon - 1)
        iy = np.minimum(((s[inside] + 90) / cell).astype(np.int64), nlat - 1)
        cid = iy * nlon + ix
        by_cell = np.argsort(cid, kind="stable")
        counts = np.bincount(cid, minlength=nlon * nlat)
        offsets = np.zeros(nlon * nlat + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        rdt = _row_dtype(len(w))
        return cls(cell, nlon, nlat, offsets, inside[by_cell].astype(rdt),
                   np.flatnonzero(~filed).astype(rdt))  # fmt: skip

    def _slices(self, box: tuple[float, float, float, float]) -> list[tuple[int, int]]:
        """Slices of ``rows`` that hold every filed box intersecting ``box``."""
        w, s, e, n = box
        lon_ranges = [(w, e)] if w <= e else [(w, 180.0), (-180.0, e)]
        y0 = max(0, int((s - self.cell + 90) // self.cell))
        y1 = min(self.nlat - 1, int((n + 90) // self.cell))
        out = []
        for lo, hi in lon_ranges:
            x0 = max(0, int((lo - self.cell + 180) // self.cell))
            x1 = min(self.nlon - 1, int((hi + 180) // self.cell))
            for y in range(y0, y1 + 1):
                a, b = self.offsets[y * self.nlon + x0], self.offsets[y * self.nlon + x1 + 1]
                if b > a:
                    out.append((int(a), int(b)))
        return out

    def count(self, box: tuple[float, float, float, float]) -> int:
        return sum(b - a for a, b in self._slices(box)) + len(self.loose)

    def rows_near(self, box: tuple[float, float, float, float]) -> np.ndarray:
        """Ascending rows that may intersect ``box`` (a superset: check them)."""
        parts = [self.rows[a:b] for a, b in self._slices(box)] + [self.loose]
        return _ascending(np.concatenate(parts))


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
        return _ascending(meta.time_order[0][arg[0] : arg[1]]), "datetime"
    return None, None


def _writeable(a: np.ndarray) -> np.ndarray:
    """``a`` contiguous and writeable (a copy only where it is not): the form the search
    kernel takes without copying per query."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _time_sorted(t: np.ndarray) -> tuple[bool, int]:
    """``(True, m)`` when rows ``0:m`` have a datetime, non-decreasing, and the rest none (the
    order of an index in time order), else ``(False, 0)``."""
    unknown = t == NAT_US
    m = int(np.argmax(unknown)) if bool(unknown.any()) else t.shape[0]
    if bool(unknown[m:].all()) and (m < 2 or bool(np.all(t[1:m] >= t[: m - 1]))):
        return True, m
    return False, 0


def _classes(
    columns: list[np.ndarray], sizes: list[int], n: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Number each row's combination of categorical ``columns`` (codes, -1 missing; column
    ``c`` has ``sizes[c]`` values): ``(classes (n,) int32, class_codes (C, len(columns)),
    class_counts (C,))``, or three ``None`` without columns."""
    if not columns:
        return None, None, None
    span = math.prod(size + 1 for size in sizes)
    if span >= 1 << 62:  # too many possible combinations for one int64 key: sort the rows
        stacked = np.stack([c.astype(np.int64) for c in columns], axis=1).reshape(n, -1)
        rows, inverse, counts = np.unique(stacked, axis=0, return_inverse=True, return_counts=True)
        return inverse.astype(np.int32).reshape(n), rows, counts.astype(np.int64)
    key = np.zeros(n, np.int64)
    for col, size in zip(columns, sizes, strict=True):
        key *= size + 1
        key += col.astype(np.int64) + 1
    if span <= 1 << 22:  # the combinations as a dense table: no sort
        counts_all = np.bincount(key, minlength=span)
        keys = np.flatnonzero(counts_all)
        number = np.full(span, -1, np.int32)
        number[keys] = np.arange(keys.size, dtype=np.int32)
        classes = number[key]
        counts = counts_all[keys]
    else:
        keys, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        classes = inverse.astype(np.int32).reshape(n)
    codes = np.empty((keys.size, len(columns)), np.int64)
    rest = keys.copy()
    for c in range(len(columns) - 1, -1, -1):
        rest, digit = np.divmod(rest, sizes[c] + 1)
        codes[:, c] = digit - 1
    return classes, codes, counts.astype(np.int64)


def _ascending(rows: np.ndarray) -> np.ndarray:
    """``rows`` sorted, as int64; rows in order already (an index in time order gives a time
    slice that is) are only checked, which costs a tenth of sorting them."""
    if rows.size < 2 or bool(np.all(rows[1:] > rows[:-1])):
        return rows.astype(np.int64)
    return np.sort(rows).astype(np.int64)


def _time_slice(times: np.ndarray, bounds: tuple[int | None, int | None]) -> tuple[int, int]:
    """The slice of the sorted ``times`` within inclusive ``bounds`` (NaT, the smallest value,
    never included)."""
    lo, hi = bounds
    a = int(np.searchsorted(times, NAT_US + 1 if lo is None else lo, "left"))
    b = len(times) if hi is None else int(np.searchsorted(times, hi, "right"))
    return a, max(a, b)


def _to_numpy(col: Any) -> np.ndarray:
    if hasattr(col, "combine_chunks"):  # pyarrow ChunkedArray
        col = col.combine_chunks()
    if hasattr(col, "to_numpy") and not isinstance(col, np.ndarray):
        return np.asarray(col.to_numpy(zero_copy_only=False))
    return np.asarray(col)


def _datetime_column(col: Any) -> np.ndarray:
    a = _to_numpy(col)
    if a.dtype.kind == "M":
        return np.ascontiguousarray(a.astype("datetime64[us]").view(np.int64))
    if a.dtype.kind in "iu":
        return np.ascontiguousarray(a, dtype=np.int64)
    raise ValueError(f"datetime column must be datetime64 or int64 microseconds, got {a.dtype}")


def _encode_strings(col: Any) -> tuple[np.ndarray, dict[str, int]]:
    """Dictionary-encode a string column: ``(codes, code of each value)``; -1 for missing."""
    import pyarrow as pa

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if not isinstance(arr, pa.Array):
        arr = pa.array(np.asarray(arr, dtype=object) if not isinstance(arr, list) else arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        if not pa.types.is_null(arr.type):
            raise ValueError(f"string metadata columns must hold strings, got {arr.type}")
        arr = arr.cast(pa.string())
    enc = arr.dictionary_encode()
    values = enc.dictionary.to_pylist()
    # the narrowest type that holds the codes: less to read per filter
    dtype = np.int8 if len(values) < 127 else np.int16 if len(values) < 32767 else np.int32
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(dtype)
    return codes, {v: i for i, v in enumerate(values)}


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
    """ISO 8601 date or date-time -> epoch microseconds; a bare date is the start of its day
    (or, for an end, its last microsecond)."""
    t = text.strip()
    try:
        d = date.fromisoformat(t)  # a date alone (2024-06-30, 20240630)
    except ValueError:
        pass
    else:
        start = DateTime(d.year, d.month, d.day, tzinfo=UTC)
        us = (start - _EPOCH) // timedelta(microseconds=1)
        return us + (86_400_000_000 - 1 if end else 0)
    try:
        dt = DateTime.fromisoformat(t)
    except ValueError:
        raise FilterError("datetime", f"{text!r} is not an ISO 8601 date or date-time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


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
    * otherwise a :class:`~duch_core.hamming_topk.RowFilter`: the range and the predicates,
      which the search tests row by row inside the scan, only for rows close enough to enter
      the top-k. No column is read in full: at 10M rows a mask from whole columns costs
      6-40 ms, about as much as the scan it filters.

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
    if count < _GATHER_BELOW * meta.n or (cats and class_ok is None):
        return _positions_in(meta, rest, lo, hi)
    times = boxes = None
    t_lo, t_hi, box = NAT_US + 1, np.iinfo(np.int64).max, (0.0, 0.0, 0.0, 0.0)
    for key, arg in rest:
        if key == "datetime":
            times = meta.datetime_us
            t_lo = NAT_US + 1 if arg[0] is None else arg[0]
            t_hi = t_hi if arg[1] is None else arg[1]
        elif key == "bbox":
            boxes, box = meta.bbox, arg
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
    )


def _class_ok(meta: ItemMetadata, cats: list[tuple[str, Any]]) -> np.ndarray | None:
    """``(C,)`` bool: the row classes that pass every categorical predicate of ``cats`` (a
    missing value never does); ``None`` without classes."""
    if meta.class_codes is None:
        return None
    ok = np.ones(meta.class_codes.shape[0], np.bool_)
    for key, arg in cats:
        lookup = meta.categorical[key][1]
        table = np.zeros(len(lookup) + 1, np.bool_)  # code -1 (missing) is the last: False
        table[[lookup[v] for v in arg if v in lookup]] = True
        ok &= table[meta.class_codes[:, meta.class_columns.index(key)]]
    return ok


def _positions_in(meta: ItemMetadata, preds: list[tuple[str, Any]], lo: int, hi: int) -> np.ndarray:
    """Ascending int64 positions of the rows of ``lo:hi`` that pass ``preds``."""
    mask, rows = _narrow(meta, preds, lo, hi)
    if rows is None:
        assert mask is not None
        return lo + np.flatnonzero(mask)
    return rows.astype(np.int64, copy=False)
