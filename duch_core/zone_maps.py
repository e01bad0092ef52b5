"""Zone maps: per run of consecutive index rows, a summary of what its rows hold.

The rows of an index come in zones of ``2**shift`` consecutive rows (256 by default). For each
zone a :class:`ZoneMaps` keeps the set of row classes present (a bitset), the earliest and latest
datetime, and the envelope of the boxes. A filter then marks the zones where some row *may*
pass (:meth:`ZoneMaps.passing`), and the filtered scan passes over the others without reading
a code or a metadata column (:func:`duch_core._search_kernel.scan_chunk`).

The summaries only ever keep a zone that holds a passing row: the rows of a kept zone are still
tested one by one. They pay when rows that share metadata lie together, which is how the jobs
write an index: the chips of one tiling part (one place, one date, one sensor) are consecutive
rows. On rows in random order nearly every zone is kept, and the search costs what it did
without them. About 0.3 bytes per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_CLASSES", "ZONE_SHIFT", "ZoneMaps"]

ZONE_SHIFT = 8
"""Zones of 256 rows: one scan piece of 64-bit codes."""
MAX_CLASSES = 512
"""More row classes than this get no class summary (its bitset would cost over 0.25 B/row)."""

_I64_MIN = np.iinfo(np.int64).min
_I64_MAX = np.iinfo(np.int64).max
_BUILD_ROWS = 1 << 20  # rows per pass while building (bounds the temporaries)


@dataclass(frozen=True)
class ZoneMaps:
    """Summaries of the zones of ``n`` rows; zone ``z`` is rows ``z << shift`` up to
    ``(z + 1) << shift`` (the last one may be shorter).

    Attributes:
        n, shift: rows and log2 of the zone size.
        classes: ``(Z, W)`` uint64: bit ``c`` of a zone's ``W`` words is set when a row of the
            zone has class ``c`` (``None``: no class summary).
        time_min, time_max: ``(Z,)`` int64, the earliest and latest known datetime of the
            zone (a zone with none has ``time_min > time_max``), or ``None``.
        boxes: ``(lon_min, lat_min, lon_max, lat_max)``, ``(Z,)`` float64 each: the least
            ``min_lon`` / ``min_lat`` and greatest ``max_lon`` / ``max_lat`` of the zone's known
            boxes (NaN where it has none), or ``None``; ``wraps``: ``(Z,)`` bool, zones with a
            row across the antimeridian, or ``None`` when no row crosses it.
    """

    n: int
    shift: int = ZONE_SHIFT
    classes: np.ndarray | None = None
    time_min: np.ndarray | None = None
    time_max: np.ndarray | None = None
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    wraps: np.ndarray | None = None

    @property
    def zones(self) -> int:
        """Number of zones."""
        return (self.n + (1 << self.shift) - 1) >> self.shift

    @classmethod
    def build(
        cls,
        n: int,
        *,
        classes: np.ndarray | None = None,
        n_classes: int = 0,
        times: np.ndarray | None = None,
        bbox: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
        wraps: np.ndarray | None = None,
        shift: int = ZONE_SHIFT,
    ) -> ZoneMaps:
        """Summaries of the given columns (each ``(n,)``; any may be ``None``).

        Args:
            classes: int32 row classes, -1 none; ``n_classes`` of them (over
                :data:`MAX_CLASSES`: no class summary).
            times: int64 epoch microseconds, ``int64`` minimum unknown.
            bbox: ``(min_lon, min_lat, max_lon, max_lat)`` float64, NaN unknown; ``wraps``: the
                rows whose box crosses the antimeridian (``None``: none does).
        """
        starts = np.arange(0, n, 1 << shift)
        cls_bits = None
        if classes is not None and 0 < n_classes <= MAX_CLASSES and n:
            cls_bits = _class_bits(classes, n_classes, shift)
        t_min = t_max = None
        if times is not None and n:
            t_max = np.maximum.reduceat(times, starts)  # unknown is the int64 minimum
            t_min = np.minimum.reduceat(np.where(times == _I64_MIN, _I64_MAX, times), starts)
        env = zw = None
        if bbox is not None and n:
            env = (
                np.fmin.reduceat(bbox[0], starts),
                np.fmin.reduceat(bbox[1], starts),
                np.fmax.reduceat(bbox[2], starts),
                np.fmax.reduceat(bbox[3], starts),
            )
            if wraps is not None:
                zw = np.logical_or.reduceat(wraps, starts)
        return cls(n, shift, cls_bits, t_min, t_max, env, zw)

    def passing(
        self,
        *,
        class_ok: np.ndarray | None = None,
        time_range: tuple[int, int] | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray | None:
        """``(Z,)`` bool: the zones where a row may pass every given test (a zone left out
        holds no row that passes); ``None`` when no summary applies to the tests given.

        The tests are those of :func:`duch_core._search_kernel.test_rows`: ``class_ok`` the
        passing classes; ``time_range`` inclusive bounds; ``box`` ``(w, s, e, n)``, across the
        antimeridian when ``w > e``.
        """
        out: np.ndarray | None = None

        def both(z: np.ndarray) -> None:
            nonlocal out
            out = z if out is None else out & z

        if class_ok is not None and self.classes is not None:
            words = self.classes.shape[1]
            ok = np.zeros(words * 64, np.bool_)
            ok[: min(class_ok.shape[0], words * 64)] = class_ok[: words * 64]
            ok_bits = np.packbits(ok, bitorder="little").view("<u8")
            both((self.classes & ok_bits).any(axis=1))
        if time_range is not None and self.time_min is not None:
            assert self.time_max is not None
            both((self.time_min <= time_range[1]) & (self.time_max >= time_range[0]))
        if box is not None and self.boxes is not None:
            both(self._boxes_passing(box))
        return out

    def _boxes_passing(self, box: tuple[float, float, float, float]) -> np.ndarray:
        w, s, e, n = box
        x0, y0, x1, y1 = self.boxes  # type: ignore[misc]
        with np.errstate(invalid="ignore"):
            lat = (y0 <= n) & (y1 >= s)
            if w <= e:
                lon = (x0 <= e) & (x1 >= w)
                if e == 180.0:  # a row starting at -180 touches a query ending at 180
                    lon |= x0 == -180.0
                if w == -180.0:
                    lon |= x1 == 180.0
            else:
                lon = (x0 <= e) | (x1 >= w)
        if self.wraps is not None:  # a zone with a row across the antimeridian: any longitude
            lon = lon | self.wraps
        return lat & lon


def _class_bits(classes: np.ndarray, n_classes: int, shift: int) -> np.ndarray:
    """``(Z, W)`` uint64 class bitsets of the zones of ``classes``."""
    n = classes.shape[0]
    words = (n_classes + 63) // 64
    out = np.zeros(((n + (1 << shift) - 1) >> shift, words), np.uint64)
    step = max(_BUILD_ROWS >> shift << shift, 1 << shift)
    for a in range(0, n, step):
        c = classes[a : a + step].astype(np.int64)
        known = c >= 0
        bit = np.where(known, np.left_shift(np.uint64(1), (c & 63).astype(np.uint64)), 0)
        bit = bit.astype(np.uint64)
        starts = np.arange(0, c.shape[0], 1 << shift)
        z0 = a >> shift
        for wd in range(words):
            in_word = np.where(known & (c >> 6 == wd), bit, np.uint64(0))
            out[z0 : z0 + starts.shape[0], wd] = np.bitwise_or.reduceat(in_word, starts)
    return out
