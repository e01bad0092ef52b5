"""The paper's split protocol and the seeded one-caption-per-item choice, in both modes."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from duch_core.config import ConfigError, DUCHConfig, load
from duch_core.splits import (
    choose_captions,
    paper_split,
    reference_caption_choice,
    reference_split,
    split_column,
)


def _ids(n: int) -> list[str]:
    return [f"{i + 1}.tif" for i in range(n)]


@pytest.mark.parametrize(("n", "sizes"), [(2100, (1050, 210, 840)), (10921, (5460, 1092, 4369))])
def test_paper_split_sizes(n, sizes):
    parts = paper_split(_ids(n))
    assert tuple(len(parts[k]) for k in ("train", "query", "database")) == sizes
    union = set(parts["train"]) | set(parts["query"]) | set(parts["database"])
    assert union == set(_ids(n))
    assert sum(len(v) for v in parts.values()) == n  # disjoint


def test_paper_split_is_deterministic_and_order_free():
    ids = _ids(500)
    shuffled = ids[:]
    random.Random(7).shuffle(shuffled)
    a, b = paper_split(ids), paper_split(shuffled)
    assert a == b
    assert all(v == sorted(v) for v in a.values())
    assert paper_split(ids, seed=43) != a
    assert paper_split(ids, seed=42) == a


def test_paper_split_fractions_and_errors():
    parts = paper_split(_ids(100), train_frac=0.8, query_frac=0.2)
    assert (len(parts["train"]), len(parts["query"]), len(parts["database"])) == (80, 20, 0)
    # binary rounding: 0.29 * 100 = 28.999999999999996 still gives 29
    assert len(paper_split(_ids(100), train_frac=0.29, query_frac=0.1)["train"]) == 29
    with pytest.raises(ValueError, match="unique"):
        paper_split(["a", "b", "a"])
    with pytest.raises(ValueError, match="train_frac"):
        paper_split(_ids(10), train_frac=0.0)
    with pytest.raises(ValueError, match="query_frac"):
        paper_split(_ids(10), train_frac=0.7, query_frac=0.5)


def test_split_column_aligns_with_ids():
    ids = _ids(50)[::-1]
    col = split_column(ids)
    parts = paper_split(ids)
    assert [i for i, s in zip(ids, col, strict=True) if s == "query"] == sorted(
        parts["query"], key=ids.index
    )


def test_choose_captions():
    ids = [f"item{i}" for i in range(2000)]
    idx = choose_captions(ids, 5)
    assert idx.dtype == np.int64 and idx.shape == (2000,)
    assert idx.min() == 0 and idx.max() == 4
    counts = np.bincount(idx, minlength=5)
    assert counts.min() > 330, counts  # roughly uniform (expected 400 each)
    # depends only on (seed, id): reordering or subsetting the ids changes nothing
    rev = choose_captions(ids[::-1], 5)
    np.testing.assert_array_equal(rev[::-1], idx)
    np.testing.assert_array_equal(choose_captions(ids[:10], 5), idx[:10])
    assert (choose_captions(ids, 5, seed=1) != idx).any()
    per_item = choose_captions(["a", "b", "c"], [0, 1, 3])
    assert per_item[0] == -1 and per_item[1] == 0 and 0 <= per_item[2] < 3
    with pytest.raises(ValueError, match="align"):
        choose_captions(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="unique"):
        choose_captions(["a", "a"], 5)


# ---------------------------------------------------------------------------------------------
# split_mode "reference": the published draw on the dataset file's order


def _ucm_file_order() -> list[str]:
    # The UCM-Captions JSON lists its 2,100 images as 1.tif ... 2100.tif in numeric order; image
    # N.tif belongs to UC Merced class (N - 1) // 100.
    return [f"{i}.tif" for i in range(1, 2101)]


def _published_draw(n: int) -> tuple[list[int], list[int], list[int]]:
    """A transcription of the published procedure with Python's global generator: seed 42, half
    for training, 20 % of the rest for queries, every list sorted."""
    state = random.getstate()
    try:
        random.seed(42)
        idx_all = list(range(n))
        train = sorted(random.sample(idx_all, int(n * 0.5)))
        rest = sorted(set(idx_all).difference(set(train)))
        query = sorted(random.sample(rest, int(len(rest) * 0.2)))
        db = sorted(set(rest).difference(set(query)))
        return train, query, db
    finally:
        random.setstate(state)


def _published_captions(n: int) -> list[int]:
    """One caption of five per item, a fresh seed-42 generator per part (published)."""
    state = random.getstate()
    try:
        random.seed(42)
        return [random.sample(range(5), 1)[0] for _ in range(n)]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("n", [2100, 4743, 613, 11])
def test_reference_split_is_the_published_draw(n):
    ids = [f"scene{i}" for i in range(n)]
    parts = reference_split(ids)
    train, query, db = _published_draw(n)
    assert parts == {
        "train": [ids[i] for i in train],
        "query": [ids[i] for i in query],
        "database": [ids[i] for i in db],
    }
    assert paper_split(ids, mode="reference") == parts


def test_reference_split_on_ucm_sizes_disjoint_and_per_class_counts():
    ids = _ucm_file_order()
    parts = reference_split(ids)
    assert tuple(len(parts[k]) for k in ("train", "query", "database")) == (1050, 210, 840)
    assert set(parts["train"]).isdisjoint(parts["query"])
    assert set(parts["train"]).isdisjoint(parts["database"])
    assert set(parts["query"]).isdisjoint(parts["database"])
    assert set().union(*parts.values()) == set(ids)
    for items in parts.values():  # each part keeps the file's order
        assert items == sorted(items, key=ids.index)

    def per_class(items: list[str]) -> tuple[int, int]:
        c = Counter((int(x.split(".")[0]) - 1) // 100 for x in items)
        assert len(c) == 21
        return min(c.values()), max(c.values())

    # the published UCM split has 5-15 queries and 32-52 database images per class
    assert per_class(parts["query"]) == (5, 15)
    assert per_class(parts["database"]) == (32, 52)
    # the sorted mode draws over "1.tif" < "10.tif" < "100.tif" ...: another split
    assert paper_split(ids) != parts


def test_reference_split_depends_on_file_order_sorted_does_not():
    ids = _ucm_file_order()
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    ref, ref_shuffled = reference_split(ids), reference_split(shuffled)
    assert set(ref["query"]) != set(ref_shuffled["query"])
    assert set(ref["train"]) != set(ref_shuffled["train"])
    # the same positions are drawn: the draw is a function of the order, not of the names
    renamed = reference_split([f"x{i}" for i in range(len(ids))])
    assert [int(x[1:]) for x in renamed["query"]] == [ids.index(x) for x in ref["query"]]
    assert paper_split(shuffled, mode="sorted") == paper_split(sorted(ids), mode="sorted")


def test_reference_split_is_deterministic_and_seeded():
    ids = _ucm_file_order()
    assert reference_split(ids) == reference_split(list(ids))
    assert reference_split(ids, seed=43) != reference_split(ids)
    col = split_column(ids, mode="reference")
    parts = reference_split(ids)
    assert [i for i, s in zip(ids, col, strict=True) if s == "query"] == parts["query"]
    # the query share is taken of the rest, as published: 20 % of the untrained half
    odd = reference_split([str(i) for i in range(4743)])
    assert tuple(len(odd[k]) for k in ("train", "query", "database")) == (2371, 474, 1898)
    whole = reference_split([str(i) for i in range(10)], train_frac=1.0, query_frac=0.0)
    assert (len(whole["train"]), len(whole["query"]), len(whole["database"])) == (10, 0, 0)


def test_reference_caption_choice():
    idx = reference_caption_choice(1050)
    assert idx.dtype == np.int64 and idx.shape == (1050,)
    assert idx.tolist() == _published_captions(1050)
    assert idx.min() == 0 and idx.max() == 4
    # each part restarts the generator: position j gets the same caption in every part
    np.testing.assert_array_equal(reference_caption_choice(210), idx[:210])
    assert (reference_caption_choice(50, seed=1) != idx[:50]).any()
    assert set(reference_caption_choice(100, n_captions=2).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="n_captions"):
        reference_caption_choice(3, n_captions=0)


def test_split_mode_errors_and_config():
    with pytest.raises(ValueError, match="split mode"):
        paper_split(_ids(10), mode="json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        reference_split(["a", "a", "b"])
    with pytest.raises(ValueError, match="query_frac"):
        reference_split(_ids(10), train_frac=0.7, query_frac=0.5)
    assert load(DUCHConfig).data.split_mode == "sorted"
    assert load(DUCHConfig, None, ["data.split_mode=reference"]).data.split_mode == "reference"
    with pytest.raises(ConfigError, match="data.split_mode"):
        load(DUCHConfig, None, ["data.split_mode=shuffled"])
