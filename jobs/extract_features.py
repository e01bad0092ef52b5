"""Run the frozen backbones over an archive on Ray Data and cache the feature set.

    python jobs/extract_features.py --config configs/smoke.yaml [--set key=value ...] [--force]

Manifest rows -> decode and augment (CPU tasks) -> image and text towers (actor pool) -> Parquet
shards under ``features.cache_root/<fingerprint>/`` (:mod:`duch_core.features`). A rerun with
the same backbones, augmentation and manifest reuses the set; ``--force`` writes a new version.
Bad items are recorded in ``errors.parquet``; the stage fails only above
``features.max_error_rate``. The training and evaluation jobs run the same stage themselves.
``features.placement_strategy`` spreads the actor pool over nodes (SPREAD) or packs it (PACK);
on a Ray cluster of more than one node ``work_dir``, the cache, the archive and its images must
be ``s3://`` URIs (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import sys

from duch_core.archive import ArchiveError
from duch_core.config import ConfigError, load
from duch_core.features import FeatureSet, FeatureStageError
from jobs import _common
from jobs.train_config import TrainJobConfig, prepare_archive, shared_locations, validate


def build_parser(prog: str = "extract_features") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Extract the frozen backbones' features of an archive (Ray Data) into the "
        "feature cache, or find them there.",
    )
    _common.add_common_arguments(p, config_required=True)
    p.add_argument("--force", action="store_true", help="recompute even if the cache holds a set")
    return p


def summary_lines(fs_: FeatureSet) -> list[str]:
    """The short human summary of a feature set."""
    how = "reused" if fs_.reused else "computed"
    return [
        f"features {how}: {fs_.items} items ({fs_.errors} failed), {fs_.views} augmented view(s), "
        f"image {fs_.image_dim}-d, text {fs_.text_dim}-d",
        f"feature set {fs_.root} (shards {fs_.shards})",
    ]


def main(argv: list[str] | None = None, prog: str = "extract_features") -> int:
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        cfg = validate(load(TrainJobConfig, args.config, args.set))
    except ConfigError as e:
        print(f"extract_features: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK

    def body() -> int:
        # a given archive is read first, so a bad one is reported before Ray starts; the demo
        # archive is written only after the locations have been checked
        archive = prepare_archive(cfg) if cfg.duch.data.archive else None
        _common.check_cluster_locations(shared_locations(cfg, training=False))
        if archive is None:
            archive = prepare_archive(cfg)
        try:
            fs_ = _common.run_feature_stage(
                cfg.duch, archive, cfg.features, cfg.features.cache_root, force=args.force
            )
        except FeatureStageError as e:
            print(f"extract_features: {e}", file=sys.stderr)
            return _common.EXIT_FAILED
        print("\n".join(summary_lines(fs_)))
        return _common.EXIT_OK

    return _common.run_cli(
        "extract_features", body, (ConfigError, ArchiveError, _common.LocationError)
    )


if __name__ == "__main__":
    sys.exit(main())
