"""Asymmetric ranking: a query's continuous code against the database's binary codes.

The score of a database item is ``<u, b>``: the query's continuous code ``u`` (the hash head's
``tanh`` outputs, in ``[-1, 1]``) against the item's ``±1`` code ``b``. Higher is closer. The
database keeps only its packed bits, so this costs no index memory, and it orders items that
share a Hamming distance by how strongly the query holds each disagreeing bit: for ``u = sign(u)``
it is ``K - 2 * hamming``, the Hamming order itself.

* :func:`asymmetric_scan` scores every database code (exact; cost about ``K`` multiply-adds per
  code, in blocks).
* :func:`rerank` scores only a Hamming shortlist: the ``L`` nearest codes of ``sign(u)`` from a
  :class:`~duch_core.search.HammingIndex`, re-ranked by score. With ``L >= N`` it equals the scan.
* :func:`map_at_k` is the retrieval quality of the score ranking, in the forms of
  :func:`duch_core.metrics.map_at_k` (scores rarely tie; ties go by database position).

Ranking order everywhere: score descending, then id ascending.
"""

from __future__ import annotations

import numpy as np

from duch_core import codes as codes_mod
from duch_core import metrics
from duch_core.search import HammingIndex

__all__ = [
    "asymmetric_scan",
    "average_precision_at_k",
    "map_at_k",
    "rerank",
    "rerank_shortlist",
    "scores",
]

_BLOCK_ROWS = 65_536  # database codes unpacked at a time
# Scores are computed from the query rounded to multiples of 2**-20: integers in float64, whose
# sums are exact in any order, so equal codes always get equal scores (ties then go by id) and a
# score does not depend on which other codes were scored with it.
_SCALE = 2.0**20


def _check_queries(queries: np.ndarray, bits: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != bits:
        raise codes_mod.CodeLengthError(
            f"continuous queries must be (Q, {bits}), got shape {np.shape(queries)}"
        )
    if not np.all(np.isfinite(q)):
        raise ValueError("continuous queries must be finite")
    return q


def scores(queries: np.ndarray, packed: np.ndarray, bits: int) -> np.ndarray:
    """``(Q, N)`` float32 scores ``<u, b>`` of continuous ``queries`` ``(Q, bits)`` against packed
    database codes ``(N, bits // 8)``, ``u`` rounded to multiples of ``2**-20`` (exact and
    order-independent: equal codes score equal)."""
    q = np.rint(_check_queries(queries, bits).astype(np.float64) * _SCALE)
    db = codes_mod.check_packed(packed, bits)
    out = np.empty((q.shape[0], db.shape[0]), np.float32)
    for s in range(0, db.shape[0], _BLOCK_ROWS):
        block = codes_mod.unpack(db[s : s + _BLOCK_ROWS], bits).astype(np.float64)
        out[:, s : s + block.shape[0]] = (q @ block.T) / _SCALE
    return out


def _top(score: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best by (score descending, id ascending)."""
    order = np.lexsort((ids, -score), axis=-1)[:, :k]
    return np.take_along_axis(score, order, 1), np.take_along_axis(ids, order, 1)


def asymmetric_scan(
    queries: np.ndarray, packed: np.ndarray, bits: int, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact asymmetric top-``k`` over every database code.

    Args:
        queries: ``(Q, bits)`` continuous codes.
        packed: ``(N, bits // 8)`` uint8 database codes.
        bits: code length.
        k: results per query (at most ``N`` are returned).
        ids: ``(N,)`` int64 ids of the database rows (default: row positions).

    Returns:
        ``(score, ids)``, both ``(Q, min(k, N))``: float32 scores descending, int64 ids
        ascending within equal scores.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    s = scores(queries, packed, bits)
    n = s.shape[1]
    row_ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if row_ids.shape != (n,):
        raise ValueError(f"ids must be ({n},), got {row_ids.shape}")
    return _top(s, np.broadcast_to(row_ids, s.shape), min(k, n))


def rerank(
    index: HammingIndex, queries: np.ndarray, k: int, shortlist: int
) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric top-``k`` among each query's Hamming shortlist.

    The shortlist is the exact Hamming top-``shortlist`` of ``sign(u)`` in ``index`` (ties by
    id); its codes are read back from the index and scored. With ``shortlist >= index.ntotal``
    the answer equals :func:`asymmetric_scan` over the whole index.

    Returns:
        ``(score, ids)`` as :func:`asymmetric_scan` (ids are the index's ids).
    """
    if k < 1 or shortlist < 1:
        raise ValueError(f"k and shortlist must be positive, got {k} and {shortlist}")
    q = _check_queries(queries, index.bits)
    n = index.ntotal
    if n == 0 or q.shape[0] == 0:
        empty = np.zeros((q.shape[0], 0))
        return empty.astype(np.float32), empty.astype(np.int64)
    _, cand = index.search(codes_mod.pack(q), max(k, min(shortlist, n)))
    score, ids, _ = rerank_shortlist(index, q, cand, k)
    return score, ids


def rerank_shortlist(
    index: HammingIndex,
    queries: np.ndarray,
    ids: np.ndarray,
    k: int,
    dist: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The asymmetric top-``k`` of given candidates: each query's row of ``ids`` (ids of
    ``index``, e.g. a filtered Hamming shortlist) scored and ranked (score descending, id
    ascending).

    Args:
        index: holds the candidates' codes.
        queries: ``(Q, bits)`` continuous codes.
        ids: ``(Q, L)`` int64 candidate ids per query.
        k: results per query (at most ``L``).
        dist: ``(Q, L)`` Hamming distances of the candidates, carried along (else zeros).

    Returns:
        ``(score, ids, dist)``, each ``(Q, min(k, L))``.
    """
    q = _check_queries(queries, index.bits)
    cand = np.asarray(ids, dtype=np.int64).reshape(q.shape[0], -1)
    d_all = np.zeros(cand.shape, np.int32) if dist is None else np.asarray(dist).reshape(cand.shape)
    m = min(k, cand.shape[1])
    out_s = np.zeros((q.shape[0], m), np.float32)
    out_i = np.zeros((q.shape[0], m), np.int64)
    out_d = np.zeros((q.shape[0], m), np.int32)
    for r in range(q.shape[0]):
        order = np.argsort(cand[r], kind="stable")  # sorted ids give sorted positions
        c = cand[r][order]
        s = scores(q[r : r + 1], index.codes_at(index.positions_of(c)), index.bits)[0]
        top = np.lexsort((c, -s))[:m]
        out_s[r], out_i[r], out_d[r] = s[top], c[top], d_all[r][order][top]
    return out_s, out_i, out_d


def average_precision_at_k(
    queries: np.ndarray,
    packed: np.ndarray,
    q_labels: object,
    db_labels: object,
    k: int,
    variant: metrics.Variant = "djsrh",
) -> np.ndarray:
    """Per-query AP@K of the asymmetric ranking (score descending, then database position).

    Args:
        queries: ``(Q, bits)`` continuous query codes.
        packed: ``(N, bits // 8)`` uint8 database codes.
        q_labels, db_labels: as :func:`duch_core.metrics.relevance`.
        k: cut-off.
        variant: ``"djsrh"`` or ``"standard"`` (:func:`duch_core.metrics.map_at_k`).

    Returns:
        ``(Q,)`` float64 in ``[0, 1]``.
    """
    bits = 8 * np.asarray(packed).shape[-1]
    s = scores(queries, packed, bits)
    rel = metrics.relevance(q_labels, db_labels)
    if rel.shape != s.shape:
        raise ValueError(f"labels give relevance {rel.shape}, the codes {s.shape}")
    order = np.argsort(-s, axis=1, kind="stable")  # stable: equal scores by position
    return metrics.ranked_average_precision(np.take_along_axis(rel, order, 1), k, variant)


def map_at_k(
    queries: np.ndarray,
    packed: np.ndarray,
    q_labels: object,
    db_labels: object,
    k: int,
    variant: metrics.Variant = "djsrh",
) -> float:
    """Mean of :func:`average_precision_at_k`."""
    return float(average_precision_at_k(queries, packed, q_labels, db_labels, k, variant).mean())
