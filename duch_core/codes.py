"""The single owner of hash codes: sign step, bit packing, bit order and Hamming distance.

Conventions (recorded in every bundle and index manifest):

* **Sign step**: a continuous code value ``h >= 0`` maps to bit ``1`` (``+1``), ``h < 0`` to bit
  ``0`` (``-1``). Zero therefore maps to ``+1``; ``torch.sign`` would give 0 there, which is not a
  valid binary code, so it is never used directly.
* **Packing**: ``np.packbits(bits, axis=1, bitorder="big")``: code bit ``j`` is bit ``7 - j % 8`` of
  byte ``j // 8``. A ``K``-bit code is ``K // 8`` bytes; ``K`` must be a multiple of 8.
* **Hamming distance** between packed codes is the popcount of their XOR. For ``±1`` codes it
  equals ``(K - <a, b>) / 2``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

BITORDER: Literal["big"] = "big"
SUPPORTED_BITS = (8, 16, 32, 64, 128, 256, 512, 1024)

# popcount of every byte value, used by the reference Hamming implementation.
_POPCOUNT8 = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)


class CodeLengthError(ValueError):
    """A code array has the wrong width or dtype for the expected code length."""


def check_bits(bits: int) -> int:
    """Validate a code length in bits and return it.

    Raises:
        CodeLengthError: if ``bits`` is not a positive multiple of 8.
    """
    if not isinstance(bits, int | np.integer) or bits <= 0 or bits % 8:
        raise CodeLengthError(f"code length must be a positive multiple of 8 bits, got {bits!r}")
    return int(bits)


def _to_numpy(h: Any) -> np.ndarray:
    if hasattr(h, "detach"):  # torch tensor, without importing torch here
        h = h.detach().float().cpu().numpy()
    return np.asarray(h)


def sign(h: Any) -> np.ndarray:
    """Binarise continuous codes.

    Args:
        h: ``(N, K)`` float array or tensor (e.g. tanh outputs in ``[-1, 1]``).

    Returns:
        ``(N, K)`` int8 array of ``-1`` / ``+1``; ``0`` maps to ``+1``.
    """
    a = _to_numpy(h)
    if a.ndim != 2:
        raise CodeLengthError(f"codes must be a 2-D (N, K) array, got shape {a.shape}")
    return np.where(a >= 0, 1, -1).astype(np.int8)


def pack(h: Any) -> np.ndarray:
    """Pack continuous or ``±1`` codes into bytes.

    Args:
        h: ``(N, K)`` array or tensor; values ``>= 0`` become bit 1. ``K % 8 == 0``.

    Returns:
        ``(N, K // 8)`` uint8, bit order ``big``.
    """
    a = _to_numpy(h)
    if a.ndim != 2:
        raise CodeLengthError(f"codes must be a 2-D (N, K) array, got shape {a.shape}")
    check_bits(a.shape[1])
    return np.packbits(a >= 0, axis=1, bitorder=BITORDER)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`.

    Args:
        packed: ``(N, bits // 8)`` uint8.
        bits: code length.

    Returns:
        ``(N, bits)`` int8 of ``-1`` / ``+1``.
    """
    p = check_packed(packed, bits)
    b = np.unpackbits(p, axis=1, bitorder=BITORDER, count=bits)
    return (b.astype(np.int8) * 2 - 1).astype(np.int8)


def check_packed(packed: Any, bits: int) -> np.ndarray:
    """Validate a packed code array and return it as a C-contiguous ``(N, bits // 8)`` uint8 array.

    Raises:
        CodeLengthError: wrong dtype, rank or width. The message says what was expected.
    """
    check_bits(bits)
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise CodeLengthError(f"packed codes must be uint8, got {p.dtype}")
    if p.ndim == 1 and p.size == bits // 8:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != bits // 8:
        raise CodeLengthError(
            f"expected packed codes of shape (N, {bits // 8}) for {bits}-bit codes, got {p.shape}"
        )
    return np.ascontiguousarray(p)


def hamming(q_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    """Reference (slow, obvious) Hamming distance matrix between packed codes.

    Args:
        q_packed: ``(Q, B)`` uint8.
        db_packed: ``(N, B)`` uint8, same ``B``.

    Returns:
        ``(Q, N)`` int32 distances in ``[0, 8 * B]``.
    """
    q = np.asarray(q_packed, dtype=np.uint8)
    d = np.asarray(db_packed, dtype=np.uint8)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise CodeLengthError(f"code widths differ: queries {q.shape}, database {d.shape}")
    out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
    for i in range(q.shape[0]):
        out[i] = _POPCOUNT8[np.bitwise_xor(d, q[i])].sum(axis=1, dtype=np.int32)
    return out


def hamming_pm1(a: Any, b: Any) -> np.ndarray:
    """Hamming distance between ``±1`` codes via the inner product: ``(K - a @ b.T) / 2``.

    Args:
        a: ``(Q, K)`` ±1 values; b: ``(N, K)`` ±1 values.

    Returns:
        ``(Q, N)`` int32.
    """
    # float32 sums of K terms of +-1 are exact for K < 2**24
    a_ = _to_numpy(a).astype(np.float32, copy=False)
    b_ = _to_numpy(b).astype(np.float32, copy=False)
    k = a_.shape[1]
    return np.rint(0.5 * (k - a_ @ b_.T)).astype(np.int32)


def topk_reference(
    q_packed: np.ndarray, db_packed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by Hamming distance, ties broken by database position (slow reference).

    Returns:
        ``(distances, positions)``, both ``(Q, min(k, N))``; distances int32, positions int64.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    dist = hamming(q_packed, db_packed)
    n = dist.shape[1]
    kk = min(k, n)
    # lexsort on (position, distance): stable sort by distance keeps positions ascending in ties
    order = np.argsort(dist, axis=1, kind="stable")[:, :kk].astype(np.int64)
    return np.take_along_axis(dist, order, axis=1), order
