"""The paper's evaluation protocol as a report: numbers, markdown tables and plots.

Query items' images and captions are ranked against the database items' images and captions by
Hamming distance of their codes (ties by database position, :mod:`duch_core.metrics`); an item
is relevant when it shares the query's class label. The report holds mAP@K in the four
directions (the paper's DJSRH form and the standard AP@K), P@K and precision-recall curves over
the Hamming radius. Written next to a bundle::

    evaluation.json      the full report
    evaluation.md        mAP@K per direction, P@K
    pr_curve.png         precision-recall curves, one line per direction
    precision_at_k.png   P@K, one line per direction
    loss_curve.png       the training loss terms per epoch (training only)
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from duch_core import metrics, storage
from duch_core.features import EvalItems

DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
DIRECTION_NAMES = {"i2t": "I→T", "t2i": "T→I", "i2i": "I→I", "t2t": "T→T"}
DEFAULT_KS = (20, 10)
REPORT_JSON = "evaluation.json"
REPORT_MD = "evaluation.md"
PR_PNG = "pr_curve.png"
PK_PNG = "precision_at_k.png"
LOSS_PNG = "loss_curve.png"
# history keys drawn by loss_curve_png, in legend order
LOSS_TERMS = (
    "total",
    "contrastive",
    "inter",
    "intra_image",
    "intra_text",
    "adversarial",
    "quantization",
    "bit_balance",
    "discriminator",
)


class EvaluationError(ValueError):
    """The items cannot be evaluated (an empty query or database side, or missing labels)."""


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


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """``{"map@20_i2t": ..., "map@20_mean": ..., "map@10_i2t": ...}`` from :func:`protocol_report`
    (the summary stored in a bundle's ``meta.json`` and printed by the jobs)."""
    return {f"map@{k}_{d}": float(v) for k, row in report["map"].items() for d, v in row.items()}


def check_items(query: EvalItems, database: EvalItems) -> None:
    """Raise :class:`EvaluationError` unless both sides have items and every item a label."""
    if not query.ids or not database.ids:
        raise EvaluationError(
            f"nothing to evaluate: {len(query.ids)} query and {len(database.ids)} database items"
        )
    if any(x is None for x in [*query.labels, *database.labels]):
        raise EvaluationError("some query or database items have no label; relevance needs labels")


def _report_from(
    query: EvalItems,
    database: EvalItems,
    image_codes: Callable[[np.ndarray], np.ndarray],
    text_codes: Callable[[np.ndarray], np.ndarray],
    ks: Sequence[int],
) -> dict[str, Any]:
    check_items(query, database)
    return protocol_report(
        image_codes(query.img),
        text_codes(query.txt),
        image_codes(database.img),
        text_codes(database.txt),
        query.labels,
        database.labels,
        ks=ks,
    )


def heads_report(
    model: Any,
    stats: Any,
    query: EvalItems,
    database: EvalItems,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """:func:`protocol_report` of in-memory heads on raw features.

    Args:
        model: a :class:`duch_core.model.DUCH`.
        stats: the :class:`duch_core.feature_batches.FeatureStats` applied before the heads, or None.
        query, database: from :func:`duch_core.features.read_items`.

    Raises:
        EvaluationError: see :func:`check_items`.
    """
    from duch_core import codes
    from duch_core.train_loop import encode_features

    def pack(x: np.ndarray, modality: Any) -> np.ndarray:
        feats = stats.apply(x, modality) if stats is not None else x
        return codes.pack(encode_features(model, feats, modality))  # type: ignore[arg-type]

    return _report_from(query, database, lambda x: pack(x, "image"), lambda x: pack(x, "text"), ks)


def bundle_report(
    bundle: Any, query: EvalItems, database: EvalItems, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """:func:`protocol_report` of a loaded :class:`duch_core.bundle.Bundle` (its own feature
    statistics and heads, as encoding and serving use them), tagged with the bundle.

    Raises:
        EvaluationError: see :func:`check_items`.
    """
    from duch_core import codes
    from duch_core.hash_encoder import HashEncoder

    enc = HashEncoder(bundle)
    report = _report_from(
        query,
        database,
        lambda x: codes.pack(enc.image_codes_from_features(x)),
        lambda x: codes.pack(enc.text_codes_from_features(x)),
        ks,
    )
    report.update(bundle=bundle.uri, bundle_id=bundle.bundle_id)
    return report


def markdown(report: Mapping[str, Any]) -> str:
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
    for k in report["precision_at_k"][DIRECTIONS[0]]:
        vals = " | ".join(f"{report['precision_at_k'][d][k]:.4f}" for d in DIRECTIONS)
        lines.append(f"| {k} | {vals} |")
    return "\n".join(lines) + "\n"


def _png(draw: Callable[[Any], None]) -> bytes:
    # the Agg canvas directly: no pyplot, so no global figure state and no display backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pr_curve_png(report: Mapping[str, Any]) -> bytes:
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


def precision_at_k_png(report: Mapping[str, Any]) -> bytes:
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


def loss_curve_png(history: Sequence[Mapping[str, float]]) -> bytes:
    """PNG of the loss terms over the epochs of a training history (one line per term).

    Args:
        history: one record per epoch with ``epoch`` (0-based) and the loss parts of
            :func:`duch_core.train_loop.train_epoch` (terms missing from the records are skipped).

    Raises:
        ValueError: an empty history.
    """
    if not history:
        raise ValueError("loss_curve_png needs at least one epoch record")
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]

    def draw(ax: Any) -> None:
        for term in LOSS_TERMS:
            if all(term in h for h in history):
                ax.plot(epochs, [float(h[term]) for h in history], marker=".", label=term)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (mean over batches)")
        ax.set_title(f"Training losses ({len(history)} epochs)")

    return _png(draw)


def write_report(report: Mapping[str, Any], out: str) -> dict[str, str]:
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
    storage.write_json(paths["json"], dict(report))
    return paths


def write_loss_curve(history: Sequence[Mapping[str, float]], out: str) -> str:
    """Write ``loss_curve.png`` of a training history under ``out``; returns its URI."""
    uri = storage.join(out, LOSS_PNG)
    storage.write_bytes(uri, loss_curve_png(history))
    return uri
