"""Item metadata as columns, one entry per index row, and the indexes over them that filters use.

:class:`ItemMetadata` holds an index version's catalog fields in row-position order, ready to
filter (:mod:`duch_core.filters`): the WGS84 boxes, the acquisition times (epoch microseconds),
and the strings (``label``, ``split``, ``sensor``) dictionary-encoded once. Built with its
indexes, it also holds a 1-degree grid over the boxes, the rows in time order (or the fact that
the rows already are), the row classes (each combination of the strings numbered, with counts)
and the zone maps (:mod:`duch_core.zone_maps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, timedelta
from datetime import datetime as DateTime
from typing import Any

import numpy as np

from duch_core import row_bits, zone_maps
from duch_core.hamming_topk import ascending_positions
from duch_core.zone_maps import ZoneMaps

__all__ = [
    "METADATA_COLUMNS",
    "NAT_US",
    "ItemMetadata",
    "datetime_us",
    "empty_metadata",
    "instant_us",
    "metadata_from_table",
]

# int64 epoch microseconds of NaT: the value of an unknown datetime
NAT_US = np.iinfo(np.int64).min
_EPOCH = DateTime(1970, 1, 1, tzinfo=UTC)
# side of a spatial grid cell, degrees
_GRID_CELL = 1.0


def instant_us(text: str, end: bool) -> int:
    """ISO 8601 date or date-time -> epoch microseconds (UTC when it names no zone); a bare date
    is the start of its day (or, for an ``end``, its last microsecond).

    Raises:
        ValueError: neither a date nor a date-time.
    """
    t = text.strip()
    try:
        d = date.fromisoformat(t)  # a date alone (2024-06-30, 20240630)
    except ValueError:
        pass
    else:
        start = DateTime(d.year, d.month, d.day, tzinfo=UTC)
        us = (start - _EPOCH) // timedelta(microseconds=1)
        return us + (86_400_000_000 - 1 if end else 0)
    dt = DateTime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


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
    # the rows grouped by class (class 0's rows, then class 1's, ...), ascending within a
    # class; class c's are ``class_rows[class_starts[c]:class_starts[c + 1]]``: the rows of a
    # categorical filter without a pass over the rows (with the indexes; 4 bytes per row)
    class_rows: np.ndarray | None = None
    class_starts: np.ndarray | None = None
    # per zone of 256 consecutive rows, what its rows hold (with the indexes): a filter's scan
    # then passes over the zones where no row can pass
    zones: ZoneMaps | None = None
    # per categorical column of at most row_bits.MAX_VALUES values, a bitmap of the rows of
    # each value and of the rows with any value (:func:`duch_core.row_bits.value_bitmaps`;
    # with the indexes, 1/8 byte per row and value): a filter's passing rows read beside the
    # codes in the scan
    value_bits: dict[str, np.ndarray] = field(default_factory=dict)
    # class bitmaps of recent filters (:func:`duch_core.filters.build_candidates` keeps them)
    bits_kept: dict[Any, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def class_lists(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(class_rows, class_starts)`` as :class:`~duch_core.row_filter.RowFilter` takes
        them, or ``None`` without them."""
        if self.class_rows is None or self.class_starts is None:
            return None
        return self.class_rows, self.class_starts

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
                bytes per row; rows already in datetime order need no datetime index), the
                zone maps (:mod:`duch_core.zone_maps`, about 0.3 bytes per row), the rows
                grouped by class (4 bytes per row) and the value bitmaps (1/8 byte per row and
                value, :mod:`duch_core.row_bits`). The row classes (4 bytes per row, see the
                attributes) are always built.

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
        zones = class_rows = class_starts = None
        if index and classes is not None and counts is not None:
            keys = classes.astype(np.int16) if counts.shape[0] <= 1 << 15 else classes
            class_rows = np.argsort(keys, kind="stable").astype(_row_dtype(n))  # radix: int16
            class_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if index:
            zones = ZoneMaps.build(
                n,
                classes=classes,
                n_classes=0 if codes is None else codes.shape[0],
                times=dt,
                bbox=bbox,
                wraps=wraps,
                shift=zone_maps.ZONE_SHIFT,
            )
        value_bits: dict[str, np.ndarray] = {}
        for name, (col, values) in cats.items():
            bitmaps = row_bits.value_bitmaps(col, len(values)) if index and values else None
            if bitmaps is not None:
                value_bits[name] = bitmaps
        return cls(n, bbox, dt, cats, wraps, grid, order, sorted_, timed, classes, tuple(cats),
                   codes, counts, class_rows, class_starts, zones, value_bits)  # fmt: skip


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
                out[i] = instant_us(v.replace("Z", "+00:00"), end=False)
            except ValueError:
                pass
    return out


def empty_metadata() -> ItemMetadata:
    """Metadata of no rows with every field: :func:`duch_core.filters.filter_mask` on it checks
    a spec alone."""
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
        return ascending_positions(np.concatenate(parts))


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
