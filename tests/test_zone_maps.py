"""Zone maps: per run of consecutive rows, what the rows hold, so a filtered scan can pass over
zones where no row can pass. A zone map may keep a zone without a passing row, never drop one
with; searches through them equal brute force, and the scan really passes over what they drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_search_filter import (
    PLANNED_SPECS,
    _brute_force,
    _clustered,
    _metadata,
    _reference_rows,
)

from duch_core import filters as F
from duch_core import hamming_topk as H
from duch_core import zone_maps
from duch_core.hamming_topk import SearchError
from duch_core.item_metadata import NAT_US, ItemMetadata
from duch_core.row_filter import RowFilter
from duch_core.search import HammingIndex
from duch_core.zone_maps import MAX_CLASSES, ZoneMaps

N = 3001
SHIFT = 4  # 16-row zones: 188 of them over N rows


@pytest.fixture
def small_zones(monkeypatch: pytest.MonkeyPatch, small_blocks: None) -> None:
    """16-row zones, with tiny blocks, chunks and query batches (``small_blocks``), so N rows
    cross every boundary."""
    monkeypatch.setattr(zone_maps, "ZONE_SHIFT", SHIFT)


def _in_runs(cols: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``cols`` as the jobs lay an index out: runs of 1-120 consecutive rows (the chips of one
    tiling part) share one place, date, label, split and sensor; runs do not line up with
    zones."""
    n = len(cols["label"])
    cuts = np.sort(rng.choice(np.arange(1, n), n // 40, replace=False))
    starts = np.concatenate([[0], cuts])
    run = np.repeat(np.arange(starts.size), np.diff(np.concatenate([starts, [n]])))
    src = rng.integers(0, n, starts.size)[run]
    return {name: col[src] for name, col in cols.items()}


def _zone_truth(rows: np.ndarray, n: int, shift: int) -> np.ndarray:
    """Zones holding at least one of ``rows``."""
    z = np.zeros((n + (1 << shift) - 1) >> shift, np.bool_)
    z[rows >> shift] = True
    return z


@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_zones_keep_every_zone_with_a_passing_row(layout: str, small_zones: None) -> None:
    """For every filter form: each zone holding a passing row is kept; on rows laid out in
    runs, selective filters also drop zones (else the maps would be useless)."""
    rng = np.random.default_rng(5)
    cols = _metadata(np.random.default_rng(1))
    if layout == "runs":
        cols = _in_runs(cols, rng)
    meta = ItemMetadata.from_columns(**cols)
    assert meta.zones is not None and meta.zones.shift == SHIFT and meta.zones.zones == 188
    for spec in PLANNED_SPECS:
        rows = _reference_rows(cols, spec)
        preds = dict(F._predicates(meta, spec))
        cats = [(k, v) for k, v in preds.items() if k in ("label", "split", "sensor")]
        t = preds.get("datetime")
        zones = meta.zones.passing(
            class_ok=F._class_ok(meta, cats) if cats else None,
            time_range=None
            if t is None
            else (
                NAT_US + 1 if t[0] is None else t[0],
                np.iinfo(np.int64).max if t[1] is None else t[1],
            ),
            box=preds.get("bbox"),
        )
        assert zones is not None and zones.shape == (188,)
        truth = _zone_truth(rows, N, SHIFT)
        assert not np.any(truth & ~zones), spec  # never drops a zone with a passing row
        if layout == "runs" and rows.size < N // 20:  # selective: most zones dropped
            assert np.count_nonzero(zones) < 188 // 2, spec


@pytest.mark.parametrize("bits", [16, 64, 128])
def test_search_through_zone_maps_equals_brute_force(bits: int, small_zones: None) -> None:
    """Rows in runs: every filter the planner builds searches to the brute-force answer with
    its zones, by the scan and by the positions of its own pass."""
    rng = np.random.default_rng(bits)
    cols = _in_runs(_metadata(np.random.default_rng(1)), rng)
    meta = ItemMetadata.from_columns(**cols)
    codes = _clustered(rng, N, bits)
    idx = HammingIndex.from_arrays(codes, None, bits)
    q = np.concatenate([_clustered(rng, 5, bits), codes[[7, 2000]]])
    zoned = 0
    for spec in PLANNED_SPECS:
        rows = _reference_rows(cols, spec)
        cand = F.build_candidates(meta, spec)
        if isinstance(cand, RowFilter) and cand.zones is not None:
            zoned += 1
            assert cand.zone_fraction * (cand.hi - cand.lo) >= len(rows)
            np.testing.assert_array_equal(cand.positions(), rows)
        for k in (1, 7, 50):
            for nq in (1, len(q)):
                want = _brute_force(codes, np.arange(N), rows, q[:nq], k)
                d, i = idx.search(q[:nq], k, candidates=cand)
                np.testing.assert_array_equal(d, want[0])
                np.testing.assert_array_equal(i, want[1])
    assert zoned >= 5


def test_the_scan_passes_over_dropped_zones(small_zones: None) -> None:
    """A row filter whose zones drop everything finds nothing, in the scan and in its own pass
    (so the kernels read the zones); zones are checked like the columns."""
    rng = np.random.default_rng(3)
    codes = _clustered(rng, N, 64)
    idx = HammingIndex.from_arrays(codes, None, 64)
    classes = np.zeros(N, np.int32)
    ok = np.ones(1, np.bool_)
    zones = np.ones(188, np.bool_)
    full = RowFilter(0, N, classes=classes, class_ok=ok, zones=zones, zone_shift=SHIFT)
    d, i = idx.search(codes[:3], 10, candidates=full)
    want = _brute_force(codes, np.arange(N), np.arange(N), codes[:3], 10)
    np.testing.assert_array_equal(i, want[1])
    some = zones.copy()
    some[:100] = False  # rows 0:1600 dropped
    part = RowFilter(0, N, classes=classes, class_ok=ok, zones=some, zone_shift=SHIFT)
    d, i = idx.search(codes[:3], 10, candidates=part)
    assert i.shape == (3, 10) and int(i.min()) >= 1600
    np.testing.assert_array_equal(part.positions(), np.arange(1600, N))
    # the pass in pieces, one per thread: the same rows from any range starting on a zone edge
    # or in a marked zone, at any thread count (the rows of dropped zones pass the tests here,
    # so a piece not cut on a zone edge would show)
    for threads in (1, 2, 3, 7):
        H.set_num_threads(threads)
        for lo, hi in [(0, N), (48, N - 3), (32, 1650), (1600, 1700), (1601, 2999)]:
            cut = RowFilter(lo, hi, classes=classes, class_ok=ok, zones=some, zone_shift=SHIFT)
            np.testing.assert_array_equal(cut.positions(), np.arange(max(lo, 1600), hi))
    H.set_num_threads(3)
    none = RowFilter(0, N, classes=classes, class_ok=ok, zones=~zones, zone_shift=SHIFT)
    assert none.positions().size == 0
    with pytest.raises(SearchError, match=r"zones must have shape \(188,\)"):
        RowFilter(0, N, classes=classes, class_ok=ok, zones=zones[:-1], zone_shift=SHIFT).check(N)
    with pytest.raises(SearchError, match="zones only with a test"):
        RowFilter(0, N, zones=zones, zone_shift=SHIFT).check(N)


@pytest.mark.parametrize("n_classes", [1, 64, 65, 200, MAX_CLASSES])
def test_class_bitsets_hold_each_zones_classes(n_classes: int) -> None:
    """Bit c of a zone's words is set exactly when a row of the zone has class c (-1 sets
    none), across word boundaries and a short last zone; over MAX_CLASSES there is no class
    summary."""
    rng = np.random.default_rng(n_classes)
    n = 5000
    classes = np.repeat(rng.integers(-1, n_classes, n // 7 + 1), 7)[:n].astype(np.int32)
    classes[rng.random(n) < 0.05] = rng.integers(-1, n_classes)
    zm = ZoneMaps.build(n, classes=classes, n_classes=n_classes, shift=6)
    assert zm.classes is not None and zm.classes.shape == (79, (n_classes + 63) // 64)
    for z in range(79):
        present = {int(c) for c in classes[z * 64 : (z + 1) * 64] if c >= 0}
        bits = {
            w * 64 + b for w in range(zm.classes.shape[1]) for b in range(64)
            if (int(zm.classes[z, w]) >> b) & 1
        }  # fmt: skip
        assert bits == present, z
    ok = np.zeros(n_classes, np.bool_)
    ok[n_classes - 1] = True
    got = zm.passing(class_ok=ok)
    assert got is not None
    want = np.array([(classes[z * 64 : (z + 1) * 64] == n_classes - 1).any() for z in range(79)])
    np.testing.assert_array_equal(got, want)
    assert ZoneMaps.build(n, classes=classes, n_classes=MAX_CLASSES + 1).classes is None


def test_time_and_box_summaries_at_their_edges() -> None:
    """Zones with only unknown values never pass; bounds are inclusive; a box touching the
    antimeridian from either side, crossing it, or a zone with a row across it are kept."""
    nan = np.nan
    boxes = np.array(
        [
            [10, 10, 11, 11], [12, 10, 13, 11],  # zone 0: 10..13 E, 10..11 N
            [nan, nan, nan, nan], [nan, nan, nan, nan],  # zone 1: unknown
            [-180, 0, -179, 1], [-179, 0, -178, 1],  # zone 2: at -180
            [179, 0, 180, 1], [170, 0, 171, 1],  # zone 3: at 180
            [175, 5, -175, 6], [0, 5, 1, 6],  # zone 4: one row across the antimeridian
        ],
        np.float64,
    )  # fmt: skip
    cols = tuple(np.ascontiguousarray(boxes[:, i]) for i in range(4))
    wraps = cols[0] > cols[2]
    times = np.array([5, 9, NAT_US, NAT_US, 1, 1, 2, 2, 3, 3], np.int64)
    zm = ZoneMaps.build(10, times=times, bbox=cols, wraps=wraps, shift=1)

    def zones(**kw: Any) -> list[int]:
        got = zm.passing(**kw)
        assert got is not None
        return [int(z) for z in np.flatnonzero(got)]

    assert zones(time_range=(9, 9)) == [0]
    assert zones(time_range=(6, 8)) == [0]  # between a zone's min and max: may pass
    assert zones(time_range=(10, 100)) == []
    assert zones(time_range=(NAT_US + 1, 2**62)) == [0, 2, 3, 4]
    assert zones(box=(13.0, 11.0, 20.0, 20.0)) == [0]  # touches the corner
    assert zones(box=(150.0, -10.0, 180.0, 10.0)) == [2, 3, 4]  # 180 meets -180; zone 4 wraps
    assert zones(box=(-180.0, -10.0, -170.0, 10.0)) == [2, 3, 4]
    assert zones(box=(178.0, -10.0, -179.5, 10.0)) == [2, 3, 4]  # across the antimeridian
    assert zones(box=(0.0, 20.0, 1.0, 30.0)) == []
    assert zm.passing(class_ok=np.ones(3, np.bool_)) is None  # no class summary
