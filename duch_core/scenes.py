"""Georeferenced scenes cut into chips that are read by window, never copied.

The scene model, its chip grid and the tiling of a scene into archive rows; chip URIs and the
reads themselves live in :mod:`duch_core.chip_io`, scene lists in :mod:`duch_core.scene_lists`.

A *scene* is one acquisition: an id, its band files (one file per band, or one multi-band file;
GeoTIFF, Cloud-Optimized GeoTIFF, JPEG 2000, anything GDAL reads; local or ``s3://``), an
acquisition time, a sensor and optional captions. :func:`tile_scene` lays a pixel grid over the
scene and cuts it into chips; every chip becomes one archive row (see :mod:`duch_core.archive`)
whose ``image_uri`` *refers to* the scene and the chip's window. :func:`read_window` reads the
pixels of one chip with windowed reads, so a COG on S3 is fetched by HTTP range requests.

**The chip grid.** Band files of one scene may differ in resolution (Sentinel-2: 10, 20 and 60 m)
and, by up to a pixel, in extent. The grid takes the pixel size of the finest band (or a given
``resolution``), is anchored on the finest band's pixel corners (or, with ``resolution``, on the
corner of the common footprint) and covers the intersection of all band footprints, shrunk to
whole grid pixels. A band whose footprint differs from that intersection by more than
``footprint_tolerance`` of its own pixels makes the scene invalid (stage ``footprint``).
Coarser bands are resampled onto the grid in the windowed read (``out_shape``).

**Chips.** Chips are ``chip_size`` grid pixels square, ``overlap`` pixels shared between
neighbours (stride ``chip_size - overlap``). With ``edge="clip"`` (default) the chips of the last
row and column are cut at the scene edge, so the chips tile the scene exactly: their union is the
grid, and neighbours share exactly ``overlap`` pixels. ``edge="shift"`` moves the last chips
inward instead, so every chip is full size (the last ones overlap more). A chip whose nodata
fraction (dataset masks or nodata values of its band files, combined: a pixel is nodata when it is
nodata in any band file) exceeds ``max_nodata`` is skipped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from duch_core.archive import resolve_image_uri
from duch_core.chip_io import (
    _EPS,
    SceneError,
    _absolute,
    _band_info,
    _BandInfo,
    _crs_string,
    _describe_io_error,
    _opened,
    _source_window,
    chip_uri,
)

__all__ = [
    "Scene",
    "SceneGrid",
    "Tiles",
    "chip_offsets",
    "scene_grid",
    "tile_scene",
    "to_utc_iso",
    "wgs84_bbox",
]

WGS84_DENSIFY = 21
"""Points per chip edge transformed to WGS84, so the box encloses the curved footprint."""


# --------------------------------------------------------------------------------------------
# the scene model


def to_utc_iso(value: Any) -> str:
    """An acquisition time as ISO-8601 UTC: ``2019-05-03T15:41:09Z`` (microseconds if any).

    Accepts ``datetime``/``date`` objects and ISO-8601 strings (``Z`` or an offset; a time
    without zone and a bare date are taken as UTC).

    Raises:
        ValueError: not a date or time.
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError as e:
            raise ValueError(f"not an ISO-8601 date/time: {value!r}") from e
    else:
        raise ValueError(f"not a date/time: {value!r}")
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if dt.microsecond else "%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Scene:
    """One acquisition to tile.

    Attributes:
        scene_id: unique, non-empty; chip ids start with it.
        bands: band files in channel order (local paths or ``s3://``); a file with several bands
            contributes all of them, so one multi-band file is ``bands=(uri,)``.
        datetime: acquisition time, ISO-8601 UTC (:func:`to_utc_iso`).
        sensor: e.g. ``sentinel-2a``, ``landsat-8``; "" when unknown.
        captions: captions of the scene, copied to each of its chips (may be empty).
        window: optional area to tile, ``(col, row, width, height)`` on the chip grid.
        nodata: optional nodata value overriding the files' own (pixels equal to it in every
            band of a file are nodata).
    """

    scene_id: str
    bands: tuple[str, ...]
    datetime: str
    sensor: str = ""
    captions: tuple[str, ...] = ()
    window: tuple[int, int, int, int] | None = None
    nodata: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable fields (the inverse of :meth:`from_dict`)."""
        return {
            "scene_id": self.scene_id,
            "bands": list(self.bands),
            "datetime": self.datetime,
            "sensor": self.sensor,
            "captions": list(self.captions),
            "window": list(self.window) if self.window is not None else None,
            "nodata": self.nodata,
        }

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], base_dir: str | None = None) -> Scene:
        """A scene from a scene-manifest row.

        Keys: ``scene_id``; ``bands`` (list of URIs) or ``image_uri`` (one file); ``datetime``;
        optional ``sensor``, ``captions``, ``window``, ``nodata``. Other keys are ignored.
        Relative band paths are resolved against ``base_dir`` (the scene list's directory).

        Raises:
            SceneError: stage ``scene_list``, naming the bad field.
        """
        sid = row.get("scene_id")
        if not isinstance(sid, str) or not sid.strip():
            raise SceneError("scene_list", f"missing or empty scene_id in {dict(row)!r:.200}")

        def bad(reason: str) -> SceneError:
            return SceneError("scene_list", reason, sid)

        bands = row.get("bands")
        if bands is None or (
            isinstance(bands, Sequence) and not isinstance(bands, str) and not bands
        ):
            single = row.get("image_uri")
            bands = [single] if single else []
        if isinstance(bands, str) or not isinstance(bands, Sequence | np.ndarray):
            raise bad(f"'bands' must be a list of URIs, got {bands!r}")
        bands = list(bands)
        if not bands:
            raise bad("no band files: give 'bands' (a list of URIs) or 'image_uri' (one file)")
        if not all(isinstance(b, str) and b.strip() for b in bands):
            raise bad(f"'bands' must hold non-empty URI strings, got {bands!r}")
        if base_dir is not None:
            bands = [_absolute(resolve_image_uri(base_dir, b)) for b in bands]
        try:
            when = to_utc_iso(row.get("datetime"))
        except ValueError as e:
            raise bad(f"bad or missing 'datetime': {e}") from e
        sensor = row.get("sensor") or ""
        if not isinstance(sensor, str):
            raise bad(f"'sensor' must be a string, got {sensor!r}")
        captions = row.get("captions")
        captions = [] if captions is None else list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise bad("'captions' must be a list of strings")
        window = row.get("window")
        if window is not None:
            window = [int(v) for v in window] if len(window) == 4 else None
            if window is None or window[2] < 1 or window[3] < 1:
                raise bad(f"'window' must be [col, row, width, height], got {row.get('window')!r}")
        nodata = row.get("nodata")
        if nodata is not None and not isinstance(nodata, int | float):
            raise bad(f"'nodata' must be a number, got {nodata!r}")
        return cls(
            scene_id=sid,
            bands=tuple(bands),
            datetime=when,
            sensor=sensor,
            captions=tuple(captions),
            window=tuple(window) if window is not None else None,  # type: ignore[arg-type]
            nodata=float(nodata) if nodata is not None else None,
        )


@dataclass(frozen=True)
class SceneGrid:
    """The pixel grid chips are cut from: north-up, in the scene CRS.

    Attributes:
        crs: ``EPSG:<code>`` when the CRS has one, else its WKT.
        transform: affine ``(a, b, c, d, e, f)``: ``x = a*col + c``, ``y = e*row + f`` (``b = d
            = 0``, ``e < 0``).
        width, height: grid size in pixels.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    def window_bounds(self, col: int, row: int, width: int, height: int) -> tuple[float, ...]:
        """``(minx, miny, maxx, maxy)`` of a pixel window, in the scene CRS."""
        a, _, c, _, e, f = self.transform
        return (c + a * col, f + e * (row + height), c + a * (col + width), f + e * row)

    @property
    def bounds(self) -> tuple[float, ...]:
        return self.window_bounds(0, 0, self.width, self.height)


def _grid_from_infos(
    infos: Sequence[_BandInfo],
    resolution: float | None,
    footprint_tolerance: float,
    scene_id: str,
) -> SceneGrid:
    first = infos[0]
    for b in infos[1:]:
        if b.crs != first.crs:
            raise SceneError(
                "footprint",
                f"band files are in different CRS: {first.uri} in {_crs_string(first.crs)}, "
                f"{b.uri} in {_crs_string(b.crs)}",
                scene_id,
            )
    left = max(b.bounds[0] for b in infos)
    bottom = max(b.bounds[1] for b in infos)
    right = min(b.bounds[2] for b in infos)
    top = min(b.bounds[3] for b in infos)
    for b in infos:
        bx, by = b.transform.a, -b.transform.e
        off = (
            abs(b.bounds[0] - left) / bx,
            abs(b.bounds[1] - bottom) / by,
            abs(b.bounds[2] - right) / bx,
            abs(b.bounds[3] - top) / by,
        )
        if left >= right or bottom >= top or max(off) > footprint_tolerance + _EPS:
            raise SceneError(
                "footprint",
                f"band files cover different areas: {b.uri} covers {_fmt_bounds(b.bounds)}, "
                f"the common area of all bands is {_fmt_bounds((left, bottom, right, top))} "
                f"(differs by {max(off):.3g} of its pixels; tolerance {footprint_tolerance})",
                scene_id,
            )
    if resolution is not None:
        if not resolution > 0:
            raise SceneError("footprint", f"resolution must be > 0, got {resolution}", scene_id)
        rx = ry = float(resolution)
        ax, ay = left, top
    else:
        finest = min(infos, key=lambda b: b.transform.a * -b.transform.e)
        rx, ry = finest.transform.a, -finest.transform.e
        ax, ay = finest.transform.c, finest.transform.f
    c0 = math.ceil((left - ax) / rx - _EPS)
    c1 = math.floor((right - ax) / rx + _EPS)
    r0 = math.ceil((ay - top) / ry - _EPS)
    r1 = math.floor((ay - bottom) / ry + _EPS)
    if c1 <= c0 or r1 <= r0:
        raise SceneError("footprint", "the band files' common area is under one pixel", scene_id)
    return SceneGrid(
        crs=_crs_string(first.crs),
        transform=(rx, 0.0, ax + c0 * rx, 0.0, -ry, ay - r0 * ry),
        width=c1 - c0,
        height=r1 - r0,
    )


def _fmt_bounds(b: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.10g}" for v in b) + "]"


def scene_grid(
    scene: Scene, resolution: float | None = None, footprint_tolerance: float = 1.0
) -> SceneGrid:
    """The chip grid of a scene (see the module docstring); reads file headers only.

    Args:
        scene: the scene.
        resolution: grid pixel size in CRS units; ``None`` = the finest band's.
        footprint_tolerance: how far (in its own pixels) a band's footprint may differ from the
            common footprint of all bands.

    Raises:
        SceneError: stages ``open``, ``georef``, ``footprint``.
    """
    with _opened(scene.bands, scene.scene_id) as datasets:
        infos = [
            _band_info(ds, u, scene.scene_id) for ds, u in zip(datasets, scene.bands, strict=True)
        ]
    return _grid_from_infos(infos, resolution, footprint_tolerance, scene.scene_id)


# --------------------------------------------------------------------------------------------
# chips


def chip_offsets(
    start: int, length: int, chip_size: int, overlap: int, edge: str = "clip"
) -> list[tuple[int, int]]:
    """``(offset, size)`` of the chips along one axis of ``[start, start + length)``.

    ``clip``: stride ``chip_size - overlap`` from ``start``; the last chip ends at the edge (it
    may be smaller) and still shares exactly ``overlap`` pixels with the one before.
    ``shift``: the same, but the last chip is moved inward to full size. An axis shorter than a
    chip gets one chip of the whole length.

    Raises:
        ValueError: ``chip_size < 1``, ``overlap`` outside ``[0, chip_size)``, unknown ``edge``.
    """
    if chip_size < 1 or not 0 <= overlap < chip_size:
        raise ValueError(
            f"need chip_size >= 1 and 0 <= overlap < chip_size, got {chip_size}, {overlap}"
        )
    if edge not in ("clip", "shift"):
        raise ValueError(f"edge must be 'clip' or 'shift', got {edge!r}")
    if length <= chip_size:
        return [(start, length)]
    stride = chip_size - overlap
    out = [(start, chip_size)]
    while out[-1][0] + chip_size < start + length:
        off = out[-1][0] + stride
        if edge == "shift":
            off = min(off, start + length - chip_size)
        out.append((off, min(chip_size, start + length - off)))
    return out


@dataclass
class Tiles:
    """What :func:`tile_scene` produced.

    Attributes:
        rows: one archive row per kept chip (columns in :func:`tile_scene`).
        skipped_nodata: chips dropped for too much nodata.
        grid: the scene's chip grid.
        chip_rows: number of chip rows of the whole scene (for splitting work by row bands).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped_nodata: int = 0
    grid: SceneGrid | None = None
    chip_rows: int = 0


def _area(scene: Scene, grid: SceneGrid) -> tuple[int, int, int, int]:
    if scene.window is None:
        return (0, 0, grid.width, grid.height)
    col, row, w, h = scene.window
    if col < 0 or row < 0 or col + w > grid.width or row + h > grid.height:
        raise SceneError(
            "window",
            f"window {list(scene.window)} (col, row, width, height) is outside the scene grid of "
            f"{grid.width} x {grid.height} pixels",
            scene.scene_id,
        )
    return (col, row, w, h)


def _valid_mask(
    datasets: Sequence[Any],
    infos: Sequence[_BandInfo],
    bounds: Sequence[float],
    shape: tuple[int, int],
    nodata: float | None,
    scene_id: str,
) -> np.ndarray | None:
    """``(H, W)`` bool, True where every band file has data; ``None`` when all are valid."""
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    valid: np.ndarray | None = None
    for ds, info in zip(datasets, infos, strict=True):
        if nodata is None and info.all_valid:
            continue
        win = _source_window(info, bounds)
        try:
            if nodata is not None:
                data = ds.read(
                    window=win, out_shape=(info.count, *shape), resampling=Resampling.nearest
                )
                ok = np.any(data != np.asarray(nodata, dtype=data.dtype), axis=0)
            else:
                ok = ds.dataset_mask(window=win, out_shape=shape, resampling=Resampling.nearest) > 0
        except (RasterioError, OSError) as e:
            raise SceneError(
                "read", f"{info.uri}: cannot read: {_describe_io_error(e)}", scene_id
            ) from e
        valid = ok if valid is None else valid & ok
    return valid


def _check_readable(datasets: Sequence[Any], infos: Sequence[_BandInfo], scene_id: str) -> None:
    """Read the last pixel of every band file: truncated files fail here, not at encode time."""
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    for ds, info in zip(datasets, infos, strict=True):
        try:
            ds.read(1, window=Window(info.width - 1, info.height - 1, 1, 1))
        except (RasterioError, OSError) as e:
            raise SceneError(
                "read",
                f"{info.uri}: cannot read pixels (truncated or corrupt file?): {_describe_io_error(e)}",
                scene_id,
            ) from e


def wgs84_bbox(
    crs: str, bounds: Sequence[float], densify: int = WGS84_DENSIFY, transformer: Any = None
) -> list[float]:
    """``[min_lon, min_lat, max_lon, max_lat]`` enclosing a footprint given in ``crs``.

    Each edge is densified with ``densify`` points before transforming, so the box encloses the
    curved footprint, not only its corners. A footprint crossing the antimeridian gives
    ``min_lon > max_lon`` (the RFC 7946 / STAC convention).
    """
    if transformer is None:
        from pyproj import Transformer

        transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    w, s, e, n = transformer.transform_bounds(*bounds, densify_pts=densify)
    return [float(w), float(s), float(e), float(n)]


def tile_scene(
    scene: Scene,
    *,
    chip_size: int = 256,
    overlap: int = 0,
    resolution: float | None = None,
    max_nodata: float = 0.5,
    edge: str = "clip",
    footprint_tolerance: float = 1.0,
    chip_rows: tuple[int, int] | None = None,
    check_read: bool = True,
) -> Tiles:
    """Cut a scene into chip rows (the chip pixels are not read, only masks where needed).

    Args:
        scene: the scene.
        chip_size: chip side in grid pixels.
        overlap: pixels shared by neighbouring chips.
        resolution: grid pixel size in CRS units (``None``: the finest band's).
        max_nodata: chips with a larger nodata fraction are skipped (``1.0`` keeps all and reads
            no masks).
        edge: ``clip`` or ``shift`` (see :func:`chip_offsets`).
        footprint_tolerance: see :func:`scene_grid`.
        chip_rows: only the chip rows ``[start, stop)`` (to split a big scene over tasks).
        check_read: read the last pixel of every band file first, so truncated files are
            reported here (one block per file on S3); a job that splits a scene over tasks checks
            once, when it plans the scene.

    Returns:
        :class:`Tiles`; each row has ``item_id`` (``<scene_id>/r<row>_c<col>``, the chip's pixel
        offsets on the grid), ``image_uri`` (chip URI), ``captions`` (the scene's),
        ``scene_id``, ``bands`` (band files, channel order), ``crs``, ``bounds`` (scene CRS,
        ``[minx, miny, maxx, maxy]``), ``bbox`` (WGS84, :func:`wgs84_bbox`), ``datetime``,
        ``sensor``, ``nodata_fraction``.

    Raises:
        SceneError: stages ``open``, ``georef``, ``footprint``, ``window``, ``read``.
        ValueError: bad chip parameters.
    """
    from pyproj import Transformer
    from pyproj.exceptions import ProjError

    if not 0.0 <= max_nodata <= 1.0:
        raise ValueError(f"max_nodata must be in [0, 1], got {max_nodata}")
    sid = scene.scene_id
    files = [_absolute(b) for b in scene.bands]
    out = Tiles()
    with _opened(scene.bands, sid) as datasets:
        infos = [_band_info(ds, u, sid) for ds, u in zip(datasets, scene.bands, strict=True)]
        grid = _grid_from_infos(infos, resolution, footprint_tolerance, sid)
        out.grid = grid
        col0, row0, width, height = _area(scene, grid)
        rows = chip_offsets(row0, height, chip_size, overlap, edge)
        cols = chip_offsets(col0, width, chip_size, overlap, edge)
        out.chip_rows = len(rows)
        if chip_rows is not None:
            rows = rows[chip_rows[0] : chip_rows[1]]
        if check_read:
            _check_readable(datasets, infos, sid)
        try:
            transformer = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True)
        except ProjError as e:
            raise SceneError(
                "georef", f"CRS {grid.crs:.80} has no transformation to WGS84: {e}", sid
            ) from e
        for r_off, r_size in rows:
            strip = grid.window_bounds(col0, r_off, width, r_size)
            valid = None
            if max_nodata < 1.0:
                valid = _valid_mask(datasets, infos, strip, (r_size, width), scene.nodata, sid)
            for c_off, c_size in cols:
                frac = 0.0
                if valid is not None:
                    frac = 1.0 - float(valid[:, c_off - col0 : c_off - col0 + c_size].mean())
                    if frac > max_nodata:
                        out.skipped_nodata += 1
                        continue
                bounds = grid.window_bounds(c_off, r_off, c_size, r_size)
                out.rows.append(
                    {
                        "item_id": f"{sid}/r{r_off}_c{c_off}",
                        "image_uri": chip_uri(files[0], (c_off, r_off, c_size, r_size), bounds),
                        "captions": list(scene.captions),
                        "scene_id": sid,
                        "bands": list(files),
                        "crs": grid.crs,
                        "bounds": [float(v) for v in bounds],
                        "bbox": wgs84_bbox(grid.crs, bounds, transformer=transformer),
                        "datetime": scene.datetime,
                        "sensor": scene.sensor,
                        "nodata_fraction": frac,
                    }
                )
    return out
