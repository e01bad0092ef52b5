"""Index format: shards, manifest, LATEST, checksums, refusal of mismatched models, retention."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from duch_core import index_store as ix
from duch_core import storage
from duch_core.archive import ArchiveError
from duch_core.codes import CodeLengthError
from duch_core.encoding import parse_manifest_lines, source_fingerprint

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
# change detection and the encode batch functions (no Ray)


def test_source_fingerprint_changes_with_object_and_captions():

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
    d = ix.compute_diff(cur, m, "bundle-a", BITS)
    assert (d.new, d.changed, d.unchanged, d.deleted) == (1, 2, 1, 1)
    assert sorted(d.carry_ids.to_pylist()) == ["a"]
    assert sorted(d.encode_ids.to_pylist()) == ["b", "d", "e"]
    full = ix.compute_diff(cur, m, "bundle-b", BITS)
    assert full.full_reencode and full.unchanged == 0 and len(full.encode_ids) == 4
    first = ix.compute_diff(cur, None, "bundle-a", BITS)
    assert first.new == 4 and len(first.carry_ids) == 0
    with pytest.raises(ArchiveError, match="not unique"):
        ix.compute_diff(pa.table({"item_id": ["a", "a"], "fingerprint": ["f", "f"]}), m, "x", BITS)


def test_parse_manifest_lines_normalises_rows_and_rejects_bad_lines():
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


def _tiny_bundle(uri: str, seed: int = 0) -> str:
    from duch_core.bundle import save_untrained_bundle
    from duch_core.config import DUCHConfig, ImageBackboneConfig, ModelConfig, TextBackboneConfig

    cfg = DUCHConfig(
        model=ModelConfig(bits=BITS, hidden_dim=32),
        image_backbone=ImageBackboneConfig(
            source="tiny:resnet", image_size=32, center_crop=0, seed=seed, bands=(2, 1, 0)
        ),
        text_backbone=TextBackboneConfig(source="tiny:bert", seed=seed),
    )
    save_untrained_bundle(uri, cfg, seed)
    return uri


def _png(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8), "RGB").save(buf, fmt)
    return buf.getvalue()


def test_encode_batch_functions_end_to_end_without_ray(tmp_path):
    """fingerprint -> decode -> encode -> write -> publish -> diff -> carry, by hand, no Ray."""
    from duch_core import encoding
    from duch_core.bundle import Bundle, BundleError, HashEncoder, read_meta
    from duch_core.imageio import decode_image, decode_options

    meta = read_meta(_tiny_bundle(str(tmp_path / "bundle")))
    rng = np.random.default_rng(0)
    base = str(tmp_path / "archive")
    files = {"a.png": _png(rng), "b.jpg": _png(rng, "JPEG"), "c.png": _png(rng), "bad.png": b"x"}
    for name, data in files.items():
        storage.write_bytes(storage.join(base, name), data)
    archive = pa.table(
        {
            "item_id": ["a", "b", "c", "bad", "gone"],
            "image_uri": ["a.png", "b.jpg", "c.png", "bad.png", "gone.png"],
            "captions": [["a river."], ["two roads", "  "], [], ["a lake"], ["a field"]],
        }
    )
    items = encoding.fingerprint_batch(archive, base, io_threads=2)
    assert items.column("lookup_error").to_pylist()[:4] == [""] * 4
    assert "not found" in items.column("lookup_error")[4].as_py()
    decoded = encoding.decode_batch(items, meta.image_backbone, 10**8, io_threads=2)
    assert decoded["pixels"].shape == (5, 3, 32, 32) and decoded["pixels"].dtype == np.float32
    assert decoded["img_ok"].tolist() == [True, True, True, False, False]
    assert list(decoded["img_stage"]) == ["", "", "", "decode", "fetch"]

    with pytest.raises(BundleError, match="replaced"):
        encoding.BundleEncoder(meta.uri, "0" * 64)
    rows = encoding.BundleEncoder(meta.uri, meta.bundle_id)(decoded)
    assert rows.schema == encoding.code_row_schema(BITS)
    # every image and caption gets a row; failures carry their stage, good rows a code
    got = {(r["item_id"], r["caption_index"]): r["stage"] for r in rows.to_pylist()}
    assert got == {
        ("a", -1): "",
        ("b", -1): "",
        ("c", -1): "",
        ("bad", -1): "decode",
        ("gone", -1): "fetch",
        ("a", 0): "",
        ("b", 0): "",
        ("b", 1): "caption",
        ("bad", 0): "",
        ("gone", 0): "",
    }
    # the codes are the in-memory encoder's, with the bundle's band rule
    enc = HashEncoder(Bundle.load(meta.uri))
    opts = decode_options(meta.image_backbone)
    want_img = enc.encode_images([decode_image(files[n], **opts) for n in ("a.png", "b.jpg")])
    good = rows.filter(pc.equal(rows.column("stage"), ""))
    codes = ix.codes_from_column(good.column("code"), BITS)
    np.testing.assert_array_equal(codes[:2], want_img)
    texts = good.filter(pc.equal(good.column("modality"), "text"))
    np.testing.assert_array_equal(
        ix.codes_from_column(texts.column("code"), BITS),
        enc.encode_texts(["a river.", "two roads", "a lake", "a field"]),
    )

    # write two batches (content-addressed), merge, publish
    root = str(tmp_path / "index")
    version = storage.new_version_id()
    vdir = ix.version_uri(root, version)
    results = [
        encoding.write_code_batch(part, vdir, meta.bundle_id, BITS).to_pylist()[0]
        for part in (rows.slice(0, 6), rows.slice(6))
    ]
    again = encoding.write_code_batch(rows.slice(6), vdir, meta.bundle_id, BITS)  # a retried task
    assert again.to_pylist()[0] == results[1]
    written = encoding.merge_written(vdir, results)
    assert written.encoded_images == 3 and written.encoded_texts == 4
    assert written.errors.column("item_id").to_pylist() == ["b", "bad", "gone"]
    assert encoding.errors_by_stage(written.errors) == {"caption": 1, "decode": 1, "fetch": 1}
    assert storage.list_prefix(storage.join(vdir, encoding.ERROR_PARTS_DIR)) == []
    m = ix.finish_version(
        root, version, written.shards, meta.bundle_id, BITS, errors=ix.ERRORS_NAME
    )
    assert m.counts == {"image": 3, "text": 4}
    assert ix.read_errors(ix.read_latest(root)).equals(written.errors)

    # one image overwritten (another size): it and the items with errors are encoded again
    storage.write_bytes(storage.join(base, "c.png"), _png(rng, "JPEG"))
    now = encoding.fingerprint_batch(archive, base, io_threads=2).select(["item_id", "fingerprint"])
    diff = ix.compute_diff(now, ix.read_latest(root), meta.bundle_id, BITS)
    assert sorted(diff.encode_ids.to_pylist()) == ["b", "bad", "c", "gone"]
    assert diff.carry_ids.to_pylist() == ["a"]
    assert (diff.new, diff.changed, diff.unchanged, diff.deleted) == (0, 4, 1, 0)
    assert diff.plan()["would_carry_over"] == 1 and not diff.full_reencode
    carried = encoding.carry_rows(m, range(len(m.shards)), diff.carry_ids)
    assert set(carried.column("origin").to_pylist()) == {"carried"}
    before = good.filter(pc.is_in(good.column("item_id"), value_set=diff.carry_ids))
    key = [("item_id", "ascending"), ("caption_index", "ascending")]
    assert (
        carried.sort_by(key)
        .select(["item_id", "caption_index", "code"])
        .equals(before.sort_by(key).select(["item_id", "caption_index", "code"]))
    )
