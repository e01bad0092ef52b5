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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from duch_core import codes, metrics
from duch_core.code_table import CodeTable
from duch_core.config import DUCHConfig, OptimConfig
from duch_core.distributed import (
    Collective,
    average_buffers,
    gather_with_grad,
    sync_gradients,
)
from duch_core.losses import adversarial_discriminator_loss, duch_loss
from duch_core.model import DUCH

__all__ = [
    "BlockedAdam",
    "FeatureBatch",
    "FeatureStats",
    "RetrievalSet",
    "combine_records",
    "drop_last_needed",
    "encode",
    "encode_features",
    "epoch_line",
    "evaluate",
    "fit",
    "make_batches",
    "make_model",
    "make_optimizers",
    "step_lr",
    "train_epoch",
    "view_for_epoch",
]

Modality = Literal["image", "text"]
ArrayLike = torch.Tensor | np.ndarray
# one augmented-view matrix, or the views resampled per epoch (see make_batches)
AugViews = ArrayLike | list[ArrayLike] | tuple[ArrayLike, ...]

log = logging.getLogger("duch.train")


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) feature matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must hold floating-point features, got {t.dtype}")
    return t


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureBatch:
    """One training batch of ``N`` items, four views each.

    Attributes:
        ids: ``N`` item ids (keys of the code table).
        img: ``(N, D_img)`` float image features (original view).
        img_aug: ``(N, D_img)`` float features of the augmented image.
        txt: ``(N, D_txt)`` float features of the item's caption.
        txt_aug: ``(N, D_txt)`` float features of the augmented caption.
    """

    ids: list[str]
    img: torch.Tensor
    img_aug: torch.Tensor
    txt: torch.Tensor
    txt_aug: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("img", "img_aug", "txt", "txt_aug"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != n:
                raise ValueError(
                    f"FeatureBatch.{name} must be an ({n}, D) tensor for {n} ids, "
                    f"got {getattr(t, 'shape', type(t).__name__)}"
                )
        if self.img.shape != self.img_aug.shape or self.txt.shape != self.txt_aug.shape:
            raise ValueError("FeatureBatch: a view and its augmented view must have the same shape")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], stats: FeatureStats | None) -> FeatureBatch:
        """A batch from ``{"ids", "img", "img_aug", "txt", "txt_aug"}`` (``(N, D)`` arrays or
        tensors), z-scored with ``stats`` unless it is ``None``."""
        img, img_aug, txt, txt_aug = (
            torch.as_tensor(arrays[k]) for k in ("img", "img_aug", "txt", "txt_aug")
        )
        if stats is not None:
            img, img_aug = stats.apply(img, "image"), stats.apply(img_aug, "image")
            txt, txt_aug = stats.apply(txt, "text"), stats.apply(txt_aug, "text")
        return cls([str(i) for i in arrays["ids"]], img, img_aug, txt, txt_aug)

    def to(self, device: str | torch.device) -> FeatureBatch:
        """The batch with float32 features on ``device``."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.float32)

        return FeatureBatch(
            list(self.ids), mv(self.img), mv(self.img_aug), mv(self.txt), mv(self.txt_aug)
        )


@dataclass(frozen=True)
class FeatureStats:
    """Global scalar z-score per modality: ``(x - mean) / std`` over all feature values.

    As the paper normalises each feature matrix by one scalar mean and standard deviation
    (``ddof = 0``). Fitted on the training features only; the augmented views use the statistics
    of their modality. Saved into bundles (:meth:`to_dict`).
    """

    image_mean: float
    image_std: float
    text_mean: float
    text_std: float

    def __post_init__(self) -> None:
        for mod in ("image", "text"):
            m, s = getattr(self, f"{mod}_mean"), getattr(self, f"{mod}_std")
            if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise ValueError(
                    f"{mod} feature stats need a finite mean and std > 0, got {m}, {s}"
                )

    @staticmethod
    def _moments(x: ArrayLike, name: str) -> tuple[float, float]:
        a = _as_tensor(x, name).detach().to("cpu", torch.float64)
        if a.numel() == 0:
            raise ValueError(f"cannot fit feature stats on empty {name}")
        mean = float(a.mean())
        std = float(a.std(correction=0))
        if not std > 0:
            raise ValueError(f"{name} features are constant (std 0); cannot z-score them")
        return mean, std

    @classmethod
    def fit(cls, image: ArrayLike, text: ArrayLike) -> FeatureStats:
        """Fit on ``(N, D_img)`` training image features and ``(M, D_txt)`` text features."""
        im, istd = cls._moments(image, "image")
        tm, tstd = cls._moments(text, "text")
        return cls(im, istd, tm, tstd)

    @staticmethod
    def partial_moments(x: ArrayLike) -> tuple[float, float, float]:
        """``(count, mean, M2)`` of all values of one chunk of features, in float64.

        Chunks (e.g. the blocks of a dataset) are combined by :meth:`from_partial_moments`,
        so the statistics of a large training set are fitted in one streaming pass.
        """
        a = np.asarray(x, dtype=np.float64).reshape(-1)
        if a.size == 0:
            return 0.0, 0.0, 0.0
        mean = float(a.mean())
        return float(a.size), mean, float(((a - mean) ** 2).sum())

    @staticmethod
    def _combine(parts: Iterable[tuple[float, float, float]], name: str) -> tuple[float, float]:
        # Chan et al.'s pairwise update: exact up to rounding, in any order of the chunks
        n, mean, m2 = 0.0, 0.0, 0.0
        for nb, mb, m2b in parts:
            if nb == 0:
                continue
            delta = mb - mean
            tot = n + nb
            mean += delta * nb / tot
            m2 += m2b + delta * delta * n * nb / tot
            n = tot
        if n == 0:
            raise ValueError(f"cannot fit feature stats on empty {name}")
        return mean, math.sqrt(m2 / n)

    @classmethod
    def from_partial_moments(
        cls,
        image: Iterable[tuple[float, float, float]],
        text: Iterable[tuple[float, float, float]],
    ) -> FeatureStats:
        """The statistics of the union of chunks, from their :meth:`partial_moments`.

        Equal to :meth:`fit` on the concatenated chunks (up to float64 rounding).

        Raises:
            ValueError: no values, or constant values (std 0).
        """
        im, istd = cls._combine(image, "image")
        tm, tstd = cls._combine(text, "text")
        return cls(im, istd, tm, tstd)

    def apply(self, feats: ArrayLike, modality: Modality) -> torch.Tensor:
        """``(N, D)`` features -> ``(N, D)`` float32 normalised features."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        x = _as_tensor(feats, f"{modality} features").to(torch.float32)
        mean, std = (
            (self.image_mean, self.image_std)
            if modality == "image"
            else (self.text_mean, self.text_std)
        )
        return (x - mean) / std

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{"image": {"mean", "std"}, "text": {"mean", "std"}}`` (the bundle format)."""
        return {
            "image": {"mean": self.image_mean, "std": self.image_std},
            "text": {"mean": self.text_mean, "std": self.text_std},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                float(d["image"]["mean"]),
                float(d["image"]["std"]),
                float(d["text"]["mean"]),
                float(d["text"]["std"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"feature stats must look like {{'image': {{'mean', 'std'}}, ...}}: {e}"
            ) from e


def view_for_epoch(epoch: int, views: int) -> int:
    """The augmented view used in epoch ``epoch`` (0-based) when ``views`` are stored per item.

    ``epoch % views``: with ``duch.augment.resample_each_epoch`` the feature stage stores
    ``views_per_item`` independently drawn augmented views of every item and epoch ``e`` trains
    on view ``e % V`` of both modalities; with one view (the paper's fixed copy) always 0.

    Raises:
        ValueError: ``views < 1`` or ``epoch < 0``.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return int(epoch) % int(views)


def _epoch_view(img_aug: AugViews, txt_aug: AugViews, epoch: int) -> tuple[ArrayLike, ArrayLike]:
    """The ``(img_aug, txt_aug)`` matrices of ``epoch``: a list/tuple of views per modality
    selects view :func:`view_for_epoch`; a single matrix is used as is."""
    if isinstance(img_aug, (list, tuple)) and isinstance(txt_aug, (list, tuple)):
        if not img_aug or len(img_aug) != len(txt_aug):
            raise ValueError(
                f"img_aug and txt_aug need the same number (>= 1) of views, got {len(img_aug)} "
                f"and {len(txt_aug)}"
            )
        v = view_for_epoch(epoch, len(img_aug))
        return img_aug[v], txt_aug[v]
    if isinstance(img_aug, (list, tuple)) or isinstance(txt_aug, (list, tuple)):
        raise ValueError("img_aug and txt_aug must both be single matrices or both lists of views")
    return img_aug, txt_aug


def make_batches(
    ids: Sequence[str],
    img: ArrayLike,
    img_aug: AugViews,
    txt: ArrayLike,
    txt_aug: AugViews,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[FeatureBatch]:
    """Shuffled batches of one epoch (a pure function of ``seed`` and ``epoch``).

    Items are shuffled, cut into global batches of ``batch_size``, and each global batch is cut
    into ``world_size`` contiguous shards; this worker gets shard ``rank`` of each. A trailing
    global batch too small to give every worker 2 items (BatchNorm needs 2) joins the previous
    one.

    Args:
        ids: ``N`` item ids; the feature matrices are ``(N, D)`` and aligned with them.
        img_aug, txt_aug: one ``(N, D)`` matrix each (a fixed augmented view per item, as the
            paper), or a list (or tuple) of ``V`` such matrices each, the augmented views
            resampled per epoch: epoch ``e`` uses view ``e % V`` of both
            (:func:`view_for_epoch`).
        batch_size: global batch size (paper: 256).
        seed, epoch: the shuffle is seeded with both.
        rank, world_size: data-parallel position.

    Returns:
        This worker's batches, features as float32 tensors.
    """
    img_aug, txt_aug = _epoch_view(img_aug, txt_aug, epoch)
    n = len(ids)
    mats = [
        _as_tensor(m, name).to(torch.float32)
        for m, name in ((img, "img"), (img_aug, "img_aug"), (txt, "txt"), (txt_aug, "txt_aug"))
    ]
    for m in mats:
        if m.shape[0] != n:
            raise ValueError(f"feature matrices must have {n} rows (one per id), got {m.shape[0]}")
    if batch_size < 2 * world_size:
        raise ValueError(
            f"batch_size {batch_size} is too small for {world_size} workers (2 items each needed)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if n < 2 * world_size:
        raise ValueError(f"{n} items are too few for {world_size} workers (2 items each needed)")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2 * world_size:
        del bounds[-2]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        glob = perm[lo:hi]
        shard = torch.tensor_split(glob, world_size)[rank]
        out.append(FeatureBatch([str(ids[int(i)]) for i in shard], *(m[shard] for m in mats)))
    return out


# --------------------------------------------------------------------------------------------
# model and optimisation
# --------------------------------------------------------------------------------------------


def make_model(image_dim: int, text_dim: int, cfg: DUCHConfig) -> DUCH:
    """A :class:`~duch_core.model.DUCH` model initialised with ``cfg.optim.seed``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.optim.seed)
        return DUCH(image_dim, text_dim, cfg.model.bits, cfg.model.hidden_dim)
    finally:
        torch.random.set_rng_state(state)


class BlockedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose CPU step walks memory once per block instead of once per op.

    torch's Adam (the single-tensor algorithm it uses on the CPU) makes eight passes over every
    parameter, each a separate op over the whole tensor; for the 4096-wide heads the arrays do
    not fit in cache, so the step is bound by memory traffic. This class runs the same ops, in
    the same order and with the same scalars, on consecutive blocks of :attr:`block` elements,
    so a block's parameter, gradient and moments stay in cache between ops. The ops are
    element-wise, so every element goes through the same float32 operations: parameters and
    state are bitwise those of ``torch.optim.Adam`` (tested against it), and ``state_dict`` is
    interchangeable with it.

    The first step (which creates the state), GPU or complex parameters and Adam options other
    than the defaults (``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable``,
    ``differentiable``, ``decoupled_weight_decay``, tensor ``lr`` or betas) use torch's own step.
    """

    block = 1 << 17  # elements: 512 KiB per float32 array, five arrays in L2/L3

    def _blocked_step_applies(self) -> bool:
        for group in self.param_groups:
            if any(
                group.get(k)
                for k in (
                    "amsgrad",
                    "maximize",
                    "foreach",
                    "fused",
                    "capturable",
                    "differentiable",
                    "decoupled_weight_decay",
                )
            ):
                return False
            if isinstance(group["lr"], torch.Tensor) or any(
                isinstance(b, torch.Tensor) for b in group["betas"]
            ):
                return False
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if (
                    p.device.type != "cpu"
                    or p.is_complex()
                    or g.is_sparse
                    or g.dtype != p.dtype
                    or not (p.is_contiguous() and g.is_contiguous())
                    or not self.state.get(p)
                ):
                    return False
        return True

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Adam step (see the class docstring)."""
        if closure is not None or not self._blocked_step_applies():
            adam_step: Any = torch.optim.Adam.step
            if getattr(adam_step, "hooked", False):  # torch wraps it to run the step hooks,
                adam_step = adam_step.__wrapped__  # which this class's own step already ran
            return adam_step(self, closure)  # type: ignore[no-any-return]
        with torch.no_grad():
            self._blocked_step()
        return None

    def _blocked_step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                # the scalars as torch.optim.adam._single_tensor_adam computes them
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                buf_grad, buf_denom = self._scratch(p.dtype)
                param, grad_all = p.view(-1), p.grad.view(-1)
                exp_avg_all, exp_avg_sq_all = (
                    state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1),
                )
                for lo in range(0, param.numel(), self.block):
                    hi = min(param.numel(), lo + self.block)
                    par, grad = param[lo:hi], grad_all[lo:hi]
                    exp_avg, exp_avg_sq = exp_avg_all[lo:hi], exp_avg_sq_all[lo:hi]
                    # torch's ops in torch's order; out= / in-place forms run the same kernels
                    if weight_decay != 0:
                        grad = torch.add(grad, par, alpha=weight_decay, out=buf_grad[: hi - lo])
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = torch.sqrt(exp_avg_sq, out=buf_denom[: hi - lo])
                    denom.div_(bias_correction2_sqrt).add_(eps)
                    par.addcdiv_(exp_avg, denom, value=-step_size)

    def _scratch(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reusable blocks of ``dtype`` (not part of the optimiser's state)."""
        bufs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = self.__dict__.setdefault(
            "_blocks", {}
        )
        if dtype not in bufs:
            bufs[dtype] = (
                torch.empty(self.block, dtype=dtype),
                torch.empty(self.block, dtype=dtype),
            )
        return bufs[dtype]


def make_optimizers(
    model: DUCH, optim_cfg: OptimConfig, reference: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(opt_hash, opt_disc)`` as the paper.

    Hashing heads: Adam, ``lr``, ``weight_decay`` (1e-4, 5e-4), one parameter group per head.
    Discriminator: Adam, ``disc_lr``, betas ``disc_betas``, ``disc_weight_decay``
    (1e-4, (0.5, 0.9), 1e-4).

    The heads' Adam is a :class:`BlockedAdam` (bitwise the same steps as ``torch.optim.Adam``,
    faster on the CPU); ``reference=True`` gives plain ``torch.optim.Adam`` for both.
    """
    hash_adam = torch.optim.Adam if reference else BlockedAdam
    opt_hash = hash_adam(
        [
            {"params": list(model.image_head.parameters())},
            {"params": list(model.text_head.parameters())},
        ],
        lr=optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
    )
    opt_disc = torch.optim.Adam(
        model.discriminator.parameters(),
        lr=optim_cfg.disc_lr,
        betas=tuple(optim_cfg.disc_betas),  # type: ignore[arg-type]
        weight_decay=optim_cfg.disc_weight_decay,
    )
    return opt_hash, opt_disc


def step_lr(opt: torch.optim.Optimizer, epoch: int, optim_cfg: OptimConfig) -> float:
    """The published decay, called after epoch ``epoch`` (0-based) has finished.

    If ``epoch % lr_decay_every == 0``: ``lr = max(lr_decay_factor * lr, min_lr)`` in every
    group. With the defaults this fires after epochs 0 and 50, so epochs 1-50 run at 8e-5 and
    epochs 51-99 at 6.4e-5 (1-based: "from epoch 2" and "from epoch 52").

    Returns:
        The learning rate of the first group for the next epoch.
    """
    every = optim_cfg.lr_decay_every
    if every > 0 and epoch % every == 0:
        for group in opt.param_groups:
            group["lr"] = max(group["lr"] * optim_cfg.lr_decay_factor, optim_cfg.min_lr)
    return float(opt.param_groups[0]["lr"])


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
) -> dict[str, float]:
    """One epoch over ``batches``; refreshes ``table`` at the end.

    With ``cfg.paper_compat`` the augmented caption is replaced by the caption itself (the
    published ``txt2 = txt1``), the published NT-Xent and the text-only generator term are used;
    the text head then computes its first layer once for both
    (:meth:`~duch_core.model.HashHead.forward_twice`, bitwise the same as two calls).

    Args:
        model: heads and discriminator (moved to ``device`` by the caller).
        batches: this worker's batches (e.g. :func:`make_batches`); every batch needs 2+ items.
        opt_hash, opt_disc: from :func:`make_optimizers`.
        table: the code table holding every training id.
        cfg: the full config (``loss``, ``paper_compat``).
        epoch: 0-based epoch number (reported).
        gather: the data-parallel group, or ``None`` for a single process.
        device: where to compute.
        reference: compute the caption codes of ``paper_compat`` with two plain calls of the
            text head (the straightforward form the fast path is tested against; same results).

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
        if not cfg.paper_compat:
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
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DUCH loss in epoch {epoch}: {float(loss)}")
        loss.backward()
        if gather is not None:
            sync_gradients(model.hash_parameters(), gather, average=False)
        opt_hash.step()

        table.record(batch.ids, h_v1.detach(), h_v2.detach(), h_t1.detach(), h_t2.detach())
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
    x = _as_tensor(feats, f"{modality} features")
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
        )
        rec["next_lr"] = step_lr(opt_hash, epoch, cfg.optim)
        last = epoch == epochs - 1
        due = eval_every > 0 and (epoch + 1) % eval_every == 0
        if query is not None and database is not None and (last or due):
            for key, v in evaluate(model, query, database, k).items():
                rec[f"map_{key}"] = v
        history.append(rec)
        log.info("%s", epoch_line(rec, epochs, k))
        if on_epoch is not None:
            on_epoch(rec)
    return history
