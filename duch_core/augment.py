"""Augmented views: image presets as the paper, offline caption rewriting, back-translation.

Image presets (:func:`augment_image`) act on decoded ``(H, W, 3)`` uint8 pictures; the normal
view's centre crop and resize (:func:`duch_core.imageio.preprocess`) follow, exactly as in the
published pipeline where ``CenterCrop(200)`` and ``Resize(224)`` close every transform set:

=================  ==============================================================================
``aug_center``     Gaussian blur 3x3, sigma ~ U[1.1, 1.3], then rotation by U[-10, -5] degrees
                   (the paper's default)
``aug_random``     blur, rotation, then a random crop of ``crop`` pixels (``preprocess``'s centre
                   crop of the same size then keeps it whole)
``random_crop_only``  a random crop of ``crop`` pixels
``rotation_cc``    rotation only
``blur_cc``        blur only
``jitter_cc``      colour jitter: brightness, contrast, saturation in U[0.6, 1.4] and hue shift in
                   U[-0.1, 0.1], in random order (torchvision's ``ColorJitter(0.4, 0.4, 0.4, 0.1)``)
``each_img_random``  one of rotation_cc / blur_cc / jitter_cc, drawn per image
``no_aug``         the picture unchanged
=================  ==============================================================================

Blur uses reflect padding and a separable kernel (torchvision's ``GaussianBlur``); rotation is
counter-clockwise for positive angles about the centre, nearest-neighbour, corners filled black
(torchvision's ``RandomRotation`` defaults). All randomness comes from the ``rng`` argument, so a
seeded generator reproduces every view.

Captions: :func:`augment_caption` rewrites a caption offline with a built-in remote-sensing
synonym table (nouns, verbs, adjectives, multi-word terms), "there is" -> "it is" as the paper's
rule-based augmentation, and digits <-> number words. :class:`BackTranslator` runs a chain of
MarianMT models (e.g. en->de, de->en), greedy decoding, at most 128 tokens, batches of 8.

Per item, :func:`item_rngs` gives the generators of each augmented view, seeded by the item id,
so a view does not depend on batching, ordering or scheduling.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGE_PRESETS = (
    "aug_center",
    "aug_random",
    "random_crop_only",
    "rotation_cc",
    "blur_cc",
    "jitter_cc",
    "each_img_random",
    "no_aug",
)
BLUR_KERNEL = 3
BLUR_SIGMA = (1.1, 1.3)
ROTATION_DEG = (-10.0, -5.0)
JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with s = 0.5
RANDOM_CROP = 200


class AugmentError(ValueError):
    """Unknown preset or unusable input to an augmentation."""


# --------------------------------------------------------------------------------------------
# per-item seeding
# --------------------------------------------------------------------------------------------


def item_key(item_id: str) -> int:
    """A stable 63-bit integer of an item id (seeds the item's random streams)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big") >> 1


def item_rngs(
    seed: int, item_id: str, view: int = 0
) -> tuple[np.random.Generator, np.random.Generator]:
    """The (image, caption) generators of augmented view ``view`` of an item.

    Fixed by ``seed``, the id and the view index; view 0 has the streams of the single fixed
    view (``[seed, key, 0]`` and ``[seed, key, 1]``), view ``v >= 1`` its own
    (``[seed, key, 0, v]`` and ``[seed, key, 1, v]``).
    """
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    key = item_key(item_id)
    extra = [view] if view else []
    return (
        np.random.default_rng(np.random.SeedSequence([seed, key, 0, *extra])),
        np.random.default_rng(np.random.SeedSequence([seed, key, 1, *extra])),
    )


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """1-D Gaussian weights ``(size,)`` float64 summing to 1 (torchvision's construction)."""
    half = (size - 1) * 0.5
    x = np.linspace(-half, half, size)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
    """Separable Gaussian blur of ``(H, W, C)`` uint8 with reflect padding; returns uint8."""
    k = gaussian_kernel(size, sigma)
    r = size // 2
    x = img.astype(np.float64)
    if min(x.shape[:2]) <= r:
        return img.copy()
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(k[i] * p[i : i + x.shape[0]] for i in range(size))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(size))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``(H, W, 3)`` uint8 counter-clockwise by ``degrees`` about the centre (same size,
    nearest neighbour, black corners)."""
    from PIL import Image

    out = Image.fromarray(img).rotate(
        degrees, resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0)
    )
    return np.asarray(out)


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size x size`` window (sides shorter than ``size`` are kept whole)."""
    h, w = img.shape[:2]
    ch, cw = min(size, h), min(size, w)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return img[top : top + ch, left : left + cw].copy()


def color_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter (:data:`JITTER`) in a random order."""
    from PIL import Image, ImageEnhance

    b, c, s, h = JITTER
    factors = {
        "brightness": rng.uniform(1 - b, 1 + b),
        "contrast": rng.uniform(1 - c, 1 + c),
        "saturation": rng.uniform(1 - s, 1 + s),
        "hue": rng.uniform(-h, h),
    }
    im = Image.fromarray(img)
    for op in rng.permutation(list(factors)):
        f = float(factors[str(op)])
        if op == "brightness":
            im = ImageEnhance.Brightness(im).enhance(f)
        elif op == "contrast":
            im = ImageEnhance.Contrast(im).enhance(f)
        elif op == "saturation":
            im = ImageEnhance.Color(im).enhance(f)
        else:
            hsv = np.asarray(im.convert("HSV")).copy()
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(round(f * 255))) % 256).astype(
                np.uint8
            )
            im = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return np.asarray(im)


def augment_image(
    img: np.ndarray, preset: str, rng: np.random.Generator, crop: int = RANDOM_CROP
) -> np.ndarray:
    """One augmented view of a decoded picture.

    Args:
        img: ``(H, W, 3)`` uint8.
        preset: one of :data:`IMAGE_PRESETS`.
        rng: the source of all randomness.
        crop: window size of the random-crop presets.

    Returns:
        ``(H', W', 3)`` uint8 (same size except for the random-crop presets).

    Raises:
        AugmentError: unknown preset or not an ``(H, W, 3)`` uint8 array.
    """
    if preset not in IMAGE_PRESETS:
        raise AugmentError(f"unknown image augmentation preset {preset!r}; one of {IMAGE_PRESETS}")
    if (
        not isinstance(img, np.ndarray)
        or img.dtype != np.uint8
        or img.ndim != 3
        or img.shape[2] != 3
    ):
        raise AugmentError(
            f"augment_image expects an (H, W, 3) uint8 array, got "
            f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', type(img).__name__)}"
        )
    if preset == "each_img_random":
        preset = ("rotation_cc", "blur_cc", "jitter_cc")[int(rng.integers(0, 3))]
    out = img
    if preset in ("aug_center", "aug_random", "blur_cc"):
        out = gaussian_blur(out, float(rng.uniform(*BLUR_SIGMA)))
    if preset in ("aug_center", "aug_random", "rotation_cc"):
        out = rotate(out, float(rng.uniform(*ROTATION_DEG)))
    if preset in ("aug_random", "random_crop_only"):
        out = random_crop(out, crop, rng)
    if preset == "jitter_cc":
        out = color_jitter(out, rng)
    return np.ascontiguousarray(out) if out is not img else img.copy()


# --------------------------------------------------------------------------------------------
# captions: rule-based
# --------------------------------------------------------------------------------------------

# Groups of interchangeable words and terms as they occur in remote-sensing captions. Each
# member may be replaced by any other member of its group; singular and plural forms are kept
# in separate groups so replacements stay grammatical.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("building", "structure", "construction"),
    ("buildings", "structures", "constructions"),
    ("house", "home", "residence", "dwelling"),
    ("houses", "homes", "residences", "dwellings"),
    ("road", "street", "lane"),
    ("roads", "streets", "lanes"),
    ("highway", "freeway", "motorway", "expressway"),
    ("highways", "freeways", "motorways", "expressways"),
    ("car", "vehicle", "automobile"),
    ("cars", "vehicles", "automobiles"),
    ("plane", "airplane", "aircraft", "jet"),
    ("planes", "airplanes", "aircrafts", "jets"),
    ("boat", "ship", "vessel"),
    ("boats", "ships", "vessels"),
    ("tree", "plant"),
    ("trees", "plants", "woods"),
    ("forest", "woodland", "wood"),
    ("field", "meadow", "lawn"),
    ("fields", "meadows", "lawns"),
    ("farmland", "cropland", "agricultural land", "farm land"),
    ("river", "stream", "waterway"),
    ("lake", "pond", "pool"),
    ("sea", "ocean"),
    ("beach", "shore", "seashore", "coast"),
    ("harbor", "harbour", "port", "marina"),
    ("parking lot", "car park", "parking area", "parking place"),
    ("parking lots", "car parks", "parking areas", "parking places"),
    ("runway", "airstrip", "landing strip"),
    ("bridge", "overpass", "viaduct"),
    ("intersection", "crossroad", "junction", "crossing"),
    ("area", "region", "zone", "district"),
    ("areas", "regions", "zones", "districts"),
    ("land", "ground", "terrain"),
    ("grass", "grassland", "lawn"),
    ("storage tanks", "tanks", "oil tanks", "storage tank"),
    ("tennis court", "tennis field"),
    ("baseball field", "baseball diamond", "ballpark"),
    ("golf course", "golf field", "golf links"),
    ("mountain", "hill"),
    ("mountains", "hills"),
    ("desert", "wasteland", "barren land"),
    ("residential area", "neighborhood", "residential district"),
    ("square", "plaza"),
    ("stadium", "arena", "sports ground"),
    ("church", "chapel"),
    ("school", "campus"),
    ("railway", "railroad", "train track"),
    ("station", "terminal", "depot"),
    ("center", "centre", "middle"),
    ("large", "big", "huge", "vast"),
    ("small", "little", "tiny"),
    ("many", "lots of", "numerous", "plenty of"),
    ("several", "some", "a few"),
    ("green", "verdant"),
    ("dense", "thick", "crowded"),
    ("sparse", "scattered", "thin"),
    ("tall", "high"),
    ("long", "lengthy"),
    ("wide", "broad"),
    ("near", "close to", "next to", "beside", "by"),
    ("around", "surrounding", "round"),
    ("located", "situated", "placed", "positioned"),
    ("parked", "stationed", "stopped"),
    ("surrounded", "encircled", "enclosed"),
    ("lined", "flanked", "bordered"),
    ("covered", "coated", "filled"),
    ("built", "constructed", "erected"),
    ("arranged", "distributed", "organized"),
    ("runs", "passes", "goes"),
    ("cross", "intersect", "traverse"),
    ("crosses", "intersects", "traverses"),
    ("shows", "depicts", "displays"),
    ("contains", "includes", "has"),
)

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)

_SYNONYMS: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {}
for _group in SYNONYM_GROUPS:
    _terms = tuple(tuple(t.split()) for t in _group)
    for _t in _terms:
        _SYNONYMS[_t] = tuple(
            dict.fromkeys((*_SYNONYMS.get(_t, ()), *[o for o in _terms if o != _t]))
        )
for _i, _w in enumerate(NUMBER_WORDS):
    _SYNONYMS[(_w,)] = ((str(_i),),)
    _SYNONYMS[(str(_i),)] = ((_w,),)
_MAX_TERM = max(len(t) for t in _SYNONYMS)
_WORD = re.compile(r"[A-Za-z0-9]+")


def _match_case(src: str, word: str) -> str:
    return word[:1].upper() + word[1:] if src[:1].isupper() else word


def augment_caption(text: str, rng: np.random.Generator, p: float = 0.5) -> str:
    """A paraphrase of ``text`` made offline by rules.

    "there is" becomes "it is" (as the paper's rule-based augmentation); each term found in the
    synonym table (:data:`SYNONYM_GROUPS`, longest match first; digits and number words up to
    ten) is replaced with probability ``p`` by a random alternative, and at least one is
    replaced when the caption holds any. Punctuation and the case of the first letter are kept.
    A caption with nothing to rewrite comes back unchanged.

    Args:
        text: a caption.
        rng: the source of all randomness (same seed, same output).
        p: replacement probability per term.

    Raises:
        AugmentError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise AugmentError(f"caption must be a string, got {type(text).__name__}")
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)]
    low = [w for _, _, w in words]
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in the original text
    for i in range(len(low) - 1):
        if low[i] == "there" and low[i + 1] == "is":
            s0, e0, _ = words[i]
            edits.append((s0, e0, _match_case(text[s0:e0], "it")))
    spans: list[tuple[int, int, tuple[tuple[str, ...], ...]]] = []
    i = 0
    while i < len(low):
        for n in range(min(_MAX_TERM, len(low) - i), 0, -1):
            alts = _SYNONYMS.get(tuple(low[i : i + n]))
            if alts:
                spans.append((i, n, alts))
                i += n
                break
        else:
            i += 1
    if spans:
        chosen = [bool(rng.random() < p) for _ in spans]
        if not any(chosen) and not edits:
            chosen[int(rng.integers(0, len(spans)))] = True
        for (first, n, alts), pick in zip(spans, chosen, strict=True):
            if not pick:
                continue
            s0, e1 = words[first][0], words[first + n - 1][1]
            alt = " ".join(alts[int(rng.integers(0, len(alts)))])
            edits.append((s0, e1, _match_case(text[s0:e1], alt)))
    out = text
    for s0, e1, rep in sorted(edits, key=lambda e: -e[0]):
        out = out[:s0] + rep + out[e1:]
    return out


# --------------------------------------------------------------------------------------------
# captions: back-translation
# --------------------------------------------------------------------------------------------


class BackTranslator:
    """Paraphrases by translating through a chain of MarianMT models.

    ``BackTranslator(["Helsinki-NLP/opus-mt-en-de", "Helsinki-NLP/opus-mt-de-en"])`` translates
    English to German and back. Each model is a hub name (it must already be in the local
    Hugging Face cache: nothing is downloaded), a local directory or an ``s3://`` prefix.
    Decoding is greedy with at most ``max_length`` tokens, in batches of ``batch_size``, as the
    published augmentation.

    Raises:
        BackboneError: a model cannot be loaded offline.
        AugmentError: an empty chain.
    """

    def __init__(
        self,
        models: Sequence[str],
        batch_size: int = 8,
        max_length: int = 128,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import MarianMTModel

        from duch_core.backbones import _resolve_source, load_tokenizer_and_model

        if isinstance(models, str) or not models:
            raise AugmentError("BackTranslator needs a non-empty list of translation models")
        self.models = list(models)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.steps: list[tuple[Any, Any]] = []
        for name in self.models:
            where, local = _resolve_source(name)
            tok, model = load_tokenizer_and_model(
                MarianMTModel, where, local, name, "a MarianMT model"
            )
            mt: Any = model
            self.steps.append((tok, mt.to(self.device).eval()))

    def translate(self, texts: Sequence[str], step: int) -> list[str]:
        """Translate ``texts`` with the chain's model number ``step``."""
        import torch

        tok, model = self.steps[step]
        out: list[str] = []
        for s in range(0, len(texts), self.batch_size):
            batch = tok(
                list(texts[s : s + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            with torch.inference_mode():
                ids = model.generate(
                    **batch, num_beams=1, do_sample=False, max_length=self.max_length
                )
            out.extend(tok.batch_decode(ids, skip_special_tokens=True))
        return out

    def __call__(self, texts: Sequence[str]) -> list[str]:
        """``N`` captions -> ``N`` paraphrases (through every model of the chain in order)."""
        cur = list(texts)
        for step in range(len(self.steps)):
            cur = self.translate(cur, step) if cur else []
        return cur


def back_translate_random(
    texts: Sequence[str], chains: Sequence[BackTranslator], rng: np.random.Generator
) -> list[str]:
    """Each caption through one chain drawn uniformly (the paper's ``aug_bt_prob``: en->es->en
    or en->de->en with equal chance)."""
    if not chains:
        raise AugmentError("back_translate_random needs at least one chain")
    pick = rng.integers(0, len(chains), size=len(texts))
    out = [""] * len(texts)
    for c, chain in enumerate(chains):
        idx = [i for i in range(len(texts)) if pick[i] == c]
        for i, t in zip(idx, chain([texts[i] for i in idx]), strict=True):
            out[i] = t
    return out
