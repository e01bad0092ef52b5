"""Decoding real files of every supported kind, the band and bit-depth rules, bad input, the
preprocessing steps against a slow reference, and caption cleaning."""

from __future__ import annotations

import glob
import io
import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from duch_core.config import ImageBackboneConfig, TextBackboneConfig
from duch_core.imageio import (
    DEFAULT_MAX_PIXELS,
    CaptionError,
    ImageDecodeError,
    clean_caption,
    decode_image,
    decode_options,
    preprocess,
    to_uint8,
)

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rs_samples")


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _tiff_header_only(w: int, h: int) -> bytes:
    """A little-endian baseline TIFF header and IFD for a ``w x h`` grey image, without pixels."""
    tags = [  # (tag, type, value): type 3 = SHORT, 4 = LONG
        (256, 4, w),
        (257, 4, h),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 9 * 12 + 4),
        (277, 3, 1),
        (278, 4, h),
        (279, 4, w * h),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        packed = struct.pack("<Hxx", value) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\0" * 16


# --------------------------------------------------------------------------------------------
# formats and rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,kw", [("PNG", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("BMP", {})]
)
def test_lossless_8bit_rgb_round_trips(fmt: str, kw: dict) -> None:
    arr = _rgb()
    out = decode_image(_pil_bytes(arr, fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == arr.shape and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, arr)


def test_jpeg_decodes_close_to_source() -> None:
    arr = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 48, 0).repeat(3, 2)
    out = decode_image(_pil_bytes(arr, "JPEG", quality=95))
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr).mean() < 3


@pytest.mark.parametrize("compression", [None, "zlib", "lzw"])
def test_tiff_8bit_rgb_via_tifffile(compression) -> None:
    arr = _rgb(20, 30)
    out = decode_image(_tiff_bytes(arr, photometric="rgb", compression=compression))
    np.testing.assert_array_equal(out, arr)


def test_grey_and_grey_alpha_replicate_band_zero() -> None:
    g = _rgb()[:, :, 0]
    np.testing.assert_array_equal(decode_image(_pil_bytes(g, "PNG")), np.dstack([g, g, g]))
    la = np.dstack([g, np.full_like(g, 7)])
    np.testing.assert_array_equal(decode_image(_pil_bytes(la, "PNG")), np.dstack([g, g, g]))


def test_rgba_drops_alpha_and_palette_expands() -> None:
    arr = _rgb()
    rgba = np.dstack([arr, np.full(arr.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(decode_image(_pil_bytes(rgba, "PNG")), arr)
    pal = Image.fromarray(arr).quantize(16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), np.asarray(pal.convert("RGB")))


def _stretch_reference(x: np.ndarray) -> np.ndarray:
    """Slow reference: exact percentiles over all values, per-element Python arithmetic."""
    vals = sorted(float(v) for v in x.reshape(-1))
    lo, hi = np.percentile(np.array(vals), (2, 98))
    out = np.empty(x.shape, np.uint8)
    for idx in np.ndindex(x.shape):
        v = (float(x[idx]) - lo) / (hi - lo)
        out[idx] = int(np.rint(min(max(v, 0.0), 1.0) * 255))
    return out


def test_16bit_stretch_matches_reference_and_scale_rule() -> None:
    rng = np.random.default_rng(1)
    a16 = rng.integers(3000, 12000, (30, 40, 3)).astype(np.uint16)  # 12-bit-like data
    out = decode_image(_tiff_bytes(a16, photometric="rgb"))
    np.testing.assert_array_equal(out, _stretch_reference(a16))
    assert out.min() == 0 and out.max() == 255  # stretched to the full range
    scaled = decode_image(_tiff_bytes(a16, photometric="rgb"), depth="scale")
    np.testing.assert_array_equal(scaled, np.rint(a16 / 257.0).astype(np.uint8))
    # the same rule through Pillow (16-bit grey PNG) and imagecodecs (16-bit RGB PNG)
    import imagecodecs

    grey = decode_image(_pil_bytes(a16[:, :, 0], "PNG"))
    np.testing.assert_array_equal(grey[:, :, 0], _stretch_reference(a16[:, :, :1])[:, :, 0])
    rgb16 = decode_image(imagecodecs.png_encode(a16))
    np.testing.assert_array_equal(rgb16, out)


def test_4band_16bit_tiff_band_rule() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4000, (24, 32, 4)).astype(np.uint16)
    a[:, :, 3] += 40000  # a bright NIR band must not take part in the RGB stretch
    data = _tiff_bytes(a, photometric="minisblack", planarconfig="contig")
    out = decode_image(data)
    np.testing.assert_array_equal(out, _stretch_reference(a[:, :, :3]))
    swapped = decode_image(data, bands=(2, 1, 0))
    np.testing.assert_array_equal(swapped, _stretch_reference(a[:, :, [2, 1, 0]]))
    # band-separate layout (one plane per band) decodes to the same picture
    planar = _tiff_bytes(np.moveaxis(a, 2, 0).copy(), photometric="minisblack")
    np.testing.assert_array_equal(decode_image(planar), out)
    with pytest.raises(ImageDecodeError, match="bands \\[7\\] do not exist"):
        decode_image(data, bands=(0, 1, 7))
    opts = decode_options(ImageBackboneConfig(bands=(2, 1, 0)))
    np.testing.assert_array_equal(decode_image(data, **opts), swapped)


def test_float_and_nan_data() -> None:
    a = np.linspace(-1, 1, 30 * 40 * 3, dtype=np.float32).reshape(30, 40, 3)
    a[0, 0, 0] = np.nan
    out = decode_image(_tiff_bytes(a, photometric="rgb"))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0
    assert out[-1, -1, -1] == 255 and out[0, 0, 1] == 0
    const = to_uint8(np.full((4, 4, 3), 500, np.uint16))
    assert const.dtype == np.uint8 and (const == 0).all()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_bad_bytes_raise_with_reason() -> None:
    jpeg = _pil_bytes(_rgb(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError, match="empty \\(0 bytes\\)"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="unrecognised image format"):
        decode_image(b"this is not an image at all")
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(jpeg[:40])
    png = _pil_bytes(_rgb(), "PNG")
    with pytest.raises(ImageDecodeError, match="PNG"):
        decode_image(png[: len(png) - 30])
    tif = _tiff_bytes(_rgb(), photometric="rgb")
    with pytest.raises(ImageDecodeError, match="TIFF"):
        decode_image(tif[:200])
    with pytest.raises(ImageDecodeError, match="must be bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_decompression_bombs_are_refused_from_the_header() -> None:
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(_png_header_only(9000, 9000))  # 81 M pixels > default
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        decode_image(_pil_bytes(_rgb(20, 20), "PNG"), max_pixels=100)
    # a 100-byte TIFF whose header claims a 20000 x 20000 image
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(_tiff_header_only(20000, 20000))
    assert DEFAULT_MAX_PIXELS == 1 << 26


# --------------------------------------------------------------------------------------------
# real samples
# --------------------------------------------------------------------------------------------


def test_real_samples_decode() -> None:
    files = sorted(glob.glob(os.path.join(SAMPLES, "*_images", "*")))
    if not files:
        pytest.skip(f"real samples not found under {os.path.abspath(SAMPLES)}")
    cfg = ImageBackboneConfig()
    for f in files:
        with open(f, "rb") as fh:
            img = decode_image(fh.read())
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, f
        assert img.shape[0] >= 200 and img.std() > 5, f  # a real, non-blank picture
        with Image.open(f) as ref:  # agrees with Pillow's own RGB decode
            np.testing.assert_array_equal(img, np.asarray(ref.convert("RGB")))
        x = preprocess(img, cfg)
        assert x.shape == (3, 224, 224) and x.dtype == np.float32


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocess_matches_reference_steps() -> None:
    img = _rgb(256, 256, seed=5)
    cfg = ImageBackboneConfig(image_size=224, center_crop=200, normalize=True)
    x = preprocess(img, cfg)
    crop = img[28:228, 28:228]  # torchvision CenterCrop(200) of 256: offset round(28.0)
    ref = np.asarray(Image.fromarray(crop).resize((224, 224), Image.Resampling.BILINEAR))
    ref = ref.astype(np.float32).transpose(2, 0, 1) / 255.0
    mean = np.array(cfg.mean, np.float32)[:, None, None]
    std = np.array(cfg.std, np.float32)[:, None, None]
    np.testing.assert_allclose(x, (ref - mean) / std, rtol=1e-6, atol=1e-6)
    raw = preprocess(img, ImageBackboneConfig(center_crop=200, normalize=False))
    np.testing.assert_allclose(raw, ref, atol=1e-7)
    assert 0.0 <= raw.min() and raw.max() <= 1.0


def test_preprocess_non_square_and_small_and_identity() -> None:
    cfg = ImageBackboneConfig(image_size=32, center_crop=0, normalize=False)
    img = _rgb(40, 80)
    x = preprocess(img, cfg)
    assert x.shape == (3, 32, 32)
    # shorter side to 32 (40x80 -> 32x64) then centre 32x32
    r = np.asarray(Image.fromarray(img).resize((64, 32), Image.Resampling.BILINEAR))[:, 16:48]
    np.testing.assert_allclose(x, r.transpose(2, 0, 1) / 255.0, atol=1e-7)
    small = preprocess(_rgb(10, 12), ImageBackboneConfig(image_size=32, center_crop=200))
    assert small.shape == (3, 32, 32)
    same = _rgb(32, 32)
    np.testing.assert_allclose(preprocess(same, cfg), same.transpose(2, 0, 1) / 255.0, atol=1e-7)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3))]
)
def test_preprocess_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ImageDecodeError, match="preprocess expects"):
        preprocess(bad, ImageBackboneConfig())


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------


def test_clean_caption_as_the_paper() -> None:
    cfg = TextBackboneConfig()
    assert clean_caption("  Many Planes, parked.  Near the Terminal!?  ", cfg) == (
        "many planes parked near the terminal"
    )
    once = clean_caption("A plane. Two  cars!", cfg)
    assert clean_caption(once, cfg) == once
    raw = TextBackboneConfig(clean=False)
    assert clean_caption("  Keep, Case.  ", raw) == "Keep, Case."


def test_bad_captions() -> None:
    cfg = TextBackboneConfig(max_caption_chars=20)
    for bad in ["", "   \n\t", " . , ! ? "]:
        with pytest.raises(CaptionError, match="empty"):
            clean_caption(bad, cfg)
    with pytest.raises(CaptionError, match="over the limit of 20"):
        clean_caption("x" * 21, cfg)
    with pytest.raises(CaptionError, match="must be a string"):
        clean_caption(None, cfg)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# bounded memory: blockwise conversion, reduction before conversion
# --------------------------------------------------------------------------------------------


def _to_uint8_reference(arr: np.ndarray, depth: str = "stretch") -> np.ndarray:
    """The bit-depth rule over the whole image in float64 at once (the slow reference)."""
    x = arr.astype(np.float64)
    finite = np.isfinite(x)
    if depth == "scale":
        if arr.dtype.kind in "ui":
            info = np.iinfo(arr.dtype)
            y = (x - min(info.min, 0)) / (info.max - min(info.min, 0))
        else:
            y = x
    else:
        flat = x.reshape(-1)
        sample = flat[:: max(1, flat.size // (1 << 20))]
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return np.zeros(arr.shape, np.uint8)
        lo, hi = np.percentile(sample, (2.0, 98.0))
        if hi <= lo:
            lo, hi = float(sample.min()), float(sample.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    y = np.where(finite, y, 0.0)
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32", "float64"])
@pytest.mark.parametrize("depth", ["stretch", "scale"])
def test_blockwise_conversion_equals_the_whole_image_reference(dtype: str, depth: str) -> None:
    rng = np.random.default_rng(1)
    # 1500 x 800 x 3 = 3.6 M samples: several blocks, and a strided percentile sample
    arr = (rng.normal(0.4, 0.3, (1500, 800, 3)) * 4000).astype(dtype)
    if arr.dtype.kind == "f":
        arr /= 4000
        arr[5, 7] = np.nan
        arr[9, 1, 2] = np.inf
    np.testing.assert_array_equal(to_uint8(arr, depth), _to_uint8_reference(arr, depth))
    view = arr[:, ::-1, 1:]  # a non-contiguous view: sampled without a flattened copy
    np.testing.assert_array_equal(to_uint8(view, depth), _to_uint8_reference(view, depth))


def test_reduced_decode_is_the_block_mean_and_shrinks_every_format() -> None:
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (130, 171, 3), dtype=np.uint8)
    png = _pil_bytes(arr, "PNG")
    out = decode_image(png, reduce=4)
    assert out.shape == (33, 43, 3)  # Pillow keeps the partial last block
    ref = arr[:128, :168].reshape(32, 4, 42, 4, 3).mean(axis=(1, 3))
    assert np.abs(out[:32, :42].astype(np.float64) - ref).max() <= 1.0
    a16 = rng.integers(0, 65535, (130, 171, 3), dtype=np.uint16)
    tif = _tiff_bytes(a16, photometric="rgb")
    small = decode_image(tif, reduce=4)
    assert small.shape == (32, 42, 3)
    top, left = (130 - 128) // 2, (171 - 168) // 2  # the leftover is dropped on both sides
    block = a16[top : top + 128, left : left + 168].reshape(32, 4, 42, 4, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(small, to_uint8(np.rint(block).astype(np.uint16)))
    jpg = _pil_bytes(arr, "JPEG", quality=95)
    assert decode_image(jpg, reduce=4).shape[:2] in ((33, 43), (32, 42))
    assert decode_image(png, reduce=1).shape == arr.shape


def test_a_large_16_bit_png_decodes_for_a_model_without_float_copies() -> None:
    """A 6000 x 4000 16-bit RGB PNG (144 MB of samples, a few hundred KB of file) decodes for
    a 224-pixel model with numpy allocations under twice its samples: the full-size float64
    path held more than 10 times that."""
    import tracemalloc

    import imagecodecs

    from duch_core.imageio import decode_for_model

    big = np.full((4000, 6000, 3), 1200, np.uint16)
    big[:, 3000:, 1] = 2400
    data = imagecodecs.png_encode(big)
    del big
    assert len(data) < 2_000_000
    cfg = ImageBackboneConfig(image_size=224, center_crop=0)
    tracemalloc.start()
    try:
        img = decode_for_model(data, cfg, max_pixels=30_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.shape == (4000 // 8, 6000 // 8, 3) and img.dtype == np.uint8
    assert peak < 2 * 144_000_000, peak


@pytest.mark.parametrize("kind", ["PNG", "TIFF16", "JPEG"])
def test_decoding_for_a_model_with_a_centre_crop_converts_only_the_window(kind: str) -> None:
    """With a crop window under four times the input size, the model's input is exactly what
    the full decode gives; a larger window is reduced first and stays close."""
    from duch_core.imageio import decode_for_model

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:700, 0:900].astype(np.float64)
    smooth = np.stack([x / 900, y / 700, 0.5 + 0.5 * np.sin(x / 60 + y / 90)], axis=-1)
    if kind == "TIFF16":
        data = _tiff_bytes((2000 + 30000 * smooth).astype(np.uint16), photometric="rgb")
    else:
        pic = (255 * smooth).astype(np.uint8) ^ rng.integers(0, 8, smooth.shape, dtype=np.uint8)
        data = _pil_bytes(pic, kind, **({"quality": 95} if kind == "JPEG" else {}))
    exact = ImageBackboneConfig(image_size=64, center_crop=200)
    img = decode_for_model(data, exact)
    assert img.shape == (200, 200, 3)
    full = decode_image(data, **decode_options(exact))
    np.testing.assert_array_equal(preprocess(img, exact), preprocess(full, exact))
    reduced = ImageBackboneConfig(image_size=32, center_crop=600)  # window 600 >= 4 x 32
    img = decode_for_model(data, reduced)
    assert max(img.shape[:2]) < 600
    diff = np.abs(preprocess(img, reduced) - preprocess(full, reduced))
    assert diff.mean() < 0.05, diff.mean()
