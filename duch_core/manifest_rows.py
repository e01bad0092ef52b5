"""Archive manifest rows: read JSON-lines manifests and check every row, a bad row never an error.

A manifest is read in batches (Parquet parts or JSON-lines files); a manifest whose columns
cannot hold an archive is refused whole (:func:`check_manifest_schema`), while a row that is not
valid (a line that is not JSON, a null id, an unknown split, an id repeated in the batch) is kept
with the reason in ``manifest_error`` (:func:`parse_manifest_bytes`, :func:`normalize_rows`) so
the encode job can count it against its error budget and report it.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from duch_core import storage, storage_retry

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


def parquet_parts(path: str) -> list[str]:
    """The Parquet file of a manifest, or the parts of a manifest that is a directory of them
    (as the tiling job writes ``manifest.parquet/``)."""
    from duch_core.archive import PARQUET_SUFFIXES

    parts = [p for p in storage.list_prefix(path) if p.lower().endswith(PARQUET_SUFFIXES)]
    return parts or [path]


def parquet_manifest_rows(path: str) -> int:
    """Rows of a Parquet manifest (a file or a directory of parts), read from the footers, with
    every part's columns checked (:func:`check_manifest_schema`).

    Raises:
        ArchiveError: a part is missing, not readable Parquet, or its columns cannot hold an
            archive (a manifest-level error).
    """
    import pyarrow.parquet as pq

    from duch_core.archive import ArchiveError

    total = 0
    for part in parquet_parts(path):

        def footer(part: str = part) -> Any:
            with storage.open_input(part) as f:
                return pq.ParquetFile(f).metadata

        try:
            meta = storage_retry.retrying(footer, part, "read the manifest's footer")
        except FileNotFoundError as e:
            raise ArchiveError(f"{part}: archive manifest not found") from e
        except (pa.ArrowException, ValueError) as e:
            raise ArchiveError(f"{part}: not a readable Parquet manifest (truncated?): {e}") from e
        check_manifest_schema(meta.schema.to_arrow_schema(), part)
        total += int(meta.num_rows)
    return total
