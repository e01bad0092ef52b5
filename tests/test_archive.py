"""Archive manifests: round trips (local Parquet/JSONL, real S3), path resolution, validation."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from duch_core import storage
from duch_core.archive import (
    ARCHIVE_SCHEMA,
    ArchiveError,
    read_archive,
    summarize_archive,
    validate_archive,
    write_archive,
)

ROWS = [
    {
        "item_id": "a",
        "image_uri": "images/a.png",
        "captions": ["a river", "a stream"],
        "label": "river",
        "split": "train",
        "sensor": "rgb",
    },
    {
        "item_id": "b",
        "image_uri": "s3://other-bucket/b.tif",
        "captions": [],
        "label": None,
        "split": None,
        "sensor": "nir",
    },
    {
        "item_id": "c",
        "image_uri": "/abs/c.jpg",
        "captions": ["a beach"],
        "label": "beach",
        "split": "query",
        "sensor": None,
    },
]


@pytest.mark.parametrize("name", ["manifest.parquet", "manifest.jsonl", "m.json-lines"])
def test_local_round_trip(tmp_path, name):
    uri = str(tmp_path / "arch" / name)
    assert write_archive(ROWS, uri) == uri
    t = read_archive(uri)
    assert t.schema.names[:5] == ARCHIVE_SCHEMA.names and "sensor" in t.schema.names
    assert t.column("item_id").to_pylist() == ["a", "b", "c"]
    assert t.column("captions").to_pylist() == [["a river", "a stream"], [], ["a beach"]]
    assert t.column("label").to_pylist() == ["river", None, "beach"]
    assert t.column("split").to_pylist() == ["train", None, "query"]
    assert t.column("sensor").to_pylist() == ["rgb", "nir", None]
    # relative paths resolve against the manifest's directory; URIs and absolute paths stay
    assert t.column("image_uri").to_pylist() == [
        os.path.join(str(tmp_path / "arch"), "images/a.png"),
        "s3://other-bucket/b.tif",
        "/abs/c.jpg",
    ]
    raw = read_archive(uri, resolve_images=False)
    assert raw.column("image_uri").to_pylist()[0] == "images/a.png"


def test_directory_and_table_inputs(tmp_path):
    table = pa.table(
        {
            "item_id": [1, 2],  # integers become strings
            "image_uri": ["x.png", "y.png"],
            "captions": [["one"], ["two", "three"]],
            "label": [7, 8],
        }
    )
    write_archive(table, str(tmp_path / "manifest.parquet"))
    t = read_archive(str(tmp_path))  # a directory holding manifest.parquet
    assert t.column("item_id").to_pylist() == ["1", "2"]
    assert t.column("label").to_pylist() == ["7", "8"]
    assert t.column("split").null_count == 2  # added as nulls
    assert t.schema.field("captions").type == pa.list_(pa.string())


def test_s3_round_trip(s3_prefix):
    uri = storage.join(s3_prefix, "arch", "manifest.parquet")
    write_archive(ROWS, uri)
    t = read_archive(uri)
    assert t.column("image_uri").to_pylist() == [
        storage.join(s3_prefix, "arch", "images/a.png"),
        "s3://other-bucket/b.tif",
        "/abs/c.jpg",
    ]
    assert t.column("captions").to_pylist()[1] == []
    jl = storage.join(s3_prefix, "arch", "manifest.jsonl")
    write_archive(ROWS, jl)
    assert read_archive(jl).drop_columns(["image_uri"]).equals(t.drop_columns(["image_uri"]))
    with pytest.raises(ArchiveError, match="not found"):
        read_archive(storage.join(s3_prefix, "missing", "manifest.parquet"))


def _row(**kw):
    base = {"item_id": "x", "image_uri": "x.png", "captions": ["c"]}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"item_id": "a", "captions": []}], r"missing required column\(s\) \['image_uri'\]"),
        ([_row(), _row(image_uri="y.png")], r"duplicated: 'x' \(rows 0 and 1\)"),
        ([_row(), _row(item_id=""), _row(item_id="z")], r"empty or null item_id in rows \[1\]"),
        ([_row(), _row(item_id="y", image_uri=" ")], r"empty or null image_uri in rows \[1\]"),
        ([_row(), _row(item_id="y", captions=None)], r"'captions' is null in rows \[1\]"),
        ([_row(captions=["a", None])], r"null caption inside the list in rows \[0\]"),
        ([_row(captions="just a string")], "must be a list of strings"),
        ([_row(split="test")], r"unknown split name\(s\) \['test'\] in rows \[0\]"),
        ([_row(label=1.5)], "'label' must hold strings"),
    ],
)
def test_validation_errors_name_rows(tmp_path, rows, match):
    with pytest.raises(ArchiveError, match=match):
        write_archive(rows, str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()


def test_bad_files(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(_row()) + "\n\n" + "{not json\n")
    with pytest.raises(ArchiveError, match="line 3 is not valid JSON"):
        read_archive(str(p))
    p.write_text(json.dumps(_row()) + "\n[1, 2]\n")
    with pytest.raises(ArchiveError, match="line 2 must be a JSON object"):
        read_archive(str(p))
    p.write_text(json.dumps(_row(captions="one caption")) + "\n")
    with pytest.raises(ArchiveError, match="'captions' must be a JSON list"):
        read_archive(str(p))
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ArchiveError, match="not a readable parquet manifest"):
        read_archive(str(bad))
    with pytest.raises(ArchiveError, match="not found"):
        read_archive(str(tmp_path / "none.parquet"))
    with pytest.raises(ArchiveError, match="not an archive manifest"):
        read_archive(str(tmp_path / "empty_dir"))
    with pytest.raises(ArchiveError, match="end in"):
        write_archive([_row()], str(tmp_path / "m.csv"))


def test_empty_jsonl_is_an_empty_archive(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n")
    t = read_archive(str(p))
    assert t.num_rows == 0 and t.schema.names[:5] == ARCHIVE_SCHEMA.names


def test_summary_counts_empty_captions_and_missing_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    rows = [dict(r, image_uri=f"images/{r['item_id']}.png") for r in ROWS]
    uri = str(tmp_path / "manifest.parquet")
    write_archive(rows, uri)
    s = summarize_archive(read_archive(uri), check_images=True)
    assert (s.n_items, s.n_captions) == (3, 3)
    assert s.empty_caption_items == ["b"]
    assert s.missing_images == ["b", "c"]
    assert s.labels == {"beach": 1, "river": 1}
    assert s.splits == {"train": 1, "query": 1}
    assert any("items without captions: 1" in line for line in s.lines())
    assert any("missing image files: 2" in line for line in s.lines())
    # relative paths, checked against the manifest's directory
    raw = read_archive(uri, resolve_images=False)
    assert summarize_archive(raw, check_images=True, base_dir=str(tmp_path)).missing_images == [
        "b",
        "c",
    ]


def test_validate_keeps_metadata_order():
    t = validate_archive(
        pa.table({"z": [1], "captions": [["c"]], "image_uri": ["u"], "item_id": ["i"], "a": [2]})
    )
    assert t.schema.names == ["item_id", "image_uri", "captions", "label", "split", "z", "a"]
