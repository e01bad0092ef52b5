"""Index format: shards, manifest, LATEST, checksums, refusal of mismatched models, retention."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from duch_core import index_store as ix
from duch_core import storage
from duch_core.codes import CodeLengthError

BITS = 32


def _rows(rng: np.random.Generator, n_items: int, start: int = 0, caps: int = 2) -> pa.Table:
    ids, mods, ci = [], [], []
    for k in range(start, start + n_items):
        ids.append(f"item{k:05d}")
        mods.append("image")
        ci.append(-1)
        for j in range(caps):
            ids.append(f"item{k:05d}")
            mods.append("text")
            ci.append(j)
    codes = rng.integers(0, 256, (len(ids), BITS // 8), dtype=np.uint8)
    return ix.shard_table(ids, mods, ci, codes, [f"fp{i}" for i in ids], "bundle-a", BITS)


def _publish(root: str, tables: list[pa.Table], bundle: str = "bundle-a") -> ix.IndexManifest:
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    shards = tuple(ix.write_shard(vdir, t) for t in tables)
    return ix.finish_version(root, version, shards, bundle, BITS)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "index")
    return request.getfixturevalue("s3_prefix") + "index"


def test_roundtrip_codes_ids_and_global_row_ids(root):
    rng = np.random.default_rng(0)
    tables = [_rows(rng, 7), _rows(rng, 5, start=7), _rows(rng, 3, start=12)]
    m = _publish(root, tables)
    got = ix.read_latest(root)
    assert got.version == m.version and got.bits == BITS and got.bitorder == "big"
    assert got.counts == {"image": 15, "text": 30}
    ix.validate(got, BITS, "bundle-a")

    all_rows = pa.concat_tables(tables)
    for modality in ix.MODALITIES:
        codes, ids, caps, row_ids = ix.load_codes(got, modality)
        want = np.flatnonzero(np.array(all_rows.column("modality").to_pylist()) == modality)
        assert codes.dtype == np.uint8 and codes.shape == (len(want), BITS // 8)
        assert row_ids.dtype == np.int64 and caps.dtype == np.int32
        np.testing.assert_array_equal(row_ids, want)
        ref = ix.codes_from_column(all_rows.column("code"), BITS)[want]
        np.testing.assert_array_equal(codes, ref)
        assert ids.to_pylist() == [all_rows.column("item_id")[i].as_py() for i in want]

    # a subset of shards keeps the same global ids as the full load
    codes1, ids1, _, rows1 = ix.load_codes(got, "text", shards=[2, 0])
    codes_all, _, _, rows_all = ix.load_codes(got, "text")
    pos = {int(r): i for i, r in enumerate(rows_all)}
    np.testing.assert_array_equal(codes1, codes_all[[pos[int(r)] for r in rows1]])
    assert set(rows1.tolist()) | set(ix.load_codes(got, "text", shards=[1])[3].tolist()) == set(
        rows_all.tolist()
    )


def test_finish_version_sums_counts_and_publishes_only_when_asked(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(5)
    first = _publish(root, [_rows(rng, 3), _rows(rng, 4, start=3, caps=1)])
    assert first.counts == {"image": 7, "text": 3 * 2 + 4 * 1}
    assert ix.read_latest(root).version == first.version
    vdir = ix.version_uri(root, "20990101T000000000000Z-0000beef")
    shard = ix.write_shard(vdir, _rows(rng, 2))
    second = ix.finish_version(
        root,
        "20990101T000000000000Z-0000beef",
        [shard],
        "bundle-a",
        BITS,
        publish_latest=False,
        archive="s3://b/a.parquet",
    )
    assert ix.read_latest(root).version == first.version  # LATEST not moved
    again = ix.read_manifest(second.uri)
    assert again.counts == {"image": 2, "text": 4} and again.archive == "s3://b/a.parquet"
    assert again.created and again.errors is None


def test_shard_names_are_content_addressed(tmp_path):
    rng = np.random.default_rng(1)
    t = _rows(rng, 4)
    a = ix.write_shard(str(tmp_path), t)
    b = ix.write_shard(str(tmp_path), t)
    assert a == b
    assert len(storage.list_prefix(str(tmp_path / "shards"))) == 1


@pytest.mark.parametrize(
    ("bits", "bundle", "bitorder", "match"),
    [
        (64, "bundle-a", "big", "64-bit"),
        (BITS, "bundle-b", "big", "bundle-b"),
        (BITS, "bundle-a", "little", "bit order"),
    ],
)
def test_reader_refuses_mismatched_model(tmp_path, bits, bundle, bitorder, match):
    m = _publish(str(tmp_path), [_rows(np.random.default_rng(2), 3)])
    if bitorder != "big":
        m = ix.IndexManifest.from_dict({**m.to_dict(), "bitorder": bitorder}, uri=m.uri)
    with pytest.raises(ix.IndexMismatchError, match=match):
        ix.validate(m, bits, bundle)
    # a manifest file with other bits, read back from storage, is refused the same way
    data = {**m.to_dict(), "bits": 64}
    storage.write_json(m.uri, data)
    with pytest.raises(ix.IndexMismatchError, match="64-bit"):
        ix.validate(ix.read_manifest(m.uri), BITS, "bundle-a")


def test_corrupt_missing_and_truncated_shards_are_refused(root):
    rng = np.random.default_rng(3)
    m = _publish(root, [_rows(rng, 5), _rows(rng, 5, start=5)])
    uri0 = m.resolve(m.shards[0].path)
    data = storage.read_bytes(uri0)
    storage.write_bytes(uri0, data[: len(data) // 2])  # half-written
    with pytest.raises(ix.IndexCorruptError, match="checksum"):
        ix.load_codes(m, "image")
    # the intact shard still loads on its own
    codes, *_ = ix.load_codes(m, "image", shards=[1])
    assert codes.shape == (5, BITS // 8)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    storage.write_bytes(uri0, bytes(flipped))
    with pytest.raises(ix.IndexCorruptError, match="checksum"):
        ix.read_shard(m, 0)
    storage.delete(uri0)
    with pytest.raises(ix.IndexCorruptError, match="missing"):
        ix.load_codes(m, "text")


def test_missing_or_bad_manifest_and_pointer(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ix.IndexNotFoundError):
        ix.read_latest(root)
    storage.publish_pointer(ix.latest_uri(root), "20000101T000000000000Z-deadbeef")
    with pytest.raises(ix.IndexCorruptError, match="not found"):
        ix.read_latest(root)
    bad = str(tmp_path / "bad.json")
    storage.write_json(bad, {"version": "x"})
    with pytest.raises(ix.IndexCorruptError, match="not a valid index manifest"):
        ix.read_manifest(bad)
    with pytest.raises(ValueError, match="modality"):
        ix.load_codes(_publish(root, [_rows(np.random.default_rng(4), 2)]), "audio")


def test_shard_table_rejects_bad_codes_and_modalities():
    with pytest.raises(CodeLengthError):
        ix.shard_table(["a"], ["image"], [-1], np.zeros((1, 3), np.uint8), ["f"], "b", BITS)
    with pytest.raises(ValueError, match="modality"):
        ix.shard_table(["a"], ["video"], [-1], np.zeros((1, 4), np.uint8), ["f"], "b", BITS)


def test_retention_keeps_newest_and_latest_and_removes_dead_runs(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(5)
    published = [_publish(root, [_rows(rng, 2)]).version for _ in range(4)]
    # a run that died before writing its manifest, older than the newest published version
    dead = published[-1][:-8] + "00000000"
    storage.write_bytes(ix.version_uri(root, dead) + "/shards/part-x.parquet", b"partial")
    # LATEST moved back to an old version (e.g. a rollback): it must survive retention
    storage.publish_pointer(ix.latest_uri(root), published[0])
    deleted = ix.apply_retention(root, keep=2)
    assert sorted(deleted) == sorted([published[1], dead])
    assert sorted(ix.list_versions(root)) == sorted([published[0], published[2], published[3]])
    assert ix.read_latest(root).version == published[0]
    assert ix.apply_retention(root, keep=0) == []


# --------------------------------------------------------------------------------------------
# the encode job's change detection (pure functions, no Ray)


def test_source_fingerprint_changes_with_object_and_captions():
    from jobs.encode import source_fingerprint

    base = source_fingerprint(10, '"abc"', 5, "s3://b/x.png", ["a river"])
    assert base == source_fingerprint(10, "abc", 5, "s3://b/x.png", ["a river"])
    others = [
        source_fingerprint(11, "abc", 5, "s3://b/x.png", ["a river"]),
        source_fingerprint(10, "abd", 5, "s3://b/x.png", ["a river"]),
        source_fingerprint(10, "abc", 6, "s3://b/x.png", ["a river"]),
        source_fingerprint(10, "abc", 5, "s3://b/y.png", ["a river"]),
        source_fingerprint(10, "abc", 5, "s3://b/x.png", ["a river", "a lake"]),
    ]
    assert len({base, *others}) == 6
    assert source_fingerprint(None, None, None, "s3://b/x.png", []).startswith("missing-")


def test_compute_diff_new_changed_deleted_failed_and_bundle(tmp_path):
    from jobs.encode import compute_diff

    root = str(tmp_path)
    ids = ["a", "b", "c", "d"]
    t = ix.shard_table(
        ids, ["image"] * 4, [-1] * 4, np.zeros((4, 4), np.uint8), ["f"] * 4, "bundle-a", BITS
    )
    m = _publish(root, [t])
    errs = pa.table(
        {"item_id": ["d"], "stage": ["caption"], "reason": ["empty"], "caption_index": [0]},
        schema=ix.ERRORS_SCHEMA,
    )
    storage.write_parquet(m.resolve(ix.ERRORS_NAME), errs)
    m = ix.write_manifest(
        m.base_uri, ix.IndexManifest.from_dict({**m.to_dict(), "errors": ix.ERRORS_NAME})
    )
    cur = pa.table({"item_id": ["a", "b", "d", "e"], "fingerprint": ["f", "g", "f", "f"]})
    d = compute_diff(cur, m, "bundle-a", BITS)
    assert (d.new, d.changed, d.unchanged, d.deleted) == (1, 2, 1, 1)
    assert sorted(d.carry_ids.to_pylist()) == ["a"]
    assert sorted(d.encode_ids.to_pylist()) == ["b", "d", "e"]
    full = compute_diff(cur, m, "bundle-b", BITS)
    assert full.full_reencode and full.unchanged == 0 and len(full.encode_ids) == 4
    first = compute_diff(cur, None, "bundle-a", BITS)
    assert first.new == 4 and len(first.carry_ids) == 0
    from duch_core.config import ConfigError

    with pytest.raises(ConfigError, match="not unique"):
        compute_diff(pa.table({"item_id": ["a", "a"], "fingerprint": ["f", "f"]}), m, "x", BITS)


def test_parse_manifest_lines_normalises_rows_and_rejects_bad_lines():
    from duch_core.archive import ArchiveError
    from jobs.encode import parse_manifest_lines

    lines = [
        '{"item_id": "a", "image_uri": "x.png", "captions": ["a river."], "split": "train"}',
        "   ",
        '{"item_id": "b", "image_uri": "s3://b/y.tif"}',
    ]
    t = parse_manifest_lines(pa.table({"text": lines}))
    assert t.column_names == ["item_id", "image_uri", "captions"]
    assert t.to_pylist() == [
        {"item_id": "a", "image_uri": "x.png", "captions": ["a river."]},
        {"item_id": "b", "image_uri": "s3://b/y.tif", "captions": []},
    ]
    for bad, match in (
        ('["a", "x.png"]', "JSON object"),
        ('{"item_id": "a", "image_uri": "x.png"', "not valid JSON"),
        ('{"item_id": "a", "image_uri": "x.png", "captions": [1]}', "wrong types"),
        ('{"item_id": "", "image_uri": "x.png"}', "item_id"),
    ):
        with pytest.raises(ArchiveError, match=match):
            parse_manifest_lines(pa.table({"text": [bad]}))
