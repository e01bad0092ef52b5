"""Train DUCH's hashing heads on Ray Train, evaluate them and export a model bundle.

    python jobs/train.py --config configs/smoke.yaml [--set key.path=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/paper_ucm.yaml

Archive -> cached features (the extract stage) -> split and z-score statistics (a Ray Data pass)
-> ``TorchTrainer``: each worker streams its shard of the training rows and runs
:func:`duch_core.train_loop.train_epoch` with codes gathered across workers (so the contrastive
negatives span the global batch); worker 0 checkpoints every epoch, and a restarted worker group
or a rerun with the same ``run.name`` continues from the last checkpoint -> protocol evaluation,
loss curve and bundle at ``output``. One line per epoch is logged on the driver.

On a Ray cluster of more than one node the job first checks that every location is on S3
(exit 2 naming the keys otherwise); ``scaling.placement_strategy`` places the workers (SPREAD
by default for several), and ``training.json`` records the node id of each worker rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.collate_fn import ArrowBatchCollateFn

from duch_core import features, report, storage
from duch_core.archive import ArchiveError
from duch_core.config import ConfigError, DUCHConfig, from_dict, load, to_dict
from duch_core.features import FeatureSet, FeatureStageError
from jobs import _common
from jobs.train_config import (
    TrainJobConfig,
    effective_split,
    placement,
    prepare_archive,
    shared_locations,
    validate,
)

log = logging.getLogger("duch.train")

FAULT_MARKER = "fault_injected.json"
FAULT_DELAY_S = 3.0  # see _fault_point


# --------------------------------------------------------------------------------------------
# Ray Data pieces (run in Ray tasks and in the workers' data iterators)


def moments_batch(batch: pa.Table) -> pa.Table:
    """One row of :meth:`FeatureStats.partial_moments` of the image and text features."""
    from duch_core.feature_batches import FeatureStats

    out: dict[str, list[float]] = {}
    for col in ("img", "txt"):
        n, mean, m2 = FeatureStats.partial_moments(features.list_to_numpy(batch.column(col)))
        out[f"{col}_n"], out[f"{col}_mean"], out[f"{col}_m2"] = [n], [mean], [m2]
    return pa.table(out)


class FeatureCollate(ArrowBatchCollateFn):
    """``iter_torch_batches`` collate: Arrow feature rows -> ``{"ids", "img", "img_aug", "txt",
    "txt_aug"}`` tensors, the augmented entries from augmented view ``view``."""

    def __init__(self, view: int = 0) -> None:
        self.view = int(view)

    def __call__(self, batch: pa.Table) -> dict[str, Any]:  # type: ignore[override]
        import torch

        img_aug, txt_aug = features.aug_columns(self.view)
        out: dict[str, Any] = {"ids": [str(x) for x in batch.column("item_id").to_pylist()]}
        for key, col in (
            ("img", "img"),
            ("img_aug", img_aug),
            ("txt", "txt"),
            ("txt_aug", txt_aug),
        ):
            out[key] = torch.from_numpy(features.list_to_numpy(batch.column(col)))
        return out


def epoch_batches(
    shard: Any,
    epoch: int,
    config: dict[str, Any],
    seed: int,
    stats: Any,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Any]:
    """This worker's :class:`~duch_core.feature_batches.FeatureBatch` es of epoch ``epoch``.

    Streams ``shard`` (a Ray dataset or ``get_dataset_shard`` iterator) in batches of
    ``config["per_worker_batch"]``, locally shuffled with a seed of ``(seed, epoch, rank)``,
    reading augmented view ``epoch % config["views"]`` and z-scoring with ``stats`` (or not,
    when ``None``).
    """
    from duch_core.feature_batches import FeatureBatch, view_for_epoch

    view = view_for_epoch(epoch, int(config.get("views", 1)))
    it = shard.iter_torch_batches(
        batch_size=int(config["per_worker_batch"]),
        collate_fn=FeatureCollate(view),
        device="cpu",
        drop_last=bool(config["drop_last"]),
        local_shuffle_buffer_size=int(config["shuffle_buffer"]),
        local_shuffle_seed=seed * 1_000_003 + epoch * world + rank,
    )
    return (FeatureBatch.from_arrays(a, stats) for a in it)


def _fault_point(
    batches: Iterator[Any], epoch: int, rank: int, world: int, fail_at: int, marker: str
) -> Iterator[Any]:
    """Yield ``batches``; the last worker exits abruptly after the first batch of epoch
    ``fail_at`` unless ``marker`` exists (then the fault has already happened once).

    It waits ``FAULT_DELAY_S`` first: the controller registers a reported checkpoint when it
    next polls the workers, and the drill is meant to show a restart from the latest one.
    """
    for i, b in enumerate(batches):
        yield b
        if i == 0 and epoch == fail_at and rank == world - 1 and not storage.exists(marker):
            storage.write_json(marker, {"epoch": epoch, "rank": rank, "time": time.time()})
            time.sleep(FAULT_DELAY_S)
            os._exit(1)


# --------------------------------------------------------------------------------------------
# the Ray Train worker loop


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore or initialise, then one reported epoch per step."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    from duch_core import checkpoint as ckpt
    from duch_core.code_table import CodeTable
    from duch_core.distributed import TorchCollective, broadcast_parameters
    from duch_core.feature_batches import FeatureStats
    from duch_core.optim import make_optimizers, step_lr
    from duch_core.train_loop import (
        RetrievalSet,
        combine_records,
        evaluate,
        make_average,
        make_model,
        make_queue,
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
    queue = make_queue(cfg)
    average = make_average(model, cfg)
    history: list[dict[str, float]] = []
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            history, start = ckpt.restore(
                ckpt.load_state(d), model, opt_hash, opt_disc, table, queue, average
            )
    else:
        torch.manual_seed(cfg.optim.seed)
    if collective is not None:
        broadcast_parameters(model, collective)
    # where each rank runs (reported with worker 0's metrics, kept in training.json)
    node = ray.get_runtime_context().get_node_id()
    nodes = collective.all_gather_object(node) if collective is not None else [node]

    eval_every, val = int(config.get("eval_every", 0)), None
    if rank == 0 and eval_every > 0 and config.get("val") is not None:
        payload = ray.get(config["val"])

        def side(img: Any, txt: Any, labels: list[Any]) -> RetrievalSet:
            if stats is None:
                return RetrievalSet(img, txt, labels)
            return RetrievalSet(stats.apply(img, "image"), stats.apply(txt, "text"), labels)

        val = (side(*payload["query"]), side(*payload["database"]))
    progress = config.get("progress") if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, cfg.optim.epochs):
        batches = epoch_batches(shard, epoch, config, cfg.optim.seed, stats, rank, world)
        if config["fail_at_epoch"] >= 0:
            batches = _fault_point(
                batches, epoch, rank, world, int(config["fail_at_epoch"]), config["fault_marker"]
            )
        rec = train_epoch(
            model,
            batches,
            opt_hash,
            opt_disc,
            table,
            cfg,
            epoch,
            gather=collective,
            device=device,
            queue=queue,
            average=average,
        )
        rec["next_lr"] = step_lr(opt_hash, epoch, cfg.optim)
        records = collective.all_gather_object(rec) if collective is not None else [rec]
        merged = combine_records(records)
        merged["epoch"] = float(epoch)
        merged["resumed_from"] = float(start)  # first epoch of this attempt (0 = fresh start)
        if val is not None and (epoch + 1) % eval_every == 0:
            scored = average.averaged(model) if average is not None else model
            scores = evaluate(scored, val[0], val[1], k=int(config["eval_k"]))
            merged.update({f"map_{key}": v for key, v in scores.items()})
        history.append(merged)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                state = ckpt.training_state(
                    model,
                    opt_hash,
                    opt_disc,
                    table,
                    epoch,
                    history,
                    config["stats"],
                    int(config["image_dim"]),
                    int(config["text_dim"]),
                    queue,
                    average,
                )
                ckpt.save_state(tmp, state, config["job_config"])
                ray.train.report(
                    {**merged, "worker_nodes": nodes}, checkpoint=Checkpoint.from_directory(tmp)
                )
            if progress is not None:
                try:
                    progress.put(merged)
                except Exception:  # the driver's log is gone; training goes on without it
                    progress = None
        else:
            ray.train.report(merged, checkpoint=None)


# --------------------------------------------------------------------------------------------
# driver


class EpochLog:
    """Logs worker 0's epoch records on the driver while ``trainer.fit()`` runs.

    Workers' own output reaches the driver console only when verbose (``log_to_driver``); the
    records come through a Ray queue instead, so the per-epoch line is there in every mode.
    """

    def __init__(self, epochs: int, k: int) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from duch_core.train_loop import epoch_line

        # Ray puts an actor that asks for no resources on any node (a soft affinity did not keep
        # it here either); pinned to the driver's node, a lost worker node cannot take it away
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._line = lambda rec: epoch_line(rec, epochs, k)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="duch-epoch-log", daemon=True)

    def __enter__(self) -> EpochLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            while not self.queue.empty():
                log.info("%s", self._line(self.queue.get_nowait()))
        except Exception:  # the queue is gone: the records are in the checkpoint anyway
            log.debug("epoch log lost", exc_info=True)
        finally:
            self.queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                rec = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue is gone (Ray shutting down): nothing more to show
                log.debug("epoch log stopped", exc_info=True)
                return
            log.info("%s", self._line(rec))


def feature_dataset(fs_: FeatureSet, ids: Sequence[str], columns: Sequence[str]) -> Any:
    """Ray dataset of the feature rows of ``ids`` (error rows dropped)."""
    import ray

    fs, path = storage.resolve(fs_.shards)
    read = sorted({*columns, "item_id", "error_stage"})
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(read)
    return ds.map_batches(
        features.select_rows,  # type: ignore[arg-type]  # Ray's hint misses fn_kwargs
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"ids": pa.array(sorted(ids), pa.string()), "columns": list(columns)},
        num_cpus=0.25,
    )


def feature_stats(ds: Any) -> dict[str, dict[str, float]]:
    """Global z-score statistics of a dataset of ``img`` / ``txt`` rows, in one Ray Data pass
    (per-block moments, combined on the driver)."""
    from duch_core.feature_batches import FeatureStats

    rows = ds.map_batches(moments_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    parts = pa.concat_tables([pa.Table.from_pylist([r]) for r in rows.take_all()]).to_pydict()

    def moments(col: str) -> list[tuple[float, float, float]]:
        return list(zip(parts[f"{col}_n"], parts[f"{col}_mean"], parts[f"{col}_m2"], strict=True))

    return FeatureStats.from_partial_moments(moments("img"), moments("txt")).to_dict()


def make_trainer(
    cfg: TrainJobConfig,
    train_ds: Any,
    train_ids: Sequence[str],
    stats: dict[str, dict[str, float]] | None,
    image_dim: int,
    text_dim: int,
    job_config: dict[str, Any] | None = None,
    torch_threads: int = 0,
    val: Any = None,
    progress: Any = None,
) -> Any:
    """The ``TorchTrainer`` for a dataset of feature rows (:func:`duch_core.features.
    train_columns`) whose ids are ``train_ids``.

    Args:
        stats: global z-score statistics (:meth:`FeatureStats.to_dict`) or ``None``.
        job_config: the resolved config saved with every checkpoint (default: ``cfg``'s).
        torch_threads: intra-op threads per worker; 0 = Ray Train's default.
        val: an object ref of ``{"query": (img, txt, labels), "database": (...)}`` raw features,
            evaluated by worker 0 every ``run.eval_every`` epochs; ``None`` = no validation.
        progress: a ``ray.util.queue.Queue`` receiving worker 0's epoch records, or ``None``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from duch_core.train_loop import drop_last_needed

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
        "views": features.view_count(cfg.duch.augment),
        "drop_last": drop_last_needed(len(train_ids), w, per_worker),
        "shuffle_buffer": max(1, len(train_ids) // w),
        "fail_at_epoch": cfg.run.fail_at_epoch,
        "fault_marker": storage.join(cfg.run.storage_path, cfg.run.name, FAULT_MARKER),
        "torch_threads": torch_threads,
        "eval_every": cfg.run.eval_every,
        "eval_k": cfg.eval_k,
        "val": val,
        "progress": progress,
    }
    use_gpu = cfg.scaling.use_gpu
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=w,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=placement(cfg.scaling.placement_strategy, w),
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


def _validation_ref(query: features.EvalItems, database: features.EvalItems) -> Any:
    import ray

    try:
        report.check_items(query, database)
    except report.EvaluationError as e:
        log.warning("run.eval_every: no validation during training (%s)", e)
        return None
    return ray.put(
        {
            "query": (query.img, query.txt, query.labels),
            "database": (database.img, database.txt, database.labels),
        }
    )


def _check_placement(cfg: TrainJobConfig) -> None:
    """Warn when STRICT_SPREAD asks for more nodes than are alive (the run waits for them)."""
    w = cfg.scaling.num_workers
    if placement(cfg.scaling.placement_strategy, w) == "STRICT_SPREAD":
        nodes = _common.alive_nodes()
        if nodes < w:
            log.warning(
                "scaling.placement_strategy STRICT_SPREAD needs %d nodes for %d workers, the "
                "cluster has %d alive: training waits until the autoscaler adds nodes",
                w,
                w,
                nodes,
            )


def run(cfg: TrainJobConfig, archive: pa.Table | None = None) -> dict[str, Any]:
    """Train, evaluate and export for a validated config and its archive.

    Joins or starts Ray and checks the config's locations first (:func:`~jobs.train_config.
    shared_locations`); ``archive`` ``None`` prepares the config's archive after that check.

    Returns:
        The summary also written to ``<output>/training.json``: ``bundle``, ``bundle_id``,
        ``metrics``, ``report`` (file URIs), ``epochs``, ``history``, ``checkpoint``,
        ``features``, ``features_reused``, ``feature_errors``, ``split``, ``workers`` (the
        node id of each worker rank), ``seconds``.

    Raises:
        LocationError: a node-local location on a cluster of more than one node.
    """
    from duch_core import checkpoint as ckpt
    from duch_core.bundle import save_bundle
    from duch_core.feature_batches import FeatureStats

    t0 = time.perf_counter()
    _common.ensure_ray()
    _common.check_shared_locations(shared_locations(cfg))
    _check_placement(cfg)
    if archive is None:
        archive = prepare_archive(cfg)
    split = effective_split(
        archive.column("item_id").to_pylist(), archive.column("split").to_pylist(), cfg
    )
    fs_ = _common.run_feature_stage(cfg.duch, archive, cfg.features, cfg.features.cache_root)
    meta = features.read_columns(fs_, ["item_id", "error_stage"])
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
    views = features.view_count(cfg.duch.augment)
    if fs_.views != views:  # the fingerprint covers the views: only a damaged cache gets here
        raise FeatureStageError(
            f"feature set {fs_.root} holds {fs_.views} augmented view(s) per item, the config "
            f"asks for {views}; rerun the feature stage with --force"
        )
    # Materialised once in the object store (never on the driver): every epoch then streams
    # the same blocks to the workers instead of re-reading and re-filtering the shards.
    train_ds = feature_dataset(fs_, train_ids, features.train_columns(views)).materialize()
    stats_dict = (
        feature_stats(feature_dataset(fs_, train_ids, ["img", "txt"]))
        if cfg.duch.data.feature_norm == "zscore"
        else None
    )
    query = features.read_items(fs_, split["query"])
    database = features.read_items(fs_, split["database"])
    val = _validation_ref(query, database) if cfg.run.eval_every > 0 else None
    job_config = to_dict(cfg)
    with EpochLog(cfg.duch.optim.epochs, cfg.eval_k) as progress:
        trainer = make_trainer(
            cfg,
            train_ds,
            train_ids,
            stats_dict,
            fs_.image_dim,
            fs_.text_dim,
            job_config,
            val=val,
            progress=progress.queue,
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = ckpt.load_state(d)
    model = ckpt.model_from_state(state, cfg.duch)
    stats = FeatureStats.from_dict(state["feature_stats"]) if state["feature_stats"] else None
    ks = sorted({cfg.eval_k, *report.DEFAULT_KS}, reverse=True)
    try:
        rep: dict[str, Any] | None = report.heads_report(model, stats, query, database, ks)
    except report.EvaluationError as e:
        log.warning("skipping the evaluation: %s", e)
        rep = None
    metrics = report.flat_metrics(rep) if rep is not None else {}
    bundle_id = save_bundle(cfg.output, model, cfg.duch, stats, metrics)
    files: dict[str, str] = {}
    if rep is not None:
        rep.update(bundle=cfg.output, bundle_id=bundle_id)
        files = report.write_report(rep, cfg.output)
    files["loss_curve"] = report.write_loss_curve(state["history"], cfg.output)
    nodes = (result.metrics or {}).get("worker_nodes") or []
    checkpoint_uri = result.checkpoint.path
    if storage.is_s3(cfg.run.storage_path) and not checkpoint_uri.startswith("s3://"):
        checkpoint_uri = "s3://" + checkpoint_uri.lstrip("/")
    summary = {
        "bundle": cfg.output,
        "bundle_id": bundle_id,
        "metrics": metrics,
        "report": files,
        "epochs": int(state["epoch"]) + 1,
        "history": state["history"],
        "checkpoint": checkpoint_uri,
        "features": fs_.root,
        "features_reused": fs_.reused,
        "feature_errors": fs_.errors,
        "split": {k: len(v) for k, v in split.items()},
        "workers": [{"rank": r, "node_id": n} for r, n in enumerate(nodes)],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(storage.join(cfg.output, "training.json"), {**summary, "config": job_config})
    return summary


def summary_lines(summary: dict[str, Any], cfg: TrainJobConfig) -> list[str]:
    """The short human summary of :func:`run`'s result."""
    n = summary["split"]
    nodes = len({w["node_id"] for w in summary.get("workers", [])})
    on = f" on {nodes} node(s)" if nodes else ""
    lines = [
        f"trained run {cfg.run.name}: {summary['epochs']} epochs, {n['train']} training items, "
        f"{cfg.scaling.num_workers} worker(s){on}, {summary['seconds']:.0f} s "
        f"(features {'reused' if summary['features_reused'] else 'computed'})"
    ]
    m = summary["metrics"]
    k = cfg.eval_k
    if m:
        dirs = "  ".join(
            f"{report.DIRECTION_NAMES[d]} {m[f'map@{k}_{d}']:.4f}" for d in report.DIRECTIONS
        )
        lines.append(f"mAP@{k} on {n['query']} queries: {dirs}  mean {m[f'map@{k}_mean']:.4f}")
    lines.append(f"bundle written to {summary['bundle']} (id {summary['bundle_id']})")
    names = [u.rsplit("/", 1)[-1] for u in summary["report"].values()]
    lines.append(f"next to it: {', '.join([*names, 'training.json'])}")
    return lines


def build_parser(prog: str = "train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train the DUCH hashing heads on Ray Train (features cached first), "
        "evaluate them and export a model bundle. Rerunning a run name resumes it.",
    )
    _common.add_common_arguments(p, config_required=True)
    return p


def main(argv: list[str] | None = None, prog: str = "train") -> int:
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        cfg = validate(load(TrainJobConfig, args.config, args.set))
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK

    def body() -> int:
        # a given archive is read first, so a bad one is reported before Ray starts; the demo
        # archive is written by run() once the locations have been checked
        archive = prepare_archive(cfg) if cfg.duch.data.archive else None
        try:
            summary = run(cfg, archive)
        except FeatureStageError as e:
            print(f"train: {e}", file=sys.stderr)
            return _common.EXIT_FAILED
        print("\n".join(summary_lines(summary, cfg)))
        return _common.EXIT_OK

    return _common.run_cli("train", body, (ConfigError, ArchiveError, _common.LocationError))


if __name__ == "__main__":
    sys.exit(main())
