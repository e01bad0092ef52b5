"""Feature extraction on Ray Data: an archive -> cached feature shards of the frozen backbones.

    python jobs/extract_features.py [--config configs/demo.yaml] [--set key=value ...] [--force]

Pipeline (streaming; image bytes never pass through the driver, which holds only the manifest
rows):

1. **Manifest** (driver): :func:`duch_core.archive.read_archive`; one caption per item is chosen
   with ``duch.data.caption_seed`` (:func:`duch_core.splits.choose_captions`, as the paper). The
   rows go to Ray in blocks of ``features.block_rows``.
2. **Decode** (CPU tasks, ``features.decode_cpus`` each): fetch the bytes
   (:mod:`duch_core.storage`, threads), :func:`duch_core.imageio.decode_image`, then the original
   view (:func:`~duch_core.imageio.preprocess`) and the augmented view
   (:func:`duch_core.augment.augment_image` then ``preprocess``); the caption is cleaned
   (:func:`~duch_core.imageio.clean_caption`) and, with ``text_method: rule``, rewritten by
   :func:`duch_core.augment.augment_caption`. Every random choice for an item comes from
   generators seeded by ``(duch.augment.seed, item id, view index)`` (:func:`item_rngs`), so the
   augmented views are fixed per item and view and do not depend on batching or scheduling. By
   default there is one augmented view (the paper's single offline copy). With
   ``duch.augment.resample_each_epoch`` there are ``V = duch.augment.views_per_item`` (>= 2)
   independently drawn views of the image and of the caption; view 0 is the same as the single
   view of the default, and the training job uses view ``e % V`` in epoch ``e``
   (:func:`duch_core.train_loop.view_for_epoch`).
3. **Backbones** (an actor pool of callable classes that load both towers once; ``num_gpus``
   per actor when set, else ``actor_cpus``): image tower on the original and every augmented
   view, text tower on the caption and every augmentation (back-translated first with
   ``text_method: backtranslate``; greedy decoding, so every caption view is then the same).
4. **Write**: Parquet shards keyed by ``item_id`` with ``label``, ``split`` (the manifest's),
   ``caption_index``, ``caption``, ``caption_aug`` and four feature columns ``img``,
   ``img_aug``, ``txt``, ``txt_aug`` as ``fixed_size_list<float32>[D]``. With ``V`` views,
   views ``v = 1 .. V-1`` add ``caption_aug_<v>``, ``img_aug_<v>`` and ``txt_aug_<v>``
   (:func:`aug_columns`; ``img_aug`` / ``txt_aug`` / ``caption_aug`` are view 0), and
   ``features.json`` records ``views``. A failed item (unreadable
   or undecodable image, empty or over-long caption, item without captions) keeps its row with
   zero features and ``error_stage`` / ``error_reason`` set; the errors are also collected in
   ``errors.parquet``. The job does not stop on bad input; it fails only when more than
   ``features.max_error_rate`` of the items failed.

Cache layout (``features.cache_root``)::

    <cache_root>/<fingerprint>/features.json              written last: the set is complete
    <cache_root>/<fingerprint>/<version>/shards/*.parquet
    <cache_root>/<fingerprint>/<version>/errors.parquet

The fingerprint is a SHA-256 over the image and text backbone sections (source, preprocessing,
decoding rules), the augmentation section (including ``resample_each_epoch`` and
``views_per_item``), the caption seed, ``paper_compat`` (it changes the text
pooling) and a content hash of the manifest rows (item id, resolved image URI, captions, label,
split; row order does not matter). A rerun with the same inputs finds ``features.json`` and reuses
the set; ``--force`` writes a new version and repoints ``features.json`` to it (older versions are
left in place). Images replaced in place under the same URI are not detected: use ``--force``.
A run killed midway leaves a version directory without ``features.json`` pointing at it; it is
ignored.

Exit status: 0 success, 1 the stage failed, 2 bad configuration or archive.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python jobs/extract_features.py`
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import datetime as _dt
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import storage
from duch_core.archive import ArchiveError
from duch_core.config import (
    AugmentConfig,
    ConfigError,
    DUCHConfig,
    ImageBackboneConfig,
    TextBackboneConfig,
    to_dict,
)
from jobs.train_config import FeatureStageConfig, TrainJobConfig

log = logging.getLogger("duch.features")

FORMAT = "duch-features/1"
FEATURES_FILE = "features.json"
ERRORS_FILE = "errors.parquet"
SHARDS_DIR = "shards"
FEATURE_COLUMNS = ("img", "img_aug", "txt", "txt_aug")
META_COLUMNS = ("item_id", "label", "split", "caption_index", "caption", "caption_aug")
ERROR_COLUMNS = ("error_stage", "error_reason")


class FeatureStageError(RuntimeError):
    """The feature stage failed as a whole (e.g. too many bad items)."""


# --------------------------------------------------------------------------------------------
# fingerprint


def manifest_hash(table: pa.Table) -> str:
    """SHA-256 of the manifest rows that determine features and labels, independent of row order.

    Covers ``item_id``, ``image_uri`` (as resolved), ``captions``, ``label`` and ``split``; free
    metadata columns are ignored.
    """
    cols = ["item_id", "image_uri", "captions", "label", "split"]
    t = table.select(cols)
    order = pc.sort_indices(t, sort_keys=[("item_id", "ascending")])
    t = t.take(order)
    h = hashlib.sha256()
    for batch in t.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            h.update(json.dumps([row[c] for c in cols], separators=(",", ":")).encode())
            h.update(b"\n")
    return h.hexdigest()


def fingerprint_inputs(cfg: DUCHConfig, manifest_digest: str) -> dict[str, Any]:
    """Everything the cached features depend on (hashed by :func:`fingerprint`)."""
    return {
        "format": FORMAT,
        "image_backbone": to_dict(cfg.image_backbone),
        "text_backbone": to_dict(cfg.text_backbone),
        "paper_compat": cfg.paper_compat,
        "augment": to_dict(cfg.augment),
        "caption_seed": cfg.data.caption_seed,
        "manifest": manifest_digest,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    """First 24 hex digits of the SHA-256 of the canonical JSON of ``inputs``."""
    data = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:24]


def item_key(item_id: str) -> int:
    """A stable 63-bit integer of an item id (seeds the item's random streams)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big") >> 1


def item_rngs(
    seed: int, item_id: str, view: int = 0
) -> tuple[np.random.Generator, np.random.Generator]:
    """The (image, caption) augmentation generators of augmented view ``view`` of an item.

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


def view_count(augment_cfg: AugmentConfig) -> int:
    """Augmented views stored per item: ``views_per_item`` when resampling per epoch, else 1."""
    return int(augment_cfg.views_per_item) if augment_cfg.resample_each_epoch else 1


def view_name(base: str, view: int) -> str:
    """Column ``base`` of augmented view ``view``: ``base`` for view 0, else ``base_<view>``."""
    return base if view == 0 else f"{base}_{view}"


def aug_columns(view: int) -> tuple[str, str]:
    """The (image, text) feature columns of augmented view ``view`` (0: ``img_aug``, ``txt_aug``)."""
    return view_name("img_aug", view), view_name("txt_aug", view)


# --------------------------------------------------------------------------------------------
# the feature set on storage


@dataclass(frozen=True)
class FeatureSet:
    """A complete, cached feature set.

    Attributes:
        root: ``<cache_root>/<fingerprint>``.
        shards: URI of the directory of Parquet shards.
        fingerprint: see :func:`fingerprint`.
        image_dim, text_dim: feature dimensions.
        items: rows in the shards (every manifest item).
        errors: items that failed (zero features, ``error_stage`` set).
        reused: True when found in the cache rather than computed now.
        meta: the parsed ``features.json``.
        views: augmented views per item (:func:`aug_columns` ``(v)`` for ``v < views``).
    """

    root: str
    shards: str
    fingerprint: str
    image_dim: int
    text_dim: int
    items: int
    errors: int
    reused: bool
    meta: dict[str, Any]
    views: int = 1


def _load_set(root: str, reused: bool) -> FeatureSet | None:
    uri = storage.join(root, FEATURES_FILE)
    if not storage.exists(uri):
        return None
    meta = storage.read_json(uri)
    if meta.get("format") != FORMAT:
        return None
    return FeatureSet(
        root=root,
        shards=storage.join(root, meta["version"], SHARDS_DIR),
        fingerprint=str(meta["fingerprint"]),
        image_dim=int(meta["image_dim"]),
        text_dim=int(meta["text_dim"]),
        items=int(meta["items"]),
        errors=int(meta["errors"]),
        reused=reused,
        meta=meta,
        views=int(meta.get("views", 1)),
    )


def read_columns(fs_: FeatureSet, columns: Sequence[str], item_ids: Sequence[str] | None = None):
    """Selected columns of the shards as one Arrow table (driver-side, for metadata and eval).

    Args:
        fs_: the feature set.
        columns: columns to read.
        item_ids: keep only these items (``None`` = all).
    """
    import pyarrow.dataset as pads

    fs, path = storage.resolve(fs_.shards)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    flt = None if item_ids is None else pc.field("item_id").isin(list(item_ids))
    return ds.to_table(columns=list(columns), filter=flt)


# --------------------------------------------------------------------------------------------
# stage 2: decode (CPU tasks)


def _fetch(uris: list[str], threads: int) -> list[tuple[bytes | None, str]]:
    def one(uri: str) -> tuple[bytes | None, str]:
        try:
            return storage.read_bytes(uri), ""
        except Exception as e:  # any storage failure is this item's error, not the job's
            return None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, uris))


def decode_batch(
    batch: pa.Table,
    image_cfg: ImageBackboneConfig,
    text_cfg: TextBackboneConfig,
    augment_cfg: AugmentConfig,
    io_threads: int = 8,
    max_pixels: int = 1 << 26,
) -> pa.Table:
    """Manifest rows -> both preprocessed views and both captions of every item.

    Args:
        batch: columns ``item_id``, ``image_uri``, ``caption`` (the chosen caption, null when the
            item has none), ``caption_index``, ``label``, ``split``.

    Returns:
        The metadata columns, ``caption_aug``, ``pixels`` and ``pixels_aug`` (Ray tensor columns
        ``(N, 3, S, S)`` float32; zeros for failed items) and the error columns; with ``V``
        augmented views (:func:`view_count`) also ``caption_aug_<v>`` and ``pixels_aug_<v>``
        for ``v = 1 .. V-1`` (:func:`view_name`).
    """
    from ray.data.extensions import ArrowTensorArray

    from duch_core.augment import augment_caption, augment_image
    from duch_core.imageio import clean_caption, decode_image, decode_options, preprocess

    n = batch.num_rows
    s = image_cfg.image_size
    ids = batch.column("item_id").to_pylist()
    captions = batch.column("caption").to_pylist()
    views = view_count(augment_cfg)
    pixels = np.zeros((n, 3, s, s), np.float32)
    pixels_aug = np.zeros((views, n, 3, s, s), np.float32)
    cap_out: list[str] = [""] * n
    cap_aug: list[list[str]] = [[""] * n for _ in range(views)]
    stage: list[str] = [""] * n
    reason: list[str] = [""] * n
    fetched = _fetch(batch.column("image_uri").to_pylist(), io_threads)
    opts = decode_options(image_cfg)
    for i, (item, (data, err)) in enumerate(zip(ids, fetched, strict=True)):
        rngs = [item_rngs(augment_cfg.seed, item, v) for v in range(views)]
        try:
            if captions[i] is None:
                raise ValueError("the item has no captions")
            cap_out[i] = clean_caption(captions[i], text_cfg)
            for v, (_, txt_rng) in enumerate(rngs):
                if augment_cfg.text_method == "rule":
                    cap_aug[v][i] = clean_caption(augment_caption(cap_out[i], txt_rng), text_cfg)
                else:  # "none", or back-translated later by the backbone actors
                    cap_aug[v][i] = cap_out[i]
        except ValueError as e:
            stage[i], reason[i] = "caption", str(e)
            continue
        if data is None:
            stage[i], reason[i] = "fetch", err
            continue
        try:
            img = decode_image(data, max_pixels=max_pixels, **opts)
        except ValueError as e:
            stage[i], reason[i] = "decode", str(e)
            continue
        try:
            pixels[i] = preprocess(img, image_cfg)
            for v, (img_rng, _) in enumerate(rngs):
                pixels_aug[v, i] = preprocess(
                    augment_image(img, augment_cfg.image_preset, img_rng), image_cfg
                )
        except ValueError as e:
            stage[i], reason[i] = "augment", str(e)
    out: dict[str, Any] = {
        "item_id": pa.array(ids, pa.string()),
        "label": batch.column("label"),
        "split": batch.column("split"),
        "caption_index": batch.column("caption_index"),
        "caption": pa.array(cap_out, pa.string()),
    }
    for v in range(views):
        out[view_name("caption_aug", v)] = pa.array(cap_aug[v], pa.string())
    out["pixels"] = ArrowTensorArray.from_numpy(pixels)
    for v in range(views):
        out[view_name("pixels_aug", v)] = ArrowTensorArray.from_numpy(pixels_aug[v])
    out["error_stage"] = pa.array(stage, pa.string())
    out["error_reason"] = pa.array(reason, pa.string())
    return pa.table(out)


# --------------------------------------------------------------------------------------------
# stage 3: backbones (actor pool)


def fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    """``(N, D)`` float -> Arrow ``fixed_size_list<float32>[D]`` (one list per row)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def list_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow ``fixed_size_list<float32>[D]`` column -> ``(N, D)`` float32 numpy (a copy)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = arr.type.list_size
    flat = arr.flatten() if arr.offset or arr.null_count else arr.values
    return np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


class FeatureEncoder:
    """Runs the frozen towers on decoded batches; one instance per actor, towers loaded once.

    Uses CUDA when the actor was given a GPU, else the CPU.
    """

    def __init__(
        self,
        image_cfg: ImageBackboneConfig,
        text_cfg: TextBackboneConfig,
        augment_cfg: AugmentConfig,
        paper_compat: bool,
        batch_size: int = 32,
        torch_threads: int = 0,
    ) -> None:
        import torch

        from duch_core.backbones import load_image_tower, load_text_tower

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.image_tower = load_image_tower(image_cfg).to(self.device).eval()
        self.text_tower = (
            load_text_tower(text_cfg, paper_compat=paper_compat).to(self.device).eval()
        )
        self.batch_size = max(1, batch_size)
        self.views = view_count(augment_cfg)
        self.translator = None
        if augment_cfg.text_method == "backtranslate":
            from duch_core.augment import BackTranslator

            self.translator = BackTranslator(list(augment_cfg.backtranslation_models))

    def _images(self, px: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(px), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(px[s : s + self.batch_size]))
                out.append(self.image_tower(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.image_tower.dim), np.float32)

    def _texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                out.append(self.text_tower(texts[s : s + self.batch_size]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.text_tower.dim), np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["item_id"])
        views = range(self.views)
        stage = [str(x) for x in batch["error_stage"]]
        reason = [str(x) for x in batch["error_reason"]]
        caps = [str(x) for x in batch["caption"]]
        caps_aug = [[str(x) for x in batch[view_name("caption_aug", v)]] for v in views]
        img = np.zeros((n, self.image_tower.dim), np.float32)
        img_aug = [np.zeros_like(img) for _ in views]
        txt = np.zeros((n, self.text_tower.dim), np.float32)
        txt_aug = [np.zeros_like(txt) for _ in views]
        ok = [i for i in range(n) if not stage[i]]
        if self.translator is not None and ok:
            # greedy decoding is deterministic: every view gets the same translation
            translated = self.translator([caps[i] for i in ok])
            for i, t in zip(ok, translated, strict=True):
                for v in views:
                    caps_aug[v][i] = t
        good: list[int] = []
        try:  # text first; on failure item by item, so one bad caption fails one item
            if ok:
                txt[ok] = self._texts([caps[i] for i in ok])
                for v in views:
                    txt_aug[v][ok] = self._texts([caps_aug[v][i] for i in ok])
            good = ok
        except ValueError:
            for i in ok:
                try:
                    txt[i] = self._texts([caps[i]])[0]
                    for v in views:
                        txt_aug[v][i] = self._texts([caps_aug[v][i]])[0]
                    good.append(i)
                except ValueError as e:
                    stage[i], reason[i] = "text", str(e)
        if good:
            img[good] = self._images(np.asarray(batch["pixels"])[good])
            for v in views:
                img_aug[v][good] = self._images(np.asarray(batch[view_name("pixels_aug", v)])[good])

        def strings(key: str) -> pa.Array:
            return pa.array([None if v is None else str(v) for v in batch[key]], pa.string())

        out: dict[str, Any] = {
            "item_id": strings("item_id"),
            "label": strings("label"),
            "split": strings("split"),
            "caption_index": pa.array(np.asarray(batch["caption_index"], np.int32)),
            "caption": pa.array(caps, pa.string()),
        }
        for v in views:
            out[view_name("caption_aug", v)] = pa.array(caps_aug[v], pa.string())
        out["img"] = fixed_size_list(img)
        for v in views:
            out[aug_columns(v)[0]] = fixed_size_list(img_aug[v])
        out["txt"] = fixed_size_list(txt)
        for v in views:
            out[aug_columns(v)[1]] = fixed_size_list(txt_aug[v])
        out["error_stage"] = pa.array(stage, pa.string())
        out["error_reason"] = pa.array(reason, pa.string())
        return pa.table(out)


# --------------------------------------------------------------------------------------------
# the stage


def manifest_rows(table: pa.Table, caption_seed: int) -> pa.Table:
    """The manifest reduced to what the stage needs, with the chosen caption of every item."""
    from duch_core.splits import choose_captions

    ids = table.column("item_id").to_pylist()
    captions = table.column("captions").to_pylist()
    idx = choose_captions(ids, [len(c or []) for c in captions], seed=caption_seed)
    chosen = [c[int(j)] if j >= 0 else None for c, j in zip(captions, idx, strict=True)]
    return pa.table(
        {
            "item_id": table.column("item_id"),
            "image_uri": table.column("image_uri"),
            "caption": pa.array(chosen, pa.string()),
            "caption_index": pa.array(idx.astype(np.int32)),
            "label": table.column("label"),
            "split": table.column("split"),
        }
    )


def run_stage(
    cfg: DUCHConfig,
    archive: pa.Table,
    stage: FeatureStageConfig,
    cache_root: str,
    force: bool = False,
) -> FeatureSet:
    """Compute (or reuse) the feature set of ``archive`` (from :func:`read_archive`).

    Args:
        cfg: the method's config (backbones, augmentation, caption seed).
        archive: the validated manifest table.
        stage: stage resources.
        cache_root: URI of the feature cache.
        force: compute a new version even if the cache holds one.

    Raises:
        FeatureStageError: more than ``stage.max_error_rate`` of the items failed.
    """
    import ray

    if archive.num_rows == 0:
        raise ArchiveError("the archive has no items")
    inputs = fingerprint_inputs(cfg, manifest_hash(archive))
    fp = fingerprint(inputs)
    root = storage.join(cache_root, fp)
    if not force:
        found = _load_set(root, reused=True)
        if found is not None:
            log.info("features: reusing %s (%d items)", root, found.items)
            return found
    t0 = time.perf_counter()
    version = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    out = storage.join(root, version)
    rows = manifest_rows(archive, cfg.data.caption_seed)
    blocks = [rows.slice(i, stage.block_rows) for i in range(0, rows.num_rows, stage.block_rows)]
    if not ray.is_initialized():
        ray.init()
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=stage.decode_batch,
        fn_kwargs={
            "image_cfg": cfg.image_backbone,
            "text_cfg": cfg.text_backbone,
            "augment_cfg": cfg.augment,
            "io_threads": stage.io_threads,
            "max_pixels": stage.max_image_pixels,
        },
        num_cpus=stage.decode_cpus,
        # Retried on their own; the differing options also keep decoding in CPU tasks instead
        # of being fused into the backbone actors.
        max_retries=3,
    )
    resources: dict[str, Any] = (
        {"num_gpus": stage.num_gpus} if stage.num_gpus > 0 else {"num_cpus": stage.actor_cpus}
    )
    ds = ds.map_batches(
        FeatureEncoder,
        batch_format="numpy",
        batch_size=stage.batch_size,
        fn_constructor_kwargs={
            "image_cfg": cfg.image_backbone,
            "text_cfg": cfg.text_backbone,
            "augment_cfg": cfg.augment,
            "paper_compat": cfg.paper_compat,
            "batch_size": stage.batch_size,
            "torch_threads": stage.torch_threads,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=stage.actors),
        **resources,
    )
    fs, shards_path = storage.resolve(storage.join(out, SHARDS_DIR))
    ds.write_parquet(shards_path, filesystem=fs, min_rows_per_file=stage.shard_rows)
    done = FeatureSet(out, storage.join(out, SHARDS_DIR), fp, 0, 0, 0, 0, False, {})
    meta_cols = read_columns(done, ["item_id", "error_stage", "error_reason", "img", "txt"])
    n = meta_cols.num_rows
    if n != archive.num_rows:
        raise FeatureStageError(f"feature shards hold {n} rows for {archive.num_rows} items")
    errors = meta_cols.filter(pc.not_equal(meta_cols.column("error_stage"), ""))
    errors = errors.select(["item_id", "error_stage", "error_reason"]).sort_by("item_id")
    storage.write_parquet(storage.join(out, ERRORS_FILE), errors)
    image_dim = meta_cols.schema.field("img").type.list_size
    text_dim = meta_cols.schema.field("txt").type.list_size
    rate = errors.num_rows / n
    if errors.num_rows:
        log.warning(
            "features: %d of %d items failed (see %s); first: %s",
            errors.num_rows,
            n,
            storage.join(out, ERRORS_FILE),
            errors.slice(0, 3).to_pylist(),
        )
    if errors.num_rows == n or rate > stage.max_error_rate:
        raise FeatureStageError(
            f"{errors.num_rows} of {n} items failed feature extraction ({rate:.1%} > "
            f"features.max_error_rate {stage.max_error_rate:.1%}); reasons in "
            f"{storage.join(out, ERRORS_FILE)}"
        )
    meta = {
        "format": FORMAT,
        "fingerprint": fp,
        "version": version,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "items": n,
        "errors": errors.num_rows,
        "views": view_count(cfg.augment),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "inputs": inputs,
    }
    storage.write_json(storage.join(root, FEATURES_FILE), meta)
    log.info("features: wrote %s (%d items, %d errors)", out, n, errors.num_rows)
    result = _load_set(root, reused=False)
    assert result is not None
    return result


# --------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extract_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (the training job's: configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the stage for the archive of a training config; print the feature set as JSON."""
    from duch_core import config as config_mod
    from jobs import train_config

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = train_config.validate(config_mod.load(TrainJobConfig, args.config, args.set))
        from jobs.train import prepare_archive

        archive = prepare_archive(cfg)
    except (ConfigError, ArchiveError) as e:
        print(f"extract_features: {e}", file=sys.stderr)
        return 2
    try:
        fs_ = run_stage(cfg.duch, archive, cfg.features, cfg.features.cache_root, force=args.force)
    except FeatureStageError as e:
        print(f"extract_features: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "features": fs_.root,
                "shards": fs_.shards,
                "fingerprint": fs_.fingerprint,
                "items": fs_.items,
                "errors": fs_.errors,
                "image_dim": fs_.image_dim,
                "text_dim": fs_.text_dim,
                "views": fs_.views,
                "reused": fs_.reused,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
