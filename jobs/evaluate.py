"""Evaluate a model bundle on an archive with the paper's retrieval protocol.

    python jobs/evaluate.py --config configs/smoke.yaml [--bundle URI] [--out URI] [--k 20 ...]

The protocol (docs/method.md §7, :mod:`duch_core.report`): mAP@K in the four directions I→T,
T→I, I→I, T→T (DJSRH and standard form), P@K and precision-recall curves, relevance = same class.
The config is the training config: its archive, feature cache and split (``split_source`` with
the bundle's split settings) give the query and database items; the bundle's own method config
decides the backbones, so the feature set cached by training is reused. Writes
``evaluation.json``, ``evaluation.md``, ``pr_curve.png`` and ``precision_at_k.png`` to ``--out``
(default: the bundle directory). On a Ray cluster of more than one node (``RAY_ADDRESS``) the
config's locations, ``--bundle`` and ``--out`` must be ``s3://`` URIs (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from duch_core import report, storage
from duch_core.archive import ArchiveError
from duch_core.bundle import Bundle, BundleError
from duch_core.config import ConfigError, load
from duch_core.features import FeatureStageError, read_items
from jobs import _common
from jobs.train_config import (
    TrainJobConfig,
    effective_split,
    prepare_archive,
    shared_locations,
    validate,
)

EXPECTED_ERRORS = (
    ConfigError,
    ArchiveError,
    BundleError,
    storage.StorageError,
    report.EvaluationError,
    _common.LocationError,
)


def build_parser(prog: str = "evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Score a model bundle with the retrieval protocol (mAP@K, P@K, PR curves) "
        "on the query and database items of a training config.",
    )
    _common.add_common_arguments(p, config_required=True)
    p.add_argument("--bundle", default="", help="bundle URI (default: the config's output)")
    p.add_argument("--out", default="", help="report directory (default: the bundle directory)")
    p.add_argument(
        "--k",
        type=int,
        action="append",
        default=[],
        help="mAP cut-off, repeatable (default: 20 and 10)",
    )
    return p


def main(argv: list[str] | None = None, prog: str = "evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    ks = tuple(args.k) or report.DEFAULT_KS
    try:
        if any(k < 1 for k in ks):
            raise ConfigError(f"--k: cut-offs must be >= 1, got {list(ks)}")
        cfg = validate(load(TrainJobConfig, args.config, args.set))
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK

    def body() -> int:
        t0 = time.perf_counter()
        bundle_uri = args.bundle or cfg.output
        # on a cluster: every location shared, before anything is read or written
        _common.check_cluster_locations(
            {
                **shared_locations(cfg, training=False),
                "--bundle" if args.bundle else "output": bundle_uri,
                "--out": args.out,
            }
        )
        bundle = Bundle.load(bundle_uri)
        # the bundle's method config (backbones, split settings) with this config's archive
        d = replace(bundle.config.data, archive=cfg.duch.data.archive)
        job = replace(cfg, duch=replace(bundle.config, data=d))
        archive = prepare_archive(job)
        split = effective_split(
            archive.column("item_id").to_pylist(), archive.column("split").to_pylist(), job
        )
        try:
            fs_ = _common.run_feature_stage(
                job.duch, archive, job.features, job.features.cache_root
            )
        except FeatureStageError as e:
            print(f"evaluate: {e}", file=sys.stderr)
            return _common.EXIT_FAILED
        query, database = read_items(fs_, split["query"]), read_items(fs_, split["database"])
        rep = report.bundle_report(bundle, query, database, ks)
        rep["seconds"] = round(time.perf_counter() - t0, 3)
        out = args.out or bundle_uri
        paths = report.write_report(rep, out)
        mean = {k: row["mean"] for k, row in rep["map"].items()}
        print(
            f"evaluated bundle {bundle.bundle_id} ({rep['bits']} bits) on {rep['n_query']} "
            f"queries x {rep['n_database']} database items"
        )
        print("mean mAP: " + ", ".join(f"@{k} {v:.4f}" for k, v in mean.items()))
        print(
            f"report written to {out} ({', '.join(p.rsplit('/', 1)[-1] for p in paths.values())})"
        )
        return _common.EXIT_OK

    return _common.run_cli("evaluate", body, EXPECTED_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
