"""Data loaders behind one contract: :func:`build_loader` (a :class:`LoaderOptions`) -> :class:`BatchLoader`
of :class:`Batch`.

Back ends: ``ffcv`` (stock ffcv Loader over the beton, ordered by our samplers), ``dali`` (NVIDIA DALI,
GPU decode when CUDA is available) and ``torch`` (the ordinary DataLoader + PIL baseline). They are
registered here by name as ``"module:Class"`` strings and imported only when first built, so that
importing the package pulls in neither ffcv nor DALI; :func:`register_backend` adds another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lfme_fast.augment import FixedViews
from lfme_fast.loaders.base import (
    Batch,
    BatchLoader,
    EpochPlan,
    LoaderOptions,
    LoaderSpec,
    resolve_spec,
)

__all__ = ["BACKENDS", "Batch", "BatchLoader", "EpochPlan", "FixedViews", "LoaderOptions", "LoaderSpec",
           "backend_missing", "build_loader", "register_backend", "resolve_spec"]

#: name -> ``"module:Class"`` (imported on first use) or the loader class / factory itself. A back end
#: is called as ``factory(spec: LoaderSpec, **backend_options)`` and returns a :class:`BatchLoader`.
_REGISTRY: dict[str, str | Callable[..., BatchLoader]] = {
    "ffcv": "lfme_fast.loaders.ffcv_backend:FFCVLoader",
    "dali": "lfme_fast.loaders.dali_backend:DALILoader",
    "torch": "lfme_fast.loaders.torch_backend:TorchLoader",
}

_BUILT_IN = dict(_REGISTRY)

#: The registered back-end names: a live view (``"torch" in BACKENDS``, ``list(BACKENDS)``) that
#: includes back ends added later with :func:`register_backend`.
BACKENDS = _REGISTRY.keys()


def register_backend(name: str, target: str | Callable[..., BatchLoader], *, replace: bool = False) -> None:
    """Make ``LoaderOptions(backend=name)`` build ``target``.

    ``target``: ``"package.module:ClassName"`` (imported lazily, at the first build) or the class /
    factory itself, called as ``target(spec, **backend_options)`` with the resolved
    :class:`LoaderSpec`; it must return a :class:`BatchLoader`. Registering a taken name is an error
    unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a back-end name must be a non-empty string, got {name!r}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise ValueError(f"back end {name!r}: target must read 'package.module:ClassName', got {target!r}")
    elif not callable(target):
        raise TypeError(f"back end {name!r}: target must be a 'module:Class' string or callable, got {target!r}")
    if name in _REGISTRY and not replace and _REGISTRY[name] != target:
        raise ValueError(f"loader back end {name!r} is already registered ({_REGISTRY[name]!r}); pass replace=True")
    _REGISTRY[name] = target


#: The package each built-in back end needs and how to install it (``backend_missing``).
_REQUIREMENTS = {
    "ffcv": ("ffcv", "pip install ffcv==1.0.2 (it compiles against OpenCV and libjpeg-turbo: README, 'Install')"),
    "dali": ("nvidia.dali", "pip install 'lfme_fast[dali-cuda13]' (NVIDIA driver >= 580) or "
                            "'lfme_fast[dali-cuda12]' (CUDA 12 drivers); or choose data.backend: ffcv | torch"),
}


def backend_missing(name: str) -> str | None:
    """Why back end ``name`` cannot run here (its package is not installed, and how to install it), or
    None. Looks the package up without importing it (importing ffcv compiles numba code for seconds)."""
    import importlib.util

    if name not in _REQUIREMENTS or _REGISTRY.get(name) != _BUILT_IN.get(name):
        return None  # not a built-in back end (or replaced by register_backend): nothing known to check
    module, hint = _REQUIREMENTS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package (nvidia) is absent
        found = False
    return None if found else f"the {name!r} back end needs the {module!r} package, which is not installed: {hint}"


def _backend_factory(name: str) -> Callable[..., BatchLoader]:
    """The registered factory of back end ``name``, importing it on first use."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loader backend {name!r}: choose one of {', '.join(_REGISTRY)}")
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    missing = backend_missing(name)
    if missing:
        raise ImportError(missing)
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"loader back end {name!r} ({target}) cannot be loaded: {exc}") from exc


def build_loader(options: LoaderOptions, /, **backend_options: Any) -> BatchLoader:
    """A :class:`BatchLoader` over ``options.root``'s ``options.split`` (see :class:`LoaderOptions`).

    ``backend_options`` go to the back end as they are (e.g. ``batches_ahead`` for ffcv,
    ``prefetch_factor`` for torch).
    """
    if not isinstance(options, LoaderOptions):
        raise TypeError(f"build_loader() takes a LoaderOptions, got {type(options).__name__} "
                        "(build_loader(LoaderOptions(root, split, train=..., batch_size=..., ...)))")
    factory = _backend_factory(options.backend)  # an unknown name fails before the dataset is read
    loader = factory(resolve_spec(options), **backend_options)
    if not isinstance(loader, BatchLoader):
        raise TypeError(f"loader back end {options.backend!r} returned {type(loader).__name__}, not a BatchLoader")
    return loader
