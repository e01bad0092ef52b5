"""Train DUCH's hashing heads on Ray Train, evaluate them and export a model bundle.

    python jobs/train.py [--config configs/demo.yaml] [--set key.path=value ...]
    python -m jobs.train ...
    ray job submit --working-dir . -- python jobs/train.py --config configs/smoke.yaml

With no arguments it runs on the built-in demo archive (written under ``work_dir``) with the
offline backbone weights. The steps:

1. **Validate** the config (:func:`jobs.train_config.validate`) and read the archive manifest
   (:func:`duch_core.archive.read_archive`): bad values and a missing archive fail here, before
   Ray starts anything.
2. **Ray**: connects to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else
   starts Ray in-process.
3. **Features**: the Ray Data stage of ``jobs/extract_features.py``, reused from its cache when
   the backbones, augmentation and manifest are unchanged.
4. **Split and statistics**: the train / query / database split (``split_source``) from the
   item ids only, and the global z-score statistics of the training features
   (:class:`duch_core.train_loop.FeatureStats`) computed by a Ray Data pass.
5. **Ray Train**: ``TorchTrainer`` with ``scaling.num_workers`` workers (gloo on CPU, NCCL on
   GPU). The training rows stream to the workers with ``get_dataset_shard("train")`` (equal
   shards); each worker takes ``batch_size / num_workers`` items per step and
   :func:`duch_core.train_loop.train_epoch` gathers the codes of all workers
   (:class:`duch_core.distributed.TorchCollective`), so the contrastive negatives span the global
   batch, gradients are summed and the code table ``B`` is merged at every epoch end (every worker
   holds the whole table). With ``duch.augment.resample_each_epoch`` the feature set holds
   ``V`` augmented views per item and epoch ``e`` reads view ``e % V`` of both modalities
   (:func:`epoch_batches`); by default the one fixed view. Every epoch each worker calls
   ``ray.train.report``; worker 0 attaches a
   checkpoint (heads, both optimizers, the code table, epoch, history, feature statistics and the
   resolved config). A restarted worker group (``run.max_failures``) and a rerun with the same
   ``run.name`` and ``run.storage_path`` continue from ``ray.train.get_checkpoint()``; raising
   ``duch.optim.epochs`` and rerunning trains further.
6. **Evaluate** the final heads on the query / database items with the protocol of
   ``jobs/evaluate.py`` (mAP@``eval_k`` and mAP@10 in the four directions, P@K, PR curves) and
   **export** a bundle (:func:`duch_core.bundle.save_bundle`) to ``output``, with the evaluation
   report (``evaluation.json``, ``evaluation.md``, two PNG plots) and ``training.json`` (history,
   metrics, resolved job config) next to it. The bundle location and the metrics are printed as
   JSON; :func:`run` returns them.

Exit status: 0 success, 1 training or feature extraction failed, 2 bad configuration or archive.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python jobs/train.py`
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.collate_fn import ArrowBatchCollateFn

from duch_core import storage
from duch_core.archive import ArchiveError, read_archive
from duch_core.config import ConfigError, DUCHConfig, from_dict, load, to_dict
from jobs.evaluate import DEFAULT_KS, flat_metrics, protocol_report, read_items, write_report
from jobs.extract_features import (
    FeatureSet,
    FeatureStageError,
    aug_columns,
    list_to_numpy,
    read_columns,
    view_count,
)
from jobs.train_config import TrainJobConfig, validate

log = logging.getLogger("duch.train")

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
FAULT_MARKER = "fault_injected.json"
FAULT_DELAY_S = 3.0  # see _fault_point
DEFAULT_CONFIG = "configs/demo.yaml"  # relative to the repository root


def default_config() -> str | None:
    """The demo config of this checkout (``None``, i.e. built-in defaults, when absent)."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / DEFAULT_CONFIG
    return str(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# archive and split (driver)


def demo_archive_uri(cfg: TrainJobConfig) -> str:
    """Where the demo archive of ``cfg.demo`` lives under ``work_dir``."""
    d = cfg.demo
    return storage.join(
        cfg.work_dir, "demo_archive", f"n{d.n_per_class}-s{d.image_size}-seed{d.seed}"
    )


def prepare_archive(cfg: TrainJobConfig) -> pa.Table:
    """The archive manifest of ``cfg`` (the demo archive, generated once, when none is set).

    Raises:
        ArchiveError: the manifest is missing, unreadable or invalid.
    """
    uri = cfg.duch.data.archive
    if not uri:
        from duch_core.synthetic_archive import MANIFEST_NAME, make_demo_archive

        uri = demo_archive_uri(cfg)
        if not storage.exists(storage.join(uri, MANIFEST_NAME)):
            log.info("writing the demo archive to %s", uri)
            make_demo_archive(
                uri,
                n_per_class=cfg.demo.n_per_class,
                seed=cfg.demo.seed,
                image_size=cfg.demo.image_size,
            )
    return read_archive(uri)


def effective_split(
    item_ids: Sequence[str], manifest_split: Sequence[str | None], cfg: TrainJobConfig
) -> dict[str, list[str]]:
    """The train / query / database item ids (sorted), following ``cfg.split_source``.

    Raises:
        ConfigError: ``split_source: manifest`` but some items have no split.
    """
    from duch_core.splits import paper_split

    complete = all(s in ("train", "query", "database") for s in manifest_split)
    source = cfg.split_source
    if source == "manifest" and not complete:
        raise ConfigError(
            "split_source: manifest, but some archive items have no train/query/database split"
        )
    if source == "manifest" or (source == "auto" and complete):
        out: dict[str, list[str]] = {"train": [], "query": [], "database": []}
        for item, s in zip(item_ids, manifest_split, strict=True):
            out[str(s)].append(str(item))
        return {k: sorted(v) for k, v in out.items()}
    d = cfg.duch.data
    return paper_split(
        item_ids, seed=d.split_seed, train_frac=d.train_frac, query_frac=d.query_frac
    )


# --------------------------------------------------------------------------------------------
# Ray Data pieces (run in Ray tasks)


def select_rows(batch: pa.Table, ids: pa.Array, columns: Sequence[str]) -> pa.Table:
    """Rows of ``batch`` whose ``item_id`` is in ``ids`` and that have features (no error)."""
    keep = pc.and_(
        pc.is_in(batch.column("item_id"), value_set=ids),
        pc.equal(batch.column("error_stage"), ""),
    )
    return batch.filter(keep).select(list(columns))


def moments_batch(batch: pa.Table) -> pa.Table:
    """Per-batch ``(count, mean, M2)`` of all image and all text feature values (float64)."""
    out: dict[str, list[float]] = {}
    for col in ("img", "txt"):
        x = list_to_numpy(batch.column(col)).astype(np.float64).reshape(-1)
        n = x.size
        mean = float(x.mean()) if n else 0.0
        out[f"{col}_n"] = [float(n)]
        out[f"{col}_mean"] = [mean]
        out[f"{col}_m2"] = [float(((x - mean) ** 2).sum()) if n else 0.0]
    return pa.table(out)


def combine_moments(parts: Iterable[tuple[float, float, float]]) -> tuple[float, float]:
    """Chan's parallel combination of ``(count, mean, M2)`` parts -> ``(mean, std)`` (ddof 0)."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        delta = mb - mean
        tot = n + nb
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
    if n == 0:
        raise ValueError("no feature values to fit statistics on")
    return mean, math.sqrt(m2 / n)


def arrow_to_feature_arrays(batch: pa.Table, view: int = 0) -> dict[str, Any]:
    """An Arrow batch of feature rows -> ``{"ids": list[str], "img": (N, D) float32 tensor,
    "img_aug", "txt", "txt_aug"}``, the augmented entries read from the columns of augmented
    view ``view`` (:func:`jobs.extract_features.aug_columns`; 0 = ``img_aug``, ``txt_aug``)."""
    import torch

    img_aug, txt_aug = aug_columns(view)
    out: dict[str, Any] = {"ids": [str(x) for x in batch.column("item_id").to_pylist()]}
    for key, col in (("img", "img"), ("img_aug", img_aug), ("txt", "txt"), ("txt_aug", txt_aug)):
        out[key] = torch.from_numpy(list_to_numpy(batch.column(col)))
    return out


class FeatureCollate(ArrowBatchCollateFn):
    """``iter_torch_batches`` collate function: Arrow rows -> :func:`arrow_to_feature_arrays`
    of augmented view ``view``."""

    def __init__(self, view: int = 0) -> None:
        self.view = int(view)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        return arrow_to_feature_arrays(batch, self.view)


# --------------------------------------------------------------------------------------------
# per-worker logic (plain functions, tested without Ray)


def to_feature_batch(arrays: dict[str, Any], stats: Any) -> Any:
    """Collated arrays -> :class:`duch_core.train_loop.FeatureBatch`, z-scored with ``stats``."""
    from duch_core.train_loop import FeatureBatch

    img, img_aug, txt, txt_aug = (arrays[k] for k in ("img", "img_aug", "txt", "txt_aug"))
    if stats is not None:
        img, img_aug = stats.apply(img, "image"), stats.apply(img_aug, "image")
        txt, txt_aug = stats.apply(txt, "text"), stats.apply(txt_aug, "text")
    return FeatureBatch(list(arrays["ids"]), img, img_aug, txt, txt_aug)


def drop_last_needed(n_rows: int, world_size: int, per_worker_batch: int) -> bool:
    """True when equal shards of ``n_rows`` would end in a 1-item batch (BatchNorm needs 2)."""
    rows = n_rows // world_size
    return rows % per_worker_batch == 1


def combine_records(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """One epoch record from every worker's :func:`train_epoch` output.

    ``samples`` and ``batches`` are summed, ``seconds`` is the slowest worker's, everything else
    (loss parts, lr, epoch) is averaged.
    """
    out: dict[str, float] = {}
    for key in records[0]:
        vals = [float(r[key]) for r in records]
        if key in ("samples", "batches"):
            out[key] = float(sum(vals))
        elif key == "seconds":
            out[key] = max(vals)
        else:
            out[key] = float(np.mean(vals))
    out["samples_per_s"] = out.get("samples", 0.0) / max(out.get("seconds", 0.0), 1e-9)
    return out


def save_state(directory: str, state: dict[str, Any], job_config: dict[str, Any]) -> None:
    """Write a checkpoint directory: ``state.pt`` (torch) and ``config.json`` (resolved config)."""
    import torch

    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(job_config, f, indent=2, sort_keys=True)


def load_state(directory: str) -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint directory (CPU tensors)."""
    import torch

    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def model_from_state(state: dict[str, Any], cfg: DUCHConfig) -> Any:
    """The :class:`duch_core.model.DUCH` heads stored in a checkpoint state (eval mode, CPU)."""
    from duch_core.train_loop import make_model

    model = make_model(int(state["image_dim"]), int(state["text_dim"]), cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def epoch_batches(
    shard: Any,
    epoch: int,
    config: dict[str, Any],
    seed: int,
    stats: Any,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """This worker's batches (:class:`~duch_core.train_loop.FeatureBatch`) of epoch ``epoch``.

    Streams ``shard`` (a Ray dataset or ``get_dataset_shard`` iterator of feature rows) in
    batches of ``config["per_worker_batch"]``, locally shuffled with a seed of ``(seed, epoch,
    rank)``, reading augmented view :func:`duch_core.train_loop.view_for_epoch` ``(epoch,
    config["views"])`` and z-scoring with ``stats`` (or not, when ``None``).
    """
    from duch_core.train_loop import view_for_epoch

    view = view_for_epoch(epoch, int(config.get("views", 1)))
    it = shard.iter_torch_batches(
        batch_size=int(config["per_worker_batch"]),
        collate_fn=FeatureCollate(view),
        device="cpu",
        drop_last=bool(config["drop_last"]),
        local_shuffle_buffer_size=int(config["shuffle_buffer"]),
        local_shuffle_seed=seed * 1_000_003 + epoch * world + rank,
    )
    return (to_feature_batch(a, stats) for a in it)


def _fault_point(
    batches: Iterator[Any], epoch: int, rank: int, world: int, fail_at: int, marker: str
) -> Iterator[Any]:
    """Yield ``batches``; the last worker exits abruptly after the first batch of epoch
    ``fail_at`` unless ``marker`` exists (then the fault has already happened once).

    Before exiting it waits ``FAULT_DELAY_S``: Ray Train's controller registers a reported
    checkpoint when it next polls the workers, and a worker group that fails before that poll
    restarts from the checkpoint before (observed on a loaded 2-core machine). The drill is
    meant to show a restart from the latest checkpoint, not that window.
    """
    for i, b in enumerate(batches):
        yield b
        if i == 0 and epoch == fail_at and rank == world - 1 and not storage.exists(marker):
            storage.write_json(marker, {"epoch": epoch, "rank": rank, "time": time.time()})
            time.sleep(FAULT_DELAY_S)
            os._exit(1)


def train_func(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (one call per worker; see the module docstring, step 5)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from duch_core.code_table import CodeTable
    from duch_core.distributed import TorchCollective, broadcast_parameters
    from duch_core.train_loop import (
        FeatureStats,
        make_model,
        make_optimizers,
        step_lr,
        train_epoch,
    )

    cfg = from_dict(DUCHConfig, config["duch"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    collective = TorchCollective() if world > 1 else None
    stats = FeatureStats.from_dict(config["stats"]) if config["stats"] else None
    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))

    model = make_model(int(config["image_dim"]), int(config["text_dim"]), cfg).to(device)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim)
    table = CodeTable(config["train_ids"], cfg.model.bits, seed=cfg.optim.seed)
    history: list[dict[str, float]] = []
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        opt_hash.load_state_dict(state["opt_hash"])
        opt_disc.load_state_dict(state["opt_disc"])
        table.load_state_dict(state["table"])
        history = list(state["history"])
        start = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.optim.seed)
    if collective is not None:
        broadcast_parameters(model, collective)

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.optim.epochs):
        batches = epoch_batches(shard, epoch, config, cfg.optim.seed, stats, rank, world)
        if config["fail_at_epoch"] >= 0:
            batches = _fault_point(
                batches, epoch, rank, world, int(config["fail_at_epoch"]), config["fault_marker"]
            )
        rec = train_epoch(
            model, batches, opt_hash, opt_disc, table, cfg, epoch, gather=collective, device=device
        )
        rec["next_lr"] = step_lr(opt_hash, epoch, cfg.optim)
        records = collective.all_gather_object(rec) if collective is not None else [rec]
        merged = combine_records(records)
        merged["epoch"] = float(epoch)
        merged["resumed_from"] = float(start)  # first epoch of this attempt (0 = fresh start)
        history.append(merged)
        metrics = {k: float(v) for k, v in merged.items()}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                state = {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "opt_hash": opt_hash.state_dict(),
                    "opt_disc": opt_disc.state_dict(),
                    "table": table.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "feature_stats": config["stats"],
                    "image_dim": int(config["image_dim"]),
                    "text_dim": int(config["text_dim"]),
                    "rng": torch.get_rng_state(),
                }
                save_state(tmp, state, config["job_config"])
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)


# --------------------------------------------------------------------------------------------
# driver


def ensure_ray() -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start
    Ray in this process.

    A cluster is never guessed (``address="auto"`` would attach to any Ray instance found on the
    machine, including someone else's): to run the job as a driver on a running cluster, set
    ``RAY_ADDRESS``.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local")


def _feature_stats(ds: Any) -> dict[str, dict[str, float]]:
    rows = ds.map_batches(moments_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    parts = pa.concat_tables([pa.Table.from_pylist([r]) for r in rows.take_all()]).to_pydict()
    out = {}
    for col, mod in (("img", "image"), ("txt", "text")):
        mean, std = combine_moments(
            zip(parts[f"{col}_n"], parts[f"{col}_mean"], parts[f"{col}_m2"], strict=True)
        )
        out[mod] = {"mean": mean, "std": std}
    return out


def feature_dataset(fs_: FeatureSet, ids: Sequence[str], columns: Sequence[str]) -> Any:
    """Ray dataset of the feature rows of ``ids`` (error rows dropped)."""
    import ray

    fs, path = storage.resolve(fs_.shards)
    read = sorted({*columns, "item_id", "error_stage"})
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(read)
    return ds.map_batches(
        select_rows,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"ids": pa.array(sorted(ids), pa.string()), "columns": list(columns)},
        num_cpus=0.25,
    )


def evaluation(
    model: Any, stats: Any, fs_: FeatureSet, split: dict[str, list[str]], eval_k: int
) -> dict[str, Any] | None:
    """:func:`jobs.evaluate.protocol_report` of the in-memory heads on the query / database
    items (mAP@``eval_k`` and @10), or ``None`` when there is nothing to evaluate (an empty
    split or items without labels)."""
    from duch_core import codes
    from duch_core.train_loop import encode_features

    if not split["query"] or not split["database"]:
        log.warning("the query or database split is empty: skipping the evaluation")
        return None
    q, db = read_items(fs_, split["query"]), read_items(fs_, split["database"])
    if not q.ids or not db.ids or any(x is None for x in [*q.labels, *db.labels]):
        log.warning("no query/database items with features and labels: skipping the evaluation")
        return None

    def pack(x: np.ndarray, modality: str) -> np.ndarray:
        feats = stats.apply(x, modality) if stats is not None else x
        return codes.pack(encode_features(model, feats, modality))  # type: ignore[arg-type]

    ks = sorted({eval_k, *DEFAULT_KS}, reverse=True)
    return protocol_report(
        pack(q.img, "image"),
        pack(q.txt, "text"),
        pack(db.img, "image"),
        pack(db.txt, "text"),
        q.labels,
        db.labels,
        ks=ks,
    )


def make_trainer(
    cfg: TrainJobConfig,
    train_ds: Any,
    train_ids: Sequence[str],
    stats: dict[str, dict[str, float]] | None,
    image_dim: int,
    text_dim: int,
    job_config: dict[str, Any] | None = None,
    torch_threads: int = 0,
) -> Any:
    """The ``TorchTrainer`` of step 5 for a dataset of feature rows (``item_id``, ``img``,
    ``txt`` and the augmented columns of every view, :func:`train_columns`) whose ids are
    ``train_ids``.

    Args:
        stats: global z-score statistics (:meth:`FeatureStats.to_dict`) or ``None``.
        job_config: the resolved config saved with every checkpoint (default: ``cfg``'s).
        torch_threads: intra-op threads per worker; 0 = Ray Train's default.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    w = cfg.scaling.num_workers
    per_worker = cfg.duch.optim.batch_size // w
    loop_config = {
        "duch": to_dict(cfg.duch),
        "job_config": job_config if job_config is not None else to_dict(cfg),
        "train_ids": list(train_ids),
        "stats": stats,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "per_worker_batch": per_worker,
        "views": view_count(cfg.duch.augment),
        "drop_last": drop_last_needed(len(train_ids), w, per_worker),
        "shuffle_buffer": max(1, len(train_ids) // w),
        "fail_at_epoch": cfg.run.fail_at_epoch,
        "fault_marker": storage.join(cfg.run.storage_path, cfg.run.name, FAULT_MARKER),
        "torch_threads": torch_threads,
    }
    use_gpu = cfg.scaling.use_gpu
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=w,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        ),
        datasets={"train": train_ds},
    )


def train_columns(views: int) -> list[str]:
    """The feature columns training reads: ids, original views and ``views`` augmented views."""
    out = ["item_id", "img", "txt"]
    for v in range(views):
        out.extend(aug_columns(v))
    return out


def run(cfg: TrainJobConfig, archive: pa.Table) -> dict[str, Any]:
    """Steps 2-6 of the module docstring for a validated config and its archive.

    Returns:
        The summary printed by :func:`main`: ``bundle``, ``bundle_id``, ``metrics``,
        ``history``, ``features``, ``checkpoint``, ``seconds``.
    """
    from duch_core.bundle import save_bundle
    from duch_core.train_loop import FeatureStats
    from jobs.extract_features import run_stage

    t0 = time.perf_counter()
    ensure_ray()
    fs_ = run_stage(cfg.duch, archive, cfg.features, cfg.features.cache_root)
    meta = read_columns(fs_, ["item_id", "split", "label", "error_stage"])
    split = effective_split(
        meta.column("item_id").to_pylist(), meta.column("split").to_pylist(), cfg
    )
    failed = set(
        meta.filter(pc.not_equal(meta.column("error_stage"), "")).column("item_id").to_pylist()
    )
    split = {k: [i for i in v if i not in failed] for k, v in split.items()}
    train_ids = split["train"]
    w = cfg.scaling.num_workers
    if len(train_ids) < 2 * w:
        raise ConfigError(
            f"{len(train_ids)} training items are too few for {w} workers (2 each needed)"
        )
    views = view_count(cfg.duch.augment)
    if fs_.views != views:  # the fingerprint covers the views: only a damaged cache gets here
        raise FeatureStageError(
            f"feature set {fs_.root} holds {fs_.views} augmented view(s) per item, the config "
            f"asks for {views}; rerun the feature stage with --force"
        )
    columns = train_columns(views)
    # Materialised once in the object store (never on the driver): every epoch then streams
    # the same blocks to the workers instead of re-reading and re-filtering the shards.
    train_ds = feature_dataset(fs_, train_ids, columns).materialize()
    stats_dict = (
        _feature_stats(feature_dataset(fs_, train_ids, ["img", "txt"]))
        if cfg.duch.data.feature_norm == "zscore"
        else None
    )
    job_config = to_dict(cfg)
    trainer = make_trainer(
        cfg, train_ds, train_ids, stats_dict, fs_.image_dim, fs_.text_dim, job_config
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    model = model_from_state(state, cfg.duch)
    stats = FeatureStats.from_dict(state["feature_stats"]) if state["feature_stats"] else None
    report = evaluation(model, stats, fs_, split, cfg.eval_k)
    metrics = flat_metrics(report) if report is not None else {}
    bundle_id = save_bundle(cfg.output, model, cfg.duch, stats, metrics)
    report_files: dict[str, str] = {}
    if report is not None:
        report.update(bundle=cfg.output, bundle_id=bundle_id)
        report_files = write_report(report, cfg.output)
    checkpoint_uri = result.checkpoint.path
    if storage.is_s3(cfg.run.storage_path) and not checkpoint_uri.startswith("s3://"):
        checkpoint_uri = "s3://" + checkpoint_uri.lstrip("/")
    summary = {
        "bundle": cfg.output,
        "bundle_id": bundle_id,
        "metrics": metrics,
        "report": report_files,
        "epochs": int(state["epoch"]) + 1,
        "history": state["history"],
        "checkpoint": checkpoint_uri,
        "features": fs_.root,
        "features_reused": fs_.reused,
        "feature_errors": fs_.errors,
        "split": {k: len(v) for k, v in split.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(storage.join(cfg.output, "training.json"), {**summary, "config": job_config})
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        default=None,
        help=f"YAML config (configs/*.yaml); default: {DEFAULT_CONFIG} (the demo)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the job; see the module docstring for the steps and exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = validate(load(TrainJobConfig, args.config or default_config(), args.set))
        archive = prepare_archive(cfg)
    except (ConfigError, ArchiveError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, archive)
    except (ConfigError, ArchiveError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except FeatureStageError as e:
        print(f"train: {e}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("training failed")
        return 1
    short = {k: v for k, v in summary.items() if k != "history"}
    print(json.dumps(short, indent=2, sort_keys=True))
    print(f"bundle written to {summary['bundle']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
