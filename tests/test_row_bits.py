"""Row bitmaps of categorical metadata and the class bitmap read in the scan.

Bitmaps are checked bit by bit against the columns; a search with a class bitmap against the
same search with the class column and against brute force (numpy reference over the rows
that pass).
"""

from __future__ import annotations

import numpy as np
import pytest

from duch_core import filters as F
from duch_core import row_bits
from duch_core.hamming_topk import SearchError, search_reference
from duch_core.item_metadata import ItemMetadata
from duch_core.row_filter import RowFilter
from duch_core.search import HammingIndex

N = 3001  # not a multiple of 64, nor of any block or piece


def _codes_with_gaps(rng: np.random.Generator, n: int, values: int) -> np.ndarray:
    codes = rng.integers(0, values, n).astype(np.int8)
    codes[rng.random(n) < 0.05] = -1  # missing
    return codes


def test_value_bitmaps_mark_each_value_and_nothing_past_the_rows() -> None:
    rng = np.random.default_rng(0)
    codes = _codes_with_gaps(rng, N, 5)
    maps = row_bits.value_bitmaps(codes, 5)
    assert maps is not None and maps.dtype == np.uint64
    assert maps.shape == (6, row_bits.words(N)) == (6, 47)
    rows = np.arange(N)
    for v in range(5):
        np.testing.assert_array_equal(row_bits.bits_of(maps[v], rows), codes == v)
    np.testing.assert_array_equal(row_bits.bits_of(maps[5], rows), codes >= 0)
    past = np.arange(N, 47 * 64)
    for m in maps:
        assert not row_bits.bits_of(m, past).any()
    assert row_bits.value_bitmaps(codes, row_bits.MAX_VALUES + 1) is None


def test_rows_with_picked_values_equal_the_column() -> None:
    """Every way of picking (none, one, a few, most, all) gives the rows holding a picked
    value; one value is that value's own bitmap (no copy); missing never passes."""
    rng = np.random.default_rng(1)
    codes = _codes_with_gaps(rng, N, 7)
    maps = row_bits.value_bitmaps(codes, 7)
    assert maps is not None
    rows = np.arange(N)
    picks = [np.zeros(7, np.bool_), np.eye(1, 7, 3, dtype=np.bool_)[0], np.ones(7, np.bool_)]
    picks += [rng.random(7) < p for p in (0.2, 0.5, 0.8) for _ in range(3)]
    for picked in picks:
        got = row_bits.rows_with(maps, picked)
        want = (codes >= 0) & picked[np.maximum(codes, 0)]
        np.testing.assert_array_equal(row_bits.bits_of(got, rows), want)
        assert not row_bits.bits_of(got, np.arange(N, 47 * 64)).any()
        if picked.sum() == 1:
            assert np.shares_memory(got, maps)
    with pytest.raises(ValueError, match="shape"):
        row_bits.rows_with(maps, np.ones(6, np.bool_))


@pytest.mark.parametrize("bits", [16, 24, 64, 128])
def test_a_class_bitmap_in_the_scan_equals_the_class_column(bits: int, small_blocks: None) -> None:
    """The scan with a class bitmap gives what it gives with the class column, and brute
    force, for ranges starting inside a byte of the bitmap, with and without a time test,
    one query and a batch; a row filter's pass over its rows reads the bitmap too."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 256, (N, bits // 8), dtype=np.uint8)
    idx = HammingIndex.from_arrays(codes, None, bits)
    classes = rng.integers(-1, 7, N).astype(np.int32)
    ok = rng.random(7) < 0.4
    ok[0] = True
    passing = (classes >= 0) & ok[np.maximum(classes, 0)]
    bitmap = row_bits.from_flags(passing)
    times = rng.integers(0, 100, N).astype(np.int64)
    q = np.concatenate([rng.integers(0, 256, (4, bits // 8), dtype=np.uint8), codes[[5, 9]]])
    for lo, hi in [(0, N), (3, 2999), (67, 700), (1000, 1001)]:
        for timed in (False, True):
            when = {"times": times if timed else None, "time_lo": 20, "time_hi": 80}
            column = RowFilter(lo, hi, 0.5, classes=classes, class_ok=ok, **when)
            mapped = RowFilter(lo, hi, 0.5, classes=classes, class_ok=ok, class_bits=bitmap, **when)
            rows = np.arange(lo, hi)
            rows = rows[passing[rows]]
            if timed:
                rows = rows[(times[rows] >= 20) & (times[rows] <= 80)]
            np.testing.assert_array_equal(mapped.positions(), rows)
            for k in (1, 5, 40):
                for nq in (1, len(q)):
                    d0, i0 = idx.search(q[:nq], k, candidates=column)
                    d1, i1 = idx.search(q[:nq], k, candidates=mapped)
                    np.testing.assert_array_equal(d1, d0)
                    np.testing.assert_array_equal(i1, i0)
                    if rows.size:
                        dw, pw = search_reference(codes[rows], rows, q[:nq], k)
                        np.testing.assert_array_equal(d1, dw)
                        np.testing.assert_array_equal(i1, pw)
                    else:
                        assert d1.shape == (nq, 0)
    for bad in [
        RowFilter(0, N, classes=classes, class_ok=ok, class_bits=bitmap[:-1]),
        RowFilter(0, N, class_bits=bitmap),
    ]:
        with pytest.raises(SearchError, match="class_bits"):
            idx.search(q[:1], 3, candidates=bad)


def _label_metadata(rng: np.random.Generator, index: bool = True) -> ItemMetadata:
    labels = np.array(["forest", "river", "beach", "harbor"], dtype=object)[rng.integers(0, 4, N)]
    labels[rng.random(N) < 0.03] = None
    split = np.array(["train", "val", "test"], dtype=object)[rng.integers(0, 3, N)]
    return ItemMetadata.from_columns(label=labels, split=split, index=index)


def test_the_planner_gives_the_class_bitmap_and_keeps_built_ones(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A categorical row filter carries the bitmap of its rows: one value's own bitmap, or one
    built and kept for the next search with the same values (at most ``_BITS_KEPT``); without
    the indexes it carries none, and both search to the same answer."""
    monkeypatch.setattr(F, "_GATHER_BELOW", 0.0)  # every filter tested in the scan
    rng = np.random.default_rng(5)
    meta = _label_metadata(rng)
    plain = _label_metadata(np.random.default_rng(5), index=False)
    assert set(meta.value_bits) == {"label", "split"} and not plain.value_bits
    codes = rng.integers(0, 256, (N, 8), dtype=np.uint8)
    idx = HammingIndex.from_arrays(codes, None, 64)
    q = rng.integers(0, 256, (3, 8), dtype=np.uint8)
    specs = [
        {"label": "river"},
        {"label": ["river", "beach"]},
        {"label": ["river", "beach", "harbor"]},  # more than half: by the complement
        {"label": ["forest", "river", "beach", "harbor"]},
        {"label": "beach", "split": ["val", "test"]},
        {"label": ["no such label"]},
    ]
    for spec in specs:
        cand = F.build_candidates(meta, spec)
        if not isinstance(cand, RowFilter):  # nothing passes: an empty list
            assert spec == specs[-1] and len(cand) == 0  # type: ignore[arg-type]
            continue
        assert cand.class_bits is not None and cand.classes is not None
        assert cand.class_ok is not None
        want = cand.class_ok[cand.classes]
        np.testing.assert_array_equal(row_bits.bits_of(cand.class_bits, np.arange(N)), want)
        if spec == specs[0]:
            assert np.shares_memory(cand.class_bits, meta.value_bits["label"])
        else:
            again = F.build_candidates(meta, spec)
            assert isinstance(again, RowFilter) and again.class_bits is cand.class_bits
        without = F.build_candidates(plain, spec)
        assert isinstance(without, RowFilter) and without.class_bits is None
        for k in (1, 10):
            d0, i0 = idx.search(q, k, candidates=without)
            d1, i1 = idx.search(q, k, candidates=cand)
            np.testing.assert_array_equal(d1, d0)
            np.testing.assert_array_equal(i1, i0)
    assert 0 < len(meta.bits_kept) <= F._BITS_KEPT
    monkeypatch.setattr(F, "_BITS_KEPT", 2)
    for pair in (["forest", "beach"], ["forest", "harbor"], ["beach", "harbor"]):
        F.build_candidates(meta, {"label": pair})
    assert len(meta.bits_kept) == 2  # the oldest went
    newest = F.build_candidates(meta, {"label": ["beach", "harbor"]})
    assert isinstance(newest, RowFilter)
    assert any(b is newest.class_bits for b in meta.bits_kept.values())
