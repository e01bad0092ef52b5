"""The paper's evaluation protocol: train / query / database split and one caption per item.

DUCH ignores any split shipped with a dataset and draws its own with seed 42: 50 % of the items
train the hashing heads, 10 % are queries and the remaining 40 % form the retrieval database. One
caption per item is chosen once, with a seed, and used for training, queries and the database
alike.

Two ways to draw (``DataConfig.split_mode``):

* ``"sorted"`` (default): :func:`paper_split` sorts the item ids first and :func:`choose_captions`
  hashes each id, so the split and the captions are pure functions of the ids and the seed; the
  order of rows in an archive never changes them.
* ``"reference"``: :func:`reference_split` and :func:`reference_caption_choice` repeat the
  published code's draws on the dataset file's own item order, so a dataset file in its published
  order gives exactly the published split (UCM: the same 1050 / 210 / 840 images) and captions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

SPLIT_NAMES: tuple[str, ...] = ("train", "query", "database")
SPLIT_MODES: tuple[str, ...] = ("sorted", "reference")
SplitMode = Literal["sorted", "reference"]


def _count(n: int, frac: float) -> int:
    # floor, tolerant of binary rounding (e.g. 0.29 * 100 = 28.999999999999996)
    return int(math.floor(n * frac + 1e-9))


def _unique_ids(item_ids: Iterable[str]) -> list[str]:
    ids = [str(i) for i in item_ids]
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"item ids must be unique; duplicated: {dups[:5]} ({len(dups)} in all)")
    return ids


def _check_fracs(train_frac: float, query_frac: float) -> None:
    if not 0.0 < train_frac <= 1.0:
        raise ValueError(f"train_frac must be in (0, 1], got {train_frac}")
    if not 0.0 <= query_frac <= 1.0 - train_frac + 1e-12:
        raise ValueError(
            f"query_frac must be in [0, 1 - train_frac] = [0, {1 - train_frac:g}], got {query_frac}"
        )


def paper_split(
    item_ids: Iterable[str],
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
    mode: SplitMode = "sorted",
) -> dict[str, list[str]]:
    """Split items into train / query / database as the paper does.

    ``mode="sorted"``: ``floor(N * train_frac)`` items are drawn for training (Python
    ``random.Random(seed).sample`` over the sorted ids, as the reference code draws with
    ``random.sample``), then ``floor(N * query_frac)`` of the rest are drawn as queries; the
    remainder is the database. UCM (2,100 items) gives 1050 / 210 / 840, RSICD (10,921)
    5460 / 1092 / 4369.

    ``mode="reference"``: :func:`reference_split` (the published draw on the given order).

    Args:
        item_ids: unique item ids (``"sorted"``: any order, they are sorted first;
            ``"reference"``: in the dataset file's order).
        seed: random seed (paper: 42).
        train_frac: fraction for training, in ``(0, 1]``.
        query_frac: fraction for queries, in ``[0, 1 - train_frac]``.
        mode: ``"sorted"`` or ``"reference"``.

    Returns:
        ``{"train": [...], "query": [...], "database": [...]}``, disjoint and together covering
        every id; each list sorted (``"sorted"``) or in the given order (``"reference"``).

    Raises:
        ValueError: duplicate ids, fractions out of range or an unknown mode.
    """
    if mode == "reference":
        return reference_split(item_ids, seed=seed, train_frac=train_frac, query_frac=query_frac)
    if mode != "sorted":
        raise ValueError(f"split mode must be one of {', '.join(SPLIT_MODES)}; got {mode!r}")
    _check_fracs(train_frac, query_frac)
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


def reference_split(
    item_ids: Iterable[str],
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
) -> dict[str, list[str]]:
    """The published code's split, drawn on the dataset file's own item order.

    With ``idx = [0, 1, ..., N - 1]`` the positions of the items in the given order and one
    ``random.Random(seed)`` stream (the published code seeds Python's global generator with
    ``random.seed(42)`` just before; nothing else draws from it in between):

    1. ``train = sorted(rng.sample(idx, int(N * train_frac)))``;
    2. ``rest = sorted(set(idx) - set(train))``;
    3. ``query = sorted(rng.sample(rest, int(len(rest) * f)))`` with
       ``f = query_frac / (1 - train_frac)``, the query share *of the rest* (published: 0.2;
       ``0.1 / 0.5`` is exactly the float ``0.2``), and ``f = 0`` when ``train_frac = 1``;
    4. ``database`` = the rest of ``rest``.

    ``int`` truncates, as published. UCM in its file order (``1.tif`` ... ``2100.tif``) gives
    1050 / 210 / 840, RSITMD (4,743 items) 2371 / 474 / 1898. The captions of each part are then
    chosen by :func:`reference_caption_choice`.

    Args:
        item_ids: unique item ids in the dataset file's order (the draw depends on that order).
        seed: random seed (published: 42).
        train_frac: fraction for training, in ``(0, 1]``.
        query_frac: fraction of all items for queries, in ``[0, 1 - train_frac]``.

    Returns:
        ``{"train": [...], "query": [...], "database": [...]}``, each in the given order,
        disjoint and together covering every id.

    Raises:
        ValueError: duplicate ids or fractions out of range.
    """
    _check_fracs(train_frac, query_frac)
    ids = _unique_ids(item_ids)
    n = len(ids)
    rng = random.Random(seed)
    idx = list(range(n))
    train = sorted(rng.sample(idx, int(n * train_frac)))
    rest = sorted(set(idx).difference(train))
    share = query_frac / (1.0 - train_frac) if train_frac < 1.0 else 0.0
    query = sorted(rng.sample(rest, min(int(len(rest) * share), len(rest))))
    database = sorted(set(rest).difference(query))
    return {
        "train": [ids[i] for i in train],
        "query": [ids[i] for i in query],
        "database": [ids[i] for i in database],
    }


def reference_caption_choice(n_items: int, seed: int = 42, n_captions: int = 5) -> np.ndarray:
    """The published one-caption-per-item choice for one part of :func:`reference_split`.

    The published code draws it separately for the training, query and database parts, each time
    from a fresh ``random.Random(seed)``: the ``j``-th item of the part (in the part's order) gets
    caption ``rng.sample(range(n_captions), 1)[0]`` of the ``j``-th draw. The same position in two
    parts therefore gets the same caption index.

    Args:
        n_items: number of items in the part.
        seed: random seed (published: 42).
        n_captions: captions per item (published: 5 for every item).

    Returns:
        ``(n_items,)`` int64 caption indices in ``[0, n_captions)``.

    Raises:
        ValueError: ``n_items < 0`` or ``n_captions < 1``.
    """
    if n_items < 0 or n_captions < 1:
        raise ValueError(f"need n_items >= 0 and n_captions >= 1, got {n_items}, {n_captions}")
    rng = random.Random(seed)
    return np.array([rng.sample(range(n_captions), 1)[0] for _ in range(n_items)], dtype=np.int64)


def split_column(
    item_ids: Sequence[str],
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
    mode: SplitMode = "sorted",
) -> list[str]:
    """:func:`paper_split` as one split name per item, aligned with ``item_ids``."""
    parts = paper_split(
        item_ids, seed=seed, train_frac=train_frac, query_frac=query_frac, mode=mode
    )
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


SPLIT_SOURCES: tuple[str, ...] = ("auto", "manifest", "paper")


def resolve_split(
    item_ids: Sequence[str],
    manifest_split: Sequence[str | None],
    source: str = "auto",
    seed: int = 42,
    train_frac: float = 0.5,
    query_frac: float = 0.1,
    mode: SplitMode = "sorted",
) -> dict[str, list[str]]:
    """The train / query / database items of an archive, following ``source``.

    ``"manifest"``: the archive's own ``split`` column (every item needs one); ``"paper"``:
    :func:`paper_split` with ``seed``, the fractions and ``mode``; ``"auto"``: the manifest's
    split when every item has one, else the paper split.

    Args:
        item_ids: the archive's item ids, in its row order (``mode="reference"`` draws on it).
        manifest_split: the ``split`` column aligned with ``item_ids`` (None where missing).

    Returns:
        ``{"train": [...], "query": [...], "database": [...]}``; the manifest's lists sorted.

    Raises:
        ValueError: ``source`` is unknown, or ``"manifest"`` while some items have no split.
    """
    if source not in SPLIT_SOURCES:
        raise ValueError(f"split source must be one of {SPLIT_SOURCES}, got {source!r}")
    complete = all(s in SPLIT_NAMES for s in manifest_split)
    if source == "manifest" and not complete:
        raise ValueError(
            "split_source: manifest, but some archive items have no train/query/database split"
        )
    if source == "manifest" or (source == "auto" and complete):
        out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
        for item, s in zip(item_ids, manifest_split, strict=True):
            out[str(s)].append(str(item))
        return {k: sorted(v) for k, v in out.items()}
    return paper_split(item_ids, seed=seed, train_frac=train_frac, query_frac=query_frac, mode=mode)
