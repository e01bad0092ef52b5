"""Retrieval metrics: hand-computed cases with Hamming ties, and parity with a Python-loop
reference (written from the reference code's definitions) on random codes. The expected value
over random tie orders is checked against enumerating every order on tiny cases and against
Monte-Carlo over random database orders on larger ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from duch_core.codes import CodeLengthError, hamming
from duch_core.metrics import (
    MetricError,
    average_precision_at_k,
    hamming_distances,
    map_at_k,
    pr_curve,
    precision_at_k,
    precision_within_radius,
    relevance,
    retrieval_report,
)

VARIANTS = ("djsrh", "standard")

# ---------------------------------------------------------------------------------------------
# slow references: one query at a time, plain Python


def _ranking(q: np.ndarray, db: np.ndarray) -> list[list[int]]:
    d = hamming(q, db)
    return [sorted(range(db.shape[0]), key=lambda j, i=i: (d[i, j], j)) for i in range(q.shape[0])]


def ref_map(q, db, rel, k, variant):
    total = 0.0
    for i, order in enumerate(_ranking(q, db)):
        g = [bool(rel[i, j]) for j in order]
        r = sum(g)
        if r == 0:
            continue
        t = min(k, r)
        if variant == "djsrh":
            pos = [p + 1 for p, x in enumerate(g) if x][:t]
            total += sum((j + 1) / p for j, p in enumerate(pos)) / t
        else:
            hits, s = 0, 0.0
            for p, x in enumerate(g[:k], start=1):
                if x:
                    hits += 1
                    s += hits / p
            total += s / t
    return total / q.shape[0]


def ref_p_at_k(q, db, rel, k):
    n = db.shape[0]
    kk = min(k, n)
    return float(
        np.mean(
            [sum(rel[i, j] for j in order[:kk]) / kk for i, order in enumerate(_ranking(q, db))]
        )
    )


def ref_radius(q, db, rel, r):
    d = hamming(q, db)
    out = []
    for i in range(q.shape[0]):
        got = [j for j in range(db.shape[0]) if d[i, j] <= r]
        out.append(sum(rel[i, j] for j in got) / len(got) if got else 0.0)
    return float(np.mean(out))


def ref_pr(q, db, rel):
    # the reference pr_curve: P averaged over queries with P > 0, R averaged over all queries
    bits = 8 * q.shape[1]
    d = hamming(q, db)
    P = np.zeros((q.shape[0], bits + 1))
    R = np.zeros((q.shape[0], bits + 1))
    for i in range(q.shape[0]):
        tsum = rel[i].sum()
        if tsum == 0:
            continue
        for r in range(bits + 1):
            got = d[i] <= r
            total = got.sum() or 0.1
            count = (got & rel[i]).sum()
            P[i, r] = count / total
            R[i, r] = count / tsum
    mask = (P > 0).sum(0).astype(float)
    mask[mask == 0] = 0.1
    return P.sum(0) / mask, R.mean(0)


def _code_at(d: int) -> int:
    """An 8-bit code at Hamming distance d from 0x00."""
    return (0xFF << (8 - d)) & 0xFF


# ---------------------------------------------------------------------------------------------
# hand-computed

# database distances to query 0 and relevance to it; ties at distance 0 (rows 1, 4) and 1 (0, 2).
# Ranking by (distance, position): rows 1, 4, 0, 2, 3 -> relevance in rank order 0, 1, 1, 0, 1.
DIST = [1, 0, 1, 2, 0]
DB = np.array([[_code_at(d)] for d in DIST], dtype=np.uint8)
Q = np.array([[0x00], [0x00]], dtype=np.uint8)
DB_LABELS = ["a", "b", "c", "a", "a"]
Q_LABELS = ["a", "z"]  # the second query has no relevant item: scores 0, still counted


@pytest.mark.parametrize(
    ("k", "variant", "ap0"),
    [
        (1, "djsrh", 1 / 2),  # T=1: first relevant at rank 2
        (1, "standard", 0.0),  # nothing relevant in the top 1
        (2, "djsrh", (1 / 2 + 2 / 3) / 2),  # the 2nd relevant (rank 3) counts although 3 > K
        (2, "standard", (1 / 2) / 2),
        (5, "djsrh", (1 / 2 + 2 / 3 + 3 / 5) / 3),
        (5, "standard", (1 / 2 + 2 / 3 + 3 / 5) / 3),
        (50, "djsrh", (1 / 2 + 2 / 3 + 3 / 5) / 3),
    ],
)
def test_map_hand_computed_with_ties(k, variant, ap0):
    ap = average_precision_at_k(Q, DB, Q_LABELS, DB_LABELS, k, variant)
    np.testing.assert_allclose(ap, [ap0, 0.0], rtol=1e-12)
    assert map_at_k(Q, DB, Q_LABELS, DB_LABELS, k, variant) == pytest.approx(ap0 / 2)


def test_tie_break_is_by_database_position():
    # swapping the two distance-0 rows changes the answer: rows 1 and 4 tie, row 1 ranks first
    swapped = DB[[0, 4, 2, 3, 1]]
    labels = [DB_LABELS[i] for i in (0, 4, 2, 3, 1)]
    assert map_at_k(Q[:1], DB, Q_LABELS[:1], DB_LABELS, 1) == pytest.approx(0.5)
    assert map_at_k(Q[:1], swapped, Q_LABELS[:1], labels, 1) == pytest.approx(1.0)


def test_precision_hand_computed():
    p = precision_at_k(Q[:1], DB, Q_LABELS[:1], DB_LABELS, ks=[1, 2, 5, 100])
    assert p == pytest.approx({1: 0.0, 2: 0.5, 5: 0.6, 100: 0.6})
    pr = precision_within_radius(Q[:1], DB, Q_LABELS[:1], DB_LABELS, radii=[0, 1, 2, 8, 20])
    assert pr == pytest.approx({0: 0.5, 1: 0.5, 2: 0.6, 8: 0.6, 20: 0.6})
    # both queries: the unlabelled-match query contributes 0 everywhere
    assert precision_within_radius(Q, DB, Q_LABELS, DB_LABELS, radii=[0])[0] == pytest.approx(0.25)


def test_pr_curve_hand_computed():
    out = pr_curve(Q, DB, Q_LABELS, DB_LABELS)
    assert out["radius"].tolist() == list(range(9))
    np.testing.assert_allclose(out["precision"][:3], [0.5, 0.5, 0.6])
    # recall over both queries: the second has nothing relevant and counts 0
    np.testing.assert_allclose(out["recall"][:3], [1 / 6, 2 / 6, 3 / 6])
    assert out["recall"][-1] == pytest.approx(0.5)


def test_relevance_kinds():
    rel = relevance(["a", "b", None], ["b", "a", None, "a"])
    assert rel.tolist() == [
        [False, True, False, True],
        [True, False, False, False],
        [False, False, False, False],  # unlabelled is relevant to nothing, not even unlabelled
    ]
    assert relevance(np.array([3, 1]), [1, 3, 3]).tolist() == [
        [False, True, True],
        [True, False, False],
    ]
    multi = relevance(np.array([[1, 0, 1], [0, 1, 0]]), np.array([[0, 0, 1], [1, 1, 0], [0, 0, 0]]))
    assert multi.tolist() == [[True, True, False], [False, True, False]]
    with pytest.raises(MetricError, match="both"):
        relevance(["a"], np.eye(3))
    with pytest.raises(MetricError, match="widths"):
        relevance(np.eye(2), np.eye(3))


def test_retrieval_report_directions():
    rng = np.random.default_rng(0)
    img_q, txt_q = (
        rng.integers(0, 256, (6, 2), dtype=np.uint8),
        rng.integers(0, 256, (6, 2), dtype=np.uint8),
    )
    img_db, txt_db = (
        rng.integers(0, 256, (9, 2), dtype=np.uint8),
        rng.integers(0, 256, (9, 2), dtype=np.uint8),
    )
    ql, dl = rng.integers(0, 3, 6), rng.integers(0, 3, 9)
    rep = retrieval_report(img_q, txt_q, img_db, txt_db, ql, dl, k=4)
    assert rep == {
        "i2t": map_at_k(img_q, txt_db, ql, dl, 4),
        "t2i": map_at_k(txt_q, img_db, ql, dl, 4),
        "i2i": map_at_k(img_q, img_db, ql, dl, 4),
        "t2t": map_at_k(txt_q, txt_db, ql, dl, 4),
    }
    # identical codes for both modalities and per-class codes: perfect retrieval
    codes_q = np.array([[c * 85] for c in ql], dtype=np.uint8)
    codes_db = np.array([[c * 85] for c in dl], dtype=np.uint8)
    perfect = retrieval_report(codes_q, codes_q, codes_db, codes_db, ql, dl, k=4)
    has_rel = np.mean([(dl == c).any() for c in ql])
    assert all(v == pytest.approx(has_rel) for v in perfect.values())


# ---------------------------------------------------------------------------------------------
# parity with the references on random data (short codes -> many ties)


@pytest.mark.parametrize("bytes_", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_reference_on_random_codes(bytes_, seed):
    rng = np.random.default_rng(seed)
    nq, ndb = 23, 61
    q = rng.integers(0, 256, (nq, bytes_), dtype=np.uint8)
    db = rng.integers(0, 256, (ndb, bytes_), dtype=np.uint8)
    if bytes_ == 1:  # force many exact ties on top of the random ones
        db[::3] = db[0]
    ql = rng.integers(0, 5, nq)
    dl = rng.integers(0, 5, ndb)
    ql[0] = 99  # a query without relevant items
    rel = relevance(ql, dl)
    np.testing.assert_array_equal(hamming_distances(q, db), hamming(q, db))
    for k in (1, 5, 20, 100):
        for variant in ("djsrh", "standard"):
            assert map_at_k(q, db, ql, dl, k, variant) == pytest.approx(
                ref_map(q, db, rel, k, variant), abs=1e-12
            ), (k, variant)
        assert map_at_k(q, db, ql, dl, k, "djsrh") >= map_at_k(q, db, ql, dl, k, "standard")
    ks = [1, 3, 10, 61, 200]
    p = precision_at_k(q, db, ql, dl, ks)
    for k in ks:
        assert p[k] == pytest.approx(ref_p_at_k(q, db, rel, k), abs=1e-12)
    radii = list(range(0, 8 * bytes_ + 2, 3))
    pr = precision_within_radius(q, db, ql, dl, radii)
    for r in radii:
        assert pr[r] == pytest.approx(ref_radius(q, db, rel, r), abs=1e-12)
    curve = pr_curve(q, db, ql, dl)
    ref_p, ref_r = ref_pr(q, db, rel)
    np.testing.assert_allclose(curve["precision"], ref_p, atol=1e-12)
    np.testing.assert_allclose(curve["recall"], ref_r, atol=1e-12)
    assert np.all(np.diff(curve["recall"]) >= 0)


def test_blocked_evaluation_matches_one_block(monkeypatch):
    import duch_core.metrics as m

    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, (40, 2), dtype=np.uint8)
    db = rng.integers(0, 256, (50, 2), dtype=np.uint8)
    ql, dl = rng.integers(0, 4, 40), rng.integers(0, 4, 50)
    whole = m.average_precision_at_k(q, db, ql, dl, 10)
    monkeypatch.setattr(m, "_BLOCK_ELEMENTS", 120)  # 2 queries per block
    np.testing.assert_array_equal(m.average_precision_at_k(q, db, ql, dl, 10), whole)
    assert m.precision_at_k(q, db, ql, dl, [5]) == pytest.approx(
        {5: ref_p_at_k(q, db, relevance(ql, dl), 5)}
    )


def test_long_codes_and_larger_sizes():
    rng = np.random.default_rng(4)
    q = rng.integers(0, 256, (30, 16), dtype=np.uint8)  # 128 bits
    db = rng.integers(0, 256, (300, 16), dtype=np.uint8)
    ql, dl = rng.integers(0, 7, 30), rng.integers(0, 7, 300)
    np.testing.assert_array_equal(hamming_distances(q, db), hamming(q, db))
    assert map_at_k(q, db, ql, dl, 20) == pytest.approx(
        ref_map(q, db, relevance(ql, dl), 20, "djsrh")
    )


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    q = np.zeros((2, 2), dtype=np.uint8)
    db = np.zeros((3, 2), dtype=np.uint8)
    with pytest.raises(CodeLengthError, match="16 bits but database codes are 8 bits"):
        map_at_k(q, db[:, :1], [0, 1], [0, 1, 2], 5)
    with pytest.raises(CodeLengthError, match="uint8"):
        map_at_k(q.astype(np.int64), db, [0, 1], [0, 1, 2], 5)
    with pytest.raises(MetricError, match="relevance matrix"):
        map_at_k(q, db, [0, 1, 2], [0, 1, 2], 5)
    with pytest.raises(MetricError, match="positive integer"):
        map_at_k(q, db, [0, 1], [0, 1, 2], 0)
    with pytest.raises(MetricError, match="variant"):
        map_at_k(q, db, [0, 1], [0, 1, 2], 5, variant="trec")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="at least one"):
        map_at_k(q[:0], db, [], [0, 1, 2], 5)
    with pytest.raises(MetricError, match="non-negative"):
        precision_within_radius(q, db, [0, 1], [0, 1, 2], radii=[-1])
    with pytest.raises(MetricError, match="ties"):
        map_at_k(q, db, [0, 1], [0, 1, 2], 5, ties="random")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="ties"):
        precision_at_k(q, db, [0, 1], [0, 1, 2], [5], ties="random")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# expected value over random orders inside groups of tied items


def _ap_of_ranking(g: list[bool], k: int, variant: str) -> float:
    """AP of one ranked relevance list, straight from the definitions in :func:`map_at_k`."""
    r = sum(g)
    if r == 0:
        return 0.0
    t = min(k, r)
    if variant == "djsrh":
        pos = [p + 1 for p, x in enumerate(g) if x][:t]
        return sum((j + 1) / p for j, p in enumerate(pos)) / t
    hits, s = 0, 0.0
    for p, x in enumerate(g[:k], start=1):
        if x:
            hits += 1
            s += hits / p
    return s / t


def brute_force_expected(dist_row, rel_row, k, variant=None):
    """Mean AP (variant given) or mean ``P@k`` (variant None) over every order inside every tie
    group: all permutations of all groups, enumerated."""
    groups = [[j for j in range(len(dist_row)) if dist_row[j] == v] for v in sorted(set(dist_row))]
    vals = []
    for perms in itertools.product(*(itertools.permutations(gr) for gr in groups)):
        g = [bool(rel_row[j]) for p in perms for j in p]
        if variant is None:
            kk = min(k, len(g))
            vals.append(sum(g[:kk]) / kk)
        else:
            vals.append(_ap_of_ranking(g, k, variant))
    return float(np.mean(vals))


@pytest.mark.parametrize(
    ("k", "variant", "ap0"),
    [
        # ranks 1-2 hold one relevant item of two in random order, ranks 3-4 one of two, rank 5
        # the last relevant item
        (1, "djsrh", (1 / 1 + 1 / 2) / 2),  # the first relevant item at rank 1 or 2
        (1, "standard", 1 / 2),  # P(rank 1 relevant) * 1/1
        (2, "djsrh", ((1 + 1 / 2) / 2 + 2 * (1 / 3 + 1 / 4) / 2) / 2),
        (2, "standard", ((1 + 1 / 2) / 2) / 2),
        (5, "standard", ((1 + 1 / 2) / 2 + 2 * (1 / 3 + 1 / 4) / 2 + 3 / 5) / 3),
    ],
)
def test_expected_ties_hand_computed(k, variant, ap0):
    ap = average_precision_at_k(Q, DB, Q_LABELS, DB_LABELS, k, variant, ties="expected")
    np.testing.assert_allclose(ap, [ap0, 0.0], rtol=1e-12)


def test_expected_ties_is_the_default_off():
    # the default stays "position": same numbers as before the option existed
    for variant in VARIANTS:
        np.testing.assert_array_equal(
            average_precision_at_k(Q, DB, Q_LABELS, DB_LABELS, 2, variant),
            average_precision_at_k(Q, DB, Q_LABELS, DB_LABELS, 2, variant, ties="position"),
        )
    assert map_at_k(Q[:1], DB, Q_LABELS[:1], DB_LABELS, 1) == pytest.approx(0.5)
    assert map_at_k(Q[:1], DB, Q_LABELS[:1], DB_LABELS, 1, ties="expected") == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(6))
def test_expected_ties_equal_enumeration_of_all_tie_orders(seed):
    rng = np.random.default_rng(seed)
    nq, ndb = 4, int(rng.integers(3, 8))
    # few distinct codes: large groups of tied items, groups straddling K and T
    pool = rng.integers(0, 256, (3, 1), dtype=np.uint8)
    db = pool[rng.integers(0, len(pool), ndb)]
    q = rng.integers(0, 256, (nq, 1), dtype=np.uint8)
    ql, dl = rng.integers(0, 2, nq), rng.integers(0, 3, ndb)
    ql[-1] = 7  # nothing relevant
    d, rel = hamming(q, db), relevance(ql, dl)
    for k in (1, 2, 3, 5, 50):
        for variant in VARIANTS:
            want = [brute_force_expected(list(d[i]), rel[i], k, variant) for i in range(nq)]
            got = average_precision_at_k(q, db, ql, dl, k, variant, ties="expected")
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{k} {variant}")
        p = precision_at_k(q, db, ql, dl, [k], ties="expected")[k]
        want_p = np.mean([brute_force_expected(list(d[i]), rel[i], k) for i in range(nq)])
        assert p == pytest.approx(want_p, abs=1e-12)


@pytest.mark.parametrize("bytes_", [1, 2])
def test_expected_ties_agree_with_monte_carlo_over_database_orders(bytes_):
    # Shuffling the database and breaking ties by position draws a uniformly random order inside
    # every tie group: the mean over many shuffles estimates the expectation.
    rng = np.random.default_rng(10 + bytes_)
    nq, ndb, samples = 12, 150, 3000
    q = rng.integers(0, 256, (nq, bytes_), dtype=np.uint8)
    db = rng.integers(0, 256, (ndb, bytes_), dtype=np.uint8)
    if bytes_ == 1:
        db = (db & 0x0F) | (q[0] & 0xF0)  # many ties near the first query
    ql, dl = rng.integers(0, 4, nq), rng.integers(0, 4, ndb)
    for k, variant in [(20, "djsrh"), (20, "standard"), (5, "djsrh"), (60, "djsrh")]:
        draws = np.empty((samples, nq))
        for s in range(samples):
            perm = rng.permutation(ndb)
            draws[s] = average_precision_at_k(q, db[perm], ql, dl[perm], k, variant)
        exact = average_precision_at_k(q, db, ql, dl, k, variant, ties="expected")
        se = draws.std(axis=0) / np.sqrt(samples)
        assert np.all(np.abs(draws.mean(axis=0) - exact) <= 5 * se + 1e-12), (k, variant)
        # the tie order matters here: the single orders spread around the expectation
        assert draws.std(axis=0).max() > 1e-3


def test_expected_ties_do_not_depend_on_database_order():
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, (20, 1), dtype=np.uint8)
    db = rng.integers(0, 256, (90, 1), dtype=np.uint8)
    ql, dl = rng.integers(0, 3, 20), rng.integers(0, 3, 90)
    perm = rng.permutation(90)
    for variant in VARIANTS:
        a = average_precision_at_k(q, db, ql, dl, 20, variant, ties="expected")
        b = average_precision_at_k(q, db[perm], ql, dl[perm], 20, variant, ties="expected")
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        pos_a = average_precision_at_k(q, db, ql, dl, 20, variant)
        pos_b = average_precision_at_k(q, db[perm], ql, dl[perm], 20, variant)
        assert not np.allclose(pos_a, pos_b)  # the position tie-break does depend on it
    pa = precision_at_k(q, db, ql, dl, [1, 7, 90], ties="expected")
    pb = precision_at_k(q, db[perm], ql, dl[perm], [1, 7, 90], ties="expected")
    assert pa == pytest.approx(pb, abs=1e-12)


def test_expected_ties_without_ties_equal_position():
    # eight database items at distinct distances 0..7 from the query: nothing to average
    db = np.array([[_code_at(d)] for d in (3, 0, 7, 1, 5, 2, 6, 4)], dtype=np.uint8)
    q = np.zeros((1, 1), dtype=np.uint8)
    ql, dl = [1], [1, 0, 1, 1, 0, 0, 1, 1]
    for k in (1, 3, 8):
        for variant in VARIANTS:
            assert map_at_k(q, db, ql, dl, k, variant, ties="expected") == pytest.approx(
                map_at_k(q, db, ql, dl, k, variant), abs=1e-15
            )
    assert precision_at_k(q, db, ql, dl, [1, 3, 8], ties="expected") == pytest.approx(
        precision_at_k(q, db, ql, dl, [1, 3, 8]), abs=1e-15
    )


def test_expected_ties_blocked_and_in_retrieval_report(monkeypatch):
    import duch_core.metrics as m

    rng = np.random.default_rng(8)
    img_q, txt_q = (rng.integers(0, 256, (30, 1), dtype=np.uint8) for _ in range(2))
    img_db, txt_db = (rng.integers(0, 256, (70, 1), dtype=np.uint8) for _ in range(2))
    ql, dl = rng.integers(0, 3, 30), rng.integers(0, 3, 70)
    rep = retrieval_report(img_q, txt_q, img_db, txt_db, ql, dl, k=10, ties="expected")
    assert rep["i2t"] == map_at_k(img_q, txt_db, ql, dl, 10, ties="expected")
    assert rep["t2i"] == map_at_k(txt_q, img_db, ql, dl, 10, ties="expected")
    whole = m.average_precision_at_k(img_q, txt_db, ql, dl, 10, ties="expected")
    monkeypatch.setattr(m, "_BLOCK_ELEMENTS", 150)  # 2 queries per block
    np.testing.assert_array_equal(
        m.average_precision_at_k(img_q, txt_db, ql, dl, 10, ties="expected"), whole
    )
