"""Index format: shards, manifest, LATEST (compare-and-swap), the encode lock, catalog snapshots,
checksums, refusal of mismatched models, retention, the shrink guard, manifest rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from duch_core import (
    catalog_snapshot,
    encode_lock,
    encoding,
    index_diff,
    item_metadata,
    pointers,
    retention,
    shard_writer,
    source_fingerprints,
    storage,
)
from duch_core import index_store as ix
from duch_core.archive import ArchiveError
from duch_core.codes import CodeLengthError
from duch_core.manifest_rows import normalize_rows, parse_manifest_bytes
from duch_core.source_fingerprints import source_fingerprint

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
    pointers.publish_pointer(ix.latest_uri(root), "20000101T000000000000Z-deadbeef")
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


def test_retention_counts_published_versions_and_spares_latest_its_predecessor_and_young_runs(
    tmp_path,
):
    from datetime import UTC, datetime, timedelta

    root = str(tmp_path)
    rng = np.random.default_rng(5)
    published = [_publish(root, [_rows(rng, 2)]).version for _ in range(4)]
    now = datetime.now(UTC)
    # never published: a run that died days ago, one still writing, one refused (manifest, no
    # LATEST) an hour ago; none of them counts among the kept versions
    dead = pointers.new_version_id(now - timedelta(days=3))
    young = pointers.new_version_id(now - timedelta(minutes=5))
    refused = pointers.new_version_id(now - timedelta(hours=1))
    for v in (dead, young):
        storage.write_bytes(ix.version_uri(root, v) + "/shards/part-x.parquet", b"partial")
    ix.finish_version(
        root,
        refused,
        [ix.write_shard(ix.version_uri(root, refused), _rows(rng, 1))],
        "bundle-a",
        BITS,
        publish_latest=False,
    )
    states = retention.version_states(root)
    assert [v for v, st in states.items() if st.published] == published
    assert states[refused] == retention.VersionState(manifest=True, published=False)

    deleted = retention.apply_retention(root, keep=1, grace_s=24 * 3600)
    # kept: LATEST, the version before it, the young runs; gone: older published, the dead run
    assert sorted(deleted) == sorted([published[0], published[1], dead])
    assert sorted(retention.list_versions(root)) == sorted(
        [published[2], published[3], young, refused]
    )
    # the grace age passes for the refused and the young runs
    later = now + timedelta(days=3)
    assert sorted(retention.apply_retention(root, keep=1, now=later)) == sorted([young, refused])

    # LATEST rolled back to an older version: it and its predecessor survive keep=1
    more = [_publish(root, [_rows(rng, 2)]).version for _ in range(2)]
    pointers.publish_pointer(ix.latest_uri(root), published[3])
    assert retention.apply_retention(root, keep=1) == [more[0]]  # more[1]: the newest published
    assert sorted(retention.list_versions(root)) == sorted([published[2], published[3], more[1]])
    assert ix.read_latest(root).version == published[3]
    assert retention.apply_retention(root, keep=0) == []


def test_retention_follows_previous_version_of_latest(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(6)
    v = [_publish(root, [_rows(rng, 1)]).version for _ in range(3)]
    # the newest version was planned against the oldest (the one before it in publish order)
    m = ix.read_manifest(ix.manifest_uri(root, v[2]))
    ix.write_manifest(
        m.base_uri, ix.IndexManifest.from_dict({**m.to_dict(), "previous_version": v[0]})
    )
    assert retention.apply_retention(root, keep=1) == [v[1]]


def test_legacy_versions_count_as_published_by_their_summary(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(7)
    m = _publish(root, [_rows(rng, 1)])
    storage.delete(storage.join(m.base_uri, ix.PUBLISHED_NAME))
    assert not retention.version_states(root)[m.version].published
    storage.write_json(storage.join(m.base_uri, ix.SUMMARY_NAME), {"published": True})
    assert retention.version_states(root)[m.version].published


# --------------------------------------------------------------------------------------------
# publishing: compare-and-swap and the encode lock


def test_publish_if_moves_latest_only_from_the_expected_version(root):
    rng = np.random.default_rng(8)
    a, b, c = (_publish_unpublished(root, rng) for _ in range(3))
    nothing = ix.read_latest_state(root)
    assert nothing == ix.LatestState(None, None)
    ix.publish_if(root, a, nothing)
    with pytest.raises(ix.PublishConflictError, match=a):
        ix.publish_if(root, b, nothing)  # planned when nothing was published: too late
    seen = ix.read_latest_state(root)
    assert seen.version == a and seen.etag
    ix.publish_if(root, b, seen)
    with pytest.raises(ix.PublishConflictError):
        ix.publish_if(root, c, seen)  # a second run that compared with a
    assert ix.read_latest_version(root) == b
    with pytest.raises(ValueError):
        ix.publish_if(root, "two\nlines", ix.read_latest_state(root))


def _publish_unpublished(root: str, rng: np.random.Generator) -> str:
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    ix.finish_version(
        root, version, [ix.write_shard(vdir, _rows(rng, 1))], "b", BITS, publish_latest=False
    )
    return version


class _Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_encode_lock_one_holder_expiry_takeover_and_release(root):
    clock = _Clock()
    a = encode_lock.EncodeLock(root, ttl_s=60, clock=clock)
    b = encode_lock.EncodeLock(root, ttl_s=60, clock=clock)
    a.acquire()
    a.refresh("20990101T000000000000Z-aaaaaaaa")
    with pytest.raises(
        encode_lock.LockHeldError, match="writing version 20990101T000000000000Z-aaaaaaaa"
    ):
        b.acquire()
    clock.t += 59
    with pytest.raises(encode_lock.LockHeldError):
        b.acquire(wait_s=0)
    a.refresh()  # a refresh moves the expiry: still held a minute later
    clock.t += 59
    with pytest.raises(encode_lock.LockHeldError):
        b.acquire()
    clock.t += 2  # a stopped refreshing (a killed run): the lease expires and b takes over
    b.acquire()
    assert b.took_over is not None and b.took_over.owner == a.info.owner
    with pytest.raises(encode_lock.LockLostError):
        a.refresh()
    a.release()  # a no longer holds it: b's lock stays
    assert encode_lock.LockInfo.parse(storage.read_bytes(b.uri)).owner == b.info.owner
    b.release()
    assert not storage.exists(b.uri)
    c = encode_lock.EncodeLock(root, ttl_s=60, clock=clock)
    c.acquire()  # free again
    c.release()


def test_encode_lock_waits_for_a_lease_to_end_and_beats_while_held(tmp_path):
    root = str(tmp_path)
    a = encode_lock.EncodeLock(root, ttl_s=1.5)
    a.acquire()
    a.start_heartbeat()
    import time

    time.sleep(2.0)  # longer than the ttl: the heartbeat keeps it
    with pytest.raises(encode_lock.LockHeldError):
        encode_lock.EncodeLock(root, ttl_s=1.5).acquire()
    a.release()
    b = encode_lock.EncodeLock(root, ttl_s=1.5)
    stale = encode_lock.EncodeLock(root, ttl_s=0.5)
    stale.acquire()  # dies without releasing
    t0 = time.monotonic()
    b.acquire(wait_s=5, poll_s=0.1)
    assert time.monotonic() - t0 < 3
    b.release()


def test_two_lock_holders_race_to_one(s3_prefix):
    from concurrent.futures import ThreadPoolExecutor

    root = s3_prefix + "race"

    def take(_: int) -> bool:
        try:
            encode_lock.EncodeLock(root, ttl_s=60).acquire()
            return True
        except encode_lock.LockHeldError:
            return False

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(take, range(6))) == 1


# --------------------------------------------------------------------------------------------
# catalog snapshots


def test_catalog_parts_round_trip_and_checksums(root):
    rng = np.random.default_rng(9)
    version = ix.new_version_id()
    vdir = ix.version_uri(root, version)
    a = pa.table(
        {
            "item_id": ["b", "a"],
            "image_uri": ["s3://x/b.png", "s3://x/a.png"],
            "captions": [["two"], []],
            "label": ["river", None],
            "split": ["train", None],
            "bbox": [[0.0, 1.0, 2.0, 3.0], None],
            "datetime": ["2024-05-01T10:00:00Z", None],
        }
    )
    b = pa.table(
        {
            "item_id": ["c"],
            "image_uri": ["s3://x/c.png"],
            "captions": [["three"]],
            "label": [None],
            "split": [None],
            "sensor": ["S2A"],
        }
    )
    parts = [catalog_snapshot.write_catalog_part(vdir, t) for t in (a, b)]
    assert catalog_snapshot.write_catalog_part(vdir, a) == parts[0]  # content-addressed
    m = ix.finish_version(
        root,
        version,
        [ix.write_shard(vdir, _rows(rng, 1))],
        "b",
        BITS,
        catalog=ix.catalog_info(parts),
    )
    m = ix.read_latest(root)
    assert m.catalog is not None and m.catalog.rows == 3
    cat = catalog_snapshot.read_catalog(m)
    assert cat.column("item_id").to_pylist() == ["a", "b", "c"]
    assert cat.column("bbox").to_pylist() == [None, [0.0, 1.0, 2.0, 3.0], None]
    assert cat.column("sensor").to_pylist() == [None, None, "S2A"]
    # a part altered after publishing, and a part list edited in index.json, are refused
    storage.write_bytes(m.resolve(parts[1].path), ix.table_bytes(a))
    with pytest.raises(ix.IndexCorruptError, match="checksum"):
        catalog_snapshot.read_catalog(m)
    info = m.catalog
    edited = ix.CatalogInfo(info.parts[:1], info.rows, info.sha256)
    with pytest.raises(ix.IndexCorruptError, match="part list"):
        catalog_snapshot.read_catalog(
            ix.IndexManifest.from_dict({**m.to_dict(), "catalog": edited.to_dict()}, uri=m.uri)
        )
    old = ix.IndexManifest.from_dict({**m.to_dict(), "catalog": None}, uri=m.uri)
    with pytest.raises(catalog_snapshot.CatalogMissingError):
        catalog_snapshot.read_catalog(old)


def test_catalog_with_mixed_metadata_types_reads_as_text(tmp_path):
    vdir = str(tmp_path / "v")
    base = {"image_uri": ["u"], "captions": [[]], "label": [None], "split": [None]}
    parts = [
        catalog_snapshot.write_catalog_part(
            vdir, pa.table({"item_id": ["a"], **base, "bands": [3]})
        ),
        catalog_snapshot.write_catalog_part(
            vdir, pa.table({"item_id": ["b"], **base, "bands": [["B2", "B3"]]})
        ),
    ]
    m = ix.IndexManifest("v", "b", BITS, catalog=ix.catalog_info(parts), uri=vdir + "/index.json")
    assert catalog_snapshot.read_catalog(m).column("bands").to_pylist() == ["3", '["B2", "B3"]']


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
    )  # an errors table from before the transient column: read as not transient
    storage.write_parquet(m.resolve(ix.ERRORS_NAME), errs)
    m = ix.write_manifest(
        m.base_uri, ix.IndexManifest.from_dict({**m.to_dict(), "errors": ix.ERRORS_NAME})
    )
    cur = pa.table({"item_id": ["a", "b", "d", "e"], "fingerprint": ["f", "g", "f", "f"]})
    d = index_diff.compute_diff(cur, m, "bundle-a", BITS)
    assert (d.new, d.changed, d.unchanged, d.deleted) == (1, 2, 1, 1)
    assert sorted(d.carry_ids.to_pylist()) == ["a"]
    assert sorted(d.encode_ids.to_pylist()) == ["b", "d", "e"]
    full = index_diff.compute_diff(cur, m, "bundle-b", BITS)
    assert full.full_reencode and full.unchanged == 0 and len(full.encode_ids) == 4
    first = index_diff.compute_diff(cur, None, "bundle-a", BITS)
    assert first.new == 4 and len(first.carry_ids) == 0
    assert ix.read_errors(m).column("transient").to_pylist() == [False]
    with pytest.raises(ArchiveError, match="not unique"):
        index_diff.compute_diff(
            pa.table({"item_id": ["a", "a"], "fingerprint": ["f", "f"]}), m, "x", BITS
        )


def test_compute_diff_keeps_items_whose_lookup_failed_and_the_shrink_guard(tmp_path):
    root = str(tmp_path)
    ids = [f"i{k}" for k in range(40)]
    t = ix.shard_table(
        ids, ["image"] * 40, [-1] * 40, np.zeros((40, 4), np.uint8), ["f"] * 40, "bundle-a", BITS
    )
    m = _publish(root, [t])
    # the store failed the look-ups of i0 (known: its rows are kept) and of new1 (unknown)
    cur = pa.table(
        {
            "item_id": [*ids, "new1"],
            "fingerprint": ["unknown-c1"] + ["f"] * 39 + ["unknown-c2"],
        }
    )
    d = index_diff.compute_diff(cur, m, "bundle-a", BITS)
    assert d.stale_ids.to_pylist() == ["i0"]
    assert "i0" in d.carry_ids.to_pylist() and len(d.carry_ids) == 40
    assert d.encode_ids.to_pylist() == ["new1"]
    assert (d.new, d.changed, d.unchanged, d.deleted) == (1, 0, 39, 0)
    assert d.prev_items == 40 and len(d.prev_row_ids) == 40
    index_diff.check_shrink(d, 0.05)
    # 2 of 40 gone (5 %) passes; 3 (7.5 %) is refused; an empty archive is always refused
    for gone, ok in ((2, True), (3, False)):
        shrunk = index_diff.compute_diff(cur.slice(gone), m, "bundle-a", BITS)
        assert shrunk.deleted == gone
        if ok:
            index_diff.check_shrink(shrunk, 0.05)
        else:
            with pytest.raises(index_diff.ShrinkError, match="3 of the 40 items"):
                index_diff.check_shrink(shrunk, 0.05)
    empty = index_diff.compute_diff(cur.slice(0, 0), m, "bundle-a", BITS)
    with pytest.raises(index_diff.ShrinkError, match="no valid items"):
        index_diff.check_shrink(empty, 1.0)
    with pytest.raises(index_diff.ShrinkError):
        index_diff.check_shrink(index_diff.compute_diff(cur.slice(0, 0), None, "b", BITS), 1.0)
    # a new bundle cannot keep old codes: nothing is stale then
    other = index_diff.compute_diff(cur, m, "bundle-b", BITS)
    assert len(other.stale_ids) == 0 and other.full_reencode and other.deleted == 0


def test_manifest_lines_become_rows_or_errors_of_their_own():
    data = b"\n".join(
        [
            b'{"item_id": "a", "image_uri": "x.png", "captions": ["a river."], "split": "train",'
            b' "bbox": [0, 1, 2, 3], "sensor": "S2A"}',
            b"   ",
            b'{"item_id": "b", "image_uri": "s3://b/y.tif", "crs": "EPSG:32633"}',
            b'["a", "x.png"]',
            b'{"item_id": "c", "image_uri": "x.png"',
            b'{"item_id": "d", "image_uri": "x.png", "captions": [1]}',
            b'{"item_id": "", "image_uri": "x.png"}',
            b'{"item_id": "e", "image_uri": "x.png", "split": "val"}',
            b'{"item_id": "f", "image_uri": null}',
            b"\xff\xfe not utf-8",
            b'{"item_id": 7, "image_uri": "z.png", "label": 3}\r',
        ]
    )
    t = parse_manifest_bytes(data)
    errors = dict(zip(range(t.num_rows), t.column("manifest_error").to_pylist(), strict=True))
    ok = [r for r in t.to_pylist() if not r["manifest_error"]]
    assert [r["item_id"] for r in ok] == ["a", "b", "7"]
    assert ok[0]["captions"] == ["a river."] and ok[1]["captions"] == []
    assert ok[0]["bbox"] == [0, 1, 2, 3] and ok[1]["crs"] == "EPSG:32633"
    assert ok[2]["label"] == "3"
    bad = [e for e in errors.values() if e]
    assert len(bad) == 7
    for fragment in (
        "line 4: must be a JSON object",
        "line 5: not valid JSON",
        "line 6: captions",
        "line 7: item_id",
        "line 8: unknown split",
        "line 9: image_uri",
        "line 10: not UTF-8",
    ):
        assert any(fragment in e for e in bad), fragment
    # an id known on a bad line names the error row
    assert {r["item_id"] for r in t.to_pylist() if r["manifest_error"]} == {"", "d", "e", "f"}


def test_normalize_rows_marks_bad_parquet_rows():
    t = pa.table(
        {
            "item_id": ["a", None, "b", "b", "c", "d", "e"],
            "image_uri": ["x", "x", "x", "x", "", "x", "x"],
            "captions": [["ok"], [], [], [], [], None, ["a", None]],
            "split": ["train", None, None, None, None, None, "nope"],
            "crs": ["EPSG:4326"] * 7,
        }
    )
    out = normalize_rows(t)
    assert out.column_names == [
        "item_id",
        "image_uri",
        "captions",
        "label",
        "split",
        "crs",
        "manifest_error",
    ]
    errs = out.column("manifest_error").to_pylist()
    assert errs[0] == ""
    assert "empty or null item_id" in errs[1]
    assert "repeated" in errs[2] and "repeated" in errs[3]
    assert "image_uri" in errs[4] and "captions is null" in errs[5]
    assert "null caption" in errs[6]
    assert out.column("crs").to_pylist() == ["EPSG:4326"] * 7


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
    from duch_core.bundle import Bundle, BundleError, read_meta
    from duch_core.hash_encoder import HashEncoder
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
    items = source_fingerprints.fingerprint_batch(archive, base, io_threads=2)
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
    version = pointers.new_version_id()
    vdir = ix.version_uri(root, version)
    results = [
        shard_writer.write_code_batch(part, vdir, meta.bundle_id, BITS).to_pylist()[0]
        for part in (rows.slice(0, 6), rows.slice(6))
    ]
    again = shard_writer.write_code_batch(
        rows.slice(6), vdir, meta.bundle_id, BITS
    )  # a retried task
    assert again.to_pylist()[0] == results[1]
    written = shard_writer.merge_written(vdir, results)
    assert written.encoded_images == 3 and written.encoded_texts == 4
    assert written.errors.column("item_id").to_pylist() == ["b", "bad", "gone"]
    assert written.errors.column("transient").to_pylist() == [False] * 3
    assert shard_writer.errors_by_stage(written.errors) == {"caption": 1, "decode": 1, "fetch": 1}
    assert storage.list_prefix(storage.join(vdir, shard_writer.ERROR_PARTS_DIR)) == []
    m = ix.finish_version(
        root, version, written.shards, meta.bundle_id, BITS, errors=ix.ERRORS_NAME
    )
    assert m.counts == {"image": 3, "text": 4}
    assert ix.read_errors(ix.read_latest(root)).equals(written.errors)

    # one image overwritten (another size): it and the items with errors are encoded again
    storage.write_bytes(storage.join(base, "c.png"), _png(rng, "JPEG"))
    now = source_fingerprints.fingerprint_batch(archive, base, io_threads=2).select(
        ["item_id", "fingerprint"]
    )
    diff = index_diff.compute_diff(now, ix.read_latest(root), meta.bundle_id, BITS)
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


def test_store_failures_are_transient_and_leave_the_item_out_whole(tmp_path, monkeypatch):
    """A look-up or read the store fails: no fetch error that would drop the item, no captions."""
    from duch_core import encoding
    from duch_core.bundle import read_meta

    meta = read_meta(_tiny_bundle(str(tmp_path / "bundle")))
    rng = np.random.default_rng(1)
    base = str(tmp_path / "archive")
    for name in ("a.png", "b.png", "c.png"):
        storage.write_bytes(storage.join(base, name), _png(rng))
    archive = pa.table(
        {
            "item_id": ["a", "b", "c", "gone"],
            "image_uri": ["a.png", "b.png", "c.png", "gone.png"],
            "captions": [["a river."], ["a road."], ["a lake."], ["a field."]],
        }
    )
    real_info, real_read = storage.info, storage.read_bytes

    def info(uri: str) -> storage.ObjectInfo:
        if uri.endswith("b.png"):
            raise storage.TransientStorageError(f"{uri}: SlowDown (after 5 tries)")
        return real_info(uri)

    def read_bytes(uri: str) -> bytes:
        if uri.endswith("c.png"):
            raise storage.TransientStorageError(f"{uri}: HTTP status 503")
        return real_read(uri)

    monkeypatch.setattr(storage, "info", info)
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    items = source_fingerprints.fingerprint_batch(archive, base, io_threads=2)
    assert items.column("lookup_transient").to_pylist() == [False, True, False, False]
    fps = items.column("fingerprint").to_pylist()
    assert fps[1].startswith(index_diff.UNKNOWN_PREFIX) and fps[3].startswith(
        index_diff.MISSING_PREFIX
    )
    decoded = encoding.decode_batch(items, meta.image_backbone, 10**8, io_threads=2)
    assert decoded["img_ok"].tolist() == [True, False, False, False]
    assert decoded["img_transient"].tolist() == [False, True, True, False]
    rows = encoding.BundleEncoder(meta.uri, meta.bundle_id)(decoded)
    got = {
        (r["item_id"], r["caption_index"]): (r["stage"], r["transient"]) for r in rows.to_pylist()
    }
    assert got == {
        ("a", -1): ("", False),
        ("a", 0): ("", False),
        ("b", -1): ("fetch", True),  # no caption rows: the job keeps b's previous rows whole
        ("c", -1): ("fetch", True),
        ("gone", -1): ("fetch", False),  # permanent: the object does not exist
        ("gone", 0): ("", False),
    }
    # a read shorter than the object is repeated, then transient, never a decode error
    monkeypatch.setattr(storage, "read_bytes", lambda uri: real_read(uri)[:10])
    data, reason, transient = encoding.fetch_image(storage.join(base, "a.png"), 999)
    assert data is None and transient and "10 bytes" in reason


def test_shards_hold_rows_in_index_order_time_then_id_and_follow_their_first_row(tmp_path):
    """:class:`shard_writer.IndexOrder` against a plain sort; writers sort their rows by it and
    :func:`shard_writer.merge_written` orders the shards by their first row, not by path."""
    rng = np.random.default_rng(5)
    n = 60
    ids = [f"item-{k:03d}" for k in rng.permutation(n)]
    days = rng.integers(0, 6, n)  # many items share a time, as a scene's chips do
    when = [None if d == 5 else f"2024-03-{d + 1:02d}T10:00:00Z" for d in days]
    dt = item_metadata.datetime_us(pa.table({"datetime": pa.array(when, pa.string())}))
    order = shard_writer.IndexOrder.build(pa.array(ids), pa.array(dt))
    # the slow reference: unknown times last, then by id
    ref = sorted(zip(when, ids, strict=True), key=lambda p: (p[0] is None, p[0] or "", p[1]))
    assert order.ordered_ids() == [i for _, i in ref]
    probe = pa.array([ref[7][1], "item-999", ref[0][1] + "-longer", ref[n - 1][1]])
    assert order.positions(probe).tolist() == [7, n, n, n - 1]

    # code rows of every item (image + 0-2 captions), in a scrambled order, in two batches
    mods, caps, items = [], [], []
    for i in ids:
        for c in [-1, *range(int(rng.integers(0, 3)))]:
            items.append(i)
            mods.append("image" if c < 0 else "text")
            caps.append(c)
    perm = rng.permutation(len(items))
    rows = encoding.code_rows(
        BITS,
        [items[p] for p in perm],
        [mods[p] for p in perm],
        [caps[p] for p in perm],
        rng.integers(0, 256, (len(items), BITS // 8), dtype=np.uint8),
        ["fp"] * len(items),
        [""] * len(items),
        [""] * len(items),
        "encoded",
    )
    vdir = str(tmp_path / "v")
    half = len(items) // 2
    results = [
        shard_writer.write_code_batch(b, vdir, "bundle", BITS, order).to_pylist()[0]
        for b in (rows.slice(0, half), rows.slice(half))
    ]
    rank = {i: k for k, i in enumerate(order.ordered_ids())}
    for r in results:
        t = storage.read_parquet(storage.join(vdir, r["path"]))
        keys = [
            (rank[i], m, c)
            for i, m, c in zip(
                t.column("item_id").to_pylist(),
                t.column("modality").to_pylist(),
                t.column("caption_index").to_pylist(),
                strict=True,
            )
        ]
        assert keys == sorted(keys) and r["first"] == keys[0][0]
    written = shard_writer.merge_written(vdir, list(reversed(results)))
    by_first = sorted(results, key=lambda r: r["first"])
    assert [s.path for s in written.shards] == [r["path"] for r in by_first]

    # without an order the rows stay as given; an id the order lacks goes last
    plain = shard_writer.write_code_batch(rows.slice(0, 5), str(tmp_path / "w"), "b", BITS)
    assert plain.column("first").to_pylist() == [-1]
    three = encoding.code_rows(
        BITS,
        ["x", "y", "z"],
        ["image"] * 3,
        [-1] * 3,
        np.zeros((3, BITS // 8), np.uint8),
        ["fp"] * 3,
        [""] * 3,
        [""] * 3,
        "carried",
    )
    zx = shard_writer.IndexOrder.build(pa.array(["z", "x"]), pa.array([1, 2], pa.int64()))
    got, first = shard_writer.order_rows(three, zx)
    assert got.column("item_id").to_pylist() == ["z", "x", "y"] and first == 0
