"""The catalog snapshot of an index version: the archive rows the version was encoded from.

Each version keeps ``<version>/catalog/part-<key>.parquet`` (:func:`write_catalog_part`), listed
with their SHA-256 in ``index.json`` (:class:`duch_core.index_store.CatalogInfo`). The catalog
(:func:`read_catalog`) has ``item_id``, ``image_uri`` (resolved), ``captions``, ``label``,
``split`` and every metadata column of the archive manifest (``crs``, ``bbox``, ``datetime``,
``sensor``, ...). A service shows hits from the catalog of the version it searches, never from the
live archive manifest, which may have changed.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from duch_core import storage
from duch_core.index_store import (
    CATALOG_DIR,
    CatalogPart,
    IndexCorruptError,
    IndexFormatError,
    IndexManifest,
    catalog_info,
    read_listed_parquet,
    table_bytes,
)


class CatalogMissingError(IndexFormatError):
    """The version has no catalog snapshot (it was written before versions had one)."""


def write_catalog_part(version_dir: str, table: pa.Table) -> CatalogPart:
    """Write some archive rows as one catalog part under ``<version_dir>/catalog/``.

    Content-addressed like shards, so a retried task rewrites the same file.
    """
    data = table_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{CATALOG_DIR}/part-{digest[:24]}.parquet"
    storage.write_bytes(storage.join(version_dir, rel), data)
    return CatalogPart(path=rel, rows=table.num_rows, sha256=digest, bytes=len(data))


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
        table = read_listed_parquet(
            manifest, "catalog part", part.path, part.sha256, part.bytes, verify
        )
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
