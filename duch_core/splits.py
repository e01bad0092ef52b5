"""The paper's evaluation protocol: train / query / database split and one caption per item.

DUCH (PAPER.md §4) ignores any split shipped with a dataset and draws its own with seed 42: 50 %
of the items train the hashing heads, 10 % are queries and the remaining 40 % form the retrieval
database. One caption per item is chosen once, with a seed, and used for training, queries and the
database alike.

Both functions here are pure functions of the item ids and the seed: the ids are sorted first, so
the order of rows in an archive never changes the result.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

SPLIT_NAMES: tuple[str, ...] = ("train", "query", "database")


def _count(n: int, frac: float) -> int:
    # floor, tolerant of binary rounding (e.g. 0.29 * 100 = 28.999999999999996)
    return int(math.floor(n * frac + 1e-9))


def _unique_ids(item_ids: Iterable[str]) -> list[str]:
    ids = [str(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"item ids must be unique; duplicated: {dups[:5]} ({len(dups)} in all)")
    return ids


def paper_split(
    item_ids: Iterable[str],
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
) -> dict[str, list[str]]:
    """Split items into train / query / database as the paper does.

    ``floor(N * train_frac)`` items are drawn for training (Python ``random.Random(seed).sample``
    over the sorted ids, as the reference code draws with ``random.sample``), then
    ``floor(N * query_frac)`` of the rest are drawn as queries; the remainder is the database.
    UCM (2,100 items) gives 1050 / 210 / 840, RSICD (10,921) 5460 / 1092 / 4369.

    Args:
        item_ids: unique item ids (any order; they are sorted first).
        seed: random seed (paper: 42).
        train_frac: fraction for training, in ``(0, 1]``.
        query_frac: fraction for queries, in ``[0, 1 - train_frac]``.

    Returns:
        ``{"train": [...], "query": [...], "database": [...]}``, each list sorted, disjoint, and
        together covering every id.

    Raises:
        ValueError: duplicate ids or fractions out of range.
    """
    if not 0.0 < train_frac <= 1.0:
        raise ValueError(f"train_frac must be in (0, 1], got {train_frac}")
    if not 0.0 <= query_frac <= 1.0 - train_frac + 1e-12:
        raise ValueError(
            f"query_frac must be in [0, 1 - train_frac] = [0, {1 - train_frac:g}], got {query_frac}"
        )
    ids = sorted(_unique_ids(item_ids))
    n = len(ids)
    rng = random.Random(seed)
    train_idx = set(rng.sample(range(n), _count(n, train_frac)))
    rest = [i for i in range(n) if i not in train_idx]
    query_idx = set(rng.sample(rest, min(_count(n, query_frac), len(rest))))
    return {
        "train": [ids[i] for i in sorted(train_idx)],
        "query": [ids[i] for i in sorted(query_idx)],
        "database": [ids[i] for i in rest if i not in query_idx],
    }


def split_column(
    item_ids: Sequence[str],
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
) -> list[str]:
    """:func:`paper_split` as one split name per item, aligned with ``item_ids``."""
    parts = paper_split(item_ids, seed=seed, train_frac=train_frac, query_frac=query_frac)
    where = {item: name for name, items in parts.items() for item in items}
    return [where[str(i)] for i in item_ids]


def choose_captions(
    item_ids: Sequence[str],
    n_captions_per_item: int | Sequence[int],
    seed: int = 42,
) -> np.ndarray:
    """Choose one caption index per item, fixed by the seed.

    The choice for an item depends only on ``(seed, item_id, its caption count)``: it does not
    change when rows are reordered, added or removed.

    Args:
        item_ids: ``(N,)`` unique item ids.
        n_captions_per_item: one count for all items (paper: 5) or ``(N,)`` counts aligned with
            ``item_ids``.
        seed: random seed (paper: 42).

    Returns:
        ``(N,)`` int64 caption indices in ``[0, count)``; ``-1`` for an item with no captions.

    Raises:
        ValueError: duplicate ids, negative counts, or counts not aligned with the ids.
    """
    ids = _unique_ids(item_ids)
    if isinstance(n_captions_per_item, int | np.integer):
        counts = np.full(len(ids), int(n_captions_per_item), dtype=np.int64)
    else:
        counts = np.asarray(list(n_captions_per_item), dtype=np.int64)
        if counts.shape != (len(ids),):
            raise ValueError(
                f"got {counts.shape[0]} caption counts for {len(ids)} items; they must align"
            )
    if (counts < 0).any():
        raise ValueError("caption counts must be >= 0")
    out = np.full(len(ids), -1, dtype=np.int64)
    for j, (item, n) in enumerate(zip(ids, counts, strict=True)):
        if n > 0:
            digest = hashlib.blake2b(f"{seed}\x00{item}".encode(), digest_size=8).digest()
            out[j] = int.from_bytes(digest, "big") % int(n)
    return out
