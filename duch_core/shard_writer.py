"""The write stage of encoding: one shard and one errors part per batch, then the merge.

Each :func:`write_code_batch` call writes the good code rows of a batch as a content-addressed
shard and the failed rows as an errors part (a retried task rewrites the same files);
:func:`merge_written` gathers what the writers report into the version's shard list and its
``errors.parquet``. Code rows are described in :mod:`duch_core.encoding`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from duch_core import index_store, storage

ERROR_PARTS_DIR = "errors"  # per-batch errors parts, merged into errors.parquet at the end


def write_code_batch(batch: pa.Table, version_dir: str, bundle_id: str, bits: int) -> pa.Table:
    """Write the good rows of a code-row batch as one shard and the failed rows as an errors part.

    Both file names are content hashes, so a retried task rewrites the same files.

    Returns:
        One row: the shard's ``path``, ``sha256``, ``rows``, ``bytes``, ``image``/``text``
        counts (``path`` "" when no row was good), ``errors_path`` ("" when none failed),
        ``n_errors``, and ``encoded_images``/``encoded_texts`` (rows that came from the model).
    """
    stage = batch.column("stage")
    good = batch.filter(pc.equal(stage, ""))
    bad = batch.filter(pc.not_equal(stage, ""))
    info = index_store.ShardInfo(path="", rows=0, sha256="")
    if good.num_rows:
        shard = pa.Table.from_arrays(
            [good.column(c) for c in ("item_id", "modality", "caption_index", "code")]
            + [good.column("fingerprint"), pa.array([bundle_id] * good.num_rows, pa.string())],
            schema=index_store.shard_schema(bits),
        )
        info = index_store.write_shard(version_dir, shard)
    err_path = ""
    if bad.num_rows:
        errs = pa.Table.from_arrays(
            [bad.column(c) for c in ("item_id", "stage", "reason", "caption_index", "transient")],
            schema=index_store.ERRORS_SCHEMA,
        )
        data = index_store.table_bytes(errs)
        err_path = f"{ERROR_PARTS_DIR}/part-{hashlib.sha256(data).hexdigest()[:24]}.parquet"
        storage.write_bytes(storage.join(version_dir, err_path), data)
    encoded = pc.equal(good.column("origin"), "encoded")
    mod = good.column("modality")

    def count(m: str) -> int:
        return int(pc.sum(pc.and_(encoded, pc.equal(mod, m))).as_py() or 0)

    return pa.table(
        {
            "path": [info.path],
            "sha256": [info.sha256],
            "rows": [info.rows],
            "bytes": [info.bytes],
            "image": [int(info.counts.get("image", 0))],
            "text": [int(info.counts.get("text", 0))],
            "errors_path": [err_path],
            "n_errors": [bad.num_rows],
            "encoded_images": [count("image")],
            "encoded_texts": [count("text")],
        }
    )


@dataclass(frozen=True)
class Written:
    """What the writers of one version produced.

    Attributes:
        shards: the shards, sorted by path (their search-id order).
        errors: every failed image and caption (:data:`index_store.ERRORS_SCHEMA`), sorted.
        encoded_images, encoded_texts: rows computed by the model (not carried over).
    """

    shards: tuple[index_store.ShardInfo, ...]
    errors: pa.Table
    encoded_images: int
    encoded_texts: int


def merge_written(
    version_dir: str, results: Sequence[Mapping[str, Any]], extra_errors: pa.Table | None = None
) -> Written:
    """Collect :func:`write_code_batch` results; merge the errors parts into ``errors.parquet``.

    ``extra_errors`` (:data:`index_store.ERRORS_SCHEMA` rows found outside the writers, e.g. bad
    manifest rows) join them. The parts are deleted once the merged table is written.
    """
    shards = sorted(
        (
            index_store.ShardInfo(
                path=r["path"],
                rows=int(r["rows"]),
                sha256=r["sha256"],
                counts={"image": int(r["image"]), "text": int(r["text"])},
                bytes=int(r["bytes"]),
            )
            for r in results
            if r["path"]
        ),
        key=lambda s: s.path,
    )
    parts = sorted(r["errors_path"] for r in results if r["errors_path"])
    tables = [
        storage.read_parquet(storage.join(version_dir, p)).cast(index_store.ERRORS_SCHEMA)
        for p in parts
    ]
    if extra_errors is not None and extra_errors.num_rows:
        tables.append(extra_errors.cast(index_store.ERRORS_SCHEMA))
    errors = (
        pa.concat_tables(tables).sort_by(
            [("item_id", "ascending"), ("caption_index", "ascending"), ("reason", "ascending")]
        )
        if tables
        else index_store.ERRORS_SCHEMA.empty_table()
    )
    storage.write_parquet(storage.join(version_dir, index_store.ERRORS_NAME), errors)
    for p in parts:
        storage.delete(storage.join(version_dir, p))
    return Written(
        shards=tuple(shards),
        errors=errors,
        encoded_images=sum(int(r["encoded_images"]) for r in results),
        encoded_texts=sum(int(r["encoded_texts"]) for r in results),
    )


def errors_by_stage(errors: pa.Table) -> dict[str, int]:
    """Error rows per stage, e.g. ``{"decode": 6, "caption": 3}``."""
    if not errors.num_rows:
        return {}
    return {
        str(v["values"]): int(v["counts"])
        for v in pc.value_counts(errors.column("stage")).to_pylist()
    }


def error_rows(
    item_ids: Sequence[str], stage: str, reasons: Sequence[str], transient: bool = False
) -> pa.Table:
    """Item-level errors table rows (``caption_index = -1``) with one stage."""
    n = len(item_ids)
    return pa.Table.from_arrays(
        [
            pa.array(item_ids, pa.string()),
            pa.array([stage] * n, pa.string()),
            pa.array(reasons, pa.string()),
            pa.array([-1] * n, pa.int32()),
            pa.array([transient] * n, pa.bool_()),
        ],
        schema=index_store.ERRORS_SCHEMA,
    )


def transient_image_failures(version_dir: str, results: Sequence[Mapping[str, Any]]) -> pa.Array:
    """Items whose image could not be read because the store failed, from the errors parts that
    :func:`write_code_batch` ``results`` name (read before :func:`merge_written` deletes them).

    Returns:
        The item ids, sorted and unique, a string array.
    """
    parts = sorted({r["errors_path"] for r in results if r["errors_path"]})
    ids: list[str] = []
    for p in parts:
        t = storage.read_parquet(storage.join(version_dir, p))
        if "transient" not in t.column_names:
            continue
        t = t.filter(pc.and_(t.column("transient"), pc.equal(t.column("caption_index"), -1)))
        ids += t.column("item_id").to_pylist()
    return pa.array(sorted(set(ids)), pa.string())
