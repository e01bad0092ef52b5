"""The batch functions of archive encoding: read rows, fingerprint, decode, encode, carry, write.

Each function takes one batch and returns one batch (a pyarrow table or a dict of numpy arrays)
and knows nothing of Ray, so ``jobs/encode.py`` maps them over an archive with Ray Data while
tests and ``bench/encode.py`` call them directly. The stages, in pipeline order:

1. :func:`parse_manifest_file` (JSON-lines manifests only) -> archive rows, one per line; a line
   that is not UTF-8, not JSON or not a valid row becomes a row with ``manifest_error``;
2. :func:`prepare_batch`: check each row (:func:`normalize_rows`), write the valid rows as a
   catalog part of the version, resolve image URIs and look up every image object's metadata
   (no bytes read) -> :func:`source_fingerprint` per item (:func:`fingerprint_batch`);
3. :func:`decode_batch`: fetch, decode with the bundle's band and bit-depth rule, preprocess;
4. :class:`BundleEncoder`: image and caption codes with one bundle -> code rows;
   :func:`carry_rows`: rows of unchanged items copied from the previous version -> code rows;
5. :func:`write_code_batch`: one shard and one errors part per batch; :func:`merge_written`
   gathers what the writers report into the shard list and the version's errors table.

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

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from duch_core import catalog_snapshot, chip_io, index_store, storage
from duch_core.config import ImageBackboneConfig

ERROR_PARTS_DIR = "errors"  # per-batch errors parts, merged into errors.parquet at the end

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
# manifest rows

FIXED_COLUMNS = ("item_id", "image_uri", "captions", "label", "split")
_MAX_REASON = 300


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_manifest_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a Parquet manifest whose columns cannot hold an archive (a manifest-level error).

    Row-level problems (a null id, a bad split name) are not checked here: they become errors
    of their rows (:func:`normalize_rows`).

    Raises:
        ArchiveError: a required column is missing or a column has the wrong type.
    """
    from duch_core.archive import REQUIRED_COLUMNS, ArchiveError

    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ArchiveError(f"{where}: missing required column(s) {missing}; found {schema.names}")
    for name in ("item_id", "image_uri", "label", "split"):
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_null(t)
            or pa.types.is_dictionary(t)
            or (pa.types.is_integer(t) and name in ("item_id", "label"))
        ):
            raise ArchiveError(f"{where}: column {name!r} must hold strings, got type {t}")
    t = schema.field("captions").type
    ok_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not ok_list or not (
        pa.types.is_string(t.value_type)
        or pa.types.is_large_string(t.value_type)
        or pa.types.is_null(t.value_type)
    ):
        raise ArchiveError(
            f"{where}: column 'captions' must be a list of strings per row, got type {t}"
        )


def _line_row(line: bytes, lineno: int) -> dict[str, Any]:
    """One JSON-lines manifest line as a row dict, with ``manifest_error`` ("" when valid)."""
    from duch_core.archive import SPLIT_VALUES

    where = f"manifest line {lineno}"

    def bad(reason: str, obj: Any = None) -> dict[str, Any]:
        item = obj.get("item_id") if isinstance(obj, dict) else None
        item_id = str(item) if isinstance(item, str | int) and not isinstance(item, bool) else ""
        return {"item_id": item_id.strip(), "manifest_error": f"{where}: {reason}"}

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not UTF-8 ({e.reason} at byte {e.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"not valid JSON ({e.msg}): {text[:60]!r}")
    if not isinstance(obj, dict):
        return bad(f"must be a JSON object, got {type(obj).__name__}")
    item = obj.get("item_id")
    if isinstance(item, bool) or not isinstance(item, str | int) or not str(item).strip():
        return bad(f"item_id must be a non-empty string, got {_short(item)}", obj)
    uri = obj.get("image_uri")
    if not isinstance(uri, str) or not uri.strip():
        return bad(f"image_uri must be a non-empty string, got {_short(uri)}", obj)
    caps = obj.get("captions")
    if caps is None:
        caps = []
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        return bad(f"captions must be a list of strings, got {_short(caps)}", obj)
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, str | int)):
        return bad(f"label must be a string, got {_short(label)}", obj)
    split = obj.get("split")
    if split is not None and split not in SPLIT_VALUES:
        return bad(f"unknown split {_short(split)}; allowed: {list(SPLIT_VALUES)} or null", obj)
    row = dict(obj)
    row.update(
        item_id=str(item),
        image_uri=uri,
        captions=caps,
        label=None if label is None else str(label),
        split=split,
        manifest_error="",
    )
    return row


def _column(values: list[Any]) -> pa.Array:
    """A metadata column from JSON values; mixed or odd types are kept as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return pa.array(
            [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
            pa.string(),
        )


def parse_manifest_bytes(data: bytes) -> pa.Table:
    """A JSON-lines manifest's bytes -> archive rows, one per non-blank line.

    Returns:
        ``item_id``, ``image_uri``, ``captions`` (list<string>), ``label``, ``split``, the other
        keys as metadata columns (mixed types as JSON text), and ``manifest_error``: "" for a
        valid row, else why the line is not one (not UTF-8, not JSON, not an object, wrong
        types, unknown split). A missing or null ``captions`` means no captions.
    """
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r")
        if line.strip():
            rows.append(_line_row(line, lineno))
    extras = list(
        dict.fromkeys(k for r in rows for k in r if k not in (*FIXED_COLUMNS, "manifest_error"))
    )
    cols: dict[str, pa.Array] = {
        "item_id": pa.array([r.get("item_id", "") for r in rows], pa.string()),
        "image_uri": pa.array([r.get("image_uri") for r in rows], pa.string()),
        "captions": pa.array([r.get("captions") or [] for r in rows], pa.list_(pa.string())),
        "label": pa.array([r.get("label") for r in rows], pa.string()),
        "split": pa.array([r.get("split") for r in rows], pa.string()),
    }
    for k in extras:
        cols[k] = _column([r.get(k) for r in rows])
    cols["manifest_error"] = pa.array([r["manifest_error"] for r in rows], pa.string())
    return pa.table(cols)


def parse_manifest_file(batch: pa.Table) -> pa.Table:
    """Ray Data ``read_binary_files`` rows (column ``bytes``) -> :func:`parse_manifest_bytes`."""
    tables = [parse_manifest_bytes(b) for b in batch.column("bytes").to_pylist()]
    if not tables:
        return parse_manifest_bytes(b"")
    return pa.concat_tables(tables, promote_options="permissive")


def _string_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string())


def normalize_rows(table: pa.Table) -> pa.Table:
    """Check archive rows one by one; a bad row is marked, never an exception.

    Args:
        table: manifest rows (Parquet columns, or :func:`parse_manifest_bytes` output) whose
            column types passed :func:`check_manifest_schema`.

    Returns:
        ``item_id`` (string, "" when unusable), ``image_uri``, ``captions`` (list<string>, empty
        on bad rows), ``label``, ``split``, the metadata columns as they were, and
        ``manifest_error`` ("" for a valid row, else the reason: empty or null id or image URI,
        null captions or a null caption, unknown split, or an item id repeated in the batch).
    """
    from duch_core.archive import SPLIT_VALUES

    n = table.num_rows
    given = (
        table.column("manifest_error").to_pylist()
        if "manifest_error" in table.column_names
        else [""] * n
    )
    ids = _string_column(table, "item_id")
    uris = _string_column(table, "image_uri")
    caps = table.column("captions")
    if not pa.types.is_list(caps.type) or caps.type.value_type != pa.string():
        caps = caps.cast(pa.list_(pa.string()))
    labels = _string_column(table, "label")
    splits = _string_column(table, "split")
    id_list = ids.to_pylist()
    uri_list = uris.to_pylist()
    cap_list = caps.to_pylist()
    split_list = splits.to_pylist()
    seen: dict[str, int] = {}
    for i in id_list:
        if i is not None and i.strip():
            seen[i] = seen.get(i, 0) + 1
    errors: list[str] = []
    for k in range(n):
        item, err = id_list[k], given[k] or ""
        label = f"manifest row of item {item!r}" if item else "manifest row"
        if err:
            pass
        elif item is None or not item.strip():
            err = f"{label}: empty or null item_id"
        elif seen[item] > 1:
            err = f"{label}: item_id repeated in the manifest"
        elif uri_list[k] is None or not uri_list[k].strip():
            err = f"{label}: empty or null image_uri"
        elif cap_list[k] is None:
            err = f"{label}: captions is null; use an empty list for an item without captions"
        elif any(c is None for c in cap_list[k]):
            err = f"{label}: null caption inside the captions list"
        elif split_list[k] is not None and split_list[k] not in SPLIT_VALUES:
            err = f"{label}: unknown split {split_list[k]!r}; allowed: {list(SPLIT_VALUES)} or null"
        errors.append(err[:_MAX_REASON])
    bad = [bool(e) for e in errors]
    clean_ids = [(i or "").strip() if b else i for i, b in zip(id_list, bad, strict=True)]
    clean_caps = [[] if b or c is None else c for c, b in zip(cap_list, bad, strict=True)]
    extras = [c for c in table.column_names if c not in (*FIXED_COLUMNS, "manifest_error")]
    return pa.Table.from_arrays(
        [
            pa.array(clean_ids, pa.string()),
            uris.combine_chunks(),
            pa.array(clean_caps, pa.list_(pa.string())),
            labels.combine_chunks(),
            splits.combine_chunks(),
            *[table.column(c) for c in extras],
            pa.array(errors, pa.string()),
        ],
        names=[*FIXED_COLUMNS, *extras, "manifest_error"],
    )


# --------------------------------------------------------------------------------------------
# fingerprints and the catalog


def source_fingerprint(
    size: int | None, etag: str | None, mtime_ns: int | None, image_uri: str, captions: list[str]
) -> str:
    """``s<size>-e<etag>-m<mtime_ns>-c<hash of image URI and captions>``: what a code came from.

    Object metadata stands for the image bytes (a metadata call, no download). ``size is None``
    means the object does not exist (``missing-c...``); such items are always re-encoded.
    """
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    if size is None:
        return f"{index_store.MISSING_PREFIX}c{h}"
    mtime = mtime_ns if mtime_ns is not None else ""
    return f"s{size}-e{(etag or '').strip(chr(34))}-m{mtime}-c{h}"


def unknown_fingerprint(image_uri: str, captions: list[str]) -> str:
    """The fingerprint of an item whose image could not be looked up (the store failed)."""
    h = hashlib.sha256(json.dumps([image_uri, list(captions)]).encode("utf-8")).hexdigest()[:16]
    return f"{index_store.UNKNOWN_PREFIX}c{h}"


def _lookup(uri: str) -> tuple[storage.ObjectInfo | None, str, bool]:
    """``(info, error, transient)`` of one image object; the store's retries are inside."""
    try:
        return storage.info(uri), "", False
    except FileNotFoundError as e:
        return None, f"object not found: {uri} ({e})", False
    except Exception as e:  # noqa: BLE001 - any other failure may pass: the item is kept
        return None, f"cannot look up {uri}: {type(e).__name__}: {e}", True


def chip_fingerprint(
    infos: Sequence[storage.ObjectInfo], image_uri: str, bands: Sequence[str], captions: list[str]
) -> str:
    """``w<bytes>-f<hash of every band file's size, ETag, mtime>-c<hash of URI, bands, captions>``:
    what a chip's code came from. The chip URI holds the window and footprint, so a moved window
    or any changed band file of the scene changes it."""
    files = [[i.size, (i.etag or "").strip(chr(34)), i.mtime_ns] for i in infos]
    f = hashlib.sha256(json.dumps(files).encode("utf-8")).hexdigest()[:16]
    h = hashlib.sha256(json.dumps([image_uri, list(bands), list(captions)]).encode()).hexdigest()
    return f"w{sum(i.size for i in infos)}-f{f}-c{h[:16]}"


def _chip_bands(row_bands: Any, image_uri: str, base_dir: str) -> list[str]:
    """A chip's band files in channel order, resolved against the manifest directory."""
    from duch_core.archive import resolve_image_uri

    if row_bands:
        return [resolve_image_uri(base_dir, str(b)) for b in row_bands]
    return chip_io.chip_files(image_uri)


def fingerprint_batch(batch: pa.Table, base_dir: str, io_threads: int) -> pa.Table:
    """Resolve the image URIs of valid archive rows against ``base_dir`` and fingerprint them.

    A chip row (``image_uri`` with a ``#window=`` fragment, see :mod:`duch_core.chip_io`) is
    looked up through every band file it reads (each file once per batch); it is missing when any
    band file is, and its look-up failed transiently when any look-up did.

    Returns:
        Columns ``item_id``, ``image_uri`` (resolved), ``bands_json`` (a chip's resolved band
        files as a JSON list; "" for image files), ``captions_json`` (JSON list of strings),
        ``fingerprint``, ``size`` (bytes of the image object, -1 when unknown or a chip),
        ``lookup_error`` ("" when the object was found) and ``lookup_transient`` (the look-up
        failed because the store did, not because the object is missing).
    """
    from duch_core.archive import resolve_image_uri

    uris = [resolve_image_uri(base_dir, u) for u in batch.column("image_uri").to_pylist()]
    caps = [list(c or []) for c in batch.column("captions").to_pylist()]
    row_bands = (
        batch.column("bands").to_pylist() if "bands" in batch.column_names else [None] * len(uris)
    )
    chip_bands: list[list[str] | None] = []
    for uri, b in zip(uris, row_bands, strict=True):
        chip_bands.append(_chip_bands(b, uri, base_dir) if chip_io.is_chip_uri(uri) else None)
    targets = sorted(
        {f for b in chip_bands if b for f in b}
        | {u for u, b in zip(uris, chip_bands, strict=True) if b is None}
    )
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        found = dict(zip(targets, pool.map(_lookup, targets), strict=True))
    infos: list[tuple[storage.ObjectInfo | None, str, bool]] = []
    fps = []
    for uri, cap, files in zip(uris, caps, chip_bands, strict=True):
        if files is None:
            info, err, transient = found[uri]
            infos.append((info, err, transient))
            if info is not None:
                fps.append(source_fingerprint(info.size, info.etag, info.mtime_ns, uri, cap))
            elif transient:
                fps.append(unknown_fingerprint(uri, cap))
            else:
                fps.append(source_fingerprint(None, None, None, uri, cap))
            continue
        looked = [found[f] for f in files]
        missing = [e for i, e, t in looked if i is None and not t]
        failed = [e for i, e, t in looked if i is None and t]
        if missing:
            infos.append((None, f"chip {uri}: {missing[0]}", False))
            fps.append(source_fingerprint(None, None, None, uri, cap))
        elif failed:
            infos.append((None, f"chip {uri}: {failed[0]}", True))
            fps.append(unknown_fingerprint(uri, cap))
        else:
            file_infos = [i for i, _, _ in looked if i is not None]
            infos.append((None, "", False))
            fps.append(chip_fingerprint(file_infos, uri, files, cap))
    return pa.table(
        {
            "item_id": batch.column("item_id").cast(pa.string()),
            "image_uri": pa.array(uris, pa.string()),
            "bands_json": pa.array(
                ["" if b is None else json.dumps(b) for b in chip_bands], pa.string()
            ),
            "captions_json": pa.array([json.dumps(c) for c in caps], pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "size": pa.array([i.size if i else -1 for i, _, _ in infos], pa.int64()),
            "lookup_error": pa.array([e for _, e, _ in infos], pa.string()),
            "lookup_transient": pa.array([t for _, _, t in infos], pa.bool_()),
        }
    )


def catalog_table(rows: pa.Table, base_dir: str) -> pa.Table:
    """Valid archive rows as catalog rows: image URIs resolved, ``manifest_error`` dropped."""
    from duch_core.archive import resolve_image_uri

    uris = [resolve_image_uri(base_dir, u) for u in rows.column("image_uri").to_pylist()]
    out = rows.drop_columns(["manifest_error"]) if "manifest_error" in rows.column_names else rows
    out = out.set_column(1, "image_uri", pa.array(uris, pa.string()))
    if "bands" in out.column_names and pa.types.is_list(out.schema.field("bands").type):
        bands = [
            None if b is None else [resolve_image_uri(base_dir, str(f)) for f in b]
            for b in out.column("bands").to_pylist()
        ]
        pos = out.column_names.index("bands")
        out = out.set_column(pos, "bands", pa.array(bands, pa.list_(pa.string())))
    return out


def prepare_batch(
    batch: pa.Table, base_dir: str, io_threads: int, version_dir: str | None
) -> pa.Table:
    """Archive rows -> checked, catalogued and fingerprinted items (:data:`ITEM_COLUMNS`).

    Valid rows (:func:`normalize_rows`) are written as one catalog part of the version at
    ``version_dir`` (none when it is ``None``, a dry run) and fingerprinted
    (:func:`fingerprint_batch`); bad rows come out with their ``manifest_error`` and nothing
    else. ``catalog_path`` names the part holding each valid row; the first valid row also
    carries the part's entry for ``index.json`` in ``catalog_part`` (JSON; "" elsewhere).
    """
    rows = normalize_rows(batch)
    ok = pc.equal(rows.column("manifest_error"), "")
    good = rows.filter(ok)
    bad = rows.filter(pc.invert(ok))
    part_path, part_json = "", ""
    if version_dir is not None and good.num_rows:
        part = catalog_snapshot.write_catalog_part(version_dir, catalog_table(good, base_dir))
        part_path, part_json = part.path, json.dumps(part.to_dict())
    fp = fingerprint_batch(good, base_dir, io_threads)
    n_good, n_bad = good.num_rows, bad.num_rows
    good_out = fp.append_column("manifest_error", pa.array([""] * n_good, pa.string()))
    good_out = good_out.append_column("catalog_path", pa.array([part_path] * n_good, pa.string()))
    good_out = good_out.append_column(
        "catalog_part", pa.array([part_json] + [""] * (n_good - 1) if n_good else [], pa.string())
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
    """Fetch, decode and preprocess the images of a :func:`fingerprint_batch` batch (CPU).

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
        if chip_io.is_chip_uri(uris[i]):  # a window of a scene: read and decoded here
            row = {"image_uri": uris[i], "bands": json.loads(bands[i]) if bands[i] else None}
            try:
                return chip_io.decode_chip(row, max_pixels=max_pixels, **options), "", "", False
            except chip_io.SceneError as e:
                if chip_io.is_transient(e):
                    return None, "fetch", f"chip {uris[i]}: {e}", True
                return None, "decode", f"chip {uris[i]}: {e}", False
            except Exception as e:  # noqa: BLE001 - any other failure is this item's error
                return None, "decode", f"chip {uris[i]}: {type(e).__name__}: {e}", False
        data, reason, transient = fetch_image(uris[i], int(sizes[i]))
        return data, ("fetch" if data is None else ""), reason, transient

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        fetched = list(pool.map(fetch, range(n)))
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
