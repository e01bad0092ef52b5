"""DUCH hashing heads and discriminator (architecture exactly as the paper's code).

image/text head: Linear(D -> 4096) -> BatchNorm1d -> ReLU -> Linear(4096 -> K) -> Tanh
discriminator:   Linear(K -> 2K) -> BatchNorm1d -> ReLU -> Linear(2K -> 1)   (a logit)
"""

from __future__ import annotations

import torch
from torch import nn

from duch_core.codes import check_bits


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
