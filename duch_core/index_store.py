"""Code shards, index manifests and the ``LATEST`` pointer: the output of encoding.

Layout of an index root (a local directory or an ``s3://`` prefix)::

    <root>/LATEST                                   the published version id (one line)
    <root>/LOCK                                     the encode lease (:mod:`duch_core.encode_lock`)
    <root>/bundles/<bundle id>/                     the model bundles the versions were encoded with
    <root>/versions/<version>/index.json            the index manifest (:class:`IndexManifest`)
    <root>/versions/<version>/shards/part-<key>.parquet   code shards (:data:`SHARD_SCHEMA`)
    <root>/versions/<version>/catalog/part-<key>.parquet  the archive rows it was encoded from
    <root>/versions/<version>/errors.parquet        items that could not be encoded
    <root>/versions/<version>/summary.json          what the run did (counts, bytes, speed)
    <root>/versions/<version>/published.json        written once ``LATEST`` has named the version

A version id is ``<UTC timestamp>-<random suffix>`` (:func:`duch_core.pointers.new_version_id`,
re-exported here), so ids sort by creation time. Every run writes a fresh version directory: shards
and catalog first, then ``index.json``, then ``LATEST`` is replaced atomically, and only if it
still names the version the run compared with (:func:`publish_if`, a compare-and-swap). A reader
only follows ``LATEST`` and only trusts files listed in ``index.json``, so a run that dies half way
leaves an unreferenced directory, never a half index. Every shard's and catalog part's SHA-256 is
recorded and checked on load.

Each shard row is one code: an image (``caption_index = -1``) or one caption of an item
(``caption_index`` = its position in the archive row's ``captions``). ``code`` is the packed
``bits // 8`` bytes in bit order ``big`` (:mod:`duch_core.codes`). ``fingerprint`` identifies the
source the code was computed from (:mod:`duch_core.source_fingerprints`); with the bundle id it
decides whether a later run can copy the row instead of encoding it again
(:func:`duch_core.index_diff.compute_diff`, with the shrink guard).

The catalog (:mod:`duch_core.catalog_snapshot`) is the archive as the version saw it.

Search ids (``row_ids``) are global row positions in the version: shards in manifest order, rows
in file order, both modalities counted. They do not depend on which shards a reader loads.

Retention (:mod:`duch_core.retention`) deletes whole versions; the encode lock
(:mod:`duch_core.encode_lock`) keeps two runs from publishing at once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from duch_core import pointers, storage
from duch_core.codes import BITORDER, check_bits
from duch_core.pointers import new_version_id as new_version_id  # re-exported

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


class EncodeConflictError(RuntimeError):
    """Another encode run holds the index root or published first; this run publishes nothing."""


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
        catalog: the catalog snapshot (:func:`duch_core.catalog_snapshot.read_catalog`), or ``None`` for versions written
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
    pointers.publish_pointer(latest_uri(root), manifest.version)
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
        got = pointers.read_versioned(uri)
    except FileNotFoundError:
        return LatestState(None, None)
    return LatestState(pointers.decode_pointer(got.data, uri), got.etag)


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
            pointers.put_conditional(uri, data, if_none_match=True)
        else:
            pointers.put_conditional(uri, data, if_match=expected.etag)
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
        value = pointers.read_pointer(latest_uri(root)).strip()
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


def read_listed_parquet(
    manifest: IndexManifest, what: str, path: str, sha256: str, size: int, verify: bool = True
) -> pa.Table:
    """A Parquet file that ``index.json`` lists (a shard, a catalog part), checked against its
    recorded SHA-256 when ``verify``.

    Raises:
        IndexCorruptError: the file is missing, fails its checksum, or is not Parquet.
    """
    uri = manifest.resolve(path)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise IndexCorruptError(
            f"{what} {path} of index version {manifest.version} is missing ({uri})"
        ) from e
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise IndexCorruptError(
                f"{what} {uri} fails its checksum (sha256 {digest[:16]}..., index.json says "
                f"{sha256[:16]}...; {len(data)} bytes, expected {size or '?'}): the file is "
                "incomplete or was changed after the index was published"
            )
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise IndexCorruptError(f"{what} {uri} is not readable Parquet ({e})") from e


def read_shard(manifest: IndexManifest, position: int, verify: bool = True) -> pa.Table:
    """Read shard ``position`` of a manifest, checking its size and SHA-256.

    Raises:
        IndexCorruptError: the shard is missing, truncated, altered, or not a shard.
    """
    if not 0 <= position < len(manifest.shards):
        raise IndexError(f"shard {position} out of range (0..{len(manifest.shards) - 1})")
    info = manifest.shards[position]
    uri = manifest.resolve(info.path)
    table = read_listed_parquet(manifest, "shard", info.path, info.sha256, info.bytes, verify)
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
