"""Augmented views resampled per epoch (``duch.augment.resample_each_epoch``).

The feature stage stores ``V`` independently drawn augmented views per item, view 0 being the
single fixed view of the default setting; epoch ``e`` trains on view ``e % V``, in the plain
loop (:func:`duch_core.feature_batches.make_batches`) and in the Ray Train worker loop
(``jobs.train.epoch_batches``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from duch_core import extraction
from duch_core import features as fx
from duch_core.archive import read_archive
from duch_core.config import ConfigError, load
from duch_core.feature_batches import make_batches, view_for_epoch
from duch_core.features import train_columns
from jobs._common import run_feature_stage
from jobs.train import epoch_batches
from jobs.train_config import TrainJobConfig, validate

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
RESAMPLE = ("duch.augment.resample_each_epoch=true", "duch.augment.views_per_item=3")


def smoke_config(*overrides: str) -> TrainJobConfig:
    return validate(load(TrainJobConfig, SMOKE, list(overrides)))


# --------------------------------------------------------------------------------------------
# configuration


def test_views_per_item_is_validated() -> None:
    with pytest.raises(ConfigError, match="duch.augment.views_per_item.*>= 2"):
        smoke_config("duch.augment.resample_each_epoch=true")  # views_per_item 1
    with pytest.raises(ConfigError, match="duch.augment.views_per_item.*>= 2"):
        smoke_config("duch.augment.resample_each_epoch=true", "duch.augment.views_per_item=0")
    with pytest.raises(ConfigError, match="duch.augment.views_per_item.*must be 1"):
        smoke_config("duch.augment.views_per_item=3")  # resampling off
    cfg = smoke_config(*RESAMPLE)
    assert cfg.duch.augment.resample_each_epoch and cfg.duch.augment.views_per_item == 3
    assert fx.view_count(cfg.duch.augment) == 3
    assert fx.view_count(smoke_config().duch.augment) == 1


def test_views_are_part_of_the_feature_fingerprint() -> None:
    base = smoke_config().duch
    fps = {
        fx.fingerprint(fx.fingerprint_inputs(d, "m"))
        for d in (
            base,
            smoke_config(*RESAMPLE).duch,
            smoke_config(RESAMPLE[0], "duch.augment.views_per_item=2").duch,
        )
    }
    assert len(fps) == 3


def test_view_for_epoch() -> None:
    assert [view_for_epoch(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [view_for_epoch(e, 1) for e in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="views"):
        view_for_epoch(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        view_for_epoch(-1, 2)


# --------------------------------------------------------------------------------------------
# feature stage: decode + backbones


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """Six items of the demo archive, with their chosen captions (the stage's input rows)."""
    from duch_core.synthetic_archive import make_demo_archive

    out = tmp_path_factory.mktemp("views_archive")
    make_demo_archive(str(out), n_per_class=1, image_size=64, seed=0, workers=1)
    archive = read_archive(str(out))
    return fx.manifest_rows(archive, smoke_config().duch.data.caption_seed).slice(0, 6)


def _pixels(decoded: pa.Table, column: str) -> np.ndarray:
    return extraction.pixels(decoded, column, smoke_config().duch.image_backbone.image_size)


def _features(cfg: TrainJobConfig, rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    d = cfg.duch
    decoded = extraction.decode_batch(
        rows, d.image_backbone, d.text_backbone, d.augment, io_threads=2
    )
    enc = extraction.FeatureEncoder(
        d.image_backbone, d.text_backbone, d.augment, d.paper_compat, 8, 1
    )
    return decoded, enc(decoded)


def test_three_views_are_distinct_and_view_zero_is_the_single_view(manifest: pa.Table) -> None:
    long_text = "duch.text_backbone.max_length=256"  # no truncation: new words, new features
    dec1, one = _features(smoke_config(long_text), manifest)
    dec3, three = _features(smoke_config(*RESAMPLE, long_text), manifest)
    n = manifest.num_rows
    assert not any(three.column("error_stage").to_pylist())
    assert "img_aug_1" not in one.column_names and "caption_aug_1" not in dec1.column_names
    for v in (1, 2):
        assert {f"img_aug_{v}", f"txt_aug_{v}", f"caption_aug_{v}"} <= set(three.column_names)

    # view 0 of V = 3 is exactly the output of the default single view
    for col in ("caption", "caption_aug"):
        assert three.column(col).to_pylist() == one.column(col).to_pylist()
    np.testing.assert_array_equal(_pixels(dec3, "pixels_aug"), _pixels(dec1, "pixels_aug"))
    for col in ("img", "img_aug", "txt", "txt_aug"):
        np.testing.assert_array_equal(
            fx.list_to_numpy(three.column(col)), fx.list_to_numpy(one.column(col))
        )

    # three different augmented images per item, all different from the original
    pixel_views = [_pixels(dec3, fx.view_name("pixels_aug", v)) for v in range(3)]
    img_views = [fx.list_to_numpy(three.column(fx.aug_columns(v)[0])) for v in range(3)]
    img = fx.list_to_numpy(three.column("img"))
    for i in range(n):
        for a in range(3):
            assert not np.allclose(img_views[a][i], img[i])
            for b in range(a):
                assert np.abs(pixel_views[a][i] - pixel_views[b][i]).max() > 1e-3
                assert not np.allclose(img_views[a][i], img_views[b][i])

    # caption views: independently rewritten; same text <=> same features
    caps = [three.column(fx.view_name("caption_aug", v)).to_pylist() for v in range(3)]
    txt_views = [fx.list_to_numpy(three.column(fx.aug_columns(v)[1])) for v in range(3)]
    differing = 0
    for i in range(n):
        differing += len({caps[v][i] for v in range(3)}) == 3
        for a in range(3):
            for b in range(a):
                same = caps[a][i] == caps[b][i]
                assert np.array_equal(txt_views[a][i], txt_views[b][i]) == same, (i, a, b)
    assert differing >= n // 2, caps


def test_text_method_none_keeps_caption_views_equal(manifest: pa.Table) -> None:
    cfg = smoke_config(*RESAMPLE, "duch.augment.text_method=none")
    dec, _ = _features(cfg, manifest.slice(0, 2))
    caps = [dec.column(fx.view_name("caption_aug", v)).to_pylist() for v in range(3)]
    assert caps[0] == caps[1] == caps[2] == dec.column("caption").to_pylist()


def test_feature_stage_on_ray_data_writes_every_view(tmp_path: Path, ray_session: Any) -> None:
    """The whole stage (Ray Data, Parquet, cache) with V = 1 and V = 3 on the same items."""
    from duch_core.synthetic_archive import make_demo_archive

    make_demo_archive(str(tmp_path / "a"), n_per_class=1, image_size=64, seed=0, workers=1)
    archive = read_archive(str(tmp_path / "a"))
    sets = {}
    for v, overrides in ((1, ()), (3, RESAMPLE)):
        cfg = smoke_config(*overrides)
        sets[v] = run_feature_stage(cfg.duch, archive, cfg.features, str(tmp_path / "cache"))
    assert sets[1].fingerprint != sets[3].fingerprint
    assert (sets[1].views, sets[3].views) == (1, 3)
    assert sets[3].meta["views"] == 3
    cols = train_columns(3)
    t1 = fx.read_columns(sets[1], train_columns(1)).sort_by("item_id")
    t3 = fx.read_columns(sets[3], cols).sort_by("item_id")
    assert t1.column("item_id").to_pylist() == t3.column("item_id").to_pylist()
    for col in ("img", "img_aug", "txt", "txt_aug"):
        np.testing.assert_array_equal(
            fx.list_to_numpy(t3.column(col)), fx.list_to_numpy(t1.column(col))
        )
    views = [fx.list_to_numpy(t3.column(fx.aug_columns(v)[0])) for v in range(3)]
    for a in range(3):
        for b in range(a):
            assert (np.abs(views[a] - views[b]).max(axis=1) > 0).all()
    again = run_feature_stage(
        smoke_config(*RESAMPLE).duch, archive, smoke_config().features, str(tmp_path / "cache")
    )
    assert again.reused and again.views == 3


# --------------------------------------------------------------------------------------------
# training uses view e % V


def _view_mats(n: int, views: int) -> tuple[list[str], list[torch.Tensor]]:
    """Ids and matrices whose augmented view ``v`` of item ``i`` is filled with ``100 v + i``."""
    ids = [f"item{i:03d}" for i in range(n)]
    rows = torch.arange(n, dtype=torch.float32)[:, None]
    return ids, [rows + 100.0 * v + torch.zeros(n, 4) for v in range(views)]


def test_make_batches_uses_view_e_mod_v() -> None:
    ids, img_views = _view_mats(10, 3)
    txt_views = [m[:, :3] + 0.5 for m in img_views]
    img = torch.randn(10, 4)
    txt = torch.randn(10, 3)
    for epoch in range(5):
        batches = make_batches(ids, img, img_views, txt, tuple(txt_views), 4, 0, epoch)
        assert sorted(i for b in batches for i in b.ids) == ids
        for b in batches:
            idx = torch.tensor([ids.index(i) for i in b.ids], dtype=torch.float32)
            want = idx + 100.0 * (epoch % 3)
            assert torch.equal(b.img_aug[:, 0], want)
            assert torch.equal(b.txt_aug[:, 0], want + 0.5)
            assert torch.equal(b.img, img[idx.long()])
        # the same shuffle as with the epoch's view given as a single matrix
        single = make_batches(
            ids, img, img_views[epoch % 3], txt, txt_views[epoch % 3], 4, 0, epoch
        )
        assert [b.ids for b in single] == [b.ids for b in batches]


def test_make_batches_view_lists_must_match() -> None:
    ids, views = _view_mats(6, 2)
    with pytest.raises(ValueError, match="same number"):
        make_batches(ids, views[0], views, views[0], views[:1], 4, 0, 0)
    with pytest.raises(ValueError, match="both"):
        make_batches(ids, views[0], views, views[0], views[0], 4, 0, 0)
    with pytest.raises(ValueError, match="same number"):
        make_batches(ids, views[0], [], views[0], [], 4, 0, 0)


def test_ray_worker_batches_use_view_e_mod_v(ray_session: Any) -> None:
    """``jobs.train.epoch_batches`` (the Ray Train worker's input) on a real Ray dataset."""
    import ray

    n, v = 12, 3
    ids, views = _view_mats(n, v)
    cols: dict[str, Any] = {"item_id": pa.array(ids)}
    cols["img"] = fx.fixed_size_list(-torch.ones(n, 4).numpy())
    cols["txt"] = fx.fixed_size_list(-torch.ones(n, 4).numpy())
    for k in range(v):
        img_col, txt_col = fx.aug_columns(k)
        cols[img_col] = fx.fixed_size_list(views[k].numpy())
        cols[txt_col] = fx.fixed_size_list((views[k] + 0.5).numpy())
    table = pa.table(cols)
    assert sorted(table.column_names) == sorted(train_columns(v))
    ds = ray.data.from_arrow(table)
    config = {"per_worker_batch": 4, "drop_last": False, "shuffle_buffer": n, "views": v}
    for epoch in range(4):
        batches = list(epoch_batches(ds, epoch, config, seed=0, stats=None))
        assert sorted(i for b in batches for i in b.ids) == ids
        for b in batches:
            idx = torch.tensor([ids.index(i) for i in b.ids], dtype=torch.float32)
            assert torch.equal(b.img_aug[:, 0], idx + 100.0 * (epoch % v))
            assert torch.equal(b.txt_aug[:, 0], idx + 100.0 * (epoch % v) + 0.5)
            assert torch.equal(b.img, -torch.ones(len(b), 4))
    # without "views" (a run configured before the option): always view 0
    plain = {k: x for k, x in config.items() if k != "views"}
    for b in epoch_batches(ds, 2, plain, seed=0, stats=None):
        idx = torch.tensor([ids.index(i) for i in b.ids], dtype=torch.float32)
        assert torch.equal(b.img_aug[:, 0], idx)
