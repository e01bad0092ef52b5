"""Importers: public caption-dataset formats to archive tables (:mod:`duch_core.archive`).

Two formats are read:

* **Karpathy-style JSON** (UCM-Captions, Sydney-Captions, RSICD):
  ``{"dataset": ..., "images": [{"filename", "filepath"?, "imgid", "split",
  "sentences": [{"raw", "tokens"}, ...]}, ...]}``.
* **precomp text files** (RSITMD, RSICD ``*_precomp``): ``<split>_filename.txt`` and
  ``<split>_caps.txt`` with one entry per line, in either layout: one filename line per caption
  line (consecutive or not), or one filename line per image followed in ``*_caps.txt`` by a fixed
  number of caption lines per image, in the same order.

Item ids are the image paths as the dataset names them (``1.tif``, ``baseballfield_452.tif``).
Class labels (used only for evaluation; docs/method.md §7.3):

* UCM: image ``N.tif`` is class ``(N - 1) // 100`` of :data:`UCM_CLASSES` (alphabetical).
* RSITMD / RSICD: the filename prefix before ``_<number>`` (``baseballfield_452.tif`` ->
  ``baseballfield``).
* A JSON that carries ``classname`` per image: that name.
* Sydney: no labels.

Every importer writes the paper split (:func:`duch_core.splits.paper_split`) into ``split``
unless ``split_seed`` is ``None``, and keeps the dataset's own split as ``source_split``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from duch_core import storage
from duch_core.archive import (
    ArchiveError,
    ArchiveSummary,
    manifest_dir,
    summarize_archive,
    validate_archive,
    write_archive,
)
from duch_core.splits import split_column

UCM_CLASSES: tuple[str, ...] = (
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
)
"""The 21 UC Merced Land Use classes in alphabetical order (class index = ``(N - 1) // 100``)."""

LABEL_RULES: tuple[str, ...] = ("auto", "ucm", "prefix", "classname", "none")

_PREFIX = re.compile(r"^(?:.*/)?([A-Za-z][A-Za-z0-9 ]*?)_\d+\.[A-Za-z0-9]+$")
_UCM_NAME = re.compile(r"^(?:.*/)?(\d+)\.[A-Za-z0-9]+$")


# --------------------------------------------------------------------------------------------
# labels


def ucm_label(filename: str) -> str:
    """UC Merced class of ``N.tif`` (``1001.tif`` -> ``harbor``).

    Raises:
        ArchiveError: the name is not ``<N>.<ext>`` with ``1 <= N <= 2100``.
    """
    m = _UCM_NAME.match(filename)
    n = int(m.group(1)) if m else 0
    if not 1 <= n <= 100 * len(UCM_CLASSES):
        raise ArchiveError(
            f"UCM label rule needs file names 1.tif .. {100 * len(UCM_CLASSES)}.tif, got {filename!r}"
        )
    return UCM_CLASSES[(n - 1) // 100]


def prefix_label(filename: str) -> str | None:
    """Class from a ``<class>_<number>.<ext>`` file name; ``None`` when it has no such prefix."""
    m = _PREFIX.match(filename)
    return m.group(1) if m else None


def _labels(
    rule: str, names: list[str], classnames: list[Any], dataset: str, where: str
) -> list[str | None]:
    if rule not in LABEL_RULES:
        raise ArchiveError(f"unknown label rule {rule!r}; choose one of {LABEL_RULES}")
    if rule == "auto":
        ds = dataset.lower()
        if classnames and all(isinstance(c, str) and c for c in classnames):
            rule = "classname"
        elif ds in ("ucm", "ucm_captions", "ucmerced"):
            rule = "ucm"
        elif ds.startswith("sydney"):
            rule = "none"
        elif names and all(prefix_label(n) is not None for n in names):
            rule = "prefix"
        else:
            rule = "none"
    if rule == "none":
        return [None] * len(names)
    if rule == "ucm":
        return [ucm_label(n) for n in names]
    if rule == "prefix":
        return [prefix_label(n) for n in names]
    if len(classnames) != len(names) or not all(isinstance(c, str) and c for c in classnames):
        raise ArchiveError(f"{where}: label rule 'classname' needs a 'classname' on every image")
    return [str(c) for c in classnames]


def _finish(
    rows: dict[str, list[Any]],
    where: str,
    split_seed: int | None,
    train_frac: float,
    query_frac: float,
) -> pa.Table:
    ids = rows["item_id"]
    table = pa.table(
        {
            "item_id": pa.array(ids, pa.string()),
            "image_uri": pa.array(rows["image_uri"], pa.string()),
            "captions": pa.array(rows["captions"], pa.list_(pa.string())),
            "label": pa.array(rows["label"], pa.string()),
            "split": pa.nulls(len(ids), pa.string()),
            **{
                k: pa.array(v)
                for k, v in rows.items()
                if k not in ("item_id", "image_uri", "captions", "label", "split")
            },
        }
    )
    table = validate_archive(table, where=where)  # ids checked (and named) before splitting
    return _with_split(table, where, split_seed, train_frac, query_frac)


def _with_split(
    table: pa.Table, where: str, split_seed: int | None, train_frac: float, query_frac: float
) -> pa.Table:
    if split_seed is None:
        return table
    try:
        col = split_column(table.column("item_id").to_pylist(), split_seed, train_frac, query_frac)
    except ValueError as e:
        raise ArchiveError(f"{where}: {e}") from e
    return table.set_column(
        table.schema.get_field_index("split"), "split", pa.array(col, pa.string())
    )


def _image_uri(image_root: str | None, rel: str) -> str:
    return storage.join(image_root, rel) if image_root else rel


# --------------------------------------------------------------------------------------------
# Karpathy-style JSON


def import_karpathy(
    json_path: str,
    image_root: str | None,
    labels: str = "auto",
    split_seed: int | None = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
) -> pa.Table:
    """Read a Karpathy-style caption JSON into an archive table.

    Args:
        json_path: the JSON file (local or ``s3://``).
        image_root: directory/prefix holding the images; ``image_uri = image_root/filepath/
            filename``. ``None`` leaves the dataset's relative paths (relative to wherever the
            manifest will be written).
        labels: ``auto`` (``classname`` if present, else UCM rule for ``"dataset": "UCM"``, none
            for Sydney, else the filename prefix when every name has one), or one of ``ucm``,
            ``prefix``, ``classname``, ``none``.
        split_seed: seed of the paper split written to ``split``; ``None`` leaves it null.
        train_frac, query_frac: split fractions (paper: 0.5 / 0.1).

    Returns:
        Archive table; metadata columns ``source_split`` (the JSON's own split, or null) and
        ``source_imgid`` (the JSON's ``imgid``, or null). Captions are the ``raw`` sentences with
        surrounding whitespace removed (``tokens`` joined by spaces when ``raw`` is missing);
        blank sentences are dropped; an image may end up with no captions.

    Raises:
        ArchiveError: unreadable or malformed JSON, an entry without a file name or with a
            malformed ``sentences`` list (the message names the entry), duplicate file names.
    """
    try:
        raw = storage.read_bytes(json_path)
    except FileNotFoundError as e:
        raise ArchiveError(f"{json_path}: caption file not found") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ArchiveError(
            f"{json_path}: expected a Karpathy-style object with an 'images' list at the top level"
        )
    rows: dict[str, list[Any]] = {
        "item_id": [],
        "image_uri": [],
        "captions": [],
        "label": [],
        "source_split": [],
        "source_imgid": [],
    }
    classnames: list[Any] = []
    for i, entry in enumerate(doc["images"]):
        if not isinstance(entry, dict):
            raise ArchiveError(f"{json_path}: images[{i}] must be an object")
        name = entry.get("filename")
        if not isinstance(name, str) or not name.strip():
            raise ArchiveError(f"{json_path}: images[{i}] has no 'filename'")
        folder = entry.get("filepath")
        rel = f"{folder.strip('/')}/{name}" if isinstance(folder, str) and folder else name
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise ArchiveError(f"{json_path}: images[{i}] ({name}) has no 'sentences' list")
        caps: list[str] = []
        for j, s in enumerate(sentences):
            text: Any = s.get("raw") if isinstance(s, dict) else None
            if text is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                text = " ".join(str(t) for t in s["tokens"])
            if not isinstance(text, str):
                raise ArchiveError(
                    f"{json_path}: images[{i}] ({name}) sentences[{j}] has neither 'raw' text "
                    "nor 'tokens'"
                )
            if text.strip():
                caps.append(text.strip())
        split = entry.get("split")
        imgid = entry.get("imgid")
        rows["item_id"].append(rel)
        rows["image_uri"].append(_image_uri(image_root, rel))
        rows["captions"].append(caps)
        rows["source_split"].append(split if isinstance(split, str) else None)
        rows["source_imgid"].append(imgid if isinstance(imgid, int) else None)
        classnames.append(entry.get("classname"))
    if not any(c is not None for c in classnames):
        classnames = []
    dataset = doc.get("dataset") if isinstance(doc.get("dataset"), str) else ""
    rows["label"] = _labels(labels, rows["item_id"], classnames, str(dataset), json_path)
    return _finish(rows, json_path, split_seed, train_frac, query_frac)


# --------------------------------------------------------------------------------------------
# precomp text files


def _lines(uri: str) -> list[str]:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError as e:
        raise ArchiveError(f"{uri}: file not found") from e
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{uri}: not UTF-8 text ({e})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def import_precomp(
    dir: str,
    split: str,
    image_root: str | None,
    labels: str = "prefix",
    split_seed: int | None = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
) -> pa.Table:
    """Read ``<dir>/<split>_filename.txt`` + ``<dir>/<split>_caps.txt`` into an archive table.

    Args:
        dir: directory/prefix of the precomp files.
        split: file prefix (``train``, ``val``, ``test``); kept as ``source_split``.
        image_root: directory/prefix holding the images (``None``: relative file names).
        labels: ``prefix`` (default; RSITMD/RSICD), ``ucm``, ``none`` or ``auto``.
        split_seed, train_frac, query_frac: see :func:`import_karpathy`.

    Returns:
        Archive table, items in the order of their first appearance in ``*_filename.txt``.

    Raises:
        ArchiveError: missing files, a blank file name line, line counts that fit neither layout,
            or (in the per-image layout) a repeated file name.
    """
    names_uri = storage.join(dir, f"{split}_filename.txt")
    caps_uri = storage.join(dir, f"{split}_caps.txt")
    names, caps = _lines(names_uri), _lines(caps_uri)
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise ArchiveError(f"{names_uri}: blank file name on line(s) {blank[:5]}")
    grouped: dict[str, list[str]] = {}
    if len(caps) == len(names):  # one filename line per caption line
        for n, c in zip(names, caps, strict=True):
            grouped.setdefault(n, []).append(c)
    elif names and len(caps) % len(names) == 0:  # a fixed number of captions per image
        per = len(caps) // len(names)
        for i, n in enumerate(names):
            if n in grouped:
                raise ArchiveError(
                    f"{names_uri}: {n!r} is listed twice (line {names.index(n) + 1} and {i + 1}) "
                    f"but {caps_uri} has {per} captions per file name line"
                )
            grouped[n] = caps[i * per : (i + 1) * per]
    else:
        raise ArchiveError(
            f"{dir}: {len(names)} file name lines and {len(caps)} caption lines fit neither "
            "layout (one file name per caption line, or the same number of captions per image)"
        )
    rows: dict[str, list[Any]] = {
        "item_id": list(grouped),
        "image_uri": [_image_uri(image_root, n) for n in grouped],
        "captions": [[c for c in cs if c] for cs in grouped.values()],
        "source_split": [split] * len(grouped),
    }
    rows["label"] = _labels(labels, rows["item_id"], [], "", dir)
    return _finish(rows, dir, split_seed, train_frac, query_frac)


# --------------------------------------------------------------------------------------------
# source detection and manifest writing


def precomp_splits(dir: str) -> list[str]:
    """The splits that have both precomp files in ``dir``, in train/val/test order."""
    return [
        s
        for s in ("train", "val", "test")
        if storage.exists(storage.join(dir, f"{s}_filename.txt"))
        and storage.exists(storage.join(dir, f"{s}_caps.txt"))
    ]


def import_source(
    source: str,
    image_root: str | None = None,
    labels: str = "auto",
    split_seed: int | None = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
    splits: Sequence[str] | None = None,
) -> pa.Table:
    """Import a dataset given as a Karpathy JSON file or a directory of precomp files.

    A directory with ``dataset.json`` is read as Karpathy JSON. A precomp directory gives one
    archive over all its splits (``splits``, or every split found); the paper split is drawn over
    the union.

    Raises:
        ArchiveError: nothing importable at ``source``, or the importers' errors.
    """
    if source.lower().endswith(".json"):
        return import_karpathy(source, image_root, labels, split_seed, train_frac, query_frac)
    candidate = storage.join(source, "dataset.json")
    if storage.exists(candidate):
        return import_karpathy(candidate, image_root, labels, split_seed, train_frac, query_frac)
    found = list(splits) if splits else precomp_splits(source)
    if not found:
        raise ArchiveError(
            f"{source}: no Karpathy JSON (*.json, dataset.json) and no precomp files "
            "(<split>_filename.txt + <split>_caps.txt)"
        )
    rule = "prefix" if labels == "auto" else labels
    parts = [import_precomp(source, s, image_root, rule, None) for s in found]
    table = validate_archive(pa.concat_tables(parts), where=source)
    return _with_split(table, source, split_seed, train_frac, query_frac)


def write_manifest(
    table: pa.Table, out_uri: str, check_images: bool = False
) -> tuple[str, ArchiveSummary]:
    """Write an imported table as an archive manifest and summarise it.

    Args:
        table: an archive table (from an importer).
        out_uri: the manifest to write (``.parquet`` or a JSON-lines suffix).
        check_images: look up every image file and list the missing ones in the summary.

    Returns:
        ``(out_uri, summary)``: counts of items, captions, items without captions, classes,
        splits and (when checked) missing images.
    """
    summary = summarize_archive(table, check_images=check_images, base_dir=manifest_dir(out_uri))
    write_archive(table, out_uri)
    return out_uri, summary
