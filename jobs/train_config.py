"""Configuration of the training pipeline: feature extraction, Ray Train, evaluation, export.

One YAML file drives ``jobs/extract_features.py``, ``jobs/train.py`` and ``jobs/evaluate.py``
(``configs/*.yaml``); ``--set key.path=value`` overrides any key. Loading is strict
(:func:`duch_core.config.load`) and :func:`validate` checks values and ranges before anything
starts, so a bad value is reported as a :class:`~duch_core.config.ConfigError` naming the key
instead of surfacing later inside a Ray worker. The three jobs also share the archive
(:func:`prepare_archive`) and the split (:func:`effective_split`) of a config from here.

Locations are URIs (local paths or ``s3://``). Empty ones default to folders under
``work_dir``::

    <work_dir>/demo_archive/       the built-in demo archive (when duch.data.archive is "")
    <work_dir>/features/           feature cache root (features.cache_root)
    <work_dir>/ray_results/        Ray Train storage (run.storage_path)
    <work_dir>/bundles/<run.name>  the exported model bundle (output)

On a Ray cluster of more than one node every location a job uses must be reachable from every
node, so each must be an ``s3://`` URI: ``work_dir``, ``run.storage_path``,
``features.cache_root``, ``output``, ``duch.data.archive`` (the demo archive, written under
``work_dir``, too) and the archive's image URIs. The jobs check this as soon as they have joined
the cluster (:func:`shared_locations`, :func:`jobs._common.check_shared_locations`) and exit 2
naming the keys; setting ``work_dir`` to an ``s3://`` prefix and leaving the others empty is
enough.

Placement: ``scaling.placement_strategy`` is the Ray Train workers' placement group strategy
(``PACK``, ``SPREAD`` or ``STRICT_SPREAD``), ``features.placement_strategy`` the backbone actor
pool's (``PACK`` or ``SPREAD``); empty means ``SPREAD`` when there is more than one worker (or
actor), else ``PACK``. The resolved value is saved with the config.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa

from duch_core import storage, synthetic_archive
from duch_core.archive import read_archive
from duch_core.augment import IMAGE_PRESETS
from duch_core.config import ConfigError, DUCHConfig
from duch_core.splits import SPLIT_SOURCES, resolve_split

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TEXT_METHODS = ("rule", "backtranslate", "none")
# Ray's placement group strategies, for ScalingConfig(placement_strategy=...)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
# the backbone actor pool is not a placement group: it can be packed or spread, not strictly
FEATURE_PLACEMENTS = ("PACK", "SPREAD")
PLACEHOLDER = "YOUR-BUCKET"  # the bucket name in the shipped cluster configs, to be replaced

log = logging.getLogger("duch.train")


@dataclass(frozen=True)
class FeatureStageConfig:
    """The Ray Data feature-extraction stage (``jobs/extract_features.py``)."""

    cache_root: str = ""  # "" = <work_dir>/features
    block_rows: int = 64  # manifest rows per input block (parallelism of the decode tasks)
    decode_batch: int = 16  # images per decode task batch
    decode_cpus: float = 0.25  # CPUs per decode task
    io_threads: int = 8  # threads per decode task fetching image bytes
    batch_size: int = 32  # images (and captions) per backbone call
    actors: int = 1  # size of the backbone actor pool
    actor_cpus: float = 0.5  # CPUs per actor when num_gpus is 0
    num_gpus: float = 0.0  # GPUs per actor (0 = backbones on CPU)
    torch_threads: int = 0  # intra-op threads per actor; 0 = torch default
    shard_rows: int = 4096  # feature rows per parquet shard (at least)
    max_image_pixels: int = 1 << 26  # larger images are rejected as bad input
    max_error_rate: float = 0.05  # fail the stage above this share of failed items
    # Where the backbone actors go: SPREAD asks Ray to put them on different nodes where it
    # can (Ray Data's own default), PACK uses Ray's default scheduling, which keeps filling the
    # nodes already in use (up to about half their CPUs) before it starts on others; "" =
    # SPREAD when actors > 1, else PACK. STRICT_SPREAD is refused: an actor pool is not a
    # placement group, so one actor per node cannot be guaranteed. Decode tasks always spread.
    placement_strategy: str = ""


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers (``ScalingConfig``)."""

    num_workers: int = 2
    use_gpu: bool = False  # True: one GPU per worker and NCCL; False: CPU and gloo
    cpus_per_worker: float = 0.5  # fractional so Ray Data tasks still get CPUs
    # Ray's placement group strategy for the workers: PACK (as few nodes as possible), SPREAD
    # (different nodes where they can), STRICT_SPREAD (one node each, else the run waits for
    # nodes); "" = SPREAD when num_workers > 1, else PACK.
    placement_strategy: str = ""


@dataclass(frozen=True)
class RunSection:
    """Ray Train run (``RunConfig``): name, storage, retries, checkpoints."""

    name: str = "duch"  # rerunning the same name in the same storage continues the run
    storage_path: str = ""  # local dir or s3:// prefix; "" = <work_dir>/ray_results
    max_failures: int = 2  # worker-group restarts after a failure (-1 = unlimited)
    checkpoints_to_keep: int = 2
    # Every this many epochs worker 0 adds mAP@eval_k (mean of the four directions) of the
    # current heads on the query/database items to the epoch line; 0 = only the final report.
    eval_every: int = 0
    # Fault injection for tests: the last worker exits abruptly during this epoch (0-based) on
    # the first attempt only; a marker object under the run's storage records that it happened.
    fail_at_epoch: int = -1


@dataclass(frozen=True)
class DemoSection:
    """The built-in demo archive used when ``duch.data.archive`` is empty."""

    n_per_class: int = 16
    image_size: int = 96
    seed: int = 0


@dataclass(frozen=True)
class TrainJobConfig:
    """Everything ``jobs/train.py`` needs (``configs/*.yaml``)."""

    duch: DUCHConfig = field(default_factory=DUCHConfig)
    features: FeatureStageConfig = field(default_factory=FeatureStageConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    demo: DemoSection = field(default_factory=DemoSection)
    work_dir: str = "out"  # default root of every location left empty
    output: str = ""  # bundle URI; "" = <work_dir>/bundles/<run.name>
    eval_k: int = 20  # mAP@K of the final evaluation (paper: 20)
    # train/query/database split: "manifest" = the archive's split column, "paper" = the paper
    # split drawn from duch.data (split_seed, train_frac, query_frac), "auto" = the manifest's
    # when every item has one, else the paper split.
    split_source: str = "auto"


def placement(strategy: str, n: int) -> str:
    """The placement strategy ``strategy`` means for ``n`` workers or actors: upper-cased, and
    ``""`` resolved to ``SPREAD`` when ``n > 1``, else ``PACK``."""
    s = strategy.strip().upper()
    return s or ("SPREAD" if n > 1 else "PACK")


def _absolute(uri: str) -> str:
    """Local relative paths become absolute (Ray Train needs absolute storage paths)."""
    if storage.is_s3(uri) or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve_locations(cfg: TrainJobConfig) -> TrainJobConfig:
    """``cfg`` with every empty location filled from ``work_dir`` and local paths absolute."""
    work = _absolute(cfg.work_dir)
    cache = cfg.features.cache_root or storage.join(work, "features")
    store = cfg.run.storage_path or storage.join(work, "ray_results")
    out = cfg.output or storage.join(work, "bundles", cfg.run.name)
    return replace(
        cfg,
        work_dir=work,
        features=replace(cfg.features, cache_root=_absolute(cache)),
        run=replace(cfg.run, storage_path=_absolute(store)),
        output=_absolute(out),
    )


def shared_locations(cfg: TrainJobConfig, *, training: bool = True) -> dict[str, str]:
    """The locations of a resolved config that workers on any node read or write, by key.

    The archive is ``duch.data.archive`` or, when that is empty, the demo archive under
    ``work_dir``. ``training=False`` leaves out what only training uses (``run.storage_path``,
    ``output``): the extract and evaluate jobs add their own.
    """
    archive = cfg.duch.data.archive or demo_archive_uri(cfg)
    out = {
        "work_dir": cfg.work_dir,
        "features.cache_root": cfg.features.cache_root,
        "duch.data.archive": archive,
    }
    if training:
        out |= {"run.storage_path": cfg.run.storage_path, "output": cfg.output}
    return out


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate_duch(d: DUCHConfig) -> None:
    """Range checks of the method's settings used by the training pipeline.

    Raises:
        ConfigError: the first offending key, with what is expected.
    """
    from duch_core.codes import check_bits

    try:
        check_bits(d.model.bits)
    except ValueError as e:
        raise ConfigError(f"duch.model.bits: {e}") from e
    _check(d.model.hidden_dim >= 1, "duch.model.hidden_dim", "must be >= 1")
    _check(d.optim.epochs >= 1, "duch.optim.epochs", f"must be >= 1, got {d.optim.epochs}")
    _check(d.optim.batch_size >= 2, "duch.optim.batch_size", "must be >= 2 (BatchNorm)")
    for key in ("lr", "disc_lr"):
        v = getattr(d.optim, key)
        _check(v > 0, f"duch.optim.{key}", f"must be > 0, got {v}")
    _check(d.loss.tau > 0, "duch.loss.tau", f"must be > 0, got {d.loss.tau}")
    for key in ("w_inter", "w_intra_image", "w_intra_text", "alpha", "beta", "gamma"):
        v = getattr(d.loss, key)
        _check(v >= 0, f"duch.loss.{key}", f"must be >= 0, got {v}")
    _check(
        0 < d.data.train_frac <= 1,
        "duch.data.train_frac",
        f"must be in (0, 1], got {d.data.train_frac}",
    )
    _check(
        0 <= d.data.query_frac <= 1 - d.data.train_frac + 1e-12,
        "duch.data.query_frac",
        f"must be in [0, 1 - train_frac], got {d.data.query_frac}",
    )
    _check(
        d.data.feature_norm in ("zscore", "none"),
        "duch.data.feature_norm",
        f"must be zscore or none, got {d.data.feature_norm!r}",
    )
    _check(
        d.augment.image_preset in IMAGE_PRESETS,
        "duch.augment.image_preset",
        f"must be one of {IMAGE_PRESETS}, got {d.augment.image_preset!r}",
    )
    _check(
        d.augment.text_method in TEXT_METHODS,
        "duch.augment.text_method",
        f"must be one of {TEXT_METHODS}, got {d.augment.text_method!r}",
    )
    _check(
        d.augment.text_method != "backtranslate" or bool(d.augment.backtranslation_models),
        "duch.augment.backtranslation_models",
        "text_method backtranslate needs a chain of MarianMT models",
    )
    v = d.augment.views_per_item
    if d.augment.resample_each_epoch:
        _check(
            v >= 2,
            "duch.augment.views_per_item",
            f"resample_each_epoch needs >= 2 precomputed views per item (epoch e uses view "
            f"e % views_per_item), got {v}",
        )
    else:
        _check(
            v == 1,
            "duch.augment.views_per_item",
            f"must be 1 unless resample_each_epoch is true (one fixed augmented view per item, "
            f"as the paper), got {v}",
        )
    for tower in ("image_backbone", "text_backbone"):
        _check(
            getattr(d, tower).finetune_blocks == 0,
            f"duch.{tower}.finetune_blocks",
            "the training job trains the hashing heads on cached features of frozen backbones "
            "(as the paper); fine-tuning backbone blocks needs end-to-end training, which this "
            "job does not do",
        )
    _check(d.image_backbone.image_size >= 8, "duch.image_backbone.image_size", "must be >= 8")
    _check(d.text_backbone.max_length >= 2, "duch.text_backbone.max_length", "must be >= 2")


def validate_features(f: FeatureStageConfig) -> None:
    """Range checks of the feature stage settings."""
    for key in ("block_rows", "decode_batch", "io_threads", "batch_size", "actors", "shard_rows"):
        v = getattr(f, key)
        _check(v >= 1, f"features.{key}", f"must be >= 1, got {v}")
    _check(f.decode_cpus > 0, "features.decode_cpus", f"must be > 0, got {f.decode_cpus}")
    _check(f.actor_cpus > 0, "features.actor_cpus", f"must be > 0, got {f.actor_cpus}")
    _check(f.num_gpus >= 0, "features.num_gpus", f"must be >= 0, got {f.num_gpus}")
    _check(f.torch_threads >= 0, "features.torch_threads", "must be >= 0")
    _check(f.max_image_pixels >= 1, "features.max_image_pixels", "must be >= 1")
    _check(0 <= f.max_error_rate <= 1, "features.max_error_rate", "must be in [0, 1]")
    p = placement(f.placement_strategy, f.actors)
    _check(
        p in FEATURE_PLACEMENTS,
        "features.placement_strategy",
        f"must be one of {FEATURE_PLACEMENTS} or empty, got {f.placement_strategy!r}"
        + (
            " (an actor pool cannot be strictly spread; SPREAD places the actors on different "
            "nodes where it can)"
            if p == "STRICT_SPREAD"
            else ""
        ),
    )


def validate(cfg: TrainJobConfig) -> TrainJobConfig:
    """Check every value; return the config with resolved locations.

    Raises:
        ConfigError: the first offending key, with what is expected.
    """
    validate_duch(cfg.duch)
    validate_features(cfg.features)
    s = cfg.scaling
    _check(s.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {s.num_workers}")
    _check(
        s.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {s.cpus_per_worker}"
    )
    _check(
        placement(s.placement_strategy, s.num_workers) in PLACEMENT_STRATEGIES,
        "scaling.placement_strategy",
        f"must be one of {PLACEMENT_STRATEGIES} or empty, got {s.placement_strategy!r}",
    )
    b = cfg.duch.optim.batch_size
    _check(
        b % s.num_workers == 0 and b // s.num_workers >= 2,
        "duch.optim.batch_size",
        f"the global batch {b} must split evenly into {s.num_workers} workers with >= 2 items "
        "each (BatchNorm)",
    )
    r = cfg.run
    _check(
        bool(_RUN_NAME.match(r.name)),
        "run.name",
        f"must be 1-128 letters, digits, '_', '-' or '.', got {r.name!r}",
    )
    _check(r.max_failures >= -1, "run.max_failures", f"must be >= -1, got {r.max_failures}")
    _check(r.checkpoints_to_keep >= 1, "run.checkpoints_to_keep", "must be >= 1")
    _check(r.eval_every >= 0, "run.eval_every", f"must be >= 0, got {r.eval_every}")
    _check(cfg.eval_k >= 1, "eval_k", f"must be >= 1, got {cfg.eval_k}")
    _check(
        cfg.split_source in SPLIT_SOURCES,
        "split_source",
        f"must be one of {SPLIT_SOURCES}, got {cfg.split_source!r}",
    )
    _check(cfg.demo.n_per_class >= 1, "demo.n_per_class", "must be >= 1")
    _check(cfg.demo.image_size >= 32, "demo.image_size", "must be >= 32")
    _check(bool(cfg.work_dir), "work_dir", "must not be empty")
    resolved = resolve_locations(cfg)
    resolved = replace(
        resolved,
        scaling=replace(s, placement_strategy=placement(s.placement_strategy, s.num_workers)),
        features=replace(
            resolved.features,
            placement_strategy=placement(cfg.features.placement_strategy, cfg.features.actors),
        ),
    )
    for key, uri in (
        ("work_dir", resolved.work_dir),
        ("features.cache_root", resolved.features.cache_root),
        ("run.storage_path", resolved.run.storage_path),
        ("output", resolved.output),
        ("duch.data.archive", cfg.duch.data.archive),
    ):
        if not uri:
            continue
        _check(
            PLACEHOLDER not in uri,
            key,
            f"{uri} is a placeholder: replace {PLACEHOLDER} with your bucket "
            f"(--set {key}=s3://...), or give a local path when running on a single machine",
        )
        try:
            storage.join(uri, "x")
        except (storage.BadURIError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from e
    return resolved


def demo_archive_uri(cfg: TrainJobConfig) -> str:
    """Where the built-in demo archive of ``cfg.demo`` lives under ``work_dir``."""
    d = cfg.demo
    return storage.join(
        cfg.work_dir, "demo_archive", f"n{d.n_per_class}-s{d.image_size}-seed{d.seed}"
    )


def prepare_archive(cfg: TrainJobConfig) -> pa.Table:
    """The archive manifest of ``cfg``; with ``duch.data.archive`` empty, the built-in demo
    archive (:mod:`duch_core.synthetic_archive`), written under ``work_dir`` once.

    Raises:
        ArchiveError: the manifest is missing, unreadable or invalid.
    """
    uri = cfg.duch.data.archive
    if not uri:
        uri = demo_archive_uri(cfg)
        if not storage.exists(storage.join(uri, synthetic_archive.MANIFEST_NAME)):
            log.info("writing the demo archive to %s", uri)
            synthetic_archive.make_demo_archive(
                uri,
                n_per_class=cfg.demo.n_per_class,
                seed=cfg.demo.seed,
                image_size=cfg.demo.image_size,
            )
    return read_archive(uri)


def effective_split(
    item_ids: Sequence[str], manifest_split: Sequence[str | None], cfg: TrainJobConfig
) -> dict[str, list[str]]:
    """The train / query / database item ids of ``cfg`` (:func:`duch_core.splits.resolve_split`
    with ``split_source`` and the ``duch.data`` seed, fractions and mode).

    Raises:
        ConfigError: ``split_source: manifest`` but some items have no split.
    """
    d = cfg.duch.data
    try:
        return resolve_split(
            item_ids,
            manifest_split,
            cfg.split_source,
            seed=d.split_seed,
            train_frac=d.train_frac,
            query_frac=d.query_frac,
            mode=d.split_mode,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
