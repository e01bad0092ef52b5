"""How the service reads its artifacts: model bundle, index manifests and shards, archive items.

Every deployment takes a :class:`Loaders` so tests (and other storage layouts) can hand it
other readers; the defaults use ``duch_core``. The functions here are module-level so Ray
pickles them by reference; they import the heavier ``duch_core`` modules (torch for the
bundle, the archive reader) only when called. Index manifests are ``duch_core.index_store.IndexManifest``.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from duch_core import catalog_snapshot, hamming_topk, index_store
from duch_core.index_store import IndexManifest
from duch_core.search import HammingIndex

MODALITIES = ("image", "text")
#: API target name -> index modality.
TARGET_MODALITY = {"images": "image", "captions": "text"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEncoder:
    """A query encoder and what the service needs to know about its bundle."""

    encoder: Any  # .encode_texts(list[str]) / .encode_images(list[(H, W, 3) uint8]) -> (N, B) uint8
    bits: int
    bundle_id: str
    config: dict[str, Any] = field(default_factory=dict)  # the bundle's resolved DUCHConfig


def open_encoder(bundle_uri: str) -> LoadedEncoder:
    """Load a model bundle and its hash encoder (imports torch)."""
    from duch_core.bundle import Bundle
    from duch_core.config import to_dict
    from duch_core.hash_encoder import HashEncoder

    bundle = Bundle.load(bundle_uri, device="cpu")
    return LoadedEncoder(
        HashEncoder(bundle), int(bundle.bits), str(bundle.bundle_id), to_dict(bundle.config)
    )


def read_latest(root_uri: str) -> IndexManifest:
    """The index manifest named by ``<root>/LATEST``."""
    return index_store.read_latest(root_uri)


def read_latest_or_none(root_uri: str) -> IndexManifest | None:
    """Like :func:`read_latest`, ``None`` when nothing is published yet."""
    return index_store.read_latest_or_none(root_uri)


def bundle_identity(bundle_uri: str) -> tuple[int, str]:
    """``(bits, bundle id)`` of a bundle, from its ``meta.json`` alone (no weights; the builder
    runs it, where importing torch would cost seconds)."""
    from duch_core import storage

    meta = storage.read_json(storage.join(bundle_uri, "meta.json"))
    return int(meta["bits"]), str(meta["bundle_id"])


def validate(manifest: IndexManifest, bits: int, bundle_id: str) -> None:
    """Raise ``IndexMismatchError`` unless the manifest fits the encoder."""
    index_store.validate(manifest, bits, bundle_id)


#: ``(codes (N, bits // 8) uint8, item_ids (N,) strings, caption_index (N,) int32,
#: row_ids (N,) int64)``; item ids as a ``pyarrow`` string array or any sequence of str.
Codes = tuple[np.ndarray, Any, np.ndarray, np.ndarray]


def load_codes(manifest: IndexManifest, modality: str, shards: Sequence[int] | None) -> Codes:
    """One modality's codes of some shards (all with ``shards=None``), see :data:`Codes`."""
    return index_store.load_codes(manifest, modality, shards=shards)


def read_items(manifest: IndexManifest) -> pa.Table:
    """The archive rows of the items the manifest indexes.

    A version's own catalog snapshot (written at encode time, checksummed) when it has one, so
    daytime edits of the live archive manifest never change what an index built last night
    shows; versions older than snapshots fall back to the archive manifest they name.
    """
    if manifest.catalog is not None:
        return catalog_snapshot.read_catalog(manifest)
    from duch_core.archive import read_archive

    if not manifest.archive:
        raise ValueError(f"index version {manifest.version} names no catalog and no archive")
    log.warning(
        "index version %s has no catalog snapshot: showing the live archive manifest %s",
        manifest.version,
        manifest.archive,
    )
    return read_archive(manifest.archive)


def new_index(bits: int) -> HammingIndex:
    """An empty exact Hamming index."""
    return HammingIndex(bits)


TopK = tuple[np.ndarray, np.ndarray]


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Exact merge of per-shard ``(dist, ids)`` top-k lists (``duch_core.hamming_topk.merge_topk``)."""
    return hamming_topk.merge_topk(parts, k)


class ObjectTooLargeError(ValueError):
    """An archive object is larger than the caller may read."""


def read_image_bytes(uri: str, limit: int | None = None) -> bytes:
    """The bytes of an archive image; with ``limit``, a larger object raises
    :class:`ObjectTooLargeError` before any of it is read.

    Raises:
        FileNotFoundError: no such object.
    """
    from duch_core.storage import open_input, read_bytes

    if limit is None:
        return read_bytes(uri)
    with open_input(uri) as f:
        size = f.size()  # known from opening the object: nothing is read for a refusal
        if size > limit:
            raise ObjectTooLargeError(f"the image is {size} bytes, over the cap of {limit}")
        return bytes(f.read())


@dataclass(frozen=True)
class Loaders:
    """Readers used by the deployments; replace any of them to serve other artifacts."""

    open_encoder: Callable[[str], LoadedEncoder] = open_encoder
    read_latest: Callable[[str], IndexManifest] = read_latest
    read_latest_or_none: Callable[[str], IndexManifest | None] = read_latest_or_none
    bundle_identity: Callable[[str], tuple[int, str]] = bundle_identity
    validate: Callable[[IndexManifest, int, str], None] = validate
    load_codes: Callable[[IndexManifest, str, Sequence[int] | None], Codes] = load_codes
    read_items: Callable[[IndexManifest], pa.Table] = read_items
    read_image_bytes: Callable[[str, int | None], bytes] = read_image_bytes
    new_index: Callable[[int], HammingIndex] = new_index
    merge_topk: Callable[[list[TopK], int], TopK] = merge_topk


# ---- shard groups ------------------------------------------------------------------------------


def assign_shards(rows: list[int], n_groups: int) -> list[list[int]]:
    """Split shard positions among ``n_groups`` searchers, balancing rows.

    Largest shard first, each to the group holding the fewest rows so far (ties: the lower
    position, the lower group), so the split is a pure function of the shard sizes.

    Args:
        rows: row count of each shard, in manifest order.
        n_groups: number of searchers.

    Returns:
        For each group, its shard positions in ascending order.
    """
    load = [0] * n_groups
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for pos in sorted(range(len(rows)), key=lambda p: (-rows[p], p)):
        g = min(range(n_groups), key=lambda i: (load[i], i))
        groups[g].append(pos)
        load[g] += rows[pos]
    return [sorted(g) for g in groups]


def assigned_shards(manifest: IndexManifest, group: int, n_groups: int) -> list[int]:
    """Shard positions held by searcher ``group`` of ``n_groups`` (see :func:`assign_shards`)."""
    return assign_shards([s.rows for s in manifest.shards], n_groups)[group]
