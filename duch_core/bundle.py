"""Model bundles: everything needed to turn images and captions into hash codes, content-addressed.

A bundle is a directory (local or ``s3://``) with three files, written in this order:

* ``heads.pt``: ``torch.save`` of the :class:`~duch_core.model.DUCH` state dict (both hashing
  heads and the discriminator);
* ``config.json``: the full resolved :class:`~duch_core.config.DUCHConfig` (``config.to_dict``),
  so the backbones and preprocessing are rebuilt from the bundle alone;
* ``meta.json`` (last: a bundle without it is incomplete): ``format``, ``bundle_id``, ``bits``,
  ``bitorder`` ("big"), ``image_dim``, ``text_dim``, ``hidden_dim``, ``feature_stats``
  (``{"image": {"mean", "std"}, "text": {...}}`` or null), ``backbones`` (the digest of each
  frozen backbone's weights, :func:`backbone_digests`), ``created`` (UTC ISO time), ``metrics``,
  ``hash_covers``.

``bundle_id`` is the SHA-256 of a canonical encoding of the weights (every tensor's name, dtype,
shape and bytes, in name order), the config (sorted-key JSON) and the meta fields that change
what the codes are (format, bits, bitorder, dims, feature stats, backbone digests).
:meth:`Bundle.load` recomputes it and refuses a bundle whose files were changed after saving;
:class:`duch_core.hash_encoder.HashEncoder` recomputes each backbone's digest when it builds
the tower and refuses a backbone whose weights are not the ones the bundle was made with (a hub
model updated in place, a checkpoint directory overwritten), so one bundle id always means the
same codes. ``created`` and ``metrics`` are descriptive and not covered. Bundles written before
the backbone digests existed list what their id covers in ``hash_covers`` and still load.

Bundles are referenced by id: :func:`pin_bundle` copies a bundle, verified, to an immutable
``<dir>/<bundle id>/`` (the encode job pins into ``<index root>/bundles/``), so an index can name
a location whose content never changes, whatever happens to the mutable URI it was given.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from duch_core import codes, storage
from duch_core.config import ConfigError, DUCHConfig, ImageBackboneConfig, from_dict, to_dict
from duch_core.model import DUCH

FORMAT = "duch-bundle/1"
HEADS_FILE = "heads.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
LEGACY_HASH_COVERS = (
    "weights",
    "config",
    "format",
    "bits",
    "bitorder",
    "image_dim",
    "text_dim",
    "hidden_dim",
    "feature_stats",
)
"""What the ids of bundles written before backbone digests existed cover."""

HASH_COVERS = (*LEGACY_HASH_COVERS, "backbones")


class BundleError(ValueError):
    """A bundle is missing, incomplete, inconsistent or was modified after saving."""


# --------------------------------------------------------------------------------------------
# content hash
# --------------------------------------------------------------------------------------------


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _update_with_state(h: Any, state: Mapping[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def content_hash(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    covers: Sequence[str] = HASH_COVERS,
) -> str:
    """SHA-256 hex digest of weights, config and the code-defining meta fields (module docstring).

    ``covers`` names the meta fields included (a bundle's own ``hash_covers``).
    """
    h = hashlib.sha256()
    h.update(FORMAT.encode() + b"\0")
    _update_with_state(h, state)
    h.update(b"\0config\0" + _canonical_json(config))
    covered = {k: meta.get(k) for k in covers if k not in ("weights", "config")}
    h.update(b"\0meta\0" + _canonical_json(covered))
    return h.hexdigest()


def tower_digest(tower: Any) -> str:
    """SHA-256 of a backbone tower's weights (every tensor of its model's state dict) and, for a
    text tower, its tokenizer's vocabulary and lower-casing: what makes its features."""
    h = hashlib.sha256()
    _update_with_state(h, tower.model.state_dict())
    tok = getattr(tower, "tokenizer", None)
    if tok is not None:
        vocab = sorted(tok.get_vocab().items())
        h.update(b"\0tokenizer\0" + type(tok).__name__.encode())
        h.update(_canonical_json([vocab, getattr(tok, "do_lower_case", None)]))
    return h.hexdigest()


def backbone_digests(cfg: DUCHConfig) -> dict[str, dict[str, str]]:
    """``{"image": {"source", "sha256"}, "text": {...}}``: the backbones ``cfg`` names, hashed.

    Builds both towers (from the local caches: nothing is downloaded).

    Raises:
        BundleError: a backbone cannot be loaded here.
    """
    from duch_core.backbones import BackboneError, load_image_tower, load_text_tower

    try:
        image = load_image_tower(cfg.image_backbone)
        text = load_text_tower(cfg.text_backbone, paper_compat=cfg.paper_compat)
    except BackboneError as e:
        raise BundleError(
            f"cannot hash the backbones for the bundle id ({e}); export the bundle where the "
            "backbones load (the nodes that extracted the features), or pass backbones="
        ) from e
    return {
        "image": {"source": cfg.image_backbone.source, "sha256": tower_digest(image)},
        "text": {"source": cfg.text_backbone.source, "sha256": tower_digest(text)},
    }


def normalize_feature_stats(stats: Any) -> dict[str, dict[str, float]] | None:
    """Feature statistics as ``{"image": {"mean", "std"}, "text": {"mean", "std"}}`` floats.

    Accepts ``None``, that nested mapping, a flat mapping (``image_mean``, ``image_std``,
    ``text_mean``, ``text_std``), or an object with ``to_dict()`` or dataclass fields giving one
    of those.

    Raises:
        BundleError: missing modality, non-finite mean, non-positive std.
    """
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        if hasattr(stats, "to_dict"):
            stats = stats.to_dict()
        elif dataclasses.is_dataclass(stats) and not isinstance(stats, type):
            stats = dataclasses.asdict(stats)
        else:
            raise BundleError(f"feature_stats must be a mapping, got {type(stats).__name__}")
    out: dict[str, dict[str, float]] = {}
    for mod in ("image", "text"):
        node = stats.get(mod)
        if isinstance(node, Mapping):
            mean, std = node.get("mean"), node.get("std")
        else:
            mean, std = stats.get(f"{mod}_mean"), stats.get(f"{mod}_std")
        try:
            m, s = float(mean), float(std)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise BundleError(f"feature_stats needs a numeric mean and std for {mod!r}") from e
        if not math.isfinite(m) or not math.isfinite(s) or s <= 0:
            raise BundleError(
                f"feature_stats[{mod!r}] must have finite mean and std > 0, got {m}, {s}"
            )
        out[mod] = {"mean": m, "std": s}
    return out


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def save_bundle(
    uri: str,
    model: DUCH,
    cfg: DUCHConfig,
    feature_stats: Any = None,
    metrics: Mapping[str, Any] | None = None,
    backbones: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """Write a bundle directory at ``uri`` (local path or ``s3://`` prefix).

    Args:
        uri: bundle directory; existing files of the same names are replaced.
        model: trained heads; ``model.bits`` must equal ``cfg.model.bits``.
        cfg: the resolved configuration the model was trained with.
        feature_stats: global z-score statistics per modality (see
            :func:`normalize_feature_stats`), or ``None`` when features are not normalised.
        metrics: evaluation results to record (JSON-serialisable).
        backbones: the backbones' digests (:func:`backbone_digests`); computed here (both
            towers are built) when ``None``.

    Returns:
        The bundle id (SHA-256 hex of the content).

    Raises:
        BundleError: inconsistent model and config, bad feature stats, non-JSON metrics, or a
            backbone that cannot be loaded to be hashed.
    """
    if not isinstance(cfg, DUCHConfig):
        raise BundleError(f"cfg must be a DUCHConfig, got {type(cfg).__name__}")
    bits = codes.check_bits(int(model.bits))
    if bits != cfg.model.bits:
        raise BundleError(f"model has {bits} bits but cfg.model.bits is {cfg.model.bits}")
    stats = normalize_feature_stats(feature_stats)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    config = to_dict(cfg)
    first_linear: Any = model.image_head.net[0]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "bits": bits,
        "bitorder": codes.BITORDER,
        "image_dim": int(model.image_head.in_dim),
        "text_dim": int(model.text_head.in_dim),
        "hidden_dim": int(first_linear.out_features),
        "feature_stats": stats,
        "backbones": json.loads(
            json.dumps(dict(backbones) if backbones is not None else backbone_digests(cfg))
        ),
    }
    bundle_id = content_hash(state, config, meta)
    try:
        metrics_json = json.loads(json.dumps(dict(metrics or {}), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise BundleError(f"metrics must be JSON-serialisable (finite numbers): {e}") from e
    meta = {
        "bundle_id": bundle_id,
        **meta,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "metrics": metrics_json,
        "hash_covers": list(HASH_COVERS),
        "torch_version": torch.__version__,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(uri, HEADS_FILE), buf.getvalue())
    storage.write_json(storage.join(uri, CONFIG_FILE), config)
    storage.write_json(storage.join(uri, META_FILE), meta)
    return bundle_id


def save_untrained_bundle(uri: str, cfg: DUCHConfig, seed: int = 0) -> str:
    """Write a bundle of ``cfg``'s backbones with seeded, untrained hashing heads at ``uri``.

    The codes are deterministic for a seed but carry no learned meaning: for smoke deployments,
    tests and benchmarks of the encode and serve paths.

    Returns:
        The bundle id (see :func:`save_bundle`).
    """
    from duch_core.backbones import load_image_tower, load_text_tower

    image = load_image_tower(cfg.image_backbone)
    text = load_text_tower(cfg.text_backbone, paper_compat=cfg.paper_compat)
    digests = {
        "image": {"source": cfg.image_backbone.source, "sha256": tower_digest(image)},
        "text": {"source": cfg.text_backbone.source, "sha256": tower_digest(text)},
    }
    torch.manual_seed(seed)
    model = DUCH(image.dim, text.dim, cfg.model.bits, cfg.model.hidden_dim).eval()
    return save_bundle(uri, model, cfg, None, {}, backbones=digests)


def _read_file(uri: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, name))
    except FileNotFoundError as e:
        hint = " (the bundle is incomplete: meta.json is written last)" if name == META_FILE else ""
        raise BundleError(f"bundle {uri}: {name} not found{hint}") from e


def _read_json_files(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta.json`` and ``config.json`` of a bundle, with the meta fields checked."""
    return _parse_json_files(uri, _read_file(uri, META_FILE), _read_file(uri, CONFIG_FILE))


def _parse_json_files(
    uri: str, meta_bytes: bytes, config_bytes: bytes
) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        meta = json.loads(meta_bytes)
        config_dict = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {uri}: malformed JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise BundleError(f"bundle {uri}: meta.json format {found!r} is not {FORMAT!r}")
    missing = [
        k
        for k in ("bundle_id", "bits", "bitorder", "image_dim", "text_dim", "hidden_dim")
        if k not in meta
    ]
    if missing:
        raise BundleError(f"bundle {uri}: meta.json lacks {missing}")
    if meta["bitorder"] != codes.BITORDER:
        raise BundleError(
            f"bundle {uri}: bit order {meta['bitorder']!r}, expected {codes.BITORDER!r}"
        )
    if not isinstance(config_dict, dict):
        raise BundleError(f"bundle {uri}: config.json must hold a JSON object")
    return meta, config_dict


def _parse_config(uri: str, config_dict: Mapping[str, Any]) -> DUCHConfig:
    try:
        return from_dict(DUCHConfig, config_dict)
    except ConfigError as e:
        raise BundleError(f"bundle {uri}: config.json does not load: {e}") from e


@dataclasses.dataclass(frozen=True)
class BundleMeta:
    """What a bundle's ``meta.json`` and ``config.json`` say, read without loading the weights.

    Attributes:
        uri: the bundle directory.
        bundle_id: content hash recorded at saving (verified only by :meth:`Bundle.load`).
        bits: code length.
        image_dim, text_dim: feature widths the hashing heads take.
        config: the resolved :class:`DUCHConfig` (backbones, preprocessing).
        backbones: the backbone digests the id covers, or ``None`` for a bundle written
            before they existed (its id then does not cover the backbone weights).
    """

    uri: str
    bundle_id: str
    bits: int
    image_dim: int
    text_dim: int
    config: DUCHConfig
    backbones: dict[str, Any] | None = None

    @property
    def image_backbone(self) -> ImageBackboneConfig:
        """Image tower, preprocessing and decoding rule (bands, bit depth) of the bundle."""
        return self.config.image_backbone


def read_meta(uri: str) -> BundleMeta:
    """Read a bundle's identity and configuration (two small JSON files, no weights).

    For planning work before the model is needed (which items to re-encode, how to decode
    images); :meth:`Bundle.load` reads the same files and also verifies the content hash.

    Raises:
        BundleError: a file is missing or malformed, wrong format or bit order, bad config.
    """
    meta, config_dict = _read_json_files(uri)
    return BundleMeta(
        uri=uri,
        bundle_id=str(meta["bundle_id"]),
        bits=codes.check_bits(int(meta["bits"])),
        image_dim=int(meta["image_dim"]),
        text_dim=int(meta["text_dim"]),
        config=_parse_config(uri, config_dict),
        backbones=covered_backbones(meta),
    )


def _covers(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The meta fields a bundle's id covers (its own ``hash_covers``; legacy list if absent)."""
    covers = meta.get("hash_covers")
    if isinstance(covers, list) and all(isinstance(c, str) for c in covers):
        return tuple(covers)
    return LEGACY_HASH_COVERS


def covered_backbones(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The backbone digests a bundle's ``meta.json`` records and its id covers, else ``None``
    (a bundle from before the digests existed)."""
    found = meta.get("backbones")
    if "backbones" in _covers(meta) and isinstance(found, dict):
        return dict(found)
    return None


def _verified_state(
    uri: str, meta: Mapping[str, Any], config_dict: Mapping[str, Any], heads: bytes
) -> dict[str, torch.Tensor]:
    """The heads' state dict, after checking the content hash against ``bundle_id``."""
    try:
        state = torch.load(io.BytesIO(heads), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(
            f"bundle {uri}: {HEADS_FILE} is unreadable: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise BundleError(f"bundle {uri}: {HEADS_FILE} does not hold a state dict")
    actual = content_hash(state, config_dict, meta, _covers(meta))
    if actual != meta["bundle_id"]:
        raise BundleError(
            f"bundle {uri} failed its integrity check: content hash {actual[:16]}... differs "
            f"from bundle_id {str(meta['bundle_id'])[:16]}...; heads.pt, config.json or "
            "meta.json was modified after saving (or replaced while being read). Re-export the "
            "bundle."
        )
    return state


def pin_bundle(uri: str, pinned_root: str) -> BundleMeta:
    """Copy the bundle at ``uri`` to the immutable ``<pinned_root>/<bundle id>/``, verified.

    The three files are read once, the content hash is checked on those bytes and the same
    bytes are written (``meta.json`` last), so the copy is exactly the bundle that was checked
    even if ``uri`` (a mutable ``.../current``) is replaced meanwhile. A copy that exists
    already is kept as it is. The returned meta's ``uri`` is the pinned location.

    Raises:
        BundleError: missing or malformed files, or a failed integrity check.
    """
    meta_bytes = _read_file(uri, META_FILE)
    config_bytes = _read_file(uri, CONFIG_FILE)
    heads = _read_file(uri, HEADS_FILE)
    meta, config_dict = _parse_json_files(uri, meta_bytes, config_bytes)
    _verified_state(uri, meta, config_dict, heads)
    bundle_id = str(meta["bundle_id"])
    dest = storage.join(pinned_root, bundle_id)
    try:
        existing = read_meta(dest)
    except BundleError:
        existing = None
    if existing is None or existing.bundle_id != bundle_id:
        storage.write_bytes(storage.join(dest, HEADS_FILE), heads)
        storage.write_bytes(storage.join(dest, CONFIG_FILE), config_bytes)
        storage.write_bytes(storage.join(dest, META_FILE), meta_bytes)
    return BundleMeta(
        uri=dest,
        bundle_id=bundle_id,
        bits=codes.check_bits(int(meta["bits"])),
        image_dim=int(meta["image_dim"]),
        text_dim=int(meta["text_dim"]),
        config=_parse_config(uri, config_dict),
        backbones=covered_backbones(meta),
    )


class Bundle:
    """A loaded, verified bundle.

    Attributes:
        uri: where it was read from.
        config: the resolved :class:`DUCHConfig`.
        meta: the parsed ``meta.json``.
        bundle_id: content hash (verified).
        bits: code length.
        model: :class:`DUCH` in eval mode on ``device``.
        feature_stats: ``{"image": {"mean", "std"}, "text": {...}}`` or ``None``.
    """

    def __init__(
        self,
        uri: str,
        config: DUCHConfig,
        meta: dict[str, Any],
        model: DUCH,
        feature_stats: dict[str, dict[str, float]] | None,
    ) -> None:
        self.uri = uri
        self.config = config
        self.meta = meta
        self.model = model
        self.feature_stats = feature_stats
        self.bundle_id: str = str(meta["bundle_id"])
        self.bits: int = int(meta["bits"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu") -> Bundle:
        """Read and verify the bundle at ``uri``.

        Raises:
            BundleError: a file is missing or malformed, the config does not load, the weights
                do not fit the recorded shapes, or the content hash differs from ``bundle_id``
                (the bundle was modified after saving).
        """
        meta, config_dict = _read_json_files(uri)
        state = _verified_state(uri, meta, config_dict, _read_file(uri, HEADS_FILE))
        config = _parse_config(uri, config_dict)
        bits = codes.check_bits(int(meta["bits"]))
        model = DUCH(int(meta["image_dim"]), int(meta["text_dim"]), bits, int(meta["hidden_dim"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BundleError(f"bundle {uri}: weights do not fit the recorded shapes: {e}") from e
        model.to(device).eval()
        return cls(uri, config, meta, model, normalize_feature_stats(meta.get("feature_stats")))
