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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import index_store, storage
from duch_core.item_metadata import NAT_US

ERROR_PARTS_DIR = "errors"  # per-batch errors parts, merged into errors.parquet at the end


@dataclass(frozen=True)
class IndexOrder:
    """The row order of an index version: by acquisition time, then item id; no time last.

    A filter on place or time then keeps long runs of consecutive rows (a scene's chips share
    its time), which the filtered search reads where they lie. Held as the item ids' UTF-8
    bytes sorted (fixed width, so a batch's positions are one binary search, not a hash table
    of the whole archive per batch) with each one's position in the order.

    Attributes:
        ids: ``(n,)`` ``S<width>``, ascending.
        rank: ``(n,)`` int64, ``rank[i]`` the position of ``ids[i]`` in the index order.
    """

    ids: np.ndarray
    rank: np.ndarray

    @classmethod
    def build(cls, item_ids: pa.Array, datetime_us: pa.Array) -> IndexOrder:
        """The order of ``item_ids`` (unique) acquired at ``datetime_us`` (epoch µs; NaT none)."""
        n = len(item_ids)
        t = np.asarray(datetime_us.cast(pa.int64()).to_numpy(zero_copy_only=False), np.int64)
        t = np.where(t == NAT_US, np.iinfo(np.int64).max, t)  # no time: last
        raw = _id_bytes(item_ids)
        by_id = np.argsort(raw, kind="stable")
        ids = raw[by_id]
        # the index order: time, then id (ids ascending already, so a stable sort by time)
        order = by_id[np.argsort(t[by_id], kind="stable")]
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n, dtype=np.int64)
        return cls(ids, rank[by_id])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def ordered_ids(self) -> list[str]:
        """The item ids in index order."""
        out = np.empty(len(self), self.ids.dtype)
        out[self.rank] = self.ids
        return [b.decode("utf-8") for b in out.tolist()]

    def positions(self, item_ids: pa.Array) -> np.ndarray:
        """Each id's position in the order; ``len(self)`` for an id the order lacks."""
        q = _id_bytes(item_ids)
        n = len(self)
        if not n:
            return np.zeros(q.shape[0], np.int64)
        at = np.minimum(np.searchsorted(self.ids, q), n - 1)
        # an id wider than the stored ones is truncated by the search, never equal after it
        return np.where(self.ids[at] == q, self.rank[at], n)


def _id_bytes(item_ids: pa.Array) -> np.ndarray:
    """Item ids as fixed-width UTF-8 bytes."""
    vals = item_ids.cast(pa.binary()).to_numpy(zero_copy_only=False)
    return np.asarray(vals, dtype=np.bytes_) if len(vals) else np.empty(0, "S1")


def order_rows(good: pa.Table, order: IndexOrder | None) -> tuple[pa.Table, int]:
    """Code rows in index order: by their item's position in ``order``, then modality
    (``image`` first) and caption index. An item the order lacks (none, in a run) goes last.

    Returns the sorted rows and the smallest position in them (``-1`` without ``order`` or
    rows), by which :func:`merge_written` orders the shards.
    """
    if order is None or not good.num_rows:
        return good, -1
    rank = order.positions(good.column("item_id"))
    keyed = good.append_column("_rank", pa.array(rank, pa.int64()))
    keyed = keyed.sort_by(
        [("_rank", "ascending"), ("modality", "ascending"), ("caption_index", "ascending")]
    )
    return keyed.drop_columns(["_rank"]), int(rank.min())


def write_code_batch(
    batch: pa.Table,
    version_dir: str,
    bundle_id: str,
    bits: int,
    order: IndexOrder | None = None,
) -> pa.Table:
    """Write the good rows of a code-row batch as one shard and the failed rows as an errors part.

    Both file names are content hashes, so a retried task rewrites the same files. The shard's
    rows are in index order (:func:`order_rows`) when ``order`` is given.

    Returns:
        One row: the shard's ``path``, ``sha256``, ``rows``, ``bytes``, ``image``/``text``
        counts (``path`` "" when no row was good), ``first`` (the smallest index-order position
        in it, -1 when unordered), ``errors_path`` ("" when none failed), ``n_errors``, and
        ``encoded_images``/``encoded_texts`` (rows that came from the model).
    """
    stage = batch.column("stage")
    good, first = order_rows(batch.filter(pc.equal(stage, "")), order)
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
            "first": [first],
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
        shards: the shards in search-id order: by their first row's index-order position, then
            path (:func:`order_rows`).
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
    # index order: by the first row's position (:func:`order_rows`), then path
    written = sorted(
        (r for r in results if r["path"]), key=lambda r: (int(r.get("first", -1)), r["path"])
    )
    shards = tuple(
        index_store.ShardInfo(
            path=r["path"],
            rows=int(r["rows"]),
            sha256=r["sha256"],
            counts={"image": int(r["image"]), "text": int(r["text"])},
            bytes=int(r["bytes"]),
        )
        for r in written
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
