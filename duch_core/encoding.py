"""The batch functions of archive encoding: read rows, fingerprint, decode, encode, carry, write.

Each function takes one batch and returns one batch (a pyarrow table or a dict of numpy arrays)
and knows nothing of Ray, so ``jobs/encode.py`` maps them over an archive with Ray Data while
tests and ``bench/encode.py`` call them directly. The stages, in pipeline order:

1. :func:`duch_core.manifest_rows.parse_manifest_file` (JSON-lines manifests only) -> archive
   rows, one per line; a line that is not UTF-8, not JSON or not a valid row becomes a row with
   ``manifest_error``;
2. :func:`prepare_batch`: check each row (:func:`duch_core.manifest_rows.normalize_rows`), write
   the valid rows as a catalog part of the version, resolve image URIs and look up every image
   object's metadata (no bytes read) -> a fingerprint per item
   (:func:`duch_core.source_fingerprints.fingerprint_batch`);
3. :func:`decode_batch`: fetch, decode with the bundle's band and bit-depth rule, preprocess;
4. :class:`BundleEncoder`: image and caption codes with one bundle -> code rows;
   :func:`carry_rows`: rows of unchanged items copied from the previous version -> code rows;
5. :func:`duch_core.shard_writer.write_code_batch`: one shard and one errors part per batch;
   :func:`duch_core.shard_writer.merge_written` gathers what the writers report into the shard
   list and the version's errors table.

Code rows (:func:`code_row_schema`) are shard rows plus ``stage``/``reason`` (empty when the row
holds a code, else why it failed), ``transient`` and ``origin`` (``encoded`` or ``carried``).
Failures are rows, never exceptions: one bad row, image or caption does not stop a batch.

Transient and permanent failures: the store is asked again, with backoff, while it fails in a way
that may pass (:func:`duch_core.storage_retry.retrying`). An image that still cannot be read then
is a *transient* failure: the item is left out of this batch whole (no caption rows either) and the
job carries its previous rows over (it is *stale*), or, for an item without previous rows, reports
it as unavailable. Only a missing object or bytes that do not decode are *permanent* failures that
remove an item from the index.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import (
    catalog_snapshot,
    chip_io,
    index_store,
    item_metadata,
    manifest_rows,
    source_fingerprints,
    storage,
)
from duch_core.config import ImageBackboneConfig

ITEM_COLUMNS = (
    "item_id",
    "image_uri",
    "bands_json",
    "captions_json",
    "fingerprint",
    "size",
    "lookup_error",
    "lookup_transient",
    "manifest_error",
    "catalog_path",
    "catalog_part",
    "datetime_us",
)
"""Columns of :func:`prepare_batch` output (see there)."""


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
            ("transient", pa.bool_()),  # the failure may pass (the store failed)
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
    transient: Sequence[bool] | None = None,
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
            pa.array(transient if transient is not None else [False] * n, pa.bool_()),
            pa.array([origin] * n, pa.string()),
        ],
        schema=code_row_schema(bits),
    )


# --------------------------------------------------------------------------------------------
# the catalog and the prepare stage


def catalog_table(rows: pa.Table, base_dir: str) -> pa.Table:
    """Valid archive rows as catalog rows: image URIs resolved, ``manifest_error`` dropped."""
    from duch_core.archive import resolve_locations

    out = rows.drop_columns(["manifest_error"]) if "manifest_error" in rows.column_names else rows
    return resolve_locations(out, base_dir)


def prepare_batch(
    batch: pa.Table, base_dir: str, io_threads: int, version_dir: str | None
) -> pa.Table:
    """Archive rows -> checked, catalogued and fingerprinted items (:data:`ITEM_COLUMNS`).

    Valid rows (:func:`~duch_core.manifest_rows.normalize_rows`) are written as one catalog part
    of the version at ``version_dir`` (none when it is ``None``, a dry run) and fingerprinted
    (:func:`~duch_core.source_fingerprints.fingerprint_batch`); bad rows come out with their
    ``manifest_error`` and nothing else. ``catalog_path`` names the part holding each valid row;
    the first valid row also carries the part's entry for ``index.json`` in ``catalog_part``
    (JSON; "" elsewhere). ``datetime_us`` is the row's acquisition time in epoch microseconds
    (:data:`~duch_core.item_metadata.NAT_US` when it has none), the first key of the index row order.
    """
    rows = manifest_rows.normalize_rows(batch)
    ok = pc.equal(rows.column("manifest_error"), "")
    good = rows.filter(ok)
    bad = rows.filter(pc.invert(ok))
    part_path, part_json = "", ""
    if version_dir is not None and good.num_rows:
        part = catalog_snapshot.write_catalog_part(version_dir, catalog_table(good, base_dir))
        part_path, part_json = part.path, json.dumps(part.to_dict())
    fp = source_fingerprints.fingerprint_batch(good, base_dir, io_threads)
    n_good, n_bad = good.num_rows, bad.num_rows
    good_out = fp.append_column("manifest_error", pa.array([""] * n_good, pa.string()))
    good_out = good_out.append_column("catalog_path", pa.array([part_path] * n_good, pa.string()))
    good_out = good_out.append_column(
        "catalog_part", pa.array([part_json] + [""] * (n_good - 1) if n_good else [], pa.string())
    )
    good_out = good_out.append_column(
        "datetime_us", pa.array(item_metadata.datetime_us(good), pa.int64())
    )
    empty = pa.array([""] * n_bad, pa.string())
    bad_out = pa.table(
        {
            "item_id": bad.column("item_id"),
            "image_uri": empty,
            "bands_json": empty,
            "captions_json": pa.array(["[]"] * n_bad, pa.string()),
            "fingerprint": empty,
            "size": pa.array([-1] * n_bad, pa.int64()),
            "lookup_error": empty,
            "lookup_transient": pa.array([False] * n_bad, pa.bool_()),
            "manifest_error": bad.column("manifest_error"),
            "catalog_path": empty,
            "catalog_part": empty,
            "datetime_us": pa.array([item_metadata.NAT_US] * n_bad, pa.int64()),
        }
    )
    return pa.concat_tables([good_out.select(list(ITEM_COLUMNS)), bad_out])


# --------------------------------------------------------------------------------------------
# decode and encode


def fetch_image(uri: str, size: int = -1) -> tuple[bytes | None, str, bool]:
    """``(bytes, error, transient)`` of one image object (retries are inside the storage calls).

    ``size`` (-1: unknown) is the size the look-up found; a read that returns another size is
    repeated once, then reported as transient, so a short read is never mistaken for a corrupt
    image.
    """
    for _ in range(2):
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            return None, f"object not found: {uri}", False
        except Exception as e:  # noqa: BLE001 - any other failure may pass: the item is kept
            return None, f"cannot read {uri}: {type(e).__name__}: {e}", True
        if size < 0 or len(data) == size:
            return data, "", False
    return None, f"cannot read {uri}: got {len(data)} bytes, the object has {size}", True


def decode_batch(
    batch: pa.Table, image_cfg: ImageBackboneConfig, max_pixels: int, io_threads: int
) -> dict[str, np.ndarray]:
    """Fetch, decode and preprocess the images of a :func:`prepare_batch` batch (CPU).

    Decoding follows the bundle's band selection and bit-depth rule (``image_cfg``). An item
    whose look-up failed is not fetched again.

    Returns:
        ``pixels`` ``(N, 3, S, S)`` float32 (zeros where the image failed), ``img_ok`` ``(N,)``
        bool, ``img_stage``/``img_reason`` strings, ``img_transient`` ``(N,)`` bool (the failure
        may pass), and ``item_id``, ``fingerprint``, ``captions_json`` passed through.
    """
    from duch_core.imageio import decode_image, decode_options, preprocess

    options = decode_options(image_cfg)
    uris = batch.column("image_uri").to_pylist()
    lookup = batch.column("lookup_error").to_pylist()
    n = batch.num_rows
    lookup_transient = (
        batch.column("lookup_transient").to_pylist()
        if "lookup_transient" in batch.column_names
        else [False] * n
    )
    sizes = batch.column("size").to_pylist() if "size" in batch.column_names else [-1] * n

    bands = (
        batch.column("bands_json").to_pylist() if "bands_json" in batch.column_names else [""] * n
    )

    def fetch(i: int) -> tuple[bytes | np.ndarray | None, str, str, bool]:
        if lookup[i]:
            return None, "fetch", lookup[i], bool(lookup_transient[i])
        data, reason, transient = fetch_image(uris[i], int(sizes[i]))
        return data, ("fetch" if data is None else ""), reason, transient

    # windows of scenes: read and decoded here, each scene's band files opened once per batch
    chips = [i for i in range(n) if not lookup[i] and chip_io.is_chip_uri(uris[i])]
    rows = [
        {"image_uri": uris[i], "bands": json.loads(bands[i]) if bands[i] else None} for i in chips
    ]

    def read_group(members: list[int]) -> list[tuple[int, Any]]:
        got = chip_io.decode_chips([rows[m] for m in members], max_pixels=max_pixels, **options)
        return [(chips[m], g) for m, g in zip(members, got, strict=True)]

    def chip_result(uri: str, got: Any) -> tuple[np.ndarray | None, str, str, bool]:
        if isinstance(got, np.ndarray):
            return got, "", "", False
        if isinstance(got, chip_io.SceneError):
            if chip_io.is_transient(got):
                return None, "fetch", f"chip {uri}: {got}", True
            return None, "decode", f"chip {uri}: {got}", False
        return None, "decode", f"chip {uri}: {type(got).__name__}: {got}", False

    is_chip = set(chips)
    plain = [i for i in range(n) if i not in is_chip]
    results: dict[int, tuple[bytes | np.ndarray | None, str, str, bool]] = {}
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        grouped = pool.map(read_group, chip_io.chip_groups(rows))
        results.update(zip(plain, pool.map(fetch, plain), strict=True))
        for pairs in grouped:
            for i, got in pairs:
                results[i] = chip_result(uris[i], got)
    fetched = [results[i] for i in range(n)]
    s = image_cfg.image_size
    pixels = np.zeros((n, 3, s, s), np.float32)
    ok = np.zeros(n, bool)
    transient = np.zeros(n, bool)
    stages, reasons = [], []
    for i, (data, stage, reason, trans) in enumerate(fetched):
        if data is not None:
            try:
                if isinstance(data, np.ndarray):  # a chip, already a picture
                    picture = data
                elif not data:
                    raise ValueError(f"empty object (0 bytes): {uris[i]}")
                else:
                    picture = decode_image(data, max_pixels=max_pixels, **options)
                pixels[i] = preprocess(picture, image_cfg)
                ok[i] = True
            except Exception as e:  # noqa: BLE001 - any decode failure is a per-item error
                stage, reason = "decode", f"{type(e).__name__}: {e}"
        transient[i] = trans
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
        "img_transient": transient,
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

        from duch_core.bundle import Bundle, BundleError
        from duch_core.hash_encoder import HashEncoder

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
        transient = np.asarray(batch.get("img_transient", np.zeros(len(ids), bool)), bool)
        keys = ("id", "mod", "cap", "fp", "stage", "reason", "transient")
        cols: dict[str, list[Any]] = {k: [] for k in keys}

        def add(i: int, mod: str, cap: int, stage: str = "", reason: str = "", t: bool = False):
            for k, v in zip(cols, (ids[i], mod, cap, fps[i], stage, reason, t), strict=True):
                cols[k].append(v)

        good = [int(i) for i in np.flatnonzero(ok)]
        image_codes = self.encoder.encode_pixels(np.asarray(batch["pixels"])[good])
        for i in good:
            add(i, "image", -1)
        for i in (int(i) for i in np.flatnonzero(~ok)):
            add(
                i,
                "image",
                -1,
                str(batch["img_stage"][i]),
                str(batch["img_reason"][i]),
                transient[i],
            )
        texts: list[str] = []
        text_rows: list[int] = []
        for i in range(len(ids)):
            if transient[i] and not ok[i]:
                continue  # left out whole: the job keeps the item's previous rows
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
            cols["transient"],
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
                + [
                    t.column("fingerprint"),
                    empty,
                    empty,
                    pa.array([False] * n, pa.bool_()),
                    pa.array(["carried"] * n, pa.string()),
                ],
                schema=code_row_schema(bits),
            )
        )
    return pa.concat_tables(tables) if tables else code_row_schema(bits).empty_table()
