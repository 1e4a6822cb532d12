"""One results page from the benchmark JSONs: ``python -m lfme_fast.bench report``.

Reads whatever ``bench_*.json`` files exist in ``--results`` (default ``results/``) and writes
``BENCHMARKS.md`` there with its plots (PNG, next to it):

* ``loader.png``: loader images/s (and images per CPU-second) against the raw decode + crop limit;
* ``step_costs.png``: student step costs (plain CE, LFME, ECL, CBD) in seconds;
* ``data_wait.png``: the data-wait fraction of a training epoch per loader back end;
* ``memory.png``: host memory against the number of loader processes;
* ``gpu_decode.png`` / ``gpu_train.png``: the GPU figures, once ``bench_gpu.json`` comes from a GPU.

Every section names the machine and versions its JSON records; what is missing is listed at the top
of the page (and the command that produces it). Plots of figures that are absent are removed, so the
page never shows a stale one. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lfme_fast.io import atomic_path, atomic_write_text

__all__ = ["Section", "render", "write_page", "main"]

#: Every plot this page owns: removed when its figures are absent.
PLOTS = ("loader.png", "step_costs.png", "data_wait.png", "memory.png", "gpu_decode.png", "gpu_train.png",
         "data_wait_gpu.png")

#: The JSON each section reads and the command that writes it.
SOURCES = {
    "prep": ("bench_prep.json", "python -m data_prep.bench --scale 0.05 --json-out results/bench_prep.json"),
    "sampler": ("bench_sampler.json", "python -m lfme_fast.bench sampler --json-out results/bench_sampler.json"),
    "loader": ("bench_loader.json", "python -m lfme_fast.bench loader"),
    "train": ("bench_train.json", "python -m lfme_fast.bench train --json-out results/bench_train.json"),
    "step": ("bench_step.json", "python -m lfme_fast.bench step --json-out results/bench_step.json"),
    "epoch": ("bench_epoch.json", "python -m lfme_fast.bench epoch"),
    "memory": ("bench_memory.json", "python -m lfme_fast.bench memory"),
    "gpu": ("bench_gpu.json", "make bench-gpu"),
    "compile": ("bench_compile_cpu.json", "python -m lfme_fast.bench compile --device cpu --threads 1"),
}


@dataclass
class Section:
    """A rendered part of the page: its markdown, the plots it drew, and what it lacks."""

    title: str
    body: str
    missing: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------

def num(x: Any, digits: int = 0) -> str:
    """``4,135`` / ``0.97``; an absent value as an en dash."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–"
    return f"{x:,.{digits}f}"


def pct(x: Any, digits: int = 1) -> str:
    """A fraction as a percentage (``0.0412`` -> ``4.1%``)."""
    return "–" if not isinstance(x, (int, float)) else f"{100 * x:.{digits}f}%"


def times(x: Any, digits: int = 2) -> str:
    """A ratio as ``2.14×``."""
    return "–" if not isinstance(x, (int, float)) else f"{x:,.{digits}f}×"


def ms(seconds: Any, digits: int = 2) -> str:
    """Seconds as milliseconds."""
    return "–" if not isinstance(seconds, (int, float)) else f"{1000 * seconds:,.{digits}f} ms"


def mib(x: Any) -> str:
    """Bytes as MiB."""
    return "–" if not isinstance(x, (int, float)) else f"{x / 2**20:,.0f} MiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict[str, Any] | None, gpu: dict[str, Any] | None = None) -> str:
    """Which machine and software produced a JSON (from ``machine_info()`` / ``gpu_info()``)."""
    if not m:
        return "_Machine: not recorded._"
    hw = f"{m.get('cpu_count', '?')} × {m.get('cpu_model', 'unknown CPU')}"
    g = gpu or {}
    if g.get("gpu") or m.get("gpu"):
        hw += f", GPU {g.get('gpu') or m.get('gpu')}"
        if g.get("driver_version"):
            hw += f" (driver {g['driver_version']}, CUDA {g.get('cuda_version')})"
    else:
        hw += ", no GPU"
    libs = ", ".join(f"{name} {m[key]}" for name, key in
                     (("torch", "torch_version"), ("numpy", "numpy_version"), ("numba", "numba_version"),
                      ("ffcv", "ffcv_version"), ("DALI", "nvidia.dali_version")) if m.get(key))
    return f"_Machine: {hw}; {libs}; measured {m.get('date_utc', '?')}._"


def load(results: Path, name: str) -> dict[str, Any] | None:
    """A result JSON, or None when absent; an unreadable file is an error naming it."""
    path = results / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run the benchmark that writes it") from None


def _missing(key: str, what: str | None = None) -> Section:
    name, command = SOURCES[key]
    return Section(what or key, f"_Not measured yet: `{name}` is absent. Run `{command}`._",
                   missing=[f"{what or key}: `{name}` absent (`{command}`)"])


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg back end; each PNG written atomically)
# --------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _hbars(ax: Any, labels: Sequence[str], values: Sequence[float], fmt: Callable[[float], str]) -> None:
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, values, color="#4C72B0")
    ax.set_yticks(ys, labels)
    top = max(values) if values else 1.0
    for y, v in zip(ys, values):
        ax.text(v + top * 0.01, y, fmt(v), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18)


def _hbar_plot(path: Path, labels: Sequence[str], values: Sequence[float], fmt: Callable[[float], str],
               xlabel: str, title: str) -> None:
    """A horizontal bar chart, one bar per label, sized to the number of bars, saved to ``path``."""
    fig, ax = _plt().subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    _hbars(ax, labels, values, fmt)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

def prep_section(results: Path, out: Path) -> Section:
    """Dataset preparation throughput and storage."""
    r = load(results, SOURCES["prep"][0])
    if r is None:
        return _missing("prep", "Preparation")
    ips, sec, st = r.get("images_per_s", {}), r.get("seconds", {}), r.get("storage", {})
    body = "\n\n".join([
        f"`{SOURCES['prep'][0]}`: {num(r.get('images'))} synthetic ImageNet-LT-shaped JPEG files "
        f"(mean {num(r.get('source_mean_bytes', 0) / 1000)} KB) stored at max side "
        f"{r.get('settings', {}).get('max_side')}, {r.get('workers')} workers.",
        table(["phase", "images/s", "seconds"], [
            ["webdataset shards (decode, resize, encode, write)", num(ips.get("wds_phase")),
             num(sec.get("wds_phase"), 1)],
            ["ffcv beton (from the shards)", num(ips.get("ffcv_phase")), num(sec.get("ffcv_phase"), 1)],
            ["both", num(ips.get("total")), num(sec.get("total"), 1)],
            ["`import ffcv` (once per process, not in the phases)", "–", num(sec.get("ffcv_import_untimed"), 1)]]),
        table(["storage", "KB per image", "projected over ImageNet-LT (115,846 images)"], [
            ["webdataset tars", num(st.get("wds_bytes_per_image", 0) / 1000, 1),
             f"{num(st.get('projected_imagenet_lt_wds_gb'), 1)} GB"],
            ["ffcv beton", num(st.get("beton_bytes_per_image", 0) / 1000, 1),
             f"{num(st.get('projected_imagenet_lt_beton_gb'), 1)} GB"]]),
        machine_line(r.get("machine"))])
    return Section("Preparation", body)


def sampler_section(results: Path, out: Path) -> Section:
    """Numba class-balanced sampler against the pure-Python OLTR sampler."""
    r = load(results, SOURCES["sampler"][0])
    if r is None:
        return _missing("sampler", "Sampler")
    rows = []
    for name, case in r.get("cases", {}).items():
        nb, py, sp = case.get("numba_class_balanced", {}), case.get("python_oltr_class_aware", {}), \
            case.get("speedup_vs_python", {})
        rows.append([f"{name} ({num(case.get('num_samples'))} samples)",
                     ms(nb.get("indices", {}).get("median_s")), ms(nb.get("indices_and_weights", {}).get("median_s")),
                     ms(py.get("median_s"), 0) + (" (extrapolated)" if py.get("extrapolated") else ""),
                     times(sp.get("indices_median"), 0), times(sp.get("indices_and_weights_median"), 0)])
    body = "\n\n".join([
        f"`{SOURCES['sampler'][0]}`: one epoch of the class-balanced sampler (4 per class), median over "
        f"{r.get('repeats')} epochs; the baseline is OLTR's pure-Python ClassAwareSampler in the same run.",
        table(["histogram", "indices", "indices + weights", "pure Python", "speed-up, indices",
               "speed-up, indices + weights"], rows),
        machine_line(r.get("machine"))])
    return Section("Sampler", body)


#: Loader contenders in page order, with their labels.
LOADER_ROWS = (
    ("ffcv", "FFCV back end, float32 output"),
    ("ffcv_uint8", "FFCV back end, uint8 output (the CPU side of the GPU path)"),
    ("ffcv_2views", "FFCV back end, two views per sample"),
    ("ffcv_stock", "stock ffcv operations (RRC decoder, flip, NormalizeImage)"),
    ("dali", "DALI back end, CPU pipeline"),
    ("dali_2views", "DALI back end, two views per sample"),
    ("torch", "torch DataLoader + PIL, our 256-px storage"),
    ("torch_2views", "torch DataLoader + PIL, two views per sample"),
    ("torch_fullsize", "torch DataLoader + PIL, original-size JPEGs"),
)


def _loader_table(r: dict[str, Any]) -> tuple[str, list[tuple[str, float, float | None]]]:
    limit = r.get("raw_limit", {})
    rows, bars = [], []
    if "images_per_s" in limit:
        rows.append(["raw decode + crop limit (our storage)", f"**{num(limit['images_per_s'])}**",
                     num(limit.get("images_per_cpu_s")), "100%"])
    backends = r.get("backends", {})
    known = [k for k, _ in LOADER_ROWS]
    labels = dict(LOADER_ROWS)
    for key in known + sorted(k for k in backends if k not in known):
        b = backends.get(key)
        if b is None:
            continue
        if "images_per_s" not in b:
            rows.append([labels.get(key, key), f"failed: {b.get('error', '?')[:80]}", "–", "–"])
            continue
        rows.append([labels.get(key, key), num(b["images_per_s"]), num(b.get("images_per_cpu_s")),
                     pct(b.get("ratio_to_raw_limit"), 0)])
        bars.append((labels.get(key, key), b["images_per_s"], b.get("images_per_cpu_s")))
    return table(["contender", "images/s", "images per CPU-second", "of the raw limit"], rows), bars


def _loader_ratios(s: dict[str, Any]) -> str:
    """The FFCV back end against the baselines and the raw limit (a loader result's ``summary``)."""
    return table(["ratio", "images/s", "per CPU-second"], [
        ["FFCV back end / torch on original-size JPEGs", times(s.get("ratio_ffcv_to_torch_fullsize")),
         times(s.get("ratio_ffcv_to_torch_fullsize_per_cpu_s"))],
        ["FFCV back end / torch on our storage", times(s.get("ratio_ffcv_to_torch")),
         times(s.get("ratio_ffcv_to_torch_per_cpu_s"))],
        ["FFCV back end / raw limit", pct(s.get("ratio_ffcv_to_raw_limit"), 0),
         pct(s.get("ratio_ffcv_to_raw_limit_per_cpu_s"), 0)],
        ["FFCV back end / stock ffcv operations", times(s.get("ratio_ffcv_to_ffcv_stock")), "–"],
        ["FFCV two views / one view (crops/s)", times(s.get("ratio_ffcv_2views_to_ffcv")), "–"]])


def _loader_plot(bars: list[tuple[str, float, float | None]], limit: dict[str, Any], path: Path,
                 title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(bars) + 1.6))
    for ax, idx, ref_key, xlabel in ((axes[0], 1, "images_per_s", "images/s"),
                                     (axes[1], 2, "images_per_cpu_s", "images per CPU-second")):
        values = [b[idx] or 0.0 for b in bars]
        _hbars(ax, [b[0] for b in bars], values, lambda v: f"{v:,.0f}")
        if idx == 2:
            ax.tick_params(labelleft=False)  # same rows as the left panel
        ref = limit.get(ref_key)
        if ref:
            ax.axvline(ref, color="#C44E52", linestyle="--", label=f"raw decode + crop limit ({ref:,.0f})")
            ax.set_xlim(0, max(max(values), ref) * 1.18)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def loader_section(results: Path, out: Path) -> Section:
    """Loader images/s against the raw decode limit; other loader runs as extra tables."""
    r = load(results, SOURCES["loader"][0])
    if r is None:
        return _missing("loader", "Loader")
    cfg, ds, s = r.get("config", {}), r.get("dataset", {}), r.get("summary", {})
    tab, bars = _loader_table(r)
    parts = [
        f"`{SOURCES['loader'][0]}`: {num(ds.get('num_images'))} synthetic images stored at max side "
        f"{ds.get('stored_max_side')}; RandomResizedCrop {cfg.get('resolution')} + flip, batch "
        f"{cfg.get('batch_size')}, {cfg.get('workers')} workers, {cfg.get('dtype')} normalised output, "
        f"class-balanced order; each contender in its own process; median over {cfg.get('epochs')} interleaved "
        "rounds. Two-view rows count every crop (a sample counts twice).",
        tab,
        _loader_ratios(s),
    ]
    plots = []
    if bars:
        _loader_plot(bars, r.get("raw_limit", {}), out / "loader.png",
                     f"Loaders, {cfg.get('workers')} workers, batch {cfg.get('batch_size')}, "
                     f"RRC {cfg.get('resolution')}")
        parts.append("![loader images/s against the raw decode limit](loader.png)")
        plots.append("loader.png")
    parts.append(machine_line(r.get("machine")))
    for extra in sorted(results.glob("bench_loader_*.json")):
        e = load(results, extra.name) or {}
        parts += [f"**Another run** (`{extra.name}`, {e.get('config', {}).get('epochs')} rounds):",
                  _loader_table(e)[0], _loader_ratios(e.get("summary", {})), machine_line(e.get("machine"))]
    return Section("Loader", "\n\n".join(parts), plots=plots)


def train_section(results: Path, out: Path) -> Section:
    """Model compute ceiling on synthetic tensors (no loader)."""
    files = sorted(results.glob("bench_train*.json"))
    if not files:
        return _missing("train", "Training step ceiling")
    parts = ["Forward + backward + SGD step on a batch already on the device (no loader): the most a "
             "loader can be asked to feed."]
    for f in files:
        r = load(results, f.name) or {}
        rows = [[x.get("model"), x.get("resolution"), x.get("device"), x.get("precision"), x.get("batch_size"),
                 num(x.get("samples_per_s"), 1) if x.get("supported") else f"unsupported: {x.get('error', '')[:60]}"]
                for x in r.get("results", [])]
        parts += [f"`{f.name}` (torch threads: {r.get('torch_threads_used')}):",
                  table(["model", "side", "device", "precision", "batch", "samples/s"], rows),
                  machine_line(r.get("machine"))]
    return Section("Training step ceiling", "\n\n".join(parts))


#: Student step kinds in page order: key in bench_step.json (``<key>_s``), label, method.
STEP_ROWS = (
    ("plain_ce", "plain CE", "–"),
    ("offline_kd", "LFME on stored float16 logits", "LFME"),
    ("live_kd", "LFME with live expert forwards", "LFME"),
    ("ecl_one_view", "ECL, one view (contrastive branch off)", "ECL"),
    ("ecl", "ECL, two views, every term", "ECL"),
    ("cbd_offline", "CBD on stored teacher features", "CBD"),
    ("cbd_live", "CBD with live teacher forwards", "CBD"),
)


def step_rows(r: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(key, label, median s, min s) of every step kind present in a step result."""
    return [(k, label, r[f"{k}_s"], r.get(f"{k}_min_s")) for k, label, _ in STEP_ROWS
            if isinstance(r.get(f"{k}_s"), (int, float))]


def _step_plot(rows: list[tuple[str, str, float, float | None]], path: Path, title: str) -> None:
    _hbar_plot(path, [r[1] for r in rows], [r[2] for r in rows], lambda v: f"{v:.3g} s",
               "seconds per step (median)", title)


def step_table(r: dict[str, Any]) -> tuple[str, list[str]]:
    """The step-cost table of a step result, and the methods it lacks."""
    rows = step_rows(r)
    plain = r.get("plain_ce_s")
    body = table(["step", "median s", "min s", "over plain CE"],
                 [[label, num(med, 3), num(mn, 3), times(med / plain if plain else None)]
                  for _, label, med, mn in rows])
    have = {k for k, *_ in rows}
    lacking = sorted({m for k, _, m in STEP_ROWS if m != "–"} - {m for k, _, m in STEP_ROWS if k in have})
    return body, lacking


def step_section(results: Path, out: Path) -> Section:
    """Student step costs: plain CE, LFME, ECL, CBD."""
    r = load(results, SOURCES["step"][0])
    if r is None:
        return _missing("step", "Student step")
    body, lacking = step_table(r)
    parts = [f"`{SOURCES['step'][0]}`: {r.get('model')}, batch {r.get('batch_size')} at {r.get('resolution')} px, "
             f"{r.get('precision')} on {r.get('device')}, {r.get('num_classes')} classes; kinds interleaved, "
             f"{r.get('repeats')} rounds.", body]
    if isinstance(r.get("ratio_offline_over_plain"), (int, float)):
        parts.append(f"LFME offline over plain: {times(r['ratio_offline_over_plain'])} at the median, "
                     f"{times(r.get('ratio_offline_over_plain_min'))} at the minimum (goal ≤ "
                     f"{r.get('goal_offline_over_plain_max', 1.05)}); live over offline: "
                     f"{times(r.get('ratio_live_over_offline'))}.")
    missing = []
    if lacking:
        missing.append(f"student step: no {', '.join(lacking)} rows in `{SOURCES['step'][0]}` (re-run "
                       f"`{SOURCES['step'][1]}`)")
        parts.append(f"_Not in this result: {', '.join(lacking)} (re-run `{SOURCES['step'][1]}`)._")
    plots = []
    rows = step_rows(r)
    if rows:
        _step_plot(rows, out / "step_costs.png",
                   f"Student step, {r.get('model')} batch {r.get('batch_size')} @ {r.get('resolution')} px, "
                   f"{r.get('device')}")
        parts.append("![student step costs](step_costs.png)")
        plots.append("step_costs.png")
    parts.append(machine_line(r.get("machine")))
    return Section("Student step", "\n\n".join(parts), missing=missing, plots=plots)


def epoch_table(rows: dict[str, Any]) -> str:
    """Per feed: samples/s, its ceiling, the data-wait fraction and where the wait is."""
    out = []
    for name, b in rows.items():
        if "samples_per_s" not in b:
            out.append([name, b.get("skipped") or f"failed: {str(b.get('error', '?'))[:80]}"] + ["–"] * 5)
            continue
        out.append([name, num(b["samples_per_s"], 1), num(b.get("ceiling_samples_per_s"), 1),
                    pct(b.get("ratio_to_ceiling"), 0), f"**{pct(b.get('data_wait_fraction'))}**",
                    pct(b.get("data_wait_fraction_after_first_batch")), num(b.get("first_batch_wait_s"), 2)])
    return table(["fed by", "samples/s", "ceiling samples/s", "of the ceiling", "data-wait fraction",
                  "data wait after the first batch", "first batch wait (s)"], out)


def _wait_plot(groups: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    labels, waits = [], []
    for group, rows in groups.items():
        for name, b in rows.items():
            if isinstance(b.get("data_wait_fraction"), (int, float)):
                labels.append(f"{group}: {name}" if group else name)
                waits.append(100 * b["data_wait_fraction"])
    _hbar_plot(path, labels, waits, lambda v: f"{v:.1f}%", "data-wait fraction of the epoch (%)", title)


def epoch_section(results: Path, out: Path) -> Section:
    """A training epoch end to end and its data-wait fraction."""
    r = load(results, SOURCES["epoch"][0])
    if r is None:
        return _missing("epoch", "Training epoch and data wait")
    cfg, ds = r.get("config", {}), r.get("dataset", {})
    rows = r.get("backends", {})
    parts = [f"`{SOURCES['epoch'][0]}`: one epoch of {num(ds.get('num_images'))} synthetic images, "
             f"{cfg.get('arch')} at {cfg.get('resolution')} px, batch {cfg.get('batch_size')}, "
             f"{cfg.get('precision')} on {cfg.get('device')}, {cfg.get('workers')} loader workers; each back end "
             "in its own process after a loader-only warm-up epoch. Data-wait fraction: time in `next(iterator)` "
             "over the epoch's time. Ceiling: the same model on one resident batch in the same process.",
             epoch_table(rows)]
    if str(cfg.get("device", "cpu")).startswith("cpu"):
        parts.append("On a CPU the loader's workers and the model share the cores: the wait measures that "
                     "contention as much as the loader.")
    plots = []
    if any(isinstance(b.get("data_wait_fraction"), (int, float)) for b in rows.values()):
        _wait_plot({"": rows}, out / "data_wait.png",
                   f"Data wait, {cfg.get('arch')} @ {cfg.get('resolution')} px, {cfg.get('device')}")
        parts.append("![data-wait fraction per back end](data_wait.png)")
        plots.append("data_wait.png")
    parts.append(machine_line(r.get("machine")))
    return Section("Training epoch and data wait", "\n\n".join(parts), plots=plots)


def _memory_plot(rows: list[tuple[int, dict[str, Any]]], file_bytes: int | None, path: Path, title: str) -> None:
    plt = _plt()
    n = [k for k, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.plot(n, [r["rss_mean"] * k / 2**20 for k, r in rows], "o--", label="sum of RSS (shared pages counted N times)")
    left.plot(n, [r["pss_total"] / 2**20 for _, r in rows], "s-", label="sum of PSS (what the processes take)")
    left.set_title("whole processes", fontsize=9)
    right.plot(n, [r["dataset_rss_per_process_max"] * k / 2**20 for k, r in rows], "o--",
               label="N x one process's RSS (a copy per process)")
    right.plot(n, [r["dataset_pss_total"] / 2**20 for _, r in rows], "^-", label="sum of PSS (what they take)")
    if file_bytes:
        right.axhline(file_bytes / 2**20, color="grey", linestyle=":", label="dataset file size")
    right.set_title("the dataset files' mappings", fontsize=9)
    for ax in (left, right):
        ax.set_xticks(n)
        ax.set_xlabel("loader processes")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def memory_section(results: Path, out: Path) -> Section:
    """Host memory against the number of loader processes."""
    r = load(results, SOURCES["memory"][0])
    if r is None:
        return _missing("memory", "Host memory against loader processes")
    cfg, files = r.get("config", {}), r.get("dataset_files", {})
    good = sorted(((int(k), v) for k, v in r.get("counts", {}).items() if "pss_total" in v), key=lambda x: x[0])
    rows = [[k, mib(v["rss_mean"]), mib(v["pss_mean"]), mib(v["pss_total"]), mib(v["dataset_rss_per_process_max"]),
             mib(v["dataset_pss_total"]), num(v.get("dataset_copies"), 2)] for k, v in good]
    rows += [[k, f"failed: {str(v.get('error', '?'))[:80]}"] + ["–"] * 5
             for k, v in r.get("counts", {}).items() if "pss_total" not in v]
    parts = [f"`{SOURCES['memory'][0]}`: N processes, each with a {cfg.get('backend')} training loader "
             f"({cfg.get('workers_per_process')} worker(s), batch {cfg.get('batch_size')} at {cfg.get('resolution')} "
             f"px) over one prepared dataset ({mib(files.get('bytes'))} of files), each having read a whole epoch; "
             "measured while all N are alive. PSS divides a shared page among the processes mapping it. "
             "Dataset copies = the dataset mappings' summed PSS over one process's RSS of them (1: one shared "
             "copy; N: a copy per process).",
             table(["processes", "RSS per process", "PSS per process", "PSS, all processes",
                    "dataset RSS per process", "dataset PSS, all processes", "dataset copies"], rows)]
    plots = []
    if good:
        _memory_plot(good, files.get("bytes"), out / "memory.png",
                     f"Host memory, {cfg.get('backend')} loader processes over one dataset")
        parts.append("![memory against loader processes](memory.png)")
        plots.append("memory.png")
    parts.append(machine_line(r.get("machine")))
    return Section("Host memory against loader processes", "\n\n".join(parts), plots=plots)


def _gpu_decode_plot(decode: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    items = [(k, v["images_per_s"]) for k, v in decode.items() if "images_per_s" in v]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.2))
    _hbars(ax, [k for k, _ in items], [v for _, v in items], lambda v: f"{v:,.0f}")
    ax.axvline(10000, color="#C44E52", linestyle="--", label="goal 10,000 images/s")
    ax.set_xlim(0, max([v for _, v in items] + [10000]) * 1.18)
    ax.legend(fontsize=8)
    ax.set_xlabel("images/s")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _gpu_train_plot(train: dict[str, Any], path: Path, title: str) -> None:
    labels, rates = [], []
    for arch, feeds in train.items():
        for feed, b in feeds.items():
            if "samples_per_s" in b:
                labels.append(f"{arch}, {feed}")
                rates.append(b["samples_per_s"])
    _hbar_plot(path, labels, rates, lambda v: f"{v:,.0f}",
               "training samples/s (synthetic = on-GPU tensor, the compute ceiling)", title)


def compile_table(rows: Sequence[dict[str, Any]]) -> str:
    """Eager vs ``torch.compile`` rows of :mod:`lfme_fast.bench.compile` (one per model)."""
    out = []
    for x in rows:
        eager, comp = x.get("eager") or {}, x.get("compiled") or {}
        if "error" in x and not eager:
            out.append([x.get("arch"), x.get("resolution", "–"), x.get("batch_size", "–"),
                        f"failed: {x['error'][:60]}", "", "", ""])
            continue
        if comp.get("supported"):
            cells = [num(comp.get("steps_per_s"), 2), times(x.get("speedup")), num(comp.get("compile_s"), 1)]
        else:
            cells = [f"not measured: {str(comp.get('error', x.get('skipped', '?')))[:80]}", "", ""]
        out.append([x.get("arch"), x.get("resolution", "–"), x.get("batch_size", "–"),
                    num(eager.get("steps_per_s"), 2), *cells])
    return table(["model", "side", "batch", "eager steps/s", "compiled steps/s", "compiled / eager",
                  "compile s (first step)"], out)


def compile_section(results: Path, out: Path) -> Section:
    """``torch.compile`` on and off (``train.compile``) from ``bench_compile_*.json``."""
    files = sorted(results.glob("bench_compile_*.json"))
    if not files:
        return _missing("compile", "torch.compile on and off")
    parts = ["Training step (forward, CE, backward, SGD) on a resident batch, eager and through "
             "`torch.compile` as `train.compile` applies it. Steps/s come from the median step after warm-up. The "
             "first compiled step compiles the forward and the backward; its time is shown apart, with cold "
             "Inductor caches. The GPU rows are in the GPU section."]
    for f in files:
        r = load(results, f.name) or {}
        rows = r.get("results", [])
        first = rows[0] if rows else {}
        load_avg, cores = r.get("load_average") or [0.0], (r.get("machine") or {}).get("cpu_count") or 0
        shared = (f" **Measured while other jobs used the machine** (1-minute load average {load_avg[0]:.1f} on "
                  f"{cores} cores): indicative only." if cores and load_avg[0] > cores else "")
        parts += [f"`{f.name}`: {r.get('device')}, {first.get('precision', '?')}, mode `{r.get('mode')}`, backend "
                  f"`{r.get('backend')}`, torch threads {first.get('torch_threads', '?')}; load average at the end "
                  f"{', '.join(f'{v:.2f}' for v in r.get('load_average') or [])}"
                  + ("" if r.get("compile_available", True) else f"; **compile unavailable**: "
                                                                 f"{r.get('compile_unavailable')}") + ":",
                  compile_table(rows) + ("\n\n" + shared.strip() if shared else ""), machine_line(r.get("machine"))]
    return Section("torch.compile on and off", "\n\n".join(parts))


def gpu_section(results: Path, out: Path) -> Section:
    """The GPU path: decode, training fed by each back end, step costs (or why they are absent)."""
    r = load(results, SOURCES["gpu"][0])
    title = "GPU path"
    if r is None or r.get("device") != "cuda":
        why = ("`bench_gpu.json` is absent" if r is None else
               f"`bench_gpu.json` holds only the CPU fallback (tiny sizes, {r.get('machine', {}).get('date_utc')})")
        body = (f"**The GPU figures are not measured yet**: {why}. `make bench-gpu` (`python -m lfme_fast.bench gpu`) "
                "measures DALI `mixed` decode and the ffcv uint8 path normalised on the GPU (images/s at batch 256, "
                "RRC 224), ResNet-10 and ResNet-50 at 224 in bf16 channels_last fed by each back end and by an "
                "on-GPU tensor with the data-wait fraction, and the student step costs on the GPU.")
        return Section(title, body, missing=[f"GPU figures: {why} (run `{SOURCES['gpu'][1]}` on a GPU machine)"])
    g, cfg = r.get("gpu", {}), r.get("config", {})
    parts = [f"`{SOURCES['gpu'][0]}`: {g.get('gpu')}, driver {g.get('driver_version')}, CUDA {g.get('cuda_version')}, "
             f"cuDNN {g.get('cudnn_version')}, torch {g.get('torch_version')}, DALI {g.get('dali_version')}; batch "
             f"{cfg.get('batch_size')}, RandomResizedCrop {cfg.get('resolution')} + flip + normalise, "
             f"{cfg.get('workers')} CPU workers, {cfg.get('precision')}; CUDA events after warm-up."]
    plots, missing = [], []
    decode = r.get("decode") or {}
    if decode:
        rows = [[k, num(v.get("images_per_s")) if "images_per_s" in v else (v.get("skipped") or v.get("error", "?")),
                 num(v.get("best_epoch_images_per_s")), v.get("output", "")] for k, v in decode.items()]
        parts += ["**Decode + augment, loader alone** (goal: ≥ 10,000 images/s with DALI on one GPU):",
                  table(["back end", "images/s (median epoch)", "best epoch", "output"], rows)]
        if any("images_per_s" in v for v in decode.values()):
            _gpu_decode_plot(decode, out / "gpu_decode.png", f"Loaders on {g.get('gpu')}")
            parts.append("![GPU loader images/s](gpu_decode.png)")
            plots.append("gpu_decode.png")
    train = r.get("train") or {}
    for arch, feeds in train.items():
        parts += [f"**{arch} training, fed by each back end** (goal for ResNet-10: data wait under 5%):",
                  epoch_table(feeds)]
    if train:
        _gpu_train_plot(train, out / "gpu_train.png", f"Training samples/s on {g.get('gpu')}")
        parts.append("![GPU training samples/s](gpu_train.png)")
        plots.append("gpu_train.png")
        _wait_plot(train, out / "data_wait_gpu.png", f"Data wait on {g.get('gpu')}")
        parts.append("![GPU data-wait fraction](data_wait_gpu.png)")
        plots.append("data_wait_gpu.png")
    step = r.get("step") or {}
    if "plain_ce_s" in step:
        body, lacking = step_table(step)
        parts += [f"**Student step costs** ({step.get('model')}, batch {step.get('batch_size')} at "
                  f"{step.get('resolution')} px):", body]
        if lacking:
            missing.append(f"GPU student step: no {', '.join(lacking)} rows")
    elif step:
        parts.append(f"Student step costs: {step.get('skipped') or step.get('error')}")
    compiled = r.get("compile") or {}
    if compiled:
        parts += ["**`torch.compile` on and off** (`train.compile`; bf16 autocast, channels_last, batch "
                  f"{cfg.get('batch_size')} at {cfg.get('resolution')} px):",
                  compile_table([{"arch": arch, **row} for arch, row in compiled.items()])]
    else:
        missing.append("GPU torch.compile on/off: not in bench_gpu.json (an older run; `make bench-gpu` measures it)")
    parts.append(machine_line(r.get("machine"), g))
    return Section(title, "\n\n".join(parts), plots=plots, missing=missing)


SECTIONS: tuple[Callable[[Path, Path], Section], ...] = (
    prep_section, sampler_section, loader_section, train_section, step_section, epoch_section, memory_section,
    compile_section, gpu_section)


def render(results: Path, out: Path | None = None) -> tuple[str, list[Section]]:
    """The page's markdown and its sections (plots written into ``out``, default ``results``)."""
    out = out or results
    out.mkdir(parents=True, exist_ok=True)
    sections = [fn(results, out) for fn in SECTIONS]
    missing = [m for s in sections for m in s.missing]
    head = [
        "# Benchmarks",
        "",
        "Generated by `python -m lfme_fast.bench report` from the JSON results in this folder (`make bench` "
        "runs every CPU benchmark and then this; `make bench-gpu` the GPU one). Every figure below comes from "
        "those files; each section names the machine that produced it. Wall-clock figures on a shared machine "
        "move between runs; images per CPU-second are steadier.",
        "",
        "## Missing figures",
        "",
        "\n".join(f"- {m}" for m in missing) if missing else "None: every benchmark has a result.",
    ]
    body = [f"## {s.title}\n\n{s.body}" for s in sections]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n", sections


def write_page(results: Path, page: Path | None = None) -> Path:
    """Render ``results`` into ``page`` (default ``results/BENCHMARKS.md``); remove plots not drawn."""
    page = page or results / "BENCHMARKS.md"
    text, sections = render(results, page.parent)
    drawn = {p for s in sections for p in s.plots}
    for name in PLOTS:
        if name not in drawn:
            (page.parent / name).unlink(missing_ok=True)
    atomic_write_text(page, text)
    return page


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring and ``--help``."""
    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"), help="folder of bench_*.json (default results)")
    p.add_argument("--out", type=Path, default=None, help="the page (default RESULTS/BENCHMARKS.md)")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"{args.results} is not a folder of benchmark results")
    page = write_page(args.results, args.out)
    print(f"[bench report] wrote {page} ({os.path.getsize(page):,} bytes)")


if __name__ == "__main__":
    main()
