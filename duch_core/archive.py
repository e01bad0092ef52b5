"""Archive manifests: the rows that define an image-caption archive.

An archive manifest is a Parquet file (``*.parquet``) or JSON lines (``*.jsonl``, ``*.json-lines``,
``*.jsonlines``, ``*.ndjson``: one JSON object per line), local or on S3, with one row per image:

===========  ===================  ==============================================================
column       type                 meaning
===========  ===================  ==============================================================
item_id      string, required     stable, unique, non-empty id; identifies the item everywhere
image_uri    string, required     local path or ``s3://`` URI; a relative path is relative to the
                                  manifest's directory
captions     list<string>, req.   the item's captions; may be empty (the item has no text side)
label        string, nullable     class label, used only for evaluation (relevance = same label)
split        string, nullable     ``train`` / ``query`` / ``database`` (the paper protocol), or null
...          any                  free metadata (sensor, acquisition time, bounds, ...), kept as is
===========  ===================  ==============================================================

:func:`read_archive` validates and normalises a manifest and resolves relative image paths;
:func:`write_archive` validates and writes one. Integer ids and labels are accepted and stored as
their decimal strings. All I/O goes through :mod:`duch_core.storage`.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from duch_core import storage

ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=True),
    ]
)
"""The fixed columns of every archive, in order; free metadata columns follow them."""

REQUIRED_COLUMNS: tuple[str, ...] = ("item_id", "image_uri", "captions")
SPLIT_VALUES: tuple[str, ...] = ("train", "query", "database")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json-lines", ".jsonlines", ".ndjson")
DEFAULT_MANIFEST_NAMES: tuple[str, ...] = ("manifest.parquet", "manifest.jsonl")

_MAX_LISTED = 5


class ArchiveError(ValueError):
    """An archive manifest is missing, unreadable or invalid. The message names the rows."""


# --------------------------------------------------------------------------------------------
# paths


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _has_scheme(uri: str) -> bool:
    return _SCHEME.match(uri) is not None


def manifest_dir(uri: str) -> str:
    """The directory (or S3 prefix) a manifest lives in; relative image paths start there."""
    if _has_scheme(uri):
        head, _, _ = uri.rpartition("/")
        return head
    return os.path.dirname(os.path.abspath(uri))


def resolve_image_uri(base_dir: str, image_uri: str) -> str:
    """Resolve one ``image_uri`` against a manifest directory.

    URIs with a scheme (``s3://``, ``file://``) and absolute local paths are returned unchanged;
    anything else is joined to ``base_dir``.
    """
    if _has_scheme(image_uri) or os.path.isabs(image_uri):
        return image_uri
    return storage.join(base_dir, image_uri)


def _format_of(uri: str) -> str | None:
    low = uri.lower().rstrip("/")
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


# --------------------------------------------------------------------------------------------
# validation


def _rows(mask: Sequence[bool] | pa.Array) -> list[int]:
    values = mask.to_pylist() if isinstance(mask, pa.Array | pa.ChunkedArray) else list(mask)
    return [i for i, bad in enumerate(values) if bad]


def _listed(rows: list[int]) -> str:
    more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"{rows[:_MAX_LISTED]}{more}"


def _as_string(col: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    if pa.types.is_integer(t) or pa.types.is_null(t) or pa.types.is_dictionary(t):
        return col.cast(pa.string())
    raise ArchiveError(f"{where}: column {name!r} must hold strings, got type {t}")


def _as_captions(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ArchiveError(
            f"{where}: column 'captions' must be a list of strings per row (an empty list when "
            f"an item has none), got type {t}"
        )
    vt = t.value_type
    if not (pa.types.is_string(vt) or pa.types.is_large_string(vt) or pa.types.is_null(vt)):
        raise ArchiveError(f"{where}: 'captions' must be lists of strings, got lists of {vt}")
    col = col.cast(pa.list_(pa.string()))
    null_rows = _rows(pc.is_null(col))
    if null_rows:
        raise ArchiveError(
            f"{where}: 'captions' is null in rows {_listed(null_rows)}; use an empty list for an "
            "item without captions"
        )
    flat_null = pc.is_null(pc.list_flatten(col))
    if pc.any(flat_null).as_py():
        per_row = pc.list_value_length(col).to_pylist()
        bad, pos = [], 0
        flags = flat_null.to_pylist()
        for i, n in enumerate(per_row):
            if any(flags[pos : pos + n]):
                bad.append(i)
            pos += n
        raise ArchiveError(f"{where}: null caption inside the list in rows {_listed(bad)}")
    return col


def validate_archive(table: pa.Table, where: str = "archive") -> pa.Table:
    """Check and normalise an archive table.

    Args:
        table: the manifest rows.
        where: a name for error messages (e.g. the manifest URI).

    Returns:
        The table with :data:`ARCHIVE_SCHEMA` columns first (``label`` and ``split`` added as
        nulls when absent), ids/labels as strings, captions as ``list<string>``, then the
        metadata columns in their original order.

    Raises:
        ArchiveError: missing required columns, wrong types, empty or null ids, duplicate ids,
            empty image URIs, null captions, or unknown split names. The message names the rows
            (0-based row numbers).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ArchiveError(
            f"{where}: missing required column(s) {missing}; found {table.column_names}"
        )
    dup_cols = [c for c, n in Counter(table.column_names).items() if n > 1]
    if dup_cols:
        raise ArchiveError(f"{where}: duplicated column names {dup_cols}")

    ids = _as_string(table.column("item_id"), "item_id", where)
    bad = _rows(
        pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_trim_whitespace(ids), "")).fill_null(True)
    )
    if bad:
        raise ArchiveError(f"{where}: empty or null item_id in rows {_listed(bad)}")
    id_list = ids.to_pylist()
    if len(set(id_list)) != len(id_list):
        first: dict[str, int] = {}
        dups: list[str] = []
        for i, item in enumerate(id_list):
            if item in first:
                dups.append(f"{item!r} (rows {first[item]} and {i})")
            else:
                first[item] = i
        more = f" and {len(dups) - _MAX_LISTED} more" if len(dups) > _MAX_LISTED else ""
        raise ArchiveError(
            f"{where}: item_id must be unique; duplicated: {', '.join(dups[:_MAX_LISTED])}{more}"
        )

    uris = _as_string(table.column("image_uri"), "image_uri", where)
    bad = _rows(
        pc.or_kleene(pc.is_null(uris), pc.equal(pc.utf8_trim_whitespace(uris), "")).fill_null(True)
    )
    if bad:
        raise ArchiveError(f"{where}: empty or null image_uri in rows {_listed(bad)}")

    captions = _as_captions(table.column("captions"), where)

    n = table.num_rows
    if "label" in table.column_names:
        labels = _as_string(table.column("label"), "label", where)
    else:
        labels = pa.chunked_array([pa.nulls(n, pa.string())])
    if "split" in table.column_names:
        splits = _as_string(table.column("split"), "split", where)
        ok = pc.or_kleene(pc.is_null(splits), pc.is_in(splits, pa.array(SPLIT_VALUES)))
        bad = _rows(pc.invert(ok.fill_null(True)))
        if bad:
            values = sorted({str(splits[i].as_py()) for i in bad})
            raise ArchiveError(
                f"{where}: unknown split name(s) {values} in rows {_listed(bad)}; "
                f"allowed: {list(SPLIT_VALUES)} or null"
            )
    else:
        splits = pa.chunked_array([pa.nulls(n, pa.string())])

    fixed = [ids, uris, captions, labels, splits]
    extra = [c for c in table.column_names if c not in ARCHIVE_SCHEMA.names]
    return pa.Table.from_arrays(
        fixed + [table.column(c) for c in extra],
        schema=pa.schema(list(ARCHIVE_SCHEMA) + [table.schema.field(c) for c in extra]),
    )


# --------------------------------------------------------------------------------------------
# reading and writing


def parse_manifest_line(line: str, where: str) -> dict[str, Any] | None:
    """One line of a JSON-lines manifest as a dict; ``None`` for a blank line.

    Raises:
        ArchiveError: the line is not valid JSON or not a JSON object (``where`` names it).
    """
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ArchiveError(f"{where} is not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise ArchiveError(f"{where} must be a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(uri: str) -> pa.Table:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{uri}: not UTF-8 text ({e})") from e
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        obj = parse_manifest_line(line, f"{uri}: line {lineno}")
        if obj is not None:
            rows.append(obj)
    if not rows:
        return pa.table(
            {c: pa.array([], type=ARCHIVE_SCHEMA.field(c).type) for c in REQUIRED_COLUMNS}
        )
    for i, r in enumerate(rows):
        caps = r.get("captions")
        if caps is not None and not isinstance(caps, list):
            raise ArchiveError(
                f"{uri}: row {i} (line of item {r.get('item_id')!r}): 'captions' must be a JSON "
                f"list of strings, got {type(caps).__name__}"
            )
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ArchiveError(f"{uri}: inconsistent value types across rows ({e})") from e


def _find_manifest(uri: str) -> tuple[str, str]:
    fmt = _format_of(uri)
    if fmt is not None:
        return uri, fmt
    for name in DEFAULT_MANIFEST_NAMES:
        candidate = storage.join(uri, name)
        if storage.exists(candidate):
            return candidate, str(_format_of(candidate))
    latest = storage.join(uri, "LATEST")
    if storage.exists(latest):  # the output root of the tiling job: its published version
        version = storage.read_bytes(latest).decode("utf-8", "replace").strip()
        candidate = storage.join(uri, "versions", version, "manifest.parquet")
        if version and storage.exists(candidate):
            return candidate, "parquet"
        raise ArchiveError(
            f"{uri}: LATEST names version {version!r}, which holds no manifest.parquet"
        )
    raise ArchiveError(
        f"{uri}: not an archive manifest: expected a file ending in "
        f"{PARQUET_SUFFIXES + JSONL_SUFFIXES} or a directory holding one of {DEFAULT_MANIFEST_NAMES}"
    )


def read_archive(uri: str, resolve_images: bool = True) -> pa.Table:
    """Read, validate and normalise an archive manifest.

    Args:
        uri: the manifest (Parquet or JSON lines, local or ``s3://``; Parquet may be a
            directory of parts), a directory/prefix holding ``manifest.parquet`` or
            ``manifest.jsonl``, or the output root of the tiling job (its ``LATEST`` version).
        resolve_images: turn relative ``image_uri`` values into full paths/URIs, relative to the
            manifest's directory.

    Returns:
        The archive table (:func:`validate_archive`).

    Raises:
        ArchiveError: no such manifest, unreadable file, or invalid rows.
    """
    path, fmt = _find_manifest(uri)
    try:
        table = storage.read_parquet(path) if fmt == "parquet" else _read_jsonl(path)
    except ArchiveError:
        raise
    except FileNotFoundError as e:
        raise ArchiveError(f"{path}: archive manifest not found") from e
    except PermissionError:
        raise
    except (OSError, pa.ArrowException, storage.StorageError) as e:
        raise ArchiveError(f"{path}: not a readable {fmt} manifest ({e})") from e
    table = validate_archive(table, where=path)
    if resolve_images and table.num_rows:
        table = resolve_locations(table, manifest_dir(path))
    return table


def resolve_locations(table: pa.Table, base_dir: str) -> pa.Table:
    """``image_uri`` and, for chips, every ``bands`` file (:mod:`duch_core.chip_io`) resolved
    against the manifest's directory (:func:`resolve_image_uri`)."""
    uris = [resolve_image_uri(base_dir, u) for u in table.column("image_uri").to_pylist()]
    pos = table.column_names.index("image_uri")
    field = table.schema.field(pos).with_type(pa.string())  # keeps the column's nullability
    table = table.set_column(pos, field, pa.array(uris, pa.string()))
    if "bands" in table.column_names and pa.types.is_list(table.schema.field("bands").type):
        bands = [
            None if b is None else [resolve_image_uri(base_dir, str(f)) for f in b]
            for b in table.column("bands").to_pylist()
        ]
        pos = table.column_names.index("bands")
        table = table.set_column(pos, "bands", pa.array(bands, pa.list_(pa.string())))
    return table


def _to_table(
    table_or_rows: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
) -> pa.Table:
    if isinstance(table_or_rows, pa.Table):
        return table_or_rows
    try:
        if isinstance(table_or_rows, Mapping):
            return pa.table(dict(table_or_rows))
        return pa.Table.from_pylist([dict(r) for r in table_or_rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise ArchiveError(f"cannot build an archive table from the given rows ({e})") from e


def write_archive(
    table_or_rows: pa.Table | Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    uri: str,
) -> str:
    """Validate rows and write them as an archive manifest.

    Args:
        table_or_rows: a ``pyarrow.Table``, a list of row dicts, or a dict of columns.
        uri: destination; the format follows the suffix (``.parquet``/``.pq`` or a JSON-lines
            suffix). ``image_uri`` values are written as given (relative paths stay relative to
            the manifest's directory).

    Returns:
        ``uri``.

    Raises:
        ArchiveError: invalid rows or an unknown suffix.
    """
    fmt = _format_of(uri)
    if fmt is None:
        raise ArchiveError(f"{uri}: archive manifests end in {PARQUET_SUFFIXES + JSONL_SUFFIXES}")
    table = validate_archive(_to_table(table_or_rows), where=uri)
    if fmt == "parquet":
        storage.write_parquet(uri, table)
    else:
        buf = io.StringIO()
        for row in table.to_pylist():
            buf.write(json.dumps(row, ensure_ascii=False, default=str))
            buf.write("\n")
        storage.write_bytes(uri, buf.getvalue().encode("utf-8"))
    return uri


# --------------------------------------------------------------------------------------------
# summary


@dataclass(frozen=True)
class ArchiveSummary:
    """Counts that describe an archive; what an importer reports."""

    n_items: int
    n_captions: int
    empty_caption_items: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    images_checked: bool = False

    def lines(self) -> list[str]:
        """Human-readable report lines."""
        out = [
            f"items: {self.n_items}",
            f"captions: {self.n_captions}",
            f"items without captions: {len(self.empty_caption_items)}"
            + (
                f" (e.g. {self.empty_caption_items[:_MAX_LISTED]})"
                if self.empty_caption_items
                else ""
            ),
            f"classes: {len(self.labels)}",
            f"splits: {self.splits}",
        ]
        if self.images_checked:
            out.append(
                f"missing image files: {len(self.missing_images)}"
                + (f" (e.g. {self.missing_images[:_MAX_LISTED]})" if self.missing_images else "")
            )
        return out


def missing_images(table: pa.Table, base_dir: str | None = None, workers: int = 16) -> list[str]:
    """Item ids whose image file does not exist (checked through storage, concurrently).

    Args:
        table: archive rows.
        base_dir: resolve relative ``image_uri`` values against this directory (the manifest's);
            ``None`` checks them as given.
        workers: concurrent look-ups (useful on S3).
    """
    ids = table.column("item_id").to_pylist()
    uris = table.column("image_uri").to_pylist()
    if base_dir is not None:
        uris = [resolve_image_uri(base_dir, u) for u in uris]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(storage.exists, uris))
    return [i for i, ok in zip(ids, found, strict=True) if not ok]


def summarize_archive(
    table: pa.Table, check_images: bool = False, base_dir: str | None = None
) -> ArchiveSummary:
    """Count items, captions, items without captions, labels and splits of a validated table.

    Args:
        table: an archive table (as returned by :func:`read_archive` or an importer).
        check_images: also look up every ``image_uri`` and list the items whose file is missing.
        base_dir: directory that relative ``image_uri`` values are relative to (see
            :func:`missing_images`).
    """
    table = validate_archive(table)
    lengths = pc.list_value_length(table.column("captions")).to_pylist()
    ids = table.column("item_id").to_pylist()
    labels = Counter(v for v in table.column("label").to_pylist() if v is not None)
    splits = Counter(v for v in table.column("split").to_pylist() if v is not None)
    return ArchiveSummary(
        n_items=table.num_rows,
        n_captions=int(sum(lengths)),
        empty_caption_items=[i for i, n in zip(ids, lengths, strict=True) if n == 0],
        missing_images=missing_images(table, base_dir) if check_images else [],
        labels=dict(sorted(labels.items())),
        splits={s: splits[s] for s in SPLIT_VALUES if s in splits},
        images_checked=check_images,
    )
