"""The optimisers of DUCH training and the published learning-rate decay.

:func:`make_optimizers` builds the paper's two Adam optimisers (hashing heads, discriminator);
the heads' one is a :class:`BlockedAdam`, bitwise the same steps as ``torch.optim.Adam`` and
faster on the CPU. :func:`step_lr` applies the decay after an epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from duch_core.config import OptimConfig
from duch_core.model import DUCH

__all__ = ["BlockedAdam", "make_optimizers", "step_lr"]


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
