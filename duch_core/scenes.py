"""Georeferenced scenes cut into chips that are read by window, never copied.

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

**Chip URIs** (``image_uri`` of a chip row)::

    <first band file>#window=<col>,<row>,<width>,<height>&bounds=<minx>,<miny>,<maxx>,<maxy>

``window`` is the chip's pixel window on the scene's chip grid (integers; ``width`` x ``height``
is the size of the decoded chip); ``bounds`` is its footprint in the scene CRS (shortest
round-trip decimals). Each band file is read at the window ``bounds`` covers in *its own* pixel
grid, resampled to ``height`` x ``width``, so the URI does not depend on any file's resolution.
Without ``bounds`` (a hand-written URI) the window is taken in the file's own pixel grid. The
row's ``bands`` column lists every band file in channel order (its first entry is the file of the
URI); a URI alone describes a single-file scene. The fragment starts at the last ``#window=``, so
object keys holding ``#`` still parse. :func:`chip_files` lists the files a chip reads (for
fingerprints), :func:`parse_chip_uri` parses the URI.

**S3.** ``s3://`` band files are read through GDAL's ``/vsis3/`` with the settings of
:mod:`duch_core.storage` (``AWS_ENDPOINT_URL[_S3]``, region, keys, :func:`storage.configure_s3`),
mapped to GDAL options by :func:`gdal_options`: path-style addressing, ``AWS_HTTPS=NO`` for an
``http://`` endpoint, no directory listing on open. Band files on S3 must end in one of
:data:`RASTER_EXTENSIONS` (GDAL is told that no other object exists, which saves requests).

**Errors.** Every failure is a :class:`SceneError` with a ``stage`` (:data:`STAGES`) and a
``reason``: a scene list that cannot be read or is empty, a scene without CRS or geotransform,
an unreadable or truncated band file, band files of different CRS or footprint, a window outside
the scene.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from duch_core import storage
from duch_core.archive import manifest_dir, resolve_image_uri

__all__ = [
    "RASTER_EXTENSIONS",
    "STAGES",
    "ChipRef",
    "Scene",
    "SceneError",
    "SceneGrid",
    "SceneList",
    "Tiles",
    "chip_files",
    "chip_offsets",
    "chip_uri",
    "gdal_options",
    "is_chip_uri",
    "parse_chip_uri",
    "read_scene_list",
    "read_window",
    "scene_grid",
    "scenes_from_stac",
    "tile_scene",
    "to_utc_iso",
    "wgs84_bbox",
]

STAGES: tuple[str, ...] = ("scene_list", "open", "georef", "footprint", "window", "read")
"""Where a scene can fail: reading the scene list, opening a band file, its georeferencing, the
agreement of the band files, the requested window, reading pixels."""

RASTER_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".jp2", ".j2k", ".j2c", ".jpx", ".jpf")
"""Extensions of band files GDAL may open on S3 (``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``)."""

WGS84_DENSIFY = 21
"""Points per chip edge transformed to WGS84, so the box encloses the curved footprint."""

_EPS = 1e-6  # grid pixels: float slack when snapping bounds to the grid
_RESAMPLING = ("nearest", "bilinear", "cubic", "average")


class SceneError(ValueError):
    """A scene (or scene list) cannot be tiled or read.

    Attributes:
        stage: one of :data:`STAGES`.
        reason: what is wrong and, where it helps, what to do.
        scene_id: the scene concerned ("" when unknown, e.g. an unreadable scene list).
    """

    def __init__(self, stage: str, reason: str, scene_id: str = "") -> None:
        self.stage = stage
        self.reason = reason
        self.scene_id = scene_id
        super().__init__(f"{scene_id + ': ' if scene_id else ''}[{stage}] {reason}")


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


@dataclass(frozen=True)
class ChipRef:
    """A parsed chip URI: the file of the URI, the window, and (usually) its footprint."""

    file: str
    window: tuple[int, int, int, int]  # col, row, width, height
    bounds: tuple[float, float, float, float] | None


# --------------------------------------------------------------------------------------------
# chip URIs

_FRAGMENT = "#window="


def _num(v: float) -> str:
    """Shortest decimal that round-trips (``435730.0`` -> ``435730``)."""
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def chip_uri(file: str, window: Sequence[int], bounds: Sequence[float] | None = None) -> str:
    """The ``image_uri`` of a chip (format in the module docstring)."""
    col, row, w, h = (int(v) for v in window)
    uri = f"{file}{_FRAGMENT}{col},{row},{w},{h}"
    if bounds is not None:
        uri += "&bounds=" + ",".join(_num(b) for b in bounds)
    return uri


def is_chip_uri(uri: str) -> bool:
    """Whether ``uri`` names a chip (has a ``#window=`` fragment)."""
    return isinstance(uri, str) and _FRAGMENT in uri


def parse_chip_uri(uri: str) -> ChipRef:
    """Parse a chip URI.

    Raises:
        SceneError: stage ``window``: no ``#window=`` fragment, or malformed values.
    """
    pos = uri.rfind(_FRAGMENT) if isinstance(uri, str) else -1
    if pos <= 0:
        raise SceneError("window", f"not a chip URI (no '{_FRAGMENT}' fragment): {uri!r}")
    file, frag = uri[:pos], uri[pos + 1 :]
    fields: dict[str, str] = {}
    for part in frag.split("&"):
        key, sep, value = part.partition("=")
        if not sep or key in fields:
            raise SceneError("window", f"malformed chip fragment {frag!r} in {uri!r}")
        fields[key] = value
    unknown = set(fields) - {"window", "bounds"}
    if unknown:
        raise SceneError("window", f"unknown chip fragment key(s) {sorted(unknown)} in {uri!r}")
    try:
        window = tuple(int(v) for v in fields["window"].split(","))
        bounds = (
            tuple(float(v) for v in fields["bounds"].split(",")) if "bounds" in fields else None
        )
    except ValueError as e:
        raise SceneError("window", f"malformed numbers in chip URI {uri!r}") from e
    if (
        len(window) != 4
        or window[2] < 1
        or window[3] < 1
        or (bounds is not None and len(bounds) != 4)
    ):
        raise SceneError("window", f"expected window=col,row,w,h and bounds=4 numbers: {uri!r}")
    if bounds is not None and not (bounds[0] < bounds[2] and bounds[1] < bounds[3]):
        raise SceneError("window", f"empty or inverted chip bounds in {uri!r}")
    return ChipRef(file, window, bounds)  # type: ignore[arg-type]


def chip_files(chip: str | Mapping[str, Any]) -> list[str]:
    """The band files a chip reads, in channel order: the row's ``bands`` or the URI's file."""
    if isinstance(chip, Mapping):
        bands = chip.get("bands")
        if bands is not None and len(bands) > 0:
            return [str(b) for b in bands]
        chip = str(chip["image_uri"])
    return [parse_chip_uri(chip).file]


# --------------------------------------------------------------------------------------------
# GDAL access


def gdal_options() -> dict[str, str]:
    """GDAL config options for reading band files, S3 ones from :mod:`duch_core.storage`'s settings.

    Returns ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``, ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS`` and,
    where set, ``AWS_S3_ENDPOINT`` (+ ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING=FALSE``),
    ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``.
    Without keys GDAL uses its own AWS credential chain.
    """
    # the one reader of the S3 settings, so GDAL and pyarrow always talk to the same store
    s = storage._s3_settings()
    opts = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(RASTER_EXTENSIONS),
    }
    if s.endpoint:
        opts["AWS_S3_ENDPOINT"] = s.endpoint
        opts["AWS_HTTPS"] = "NO" if s.scheme == "http" else "YES"
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if s.region:
        opts["AWS_REGION"] = s.region
    if s.access_key and s.secret_key:
        opts["AWS_ACCESS_KEY_ID"] = s.access_key
        opts["AWS_SECRET_ACCESS_KEY"] = s.secret_key
        if s.session_token:
            opts["AWS_SESSION_TOKEN"] = s.session_token
    return opts


def _absolute(uri: str) -> str:
    """Local paths made absolute (chip URIs must not depend on the working directory)."""
    if storage.is_s3(uri) or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _gdal_path(uri: str) -> str:
    if storage.is_s3(uri):
        bucket, key = storage._split_s3(uri)
        return f"/vsis3/{bucket}/{key}"
    if uri.startswith("file://"):
        return storage._local_path(uri)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri):
        raise SceneError("open", f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def _describe_io_error(e: Exception) -> str:
    msg = str(e)
    if "does not exist" in msg or "No such file" in msg or "HTTP response code: 404" in msg:
        return f"no such file ({msg})"
    if "not recognized as" in msg:
        return f"not a raster GDAL can read ({msg})"
    if "HTTP response code: 403" in msg or "Access Denied" in msg:
        return f"access denied (check the AWS settings) ({msg})"
    return msg


_AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_sessions: dict[tuple[tuple[str, str], ...], Any] = {}


def _rasterio_env(s3: bool) -> Any:
    """A ``rasterio.Env`` with :func:`gdal_options`.

    rasterio accepts AWS credentials only through a session object, so the keys (or, without
    keys, boto3's default chain) go into a cached ``AWSSession`` and the rest into the Env.
    """
    import rasterio
    from rasterio.session import AWSSession

    opts = gdal_options()
    if not s3:
        return rasterio.Env(**{k: v for k, v in opts.items() if not k.startswith("AWS_")})
    key = tuple(sorted(opts.items()))
    session = _sessions.get(key)
    if session is None:
        session = AWSSession(
            aws_access_key_id=opts.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=opts.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=opts.get("AWS_SESSION_TOKEN"),
            region_name=opts.get("AWS_REGION"),
            endpoint_url=opts.get("AWS_S3_ENDPOINT"),
        )
        _sessions[key] = session
    return rasterio.Env(session=session, **{k: v for k, v in opts.items() if k not in _AWS_KEYS})


@contextmanager
def _opened(uris: Sequence[str], scene_id: str = "") -> Iterator[list[Any]]:
    """Open band files (inside one GDAL environment) as rasterio datasets."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    with ExitStack() as stack:
        stack.enter_context(_rasterio_env(any(storage.is_s3(u) for u in uris)))
        datasets = []
        for uri in uris:
            if storage.is_s3(uri) and not uri.lower().endswith(RASTER_EXTENSIONS):
                raise SceneError(
                    "open",
                    f"{uri}: band files on S3 must end in one of {', '.join(RASTER_EXTENSIONS)}",
                    scene_id,
                )
            try:
                with warnings.catch_warnings():  # a missing geotransform is reported below
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    datasets.append(stack.enter_context(rasterio.open(_gdal_path(uri))))
            except (RasterioError, OSError) as e:
                raise SceneError(
                    "open", f"{uri}: cannot open: {_describe_io_error(e)}", scene_id
                ) from e
        yield datasets


def _crs_string(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


@dataclass(frozen=True)
class _BandInfo:
    uri: str
    crs: Any
    transform: Any  # affine.Affine
    width: int
    height: int
    count: int
    dtype: str
    all_valid: bool  # no nodata value, mask or alpha: every pixel is valid

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)


def _band_info(ds: Any, uri: str, scene_id: str) -> _BandInfo:
    from rasterio.enums import MaskFlags

    if ds.crs is None:
        why = "it is georeferenced by GCPs only; warp it to a grid first" if ds.gcps[0] else ""
        raise SceneError("georef", f"{uri}: no CRS {why}".strip(), scene_id)
    t = ds.transform
    if t.is_identity:
        raise SceneError(
            "georef", f"{uri}: no geotransform (pixel grid not georeferenced)", scene_id
        )
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise SceneError(
            "georef",
            f"{uri}: rotated or flipped grid {tuple(t)[:6]} is not supported; warp it north-up",
            scene_id,
        )
    all_valid = all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)
    return _BandInfo(uri, ds.crs, t, ds.width, ds.height, ds.count, ds.dtypes[0], all_valid)


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


def _source_window(info: Any, bounds: Sequence[float]) -> Any:
    """The window ``bounds`` covers in a file's own pixel grid (integers when it is aligned)."""
    from rasterio.windows import Window

    t = info.transform
    vals = [
        (bounds[0] - t.c) / t.a,
        (bounds[3] - t.f) / t.e,
        (bounds[2] - bounds[0]) / t.a,
        (bounds[1] - bounds[3]) / t.e,
    ]
    vals = [round(v) if abs(v - round(v)) < _EPS else v for v in vals]
    return Window(*vals)


def _check_inside(win: Any, width: int, height: int, what: str, scene_id: str) -> None:
    if (
        win.col_off < -_EPS
        or win.row_off < -_EPS
        or win.col_off + win.width > width + _EPS
        or win.row_off + win.height > height + _EPS
    ):
        raise SceneError(
            "window",
            f"{what}: window col={win.col_off:.6g} row={win.row_off:.6g} "
            f"{win.width:.6g} x {win.height:.6g} is outside the file's {width} x {height} pixels",
            scene_id,
        )


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


# --------------------------------------------------------------------------------------------
# reading a chip


def read_window(
    chip: str | Mapping[str, Any],
    *,
    resampling: str = "bilinear",
    max_pixels: int = 1 << 26,
) -> np.ndarray:
    """The pixels of one chip, ``(H, W, C)`` in the band files' dtype (their common type).

    Args:
        chip: a chip row (``image_uri`` and, for several band files, ``bands``) or a chip URI.
        resampling: how bands coarser (or offset) relative to the chip grid are resampled:
            ``nearest``, ``bilinear``, ``cubic`` or ``average``. Aligned bands are read as is;
            a grid coarser than a file is read from the file's overviews where it has them
            (GDAL's choice: fewer bytes, values as the overviews were made).
        max_pixels: refuse chips larger than this (``H * W``).

    Raises:
        SceneError: stages ``window`` (malformed URI, window outside a band file), ``open``,
            ``georef``, ``read``.
    """
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    if resampling not in _RESAMPLING:
        raise ValueError(f"resampling must be one of {_RESAMPLING}, got {resampling!r}")
    uri = str(chip["image_uri"]) if isinstance(chip, Mapping) else chip
    ref = parse_chip_uri(uri)
    files = chip_files(chip)
    col, row, w, h = ref.window
    if w * h > max_pixels:
        raise SceneError("window", f"chip of {w} x {h} pixels exceeds max_pixels={max_pixels}")
    parts = []
    with _opened(files) as datasets:
        for ds, f in zip(datasets, files, strict=True):
            info = _band_info(ds, f, "")
            if ref.bounds is not None:
                win = _source_window(info, ref.bounds)
            else:
                from rasterio.windows import Window

                win = Window(col, row, w, h)
            _check_inside(win, info.width, info.height, f, "")
            try:
                parts.append(
                    ds.read(
                        window=win,
                        out_shape=(info.count, h, w),
                        resampling=getattr(Resampling, resampling),
                    )
                )
            except (RasterioError, OSError) as e:
                raise SceneError(
                    "read", f"{f}: cannot read the chip: {_describe_io_error(e)}"
                ) from e
    dtype = np.result_type(*parts)
    return np.ascontiguousarray(
        np.concatenate([p.astype(dtype, copy=False) for p in parts]).transpose(1, 2, 0)
    )


# --------------------------------------------------------------------------------------------
# scene lists


@dataclass
class SceneList:
    """Scenes read from a scene list, and the entries that could not be used."""

    scenes: list[Scene] = field(default_factory=list)
    errors: list[SceneError] = field(default_factory=list)


_MANIFEST_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson")


def read_scene_list(uri: str, assets: Sequence[str] = ()) -> SceneList:
    """Read a scene list: a scene manifest, a STAC ItemCollection/Item, or stac-geoparquet.

    Formats, by suffix:

    * ``.json``: a STAC ItemCollection (``FeatureCollection``) or a single Item (``Feature``).
    * ``.jsonl`` (and other JSON-lines suffixes): one scene-manifest row per line
      (:meth:`Scene.from_dict`), or one STAC Item per line.
    * ``.parquet``/``.pq``: stac-geoparquet (an ``id`` and an ``assets`` column) or a scene
      manifest table.

    Args:
        uri: local path or ``s3://``.
        assets: STAC band selection, in channel order (see :func:`scenes_from_stac`).

    Returns:
        :class:`SceneList`; bad entries (missing fields, duplicate ids, unusable items) are in
        ``errors`` and the rest is kept.

    Raises:
        SceneError: stage ``scene_list``: unreadable file, unknown format, no entries at all.
    """
    low = uri.lower().rstrip("/")
    base = manifest_dir(uri)
    try:
        if low.endswith((".parquet", ".pq")):
            out = _from_parquet(uri, base, assets)
        elif low.endswith(".json"):
            obj = json.loads(storage.read_bytes(uri).decode("utf-8"))
            out = scenes_from_stac(obj, uri, assets, base)
        elif low.endswith(_MANIFEST_SUFFIXES):
            out = _from_rows(_json_lines(uri), uri, base, assets)
        else:
            raise SceneError(
                "scene_list",
                f"{uri}: unknown scene list format: use .json (STAC), .jsonl or .parquet",
            )
    except SceneError:
        raise
    except storage.NotFoundError as e:
        raise SceneError("scene_list", f"{uri}: scene list not found") from e
    except (OSError, ValueError, storage.StorageError) as e:
        raise SceneError("scene_list", f"{uri}: cannot read the scene list: {e}") from e
    if not out.scenes and not out.errors:
        raise SceneError("scene_list", f"{uri}: the scene list has no entries")
    return _dedupe(out)


def _json_lines(uri: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError(f"line {n} is not a JSON object")
        rows.append(obj)
    return rows


def _from_rows(
    rows: Sequence[Mapping[str, Any]], where: str, base: str, assets: Sequence[str]
) -> SceneList:
    out = SceneList()
    for row in rows:
        try:
            if row.get("type") == "Feature" and "assets" in row:
                out.scenes.append(_scene_from_item(row, base, assets))
            else:
                out.scenes.append(Scene.from_dict(row, base))
        except SceneError as e:
            out.errors.append(e)
    return out


def _from_parquet(uri: str, base: str, assets: Sequence[str]) -> SceneList:
    table = storage.read_parquet(uri)
    rows = table.to_pylist()
    if "assets" in table.column_names and "id" in table.column_names:
        return _from_rows([_geoparquet_item(r) for r in rows], uri, base, assets)
    return _from_rows(rows, uri, base, assets)


def _geoparquet_item(row: dict[str, Any]) -> dict[str, Any]:
    """A stac-geoparquet row (properties as top-level columns) back as a STAC Item dict."""
    top = {
        "type",
        "stac_version",
        "stac_extensions",
        "id",
        "geometry",
        "bbox",
        "links",
        "assets",
        "collection",
    }
    props = {
        k: (to_utc_iso(v) if isinstance(v, datetime) else v) for k, v in row.items() if k not in top
    }
    item_assets = {
        k: {kk: vv for kk, vv in a.items() if vv is not None}
        for k, a in (row.get("assets") or {}).items()
        if a
    }
    return {
        "type": "Feature",
        "stac_version": row.get("stac_version") or "1.0.0",
        "id": row.get("id"),
        "geometry": None,
        "properties": props,
        "links": [],
        "assets": item_assets,
    }


def scenes_from_stac(
    obj: Mapping[str, Any], where: str, assets: Sequence[str] = (), base_dir: str | None = None
) -> SceneList:
    """Scenes from a STAC ItemCollection or Item (a parsed JSON object), through pystac.

    Per item: ``id`` is the scene id; ``properties.datetime`` (or ``start_datetime``) the time;
    ``platform`` (else ``constellation``) the sensor; a ``captions`` property (list of strings),
    if any, the captions. Band files are the item's assets: with ``assets`` given, each entry
    names an asset key, or a band ``name``/``common_name`` from the asset's ``eo:bands`` (or
    STAC 1.1 ``bands``), in channel order; otherwise every asset with role ``data`` (or no role)
    whose media type or file name is a raster, preferring those that describe bands, in the
    item's order. Relative hrefs are resolved against the item's self link, else ``base_dir``.

    Raises:
        SceneError: stage ``scene_list``: not a STAC Item/ItemCollection, or an empty collection.
    """
    kind = obj.get("type") if isinstance(obj, Mapping) else None
    if kind == "Feature":
        items = [dict(obj)]
    elif kind == "FeatureCollection":
        items = list(obj.get("features") or [])
        if not items:
            raise SceneError("scene_list", f"{where}: the STAC ItemCollection has no items")
    else:
        raise SceneError(
            "scene_list", f"{where}: not a STAC ItemCollection or Item (type is {kind!r})"
        )
    out = SceneList()
    for it in items:
        try:
            out.scenes.append(_scene_from_item(it, base_dir, assets))
        except SceneError as e:
            out.errors.append(e)
    return out


_RASTER_TYPES = ("image/tiff", "image/jp2", "image/vnd.stac.geotiff")


def _asset_bands(asset: Any) -> list[Mapping[str, Any]]:
    extra = asset.extra_fields
    bands = extra.get("eo:bands") or extra.get("bands") or []
    return [b for b in bands if isinstance(b, Mapping)]


def _scene_from_item(item: Mapping[str, Any], base_dir: str | None, assets: Sequence[str]) -> Scene:
    import pystac

    sid = item.get("id") if isinstance(item, Mapping) else None
    sid = sid if isinstance(sid, str) and sid else ""
    try:
        parsed = pystac.Item.from_dict(dict(item), preserve_dict=True, migrate=False)
    except Exception as e:  # noqa: BLE001 - pystac raises many types for malformed items
        raise SceneError("scene_list", f"not a valid STAC Item: {e}", sid) from e
    sid = parsed.id
    props = parsed.properties

    def href(a: Any) -> str:
        h = a.get_absolute_href() or a.href
        if base_dir is not None:
            h = _absolute(resolve_image_uri(base_dir, h))
        return str(h)

    if assets:
        chosen = []
        for name in assets:
            found = None
            for key, a in parsed.assets.items():
                names = {key} | {
                    str(b.get(k))
                    for b in _asset_bands(a)
                    for k in ("name", "common_name")
                    if b.get(k)
                }
                if name in names:
                    found = a
                    break
            if found is None:
                raise SceneError(
                    "scene_list",
                    f"no asset or band named {name!r}; assets: {sorted(parsed.assets)}",
                    sid,
                )
            chosen.append(found)
    else:
        data = [
            a
            for a in parsed.assets.values()
            if (not a.roles or "data" in a.roles)
            and (
                (a.media_type or "").split(";")[0].strip() in _RASTER_TYPES
                or a.href.lower().endswith(RASTER_EXTENSIONS)
            )
        ]
        with_bands = [a for a in data if _asset_bands(a)]
        chosen = with_bands or data
        if not chosen:
            raise SceneError(
                "scene_list", f"no raster data assets (assets: {sorted(parsed.assets)})", sid
            )
    when = props.get("datetime") or props.get("start_datetime")
    try:
        when = to_utc_iso(when)
    except ValueError as e:
        raise SceneError("scene_list", f"no usable datetime: {e}", sid) from e
    sensor = props.get("platform") or props.get("constellation") or ""
    captions = props.get("captions") or []
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SceneError("scene_list", "the 'captions' property must be a list of strings", sid)
    return Scene(
        scene_id=sid,
        bands=tuple(href(a) for a in chosen),
        datetime=when,
        sensor=str(sensor),
        captions=tuple(captions),
    )


def _dedupe(out: SceneList) -> SceneList:
    seen: set[str] = set()
    kept = []
    for s in out.scenes:
        if s.scene_id in seen:
            out.errors.append(
                SceneError("scene_list", "duplicate scene_id (the first one is kept)", s.scene_id)
            )
            continue
        seen.add(s.scene_id)
        kept.append(s)
    out.scenes = kept
    return out
