"""What every job shares: joining or starting Ray, console logging, and the exit-status tail.

Exit status, the same for every job: 0 done; 1 the run failed (nothing half-published, a rerun is
safe); 2 the input or configuration is wrong (the message names what to fix).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# Ray's own loggers, quiet on the console unless --verbose (their files stay in Ray's log dir).
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air", "filelock")

log = logging.getLogger("duch")


def setup_logging(verbose: bool = False) -> None:
    """Console logging for a job: our ``duch.*``/``jobs.*`` lines at INFO, Ray's at WARNING.

    ``verbose`` brings Ray's INFO lines (dataset plans, checkpoint paths) back to the console.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_duch", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._duch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("DUCH_VERBOSE", "1" if verbose else "0")


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

    if ray.is_initialized():
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


def check_shared_locations(locations: dict[str, str | None], nodes: int | None = None) -> None:
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
