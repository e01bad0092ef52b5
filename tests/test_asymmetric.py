"""Asymmetric ranking (continuous query code against binary database codes) against a slow
obvious reference: Python loops over every item, sorted by (score descending, id ascending)."""

from __future__ import annotations

import numpy as np
import pytest

from duch_core import codes
from duch_core.asymmetric import asymmetric_scan, rerank, scores
from duch_core.search import HammingIndex

BITS = 32


def _data(n: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    db = codes.pack(rng.standard_normal((n, BITS)))
    # few distinct codes, so Hamming ties are many and the re-rank has work to do
    db = db[rng.integers(0, max(1, n // 4), n)]
    # tanh outputs on a 1/16 grid: every score is exact in float32 whatever the summation order,
    # so the fast path and the reference must agree on every tie, not just approximately
    queries = np.round(np.tanh(rng.standard_normal((q, BITS)) * 0.7) * 16) / 16
    return db, queries.astype(np.float32)


def _reference(queries, db, ids, k):
    plus_minus = [[1.0 if b else -1.0 for b in np.unpackbits(c, bitorder="big")] for c in db]
    out = []
    for u in queries:
        s = [
            (float(sum(x * y for x, y in zip(u, b, strict=True))), int(i))
            for b, i in zip(plus_minus, ids, strict=True)
        ]
        s.sort(key=lambda t: (-t[0], t[1]))
        out.append(s[:k])
    return out


def test_scores_equal_the_dot_product_with_plus_minus_one_codes():
    db, queries = _data(50, 3)
    got = scores(queries, db, BITS)
    want = queries @ codes.unpack(db, BITS).astype(np.float32).T
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 7, 200])
def test_the_scan_is_exact(k):
    db, queries = _data(120, 4, seed=k)
    ids = np.arange(1000, 1120, dtype=np.int64)[::-1].copy()
    s, i = asymmetric_scan(queries, db, BITS, k, ids)
    ref = _reference(queries, db, ids, k)
    assert i.tolist() == [[t[1] for t in r] for r in ref]
    np.testing.assert_allclose(s, [[t[0] for t in r] for r in ref], rtol=1e-5)


def test_with_binary_queries_the_order_is_the_hamming_order():
    db, queries = _data(200, 5, seed=3)
    binary = codes.sign(queries).astype(np.float32)
    s, i = asymmetric_scan(binary, db, BITS, 200)
    index = HammingIndex.from_arrays(db, np.arange(200, dtype=np.int64), BITS)
    d, j = index.search(codes.pack(binary), 200)
    assert i.tolist() == j.tolist()
    np.testing.assert_array_equal(s, BITS - 2 * d)


@pytest.mark.parametrize("shortlist", [10, 60, 10_000])
def test_rerank_of_a_hamming_shortlist(shortlist):
    db, queries = _data(300, 6, seed=shortlist)
    ids = np.arange(300, dtype=np.int64) * 3 + 5
    index = HammingIndex.from_arrays(db, ids, BITS)
    s, i = rerank(index, queries, 8, shortlist)
    _, short = index.search(codes.pack(queries), max(8, shortlist))
    for row, (si, ii, cand) in enumerate(zip(s, i, short, strict=True)):
        assert set(ii.tolist()) <= set(cand.tolist())  # only shortlisted items
        keep = np.isin(ids, cand)
        ref = _reference(queries[row : row + 1], db[keep], ids[keep], 8)[0]
        assert ii.tolist() == [t[1] for t in ref]
        np.testing.assert_allclose(si, [t[0] for t in ref], rtol=1e-5)
    if shortlist >= 300:  # the whole database: the full asymmetric scan
        s2, i2 = asymmetric_scan(queries, db, BITS, 8, ids)
        assert i.tolist() == i2.tolist()
        np.testing.assert_allclose(s, s2, rtol=1e-6)


def test_bad_inputs_are_refused():
    db, queries = _data(10, 2)
    with pytest.raises(codes.CodeLengthError):
        scores(queries[:, :16], db, BITS)
    with pytest.raises(ValueError):
        scores(np.full((1, BITS), np.nan, np.float32), db, BITS)
    with pytest.raises(ValueError):
        asymmetric_scan(queries, db, BITS, 0)


def _reference_ap(u, db, q_label, db_labels, k, variant):
    """AP@K of one query by the definitions, over the reference ranking."""
    ranked = _reference([u], db, range(len(db)), len(db))[0]
    rel = [db_labels[i] == q_label for _, i in ranked]
    r = sum(rel)
    if r == 0:
        return 0.0
    t = min(k, r)
    hits, ap = 0, 0.0
    for rank, relevant in enumerate(rel, start=1):
        if not relevant:
            continue
        hits += 1
        if variant == "djsrh" and hits <= t:
            ap += hits / rank  # the first T relevant items wherever they are
        elif variant == "standard" and rank <= k:
            ap += hits / rank
    return ap / t


@pytest.mark.parametrize("variant", ["djsrh", "standard"])
def test_map_of_the_score_ranking_equals_the_definition(variant):
    from duch_core import metrics
    from duch_core.asymmetric import average_precision_at_k, map_at_k

    db, queries = _data(90, 6, seed=11)
    rng = np.random.default_rng(5)
    db_labels = rng.integers(0, 4, len(db)).tolist()
    q_labels = [0, 1, 2, 3, 1, 9]  # the last has no relevant item: AP 0
    got = average_precision_at_k(queries, db, q_labels, db_labels, 5, variant)
    want = [
        _reference_ap(u, db, ql, db_labels, 5, variant)
        for u, ql in zip(queries, q_labels, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[-1] == 0.0 and map_at_k(queries, db, q_labels, db_labels, 5, variant) > 0
    # binary queries: the score order is the Hamming order, ties by position
    binary = codes.sign(queries).astype(np.float32)
    np.testing.assert_allclose(
        average_precision_at_k(binary, db, q_labels, db_labels, 5, variant),
        metrics.average_precision_at_k(codes.pack(binary), db, q_labels, db_labels, 5, variant),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="relevance"):
        average_precision_at_k(queries, db, q_labels[:2], db_labels, 5, variant)


def test_latency_benchmark_runs_and_a_whole_shortlist_finds_the_exact_top_k(tmp_path, capsys):
    import json

    from bench import asymmetric as bench

    out = tmp_path / "rows.json"
    argv = ["--sizes", "3000", "--shortlists", "50,3000", "--queries", "4", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {(r["batch"], r["ranking"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {
        (b, r) for b in (1, 32) for r in ("hamming", "rerank 50", "rerank 3000", "scan")
    }
    for b in (1, 32):
        assert rows[b, "scan"]["recall"] == rows[b, "rerank 3000"]["recall"] == 1.0
        assert 0.0 <= rows[b, "hamming"]["recall"] <= rows[b, "rerank 50"]["recall"] <= 1.0
        assert rows[b, "hamming"]["vs_hamming"] == 1.0
    assert "rerank 3000" in capsys.readouterr().out


def test_equal_codes_score_equal_wherever_and_with_whatever_they_are_scored():
    """Scores are exact: a code's score does not depend on its row or the other rows of the
    call, so ties between equal codes are real ties and go by id."""
    rng = np.random.default_rng(11)
    bits = 64
    u = rng.uniform(-1, 1, (3, bits)).astype(np.float32)
    one = rng.integers(0, 256, (1, bits // 8), dtype=np.uint8)
    others = rng.integers(0, 256, (997, bits // 8), dtype=np.uint8)
    db = np.concatenate([others[:500], one, others[500:], one, one])
    s = scores(u, db, bits)
    alone = scores(u, one, bits)
    for col in (500, 998, 999):
        np.testing.assert_array_equal(s[:, col], alone[:, 0])
    ref = u.astype(np.float64) @ codes.unpack(one, bits).astype(np.float64).T
    np.testing.assert_allclose(alone, ref, atol=bits * 2.0**-20)
