"""Chip URIs and windowed reads of band files through GDAL/rasterio (local or S3).

The I/O layer under :mod:`duch_core.scenes` and :mod:`duch_core.scene_lists`, kept apart so
readers of chips (encoders, serving) need neither the tiling nor the scene-list code.

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

**Errors.** Every failure of a scene, a chip or a scene list is a :class:`SceneError` with a
``stage`` (:data:`STAGES`) and a ``reason``: a scene list that cannot be read or is empty, a
scene without CRS or geotransform, an unreadable or truncated band file, band files of different
CRS or footprint, a window outside the scene.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from duch_core import storage
from duch_core.uris import local_path, s3_settings, split_s3

__all__ = [
    "RASTER_EXTENSIONS",
    "STAGES",
    "ChipRef",
    "SceneError",
    "chip_files",
    "chip_uri",
    "chip_groups",
    "decode_chip",
    "decode_chips",
    "gdal_options",
    "is_transient",
    "is_chip_uri",
    "parse_chip_uri",
    "read_window",
]

STAGES: tuple[str, ...] = ("scene_list", "open", "georef", "footprint", "window", "read")
"""Where a scene can fail: reading the scene list, opening a band file, its georeferencing, the
agreement of the band files, the requested window, reading pixels."""

RASTER_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".jp2", ".j2k", ".j2c", ".jpx", ".jpf")
"""Extensions of band files GDAL may open on S3 (``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``)."""

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
    s = s3_settings()
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
        bucket, key = split_s3(uri)
        return f"/vsis3/{bucket}/{key}"
    if uri.startswith("file://"):
        return local_path(uri)
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


# --------------------------------------------------------------------------------------------
# reading a chip


def _parse_chip(chip: str | Mapping[str, Any], max_pixels: int) -> tuple[ChipRef, list[str]]:
    """The chip's parsed URI and band files; refuses chips over ``max_pixels`` (``window``)."""
    uri = str(chip["image_uri"]) if isinstance(chip, Mapping) else chip
    ref = parse_chip_uri(uri)
    files = chip_files(chip)
    _, _, w, h = ref.window
    if w * h > max_pixels:
        raise SceneError("window", f"chip of {w} x {h} pixels exceeds max_pixels={max_pixels}")
    return ref, files


def read_window(
    chip: str | Mapping[str, Any],
    *,
    resampling: str = "bilinear",
    max_pixels: int = 1 << 26,
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The pixels of one chip, ``(H, W, C)`` in the band files' dtype (their common type).

    Args:
        chip: a chip row (``image_uri`` and, for several band files, ``bands``) or a chip URI.
        resampling: how bands coarser (or offset) relative to the chip grid are resampled:
            ``nearest``, ``bilinear``, ``cubic`` or ``average``. Aligned bands are read as is;
            a grid coarser than a file is read from the file's overviews where it has them
            (GDAL's choice: fewer bytes, values as the overviews were made).
        max_pixels: refuse chips larger than this (``H * W``).
        out_shape: ``(height, width)`` to read the chip at instead of its own size (smaller
            for a preview: GDAL then reads from the files' overviews where they have them).

    Raises:
        SceneError: stages ``window`` (malformed URI, window outside a band file), ``open``,
            ``georef``, ``read``.
    """
    if resampling not in _RESAMPLING:
        raise ValueError(f"resampling must be one of {_RESAMPLING}, got {resampling!r}")
    ref, files = _parse_chip(chip, max_pixels)
    _, _, w, h = ref.window
    out_h, out_w = (h, w) if out_shape is None else (int(out_shape[0]), int(out_shape[1]))
    with _opened(files) as datasets:
        return _read_opened(datasets, files, ref, resampling, (out_h, out_w))


def _read_opened(
    datasets: Sequence[Any],
    files: Sequence[str],
    ref: ChipRef,
    resampling: str,
    out_hw: tuple[int, int],
) -> np.ndarray:
    """The chip ``ref`` from already opened band files (see :func:`read_window`)."""
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    col, row, w, h = ref.window
    parts = []
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
                    out_shape=(info.count, *out_hw),
                    resampling=getattr(Resampling, resampling),
                )
            )
        except (RasterioError, OSError) as e:
            raise SceneError("read", f"{f}: cannot read the chip: {_describe_io_error(e)}") from e
    dtype = np.result_type(*parts)
    return np.ascontiguousarray(
        np.concatenate([p.astype(dtype, copy=False) for p in parts]).transpose(1, 2, 0)
    )


# --------------------------------------------------------------------------------------------
# chips as the encoders' pictures

_TRANSIENT = re.compile(
    r"HTTP response code: (?:5\d\d|429)|timed out|[Tt]imeout|Connection (?:reset|refused)|"
    r"Couldn't connect|Could not connect|SlowDown|Throttl|RequestTimeTooSkewed"
)


def is_transient(error: SceneError) -> bool:
    """Whether a chip read failed because the store did (5xx, throttling, timeouts, resets)
    rather than the data: such an item is kept with its previous codes and tried again on the
    next run. Only ``open`` and ``read`` failures can be transient."""
    return error.stage in ("open", "read") and bool(_TRANSIENT.search(error.reason))


def decode_chip(
    chip: str | Mapping[str, Any],
    *,
    max_pixels: int = 1 << 26,
    bands: Sequence[int] | None = None,
    depth: str = "stretch",
    resampling: str = "bilinear",
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """One chip as an ``(H, W, 3)`` uint8 picture: :func:`read_window`, then the same band rule
    and bit-depth rule as :func:`duch_core.imageio.decode_image` applies to image files, so a
    chip and a file holding the same pixels give the same picture. ``out_shape`` reads it
    smaller (a preview, from overviews where the files have them).

    Raises:
        SceneError: as :func:`read_window`.
        duch_core.imageio.ImageDecodeError: a bad band selection.
    """
    from duch_core.imageio import select_bands, to_uint8

    arr = read_window(chip, resampling=resampling, max_pixels=max_pixels, out_shape=out_shape)
    return np.ascontiguousarray(to_uint8(select_bands(arr, bands), depth))


def chip_groups(chips: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Indices of ``chips`` grouped by the band files they read (first appearance order), for
    :func:`decode_chips`; a chip whose URI does not parse is a group of its own."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, chip in enumerate(chips):
        try:
            key: tuple[str, ...] = tuple(chip_files(chip))
        except SceneError:
            key = ("", str(i))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def decode_chips(
    chips: Sequence[Mapping[str, Any]],
    *,
    max_pixels: int = 1 << 26,
    bands: Sequence[int] | None = None,
    depth: str = "stretch",
    resampling: str = "bilinear",
) -> list[np.ndarray | Exception]:
    """:func:`decode_chip` of each chip, each set of band files opened once for all the chips
    that read it (chips of one scene: one open per band file instead of one per chip, which on
    S3 is most of the cost of a small chip). Failures are returned in place of the picture,
    as the exceptions :func:`decode_chip` raises; one chip's failure never affects another,
    except that a band file that cannot be opened fails every chip that reads it."""
    from duch_core.imageio import select_bands, to_uint8

    if resampling not in _RESAMPLING:
        raise ValueError(f"resampling must be one of {_RESAMPLING}, got {resampling!r}")
    out: list[np.ndarray | Exception | None] = [None] * len(chips)
    by_files: dict[tuple[str, ...], list[tuple[int, ChipRef]]] = {}
    for i, chip in enumerate(chips):
        try:
            ref, files = _parse_chip(chip, max_pixels)
        except SceneError as e:
            out[i] = e
            continue
        by_files.setdefault(tuple(files), []).append((i, ref))
    for group, members in by_files.items():
        try:
            with _opened(group) as datasets:
                for i, ref in members:
                    try:
                        arr = _read_opened(
                            datasets, group, ref, resampling, (ref.window[3], ref.window[2])
                        )
                        out[i] = np.ascontiguousarray(to_uint8(select_bands(arr, bands), depth))
                    except Exception as e:  # noqa: BLE001 - this chip's failure only
                        out[i] = e
        except SceneError as e:  # a band file did not open: every chip reading it fails
            for i, _ in members:
                if out[i] is None:
                    out[i] = e
    assert all(x is not None for x in out)  # every chip got a picture or its error above
    return [x for x in out if x is not None]
