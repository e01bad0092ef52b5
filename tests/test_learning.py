"""Learning, not just running: the whole DUCH pipeline on the generated demo archive.

demo archive (real image files + captions) -> decode/preprocess -> tiny random backbones ->
features -> augmented views -> z-score -> train the heads on CPU -> mAP@20 on binary codes.
With paper settings except a smaller batch and more epochs (the demo training set is 640 items,
not 1,050), the cross-modal mAP@20 at 64 bits goes from chance level to >= 0.9.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from duch_core import storage
from duch_core.archive import read_archive
from duch_core.augment import augment_caption, augment_image
from duch_core.backbones import load_image_tower, load_text_tower
from duch_core.config import (
    DUCHConfig,
    ImageBackboneConfig,
    ModelConfig,
    OptimConfig,
    TextBackboneConfig,
)
from duch_core.feature_batches import FeatureStats, make_batches
from duch_core.imageio import decode_image, preprocess
from duch_core.splits import choose_captions
from duch_core.synthetic_archive import make_demo_archive
from duch_core.train_loop import RetrievalSet, evaluate, fit, make_model

N_PER_CLASS = 160  # 8 classes -> 1,280 items: 640 train, 128 query, 512 database
EPOCHS = 75
BATCH = 32


def learning_run(root: Path, demo_seed: int = 0, train_seed: int = 42) -> dict[str, Any]:
    """Run the pipeline; returns mAP before/after training and the wall time."""
    t0 = time.perf_counter()
    manifest = make_demo_archive(
        str(root / "demo"), n_per_class=N_PER_CLASS, seed=demo_seed, image_size=64
    )
    rows = read_archive(manifest).to_pylist()
    ids = [str(r["item_id"]) for r in rows]
    labels = np.array([r["label"] for r in rows])
    split = np.array([r["split"] for r in rows])

    cfg = DUCHConfig(
        model=ModelConfig(bits=64),
        optim=OptimConfig(epochs=EPOCHS, batch_size=BATCH, seed=train_seed),
        image_backbone=ImageBackboneConfig(
            source="tiny:vit", image_size=32, center_crop=0, normalize=False
        ),
        text_backbone=TextBackboneConfig(source="tiny:bert"),
    )
    image_tower = load_image_tower(cfg.image_backbone)
    text_tower = load_text_tower(cfg.text_backbone, cfg.paper_compat)

    # one fixed augmented copy per item, as the paper
    rng = np.random.default_rng(cfg.augment.seed)
    pictures = [decode_image(storage.read_bytes(r["image_uri"])) for r in rows]
    augmented = [augment_image(p, cfg.augment.image_preset, rng) for p in pictures]
    chosen = choose_captions(ids, [len(r["captions"]) for r in rows], seed=cfg.data.caption_seed)
    captions = [r["captions"][c] for r, c in zip(rows, chosen, strict=True)]
    captions_aug = [augment_caption(c, rng) for c in captions]

    def image_features(pics: list[np.ndarray]) -> torch.Tensor:
        pixels = np.stack([preprocess(p, cfg.image_backbone) for p in pics])
        return image_tower(torch.from_numpy(pixels))

    with torch.no_grad():
        img, img_aug = image_features(pictures), image_features(augmented)
        txt, txt_aug = text_tower(captions), text_tower(captions_aug)

    tr = np.flatnonzero(split == "train")
    q = np.flatnonzero(split == "query")
    db = np.flatnonzero(split == "database")
    stats = FeatureStats.fit(img[tr], txt[tr])
    img, img_aug = stats.apply(img, "image"), stats.apply(img_aug, "image")
    txt, txt_aug = stats.apply(txt, "text"), stats.apply(txt_aug, "text")
    query = RetrievalSet(img[q], txt[q], labels[q].tolist())
    database = RetrievalSet(img[db], txt[db], labels[db].tolist())
    features_s = time.perf_counter() - t0

    model = make_model(img.shape[1], txt.shape[1], cfg)
    before = evaluate(model, query, database, k=20)
    train_ids = [ids[i] for i in tr]
    t1 = time.perf_counter()
    history = fit(
        model,
        lambda e: make_batches(
            train_ids, img[tr], img_aug[tr], txt[tr], txt_aug[tr], BATCH, cfg.optim.seed, e
        ),
        cfg,
        train_ids,
        query,
        database,
    )
    after = evaluate(model, query, database, k=20)
    return {
        "before": before,
        "after": after,
        "history": history,
        "sizes": (len(tr), len(q), len(db)),
        "features_s": features_s,
        "train_s": time.perf_counter() - t1,
        "total_s": time.perf_counter() - t0,
    }


@pytest.mark.timeout(600)
def test_training_on_the_demo_archive_learns(tmp_path: Path) -> None:
    res = learning_run(tmp_path)
    before, after = res["before"], res["after"]
    print(
        f"\nsizes {res['sizes']}  before {before}\nafter {after}\n"
        f"features {res['features_s']:.1f}s train {res['train_s']:.1f}s total {res['total_s']:.1f}s"
    )
    assert res["sizes"] == (640, 128, 512)
    # chance level: 8 balanced classes, random 64-bit heads
    assert before["i2t"] < 0.3 and before["t2i"] < 0.3
    assert after["i2t"] >= 0.9 and after["t2i"] >= 0.9
    assert after["i2i"] > before["i2i"] and after["t2t"] > before["t2t"]
    assert res["history"][-1]["map_i2t"] == after["i2t"]
