"""The ``duch`` command: one entry point for every job of the pipeline.

    duch import | tile | extract | train | evaluate | encode | serve | demo  [options]
    duch <command> --help

Each subcommand is the job module's own ``main(argv)``; ``python jobs/<module>.py`` (also under
``ray job submit``) runs the same code.
"""

from __future__ import annotations

import importlib
import inspect
import sys

# subcommand -> (job module, one-line summary); in pipeline order
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("jobs.import_archive", "turn a captioned image collection into an archive manifest"),
    "tile": ("jobs.tile_scenes", "cut georeferenced scenes (COG/GeoTIFF/JP2, STAC) into chips"),
    "extract": ("jobs.extract_features", "run the frozen backbones over an archive (Ray Data)"),
    "train": ("jobs.train", "train the DUCH hashing heads and export a model bundle (Ray Train)"),
    "evaluate": ("jobs.evaluate", "score a model bundle with the retrieval protocol (mAP@K, PR)"),
    "encode": ("jobs.encode", "encode an archive into a published index version (Ray Data)"),
    "serve": ("jobs.serve", "run or deploy the query service from a Serve config (Ray Serve)"),
    "demo": ("jobs.demo", "the whole pipeline on a built-in demo archive, locally"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: duch <command> [options]",
        "",
        "Text <-> image hashing for remote-sensing archives (DUCH on Ray).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "",
        "`duch <command> --help` lists a command's options. Every command that takes a config",
        "accepts --config FILE, --set key.path=value (repeatable), --print-config and --verbose.",
        "Exit status: 0 done, 1 the run failed (safe to rerun), 2 bad input or configuration.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default: ``sys.argv[1:]``) to a job's ``main``; returns its status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"duch: unknown command {name!r}\n\n{usage()}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    job_main = module.main
    if "prog" in inspect.signature(job_main).parameters:
        return int(job_main(rest, prog=f"duch {name}"))
    return int(job_main(rest))


if __name__ == "__main__":
    sys.exit(main())
