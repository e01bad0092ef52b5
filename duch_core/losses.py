"""DUCH loss terms, each its own function, combined with explicit weights in :func:`duch_loss`.

Every hashing-network term is a **sum over the batch** (not a mean), as the published code: the
weights ``alpha = 0.01``, ``beta = 0.001``, ``gamma = 0.01`` are relative to sums. The
discriminator loss is a mean over the batch, also as published.

Codes ``h`` are the continuous ``tanh`` outputs of the hashing heads: ``(N, K)`` float in
``(-1, 1)``. ``b`` holds the ``±1`` targets of the batch rows from the code table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from duch_core.config import LossConfig
from duch_core.negatives import Negatives

__all__ = [
    "adversarial_discriminator_loss",
    "adversarial_generator_loss",
    "adversarial_generator_loss_published",
    "bit_balance_loss",
    "duch_loss",
    "gradient_penalty",
    "nt_xent",
    "nt_xent_published",
    "quantization_loss",
]

# Denominator guard of the published NT-Xent (kept in the published form only).
_PUBLISHED_EPS = 1e-6


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{name} expects two (N, K) code matrices of the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{name} needs at least one pair, got an empty batch")


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature tau must be a positive finite number, got {tau!r}")


def nt_xent(
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float = 1.0,
    extra: Negatives | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """NT-Xent (SimCLR) over the ``2N`` codes of two aligned views, summed over all ``2N`` rows.

    Row ``i`` of ``a`` and row ``i`` of ``b`` are a positive pair; every other code of either view
    is a negative. With ``z = normalize([a; b])`` and ``s_ij = z_i . z_j / tau``::

        L = - sum_{i=1..2N} [ s_{i,p(i)} - log sum_{j != i} exp(s_ij) ]

    where ``p(i)`` is the partner of ``i``. The self-similarity is removed with a mask, so the
    loss is exact for every ``tau`` (the positive stays in the denominator, as the paper).

    Args:
        a: ``(N, K)`` float codes of the first view.
        b: ``(N, K)`` float codes of the second view, aligned with ``a``.
        tau: temperature (paper: 1).
        extra: more negatives for every row (:class:`duch_core.negatives.Negatives`, e.g. the
            codes of recent batches); normalised like the codes, no gradient.
        rows: ``(N,)`` training rows of the pairs' items; an ``extra`` code of the same item as
            a pair is left out of that pair's rows (required with ``extra``).

    Returns:
        Scalar tensor, ``>= 0`` up to rounding (``0`` when ``N = 1`` and no ``extra``).
    """
    _check_pair(a, b, "nt_xent")
    _check_tau(tau)
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b], dim=0), dim=1)
    logits = z @ z.T / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    if extra is not None and len(extra):
        if rows is None or rows.shape != (n,):
            raise ValueError(f"nt_xent with extra negatives needs the ({n},) rows of the pairs")
        e = F.normalize(extra.codes.detach().to(z.dtype), dim=1)
        same = torch.cat([rows, rows])[:, None] == extra.rows[None, :]
        logits = torch.cat([logits, (z @ e.T / tau).masked_fill(same, float("-inf"))], dim=1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    positives = logits[torch.arange(2 * n, device=z.device), partner]
    return -(positives - torch.logsumexp(logits, dim=1)).sum()


def nt_xent_published(a: torch.Tensor, b: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """NT-Xent exactly as the published code computes it (``paper_compat``).

    The self-similarity is removed by subtracting ``e`` from each row sum, which is exact only
    for ``tau = 1`` (``exp(1 / tau) = e``); for any other ``tau`` this form is wrong, which is why
    :func:`nt_xent` is the default. A ``1e-6`` guard is added to the denominator::

        neg_i = sum_j exp(s_ij) - e
        L = - sum_i log( exp(cos(a_i, b_i) / tau) / (neg_i + 1e-6) )

    Args and returns as :func:`nt_xent`.
    """
    _check_pair(a, b, "nt_xent_published")
    _check_tau(tau)
    z = F.normalize(torch.cat([a, b], dim=0), dim=1)
    sim = torch.exp(z @ z.T / tau)
    neg = sim.sum(dim=1) - math.e
    pos = torch.exp(F.cosine_similarity(a, b, dim=1) / tau)
    pos = torch.cat([pos, pos], dim=0)
    return -torch.log(pos / (neg + _PUBLISHED_EPS)).sum()


def gradient_penalty(
    disc: nn.Module,
    h_real: torch.Tensor,
    h_fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty ``mean((||grad_x D(x)||_2 - 1)^2)`` on random interpolates.

    ``x = u * h_real + (1 - u) * h_fake`` with ``u ~ U(0, 1)`` drawn per element (``(N, K)``, as
    the published code). The inputs are detached; the penalty's gradient reaches only ``disc``.

    Args:
        disc: maps ``(N, K)`` codes to ``(N,)`` logits.
        h_real, h_fake: ``(N, K)`` float codes.
        generator: source of ``u`` (default: torch's global generator).

    Returns:
        Scalar tensor.
    """
    h_real = h_real.detach()
    h_fake = h_fake.detach()
    u = torch.rand(h_real.shape, generator=generator, dtype=h_real.dtype).to(h_real.device)
    x = (u * h_real + (1.0 - u) * h_fake).requires_grad_(True)
    out = disc(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.norm(2, dim=1) - 1.0) ** 2).mean()


def adversarial_discriminator_loss(
    disc: nn.Module,
    h_real: torch.Tensor,
    h_fake: torch.Tensor,
    gp_weight: float = 10.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Discriminator loss: BCE with text codes "real" and image codes "fake", plus the penalty.

    ``L_D = mean(-log s(D(h_real))) + mean(-log(1 - s(D(h_fake)))) + gp_weight * GP``
    (``s`` = sigmoid). Both inputs are detached: this loss trains only the discriminator.

    Args:
        disc: maps ``(N, K)`` codes to ``(N,)`` logits.
        h_real: ``(N, K)`` text codes (label 1).
        h_fake: ``(N, K)`` image codes (label 0).
        gp_weight: weight of :func:`gradient_penalty` (paper: 10).
        generator: source of the interpolation weights.

    Returns:
        Scalar tensor.
    """
    _check_pair(h_real, h_fake, "adversarial_discriminator_loss")
    h_real = h_real.detach()
    h_fake = h_fake.detach()
    real_logits = disc(h_real)
    fake_logits = disc(h_fake)
    bce = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if gp_weight == 0:
        return bce
    return bce + gp_weight * gradient_penalty(disc, h_real, h_fake, generator)


def adversarial_generator_loss(disc: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator term: push codes ``h`` towards "real", summed over the batch.

    ``L = sum_i -log s(D(h_i))``. Applied to image codes (the "fake" class) this makes image codes
    indistinguishable from text codes; gradients reach the head that produced ``h`` (and the
    discriminator, whose optimiser does not step on them).

    Args:
        disc: maps ``(N, K)`` codes to ``(N,)`` logits.
        h: ``(N, K)`` float codes.

    Returns:
        Scalar tensor ``>= 0``.
    """
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError(f"adversarial_generator_loss expects (N, K) codes, got {tuple(h.shape)}")
    return F.softplus(-disc(h)).sum()  # softplus(-x) = -log(sigmoid(x)), stable


def adversarial_generator_loss_published(
    disc: nn.Module, h_t1: torch.Tensor, h_t2: torch.Tensor
) -> torch.Tensor:
    """The published generator term (``paper_compat``): applied to the **text** codes.

    ``L = sum_i [-log s(D(h_t1_i)) - log s(D(h_t2_i))]``. Text codes are already the "real"
    class, so no adversarial gradient reaches the image head.
    """
    return adversarial_generator_loss(disc, h_t1) + adversarial_generator_loss(disc, h_t2)


def quantization_loss(hs: Sequence[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """``sum_x ||b - h_x||_F^2`` over the code matrices ``hs`` (each ``(N, K)``).

    Args:
        hs: continuous codes, e.g. ``(h_v1, h_v2, h_t1, h_t2)``.
        b: ``(N, K)`` ``±1`` targets (treated as constants).

    Returns:
        Scalar tensor ``>= 0``.
    """
    if not hs:
        raise ValueError("quantization_loss needs at least one code matrix")
    target = b.detach().to(hs[0].dtype)
    total = hs[0].new_zeros(())
    for h in hs:
        if h.shape != target.shape:
            raise ValueError(
                f"quantization_loss: codes {tuple(h.shape)} and targets {tuple(target.shape)} differ"
            )
        total = total + ((target - h) ** 2).sum()
    return total


def bit_balance_loss(hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_x sum_i (sum_k h_x[i, k])^2``: each code should have as many +1 as -1 bits.

    Args:
        hs: continuous codes, each ``(N, K)``.

    Returns:
        Scalar tensor ``>= 0``.
    """
    if not hs:
        raise ValueError("bit_balance_loss needs at least one code matrix")
    total = hs[0].new_zeros(())
    for h in hs:
        if h.ndim != 2:
            raise ValueError(f"bit_balance_loss expects (N, K) codes, got {tuple(h.shape)}")
        total = total + (h.sum(dim=1) ** 2).sum()
    return total


def duch_loss(
    h_v1: torch.Tensor,
    h_v2: torch.Tensor,
    h_t1: torch.Tensor,
    h_t2: torch.Tensor,
    b: torch.Tensor,
    disc: nn.Module,
    cfg: LossConfig,
    paper_compat: bool = False,
    contrastive_codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    negatives: tuple[Negatives, Negatives] | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hashing-network objective ``L_C + alpha L_adv + beta L_Q + gamma L_BB``.

    ``L_C = w_inter NT(v1, t1) + w_intra_image NT(v1, v2) + w_intra_text NT(t1, t2)``.
    ``L_adv`` is :func:`adversarial_generator_loss` on both image views (the corrected form: the
    published docstring names image codes as the arguments) or, with ``paper_compat``,
    :func:`adversarial_generator_loss_published` on the text codes (also with
    ``cfg.generator == "text"``). With ``paper_compat`` or ``cfg.contrast == "published"`` the
    contrastive terms use :func:`nt_xent_published`.

    Args:
        h_v1, h_v2: ``(N, K)`` image codes (original, augmented view).
        h_t1, h_t2: ``(N, K)`` text codes (original, augmented caption).
        b: ``(N, K)`` ``±1`` targets of these rows from the code table.
        disc: the discriminator (logits).
        cfg: weights and temperature (the exact NT-Xent takes
            :meth:`~duch_core.config.LossConfig.temperature` of the code length, the published
            form ``cfg.tau`` itself).
        paper_compat: reproduce the published loss (see above), whatever ``cfg`` says.
        contrastive_codes: ``(v1, v2, t1, t2)`` to use in the contrastive terms instead of the
            local codes: the codes gathered across data-parallel workers
            (:func:`duch_core.distributed.gather_with_grad`), ``(M, K)`` each with ``M >= N``.
        negatives: ``(image, text)`` extra negatives (``loss.queue_size``): the image term
            gets the image ones, the text term the text ones, the image-text term both. Only
            with the exact NT-Xent.
        rows: training rows of the contrastive codes' items (``(M,)``), with ``negatives``.

    Returns:
        ``(total, parts)``: the scalar loss to minimise, and the detached terms ``inter``,
        ``intra_image``, ``intra_text``, ``contrastive``, ``adversarial``, ``quantization``,
        ``bit_balance``, ``total`` (unweighted except ``contrastive`` and ``total``).
    """
    for name, h in (("h_v2", h_v2), ("h_t1", h_t1), ("h_t2", h_t2), ("b", b)):
        if h.shape != h_v1.shape:
            raise ValueError(
                f"duch_loss: {name} has shape {tuple(h.shape)}, h_v1 {tuple(h_v1.shape)}"
            )
    cv1, cv2, ct1, ct2 = (
        contrastive_codes if contrastive_codes is not None else (h_v1, h_v2, h_t1, h_t2)
    )
    published = paper_compat or cfg.contrast == "published"
    # the published form is exact only at one temperature (its ``- e``), so only the exact
    # NT-Xent follows the code length
    tau = cfg.tau if published else cfg.temperature(h_v1.shape[1])
    if published:
        if negatives is not None:
            raise ValueError("extra negatives need the exact NT-Xent (loss.contrast: exact)")
        inter = nt_xent_published(cv1, ct1, tau)
        intra_image = nt_xent_published(cv1, cv2, tau)
        intra_text = nt_xent_published(ct1, ct2, tau)
    else:
        q_img, q_txt = negatives if negatives is not None else (None, None)
        both = Negatives.join(q_img, q_txt) if q_img is not None and q_txt is not None else None
        inter = nt_xent(cv1, ct1, tau, both, rows)
        intra_image = nt_xent(cv1, cv2, tau, q_img, rows)
        intra_text = nt_xent(ct1, ct2, tau, q_txt, rows)
    l_c = cfg.w_inter * inter + cfg.w_intra_image * intra_image + cfg.w_intra_text * intra_text
    if paper_compat or cfg.generator == "text":
        l_adv = adversarial_generator_loss_published(disc, h_t1, h_t2)
    else:
        l_adv = adversarial_generator_loss(disc, h_v1) + adversarial_generator_loss(disc, h_v2)
    hs = (h_v1, h_v2, h_t1, h_t2)
    l_q = quantization_loss(hs, b)
    l_bb = bit_balance_loss(hs)
    total = l_c + cfg.alpha * l_adv + cfg.beta * l_q + cfg.gamma * l_bb
    parts = {
        "inter": inter,
        "intra_image": intra_image,
        "intra_text": intra_text,
        "contrastive": l_c,
        "adversarial": l_adv,
        "quantization": l_q,
        "bit_balance": l_bb,
        "total": total,
    }
    return total, {k: v.detach() for k, v in parts.items()}
