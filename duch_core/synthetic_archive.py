"""The built-in demo archive: seeded synthetic aerial-like scenes with captions.

:func:`make_demo_archive` draws scenes of eight land-cover classes with numpy and PIL, writes them
as real image files (a mix of PNG, JPEG and TIFF) and writes an archive manifest
(:mod:`duch_core.archive`) next to them::

    <out_uri>/manifest.parquet
    <out_uri>/images/<item_id>.png | .jpg | .tif

Every class has its own colours, textures and shapes (tree crowns, a river band, striped crop
fields, roofs on a street grid, a shoreline with surf, dune ripples, a marked runway, parking
stalls with cars) and every image varies inside its class: positions, counts, sizes, rotation,
lighting, colour tint and sensor noise. Each image gets five different captions built from
per-class templates and synonyms, some of which describe what was actually drawn (a winding or
straight river, a full or half-empty parking lot, the number of airplanes).

The output depends only on ``seed``, ``n_per_class`` and ``image_size``: image ``i`` of a class is
drawn from its own random stream, so the first images are the same whatever ``n_per_class`` is.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from duch_core import storage
from duch_core.archive import write_archive
from duch_core.splits import paper_split

DEMO_CLASSES: tuple[str, ...] = (
    "forest",
    "river",
    "farmland",
    "residential",
    "beach",
    "desert",
    "airport",
    "parking",
)
"""Class labels of the demo archive, in label order."""

MANIFEST_NAME = "manifest.parquet"
IMAGE_FORMATS: tuple[tuple[str, str], ...] = (("png", "PNG"), ("jpg", "JPEG"), ("tif", "TIFF"))

Color = tuple[int, int, int]


@dataclass
class _Scene:
    """A drawn scene before lighting: canvas (C, C, 3) float32 in [0, 255] + caption facts."""

    canvas: np.ndarray
    facts: dict[str, str]


# --------------------------------------------------------------------------------------------
# drawing primitives


def _jitter(rng: np.random.Generator, base: Color, spread: float) -> Color:
    c = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0.0, spread, 3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a ``cells x cells`` random grid upsampled bicubically.

    Returns:
        ``(size, size)`` float32, roughly zero-mean with unit scale.
    """
    grid = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _fill(size: int, color: Color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, dtype=np.float32), (size, size, 3)).copy()


def _add_texture(canvas: np.ndarray, noise: np.ndarray, amount: float) -> np.ndarray:
    return canvas + noise[..., None] * amount


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _draw(canvas: np.ndarray) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")
    return img, ImageDraw.Draw(img)


def _to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# class painters: (rng, canvas size, scale) -> scene. ``scale`` = canvas pixels per 128 px of
# output, so shapes keep their apparent size whatever image_size is.


def _paint_forest(rng: np.random.Generator, c: int, s: float) -> _Scene:
    canvas = _fill(c, _jitter(rng, (34, 68, 36), 6))
    canvas = _add_texture(canvas, _smooth_noise(rng, c, 6), 10)
    img, draw = _draw(canvas)
    n = int(rng.integers(500, 800) * (c / 186.0) ** 2)
    xs, ys = rng.uniform(0, c, n), rng.uniform(0, c, n)
    rs = rng.uniform(2.5, 6.5, n) * s
    base_green = np.array([40, 100, 45]) + rng.normal(0, 8, 3)
    for x, y, r in zip(xs, ys, rs, strict=True):
        shade = np.clip(base_green + rng.normal(0, 14, 3), 0, 255).astype(int)
        draw.ellipse(
            (x - r + r * 0.3, y - r + r * 0.3, x + r * 1.3, y + r * 1.3), fill=(15, 35, 18)
        )
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=(int(shade[0]), int(shade[1]), int(shade[2]))
        )
    facts = {"density": "dense", "path": ""}
    if rng.random() < 0.35:
        y0 = rng.uniform(0.2, 0.8) * c
        y1 = rng.uniform(0.2, 0.8) * c
        draw.line((0, y0, c, y1), fill=_jitter(rng, (140, 115, 80), 10), width=max(2, int(3 * s)))
        facts["path"] = "path"
    return _Scene(_to_float(img), facts)


def _paint_river(rng: np.random.Generator, c: int, s: float) -> _Scene:
    land = _jitter(rng, (92, 120, 60), 10)
    canvas = _add_texture(_fill(c, land), _smooth_noise(rng, c, 5), 14)
    y, x = _coords(c)
    amp = rng.uniform(0.0, 0.18) * c
    wavelength = rng.uniform(0.6, 1.4) * c
    phase = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(7, 18) * s
    centre = c / 2 + rng.uniform(-0.1, 0.1) * c + amp * np.sin(2 * np.pi * x / wavelength + phase)
    d = np.abs(y - centre)
    water = np.asarray(_jitter(rng, (45, 85, 120), 8), dtype=np.float32)
    bank = np.asarray((30, 60, 30), dtype=np.float32)
    bank_mask = ((d > width) & (d < width + 4 * s))[..., None]
    water_mask = (d <= width)[..., None]
    ripple = np.sin(x / (2.5 * s) + _smooth_noise(rng, c, 8) * 2)[..., None] * 4
    canvas = np.where(bank_mask, bank + rng.normal(0, 6, (c, c, 1)).astype(np.float32), canvas)
    canvas = np.where(water_mask, water + ripple, canvas)
    facts = {
        "shape": "winding" if amp > 0.08 * c else "straight",
        "width": "wide" if width > 13 * s else "narrow",
    }
    return _Scene(canvas, facts)


_CROPS: tuple[tuple[str, Color], ...] = (
    ("green", (80, 140, 60)),
    ("yellow", (200, 180, 90)),
    ("brown", (140, 105, 70)),
    ("light green", (140, 175, 90)),
    ("dark green", (50, 100, 45)),
)


def _paint_farmland(rng: np.random.Generator, c: int, s: float) -> _Scene:
    canvas = _fill(c, (150, 130, 95))
    y, x = _coords(c)
    nx, ny = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    xcuts = np.sort(np.concatenate([[0, c], rng.uniform(0.1, 0.9, nx - 1) * c]))
    ycuts = np.sort(np.concatenate([[0, c], rng.uniform(0.1, 0.9, ny - 1) * c]))
    used: list[str] = []
    road = 1.5 * s
    for i in range(nx):
        for j in range(ny):
            name, base = _CROPS[int(rng.integers(len(_CROPS)))]
            used.append(name)
            col = np.asarray(_jitter(rng, base, 8), dtype=np.float32)
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(2.5, 5.0) * s
            stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)
            m = (
                (x >= xcuts[i] + road)
                & (x < xcuts[i + 1] - road)
                & (y >= ycuts[j] + road)
                & (y < ycuts[j + 1] - road)
            )
            canvas[m] = col + (stripes[m] * 12)[:, None]
    canvas = _add_texture(canvas, _smooth_noise(rng, c, 7), 6)
    colours = sorted(set(used), key=used.index)[:2]
    facts = {
        "count": "several" if nx * ny <= 6 else "many",
        "colours": " and ".join(colours),
    }
    return _Scene(canvas, facts)


def _paint_residential(rng: np.random.Generator, c: int, s: float) -> _Scene:
    canvas = _add_texture(_fill(c, _jitter(rng, (125, 122, 115), 6)), _smooth_noise(rng, c, 8), 6)
    img, draw = _draw(canvas)
    block = rng.uniform(26, 36) * s
    street = rng.uniform(3.0, 5.0) * s
    off = rng.uniform(0, block)
    roofs = ((170, 75, 55), (150, 150, 150), (200, 195, 185), (90, 80, 75), (180, 110, 70))
    houses = 0
    gx = off - block
    while gx < c:
        gy = off - block
        while gy < c:
            x0, y0 = gx + street, gy + street
            x1, y1 = gx + block, gy + block
            hx = x0
            while hx < x1 - 4 * s:
                w = rng.uniform(5, 8) * s
                hy = y0
                while hy < y1 - 4 * s:
                    h = rng.uniform(5, 8) * s
                    if rng.random() < 0.92:
                        roof = _jitter(rng, roofs[int(rng.integers(len(roofs)))], 10)
                        ex, ey = min(hx + w - s, x1), min(hy + h - s, y1)
                        draw.rectangle((hx + s, hy + s, ex + s, ey + s), fill=(60, 58, 55))
                        draw.rectangle((hx, hy, ex, ey), fill=roof)
                        houses += 1
                    elif rng.random() < 0.7:
                        r = 2.5 * s
                        draw.ellipse((hx, hy, hx + 2 * r, hy + 2 * r), fill=(45, 95, 45))
                    hy += h + s
                hx += w + s
            gy += block
        gx += block
    facts = {"count": "many" if houses > 80 else "lots of"}
    return _Scene(_to_float(img), facts)


def _paint_beach(rng: np.random.Generator, c: int, s: float) -> _Scene:
    y, x = _coords(c)
    shore = (
        c * rng.uniform(0.35, 0.6)
        + rng.uniform(0.02, 0.1) * c * np.sin(2 * np.pi * x / (rng.uniform(0.7, 1.5) * c))
        + _smooth_noise(rng, c, 5) * 2 * s
    )
    sea_near = np.asarray(_jitter(rng, (60, 160, 175), 8), dtype=np.float32)
    sea_far = np.asarray(_jitter(rng, (25, 70, 120), 8), dtype=np.float32)
    sand = np.asarray(_jitter(rng, (228, 208, 165), 8), dtype=np.float32)
    t = np.clip((shore - y) / (0.5 * c), 0, 1)[..., None]
    sea = sea_near * (1 - t) + sea_far * t
    sea = sea + (np.sin(x / (2.0 * s) + y / (6.0 * s) + _smooth_noise(rng, c, 6)) * 5)[..., None]
    sand_tex = sand + (_smooth_noise(rng, c, 12) * 6)[..., None]
    canvas = np.where((y < shore)[..., None], sea, sand_tex)
    surf = (np.abs(y - shore) < 2.0 * s)[..., None]
    canvas = np.where(surf, np.float32(240.0), canvas)
    facts = {"vegetation": ""}
    if rng.random() < 0.5:
        veg_line = shore + rng.uniform(0.25, 0.35) * c + _smooth_noise(rng, c, 4) * 3 * s
        veg = (y > veg_line)[..., None]
        canvas = np.where(veg, np.asarray((55, 110, 50), dtype=np.float32), canvas)
        facts["vegetation"] = "trees"
    img, draw = _draw(canvas)
    people = int(rng.integers(0, 12))
    for _ in range(people):
        px = rng.uniform(0, c)
        py = float(shore[c // 2, min(int(px), c - 1)]) + rng.uniform(4, 14) * s
        col = _jitter(rng, (220, 60, 60), 40)
        draw.rectangle((px, py, px + 2 * s, py + 1.5 * s), fill=col)
    return _Scene(_to_float(img), facts)


def _paint_desert(rng: np.random.Generator, c: int, s: float) -> _Scene:
    y, x = _coords(c)
    base = np.asarray(_jitter(rng, (205, 160, 105), 10), dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(9, 16) * s
    warp = _smooth_noise(rng, c, 4) * 2.5
    u = (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period + warp
    ripple = np.sin(u) + 0.4 * np.sin(2 * u + 1.0)
    shade = np.asarray((1.0, 0.92, 0.82), dtype=np.float32)
    canvas = base * (1 + 0.12 * ripple[..., None] * shade)
    canvas = _add_texture(canvas, _smooth_noise(rng, c, 20), 5)
    img, draw = _draw(canvas)
    shrubs = int(rng.integers(0, 25))
    for _ in range(shrubs):
        px, py, r = rng.uniform(0, c), rng.uniform(0, c), rng.uniform(1, 2.2) * s
        draw.ellipse((px - r, py - r, px + r, py + r), fill=_jitter(rng, (95, 90, 55), 10))
    facts = {"shrubs": "a few shrubs" if shrubs > 8 else ""}
    return _Scene(_to_float(img), facts)


def _paint_airport(rng: np.random.Generator, c: int, s: float) -> _Scene:
    grass = _jitter(rng, (120, 140, 85), 10)
    canvas = _add_texture(_fill(c, grass), _smooth_noise(rng, c, 6), 10)
    img, draw = _draw(canvas)
    mid = c / 2 + rng.uniform(-0.08, 0.08) * c
    half = rng.uniform(8, 12) * s
    asphalt = _jitter(rng, (85, 85, 88), 6)
    draw.rectangle((0, mid - half, c, mid + half), fill=asphalt)
    dash, gap = 8 * s, 6 * s
    x = rng.uniform(0, dash + gap)
    while x < c:
        draw.rectangle((x, mid - 0.6 * s, x + dash, mid + 0.6 * s), fill=(235, 235, 235))
        x += dash + gap
    for k in range(6):
        yy = mid - half + (k + 1) * 2 * half / 7
        draw.rectangle((c * 0.12, yy - 0.5 * s, c * 0.12 + 10 * s, yy + 0.5 * s), fill=(230,) * 3)
    side = 1 if rng.random() < 0.5 else -1
    taxi = mid + side * (half + rng.uniform(10, 16) * s)
    draw.rectangle((0, taxi - 3 * s, c, taxi + 3 * s), fill=_jitter(rng, (100, 100, 100), 5))
    planes = int(rng.integers(0, 4))
    for _ in range(planes):
        px = rng.uniform(0.3, 0.7) * c
        py = taxi + side * rng.uniform(6, 10) * s
        L, W = 7 * s, 6 * s
        draw.rectangle((px - L, py - 0.9 * s, px + L, py + 0.9 * s), fill=(245, 245, 245))
        draw.rectangle((px - 1.2 * s, py - W, px + 1.2 * s, py + W), fill=(245, 245, 245))
        draw.rectangle((px - L, py - 2.5 * s, px - L + 1.2 * s, py + 2.5 * s), fill=(245, 245, 245))
    facts = {"planes": {0: "", 1: "an airplane", 2: "two airplanes", 3: "three airplanes"}[planes]}
    return _Scene(_to_float(img), facts)


def _paint_parking(rng: np.random.Generator, c: int, s: float) -> _Scene:
    asphalt = _jitter(rng, (70, 72, 75), 6)
    canvas = _add_texture(_fill(c, asphalt), _smooth_noise(rng, c, 8), 5)
    img, draw = _draw(canvas)
    stall_w, stall_h, aisle = 4.5 * s, 9 * s, 8 * s
    fill_rate = rng.uniform(0.25, 0.98)
    cars = 0
    slots = 0
    car_colours = ((200, 30, 30), (30, 60, 170), (235, 235, 235), (20, 20, 20), (150, 150, 155))
    y0 = rng.uniform(0, stall_h)
    y = y0 - stall_h
    while y < c:
        for row in (0, 1):
            ry = y + row * stall_h
            x = rng.uniform(0, stall_w) - stall_w
            while x < c:
                draw.line((x, ry, x, ry + stall_h), fill=(225, 225, 215), width=max(1, int(s)))
                slots += 1
                if rng.random() < fill_rate:
                    col = _jitter(rng, car_colours[int(rng.integers(len(car_colours)))], 15)
                    draw.rectangle(
                        (x + 0.8 * s, ry + 1.2 * s, x + stall_w - 0.8 * s, ry + stall_h - 1.2 * s),
                        fill=col,
                    )
                    cars += 1
                x += stall_w
        y += 2 * stall_h + aisle
    facts = {"fill": "full of cars" if fill_rate > 0.7 else "half empty"}
    return _Scene(_to_float(img), facts)


_PAINTERS: dict[str, Callable[[np.random.Generator, int, float], _Scene]] = {
    "forest": _paint_forest,
    "river": _paint_river,
    "farmland": _paint_farmland,
    "residential": _paint_residential,
    "beach": _paint_beach,
    "desert": _paint_desert,
    "airport": _paint_airport,
    "parking": _paint_parking,
}


# --------------------------------------------------------------------------------------------
# captions

_NOUNS: dict[str, tuple[str, ...]] = {
    "forest": ("forest", "woodland", "forest area", "wooded area"),
    "river": ("river", "stream", "waterway"),
    "farmland": ("farmland", "cropland", "farm land", "agricultural land"),
    "residential": ("residential area", "neighborhood", "housing estate", "residential district"),
    "beach": ("beach", "shore", "coastline", "seaside"),
    "desert": ("desert", "barren land", "sandy wasteland", "bare land"),
    "airport": ("airport", "airfield", "aerodrome"),
    "parking": ("parking lot", "car park", "parking area"),
}

_ADJ: dict[str, tuple[str, ...]] = {
    "forest": ("dense", "thick", "lush", "dark green", "green", "wild"),
    "river": ("blue", "calm", "long", "dark blue", "quiet"),
    "farmland": ("neat", "cultivated", "green", "large", "tidy", "fertile"),
    "residential": ("dense", "crowded", "busy", "compact", "large", "urban"),
    "beach": ("sandy", "sunny", "quiet", "long", "golden", "curved"),
    "desert": ("dry", "sandy", "empty", "arid", "vast", "yellow"),
    "airport": ("long", "grey", "large", "busy", "wide", "paved"),
    "parking": ("large", "busy", "paved", "crowded", "grey", "open"),
}


def _templates(label: str, f: dict[str, str]) -> list[str]:
    """Caption templates of one class; ``{n}`` = a class noun, ``{a}`` = an adjective."""
    if label == "forest":
        t = [
            "a {a} {n} with many trees .",
            "many green trees form a {a} {n} .",
            "this is a {n} seen from above .",
            "the tree crowns of a {a} {n} cover the whole image .",
            "lots of trees are growing closely together in the {n} .",
            "{v} a {a} {n} .",
        ]
        if f["path"]:
            t += ["a narrow path goes through the {a} {n} .", "a dirt road crosses the {n} ."]
    elif label == "river":
        t = [
            "a {shape} {n} runs through green land .",
            "a {width} {n} with trees on both banks .",
            "there is a {a} {n} crossing the vegetation .",
            "the {n} flows across the image between green fields .",
            "{v} a {width} {shape} {n} .",
            "dark trees line the banks of the {n} .",
        ]
    elif label == "farmland":
        t = [
            "{count} {colours} fields of {n} .",
            "there are {count} rectangular fields on the {n} .",
            "a {a} {n} with crops planted in rows .",
            "the {n} is divided into {count} plots by small roads .",
            "{count} plots of {colours} crops .",
            "{v} {a} {n} .",
        ]
    elif label == "residential":
        t = [
            "a {a} {n} with {count} houses .",
            "{count} houses with red and grey roofs are arranged in blocks .",
            "streets divide the {n} into regular blocks of buildings .",
            "many buildings are densely packed in this {n} .",
            "a {n} where houses stand close to each other .",
            "{v} a {a} {n} with a few trees .",
        ]
    elif label == "beach":
        t = [
            "a {a} {n} next to the blue sea .",
            "white waves break on the {a} {n} .",
            "the sea meets yellow sand along the {n} .",
            "there is a {n} between the ocean and the land .",
            "a {n} with clear water and a strip of sand .",
            "{v} a {a} {n} and the sea .",
        ]
        if f["vegetation"]:
            t += ["green trees grow behind the {a} {n} ."]
    elif label == "desert":
        t = [
            "a {a} {n} with wavy dunes .",
            "sand ripples cover the {a} {n} .",
            "this is a {n} with no buildings .",
            "a large piece of {a} {n} .",
            "yellow sand stretches across the {n} .",
            "{v} a {a} {n} .",
        ]
        if f["shrubs"]:
            t += ["{shrubs} are scattered on the {a} {n} ."]
    elif label == "airport":
        t = [
            "a {a} runway with white markings at the {n} .",
            "the {n} has a runway and a taxiway beside the grass .",
            "a straight runway crosses the {n} .",
            "there is a {a} {n} with a grey runway .",
            "white dashed lines run along the middle of the runway of the {n} .",
            "{v} an {n} surrounded by grass .",
        ]
        if f["planes"]:
            t += ["{planes} parked beside the runway of the {n} .", "an {n} with {planes} ."]
    else:  # parking
        t = [
            "a {a} {n} {fill} .",
            "many cars are parked in rows in the {n} .",
            "the {n} is {fill} .",
            "white lines mark the parking spaces of the {n} .",
            "there are rows of cars in a {a} {n} .",
            "{v} a {n} {fill} .",
        ]
    return t


_VIEWS: tuple[str, ...] = (
    "an aerial view of",
    "an aerial image of",
    "a satellite image of",
    "an overhead view of",
    "a top-down view of",
    "a remote sensing image of",
)

_ARTICLE = re.compile(r"\b([Aa]) ([aeiou])")


def _captions(rng: np.random.Generator, label: str, facts: dict[str, str], n: int) -> list[str]:
    templates = _templates(label, facts)
    picks = rng.choice(len(templates), size=min(n, len(templates)), replace=False)
    out = []
    for i in picks:
        noun = _NOUNS[label][int(rng.integers(len(_NOUNS[label])))]
        adj = _ADJ[label][int(rng.integers(len(_ADJ[label])))]
        view = _VIEWS[int(rng.integers(len(_VIEWS)))]
        text = templates[int(i)].format(n=noun, a=adj, v=view, **facts)
        text = _ARTICLE.sub(r"\1n \2", " ".join(text.split()))
        out.append(text[0].upper() + text[1:])
    return out


# --------------------------------------------------------------------------------------------
# one image


def render_scene(
    label: str, rng: np.random.Generator, image_size: int = 128
) -> tuple[np.ndarray, dict[str, str]]:
    """Draw one demo scene.

    Args:
        label: one of :data:`DEMO_CLASSES`.
        rng: the random stream of this image.
        image_size: side of the square output image in pixels (>= 32).

    Returns:
        ``((image_size, image_size, 3) uint8 RGB image, caption facts)``.
    """
    if label not in _PAINTERS:
        raise ValueError(f"unknown demo class {label!r}; expected one of {DEMO_CLASSES}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    scale = image_size / 128.0
    canvas_size = int(np.ceil(image_size * 1.45))
    scene = _PAINTERS[label](rng, canvas_size, scale)
    img = Image.fromarray(np.clip(scene.canvas, 0, 255).astype(np.uint8), mode="RGB")
    angle = float(rng.uniform(0, 360))
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    off = (canvas_size - image_size) // 2
    img = img.crop((off, off, off + image_size, off + image_size))
    a = np.asarray(img, dtype=np.float32)
    # lighting: global gain, colour tint, a smooth illumination gradient, then sensor noise
    gain = rng.uniform(0.82, 1.15)
    tint = rng.normal(1.0, 0.04, 3).astype(np.float32)
    yy, xx = _coords(image_size)
    gdir = rng.uniform(0, 2 * np.pi)
    grad = 1 + 0.08 * ((xx * np.cos(gdir) + yy * np.sin(gdir)) / image_size - 0.5)
    a = a * gain * tint * grad[..., None]
    a = a + rng.normal(0.0, rng.uniform(1.5, 5.0), a.shape).astype(np.float32)
    return np.clip(a, 0, 255).astype(np.uint8), scene.facts


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img, mode="RGB")
    if fmt == "JPEG":
        pil.save(buf, format="JPEG", quality=92)
    else:
        pil.save(buf, format=fmt)
    return buf.getvalue()


def _item_stream(seed: int, class_index: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, class_index, i]))


def _make_item(
    out_uri: str, label: str, class_index: int, i: int, seed: int, image_size: int
) -> dict[str, object]:
    rng = _item_stream(seed, class_index, i)
    img, facts = render_scene(label, rng, image_size)
    captions = _captions(rng, label, facts, 5)
    ext, fmt = IMAGE_FORMATS[(class_index + i) % len(IMAGE_FORMATS)]
    item_id = f"{label}_{i:04d}"
    rel = f"images/{item_id}.{ext}"
    storage.write_bytes(storage.join(out_uri, rel), _encode(img, fmt))
    return {
        "item_id": item_id,
        "image_uri": rel,
        "captions": captions,
        "label": label,
        "format": ext,
        "width": image_size,
        "height": image_size,
    }


def make_demo_archive(
    out_uri: str,
    n_per_class: int = 40,
    seed: int = 0,
    image_size: int = 128,
    classes: tuple[str, ...] = DEMO_CLASSES,
    split_seed: int = 42,
    workers: int = 4,
) -> str:
    """Generate the demo archive under ``out_uri`` (a local directory or an ``s3://`` prefix).

    Args:
        out_uri: where to write; ``manifest.parquet`` and ``images/`` are created below it.
            Existing files of the same names are replaced (the content is a pure function of the
            arguments).
        n_per_class: images per class (>= 1).
        seed: the random seed; the same arguments always give byte-identical files.
        image_size: square side of the images in pixels (>= 32).
        classes: a subset of :data:`DEMO_CLASSES` (in any order; the labels keep their names).
        split_seed: seed of the paper split (50 % train, 10 % query, 40 % database) written to the
            ``split`` column (:func:`duch_core.splits.paper_split`).
        workers: threads that render, encode and write images concurrently (does not change the
            output).

    Returns:
        The URI of the manifest (``<out_uri>/manifest.parquet``). Its ``image_uri`` values are
        relative to the manifest's directory; :func:`duch_core.archive.read_archive` resolves them.
        Extra columns: ``format`` (png/jpg/tif), ``width``, ``height``, ``source`` ("demo").
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    unknown = [c for c in classes if c not in _PAINTERS]
    if unknown or not classes:
        raise ValueError(f"unknown demo classes {unknown}; choose from {DEMO_CLASSES}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    jobs = [(label, DEMO_CLASSES.index(label), i) for label in classes for i in range(n_per_class)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(
            pool.map(
                lambda job: _make_item(out_uri, job[0], job[1], job[2], seed, image_size), jobs
            )
        )
    split = paper_split([str(r["item_id"]) for r in rows], seed=split_seed)
    where = {item: name for name, items in split.items() for item in items}
    for r in rows:
        r["split"] = where[str(r["item_id"])]
        r["source"] = "demo"
    table = pa.Table.from_pylist(rows)
    manifest = storage.join(out_uri, MANIFEST_NAME)
    write_archive(table, manifest)
    return manifest
