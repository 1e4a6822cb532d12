"""Compare named rows (a config file plus overrides) over seeds under one protocol.

``python -m lfme_fast.compare --data DIR --rows ecl,ecl_no_kd,balanced_softmax --seeds 0,1,2 --out DIR
[--reference ROW] [--name NAME] [--report-dir DIR] [--title TEXT] [--note TEXT ...] [--set key=value ...]``

A **row** is a named ``(config file, overrides)`` pair from :data:`ROWS` (start: the ECL ablation and the
balanced-softmax single model on Fashion-MNIST-LT). Every run is ``OUT/<row>/seed<s>/``, a normal run
folder. ``--set`` overrides go to every row, after the row's own overrides (so a budget such as
``optim.epochs=4`` applies to all); one that would replace a value a row sets itself (``--set
lfme.spis=official`` on ``lfme_kd``, which turns SpIS off) is an error naming the row, the key and both
values, since the row would become another method under its old label.

**One protocol.** The rows must agree on every key in :data:`PROTOCOL_KEYS` (backbone, optimiser and
epochs, batch size, samples per epoch, augmentation, splits, precision, evaluation); a disagreement is
an error naming the key and the rows, before anything trains. What rows may differ in (recipe, sampler,
loss, the recipe's own sections) is written per row, including how many augmented views of each
sample a step sees (ECL's contrastive branch trains on two).

**Resumable.** A run whose ``metrics.json`` exists next to this runner's ``compare.json`` marker for the
same resolved config is not started again; any other run goes through the recipe, whose stage
fingerprints skip finished stages and resume interrupted ones from their checkpoints (the page names
the resumed runs: their wall time covers the last invocation only). The marker is removed before the
recipe starts, so an interrupted re-run never leaves an old marker claiming the folder; a re-run that
trains nothing (no training stage's ``done.json`` nor the offline store rewritten, e.g. after
``log.progress`` changed or when only the evaluation ran again) adds its seconds to the earlier marker's, so a run's wall time stays its training time.

**Report** (``REPORT/<name>.json`` and ``.md``, ``REPORT`` = ``--report-dir``, default ``OUT``): per row
the test top-1 for many / medium / few / overall as mean ± sample std over seeds, every seed's value,
and per row the per-seed paired difference from the reference row (``--reference``, default the first
row); plus the protocol (epochs, samples per epoch, augmentation, backbone, views per sample, machine
and library versions) and every run's wall time.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lfme_fast.io import atomic_write_json, atomic_write_text

__all__ = ["Row", "ROWS", "PROTOCOL_KEYS", "COLUMNS", "register_row", "row_config", "check_protocol",
           "describe_protocol", "run_rows", "run_stages", "val_curves", "movement", "check_overrides",
           "check_preset_data", "summarise", "format_markdown", "main"]

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
#: Report columns: the three subsets of ``eval`` and the overall top-1.
COLUMNS = ("many", "medium", "few", "overall")
#: Keys every row of one comparison must share (the protocol); dotted config keys or whole sections.
PROTOCOL_KEYS = (
    "data.root", "data.backend", "data.batch_size", "data.global_batch_size", "data.resolution", "data.augment",
    "data.train_split", "data.val_split", "data.test_split", "model.arch", "model.kwargs", "model.pretrained", "optim",
    "train.epoch_samples", "train.max_steps_per_epoch", "train.grad_accum", "precision", "eval",
)
MARKER = "compare.json"


@dataclass(frozen=True)
class Row:
    """One row of a comparison: ``config`` (relative to ``configs/``, or absolute) with ``overrides``.

    ``shares``: folders of the run (e.g. ``experts``, ``offline``) this row takes from row
    ``share_from``'s run of the same seed, linked before it runs: that row must come earlier in
    ``--rows`` and trains them, this one finds them up to date. Nothing is reused silently: a linked
    training stage (``experts/<subset>``) whose fingerprint does not match this row's is an error
    (the recipe never trains into another run's folder), while a linked store (``offline``) whose
    header does not match is rebuilt in this row's own run folder, replacing the link (the row then
    pays for its own store, and a later invocation that has to run this row again stops at
    :func:`link_shares` until that folder is removed).
    """

    config: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    note: str = ""
    shares: tuple[str, ...] = ()
    share_from: str | None = None

    @property
    def path(self) -> Path:
        p = Path(self.config)
        return p if p.is_absolute() else CONFIG_DIR / p


#: The registry of rows by name (:func:`register_row` adds one).
ROWS: dict[str, Row] = {}


def register_row(name: str, row: Row) -> Row:
    """Add ``row`` to :data:`ROWS` under ``name`` (an existing name is an error: rows are results' keys)."""
    if name in ROWS:
        raise ValueError(f"row {name!r} is already registered ({ROWS[name]})")
    ROWS[name] = row
    return row


# The baselines of the full comparison (issue 12's row set).
register_row("ce_instance", Row("fmnist_lt/ce_instance.yaml", label="CE, instance sampling"))
register_row("ce_balanced", Row("fmnist_lt/ce_balanced.yaml", label="CE, class-balanced sampling"))
register_row("logit_adjusted", Row("fmnist_lt/logit_adjusted.yaml", label="Logit-adjusted loss"))

# LFME's Table 3 rows on one expert run and one store per seed (the `lfme` row trains them).
_LFME = "fmnist_lt/lfme.yaml"
register_row("lfme", Row(_LFME, label="LFME (class-balanced + KD + SpES + SpIS)"))
register_row("lfme_kd", Row(_LFME, ("lfme.spes=off", "lfme.spis=off"), "Class-balanced + KD",
                            "LFME's student without its two schedules", ("experts", "offline"), "lfme"))
register_row("lfme_kd_spes", Row(_LFME, ("lfme.spis=off",), "Class-balanced + KD + SpES",
                                 "LFME without SpIS", ("experts", "offline"), "lfme"))

_ECL = "fmnist_lt/ecl.yaml"
register_row("ecl", Row(_ECL, label="ECL (full)", note="KD + re-weighting + feature KD + contrastive"))
# Re-weighting only scales the distillation term, so without KD it has nothing to act on: off too.
register_row("ecl_no_kd", Row(_ECL, ("ecl.kd=false", "ecl.reweight=false"), "ECL without KD",
                              "no online distillation (so no re-weighting either)"))
register_row("ecl_no_reweight", Row("fmnist_lt/ecl_no_reweight.yaml", label="ECL without re-weighting",
                                    note="plain online distillation (omega = 1)"))
register_row("ecl_no_feature_kd", Row(_ECL, ("ecl.feature_kd=false",), "ECL without feature KD"))
register_row("ecl_no_contrastive", Row(_ECL, ("ecl.contrastive=false",), "ECL without contrastive",
                                       "one view per sample"))
register_row("balanced_softmax", Row("fmnist_lt/balanced_softmax.yaml", label="Balanced Softmax (one model)"))

# CBD rows: the reference is the same recipe with alpha = 0 (class-balanced CE on the same stored views,
# cosine classifier), so the rows differ only in the distillation term.
register_row("cbd_ce", Row("fmnist_lt/cbd.yaml", ("cbd.alpha=0.0",), "Class-balanced CE (CBD student, alpha 0)",
                           "same sampler, stored views and cosine classifier as CBD; no distillation"))
register_row("cbd", Row("fmnist_lt/cbd.yaml", label="CBD (1 standard teacher)"))
register_row("cbd_ens", Row("fmnist_lt/cbd_ens.yaml", label="CBD-ENS (2 standard + 2 strong teachers)"))


@dataclass(frozen=True)
class Preset:
    """A named comparison: its rows, seeds and comparison-wide overrides (``--preset NAME``).

    ``data``: the prepared dataset used when ``--data`` is not given. ``permuted_order``: the preset
    needs a permuted class order, i.e. a dataset whose ``manifest.json`` records ``source.class_order``
    (``data_prep fmnist-lt --class-order SEED``); other data is refused (:func:`check_preset_data`).
    """

    rows: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    about: str = ""
    data: str = "data/fmnist_lt_ir100"
    permuted_order: bool = False


#: The budget of the Fashion-MNIST-LT comparison (3 seeds x 11 rows + the permuted-order table within
#: 3 hours on 2 CPU cores): the ffcv back end (one decode worker), a narrower resnet_small28 (stem 8,
#: widths 16/32/64), 6 student epochs
#: over the training split, experts 8 epochs, CBD teachers 6; the offline rows replay every pad-crop
#: view, each stored row computed only if the student draws it.
FMNIST_PROTOCOL = ("data.backend=ffcv", "data.num_workers=1",
                   "model.kwargs={stem_width: 8, widths: [16, 32, 64]}", "optim.epochs=6", "experts.epochs=8",
                   "cbd.epochs=6", "lfme.views=all", "lfme.fill=drawn", "cbd.views=all", "cbd.fill=drawn",
                   "log.progress=false")
FULL_ROWS = ("ce_balanced", "ce_instance", "balanced_softmax", "logit_adjusted", "lfme", "lfme_kd", "lfme_kd_spes",
             "cbd_ens", "cbd", "ecl", "ecl_no_reweight")
PRESETS: dict[str, Preset] = {
    "fmnist_lt": Preset(FULL_ROWS, (0, 1, 2), FMNIST_PROTOCOL, "every method on Fashion-MNIST-LT"),
    "fmnist_lt_order": Preset(("ce_balanced", "lfme", "cbd_ens", "ecl"), (0, 1, 2), FMNIST_PROTOCOL,
                              "the harder variant: a permuted class order (data_prep fmnist-lt --class-order)",
                              data="data/fmnist_lt_ir100_order1", permuted_order=True),
    # every row's code path on a tiny budget (a few minutes on 2 cores; the tests run it)
    "quick": Preset(FULL_ROWS, (0,), ("model.kwargs={stem_width: 8, widths: [16, 32, 64]}", "optim.epochs=2",
                                      "train.max_steps_per_epoch=2", "experts.epochs=1", "experts.eval_test=false",
                                      "cbd.epochs=1", "lfme.views=all", "lfme.fill=drawn", "cbd.views=all",
                                      "cbd.fill=drawn", "log.progress=false"), "a smoke run of every row"),
}


def check_preset_data(name: str, data: str | Path) -> None:
    """Refuse ``data`` for preset ``name`` when the preset needs a permuted class order and the
    dataset's ``manifest.json`` does not record one (``source.class_order``)."""
    preset = PRESETS[name]
    if not preset.permuted_order:
        return
    make = (f"make it with `python -m data_prep fmnist-lt --root FMNIST_ROOT --imbalance-ratio 100 --class-order 1 "
            f"--out {preset.data}` (or `make compare-fmnist-lt`) and pass it with --data")
    manifest = Path(data) / "manifest.json"
    try:
        source = json.loads(manifest.read_text()).get("source") or {}
    except OSError:
        raise ValueError(f"preset {name!r} needs a dataset with a permuted class order, but {data} has no "
                         f"manifest.json: {make}") from None
    except ValueError as exc:
        raise ValueError(f"preset {name!r}: cannot read {manifest} ({exc})") from None
    if source.get("class_order") is None:
        raise ValueError(f"preset {name!r} needs a dataset with a permuted class order, but {data} has the "
                         f"label order (its manifest.json records no source.class_order): {make}")


# ---------------------------------------------------------------------------------------------------
# configs and the protocol
# ---------------------------------------------------------------------------------------------------


def _sections(row: Row) -> frozenset[str]:
    """The top-level keys of the row's config file."""
    return frozenset(_file_raw(row.path))


@functools.lru_cache(maxsize=None)
def _file_raw(path: Path) -> dict[str, Any]:
    """A config file as parsed YAML (read once: every override asks for every row's; not to be changed)."""
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    return raw if isinstance(raw, dict) else {}


def row_overrides(name: str, overrides: Sequence[str]) -> list[str]:
    """The comparison-wide ``overrides`` that apply to row ``name``: all of them, except those of a
    recipe's own section (``lfme.*``, ``cbd.*``...) that the row's config does not have."""
    import dataclasses

    from lfme_fast.config import Config

    have = _sections(get_row(name)) | {f.name for f in dataclasses.fields(Config)}
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in have]


def _overlap(a: str, b: str) -> bool:
    """Whether dotted keys ``a`` and ``b`` set the same value (equal, or one inside the other)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


_UNSET = object()


@functools.lru_cache(maxsize=None)
def _definition(name: str) -> dict[str, Any]:
    """Row ``name``'s own definition as a raw config dict: its file with its overrides applied."""
    import copy

    from lfme_fast.config import parse_override

    row = get_row(name)
    raw = copy.deepcopy(_file_raw(row.path))
    for o in row.overrides:
        key, value = parse_override(o)
        node = raw
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return raw


def _defined_value(name: str, key: Sequence[str]) -> Any:
    node: Any = _definition(name)
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _check_distinguishing(override: str, rows: Sequence[str]) -> None:
    """Refuse ``override`` when its key tells registered rows apart (they define it differently, e.g.
    ``lfme.spis``, ``ecl.kd``, ``train.sampler``) and it would change what one of ``rows`` defines:
    the row would run another method under its label. Protocol keys (:data:`PROTOCOL_KEYS`, which an
    override is meant to make equal) and ``log.*`` are exempt."""
    from lfme_fast.config import parse_override

    key, value = parse_override(override)
    dotted = ".".join(key)
    if key[0] == "log" or any(_overlap(dotted, p) for p in PROTOCOL_KEYS):
        return
    have = [n for n in ROWS if override in row_overrides(n, [override])]
    defined = {n: _defined_value(n, key) for n in have}
    distinct = {json.dumps(v, sort_keys=True, default=str) for v in defined.values() if v is not _UNSET}
    if len(distinct) < 2:
        return
    for r in rows:
        if defined.get(r, _UNSET) is not _UNSET and defined[r] != value:
            others = ", ".join(f"{n}: {defined[n]!r}" for n in have if defined[n] is not _UNSET and n != r)
            raise ValueError(
                f"override {override!r} would change what row {r!r} is: {dotted} is {defined[r]!r} in that row, "
                f"and it tells rows apart ({others}); compare the row that has the value you want instead")


def check_overrides(rows: Sequence[str], overrides: Sequence[str]) -> None:
    """Every override must apply to at least one row (a misspelt section would otherwise vanish), and
    none may replace a key a row sets itself with another value (the row would become another method
    under its own label; the same value is allowed, it changes nothing for that row)."""
    from lfme_fast.config import parse_override

    for o in overrides:
        applies = [r for r in rows if o in row_overrides(r, [o])]
        if not applies:
            raise ValueError(f"override {o!r} applies to none of the rows {list(rows)}: no row's config has the "
                             f"section {o.split('=', 1)[0].split('.', 1)[0]!r}")
        _check_distinguishing(o, applies)
    for r in rows:
        own = get_row(r).overrides
        for o in row_overrides(r, overrides):
            key, value = parse_override(o)
            for mine in own:
                my_key, my_value = parse_override(mine)
                if _overlap(".".join(key), ".".join(my_key)) and (key != my_key or value != my_value):
                    raise ValueError(
                        f"override {o!r} would replace a value row {r!r} sets itself: {'.'.join(my_key)} is "
                        f"{mine.partition('=')[2].strip()!r} in that row and {o.partition('=')[2].strip()!r} in the "
                        f"override, so the row would no longer be what its label says; leave "
                        f"{'.'.join(key)} to the rows, or compare that row separately")


def row_config(name: str, data: str | Path, seed: int, run_dir: str | Path, overrides: Sequence[str] = ()) -> Any:
    """The resolved config of row ``name`` for ``seed`` in ``run_dir`` (row overrides, then those of
    ``overrides`` that apply to it, :func:`row_overrides`)."""
    from lfme_fast.config import load_config

    row = get_row(name)
    return load_config(row.path, [*row.overrides, f"data.root={json.dumps(str(data))}",
                                  *row_overrides(name, overrides), f"seed={seed}",
                                  f"output_dir={json.dumps(str(run_dir))}"])


def link_shares(name: str, run_dir: Path, out: Path, seed: int) -> None:
    """Link row ``name``'s shared folders to its ``share_from`` row's run of ``seed`` (relative links)."""
    row = get_row(name)
    for rel in row.shares:
        target = out / row.share_from / f"seed{seed}" / rel
        link = run_dir / rel
        if not target.exists():
            raise RuntimeError(f"row {name!r} shares {rel!r} with row {row.share_from!r}, but {target} does not "
                               f"exist: list {row.share_from!r} before {name!r} in --rows")
        link.parent.mkdir(parents=True, exist_ok=True)
        want = os.path.relpath(target, link.parent)
        if link.is_symlink() and os.readlink(link) == want:
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise RuntimeError(f"{link} exists and is not a link to {target}: remove it to share {rel!r}")
        os.symlink(want, link)


def get_row(name: str) -> Row:
    """The registered row ``name``; a clear error listing the known rows otherwise."""
    try:
        return ROWS[name]
    except KeyError:
        raise ValueError(f"unknown row {name!r}; known rows: {', '.join(ROWS)}") from None


def _value(cfg: Any, dotted: str) -> Any:
    from lfme_fast.config import config_to_dict

    node: Any = config_to_dict(cfg)
    for part in dotted.split("."):
        node = node[part]
    return node


def check_protocol(configs: Mapping[str, Any]) -> dict[str, Any]:
    """The shared values of :data:`PROTOCOL_KEYS` over ``configs`` (row name -> config).

    Raises:
        ValueError: rows disagree on a key; the message names the key and each row's value.
    """
    shared: dict[str, Any] = {}
    for key in PROTOCOL_KEYS:
        values = {name: _value(cfg, key) for name, cfg in configs.items()}
        distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
        if len(distinct) > 1:
            detail = "; ".join(f"{n}: {json.dumps(v, sort_keys=True)}" for n, v in values.items())
            raise ValueError(f"the rows do not share one protocol: {key} differs ({detail}); set it for all "
                             f"rows with --set {key}=...")
        shared[key] = next(iter(values.values()))
    return shared


def views_per_sample(cfg: Any) -> int:
    """Augmented views of each sample one training step sees (2 for ECL's contrastive branch, else 1)."""
    section = cfg.sections.get("ecl") if hasattr(cfg, "sections") else None
    return 2 if section is not None and section.contrastive else 1


def row_facts(cfg: Any) -> dict[str, Any]:
    """What a row may differ in from the others: recipe, sampler, loss, models, views per sample."""
    facts: dict[str, Any] = {"recipe": cfg.recipe, "sampler": cfg.train.sampler, "loss": cfg.train.loss,
                             "views_per_sample": views_per_sample(cfg), "models": 1}
    if "ecl" in cfg.sections:
        e = cfg.ecl
        facts["models"] = e.num_experts
        facts["ecl"] = {k: getattr(e, k) for k in ("num_experts", "shared_stages", "kd", "reweight", "feature_kd",
                                                   "contrastive")}
    return facts


def _train_size(root: str) -> int | None:
    try:
        manifest = json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("splits", {}).get("train", {}).get("num_samples")


def describe_protocol(shared: Mapping[str, Any], facts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The protocol in words and numbers (epochs, samples per epoch, augmentation, backbone, views, machine)."""
    from lfme_fast.bench.common import machine_info

    optim = shared["optim"]
    size = _train_size(shared["data.root"])
    samples = shared["train.epoch_samples"] or size
    source = "train.epoch_samples" if shared["train.epoch_samples"] else f"the training split ({size} images)"
    steps_cap = shared["train.max_steps_per_epoch"]
    batch = shared["data.batch_size"] if shared["data.batch_size"] is not None else shared["data.global_batch_size"]
    if steps_cap is not None and samples is not None and batch is not None:
        accum = shared["train.grad_accum"]
        capped = steps_cap * batch * accum
        if capped < samples:
            samples = capped
            source += (f", capped by train.max_steps_per_epoch={steps_cap} (steps of batch {batch}"
                       + (f" x grad_accum {accum}" if accum != 1 else "") + ")")
    two = [n for n, f in facts.items() if f["views_per_sample"] == 2]
    augment = shared["data.augment"]
    aug_text = {"auto": "auto: pad-crop (4 px zero padding, random corner) + horizontal flip for images of at "
                        "most 64 px such as Fashion-MNIST's 28 px, RandomResizedCrop + flip above",
                "pad_crop": "pad-crop (4 px zero padding) + horizontal flip",
                "imagenet": "RandomResizedCrop + horizontal flip", "none": "none"}.get(augment, augment)
    views = ("every row trains on one augmented view per sample" if not two else
             f"{', '.join(two)} train on two independently augmented views of each sample per step (the second "
             f"view feeds only the contrastive loss), the other rows on one")
    machine = machine_info()
    gpu = machine.get("gpu") if machine.get("cuda_available") else None
    return {
        "epochs": optim["epochs"], "samples_per_epoch": samples,
        "samples_per_epoch_source": source,
        "batch_size": shared["data.batch_size"], "optimiser": optim, "augmentation": aug_text,
        "backbone": shared["model.arch"], "views": views, "evaluation": shared["eval"],
        "test_split": shared["data.test_split"], "data": shared["data.root"], "shared_keys": dict(shared),
        "machine_text": f"{machine.get('cpu_count')}-core CPU ({machine.get('cpu_model')})"
                        + (f", GPU {gpu}" if gpu else ", no GPU"),
        "machine": machine,
    }


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------


def _config_sha(cfg: Any) -> str:
    from lfme_fast.config import config_to_dict

    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:20]


def _main_process() -> bool:
    # Under ``accelerate launch`` every rank runs this loop; only rank 0 writes the runner's files.
    return int(os.environ.get("RANK", "0")) == 0


def _finished(run_dir: Path, sha: str | None) -> dict[str, Any] | None:
    """The marker of a finished run of exactly this config (``sha`` None: of any config), or None."""
    try:
        marker = json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    same = sha is None or marker.get("config_sha") == sha
    return marker if same and (run_dir / "metrics.json").exists() else None


def _file_state(path: Path) -> tuple[int, bytes] | None:
    """``(mtime_ns, content)`` of ``path`` (None when it does not exist): equal before and after a
    recipe run means the run did not write it."""
    try:
        return path.stat().st_mtime_ns, path.read_bytes()
    except OSError:
        return None


def _training_state(run_dir: Path, cfg: Any) -> tuple | None:
    """What a run that trains anything rewrites: the ``done.json`` of every training stage of ``cfg``
    (:func:`run_stages`) and the offline store's header, as :func:`_file_state`s; None when one is
    missing (then something will train). A recipe this runner does not know: its ``metrics.json``."""
    from lfme_fast.checkpoint import DONE

    stages = run_stages(cfg)
    if stages is None:
        state = _file_state(run_dir / "metrics.json")
        return None if state is None else (state,)
    files = [run_dir / s / DONE for s in stages]
    if (run_dir / "offline").exists():
        files.append(run_dir / "offline" / "header.json")
    states = tuple(_file_state(f) for f in files)
    return None if any(st is None for st in states) else states


def _subset_row(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    subs = metrics["subsets"]
    return {"many": subs.get("many", {}).get("top1"), "medium": subs.get("medium", {}).get("top1"),
            "few": subs.get("few", {}).get("top1"), "overall": metrics.get("top1")}


def run_rows(data: str | Path, out: str | Path, rows: Sequence[str], seeds: Sequence[int],
             overrides: Sequence[str] = (), *, log: Callable[[str], None] = print,
             runner: Callable[[Any], Any] | None = None, report_only: bool = False) -> dict[str, Any]:
    """Train and evaluate every (row, seed) not yet finished; returns the raw results.

    ``{"rows": {row: {seed: {"many", "medium", "few", "overall"}}}, "seconds": {row: {seed: s}},
    "configs": {row: cfg of the first seed}, "skipped": [...]}``. The protocol is checked first
    (:func:`check_protocol`), so a mismatch fails before anything trains.
    """
    if runner is None:
        from lfme_fast.recipes import run as runner
    if not rows or not seeds:
        raise ValueError("need at least one row and one seed")
    if len(set(rows)) != len(rows):
        raise ValueError(f"a row is named twice in {list(rows)}")
    out = Path(out)
    for r in rows:
        share_from = get_row(r).share_from
        if share_from is not None and (share_from not in rows or rows.index(share_from) > rows.index(r)):
            raise ValueError(f"row {r!r} shares {', '.join(get_row(r).shares)} with row {share_from!r}: list "
                             f"{share_from!r} before it in --rows")
    check_overrides(rows, overrides)
    plan = {(r, s): row_config(r, data, s, out / r / f"seed{s}", overrides) for r in rows for s in seeds}
    check_protocol({r: plan[(r, seeds[0])] for r in rows})
    results: dict[str, dict[int, dict[str, float | None]]] = {r: {} for r in rows}
    seconds: dict[str, dict[int, float]] = {r: {} for r in rows}
    skipped: list[str] = []
    resumed: list[str] = []
    stale: list[str] = []
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):  # seed-major: a partial comparison has every row for its first seeds
        for j, name in enumerate(rows):
            cfg = plan[(name, seed)]
            run_dir, sha = Path(cfg.run_dir), _config_sha(cfg)
            marker = _finished(run_dir, sha)
            if report_only and marker is None:
                # the run as it is: it finished, but for another resolved config than this command's
                marker = _finished(run_dir, None)
                if marker is None:
                    raise ValueError(f"--report-only: {name}/seed{seed} has not finished ({run_dir} has no "
                                     f"{MARKER} and metrics.json); run without --report-only first")
                stale.append(f"{name}/seed{seed}")
            if marker is not None:
                skipped.append(f"{name}/seed{seed}")
                seconds[name][seed] = marker["seconds"]
                if marker.get("resumed"):
                    resumed.append(f"{name}/seed{seed}")
            else:
                # An interrupted run resumes from its checkpoint: its time then covers this invocation only.
                if _main_process():
                    link_shares(name, run_dir, out, seed)
                was_started = any(run_dir.glob("**/checkpoints/latest.json"))
                # The earlier marker (another config's) and result: a re-run that trains nothing keeps its time.
                earlier = _finished(run_dir, None)
                before = _training_state(run_dir, cfg)
                if _main_process():
                    # no marker while the recipe runs: an interrupted re-run leaves none claiming the folder
                    (run_dir / MARKER).unlink(missing_ok=True)
                log(f"[compare] seed {seed} ({i + 1}/{len(seeds)}), row {name} ({j + 1}/{len(rows)}) in {run_dir} "
                    f"({time.perf_counter() - t0:.0f} s so far)")
                start = time.perf_counter()
                runner(cfg)
                seconds[name][seed] = round(time.perf_counter() - start, 1)
                if earlier is not None and before is not None and _training_state(run_dir, cfg) == before:
                    # every training stage was up to date (none rewrote its done.json; an evaluation may have
                    # run again): the training time is the earlier run's
                    seconds[name][seed] = round(seconds[name][seed] + float(earlier.get("seconds", 0.0)), 1)
                    was_started = was_started or bool(earlier.get("resumed"))
                if _main_process():
                    atomic_write_json(run_dir / MARKER, {"row": name, "seed": seed, "config_sha": sha,
                                                         "seconds": seconds[name][seed], "resumed": was_started})
                if was_started:
                    resumed.append(f"{name}/seed{seed}")
            results[name][seed] = _subset_row(json.loads((run_dir / "metrics.json").read_text()))
    return {"rows": results, "seconds": seconds, "configs": {r: plan[(r, seeds[0])] for r in rows},
            "all_configs": {r: {s: plan[(r, s)] for s in seeds} for r in rows},
            "skipped": skipped, "resumed": resumed, "stale": stale, "wall_seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# convergence
# ---------------------------------------------------------------------------------------------------

#: A run still moving: its val top-1 changed by more than this (percentage points) over the last fifth
#: of its epochs.
MOVING_POINTS = 0.5
#: The stage of a run whose curve is the row's (the model that is evaluated), by recipe.
MAIN_STAGE = {"baseline": "train", "ecl": "train", "lfme": "student", "cbd": "student"}


def run_stages(cfg: Any) -> list[str] | None:
    """The training-stage folders (relative to the run folder) that ``cfg``'s run consists of: the
    evaluated model's (:data:`MAIN_STAGE`), one ``experts/<subset>`` per subset of the ``experts``
    section (LFME) and one ``teachers/t<k>`` per entry of ``cbd.teachers`` (CBD), whether this
    invocation trains them or an earlier one did (``stages`` does not matter: a later stage builds on
    them either way). None for a recipe this runner does not know (then every stage folder counts).

    The rule is by name, not by the folders on disk: a folder left by an earlier config of the same run
    folder (``teachers/t3`` after fewer teachers, ``experts/medium`` after two thresholds) is not the
    current config's and is left out; a folder the config does name was trained (or found up to date)
    under the current config's fingerprint by the finished run, so its log is this run's.
    """
    from lfme_fast.subsets import resolve_thresholds, subset_names

    recipe = cfg.recipe
    if recipe not in MAIN_STAGE and recipe != "experts":
        return None
    stages = []
    if "experts" in cfg.sections:
        e = cfg.experts
        stages += [f"experts/{n}" for n in subset_names(len(resolve_thresholds(e.convention, e.thresholds)) + 1)]
    if "cbd" in cfg.sections:
        stages += [f"teachers/t{k}" for k in range(len(cfg.cbd.teachers))]
    if recipe in MAIN_STAGE:
        stages.append(MAIN_STAGE[recipe])
    return stages


def val_curves(run_dir: str | Path, stages: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Each training stage's per-epoch ``val_top1`` (fractions) by the stage folder relative to
    ``run_dir`` (``train``, ``student``, ``experts/many``, ``teachers/t0``...), for the folders in
    ``stages`` (:func:`run_stages`; None: every folder under ``run_dir`` with a ``log.jsonl``); shared
    folders (links to another row's run) included. Stages that logged no val accuracy are left out."""
    run_dir = Path(run_dir)
    if stages is None:
        folders = [Path(f) for f, _, files in os.walk(run_dir, followlinks=True) if "log.jsonl" in files]
    else:
        folders = [run_dir / s for s in stages if (run_dir / s / "log.jsonl").is_file()]
    out: dict[str, list[float]] = {}
    for folder in folders:
        values = []
        for line in (folder / "log.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "start":
                values = []  # a stage trained again in its folder: only its last training counts
            elif rec.get("event") == "epoch" and rec.get("val_top1") is not None:
                values.append(float(rec["val_top1"]))
        if values:
            out[os.path.relpath(folder, run_dir)] = values
    return dict(sorted(out.items()))


def movement(values: Sequence[float]) -> dict[str, Any]:
    """How much a val curve (fractions) still moved at the end: the range (max - min, in points) of
    its values over the last fifth of its epochs (``round(E / 5)`` epochs, at least one) and at the
    start of that fifth (the epoch before); ``moving`` when that exceeds :data:`MOVING_POINTS`. A
    one-epoch curve cannot be judged (``moving`` None).

    ``window_epochs`` counts the epoch-end values the range is taken over: the last fifth's epochs
    plus the one before it (so one more than the epochs of the last fifth)."""
    if len(values) < 2:
        return {"epochs": len(values), "last": 100 * values[-1] if values else None, "moved": None, "moving": None}
    window = values[-(max(1, round(len(values) / 5)) + 1):]
    moved = round(100 * (max(window) - min(window)), 6)  # 1 of 200 val images is 0.5 points exactly
    return {"epochs": len(values), "last": 100 * values[-1], "moved": moved,
            "window_epochs": len(window), "moving": moved > MOVING_POINTS}


def convergence(configs: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{row: {seed: {stage: movement(...)}}}`` for every run (``configs[row][seed]``)."""
    return {row: {str(seed): {stage: {**movement(v), "main": stage == MAIN_STAGE.get(cfg.recipe)}
                              for stage, v in val_curves(cfg.run_dir, run_stages(cfg)).items()}
                  for seed, cfg in per_seed.items()}
            for row, per_seed in configs.items()}


def _moving_lines(conv: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Sequence[str]) -> list[str]:
    lines = []
    for row in rows:
        for seed, stages in conv.get(row, {}).items():
            for stage, m in stages.items():
                if m["moving"]:
                    what = "the evaluated model" if m["main"] else "a stage it builds on"
                    last = m["window_epochs"] - 1  # the window holds the epoch before the last fifth too
                    span = (f"epoch {m['epochs']}" if last == 1 else f"epochs {m['epochs'] - last + 1}-{m['epochs']}")
                    lines.append(f"- `{row}` seed {seed}, `{stage}` ({what}): val top-1 moved {m['moved']:.1f} points "
                                 f"over its last {last} epoch{'s' if last > 1 else ''} ({span} of {m['epochs']}, "
                                 f"measured from epoch {m['epochs'] - last}), ending at {m['last']:.1f}%.")
    return lines


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def summarise(results: Mapping[str, Mapping[int, Mapping[str, float | None]]], seeds: Sequence[int],
              reference: str) -> dict[str, Any]:
    """Per row and column: mean ± sample std over seeds (in %), and the per-seed paired difference
    from ``reference`` (percentage points; only seeds both rows have)."""
    if reference not in results:
        raise ValueError(f"reference row {reference!r} is not among the rows {list(results)}")
    out: dict[str, Any] = {}
    ref = results[reference]
    for name, per_seed in results.items():
        entry: dict[str, Any] = {"per_seed": {str(s): {c: _pct(per_seed[s][c]) for c in COLUMNS}
                                              for s in seeds if s in per_seed}}
        for c in COLUMNS:
            vals = [100.0 * per_seed[s][c] for s in seeds if s in per_seed and per_seed[s][c] is not None]
            diffs = {str(s): 100.0 * (per_seed[s][c] - ref[s][c]) for s in seeds
                     if s in per_seed and s in ref and per_seed[s][c] is not None and ref[s][c] is not None}
            entry[c] = {**_stats(vals), "diff": {**_stats(list(diffs.values())), "per_seed": diffs}}
        out[name] = entry
    return out


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _cell(s: Mapping[str, Any], signed: bool = False) -> str:
    if s["mean"] is None:
        return "–"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(s["mean"])
    return text if s["std"] is None else f"{text} ± {s['std']:.2f}"


def format_markdown(summary: Mapping[str, Any], rows: Sequence[str], seeds: Sequence[int], reference: str,
                    protocol: Mapping[str, Any], facts: Mapping[str, Mapping[str, Any]], title: str,
                    overrides: Sequence[str] = (), seconds: Mapping[str, Mapping[int, float]] | None = None,
                    convention: str | None = None, resumed: Sequence[str] = (), notes: Sequence[str] = (),
                    conv: Mapping[str, Any] | None = None, report_name: str | None = None) -> str:
    """The markdown page: protocol, the mean ± std table, the paired-difference table, the runs still
    moving at the end (:func:`movement`), the plots (``report_name``), the rows' definitions and wall times."""
    n = len(seeds)
    lines = [f"# {title}", "",
             f"Test top-1 (%), mean ± sample std over {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}). "
             f"Subsets by training count: {convention or protocol['evaluation']}; many / medium / few are "
             f"the mean of their classes' accuracies, overall is over all test images.", "",
             "**Protocol (every row):** "
             f"backbone {protocol['backbone']}; {protocol['epochs']} epochs of {protocol['samples_per_epoch']} "
             f"samples ({protocol['samples_per_epoch_source']}), batch {protocol['batch_size']}, "
             f"SGD lr {protocol['optimiser']['lr']} ({protocol['optimiser']['schedule']}), weight decay "
             f"{protocol['optimiser']['weight_decay']}; augmentation {protocol['augmentation']}; {protocol['views']}; "
             f"evaluated on the `{protocol['test_split']}` split. "
             f"Overrides for every row: {' '.join(f'`{o}`' for o in overrides) if overrides else 'none'}. "
             f"Machine: {protocol['machine_text']}.", "",
             *([*(f"- {n}" for n in notes), ""] if notes else []),
             "| row | models | views | many | medium | few | overall |", "|---|---|---|---|---|---|---|"]
    for name in rows:
        f = facts[name]
        cells = " | ".join(_cell(summary[name][c]) for c in COLUMNS)
        lines.append(f"| {_label(name)} | {f['models']} | {f['views_per_sample']} | {cells} |")
    lines += ["", f"**Paired difference from `{reference}`** (percentage points, the same seed for both rows; "
                  "mean ± sample std of the per-seed differences):", "",
              "| row | many | medium | few | overall | overall per seed |", "|---|---|---|---|---|---|"]
    for name in rows:
        if name == reference:
            continue
        cells = " | ".join(_cell(summary[name][c]["diff"], signed=True) for c in COLUMNS)
        per = ", ".join(f"{v:+.2f}" for v in summary[name]["overall"]["diff"]["per_seed"].values())
        lines.append(f"| {_label(name)} | {cells} | {per} |")
    if conv is not None:
        moving = _moving_lines(conv, rows)
        lines += ["", f"**Convergence.** A run is flagged when its validation top-1 moved by more than "
                      f"{MOVING_POINTS} points over the last fifth of its epochs (round(epochs / 5), at least one, "
                      "measured from the epoch before), for the "
                      "evaluated model and for every stage it builds on (the experts or teachers its config "
                      "names; folders left by an earlier config are not read). "
                      + ("Flagged:" if moving else "No run is flagged."), ""]
        lines += [*moving, *([""] if moving else [])]
    if report_name:
        lines += ["", f"![test top-1 per row]({report_name}.png)", "",
                  f"![validation curves]({report_name}_curves.png)"]
    lines += ["", "**Rows:**", ""]
    for name in rows:
        row, f = ROWS.get(name), facts[name]
        what = f"`configs/{row.config}`" + (f" with {' '.join(f'`{o}`' for o in row.overrides)}" if row.overrides else "")
        note = f" ({row.note})" if row.note else ""
        lines.append(f"- `{name}`: {what}{note}; recipe {f['recipe']}, {f['sampler']} sampling, loss {f['loss']}.")
    if seconds:
        total = sum(sum(v.values()) for v in seconds.values())
        lines += ["", "Wall time per run (s, mean over seeds): " + ", ".join(
            f"{n} {statistics.fmean(seconds[n].values()):.0f}" for n in rows if seconds.get(n))
            + f"; {total / 60:.1f} min for all runs."]
        if resumed:
            lines.append(f"Resumed from a checkpoint after an interruption, so their time covers the last "
                         f"invocation only: {', '.join(resumed)}.")
    return "\n".join(lines) + "\n"


def _label(name: str) -> str:
    row = ROWS.get(name)
    return f"{row.label} (`{name}`)" if row is not None and row.label else f"`{name}`"


def compare(data: str | Path, out: str | Path, rows: Sequence[str], seeds: Sequence[int],
            overrides: Sequence[str] = (), *, reference: str | None = None, name: str = "comparison",
            report_dir: str | Path | None = None, title: str | None = None, notes: Sequence[str] = (),
            log: Callable[[str], None] = print, runner: Callable[[Any], Any] | None = None,
            report_only: bool = False, also: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run the rows (:func:`run_rows`) and write ``REPORT/<name>.json``, ``.md``, ``.png`` (per row
    many / medium / few / overall, mean and std) and ``_curves.png`` (each row's val curve per seed);
    returns the report.

    ``notes``: free sentences for the page and the JSON (e.g. what else ran on the machine).
    ``report_only``: train nothing; report the finished runs as they are (an error names a missing one).
    ``also``: other reports (``<name>.json`` written by this runner, with their ``.md`` beside them) to
    append to this page as further sections and to this JSON under ``also`` (e.g. the permuted-order
    table of the same comparison)."""
    reference = reference or rows[0]
    if reference not in rows:
        raise ValueError(f"--reference {reference!r} must be one of the rows {list(rows)}")
    raw = run_rows(data, out, rows, seeds, overrides, log=log, runner=runner, report_only=report_only)
    configs = raw["configs"]
    conv = convergence(raw["all_configs"])
    facts = {r: row_facts(cfg) for r, cfg in configs.items()}
    protocol = describe_protocol(check_protocol(configs), facts)
    summary = summarise(raw["rows"], seeds, reference)
    convention = json.loads((Path(configs[rows[0]].run_dir) / "metrics.json").read_text()).get("convention")
    title = title or f"Comparison: {', '.join(rows)}"
    report = {"title": title, "data": str(data), "rows": list(rows), "seeds": list(seeds), "reference": reference,
              "overrides": list(overrides), "convention": convention,
              "metric": "test top-1 (%): per subset the mean of its classes' accuracies, overall over all images",
              "protocol": protocol, "row_facts": facts,
              "row_definitions": {r: {"config": ROWS[r].config, "overrides": list(ROWS[r].overrides),
                                      "label": ROWS[r].label, "note": ROWS[r].note} for r in rows},
              "results": summary, "run_seconds": {r: {str(s): v for s, v in d.items()} for r, d in raw["seconds"].items()},
              "skipped_finished": raw["skipped"], "resumed_runs": raw["resumed"], "notes": [],
              "wall_seconds_this_invocation": raw["wall_seconds"],
              "moving_points": MOVING_POINTS, "convergence": conv,
              "val_curves": {r: {str(s): val_curves(c.run_dir, run_stages(c)) for s, c in per.items()}
                             for r, per in raw["all_configs"].items()},
              "report_only": report_only, "stale_runs": raw["stale"],
              "run_dirs": {r: str(Path(configs[r].run_dir).parent) for r in rows}}
    notes = list(notes)
    if raw["stale"]:
        notes.insert(0, f"Warning: {len(raw['stale'])} run(s) finished under another resolved config than the one "
                        f"described here (reported as they are by --report-only): {', '.join(raw['stale'])}.")
    report["notes"] = notes
    page = format_markdown(summary, rows, seeds, reference, protocol, facts, title, overrides, raw["seconds"],
                           convention, raw["resumed"], notes, conv, name)
    if also:
        report["also"] = []
        for other in also:
            other = Path(other)
            report["also"].append(json.loads(other.read_text()))
            # its page as a section of this one: every heading one level down
            section = other.with_suffix(".md").read_text()
            page += "\n" + "\n".join("#" + line if line.startswith("#") else line for line in section.splitlines()) + "\n"
    if _main_process():
        from lfme_fast.plots import plot_comparison, plot_val_curves

        target = Path(report_dir) if report_dir is not None else Path(out)
        labels = {r: ROWS[r].label or r for r in rows}
        plot_comparison(target / f"{name}.png", summary, rows, labels, COLUMNS, title)
        main_curves = {r: {s: curve for s, stages in report["val_curves"][r].items() for st, curve in stages.items()
                           if st == MAIN_STAGE.get(configs[r].recipe)} for r in rows}
        plot_val_curves(target / f"{name}_curves.png", main_curves, labels, f"{title}: validation top-1 per epoch")
        atomic_write_json(target / f"{name}.json", report)
        atomic_write_text(target / f"{name}.md", page)
    log(page)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m lfme_fast.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared dataset (python -m data_prep ...; with a preset default the "
                                        "preset's: " + ", ".join(f"{k}: {v.data}" for k, v in PRESETS.items()) + ")")
    parser.add_argument("--rows", help=f"comma-separated row names; known: {', '.join(ROWS)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default the preset's, else 0)")
    parser.add_argument("--out", help="folder of the run folders (OUT/<row>/seed<s>/; with a preset default "
                                      "runs/compare_<preset>)")
    parser.add_argument("--preset", help="a named comparison (rows, seeds, overrides): " + "; ".join(
        f"{k}: {v.about}" for k, v in PRESETS.items()))
    parser.add_argument("--also", action="append", default=[], metavar="REPORT.json",
                        help="another report of this runner to append to the page and the JSON (repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the finished runs as they are")
    parser.add_argument("--quick", action="store_true", help="--preset quick: every row on a tiny budget, seed 0 "
                                                             "(a few minutes on 2 CPU cores)")
    parser.add_argument("--reference", help="row the paired differences are taken from (default: the first row)")
    parser.add_argument("--name", default="comparison", help="report file name, without suffix (default comparison)")
    parser.add_argument("--report-dir", help="where <name>.json and .md go (default: --out)")
    parser.add_argument("--title", help="the report's heading")
    parser.add_argument("--note", dest="notes", action="append", default=[], metavar="TEXT",
                        help="a sentence for the report (repeatable), e.g. what else ran on the machine")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="config override for every row (repeatable), e.g. --set optim.epochs=4")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = args.preset or "quick"
    preset = None
    if args.preset is not None:
        if args.preset not in PRESETS:
            parser.error(f"unknown --preset {args.preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[args.preset]
    if args.rows is None and preset is None:
        parser.error("give --rows (or a --preset / --quick)")
    rows = ([r.strip() for r in args.rows.split(",") if r.strip()] if args.rows is not None else list(preset.rows))
    for r in rows:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}; known rows: {', '.join(ROWS)}")
    try:
        seeds = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds is not None
                 else list(preset.seeds) if preset is not None else [0])
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    overrides = [*(preset.overrides if preset is not None else ()), *args.overrides]
    data = args.data or (preset.data if preset is not None else None)
    if data is None:
        parser.error("give --data (a prepared dataset)")
    out = args.out or (f"runs/compare_{args.preset}" if preset is not None else None)
    if out is None:
        parser.error("give --out (the folder of the run folders)")
    try:
        if preset is not None:
            check_preset_data(args.preset, data)
        compare(data, out, rows, seeds, overrides, reference=args.reference, name=args.name,
                report_dir=args.report_dir, title=args.title, notes=args.notes, report_only=args.report_only,
                also=args.also)
    except ValueError as exc:  # protocol, rows, overrides: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
