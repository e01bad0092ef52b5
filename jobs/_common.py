"""What every job shares: joining or starting Ray, console logging, and the exit-status tail.

Exit status, the same for every job: 0 done; 1 the run failed (nothing half-published, a rerun is
safe); 2 the input or configuration is wrong (the message names what to fix).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from duch_core.config import DUCHConfig
    from duch_core.features import FeatureSet
    from jobs.train_config import FeatureStageConfig

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger("duch")


def setup_logging(verbose: bool = False) -> None:
    """Console logging for a job: our lines at INFO; Ray's own at WARNING unless ``verbose``.

    Ray's INFO lines (dataset plans, checkpoint paths, Serve start-up) still reach its log files
    in the session directory; only the console is kept for what a person needs to read.
    """
    os.environ["DUCH_VERBOSE"] = "1" if verbose else "0"
    if not verbose:  # the weight-loading bars of transformers / huggingface_hub
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not any(getattr(h, "_duch", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.addFilter(_RayConsoleFilter())
        handler._duch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    quiet_ray_console()


class _RayConsoleFilter(logging.Filter):
    """Drops Ray's records below WARNING from our console handler unless verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not quiet():
            return True
        return not (record.name == "ray" or record.name.startswith(("ray.", "filelock")))


def quiet_ray_console() -> None:
    """Raise Ray's own console handlers to WARNING (file handlers keep everything).

    Ray configures its loggers when ``ray.data`` is imported and when Serve or Train start, so
    this runs again after those; it does nothing when verbose.
    """
    if not quiet():
        return
    names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    for name in ["ray", *names]:
        for h in logging.getLogger(name).handlers:
            if type(h).__name__ in ("PlainRayHandler", "StreamHandler"):
                h.setLevel(max(h.level, logging.WARNING))
    # Serve's driver-side logger only prints to the console and replaces its handlers whenever
    # Serve reconfigures it; a filter on the logger itself survives that.
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _RayConsoleFilter) for f in serve_logger.filters):
        serve_logger.addFilter(_RayConsoleFilter())


def quiet() -> bool:
    """True unless the job was asked to be verbose (``--verbose`` or ``DUCH_VERBOSE=1``)."""
    return os.environ.get("DUCH_VERBOSE", "0") != "1"


def ensure_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start Ray here.

    This is the one way the jobs start or join Ray. A cluster is never guessed (``address="auto"``
    would attach to any Ray instance on the machine): to drive a running cluster, set
    ``RAY_ADDRESS``. Unless verbose, Ray Data's progress bars and Ray's INFO lines stay off the
    console; workers' output still reaches Ray's log directory.
    """
    import ray
    import ray.data
    from ray.util.debug import log_once

    if ray.is_initialized():
        quiet_ray_console()
        return
    q = quiet()
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING if q else logging.INFO}
    if q:
        kwargs["log_to_driver"] = False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(address="local", **kwargs)
    if q:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        log_once("ray_data_progress_manager_disabled")  # we turned them off: no warning about it
    quiet_ray_console()


def run_cli(name: str, body: Callable[[], int], expected: tuple[type[BaseException], ...]) -> int:
    """Run a job's body and turn its outcome into the exit status.

    ``expected`` are the errors that mean bad input or configuration (exit 2, message only);
    anything else is a failed run (exit 1, traceback logged).
    """
    try:
        return body()
    except expected as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        logging.getLogger(f"jobs.{name}").exception("%s failed", name)
        return EXIT_FAILED


def add_common_arguments(p: Any, *, config_required: bool) -> None:
    """The options every job takes: ``--config``, ``--set``, ``--print-config``, ``--verbose``."""
    p.add_argument(
        "--config",
        required=config_required,
        metavar="YAML",
        help="job config (see configs/)" + ("" if config_required else "; optional"),
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (dotted path), repeatable",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's own INFO output on the console"
    )


def print_config(cfg: Any) -> None:
    """Print a resolved config (a config dataclass) as YAML on stdout."""
    from duch_core.config import save_yaml

    sys.stdout.write(save_yaml(cfg))


class LocationError(ValueError):
    """A location a job shares across workers is node-local on a multi-node cluster."""


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (Ray must be initialised)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_locations(locations: Mapping[str, str | None], nodes: int | None = None) -> None:
    """Refuse node-local locations when the cluster has more than one alive node.

    On such a cluster a worker on another node would write to (or read from) its own disk, and
    the run fails later with an opaque error or silently loses output. ``locations`` maps the
    config key (``run.storage_path``, ``features.cache_root``, ...) to its URI; empty values are
    skipped. ``nodes`` defaults to the connected cluster's alive nodes.

    Raises:
        LocationError: naming every offending key and the fix.
    """
    from duch_core import storage

    if nodes is None:
        nodes = alive_nodes()
    if nodes <= 1:
        return
    local = [f"{key}={uri}" for key, uri in locations.items() if uri and not storage.is_s3(uri)]
    if local:
        raise LocationError(
            f"this Ray cluster has {nodes} nodes, so every location its workers share must be "
            f"an s3:// URI, but these are node-local: {', '.join(local)}. Put them on S3 "
            "(e.g. --set KEY=s3://bucket/prefix) or run on a single node."
        )


def check_cluster_locations(locations: Mapping[str, str | None]) -> None:
    """:func:`check_shared_locations` for a job about to start its work.

    Joins the cluster named by ``RAY_ADDRESS`` (or uses the Ray already running in this
    process) to count its alive nodes. Without either, Ray would start on this machine alone,
    where every location is shared: nothing is checked and Ray is not started for it.

    Raises:
        LocationError: see :func:`check_shared_locations`.
    """
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return
    ensure_ray()
    check_shared_locations(locations)


def node_local_image(archive: pa.Table) -> str | None:
    """The first ``image_uri`` of ``archive`` that is not an ``s3://`` URI, or ``None``."""
    import pyarrow.compute as pc

    uris = archive.column("image_uri")
    local = uris.filter(pc.invert(pc.starts_with(uris, "s3://")))
    return str(local[0]) if len(local) else None


def run_feature_stage(
    cfg: DUCHConfig,
    archive: pa.Table,
    stage: FeatureStageConfig,
    cache_root: str,
    force: bool = False,
) -> FeatureSet:
    """The feature set of ``archive``: from the cache, else computed on Ray Data.

    Shared by the extract, train and evaluate jobs. Read the manifest rows in blocks ->
    :func:`duch_core.extraction.decode_batch` in CPU tasks -> :class:`~duch_core.extraction.
    FeatureEncoder` in an actor pool -> Parquet shards, then
    :func:`duch_core.features.complete_feature_set` publishes the version.

    Args:
        cfg: the method's :class:`~duch_core.config.DUCHConfig` (backbones, augmentation).
        archive: the validated manifest table (:func:`duch_core.archive.read_archive`).
        stage: the ``features:`` section (``jobs.train_config.FeatureStageConfig``).
        cache_root: URI of the feature cache.
        force: compute a new version even if the cache holds one.

    Raises:
        ArchiveError: the archive has no items.
        FeatureStageError: more than ``stage.max_error_rate`` of the items failed.
    """
    import time
    import warnings

    from duch_core import features, storage
    from duch_core.archive import ArchiveError
    from duch_core.extraction import FeatureEncoder, decode_batch
    from jobs import train_config

    if archive.num_rows == 0:
        raise ArchiveError("the archive has no items")
    inputs = features.fingerprint_inputs(cfg, features.manifest_hash(archive))
    root = storage.join(cache_root, features.fingerprint(inputs))
    found = None if force else features.load_feature_set(root, reused=True)
    if found is not None:
        log.info("features: reusing %s (%d items)", root, found.items)
        return found
    ensure_ray()
    # the decode tasks read the images and the actors write the cache, on any node
    check_shared_locations(
        {
            "features.cache_root": cache_root,
            "duch.data.archive image_uri": node_local_image(archive),
        }
    )
    import ray

    t0 = time.perf_counter()
    version = features.new_version()
    rows = features.manifest_rows(archive, cfg.data.caption_seed)
    blocks = [rows.slice(i, stage.block_rows) for i in range(0, rows.num_rows, stage.block_rows)]
    with warnings.catch_warnings():
        # max_retries has no named parameter in Ray 2.60 (only **ray_remote_args, deprecated);
        # besides bounding retries, it keeps decoding in its own CPU tasks instead of fusing
        # it into the encoder actors when both ask for the same CPUs
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ray.data.from_arrow(blocks).map_batches(
            decode_batch,  # type: ignore[arg-type]  # Ray's hint misses fn_kwargs
            batch_format="pyarrow",
            batch_size=stage.decode_batch,
            fn_kwargs={
                "image_cfg": cfg.image_backbone,
                "text_cfg": cfg.text_backbone,
                "augment_cfg": cfg.augment,
                "io_threads": stage.io_threads,
                "max_pixels": stage.max_image_pixels,
            },
            num_cpus=stage.decode_cpus,
            max_retries=3,
        )
    resources: dict[str, Any] = (
        {"num_gpus": stage.num_gpus} if stage.num_gpus > 0 else {"num_cpus": stage.actor_cpus}
    )
    # features.placement_strategy: SPREAD is also Ray Data's default for actors; PACK is Ray's
    # default scheduling ("DEFAULT"), which fills the nodes in use before others
    placement = train_config.placement(stage.placement_strategy, stage.actors)
    resources["scheduling_strategy"] = "SPREAD" if placement == "SPREAD" else "DEFAULT"
    with warnings.catch_warnings():
        # scheduling_strategy has no named parameter either (see the decode stage)
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ds.map_batches(
            FeatureEncoder,
            batch_format="pyarrow",
            batch_size=stage.batch_size,
            fn_constructor_kwargs={
                "image_cfg": cfg.image_backbone,
                "text_cfg": cfg.text_backbone,
                "augment_cfg": cfg.augment,
                "paper_compat": cfg.paper_compat,
                "batch_size": stage.batch_size,
                "torch_threads": stage.torch_threads,
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=stage.actors),
            **resources,
        )
    fs, path = storage.resolve(storage.join(root, version, features.SHARDS_DIR))
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=stage.shard_rows)
    done = features.complete_feature_set(
        root,
        version,
        inputs,
        views=features.view_count(cfg.augment),
        expected_items=archive.num_rows,
        max_error_rate=stage.max_error_rate,
        seconds=time.perf_counter() - t0,
    )
    log.info("features: wrote %s (%d items, %d errors)", done.shards, done.items, done.errors)
    return done
