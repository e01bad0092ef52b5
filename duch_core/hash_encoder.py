"""Images and captions to hash codes with a loaded model bundle (:class:`HashEncoder`).

The bundle format, its content hash and loading are :mod:`duch_core.bundle`; this module runs
the bundle's frozen backbones and hashing heads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from duch_core import codes
from duch_core.bundle import Bundle, BundleError, covered_backbones, tower_digest


class HashEncoder:
    """Images and captions to packed hash codes with a bundle's backbones and heads.

    The towers are rebuilt from ``bundle.config`` alone (on first use) and put on the bundle's
    device. Features are z-scored with the bundle's global statistics when it has them, then
    passed through the hashing heads in eval mode; codes are packed by :func:`codes.pack`.

    Args:
        bundle: a loaded bundle.
        batch_size: largest batch per backbone forward pass.
    """

    def __init__(self, bundle: Bundle, batch_size: int = 64) -> None:
        self.bundle = bundle
        self.bits = bundle.bits
        self.batch_size = max(1, int(batch_size))
        self._image_tower: Any = None
        self._text_tower: Any = None
        self._lock = threading.Lock()  # towers are built once even under concurrent first calls

    @property
    def image_tower(self) -> Any:
        """The :class:`~duch_core.backbones.ImageTower` (built on first access)."""
        with self._lock:
            if self._image_tower is None:
                from duch_core.backbones import load_image_tower

                tower = load_image_tower(self.bundle.config.image_backbone)
                self._check_dim("image", tower.dim)
                self._check_weights("image", tower)
                self._image_tower = tower.to(self.bundle.device).eval()
        return self._image_tower

    @property
    def text_tower(self) -> Any:
        """The :class:`~duch_core.backbones.TextTower` (built on first access)."""
        with self._lock:
            if self._text_tower is None:
                from duch_core.backbones import load_text_tower

                cfg = self.bundle.config
                tower = load_text_tower(cfg.text_backbone, paper_compat=cfg.paper_compat)
                self._check_dim("text", tower.dim)
                self._check_weights("text", tower)
                self._text_tower = tower.to(self.bundle.device).eval()
        return self._text_tower

    def _check_dim(self, modality: str, dim: int) -> None:
        want = int(self.bundle.meta[f"{modality}_dim"])
        if dim != want:
            raise BundleError(
                f"bundle {self.bundle.uri}: its {modality} backbone gives {dim}-d features but the "
                f"heads expect {want}-d; the backbone source changed since the bundle was made"
            )

    def _check_weights(self, modality: str, tower: Any) -> None:
        recorded = covered_backbones(self.bundle.meta)
        if recorded is None:  # a bundle from before backbone digests: nothing to compare
            return
        want = str(recorded.get(modality, {}).get("sha256", ""))
        got = tower_digest(tower)
        if got != want:
            raise BundleError(
                f"bundle {self.bundle.uri}: its {modality} backbone "
                f"{recorded.get(modality, {}).get('source', '?')!r} now loads weights "
                f"{got[:16]}..., the bundle was made with {want[:16]}...; the backbone changed "
                "since (a hub model updated, a checkpoint overwritten). Restore those weights or "
                "train and export a new bundle."
            )

    def _codes(self, feats: Any, modality: str) -> torch.Tensor:
        model = self.bundle.model
        x = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats)
        if x.ndim != 2 or x.shape[1] != int(self.bundle.meta[f"{modality}_dim"]):
            raise BundleError(
                f"{modality} features must be (N, {self.bundle.meta[f'{modality}_dim']}), "
                f"got {tuple(x.shape)}"
            )
        x = x.to(device=self.bundle.device, dtype=torch.float32)
        stats = self.bundle.feature_stats
        if stats is not None:
            x = (x - stats[modality]["mean"]) / stats[modality]["std"]
        head = model.image_head if modality == "image" else model.text_head
        head.eval()
        with torch.inference_mode():
            return head(x).float().cpu()

    def image_codes_from_features(self, feats: Any) -> torch.Tensor:
        """``(N, image_dim)`` features -> ``(N, bits)`` float32 continuous codes in ``(-1, 1)``."""
        return self._codes(feats, "image")

    def text_codes_from_features(self, feats: Any) -> torch.Tensor:
        """``(N, text_dim)`` features -> ``(N, bits)`` float32 continuous codes in ``(-1, 1)``."""
        return self._codes(feats, "text")

    def image_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded ``(H, W, 3)`` uint8 pictures -> ``(N, image_dim)`` float32 features."""
        from duch_core.imageio import preprocess

        cfg = self.bundle.config.image_backbone
        out = []
        for s in range(0, len(images), self.batch_size):
            px = np.stack([preprocess(im, cfg) for im in images[s : s + self.batch_size]])
            out.append(self.pixel_features(px))
        if not out:
            return torch.zeros(0, int(self.bundle.meta["image_dim"]))
        return torch.cat(out)

    def pixel_features(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(N, 3, S, S)`` float32 pixels -> ``(N, image_dim)`` float32 features.

        ``pixels`` are :func:`duch_core.imageio.preprocess` outputs; one tower call for all N.
        """
        x = torch.as_tensor(pixels).to(device=self.bundle.device, dtype=torch.float32)
        tower = self.image_tower
        with torch.inference_mode():
            return tower(x).float().cpu()

    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed ``(N, 3, S, S)`` float32 pixels -> ``(N, bits // 8)`` uint8 packed codes."""
        if len(pixels) == 0:
            return np.zeros((0, self.bits // 8), np.uint8)
        return codes.pack(self.image_codes_from_features(self.pixel_features(pixels)))

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> ``(N, text_dim)`` float32 features (cleaned as the bundle's config says)."""
        if isinstance(texts, str):
            raise BundleError("encode_texts expects a list of captions, got one string")
        tower = self.text_tower
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                out.append(tower(list(texts[s : s + self.batch_size])).float().cpu())
        if not out:
            return torch.zeros(0, int(self.bundle.meta["text_dim"]))
        return torch.cat(out)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded ``(H, W, 3)`` uint8 pictures -> ``(N, bits)`` float32 continuous codes in
        ``(-1, 1)``: the query side of asymmetric ranking (:mod:`duch_core.asymmetric`);
        :func:`codes.pack` of them is :meth:`encode_images`."""
        if len(images) == 0:
            return np.zeros((0, self.bits), np.float32)
        return self.image_codes_from_features(self.image_features(images)).numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> ``(N, bits)`` float32 continuous codes (see :meth:`embed_images`)."""
        if len(texts) == 0:
            return np.zeros((0, self.bits), np.float32)
        return self.text_codes_from_features(self.text_features(texts)).numpy()

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded ``(H, W, 3)`` uint8 pictures -> ``(N, bits // 8)`` uint8 packed codes.

        Raises:
            ImageDecodeError: a picture is not ``(H, W, 3)`` uint8.
        """
        if len(images) == 0:
            return np.zeros((0, self.bits // 8), np.uint8)
        return codes.pack(self.embed_images(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> ``(N, bits // 8)`` uint8 packed codes.

        Raises:
            CaptionError: a caption is empty once cleaned or too long.
        """
        if len(texts) == 0:
            return np.zeros((0, self.bits // 8), np.uint8)
        return codes.pack(self.embed_texts(texts))
