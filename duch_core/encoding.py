"""The batch functions of archive encoding: fingerprint, decode, encode, carry over, write.

Each function takes one batch and returns one batch (a pyarrow table or a dict of numpy arrays)
and knows nothing of Ray, so ``jobs/encode.py`` maps them over an archive with Ray Data while
tests and ``bench/encode.py`` call them directly. The stages, in pipeline order:

1. :func:`parse_manifest_lines` (JSON-lines manifests only) -> archive rows;
2. :func:`fingerprint_batch`: validate rows, resolve image URIs, look up every image object's
   metadata (no bytes read) -> :func:`source_fingerprint` per item;
3. :func:`decode_batch`: fetch, decode with the bundle's band and bit-depth rule, preprocess;
4. :class:`BundleEncoder`: image and caption codes with one bundle -> code rows;
   :func:`carry_rows`: rows of unchanged items copied from the previous version -> code rows;
5. :func:`write_code_batch`: one shard and one errors part per batch; :func:`merge_written`
   gathers what the writers report into the shard list and the version's errors table.

Code rows (:func:`code_row_schema`) are shard rows plus ``stage``/``reason`` (empty when the row
holds a code, else why it failed) and ``origin`` (``encoded`` or ``carried``). Failures are rows,
never exceptions: one bad image or caption does not stop a batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import index_store, storage
from duch_core.config import ImageBackboneConfig

ERROR_PARTS_DIR = "errors"  # per-batch errors parts, merged into errors.parquet at the end


def code_row_schema(bits: int) -> pa.Schema:
    """Rows between the encode or carry stage and the writer (see the module docstring)."""
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


def code_rows(
    bits: int,
    item_ids: Sequence[str],
    modality: Sequence[str],
    caption_index: Sequence[int],
    codes: np.ndarray,
    fingerprint: Sequence[str],
    stage: Sequence[str],
    reason: Sequence[str],
    origin: str,
) -> pa.Table:
    """Build code rows; ``codes`` is ``(N, bits // 8)`` uint8 (zeros on failed rows)."""
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
        schema=code_row_schema(bits),
    )


# --------------------------------------------------------------------------------------------
# manifest rows and fingerprints


def parse_manifest_lines(batch: pa.Table) -> pa.Table:
    """Lines of a JSON-lines manifest (column ``text``) -> ``item_id``, ``image_uri``, ``captions``.

    Each line is one JSON object; blank lines are skipped; a missing ``captions`` key means no
    captions.

    Raises:
        ArchiveError: a line is not a JSON object or its values have the wrong types.
    """
    from duch_core.archive import ArchiveError, parse_manifest_line, validate_archive

    rows = []
    for line in batch.column("text").to_pylist():
        obj = parse_manifest_line(line, f"manifest line {line[:200]!r}")
        if obj is not None:
            rows.append(obj)
    try:
        table = pa.table(
            {
                "item_id": pa.array([r.get("item_id") for r in rows]),
                "image_uri": pa.array([r.get("image_uri") for r in rows]),
                "captions": pa.array(
                    [r.get("captions") or [] for r in rows], pa.list_(pa.string())
                ),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ArchiveError(f"manifest values have the wrong types ({e})") from e
    return validate_archive(table, where="manifest").select(["item_id", "image_uri", "captions"])


def source_fingerprint(
    size: int | None, etag: str | None, mtime_ns: int | None, image_uri: str, captions: list[str]
) -> str:
    """``s<size>-e<etag>-m<mtime_ns>-c<hash of image URI and captions>``: what a code came from.

    Object metadata stands for the image bytes (a metadata call, no download). ``size is None``
    means the object could not be looked up (``missing-c...``); such items are always re-encoded.
    """
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    if size is None:
        return f"missing-c{h}"
    mtime = mtime_ns if mtime_ns is not None else ""
    return f"s{size}-e{(etag or '').strip(chr(34))}-m{mtime}-c{h}"


def fingerprint_batch(batch: pa.Table, base_dir: str, io_threads: int) -> pa.Table:
    """Validate archive rows, resolve image URIs against ``base_dir`` and fingerprint them.

    Returns:
        Columns ``item_id``, ``image_uri`` (resolved), ``captions_json`` (JSON list of strings),
        ``fingerprint`` and ``lookup_error`` ("" when the object exists).
    """
    from duch_core.archive import resolve_image_uri, validate_archive

    table = validate_archive(batch)
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
    fps = [
        source_fingerprint(None, None, None, uri, cap)
        if info is None
        else source_fingerprint(info.size, info.etag, info.mtime_ns, uri, cap)
        for uri, cap, (info, _) in zip(uris, caps, infos, strict=True)
    ]
    return pa.table(
        {
            "item_id": table.column("item_id").cast(pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "captions_json": pa.array([json.dumps(c) for c in caps], pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "lookup_error": pa.array([err for _, err in infos], pa.string()),
        }
    )


# --------------------------------------------------------------------------------------------
# decode and encode


def decode_batch(
    batch: pa.Table, image_cfg: ImageBackboneConfig, max_pixels: int, io_threads: int
) -> dict[str, np.ndarray]:
    """Fetch, decode and preprocess the images of a :func:`fingerprint_batch` batch (CPU).

    Decoding follows the bundle's band selection and bit-depth rule (``image_cfg``).

    Returns:
        ``pixels`` ``(N, 3, S, S)`` float32 (zeros where the image failed), ``img_ok`` ``(N,)``
        bool, ``img_stage``/``img_reason`` strings, and ``item_id``, ``fingerprint``,
        ``captions_json`` passed through.
    """
    from duch_core.imageio import decode_image, decode_options, preprocess

    options = decode_options(image_cfg)
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
    s = image_cfg.image_size
    pixels = np.zeros((n, 3, s, s), np.float32)
    ok = np.zeros(n, bool)
    stages, reasons = [], []
    for i, (data, stage, reason) in enumerate(fetched):
        if data is not None:
            try:
                if not data:
                    raise ValueError(f"empty object (0 bytes): {uris[i]}")
                pixels[i] = preprocess(
                    decode_image(data, max_pixels=max_pixels, **options), image_cfg
                )
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
    """Image and caption codes with one bundle, loaded once (a Ray Data callable class).

    Args:
        bundle_uri: the model bundle.
        bundle_id: the id the caller planned with; a bundle replaced since is refused, so no code
            is ever labelled with the wrong bundle.
        torch_threads: intra-op threads; 0 keeps torch's default.
        use_gpu: run on CUDA when it is available.

    Raises:
        BundleError: the bundle does not load or is not ``bundle_id``.
    """

    def __init__(
        self, bundle_uri: str, bundle_id: str, torch_threads: int = 0, use_gpu: bool = False
    ) -> None:
        import torch

        from duch_core.bundle import Bundle, BundleError, HashEncoder

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        bundle = Bundle.load(bundle_uri, device=device)
        if bundle.bundle_id != bundle_id:
            raise BundleError(
                f"bundle {bundle_uri} is now {bundle.bundle_id[:16]}..., the run was planned "
                f"with {bundle_id[:16]}...; it was replaced during the run, rerun the job"
            )
        self.encoder = HashEncoder(bundle)
        self.bits = int(bundle.bits)
        self.text_cfg = bundle.config.text_backbone
        self.encoder.image_tower  # noqa: B018 - build the towers now, not in the first batch
        self.encoder.text_tower  # noqa: B018

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        """A :func:`decode_batch` batch -> code rows: one per image and one per caption."""
        from duch_core.imageio import clean_caption

        ids = [str(x) for x in batch["item_id"]]
        fps = [str(x) for x in batch["fingerprint"]]
        ok = np.asarray(batch["img_ok"], bool)
        cols: dict[str, list[Any]] = {k: [] for k in ("id", "mod", "cap", "fp", "stage", "reason")}

        def add(i: int, mod: str, cap: int, stage: str = "", reason: str = "") -> None:
            for k, v in zip(cols, (ids[i], mod, cap, fps[i], stage, reason), strict=True):
                cols[k].append(v)

        good = [int(i) for i in np.flatnonzero(ok)]
        image_codes = self.encoder.encode_pixels(np.asarray(batch["pixels"])[good])
        for i in good:
            add(i, "image", -1)
        for i in (int(i) for i in np.flatnonzero(~ok)):
            add(i, "image", -1, str(batch["img_stage"][i]), str(batch["img_reason"][i]))
        texts: list[str] = []
        text_rows: list[int] = []
        for i in range(len(ids)):
            for j, text in enumerate(json.loads(str(batch["captions_json"][i]))):
                try:
                    clean_caption(text, self.text_cfg)
                except ValueError as e:
                    add(i, "text", j, "caption", f"{type(e).__name__}: {e}")
                    continue
                text_rows.append(len(cols["id"]))
                texts.append(text)
                add(i, "text", j)
        codes = np.zeros((len(cols["id"]), self.bits // 8), np.uint8)
        codes[: len(good)] = image_codes
        if texts:
            codes[text_rows] = self.encoder.encode_texts(texts)
        return code_rows(
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


def carry_rows(
    manifest: index_store.IndexManifest, shards: Iterable[int], keep: pa.Array
) -> pa.Table:
    """Code rows of the items in ``keep`` copied from some shards of a previous version.

    Shards are read with their checksums verified; the codes are copied byte for byte.
    """
    bits = manifest.bits
    tables = []
    for pos in shards:
        t = index_store.read_shard(manifest, int(pos))
        t = t.filter(pc.is_in(t.column("item_id"), value_set=keep))
        n = t.num_rows
        empty = pa.array([""] * n, pa.string())
        tables.append(
            pa.Table.from_arrays(
                [t.column(c) for c in ("item_id", "modality", "caption_index", "code")]
                + [t.column("fingerprint"), empty, empty, pa.array(["carried"] * n, pa.string())],
                schema=code_row_schema(bits),
            )
        )
    return pa.concat_tables(tables) if tables else code_row_schema(bits).empty_table()


# --------------------------------------------------------------------------------------------
# write


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
            [bad.column(c) for c in ("item_id", "stage", "reason", "caption_index")],
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


def merge_written(version_dir: str, results: Sequence[Mapping[str, Any]]) -> Written:
    """Collect :func:`write_code_batch` results; merge the errors parts into ``errors.parquet``.

    The parts are deleted once the merged table is written.
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
    tables = [storage.read_parquet(storage.join(version_dir, p)) for p in parts]
    errors = (
        pa.concat_tables(tables).sort_by([("item_id", "ascending"), ("caption_index", "ascending")])
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
