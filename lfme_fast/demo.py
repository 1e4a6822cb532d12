"""``make demo``: LFME end to end on real data (Fashion-MNIST-LT, IR 100) on a CPU, in minutes.

``python -m lfme_fast.demo --data DATA_DIR --fmnist-root ROOT [--out runs/demo]``

1. Prepares Fashion-MNIST-LT (IR 100; 14,837 training images, 28x28) in ``DATA/fmnist_lt_ir100`` with
   ``python -m data_prep fmnist-lt`` (skipped when its manifest is already there).
2. Runs ``configs/fmnist_lt/lfme.yaml`` (the ``lfme`` recipe): trains the three experts, writes the
   offline expert outputs (float16 logits for every image and stored view), trains the LFME student
   (class-balanced sampling, KD from the stored logits, SpES, SpIS) and evaluates it.
3. Trains and evaluates a class-balanced cross-entropy baseline (``configs/fmnist_lt/ablation_balanced.yaml``:
   the ``lfme`` recipe with KD, SpES and SpIS off) on the same experts' run folder and the same offline
   store, linked into ``OUT/cb_ce``: both rows train on the same stored views with the same model,
   epochs, sampler and samples per epoch, so they share one augmentation distribution and differ only
   in the loss.
4. Prints the many / medium / few / overall test top-1 of both and the paths of the plots, and writes
   them to ``OUT/demo.md`` / ``OUT/demo.json``.

The defaults are sized to finish within 15 minutes on a 2-core CPU (measured; see ``--help`` for the
knobs). They are short runs: the numbers are what such short runs give, not converged accuracies.
Re-running reuses every finished stage (fingerprinted), so an interrupted demo continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lfme_fast.io import atomic_write_json, atomic_write_text

__all__ = ["main", "prepare_data", "demo_overrides", "results_table"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "fmnist_lt"
DATASET_DIR = "fmnist_lt_ir100"


def _say(t0: float, msg: str) -> None:
    print(f"[demo {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def prepare_data(data: Path, fmnist_root: str, t0: float) -> Path:
    """``DATA/fmnist_lt_ir100`` prepared by data_prep (skipped when its manifest exists)."""
    out = data / DATASET_DIR
    if (out / "manifest.json").exists():
        _say(t0, f"dataset ready in {out} (skipping preparation)")
        return out
    if not Path(fmnist_root).is_dir():
        raise FileNotFoundError(f"--fmnist-root {fmnist_root}: no such directory (Fashion-MNIST idx .gz files; "
                                "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)")
    _say(t0, f"preparing Fashion-MNIST-LT (IR 100) from {fmnist_root} into {out}")
    cmd = [sys.executable, "-m", "data_prep", "fmnist-lt", "--root", str(fmnist_root), "--imbalance-ratio", "100",
           "--out", str(out)]
    subprocess.run(cmd, check=True)
    return out


def demo_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    """Overrides shared by both runs (same data, model, epochs, samples per epoch)."""
    out = [f"data.root={root}", f"optim.epochs={args.epochs}", "data.num_workers=0",
           f"precision.channels_last={'true' if args.channels_last else 'false'}",
           f"log.progress={'true' if not args.no_progress else 'false'}"]
    if args.epoch_samples:
        out.append(f"train.epoch_samples={args.epoch_samples}")
    if args.max_steps:
        out.append(f"train.max_steps_per_epoch={args.max_steps}")
    return out + list(args.overrides)


def _row(metrics: dict[str, Any]) -> dict[str, float | None]:
    s = metrics["subsets"]
    return {"many": s["many"]["top1"], "medium": s["medium"]["top1"], "few": s["few"]["top1"],
            "overall": metrics["top1"], "mean_class": metrics.get("mean_class_top1")}


def results_table(rows: dict[str, dict[str, float | None]], convention: str) -> str:
    """Markdown table of test top-1 (%) per model."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.2f}"

    lines = [f"Test top-1 (%) on the balanced Fashion-MNIST test set (10,000 images); subsets: {convention}.", "",
             "| model | many | medium | few | overall |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {pct(r['many'])} | {pct(r['medium'])} | {pct(r['few'])} | {pct(r['overall'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lfme_fast.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data folder; the dataset goes to DATA/fmnist_lt_ir100")
    p.add_argument("--fmnist-root", required=True, help="folder with the Fashion-MNIST idx .gz files")
    p.add_argument("--out", default="runs/demo", help="run folders and the report (default runs/demo)")
    p.add_argument("--epochs", type=int, default=4, help="student and baseline epochs (default 4)")
    p.add_argument("--expert-epochs", type=int, default=2, help="expert epochs (default 2)")
    p.add_argument("--epoch-samples", type=int, default=10000,
                   help="class-balanced draws per student/baseline epoch (default 10000; 0 = dataset size)")
    p.add_argument("--views", type=int, default=4, help="stored views per training image, used by both rows "
                                                        "(default 4: the whole image + 3 distinct pad-crop views)")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last tensors (about 1.5x faster training on this CPU; default on)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage messages still print)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides for both rows")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from lfme_fast.ablations import link_shared
    from lfme_fast.config import load_config
    from lfme_fast.recipes import run

    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    root = prepare_data(Path(args.data), args.fmnist_root, t0)
    common = demo_overrides(args, root)
    timings: dict[str, float] = {}

    _say(t0, f"LFME: {args.expert_epochs} expert epoch(s), {args.views} stored view(s), {args.epochs} student "
             f"epoch(s) -> {out / 'lfme'}")
    t = time.perf_counter()
    run(load_config(CONFIG_DIR / "lfme.yaml", [*common, f"output_dir={out / 'lfme'}",
                                               f"experts.epochs={args.expert_epochs}", f"lfme.views={args.views}"]))
    timings["lfme_s"] = round(time.perf_counter() - t, 1)
    _say(t0, f"LFME done in {timings['lfme_s']:.0f} s; class-balanced CE baseline on the same stored views, "
             f"{args.epochs} epoch(s) -> {out / 'cb_ce'}")
    t = time.perf_counter()
    for shared in ("experts", "offline"):
        link_shared(out / "lfme" / shared, out / "cb_ce" / shared)
    run(load_config(CONFIG_DIR / "ablation_balanced.yaml", [*common, f"output_dir={out / 'cb_ce'}",
                                                              f"experts.epochs={args.expert_epochs}",
                                                              f"lfme.views={args.views}"]))
    timings["cb_ce_s"] = round(time.perf_counter() - t, 1)

    lfme_m = json.loads((out / "lfme" / "metrics.json").read_text())
    base_m = json.loads((out / "cb_ce" / "metrics.json").read_text())
    rows = {"LFME student (KD + SpES + SpIS)": _row(lfme_m), "class-balanced CE (same stored views)": _row(base_m)}
    experts = json.loads((out / "lfme" / "experts" / "summary.json").read_text())["experts"]
    table = results_table(rows, lfme_m["convention"])
    header_path = out / "lfme" / "offline" / "header.json"
    storage = json.loads(header_path.read_text())["storage"] if header_path.exists() else {}
    plots = {name: str((out / "lfme" / name).resolve()) for name in ("spes_weights.png", "spis_schedules.png",
                                                                      "per_class_accuracy.png")}
    plots["baseline per_class_accuracy.png"] = str((out / "cb_ce" / "per_class_accuracy.png").resolve())
    from lfme_fast.plots import plot_per_class_overlay

    overlay = plot_per_class_overlay(out / "per_class_overlay.png",
                                     {name: m["per_class_top1"] for name, m in zip(rows, (lfme_m, base_m))},
                                     lfme_m["train_class_counts"], json.loads((root / "manifest.json").read_text())
                                     .get("class_names"), title="LFME student vs class-balanced CE, per class")
    plots["both rows per class (overlay)"] = str(overlay.resolve())
    total = time.perf_counter() - t0
    notes = [f"Settings: resnet_small28; experts {args.expert_epochs} epoch(s); student and baseline {args.epochs} "
             f"epoch(s) of {args.epoch_samples or 'all'} class-balanced draws, batch 128; both rows replay the same "
             f"{args.views} stored view(s) per image (whole image + pad-crop views), so they differ only in the loss.",
             "Experts on their own subsets (test top-1 within the subset, %): "
             + ", ".join(f"{k} {100 * v['test_top1']:.2f}" for k, v in experts.items() if v.get("test_top1") is not None),
             f"Offline store: {storage.get('logit_bytes_per_image', float('nan')):.0f} bytes of float16 expert "
             f"logits per image.",
             f"Wall time: {total:.0f} s (LFME {timings['lfme_s']:.0f} s incl. experts and offline pass, baseline "
             f"{timings['cb_ce_s']:.0f} s)."]
    text = "# LFME demo on Fashion-MNIST-LT (IR 100)\n\n" + table + "\n" + "\n".join(f"- {n}" for n in notes) \
        + "\n\nPlots:\n" + "\n".join(f"- {k}: {v}" for k, v in plots.items()) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo.md", text)
    from lfme_fast.bench.common import machine_info

    atomic_write_json(out / "demo.json", {"rows": rows, "convention": lfme_m["convention"], "plots": plots,
                                          "machine": machine_info(),
                                          "experts": experts, "timings_s": {**timings, "total": round(total, 1)},
                                          "settings": vars(args), "storage": storage})
    print("\n" + text, flush=True)
    _say(t0, f"report written to {out / 'demo.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
