"""DUCH training and evaluation as plain functions on precomputed features.

DUCH trains only the hashing heads and the discriminator on frozen backbone features
(docs/method.md §2). One training step on a batch of ``N`` items (four views each):

1. forward the heads: ``h_v1, h_v2`` (image, augmented image), ``h_t1, h_t2`` (caption,
   augmented caption), each ``(N, K)``;
2. discriminator step on the detached codes, for (text 1 vs image 1) and (text 2 vs image 2);
3. hashing step with :func:`duch_core.losses.duch_loss` against the code table's targets;
4. record the codes; the table is refreshed once at the end of the epoch.

Data-parallel training passes a :class:`duch_core.distributed.Collective` as ``gather``: the
contrastive terms then see the codes of every worker, gradients are summed across workers and
the code-table records are exchanged, so ``W`` workers with ``B / W`` items each take the same
step as one worker with ``B`` items (up to BatchNorm statistics, which stay per worker).
Do not wrap the model in DistributedDataParallel: :func:`train_epoch` synchronises it.

The batches and the feature normalisation are in :mod:`duch_core.feature_batches`, the
optimisers and the learning-rate decay in :mod:`duch_core.optim`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from duch_core import codes, metrics
from duch_core.code_table import CodeTable
from duch_core.config import DUCHConfig
from duch_core.distributed import (
    Collective,
    average_buffers,
    gather_with_grad,
    sync_gradients,
)
from duch_core.ema import HeadAverage
from duch_core.feature_batches import ArrayLike, FeatureBatch, Modality, as_feature_matrix
from duch_core.losses import adversarial_discriminator_loss, duch_loss
from duch_core.model import DUCH
from duch_core.negatives import NegativeQueue
from duch_core.optim import make_optimizers, step_lr

__all__ = [
    "RetrievalSet",
    "combine_records",
    "drop_last_needed",
    "encode",
    "encode_features",
    "epoch_line",
    "evaluate",
    "fit",
    "make_average",
    "make_model",
    "make_queue",
    "train_epoch",
]


log = logging.getLogger("duch.train")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def make_model(image_dim: int, text_dim: int, cfg: DUCHConfig) -> DUCH:
    """A :class:`~duch_core.model.DUCH` model initialised with ``cfg.optim.seed``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.optim.seed)
        return DUCH(image_dim, text_dim, cfg.model.bits, cfg.model.hidden_dim)
    finally:
        torch.random.set_rng_state(state)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def train_epoch(
    model: DUCH,
    batches: Iterable[FeatureBatch],
    opt_hash: torch.optim.Optimizer,
    opt_disc: torch.optim.Optimizer,
    table: CodeTable,
    cfg: DUCHConfig,
    epoch: int,
    gather: Collective | None = None,
    device: str | torch.device = "cpu",
    reference: bool = False,
    queue: NegativeQueue | None = None,
    average: HeadAverage | None = None,
) -> dict[str, float]:
    """One epoch over ``batches``; refreshes ``table`` at the end.

    With ``cfg.paper_compat`` the augmented caption is replaced by the caption itself (the
    published ``txt2 = txt1``), the published NT-Xent and the text-only generator term are used
    (each of the three also on its own: ``loss.text_pair``, ``loss.contrast``,
    ``loss.generator``); with the same caption twice the text head computes its first layer
    once for both
    (:meth:`~duch_core.model.HashHead.forward_twice`, bitwise the same as two calls).

    Args:
        model: heads and discriminator (moved to ``device`` by the caller).
        batches: this worker's batches (e.g. :func:`duch_core.feature_batches.make_batches`); every batch needs 2+ items.
        opt_hash, opt_disc: from :func:`duch_core.optim.make_optimizers`.
        table: the code table holding every training id.
        cfg: the full config (``loss``, ``paper_compat``).
        epoch: 0-based epoch number (reported).
        gather: the data-parallel group, or ``None`` for a single process.
        device: where to compute.
        reference: compute the caption codes of ``paper_compat`` with two plain calls of the
            text head (the straightforward form the fast path is tested against; same results).
        queue: the codes of recent batches as extra negatives (``loss.queue_size``; kept by the
            caller across epochs); each batch's image and caption codes join it after its step.
        average: the heads' moving average (``optim.ema_decay``), updated after each step.

    Returns:
        Means over the batches of the loss parts (``total``, ``contrastive``, ``inter``,
        ``intra_image``, ``intra_text``, ``adversarial``, ``quantization``, ``bit_balance``,
        ``discriminator``), plus ``epoch``, ``batches``, ``samples`` (this worker), ``lr``,
        ``table_rows_updated`` and ``seconds``.
    """
    t0 = time.perf_counter()
    model.train()
    sums: dict[str, float] = {}
    n_batches = n_samples = 0
    for raw in batches:
        batch = raw.to(device)
        n = len(batch)
        if n < 2:
            raise ValueError(
                f"batch of {n} item(s) in epoch {epoch}: BatchNorm in training mode needs 2+ "
                "items per batch (make_batches merges a short trailing batch)"
            )
        h_v1 = model.image_head(batch.img)
        h_v2 = model.image_head(batch.img_aug)
        if not cfg.same_caption_twice:
            h_t1, h_t2 = model.text_head(batch.txt), model.text_head(batch.txt_aug)
        elif reference:
            h_t1, h_t2 = model.text_head(batch.txt), model.text_head(batch.txt)
        else:
            h_t1, h_t2 = model.text_head.forward_twice(batch.txt)

        # discriminator step on detached codes: text "real", image "fake"
        opt_disc.zero_grad(set_to_none=True)
        d_loss = adversarial_discriminator_loss(
            model.discriminator, h_t1, h_v1, cfg.loss.gp_weight
        ) + adversarial_discriminator_loss(model.discriminator, h_t2, h_v2, cfg.loss.gp_weight)
        d_loss.backward()
        if gather is not None:
            sync_gradients(model.discriminator.parameters(), gather, average=True)
        opt_disc.step()

        # hashing step
        b = table.lookup(batch.ids, device=h_v1.device)
        contrastive_codes = None
        if gather is not None:
            contrastive_codes = (
                gather_with_grad(h_v1, gather),
                gather_with_grad(h_v2, gather),
                gather_with_grad(h_t1, gather),
                gather_with_grad(h_t2, gather),
            )
        negatives = rows = None
        if queue is not None:
            rows = table.rows(batch.ids).to(h_v1.device)
            if gather is not None:  # the rows of the gathered codes, in the same order
                rows = torch.cat(gather.all_gather(rows))
            negatives = (
                queue.negatives("image", h_v1.device),
                queue.negatives("text", h_v1.device),
            )
        opt_hash.zero_grad(set_to_none=True)
        loss, parts = duch_loss(
            h_v1,
            h_v2,
            h_t1,
            h_t2,
            b,
            model.discriminator,
            cfg.loss,
            cfg.paper_compat,
            contrastive_codes,
            negatives,
            rows,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DUCH loss in epoch {epoch}: {float(loss)}")
        loss.backward()
        if gather is not None:
            sync_gradients(model.hash_parameters(), gather, average=False)
        opt_hash.step()
        if average is not None:
            average.update(model)

        table.record(batch.ids, h_v1.detach(), h_v2.detach(), h_t1.detach(), h_t2.detach())
        if queue is not None and rows is not None:
            q_v, q_t = (h_v1, h_t1) if contrastive_codes is None else contrastive_codes[::2]
            queue.push(q_v.detach(), q_t.detach(), rows)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        sums["discriminator"] = sums.get("discriminator", 0.0) + float(d_loss.detach())
        n_batches += 1
        n_samples += n

    if gather is not None:
        exported = gather.all_gather_object(table.export())
        table.merge(ex for r, ex in enumerate(exported) if r != gather.rank)
        average_buffers(model, gather)
    updated = table.refresh()
    out = {k: v / max(n_batches, 1) for k, v in sums.items()}
    out.update(
        epoch=float(epoch),
        batches=float(n_batches),
        samples=float(n_samples),
        lr=float(opt_hash.param_groups[0]["lr"]),
        table_rows_updated=float(updated),
        bit_imbalance=bit_imbalance(table.b),
        seconds=time.perf_counter() - t0,
    )
    return out


def make_average(model: DUCH, cfg: DUCHConfig) -> HeadAverage | None:
    """The heads' moving average ``optim.ema_decay`` asks for (``None`` when 0)."""
    return HeadAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None


def make_queue(cfg: DUCHConfig) -> NegativeQueue | None:
    """The negative queue ``loss.queue_size`` asks for (``None`` when 0)."""
    return NegativeQueue(cfg.loss.queue_size, cfg.model.bits) if cfg.loss.queue_size else None


def bit_imbalance(b: torch.Tensor) -> float:
    """Mean over bits of ``|mean code value over items|`` of ``(N, K)`` codes in {-1, +1}.

    In ``[0, 1]``: 0 when every bit is +1 for half of the items (what the bit-balance term
    aims at), 1 when every bit is constant.
    """
    if b.numel() == 0:
        return 0.0
    return float(b.to(torch.float32).mean(dim=0).abs().mean())


def combine_records(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One epoch record from every worker's :func:`train_epoch` output.

    ``samples`` and ``batches`` are summed, ``seconds`` is the slowest worker's, everything else
    (loss parts, lr, epoch) is averaged; ``samples_per_s`` is added.
    """
    out: dict[str, float] = {}
    for key in records[0]:
        vals = [float(r[key]) for r in records]
        if key in ("samples", "batches"):
            out[key] = float(sum(vals))
        elif key == "seconds":
            out[key] = max(vals)
        else:
            out[key] = float(np.mean(vals))
    out["samples_per_s"] = out.get("samples", 0.0) / max(out.get("seconds", 0.0), 1e-9)
    return out


def drop_last_needed(n_rows: int, world_size: int, per_worker_batch: int) -> bool:
    """True when equal shards of ``n_rows`` would end in a 1-item batch (BatchNorm needs 2)."""
    return (n_rows // world_size) % per_worker_batch == 1


# loss parts in the order the epoch line prints them, with their short names
_LINE_TERMS = (
    ("inter", "inter"),
    ("intra_image", "intra_img"),
    ("intra_text", "intra_txt"),
    ("adversarial", "adv"),
    ("quantization", "quant"),
    ("bit_balance", "balance"),
    ("discriminator", "disc"),
)


def epoch_line(rec: Mapping[str, float], epochs: int, k: int = 20) -> str:
    """One human-readable line for an epoch record (:func:`train_epoch`, merged or not).

    ``epoch 3/30  loss 1.234 (inter 0.51, ...)  lr 8.0e-05  bit imbalance 0.041  mAP@20 0.532
    (map_mean, only on evaluated epochs)  2.1 s``.
    """
    parts = ", ".join(f"{short} {rec[key]:.4g}" for key, short in _LINE_TERMS if key in rec)
    line = f"epoch {int(rec.get('epoch', 0)) + 1}/{epochs}  loss {rec.get('total', math.nan):.4g}"
    if parts:
        line += f" ({parts})"
    line += f"  lr {rec.get('lr', math.nan):.2e}"
    if "bit_imbalance" in rec:
        line += f"  bit imbalance {rec['bit_imbalance']:.3f}"
    if "map_mean" in rec:
        line += f"  mAP@{k} {rec['map_mean']:.4f}"
    if "seconds" in rec:
        line += f"  {rec['seconds']:.1f} s"
    return line


# --------------------------------------------------------------------------------------------
# encoding and evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_features(
    model: DUCH,
    feats: ArrayLike,
    modality: Modality,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Continuous codes of (already normalised) features, with the heads in eval mode.

    Args:
        feats: ``(N, D)`` float features of ``modality``.
        modality: ``"image"`` or ``"text"``.

    Returns:
        ``(N, K)`` float32 codes in ``(-1, 1)`` on the CPU; binarise with
        :func:`duch_core.codes.pack`.
    """
    if modality == "image":
        head = model.image_head
    elif modality == "text":
        head = model.text_head
    else:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    x = as_feature_matrix(feats, f"{modality} features")
    if x.shape[1] != head.in_dim:
        raise ValueError(
            f"{modality} features have dimension {x.shape[1]}, the head expects {head.in_dim}"
        )
    dev = device if device is not None else next(head.parameters()).device
    was_training = head.training
    head.eval()
    try:
        out = [
            head(x[i : i + batch_size].to(dev, torch.float32)).float().cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
    finally:
        head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, head.bits)


encode = encode_features


@dataclass
class RetrievalSet:
    """Query or database items for evaluation: one image and one caption per item.

    Attributes:
        img: ``(N, D_img)`` normalised image features.
        txt: ``(N, D_txt)`` normalised caption features (one caption per item).
        labels: ``N`` class labels (relevance = same class), see :func:`duch_core.metrics.relevance`.
    """

    img: ArrayLike
    txt: ArrayLike
    labels: Sequence[Any]

    def __post_init__(self) -> None:
        ni, nt, nl = len(self.img), len(self.txt), len(self.labels)
        if not ni == nt == nl:
            raise ValueError(f"RetrievalSet: {ni} images, {nt} captions, {nl} labels; must match")


def evaluate(
    model: DUCH,
    query: RetrievalSet,
    database: RetrievalSet,
    k: int = 20,
    variant: metrics.Variant = "djsrh",
) -> dict[str, float]:
    """mAP@K in the four directions (paper: K = 20, DJSRH semantics) on binary codes.

    Returns:
        ``{"i2t", "t2i", "i2i", "t2t", "mean"}`` (mean of the four, the paper's model selection).
    """
    views: tuple[tuple[Modality, str], ...] = (("image", "img"), ("text", "txt"))
    packed = {
        (name, mod): codes.pack(encode_features(model, getattr(s, attr), mod))
        for name, s in (("q", query), ("db", database))
        for mod, attr in views
    }
    report = metrics.retrieval_report(
        packed["q", "image"],
        packed["q", "text"],
        packed["db", "image"],
        packed["db", "text"],
        list(query.labels),
        list(database.labels),
        k=k,
        variant=variant,
    )
    out = {key: float(v) for key, v in report.items()}
    out["mean"] = float(np.mean([out["i2t"], out["t2i"], out["i2i"], out["t2t"]]))
    return out


def fit(
    model: DUCH,
    train_batches_fn: Callable[[int], Iterable[FeatureBatch]],
    cfg: DUCHConfig,
    train_ids: Sequence[str],
    query: RetrievalSet | None = None,
    database: RetrievalSet | None = None,
    eval_every: int = 0,
    k: int = 20,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    reference: bool = False,
) -> list[dict[str, float]]:
    """Train for ``cfg.optim.epochs`` epochs in one process; deterministic under the seeds.

    With ``optim.ema_decay`` the evaluations score the heads' moving average, and ``model``
    ends the run holding it.

    Args:
        model: from :func:`make_model`; moved to ``device``.
        train_batches_fn: ``epoch -> batches`` (e.g. ``lambda e: make_batches(..., epoch=e)``).
        cfg: the full config.
        train_ids: every training item id (the code table's keys).
        query, database: evaluation sets; evaluated every ``eval_every`` epochs (0 = only after
            the last epoch, as the paper) when both are given.
        k: mAP cut-off.
        on_epoch: called with each epoch's record.
        reference: train with the straightforward implementation (plain ``torch.optim.Adam``,
            two text-head calls under ``paper_compat``) that the fast path is tested against;
            the results are bitwise the same.

    Returns:
        One record per epoch: :func:`train_epoch`'s output, ``lr`` after the decay step, and
        ``map_i2t`` ... ``map_mean`` on evaluated epochs.
    """
    torch.manual_seed(cfg.optim.seed)
    model.to(device)
    opt_hash, opt_disc = make_optimizers(model, cfg.optim, reference=reference)
    table = CodeTable(train_ids, cfg.model.bits, seed=cfg.optim.seed)
    queue = make_queue(cfg)
    average = make_average(model, cfg)
    history: list[dict[str, float]] = []
    epochs = cfg.optim.epochs
    for epoch in range(epochs):
        rec = train_epoch(
            model,
            train_batches_fn(epoch),
            opt_hash,
            opt_disc,
            table,
            cfg,
            epoch,
            device=device,
            reference=reference,
            queue=queue,
            average=average,
        )
        rec["next_lr"] = step_lr(opt_hash, epoch, cfg.optim)
        last = epoch == epochs - 1
        due = eval_every > 0 and (epoch + 1) % eval_every == 0
        if query is not None and database is not None and (last or due):
            scored = average.averaged(model) if average is not None else model
            for key, v in evaluate(scored, query, database, k).items():
                rec[f"map_{key}"] = v
        history.append(rec)
        log.info("%s", epoch_line(rec, epochs, k))
        if on_epoch is not None:
            on_epoch(rec)
    if average is not None:
        average.copy_to(model)
    return history
