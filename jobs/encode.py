"""Nightly encoding: an image-caption archive -> a new published version of hash-code shards.

    python jobs/encode.py --bundle URI --archive URI --out URI [--config configs/encode.yaml]
        [--set key=value ...] [--dry-run] [--allow-shrink]
    ray job submit --working-dir . -- python jobs/encode.py --bundle ... --archive ... --out ...

Ray Data wiring of the batch functions in :mod:`duch_core.encoding`: take the encode lock of
``--out``, pin the bundle (a verified copy at ``<out>/bundles/<bundle id>/``, which the index
records), read the archive manifest, check every row, snapshot it as the version's catalog and
fingerprint every item (object metadata, no image bytes), compare with the version ``LATEST``
names (:func:`duch_core.index_diff.compute_diff`), then decode and encode new and changed items
in an actor pool while unchanged items' rows are copied from the old shards, and write shards,
``index.json`` and ``LATEST``, in that order. A new bundle re-encodes everything.

Row order: each shard holds its rows by acquisition time, then item id
(:class:`duch_core.shard_writer.IndexOrder`), and the shards follow each other by their first
row, so a filter on time or place keeps long runs of consecutive rows. The order across shards
is exact when the manifest lists items in time order (``jobs/tile_scenes.py`` writes it so),
approximate otherwise; search results never depend on it.

Safe to leave alone:

* one publisher: the run holds ``<out>/LOCK`` (:class:`~duch_core.encode_lock.EncodeLock`,
  refreshed while it runs) and moves ``LATEST`` only if it still names the version it compared
  with; otherwise it publishes nothing and exits 3;
* S3 faults: transient failures are retried with backoff; an image still unreadable keeps its
  previous codes (``stale``) instead of leaving the index; only a missing object or bytes that
  do not decode remove an item;
* the shrink guard: an empty archive, or one that lost more than ``max_deleted_fraction`` of the
  published items, is refused (exit 2) unless ``--allow-shrink``;
* bad manifest rows are errors of their rows (counted against ``max_error_rate``); a manifest
  that cannot be read at all exits 2.

Exit status: 0 published (or dry run); 1 the run failed or its error rate is above
``max_error_rate`` (``LATEST`` not moved; a rerun is safe); 2 bad input (config, bundle,
unreadable manifest, shrink guard); 3 another run holds the lock or published first.
``--dry-run`` prints what would change and writes nothing. ``deploy/nightly-encode.cron``
schedules the job.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import bundle as bundle_mod
from duch_core import (
    catalog_snapshot,
    encode_lock,
    encoding,
    index_diff,
    index_store,
    manifest_rows,
    pointers,
    retention,
    shard_writer,
    storage,
)
from duch_core import config as config_mod
from duch_core.archive import ArchiveError
from jobs import _common

log = logging.getLogger("duch.encode")

EXIT_CONFLICT = 3
"""Another run holds the lock of ``--out`` or published first: nothing was published."""

EXPECTED_ERRORS = (
    config_mod.ConfigError,
    ArchiveError,
    bundle_mod.BundleError,
    index_store.IndexFormatError,
    index_diff.ShrinkError,
    _common.LocationError,
)

KILL_STEPS = ("locked", "shards", "manifest", "published", "marked", "retention")
"""Points of a run where ``kill_at`` stops the driver with SIGKILL (crash tests): right after
the lock is taken, after the shards, catalog and errors are written, after ``index.json``, after
``LATEST`` moved, after ``published.json``, after retention (before the lock is released)."""


@dataclass(frozen=True)
class EncodeConfig:
    """Configuration of the encode job (``configs/encode.yaml``)."""

    bundle: str = ""  # model bundle URI
    archive: str = ""  # archive manifest URI, or a directory holding manifest.parquet/.jsonl
    out: str = ""  # index root URI (LATEST + versions/)
    batch_size: int = 64  # images (and captions) per model call
    shard_rows: int = 8192  # at most this many code rows per shard
    manifest_block_rows: int = 256  # archive rows per fingerprint / decode task input block
    decode_batch: int = 32  # images per decode task batch
    decode_cpus: float = 0.25  # CPUs per decode task
    io_threads: int = 8  # threads per task for object look-ups and fetches
    actors: int = 1  # encoder actor pool size (max)
    min_actors: int = 1
    actor_cpus: float = 0.5  # CPUs per encoder actor when num_gpus == 0
    num_gpus: float = 0.0  # GPUs per encoder actor (0 = run on CPU)
    torch_threads: int = 0  # intra-op threads per actor; 0 = torch default
    write_cpus: float = 0.25
    max_image_pixels: int = 200_000_000  # larger images are rejected as bad input
    max_error_rate: float = 0.05  # exit 1 (and do not publish) above this share of failed items
    max_deleted_fraction: float = 0.05  # refuse (exit 2) when more published items disappear
    allow_shrink: bool = False  # publish even when the shrink guard would refuse
    keep_versions: int = 7  # published versions kept by retention; 0 = keep all
    orphan_grace_s: float = 172800.0  # unpublished version dirs are deleted after this age
    lock_ttl_s: float = 600.0  # encode lease length; refreshed every lock_ttl_s / 3
    lock_wait_s: float = 0.0  # wait this long for a held lock before exiting 3
    fail_after_shards: int = 0  # fault injection for crash tests: raise once N shards exist
    kill_at: str = ""  # fault injection for crash tests: SIGKILL the driver at this step


# --------------------------------------------------------------------------------------------
# Ray-side wrappers of the duch_core.encoding stages


def _resolve(value: Any) -> Any:
    """Object refs passed through ``fn_args`` arrive unresolved: fetch them."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def select_items(batch: pa.Table, wanted: Any) -> pa.Table:
    """Keep the valid rows whose ``item_id`` is in ``wanted`` (a string array or its ref)."""
    keep = pc.and_(
        pc.is_in(batch.column("item_id"), value_set=_resolve(wanted)),
        pc.equal(batch.column("manifest_error"), ""),
    )
    return batch.filter(keep)


def carry_batch(
    batch: dict[str, np.ndarray], manifest: index_store.IndexManifest, keep: Any
) -> pa.Table:
    """Code rows of the kept items from the shards at positions ``batch["shard"]``."""
    return encoding.carry_rows(manifest, batch["shard"], _resolve(keep))


class FaultInjected(RuntimeError):
    """Raised by the writer when ``fail_after_shards`` is set (crash tests)."""


def write_batch(
    batch: pa.Table, version_dir: str, bundle_id: str, bits: int, fail_after: int, order: Any
) -> pa.Table:
    """:func:`duch_core.shard_writer.write_code_batch`, with the crash-test fault injection.

    ``order``: the version's item ids in index order, or its ref.
    """
    if fail_after > 0:
        try:
            written = storage.list_prefix(storage.join(version_dir, index_store.SHARDS_DIR))
        except FileNotFoundError:
            written = []
        if len(written) >= fail_after:
            raise FaultInjected(f"fault injection: {len(written)} shards written, stopping")
    return shard_writer.write_code_batch(batch, version_dir, bundle_id, bits, _resolve(order))


def _kill_point(cfg: EncodeConfig, step: str) -> None:
    if cfg.kill_at == step:
        log.warning("fault injection: kill_at=%s, killing the driver", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# read -> plan -> map -> write


def read_items(cfg: EncodeConfig, version_dir: str | None) -> Any:
    """The archive as a dataset of checked, fingerprinted items (:func:`encoding.prepare_batch`).

    Manifest blocks of ``manifest_block_rows`` rows; JSON lines are parsed in tasks, so the
    manifest never passes through the driver. Each block's valid rows become a catalog part of
    the version at ``version_dir`` (``None``: a dry run, nothing written). The result is
    materialised: the plan and the encode stage both read it.
    """
    import ray

    from duch_core.archive import _find_manifest, manifest_dir

    path, fmt = _find_manifest(cfg.archive)
    if fmt == "parquet":
        n = manifest_rows.parquet_manifest_rows(path)
        ds = ray.data.read_parquet(path, file_extensions=None)
    else:
        if not storage.exists(path):
            raise ArchiveError(f"{path}: archive manifest not found")
        ds = ray.data.read_binary_files(path, file_extensions=None).map_batches(
            manifest_rows.parse_manifest_file,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=cfg.decode_cpus,
        )
        ds = ds.materialize()
        n = ds.count()
    blocks = max(1, math.ceil(n / max(1, cfg.manifest_block_rows)))
    return (
        ds.repartition(blocks)
        .map_batches(
            encoding.prepare_batch,  # type: ignore[arg-type]
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={
                "base_dir": manifest_dir(path),
                "io_threads": cfg.io_threads,
                "version_dir": version_dir,
            },
            num_cpus=cfg.decode_cpus,
        )
        .materialize()
    )


def _gather(ds: Any, columns: list[str]) -> pa.Table:
    """A few columns of a dataset on the driver (item ids and fingerprints only)."""
    import ray

    tables = [t for t in ray.get(ds.select_columns(columns).to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


@dataclass
class Plan:
    """What the driver knows before encoding.

    Attributes:
        prev: the published version compared with (``None``: none, or unreadable).
        diff: what changes.
        rows: manifest rows, valid or not.
        manifest_errors: bad manifest rows (:data:`index_store.ERRORS_SCHEMA`).
        repeated: item ids found in more than one row of the manifest (all their rows are bad).
        catalog_parts: the catalog parts the blocks wrote.
        order: the row order of the version (its valid items by time, then id).
    """

    prev: index_store.IndexManifest | None
    diff: index_diff.IndexDiff
    rows: int
    manifest_errors: pa.Table
    repeated: pa.Array
    catalog_parts: list[index_store.CatalogPart]
    order: shard_writer.IndexOrder


def plan(
    cfg: EncodeConfig,
    items: Any,
    meta: bundle_mod.BundleMeta,
    prev: index_store.IndexManifest | None,
) -> Plan:
    """Split valid and bad manifest rows and compare the valid ones with ``prev``."""
    g = _gather(items, ["item_id", "fingerprint", "manifest_error", "catalog_part", "datetime_us"])
    ids = g.column("item_id")
    named = g.filter(pc.not_equal(ids, ""))
    counts = pc.value_counts(named.column("item_id"))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    ok = pc.and_(
        pc.equal(g.column("manifest_error"), ""), pc.invert(pc.is_in(ids, value_set=repeated))
    )
    good = g.filter(ok)
    bad = g.filter(pc.invert(ok))
    reasons = [
        err or f"manifest row of item {item!r}: item_id repeated in the manifest"
        for item, err in zip(
            bad.column("item_id").to_pylist(), bad.column("manifest_error").to_pylist(), strict=True
        )
    ]
    errors = shard_writer.error_rows(bad.column("item_id").to_pylist(), "manifest", reasons)
    parts = [
        index_store.CatalogPart(**json.loads(p)) for p in g.column("catalog_part").to_pylist() if p
    ]
    current = good.select(["item_id", "fingerprint"])
    try:
        diff = index_diff.compute_diff(current, prev, meta.bundle_id, meta.bits)
    except index_store.IndexCorruptError as e:
        log.warning("published index unreadable (%s): encoding everything", e)
        diff = index_diff.compute_diff(current, None, meta.bundle_id, meta.bits)
        diff.reason = f"previous index unreadable: {e}"
        prev = None
    order = shard_writer.IndexOrder.build(good.column("item_id"), good.column("datetime_us"))
    return Plan(prev, diff, g.num_rows, errors, repeated, parts, order)


def drop_repeated(
    items: Any, version_dir: str, parts: list[index_store.CatalogPart], repeated: pa.Array
) -> list[index_store.CatalogPart]:
    """Rewrite the catalog parts that hold an item id repeated across manifest blocks."""
    import ray

    if not len(repeated):
        return parts
    hit = items.map_batches(
        select_items, batch_format="pyarrow", fn_args=(ray.put(repeated),), num_cpus=0.1
    )
    paths = set(_gather(hit, ["catalog_path"]).column("catalog_path").to_pylist()) - {""}
    out = [p for p in parts if p.path not in paths]
    for p in parts:
        if p.path in paths:
            t = storage.read_parquet(storage.join(version_dir, p.path))
            t = t.filter(pc.invert(pc.is_in(t.column("item_id"), value_set=repeated)))
            if t.num_rows:
                out.append(catalog_snapshot.write_catalog_part(version_dir, t))
    return out


def encode_stream(
    cfg: EncodeConfig, items: Any, wanted: pa.Array, meta: bundle_mod.BundleMeta
) -> Any:
    """Code rows of the ``wanted`` items: select -> decode (CPU tasks) -> encode (actor pool)."""
    import ray

    use_gpu = cfg.num_gpus > 0
    resources = {"num_gpus": cfg.num_gpus} if use_gpu else {"num_cpus": cfg.actor_cpus}
    return (
        items.select_columns(
            [
                c
                for c in encoding.ITEM_COLUMNS
                if c not in ("catalog_path", "catalog_part", "datetime_us")
            ]
        )
        .map_batches(select_items, batch_format="pyarrow", fn_args=(ray.put(wanted),), num_cpus=0.1)
        .map_batches(
            encoding.decode_batch,
            batch_format="pyarrow",
            batch_size=cfg.decode_batch,
            fn_kwargs={
                "image_cfg": meta.image_backbone,
                "max_pixels": cfg.max_image_pixels,
                "io_threads": cfg.io_threads,
            },
            num_cpus=cfg.decode_cpus,
        )
        .map_batches(
            encoding.BundleEncoder,
            batch_format="numpy",
            batch_size=cfg.batch_size,
            fn_constructor_kwargs={
                "bundle_uri": meta.uri,
                "bundle_id": meta.bundle_id,
                "torch_threads": cfg.torch_threads,
                "use_gpu": use_gpu,
            },
            compute=ray.data.ActorPoolStrategy(
                min_size=max(1, min(cfg.min_actors, cfg.actors)), max_size=max(1, cfg.actors)
            ),
            **resources,
        )
    )


def carry_stream(cfg: EncodeConfig, prev: index_store.IndexManifest, keep: pa.Array) -> Any:
    """Code rows of the ``keep`` items copied from the previous version, one task per shard."""
    import ray

    return ray.data.from_items([{"shard": i} for i in range(len(prev.shards))]).map_batches(
        carry_batch,  # type: ignore[arg-type]
        batch_size=1,
        fn_args=(prev, ray.put(keep)),
        num_cpus=cfg.write_cpus,
    )


def write(
    cfg: EncodeConfig,
    streams: list[Any],
    version_dir: str,
    meta: bundle_mod.BundleMeta,
    order: shard_writer.IndexOrder,
) -> list[dict[str, Any]]:
    """Write the code rows as shards and errors parts; returns what the writers produced.

    ``order``: the version's item ids in index order (the rows of each shard follow it).
    """
    import ray

    if not streams:
        return []
    stream = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
    results: list[dict[str, Any]] = stream.map_batches(
        write_batch,
        batch_format="pyarrow",
        batch_size=cfg.shard_rows,
        fn_kwargs={
            "version_dir": version_dir,
            "bundle_id": meta.bundle_id,
            "bits": meta.bits,
            "fail_after": cfg.fail_after_shards,
            "order": ray.put(order),
        },
        num_cpus=cfg.write_cpus,
    ).take_all()
    return results


def _previous(cfg: EncodeConfig, base: index_store.LatestState) -> index_store.IndexManifest | None:
    """The manifest ``LATEST`` names (``None`` if unreadable); its published mark repaired."""
    if base.version is None:
        return None
    try:
        prev = index_store.read_manifest(index_store.manifest_uri(cfg.out, base.version))
    except index_store.IndexCorruptError as e:
        log.warning("the published index version %s is unreadable (%s)", base.version, e)
        return None
    marker = storage.join(
        index_store.version_uri(cfg.out, base.version), index_store.PUBLISHED_NAME
    )
    if not storage.exists(marker):  # a run that died between LATEST and its mark
        index_store.mark_published(cfg.out, base.version, prev.previous_version)
    return prev


def run(cfg: EncodeConfig, dry_run: bool = False) -> dict[str, Any]:
    """Encode ``cfg.archive`` with ``cfg.bundle`` into a new version under ``cfg.out``.

    Returns:
        The summary (also ``summary.json`` in the version unless ``dry_run``);
        ``summary["exit_code"]`` is 1 when the error rate exceeds ``cfg.max_error_rate``, 2 for
        a dry run the shrink guard would refuse.

    Raises:
        EncodeConflictError: another run holds the lock or published first (nothing published).
        ShrinkError: the shrink guard refused the archive.
    """
    _common.ensure_ray()
    # on a multi-node cluster every worker reads the bundle and archive and writes the index
    _common.check_shared_locations({"bundle": cfg.bundle, "archive": cfg.archive, "out": cfg.out})
    if dry_run:
        return _dry_run(cfg)
    lock = encode_lock.EncodeLock(cfg.out, cfg.lock_ttl_s)
    lock.acquire(wait_s=cfg.lock_wait_s)
    try:
        lock.start_heartbeat()
        _kill_point(cfg, "locked")
        return _run_locked(cfg, lock)
    finally:
        lock.release()


def _dry_run(cfg: EncodeConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    meta = bundle_mod.read_meta(cfg.bundle)
    base = index_store.read_latest_state(cfg.out)
    prev = None
    if base.version is not None:
        try:
            prev = index_store.read_manifest(index_store.manifest_uri(cfg.out, base.version))
        except index_store.IndexCorruptError:
            prev = None
    items = read_items(cfg, None)
    p = plan(cfg, items, meta, prev)
    summary: dict[str, Any] = {
        "dry_run": True,
        **p.diff.plan(),
        "manifest_errors": p.manifest_errors.num_rows,
        "previous_version": p.prev.version if p.prev else None,
        "bundle_id": meta.bundle_id,
        "bits": meta.bits,
        "seconds": round(time.perf_counter() - t0, 3),
        "exit_code": _common.EXIT_OK,
    }
    if not cfg.allow_shrink:
        try:
            index_diff.check_shrink(p.diff, cfg.max_deleted_fraction)
        except index_diff.ShrinkError as e:
            summary.update(would_refuse=str(e), exit_code=_common.EXIT_BAD_INPUT)
    return summary


def _run_locked(cfg: EncodeConfig, lock: encode_lock.EncodeLock) -> dict[str, Any]:
    t0 = time.perf_counter()
    meta = bundle_mod.pin_bundle(cfg.bundle, storage.join(cfg.out, index_store.BUNDLES_DIR))
    if meta.backbones is None:
        log.warning(
            "bundle %s predates backbone digests: its id does not cover the backbone weights",
            cfg.bundle,
        )
    base = index_store.read_latest_state(cfg.out)
    prev = _previous(cfg, base)
    version = pointers.new_version_id()
    vdir = index_store.version_uri(cfg.out, version)
    lock.refresh(version)
    items = read_items(cfg, vdir)
    t_scan = time.perf_counter() - t0
    p = plan(cfg, items, meta, prev)
    prev, diff = p.prev, p.diff
    summary: dict[str, Any] = {
        **diff.plan(),
        "manifest_rows": p.rows,
        "previous_version": base.version,
        "bundle_id": meta.bundle_id,
        "bundle_uri": meta.uri,
        "bundle_source": cfg.bundle,
        "bits": meta.bits,
        "scan_seconds": round(t_scan, 3),
        "diff_seconds": round(time.perf_counter() - t0 - t_scan, 3),
    }
    if not cfg.allow_shrink:
        index_diff.check_shrink(diff, cfg.max_deleted_fraction)
    parts = drop_repeated(items, vdir, p.catalog_parts, p.repeated)

    t_enc = time.perf_counter()
    streams = []
    if len(diff.encode_ids):
        streams.append(encode_stream(cfg, items, diff.encode_ids, meta))
    if len(diff.carry_ids) and prev is not None:
        streams.append(carry_stream(cfg, prev, diff.carry_ids))
    results = write(cfg, streams, vdir, meta, p.order)
    # images the store would not give: their previous rows are kept (stale), never dropped
    transient = shard_writer.transient_image_failures(vdir, results)
    stale = transient.filter(pc.is_in(transient, value_set=diff.prev_row_ids))
    if len(stale) and prev is not None:
        results += write(cfg, [carry_stream(cfg, prev, stale)], vdir, meta, p.order)
    lookup_stale = shard_writer.error_rows(
        diff.stale_ids.to_pylist(),
        "fetch",
        ["the store failed the image look-up; the previous codes were kept"] * len(diff.stale_ids),
        transient=True,
    )
    extra = pa.concat_tables([p.manifest_errors, lookup_stale])
    written = shard_writer.merge_written(vdir, results, extra)
    enc_s = time.perf_counter() - t_enc
    _kill_point(cfg, "shards")

    errors = written.errors
    item_level = errors.filter(
        pc.and_(
            pc.invert(errors.column("transient")), pc.not_equal(errors.column("stage"), "manifest")
        )
    )
    failed = len(pc.unique(item_level.column("item_id"))) + p.manifest_errors.num_rows
    n_stale = len(stale) + len(diff.stale_ids)
    unavailable = len(transient) - len(stale)
    error_rate = (failed + unavailable) / p.rows if p.rows else 0.0
    over = error_rate > cfg.max_error_rate
    summary.update(
        version=version,
        version_uri=vdir,
        encoded_items=len(diff.encode_ids),
        carried_over_items=len(diff.carry_ids) + len(stale),
        stale_items=n_stale,
        unavailable_items=unavailable,
        encoded_images=written.encoded_images,
        encoded_captions=written.encoded_texts,
        failed_items=failed,
        error_rows=errors.num_rows,
        errors_by_stage=shard_writer.errors_by_stage(errors),
        error_rate=round(error_rate, 6),
        max_error_rate=cfg.max_error_rate,
        counts=index_store.shard_counts(written.shards),
        shards=len(written.shards),
        bytes=sum(s.bytes for s in written.shards),
        catalog_rows=sum(c.rows for c in parts),
        encode_seconds=round(enc_s, 3),
        images_per_second=round(written.encoded_images / enc_s, 2) if enc_s > 0 else 0.0,
    )
    index_store.finish_version(
        cfg.out,
        version,
        written.shards,
        meta.bundle_id,
        meta.bits,
        errors=index_store.ERRORS_NAME,
        publish_latest=False,
        config=config_mod.to_dict(cfg),
        archive=cfg.archive,
        bundle_uri=meta.uri,
        bundle_source=cfg.bundle,
        previous_version=base.version,
        catalog=index_store.catalog_info(parts),
        n_errors=errors.num_rows,
    )
    _kill_point(cfg, "manifest")

    def finish(published: bool, exit_code: int, **extra_fields: Any) -> dict[str, Any]:
        summary.update(
            published=published,
            exit_code=exit_code,
            total_seconds=round(time.perf_counter() - t0, 3),
            **extra_fields,
        )
        storage.write_json(storage.join(vdir, index_store.SUMMARY_NAME), summary)
        return summary

    if over:
        return finish(False, _common.EXIT_FAILED)
    try:
        lock.refresh()  # the lease is still this run's, right before publishing
        index_store.publish_if(cfg.out, version, base)
    except index_store.EncodeConflictError as e:
        finish(False, EXIT_CONFLICT, refused=str(e))
        raise
    except storage.StorageError as e:  # LATEST is as it was; the version stays unpublished
        with contextlib.suppress(storage.StorageError):
            finish(False, _common.EXIT_FAILED, refused=f"publishing failed: {e}")
        raise
    _kill_point(cfg, "published")
    try:
        index_store.mark_published(cfg.out, version, base.version)
    except storage.StorageError as e:  # published all the same; the next run repairs the mark
        log.warning("could not write the published mark of %s: %s", version, e)
    _kill_point(cfg, "marked")
    finish(True, _common.EXIT_OK)
    try:
        summary["deleted_versions"] = retention.apply_retention(
            cfg.out, cfg.keep_versions, current=version, grace_s=cfg.orphan_grace_s
        )
    except storage.StorageError as e:  # the next run retries
        log.warning("retention failed (the next run retries): %s", e)
        summary["deleted_versions"] = []
    _kill_point(cfg, "retention")
    return summary


def report(summary: dict[str, Any]) -> str:
    """A few lines for people: what was done and where the outputs are."""
    s = summary
    items = (
        f"{s['archive_items']} archive items: {s['new']} new, {s['changed']} changed, "
        f"{s['unchanged']} unchanged, {s['deleted']} deleted ({s['reason']})"
    )
    if s.get("dry_run"):
        lines = [
            f"dry run: {items}",
            f"  would encode {s['would_encode']} and carry over {s['would_carry_over']} items; "
            "nothing written",
        ]
        if s.get("would_refuse"):
            lines.append(f"  would refuse: {s['would_refuse']}")
        return "\n".join(lines)
    failed = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_stage"].items()))
    if s["published"]:
        head = f"version {s['version']} published"
    elif s.get("refused"):
        head = f"version {s['version']} NOT published: {s['refused']}"
    else:
        head = (
            f"version {s['version']} NOT published: error rate {s['error_rate']:.3f} above "
            f"max_error_rate {s['max_error_rate']}"
        )
    kept = ""
    if s["stale_items"] or s["unavailable_items"]:
        kept = (
            f"; store unavailable for {s['stale_items'] + s['unavailable_items']} images: "
            f"{s['stale_items']} kept their previous codes, {s['unavailable_items']} left out"
        )
    return "\n".join(
        [
            head,
            f"  {items}",
            f"  encoded {s['encoded_items']} items ({s['encoded_images']} images, "
            f"{s['encoded_captions']} captions), carried over {s['carried_over_items']}, "
            f"failed {s['failed_items']}" + (f" ({failed})" if failed else "") + kept,
            f"  {s['shards']} shards, {s['bytes']} bytes, {s['images_per_second']} images/s, "
            f"{s['total_seconds']} s",
            f"  {s['version_uri']} (summary.json, errors.parquet)",
        ]
    )


# --------------------------------------------------------------------------------------------
# entry point


def build_parser(prog: str = "encode") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Encode an archive with a model bundle into a new published index version "
        "(Ray Data); only new and changed items are encoded. Exit status: 0 published, 1 failed "
        "or too many errors, 2 bad input or refused by the shrink guard, 3 another run holds "
        "the index or published first.",
    )
    p.add_argument("--bundle", help="model bundle URI (overrides the config's bundle)")
    p.add_argument("--archive", help="archive manifest URI, or a directory holding manifest.*")
    p.add_argument("--out", help="index root URI (LATEST and versions/ live there)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument(
        "--allow-shrink",
        action="store_true",
        help="publish even if the archive is empty or lost more than max_deleted_fraction of "
        "the published items",
    )
    _common.add_common_arguments(p, config_required=False)
    return p


def load_config(args: argparse.Namespace, require_locations: bool = True) -> EncodeConfig:
    """The config file and ``--set`` overrides, then ``--bundle/--archive/--out``; validated.

    Raises:
        ConfigError: unknown key, wrong type, a value out of range, or (``require_locations``)
            no bundle, archive or output location.
    """
    cfg = config_mod.load(EncodeConfig, args.config, args.set)
    given = {k: getattr(args, k) for k in ("bundle", "archive", "out") if getattr(args, k)}
    if getattr(args, "allow_shrink", False):
        given["allow_shrink"] = True
    cfg = dataclasses.replace(cfg, **given)
    missing = [k for k in ("bundle", "archive", "out") if not getattr(cfg, k)]
    if missing and require_locations:
        raise config_mod.ConfigError(f"missing {', '.join('--' + m for m in missing)}")
    if min(cfg.batch_size, cfg.shard_rows, cfg.decode_batch, cfg.manifest_block_rows) < 1:
        raise config_mod.ConfigError(
            "batch_size, shard_rows, decode_batch and manifest_block_rows must be >= 1"
        )
    for name in ("max_error_rate", "max_deleted_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise config_mod.ConfigError(f"{name} must be in [0, 1], got {value}")
    if cfg.lock_ttl_s <= 0 or cfg.lock_wait_s < 0 or cfg.orphan_grace_s < 0:
        raise config_mod.ConfigError("lock_ttl_s must be > 0, lock_wait_s and orphan_grace_s >= 0")
    if cfg.kill_at and cfg.kill_at not in KILL_STEPS:
        raise config_mod.ConfigError(f"kill_at must be one of {KILL_STEPS}, got {cfg.kill_at!r}")
    return cfg


def main(argv: list[str] | None = None, *, prog: str = "encode") -> int:
    """Run the job. Exit status: 0 published, 1 failed, 2 bad input, 3 conflict (module doc)."""
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        cfg = load_config(args, require_locations=not args.print_config)
    except config_mod.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK

    def body() -> int:
        try:
            summary = run(cfg, dry_run=args.dry_run)
        except index_store.EncodeConflictError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return EXIT_CONFLICT
        print(report(summary))
        return int(summary["exit_code"])

    return _common.run_cli("encode", body, EXPECTED_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
