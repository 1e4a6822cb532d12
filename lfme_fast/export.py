"""Exported models: ``model.safetensors`` plus ``model.json``, usable without this project's training code.

Every training stage writes both next to its ``model.pt`` (:meth:`lfme_fast.recipes.base.Recipe.train_stage`):

* ``model.safetensors``: the ``state_dict`` (CPU, contiguous tensors, no shared storage, so every key
  is present even where a model shares modules). ImageNet ResNets (``resnet10/50/152``) use torchvision's
  parameter names, so with a linear head the file loads into torchvision's or timm's ``ResNet`` with
  ``strict=True`` (README, "Using a trained model"). The header metadata repeats the format, the
  architecture name and the class count.
* ``model.json`` (:data:`FORMAT`): what a user needs to run it:

  - ``architecture``: ``builder`` (``build_model`` or ``MultiExpert``, :mod:`lfme_fast.models`), its
    ``args`` (name, ``num_classes``, classifier, ...), ``forward`` (the method giving logits:
    ``forward`` or, for ECL's multi-expert model, ``inference_logits``) and ``parameter_names``
    (``torchvision`` where the keys match torchvision's ResNet);
  - ``num_classes``; ``classes`` (the dataset class id of each output column: ``0..C-1`` for a
    full-label-space model, the subset's classes for an LFME expert) and ``class_names`` (one per column);
  - ``preprocess``: ``resolution``, ``resize`` (``center_crop``: a centred square of ``crop_ratio`` x the
    shorter side, resized to ``resolution``; ``resize``: the whole image resized to ``resolution`` x
    ``resolution``), ``crop_ratio``, ``mean``/``std`` (on 0..1 RGB), ``interpolation``;
  - ``training``: recipe, stage, run name, ``config_sha256`` (the resolved config), the stage
    fingerprint, dataset name and training-split fingerprint, optimizer steps;
  - ``weights``/``weights_sha256``: the weight file's name and checksum;
  - ``exported_module``: null, or the attribute of a training wrapper that was exported because it alone
    gives the wrapper's logits (CBD's student: ``backbone``; the distillation projection is left out).

:func:`load_exported` rebuilds the model from ``model.json`` and loads the weights strictly;
:class:`ExportedModel` returns logits whatever the architecture. ``python -m lfme_fast.predict`` uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lfme_fast.io import atomic_path, atomic_write_json

__all__ = ["FORMAT", "WEIGHTS", "INFO", "export_model", "inference_part", "preprocess_info", "config_sha256",
           "read_model_info", "build_exported", "load_exported", "ExportedModel", "ExportError"]

FORMAT = "lfme_fast.model/1"
WEIGHTS = "model.safetensors"
INFO = "model.json"
#: Architectures whose parameter names are torchvision's (``lfme_fast.models`` docstring).
TORCHVISION_NAMED = ("resnet10", "resnet50", "resnet152")


class ExportError(ValueError):
    """An exported model that cannot be read or rebuilt; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def config_sha256(cfg: Any) -> str:
    """SHA-256 of the resolved config (canonical JSON of :func:`lfme_fast.config.config_to_dict`): the
    same experiment gives the same hash wherever its YAML lived."""
    from lfme_fast.config import config_to_dict

    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def preprocess_info(spec: Any) -> dict[str, Any]:
    """The evaluation preprocessing of a resolved eval :class:`~lfme_fast.loaders.LoaderSpec`, as a user
    applies it to any image: a centre crop (ImageNet-style data) or a plain resize (small images stored
    at the resolution, whose eval view is the whole image)."""
    center = spec.geometry == "center"
    return {"resolution": int(spec.resolution), "resize": "center_crop" if center else "resize",
            "crop_ratio": float(spec.crop_ratio) if center else None,
            "mean": [float(x) for x in spec.mean], "std": [float(x) for x in spec.std],
            "interpolation": "bilinear (antialiased, PIL's resize)", "channels": "RGB",
            "scale": "pixels / 255, then (x - mean) / std, NCHW float32"}


def _architecture(model: torch.nn.Module) -> dict[str, Any] | None:
    spec = getattr(model, "build_spec", None)
    if not isinstance(spec, Mapping):
        return None
    arch = {"builder": spec["builder"], "args": dict(spec["args"]), "forward": spec.get("forward", "forward")}
    args = arch["args"]
    torchvision_names = spec["builder"] == "build_model" and args.get("name") in TORCHVISION_NAMED
    arch["parameter_names"] = "torchvision" if torchvision_names else "lfme_fast"
    return arch


@torch.no_grad()
def _same_logits(model: torch.nn.Module, part: torch.nn.Module, resolution: int) -> bool:
    """Whether ``model`` and its submodule ``part`` give the same logits (eval mode, two random images)."""
    param = next(model.parameters(), None)
    x = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    x = x.to(param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()  # and no running statistic moves: eval mode, no grad
    try:
        a, b = model(x), part(x)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    finally:
        model.train(was_training)


def inference_part(model: torch.nn.Module, resolution: int) -> tuple[torch.nn.Module, str]:
    """The module to export and its attribute path (``""``: the model itself).

    A model built by :mod:`lfme_fast.models` is exported whole. A training wrapper without a build
    recipe (CBD's student: a backbone plus a projection used only by the distillation loss) is exported
    as its one child that has one, when that child alone gives the wrapper's logits (checked on random
    images): the export then loads into a plain backbone.
    """
    if isinstance(getattr(model, "build_spec", None), Mapping):
        return model, ""
    kids = [(n, m) for n, m in model.named_children() if isinstance(getattr(m, "build_spec", None), Mapping)]
    if len(kids) == 1 and _same_logits(model, kids[0][1], resolution):
        return kids[0][1], kids[0][0]
    return model, ""


def export_model(stage_dir: str | os.PathLike, model: torch.nn.Module, *, classes: Sequence[int],
                 class_names: Sequence[str], preprocess: Mapping[str, Any],
                 training: Mapping[str, Any]) -> list[str]:
    """Write ``stage_dir/model.safetensors`` and ``stage_dir/model.json`` (atomically; main process only).

    Args:
        model: the trained model; its ``build_spec`` (set by :func:`lfme_fast.models.build_model` and
            :class:`~lfme_fast.models.MultiExpert`) says how to rebuild it. A wrapper is exported as the
            part that computes its logits (:func:`inference_part`, recorded as ``exported_module``); a
            model with no rebuildable part is still exported, with ``architecture: null``
            (:func:`load_exported` then refuses it).
        classes: the dataset class id of each output column.
        class_names: one name per output column.
        preprocess: :func:`preprocess_info` of the run's eval loader.
        training: provenance (recipe, stage, ``config_sha256``, fingerprints, ...).

    Returns:
        the two file names.
    """
    from safetensors.torch import save_file

    stage_dir = Path(stage_dir)
    model, part = inference_part(model, int(preprocess.get("resolution", 32)))
    # clone(): safetensors refuses tensors that share storage (modules shared between experts) and
    # non-contiguous ones; every key is written on its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    arch = _architecture(model)
    num_classes = len(classes)
    meta = {"format": FORMAT, "num_classes": str(num_classes),
            "arch": "" if arch is None else str(arch["args"].get("name") or arch["args"].get("backbone"))}
    with atomic_path(stage_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata=meta)
    info = {"format": FORMAT, "weights": WEIGHTS, "weights_sha256": _sha256(stage_dir / WEIGHTS),
            "architecture": arch, "num_classes": num_classes, "classes": [int(c) for c in classes],
            "class_names": [str(n) for n in class_names], "preprocess": dict(preprocess),
            "exported_module": part or None, "training": dict(training)}
    atomic_write_json(stage_dir / INFO, info)
    return [WEIGHTS, INFO]


def _info_path(path: str | os.PathLike) -> Path:
    """``model.json`` for a folder, a ``model.json`` or a ``model.safetensors`` path."""
    path = Path(path)
    if path.is_dir():
        return path / INFO
    if path.suffix == ".safetensors":
        return path.with_name(INFO) if path.name == WEIGHTS else path.with_suffix(".json")
    return path


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` of an export (given its folder, its json or its safetensors file).

    Raises:
        ExportError: missing, unreadable or not in :data:`FORMAT`.
    """
    info_path = _info_path(path)
    if not info_path.is_file():
        raise ExportError(f"{info_path} not found: {path} is not an exported model (a training stage writes "
                          f"{WEIGHTS} and {INFO} next to model.pt)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{info_path}: cannot read it ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ExportError(f"{info_path}: format {info.get('format') if isinstance(info, dict) else None!r} is not "
                          f"{FORMAT!r}")
    info["_path"] = str(info_path)
    return info


def build_exported(info: Mapping[str, Any]) -> torch.nn.Module:
    """A fresh (untrained) model of the architecture ``info`` (a ``model.json``) describes.

    Only the builders of :mod:`lfme_fast.models` are accepted: a model file never names code to import.
    """
    from lfme_fast.models import MultiExpert, build_model

    arch = info.get("architecture")
    where = info.get("_path", INFO)
    if not isinstance(arch, Mapping):
        raise ExportError(f"{where}: no architecture recorded (the model was not built by lfme_fast.models)")
    builders = {"build_model": build_model, "MultiExpert": MultiExpert}
    if arch.get("builder") not in builders:
        raise ExportError(f"{where}: unknown builder {arch.get('builder')!r} (known: {', '.join(builders)})")
    try:
        return builders[arch["builder"]](**arch["args"])
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: cannot build {arch['builder']}(**{arch['args']}): {exc}") from None


class ExportedModel(torch.nn.Module):
    """An exported model with what it needs at inference: ``model(x)`` gives ``(N, num_classes)`` logits
    whatever the architecture (ECL's multi-expert model: the mean of its experts' label logits);
    ``info`` is the ``model.json``, ``preprocess`` its preprocessing."""

    def __init__(self, model: torch.nn.Module, info: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.info = dict(info)
        self._method = (info.get("architecture") or {}).get("forward", "forward")

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.info["preprocess"])

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._method == "forward":
            return self.model(x)
        return getattr(self.model, self._method)(x)


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild an exported model (folder, ``model.json`` or ``model.safetensors``) with its weights loaded
    strictly, in eval mode on ``device``.

    Raises:
        ExportError: missing or damaged files (checksum), an unknown architecture, or weights that do not
            fit it (the message names the key).
    """
    from safetensors.torch import load_file

    info = read_model_info(path)
    weights = Path(info["_path"]).with_name(info.get("weights", WEIGHTS))
    if not weights.is_file():
        raise ExportError(f"{weights} not found (named by {info['_path']})")
    if info.get("weights_sha256") and _sha256(weights) != info["weights_sha256"]:
        raise ExportError(f"{weights}: checksum differs from {info['_path']} (a damaged or replaced file)")
    model = build_exported(info)
    try:
        model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not fit the architecture in {info['_path']}: "
                          f"{str(exc).splitlines()[0]}") from None
    return ExportedModel(model, info).to(device).eval()
