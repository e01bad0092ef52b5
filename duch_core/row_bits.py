"""Row bitmaps of categorical metadata: one bit per index row, row ``j`` being bit ``j % 64``
of word ``j // 64`` (``uint64`` words; bits past the last row are zero).

A categorical column with at most :data:`MAX_VALUES` values keeps a bitmap per value
(:func:`value_bitmaps`, one eighth of a byte per row and value), so the rows a predicate keeps
are a few words ORed per 64 rows (:func:`rows_with`): for two values of 10M rows 57 us when
the bitmaps are in cache, about 0.4 ms right after a scan has pushed them out. The
scan reads a row's bit beside its code (:func:`duch_core._search_kernel.scan_chunk`), so a
row of another class is never looked up on its own; a lookup of a row's class in a 10M-row
column is a cache miss, and a label filter keeping a tenth of the rows pays about ten of them
for every row that enters its top-k.
"""

from __future__ import annotations

import numpy as np

MAX_VALUES = 64
"""Columns with more values keep no bitmaps (each costs ``n / 8`` bytes)."""


def words(n: int) -> int:
    """Words of a bitmap over ``n`` rows."""
    return (n + 63) // 64


def from_flags(flags: np.ndarray) -> np.ndarray:
    """``(n,)`` bool -> ``(words(n),)`` uint64 bitmap."""
    packed = np.zeros(words(flags.shape[0]) * 8, np.uint8)
    bits = np.packbits(flags, bitorder="little")
    packed[: bits.shape[0]] = bits
    return packed.view("<u8").astype(np.uint64, copy=False)  # no copy on little-endian


def value_bitmaps(codes: np.ndarray, n_values: int) -> np.ndarray | None:
    """``(n_values + 1, words(n))`` uint64: row ``v`` marks the rows whose code is ``v``, the
    last row those with any value (code ``>= 0``; -1 is missing); ``None`` past
    :data:`MAX_VALUES` values."""
    if n_values > MAX_VALUES:
        return None
    out = np.empty((n_values + 1, words(codes.shape[0])), np.uint64)
    for v in range(n_values):
        out[v] = from_flags(codes == v)
    out[n_values] = from_flags(codes >= 0)
    return out


def rows_with(bitmaps: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """The bitmap of the rows whose value is one of ``picked`` (``(V,)`` bool over the values of
    ``bitmaps`` from :func:`value_bitmaps`): the picked values' bitmaps ORed, or, when more
    than half are picked, the rows with a value and none of the others (fewer words read).

    One value picked gives that value's own bitmap, not a copy: read it, never write it."""
    picked = np.asarray(picked, np.bool_)
    n_values = bitmaps.shape[0] - 1
    if picked.shape != (n_values,):
        raise ValueError(f"picked must have shape ({n_values},), got {picked.shape}")
    count = int(picked.sum())
    if count == 1:
        return bitmaps[int(np.flatnonzero(picked)[0])]
    if count == n_values:
        return bitmaps[n_values]
    invert = 2 * count > n_values
    take = np.flatnonzero(~picked if invert else picked)
    out = np.zeros(bitmaps.shape[1], np.uint64)
    for v in take.tolist():
        np.bitwise_or(out, bitmaps[v], out=out)
    if invert:
        np.bitwise_and(bitmaps[n_values], np.invert(out, out=out), out=out)
    return out


def bits_of(bitmap: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(len(rows),)`` bool: the bits of ``rows`` (the slow, obvious reading)."""
    rows = np.asarray(rows, np.int64)
    return ((bitmap[rows >> 6] >> (rows & 63).astype(np.uint64)) & np.uint64(1)).astype(np.bool_)
