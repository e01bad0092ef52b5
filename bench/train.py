"""Training and feature-extraction throughput: the Ray paths vs plain single-process loops.

    python bench/train.py [--n 4096] [--batch-size 256] [--epochs 4] [--hidden-dim 1024]
        [--threads 2] [--extract-n-per-class 8] [--backbone offline:mobilenet_v2] [--json FILE]

**Training** (same seeded synthetic features, ``--n`` items of 512-d image and 768-d text
features, same global batch, same heads and losses):

* **loop**: :func:`duch_core.train_loop.train_epoch` in this process on
  :func:`~duch_core.train_loop.make_batches` (features already z-scored in memory).
* **ray_1w**: ``jobs/train.py``'s ``TorchTrainer`` (``jobs.train.make_trainer``) with one
  worker: the features stream from a materialised Ray dataset through ``get_dataset_shard``, are
  z-scored per batch, and every epoch reports and checkpoints.
* **ray_2w**: the same with two workers (gloo, codes gathered across workers).

Every process runs ``--threads`` torch threads (default 1: on a small shared machine more
intra-op threads than free cores make torch many times slower, which would measure the machine's
load, not the paths).

samples/s is measured inside the epoch (as :func:`train_epoch` records it: batches fetched,
forward, backward, optimiser steps, code-table updates), averaged over the epochs after the first
(warm-up); ``fit_s`` is the wall time of the whole ``trainer.fit()`` (worker start-up and
checkpoints included). Target: ray_1w / loop >= 0.85.

**Feature extraction** (the built-in demo archive, ``--extract-n-per-class`` images per class,
the ``--backbone`` image tower and ``offline:minilm``; both views of every image and both
captions):

* **loop**: one process, :func:`duch_core.extraction.decode_batch` then
  :class:`duch_core.extraction.FeatureEncoder` on consecutive batches (towers loaded and warmed
  up before timing);
* **ray_data**: the extract stage (``jobs._common.run_feature_stage``: decode tasks, backbone
  actor pool, parquet writer), timed end to end, actor start-up (torch import, tower loading)
  included;
* **ray_steady**: the stage run on a quarter of the images and on all of them;
  ``(n - n/4) / (t_n - t_n/4)`` removes the fixed start-up cost: the rate of a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np


def _features(n: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.5, 1.0, (n, 512)).astype(np.float32)
    txt = rng.normal(-0.2, 0.7, (n, 768)).astype(np.float32)
    return {
        "ids": [f"item{i:06d}" for i in range(n)],
        "img": img,
        "img_aug": (img + rng.normal(0, 0.1, img.shape)).astype(np.float32),
        "txt": txt,
        "txt_aug": (txt + rng.normal(0, 0.1, txt.shape)).astype(np.float32),
    }


def _job_config(args: argparse.Namespace, work: str, workers: int, name: str) -> Any:
    from duch_core.config import load
    from jobs.train_config import TrainJobConfig, validate

    return validate(
        load(
            TrainJobConfig,
            None,
            [
                f"work_dir={work}",
                f"duch.model.hidden_dim={args.hidden_dim}",
                "duch.model.bits=64",
                f"duch.optim.batch_size={args.batch_size}",
                f"duch.optim.epochs={args.epochs}",
                f"scaling.num_workers={workers}",
                "scaling.cpus_per_worker=0.5",
                f"run.name={name}",
                "run.checkpoints_to_keep=1",
            ],
        )
    )


def _steady(history: list[dict[str, float]]) -> float:
    later = history[1:] or history
    return float(sum(h["samples"] for h in later) / sum(h["seconds"] for h in later))


def bench_loop(args: argparse.Namespace, f: dict[str, Any], stats: Any, cfg: Any) -> dict:
    import torch

    from duch_core.code_table import CodeTable
    from duch_core.feature_batches import make_batches
    from duch_core.optim import make_optimizers
    from duch_core.train_loop import make_model, train_epoch

    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.optim.seed)
    model = make_model(512, 768, cfg)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    table = CodeTable(f["ids"], cfg.model.bits, seed=cfg.optim.seed)
    img, img_aug, txt, txt_aug = (
        stats.apply(f[k], "image" if k.startswith("img") else "text")
        for k in ("img", "img_aug", "txt", "txt_aug")
    )
    history = []
    t0 = time.perf_counter()
    for epoch in range(cfg.optim.epochs):
        batches = make_batches(
            f["ids"], img, img_aug, txt, txt_aug, cfg.optim.batch_size, cfg.optim.seed, epoch
        )
        history.append(train_epoch(model, batches, opt_hash, opt_disc, table, cfg, epoch))
    return {"samples_s": _steady(history), "fit_s": time.perf_counter() - t0}


def bench_ray(
    args: argparse.Namespace, ds: Any, f: dict[str, Any], stats: Any, workers: int, work: str
) -> dict:
    from duch_core.checkpoint import load_state
    from jobs import train

    cfg = _job_config(args, work, workers, f"bench{workers}w")
    trainer = train.make_trainer(
        cfg, ds, f["ids"], stats.to_dict(), 512, 768, torch_threads=args.threads
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        history = load_state(d)["history"]
    return {"samples_s": _steady(history), "fit_s": fit_s}


def bench_training(args: argparse.Namespace, work: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import ray

    from duch_core.feature_batches import FeatureStats
    from duch_core.features import fixed_size_list

    f = _features(args.n)
    stats = FeatureStats(
        float(f["img"].mean()), float(f["img"].std()), float(f["txt"].mean()), float(f["txt"].std())
    )
    table = pa.table(
        {
            "item_id": pa.array(f["ids"]),
            **{k: fixed_size_list(f[k]) for k in ("img", "img_aug", "txt", "txt_aug")},
        }
    )
    step = max(1, args.n // 8)  # several blocks, as shards would give
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, args.n, step)]).materialize()
    cfg = _job_config(args, work, 1, "loop").duch
    rows = []
    loop = bench_loop(args, f, stats, cfg)
    rows.append({"path": "loop", "workers": 1, **loop})
    for w in (1, 2):
        r = bench_ray(args, ds, f, stats, w, work)
        rows.append({"path": f"ray_{w}w", "workers": w, **r})
    for r in rows:
        r["ratio_vs_loop"] = r["samples_s"] / loop["samples_s"]
    return rows


def bench_extraction(args: argparse.Namespace, work: str) -> list[dict[str, Any]]:
    import torch

    from duch_core.archive import read_archive
    from duch_core.config import load
    from duch_core.extraction import FeatureEncoder, decode_batch
    from duch_core.features import manifest_rows
    from duch_core.synthetic_archive import make_demo_archive
    from jobs._common import run_feature_stage
    from jobs.train_config import TrainJobConfig, validate

    uri = make_demo_archive(
        os.path.join(work, "archive"), n_per_class=args.extract_n_per_class, image_size=96
    )
    archive = read_archive(uri)
    n = archive.num_rows
    job = validate(
        load(
            TrainJobConfig,
            None,
            [
                f"work_dir={work}",
                f"duch.image_backbone.source={args.backbone}",
                "duch.text_backbone.source=offline:minilm",
                "features.batch_size=32",
                "features.actors=1",
                f"features.torch_threads={args.threads}",
            ],
        )
    )
    cfg, st = job.duch, job.features

    torch.set_num_threads(args.threads)
    enc = FeatureEncoder(
        cfg.image_backbone,
        cfg.text_backbone,
        cfg.augment,
        cfg.paper_compat,
        st.batch_size,
        args.threads,
    )
    rows = manifest_rows(archive, cfg.data.caption_seed)

    def loop_once(limit: int) -> float:
        t0 = time.perf_counter()
        for s in range(0, limit, st.batch_size):
            dec = decode_batch(
                rows.slice(s, min(st.batch_size, limit - s)),
                cfg.image_backbone,
                cfg.text_backbone,
                cfg.augment,
                st.io_threads,
            )
            enc(dec)
        return time.perf_counter() - t0

    loop_once(min(n, st.batch_size))  # warm-up
    loop_s = loop_once(n)

    def ray_once(table: Any) -> float:
        t0 = time.perf_counter()
        run_feature_stage(cfg, table, st, os.path.join(work, "features"), force=True)
        return time.perf_counter() - t0

    quarter = max(1, n // 4)
    ray_q = ray_once(archive.slice(0, quarter))
    ray_s = ray_once(archive)
    steady = (n - quarter) / max(ray_s - ray_q, 1e-9)
    return [
        {"path": "loop", "images": n, "seconds": loop_s, "images_s": n / loop_s},
        {"path": "ray_data", "images": n, "seconds": ray_s, "images_s": n / ray_s},
        {"path": "ray_steady", "images": n - quarter, "seconds": ray_s - ray_q, "images_s": steady},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="training items")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (loop, each Ray worker, the extraction actor)",
    )
    p.add_argument("--extract-n-per-class", type=int, default=16)
    p.add_argument("--backbone", default="offline:mobilenet_v2")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)

    import ray

    ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="duch-bench-") as work:
        out["training"] = bench_training(args, work)
        if not args.skip_extraction:
            out["extraction"] = bench_extraction(args, work)
    ray.shutdown()

    print(
        f"\ntraining: {args.n} items, batch {args.batch_size}, {args.epochs} epochs, "
        f"hidden {args.hidden_dim}, 64 bits, {args.threads} torch thread(s) per process"
    )
    print(f"{'path':<10}{'workers':>8}{'samples/s':>12}{'ratio':>8}{'fit_s':>9}")
    for r in out["training"]:
        print(
            f"{r['path']:<10}{r['workers']:>8}{r['samples_s']:>12.1f}"
            f"{r['ratio_vs_loop']:>8.2f}{r['fit_s']:>9.1f}"
        )
    if "extraction" in out:
        print(f"\nfeature extraction: {args.backbone} + offline:minilm, two views per item")
        print(f"{'path':<10}{'images':>8}{'seconds':>9}{'images/s':>10}")
        for r in out["extraction"]:
            print(f"{r['path']:<10}{r['images']:>8}{r['seconds']:>9.1f}{r['images_s']:>10.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
