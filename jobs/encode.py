"""Nightly encoding: an image-caption archive -> a new version of sharded hash codes.

    python jobs/encode.py --bundle URI --archive URI --out URI [--config configs/encode.yaml]
        [--set key=value ...] [--dry-run]
    ray job submit --working-dir . -- python jobs/encode.py --bundle ... --archive ... --out ...

Pipeline (Ray Data, streaming; the images never pass through the driver):

1. **Manifest**: the archive manifest is read as a dataset (Parquet: ``read_parquet``; JSON lines:
   ``read_text`` + :func:`parse_manifest_lines` in tasks) and split into blocks of
   ``manifest_block_rows``.
2. **Fingerprint** (CPU tasks, threads for the object look-ups): every item's source fingerprint
   ``s<size>-e<etag>-m<mtime_ns>-c<hash of image URI and captions>`` from
   :func:`duch_core.storage.info`, a metadata call: no image bytes are read.
3. **Diff** against the published index at ``--out``: when its bundle id and code length equal the
   bundle's, items whose fingerprint is unchanged (and had no error last time) are *carried over*:
   their code rows are copied from the old shards (checksums verified). New and changed items are
   encoded; items gone from the archive drop out. A different bundle re-encodes everything. Only
   two string columns (item id, fingerprint) of the archive and of the old index are gathered on
   the driver for this step.
4. **Decode** (CPU tasks): fetch bytes, :func:`duch_core.imageio.decode_image` and
   :func:`duch_core.imageio.preprocess`. 8- and 16-bit, RGB, grey and multi-band TIFF/PNG/JPEG
   follow the band and bit-depth rule documented in :mod:`duch_core.imageio`, with the bundle's
   ``image_backbone.bands`` and ``image_backbone.high_bit_depth``: grey repeats band 0; 3+ bands
   take ``bands`` (default the first three) as R, G, B; data wider than 8 bits gets a per-image
   2-98 percentile stretch (or ``scale``) to 8 bits.
5. **Encode** (an actor pool of callable classes that load the bundle once; ``num_gpus`` per
   actor from the config, else ``actor_cpus``): image tower + hashing head for every decoded
   image, text tower + head for every caption that passes
   :func:`duch_core.imageio.clean_caption`. Output: packed codes (:mod:`duch_core.codes`).
6. **Write** (CPU tasks): shards of at most ``shard_rows`` rows, content-addressed names, into a
   fresh version directory; failed images and captions go to the errors table.
7. **Publish**: ``index.json`` (after every shard), then ``LATEST``, then retention.

Bad input never stops the job: fetch/decode/caption failures become rows of the version's
``errors.parquet`` (item id, stage, reason, caption index). The run exits 1 when the share of
archive items with any error exceeds ``max_error_rate``; the version is then written (for
inspection) but ``LATEST`` is not moved. Crash safety: a run writes only into its own new version
directory and publishes by replacing ``LATEST`` last, so a run killed at any point leaves the
published index untouched; the rerun writes a complete new version, and retention removes the dead
run's directory. ``--dry-run`` stops after step 3 and prints what would change.

Progress: Ray Data's progress bars (logged periodically when stdout is not a terminal). At the
end the summary (items encoded, carried over and failed, errors by stage, shards, bytes, images/s)
is printed as JSON and logged in one line; it is also ``summary.json`` in the version.

Scheduling: ``deploy/nightly-encode.cron`` submits this job to the Ray cluster every night at 02:30
(cron host time) with ``ray job submit --working-dir .`` (install and settings: see the file). Run
the same command with ``--dry-run`` to see what a night's run would change.

Exit status: 0 success, 1 error rate above the threshold (or the run failed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import config as config_mod
from duch_core import index_store, storage

log = logging.getLogger("duch.encode")


@dataclass(frozen=True)
class EncodeConfig:
    """Configuration of the nightly encode job (``configs/encode.yaml``)."""

    bundle: str = ""  # model bundle URI (directory with meta.json, config.json, heads.pt)
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
# schemas of the intermediate rows


def _code_schema(bits: int) -> pa.Schema:
    """Rows leaving the encoder / carry-over stages: shard columns + error and origin columns."""
    return pa.schema(
        [
            ("item_id", pa.string()),
            ("modality", pa.string()),
            ("caption_index", pa.int32()),
            ("code", pa.binary(bits // 8)),
            ("fingerprint", pa.string()),
            ("stage", pa.string()),  # "" = ok, else fetch | decode | caption | encode
            ("reason", pa.string()),
            ("origin", pa.string()),  # encoded | carried
        ]
    )


def _code_rows(
    bits: int,
    item_ids: list[str],
    modality: list[str],
    caption_index: list[int],
    codes: np.ndarray,
    fingerprint: list[str],
    stage: list[str],
    reason: list[str],
    origin: str,
) -> pa.Table:
    nbytes = bits // 8
    n = len(item_ids)
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, nbytes)
    code_arr = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(nbytes), n, [None, pa.py_buffer(c.tobytes())]
    )
    return pa.Table.from_arrays(
        [
            pa.array(item_ids, pa.string()),
            pa.array(modality, pa.string()),
            pa.array(caption_index, pa.int32()),
            code_arr,
            pa.array(fingerprint, pa.string()),
            pa.array(stage, pa.string()),
            pa.array(reason, pa.string()),
            pa.array([origin] * n, pa.string()),
        ],
        schema=_code_schema(bits),
    )


# --------------------------------------------------------------------------------------------
# stage functions (module level so Ray pickles them by reference)


def source_fingerprint(
    size: int | None, etag: str | None, mtime_ns: int | None, image_uri: str, captions: list[str]
) -> str:
    """The source fingerprint of an item: object metadata plus a hash of URI and captions.

    ``size is None`` means the object could not be looked up (``missing-...``); such items are
    always sent to the encoder, which records the failure.
    """
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    if size is None:
        return f"missing-c{h}"
    return (
        f"s{size}-e{(etag or '').strip(chr(34))}-m{mtime_ns if mtime_ns is not None else ''}-c{h}"
    )


def fingerprint_batch(batch: pa.Table, base_dir: str, io_threads: int) -> pa.Table:
    """Validate manifest rows, resolve image URIs and add ``fingerprint`` + ``captions_json``.

    Output columns: ``item_id``, ``image_uri``, ``captions_json`` (JSON list of strings),
    ``fingerprint``, ``lookup_error`` ("" when the object exists).
    """
    from duch_core.archive import resolve_image_uri, validate_archive

    table = validate_archive(batch)
    ids = table.column("item_id").to_pylist()
    uris = [resolve_image_uri(base_dir, u) for u in table.column("image_uri").to_pylist()]
    caps = table.column("captions").to_pylist()

    def look(uri: str) -> tuple[Any, str]:
        try:
            return storage.info(uri), ""
        except FileNotFoundError as e:
            return None, f"object not found: {uri} ({e})"
        except Exception as e:  # noqa: BLE001 - any storage failure is a per-item error
            return None, f"cannot look up {uri}: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        infos = list(pool.map(look, uris))
    fps, errs = [], []
    for uri, cap, (info, err) in zip(uris, caps, infos, strict=True):
        if info is None:
            fps.append(source_fingerprint(None, None, None, uri, cap))
        else:
            fps.append(source_fingerprint(info.size, info.etag, info.mtime_ns, uri, cap))
        errs.append(err)
    return pa.table(
        {
            "item_id": pa.array(ids, pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "captions_json": pa.array([json.dumps(c) for c in caps], pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "lookup_error": pa.array(errs, pa.string()),
        }
    )


def parse_manifest_lines(batch: pa.Table) -> pa.Table:
    """Lines of a JSON-lines manifest (column ``text``) -> ``item_id``, ``image_uri``, ``captions``.

    Each line is one JSON object; a missing ``captions`` key means no captions.

    Raises:
        ArchiveError: a line is not a JSON object or its values have the wrong types.
    """
    from duch_core.archive import ArchiveError, parse_manifest_line, validate_archive

    rows = []
    for line in batch.column("text").to_pylist():
        obj = parse_manifest_line(line, f"manifest line {line[:200]!r}")
        if obj is None:
            continue
        rows.append(
            {
                "item_id": obj.get("item_id"),
                "image_uri": obj.get("image_uri"),
                "captions": obj.get("captions") or [],
            }
        )
    try:
        table = pa.table(
            {
                "item_id": pa.array([r["item_id"] for r in rows]),
                "image_uri": pa.array([r["image_uri"] for r in rows]),
                "captions": pa.array([r["captions"] for r in rows], pa.list_(pa.string())),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ArchiveError(f"manifest values have the wrong types ({e})") from e
    return validate_archive(table, where="manifest").select(["item_id", "image_uri", "captions"])


def select_items(batch: pa.Table, wanted: Any) -> pa.Table:
    """Keep the rows whose ``item_id`` is in ``wanted`` (a pyarrow string array or its ref)."""
    return batch.filter(pc.is_in(batch.column("item_id"), value_set=_resolve(wanted)))


def _resolve(value: Any) -> Any:
    """Object-store references passed through ``fn_args`` arrive unresolved: fetch them."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def decode_batch(batch: pa.Table, image_cfg: dict[str, Any], max_pixels: int, io_threads: int):
    """Fetch, decode and preprocess the images of a batch (CPU).

    Returns a numpy batch: ``pixels`` ``(N, 3, S, S)`` float32 (zeros where the image failed),
    ``img_ok`` bool, ``img_stage``/``img_reason`` strings, and the pass-through columns.
    """
    from duch_core.config import ImageBackboneConfig, from_dict
    from duch_core.imageio import decode_image, decode_options, preprocess

    cfg = from_dict(ImageBackboneConfig, image_cfg)
    options = decode_options(cfg)  # band selection and bit-depth rule of the bundle
    uris = batch.column("image_uri").to_pylist()
    lookup = batch.column("lookup_error").to_pylist()

    def fetch(i: int) -> tuple[bytes | None, str, str]:
        if lookup[i]:
            return None, "fetch", lookup[i]
        try:
            return storage.read_bytes(uris[i]), "", ""
        except FileNotFoundError:
            return None, "fetch", f"object not found: {uris[i]}"
        except Exception as e:  # noqa: BLE001 - recorded as a per-item error
            return None, "fetch", f"cannot read {uris[i]}: {type(e).__name__}: {e}"

    n = batch.num_rows
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        fetched = list(pool.map(fetch, range(n)))
    s = cfg.image_size
    pixels = np.zeros((n, 3, s, s), np.float32)
    ok = np.zeros(n, bool)
    stages, reasons = [], []
    for i, (data, stage, reason) in enumerate(fetched):
        if data is not None:
            try:
                if not data:
                    raise ValueError(f"empty object (0 bytes): {uris[i]}")
                img = decode_image(data, max_pixels=max_pixels, **options)
                pixels[i] = preprocess(img, cfg)
                ok[i] = True
            except Exception as e:  # noqa: BLE001 - any decode failure is a per-item error
                stage, reason = "decode", f"{type(e).__name__}: {e}"
        stages.append(stage)
        reasons.append(reason)
    return {
        "item_id": np.array(batch.column("item_id").to_pylist(), dtype=object),
        "fingerprint": np.array(batch.column("fingerprint").to_pylist(), dtype=object),
        "captions_json": np.array(batch.column("captions_json").to_pylist(), dtype=object),
        "pixels": pixels,
        "img_ok": ok,
        "img_stage": np.array(stages, dtype=object),
        "img_reason": np.array(reasons, dtype=object),
    }


class BundleEncoder:
    """Ray Data callable class: image and caption codes with one bundle, loaded once per actor."""

    def __init__(self, bundle_uri: str, torch_threads: int = 0, use_gpu: bool = False):
        import torch

        from duch_core.bundle import Bundle, HashEncoder
        from duch_core.imageio import clean_caption

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = device
        self.bundle = Bundle.load(bundle_uri, device=device)
        self.encoder = HashEncoder(self.bundle)
        self.bits = int(self.bundle.bits)
        self.text_cfg = self.bundle.config.text_backbone
        self.clean_caption = clean_caption
        self.image_tower = _image_tower(self.encoder, self.bundle, device)

    def image_codes(self, pixels: np.ndarray) -> np.ndarray:
        """``(N, 3, S, S)`` float32 -> ``(N, bits // 8)`` uint8."""
        from duch_core.codes import pack

        if len(pixels) == 0:
            return np.zeros((0, self.bits // 8), np.uint8)
        with self.torch.inference_mode():
            x = self.torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            feats = self.image_tower(x)
            return pack(self.encoder.image_codes_from_features(feats))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Numpy batch from :func:`decode_batch` -> code rows (one per image and caption)."""
        ids = [str(x) for x in batch["item_id"]]
        fps = [str(x) for x in batch["fingerprint"]]
        ok = np.asarray(batch["img_ok"], bool)
        cols: dict[str, list[Any]] = {k: [] for k in ("id", "mod", "cap", "fp", "stage", "reason")}

        def add(i: int, mod: str, cap: int, stage: str = "", reason: str = "") -> None:
            for k, v in zip(cols, (ids[i], mod, cap, fps[i], stage, reason), strict=True):
                cols[k].append(v)

        good = [int(i) for i in np.flatnonzero(ok)]
        image_codes = self.image_codes(batch["pixels"][good])
        for i in good:
            add(i, "image", -1)
        for i in (int(i) for i in np.flatnonzero(~ok)):
            add(i, "image", -1, str(batch["img_stage"][i]), str(batch["img_reason"][i]))
        texts: list[str] = []
        text_rows: list[int] = []
        for i in range(len(ids)):
            for j, text in enumerate(json.loads(str(batch["captions_json"][i]))):
                try:
                    self.clean_caption(text, self.text_cfg)
                except ValueError as e:
                    add(i, "text", j, "caption", f"{type(e).__name__}: {e}")
                    continue
                text_rows.append(len(cols["id"]))
                texts.append(text)
                add(i, "text", j)
        codes = np.zeros((len(cols["id"]), self.bits // 8), np.uint8)
        codes[: len(good)] = image_codes
        if texts:
            with self.torch.inference_mode():
                codes[text_rows] = self.encoder.encode_texts(texts)
        return _code_rows(
            self.bits,
            cols["id"],
            cols["mod"],
            cols["cap"],
            codes,
            cols["fp"],
            cols["stage"],
            cols["reason"],
            "encoded",
        )


def _image_tower(encoder: Any, bundle: Any, device: str) -> Any:
    """The image tower the encoder uses, or one built from the bundle's config."""
    for name in ("image_tower", "_image_tower"):
        tower = getattr(encoder, name, None)
        if tower is not None:
            return tower
    from duch_core.backbones import load_image_tower

    tower = load_image_tower(bundle.config.image_backbone)
    return tower.to(device).eval()


def carry_batch(batch: dict[str, np.ndarray], manifest_json: dict[str, Any], keep: Any) -> pa.Table:
    """Read old shards (checksums verified) and keep the rows of carried-over items."""
    manifest = index_store.IndexManifest.from_dict(manifest_json, uri=manifest_json["__uri"])
    bits = manifest.bits
    tables = []
    for pos in batch["shard"]:
        t = index_store.read_shard(manifest, int(pos))
        t = t.filter(pc.is_in(t.column("item_id"), value_set=_resolve(keep)))
        n = t.num_rows
        tables.append(
            pa.Table.from_arrays(
                [
                    t.column("item_id"),
                    t.column("modality"),
                    t.column("caption_index"),
                    t.column("code"),
                    t.column("fingerprint"),
                    pa.array([""] * n, pa.string()),
                    pa.array([""] * n, pa.string()),
                    pa.array(["carried"] * n, pa.string()),
                ],
                schema=_code_schema(bits),
            )
        )
    return pa.concat_tables(tables) if tables else _code_schema(bits).empty_table()


class FaultInjected(RuntimeError):
    """Raised by the writer when ``fail_after_shards`` is set (crash tests)."""


def write_batch(
    batch: pa.Table, version_dir: str, bundle_id: str, bits: int, fail_after: int
) -> pa.Table:
    """Write one shard (good rows) and one errors part (failed rows); return their metadata."""
    if fail_after > 0:
        try:
            written = storage.list_prefix(storage.join(version_dir, index_store.SHARDS_DIR))
        except FileNotFoundError:
            written = []
        if len(written) >= fail_after:
            raise FaultInjected(f"fault injection: {len(written)} shards written, stopping")
    stage = batch.column("stage")
    good = batch.filter(pc.equal(stage, ""))
    bad = batch.filter(pc.not_equal(stage, ""))
    path, sha, rows, nbytes, n_img, n_txt = "", "", 0, 0, 0, 0
    if good.num_rows:
        shard = pa.Table.from_arrays(
            [
                good.column("item_id"),
                good.column("modality"),
                good.column("caption_index"),
                good.column("code"),
                good.column("fingerprint"),
                pa.array([bundle_id] * good.num_rows, pa.string()),
            ],
            schema=index_store.shard_schema(bits),
        )
        info = index_store.write_shard(version_dir, shard)
        path, sha, rows, nbytes = info.path, info.sha256, info.rows, info.bytes
        n_img, n_txt = info.counts.get("image", 0), info.counts.get("text", 0)
    err_path = ""
    if bad.num_rows:
        errs = pa.Table.from_arrays(
            [bad.column("item_id"), bad.column("stage"), bad.column("reason")]
            + [bad.column("caption_index")],
            schema=index_store.ERRORS_SCHEMA,
        )
        data = index_store.table_bytes(errs)
        err_path = f"errors/part-{hashlib.sha256(data).hexdigest()[:24]}.parquet"
        storage.write_bytes(storage.join(version_dir, err_path), data)
    origin = good.column("origin")
    mod = good.column("modality")
    enc_img = int(pc.sum(pc.and_(pc.equal(origin, "encoded"), pc.equal(mod, "image"))).as_py() or 0)
    enc_txt = int(pc.sum(pc.and_(pc.equal(origin, "encoded"), pc.equal(mod, "text"))).as_py() or 0)
    return pa.table(
        {
            "path": [path],
            "sha256": [sha],
            "rows": [rows],
            "bytes": [nbytes],
            "image": [n_img],
            "text": [n_txt],
            "errors_path": [err_path],
            "n_errors": [bad.num_rows],
            "encoded_images": [enc_img],
            "encoded_texts": [enc_txt],
        }
    )


# --------------------------------------------------------------------------------------------
# driver


@dataclass
class Diff:
    """What a run does to the published index (item counts and id sets)."""

    total: int
    new: int
    changed: int
    unchanged: int
    deleted: int
    full_reencode: bool
    reason: str
    encode_ids: pa.Array
    carry_ids: pa.Array


def _find_manifest(uri: str) -> str:
    low = uri.lower()
    if low.endswith((".parquet", ".pq", ".jsonl", ".json-lines", ".jsonlines", ".ndjson")):
        return uri
    for name in ("manifest.parquet", "manifest.jsonl"):
        cand = storage.join(uri, name)
        if storage.exists(cand):
            return cand
    raise config_mod.ConfigError(f"no archive manifest at {uri} (manifest.parquet/.jsonl)")


def _archive_dataset(ray_data: Any, uri: str, cfg: EncodeConfig) -> tuple[Any, str, int]:
    """The manifest as a dataset of blocks of ``manifest_block_rows`` rows (+ its dir, rows)."""
    from duch_core.archive import manifest_dir

    path = _find_manifest(uri)
    base = manifest_dir(path)
    cols = ["item_id", "image_uri", "captions"]
    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        with storage.open_input(path) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        ds = ray_data.read_parquet(path, columns=cols, file_extensions=None)
    else:
        # JSON lines are parsed in tasks too: the manifest never passes through the driver
        ds = ray_data.read_text(path).map_batches(
            parse_manifest_lines, batch_format="pyarrow", num_cpus=cfg.decode_cpus
        )
        ds = ds.materialize()
        n = ds.count()
    blocks = max(1, math.ceil(n / max(1, cfg.manifest_block_rows)))
    return ds.repartition(blocks), base, n


def _gather(ds: Any, columns: list[str]) -> pa.Table:
    import ray

    refs = ds.select_columns(columns).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({c: pa.array([], pa.string()) for c in columns})
    )


def _previous(out: str) -> index_store.IndexManifest | None:
    try:
        return index_store.read_latest(out)
    except index_store.IndexNotFoundError:
        return None


def compute_diff(
    current: pa.Table, prev: index_store.IndexManifest | None, bundle_id: str, bits: int
) -> Diff:
    """Compare the archive's (item_id, fingerprint) with the published version."""
    ids = current.column("item_id")
    total = current.num_rows
    if pc.count_distinct(ids).as_py() != total:
        vc = pc.value_counts(ids)
        dup = [v["values"] for v in vc.to_pylist() if v["counts"] > 1][:5]
        raise config_mod.ConfigError(f"archive item_id values are not unique, e.g. {dup}")
    empty = pa.array([], pa.string())
    if prev is None:
        return Diff(total, total, 0, 0, 0, True, "no published index", ids.combine_chunks(), empty)
    prev_rows = index_store.read_rows(prev, columns=["item_id", "fingerprint"])
    prev_items = prev_rows.group_by(["item_id", "fingerprint"]).aggregate([])
    errs = index_store.read_errors(prev)
    prev_ids = pc.unique(
        pa.concat_arrays(
            [prev_items.column("item_id").combine_chunks(), errs.column("item_id").combine_chunks()]
        )
    )
    deleted = int(
        pc.sum(pc.invert(pc.is_in(prev_ids, value_set=ids.combine_chunks()))).as_py() or 0
    )
    if prev.bundle_id != bundle_id or int(prev.bits) != bits:
        reason = f"bundle changed ({prev.bundle_id} -> {bundle_id})"
        is_new = pc.invert(pc.is_in(ids, value_set=prev_ids))
        new = int(pc.sum(is_new).as_py() or 0)
        return Diff(total, new, total - new, 0, deleted, True, reason, ids.combine_chunks(), empty)
    joined = current.join(prev_items, keys="item_id", right_suffix="_prev", join_type="left outer")
    fp_now = joined.column("fingerprint")
    fp_prev = joined.column("fingerprint_prev")
    failed_before = pc.is_in(
        joined.column("item_id"), value_set=errs.column("item_id").combine_chunks()
    )
    same = pc.and_(pc.equal(fp_now, fp_prev).fill_null(False), pc.invert(failed_before))
    same = pc.and_(same, pc.invert(pc.starts_with(fp_now, "missing-")))
    carry = joined.filter(same).column("item_id").combine_chunks()
    encode = joined.filter(pc.invert(same)).column("item_id").combine_chunks()
    is_new = pc.invert(pc.is_in(encode, value_set=prev_ids))
    new = int(pc.sum(is_new).as_py() or 0)
    return Diff(
        total, new, len(encode) - new, len(carry), deleted, False, "incremental", encode, carry
    )


def _bundle_meta(bundle_uri: str) -> tuple[str, int, dict[str, Any]]:
    """(bundle id, bits, image backbone config) read from the bundle's JSON files."""
    meta = storage.read_json(storage.join(bundle_uri, "meta.json"))
    cfg = storage.read_json(storage.join(bundle_uri, "config.json"))
    bitorder = meta.get("bitorder", "big")
    if bitorder != "big":
        raise config_mod.ConfigError(f"bundle {bundle_uri} packs codes {bitorder!r}; need 'big'")
    image_cfg = dict(cfg.get("image_backbone") or {})
    return str(meta["bundle_id"]), int(meta["bits"]), image_cfg


def run(cfg: EncodeConfig, dry_run: bool = False) -> dict[str, Any]:
    """Encode ``cfg.archive`` with ``cfg.bundle`` into a new version under ``cfg.out``.

    Returns:
        The summary dict (also written as ``summary.json`` in the version unless ``dry_run``).
        ``summary["exit_code"]`` is 1 when the error rate exceeds ``cfg.max_error_rate``.
    """
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    rd = ray.data
    bundle_id, bits, image_cfg = _bundle_meta(cfg.bundle)
    items, base, _ = _archive_dataset(rd, cfg.archive, cfg)
    items = items.map_batches(
        fingerprint_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"base_dir": base, "io_threads": cfg.io_threads},
        num_cpus=cfg.decode_cpus,
    ).materialize()
    current = _gather(items, ["item_id", "fingerprint"])
    t_scan = time.perf_counter() - t0
    prev = _previous(cfg.out)
    try:
        diff = compute_diff(current, prev, bundle_id, bits)
    except index_store.IndexCorruptError as e:
        log.warning("published index unreadable (%s): encoding everything", e)
        prev = None
        diff = compute_diff(current, None, bundle_id, bits)
        diff.reason = f"previous index unreadable: {e}"
    plan = {
        "archive_items": diff.total,
        "new": diff.new,
        "changed": diff.changed,
        "unchanged": diff.unchanged,
        "deleted": diff.deleted,
        "would_encode": len(diff.encode_ids),
        "would_carry_over": len(diff.carry_ids),
        "full_reencode": diff.full_reencode,
        "reason": diff.reason,
        "previous_version": prev.version if prev else None,
        "bundle_id": bundle_id,
        "bits": bits,
        "scan_seconds": round(t_scan, 3),
        "diff_seconds": round(time.perf_counter() - t0 - t_scan, 3),
    }
    if dry_run:
        return {"dry_run": True, **plan, "exit_code": 0}

    version = index_store.new_version_id()
    vdir = index_store.version_uri(cfg.out, version)
    t_enc = time.perf_counter()
    use_gpu = cfg.num_gpus > 0
    parts = []
    if len(diff.encode_ids):
        wanted = ray.put(diff.encode_ids)
        encoded = (
            items.map_batches(select_items, batch_format="pyarrow", fn_args=(wanted,), num_cpus=0.1)
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                batch_size=cfg.decode_batch,
                fn_kwargs={
                    "image_cfg": image_cfg,
                    "max_pixels": cfg.max_image_pixels,
                    "io_threads": cfg.io_threads,
                },
                num_cpus=cfg.decode_cpus,
            )
            .map_batches(
                BundleEncoder,
                batch_format="numpy",
                batch_size=cfg.batch_size,
                fn_constructor_kwargs={
                    "bundle_uri": cfg.bundle,
                    "torch_threads": cfg.torch_threads,
                    "use_gpu": use_gpu,
                },
                compute=rd.ActorPoolStrategy(
                    min_size=max(1, min(cfg.min_actors, cfg.actors)), max_size=max(1, cfg.actors)
                ),
                **({"num_gpus": cfg.num_gpus} if use_gpu else {"num_cpus": cfg.actor_cpus}),
            )
        )
        parts.append(encoded)
    if len(diff.carry_ids) and prev is not None:
        keep = ray.put(diff.carry_ids)
        mjson = {**prev.to_dict(), "__uri": prev.uri}
        shards = rd.from_items([{"shard": i} for i in range(len(prev.shards))])
        carried = shards.map_batches(
            carry_batch,  # type: ignore[arg-type]
            batch_size=1,
            fn_args=(mjson, keep),
            num_cpus=cfg.write_cpus,
        )
        parts.append(carried)
    meta_rows: list[dict[str, Any]] = []
    if parts:
        stream = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        written = stream.map_batches(
            write_batch,
            batch_format="pyarrow",
            batch_size=cfg.shard_rows,
            fn_kwargs={
                "version_dir": vdir,
                "bundle_id": bundle_id,
                "bits": bits,
                "fail_after": cfg.fail_after_shards,
            },
            num_cpus=cfg.write_cpus,
        )
        meta_rows = written.take_all()
    enc_seconds = time.perf_counter() - t_enc

    shard_infos = sorted(
        (
            index_store.ShardInfo(
                path=r["path"],
                rows=int(r["rows"]),
                sha256=r["sha256"],
                counts={"image": int(r["image"]), "text": int(r["text"])},
                bytes=int(r["bytes"]),
            )
            for r in meta_rows
            if r["path"]
        ),
        key=lambda s: s.path,
    )
    err_parts = sorted(r["errors_path"] for r in meta_rows if r["errors_path"])
    err_tables = [storage.read_parquet(storage.join(vdir, p)) for p in err_parts]
    errors = (
        pa.concat_tables(err_tables).sort_by(
            [("item_id", "ascending"), ("caption_index", "ascending")]
        )
        if err_tables
        else index_store.ERRORS_SCHEMA.empty_table()
    )
    storage.write_parquet(storage.join(vdir, index_store.ERRORS_NAME), errors)
    for p in err_parts:
        storage.delete(storage.join(vdir, p))

    counts = index_store.shard_counts(shard_infos)
    failed_items = (
        int(pc.count_distinct(errors.column("item_id")).as_py() or 0) if errors.num_rows else 0
    )
    encoded_images = sum(int(r["encoded_images"]) for r in meta_rows)
    encoded_texts = sum(int(r["encoded_texts"]) for r in meta_rows)
    error_rate = failed_items / diff.total if diff.total else 0.0
    manifest = index_store.IndexManifest(
        version=version,
        bundle_id=bundle_id,
        bits=bits,
        shards=tuple(shard_infos),
        counts=counts,
        errors=index_store.ERRORS_NAME,
        created=index_store.utc_now_iso(),
        config=config_mod.to_dict(cfg),
        archive=cfg.archive,
        bundle_uri=cfg.bundle,
        n_errors=errors.num_rows,
    )
    over = error_rate > cfg.max_error_rate
    total_s = time.perf_counter() - t0
    summary = {
        **plan,
        "version": version,
        "version_uri": vdir,
        "encoded_items": len(diff.encode_ids),
        "carried_over_items": len(diff.carry_ids),
        "encoded_images": encoded_images,
        "encoded_captions": encoded_texts,
        "failed_items": failed_items,
        "error_rows": errors.num_rows,
        "errors_by_stage": _by_stage(errors),
        "error_rate": round(error_rate, 6),
        "max_error_rate": cfg.max_error_rate,
        "counts": counts,
        "shards": len(shard_infos),
        "bytes": sum(s.bytes for s in shard_infos),
        "encode_seconds": round(enc_seconds, 3),
        "total_seconds": round(total_s, 3),
        "images_per_second": round(encoded_images / enc_seconds, 2) if enc_seconds > 0 else 0.0,
        "published": not over,
        "exit_code": 1 if over else 0,
    }
    storage.write_json(storage.join(vdir, index_store.SUMMARY_NAME), summary)
    manifest = index_store.write_manifest(vdir, manifest)
    if over:
        log.error(
            "error rate %.3f above max_error_rate %.3f: version %s written, LATEST not moved",
            error_rate,
            cfg.max_error_rate,
            version,
        )
        return summary
    index_store.publish(cfg.out, manifest)
    summary["deleted_versions"] = index_store.apply_retention(
        cfg.out, cfg.keep_versions, current=version
    )
    return summary


def _by_stage(errors: pa.Table) -> dict[str, int]:
    if not errors.num_rows:
        return {}
    vc = pc.value_counts(errors.column("stage")).to_pylist()
    return {str(v["values"]): int(v["counts"]) for v in vc}


# --------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="model bundle URI")
    p.add_argument("--archive", help="archive manifest URI")
    p.add_argument("--out", help="index root URI")
    p.add_argument("--config", help="YAML file with EncodeConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    return p


def load_config(args: argparse.Namespace) -> EncodeConfig:
    cfg = config_mod.load(EncodeConfig, args.config, args.set)
    given = {k: getattr(args, k) for k in ("bundle", "archive", "out") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **given)
    missing = [k for k in ("bundle", "archive", "out") if not getattr(cfg, k)]
    if missing:
        raise config_mod.ConfigError(f"missing {', '.join('--' + m for m in missing)}")
    if cfg.batch_size < 1 or cfg.shard_rows < 1 or cfg.decode_batch < 1:
        raise config_mod.ConfigError("batch_size, shard_rows and decode_batch must be >= 1")
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        raise config_mod.ConfigError(f"max_error_rate must be in [0, 1], got {cfg.max_error_rate}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring for arguments and exit status."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except config_mod.ConfigError as e:
        print(f"encode: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = run(cfg, dry_run=args.dry_run)
    except (config_mod.ConfigError, index_store.IndexFormatError) as e:
        print(f"encode: {e}", file=sys.stderr)
        return 2
    except Exception:  # the run failed: nothing was published, a rerun starts over
        log.exception("encode failed; LATEST was not moved")
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True))
    if not args.dry_run:
        log.info(
            "version %s: %d items encoded (%d images, %d captions), %d carried over, %d failed; "
            "%d shards, %d bytes; %.1f images/s; %s",
            summary["version"],
            summary["encoded_items"],
            summary["encoded_images"],
            summary["encoded_captions"],
            summary["carried_over_items"],
            summary["failed_items"],
            summary["shards"],
            summary["bytes"],
            summary["images_per_second"],
            "published" if summary["published"] else "NOT published (error rate over the limit)",
        )
    return int(summary["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
