"""DUCH hashing heads and discriminator (architecture exactly as the paper's code).

image/text head: Linear(D -> 4096) -> BatchNorm1d -> ReLU -> Linear(4096 -> K) -> Tanh
discriminator:   Linear(K -> 2K) -> BatchNorm1d -> ReLU -> Linear(2K -> 1)   (a logit)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from duch_core.codes import check_bits


class _KnownLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose value ``out`` is already known.

    Forward returns a copy of ``out``; backward gives ``weight`` and ``bias`` the gradients that
    autograd gives them through ``F.linear`` of a 2-D ``x`` (``addmm(bias, x, weight.t())``):
    ``grad.t() @ x`` and the sum of ``grad`` over rows, the same kernels on the same operands,
    so the result is bitwise the same as a second ``F.linear`` call.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (
            grad.mm(weight) if need_x else None,
            grad.t().mm(x) if need_w else None,
            grad.sum(0, keepdim=True).view(-1) if need_b else None,
            None,
        )


class HashHead(nn.Module):
    """Maps backbone features to continuous codes in ``(-1, 1)``.

    Args:
        in_dim: feature dimension ``D``.
        bits: code length ``K``.
        hidden_dim: width of the hidden layer (paper: 4096).
    """

    def __init__(self, in_dim: int, bits: int, hidden_dim: int = 4096) -> None:
        super().__init__()
        check_bits(bits)
        self.in_dim = in_dim
        self.bits = bits
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, bits),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` float -> ``(N, K)`` float in ``(-1, 1)``."""
        return self.net(x)

    def forward_twice(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x), self(x))`` with the first layer computed once.

        For the published code's caption views, which are the same features
        (``paper_compat``). In training mode the two passes are still two passes for
        everything but the ``D -> hidden`` product: BatchNorm updates its running statistics
        twice and the gradients of the two codes flow back separately, so codes, buffers and
        parameter gradients are bitwise those of two calls (tested); only the largest matrix
        product is not repeated.

        Args:
            x: ``(N, D)`` float features.

        Returns:
            Two ``(N, K)`` code tensors with equal values.
        """
        first_layer = self.net[0]
        if not (
            self.training
            and x.dim() == 2
            and isinstance(first_layer, nn.Linear)
            and first_layer.bias is not None
            and first_layer.weight.is_contiguous()
        ):
            return self(x), self(x)
        rest = self.net[1:]
        z = first_layer(x)
        first = rest(z)
        again = _KnownLinear.apply(x, first_layer.weight, first_layer.bias, z.detach())
        return first, rest(again)


class Discriminator(nn.Module):
    """Tells text codes ("real", label 1) from image codes ("fake", label 0). Returns logits."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(bits, 2 * bits),
            nn.BatchNorm1d(2 * bits),
            nn.ReLU(inplace=True),
            nn.Linear(2 * bits, 1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` codes -> ``(N,)`` logits."""
        return self.net(h).squeeze(-1)


class DUCH(nn.Module):
    """The trainable part of DUCH: two hashing heads and the discriminator.

    Args:
        image_dim: image feature dimension (ResNet-18: 512, MobileNetV2: 1280).
        text_dim: text feature dimension (BERT-base: 768, MiniLM: 384).
        bits: code length ``K``.
        hidden_dim: hidden width of the heads.
    """

    def __init__(self, image_dim: int, text_dim: int, bits: int, hidden_dim: int = 4096) -> None:
        super().__init__()
        self.bits = bits
        self.image_head = HashHead(image_dim, bits, hidden_dim)
        self.text_head = HashHead(text_dim, bits, hidden_dim)
        self.discriminator = Discriminator(bits)

    def hash_parameters(self) -> list[nn.Parameter]:
        return [*self.image_head.parameters(), *self.text_head.parameters()]
