"""Recipes: one module per training method, registered by name.

A recipe is a :class:`~lfme_fast.recipes.base.Recipe` subclass (torchtune's shape: ``setup()``,
``train()`` running the configured stages in order, ``cleanup()``) that declares

* ``STAGES``: its stage names in execution order (one method ``stage_<name>()`` each) — the only
  place a recipe's stage list is written;
* ``SECTIONS``: its own config sections, ``{name: frozen dataclass}`` defined next to the recipe
  (``lfme_fast.config`` validates them and a YAML for this recipe carries exactly these plus the
  common sections).

Built-in recipes are registered lazily (``"module:Class"``) so that reading a config imports only the
recipe it names. Add one with :func:`register_recipe` (or name it in a config as
``recipe: package.module:Class``, no registration needed).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["RECIPES", "RecipeNotFound", "register_recipe", "get_recipe", "run"]

#: Recipe registry: name -> class, or a lazy ``"module:Class"`` path resolved on first use.
RECIPES: dict[str, Any] = {
    "baseline": "lfme_fast.recipes.baseline:BaselineRecipe",
    "experts": "lfme_fast.recipes.experts:ExpertsRecipe",
    "lfme": "lfme_fast.recipes.lfme:LFMERecipe",
    "cbd": "lfme_fast.recipes.cbd:CBDRecipe",
    "ecl": "lfme_fast.recipes.ecl:ECLRecipe",
}


class RecipeNotFound(ValueError):
    """A recipe name that is neither registered nor an importable ``module:Class``."""


def register_recipe(name: str, target: Any = None) -> Any:
    """Register a recipe class (or a ``"module:Class"`` path) as ``name``.

    Usable directly (``register_recipe("toy", ToyRecipe)``) or as a class decorator
    (``@register_recipe("toy")``). Re-registering a name replaces the entry.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a recipe name must be a non-empty string without ':', got {name!r}")

    def add(obj: Any) -> Any:
        if not isinstance(obj, str):
            _check_recipe_class(name, obj)
        RECIPES[name] = obj
        return obj

    return add if target is None else add(target)


def _load(path: str, name: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RecipeNotFound(f"recipe {name!r} refers to {path!r}, which cannot be loaded ({exc})") from None


def _check_recipe_class(name: str, cls: Any) -> None:
    from lfme_fast.recipes.base import Recipe

    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise RecipeNotFound(f"recipe {name!r}: {cls!r} is not a lfme_fast.recipes.base.Recipe subclass")
    stages = tuple(cls.STAGES)
    if not stages or len(set(stages)) != len(stages):
        raise RecipeNotFound(f"recipe {name!r}: STAGES must be a non-empty tuple without repeats, got {stages}")
    missing = [s for s in stages if not callable(getattr(cls, f"stage_{s}", None))]
    if missing:
        raise RecipeNotFound(f"recipe {name!r}: no method stage_{missing[0]}() for stage {missing[0]!r}")


def get_recipe(name: str) -> Any:
    """The recipe class registered as ``name``, or the class at import path ``"module:Class"``.

    Raises:
        RecipeNotFound: unknown name, unloadable path, or not a valid recipe class.
    """
    if name in RECIPES:
        entry = RECIPES[name]
        if isinstance(entry, str):
            entry = _load(entry, name)
            _check_recipe_class(name, entry)
            RECIPES[name] = entry
        return entry
    if ":" in name:
        cls = _load(name, name)
        _check_recipe_class(name, cls)
        return cls
    raise RecipeNotFound(f"unknown recipe {name!r}; known: {sorted(RECIPES)} (or give a 'module:Class' path)")



def run(cfg: Any, accelerator: Any = None, *, on_step: Callable[[int, str], None] | None = None) -> Any:
    """Run ``cfg``'s recipe in this process (the programmatic form of ``lfme_fast/train.py``).

    ``on_step`` is the recipe's step hook (tests: :class:`lfme_fast.trainer.InterruptAfter`). Returns
    the recipe object (its ``trained`` models, ``ctx`` and ``run_dir``).
    """
    recipe = get_recipe(cfg.recipe)(cfg, accelerator, on_step=on_step)
    recipe.run()
    return recipe
