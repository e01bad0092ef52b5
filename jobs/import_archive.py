"""Import a public caption dataset (Karpathy JSON or precomp files) as an archive manifest.

    python -m jobs.import_archive SOURCE OUT [--image-root DIR] [--labels auto|ucm|prefix|...]
        [--split-seed 42|none] [--check-images] [--require-images] [--config FILE] [--set k=v]

SOURCE is a Karpathy-style JSON file, a directory holding ``dataset.json``, or a directory of
``<split>_filename.txt`` + ``<split>_caps.txt`` files. OUT is the manifest to write
(``.parquet`` or ``.jsonl``, local or ``s3://``). The summary (items, captions, items without
captions, classes, splits, missing images) is printed. Exit status: 0 on success, 1 when
``--require-images`` is set and image files are missing, 2 on bad input.

Runs in one process, without Ray: importing is a small metadata job.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from duch_core import config
from duch_core.archive import ArchiveError
from duch_core.importers import LABEL_RULES, import_source, write_manifest


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="import_archive", description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="Karpathy JSON, or a directory of dataset files")
    p.add_argument("out", nargs="?", help="manifest to write (.parquet or .jsonl)")
    p.add_argument("--image-root", help="directory or s3:// prefix holding the images")
    p.add_argument("--labels", choices=LABEL_RULES, help="class label rule")
    p.add_argument("--split-seed", help="seed of the paper split, or 'none'")
    p.add_argument("--check-images", action="store_true", help="look up every image file")
    p.add_argument("--require-images", action="store_true", help="fail when images are missing")
    p.add_argument("--config", help="YAML file with ImportConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the import; see the module docstring for arguments and exit status."""
    args = _parser().parse_args(argv)
    try:
        cfg = config.load(ImportConfig, args.config, args.set)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
            print(
                f"error: --split-seed must be an integer or 'none', got {seed!r}", file=sys.stderr
            )
            return 2
    if args.check_images:
        given["check_images"] = True
    if args.require_images:
        given["require_images"] = True
    cfg = dataclasses.replace(cfg, **given)  # type: ignore[arg-type]
    if not cfg.source or not cfg.out:
        print("error: both SOURCE and OUT are required", file=sys.stderr)
        return 2
    try:
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
    except ArchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {uri}")
    for line in summary.lines():
        print(f"  {line}")
    if cfg.require_images and summary.missing_images:
        print(f"error: {len(summary.missing_images)} image file(s) missing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
