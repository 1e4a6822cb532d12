"""Typed, validated experiment configuration.

One YAML file in ``configs/`` is one experiment. ``load_config(path, overrides)`` reads it, applies
command-line overrides (``section.key=value``, the value parsed with ``yaml.safe_load``), checks every
key and type, fills the derived defaults and returns a frozen :class:`Config`. An unknown key, a wrong
type or an invalid value anywhere is a :class:`ConfigError` naming the dotted key and where it came from
(the file or the override). The resolved config is written next to the run's outputs as
``RUN/config.yaml`` (:func:`save_config`), so every run folder records exactly what produced it.

Sections (the names are public: configs, overrides and fingerprints use them)
-----------------------------------------------------------------------------

=============  =========================================================================================
key            meaning
=============  =========================================================================================
``name``       run name; ``output_dir`` defaults to ``runs/<name>``
``seed``       seeds model init, samplers (order depends on ``(seed, epoch)`` only) and augmentation
``recipe``     a registered recipe name (``lfme_fast.recipes.RECIPES``: ``baseline``, ``experts``,
               ``lfme``, ...) or an import path ``package.module:Class``; it fixes the stages and
               which recipe sections the file may (and must) carry
``stages``     which of the recipe's stages to run, in the recipe's order (null: all)
``output_dir`` run folder (``--output-dir`` on the command line sets it)
``data``       ``root`` (prepared dataset, ``python -m data_prep``), ``backend`` (ffcv | dali | torch),
               ``batch_size`` (per process; null: 128 unless ``global_batch_size`` is set),
               ``global_batch_size`` (the paper's batch per optimizer step over all processes; the
               per-process batch is ``global_batch_size / (world size x train.grad_accum)`` and must
               divide; set at most one of the two, :mod:`lfme_fast.scale`), ``eval_batch_size`` (null:
               the per-process batch), ``num_workers`` (null: the CPUs this process may use divided by
               the processes on this machine, :func:`lfme_fast.scale.default_num_workers`),
               ``resolution`` (null: the dataset's own), ``augment`` (auto | imagenet | pad_crop | none), ``in_memory``, ``train_split``, ``val_split`` (may be
               null), ``test_split``, ``hw_decoder_load`` (dali only: the share of JPEGs the GPU's
               hardware decoder takes in ``mixed`` decoding, in [0, 1]; null: DALI's default, 0.65)
``model``      ``arch`` (``lfme_fast.models.MODELS``), ``pretrained`` (local checkpoint or null),
               ``kwargs`` (extra constructor arguments, e.g. ``{use_norm: true}`` for resnet32),
               ``classifier`` (linear | cosine: CBD's head, L2-normalised features and class weights,
               fixed scale, no bias; any backbone), ``cosine_scale`` (that scale, > 0; CBD: 20)
``optim``      ``name`` (sgd), ``lr`` (for the global batch the run trains with; never rescaled), ``momentum``,
               ``weight_decay``, ``nesterov``, ``schedule`` (cosine | step | constant), ``milestones``
               (epochs, for ``step``), ``gamma``, ``warmup_epochs`` (linear warm-up, may be fractional),
               ``epochs``
``train``      ``sampler`` (instance | class_balanced | sqrt | progressive), ``samples_per_class``
               (class_balanced), ``epoch_samples`` (samples per epoch; null: dataset size),
               ``loss`` (ce | balanced_softmax | logit_adjusted), ``tau`` (logit_adjusted),
               ``grad_accum``, ``max_steps_per_epoch`` (null: whole epochs; for smoke tests),
               ``log_every`` (steps), ``checkpoint_every_steps`` (mid-epoch checkpoints; null: off),
               ``sync_bn`` (SyncBatchNorm across processes on GPU runs: batch statistics over the global
               micro-batch instead of each process's share; ignored on CPU and on one process),
               ``compile`` (false | true | a ``torch.compile`` mode: default, reduce-overhead,
               max-autotune, max-autotune-no-cudagraphs; :mod:`lfme_fast.compiling`)
``precision``  ``mixed_precision`` (no | bf16 | fp16), ``channels_last`` (true | false | auto = on GPU)
``eval``       ``convention`` (lfme | strict) and ``thresholds`` for the many/medium/few report
``log``        ``trackers`` (Accelerate trackers: tensorboard, wandb, mlflow, ...; optional packages,
               ``pip install lfme_fast[log]``), ``tensorboard`` (deprecated: same as listing
               ``tensorboard`` in ``trackers``), ``progress`` (tqdm bar on the main process)
=============  =========================================================================================

Recipe sections
---------------
Every section above is common to all recipes. A recipe adds its own sections (``Recipe.SECTIONS``:
section name -> frozen dataclass, defined next to the recipe), e.g. ``experts`` and ``lfme`` for the
``lfme`` recipe. A file carries the common sections plus its recipe's sections and nothing else; a
section of another recipe is an unknown key. On the loaded config a recipe section reads like a common
one (``cfg.lfme.temperature``). A section dataclass may define ``resolve(self, cfg, check)`` to check
values and fill derived defaults (``check(cond, "lfme.alpha", "must be ...")`` raises a
:class:`ConfigError` naming the key and its source) and return the resolved section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml

from lfme_fast.io import atomic_write_text

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "PrecisionConfig",
    "EvalConfig",
    "LogConfig",
    "Check",
    "recipe_sections",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "fingerprint",
    "missing_keys",
    "parse_override",
    "known_trackers",
    "config_help",
]

class ConfigError(ValueError):
    """An invalid configuration; the message names the dotted key and its source."""


#: ``data.batch_size`` when neither it nor ``data.global_batch_size`` is set
DEFAULT_BATCH_SIZE = 128


# ---------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None
    backend: str = "torch"
    #: per-process batch; null resolves to 128 unless ``global_batch_size`` is set (lfme_fast.scale)
    batch_size: int | None = None
    #: global batch per optimizer step (all processes x grad_accum); the per-process batch follows
    global_batch_size: int | None = None
    eval_batch_size: int | None = None
    num_workers: int | None = None
    resolution: int | None = None
    augment: Literal["auto", "imagenet", "pad_crop", "none"] = "auto"
    in_memory: bool = True
    hw_decoder_load: float | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet10"
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    classifier: Literal["linear", "cosine"] = "linear"
    cosine_scale: float = 20.0


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    epochs: int = 90


@dataclass(frozen=True)
class TrainConfig:
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "instance"
    samples_per_class: int = 4
    epoch_samples: int | None = None
    loss: Literal["ce", "balanced_softmax", "logit_adjusted"] = "ce"
    tau: float = 1.0
    grad_accum: int = 1
    max_steps_per_epoch: int | None = None
    log_every: int = 50
    checkpoint_every_steps: int | None = None
    sync_bn: bool = False
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False


@dataclass(frozen=True)
class PrecisionConfig:
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool | Literal["auto"] = "auto"


@dataclass(frozen=True)
class EvalConfig:
    convention: Literal["lfme", "strict"] = "lfme"
    thresholds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LogConfig:
    #: Accelerate experiment trackers (``log_with``): tensorboard, wandb, mlflow, comet_ml, aim, ...
    trackers: tuple[str, ...] = ()
    #: Deprecated: ``true`` is the same as listing ``tensorboard`` in ``trackers``.
    tensorboard: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Config:
    """A whole experiment (see the module docstring for every key)."""

    name: str = "run"
    seed: int = 0
    recipe: str = "baseline"
    stages: tuple[str, ...] | None = None
    output_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: The recipe's own sections (name -> dataclass), filled by ``load_config``; read them as
    #: attributes (``cfg.lfme``). Not a key of the YAML file.
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: recipe sections read like common ones.
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"config has no section {name!r} (recipe {self.__dict__.get('recipe')!r} has "
                             f"sections: {sorted(sections) or 'none of its own'})")

    @property
    def run_dir(self) -> Path:
        """The run folder (``output_dir``; always set after ``load_config``)."""
        return Path(self.output_dir if self.output_dir is not None else f"runs/{self.name}")


# ---------------------------------------------------------------------------------------------------
# type checking / coercion
# ---------------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _record_list_item(tp: Any) -> type | None:
    """The dataclass ``D`` when ``tp`` is ``tuple[D, ...]`` (a list of records in the file), else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``_Mismatch``. Conversions allowed: int -> float,
    a numeric string -> float (YAML 1.1 reads ``1e-3`` as a string), list -> tuple, and a YAML 1.1
    boolean back to the word ``off``/``no`` (``on``/``yes``) for a choice field that has it."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted off/no (on/yes) as booleans: give back the word that was written
            # when the field has such a choice (``mixed_precision: no``, ``spes: off``).
            words = ("off", "no", "false") if not value else ("on", "yes", "true")
            value = next((w for w in words if w in choices), value)
        for choice in choices:
            if type(value) is type(choice) and value == choice:
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not in the user's file


def _fields_of(cls: type, sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """Key -> type of what a mapping for ``cls`` may hold: its fields, and for :class:`Config` the common
    sections plus the recipe's ``sections`` (``Config.sections`` itself is not a file key)."""
    hints = _hints(cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if cls is Config:
        out.pop("sections")
        out.update(sections or {})
    return out


def _unknown_key(dotted: str, where: str, names: Iterable[str], source: str) -> ConfigError:
    msg = f"unknown key {dotted!r} ({source}); {where} accepts: {', '.join(sorted(names))}"
    if "." not in dotted:
        owners = _recipes_with_section(dotted)
        if owners:
            msg += f" (section {dotted!r} belongs to recipe(s) {', '.join(owners)}; set recipe: to use it)"
    return ConfigError(msg)


def _build(cls: type, data: Any, prefix: str, sources: Mapping[str, str],
           sections: Mapping[str, type] | None = None) -> Any:
    """Construct dataclass ``cls`` from a mapping, checking keys and types recursively (for
    :class:`Config`, ``sections`` are the recipe's own section classes)."""
    where = prefix.rstrip(".") or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({_source(where, sources)})")
    fields = _fields_of(cls, sections)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise _unknown_key(dotted, where, fields, _source(dotted, sources))
    kwargs: dict[str, Any] = {}
    built_sections: dict[str, Any] = {}
    for name, tp in fields.items():
        if sections and name in sections:
            built_sections[name] = _build(tp, data.get(name), name + ".", sources)
            continue
        if name not in data:
            continue
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], dotted + ".", sources)
            continue
        item = _record_list_item(tp)
        if item is not None:  # a list of records (e.g. cbd.teachers: [{seed: 0, augment: standard}, ...])
            if not isinstance(data[name], (list, tuple)):
                raise ConfigError(f"{dotted}: expected a list of mappings, got {data[name]!r} "
                                  f"({_source(dotted, sources)})")
            kwargs[name] = tuple(_build(item, v, f"{dotted}[{i}].", sources) for i, v in enumerate(data[name]))
            continue
        try:
            kwargs[name] = _coerce(data[name], tp)
        except _Mismatch:
            raise ConfigError(
                f"{dotted}: expected {_type_name(tp)}, got {data[name]!r} ({_source(dotted, sources)})"
            ) from None
    if cls is Config:
        kwargs["sections"] = built_sections
    return cls(**kwargs)


def _source(dotted: str, sources: Mapping[str, str]) -> str:
    """Where ``dotted`` (or its closest parent) was set: an override or the file."""
    key = dotted
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return sources.get("", "defaults")


# ---------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into ``(["a", "b"], yaml.safe_load("value"))``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _apply_override(raw: dict, text: str, sources: dict[str, str], sections: Mapping[str, type]) -> None:
    path, value = parse_override(text)
    node: Any = raw
    cls: Any = Config
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        is_last = i == len(path) - 1
        if cls is dict:  # inside a free-form mapping (model.kwargs): any key
            pass
        else:
            fields = _fields_of(cls, sections)
            if part not in fields:
                parent = ".".join(path[:i]) or "<top level>"
                raise _unknown_key(dotted, parent, fields, f"override {text!r}")
            tp = fields[part]
            if dataclasses.is_dataclass(tp):
                if is_last:
                    raise ConfigError(f"{dotted!r} is a section, set its keys instead (override {text!r})")
                cls = tp
            elif typing.get_origin(tp) is dict:
                cls = dict
            elif not is_last:
                raise ConfigError(f"{dotted!r} is not a section (override {text!r})")
        if is_last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{dotted!r} is not a mapping (override {text!r})")
            node = child
    sources[".".join(path)] = f"override {text!r}"


# ---------------------------------------------------------------------------------------------------
# value validation and derived defaults
# ---------------------------------------------------------------------------------------------------


def _check(cond: bool, key: str, msg: str, sources: Mapping[str, str]) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg} ({_source(key, sources)})")


class Check:
    """``check(cond, "section.key", "must be ...")`` raises a :class:`ConfigError` naming the key and the
    file or override it came from; handed to a recipe section's ``resolve(cfg, check)``."""

    def __init__(self, sources: Mapping[str, str]):
        self.sources = sources

    def __call__(self, cond: bool, key: str, msg: str) -> None:
        _check(cond, key, msg, self.sources)

    def fail(self, key: str, msg: str) -> ConfigError:
        """The error for ``key`` (to ``raise ... from`` a caught exception)."""
        return ConfigError(f"{key}: {msg} ({_source(key, self.sources)})")


def recipe_sections(recipe: str) -> dict[str, type]:
    """The recipe's own sections (name -> dataclass) and, through ``Recipe.STAGES``, its stages.

    Raises:
        ConfigError: the recipe is not registered and is not an importable ``module:Class``.
    """
    return dict(_recipe_class(recipe, {}).SECTIONS)


def _recipe_class(recipe: Any, sources: Mapping[str, str]) -> Any:
    from lfme_fast.recipes import RecipeNotFound, get_recipe

    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"recipe: expected a recipe name, got {recipe!r} ({_source('recipe', sources)})")
    try:
        return get_recipe(recipe)
    except RecipeNotFound as exc:
        raise ConfigError(f"recipe: {exc} ({_source('recipe', sources)})") from None


def _recipes_with_section(name: str) -> list[str]:
    """Registered recipes that own a section called ``name`` (for error hints; never raises)."""
    try:
        from lfme_fast.recipes import RECIPES, get_recipe

        return [r for r in sorted(RECIPES) if name in get_recipe(r).SECTIONS]
    except Exception:  # a hint only: a recipe that fails to import must not mask the real error
        return []


def known_trackers() -> list[str]:
    """Tracker names ``log.trackers`` accepts: Accelerate's built-in ones (whether or not their package is
    installed; that is checked when a run starts) and any class registered with
    ``accelerate.tracking.register_tracker_class``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import LoggerType

    return sorted(set(LoggerType.list()) | set(LOGGER_TYPE_TO_CLASS))


def _resolve_trackers(log: LogConfig, sources: Mapping[str, str]) -> tuple[str, ...]:
    """``log.trackers`` checked (known names, no repeats), plus ``tensorboard`` when the deprecated
    ``log.tensorboard`` is true (so both spellings run the same tracker, once)."""
    known = known_trackers()
    for name in log.trackers:
        _check(name in known, "log.trackers", f"unknown tracker {name!r}; known: {', '.join(known)}", sources)
    _check(len(set(log.trackers)) == len(log.trackers), "log.trackers",
           f"lists a tracker twice: {list(log.trackers)}", sources)
    if log.tensorboard and "tensorboard" not in log.trackers:
        return (*log.trackers, "tensorboard")
    return tuple(log.trackers)


def _validate(cfg: Config, sources: Mapping[str, str]) -> Config:
    """Check values (ranges, cross-field rules) and fill derived defaults; return the resolved config."""
    from lfme_fast.subsets import resolve_thresholds

    _check(bool(cfg.name) and "/" not in cfg.name, "name", f"must be a non-empty name without '/', got {cfg.name!r}",
           sources)
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}", sources)
    allowed = tuple(_recipe_class(cfg.recipe, sources).STAGES)
    stages = cfg.stages if cfg.stages is not None else allowed
    for s in stages:
        _check(s in allowed, "stages", f"{s!r} is not a stage of recipe {cfg.recipe!r} (stages: {list(allowed)})",
               sources)
    _check(len(set(stages)) == len(stages) and len(stages) > 0, "stages",
           f"must be a non-empty list without repeats, got {list(stages)}", sources)
    stages = tuple(s for s in allowed if s in stages)  # the recipe's order, whatever the file's

    d = cfg.data
    _check(d.batch_size is None or d.global_batch_size is None, "data.global_batch_size",
           f"is {d.global_batch_size} but data.batch_size is {d.batch_size} too "
           f"({_source('data.batch_size', sources)}): give the batch per process "
           "(batch_size) or for all processes (global_batch_size), not both; set the other to null", sources)
    for key in ("batch_size", "global_batch_size"):
        _check(getattr(d, key) is None or getattr(d, key) >= 1, f"data.{key}",
               f"must be >= 1 or null, got {getattr(d, key)}", sources)
    if d.batch_size is None and d.global_batch_size is None:
        d = dataclasses.replace(d, batch_size=DEFAULT_BATCH_SIZE)
    _check(d.eval_batch_size is None or d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1", sources)
    _check(d.num_workers is None or d.num_workers >= 0, "data.num_workers", "must be >= 0", sources)
    _check(d.resolution is None or d.resolution >= 8, "data.resolution", "must be >= 8 or null", sources)
    _check(d.hw_decoder_load is None or 0.0 <= d.hw_decoder_load <= 1.0, "data.hw_decoder_load",
           f"must be in [0, 1] or null, got {d.hw_decoder_load}", sources)
    _check(d.hw_decoder_load is None or d.backend == "dali", "data.hw_decoder_load",
           f"applies to data.backend: dali only (its GPU 'mixed' decoding), but data.backend is {d.backend!r}; "
           "set it to null", sources)
    from lfme_fast.loaders import BACKENDS

    _check(d.backend in BACKENDS, "data.backend", f"expected {' | '.join(map(repr, BACKENDS))}, "
           f"got {d.backend!r} (lfme_fast.loaders.register_backend adds one)", sources)

    from lfme_fast.models import MODELS

    _check(cfg.model.arch in MODELS, "model.arch", f"unknown architecture {cfg.model.arch!r}; known: {sorted(MODELS)}",
           sources)
    _check(cfg.model.cosine_scale > 0, "model.cosine_scale", f"must be positive, got {cfg.model.cosine_scale}", sources)

    o = cfg.optim
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}", sources)
    _check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}", sources)
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}", sources)
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs momentum > 0", sources)
    _check(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}", sources)
    _check(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}", sources)
    _check(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", f"must be in [0, epochs={o.epochs})", sources)
    _check(list(o.milestones) == sorted(set(o.milestones)) and all(0 < m < o.epochs for m in o.milestones),
           "optim.milestones", f"must be strictly ascending epochs in (0, {o.epochs}), got {list(o.milestones)}",
           sources)

    t = cfg.train
    _check(t.samples_per_class >= 1, "train.samples_per_class", "must be >= 1", sources)
    _check(t.epoch_samples is None or t.epoch_samples >= 1, "train.epoch_samples", "must be >= 1 or null", sources)
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}", sources)
    _check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
           "must be >= 1 or null", sources)
    _check(t.log_every >= 1, "train.log_every", "must be >= 1", sources)
    _check(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps",
           "must be >= 1 or null", sources)

    try:
        resolve_thresholds(cfg.eval.convention, cfg.eval.thresholds)
    except ValueError as exc:
        raise ConfigError(f"eval.thresholds: {exc} ({_source('eval.thresholds', sources)})") from None

    trackers = _resolve_trackers(cfg.log, sources)

    cfg = dataclasses.replace(
        cfg,
        stages=stages,
        output_dir=cfg.output_dir if cfg.output_dir is not None else f"runs/{cfg.name}",
        # with a global batch the per-process batch (and so the eval default) is known only at launch
        data=dataclasses.replace(d, eval_batch_size=d.eval_batch_size or d.batch_size),
        log=dataclasses.replace(cfg.log, trackers=trackers),
    )
    # Recipe sections last: their derived defaults may read the resolved common sections.
    check = Check(sources)
    resolved = {}
    for name, section in cfg.sections.items():
        resolve = getattr(section, "resolve", None)
        resolved[name] = resolve(cfg, check) if resolve is not None else section
    return dataclasses.replace(cfg, sections=resolved)


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a plain mapping plus ``overrides``."""
    raw = json.loads(json.dumps(raw)) if raw else {}  # deep copy; the caller's dict is left alone
    sources: dict[str, str] = {"": source}
    # The recipe decides which sections exist, so ``recipe=`` overrides go first.
    rest = []
    for text in overrides:
        if parse_override(text)[0] == ["recipe"]:
            _apply_override(raw, text, sources, {})
        else:
            rest.append(text)
    recipe = raw.get("recipe", Config.recipe)
    sections = dict(_recipe_class(recipe, sources).SECTIONS)
    for text in rest:
        _apply_override(raw, text, sources, sections)
    cfg = _build(Config, raw, "", sources, sections)
    return _validate(cfg, sources)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate, resolve defaults.

    Raises:
        ConfigError: unknown key, wrong type or invalid value; the message names the dotted key and
            the file or override it came from.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return config_from_dict(raw or {}, overrides, source=f"file {path}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config or one of its sections; YAML/JSON safe."""

    def conv(v: Any) -> Any:
        if isinstance(v, Config):  # recipe sections sit at the top level, as in the file
            out = {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "sections"}
            out.update({name: conv(sec) for name, sec in v.sections.items()})
            return out
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); ``load_config`` of it gives ``cfg`` back."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))


def _lookup(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node):
            node = getattr(node, part)
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(dotted)
    return node


def fingerprint(cfg: Config, keys: Iterable[str], extra: Mapping[str, Any] | None = None) -> str:
    """Hex digest of the config values at the dotted ``keys`` (plus ``extra``): a stage's identity.

    Two runs whose stage depends only on ``keys`` produce the same outputs when their fingerprints
    match, so a finished stage with a matching fingerprint is skipped.
    """
    payload = {k: config_to_dict(_lookup(cfg, k)) for k in sorted(keys)}
    # A section given a global batch trains the same whatever the process count: its per-process batch
    # (filled in at launch by lfme_fast.scale.resolve_world) is a fact of the launch, not of the
    # experiment, and stays out of the identity (the global batch goes in through ``extra``).
    for k in payload:
        section = k[:-len(".batch_size")] if k.endswith(".batch_size") else k
        sec = _lookup(cfg, section) if "." not in section else None
        if dataclasses.is_dataclass(sec) and getattr(sec, "global_batch_size", None) is not None:
            if k == section:
                payload[k] = {**payload[k], "batch_size": None}
            else:
                payload[k] = None
    if extra:
        payload["__extra__"] = dict(extra)
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def missing_keys(path: str | os.PathLike) -> list[str]:
    """Dotted keys of the schema that the YAML file at ``path`` does not set (free-form mappings such as
    ``model.kwargs`` count as set when present). Used to keep every file in ``configs/`` a complete
    record of its experiment."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    sections = recipe_sections(raw.get("recipe", Config.recipe))

    def walk(cls: type, node: Mapping, prefix: str) -> list[str]:
        out = []
        for name, tp in _fields_of(cls, sections if cls is Config else None).items():
            dotted = prefix + name
            if name not in node:
                out.append(dotted)
            elif dataclasses.is_dataclass(tp) and isinstance(node[name], Mapping):
                out.extend(walk(tp, node[name], dotted + "."))
        return out

    return walk(Config, raw, "")


def _default_text(value: Any) -> str:
    """A default as it would be written in the YAML file (``null``, ``[]``, ``{}``, ``0.1``, ``imagenet``)."""
    text = yaml.safe_dump(config_to_dict(value), default_flow_style=True, width=10_000)
    return text.strip().removesuffix("...").strip()  # a bare scalar document ends with '...'


def _section_lines(cls: type, prefix: str) -> list[str]:
    """``prefix.key = default  (type)`` for every field of the dataclass ``cls``, nested sections flattened."""
    try:
        instance = cls()
    except TypeError:  # a section with required fields: show the fields without defaults
        instance = None
    hints = _hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if f.name == "sections":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(_section_lines(tp, f"{prefix}{f.name}."))
            continue
        default = _default_text(getattr(instance, f.name)) if instance is not None else "(required)"
        item = _record_list_item(tp)
        kind = f"list of {item.__name__} records" if item is not None else _type_name(tp)
        lines.append(f"  {prefix}{f.name} = {default}".ljust(44) + f"  ({kind})")
    return lines


def config_help() -> str:
    """Every config key with its default and type, generated from the dataclasses: the common sections,
    then each registered recipe's own sections (a recipe that cannot be imported is named, not fatal).
    ``lfme-train --help`` prints it."""
    from lfme_fast.recipes import RECIPES, get_recipe

    lines = ["config keys (section.key = default  (type)); set them in the YAML file or as key=value overrides:"]
    lines += _section_lines(Config, "")
    owners: dict[str, list[str]] = {}
    classes: dict[str, type] = {}
    problems = []
    for name in sorted(RECIPES):
        try:
            recipe = get_recipe(name)
        except Exception as exc:  # help must still print while one recipe module is broken
            problems.append(f"  recipe {name!r} cannot be loaded: {exc}")
            continue
        for section, cls in recipe.SECTIONS.items():
            owners.setdefault(section, []).append(name)
            classes[section] = cls
    for section in sorted(classes):
        lines += ["", f"section {section!r} (recipe {', '.join(owners[section])}; only in such a config):"]
        lines += _section_lines(classes[section], f"{section}.")
    if problems:
        lines += [""] + problems
    return "\n".join(lines)
