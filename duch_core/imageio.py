"""Image decoding, preprocessing and caption cleaning: the only way bytes and text enter a model.

Decoding rules (:func:`decode_image`), stated once here and recorded with every bundle through
``ImageBackboneConfig``:

* **Formats.** TIFF (any band count, 8/16/32-bit integer or float, uncompressed or compressed;
  read with ``tifffile``, Pillow as fallback), JPEG, PNG (16-bit colour PNG read with
  ``imagecodecs`` so no precision is lost before the stretch), and WebP/BMP/GIF through Pillow.
  Multi-page or animated files: the first image. JPEG EXIF orientation is applied.
* **Bands.** The decoded array is ``(H, W, C)``. ``C == 1`` (grey) and ``C == 2`` (grey + alpha):
  band 0 is repeated into R, G and B. ``C >= 3``: the bands at ``bands`` (default ``(0, 1, 2)``)
  become R, G, B, so RGBA drops its alpha and a multispectral stack uses its first three bands.
  Stacks stored in band-number order (Sentinel-2 B2, B3, B4, B8 = blue, green, red, NIR) need
  ``bands=(2, 1, 0)`` for true colour; set ``image_backbone.bands`` in the config.
* **Bit depth.** 8-bit data is used as is. Anything wider (16/32-bit integers, floats) is mapped
  to 8 bits per image with ``depth="stretch"`` (default): the 2nd and 98th percentiles of the
  selected bands taken together (estimated on at most about a million evenly strided samples)
  map linearly to 0 and 255, values outside are clipped, NaN/inf become 0. Remote-sensing
  products rarely use their type's full range (Landsat-8 is 12-bit data in 16-bit files), so a
  fixed scale gives near-black images; the joint stretch keeps the colour balance between
  bands. ``depth="scale"`` instead divides integer data by its type's maximum (uint16: by 257)
  and clips floats to ``[0, 1]``.
* **Safety.** Images with more than ``max_pixels`` pixels (``H * W``) are refused from their
  header, before any pixel is decoded (decompression bombs), and so are stacks with more than
  ``4 * max_pixels`` samples in all bands. Pillow's own bomb limit (about 179 M pixels) also
  applies. Empty, truncated, corrupt or unrecognised data raises :class:`ImageDecodeError`
  with the reason.
* **Memory.** Samples are converted to 8 bits in row blocks of about a million samples, so the
  float temporaries stay a few MB whatever the image size; the peak is the decoded file at its
  own bit depth plus the 8-bit result. ``reduce=f`` shrinks the picture by an integer factor
  (box average; JPEG through DCT scaling while decoding) *before* any conversion, for callers
  that need far fewer pixels than the file holds (query images, thumbnails):
  :func:`decode_for_model` picks the factor from a backbone's input size.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from duch_core.config import ImageBackboneConfig, TextBackboneConfig

DEFAULT_MAX_PIXELS = 1 << 26  # 67,108,864 pixels, e.g. 8192 x 8192
MAX_BANDS = 256
STRETCH_PERCENTILES = (2.0, 98.0)
_STRETCH_SAMPLES = 1 << 20
_PIL_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")
_PIL_REDUCE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})
_CHUNK_SAMPLES = 1 << 20  # samples per block when converting or reducing
_CAPTION_STRIP = re.compile(r"[.,!?]")
_SPACES = re.compile(r"\s+")


class ImageDecodeError(ValueError):
    """Image bytes cannot be decoded into a usable picture. The message gives the reason."""


class CaptionError(ValueError):
    """A caption is unusable: not text, empty once cleaned, or too long."""


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _kind(data: bytes) -> str:
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return "other"


def _check_size(h: int, w: int, c: int, max_pixels: int) -> None:
    if h <= 0 or w <= 0:
        raise ImageDecodeError(f"image has an empty size {w}x{h}")
    if h * w > max_pixels:
        raise ImageDecodeError(
            f"image is {w}x{h} = {h * w:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb); raise max_pixels if this is a genuine large tile"
        )
    if c > MAX_BANDS or h * w * c > 4 * max_pixels:
        raise ImageDecodeError(f"image has {c} bands of {w}x{h}: too many samples to decode")


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.series:
            raise ImageDecodeError("TIFF holds no image")
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise ImageDecodeError(f"TIFF image has no Y/X axes (axes {axes!r})")
        yi, xi = axes.index("Y"), axes.index("X")
        h, w = int(shape[yi]), int(shape[xi])
        c = int(np.prod([n for i, n in enumerate(shape) if i not in (yi, xi)], dtype=np.int64))
        _check_size(h, w, c, max_pixels)
        arr = np.asarray(series.asarray())
    arr = np.moveaxis(arr, (yi, xi), (0, 1))
    return arr.reshape(h, w, c)


def _png_is_16bit_colour(data: bytes) -> bool:
    # IHDR: 8-byte signature, length, "IHDR", width, height, bit depth (byte 24), colour type (25)
    return len(data) > 26 and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 6)


def _decode_pil(data: bytes, max_pixels: int, kind: str, reduce: int = 1) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image refused as a decompression bomb: {e}") from e
    except Exception as e:
        if kind != "other":
            raise ImageDecodeError(
                f"corrupt or truncated {kind.upper()} header: {type(e).__name__}: {e}"
            ) from e
        raise ImageDecodeError(
            "unrecognised image format (expected TIFF, JPEG, PNG, WebP, BMP or GIF)"
        ) from e
    w, h = opened.size
    _check_size(h, w, len(opened.getbands()), max_pixels)
    im: Any = opened
    if kind == "png" and _png_is_16bit_colour(data):
        try:
            import imagecodecs
        except ImportError:  # Pillow keeps the 8 high bits of each 16-bit sample
            pass
        else:
            return _block_reduce(np.asarray(imagecodecs.png_decode(data)), reduce)
    if kind == "jpeg" and reduce > 1:
        # DCT scaling by 1/2, 1/4 or 1/8 while decoding; the rest of the factor is done below
        im.draft(im.mode, (max(1, w // reduce), max(1, h // reduce)))
        reduce = max(1, int(reduce * im.size[0] / w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "Truncated File Read": raised below
        im.load()
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if kind == "jpeg":
            im = ImageOps.exif_transpose(im)
    if reduce > 1 and im.mode in _PIL_REDUCE_MODES:
        try:
            im = im.reduce(reduce)  # in Pillow's buffer: no full-size numpy copy
            reduce = 1
        except ValueError:  # a mode this Pillow cannot reduce: done in numpy below
            pass
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif im.mode == "PA":
        im = im.convert("LA")
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return _block_reduce(arr, reduce)


def _block_reduce(arr: np.ndarray, f: int) -> np.ndarray:
    """``(H, W[, C])`` -> ``(H // f, W // f, C)``: the mean of each ``f x f`` block, in the input
    dtype (integers rounded); the rows and columns left over are dropped evenly from both sides,
    so the centre stays the centre. Works through row blocks: its temporaries stay small."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if f <= 1:
        return arr
    h, w, c = arr.shape[0] // f, arr.shape[1] // f, arr.shape[2]
    if h == 0 or w == 0:
        raise ImageDecodeError(f"image of {arr.shape[1]}x{arr.shape[0]} cannot be reduced by {f}")
    top, left = (arr.shape[0] - h * f) // 2, (arr.shape[1] - w * f) // 2
    arr = arr[top : top + h * f, left : left + w * f]
    out = np.empty((h, w, c), arr.dtype)
    step = max(1, _CHUNK_SAMPLES // max(1, f * f * w * c))
    acc = np.float64 if arr.dtype.itemsize > 2 else np.float32
    for r in range(0, h, step):
        n = min(step, h - r)
        block = arr[r * f : (r + n) * f].reshape(n, f, w, f, c)
        mean = block.mean(axis=(1, 3), dtype=acc)
        if arr.dtype.kind in "ui":
            np.rint(mean, out=mean)
        elif arr.dtype == np.bool_:
            mean = mean >= 0.5
        out[r : r + n] = mean
    return out


def select_bands(arr: np.ndarray, bands: Sequence[int] | None = None) -> np.ndarray:
    """``(H, W, C)`` -> ``(H, W, 3)`` by the band rule (see the module docstring).

    Raises:
        ImageDecodeError: a requested band does not exist.
    """
    c = arr.shape[2]
    if c < 3:
        idx: list[int] = [0, 0, 0]
    elif bands:
        idx = [int(b) for b in bands]
        if len(idx) == 1:
            idx = idx * 3
        if len(idx) != 3:
            raise ImageDecodeError(f"bands must name 1 or 3 bands, got {list(bands)}")
        bad = [b for b in idx if not 0 <= b < c]
        if bad:
            raise ImageDecodeError(f"image has {c} bands (0..{c - 1}); bands {bad} do not exist")
    else:
        idx = [0, 1, 2]
    return arr[:, :, idx]


def _band_view(arr: np.ndarray, bands: Sequence[int] | None) -> np.ndarray:
    """:func:`select_bands` without copying where a view does: grey repeated by broadcasting,
    evenly spaced bands by slicing (read-only views, for :func:`to_uint8`)."""
    c = arr.shape[2]
    if c < 3:
        return np.broadcast_to(arr[:, :, :1], (*arr.shape[:2], 3))
    if not bands:
        return arr[:, :, :3]
    idx = [int(b) for b in bands]
    idx = idx * 3 if len(idx) == 1 else idx
    if len(idx) == 3 and all(0 <= b < c for b in idx):
        step = idx[1] - idx[0]
        if idx[2] - idx[1] == step:
            if step == 0:
                return np.broadcast_to(arr[:, :, idx[0] : idx[0] + 1], (*arr.shape[:2], 3))
            stop = idx[2] + (1 if step > 0 else -1)
            return arr[:, :, idx[0] : (stop if stop >= 0 else None) : step]
    return select_bands(arr, bands)  # also raises for bad band lists


def _stretch_sample(arr: np.ndarray) -> np.ndarray:
    """Every ``step``-th sample of ``arr`` in C order (at most about ``_STRETCH_SAMPLES``), without
    flattening a copy of a non-contiguous array."""
    step = max(1, arr.size // _STRETCH_SAMPLES)
    if arr.flags.c_contiguous:
        return arr.reshape(-1)[::step]
    idx = np.unravel_index(np.arange(0, arr.size, step, dtype=np.int64), arr.shape)
    return arr[idx]


def to_uint8(arr: np.ndarray, depth: str = "stretch", crop: int = 0) -> np.ndarray:
    """Map any numeric ``(H, W, C)`` array to uint8 by the bit-depth rule (module docstring).

    The arithmetic is float64, as the rule is stated, but done over blocks of about a million
    samples: the temporaries stay a few MB whatever the image size.

    Args:
        arr: pixel values; uint8 passes through unchanged.
        depth: ``"stretch"`` (per-image 2-98 percentile stretch) or ``"scale"`` (type maximum).
        crop: when positive, only the central ``crop x crop`` window (:func:`center_crop`) is
            converted, with the stretch still taken over the whole image: equal to
            ``center_crop(to_uint8(arr, depth), crop)`` without converting the rest.
    """
    if crop > 0:
        window = center_crop(arr, crop)
        if window.shape != arr.shape and arr.dtype not in (np.uint8, np.bool_):
            return _convert(window, *_bounds(arr, depth))
        return np.ascontiguousarray(center_crop(to_uint8(arr, depth), crop))
    if arr.dtype == np.uint8 and depth in ("stretch", "scale"):
        return arr
    return _convert(arr, *_bounds(arr, depth))


def _bounds(arr: np.ndarray, depth: str) -> tuple[float, float] | tuple[None, None]:
    """``(lo, span)`` of the bit-depth rule for ``arr``; ``(None, None)`` maps all to 0."""
    if depth not in ("stretch", "scale"):
        raise ImageDecodeError(f"unknown bit-depth rule {depth!r}; use 'stretch' or 'scale'")
    if arr.dtype in (np.uint8, np.bool_):
        return 0.0, 1.0  # not used: passed through or mapped to 0/255 in _convert
    if arr.dtype.kind not in "uif":
        raise ImageDecodeError(f"unsupported pixel type {arr.dtype}")
    if depth == "scale":
        if arr.dtype.kind in "ui":
            info = np.iinfo(arr.dtype)
            return float(min(info.min, 0)), float(info.max - min(info.min, 0))
        return 0.0, 1.0
    sample = _stretch_sample(arr).astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None, None
    lo, hi = np.percentile(sample, STRETCH_PERCENTILES)
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        return None, None
    return float(lo), float(hi - lo)


def _convert(arr: np.ndarray, lo: float | None, span: float | None) -> np.ndarray:
    """``arr`` mapped to uint8 by ``(x - lo) / span`` clipped to [0, 1] (floats: as they are
    under ``depth="scale"``, which passes ``lo=0, span=1``), block by block."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if lo is None or span is None:
        return np.zeros(arr.shape, np.uint8)
    floating = arr.dtype.kind == "f"
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _CHUNK_SAMPLES // max(1, arr.size // max(1, arr.shape[0])))
    for r in range(0, arr.shape[0], rows):
        x = arr[r : r + rows].astype(np.float64)
        bad = ~np.isfinite(x) if floating else None
        if (lo, span) != (0.0, 1.0):  # x - 0 and x / 1 are exact: skipped
            x -= lo
            x /= span
        if bad is not None:
            x[bad] = 0.0
        np.clip(x, 0.0, 1.0, out=x)
        x *= 255.0
        np.rint(x, out=x)
        out[r : r + rows] = x
    return out


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bands: Sequence[int] | None = None,
    depth: str = "stretch",
    reduce: int = 1,
    crop: int = 0,
) -> np.ndarray:
    """Decode image bytes into an RGB picture.

    Args:
        data: the encoded file (TIFF, JPEG, PNG, WebP, BMP, GIF).
        max_pixels: largest accepted ``H * W`` (of the file, before any reduction).
        bands: band indices used as R, G, B for images with 3 or more bands (default first three).
        depth: rule for data wider than 8 bits: ``"stretch"`` or ``"scale"``.
        reduce: shrink by this integer factor before any conversion (box average of
            ``reduce x reduce`` blocks; JPEG partly through DCT scaling, so its result is a
            little larger); 1 decodes every pixel.
        crop: when positive, return only the central ``crop x crop`` window (in pixels of the
            file; scaled by the reduction achieved), converted to 8 bits with the stretch of
            the whole picture: :func:`center_crop` of the whole result, without converting the
            rest.

    Returns:
        ``(H, W, 3)`` uint8, C-contiguous.

    Raises:
        ImageDecodeError: empty, truncated, corrupt, unrecognised, too large, bad band selection.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("image data is empty (0 bytes)")
    reduce = max(1, int(reduce))
    kind = _kind(data)
    try:
        if kind == "tiff":
            try:
                arr = _block_reduce(_decode_tiff(data, max_pixels), reduce)
            except ImageDecodeError:
                raise
            except Exception as tiff_error:
                try:
                    arr = _decode_pil(data, max_pixels, kind, reduce)
                except ImageDecodeError as e:
                    raise ImageDecodeError(
                        f"corrupt or unsupported TIFF: {type(tiff_error).__name__}: {tiff_error}"
                    ) from e
        else:
            arr = _decode_pil(data, max_pixels, kind, reduce)
    except ImageDecodeError:
        raise
    except Exception as e:
        name = "JPEG" if kind == "jpeg" else kind.upper()
        raise ImageDecodeError(f"corrupt or truncated {name} image: {type(e).__name__}: {e}") from e
    if arr.ndim != 3:
        raise ImageDecodeError(f"decoded image has shape {arr.shape}; expected (H, W[, bands])")
    if crop > 0 and reduce > 1:
        w, h = image_size(data)
        if w and h:
            crop = max(1, round(crop * min(arr.shape[:2]) / min(w, h)))
    return np.ascontiguousarray(to_uint8(_band_view(arr, bands), depth, crop))


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, from its header only (0, 0 when unreadable)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]), int(im.size[1])
    except Exception:
        pass
    if _kind(bytes(data[:4])) == "tiff":
        try:
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                axes, shape = series.axes, series.shape
                return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
        except Exception:
            pass
    return 0, 0


def reduction_for(side: int, target: int) -> int:
    """The largest integer factor that keeps ``side`` at least twice ``target`` (at least 1):
    the final resize then still sees two samples per output pixel."""
    if target <= 0 or side <= 0:
        return 1
    return max(1, side // (2 * target))


def decode_for_model(
    data: bytes, cfg: ImageBackboneConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an image for one backbone, converting no more pixels than it uses.

    With a centre crop smaller than the image, only that window is converted to 8 bits (the
    stretch still taken over the whole image), so ``preprocess(decode_for_model(data, cfg),
    cfg)`` equals ``preprocess(decode_image(data, **decode_options(cfg)), cfg)``. When the
    window is four or more times ``cfg.image_size``, the image is first box-reduced by an
    integer factor that keeps it at least twice the input size, and the result then differs
    from the full decode by resampling only. Either way a 40 MP 16-bit query never exists as
    floats, nor as a full-size 8-bit copy unless the model uses all of it.

    Returns:
        ``(H', W', 3)`` uint8.
    """
    w, h = image_size(data)
    window = min(h, w)
    crop = cfg.center_crop if 0 < cfg.center_crop < max(h, w) else 0
    if crop:
        window = min(window, crop)
    f = reduction_for(window, cfg.image_size) if w else 1
    return decode_image(data, max_pixels=max_pixels, reduce=f, crop=crop, **decode_options(cfg))


def decode_options(cfg: ImageBackboneConfig) -> dict[str, Any]:
    """The :func:`decode_image` keyword arguments that ``cfg`` sets (``bands``, ``depth``)."""
    return {"bands": tuple(cfg.bands) or None, "depth": cfg.high_bit_depth}


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` window of ``(H, W, C)`` (torchvision's rounding); sides shorter
    than ``size`` are kept whole, never padded."""
    h, w = img.shape[:2]
    ch, cw = min(size, h), min(size, w)
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img[top : top + ch, left : left + cw]


def preprocess(img: np.ndarray, cfg: ImageBackboneConfig) -> np.ndarray:
    """Decoded picture -> backbone input, as the paper: centre crop, resize, scale, normalise.

    Steps: centre crop ``cfg.center_crop`` (0 = none); resize the shorter side to
    ``cfg.image_size`` (bilinear, antialiased) and centre crop the square; scale to ``[0, 1]``
    (like ``ToTensor``); subtract ``cfg.mean`` and divide by ``cfg.std`` when ``cfg.normalize``.

    Args:
        img: ``(H, W, 3)`` uint8.

    Returns:
        ``(3, S, S)`` float32, ``S = cfg.image_size``.

    Raises:
        ImageDecodeError: ``img`` is not an ``(H, W, 3)`` uint8 array.
    """
    from PIL import Image

    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3:
        raise ImageDecodeError(
            f"preprocess expects an (H, W, 3) uint8 array, got "
            f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', type(img).__name__)}"
        )
    if img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageDecodeError(f"preprocess expects (H, W, 3) pixels, got shape {img.shape}")
    s = cfg.image_size
    if s <= 0:
        raise ImageDecodeError(f"image_size must be positive, got {s}")
    if cfg.center_crop > 0:
        img = center_crop(img, cfg.center_crop)
    h, w = img.shape[:2]
    if (h, w) != (s, s):
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        resized = Image.fromarray(np.ascontiguousarray(img)).resize(
            (nw, nh), Image.Resampling.BILINEAR
        )
        img = center_crop(np.asarray(resized), s)
    x = img.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if cfg.normalize:
        mean = np.asarray(cfg.mean, np.float32).reshape(3, 1, 1)
        std = np.asarray(cfg.std, np.float32).reshape(3, 1, 1)
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------


def clean_caption(text: str, cfg: TextBackboneConfig) -> str:
    """Normalise a caption as the paper does: lower-case, remove ``. , ! ?``, squeeze spaces.

    With ``cfg.clean`` false only surrounding and repeated whitespace is normalised. Cleaning is
    idempotent: ``clean_caption(clean_caption(t)) == clean_caption(t)``.

    Raises:
        CaptionError: not a string, longer than ``cfg.max_caption_chars`` characters, or empty
            once cleaned.
    """
    if not isinstance(text, str):
        raise CaptionError(f"caption must be a string, got {type(text).__name__}")
    if len(text) > cfg.max_caption_chars:
        raise CaptionError(
            f"caption has {len(text)} characters, over the limit of {cfg.max_caption_chars}"
        )
    out = _CAPTION_STRIP.sub("", text.lower()) if cfg.clean else text
    out = _SPACES.sub(" ", out).strip()
    if not out:
        raise CaptionError("caption is empty once cleaned" if text.strip() else "caption is empty")
    return out
