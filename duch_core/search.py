"""Exact Hamming top-k search over packed hash codes.

Provisional implementation: correct and vectorised with numpy; the fast kernel replaces the
internals of :meth:`HammingIndex.search` without changing the API.

Ranking: ascending Hamming distance, ties broken by ascending item id (so results are
deterministic whatever the insertion order or sharding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from duch_core.codes import check_bits

__all__ = ["SearchError", "HammingIndex", "merge_topk"]

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class SearchError(ValueError):
    """Bad input to the search index: wrong code width, bad k, mismatched ids."""


def _check_codes(codes: np.ndarray, bits: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise SearchError(f"{what} must be uint8 packed codes, got dtype {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != bits // 8:
        raise SearchError(
            f"{what} must have shape (n, {bits // 8}) for {bits}-bit codes, got {codes.shape}"
        )
    return np.ascontiguousarray(codes)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    return int(k)


class HammingIndex:
    """Exact Hamming index over ``bits``-bit packed codes.

    Memory: ``(N, bits // 8)`` uint8 codes plus ``(N,)`` int64 ids.
    """

    def __init__(self, bits: int) -> None:
        try:
            check_bits(bits)
        except Exception as e:
            raise SearchError(str(e)) from e
        self.bits = int(bits)
        self._codes = np.zeros((0, self.bits // 8), np.uint8)
        self._ids = np.zeros((0,), np.int64)

    @property
    def ntotal(self) -> int:
        return int(self._ids.shape[0])

    @classmethod
    def from_arrays(cls, codes: np.ndarray, ids: np.ndarray | None, bits: int) -> HammingIndex:
        idx = cls(bits)
        idx.add(codes, ids)
        return idx

    def add(self, codes: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append ``(n, bits // 8)`` uint8 codes with int64 ``ids`` (default: running positions)."""
        codes = _check_codes(codes, self.bits, "codes")
        if ids is None:
            ids = np.arange(self.ntotal, self.ntotal + codes.shape[0], dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (codes.shape[0],):
            raise SearchError(f"ids must have shape ({codes.shape[0]},), got {ids.shape}")
        self._codes = np.concatenate([self._codes, codes])
        self._ids = np.concatenate([self._ids, ids.astype(np.int64)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query.

        Returns:
            ``(dist, ids)``, both ``(Q, min(k, ntotal))``: int32 distances ascending, int64 ids.
        """
        queries = _check_codes(queries, self.bits, "queries")
        k = min(_check_k(k), self.ntotal)
        nq = queries.shape[0]
        if k == 0:
            return np.zeros((nq, 0), np.int32), np.zeros((nq, 0), np.int64)
        dist = np.empty((nq, k), np.int32)
        ids = np.empty((nq, k), np.int64)
        for i in range(nq):
            d = _POPCOUNT8[np.bitwise_xor(self._codes, queries[i])].sum(axis=1, dtype=np.int32)
            order = np.lexsort((self._ids, d))[:k]
            dist[i] = d[order]
            ids[i] = self._ids[order]
        return dist, ids


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard ``(dist, ids)`` top-k lists, each ``(Q, k_i)``.

    Returns the global top-``k`` ``(dist, ids)`` ranked by (distance, id).
    """
    k = _check_k(k)
    if not parts:
        raise SearchError("merge_topk needs at least one part")
    nq = parts[0][0].shape[0]
    dist = np.concatenate([np.asarray(p[0], np.int32).reshape(nq, -1) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], np.int64).reshape(nq, -1) for p in parts], axis=1)
    kk = min(k, dist.shape[1])
    out_d = np.empty((nq, kk), np.int32)
    out_i = np.empty((nq, kk), np.int64)
    for i in range(nq):
        order = np.lexsort((ids[i], dist[i]))[:kk]
        out_d[i] = dist[i, order]
        out_i[i] = ids[i, order]
    return out_d, out_i
