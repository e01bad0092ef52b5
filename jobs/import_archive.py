"""Import a public caption dataset (Karpathy JSON or precomp files) as an archive manifest.

    python jobs/import_archive.py SOURCE OUT [--image-root DIR] [--labels RULE]
        [--split-seed 42|none] [--check-images] [--require-images] [--config FILE] [--set k=v]

SOURCE is a Karpathy-style JSON file, a directory holding ``dataset.json``, or a directory of
``<split>_filename.txt`` + ``<split>_caps.txt`` files; OUT is the manifest to write (``.parquet``
or ``.jsonl``, local or ``s3://``). Runs in one process without Ray: importing reads metadata
only. Exit status 1 when ``--require-images`` is set and image files are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from duch_core import config
from duch_core.archive import ArchiveError
from duch_core.importers import LABEL_RULES, import_source, write_manifest
from jobs import _common


@dataclass(frozen=True)
class ImportConfig:
    """What to import and where to write it."""

    source: str = ""
    out: str = ""
    image_root: str = ""  # "" = keep the dataset's relative file names
    labels: str = "auto"  # auto | ucm | prefix | classname | none
    split_seed: int | None = 42  # null = no paper split column
    train_frac: float = 0.5
    query_frac: float = 0.1
    splits: tuple[str, ...] = ()  # precomp splits to read; () = all found
    check_images: bool = False
    require_images: bool = False  # fail (exit 1) when image files are missing


def build_parser(prog: str = "import_archive") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Turn a captioned image collection (Karpathy JSON as used by UCM, Sydney and "
        "RSICD captions, or *_precomp caption files) into an archive manifest.",
    )
    p.add_argument("source", nargs="?", help="Karpathy JSON, or a directory of dataset files")
    p.add_argument("out", nargs="?", help="manifest to write (.parquet or .jsonl)")
    p.add_argument("--image-root", help="directory or s3:// prefix holding the images")
    p.add_argument("--labels", choices=LABEL_RULES, help="class label rule")
    p.add_argument("--split-seed", help="seed of the paper split, or 'none'")
    p.add_argument("--check-images", action="store_true", help="look up every image file")
    p.add_argument("--require-images", action="store_true", help="fail when images are missing")
    _common.add_common_arguments(p, config_required=False)
    return p


def load_config(args: argparse.Namespace, require_locations: bool = True) -> ImportConfig:
    """The config file and ``--set`` overrides, then the positional arguments and flags.

    Raises:
        ConfigError: unknown key, wrong type, a bad ``--split-seed``, or (``require_locations``)
            no SOURCE or OUT.
    """
    cfg = config.load(ImportConfig, args.config, args.set)
    given: dict[str, object] = {
        k: v
        for k, v in (
            ("source", args.source),
            ("out", args.out),
            ("image_root", args.image_root),
            ("labels", args.labels),
        )
        if v is not None
    }
    if args.split_seed is not None:
        seed = args.split_seed.strip().lower()
        if seed in ("none", "null", ""):
            given["split_seed"] = None
        elif seed.lstrip("-").isdigit():
            given["split_seed"] = int(seed)
        else:
            raise config.ConfigError(f"--split-seed must be an integer or 'none', got {seed!r}")
    if args.check_images:
        given["check_images"] = True
    if args.require_images:
        given["require_images"] = True
    cfg = dataclasses.replace(cfg, **given)  # type: ignore[arg-type]
    if require_locations and (not cfg.source or not cfg.out):
        raise config.ConfigError("both SOURCE and OUT are required")
    return cfg


def run(cfg: ImportConfig) -> int:
    """Import, write the manifest, print what it holds; 1 when required images are missing."""
    table = import_source(
        cfg.source,
        image_root=cfg.image_root or None,
        labels=cfg.labels,
        split_seed=cfg.split_seed,
        train_frac=cfg.train_frac,
        query_frac=cfg.query_frac,
        splits=cfg.splits or None,
    )
    uri, summary = write_manifest(
        table, cfg.out, check_images=cfg.check_images or cfg.require_images
    )
    print(f"wrote {uri}")
    for line in summary.lines():
        print(f"  {line}")
    if cfg.require_images and summary.missing_images:
        print(f"error: {len(summary.missing_images)} image file(s) missing", file=sys.stderr)
        return _common.EXIT_FAILED
    return _common.EXIT_OK


def main(argv: list[str] | None = None, *, prog: str = "import_archive") -> int:
    """Run the import. Exit status: 0 done, 1 required images missing, 2 bad input."""
    args = build_parser(prog).parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        cfg = load_config(args, require_locations=not args.print_config)
    except config.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return _common.EXIT_BAD_INPUT
    if args.print_config:
        _common.print_config(cfg)
        return _common.EXIT_OK
    return _common.run_cli(
        "import_archive", lambda: run(cfg), (ArchiveError, config.ConfigError, FileNotFoundError)
    )


if __name__ == "__main__":
    sys.exit(main())
