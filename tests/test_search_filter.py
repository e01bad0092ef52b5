"""Filtered Hamming search: metadata filters -> candidates -> exact top-k among them.

Every filtered search is checked against brute force: a slow row-by-row filter, then every
passing row ranked by (distance, position) with the numpy reference.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from duch_core import _search_kernel
from duch_core import filters as F
from duch_core import hamming_topk as H
from duch_core import item_metadata as M
from duch_core.filters import FilterError
from duch_core.hamming_topk import SearchError, search_reference
from duch_core.item_metadata import ItemMetadata
from duch_core.row_filter import RowFilter
from duch_core.search import HammingIndex

N = 3001  # not a multiple of any block, piece or chunk size
LABELS = ["forest", "river", "beach", "harbor", "desert", "airport"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture
def kernels_used(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each scan kernel."""
    calls = {"scan": 0, "masked": 0, "gather": 0}

    def scan_chunk(*a: Any) -> Any:
        calls["masked" if _search_kernel._any_test(a[9]) else "scan"] += 1
        return _search_kernel.scan_chunk(*a)

    def gather_chunk(*a: Any) -> Any:
        calls["gather"] += 1
        return _search_kernel.gather_chunk(*a)

    spy = SimpleNamespace(
        scan_chunk=scan_chunk,
        gather_chunk=gather_chunk,
        merge_chunks=_search_kernel.merge_chunks,
        filter_rows=_search_kernel.filter_rows,
    )
    monkeypatch.setattr(H, "_kernel", lambda: spy)
    return calls


def _clustered(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    """Few centres with sparse bit flips: small distances and many ties."""
    c = np.random.default_rng(99).integers(0, 256, (5, bits // 8), dtype=np.uint8)
    noise = rng.integers(0, 256, (3, n, bits // 8), dtype=np.uint8)
    return c[rng.integers(0, 5, n)] ^ (noise[0] & noise[1] & noise[2])


def _us(text: str) -> int:
    return (datetime.fromisoformat(text).replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)


def _metadata(rng: np.random.Generator, n: int = N, size: float = 30) -> dict[str, np.ndarray]:
    """Boxes of up to ``size`` x ``size / 3`` degrees anywhere (some across the antimeridian,
    some on it, some unknown), datetimes in 2020-2023 (some on midnight, some unknown), strings
    with gaps."""
    w = rng.uniform(-180, 180, n)
    width = rng.uniform(0, size, n)
    e = w + width
    e[e > 180] -= 360  # across the antimeridian: min_lon > max_lon
    w[rng.random(n) < 0.01] = -180.0
    e[rng.random(n) < 0.01] = 180.0
    s = rng.uniform(-90, 90, n)
    north = np.minimum(s + rng.uniform(0, size / 3, n), 90)
    unknown = rng.random(n) < 0.03
    for a in (w, s, e, north):
        a[unknown] = np.nan
    t = np.datetime64("2020-01-01", "us") + rng.integers(0, 4 * 365 * 86_400 * 10**6, n).astype(
        "timedelta64[us]"
    )
    t[rng.random(n) < 0.05] = np.datetime64("2021-06-30", "us")  # midnight, on a date bound
    t[rng.random(n) < 0.03] = np.datetime64("NaT")
    label = np.array(LABELS, dtype=object)[rng.integers(0, len(LABELS), n)]
    label[rng.random(n) < 0.02] = None
    split = np.array(["train", "val", "test"], dtype=object)[rng.integers(0, 3, n)]
    sensor = np.array(["S2A", "S2B", "L8"], dtype=object)[rng.integers(0, 3, n)]
    return {"min_lon": w, "min_lat": s, "max_lon": e, "max_lat": north, "datetime": t,
            "label": label, "split": split, "sensor": sensor}  # fmt: skip


# ---- the slow, obvious filter ---------------------------------------------------------------


def _lon_intervals(w: float, e: float) -> list[tuple[float, float]]:
    out = [(w, e)] if w <= e else [(w, 180.0), (-180.0, e)]
    # -180 and 180 are one meridian
    out += [(-180.0, -180.0)] if e == 180 else []
    out += [(180.0, 180.0)] if w == -180 else []
    return out


def _passes(row: dict[str, Any], spec: dict[str, Any]) -> bool:
    for key, want in spec.items():
        if key == "bbox":
            w, s, e, n = want
            iw, is_, ie, in_ = (row[c] for c in ("min_lon", "min_lat", "max_lon", "max_lat"))
            if any(math.isnan(v) for v in (iw, is_, ie, in_)):
                return False
            if not (is_ <= n and in_ >= s):
                return False
            if not any(
                a0 <= b1 and b0 <= a1
                for a0, a1 in _lon_intervals(w, e)
                for b0, b1 in _lon_intervals(iw, ie)
            ):
                return False
        elif key == "datetime":
            t = row["datetime"]
            if np.isnat(t):
                return False
            us = int(t.astype("datetime64[us]").astype(np.int64))
            lo, hi = (x.strip() for x in want.split("/")) if "/" in want else (want, want)
            if lo not in ("..", "") and us < _bound(lo, end=False):
                return False
            if hi not in ("..", "") and us > _bound(hi, end=True):
                return False
        else:
            allowed = [want] if isinstance(want, str) else want
            if row[key] is None or row[key] not in allowed:
                return False
    return True


def _bound(text: str, end: bool) -> int:
    if len(text) == 10:  # a date: its first or last microsecond
        day = _us(text + "T00:00:00")
        return day + 86_400_000_000 - 1 if end else day
    dt = datetime.fromisoformat(text)
    dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def _reference_rows(cols: dict[str, np.ndarray], spec: dict[str, Any]) -> np.ndarray:
    n = len(cols["label"])
    return np.array(
        [i for i in range(n) if _passes({k: v[i] for k, v in cols.items()}, spec)], np.int64
    )


def _brute_force(
    codes: np.ndarray, ids: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rank every passing row by (distance, position): the expected filtered result."""
    if rows.size == 0:
        return np.zeros((len(q), 0), np.int32), np.zeros((len(q), 0), np.int64)
    d, p = search_reference(codes[rows], rows, q, k)
    return d, ids[p]


SPECS: list[dict[str, Any]] = [
    {"bbox": [-10.0, 35.0, 30.0, 60.0]},
    {"bbox": [170.0, -20.0, -170.0, 20.0]},  # across the antimeridian
    {"bbox": [-180, -90, 180, 90]},
    {"datetime": "2021-01-01/2021-06-30"},
    {"datetime": "../2020-03-31"},
    {"datetime": "2023-06-01T12:00:00Z/.."},
    {"label": "river"},
    {"label": ["beach", "harbor"], "split": "test"},
    {"sensor": "L8", "datetime": "2020-06-01/2022-06-01", "bbox": [-60, -40, 60, 40]},
    {"label": "airport", "split": "val", "sensor": "S2A", "bbox": [100, 0, -100, 60]},
]


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
@pytest.mark.parametrize("spec", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_filtered_search_equals_brute_force(
    bits: int, spec: dict[str, Any], small_blocks: None
) -> None:
    rng = np.random.default_rng(bits)
    cols = _metadata(np.random.default_rng(1))
    meta = ItemMetadata.from_columns(**cols)
    codes = _clustered(rng, N, bits)
    q = np.concatenate([_clustered(rng, 5, bits), codes[[7]]])
    idx = HammingIndex.from_arrays(codes, None, bits)
    rows = _reference_rows(cols, spec)
    np.testing.assert_array_equal(F.candidate_positions(meta, spec), rows)
    np.testing.assert_array_equal(np.flatnonzero(F.filter_mask(meta, spec)), rows)
    mask = np.zeros(N, np.bool_)
    mask[rows] = True
    for k in (1, 7, 50):
        want = _brute_force(codes, np.arange(N), rows, q, k)
        for cand in (rows, mask, F.build_candidates(meta, spec)):
            d, i = idx.search(q, k, candidates=cand)
            assert d.dtype == np.int32 and i.dtype == np.int64
            assert d.shape == i.shape == (len(q), min(k, len(rows)))
            np.testing.assert_array_equal(d, want[0])
            np.testing.assert_array_equal(i, want[1])


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_both_kernels_at_every_candidate_count(
    bits: int, small_blocks: None, kernels_used: dict[str, int]
) -> None:
    """Filters keeping no row, one, fewer than k, many and all: positions are gathered; a mask
    is scanned, or turned into positions and gathered when sparse or searched by a large
    batch; results equal brute force either way."""
    rng = np.random.default_rng(bits + 1)
    codes = _clustered(rng, N, bits)
    queries = _clustered(rng, 40, bits)
    idx = HammingIndex.from_arrays(codes, None, bits)
    k = 20
    for keep in (0, 1, 7, 60, 600, N // 2, N):
        rows = np.sort(rng.choice(N, keep, replace=False)).astype(np.int64)
        mask = np.zeros(N, np.bool_)
        mask[rows] = True
        for nq in (1, 4, 40):
            q = queries[:nq]
            want = _brute_force(codes, np.arange(N), rows, q, k)
            mask_kernel = "gather" if H._mask_gathers(keep / N, nq) else "masked"
            for cand, kernel in ((rows, "gather"), (mask, mask_kernel)):
                before = dict(kernels_used)
                d, i = idx.search(q, k, candidates=cand)
                np.testing.assert_array_equal(d, want[0])
                np.testing.assert_array_equal(i, want[1])
                assert d.shape == (nq, min(k, keep))
                if keep:  # an empty candidate list runs no kernel
                    ran = {name for name in kernels_used if kernels_used[name] > before[name]}
                    assert ran == {kernel}, (keep, nq, ran)
    assert kernels_used["scan"] == 0
    assert kernels_used["masked"] > 0 and kernels_used["gather"] > 0


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_runs_of_consecutive_rows_equal_brute_force(bits: int, small_blocks: None) -> None:
    """Candidates in runs, as a filter on place or time keeps the chips of whole scenes: runs
    shorter and longer than the in-place threshold and than a block, next to single rows and
    across chunk boundaries, give the brute-force answer."""
    rng = np.random.default_rng(bits + 2)
    codes = _clustered(rng, N, bits)
    queries = _clustered(rng, 9, bits)
    idx = HammingIndex.from_arrays(codes, None, bits)
    lengths = [1, 2, 31, 32, 33, 63, 64, 65, 130, 1, 1, 200, 5, 700]
    for trial in range(4):
        rows, start = [], int(rng.integers(0, 5))
        for length in rng.permutation(lengths):
            if start + length > N:
                break
            rows.append(np.arange(start, start + length))
            start += int(length) + int(rng.integers(1, 40))  # a gap after every run
        cand = np.concatenate(rows).astype(np.int64)
        if trial == 3:
            cand = np.arange(N, dtype=np.int64)[N // 3 :]  # one run to the last row
        for nq in (1, 9):
            want = _brute_force(codes, np.arange(N), cand, queries[:nq], 25)
            d, i = idx.search(queries[:nq], 25, candidates=cand)
            np.testing.assert_array_equal(d, want[0])
            np.testing.assert_array_equal(i, want[1])


def _time_ordered(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``cols`` in the row order of an index in time order: by datetime, unknown last."""
    t = cols["datetime"].astype("datetime64[us]").astype(np.int64)
    key = np.where(np.isnat(cols["datetime"]), np.iinfo(np.int64).max, t)
    order = np.argsort(key, kind="stable")
    return {name: col[order] for name, col in cols.items()}


PLANNED_SPECS = [
    *SPECS,
    {"datetime": "2021-01-01/2021-06-30", "label": ["river", "beach"]},
    {"datetime": "2021-06-30", "bbox": [-180, -90, 180, 90]},
    {"datetime": "2022-01-01/..", "split": "val", "sensor": ["L8", "S2B"]},
    {"datetime": "1999-01-01/2000-01-01", "label": "river"},  # an empty range
    {"label": "no such label"},
]


@pytest.mark.parametrize("time_order", [False, True], ids=["any-order", "time-order"])
@pytest.mark.parametrize("below", [0.0, None, 1.0], ids=["in-scan", "planned", "positions"])
def test_every_candidate_form_the_planner_builds_equals_brute_force(
    time_order: bool, below: float | None, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_candidates gives a row range, positions or row tests applied in the scan; with the
    threshold forced either way and as planned, on rows in any order and in time order (where a
    datetime range is a range of rows), every form searches to the brute-force answer, and a
    row filter's own pass over its rows gives the reference rows."""
    if below is not None:
        monkeypatch.setattr(F, "_GATHER_BELOW", below)
    cols = _metadata(np.random.default_rng(1))
    if time_order:
        cols = _time_ordered(cols)
    meta = ItemMetadata.from_columns(**cols)
    assert meta.time_sorted == time_order and (meta.time_order is None) == time_order
    rng = np.random.default_rng(4)
    codes = _clustered(rng, N, 64)
    idx = HammingIndex.from_arrays(codes, None, 64)
    q = np.concatenate([_clustered(rng, 5, 64), codes[[7]]])
    forms = set()
    for spec in PLANNED_SPECS:
        rows = _reference_rows(cols, spec)
        cand = F.build_candidates(meta, spec)
        if isinstance(cand, RowFilter):
            forms.add("tests" if cand.tested else "range")
            np.testing.assert_array_equal(cand.positions(), rows)
            assert cand.fraction * (cand.hi - cand.lo) >= len(rows)  # an upper bound
        else:
            forms.add("positions" if len(cand) else "nothing")
            np.testing.assert_array_equal(cand, rows)
        for k in (1, 7, 50):
            for nq in (1, len(q)):
                want = _brute_force(codes, np.arange(N), rows, q[:nq], k)
                d, i = idx.search(q[:nq], k, candidates=cand)
                np.testing.assert_array_equal(d, want[0])
                np.testing.assert_array_equal(i, want[1])
    # at 1.0 only the whole-world box, whose bound is every row, is tested in the scan; a
    # filter nothing can pass (an unknown label, an empty time range) gives no positions
    expected = {0.0: {"tests"}, 1.0: {"positions", "tests"}, None: {"tests", "positions"}}[below]
    expected = expected | {"nothing"}
    if time_order:  # a datetime range alone is a row range
        expected = expected | {"range"}
    assert forms == expected


def test_row_filter_kernels_and_checks(small_blocks: None, kernels_used: dict[str, int]) -> None:
    """A row filter without tests scans its range; with tests it is scanned with them, or
    turned into positions and gathered when it keeps few rows or the batch is large; bad
    ranges and columns raise."""
    rng = np.random.default_rng(8)
    codes = _clustered(rng, N, 64)
    idx = HammingIndex.from_arrays(codes, None, 64)
    queries = _clustered(rng, 40, 64)
    classes = rng.integers(-1, 4, N).astype(np.int32)
    ok = np.array([True, False, True, False])
    for lo, hi, fraction, nq, kernel in [
        (0, N, 1.0, 1, "scan"),
        (100, 2500, 1.0, 40, "scan"),
        (100, 2500, 0.5, 1, "masked"),
        (100, 2500, 0.5, 40, "masked"),
        (100, 2500, 0.2, 40, "gather"),
        (0, N, 0.01, 1, "gather"),
    ]:
        tested = fraction < 1.0
        rf = RowFilter(lo, hi, fraction, classes=classes if tested else None,
                       class_ok=ok if tested else None)  # fmt: skip
        rows = np.arange(lo, hi)
        if tested:
            rows = rows[(classes[rows] >= 0) & ok[np.maximum(classes[rows], 0)]]
        before = dict(kernels_used)
        d, i = idx.search(queries[:nq], 20, candidates=rf)
        ran = {name for name in kernels_used if kernels_used[name] > before[name]}
        assert ran == {kernel}
        want = _brute_force(codes, np.arange(N), rows, queries[:nq], 20)
        np.testing.assert_array_equal(d, want[0])
        np.testing.assert_array_equal(i, want[1])
    # a class past the end of class_ok never passes (no read out of bounds)
    short = RowFilter(0, N, 0.5, classes=classes, class_ok=np.array([True]))
    np.testing.assert_array_equal(short.positions(), np.flatnonzero(classes == 0))
    assert idx.search(queries[:2], 5, candidates=RowFilter(7, 7))[0].shape == (2, 0)
    assert idx.search(queries[:0], 5, candidates=short)[0].shape == (0, 5)
    for bad, message in [
        (RowFilter(-1, 5), "range"),
        (RowFilter(0, N + 1), "range"),
        (RowFilter(5, 4), "range"),
        (RowFilter(0, N, classes=classes), "together"),
        (RowFilter(0, N, times=np.zeros(N - 1, np.int64)), "times"),
        (RowFilter(0, N, wraps=np.zeros(N, np.bool_)), "wraps"),
    ]:
        with pytest.raises(SearchError, match=message):
            idx.search(queries[:1], 3, candidates=bad)
        with pytest.raises(SearchError, match=message):
            idx.reference_search(queries[:1], 3, candidates=bad)


def test_class_row_lists_give_the_rows_of_a_pass(small_blocks: None) -> None:
    """A row filter whose only test is the class takes its rows from the class row lists
    (:attr:`ItemMetadata.class_rows`): the same rows as a pass over the range, for any range
    and set of classes; the lists are checked like the columns."""
    rng = np.random.default_rng(11)
    cols = _metadata(rng)
    meta = ItemMetadata.from_columns(**cols)
    assert meta.classes is not None and meta.class_rows is not None
    assert meta.class_starts is not None and meta.class_counts is not None
    c = meta.classes
    for k in range(len(meta.class_counts)):
        got = meta.class_rows[meta.class_starts[k] : meta.class_starts[k + 1]]
        np.testing.assert_array_equal(got, np.flatnonzero(c == k))
    lists = (meta.class_rows, meta.class_starts)
    n_cls = len(meta.class_counts)
    for ok in [
        np.zeros(n_cls, np.bool_),
        np.eye(1, n_cls, 0, dtype=np.bool_)[0],
        rng.random(n_cls) < 0.5,
        np.ones(n_cls, np.bool_),
        np.ones(max(1, n_cls // 2), np.bool_),  # classes past the end never pass
    ]:
        for lo, hi in [(0, N), (0, 17), (5, N - 5), (1000, 1001), (N, N)]:
            plain = RowFilter(lo, hi, 0.5, classes=c, class_ok=ok)
            listed = RowFilter(lo, hi, 0.5, classes=c, class_ok=ok, class_rows=lists)
            assert listed.by_class and not plain.by_class
            want = plain.positions()
            got = listed.positions()
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
            rows = np.arange(lo, hi)
            np.testing.assert_array_equal(
                want, rows[(c[rows] < len(ok)) & ok[np.minimum(c[rows], len(ok) - 1)]]
            )
    # with a time test too, the rows come from the pass
    timed = RowFilter(0, N, classes=c, class_ok=np.ones(n_cls, np.bool_), class_rows=lists,
                      times=meta.datetime_us, time_lo=0)  # fmt: skip
    assert not timed.by_class
    for bad in [
        RowFilter(
            0, N, classes=c, class_ok=np.ones(n_cls, np.bool_), class_rows=(lists[0][:-1], lists[1])
        ),
        RowFilter(
            0, N, classes=c, class_ok=np.ones(n_cls, np.bool_), class_rows=(lists[0], lists[1][:-1])
        ),
        RowFilter(0, N, class_rows=lists),
    ]:
        with pytest.raises(SearchError, match="class"):
            bad.check(N)


def test_ascending_positions_equal_a_sort_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct rows come back sorted, as int64, whether sorted by ``np.sort`` (few rows, or
    spread far) or through the bitset (many rows); repeated or negative rows raise."""
    from duch_core.hamming_topk import ascending_positions

    rng = np.random.default_rng(5)
    used: list[int] = []
    kernel = _search_kernel.ascending_rows
    monkeypatch.setattr(_search_kernel, "ascending_rows", lambda *a: used.append(1) or kernel(*a))
    for n, m, bitset in [
        (10, 0, False),
        (10, 1, False),
        (5000, 4095, False),  # under _BITSET_SORT_MIN
        (5000, 4096, True),
        (5_000_000, 4100, False),  # too sparse: more words than 8 per row
        (70_000, 65_536, True),
        (64 * 1000, 9000, True),  # rows at word edges included
    ]:
        rows = rng.permutation(n)[:m].astype(np.int32)
        if m > 2:  # the first and last row among them
            inner = rows[(rows != 0) & (rows != n - 1)][: m - 2]
            rows = np.concatenate([[n - 1], inner, [0]]).astype(np.int32)
        used.clear()
        got = ascending_positions(rows)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.sort(rows.astype(np.int64)))
        assert bool(used) == bitset, (n, m)
    ordered = np.arange(3, 9000, 2)
    assert ascending_positions(ordered) is not None and used == [1]  # in order: only checked
    np.testing.assert_array_equal(ascending_positions(ordered[::-1]), ordered)
    twice = np.concatenate([rng.permutation(8000), [17]])
    with pytest.raises(SearchError, match="1 rows repeat"):
        ascending_positions(twice)
    with pytest.raises(SearchError, match="negative"):
        ascending_positions(np.array([5, -1, 3]))


def test_row_classes_number_every_combination() -> None:
    """Each row's class stands for its combination of categorical values, with exact counts,
    through the dense table and through the sort (many possible combinations)."""
    rng = np.random.default_rng(2)
    for sizes in ([3, 20, 1], [5000, 5000], [2**21, 2**21, 2**21]):
        cols = [rng.integers(-1, s, 3000) for s in sizes]
        classes, codes, counts = M._classes(cols, sizes, 3000)
        assert classes is not None and codes is not None and counts is not None
        assert classes.dtype == np.int32
        np.testing.assert_array_equal(codes[classes], np.stack(cols, axis=1))
        np.testing.assert_array_equal(counts, np.bincount(classes))
        assert len(np.unique(codes, axis=0)) == len(codes)
    assert M._classes([], [], 5) == (None, None, None)


def test_time_sorted_rows_are_recognised() -> None:
    nat = np.iinfo(np.int64).min
    for t, want in [
        ([1, 2, 2, 5], (True, 4)),
        ([1, 2, nat, nat], (True, 2)),
        ([nat, nat], (True, 0)),
        ([nat] * 300, (True, 0)),
        ([4] + [nat] * 300, (True, 1)),
        ([], (True, 0)),
        ([1, nat, 3], (False, 0)),
        ([2, 1], (False, 0)),
        ([nat, 1], (False, 0)),
    ]:
        assert M._time_sorted(np.array(t, np.int64)) == want


def test_mask_conversion_rule() -> None:
    assert H._mask_gathers(0.01, 1) and H._mask_gathers(0.01, 1000)  # sparse: always
    assert not H._mask_gathers(0.5, 1) and H._mask_gathers(0.5, 32)  # broad: big batches
    assert not H._mask_gathers(1.0, 10_000)  # every row passes: nothing to save
    # a row filter costs more to convert (a pass over its columns), and its tests cost the
    # scan little: converted when sparse, or kept a small share for a large batch
    assert H._filter_gathers(0.01, 1) and H._filter_gathers(0.1, 32)
    assert not H._filter_gathers(0.1, 4) and not H._filter_gathers(0.5, 32)
    assert not H._filter_gathers(1.0, 10_000)
    # from the class row lists (no pass over the rows) it pays at smaller batches
    assert H._filter_gathers(0.1, 8, by_class=True) and not H._filter_gathers(0.1, 8)
    assert not H._filter_gathers(0.1, 1, by_class=True)
    # large masks: the fraction is estimated from spread runs
    rng = np.random.default_rng(0)
    for f in (0.0, 0.01, 0.3, 1.0):
        mask = rng.random(1_000_003) < f
        assert abs(H._mask_fraction(mask) - f) < 0.01
    assert H._mask_fraction(np.ones(10, np.bool_)) == 1.0


def test_filtered_search_with_ids_mapped_files_and_mih(tmp_path, small_blocks: None) -> None:
    """Candidates are positions in id order; results carry ids, whether the ids are held, a
    range, or a mapped file; MIH indexes filter through the same kernels."""
    rng = np.random.default_rng(5)
    codes = _clustered(rng, N, 64)
    q = _clustered(rng, 3, 64)
    ids = rng.permutation(N).astype(np.int64) * 3 + 11
    held = HammingIndex.from_arrays(codes, ids, 64)
    wanted_ids = np.sort(ids[rng.random(N) < 0.1])
    cand = held.positions_of(wanted_ids)
    keep = np.isin(ids, wanted_ids)
    want = search_reference(codes[keep], ids[keep], q, 30)
    for got in (held.search(q, 30, candidates=cand), held.reference_search(q, 30, cand)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    held.save(tmp_path / "held")
    mapped = HammingIndex.load(tmp_path / "held", mmap=True)
    mapped.enable_mih()
    for a, b in zip(mapped.search(q, 30, candidates=cand), want, strict=True):
        np.testing.assert_array_equal(a, b)
    shifted = HammingIndex.from_arrays(codes, np.arange(N) + 1000, 64)
    d, i = shifted.search(q, 30, candidates=cand)
    np.testing.assert_array_equal(i - 1000, _brute_force(codes, np.arange(N), cand, q, 30)[1])


def test_bad_candidates_raise_search_error(small_blocks: None) -> None:
    idx = HammingIndex.from_arrays(np.zeros((500, 8), np.uint8), None, 64)
    q = np.zeros((2, 8), np.uint8)
    for bad in ([3, 2], [1, 1], [0, 500], [-1, 4], list(range(100)) + [99]):
        for batch in (q, q[:0]):  # checked with or without a kernel run
            with pytest.raises(SearchError, match="strictly increasing row positions"):
                idx.search(batch, 5, candidates=np.array(bad))
    with pytest.raises(SearchError, match="integer array of row positions"):
        idx.search(q, 5, candidates=np.array([0.0, 1.0]))
    with pytest.raises(SearchError, match="integer array of row positions"):
        idx.search(q, 5, candidates=np.array([[0, 1]]))
    with pytest.raises(SearchError, match=r"mask must have shape \(500,\)"):
        idx.search(q, 5, candidates=np.ones(499, np.bool_))
    with pytest.raises(SearchError, match="row positions in 0..499"):
        idx.search(q, 5, candidates=np.array([2**63 + 5], np.uint64))
    # empty candidates: no results, still one row per query
    for empty in ([], np.zeros(0, np.int32), np.zeros(500, np.bool_)):
        d, i = idx.search(q, 5, candidates=empty)
        assert d.shape == i.shape == (2, 0)
    # other integer types and read-only arrays are accepted
    ro = np.arange(0, 500, 7, dtype=np.int32)
    ro.flags.writeable = False
    assert idx.search(q, 5, candidates=ro)[1].tolist() == [[0, 7, 14, 21, 28]] * 2


# ---- filters --------------------------------------------------------------------------------


def _boxes(*boxes: tuple[float, float, float, float]) -> ItemMetadata:
    a = np.array(boxes, np.float64)
    return ItemMetadata.from_columns(
        min_lon=a[:, 0], min_lat=a[:, 1], max_lon=a[:, 2], max_lat=a[:, 3]
    )


def test_bbox_antimeridian_and_edges() -> None:
    meta = _boxes(
        (175, -5, -175, 5),  # 0: item across the antimeridian
        (170, -5, 179, 5),  # 1: just west of it
        (-179, -5, -170, 5),  # 2: just east of it
        (0, 0, 10, 10),  # 3: far away
        (-180, 10, -178, 12),  # 4: touches -180
        (179.5, 40, 180, 41),  # 5: touches 180
        (-10, -90, 10, -80),  # 6: at the south pole
    )
    pos = lambda bbox: F.candidate_positions(meta, {"bbox": bbox}).tolist()  # noqa: E731
    assert pos([179.5, -1, -179.5, 1]) == [0]  # both across
    assert pos([178, -1, -178, 1]) == [0, 1, 2]
    assert pos([160, -10, -160, 10]) == [0, 1, 2, 4]  # 4 touches lat 10
    assert pos([176, -1, 178, 1]) == [0, 1]  # query west of 180, item 0 across
    assert pos([-177, -1, -176, 1]) == [0, 2]  # query east of -180
    assert pos([179, -5, 179, 5]) == [0, 1]  # a line on the edge of item 1
    assert pos([180, -90, 180, 90]) == [0, 4, 5]  # -180 and 180 are one meridian
    assert pos([-180, -90, -180, 90]) == [0, 4, 5]
    assert pos([170, 0, -170, 90]) == [0, 1, 2, 4, 5]
    assert pos([-180, -90, 180, 90]) == [0, 1, 2, 3, 4, 5, 6]
    assert pos([20, 0, 10, 10]) == [0, 1, 2, 3, 4]  # all but lon 10..20, lat 0..10
    assert pos([-5, -90, 5, -90]) == [6]
    assert pos([11, 0, 169, 90]) == []


def test_datetime_bounds() -> None:
    t = np.array(
        ["2024-06-30T00:00:00", "2024-06-30T23:59:59.999999", "2024-07-01T00:00:00",
         "2024-01-01T00:00:00", "NaT", "2023-12-31T23:00:00"],
        dtype="datetime64[us]",
    )  # fmt: skip
    meta = ItemMetadata.from_columns(datetime=t)
    pos = lambda dt: F.candidate_positions(meta, {"datetime": dt}).tolist()  # noqa: E731
    assert pos("../2024-06-30") == [0, 1, 3, 5]  # a date end keeps its whole day
    assert pos("2024-06-30") == [0, 1]  # a date alone is its day
    assert pos("2024-06-30T00:00:00Z") == [0]  # an instant is itself
    assert pos("2024-07-01/..") == [2]
    assert pos("2024-01-01T00:00:00+01:00/2024-01-01") == [3, 5]  # offsets are honoured
    assert pos("2023-12-31T23:00:00/2023-12-31T23:00:00") == [5]
    assert pos(" 2024-01-01 / 2024-06-30T00:00:00 ") == [0, 3]
    assert pos("20240630") == [0, 1]  # the basic format is a date too
    as_int = ItemMetadata.from_columns(datetime=t.view(np.int64))
    assert F.candidate_positions(as_int, {"datetime": "../2024-06-30"}).tolist() == [0, 1, 3, 5]
    assert F.parse_datetime_range("2024-01-01/..") == (_us("2024-01-01T00:00:00"), None)


def test_strings_and_combinations() -> None:
    meta = ItemMetadata.from_columns(
        label=["a", "b", None, "a", "c"], split=np.array(["train", "val", "train", "test", "val"])
    )
    pos = lambda spec: F.candidate_positions(meta, spec).tolist()  # noqa: E731
    assert pos({"label": "a"}) == [0, 3]
    assert pos({"label": ["a", "c", "zzz"]}) == [0, 3, 4]
    assert pos({"label": "zzz"}) == []
    assert pos({"label": ["a", "b", "c", "d", "e", "f"]}) == [0, 1, 3, 4]  # the lookup table
    assert pos({"label": "a", "split": "test"}) == [3]
    assert pos({}) == [0, 1, 2, 3, 4]
    assert F.build_candidates(meta, {}) is None
    assert F.filter_mask(meta, {"split": "val"}).tolist() == [False, True, False, False, True]
    # few rows pass (an exact count from the row classes): positions; many: tests in the scan
    assert F.build_candidates(meta, {"label": "zzz"}).tolist() == []
    broad = F.build_candidates(meta, {"label": "a", "split": ["train", "test"]})
    assert isinstance(broad, RowFilter) and broad.fraction == 2 / 5
    assert broad.positions().tolist() == [0, 3]


def test_survivors_are_filtered_on_gathered_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once few rows survive, later predicates are evaluated on them alone; same result."""
    cols = _metadata(np.random.default_rng(3))
    meta = ItemMetadata.from_columns(**cols)
    spec = {"label": "river", "bbox": [-120, -60, 120, 60], "datetime": "2021-01-01/.."}
    want = _reference_rows(cols, spec)
    for below in (0.0, 1.0):  # never / right away
        monkeypatch.setattr(F, "_GATHER_BELOW", below)
        np.testing.assert_array_equal(F.candidate_positions(meta, spec), want)
        np.testing.assert_array_equal(np.flatnonzero(F.filter_mask(meta, spec)), want)


def test_grid_and_time_index_select_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small boxes (most filed in the spatial grid) and random selective filters: the rows are
    the same through the indexes, without them, and row by row."""
    rng = np.random.default_rng(21)
    cols = _metadata(np.random.default_rng(22), n=4000, size=1.5)
    with_index = ItemMetadata.from_columns(**cols)
    without = ItemMetadata.from_columns(**cols, index=False)
    assert with_index.grid is not None and 0 < len(with_index.grid.loose) < 4000 // 2
    assert without.grid is None and without.time_order is None
    monkeypatch.setattr(F, "_GATHER_BELOW", 1.0)  # use an index whenever there is one
    for _ in range(40):
        w = float(rng.uniform(-180, 180))
        e = w + float(rng.uniform(0, 40))
        e = e - 360 if e > 180 else e
        s = float(rng.uniform(-90, 80))
        spec: dict[str, Any] = {"bbox": [w, s, e, min(90.0, s + float(rng.uniform(0, 15)))]}
        if rng.random() < 0.5:
            day = np.datetime64("2020-01-01") + int(rng.integers(0, 1400))
            spec["datetime"] = f"{day}/{day + int(rng.integers(0, 60))}"
        if rng.random() < 0.3:
            spec = {"datetime": spec.get("datetime", "2021-06-30")}
        want = _reference_rows(cols, spec)
        for meta in (with_index, without):
            np.testing.assert_array_equal(F.candidate_positions(meta, spec), want)
    for edge in ([180, -90, 180, 90], [-180, -90, -180, 90], [179.5, 0, -179.5, 90]):
        want = _reference_rows(cols, {"bbox": edge})
        np.testing.assert_array_equal(F.candidate_positions(with_index, {"bbox": edge}), want)


BAD_SPECS: list[tuple[Any, str | None, str]] = [
    ({"bbox": [0, 10, 5, 5]}, "bbox", "min_lat 10.0 is above max_lat 5.0"),
    ({"bbox": [-181, 0, 5, 5]}, "bbox", "min_lon -181.0 is outside"),
    ({"bbox": [0, 0, 180.5, 5]}, "bbox", "max_lon 180.5 is outside"),
    ({"bbox": [0, -91, 5, 5]}, "bbox", "min_lat -91.0 is outside"),
    ({"bbox": [0, 0, 5, 90.1]}, "bbox", "max_lat 90.1 is outside"),
    ({"bbox": [0, 0, float("nan"), 5]}, "bbox", "max_lon nan is outside"),
    ({"bbox": [0, 0, 5]}, "bbox", "4 numbers"),
    ({"bbox": [0, 0, 5, True]}, "bbox", "4 numbers"),
    ({"bbox": "0,0,5,5"}, "bbox", "must be"),
    ({"bbox": None}, "bbox", "must be"),
    ({"datetime": "2024-13-01/.."}, "datetime", "not an ISO 8601"),
    ({"datetime": "yesterday"}, "datetime", "not an ISO 8601"),
    ({"datetime": "2024-06-30/2024-01-01"}, "datetime", "start is after end"),
    ({"datetime": "2024-01-01T10:00:00Z/2024-01-01T09:00:00Z"}, "datetime", "start is after"),
    ({"datetime": "../.."}, "datetime", "at least one end"),
    ({"datetime": ".."}, "datetime", "names no instant"),
    ({"datetime": "2024-01-01/2024-02-01/2024-03-01"}, "datetime", "one instant or"),
    ({"datetime": 20240101}, "datetime", "ISO 8601 string"),
    ({"label": 3}, "label", "string or a list"),
    ({"label": []}, "label", "non-empty list"),
    ({"split": ["train", 1]}, "split", "non-empty list of strings"),
    ({"sensor": b"S2A"}, "sensor", "string or a list"),
    ({"cloud_cover": 10}, "cloud_cover", "unknown filter key"),
    ({"label": "a", "bbox ": [0, 0, 1, 1]}, "bbox ", "unknown filter key"),
    (["label", "a"], None, "must be a mapping"),
]


@pytest.mark.parametrize(("spec", "field", "message"), BAD_SPECS)
def test_every_filter_error_names_its_field(spec: Any, field: str | None, message: str) -> None:
    meta = ItemMetadata.from_columns(**_metadata(np.random.default_rng(0), n=10))
    for fn in (F.candidate_positions, F.filter_mask, F.build_candidates):
        with pytest.raises(FilterError, match=message) as err:
            fn(meta, spec)
        assert err.value.field == field
        assert isinstance(err.value, ValueError)


def test_filter_on_missing_metadata_and_bad_columns() -> None:
    meta = ItemMetadata.from_columns(label=["a", "b"])
    for key, value in (("bbox", [0, 0, 1, 1]), ("datetime", "2024-01-01"), ("sensor", "L8")):
        with pytest.raises(FilterError, match="no such metadata") as err:
            F.candidate_positions(meta, {key: value})
        assert err.value.field == key
    with pytest.raises(ValueError, match="all four bbox columns"):
        ItemMetadata.from_columns(min_lon=[0.0], max_lon=[1.0])
    with pytest.raises(ValueError, match="differ in length"):
        ItemMetadata.from_columns(label=["a"], split=["x", "y"])
    with pytest.raises(ValueError, match="datetime64 or int64"):
        ItemMetadata.from_columns(datetime=["2024-01-01"])
    with pytest.raises(ValueError, match="must hold strings"):
        ItemMetadata.from_columns(label=[1, 2])
