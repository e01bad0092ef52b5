"""Exact Hamming top-k: kernel vs slow reference and faiss, sharding, files, bad input."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from duch_core import hamming_topk as H
from duch_core import index_store as ix
from duch_core import search as S
from duch_core.codes import hamming
from duch_core.hamming_topk import SearchError, merge_topk, search_reference
from duch_core.search import HammingIndex

ALL_BITS = (16, 32, 64, 128, 256)


def _codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)


def _clustered(rng: np.random.Generator, n: int, bits: int, centres: int = 5) -> np.ndarray:
    """Few centres with sparse bit flips: small distances and many ties."""
    c = _codes(np.random.default_rng(99), centres, bits)
    noise = _codes(rng, n, bits) & _codes(rng, n, bits) & _codes(rng, n, bits)
    return c[rng.integers(0, centres, n)] ^ noise


def _check_faiss(
    bits: int, codes: np.ndarray, q: np.ndarray, k: int, d: np.ndarray, ids: np.ndarray
):
    """Tie-aware parity with faiss IndexBinaryFlat (ids here are positions)."""
    faiss = pytest.importorskip("faiss")
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(codes)
    fd, fi = flat.search(q, k)
    np.testing.assert_array_equal(d, fd)
    for r in range(q.shape[0]):
        # ids ranked by (distance, id) must equal faiss's after the same sort
        order = np.lexsort((fi[r], fd[r]))
        kth = d[r, -1]
        below = fd[r][order] < kth
        np.testing.assert_array_equal(ids[r][below], fi[r][order][below])
        # faiss may pick other ids at the k-th distance; they must be at that distance
        tied = fi[r][fd[r] == kth]
        assert np.all(hamming(q[r : r + 1], codes[tied])[0] == kth)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_matches_reference_and_faiss(bits: int, kind: str, small_blocks: None) -> None:
    rng = np.random.default_rng(bits)
    n = 3001  # not a multiple of any block, sub-block or chunk size
    make = _codes if kind == "random" else _clustered
    codes = make(rng, n, bits)
    q = np.concatenate([make(rng, 6, bits), codes[[5, 2999]]])  # two exact hits
    for k in (1, 7, 50):
        d, ids = HammingIndex.from_arrays(codes, None, bits).search(q, k)
        rd, rids = search_reference(codes, np.arange(n), q, k)
        assert d.dtype == np.int32 and ids.dtype == np.int64 and d.shape == (len(q), k)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(ids, rids)
        _check_faiss(bits, codes, q, k, d, ids)


@pytest.mark.parametrize("bits", [8, 24, 48, 96, 512])
def test_other_widths(bits: int, small_blocks: None) -> None:
    rng = np.random.default_rng(bits)
    codes = _clustered(rng, 700, bits)
    ids = rng.permutation(700).astype(np.int64) * 5 - 1000
    q = _clustered(rng, 4, bits)
    d, got = HammingIndex.from_arrays(codes, ids, bits).search(q, 30)
    rd, rids = search_reference(codes, ids, q, 30)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(got, rids)


def test_default_blocks_and_threads_large() -> None:
    """Default sizes, several chunks (N above the per-thread minimum), unsorted ids."""
    rng = np.random.default_rng(0)
    bits = 64
    n = 2 * max(H._MIN_CHUNK, H._MIN_SCAN_WORK // 5) + 1234
    assert H._chunk_count(2, n, 5, None) == 2
    codes = _clustered(rng, n, bits, centres=50)
    ids = rng.permutation(n).astype(np.int64)
    q = _clustered(rng, 5, bits, centres=50)
    H.set_num_threads(2)
    try:
        d, got = HammingIndex.from_arrays(codes, ids, bits).search(q, 100)
    finally:
        H.set_num_threads(None)
    rd, rids = search_reference(codes, ids, q, 100)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(got, rids)


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_all_equal_codes_rank_by_id(bits: int, small_blocks: None) -> None:
    rng = np.random.default_rng(1)
    n = 1001
    codes = np.repeat(_codes(rng, 1, bits), n, axis=0)
    ids = rng.permutation(n).astype(np.int64) + 10
    q = np.concatenate([codes[:1], _codes(rng, 2, bits)])
    d, got = HammingIndex.from_arrays(codes, ids, bits).search(q, 40)
    assert np.all(d == d[:, :1])
    assert d[0, 0] == 0
    np.testing.assert_array_equal(got, np.tile(np.arange(10, 50), (3, 1)))


def test_k_larger_than_n_and_tiny_indexes(small_blocks: None) -> None:
    rng = np.random.default_rng(2)
    for n in (1, 2, 5, 17):
        codes = _codes(rng, n, 64)
        q = _codes(rng, 3, 64)
        d, got = HammingIndex.from_arrays(codes, None, 64).search(q, 1000)
        rd, rids = search_reference(codes, np.arange(n), q, 1000)
        assert d.shape == (3, n)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(got, rids)


def test_empty_index_and_empty_batch() -> None:
    idx = HammingIndex(64)
    assert idx.ntotal == 0
    d, ids = idx.search(np.zeros((3, 8), np.uint8), 5)
    assert d.shape == ids.shape == (3, 0)
    assert d.dtype == np.int32 and ids.dtype == np.int64
    idx.add(np.zeros((0, 8), np.uint8))
    assert idx.ntotal == 0
    idx.add(np.ones((4, 8), np.uint8))
    d, ids = idx.search(np.zeros((0, 8), np.uint8), 5)
    assert d.shape == (0, 4)


def test_incremental_add_unsorted_ids_equals_one_build(small_blocks: None) -> None:
    rng = np.random.default_rng(3)
    codes = _clustered(rng, 900, 128)
    ids = rng.permutation(900).astype(np.int64)
    q = _clustered(rng, 5, 128)
    whole = HammingIndex.from_arrays(codes, ids, 128)
    parts = HammingIndex(128)
    for s in range(0, 900, 250):
        parts.add(codes[s : s + 250], ids[s : s + 250])
        parts.search(q, 3)  # searching between adds must not lose anything
    assert parts.ntotal == 900
    for a, b in zip(whole.search(q, 60), parts.search(q, 60), strict=True):
        np.testing.assert_array_equal(a, b)
    # default ids continue from ntotal
    auto = HammingIndex(16)
    auto.add(_codes(rng, 3, 16))
    auto.add(_codes(rng, 2, 16))
    assert sorted(auto.search(_codes(rng, 1, 16), 5)[1][0].tolist()) == [0, 1, 2, 3, 4]


def test_sharded_merge_equals_single_index(small_blocks: None) -> None:
    rng = np.random.default_rng(4)
    bits = 64
    codes = _clustered(rng, 2000, bits)
    ids = rng.permutation(2000).astype(np.int64) * 7
    q = _clustered(rng, 8, bits)
    single = HammingIndex.from_arrays(codes, ids, bits).search(q, 50)
    cuts = [0, 300, 301, 1200, 2000]  # uneven shards, one of a single item
    parts = [
        HammingIndex.from_arrays(codes[a:b], ids[a:b], bits).search(q, 50)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    merged = merge_topk(parts, 50)
    np.testing.assert_array_equal(merged[0], single[0])
    np.testing.assert_array_equal(merged[1], single[1])
    assert merge_topk(parts, 5000)[0].shape == (8, sum(p[0].shape[1] for p in parts))


def test_merge_topk_ties_by_id_and_bad_parts() -> None:
    a = (np.array([[1, 3]], np.int32), np.array([[9, 4]], np.int64))
    b = (np.array([[1, 2]], np.int32), np.array([[2, 8]], np.int64))
    d, ids = merge_topk([a, b], 3)
    np.testing.assert_array_equal(d, [[1, 1, 2]])
    np.testing.assert_array_equal(ids, [[2, 9, 8]])
    with pytest.raises(SearchError, match="at least one"):
        merge_topk([], 3)
    with pytest.raises(SearchError, match="part 1"):
        merge_topk([a, (np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int64))], 3)
    with pytest.raises(SearchError, match="k must be"):
        merge_topk([a], 0)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, mmap: bool, small_blocks: None) -> None:
    rng = np.random.default_rng(5)
    codes = _clustered(rng, 1500, 128)
    ids = rng.permutation(1500).astype(np.int64) * 3 + 100  # not a range: an id file
    q = _clustered(rng, 4, 128)
    idx = HammingIndex.from_arrays(codes, ids, 128)
    idx.save(tmp_path / "idx")
    loaded = HammingIndex.load(tmp_path / "idx", mmap=mmap)
    assert loaded.bits == 128 and loaded.ntotal == 1500
    assert isinstance(loaded._codes, np.memmap) is mmap
    # mapped ids stay on disk (read for the returned rows only); loaded ones are held
    assert isinstance(loaded._ids, np.memmap) is mmap
    assert loaded.nbytes == 1500 * 16 + (0 if mmap else 1500 * 8)
    for a, b in zip(idx.search(q, 30), loaded.search(q, 30), strict=True):
        np.testing.assert_array_equal(a, b)
    # read-only queries (e.g. from bytes) are accepted
    ro = np.frombuffer(q.tobytes(), np.uint8).reshape(q.shape)
    np.testing.assert_array_equal(loaded.search(ro, 30)[1], idx.search(q, 30)[1])
    # a mapped index still accepts new codes (copied into memory)
    loaded.add(codes[:1], np.array([5], np.int64))
    d, got = loaded.search(codes[:1], 1)
    assert d[0, 0] == 0 and got[0, 0] == 5
    # the saved files are unchanged
    again = HammingIndex.load(tmp_path / "idx")
    assert again.ntotal == 1500


def test_positional_ids_hold_only_codes(tmp_path, small_blocks: None) -> None:
    """Ids that are positions, or any contiguous range, cost no memory and no file; the
    results are the same as with the ids spelled out."""
    rng = np.random.default_rng(15)
    codes = _clustered(rng, 1200, 64)
    q = _clustered(rng, 3, 64)
    pos = HammingIndex.from_arrays(codes, None, 64)
    assert pos.ids_are_positions and pos.nbytes == 1200 * 8
    shifted = HammingIndex.from_arrays(codes, np.arange(1200, dtype=np.int64) + 5000, 64)
    assert shifted.ids_are_positions and shifted.nbytes == 1200 * 8
    spelled = np.arange(1200, dtype=np.int64) * 2  # not contiguous: an id array
    held = HammingIndex.from_arrays(codes, spelled, 64)
    assert not held.ids_are_positions and held.nbytes == 1200 * 16
    d, i = pos.search(q, 20)
    np.testing.assert_array_equal(shifted.search(q, 20)[1], i + 5000)
    np.testing.assert_array_equal(held.search(q, 20)[1], i * 2)
    rd, ri = search_reference(codes, np.arange(1200), q, 20)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    # adds with default ids keep positions; an add out of order is sorted, then compacted again
    grown = HammingIndex(64)
    grown.add(codes[:700])
    grown.add(codes[700:])
    assert grown.ids_are_positions
    np.testing.assert_array_equal(grown.search(q, 20)[1], i)
    mixed = HammingIndex(64)
    mixed.add(codes[700:], np.arange(700, 1200))
    mixed.add(codes[:700], np.arange(700))
    assert mixed.ids_are_positions
    np.testing.assert_array_equal(mixed.search(q, 20)[1], i)
    # files: no id file for positions, and a shifted range keeps its base
    shifted.save(tmp_path / "s")
    assert not (tmp_path / "s" / "ids.npy").exists()
    back = HammingIndex.load(tmp_path / "s")
    assert back.ids_are_positions and back.nbytes == 1200 * 8
    np.testing.assert_array_equal(back.search(q, 20)[1], i + 5000)
    # an id file that holds a contiguous range is not mapped at all
    HammingIndex.from_arrays(codes, spelled, 64).save(tmp_path / "r")
    np.save(tmp_path / "r" / "ids.npy", np.arange(1200, dtype=np.int64) + 7)
    ranged = HammingIndex.load(tmp_path / "r")
    assert ranged.ids_are_positions
    np.testing.assert_array_equal(ranged.search(q, 20)[1], i + 7)


def test_reads_format_1_index(tmp_path) -> None:
    """An index written before ids could be positions (always an id file) still loads."""
    rng = np.random.default_rng(16)
    codes = _codes(rng, 50, 64)
    root = tmp_path / "v1"
    root.mkdir()
    np.save(root / "codes.npy", codes)
    np.save(root / "ids.npy", np.arange(50, dtype=np.int64) * 10)
    (root / "index.json").write_text('{"format_version": 1, "bits": 64, "ntotal": 50}')
    for mmap in (True, False):
        idx = HammingIndex.load(root, mmap=mmap)
        rd, ri = search_reference(codes, np.arange(50) * 10, codes[:3], 5)
        np.testing.assert_array_equal(idx.search(codes[:3], 5)[1], ri)


def test_positions_of() -> None:
    codes = np.zeros((6, 8), np.uint8)
    held = HammingIndex.from_arrays(codes, np.array([50, 10, 40, 30, 20, 0]), 64)
    np.testing.assert_array_equal(held.positions_of([0, 20, 50]), [0, 2, 5])
    shifted = HammingIndex.from_arrays(codes, np.arange(6) + 100, 64)
    np.testing.assert_array_equal(shifted.positions_of(np.array([[100, 105]])), [[0, 5]])
    for idx, missing in ((held, 25), (held, 60), (shifted, 99), (shifted, 106)):
        with pytest.raises(SearchError, match=f"id {missing} is not in the index"):
            idx.positions_of([missing])
    with pytest.raises(SearchError, match="integers"):
        held.positions_of([1.5])


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no search index"):
        HammingIndex.load(tmp_path / "missing")
    HammingIndex.from_arrays(np.zeros((3, 8), np.uint8), None, 64).save(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text('{"bits": 64, "ntotal": 4, "ids": "positions"}')
    with pytest.raises(SearchError, match="expected uint8"):
        HammingIndex.load(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text('{"bits": 64, "ntotal": 3, "format_version": 1}')
    with pytest.raises(SearchError, match="unreadable index arrays"):
        HammingIndex.load(tmp_path / "a")  # format 1 has an id file
    (tmp_path / "a" / "index.json").write_text("not json")
    with pytest.raises(SearchError, match="not a valid"):
        HammingIndex.load(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text('{"bits": 64, "ntotal": 3, "format_version": 9}')
    with pytest.raises(SearchError, match="newer"):
        HammingIndex.load(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text('{"bits": 64, "ntotal": 3, "ids": "names"}')
    with pytest.raises(SearchError, match="'positions' or 'file'"):
        HammingIndex.load(tmp_path / "a")
    # an id file that is not sorted, mapped or read
    HammingIndex.from_arrays(np.zeros((3, 8), np.uint8), [0, 5, 9], 64).save(tmp_path / "b")
    np.save(tmp_path / "b" / "ids.npy", np.array([0, 9, 5], np.int64))
    for mmap in (True, False):
        with pytest.raises(SearchError, match="not sorted"):
            HammingIndex.load(tmp_path / "b", mmap=mmap)
    np.save(tmp_path / "b" / "ids.npy", np.array([0, 9, 5], np.int32))
    with pytest.raises(SearchError, match="expected int64"):
        HammingIndex.load(tmp_path / "b")


def test_from_shards(tmp_path) -> None:
    rng = np.random.default_rng(6)
    bits = 32
    version = ix.new_version_id()
    vdir = ix.version_uri(str(tmp_path), version)
    shards = []
    for s in range(2):
        n = 5
        codes = _codes(rng, n, bits)
        t = ix.shard_table(
            [f"it{s}{i}" for i in range(n)],
            ["image", "text", "text", "image", "text"],
            [-1, 0, 1, -1, 0],
            codes,
            ["fp"] * n,
            "b",
            bits,
        )
        shards.append(ix.write_shard(vdir, t))
    m = ix.write_manifest(
        vdir, ix.IndexManifest(version=version, bundle_id="b", bits=bits, shards=tuple(shards))
    )
    codes, _, _, rows = ix.load_codes(m, "text")
    idx = HammingIndex.from_shards(m, "text")
    assert idx.ntotal == 6
    q = codes[:2]
    d, got = idx.search(q, 6)
    rd, rids = search_reference(codes, rows, q, 6)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(got, rids)
    assert HammingIndex.from_shards(m, "image", shards=[1]).ntotal == 2


def test_concurrent_searches_agree(small_blocks: None) -> None:
    rng = np.random.default_rng(7)
    codes = _clustered(rng, 3000, 64)
    q = _clustered(rng, 16, 64)
    idx = HammingIndex.from_arrays(codes, None, 64)
    want = idx.search(q, 25)
    got: list[tuple[np.ndarray, np.ndarray]] = []

    def one(i: int) -> None:
        got.append(idx.search(q[i : i + 1], 25))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16
    rows = {tuple(g[1][0].tolist()) for g in got}
    assert rows == {tuple(r.tolist()) for r in want[1]}


def test_bad_input_raises_search_error() -> None:
    idx = HammingIndex.from_arrays(np.zeros((5, 8), np.uint8), None, 64)
    with pytest.raises(SearchError, match=r"shape \(n, 8\) for 64-bit"):
        idx.search(np.zeros((2, 16), np.uint8), 3)
    with pytest.raises(SearchError, match="uint8"):
        idx.search(np.zeros((2, 8), np.int64), 3)
    with pytest.raises(SearchError, match="uint8"):
        idx.search(np.zeros((2, 8), bool), 3)
    with pytest.raises(SearchError, match=r"shape \(n, 8\)"):
        idx.search(np.zeros(8, np.uint8), 3)
    for bad_k in (0, -1, True, 2.0, "3", None):
        with pytest.raises(SearchError, match="k must be a positive integer"):
            idx.search(np.zeros((1, 8), np.uint8), bad_k)  # type: ignore[arg-type]
    assert idx.search(np.zeros((1, 8), np.uint8), np.int64(2))[0].shape == (1, 2)
    with pytest.raises(SearchError, match=r"ids must have shape \(3,\)"):
        idx.add(np.zeros((3, 8), np.uint8), np.arange(4))
    with pytest.raises(SearchError, match="ids must be integers"):
        idx.add(np.zeros((3, 8), np.uint8), np.arange(3, dtype=np.float64))
    with pytest.raises(SearchError, match=r"shape \(n, 8\)"):
        idx.add(np.zeros((3, 4), np.uint8))
    with pytest.raises(SearchError, match="multiple of 8"):
        HammingIndex(12)
    with pytest.raises(SearchError, match="thread count"):
        H.set_num_threads(0)
    assert issubclass(SearchError, ValueError)


def _search_in_child(conn: Any, codes: np.ndarray, q: np.ndarray) -> None:
    conn.send(HammingIndex.from_arrays(codes, None, 64).search(q, 10)[1])
    conn.close()


def test_search_after_fork(small_blocks: None) -> None:
    """A forked child (whose copy of the worker pool has no threads) still searches."""
    import multiprocessing as mp

    rng = np.random.default_rng(8)
    codes = _codes(rng, 2000, 64)
    q = _codes(rng, 3, 64)
    want = HammingIndex.from_arrays(codes, None, 64).search(q, 10)[1]  # parent pool in use
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_search_in_child, args=(child, codes, q))
    proc.start()
    assert parent.poll(60), "child search did not finish"
    np.testing.assert_array_equal(parent.recv(), want)
    proc.join(10)
    assert proc.exitcode == 0


# ---- multi-index hashing --------------------------------------------------------------------


def _mih_index(codes: np.ndarray, ids: np.ndarray | None, bits: int) -> HammingIndex:
    idx = HammingIndex.from_arrays(codes, ids, bits)
    idx.enable_mih()
    return idx


@pytest.fixture
def mih_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search tries MIH first and no query gives up (so MIH alone answers)."""
    monkeypatch.setattr(S, "choose_mih", lambda *a: True)
    monkeypatch.setattr(S, "_MIH_MIN_BUDGET", 1 << 60)


@pytest.mark.parametrize(
    ("bits", "n"), [(b, 3000) for b in ALL_BITS] + [(64, 70000), (24 * 8, 500)]
)
def test_mih_layout_covers_the_code(bits: int, n: int) -> None:
    starts, lens = H.mih_layout(bits, n)
    assert starts[0] == 0 and int(lens.sum()) == bits
    np.testing.assert_array_equal(starts[1:], np.cumsum(lens)[:-1])
    assert lens.max() - lens.min() <= 1 and lens.max() <= H._MIH_MAX_BITS
    target = int(np.clip(round(np.log2(n)), H._MIH_MIN_BITS, H._MIH_MAX_BITS))
    assert lens.max() <= target


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("kind", ["random", "clustered", "equal"])
def test_mih_equals_reference(bits: int, kind: str, mih_only: None) -> None:
    """MIH answers exactly what the reference does, ties by id included, with no query handed
    to the scan."""
    rng = np.random.default_rng(bits + len(kind))
    n = 3000
    if kind == "random":
        codes, q = _codes(rng, n, bits), _codes(rng, 12, bits)
    elif kind == "clustered":
        codes, q = _clustered(rng, n, bits), _clustered(rng, 12, bits)
    else:  # every code the same: all distances tie
        codes = np.repeat(_codes(rng, 1, bits), n, axis=0)
        q = np.concatenate([codes[:2], _codes(rng, 2, bits)])
    ids = rng.permutation(n).astype(np.int64) * 7
    idx = _mih_index(codes, ids, bits)
    for k in (1, 5, 64, n + 10):
        d, i = idx.search(q, k)
        rd, ri = search_reference(codes, ids, q, k)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(i, ri)
    assert idx.mih_stats["scanned"] == 0
    assert idx.mih_stats["mih_finished"] == idx.mih_stats["queries"] == 4 * q.shape[0]
    _, lens = H.mih_layout(bits, n)
    assert idx.mih_nbytes == len(lens) * (n * 4 + ((1 << int(lens.max())) + 1) * 4)


def test_choose_mih_prefers_the_faster_and_explores() -> None:
    assert H.choose_mih(None, None, 1) is True  # MIH unmeasured: try it
    assert H.choose_mih(1e-3, None, 2) is False  # then the scan
    assert H.choose_mih(1e-4, 1e-3, 3) is True and H.choose_mih(1e-3, 1e-4, 3) is False
    r = H._MIH_RETRY
    assert H.choose_mih(1e-4, 1e-3, r) is False and H.choose_mih(1e-3, 1e-4, 2 * r) is True


def test_mih_gives_up_to_the_scan_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny budget, queries far from everything give up and the scan answers them (same
    results); a batch mixing near-duplicates and such queries is split between the two."""
    monkeypatch.setattr(S, "choose_mih", lambda *a: True)
    monkeypatch.setattr(S, "_MIH_MIN_BUDGET", 50)
    monkeypatch.setattr(S, "_MIH_BUDGET_DIV", 1 << 30)
    rng = np.random.default_rng(3)
    codes = _codes(rng, 20000, 64)
    ids = np.arange(20000, dtype=np.int64)
    idx = _mih_index(codes, None, 64)
    q = _codes(rng, 6, 64)
    d, i = idx.search(q, 10)
    rd, ri = search_reference(codes, ids, q, 10)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    assert idx.mih_stats["scanned"] == 6 and idx.mih_stats["mih_finished"] == 0
    mixed = np.concatenate([codes[[5, 17]], q[:2]])
    d, i = idx.search(mixed, 1)
    rd, ri = search_reference(codes, ids, mixed, 1)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    assert idx.mih_stats["mih_finished"] == 2 and idx.mih_stats["scanned"] == 8


def test_mih_timing_chooses_between_both_methods() -> None:
    """Left to itself, the index measures both methods and keeps using one of them; the results
    stay exact whichever it picks."""
    rng = np.random.default_rng(4)
    codes = _clustered(rng, 30000, 64)
    idx = _mih_index(codes, None, 64)
    q = _clustered(rng, 3, 64)
    ref = search_reference(codes, np.arange(30000, dtype=np.int64), q, 5)
    for _ in range(40):
        for a, b in zip(idx.search(q, 5), ref, strict=True):
            np.testing.assert_array_equal(a, b)
    st = idx.mih_stats
    assert st["queries"] == 120
    assert 1 <= st["mih_calls"] <= 39  # both were measured
    t_mih, t_scan = idx._mih_time[(1, 5)]
    assert t_mih is not None and t_scan is not None


def test_mih_tables_follow_adds_and_mapped_indexes(tmp_path, mih_only: None) -> None:
    rng = np.random.default_rng(8)
    codes = _clustered(rng, 4000, 128)
    idx = _mih_index(codes[:3000], np.arange(3000, dtype=np.int64) * 2, 128)
    q = _clustered(rng, 5, 128)
    idx.search(q, 7)
    assert idx.mih_nbytes > 0
    idx.add(codes[3000:], np.arange(3000, 4000, dtype=np.int64) * 2 - 1)  # interleaved ids
    all_ids = np.concatenate([np.arange(3000) * 2, np.arange(3000, 4000) * 2 - 1]).astype(np.int64)
    d, i = idx.search(q, 7)
    rd, ri = search_reference(codes, all_ids, q, 7)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)
    idx.save(tmp_path / "m")
    mapped = HammingIndex.load(tmp_path / "m", mmap=True)
    mapped.enable_mih()
    for a, b in zip(mapped.search(q, 7), (rd, ri), strict=True):
        np.testing.assert_array_equal(a, b)
    assert mapped.mih_stats["mih_finished"] == 5
    mapped.enable_mih(False)
    assert mapped.mih_nbytes == 0
    np.testing.assert_array_equal(mapped.search(q, 7)[1], ri)


def test_a_small_scan_for_one_query_stays_on_one_thread() -> None:
    """Waking a thread costs about what one thread scans in a million rows for one query: a
    range is split only where each thread gets that much work (rows x queries)."""
    assert H._chunk_count(2, 100_000, 1, None) == 1  # a 1 % range of 10M rows, one query
    assert H._chunk_count(2, 10_000_000, 1, None) == 2  # the whole database
    assert H._chunk_count(2, 100_000, 32, None) == 2  # a batch gives each row more work
    assert H._chunk_count(2, 10_000, 1000, None) == 1  # never under _MIN_CHUNK rows a thread
    runs = np.arange(200_000, dtype=np.int64)  # candidates in runs: scanned in place
    assert (
        H._chunk_count(2, runs.size, 1, runs) == 1 and H._chunk_count(2, runs.size, 64, runs) == 1
    )
    assert H._chunk_count(2, 2_000_000, 64, np.arange(2_000_000, dtype=np.int64)) == 2
    scattered = np.arange(0, 4_000_000, 40, dtype=np.int64)  # gathered: its own minimum
    assert H._chunk_count(2, scattered.size, 1, scattered) == 2
