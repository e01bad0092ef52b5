"""Nightly encoding: an image-caption archive -> a new published version of hash-code shards.

    python jobs/encode.py --bundle URI --archive URI --out URI [--config configs/encode.yaml]
        [--set key=value ...] [--dry-run]
    ray job submit --working-dir . -- python jobs/encode.py --bundle ... --archive ... --out ...

Ray Data wiring of the batch functions in :mod:`duch_core.encoding`: read the archive manifest
and fingerprint every item (object metadata, no image bytes), compare with the version ``LATEST``
names under ``--out`` (:func:`duch_core.index_store.compute_diff`), then decode and encode new and
changed items in an actor pool while unchanged items' rows are copied from the old shards, and
write shards, ``index.json`` and ``LATEST``, in that order. A new bundle re-encodes everything.

Bad images and captions become rows of the version's ``errors.parquet``; above
``max_error_rate`` the version is written but ``LATEST`` stays (exit 1). A run that dies leaves
``LATEST`` untouched and a rerun is safe. ``--dry-run`` prints what would change and writes
nothing. ``deploy/nightly-encode.cron`` schedules the job.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import bundle as bundle_mod
from duch_core import config as config_mod
from duch_core import encoding, index_store, storage
from duch_core.archive import ArchiveError
from jobs import _common

log = logging.getLogger("duch.encode")

EXPECTED_ERRORS = (
    config_mod.ConfigError,
    ArchiveError,
    bundle_mod.BundleError,
    index_store.IndexFormatError,
)


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
    keep_versions: int = 7  # published versions kept by retention; 0 = keep all
    fail_after_shards: int = 0  # fault injection for crash tests: raise once N shards exist


# --------------------------------------------------------------------------------------------
# Ray-side wrappers of the duch_core.encoding stages


def _resolve(value: Any) -> Any:
    """Object refs passed through ``fn_args`` arrive unresolved: fetch them."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def select_items(batch: pa.Table, wanted: Any) -> pa.Table:
    """Keep the rows whose ``item_id`` is in ``wanted`` (a string array or its object ref)."""
    return batch.filter(pc.is_in(batch.column("item_id"), value_set=_resolve(wanted)))


def carry_batch(
    batch: dict[str, np.ndarray], manifest: index_store.IndexManifest, keep: Any
) -> pa.Table:
    """Code rows of the kept items from the shards at positions ``batch["shard"]``."""
    return encoding.carry_rows(manifest, batch["shard"], _resolve(keep))


class FaultInjected(RuntimeError):
    """Raised by the writer when ``fail_after_shards`` is set (crash tests)."""


def write_batch(
    batch: pa.Table, version_dir: str, bundle_id: str, bits: int, fail_after: int
) -> pa.Table:
    """:func:`duch_core.encoding.write_code_batch`, with the crash-test fault injection."""
    if fail_after > 0:
        try:
            written = storage.list_prefix(storage.join(version_dir, index_store.SHARDS_DIR))
        except FileNotFoundError:
            written = []
        if len(written) >= fail_after:
            raise FaultInjected(f"fault injection: {len(written)} shards written, stopping")
    return encoding.write_code_batch(batch, version_dir, bundle_id, bits)


# --------------------------------------------------------------------------------------------
# read -> map -> write


def read_items(cfg: EncodeConfig) -> Any:
    """The archive as a dataset of fingerprinted items (:func:`encoding.fingerprint_batch`).

    Manifest blocks of ``manifest_block_rows`` rows; JSON lines are parsed in tasks, so the
    manifest never passes through the driver. The result is materialised: the diff and the
    encode stage both read it.
    """
    import pyarrow.parquet as pq
    import ray

    from duch_core.archive import _find_manifest, manifest_dir

    path, fmt = _find_manifest(cfg.archive)
    if fmt == "parquet":
        with storage.open_input(path) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        ds = ray.data.read_parquet(
            path, columns=["item_id", "image_uri", "captions"], file_extensions=None
        )
    else:
        ds = ray.data.read_text(path).map_batches(
            encoding.parse_manifest_lines, batch_format="pyarrow", num_cpus=cfg.decode_cpus
        )
        ds = ds.materialize()
        n = ds.count()
    blocks = max(1, math.ceil(n / max(1, cfg.manifest_block_rows)))
    return (
        ds.repartition(blocks)
        .map_batches(
            encoding.fingerprint_batch,  # type: ignore[arg-type]
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"base_dir": manifest_dir(path), "io_threads": cfg.io_threads},
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


def plan(
    cfg: EncodeConfig, items: Any, meta: bundle_mod.BundleMeta
) -> tuple[index_store.IndexManifest | None, index_store.IndexDiff]:
    """The published version (if any, and readable) and what this run changes."""
    current = _gather(items, ["item_id", "fingerprint"])
    prev = index_store.read_latest_or_none(cfg.out)
    try:
        return prev, index_store.compute_diff(current, prev, meta.bundle_id, meta.bits)
    except index_store.IndexCorruptError as e:
        log.warning("published index unreadable (%s): encoding everything", e)
        diff = index_store.compute_diff(current, None, meta.bundle_id, meta.bits)
        diff.reason = f"previous index unreadable: {e}"
        return None, diff


def encode_stream(
    cfg: EncodeConfig, items: Any, wanted: pa.Array, meta: bundle_mod.BundleMeta
) -> Any:
    """Code rows of the ``wanted`` items: select -> decode (CPU tasks) -> encode (actor pool)."""
    import ray

    use_gpu = cfg.num_gpus > 0
    resources = {"num_gpus": cfg.num_gpus} if use_gpu else {"num_cpus": cfg.actor_cpus}
    return (
        items.map_batches(
            select_items, batch_format="pyarrow", fn_args=(ray.put(wanted),), num_cpus=0.1
        )
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
                "bundle_uri": cfg.bundle,
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
    cfg: EncodeConfig, streams: list[Any], version_dir: str, meta: bundle_mod.BundleMeta
) -> encoding.Written:
    """Write the code rows as shards and errors parts; returns what the writers produced."""
    results: list[dict[str, Any]] = []
    if streams:
        stream = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
        results = stream.map_batches(
            write_batch,
            batch_format="pyarrow",
            batch_size=cfg.shard_rows,
            fn_kwargs={
                "version_dir": version_dir,
                "bundle_id": meta.bundle_id,
                "bits": meta.bits,
                "fail_after": cfg.fail_after_shards,
            },
            num_cpus=cfg.write_cpus,
        ).take_all()
    return encoding.merge_written(version_dir, results)


def run(cfg: EncodeConfig, dry_run: bool = False) -> dict[str, Any]:
    """Encode ``cfg.archive`` with ``cfg.bundle`` into a new version under ``cfg.out``.

    Returns:
        The summary (also ``summary.json`` in the version unless ``dry_run``);
        ``summary["exit_code"]`` is 1 when the error rate exceeds ``cfg.max_error_rate``.
    """
    _common.ensure_ray()
    t0 = time.perf_counter()
    meta = bundle_mod.read_meta(cfg.bundle)
    items = read_items(cfg)
    t_scan = time.perf_counter() - t0
    prev, diff = plan(cfg, items, meta)
    summary: dict[str, Any] = {
        **diff.plan(),
        "previous_version": prev.version if prev else None,
        "bundle_id": meta.bundle_id,
        "bits": meta.bits,
        "scan_seconds": round(t_scan, 3),
        "diff_seconds": round(time.perf_counter() - t0 - t_scan, 3),
    }
    if dry_run:
        return {"dry_run": True, **summary, "exit_code": 0}

    version = storage.new_version_id()
    vdir = index_store.version_uri(cfg.out, version)
    t_enc = time.perf_counter()
    streams = []
    if len(diff.encode_ids):
        streams.append(encode_stream(cfg, items, diff.encode_ids, meta))
    if len(diff.carry_ids) and prev is not None:
        streams.append(carry_stream(cfg, prev, diff.carry_ids))
    written = write(cfg, streams, vdir, meta)
    enc_s = time.perf_counter() - t_enc

    errors = written.errors
    failed = int(pc.count_distinct(errors.column("item_id")).as_py() or 0) if len(errors) else 0
    error_rate = failed / diff.total if diff.total else 0.0
    over = error_rate > cfg.max_error_rate
    summary.update(
        version=version,
        version_uri=vdir,
        encoded_items=len(diff.encode_ids),
        carried_over_items=len(diff.carry_ids),
        encoded_images=written.encoded_images,
        encoded_captions=written.encoded_texts,
        failed_items=failed,
        error_rows=errors.num_rows,
        errors_by_stage=encoding.errors_by_stage(errors),
        error_rate=round(error_rate, 6),
        max_error_rate=cfg.max_error_rate,
        counts=index_store.shard_counts(written.shards),
        shards=len(written.shards),
        bytes=sum(s.bytes for s in written.shards),
        encode_seconds=round(enc_s, 3),
        total_seconds=round(time.perf_counter() - t0, 3),
        images_per_second=round(written.encoded_images / enc_s, 2) if enc_s > 0 else 0.0,
        published=not over,
        exit_code=1 if over else 0,
    )
    storage.write_json(storage.join(vdir, index_store.SUMMARY_NAME), summary)
    index_store.finish_version(
        cfg.out,
        version,
        written.shards,
        meta.bundle_id,
        meta.bits,
        errors=index_store.ERRORS_NAME,
        publish_latest=not over,
        config=config_mod.to_dict(cfg),
        archive=cfg.archive,
        bundle_uri=cfg.bundle,
        n_errors=errors.num_rows,
    )
    if not over:
        summary["deleted_versions"] = index_store.apply_retention(
            cfg.out, cfg.keep_versions, current=version
        )
    return summary


def report(summary: dict[str, Any]) -> str:
    """A few lines for people: what was done and where the outputs are."""
    s = summary
    items = (
        f"{s['archive_items']} archive items: {s['new']} new, {s['changed']} changed, "
        f"{s['unchanged']} unchanged, {s['deleted']} deleted ({s['reason']})"
    )
    if s.get("dry_run"):
        return (
            f"dry run: {items}\n  would encode {s['would_encode']} and carry over "
            f"{s['would_carry_over']} items; nothing written"
        )
    failed = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_stage"].items()))
    head = (
        f"version {s['version']} published"
        if s["published"]
        else f"version {s['version']} NOT published: error rate {s['error_rate']:.3f} above "
        f"max_error_rate {s['max_error_rate']}"
    )
    return "\n".join(
        [
            head,
            f"  {items}",
            f"  encoded {s['encoded_items']} items ({s['encoded_images']} images, "
            f"{s['encoded_captions']} captions), carried over {s['carried_over_items']}, "
            f"failed {s['failed_items']}" + (f" ({failed})" if failed else ""),
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
        "(Ray Data); only new and changed items are encoded.",
    )
    p.add_argument("--bundle", help="model bundle URI (overrides the config's bundle)")
    p.add_argument("--archive", help="archive manifest URI, or a directory holding manifest.*")
    p.add_argument("--out", help="index root URI (LATEST and versions/ live there)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
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
    cfg = dataclasses.replace(cfg, **given)
    missing = [k for k in ("bundle", "archive", "out") if not getattr(cfg, k)]
    if missing and require_locations:
        raise config_mod.ConfigError(f"missing {', '.join('--' + m for m in missing)}")
    if min(cfg.batch_size, cfg.shard_rows, cfg.decode_batch, cfg.manifest_block_rows) < 1:
        raise config_mod.ConfigError(
            "batch_size, shard_rows, decode_batch and manifest_block_rows must be >= 1"
        )
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        raise config_mod.ConfigError(f"max_error_rate must be in [0, 1], got {cfg.max_error_rate}")
    return cfg


def main(argv: list[str] | None = None, *, prog: str = "encode") -> int:
    """Run the job. Exit status: 0 done, 1 failed or error rate over the limit, 2 bad input."""
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
        summary = run(cfg, dry_run=args.dry_run)
        print(report(summary))
        return int(summary["exit_code"])

    return _common.run_cli("encode", body, EXPECTED_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
