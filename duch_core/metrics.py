"""Retrieval metrics on packed binary codes: mAP@K (paper and standard), P@K, radius precision, PR.

Conventions shared by every function here:

* Codes are packed ``(N, bits // 8)`` uint8 arrays (:mod:`duch_core.codes`); ``bits = 8 * width``.
* Relevance is "shares a class" (:func:`relevance`): equal labels, or overlapping multi-hot rows.
* The ranking of a query sorts the database by Hamming distance. Rank metrics (mAP@K, P@K)
  take ``ties``: ``"position"`` (default) breaks ties in distance by database position (a stable
  sort), so every number is deterministic; ``"expected"`` gives the exact expected value over
  uniformly random orders inside every group of tied items, computed in closed form
  (:func:`average_precision_at_k`), which does not depend on how the database happens to be
  ordered. (The published code used an unstable ``torch.sort``, one arbitrary order; at short
  code lengths, where ties are frequent, the two can differ by a few points.)
* Means are over **all** queries, including queries with no relevant item in the database (they
  score 0), as the reference implementation divides by the number of queries.

Work is done in blocks of queries, vectorised across each block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from duch_core.codes import CodeLengthError, hamming_pm1, unpack

Variant = Literal["djsrh", "standard"]
Ties = Literal["position", "expected"]
DEFAULT_P_AT_K: tuple[int, ...] = (
    1,
    5,
    10,
    20,
    50,
    100,
    200,
    300,
    400,
    500,
    600,
    700,
    800,
    900,
    1000,
)
_BLOCK_ELEMENTS = 1 << 22  # queries per block * database size, bounds temporary memory


class MetricError(ValueError):
    """Inputs to a metric are inconsistent (shapes, labels, k, variant)."""


# --------------------------------------------------------------------------------------------
# inputs


def _codes(codes: Any, name: str) -> np.ndarray:
    a = np.asarray(codes)
    if a.dtype != np.uint8:
        raise CodeLengthError(
            f"{name} must be packed uint8 codes (N, bits // 8), got dtype {a.dtype}"
        )
    if a.ndim != 2 or a.shape[1] == 0:
        raise CodeLengthError(f"{name} must be a 2-D (N, bits // 8) array, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _pair(q_codes: Any, db_codes: Any) -> tuple[np.ndarray, np.ndarray]:
    q = _codes(q_codes, "query codes")
    db = _codes(db_codes, "database codes")
    if q.shape[1] != db.shape[1]:
        raise CodeLengthError(
            f"query codes are {8 * q.shape[1]} bits but database codes are {8 * db.shape[1]} bits"
        )
    if q.shape[0] == 0 or db.shape[0] == 0:
        raise MetricError(
            f"need at least one query and one database item, got {q.shape[0]} and {db.shape[0]}"
        )
    return q, db


def _label_list(labels: Any) -> list[Any]:
    if hasattr(labels, "to_pylist"):  # pyarrow arrays
        return list(labels.to_pylist())
    if isinstance(labels, np.ndarray):
        return labels.tolist()
    return list(labels)


def _label_array(labels: Any) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    if hasattr(labels, "detach"):  # torch tensor, without importing torch here
        return np.asarray(labels.detach().cpu().numpy())
    try:
        return np.asarray(_label_list(labels), dtype=object)
    except ValueError as e:
        raise MetricError(f"labels must be a flat sequence or an (N, C) matrix ({e})") from e


def relevance(q_labels: Any, db_labels: Any) -> np.ndarray:
    """Ground-truth relevance: does a database item share a class with a query?

    Args:
        q_labels: ``(Q,)`` class labels (int or str; ``None`` = unlabelled) or a ``(Q, C)``
            multi-hot / one-hot matrix.
        db_labels: ``(N,)`` or ``(N, C)``, the same kind as ``q_labels``.

    Returns:
        ``(Q, N)`` bool. For 1-D labels, ``rel[i, j] = q_labels[i] == db_labels[j]`` and an
        unlabelled item is relevant to nothing. For multi-hot rows, ``rel[i, j]`` is true when the
        rows share a class (``q @ db.T > 0``, as the reference code).

    Raises:
        MetricError: one side 1-D and the other 2-D, or multi-hot widths differ.
    """
    qa, da = _label_array(q_labels), _label_array(db_labels)
    if qa.ndim != da.ndim or qa.ndim not in (1, 2):
        raise MetricError(
            "query and database labels must both be 1-D labels or both (N, C) multi-hot; got "
            f"{qa.ndim}-D and {da.ndim}-D"
        )
    if qa.ndim == 2:
        if qa.shape[1] != da.shape[1]:
            raise MetricError(f"multi-hot widths differ: {qa.shape[1]} vs {da.shape[1]} classes")
        try:
            return (qa.astype(np.float64) @ da.astype(np.float64).T) > 0
        except (TypeError, ValueError) as e:
            raise MetricError(f"multi-hot labels must be numeric ({e})") from e
    ql, dl = _label_list(q_labels), _label_list(db_labels)
    vocab: dict[Any, int] = {}
    for v in ql + dl:
        if v is not None and v not in vocab:
            vocab[v] = len(vocab)
    qi = np.array([vocab[v] if v is not None else -1 for v in ql], dtype=np.int64)
    di = np.array([vocab[v] if v is not None else -2 for v in dl], dtype=np.int64)
    return qi[:, None] == di[None, :]


def _checked_relevance(q_labels: Any, db_labels: Any, nq: int, ndb: int) -> np.ndarray:
    rel = relevance(q_labels, db_labels)
    if rel.shape != (nq, ndb):
        raise MetricError(
            f"labels give a {rel.shape} relevance matrix but there are {nq} query and {ndb} "
            "database codes"
        )
    return rel


def _check_ties(ties: str) -> None:
    if ties not in ("position", "expected"):
        raise MetricError(f"ties must be 'position' or 'expected', got {ties!r}")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise MetricError(f"k must be a positive integer, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------------------------
# distances and ranking


def hamming_distances(q_codes: Any, db_codes: Any) -> np.ndarray:
    """Hamming distance matrix of packed codes (:func:`duch_core.codes.hamming_pm1` on the
    codes unpacked to ``±1``).

    Args:
        q_codes: ``(Q, B)`` uint8; db_codes: ``(N, B)`` uint8.

    Returns:
        ``(Q, N)`` int32 in ``[0, 8 * B]``.
    """
    q, db = _pair(q_codes, db_codes)
    bits = 8 * q.shape[1]
    return hamming_pm1(unpack(q, bits), unpack(db, bits))


def _distance_blocks(q: np.ndarray, db: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """``(slice, (m, N) int32 distances)`` for blocks of queries; ``db`` is unpacked once."""
    bits = 8 * q.shape[1]
    db_pm1 = unpack(db, bits).astype(np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(db.shape[0], 1))
    for start in range(0, q.shape[0], step):
        sl = slice(start, min(q.shape[0], start + step))
        yield sl, hamming_pm1(unpack(q[sl], bits), db_pm1)


def _ranked(dist: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, relevance)`` in rank order, both ``(q, N)``; ties kept in database order."""
    # distances are at most 1024: int16 keys let numpy use its radix sort (stable)
    order = np.argsort(dist.astype(np.int16), axis=1, kind="stable")
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(rel, order, axis=1)


def _tie_groups(d: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per rank position, the group of tied items it falls in.

    Args:
        d: ``(q, N)`` distances in rank order (non-decreasing along each row).
        g: ``(q, N)`` bool relevance in the same order.

    Returns:
        ``(start, size, rel_before, rel_in)``, each ``(q, N)`` int64: the 0-based rank where the
        group starts, its number of items, the relevant items ranked before the group and the
        relevant items inside it.
    """
    m, n = d.shape
    idx = np.broadcast_to(np.arange(n, dtype=np.int64), (m, n))
    first = np.ones((m, n), dtype=bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    last = np.ones((m, n), dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]
    hits = np.cumsum(g, axis=1, dtype=np.int64)
    before = np.take_along_axis(hits - g, start, axis=1)
    inside = np.take_along_axis(hits, end, axis=1) - before
    return start, end - start + 1, before, inside


def _log_factorials(n: int) -> np.ndarray:
    """``(n + 1,)`` float64: ``log(i!)`` for ``i = 0 .. n``."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def _expected_straddling_group(
    start: int, size: int, before: int, inside: int, t: int, log_fact: np.ndarray
) -> float:
    """Expected ``sum_j j / pos_j`` over the relevant items ``j = before + 1 .. t`` that lie in one
    group of tied items in random order (the group holding the ``t``-th relevant item).

    For the item at 1-based group slot ``i``, ``Y`` = relevant items in the earlier slots given
    that slot ``i`` is relevant is hypergeometric (``i - 1`` draws from ``size - 1`` items of
    which ``inside - 1`` are relevant); the item is the ``(before + 1 + Y)``-th relevant one and
    counts while that is at most ``t``.
    """
    lf = log_fact

    def log_choose(a: np.ndarray | int, b: np.ndarray) -> np.ndarray:
        return lf[a] - lf[b] - lf[np.asarray(a) - b]

    i = np.arange(1, size + 1, dtype=np.int64)[:, None]
    y = np.arange(0, t - before, dtype=np.int64)[None, :]
    other = i - 1 - y  # irrelevant items in the earlier slots
    ok = (other >= 0) & (other <= size - inside) & (y <= inside - 1)
    o, yy = np.where(ok, other, 0), np.where(ok, y, 0)
    log_pmf = (
        log_choose(inside - 1, yy) + log_choose(size - inside, o) - log_choose(size - 1, i - 1)
    )
    pmf = np.where(ok, np.exp(log_pmf), 0.0)
    per_slot = (pmf * (before + 1 + y)).sum(axis=1) / (start + i[:, 0])
    return float(inside / size * per_slot.sum())


# --------------------------------------------------------------------------------------------
# mAP@K


def average_precision_at_k(
    q_codes: Any,
    db_codes: Any,
    q_labels: Any,
    db_labels: Any,
    k: int,
    variant: Variant = "djsrh",
    ties: Ties = "position",
) -> np.ndarray:
    """Per-query AP@K; see :func:`map_at_k` for the two variants and the two tie orders.

    With ``ties="expected"`` each AP is its exact expectation over uniformly random orders inside
    every group of database items at the same Hamming distance (McSherry & Najork, ECIR 2008).
    For the item at 1-based slot ``i`` of a group of ``n`` items holding ``r`` relevant ones, with
    ``b`` relevant items ranked before the group and the group starting after rank ``s``: the
    slot is relevant with probability ``r / n``, and given that, the relevant items in the
    earlier slots number ``(i - 1)(r - 1) / (n - 1)`` on average, so its expected precision
    term is ``(r / n) * (b + 1 + (i - 1)(r - 1) / (n - 1)) / (s + i)`` (linearity of
    expectation; ``min(K, R)`` does not depend on the order). Standard AP@K sums this over the
    ranks ``s + i <= K``. The DJSRH form sums it over the groups whose relevant items are all
    among the first ``T = min(K, R)``; in the one group holding the ``T``-th relevant item the
    term counts only while the item is among the first ``T``, whose expectation uses the
    hypergeometric law of the earlier relevant items (:func:`_expected_straddling_group`).

    Returns:
        ``(Q,)`` float64 in ``[0, 1]``; 0 for queries without any relevant database item.
    """
    if variant not in ("djsrh", "standard"):
        raise MetricError(f"variant must be 'djsrh' or 'standard', got {variant!r}")
    _check_ties(ties)
    k = _check_k(k)
    q, db = _pair(q_codes, db_codes)
    rel = _checked_relevance(q_labels, db_labels, q.shape[0], db.shape[0])
    n = db.shape[0]
    pos = np.arange(1, n + 1, dtype=np.float64)
    out = np.zeros(q.shape[0], dtype=np.float64)
    for sl, dist in _distance_blocks(q, db):
        d, g = _ranked(dist, rel[sl])
        if ties == "position":
            out[sl] = ranked_average_precision(g, k, variant)
            continue
        hits = np.cumsum(g, axis=1, dtype=np.int64)  # relevant items up to each rank
        total = hits[:, -1]
        t = np.minimum(k, total)
        # the expected value over the orders inside each tie group
        start, size, before, inside = _tie_groups(d, g)
        slot = np.arange(n, dtype=np.int64) - start  # 0-based slot inside the group
        term = inside / size * (before + 1 + slot * (inside - 1) / np.maximum(size - 1, 1)) / pos
        if variant == "standard":
            ap = term[:, : min(k, n)].sum(axis=1)
        else:
            tt = t[:, None]
            ap = np.where(before + inside <= tt, term, 0.0).sum(axis=1)
            straddle = (before < tt) & (before + inside > tt) & (slot == 0)
            log_fact = _log_factorials(n)
            for row, col in zip(*np.nonzero(straddle), strict=True):
                ap[row] += _expected_straddling_group(
                    int(start[row, col]),
                    int(size[row, col]),
                    int(before[row, col]),
                    int(inside[row, col]),
                    int(t[row]),
                    log_fact,
                )
        out[sl] = np.where(total > 0, ap / np.maximum(t, 1), 0.0)
    return out


def ranked_average_precision(g: np.ndarray, k: int, variant: Variant = "djsrh") -> np.ndarray:
    """Per-query AP@K of rankings already made: ``g`` ``(Q, N)`` bool, whether the item at each
    rank is relevant (the forms of :func:`map_at_k`; 0 for a query without relevant items).

    :func:`average_precision_at_k` uses it for the Hamming ranking with ties in database
    order; :mod:`duch_core.asymmetric` for its score ranking.
    """
    if variant not in ("djsrh", "standard"):
        raise MetricError(f"variant must be 'djsrh' or 'standard', got {variant!r}")
    k = _check_k(k)
    n = g.shape[1]
    pos = np.arange(1, n + 1, dtype=np.float64)
    hits = np.cumsum(g, axis=1, dtype=np.int64)  # relevant items up to each rank
    total = hits[:, -1] if n else np.zeros(g.shape[0], np.int64)
    t = np.minimum(k, total)
    if variant == "djsrh":
        # the first T = min(K, R) relevant items, wherever they are in the full ranking
        take = g & (hits <= t[:, None])
        ap = np.where(take, hits / pos, 0.0).sum(axis=1)
    else:
        kk = min(k, n)
        ap = np.where(g[:, :kk], hits[:, :kk] / pos[:kk], 0.0).sum(axis=1)
    return np.where(total > 0, ap / np.maximum(t, 1), 0.0)


def map_at_k(
    q_codes: Any,
    db_codes: Any,
    q_labels: Any,
    db_labels: Any,
    k: int,
    variant: Variant = "djsrh",
    ties: Ties = "position",
) -> float:
    """Mean average precision at K.

    ``variant="djsrh"`` (the paper's number, as the published ``calc_map_k``): for a query with ``R`` relevant
    database items, ``T = min(K, R)`` and ``AP = mean_{j=1..T} j / pos_j`` where ``pos_j`` is the
    1-based rank of the ``j``-th relevant item in the **full** ranking, so relevant items found
    beyond rank ``K`` still count until ``T`` are found.

    ``variant="standard"``: truncated AP@K, ``AP = (1 / min(K, R)) * sum_{p <= K} P@p * rel(p)``;
    only the top ``K`` ranks count. It never exceeds the DJSRH value.

    ``ties="position"`` ranks items at equal Hamming distance by database position;
    ``ties="expected"`` gives the exact mean over all orders inside each group of tied items
    (see :func:`average_precision_at_k`).

    Queries with ``R = 0`` score 0 and count in the mean.

    Args:
        q_codes: ``(Q, B)`` uint8 packed query codes.
        db_codes: ``(N, B)`` uint8 packed database codes.
        q_labels, db_labels: see :func:`relevance`.
        k: cut-off (paper: 20).
        variant: ``"djsrh"`` or ``"standard"``.
        ties: ``"position"`` or ``"expected"``.

    Returns:
        mAP in ``[0, 1]``.
    """
    return float(
        average_precision_at_k(q_codes, db_codes, q_labels, db_labels, k, variant, ties).mean()
    )


def precision_at_k(
    q_codes: Any,
    db_codes: Any,
    q_labels: Any,
    db_labels: Any,
    ks: Sequence[int] = DEFAULT_P_AT_K,
    ties: Ties = "position",
) -> dict[int, float]:
    """Mean precision of the top ``k`` results for each ``k`` in ``ks``.

    ``P@k = |relevant in the top min(k, N)| / min(k, N)``, averaged over all queries. With
    ``ties="expected"``, the group of tied items that straddles rank ``k`` contributes its
    expected share: ``(k - s) * r / n`` relevant items for a group of ``n`` items, ``r`` of them
    relevant, starting after rank ``s``.

    Returns:
        ``{k: P@k}`` in the order of ``ks``.
    """
    ks = [_check_k(k) for k in ks]
    _check_ties(ties)
    q, db = _pair(q_codes, db_codes)
    rel = _checked_relevance(q_labels, db_labels, q.shape[0], db.shape[0])
    n = db.shape[0]
    sums = np.zeros(len(ks), dtype=np.float64)
    for sl, dist in _distance_blocks(q, db):
        d, g = _ranked(dist, rel[sl])
        if ties == "position":
            found = np.cumsum(g, axis=1, dtype=np.float64)
        else:
            start, size, before, inside = _tie_groups(d, g)
            taken = np.arange(1, n + 1, dtype=np.int64) - start  # group items up to each rank
            found = before + taken * inside / size
        for j, k in enumerate(ks):
            kk = min(k, n)
            sums[j] += (found[:, kk - 1] / kk).sum()
    return {k: float(s / q.shape[0]) for k, s in zip(ks, sums, strict=True)}


# --------------------------------------------------------------------------------------------
# radius-based metrics


def _radius_counts(
    q: np.ndarray, db: np.ndarray, rel: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts by Hamming radius.

    Returns:
        ``(retrieved, relevant_retrieved, relevant_total)``: the first two ``(Q, K + 1)`` int64
        with entry ``[i, r]`` = items within distance ``r`` of query ``i`` (all / relevant), the
        last ``(Q,)`` int64.
    """
    bits = 8 * q.shape[1]
    nq = q.shape[0]
    retrieved = np.zeros((nq, bits + 1), dtype=np.int64)
    rel_retrieved = np.zeros((nq, bits + 1), dtype=np.int64)
    for sl, dist in _distance_blocks(q, db):
        m = dist.shape[0]
        flat = (np.arange(m, dtype=np.int64)[:, None] * (bits + 1) + dist).ravel()
        size = m * (bits + 1)
        retrieved[sl] = np.bincount(flat, minlength=size).reshape(m, bits + 1)
        rel_retrieved[sl] = (
            np.bincount(flat, weights=rel[sl].ravel().astype(np.float64), minlength=size)
            .reshape(m, bits + 1)
            .astype(np.int64)
        )
    return (
        np.cumsum(retrieved, axis=1),
        np.cumsum(rel_retrieved, axis=1),
        rel.sum(axis=1).astype(np.int64),
    )


def precision_within_radius(
    q_codes: Any,
    db_codes: Any,
    q_labels: Any,
    db_labels: Any,
    radii: Iterable[int] = range(6),
) -> dict[int, float]:
    """Mean precision of everything within Hamming radius ``r``, for each ``r`` in ``radii``.

    A query that retrieves nothing within ``r`` scores 0 (and counts in the mean), as in the
    paper's ``calc_map_rad``, which averages precision rather than AP.

    Returns:
        ``{r: precision}``; radii above the code length behave like the code length.
    """
    q, db = _pair(q_codes, db_codes)
    rel = _checked_relevance(q_labels, db_labels, q.shape[0], db.shape[0])
    ret, hit, _ = _radius_counts(q, db, rel)
    bits = 8 * q.shape[1]
    out: dict[int, float] = {}
    for r in radii:
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 0:
            raise MetricError(f"radii must be non-negative integers, got {r!r}")
        c = min(int(r), bits)
        prec = np.where(ret[:, c] > 0, hit[:, c] / np.maximum(ret[:, c], 1), 0.0)
        out[int(r)] = float(prec.mean())
    return out


def pr_curve(q_codes: Any, db_codes: Any, q_labels: Any, db_labels: Any) -> dict[str, np.ndarray]:
    """Precision-recall curve with one point per Hamming radius ``r = 0 .. K``.

    At radius ``r`` each query retrieves every database item within distance ``r``. As in the
    reference ``pr_curve``: queries without relevant items are left out of precision and count 0
    in recall; precision at ``r`` is averaged over the queries that retrieved at least one
    relevant item within ``r`` (0 when none did); recall is averaged over all queries.

    Returns:
        ``{"radius": (K+1,) int64, "precision": (K+1,) float64, "recall": (K+1,) float64}``;
        recall is non-decreasing and reaches the fraction of queries with a relevant item at
        ``r = K``.
    """
    q, db = _pair(q_codes, db_codes)
    rel = _checked_relevance(q_labels, db_labels, q.shape[0], db.shape[0])
    ret, hit, total = _radius_counts(q, db, rel)
    has = total > 0
    p = np.where(has[:, None] & (ret > 0), hit / np.maximum(ret, 1), 0.0)
    r = np.where(has[:, None], hit / np.maximum(total, 1)[:, None], 0.0)
    counted = (p > 0).sum(axis=0)
    precision = np.where(counted > 0, p.sum(axis=0) / np.maximum(counted, 1), 0.0)
    return {
        "radius": np.arange(8 * q.shape[1] + 1, dtype=np.int64),
        "precision": precision,
        "recall": r.mean(axis=0),
    }


# --------------------------------------------------------------------------------------------
# the four retrieval directions


def retrieval_report(
    img_q: Any,
    txt_q: Any,
    img_db: Any,
    txt_db: Any,
    q_labels: Any,
    db_labels: Any,
    k: int = 20,
    variant: Variant = "djsrh",
    ties: Ties = "position",
) -> dict[str, float]:
    """mAP@K in the four directions the paper reports.

    Args:
        img_q, txt_q: ``(Q, B)`` uint8 codes of the query items' images and captions (one caption
            per item), aligned with ``q_labels``.
        img_db, txt_db: ``(N, B)`` uint8 codes of the database items, aligned with ``db_labels``.
        q_labels, db_labels: see :func:`relevance`.
        k: cut-off (paper: 20).
        variant: see :func:`map_at_k`.
        ties: see :func:`map_at_k`.

    Returns:
        ``{"i2t": image→text, "t2i": text→image, "i2i": image→image, "t2t": text→text}``.
    """
    return {
        "i2t": map_at_k(img_q, txt_db, q_labels, db_labels, k, variant, ties),
        "t2i": map_at_k(txt_q, img_db, q_labels, db_labels, k, variant, ties),
        "i2i": map_at_k(img_q, img_db, q_labels, db_labels, k, variant, ties),
        "t2t": map_at_k(txt_q, txt_db, q_labels, db_labels, k, variant, ties),
    }
