"""Training and feature-extraction throughput: the Ray paths vs plain single-process loops.

    python bench/train.py [--sections caption,training,extraction] [--n 4096]
        [--batch-size 256] [--epochs 4] [--hidden-dim 1024] [--threads 2]
        [--caption-epochs 4] [--extract-n-per-class 8] [--backbone offline:mobilenet_v2]
        [--json FILE]

**Plain loop at the real-caption shape** (``caption``; no data files, no Ray): seeded synthetic
features shaped like the real-caption benchmark of ``bench/quality.py``: 5,460 training pairs,
384-d "image" and 768-d "text" views plus an augmented copy of each, batch 256, 64 bits, hidden
width 4096, ``--caption-epochs`` epochs, for the default config (``duch``) and
``paper_compat``. Two implementations train side by side in this process from the same seeds,
epoch by epoch, alternating which goes first:

* **reference**: ``train_epoch(..., reference=True)`` with ``make_optimizers(...,
  reference=True)``: plain ``torch.optim.Adam``, and under ``paper_compat`` two calls of the text
  head on the caption; the loop as it was before the fast path;
* **current**: the defaults (:class:`duch_core.optim.BlockedAdam`,
  :meth:`duch_core.model.HashHead.forward_twice` under ``paper_compat``).

``s/epoch`` is the median wall time of the epochs after the first, ``cpu s/epoch`` the median
process CPU time (on a shared machine the steadier of the two with one thread; with more
threads it also counts OpenMP's spinning), ``pairs/s`` = 5,460 / ``s/epoch``; ``same`` says
whether the two implementations' epoch records and final weights are bitwise equal. ``heads'
products`` is the time of the heads' matrix products of one epoch alone (forward and weight
gradients of both layers for the four views), timed here: the part no fp32 implementation of
the same arithmetic avoids.

**Training** (same seeded synthetic features, ``--n`` items of 512-d image and 768-d text
features, same global batch, same heads and losses):

* **loop**: :func:`duch_core.train_loop.train_epoch` in this process on
  :func:`~duch_core.feature_batches.make_batches` (features already z-scored in memory).
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


# the real-caption benchmark's training shape (bench/quality.py, paper settings)
CAPTION_PAIRS, CAPTION_IMAGE_DIM, CAPTION_TEXT_DIM = 5460, 384, 768
CAPTION_BATCH, CAPTION_BITS, CAPTION_HIDDEN = 256, 64, 4096


def _caption_features(seed: int = 0) -> dict[str, Any]:
    """Synthetic stand-ins for z-scored caption features: ``CAPTION_PAIRS`` rows per view."""
    rng = np.random.default_rng(seed)
    n = CAPTION_PAIRS

    def view(d: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, d), dtype=np.float32)
        return x, (x + 0.3 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)

    img, img_aug = view(CAPTION_IMAGE_DIM)
    txt, txt_aug = view(CAPTION_TEXT_DIM)
    ids = [f"pair{i:05d}" for i in range(n)]
    return {"ids": ids, "img": img, "img_aug": img_aug, "txt": txt, "txt_aug": txt_aug}


def _heads_products_seconds(reps: int = 3) -> tuple[float, float]:
    """Median wall and process CPU time of one epoch's matrix products of the heads (four views).

    Per view and batch: the forward products of both layers, the weight gradients of both
    layers and the hidden-layer gradient, with the operand layouts autograd uses.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = [CAPTION_BATCH] * (CAPTION_PAIRS // CAPTION_BATCH)
    if CAPTION_PAIRS % CAPTION_BATCH:
        sizes.append(CAPTION_PAIRS % CAPTION_BATCH)
    mats = {}
    for d in (CAPTION_IMAGE_DIM, CAPTION_TEXT_DIM):
        mats[d] = (
            torch.randn(CAPTION_BATCH, d, generator=g),
            torch.randn(CAPTION_HIDDEN, d, generator=g),
        )
    b1, b2 = torch.randn(CAPTION_HIDDEN, generator=g), torch.randn(CAPTION_BITS, generator=g)
    w2 = torch.randn(CAPTION_BITS, CAPTION_HIDDEN, generator=g)
    hidden = torch.randn(CAPTION_BATCH, CAPTION_HIDDEN, generator=g)
    dcode = torch.randn(CAPTION_BATCH, CAPTION_BITS, generator=g)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for n in sizes:
            for d in (CAPTION_IMAGE_DIM, CAPTION_IMAGE_DIM, CAPTION_TEXT_DIM, CAPTION_TEXT_DIM):
                x, w1 = mats[d][0][:n], mats[d][1]
                h, dc = hidden[:n], dcode[:n]
                torch.addmm(b1, x, w1.t())  # layer 1 forward
                torch.addmm(b2, h, w2.t())  # layer 2 forward
                dc.mm(w2)  # gradient of the hidden layer
                dc.t().mm(h)  # layer 2 weight gradient
                h.t().mm(x)  # layer 1 weight gradient (the hidden gradient's shape)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def bench_caption_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Reference vs current plain loop at the real-caption shape (see the module docstring)."""
    import torch

    from duch_core.code_table import CodeTable
    from duch_core.config import DUCHConfig, ModelConfig, OptimConfig
    from duch_core.feature_batches import make_batches
    from duch_core.optim import make_optimizers
    from duch_core.train_loop import make_model, train_epoch

    torch.set_num_threads(args.threads)
    f = _caption_features()
    rows: list[dict[str, Any]] = []
    for variant, paper_compat in (("duch", False), ("paper_compat", True)):
        cfg = DUCHConfig(
            model=ModelConfig(bits=CAPTION_BITS, hidden_dim=CAPTION_HIDDEN),
            optim=OptimConfig(batch_size=CAPTION_BATCH, epochs=args.caption_epochs),
            paper_compat=paper_compat,
        )
        runs: dict[str, dict[str, Any]] = {}
        for impl in ("reference", "current"):
            ref = impl == "reference"
            model = make_model(CAPTION_IMAGE_DIM, CAPTION_TEXT_DIM, cfg)
            opt_hash, opt_disc = make_optimizers(model, cfg.optim, reference=ref)
            table = CodeTable(f["ids"], cfg.model.bits, seed=cfg.optim.seed)
            torch.manual_seed(cfg.optim.seed)
            runs[impl] = {
                "train": (model, opt_hash, opt_disc, table),
                "rng": torch.random.get_rng_state(),
                "wall": [],
                "cpu": [],
                "records": [],
            }
        for epoch in range(cfg.optim.epochs):
            batches = make_batches(
                f["ids"], f["img"], f["img_aug"], f["txt"], f["txt_aug"],
                cfg.optim.batch_size, cfg.optim.seed, epoch,
            )  # fmt: skip
            order = ("reference", "current") if epoch % 2 == 0 else ("current", "reference")
            for impl in order:
                r = runs[impl]
                model, opt_hash, opt_disc, table = r["train"]
                torch.random.set_rng_state(r["rng"])  # each run keeps its own random stream
                w0, c0 = time.perf_counter(), time.process_time()
                rec = train_epoch(
                    model, batches, opt_hash, opt_disc, table, cfg, epoch,
                    reference=impl == "reference",
                )  # fmt: skip
                r["wall"].append(time.perf_counter() - w0)
                r["cpu"].append(time.process_time() - c0)
                r["rng"] = torch.random.get_rng_state()
                r["records"].append({k: v for k, v in rec.items() if k != "seconds"})
        ref_model, cur_model = runs["reference"]["train"][0], runs["current"]["train"][0]
        same = runs["reference"]["records"] == runs["current"]["records"] and all(
            torch.equal(a, b)
            for a, b in zip(
                ref_model.state_dict().values(), cur_model.state_dict().values(), strict=True
            )
        )
        ref_s = float(np.median(runs["reference"]["wall"][1:] or runs["reference"]["wall"]))
        for impl in ("reference", "current"):
            r = runs[impl]
            wall = float(np.median(r["wall"][1:] or r["wall"]))
            rows.append(
                {
                    "variant": variant,
                    "impl": impl,
                    "s_epoch": wall,
                    "cpu_s_epoch": float(np.median(r["cpu"][1:] or r["cpu"])),
                    "pairs_s": CAPTION_PAIRS / wall,
                    "speedup": ref_s / wall,
                    "same": same,
                }
            )
    products_s, products_cpu_s = _heads_products_seconds()
    return {"rows": rows, "heads_products_s": products_s, "heads_products_cpu_s": products_cpu_s}


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


SECTIONS = ("caption", "training", "extraction")


def _print_caption(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nplain loop at the real-caption shape: {CAPTION_PAIRS} pairs, "
        f"{CAPTION_IMAGE_DIM}/{CAPTION_TEXT_DIM}-d, batch {CAPTION_BATCH}, {CAPTION_BITS} bits, "
        f"hidden {CAPTION_HIDDEN}, {args.caption_epochs} epochs (median of the last "
        f"{max(args.caption_epochs - 1, 1)}), {args.threads} torch thread(s)"
    )
    print(
        f"{'variant':<14}{'impl':<11}{'s/epoch':>9}{'cpu s/epoch':>13}{'pairs/s':>9}"
        f"{'speed-up':>10}{'same':>6}"
    )
    for r in res["rows"]:
        print(
            f"{r['variant']:<14}{r['impl']:<11}{r['s_epoch']:>9.2f}{r['cpu_s_epoch']:>13.2f}"
            f"{r['pairs_s']:>9.0f}{r['speedup']:>10.2f}{'yes' if r['same'] else 'NO':>6}"
        )
    print(
        f"{'heads products':<25}{res['heads_products_s']:>9.2f}"
        f"{res['heads_products_cpu_s']:>13.2f}   (the matrix products alone, four views)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)}",
    )
    p.add_argument("--n", type=int, default=4096, help="training items")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (loops, each Ray worker, the extraction actor)",
    )
    p.add_argument("--caption-epochs", type=int, default=4)
    p.add_argument("--extract-n-per-class", type=int, default=16)
    p.add_argument("--backbone", default="offline:mobilenet_v2")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if not sections or not sections <= set(SECTIONS):
        p.error(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}")
    if args.skip_extraction:
        sections.discard("extraction")

    out: dict[str, Any] = {"args": vars(args)}
    if "caption" in sections:
        out["caption_loop"] = bench_caption_loop(args)
    if sections & {"training", "extraction"}:
        import ray

        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="duch-bench-") as work:
            if "training" in sections:
                out["training"] = bench_training(args, work)
            if "extraction" in sections:
                out["extraction"] = bench_extraction(args, work)
        ray.shutdown()

    if "caption_loop" in out:
        _print_caption(out["caption_loop"], args)
    if "training" in out:
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
