"""Query encoding: the batched encoder deployment, and how the ingress reaches an encoder.

Text and image queries become packed hash codes, in batches (``@serve.batch``). The ingress
either calls the :class:`QueryEncoder` deployment or runs a :class:`BatchedEncoder` itself
(``encode_in_ingress``); :func:`connect_encoder` gives both the same call shapes.

An answer carries the packed code and, when the bundle's encoder gives it, the continuous code
(the hash head's ``tanh`` outputs) that asymmetric ranking needs (:mod:`duch_core.asymmetric`).

Every answer names the bundle that made the code, and a caller may name the bundle it expects:
the encoder refuses a query for another bundle, and the ingress refuses (503) an answer from
another bundle than the one its index version was built with, so codes of two models are
never compared (a redeployed encoder with a new bundle, before the index is re-encoded).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from deploy.artifacts import LoadedEncoder, Loaders
from deploy.retry import retry_unavailable

log = logging.getLogger("ray.serve")

#: ``(packed code (bits // 8,) uint8 | None, error | None, continuous code (bits,) float32 |
#: None)``.
EncodeResult = tuple[np.ndarray | None, str | None, np.ndarray | None]
#: ``(code | None, error | None, bundle id of the encoder that answered, continuous | None)``.
Answer = tuple[np.ndarray | None, str | None, str, np.ndarray | None]


def _results(out: Any) -> list[EncodeResult]:
    """An encoder's batch output as results: float rows are continuous codes (packed here),
    uint8 rows packed codes already."""
    from duch_core import codes as codes_mod

    a = np.asarray(out)
    if a.dtype.kind == "f":
        cont = np.ascontiguousarray(a, dtype=np.float32)
        packed = codes_mod.pack(cont)
        return [(packed[i], None, cont[i]) for i in range(a.shape[0])]
    packed = np.asarray(a, dtype=np.uint8)
    return [(packed[i], None, None) for i in range(a.shape[0])]


def _encode(fn: Any, items: list[Any]) -> list[EncodeResult]:
    try:
        return _results(fn(items))
    except Exception:
        if len(items) == 1:
            raise
    out: list[EncodeResult] = []
    for item in items:
        try:
            out.append(_results(fn([item]))[0])
        except Exception as e:  # reported to that query's caller only
            out.append((None, f"{type(e).__name__}: {e}", None))
    return out


def encode_batch(fn: Any, items: list[Any]) -> list[EncodeResult]:
    """``fn`` on a batch: one :data:`EncodeResult` per item. ``fn`` returns continuous codes
    ``(N, bits)`` float (then both codes are given) or packed ones ``(N, bits // 8)`` uint8.

    A batch that fails is retried item by item, so one bad query never fails the others.
    """
    try:
        return _encode(fn, items)
    except Exception as e:
        return [(None, f"{type(e).__name__}: {e}", None)]


def _embed(encoder: Any, modality: str) -> Any:
    """The encoder's continuous-code function for ``modality`` (``embed_texts``/
    ``embed_images``), or its packed one when it has none."""
    name = "texts" if modality == "text" else "images"
    return getattr(encoder, f"embed_{name}", None) or getattr(encoder, f"encode_{name}")


def warm_up(loaded: LoadedEncoder) -> None:
    """Build the towers and run one query through each, so the first real query is not slow
    (the towers are built lazily, and the first forward pass allocates its buffers)."""
    loaded.encoder.encode_texts(["warm up"])
    loaded.encoder.encode_images([np.zeros((64, 64, 3), np.uint8)])


def open_query_encoder(
    bundle_uri: str, torch_threads: int = 0, loaders: Loaders | None = None
) -> LoadedEncoder:
    """Load a bundle for query encoding: torch threads set, towers built and warmed up."""
    import torch  # heavy: only inside a replica

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    loaded = (loaders or Loaders()).open_encoder(bundle_uri)
    warm_up(loaded)
    return loaded


class BatchedEncoder:
    """Encodes single queries, grouped into batches by ``@serve.batch``.

    Used by the :class:`QueryEncoder` deployment and, with ``encode_in_ingress``, by the ingress
    itself. Each call takes one query and returns ``(code, error)``: ``code`` is the
    ``(bits // 8,)`` uint8 packed code, or ``None`` with ``error`` saying why the query could not
    be encoded (for instance a text that is empty once cleaned). A batch that fails is retried
    item by item so one bad query never fails the others. The forward pass runs in a worker
    thread, so the caller's event loop keeps serving. The continuous code comes with it when
    the encoder has ``embed_texts``/``embed_images`` (:class:`duch_core.hash_encoder.HashEncoder`).
    """

    def __init__(
        self, loaded: LoadedEncoder, max_batch_size: int = 16, batch_wait_s: float = 0.001
    ) -> None:
        self.loaded = loaded
        for method in (self.encode_text, self.encode_image):
            batched: Any = method  # the setters come from @serve.batch; mypy sees the function
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_text(self, texts: list[str]) -> list[EncodeResult]:
        """Batched: one text in, one :data:`EncodeResult` out."""
        return await asyncio.to_thread(encode_batch, _embed(self.loaded.encoder, "text"), texts)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode_image(self, images: list[np.ndarray]) -> list[EncodeResult]:
        """Batched: one ``(H, W, 3)`` uint8 image in, one :data:`EncodeResult` out."""
        return await asyncio.to_thread(encode_batch, _embed(self.loaded.encoder, "image"), images)


def encoder_info(loaded: LoadedEncoder, bundle_uri: str) -> dict[str, Any]:
    """Bundle id, code length, bundle location and the bundle's resolved config."""
    return {
        "bundle_id": loaded.bundle_id,
        "bits": loaded.bits,
        "bundle_uri": bundle_uri,
        "config": loaded.config,
    }


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class QueryEncoder:
    """Runs the bundle's backbones and hashing heads on query batches (see
    :class:`BatchedEncoder` for what a call takes and returns).

    Args:
        bundle_uri: model bundle directory.
        max_batch_size: largest batch per forward pass.
        batch_wait_s: how long a batch waits to fill.
        torch_threads: intra-op threads for torch (0 keeps Ray's setting).
        loaders: how the bundle is read.
    """

    def __init__(
        self,
        bundle_uri: str,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.001,
        torch_threads: int = 0,
        loaders: Loaders | None = None,
    ) -> None:
        self.loaded = open_query_encoder(bundle_uri, torch_threads, loaders)
        self.bundle_uri = bundle_uri
        self.batched = BatchedEncoder(self.loaded, max_batch_size, batch_wait_s)
        log.info("query encoder ready: bundle %s, %d bits", self.loaded.bundle_id, self.loaded.bits)

    def info(self) -> dict[str, Any]:
        """Bundle id, code length and the bundle's resolved config."""
        return encoder_info(self.loaded, self.bundle_uri)

    def _refuse(self, bundle_id: str | None) -> Answer | None:
        own = self.loaded.bundle_id
        if bundle_id is not None and bundle_id != own:
            log.error("query encoder: asked for bundle %s, holds %s: refused", bundle_id, own)
            return None, f"the encoder holds bundle {own}, not {bundle_id}", own, None
        return None

    async def encode_text(self, text: str, bundle_id: str | None = None) -> Answer:
        """One text in, an :data:`Answer` out (batched); refused when ``bundle_id`` names
        another bundle than the one held."""
        refused = self._refuse(bundle_id)
        if refused is not None:
            return refused
        return _answer(await self.batched.encode_text(text), self.loaded.bundle_id)

    async def encode_image(self, image: np.ndarray, bundle_id: str | None = None) -> Answer:
        """One ``(H, W, 3)`` uint8 image in, an :data:`Answer` out."""
        refused = self._refuse(bundle_id)
        if refused is not None:
            return refused
        return _answer(await self.batched.encode_image(image), self.loaded.bundle_id)


def _answer(res: EncodeResult, bundle_id: str) -> Answer:
    code, err, cont = res
    return code, err, bundle_id, cont


@dataclass(frozen=True)
class EncoderClient:
    """How the ingress encodes one query: each call takes the query and the bundle id it
    expects and returns an :data:`Answer`, whether the encoder runs in this process or in a
    deployment. ``image_cfg`` is the bundle's image preprocessing (for reduced decoding), or
    ``None`` when unknown."""

    encode_text: Callable[[str, str], Awaitable[Answer]]
    encode_image: Callable[[np.ndarray, str], Awaitable[Answer]]
    bits: int
    bundle_id: str
    image_cfg: Any = None


def image_config(config: dict[str, Any]) -> Any:
    """The bundle config's ``image_backbone`` as an ``ImageBackboneConfig`` (``None`` if absent
    or unreadable: the ingress then decodes query images at full size)."""
    from duch_core.config import ImageBackboneConfig, from_dict

    section = (config or {}).get("image_backbone")
    if not isinstance(section, dict):
        return None
    try:
        return from_dict(ImageBackboneConfig, section)
    except Exception:
        return None


async def connect_encoder(
    handle: Any | None,
    bundle_uri: str | None,
    torch_threads: int = 0,
    batch_max_size: int = 16,
    batch_wait_s: float = 0.001,
    loaders: Loaders | None = None,
) -> EncoderClient:
    """The :class:`QueryEncoder` deployment behind ``handle``, or with no handle, the bundle at
    ``bundle_uri`` loaded into this process (a blocking load, run in a worker thread).

    Calls to a deployment are retried on another replica when the one called is gone
    (:func:`deploy.retry.retry_unavailable`): encoding is idempotent.

    Raises:
        ValueError: neither a handle nor a bundle URI.
    """
    if handle is None:
        if not bundle_uri:
            raise ValueError("the ingress encodes queries itself but names no bundle_uri")
        loaded = await asyncio.to_thread(open_query_encoder, bundle_uri, torch_threads, loaders)
        local = BatchedEncoder(loaded, batch_max_size, batch_wait_s)
        own = loaded.bundle_id

        async def text_local(text: str, bundle_id: str) -> Answer:
            if bundle_id != own:
                return None, f"the encoder holds bundle {own}, not {bundle_id}", own, None
            return _answer(await local.encode_text(text), own)

        async def image_local(image: np.ndarray, bundle_id: str) -> Answer:
            if bundle_id != own:
                return None, f"the encoder holds bundle {own}, not {bundle_id}", own, None
            return _answer(await local.encode_image(image), own)

        return EncoderClient(text_local, image_local, loaded.bits, own, image_config(loaded.config))
    info = await retry_unavailable(handle.info.remote)

    async def text_remote(text: str, bundle_id: str) -> Answer:
        return tuple(await retry_unavailable(handle.encode_text.remote, text, bundle_id))  # type: ignore[return-value]

    async def image_remote(image: np.ndarray, bundle_id: str) -> Answer:
        return tuple(await retry_unavailable(handle.encode_image.remote, image, bundle_id))  # type: ignore[return-value]

    return EncoderClient(
        text_remote,
        image_remote,
        int(info["bits"]),
        str(info["bundle_id"]),
        image_config(info.get("config") or {}),
    )
