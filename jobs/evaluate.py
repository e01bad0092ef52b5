"""Evaluate a model bundle on an archive with the paper's protocol.

    python jobs/evaluate.py [--config configs/demo.yaml] [--bundle URI] [--out URI] [--set k=v]
    python -m jobs.evaluate ...

The protocol (PAPER.md §4): the query items' images and captions are ranked against the database
items' images and captions by Hamming distance of their binary codes (ties by database position,
see :mod:`duch_core.metrics`); an item is relevant when it shares the query's class label.

* mAP@K for K in ``--k`` (default 20 and 10) in the four directions I→T, T→I, I→I, T→T, with the
  paper's DJSRH semantics, and the standard truncated AP@K next to it;
* P@K for K = 1, 5, 10, 20, 50, 100, ... up to the database size;
* precision-recall curves over the Hamming radius ``0 .. bits``.

Inputs: the same YAML config as ``jobs/train.py`` (archive, demo archive, feature cache, split),
and the bundle (default: the config's ``output``). The bundle's own method config decides the
backbones, so the feature set cached by training is reused. The items and the split are those of
training: ``split_source`` with the bundle's split seed and fractions.

Outputs, written to ``--out`` (default: the bundle directory), next to the bundle::

    evaluation.json      the full report (numbers above, counts, bundle id)
    evaluation.md        markdown tables: mAP@K per direction, P@K
    pr_curve.png         precision-recall curves, one line per direction
    precision_at_k.png   P@K curves, one line per direction

``jobs/train.py`` ends with the same evaluation (:func:`protocol_report`, :func:`write_report`)
on the model it has just trained.

Exit status: 0 success, 1 the evaluation failed, 2 bad configuration, archive or bundle.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python jobs/evaluate.py`
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow.compute as pc

from duch_core import metrics, storage
from duch_core.archive import ArchiveError

log = logging.getLogger("duch.evaluate")

DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
DIRECTION_NAMES = {"i2t": "I→T", "t2i": "T→I", "i2i": "I→I", "t2t": "T→T"}
DEFAULT_KS = (20, 10)
REPORT_JSON = "evaluation.json"
REPORT_MD = "evaluation.md"
PR_PNG = "pr_curve.png"
PK_PNG = "precision_at_k.png"


@dataclass(frozen=True)
class EvalItems:
    """Query or database items read from a feature set, sorted by item id.

    Attributes:
        ids: ``N`` item ids.
        img: ``(N, D_img)`` float32 raw (not normalised) image features.
        txt: ``(N, D_txt)`` float32 raw features of the item's caption.
        labels: ``N`` class labels.
    """

    ids: list[str]
    img: np.ndarray
    txt: np.ndarray
    labels: list[Any]


def read_items(fs_: Any, ids: Sequence[str]) -> EvalItems:
    """The feature rows of ``ids`` in a :class:`jobs.extract_features.FeatureSet` (driver side).

    Items whose features failed (``error_stage`` set) are left out.
    """
    from jobs.extract_features import list_to_numpy, read_columns

    t = read_columns(fs_, ["item_id", "label", "img", "txt", "error_stage"], ids)
    t = t.filter(pc.equal(t.column("error_stage"), "")).sort_by("item_id")
    return EvalItems(
        [str(x) for x in t.column("item_id").to_pylist()],
        list_to_numpy(t.column("img")),
        list_to_numpy(t.column("txt")),
        t.column("label").to_pylist(),
    )


def protocol_report(
    img_q: np.ndarray,
    txt_q: np.ndarray,
    img_db: np.ndarray,
    txt_db: np.ndarray,
    q_labels: Sequence[Any],
    db_labels: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    p_at_k: Sequence[int] = metrics.DEFAULT_P_AT_K,
) -> dict[str, Any]:
    """The paper's evaluation on packed codes.

    Args:
        img_q, txt_q: ``(Q, bits // 8)`` uint8 packed codes of the query images and captions.
        img_db, txt_db: ``(N, bits // 8)`` uint8 packed codes of the database items.
        q_labels, db_labels: class labels (relevance = same class).
        ks: mAP cut-offs.
        p_at_k: P@K cut-offs; those above ``N`` are dropped (``N`` itself is kept).

    Returns:
        ``{"bits", "n_query", "n_database", "map": {"20": {"i2t", "t2i", "i2i", "t2t", "mean"},
        ...}, "map_standard": {...}, "precision_at_k": {"i2t": {"1": p, ...}, ...},
        "pr_curve": {"i2t": {"radius", "precision", "recall"}, ...}}`` (JSON-ready).
    """
    pairs = {
        "i2t": (img_q, txt_db),
        "t2i": (txt_q, img_db),
        "i2i": (img_q, img_db),
        "t2t": (txt_q, txt_db),
    }
    n_db = int(np.asarray(img_db).shape[0])
    pk = sorted({k for k in p_at_k if k <= n_db} | ({n_db} if n_db < max(p_at_k) else set()))
    report: dict[str, Any] = {
        "bits": int(np.asarray(img_q).shape[1]) * 8,
        "n_query": int(np.asarray(img_q).shape[0]),
        "n_database": n_db,
        "map": {},
        "map_standard": {},
        "precision_at_k": {},
        "pr_curve": {},
    }
    for key, variant in (("map", "djsrh"), ("map_standard", "standard")):
        for k in ks:
            row = {
                d: metrics.map_at_k(q, db, q_labels, db_labels, k, variant)  # type: ignore[arg-type]
                for d, (q, db) in pairs.items()
            }
            row["mean"] = float(np.mean([row[d] for d in DIRECTIONS]))
            report[key][str(k)] = row
    for d, (q, db) in pairs.items():
        p = metrics.precision_at_k(q, db, q_labels, db_labels, pk)
        report["precision_at_k"][d] = {str(k): v for k, v in p.items()}
        curve = metrics.pr_curve(q, db, q_labels, db_labels)
        report["pr_curve"][d] = {name: arr.tolist() for name, arr in curve.items()}
    return report


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``{"map@20_i2t": ..., "map@20_mean": ..., "map@10_i2t": ...}`` from :func:`protocol_report`
    (the summary stored in a bundle's ``meta.json`` and printed by the jobs)."""
    return {f"map@{k}_{d}": float(v) for k, row in report["map"].items() for d, v in row.items()}


def markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`protocol_report` (mAP@K rows per K, then P@K)."""
    head = [DIRECTION_NAMES[d] for d in DIRECTIONS]
    lines = [
        f"# Retrieval evaluation ({report['bits']} bits)",
        "",
        f"{report['n_query']} queries, {report['n_database']} database items; relevant = same "
        "class; ranking by Hamming distance, ties by database position.",
        "",
        "| metric | " + " | ".join(head) + " | mean |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    for key, name in (("map", "mAP@{k}"), ("map_standard", "mAP@{k} (standard AP@K)")):
        for k, row in report[key].items():
            vals = " | ".join(f"{row[d]:.4f}" for d in (*DIRECTIONS, "mean"))
            lines.append(f"| {name.format(k=k)} | {vals} |")
    lines += ["", "| P@K | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    ks = list(report["precision_at_k"][DIRECTIONS[0]])
    for k in ks:
        vals = " | ".join(f"{report['precision_at_k'][d][k]:.4f}" for d in DIRECTIONS)
        lines.append(f"| {k} | {vals} |")
    return "\n".join(lines) + "\n"


def _png(draw: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pr_curve_png(report: dict[str, Any]) -> bytes:
    """PNG of the precision-recall curves (one line per direction)."""

    def draw(ax: Any) -> None:
        for d in DIRECTIONS:
            c = report["pr_curve"][d]
            ax.plot(c["recall"], c["precision"], marker=".", label=DIRECTION_NAMES[d])
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Precision-recall over Hamming radius ({report['bits']} bits)")

    return _png(draw)


def precision_at_k_png(report: dict[str, Any]) -> bytes:
    """PNG of P@K (one line per direction)."""

    def draw(ax: Any) -> None:
        for d in DIRECTIONS:
            p = report["precision_at_k"][d]
            ax.plot([int(k) for k in p], list(p.values()), marker="o", label=DIRECTION_NAMES[d])
        ax.set_xlabel("K (retrieved items)")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"P@K ({report['bits']} bits)")

    return _png(draw)


def write_report(report: dict[str, Any], out: str) -> dict[str, str]:
    """Write ``evaluation.json``, ``evaluation.md`` and the two PNGs under ``out``.

    Returns:
        ``{"json", "markdown", "pr_curve", "precision_at_k"}`` -> URI.
    """
    paths = {
        "json": storage.join(out, REPORT_JSON),
        "markdown": storage.join(out, REPORT_MD),
        "pr_curve": storage.join(out, PR_PNG),
        "precision_at_k": storage.join(out, PK_PNG),
    }
    storage.write_bytes(paths["pr_curve"], pr_curve_png(report))
    storage.write_bytes(paths["precision_at_k"], precision_at_k_png(report))
    storage.write_text(paths["markdown"], markdown(report))
    storage.write_json(paths["json"], report)
    return paths


def evaluate_bundle(
    bundle: Any, fs_: Any, split: dict[str, list[str]], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """:func:`protocol_report` of a loaded :class:`duch_core.bundle.Bundle` on a feature set.

    Raises:
        ValueError: the query or database split is empty, or an item has no label.
    """
    from duch_core import codes
    from duch_core.bundle import HashEncoder

    q, db = read_items(fs_, split["query"]), read_items(fs_, split["database"])
    if not q.ids or not db.ids:
        raise ValueError(
            f"nothing to evaluate: {len(q.ids)} query and {len(db.ids)} database items"
        )
    if any(x is None for x in [*q.labels, *db.labels]):
        raise ValueError("some query or database items have no label; relevance needs labels")
    enc = HashEncoder(bundle)

    def pack(items: EvalItems) -> tuple[np.ndarray, np.ndarray]:
        return (
            codes.pack(enc.image_codes_from_features(items.img)),
            codes.pack(enc.text_codes_from_features(items.txt)),
        )

    (iq, tq), (idb, tdb) = pack(q), pack(db)
    report = protocol_report(iq, tq, idb, tdb, q.labels, db.labels, ks=ks)
    report.update(bundle=bundle.uri, bundle_id=bundle.bundle_id)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="the training YAML config (default: the demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--bundle", default="", help="bundle URI (default: the config's output)")
    p.add_argument("--out", default="", help="report directory (default: the bundle directory)")
    p.add_argument(
        "--k", type=int, action="append", default=[], help="mAP cut-off (repeatable; 20 and 10)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; see the module docstring for inputs, outputs and exit status."""
    from duch_core.bundle import Bundle, BundleError
    from duch_core.config import ConfigError, load
    from jobs.extract_features import FeatureStageError, read_columns, run_stage
    from jobs.train import default_config, effective_split, ensure_ray, prepare_archive
    from jobs.train_config import TrainJobConfig, validate

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ks = tuple(args.k) or DEFAULT_KS
    try:
        if any(k < 1 for k in ks):
            raise ConfigError(f"--k: cut-offs must be >= 1, got {list(ks)}")
        cfg = validate(load(TrainJobConfig, args.config or default_config(), args.set))
        bundle_uri = args.bundle or cfg.output
        bundle = Bundle.load(bundle_uri)
        d = bundle.config.data
        cfg = replace(
            cfg, duch=replace(bundle.config, data=replace(d, archive=cfg.duch.data.archive))
        )
        archive = prepare_archive(cfg)
    except (ConfigError, ArchiveError, BundleError, storage.StorageError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        ensure_ray()
        fs_ = run_stage(cfg.duch, archive, cfg.features, cfg.features.cache_root)
        meta = read_columns(fs_, ["item_id", "split"])
        split = effective_split(
            meta.column("item_id").to_pylist(), meta.column("split").to_pylist(), cfg
        )
        report = evaluate_bundle(bundle, fs_, split, ks)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        paths = write_report(report, args.out or bundle_uri)
    except (ConfigError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    except FeatureStageError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("evaluation failed")
        return 1
    print(json.dumps({"metrics": flat_metrics(report), "files": paths}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
