"""The two per-batch steps of feature extraction: decode + augment, then the frozen towers.

Both map Arrow tables to Arrow tables, so a Ray Data stage and a plain loop run the same code:

1. :func:`decode_batch` (CPU): fetch and decode each image, build the original view and every
   augmented view, clean the caption and rewrite it for each view. Every random choice comes
   from :func:`duch_core.augment.item_rngs`, so the views are fixed per item and view index.
2. :class:`FeatureEncoder` (one instance per worker, towers loaded once): image tower on every
   view, text tower on the caption and every rewritten caption, output in the feature-set
   format of :mod:`duch_core.features`.

A failing item never fails the batch: it keeps its row with zero features and ``error_stage``
/ ``error_reason`` set.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from duch_core import chip_io, storage
from duch_core.augment import augment_caption, augment_image, item_rngs
from duch_core.config import AugmentConfig, ImageBackboneConfig, TextBackboneConfig
from duch_core.features import aug_columns, fixed_size_list, list_to_numpy, view_count, view_name
from duch_core.imageio import clean_caption, decode_image, decode_options, preprocess


def _fetch(
    uris: list[str], bands: list[Any], threads: int, decode: dict[str, Any]
) -> list[tuple[bytes | np.ndarray | None, str, str]]:
    """``(data, stage, reason)`` per item: image bytes, or a chip (:mod:`duch_core.chip_io`)
    already read and decoded to its picture with the ``decode`` options."""

    def one(i: int) -> tuple[bytes | np.ndarray | None, str, str]:
        uri = uris[i]
        if chip_io.is_chip_uri(uri):
            try:
                return chip_io.decode_chip({"image_uri": uri, "bands": bands[i]}, **decode), "", ""
            except chip_io.SceneError as e:
                return None, ("fetch" if chip_io.is_transient(e) else "decode"), str(e)
            except ValueError as e:
                return None, "decode", str(e)
        try:
            return storage.read_bytes(uri), "", ""
        except Exception as e:  # any storage failure is this item's error, not the job's
            return None, "fetch", f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        return list(pool.map(one, range(len(uris))))


def pixels(batch: pa.Table, column: str, image_size: int) -> np.ndarray:
    """A pixel column of :func:`decode_batch`'s output as ``(N, 3, S, S)`` float32."""
    return list_to_numpy(batch.column(column)).reshape(-1, 3, image_size, image_size)


def decode_batch(
    batch: pa.Table,
    image_cfg: ImageBackboneConfig,
    text_cfg: TextBackboneConfig,
    augment_cfg: AugmentConfig,
    io_threads: int = 8,
    max_pixels: int = 1 << 26,
) -> pa.Table:
    """Manifest rows -> the preprocessed views and the captions of every item.

    Args:
        batch: :func:`duch_core.features.manifest_rows` rows: ``item_id``, ``image_uri``,
            ``caption`` (null when the item has none), ``caption_index``, ``label``, ``split``.

    Returns:
        The metadata columns, ``caption_aug``, ``pixels`` and ``pixels_aug`` (flattened
        ``(3, S, S)`` float32 per row, read back with :func:`pixels`; zeros for failed items) and
        the error columns; with ``V`` augmented views (:func:`~duch_core.features.view_count`)
        also ``caption_aug_<v>`` and ``pixels_aug_<v>`` for ``v = 1 .. V-1``.
    """
    n = batch.num_rows
    s = image_cfg.image_size
    ids = batch.column("item_id").to_pylist()
    captions = batch.column("caption").to_pylist()
    views = view_count(augment_cfg)
    px = np.zeros((n, 3 * s * s), np.float32)
    px_aug = np.zeros((views, n, 3 * s * s), np.float32)
    cap_out: list[str] = [""] * n
    cap_aug: list[list[str]] = [[""] * n for _ in range(views)]
    stage: list[str] = [""] * n
    reason: list[str] = [""] * n
    opts = decode_options(image_cfg)
    bands = batch.column("bands").to_pylist() if "bands" in batch.column_names else [None] * n
    fetched = _fetch(
        batch.column("image_uri").to_pylist(),
        bands,
        io_threads,
        {"max_pixels": max_pixels, **opts},
    )
    for i, (item, (data, err_stage, err)) in enumerate(zip(ids, fetched, strict=True)):
        rngs = [item_rngs(augment_cfg.seed, item, v) for v in range(views)]
        try:
            if captions[i] is None:
                raise ValueError("the item has no captions")
            cap_out[i] = clean_caption(captions[i], text_cfg)
            for v, (_, txt_rng) in enumerate(rngs):
                if augment_cfg.text_method == "rule":
                    cap_aug[v][i] = clean_caption(augment_caption(cap_out[i], txt_rng), text_cfg)
                else:  # "none", or back-translated later by the encoder
                    cap_aug[v][i] = cap_out[i]
        except ValueError as e:
            stage[i], reason[i] = "caption", str(e)
            continue
        if data is None:
            stage[i], reason[i] = err_stage, err
            continue
        try:
            if isinstance(data, np.ndarray):
                img = data
            else:
                img = decode_image(data, max_pixels=max_pixels, **opts)
        except ValueError as e:
            stage[i], reason[i] = "decode", str(e)
            continue
        try:
            px[i] = preprocess(img, image_cfg).reshape(-1)
            for v, (img_rng, _) in enumerate(rngs):
                aug = augment_image(img, augment_cfg.image_preset, img_rng)
                px_aug[v, i] = preprocess(aug, image_cfg).reshape(-1)
        except ValueError as e:
            stage[i], reason[i] = "augment", str(e)
    out: dict[str, Any] = {
        "item_id": pa.array(ids, pa.string()),
        "label": batch.column("label"),
        "split": batch.column("split"),
        "caption_index": batch.column("caption_index"),
        "caption": pa.array(cap_out, pa.string()),
    }
    for v in range(views):
        out[view_name("caption_aug", v)] = pa.array(cap_aug[v], pa.string())
    out["pixels"] = fixed_size_list(px)
    for v in range(views):
        out[view_name("pixels_aug", v)] = fixed_size_list(px_aug[v])
    out["error_stage"] = pa.array(stage, pa.string())
    out["error_reason"] = pa.array(reason, pa.string())
    return pa.table(out)


class FeatureEncoder:
    """Runs the frozen towers on :func:`decode_batch` output; the towers are loaded once.

    Uses CUDA when this process sees a GPU, else the CPU. With ``text_method: backtranslate``
    the captions are back-translated here first (greedy decoding, so every caption view is then
    the same).
    """

    def __init__(
        self,
        image_cfg: ImageBackboneConfig,
        text_cfg: TextBackboneConfig,
        augment_cfg: AugmentConfig,
        paper_compat: bool,
        batch_size: int = 32,
        torch_threads: int = 0,
    ) -> None:
        import torch

        from duch_core.backbones import load_image_tower, load_text_tower

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.image_size = image_cfg.image_size
        self.image_tower = load_image_tower(image_cfg).to(self.device).eval()
        self.text_tower = (
            load_text_tower(text_cfg, paper_compat=paper_compat).to(self.device).eval()
        )
        self.batch_size = max(1, batch_size)
        self.views = view_count(augment_cfg)
        self.translator = None
        if augment_cfg.text_method == "backtranslate":
            from duch_core.augment import BackTranslator

            self.translator = BackTranslator(list(augment_cfg.backtranslation_models))

    def _images(self, px: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(px), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(px[s : s + self.batch_size]))
                out.append(self.image_tower(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.image_tower.dim), np.float32)

    def _texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                out.append(self.text_tower(texts[s : s + self.batch_size]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.text_tower.dim), np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        views = range(self.views)
        stage = [str(x) for x in batch.column("error_stage").to_pylist()]
        reason = [str(x) for x in batch.column("error_reason").to_pylist()]
        caps = [str(x) for x in batch.column("caption").to_pylist()]
        caps_aug = [
            [str(x) for x in batch.column(view_name("caption_aug", v)).to_pylist()] for v in views
        ]
        img = np.zeros((n, self.image_tower.dim), np.float32)
        img_aug = [np.zeros_like(img) for _ in views]
        txt = np.zeros((n, self.text_tower.dim), np.float32)
        txt_aug = [np.zeros_like(txt) for _ in views]
        ok = [i for i in range(n) if not stage[i]]
        if self.translator is not None and ok:
            translated = self.translator([caps[i] for i in ok])
            for i, t in zip(ok, translated, strict=True):
                for v in views:
                    caps_aug[v][i] = t
        good: list[int] = []
        try:  # text first; on failure item by item, so one bad caption fails one item
            if ok:
                txt[ok] = self._texts([caps[i] for i in ok])
                for v in views:
                    txt_aug[v][ok] = self._texts([caps_aug[v][i] for i in ok])
            good = ok
        except ValueError:
            for i in ok:
                try:
                    txt[i] = self._texts([caps[i]])[0]
                    for v in views:
                        txt_aug[v][i] = self._texts([caps_aug[v][i]])[0]
                    good.append(i)
                except ValueError as e:
                    stage[i], reason[i] = "text", str(e)
        if good:
            img[good] = self._images(pixels(batch, "pixels", self.image_size)[good])
            for v in views:
                px = pixels(batch, view_name("pixels_aug", v), self.image_size)
                img_aug[v][good] = self._images(px[good])

        out: dict[str, Any] = {
            "item_id": batch.column("item_id").cast(pa.string()),
            "label": batch.column("label").cast(pa.string()),
            "split": batch.column("split").cast(pa.string()),
            "caption_index": batch.column("caption_index").cast(pa.int32()),
            "caption": pa.array(caps, pa.string()),
        }
        for v in views:
            out[view_name("caption_aug", v)] = pa.array(caps_aug[v], pa.string())
        out["img"] = fixed_size_list(img)
        for v in views:
            out[aug_columns(v)[0]] = fixed_size_list(img_aug[v])
        out["txt"] = fixed_size_list(txt)
        for v in views:
            out[aug_columns(v)[1]] = fixed_size_list(txt_aug[v])
        out["error_stage"] = pa.array(stage, pa.string())
        out["error_reason"] = pa.array(reason, pa.string())
        return pa.table(out)
