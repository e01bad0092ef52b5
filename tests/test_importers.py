"""Importers on the real caption files (when present) and on small hand-made bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from duch_core.archive import ArchiveError, read_archive, summarize_archive
from duch_core.importers import (
    UCM_CLASSES,
    import_karpathy,
    import_precomp,
    import_source,
    prefix_label,
    ucm_label,
    write_manifest,
)
from jobs.import_archive import main as import_main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UCM_JSON = DATA / "ucm_captions" / "dataset.json"
SYDNEY_JSON = DATA / "sydney_captions" / "dataset.json"
RSITMD = DATA / "rsitmd_captions"


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real caption data not available here ({path} is absent)")


# ---------------------------------------------------------------------------------------------
# real data


def test_ucm_counts_labels_and_split():
    _need(UCM_JSON)
    t = import_karpathy(str(UCM_JSON), "/data/ucm/images")
    assert t.num_rows == 2100
    caps = t.column("captions").to_pylist()
    assert sum(len(c) for c in caps) == 10500 and {len(c) for c in caps} == {5}
    labels = Counter(t.column("label").to_pylist())
    assert len(labels) == 21 and set(labels.values()) == {100}
    by_id = dict(zip(t.column("item_id").to_pylist(), t.column("label").to_pylist(), strict=True))
    assert by_id["1.tif"] == "agricultural" and by_id["1001.tif"] == "harbor"
    assert by_id["2100.tif"] == "tenniscourt"
    assert Counter(t.column("split").to_pylist()) == {"train": 1050, "query": 210, "database": 840}
    assert Counter(t.column("source_split").to_pylist()) == {"train": 1680, "val": 210, "test": 210}
    assert t.column("image_uri")[0].as_py() == "/data/ucm/images/1.tif"
    # every class appears in the query and database sets (the paper's evaluation needs both)
    for part in ("query", "database"):
        got = {
            lab
            for lab, s in zip(labels_of(t), t.column("split").to_pylist(), strict=True)
            if s == part
        }
        assert got == set(UCM_CLASSES)


def labels_of(t):
    return t.column("label").to_pylist()


def test_sydney_has_no_labels():
    _need(SYDNEY_JSON)
    t = import_source(str(SYDNEY_JSON.parent))
    assert t.num_rows == 613
    assert sum(len(c) for c in t.column("captions").to_pylist()) == 613 * 5
    assert t.column("label").null_count == 613
    assert Counter(t.column("split").to_pylist()) == {"train": 306, "query": 61, "database": 246}


def test_rsitmd_precomp_both_layouts():
    _need(RSITMD)
    train = import_precomp(str(RSITMD), "train", None)  # one file name per image, 5 captions
    assert train.num_rows == 4291
    # 21,455 caption lines; four images have five blank lines each: kept, with no captions
    assert sum(len(c) for c in train.column("captions").to_pylist()) == 5 * 4291 - 20
    assert len(summarize_archive(train).empty_caption_items) == 4
    assert train.column("label")[0].as_py() == "baseballfield"
    assert train.column("label").null_count == 0
    test = import_precomp(str(RSITMD), "test", None)  # one file name line per caption line
    assert test.num_rows == 452
    assert {len(c) for c in test.column("captions").to_pylist()} == {5}
    both = import_source(str(RSITMD))
    assert both.num_rows == 4291 + 452
    assert Counter(both.column("source_split").to_pylist()) == {"train": 4291, "test": 452}
    n = both.num_rows
    assert Counter(both.column("split").to_pylist()) == {
        "train": n // 2,
        "query": n // 10,
        "database": n - n // 2 - n // 10,
    }


def test_cli_imports_ucm(tmp_path, capsys):
    _need(UCM_JSON)
    out = tmp_path / "ucm.parquet"
    rc = import_main([str(UCM_JSON), str(out), "--image-root", "images", "--check-images"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "items: 2100" in printed and "captions: 10500" in printed
    assert "missing image files: 2100" in printed  # the images themselves are not here
    t = read_archive(str(out))
    assert t.num_rows == 2100
    assert t.column("image_uri")[0].as_py() == str(tmp_path / "images" / "1.tif")
    assert import_main([str(UCM_JSON), str(tmp_path / "u2.parquet"), "--require-images"]) == 1


# ---------------------------------------------------------------------------------------------
# small hand-made inputs


def _karpathy(tmp_path: Path, images: list[dict], dataset: str = "test") -> str:
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"dataset": dataset, "images": images}))
    return str(p)


def _img(name: str, *caps: str, split: str = "train") -> dict:
    return {
        "filename": name,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
    }


def test_empty_captions_allowed_and_counted_missing_images_reported(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "river_1.png").write_bytes(b"png")
    src = _karpathy(
        tmp_path,
        [
            _img("river_1.png", "a river ", "  "),  # blank sentence dropped, text stripped
            _img("river_2.png"),  # no sentences at all: allowed
            {"filename": "beach_1.png", "sentences": [{"tokens": ["a", "beach"]}]},  # tokens only
        ],
    )
    t = import_karpathy(src, str(root))
    assert t.column("captions").to_pylist() == [["a river"], [], ["a beach"]]
    assert t.column("label").to_pylist() == ["river", "river", "beach"]  # filename prefixes
    out, summary = write_manifest(t, str(tmp_path / "out" / "m.parquet"), check_images=True)
    assert summary.empty_caption_items == ["river_2.png"]
    assert summary.missing_images == ["river_2.png", "beach_1.png"]
    assert summary.n_captions == 2
    assert read_archive(out).num_rows == 3


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"images": [', "not valid JSON"),
        ("[1, 2]", "'images' list"),
        (json.dumps({"images": [{"sentences": []}]}), r"images\[0\] has no 'filename'"),
        (
            json.dumps({"images": [{"filename": "a.tif"}]}),
            r"images\[0\] \(a.tif\) has no 'sentences'",
        ),
        (
            json.dumps({"images": [{"filename": "a.tif", "sentences": [{"x": 1}]}]}),
            r"sentences\[0\] has neither",
        ),
        (
            json.dumps({"images": [_img("a.tif", "x"), _img("b.tif", "y"), _img("a.tif", "z")]}),
            r"duplicated: 'a.tif' \(rows 0 and 2\)",
        ),
    ],
)
def test_karpathy_bad_input(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ArchiveError, match=match):
        import_karpathy(str(p), None)


def test_karpathy_missing_file(tmp_path):
    with pytest.raises(ArchiveError, match="not found"):
        import_karpathy(str(tmp_path / "nope.json"), None)


def test_label_rules(tmp_path):
    assert ucm_label("1.tif") == "agricultural" and ucm_label("imgs/200.tif") == "airplane"
    with pytest.raises(ArchiveError, match="1.tif .. 2100.tif"):
        ucm_label("2101.tif")
    assert (
        prefix_label("storagetanks_12.tif") == "storagetanks" and prefix_label("00001.jpg") is None
    )
    src = _karpathy(tmp_path, [_img("1.tif", "x"), _img("101.tif", "y")], dataset="UCM")
    assert import_karpathy(src, None).column("label").to_pylist() == ["agricultural", "airplane"]
    assert import_karpathy(src, None, labels="none").column("label").null_count == 2
    with_class = [
        dict(_img("1.tif", "x"), classname="farm"),
        dict(_img("2.tif", "y"), classname="sea"),
    ]
    src = _karpathy(tmp_path, with_class)
    assert import_karpathy(src, None).column("label").to_pylist() == ["farm", "sea"]
    with pytest.raises(ArchiveError, match="unknown label rule"):
        import_karpathy(src, None, labels="folder")
    nosplit = import_karpathy(src, None, split_seed=None)
    assert nosplit.column("split").null_count == 2


def _precomp(tmp_path: Path, names: list[str], caps: list[str], split: str = "train") -> str:
    (tmp_path / f"{split}_filename.txt").write_text("\n".join(names) + "\n")
    (tmp_path / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return str(tmp_path)


def test_precomp_layouts_and_errors(tmp_path):
    # one filename line per caption line, groups not consecutive
    d = _precomp(tmp_path, ["a_1.tif", "b_2.tif", "a_1.tif"], ["x", "y", "z"])
    t = import_precomp(d, "train", "s3://bucket/imgs")
    assert t.column("item_id").to_pylist() == ["a_1.tif", "b_2.tif"]
    assert t.column("captions").to_pylist() == [["x", "z"], ["y"]]
    assert t.column("image_uri").to_pylist()[0] == "s3://bucket/imgs/a_1.tif"
    # two captions per image line
    d = _precomp(tmp_path, ["a_1.tif", "b_2.tif"], ["w", "x", "y", "z"])
    assert import_precomp(d, "train", None).column("captions").to_pylist() == [
        ["w", "x"],
        ["y", "z"],
    ]
    d = _precomp(tmp_path, ["a_1.tif", "b_2.tif"], ["w", "x", "y"])
    with pytest.raises(ArchiveError, match="fit neither layout"):
        import_precomp(d, "train", None)
    d = _precomp(tmp_path, ["a_1.tif", "a_1.tif"], ["w", "x", "y", "z"])
    with pytest.raises(ArchiveError, match="listed twice"):
        import_precomp(d, "train", None)
    d = _precomp(tmp_path, ["a_1.tif", "", "c_1.tif"], ["w", "x", "y"])
    with pytest.raises(ArchiveError, match=r"blank file name on line\(s\) \[2\]"):
        import_precomp(d, "train", None)
    with pytest.raises(ArchiveError, match="not found"):
        import_precomp(d, "val", None)
    with pytest.raises(ArchiveError, match="no Karpathy JSON"):
        import_source(str(tmp_path / "empty"))


def test_cli_bad_input(tmp_path, capsys):
    assert import_main([str(tmp_path / "none.json"), str(tmp_path / "m.parquet")]) == 2
    assert "not found" in capsys.readouterr().err
    assert import_main([]) == 2
    assert import_main(["a.json", "m.parquet", "--split-seed", "abc"]) == 2
    assert import_main(["a.json", "m.parquet", "--set", "colour=red"]) == 2
    src = _karpathy(tmp_path, [_img("x_1.tif", "a"), _img("x_2.tif", "b")])
    out = tmp_path / "m.jsonl"
    assert import_main([src, str(out), "--split-seed", "none", "--labels", "none"]) == 0
    t = read_archive(str(out))
    assert t.column("split").null_count == 2 and t.column("label").null_count == 2
    assert summarize_archive(t).n_captions == 2
