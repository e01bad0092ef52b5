"""What a code came from: fingerprints of archive items from their image objects' metadata.

A fingerprint stands for the image bytes and captions of an item without reading the bytes (one
metadata call per object, a chip's band files each once per batch); the index diff
(:mod:`duch_core.index_diff`) copies an item's rows when its fingerprint is unchanged. An item
whose image does not exist gets a ``missing-`` fingerprint, one whose look-up failed because the
store did an ``unknown-`` one (:data:`duch_core.index_diff.MISSING_PREFIX`,
:data:`~duch_core.index_diff.UNKNOWN_PREFIX`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from duch_core import chip_io, index_diff, storage


def source_fingerprint(
    size: int | None, etag: str | None, mtime_ns: int | None, image_uri: str, captions: list[str]
) -> str:
    """``s<size>-e<etag>-m<mtime_ns>-c<hash of image URI and captions>``: what a code came from.

    Object metadata stands for the image bytes (a metadata call, no download). ``size is None``
    means the object does not exist (``missing-c...``); such items are always re-encoded.
    """
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    if size is None:
        return f"{index_diff.MISSING_PREFIX}c{h}"
    mtime = mtime_ns if mtime_ns is not None else ""
    return f"s{size}-e{(etag or '').strip(chr(34))}-m{mtime}-c{h}"


def unknown_fingerprint(image_uri: str, captions: list[str]) -> str:
    """The fingerprint of an item whose image could not be looked up (the store failed)."""
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    return f"{index_diff.UNKNOWN_PREFIX}c{h}"


def _lookup(uri: str) -> tuple[storage.ObjectInfo | None, str, bool]:
    """``(info, error, transient)`` of one image object; the store's retries are inside."""
    try:
        return storage.info(uri), "", False
    except FileNotFoundError as e:
        return None, f"object not found: {uri} ({e})", False
    except Exception as e:  # noqa: BLE001 - any other failure may pass: the item is kept
        return None, f"cannot look up {uri}: {type(e).__name__}: {e}", True


def chip_fingerprint(
    infos: Sequence[storage.ObjectInfo], image_uri: str, bands: Sequence[str], captions: list[str]
) -> str:
    """``w<bytes>-f<hash of every band file's size, ETag, mtime>-c<hash of URI, bands, captions>``:
    what a chip's code came from. The chip URI holds the window and footprint, so a moved window
    or any changed band file of the scene changes it."""
    files = [[i.size, (i.etag or "").strip(chr(34)), i.mtime_ns] for i in infos]
    f = hashlib.sha256(json.dumps(files).encode("utf-8")).hexdigest()[:16]
    h = hashlib.sha256(json.dumps([image_uri, list(bands), list(captions)]).encode()).hexdigest()
    return f"w{sum(i.size for i in infos)}-f{f}-c{h[:16]}"


def _chip_bands(row_bands: Any, image_uri: str, base_dir: str) -> list[str]:
    """A chip's band files in channel order, resolved against the manifest directory."""
    from duch_core.archive import resolve_image_uri

    if row_bands:
        return [resolve_image_uri(base_dir, str(b)) for b in row_bands]
    return chip_io.chip_files(image_uri)


def fingerprint_batch(batch: pa.Table, base_dir: str, io_threads: int) -> pa.Table:
    """Resolve the image URIs of valid archive rows against ``base_dir`` and fingerprint them.

    A chip row (``image_uri`` with a ``#window=`` fragment, see :mod:`duch_core.chip_io`) is
    looked up through every band file it reads (each file once per batch); it is missing when any
    band file is, and its look-up failed transiently when any look-up did.

    Returns:
        Columns ``item_id``, ``image_uri`` (resolved), ``bands_json`` (a chip's resolved band
        files as a JSON list; "" for image files), ``captions_json`` (JSON list of strings),
        ``fingerprint``, ``size`` (bytes of the image object, -1 when unknown or a chip),
        ``lookup_error`` ("" when the object was found) and ``lookup_transient`` (the look-up
        failed because the store did, not because the object is missing).
    """
    from duch_core.archive import resolve_image_uri

    uris = [resolve_image_uri(base_dir, u) for u in batch.column("image_uri").to_pylist()]
    caps = [list(c or []) for c in batch.column("captions").to_pylist()]
    row_bands = (
        batch.column("bands").to_pylist() if "bands" in batch.column_names else [None] * len(uris)
    )
    chip_bands: list[list[str] | None] = []
    for uri, b in zip(uris, row_bands, strict=True):
        chip_bands.append(_chip_bands(b, uri, base_dir) if chip_io.is_chip_uri(uri) else None)
    targets = sorted(
        {f for b in chip_bands if b for f in b}
        | {u for u, b in zip(uris, chip_bands, strict=True) if b is None}
    )
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        found = dict(zip(targets, pool.map(_lookup, targets), strict=True))
    infos: list[tuple[storage.ObjectInfo | None, str, bool]] = []
    fps = []
    for uri, cap, files in zip(uris, caps, chip_bands, strict=True):
        if files is None:
            info, err, transient = found[uri]
            infos.append((info, err, transient))
            if info is not None:
                fps.append(source_fingerprint(info.size, info.etag, info.mtime_ns, uri, cap))
            elif transient:
                fps.append(unknown_fingerprint(uri, cap))
            else:
                fps.append(source_fingerprint(None, None, None, uri, cap))
            continue
        looked = [found[f] for f in files]
        missing = [e for i, e, t in looked if i is None and not t]
        failed = [e for i, e, t in looked if i is None and t]
        if missing:
            infos.append((None, f"chip {uri}: {missing[0]}", False))
            fps.append(source_fingerprint(None, None, None, uri, cap))
        elif failed:
            infos.append((None, f"chip {uri}: {failed[0]}", True))
            fps.append(unknown_fingerprint(uri, cap))
        else:
            file_infos = [i for i, _, _ in looked if i is not None]
            infos.append((None, "", False))
            fps.append(chip_fingerprint(file_infos, uri, files, cap))
    return pa.table(
        {
            "item_id": batch.column("item_id").cast(pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "bands_json": pa.array(
                ["" if b is None else json.dumps(b) for b in chip_bands], pa.string()
            ),
            "captions_json": pa.array([json.dumps(c) for c in caps], pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "size": pa.array([i.size if i else -1 for i, _, _ in infos], pa.int64()),
            "lookup_error": pa.array([e for _, e, _ in infos], pa.string()),
            "lookup_transient": pa.array([t for _, _, t in infos], pa.bool_()),
        }
    )
