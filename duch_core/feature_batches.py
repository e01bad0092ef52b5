"""Training inputs: feature normalisation and the shuffled batches of an epoch.

:class:`FeatureStats` z-scores each modality with one scalar mean and standard deviation fitted
on the training features (streamed in chunks on a cluster) and is saved into bundles;
:class:`FeatureBatch` is one batch of ``N`` items with four views each; :func:`make_batches`
cuts an epoch into this worker's batches, a pure function of the seed and the epoch, with the
augmented views resampled per epoch when several are stored (:func:`view_for_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "FeatureBatch",
    "FeatureStats",
    "as_feature_matrix",
    "make_batches",
    "view_for_epoch",
]

Modality = Literal["image", "text"]
ArrayLike = torch.Tensor | np.ndarray
# one augmented-view matrix, or the views resampled per epoch (see make_batches)
AugViews = ArrayLike | list[ArrayLike] | tuple[ArrayLike, ...]


def as_feature_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as an ``(N, D)`` floating-point tensor (no copy when it already is one).

    Raises:
        ValueError: not two-dimensional, or not floating point; the message names ``name``.
    """
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) feature matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must hold floating-point features, got {t.dtype}")
    return t


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
        a = as_feature_matrix(x, name).detach().to("cpu", torch.float64)
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
        x = as_feature_matrix(feats, f"{modality} features").to(torch.float32)
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
        as_feature_matrix(m, name).to(torch.float32)
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
