"""Code shards, index manifests, the ``LATEST`` pointer and the encode lock: the output of encoding.

Layout of an index root (a local directory or an ``s3://`` prefix)::

    <root>/LATEST                                   the published version id (one line)
    <root>/LOCK                                     the encode lease (:class:`EncodeLock`), if held
    <root>/bundles/<bundle id>/                     the model bundles the versions were encoded with
    <root>/versions/<version>/index.json            the index manifest (:class:`IndexManifest`)
    <root>/versions/<version>/shards/part-<key>.parquet   code shards (:data:`SHARD_SCHEMA`)
    <root>/versions/<version>/catalog/part-<key>.parquet  the archive rows it was encoded from
    <root>/versions/<version>/errors.parquet        items that could not be encoded
    <root>/versions/<version>/summary.json          what the run did (counts, bytes, speed)
    <root>/versions/<version>/published.json        written once ``LATEST`` has named the version

A version id is ``<UTC timestamp>-<random suffix>`` (:func:`duch_core.storage.new_version_id`,
re-exported here), so ids sort by creation time. Every run writes a fresh version directory: shards
and catalog first, then ``index.json``, then ``LATEST`` is replaced atomically, and only if it
still names the version the run compared with (:func:`publish_if`, a compare-and-swap). A reader
only follows ``LATEST`` and only trusts files listed in ``index.json``, so a run that dies half way
leaves an unreferenced directory, never a half index. Every shard's and catalog part's SHA-256 is
recorded and checked on load.

Each shard row is one code: an image (``caption_index = -1``) or one caption of an item
(``caption_index`` = its position in the archive row's ``captions``). ``code`` is the packed
``bits // 8`` bytes in bit order ``big`` (:mod:`duch_core.codes`). ``fingerprint`` identifies the
source the code was computed from (:func:`duch_core.encoding.source_fingerprint`); with the bundle
id it decides whether a later run can copy the row instead of encoding it again
(:func:`compute_diff`).

The catalog (:func:`read_catalog`) is the archive as the version saw it: ``item_id``,
``image_uri`` (resolved), ``captions``, ``label``, ``split`` and every metadata column of the
archive manifest (``crs``, ``bbox``, ``datetime``, ``sensor``, ...). A service shows hits from the
catalog of the version it searches, never from the live archive manifest, which may have changed.

Search ids (``row_ids``) are global row positions in the version: shards in manifest order, rows
in file order, both modalities counted. They do not depend on which shards a reader loads.

Retention (:func:`apply_retention`) deletes whole versions: it keeps the newest published versions,
never the one ``LATEST`` names nor the one published before it, and deletes directories that were
never published (runs that died or were refused) only once they are older than a grace age.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from duch_core import storage
from duch_core.codes import BITORDER, check_bits
from duch_core.storage import new_version_id as new_version_id  # re-exported

FORMAT_VERSION = 1
MODALITIES: tuple[str, ...] = ("image", "text")
LATEST_NAME = "LATEST"
LOCK_NAME = "LOCK"
MANIFEST_NAME = "index.json"
VERSIONS_DIR = "versions"
SHARDS_DIR = "shards"
CATALOG_DIR = "catalog"
BUNDLES_DIR = "bundles"
ERRORS_NAME = "errors.parquet"
SUMMARY_NAME = "summary.json"
PUBLISHED_NAME = "published.json"
DEFAULT_GRACE_S = 2 * 24 * 3600.0
"""Unpublished version directories younger than this are never deleted (runs in progress)."""

log = logging.getLogger("duch.index")

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        # manifest | fetch | decode | caption | encode
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),  # -1 for image-side errors
        # the store failed in a way that may pass; the item keeps its previous codes if it had any
        pa.field("transient", pa.bool_(), nullable=False),
    ]
)
"""Rows of a version's errors table: one per failed image or caption, or bad manifest row."""


class IndexFormatError(ValueError):
    """Base class of index format errors (kept distinct from the builtin ``IndexError``)."""


class IndexMismatchError(IndexFormatError):
    """An index manifest does not fit the model that would use it (bits, bit order, bundle)."""


class IndexCorruptError(IndexFormatError):
    """A manifest or shard is missing, unreadable, or fails its checksum."""


class IndexNotFoundError(IndexFormatError, FileNotFoundError):
    """No published index at the given root (no ``LATEST`` pointer)."""


class CatalogMissingError(IndexFormatError):
    """The version has no catalog snapshot (it was written before versions had one)."""


class ShrinkError(ValueError):
    """The archive lost more of the published items than allowed, or has none: not published."""


class EncodeConflictError(RuntimeError):
    """Another encode run holds the index root or published first; this run publishes nothing."""


class LockHeldError(EncodeConflictError):
    """Another run holds the encode lock of the index root."""


class LockLostError(EncodeConflictError):
    """This run's lease expired and another run took the lock."""


class PublishConflictError(EncodeConflictError):
    """``LATEST`` no longer names the version this run compared with."""


def shard_schema(bits: int) -> pa.Schema:
    """The Arrow schema of code shards for ``bits``-bit codes."""
    nbytes = check_bits(bits) // 8
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("modality", pa.string(), nullable=False),
            pa.field("caption_index", pa.int32(), nullable=False),
            pa.field("code", pa.binary(nbytes), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("bundle_id", pa.string(), nullable=False),
        ]
    )


# --------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in ``index.json``.

    Attributes:
        path: location relative to the version directory (``shards/part-<key>.parquet``).
        rows: number of rows.
        sha256: hex digest of the file's bytes.
        counts: rows per modality, e.g. ``{"image": 10, "text": 50}``.
        bytes: file size.
    """

    path: str
    rows: int
    sha256: str
    counts: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "sha256": self.sha256,
            "counts": dict(self.counts),
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class CatalogPart:
    """One Parquet file of a version's catalog: path relative to the version, rows, SHA-256."""

    path: str
    rows: int
    sha256: str
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class CatalogInfo:
    """The catalog snapshot of a version, as listed in ``index.json``.

    Attributes:
        parts: the Parquet files, sorted by path.
        rows: archive items in all parts.
        sha256: digest over the parts' paths, row counts and digests (:func:`catalog_info`).
    """

    parts: tuple[CatalogPart, ...]
    rows: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sha256": self.sha256,
            "parts": [p.to_dict() for p in self.parts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogInfo:
        parts = tuple(
            CatalogPart(str(p["path"]), int(p["rows"]), str(p["sha256"]), int(p.get("bytes", 0)))
            for p in data["parts"]
        )
        return cls(parts, int(data["rows"]), str(data["sha256"]))


def catalog_info(parts: Sequence[CatalogPart]) -> CatalogInfo:
    """The catalog entry of ``index.json`` for some written parts (sorted; checksum over all)."""
    ordered = tuple(sorted(parts, key=lambda p: p.path))
    h = hashlib.sha256()
    for p in ordered:
        h.update(f"{p.path}\0{p.rows}\0{p.sha256}\n".encode())
    return CatalogInfo(ordered, sum(p.rows for p in ordered), h.hexdigest())


@dataclass(frozen=True)
class IndexManifest:
    """The ``index.json`` of one index version.

    Attributes:
        version: version id (``<UTC timestamp>-<suffix>``, sorts by creation time).
        bundle_id: content hash of the model bundle every code was computed with.
        bits: code length; shards hold ``bits // 8``-byte codes.
        bitorder: always ``"big"`` (:data:`duch_core.codes.BITORDER`).
        shards: the shards in search-id order.
        counts: rows per modality over all shards.
        errors: errors table path relative to the version directory, or ``None``.
        created: ISO-8601 UTC creation time.
        config: the resolved configuration of the run that wrote it.
        archive: URI of the archive manifest that was encoded.
        bundle_uri: URI of the model bundle the codes were computed with: the immutable copy
            ``<root>/bundles/<bundle id>`` written by the encode job (a service loads its query
            model from there).
        n_errors: rows of the errors table.
        format_version: layout version of this file.
        previous_version: the version ``LATEST`` named when this one was planned (its carried
            rows come from there), or ``None``.
        bundle_source: the bundle URI the run was given (e.g. a mutable ``.../current``).
        catalog: the catalog snapshot (:func:`read_catalog`), or ``None`` for versions written
            before snapshots existed.
        uri: where the manifest was read from (set by readers, not stored).
    """

    version: str
    bundle_id: str
    bits: int
    bitorder: str = BITORDER
    shards: tuple[ShardInfo, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    errors: str | None = ERRORS_NAME
    created: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    archive: str = ""
    bundle_uri: str = ""
    n_errors: int = 0
    format_version: int = FORMAT_VERSION
    previous_version: str | None = None
    bundle_source: str = ""
    catalog: CatalogInfo | None = None
    uri: str = ""

    @property
    def base_uri(self) -> str:
        """The version directory (the manifest's parent)."""
        if not self.uri:
            raise IndexCorruptError(f"manifest of version {self.version} has no location")
        return self.uri.rstrip("/").rpartition("/")[0]

    def resolve(self, rel: str) -> str:
        """A path from the manifest (shard or errors table) as a full URI."""
        return storage.join(self.base_uri, rel)

    def shard_offsets(self) -> np.ndarray:
        """``(len(shards) + 1,)`` int64: the first global row id of every shard, then the total."""
        return np.concatenate([[0], np.cumsum([s.rows for s in self.shards], dtype=np.int64)])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``index.json`` (without ``uri``)."""
        return {
            "format_version": self.format_version,
            "version": self.version,
            "bundle_id": self.bundle_id,
            "bits": self.bits,
            "bitorder": self.bitorder,
            "counts": dict(self.counts),
            "n_errors": self.n_errors,
            "shards": [s.to_dict() for s in self.shards],
            "errors": self.errors,
            "created": self.created,
            "archive": self.archive,
            "bundle_uri": self.bundle_uri,
            "bundle_source": self.bundle_source,
            "previous_version": self.previous_version,
            "catalog": self.catalog.to_dict() if self.catalog is not None else None,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], uri: str = "") -> IndexManifest:
        """Parse the JSON form; raises :class:`IndexCorruptError` on missing or bad fields."""
        where = uri or "index manifest"
        try:
            shards = tuple(
                ShardInfo(
                    path=str(s["path"]),
                    rows=int(s["rows"]),
                    sha256=str(s["sha256"]),
                    counts={str(k): int(v) for k, v in dict(s.get("counts", {})).items()},
                    bytes=int(s.get("bytes", 0)),
                )
                for s in data["shards"]
            )
            fmt = int(data.get("format_version", FORMAT_VERSION))
            if fmt > FORMAT_VERSION:
                raise IndexCorruptError(
                    f"{where}: format_version {fmt} is newer than this reader ({FORMAT_VERSION})"
                )
            return cls(
                version=str(data["version"]),
                bundle_id=str(data["bundle_id"]),
                bits=int(data["bits"]),
                bitorder=str(data["bitorder"]),
                shards=shards,
                counts={str(k): int(v) for k, v in dict(data.get("counts", {})).items()},
                errors=data.get("errors"),
                created=str(data.get("created", "")),
                config=dict(data.get("config") or {}),
                archive=str(data.get("archive") or ""),
                bundle_uri=str(data.get("bundle_uri") or ""),
                n_errors=int(data.get("n_errors", 0)),
                format_version=fmt,
                previous_version=(
                    str(data["previous_version"]) if data.get("previous_version") else None
                ),
                bundle_source=str(data.get("bundle_source") or ""),
                catalog=CatalogInfo.from_dict(data["catalog"]) if data.get("catalog") else None,
                uri=uri,
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, IndexCorruptError):
                raise
            raise IndexCorruptError(f"{where}: not a valid index manifest ({e!r})") from e


# --------------------------------------------------------------------------------------------
# names and locations


def version_uri(root: str, version: str) -> str:
    """The directory of one version under an index root."""
    return storage.join(root, VERSIONS_DIR, version)


def manifest_uri(root: str, version: str) -> str:
    return storage.join(version_uri(root, version), MANIFEST_NAME)


def latest_uri(root: str) -> str:
    return storage.join(root, LATEST_NAME)


# --------------------------------------------------------------------------------------------
# writing


def shard_table(
    item_ids: Sequence[str] | pa.Array,
    modality: Sequence[str] | pa.Array,
    caption_index: Sequence[int] | np.ndarray | pa.Array,
    codes: np.ndarray,
    fingerprint: Sequence[str] | pa.Array,
    bundle_id: str,
    bits: int,
) -> pa.Table:
    """Build shard rows.

    Args:
        item_ids, modality, caption_index, fingerprint: ``(N,)`` columns.
        codes: ``(N, bits // 8)`` uint8 packed codes.
        bundle_id: written on every row.
        bits: code length.

    Raises:
        duch_core.codes.CodeLengthError: codes of the wrong width.
        ValueError: unknown modality or columns of different lengths.
    """
    from duch_core.codes import check_packed

    nbytes = check_bits(bits) // 8
    c = check_packed(codes, bits) if len(codes) else np.zeros((0, nbytes), np.uint8)
    n = c.shape[0]
    code_arr = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(nbytes), n, [None, pa.py_buffer(c.tobytes())]
    )
    mod = pa.array(modality, pa.string())
    bad = set(pc.unique(mod).to_pylist()) - set(MODALITIES)
    if bad:
        raise ValueError(f"unknown modality {sorted(map(str, bad))}; expected one of {MODALITIES}")
    cols = [
        pa.array(item_ids, pa.string()),
        mod,
        pa.array(caption_index, pa.int32()),
        code_arr,
        pa.array(fingerprint, pa.string()),
        pa.array([bundle_id] * n, pa.string()),
    ]
    lengths = {len(a) for a in cols}
    if lengths != {n}:
        raise ValueError(f"shard columns have different lengths {sorted(lengths)}")
    return pa.Table.from_arrays(cols, schema=shard_schema(bits))


def table_bytes(table: pa.Table) -> bytes:
    """Serialise a table as Parquet (zstd) bytes; the same rows always give the same bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_shard(version_dir: str, table: pa.Table) -> ShardInfo:
    """Write one shard under ``<version_dir>/shards/`` named by a hash of its content.

    The name is content-addressed, so writing the same rows twice (a retried task) yields the
    same file, never a second copy.

    Returns:
        The :class:`ShardInfo` to list in the manifest.
    """
    data = table_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{SHARDS_DIR}/part-{digest[:24]}.parquet"
    storage.write_bytes(storage.join(version_dir, rel), data)
    mods = table.column("modality")
    counts = {m: int(pc.sum(pc.equal(mods, m)).as_py() or 0) for m in MODALITIES}
    return ShardInfo(path=rel, rows=table.num_rows, sha256=digest, counts=counts, bytes=len(data))


def write_catalog_part(version_dir: str, table: pa.Table) -> CatalogPart:
    """Write some archive rows as one catalog part under ``<version_dir>/catalog/``.

    Content-addressed like shards, so a retried task rewrites the same file.
    """
    data = table_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{CATALOG_DIR}/part-{digest[:24]}.parquet"
    storage.write_bytes(storage.join(version_dir, rel), data)
    return CatalogPart(path=rel, rows=table.num_rows, sha256=digest, bytes=len(data))


def write_manifest(version_dir: str, manifest: IndexManifest) -> IndexManifest:
    """Write ``index.json`` into the version directory (after every shard is written)."""
    uri = storage.join(version_dir, MANIFEST_NAME)
    storage.write_json(uri, manifest.to_dict())
    return IndexManifest.from_dict(manifest.to_dict(), uri=uri)


def shard_counts(shards: Sequence[ShardInfo]) -> dict[str, int]:
    """Rows per modality over ``shards`` (every modality present, 0 where none)."""
    return {m: sum(int(s.counts.get(m, 0)) for s in shards) for m in MODALITIES}


def finish_version(
    root: str,
    version: str,
    shards: Sequence[ShardInfo],
    bundle_id: str,
    bits: int,
    *,
    errors: str | None = None,
    publish_latest: bool = True,
    **fields: Any,
) -> IndexManifest:
    """Write the manifest of a version whose shards are written, then (by default) publish it.

    ``counts`` are summed over the shards and ``created`` is now; ``fields`` are the other
    :class:`IndexManifest` fields (``archive``, ``bundle_uri``, ``config``, ``n_errors``).
    Returns the manifest as written (with its ``uri``).
    """
    manifest = IndexManifest(
        version=version,
        bundle_id=str(bundle_id),
        bits=int(bits),
        shards=tuple(shards),
        counts=shard_counts(shards),
        errors=errors,
        created=utc_now_iso(),
        **fields,
    )
    written = write_manifest(version_uri(root, version), manifest)
    if publish_latest:
        publish(root, written)
    return written


def publish(root: str, manifest: IndexManifest) -> None:
    """Point ``<root>/LATEST`` at ``manifest``'s version, whatever it names now.

    For tools and rollbacks by hand; the encode job publishes with :func:`publish_if`.
    """
    storage.publish_pointer(latest_uri(root), manifest.version)
    mark_published(root, manifest.version, None)


@dataclass(frozen=True)
class LatestState:
    """What ``LATEST`` said when it was read: the version and the object's ETag (both ``None``
    when nothing was published)."""

    version: str | None
    etag: str | None


def read_latest_state(root: str) -> LatestState:
    """``LATEST`` with its ETag, for a later :func:`publish_if`.

    Raises:
        StorageError: the pointer is unreadable, empty or not UTF-8.
    """
    uri = latest_uri(root)
    try:
        got = storage.read_versioned(uri)
    except FileNotFoundError:
        return LatestState(None, None)
    return LatestState(storage.decode_pointer(got.data, uri), got.etag)


def publish_if(root: str, version: str, expected: LatestState) -> None:
    """Point ``LATEST`` at ``version`` only if it is still as ``expected`` (compare-and-swap).

    One conditional write: ``If-Match`` the ETag read with ``expected`` (``If-None-Match: *``
    when nothing was published), so of two runs that planned against the same ``LATEST`` only
    the first publishes. Retried while the store fails transiently; a failure never changes
    or deletes ``LATEST``.

    Raises:
        PublishConflictError: ``LATEST`` changed since ``expected`` was read.
        TransientStorageError, StorageError: the store failed; ``LATEST`` is as it was.
    """
    uri = latest_uri(root)
    data = version.encode("utf-8")
    if not version or version != version.strip() or "\n" in version or len(data) > 1024:
        raise ValueError(f"not a valid version id: {version!r}")
    try:
        if expected.etag is None:
            storage.put_conditional(uri, data, if_none_match=True)
        else:
            storage.put_conditional(uri, data, if_match=expected.etag)
    except storage.PreconditionFailedError:
        now = read_latest_state(root)
        raise PublishConflictError(
            f"{uri} now names {now.version!r}, not {expected.version!r} that this run compared "
            f"with: another run published meanwhile; version {version} is not published"
        ) from None


def mark_published(root: str, version: str, previous: str | None) -> None:
    """Record in the version's directory that ``LATEST`` named it (retention counts these)."""
    storage.write_json(
        storage.join(version_uri(root, version), PUBLISHED_NAME),
        {"version": version, "previous_version": previous, "published": utc_now_iso()},
    )


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# reading


def read_manifest(uri: str) -> IndexManifest:
    """Read an ``index.json``.

    Raises:
        IndexCorruptError: missing, not JSON, or malformed.
    """
    try:
        data = storage.read_json(uri)
    except FileNotFoundError as e:
        raise IndexCorruptError(f"index manifest not found: {uri}") from e
    except ValueError as e:
        raise IndexCorruptError(f"{uri}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise IndexCorruptError(f"{uri}: expected a JSON object")
    return IndexManifest.from_dict(data, uri=uri)


def read_latest_version(root: str) -> str | None:
    """The version id ``LATEST`` names, or ``None`` when nothing is published yet."""
    try:
        value = storage.read_pointer(latest_uri(root)).strip()
    except FileNotFoundError:
        return None
    return value or None


def read_latest_or_none(root: str) -> IndexManifest | None:
    """Like :func:`read_latest`, but ``None`` when nothing is published at ``root`` yet."""
    try:
        return read_latest(root)
    except IndexNotFoundError:
        return None


def read_latest(root: str) -> IndexManifest:
    """The manifest of the published version of an index root.

    Raises:
        IndexNotFoundError: nothing published at ``root``.
        IndexCorruptError: ``LATEST`` names a version without a readable manifest.
    """
    version = read_latest_version(root)
    if version is None:
        raise IndexNotFoundError(f"no published index at {root} (no {LATEST_NAME} pointer)")
    return read_manifest(manifest_uri(root, version))


def validate(manifest: IndexManifest, bits: int, bundle_id: str) -> None:
    """Refuse a manifest that does not fit a model.

    Raises:
        IndexMismatchError: different code length, bit order or bundle id. The message names both.
    """
    where = manifest.uri or f"index version {manifest.version}"
    if int(manifest.bits) != int(bits):
        raise IndexMismatchError(
            f"{where}: index holds {manifest.bits}-bit codes but the model makes {bits}-bit codes"
        )
    if manifest.bitorder != BITORDER:
        raise IndexMismatchError(
            f"{where}: index bit order {manifest.bitorder!r}, this reader packs {BITORDER!r}"
        )
    if manifest.bundle_id != bundle_id:
        raise IndexMismatchError(
            f"{where}: index was encoded with bundle {manifest.bundle_id!r}, the model is "
            f"bundle {bundle_id!r}; re-encode the archive with this bundle"
        )


def read_shard(manifest: IndexManifest, position: int, verify: bool = True) -> pa.Table:
    """Read shard ``position`` of a manifest, checking its size and SHA-256.

    Raises:
        IndexCorruptError: the shard is missing, truncated, altered, or not a shard.
    """
    if not 0 <= position < len(manifest.shards):
        raise IndexError(f"shard {position} out of range (0..{len(manifest.shards) - 1})")
    info = manifest.shards[position]
    uri = manifest.resolve(info.path)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise IndexCorruptError(
            f"shard {info.path} of index version {manifest.version} is missing ({uri})"
        ) from e
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise IndexCorruptError(
                f"shard {uri} fails its checksum (sha256 {digest[:16]}..., manifest says "
                f"{info.sha256[:16]}...; {len(data)} bytes, expected {info.bytes or '?'}): the "
                "file is incomplete or was changed after the index was published"
            )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise IndexCorruptError(f"shard {uri} is not readable Parquet ({e})") from e
    expected = shard_schema(manifest.bits)
    missing = [n for n in expected.names if n not in table.column_names]
    if missing or table.num_rows != info.rows:
        raise IndexCorruptError(
            f"shard {uri}: missing columns {missing} or {table.num_rows} rows where the manifest "
            f"lists {info.rows}"
        )
    if table.schema.field("code").type != expected.field("code").type:
        raise IndexCorruptError(
            f"shard {uri}: code column is {table.schema.field('code').type}, expected "
            f"{expected.field('code').type} for {manifest.bits}-bit codes"
        )
    return table.select(expected.names)


def codes_from_column(col: pa.Array | pa.ChunkedArray, bits: int) -> np.ndarray:
    """``fixed_size_binary(bits // 8)`` column -> ``(N, bits // 8)`` uint8 (a copy)."""
    nbytes = check_bits(bits) // 8
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, nbytes), np.uint8)
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8)[
        arr.offset * nbytes : (arr.offset + len(arr)) * nbytes
    ]
    return flat.reshape(len(arr), nbytes).copy()


def load_codes(
    manifest: IndexManifest, modality: str, shards: Sequence[int] | None = None
) -> tuple[np.ndarray, pa.StringArray, np.ndarray, np.ndarray]:
    """Load the codes of one modality from some or all shards (checksums verified).

    Args:
        manifest: an index manifest (from :func:`read_latest` / :func:`read_manifest`).
        modality: ``"image"`` or ``"text"``.
        shards: shard positions to read; ``None`` = all.

    Returns:
        ``(codes, item_ids, caption_index, row_ids)``: codes ``(N, bits // 8)`` uint8, item ids a
        ``pyarrow.StringArray`` of length N, caption index ``(N,)`` int32 (``-1`` for images),
        row ids ``(N,)`` int64 global search ids (see the module docstring).

    Raises:
        ValueError: unknown modality.
        IndexCorruptError: a shard is missing or fails its checksum.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    positions = range(len(manifest.shards)) if shards is None else list(shards)
    offsets = manifest.shard_offsets()
    nbytes = check_bits(manifest.bits) // 8
    codes: list[np.ndarray] = []
    ids: list[pa.Array] = []
    caps: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for p in positions:
        t = read_shard(manifest, int(p))
        mask = pc.equal(t.column("modality"), modality)
        idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        sel = t.take(pa.array(idx, pa.int64()))
        codes.append(codes_from_column(sel.column("code"), manifest.bits))
        ids.append(sel.column("item_id").combine_chunks())
        caps.append(sel.column("caption_index").to_numpy().astype(np.int32))
        rows.append(offsets[int(p)] + idx.astype(np.int64))
    if not codes:
        return (
            np.zeros((0, nbytes), np.uint8),
            pa.array([], pa.string()),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
        )
    item_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    return (
        np.concatenate(codes),
        item_ids,
        np.concatenate(caps),
        np.concatenate(rows),
    )


def read_rows(
    manifest: IndexManifest, columns: Sequence[str] | None = None, verify: bool = True
) -> pa.Table:
    """Every shard row of a version (both modalities), in search-id order."""
    tables = [read_shard(manifest, i, verify=verify) for i in range(len(manifest.shards))]
    if not tables:
        return shard_schema(manifest.bits).empty_table()
    t = pa.concat_tables(tables)
    return t.select(list(columns)) if columns else t


def read_errors(manifest: IndexManifest) -> pa.Table:
    """The version's errors table (:data:`ERRORS_SCHEMA`); empty when it has none.

    Tables written before the ``transient`` column existed read as ``transient = False``.
    """
    if not manifest.errors:
        return ERRORS_SCHEMA.empty_table()
    uri = manifest.resolve(manifest.errors)
    try:
        table = storage.read_parquet(uri)
    except FileNotFoundError as e:
        raise IndexCorruptError(f"errors table of version {manifest.version} missing: {uri}") from e
    if "transient" not in table.column_names:
        table = table.append_column("transient", pa.array([False] * table.num_rows, pa.bool_()))
    return table.select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)


def read_catalog(manifest: IndexManifest, verify: bool = True) -> pa.Table:
    """The archive rows the version was encoded from, sorted by ``item_id``.

    Columns: ``item_id``, ``image_uri`` (resolved: a full path or URI), ``captions``
    (list<string>), ``label``, ``split``, then the archive's metadata columns as they were.
    Every part's size, row count and SHA-256 are checked against ``index.json``.

    Raises:
        CatalogMissingError: the version has no catalog (older than catalog snapshots).
        IndexCorruptError: a part is missing, altered or unreadable, or the part list does not
            match its recorded checksum.
    """
    info = manifest.catalog
    if info is None:
        raise CatalogMissingError(
            f"index version {manifest.version} has no catalog snapshot (written before versions "
            "had one): read its archive manifest, or re-encode to get one"
        )
    if verify and catalog_info(info.parts).sha256 != info.sha256:
        raise IndexCorruptError(
            f"catalog of index version {manifest.version}: the part list does not match its "
            "checksum in index.json"
        )
    tables = []
    for part in info.parts:
        uri = manifest.resolve(part.path)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError as e:
            raise IndexCorruptError(
                f"catalog part {part.path} of index version {manifest.version} is missing ({uri})"
            ) from e
        if verify and hashlib.sha256(data).hexdigest() != part.sha256:
            raise IndexCorruptError(
                f"catalog part {uri} fails its checksum ({len(data)} bytes, expected "
                f"{part.bytes or '?'}): the file is incomplete or was changed after publishing"
            )
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise IndexCorruptError(f"catalog part {uri} is not readable Parquet ({e})") from e
        if table.num_rows != part.rows:
            raise IndexCorruptError(
                f"catalog part {uri} holds {table.num_rows} rows, index.json lists {part.rows}"
            )
        tables.append(table)
    if not tables:
        from duch_core.archive import ARCHIVE_SCHEMA

        return ARCHIVE_SCHEMA.empty_table()
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # a metadata column typed differently in two parts (JSON-lines manifests): as text
        table = pa.concat_tables([_metadata_as_text(t) for t in tables])
    return table.sort_by([("item_id", "ascending")])


_FIXED_CATALOG_COLUMNS = ("item_id", "image_uri", "captions", "label", "split")


def _metadata_as_text(table: pa.Table) -> pa.Table:
    """The metadata columns of a catalog part as text (strings kept, other values as JSON)."""
    for pos, name in enumerate(table.column_names):
        if name in _FIXED_CATALOG_COLUMNS:
            continue
        col = table.column(name)
        if pa.types.is_string(col.type):
            continue
        values = [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()]
        table = table.set_column(pos, name, pa.array(values, pa.string()))
    return table


# --------------------------------------------------------------------------------------------
# the encode lock


@dataclass(frozen=True)
class LockInfo:
    """What a lock object says about its holder.

    Attributes:
        owner: the holder's random token.
        host, pid: where the holder runs.
        started: when it took the lock (UTC ISO time).
        expires: when the lease ends unless refreshed (seconds since the epoch).
        version: the index version the holder is writing, if it has one yet.
    """

    owner: str
    host: str = ""
    pid: int = 0
    started: str = ""
    expires: float = 0.0
    version: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "expires": self.expires,
                "expires_utc": _dt.datetime.fromtimestamp(self.expires, _dt.UTC).isoformat(
                    timespec="seconds"
                ),
                "version": self.version,
            },
            indent=2,
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        """The holder, or ``None`` when the object is not a lock (it then counts as expired)."""
        try:
            d = json.loads(data)
            return cls(
                owner=str(d["owner"]),
                host=str(d.get("host", "")),
                pid=int(d.get("pid", 0)),
                started=str(d.get("started", "")),
                expires=float(d["expires"]),
                version=str(d["version"]) if d.get("version") else None,
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        left = self.expires - now
        when = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return (
            f"held by {self.host or '?'} pid {self.pid} since {self.started or '?'} "
            f"({when}; writing version {self.version or '-'})"
        )


class EncodeLock:
    """A lease on an index root: only the run that holds it publishes there.

    The lease is the object ``<root>/LOCK``, created with a conditional write (S3
    ``If-None-Match: *``; locally under an exclusive directory lock), so of two runs only one
    creates it. It names its holder and expires ``ttl_s`` seconds after the last refresh; a
    lease past its expiry may be taken over (a conditional write on its ETag, so only one run
    takes it). :meth:`start_heartbeat` refreshes it every ``ttl_s / 3`` seconds while the run
    works, and :meth:`refresh` right before publishing proves the lease is still this run's.
    Expiry compares wall clocks of different machines: keep ``ttl_s`` well above their skew.

    Args:
        root: the index root.
        ttl_s: lease length in seconds.
        clock: seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self, root: str, ttl_s: float = 600.0, clock: Callable[[], float] = time.time
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl_s}")
        self.root = root
        self.uri = storage.join(root, LOCK_NAME)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self.info = LockInfo(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=utc_now_iso(),
        )
        self.took_over: LockInfo | None = None
        self._etag: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def held(self) -> bool:
        return self._etag is not None and not self.lost

    def _body(self, version: str | None) -> bytes:
        self.info = LockInfo(
            self.info.owner,
            self.info.host,
            self.info.pid,
            self.info.started,
            self.clock() + self.ttl_s,
            version if version is not None else self.info.version,
        )
        return self.info.to_json()

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for a held one to go.

        Raises:
            LockHeldError: another run holds an unexpired lease (the message names it).
            TransientStorageError, StorageError: the store failed.
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                self._etag = storage.put_conditional(self.uri, self._body(None), if_none_match=True)
                return
            except storage.PreconditionFailedError:
                pass
            try:
                current = storage.read_versioned(self.uri)
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            holder = LockInfo.parse(current.data)
            now = self.clock()
            if holder is None or holder.expires < now:
                try:
                    self._etag = storage.put_conditional(
                        self.uri, self._body(None), if_match=current.etag
                    )
                except storage.PreconditionFailedError:
                    continue  # another run took it first, or its holder refreshed it
                self.took_over = holder
                log.warning(
                    "took over the expired encode lock of %s (%s)",
                    self.root,
                    holder.describe(now) if holder else "unreadable lock object",
                )
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockHeldError(
                    f"another encode run is working on {self.root}: the lock {self.uri} is "
                    f"{holder.describe(now)}; nothing was written. It is free again when that "
                    "run ends or its lease expires (lock_ttl_s)."
                )
            time.sleep(max(0.05, min(poll_s, left, holder.expires - now + 0.05)))

    def refresh(self, version: str | None = None) -> None:
        """Extend the lease (and record ``version``); proves the lock is still this run's.

        Raises:
            LockLostError: the lease expired and another run took the lock.
            TransientStorageError, StorageError: the store failed (the lease may still hold).
        """
        with self._mutex:
            if self._etag is None:
                raise LockLostError(f"{self.uri}: this run does not hold the lock")
            if self.lost:
                raise LockLostError(f"{self.uri}: this run's lease expired and was taken over")
            try:
                self._etag = storage.put_conditional(
                    self.uri, self._body(version), if_match=self._etag
                )
            except storage.PreconditionFailedError:
                self.lost = True
                try:
                    holder = LockInfo.parse(storage.read_versioned(self.uri).data)
                except (FileNotFoundError, storage.StorageError):
                    holder = None
                raise LockLostError(
                    f"{self.uri}: this run's lease expired and the lock was taken over"
                    + (f" ({holder.describe(self.clock())})" if holder else "")
                ) from None

    def _beat(self) -> None:
        period = self.ttl_s / 3
        while not self._stop.wait(period):
            try:
                self.refresh()
            except LockLostError as e:
                log.error("%s", e)
                return
            except storage.StorageError as e:
                log.warning("could not refresh the encode lock (will retry): %s", e)

    def start_heartbeat(self) -> None:
        """Refresh the lease every ``ttl_s / 3`` seconds in a background thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="encode-lock", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Stop refreshing and delete the lock if it is still this run's (never raises)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._mutex:
            if self._etag is None or self.lost:
                return
            etag, self._etag = self._etag, None
        try:
            storage.delete_conditional(self.uri, etag)
        except storage.PreconditionFailedError:
            log.warning("the encode lock of %s was taken over before it was released", self.root)
        except storage.StorageError as e:
            log.warning("could not release the encode lock %s (it expires): %s", self.uri, e)


# --------------------------------------------------------------------------------------------
# retention


@dataclass(frozen=True)
class VersionState:
    """A version directory: whether it has an ``index.json`` and whether it was published."""

    manifest: bool
    published: bool


def list_versions(root: str) -> dict[str, bool]:
    """Every version directory under ``root`` -> whether it holds an ``index.json``."""
    return {v: st.manifest for v, st in version_states(root).items()}


def version_states(root: str) -> dict[str, VersionState]:
    """Every version directory under ``root`` and its :class:`VersionState`, sorted by id.

    A version counts as published when it has ``published.json``; a version written before those
    markers existed counts when its ``summary.json`` says so.
    """
    base = storage.join(root, VERSIONS_DIR)
    prefix = base.rstrip("/") + "/"
    try:
        listed = storage.list_prefix(base, recursive=True)
    except FileNotFoundError:
        listed = []
    files: dict[str, set[str]] = {}
    for uri in listed:
        if not uri.startswith(prefix):
            continue
        version, _, tail = uri[len(prefix) :].partition("/")
        if version:
            files.setdefault(version, set()).add(tail)
    out = {}
    for version, names in sorted(files.items()):
        has_manifest = MANIFEST_NAME in names
        published = PUBLISHED_NAME in names
        if has_manifest and not published and SUMMARY_NAME in names:
            try:
                summary = storage.read_json(storage.join(version_uri(root, version), SUMMARY_NAME))
                published = summary.get("published") is True
            except (FileNotFoundError, ValueError, AttributeError):
                published = False
        out[version] = VersionState(has_manifest, published)
    return out


def apply_retention(
    root: str,
    keep: int,
    current: str | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    now: _dt.datetime | None = None,
) -> list[str]:
    """Delete old versions, whole.

    Kept: the ``keep`` newest published versions (``keep <= 0`` keeps every published one), the
    version ``LATEST`` names and the one it was published after (its ``previous_version``, else
    the newest published version before it), and ``current`` (a run in progress). A directory
    that was never published (a run that died, or one refused for its error rate or by a
    conflict) is deleted once its id says it is older than ``grace_s`` seconds, so a run still
    writing is never touched. Call it while holding the :class:`EncodeLock`.

    Returns:
        The deleted version ids.
    """
    states = version_states(root)
    latest = read_latest_version(root)
    published = [v for v, st in states.items() if st.published]
    protected = {v for v in (latest, current) if v}
    if latest is not None:
        before = None
        try:
            before = read_manifest(manifest_uri(root, latest)).previous_version
        except IndexCorruptError:
            pass
        if before is None:
            older = [v for v in published if v < latest]
            before = older[-1] if older else None
        if before:
            protected.add(before)
    protected.update(published[-keep:] if keep > 0 else published)
    now = now or _dt.datetime.now(_dt.UTC)
    doomed = []
    for v, st in states.items():
        if v in protected:
            continue
        if st.published:
            doomed.append(v)
            continue
        born = storage.version_time(v)
        if born is not None and (now - born).total_seconds() > grace_s:
            doomed.append(v)
    for v in doomed:
        storage.delete_prefix(version_uri(root, v))
    return doomed


# --------------------------------------------------------------------------------------------
# change detection


def _empty_ids() -> pa.Array:
    return pa.array([], pa.string())


UNKNOWN_PREFIX = "unknown-"
"""Fingerprint prefix of an item whose image could not be looked up because the store failed."""

MISSING_PREFIX = "missing-"
"""Fingerprint prefix of an item whose image does not exist."""


@dataclass
class IndexDiff:
    """What a run does to the published index: item counts and the id sets.

    Attributes:
        total: archive items.
        new: items the previous version never saw.
        changed: items seen before that must be encoded again (different fingerprint, failed
            last time, or image missing).
        unchanged: items whose rows are copied from the previous version.
        deleted: items of the previous version no longer in the archive.
        full_reencode: every item is encoded (no previous version, or another bundle).
        reason: why, in words.
        encode_ids: ids to encode, a string array.
        carry_ids: ids whose rows are carried over, a string array (``stale_ids`` included).
        stale_ids: items whose image could not be looked up (the store failed) and whose
            previous rows are therefore carried over unchanged.
        prev_row_ids: items with rows in the previous version (same bundle and bits only).
        prev_items: items of the previous version: with rows or with item errors (bad
            manifest rows not counted); what ``deleted`` is a share of.
    """

    total: int
    new: int
    changed: int
    unchanged: int
    deleted: int
    full_reencode: bool
    reason: str
    encode_ids: pa.Array
    carry_ids: pa.Array
    stale_ids: pa.Array = field(default_factory=_empty_ids)
    prev_row_ids: pa.Array = field(default_factory=_empty_ids)
    prev_items: int = 0

    @property
    def deleted_fraction(self) -> float:
        """``deleted / prev_items`` (0 without a previous version)."""
        return self.deleted / self.prev_items if self.prev_items else 0.0

    def plan(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict (what a dry run reports)."""
        return {
            "archive_items": self.total,
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "previous_items": self.prev_items,
            "would_encode": len(self.encode_ids),
            "would_carry_over": len(self.carry_ids),
            "stale_lookups": len(self.stale_ids),
            "full_reencode": self.full_reencode,
            "reason": self.reason,
        }


def check_shrink(diff: IndexDiff, max_deleted_fraction: float) -> None:
    """Refuse an archive that is empty or lost too many of the published items.

    A manifest that was truncated, replaced by an empty one or read half would otherwise publish
    an index without those items.

    Raises:
        ShrinkError: no valid archive items, or ``diff.deleted_fraction`` above the limit.
    """
    if diff.total == 0:
        raise ShrinkError(
            "the archive has no valid items; refusing to publish an empty index (check the "
            "archive manifest; --allow-shrink publishes it anyway)"
        )
    if diff.deleted_fraction > max_deleted_fraction:
        raise ShrinkError(
            f"{diff.deleted} of the {diff.prev_items} items of the published index are no longer "
            f"in the archive ({diff.deleted_fraction:.1%}, above max_deleted_fraction "
            f"{max_deleted_fraction:.1%}); refusing to publish. If the archive really shrank, "
            "rerun with --allow-shrink"
        )


def compute_diff(
    current: pa.Table, prev: IndexManifest | None, bundle_id: str, bits: int
) -> IndexDiff:
    """Compare an archive's ``(item_id, fingerprint)`` table with a published version.

    An item is carried over when ``prev`` was made by the same bundle and code length, it had the
    same fingerprint there, it had no error there and its image was found now. An item whose
    image could not be looked up because the store failed (fingerprint ``unknown-...``) keeps
    its previous rows if it has any (``stale_ids``). Everything else is encoded. Reads the
    previous version's rows (two columns, checksums verified) and errors.

    Raises:
        ArchiveError: ``current`` repeats an item id.
        IndexCorruptError: the previous version's shards or errors table cannot be read.
    """
    from duch_core.archive import ArchiveError

    ids = current.column("item_id").combine_chunks()
    total = current.num_rows
    if pc.count_distinct(ids).as_py() != total:
        counts = pc.value_counts(ids).to_pylist()
        dup = [v["values"] for v in counts if v["counts"] > 1][:5]
        raise ArchiveError(f"archive item_id values are not unique, e.g. {dup}")
    empty = _empty_ids()
    if prev is None:
        return IndexDiff(total, total, 0, 0, 0, True, "no published index", ids, empty)
    prev_items = (
        read_rows(prev, columns=["item_id", "fingerprint"])
        .group_by(["item_id", "fingerprint"])
        .aggregate([])
    )
    errors = read_errors(prev)
    failed_ids = errors.column("item_id").combine_chunks()
    item_errors = errors.filter(
        pc.and_(
            pc.not_equal(errors.column("stage"), "manifest"),
            pc.not_equal(errors.column("item_id"), ""),
        )
    )
    row_ids = pc.unique(prev_items.column("item_id").combine_chunks())
    prev_ids = pc.unique(
        pa.concat_arrays([row_ids, item_errors.column("item_id").combine_chunks()])
    )
    deleted = int(pc.sum(pc.invert(pc.is_in(prev_ids, value_set=ids))).as_py() or 0)
    n_prev = len(prev_ids)
    if prev.bundle_id != bundle_id or int(prev.bits) != int(bits):
        reason = f"bundle changed ({prev.bundle_id} -> {bundle_id})"
        new = int(pc.sum(pc.invert(pc.is_in(ids, value_set=prev_ids))).as_py() or 0)
        return IndexDiff(
            total, new, total - new, 0, deleted, True, reason, ids, empty, prev_items=n_prev
        )
    joined = current.join(prev_items, keys="item_id", right_suffix="_prev", join_type="left outer")
    fp_now = joined.column("fingerprint")
    same = pc.and_(
        pc.equal(fp_now, joined.column("fingerprint_prev")).fill_null(False),
        pc.invert(pc.is_in(joined.column("item_id"), value_set=failed_ids)),
    )
    same = pc.and_(same, pc.invert(pc.starts_with(fp_now, MISSING_PREFIX)))
    stale = pc.and_(
        pc.starts_with(fp_now, UNKNOWN_PREFIX), pc.is_valid(joined.column("fingerprint_prev"))
    )
    keep = pc.or_(same, stale)
    carry = pc.unique(joined.filter(keep).column("item_id").combine_chunks())
    stale_ids = pc.unique(joined.filter(stale).column("item_id").combine_chunks())
    encode = pc.unique(joined.filter(pc.invert(keep)).column("item_id").combine_chunks())
    encode = encode.filter(pc.invert(pc.is_in(encode, value_set=carry)))
    new = int(pc.sum(pc.invert(pc.is_in(encode, value_set=prev_ids))).as_py() or 0)
    return IndexDiff(
        total,
        new,
        len(encode) - new,
        len(carry) - len(stale_ids),
        deleted,
        False,
        "incremental",
        encode,
        carry,
        stale_ids=stale_ids,
        prev_row_ids=row_ids,
        prev_items=n_prev,
    )
