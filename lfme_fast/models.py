"""Backbones for lfme_fast, written without torchvision.

Three families:

* ImageNet-style ResNets (``resnet10``, ``resnet50``, ``resnet152``). Module and parameter names are
  identical to torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1..layer4`` made of
  ``BasicBlock``/``Bottleneck`` with ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/.1``,
  ``fc``), so a torchvision or timm ``state_dict`` loads with ``strict=True``. The Bottleneck puts the
  stride on the 3x3 conv (torchvision's "ResNet v1.5"). ResNet-10 is LFME's ImageNet-LT backbone
  (BasicBlock, ``[1, 1, 1, 1]``, 7x7 stem + max-pool, trained from scratch).
* ``resnet32``: the CIFAR ResNet-32 of the LDAM code (3 stages of 5 BasicBlocks, widths 16/32/64,
  3x3 stem, option-A parameter-free shortcut, kaiming-normal init, optional normalised-linear
  classifier). Parameter names follow the LDAM code (classifier is ``linear``) so its checkpoints load.
* ``resnet_small28``: a small, CPU-fast ResNet for 28x28 inputs (Fashion-MNIST-LT).

``MultiExpert`` (end of the module) wraps any of them into M experts for ECL (shared early stages
optional, two classifiers and a contrastive head per expert); its interface differs (structured
output, ``inference_logits``), the paragraph below is about the single backbones.

Every model maps ``(N, 3, H, W)`` to logits with ``forward``, exposes ``forward_features`` (the pooled
feature vector, ``(N, feature_dim)``), the attribute ``feature_dim``, and ``classifier`` (the final
head module, whatever its attribute name). The head is a linear layer or, with
``build_model(..., classifier="cosine")``, a :class:`CosineClassifier` (CBD's: L2-normalised features
and class weights, fixed scale, no bias), on every backbone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "CifarBasicBlock",
    "NormedLinear",
    "CosineClassifier",
    "CLASSIFIERS",
    "ResNetCifar",
    "SmallResNet28",
    "resnet10",
    "resnet50",
    "resnet152",
    "resnet32",
    "resnet_small28",
    "MODELS",
    "build_model",
    "LoadReport",
    "load_pretrained",
    "count_parameters",
    "MultiExpert",
    "MultiExpertOutput",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Backbone(nn.Module):
    """Shared interface: ``forward = classifier(forward_features)``.

    Subclasses set ``feature_dim``, ``classifier_name`` (the attribute holding the head, used by
    ``load_pretrained`` to recognise classifier keys) and implement ``forward_features``.
    """

    feature_dim: int
    classifier_name: str = "fc"

    @property
    def classifier(self) -> nn.Module:
        """The final classification head (``fc`` or ``linear`` depending on the family)."""
        return getattr(self, self.classifier_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, H, W)``."""
        return self.classifier(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# ImageNet-style ResNet (torchvision-compatible names)
# ---------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; names as in torchvision."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with expansion 4; names as in torchvision (v1.5 stride placement)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(_Backbone):
    """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages (strides 1, 2, 2, 2), global average
    pool, linear ``fc``.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: output width of ``fc``.
        in_chans: input channels (3 for RGB).
        zero_init_residual: zero the last BN gamma of each block (off by default, like torchvision).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        *,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        _check_num_classes(num_classes)
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 512 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes)

        # Same initialisation as torchvision so from-scratch runs (ResNet-10 on ImageNet-LT) compare.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, feature_dim)`` (after ``avgpool``, before ``fc``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet10(num_classes: int = 1000, **kw: Any) -> ResNet:
    """ResNet-10 (BasicBlock, [1, 1, 1, 1]): LFME's ImageNet-LT backbone, 512-d features."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes, **kw)


def resnet50(num_classes: int = 1000, **kw: Any) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]), torchvision layout; 2048-d features."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kw)


def resnet152(num_classes: int = 1000, **kw: Any) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]), torchvision layout; LFME's Places-LT backbone."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, **kw)


# ---------------------------------------------------------------------------------------------------
# CIFAR ResNet-32 (LDAM code layout)
# ---------------------------------------------------------------------------------------------------


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels, no parameters.

    Equivalent to the LDAM/Idelbayev ``LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0,
    planes // 4, planes // 4)))``, written as a module so the model pickles and scripts.
    """

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """LDAM's CIFAR BasicBlock: conv-bn-relu-conv-bn + shortcut, relu. Shortcut is option A."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            # Option A only covers doubling the width while halving the resolution, as in the CIFAR nets.
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(
                    f"option-A shortcut needs stride 2 and doubled width, got {in_planes}->{planes}, stride {stride}"
                )
            self.shortcut: nn.Module = _PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class NormedLinear(nn.Module):
    """Cosine classifier of the LDAM code: ``scale * normalize(x) @ normalize(W)``.

    The weight is stored ``(in_features, out_features)`` (LDAM's layout, transposed w.r.t.
    ``nn.Linear``) so LDAM checkpoints load. LDAM itself applies the scale (s = 30) inside its loss, so
    ``scale`` defaults to 1 (raw cosines); set it (e.g. 20 for CBD-ENS-style heads) to get usable logits.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.scale = float(scale)
        # LDAM's init: uniform then unit-norm columns.
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, out_features={self.weight.shape[1]}, scale={self.scale}"


class CosineClassifier(nn.Module):
    """Cosine classifier (CBD, Iscen et al. 2021): ``logits = scale * normalize(x) @ normalize(W).T``, no bias.

    ``weight`` is ``(out_features, in_features)`` like ``nn.Linear``'s and sits under the same key
    (``fc.weight`` / ``linear.weight``), so a checkpoint of the head has the linear head's shape; it only
    lacks ``bias``. ``scale`` is fixed (CBD: 20), not learned: cosines in [-1, 1] alone give too flat a
    softmax to train with cross-entropy.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 20.0):
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"cosine_scale must be positive, got {scale!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        # nn.Linear's init; only the rows' directions matter once they are normalised.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class ResNetCifar(_Backbone):
    """LDAM's ``ResNet_s``: 3x3 stem (16 ch), three stages (16/32/64, strides 1/2/2), global average
    pool, ``linear`` head (``nn.Linear`` or ``NormedLinear`` with ``use_norm=True``).

    Kaiming-normal init on every conv and linear weight (LDAM's ``_weights_init``).
    """

    classifier_name = "linear"

    def __init__(
        self,
        num_blocks: list[int],
        num_classes: int = 10,
        *,
        use_norm: bool = False,
        norm_scale: float = 1.0,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        _check_num_classes(num_classes)
        if len(num_blocks) != 3 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be 3 positive block counts, got {num_blocks!r}")
        self.in_planes = widths[0]
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], 2)
        self.feature_dim = widths[2]
        self.linear: nn.Module = (
            NormedLinear(self.feature_dim, num_classes, norm_scale)
            if use_norm
            else nn.Linear(self.feature_dim, num_classes)
        )
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 64-d features (global average pool over the last stage)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Global mean, not avg_pool2d(out, out.size(3)): identical on square maps, right on any size.
        return out.mean(dim=(2, 3))


def resnet32(num_classes: int = 10, *, use_norm: bool = False, norm_scale: float = 1.0, **kw: Any) -> ResNetCifar:
    """CIFAR ResNet-32 as in LDAM-DRW (5 blocks per stage, ~0.46 M parameters with 10 classes)."""
    return ResNetCifar([5, 5, 5], num_classes, use_norm=use_norm, norm_scale=norm_scale, **kw)


# ---------------------------------------------------------------------------------------------------
# Small ResNet for 28x28 inputs
# ---------------------------------------------------------------------------------------------------


class SmallResNet28(_Backbone):
    """A small ResNet for 28x28 images (Fashion-MNIST-LT), built for CPU speed.

    Layout: 3x3 stem (``stem_width`` ch, stride 1, 28x28) -> stage 1 (``widths[0]``, stride 2, 14x14) ->
    stage 2 (``widths[1]``, stride 2, 7x7) -> stage 3 (``widths[2]``, stride 2, 4x4) -> global average
    pool -> ``fc``. Each stage has ``blocks[i]`` torchvision-style BasicBlocks (1x1 conv + BN projection
    shortcut where the shape changes). The first downsampling happens in stage 1 rather than after it:
    full-width convs at 28x28 would cost ~4x the compute (the accuracy effect was not measured); for
    the same reason the stem is 16 channels wide.
    Default: 304,154 parameters (10 classes); forward+backward of a batch of 128 took ~0.07 s
    (contiguous) / ~0.05 s (channels_last model and input) on 2 CPU cores (torch 2.13, median of 35
    steps; a 32-channel stem measured ~0.10 / ~0.065 s).
    Takes 3-channel input (loaders deliver RGB; grey images are replicated); ``in_chans=1`` is allowed.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        stem_width: int = 16,
        widths: tuple[int, int, int] = (32, 64, 128),
        blocks: tuple[int, int, int] = (1, 1, 1),
        in_chans: int = 3,
    ):
        super().__init__()
        _check_num_classes(num_classes)
        if len(widths) != 3 or len(blocks) != 3 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"widths and blocks need 3 entries (blocks >= 1), got {widths!r}, {blocks!r}")
        self.conv1 = _conv3x3(in_chans, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_width
        stages = []
        for planes, n in zip(widths, blocks):
            downsample = nn.Sequential(_conv1x1(inplanes, planes, 2), nn.BatchNorm2d(planes))
            layer = [BasicBlock(inplanes, planes, 2, downsample)]
            layer += [BasicBlock(planes, planes) for _ in range(1, n)]
            stages.append(nn.Sequential(*layer))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = inplanes
        self.fc = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, widths[-1])``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def resnet_small28(num_classes: int = 10, **kw: Any) -> SmallResNet28:
    """Small CPU-fast ResNet for 28x28 RGB input (see ``SmallResNet28``); 128-d features by default."""
    return SmallResNet28(num_classes, **kw)


# ---------------------------------------------------------------------------------------------------
# Registry, construction and checkpoint loading
# ---------------------------------------------------------------------------------------------------


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


#: Classifier heads ``build_model`` puts on a backbone: ``nn.Linear`` or :class:`CosineClassifier`.
CLASSIFIERS = ("linear", "cosine")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet10": resnet10,
    "resnet32": resnet32,
    "resnet_small28": resnet_small28,
    "resnet50": resnet50,
    "resnet152": resnet152,
}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(name: str, num_classes: int, pretrained_path: str | os.PathLike | None = None,
                classifier: str = "linear", cosine_scale: float = 20.0, **kw: Any) -> nn.Module:
    """Construct a registered model; optionally load a local checkpoint into it.

    Args:
        name: one of ``MODELS`` (``resnet10``, ``resnet32``, ``resnet_small28``, ``resnet50``, ``resnet152``).
        num_classes: classifier width.
        pretrained_path: local checkpoint file, loaded with ``load_pretrained`` (a classifier whose shape
            or keys differ, e.g. ImageNet 1000-way into Places 365-way, or a linear head into a cosine
            one, is skipped and keeps its fresh init).
        classifier: ``"linear"`` (the backbone's own head) or ``"cosine"`` (a :class:`CosineClassifier`
            of scale ``cosine_scale`` replaces it, under the same attribute and key).
        cosine_scale: the cosine classifier's fixed logit scale (CBD: 20).
        **kw: forwarded to the constructor (e.g. ``use_norm=True`` for ``resnet32``).

    Raises:
        ValueError: unknown ``name`` (the message lists the known names) or ``classifier``, a
            non-positive ``cosine_scale``, or ``classifier="cosine"`` with resnet32's ``use_norm``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if classifier == "cosine" and kw.get("use_norm"):
        raise ValueError("classifier='cosine' and use_norm=True (LDAM's NormedLinear) are two cosine heads: "
                         "choose one")
    model = MODELS[name](num_classes, **kw)
    if classifier == "cosine":
        setattr(model, model.classifier_name, CosineClassifier(model.feature_dim, num_classes, cosine_scale))
    # How to build this model again without its weights (the export's model.json records it; the
    # pretrained path is left out: exported weights replace it).
    model.build_spec = {"builder": "build_model", "args": {"name": name, "num_classes": num_classes,
                                                           "classifier": classifier,
                                                           "cosine_scale": float(cosine_scale), **kw}}
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


@dataclass(frozen=True)
class LoadReport:
    """What ``load_pretrained`` did.

    ``loaded``: keys copied into the model. ``missing``: model keys not loaded, left at their init
    (a skipped classifier, BN ``num_batches_tracked`` counters, or anything with ``strict=False``). ``unexpected``: checkpoint keys the model does not have (only possible with
    ``strict=False``; they were ignored).
    ``skipped_classifier``: checkpoint classifier keys not loaded because their shapes differ (or
    ``skip_classifier`` asked for it), with ``(checkpoint shape, model shape)``.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_classifier: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def summary(self) -> str:
        """One-line human-readable summary."""
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.skipped_classifier:
            shapes = ", ".join(f"{k} {list(a)}->{list(b)}" for k, (a, b) in self.skipped_classifier.items())
            parts.append(f"skipped classifier ({shapes})")
        if self.missing:
            parts.append(f"missing {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected {self.unexpected}")
        return "; ".join(parts)


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path!r} is not a state_dict (nor a dict with 'state_dict'/'model' holding one)"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, skip_classifier: bool = True, strict: bool = True
) -> LoadReport:
    """Load a local checkpoint into ``model``; return a ``LoadReport``.

    Accepts a plain ``state_dict`` or a dict holding one under ``"state_dict"`` or ``"model"`` (a
    ``torch.save`` file), or a ``.safetensors`` file (timm's Hugging Face weights, our own exports); strips
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.

    The classifier (``model.classifier_name``: ``fc`` for ImageNet ResNets, ``linear`` for ResNet-32)
    is special: when ``skip_classifier`` is true (default) and the checkpoint's classifier shapes or keys
    differ from the model's (e.g. 1000-way ImageNet weights into a 365-way Places model; a linear head,
    with ``bias``, into a cosine one, without; or the reverse), all classifier keys are skipped, listed
    in ``skipped_classifier``, and the classifier keeps its fresh init. With ``skip_classifier=False``
    such a mismatch is an error. A matching classifier is always loaded.

    With ``strict=True`` (default) a non-classifier key the model lacks (unexpected) or the checkpoint
    lacks (missing) is an error, because a "pretrained" model with silently random layers is a bug.
    BatchNorm ``num_batches_tracked`` counters are exempt (old torchvision checkpoints lack them).
    With ``strict=False`` those keys are only reported. Shape mismatches are always errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable (or needs unsafe unpickling) or holds no state_dict, or a key
            mismatches as described above; the message names the key, and nothing is copied.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            # weights_only: never execute pickled code from a downloaded checkpoint.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read checkpoint {path!r} (torch.load(weights_only=True) or safetensors): {e}") \
            from e
    ckpt = _extract_state_dict(obj, path)
    own = model.state_dict()
    head = getattr(model, "classifier_name", "fc") + "."

    def _shape_of(k: str) -> tuple[int, ...] | None:
        return tuple(own[k].shape) if k in own else None

    skipped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    head_bad = [k for k, v in ckpt.items() if k.startswith(head) and tuple(v.shape) != _shape_of(k)]
    ckpt_head = [k for k in ckpt if k.startswith(head)]
    if ckpt_head and not head_bad:
        # A head without the model's bias (a cosine head into a linear model) would load with a random bias.
        head_bad = [k for k in own if k.startswith(head) and k not in ckpt]
    if head_bad:
        k = head_bad[0]
        if not skip_classifier:
            found = tuple(ckpt[k].shape) if k in ckpt else "absent"
            raise ValueError(
                f"classifier mismatch for key {k!r}: checkpoint {found} vs model {_shape_of(k) or 'absent'}"
                " (pass skip_classifier=True to keep the model's fresh classifier)"
            )
        # Skip the whole head together: loading fc.bias but not fc.weight would be meaningless.
        for k in [k for k in ckpt if k.startswith(head)]:
            skipped[k] = (tuple(ckpt[k].shape), _shape_of(k) or ())
            del ckpt[k]

    unexpected = [k for k in ckpt if k not in own]
    if unexpected and strict:
        raise ValueError(
            f"checkpoint {path!r} has key {unexpected[0]!r} unknown to the model "
            f"({len(unexpected)} unexpected in all: {unexpected[:5]})"
        )
    for k in unexpected:
        del ckpt[k]
    for k, v in ckpt.items():
        if tuple(v.shape) != _shape_of(k):
            raise ValueError(f"shape mismatch for key {k!r}: checkpoint {tuple(v.shape)} vs model {_shape_of(k)}")
    missing = [k for k in own if k not in ckpt]  # includes a skipped classifier: it keeps its init
    missing_body = [k for k in missing if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if missing_body and strict:
        raise ValueError(f"checkpoint {path!r} lacks key {missing_body[0]!r} ({len(missing_body)} missing in all)")
    model.load_state_dict(ckpt, strict=False)
    return LoadReport(loaded=list(ckpt), missing=missing, unexpected=unexpected, skipped_classifier=skipped)


# ---------------------------------------------------------------------------------------------------
# ECL multi-expert model
# ---------------------------------------------------------------------------------------------------
#
# The architecture is OUR READING of the ECL abstract (REFERENCE.md Sec. 1 "ECL"): the paper's own
# architecture is not public. NCL (CVPR 2022) supplies the defaults (3 experts, separate backbones);
# ``shared_stages`` adds RIDE-style sharing of the early stages.


@dataclass
class MultiExpertOutput:
    """What ``MultiExpert.forward`` returns; every tensor is stacked expert-first.

    ``label_logits``: ``(M, B, C)`` label classifiers g_i (raw: the balanced-softmax prior is added by
    the loss). ``kd_logits``: ``(M, B, C)`` distillation classifiers h_i, or ``None`` when the model has no
    distillation heads. ``features``: ``(M, B, D)`` the features f_i both classifiers read.
    ``proj``: ``(M, B, P)`` L2-normalised contrastive projections, or ``None`` unless asked for.
    """

    label_logits: torch.Tensor
    kd_logits: torch.Tensor | None
    features: torch.Tensor
    proj: torch.Tensor | None = None


def _split_stages(backbone: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Cut a registered backbone into its stem and its list of residual stages (its classifier is dropped).

    The pieces are the backbone's own modules (not copies), so a checkpoint loaded into the backbone
    carries over.
    """
    if isinstance(backbone, ResNet):
        return (nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool),
                [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4])
    if isinstance(backbone, ResNetCifar):
        # ResNetCifar applies F.relu in forward_features; an nn.ReLU module is the same function.
        return (nn.Sequential(backbone.conv1, backbone.bn1, nn.ReLU(inplace=True)),
                [backbone.layer1, backbone.layer2, backbone.layer3])
    if isinstance(backbone, SmallResNet28):
        return (nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu),
                [backbone.layer1, backbone.layer2, backbone.layer3])
    raise ValueError(f"MultiExpert cannot split a {type(backbone).__name__} into stages; supported: the "
                     "ImageNet ResNets, resnet32 (ResNetCifar) and resnet_small28")


class _Expert(nn.Module):
    """One expert: its own backbone stages (``body``), feature projection (``neck``), label classifier
    ``label_head`` (g), optional distillation classifier ``kd_head`` (h) and contrastive ``proj_head``."""

    def __init__(self, body: nn.Module, in_dim: int, feature_dim: int, projection: bool, num_classes: int,
                 kd_head: bool, proj_head: bool, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.body = body
        # Linear + BN + ReLU: a linear map alone in front of linear classifiers adds no capacity.
        self.neck: nn.Module = (
            nn.Sequential(nn.Linear(in_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
            if projection else nn.Identity()
        )
        self.label_head = nn.Linear(feature_dim, num_classes)
        self.kd_head = nn.Linear(feature_dim, num_classes) if kd_head else None
        # BCL's projection head layout: Linear-BN-ReLU-Linear.
        self.proj_head = (
            nn.Sequential(nn.Linear(feature_dim, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
                          nn.Linear(proj_hidden, proj_dim))
            if proj_head else None
        )

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """f_i from the shared trunk's output: own stages, global average pool, projection."""
        return self.neck(self.body(h).mean(dim=(2, 3)))


class MultiExpert(nn.Module):
    """M experts on a registered backbone, for ECL (our reading of the ECL abstract, REFERENCE.md; NCL defaults).

    Layout: a shared trunk (the backbone's stem and first ``shared_stages`` residual stages, one copy)
    feeds M experts, each with its own remaining stages, global average pooling, a projection to the
    feature f_i, and on f_i a label classifier g_i, a distillation classifier h_i and a contrastive
    projection head (MLP -> ``proj_dim``, L2-normalised). ``shared_stages = 0`` (default, NCL's choice)
    means M fully separate backbones (the stem is shared only when at least one stage is);
    ``shared_stages = S`` (all S stages) leaves only the projections and heads per expert.
    Stages: ImageNet ResNets 4 (``layer1..4``), ``resnet32`` and ``resnet_small28`` 3 (``layer1..3``).

    Dimensions (d = the backbone's ``feature_dim``: resnet10 512, resnet50/152 2048, resnet32 64,
    resnet_small28 128): pooled ``d`` -> ``neck`` (Linear d->D without bias, BatchNorm1d, ReLU; D =
    ``feature_dim``, default d) -> f_i ``(D)``; g_i, h_i: Linear D->C; projection head: Linear D->H,
    BatchNorm1d, ReLU, Linear H->P (H = ``proj_hidden``, default D; P = ``proj_dim``, default 128).
    With ``projection=False`` the neck is the identity and D = d.

    Every expert is built from its own backbone instance, so experts differ at initialisation (a
    ``pretrained_path`` gives all of them the same backbone weights; their heads still differ).
    Works in eager mode and with ``channels_last`` models and inputs.

    Args:
        backbone: a name in ``MODELS``.
        num_classes: C.
        num_experts: M >= 1 (ECL's distillation terms need M >= 2; that is checked by the loss/recipe).
        shared_stages: 0..S, see above.
        feature_dim, projection, proj_dim, proj_hidden: see "Dimensions".
        kd_head: build the distillation classifiers h_i (off when distillation is switched off, so that
            DDP sees no unused parameters). proj_head: likewise for the contrastive heads.
        pretrained_path: forwarded to ``build_model`` for every expert's backbone.
        **backbone_kw: forwarded to the backbone constructor (its classifier is discarded).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        num_experts: int = 3,
        shared_stages: int = 0,
        *,
        feature_dim: int | None = None,
        projection: bool = True,
        proj_dim: int = 128,
        proj_hidden: int | None = None,
        kd_head: bool = True,
        proj_head: bool = True,
        pretrained_path: str | os.PathLike | None = None,
        **backbone_kw: Any,
    ):
        super().__init__()
        _check_num_classes(num_classes)
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"ecl.num_experts must be a positive int, got {num_experts!r}")
        for name, v in (("feature_dim", feature_dim), ("proj_hidden", proj_hidden), ("proj_dim", proj_dim)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        backbones = [build_model(backbone, num_classes, pretrained_path=pretrained_path, **backbone_kw)
                     for _ in range(num_experts)]
        in_dim = backbones[0].feature_dim
        if not projection and feature_dim not in (None, in_dim):
            raise ValueError(f"projection=False keeps the backbone's {in_dim}-d features; got feature_dim={feature_dim}")
        feature_dim = feature_dim or in_dim
        splits = [_split_stages(b) for b in backbones]
        num_stages = len(splits[0][1])
        if not isinstance(shared_stages, int) or isinstance(shared_stages, bool) or not 0 <= shared_stages <= num_stages:
            raise ValueError(f"ecl.shared_stages must be an int in [0, {num_stages}] for {backbone} ({num_stages} "
                             f"residual stages after the stem), got {shared_stages!r}")

        stem0, stages0 = splits[0]
        # Shared trunk: expert 0's stem and first stages; an empty Sequential is the identity.
        self.shared = nn.Sequential(stem0, *stages0[:shared_stages]) if shared_stages else nn.Sequential()
        self.experts = nn.ModuleList()
        for stem, stages in splits:
            own = ([stem] if shared_stages == 0 else []) + list(stages[shared_stages:])
            self.experts.append(_Expert(nn.Sequential(*own), in_dim, feature_dim, projection, num_classes,
                                        kd_head, proj_head, proj_hidden or feature_dim, proj_dim))
        self.backbone_name, self.num_classes, self.num_experts = backbone, num_classes, num_experts
        self.shared_stages, self.num_stages = shared_stages, num_stages
        self.feature_dim, self.proj_dim = feature_dim, proj_dim
        self.has_kd_head, self.has_proj_head = kd_head, proj_head
        # Constructor arguments for rebuilding it around exported weights (see build_model's build_spec).
        self.build_spec = {"builder": "MultiExpert", "forward": "inference_logits",
                           "args": {"backbone": backbone, "num_classes": num_classes, "num_experts": num_experts,
                                    "shared_stages": shared_stages, "feature_dim": feature_dim,
                                    "projection": projection, "proj_dim": proj_dim, "proj_hidden": proj_hidden,
                                    "kd_head": kd_head, "proj_head": proj_head, **backbone_kw}}

    def _expert_ids(self, experts: Sequence[int] | None) -> list[int]:
        if experts is None:
            return list(range(self.num_experts))
        ids = [int(i) for i in experts]
        if not ids or any(not 0 <= i < self.num_experts for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"experts must be distinct ids in [0, {self.num_experts}), got {list(experts)}")
        return ids

    def forward(self, x: torch.Tensor, *, with_proj: bool = False,
                experts: Sequence[int] | None = None) -> MultiExpertOutput:
        """Run the shared trunk once, then each selected expert.

        Args:
            x: ``(B, 3, H, W)`` images (contiguous or channels_last).
            with_proj: also compute the contrastive projections (needs ``proj_head``).
            experts: optional subset of expert ids (default all); the output's M is its length.
        """
        if with_proj and not self.has_proj_head:
            raise ValueError("with_proj=True but the model was built with proj_head=False")
        ids = self._expert_ids(experts)
        trunk = self.shared(x)
        label, kd, feats, proj = [], [], [], []
        for i in ids:
            e = self.experts[i]
            f = e.features(trunk)
            feats.append(f)
            label.append(e.label_head(f))
            if e.kd_head is not None:
                kd.append(e.kd_head(f))
            if with_proj:
                proj.append(F.normalize(e.proj_head(f), dim=1))
        return MultiExpertOutput(
            label_logits=torch.stack(label),
            kd_logits=torch.stack(kd) if kd else None,
            features=torch.stack(feats),
            proj=torch.stack(proj) if with_proj else None,
        )

    def inference_logits(self, x: torch.Tensor, experts: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, C)`` mean of the selected experts' label-classifier logits (no prior): ECL's prediction."""
        trunk = self.shared(x)
        ids = self._expert_ids(experts)
        return torch.stack([self.experts[i].label_head(self.experts[i].features(trunk)) for i in ids]).mean(dim=0)

    def class_prototypes(self) -> torch.Tensor:
        """``(M, C, P)`` BCL class-complement prototypes: each expert's label-classifier rows through its
        projection head, L2-normalised (BCL feeds its classifier weights through its head the same way,
        in the head's current train/eval mode). Optional; ECL's default contrastive term does not use them."""
        if not self.has_proj_head:
            raise ValueError("class_prototypes needs the projection heads (proj_head=True)")
        return torch.stack([F.normalize(e.proj_head(e.label_head.weight), dim=1) for e in self.experts])

    def expert_parameters(self, i: int) -> list[nn.Parameter]:
        """Every parameter on expert i's path: the shared trunk's followed by its own."""
        self._expert_ids([i])
        return list(self.shared.parameters()) + list(self.experts[i].parameters())
