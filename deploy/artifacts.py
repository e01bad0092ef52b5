"""How the service reads its artifacts: model bundle, index manifests and shards, archive items.

Every deployment takes a :class:`Loaders` so tests (and other storage layouts) can hand it
other readers; the defaults use ``duch_core``. The functions here are module-level so Ray
pickles them by reference.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODALITIES = ("image", "text")
#: API target name -> index modality.
TARGET_MODALITY = {"images": "image", "captions": "text"}


@dataclass(frozen=True)
class LoadedEncoder:
    """A query encoder and what the service needs to know about its bundle."""

    encoder: Any  # .encode_texts(list[str]) / .encode_images(list[(H, W, 3) uint8]) -> (N, B) uint8
    bits: int
    bundle_id: str
    config: dict[str, Any] = field(default_factory=dict)  # the bundle's resolved DUCHConfig


def open_encoder(bundle_uri: str) -> LoadedEncoder:
    """Load a model bundle and its hash encoder (imports torch)."""
    from duch_core.bundle import Bundle, HashEncoder
    from duch_core.config import to_dict

    bundle = Bundle.load(bundle_uri, device="cpu")
    return LoadedEncoder(
        HashEncoder(bundle), int(bundle.bits), str(bundle.bundle_id), to_dict(bundle.config)
    )


def read_latest(root_uri: str) -> Any:
    """The index manifest named by ``<root>/LATEST``."""
    from duch_core.index_store import read_latest as _read_latest

    return _read_latest(root_uri)


def validate(manifest: Any, bits: int, bundle_id: str) -> None:
    """Raise ``IndexMismatchError`` unless the manifest fits the encoder."""
    from duch_core.index_store import validate as _validate

    _validate(manifest, bits, bundle_id)


def load_codes(
    manifest: Any, modality: str, shards: list[int] | None
) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray]:
    """``(codes (N, B) uint8, item_ids, caption_index (N,) int32, row_ids (N,) int64)``."""
    from duch_core.index_store import load_codes as _load_codes

    return _load_codes(manifest, modality, shards=shards)


def read_items(manifest: Any) -> Any:
    """The archive rows (a ``pyarrow.Table``) of the items the manifest indexes."""
    from duch_core.archive import read_archive

    uri = manifest_archive_uri(manifest)
    if not uri:
        raise ValueError(f"index version {manifest_version(manifest)} names no archive manifest")
    return read_archive(uri)


def new_index(bits: int) -> Any:
    """An empty exact Hamming index (``duch_core.search.HammingIndex``)."""
    from duch_core.search import HammingIndex

    return HammingIndex(bits)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard ``(dist, ids)`` top-k lists (``duch_core.search.merge_topk``)."""
    from duch_core.search import merge_topk as _merge_topk

    return _merge_topk(parts, k)


def read_image_bytes(uri: str) -> bytes:
    from duch_core.storage import read_bytes

    return read_bytes(uri)


@dataclass(frozen=True)
class Loaders:
    """Readers used by the deployments; replace any of them to serve other artifacts."""

    open_encoder: Callable[[str], LoadedEncoder] = open_encoder
    read_latest: Callable[[str], Any] = read_latest
    validate: Callable[[Any, int, str], None] = validate
    load_codes: Callable[..., tuple[np.ndarray, Any, np.ndarray, np.ndarray]] = load_codes
    read_items: Callable[[Any], Any] = read_items
    read_image_bytes: Callable[[str], bytes] = read_image_bytes
    new_index: Callable[[int], Any] = new_index
    merge_topk: Callable[..., tuple[np.ndarray, np.ndarray]] = merge_topk


# ---- index manifest fields (duch_core.index_store.IndexManifest) ---------------------------------


def manifest_version(manifest: Any) -> str:
    """The version id of an index manifest."""
    return str(manifest.version)


def manifest_uri(manifest: Any) -> str:
    """Where the manifest was read from."""
    return str(getattr(manifest, "uri", "") or "")


def manifest_archive_uri(manifest: Any) -> str | None:
    """The archive manifest the index was encoded from (``None`` if it names none)."""
    return str(getattr(manifest, "archive", "") or "") or None


def manifest_bundle_uri(manifest: Any) -> str | None:
    """The bundle the index was encoded with (``None`` if it names none)."""
    return str(getattr(manifest, "bundle_uri", "") or "") or None


def manifest_counts(manifest: Any) -> dict[str, int]:
    """Codes per modality as listed by the manifest."""
    counts = getattr(manifest, "counts", None) or {}
    return {str(k): int(v) for k, v in dict(counts).items()}


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


def assigned_shards(manifest: Any, group: int, n_groups: int) -> list[int]:
    """Shard positions held by searcher ``group`` of ``n_groups`` (see :func:`assign_shards`)."""
    return assign_shards([int(s.rows) for s in manifest.shards], n_groups)[group]
