"""Cached feature sets: the file format, the cache fingerprint, and reading rows back.

A feature set holds the frozen backbones' features of every item of an archive, in Parquet
shards keyed by ``item_id``::

    <cache_root>/<fingerprint>/features.json              written last: the set is complete
    <cache_root>/<fingerprint>/<version>/shards/*.parquet
    <cache_root>/<fingerprint>/<version>/errors.parquet

Shard columns: ``item_id``, ``label``, ``split``, ``caption_index``, ``caption``,
``caption_aug``, and the features ``img``, ``img_aug``, ``txt``, ``txt_aug`` as
``fixed_size_list<float32>[D]``; augmented views ``v >= 1`` add ``caption_aug_<v>``,
``img_aug_<v>``, ``txt_aug_<v>`` (:func:`aug_columns`). A failed item keeps its row with zero
features and ``error_stage`` / ``error_reason`` set.

The fingerprint covers everything the features depend on (backbones, preprocessing,
augmentation, caption seed, ``paper_compat`` and the manifest rows), so a changed input never
reuses a stale set. Images replaced in place under the same URI are not detected.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import storage
from duch_core.config import AugmentConfig, DUCHConfig, to_dict
from duch_core.splits import choose_captions

FORMAT = "duch-features/1"
FEATURES_FILE = "features.json"
ERRORS_FILE = "errors.parquet"
SHARDS_DIR = "shards"
FEATURE_COLUMNS = ("img", "img_aug", "txt", "txt_aug")
META_COLUMNS = ("item_id", "label", "split", "caption_index", "caption", "caption_aug")
ERROR_COLUMNS = ("error_stage", "error_reason")

log = logging.getLogger("duch.features")


class FeatureStageError(RuntimeError):
    """The feature stage failed as a whole (too many bad items, missing rows)."""


# --------------------------------------------------------------------------------------------
# fingerprint


def manifest_hash(table: pa.Table) -> str:
    """SHA-256 of the manifest rows that determine features and labels, independent of row order.

    Covers ``item_id``, ``image_uri`` (as resolved), ``captions``, ``label`` and ``split``; free
    metadata columns are ignored.
    """
    cols = ["item_id", "image_uri", "captions", "label", "split"]
    t = table.select(cols)
    t = t.take(pc.sort_indices(t, sort_keys=[("item_id", "ascending")]))
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


# --------------------------------------------------------------------------------------------
# columns


def view_count(augment_cfg: AugmentConfig) -> int:
    """Augmented views stored per item: ``views_per_item`` when resampling per epoch, else 1."""
    return int(augment_cfg.views_per_item) if augment_cfg.resample_each_epoch else 1


def view_name(base: str, view: int) -> str:
    """Column ``base`` of augmented view ``view``: ``base`` for view 0, else ``base_<view>``."""
    return base if view == 0 else f"{base}_{view}"


def aug_columns(view: int) -> tuple[str, str]:
    """The (image, text) feature columns of augmented view ``view`` (0: ``img_aug``, ``txt_aug``)."""
    return view_name("img_aug", view), view_name("txt_aug", view)


def train_columns(views: int) -> list[str]:
    """The columns training reads: ids, original views and ``views`` augmented views."""
    out = ["item_id", "img", "txt"]
    for v in range(views):
        out.extend(aug_columns(v))
    return out


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


def select_rows(batch: pa.Table, ids: pa.Array, columns: Sequence[str]) -> pa.Table:
    """Rows of ``batch`` whose ``item_id`` is in ``ids`` and that have features (no error)."""
    keep = pc.and_(
        pc.is_in(batch.column("item_id"), value_set=ids),
        pc.equal(batch.column("error_stage"), ""),
    )
    return batch.filter(keep).select(list(columns))


def manifest_rows(table: pa.Table, caption_seed: int) -> pa.Table:
    """The archive manifest reduced to what the stage needs, with each item's chosen caption
    (:func:`duch_core.splits.choose_captions`; null when the item has none)."""
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
            # a chip's band files (duch_core.chip_io), null for image files
            "bands": (
                table.column("bands").cast(pa.list_(pa.string()))
                if "bands" in table.column_names
                else pa.nulls(table.num_rows, pa.list_(pa.string()))
            ),
        }
    )


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


def load_feature_set(root: str, reused: bool = True) -> FeatureSet | None:
    """The complete feature set under ``root``, or ``None`` when there is none (yet)."""
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


def new_version() -> str:
    """A fresh version directory name: UTC time plus a random suffix (sorts by time)."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def _read_shards(shards: str, columns: Sequence[str], item_ids: Sequence[str] | None) -> pa.Table:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(shards)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    flt = None if item_ids is None else pc.field("item_id").isin(list(item_ids))
    return ds.to_table(columns=list(columns), filter=flt)


def read_columns(
    fs_: FeatureSet, columns: Sequence[str], item_ids: Sequence[str] | None = None
) -> pa.Table:
    """Selected columns of the shards as one Arrow table (for metadata and evaluation).

    Args:
        fs_: the feature set.
        columns: columns to read.
        item_ids: keep only these items (``None`` = all).
    """
    return _read_shards(fs_.shards, columns, item_ids)


def complete_feature_set(
    root: str,
    version: str,
    inputs: dict[str, Any],
    views: int,
    expected_items: int,
    max_error_rate: float,
    seconds: float = 0.0,
) -> FeatureSet:
    """Close a version whose shards are written: collect the errors into ``errors.parquet``,
    check the error rate, then write ``features.json`` (last, so the set becomes visible).

    Args:
        root: ``<cache_root>/<fingerprint of inputs>``.
        version: the version directory under ``root`` holding ``shards/``.
        inputs: :func:`fingerprint_inputs` of the set.
        views: augmented views per item.
        expected_items: manifest rows; the shards must hold exactly as many.
        max_error_rate: fail above this share of failed items.
        seconds: time the stage took (recorded).

    Raises:
        FeatureStageError: rows are missing, every item failed, or the error rate is too high.
    """
    out = storage.join(root, version)
    errors_uri = storage.join(out, ERRORS_FILE)
    t = _read_shards(storage.join(out, SHARDS_DIR), ["item_id", *ERROR_COLUMNS, "img", "txt"], None)
    n = t.num_rows
    if n != expected_items:
        raise FeatureStageError(f"feature shards hold {n} rows for {expected_items} items")
    errors = t.filter(pc.not_equal(t.column("error_stage"), ""))
    errors = errors.select(["item_id", *ERROR_COLUMNS]).sort_by("item_id")
    storage.write_parquet(errors_uri, errors)
    rate = errors.num_rows / n
    if errors.num_rows:
        log.warning(
            "features: %d of %d items failed (see %s); first: %s",
            errors.num_rows,
            n,
            errors_uri,
            errors.slice(0, 3).to_pylist(),
        )
    if errors.num_rows == n or rate > max_error_rate:
        raise FeatureStageError(
            f"{errors.num_rows} of {n} items failed feature extraction ({rate:.1%} > "
            f"features.max_error_rate {max_error_rate:.1%}); reasons in {errors_uri}"
        )
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint(inputs),
        "version": version,
        "image_dim": int(t.schema.field("img").type.list_size),
        "text_dim": int(t.schema.field("txt").type.list_size),
        "items": n,
        "errors": errors.num_rows,
        "views": int(views),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "inputs": inputs,
    }
    storage.write_json(storage.join(root, FEATURES_FILE), meta)
    found = load_feature_set(root, reused=False)
    if found is None:  # only if another writer replaced features.json with another format
        raise FeatureStageError(f"{storage.join(root, FEATURES_FILE)} could not be read back")
    return found


# --------------------------------------------------------------------------------------------
# evaluation items


@dataclass(frozen=True)
class EvalItems:
    """Query or database items read from a feature set, sorted by item id.

    Attributes:
        ids: ``N`` item ids.
        img: ``(N, D_img)`` float32 raw (not normalised) image features.
        txt: ``(N, D_txt)`` float32 raw features of the item's caption.
        labels: ``N`` class labels.
    """

    ids: list[str]
    img: np.ndarray
    txt: np.ndarray
    labels: list[Any]


def read_items(fs_: FeatureSet, ids: Sequence[str]) -> EvalItems:
    """The features and labels of ``ids``; items whose features failed are left out."""
    t = read_columns(fs_, ["item_id", "label", "img", "txt", "error_stage"], ids)
    t = t.filter(pc.equal(t.column("error_stage"), "")).sort_by("item_id")
    return EvalItems(
        [str(x) for x in t.column("item_id").to_pylist()],
        list_to_numpy(t.column("img")),
        list_to_numpy(t.column("txt")),
        t.column("label").to_pylist(),
    )
