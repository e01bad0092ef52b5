"""Data-parallel collectives for DUCH training, isolated from the training loop.

The contrastive terms need every code of the *global* batch: each worker gathers the codes of
all workers with :func:`gather_with_grad`, keeping the gradient only through its own slice (the
other slices are constants). Every worker then computes the same global contrastive loss; the
gradient that reaches worker ``w``'s codes is exactly the slice ``w`` of the single-process
gradient, so **summing** the parameter gradients across workers (:func:`sync_gradients`) gives
the single-process gradient of a batch of ``N x B/N`` items. (Wrapping the heads in
DistributedDataParallel instead would *average* them and is not used.)

A :class:`Collective` is the small set of operations the loop needs. :class:`TorchCollective`
implements it over ``torch.distributed``; tests substitute a fake one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "Collective",
    "TorchCollective",
    "average_buffers",
    "broadcast_parameters",
    "default_collective",
    "gather_with_grad",
    "sync_gradients",
]


class Collective(Protocol):
    """Operations over a group of ``world_size`` workers; this worker is ``rank``."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's ``x`` (rows may differ between workers; columns may not), no gradient."""
        ...

    def all_reduce_sum_(self, x: torch.Tensor) -> None:
        """Sum ``x`` over the workers, in place."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every worker's picklable ``obj``, ordered by rank."""
        ...

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``x`` with worker ``src``'s value, in place."""
        ...


class TorchCollective:
    """:class:`Collective` over the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call init_process_group first"
            )
        self._dist = dist

    @property
    def world_size(self) -> int:
        return int(self._dist.get_world_size())

    @property
    def rank(self) -> int:
        return int(self._dist.get_rank())

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = x
        if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
            pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
            padded = torch.cat([x, pad], dim=0)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(out, padded)
        return [t[:c] for t, c in zip(out, counts, strict=True)]

    def all_reduce_sum_(self, x: torch.Tensor) -> None:
        self._dist.all_reduce(x, op=self._dist.ReduceOp.SUM)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> None:
        self._dist.broadcast(x, src=src)


def default_collective() -> Collective | None:
    """A :class:`TorchCollective` when ``torch.distributed`` is initialised with 2+ workers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return None


def gather_with_grad(x: torch.Tensor, collective: Collective | None = None) -> torch.Tensor:
    """Concatenate every worker's ``x`` in rank order, keeping the gradient of the local slice.

    Args:
        x: ``(n_w, ...)`` local rows; ``n_w`` may differ between workers.
        collective: the group (default: :func:`default_collective`).

    Returns:
        ``(sum_w n_w, ...)``; the rows of this worker are ``x`` itself (gradients flow), the others
        are constants. Without a group of 2+ workers, ``x`` unchanged.
    """
    group = collective if collective is not None else default_collective()
    if group is None or group.world_size == 1:
        return x
    parts: list[torch.Tensor] = list(group.all_gather(x.detach()))
    parts[group.rank] = x
    return torch.cat(parts, dim=0)


def sync_gradients(
    params: Iterable[nn.Parameter], collective: Collective, average: bool = False
) -> None:
    """Sum (or average) the gradients of ``params`` over the workers, in one flat all-reduce.

    A parameter without a gradient counts as a zero gradient, so every worker sends the same
    layout.
    """
    ps = [p for p in params if p.requires_grad]
    if not ps:
        return
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in ps if p.grad is not None])
    collective.all_reduce_sum_(flat)
    if average:
        flat /= collective.world_size
    offset = 0
    for p in ps:
        assert p.grad is not None
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average_buffers(module: nn.Module, collective: Collective) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the workers."""
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    collective.all_reduce_sum_(flat)
    flat /= collective.world_size
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def broadcast_parameters(module: nn.Module, collective: Collective, src: int = 0) -> None:
    """Make every worker's parameters and buffers equal to worker ``src``'s."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            collective.broadcast_(t.data, src)
