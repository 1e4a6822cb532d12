"""LFME's Table 3 ablation on Fashion-MNIST-LT: one command, shared experts and offline store.

``python -m lfme_fast.ablations --data DIR [--seeds 0,1] [--out DIR] [--epochs N] [--expert-epochs N]``

Rows (``configs/fmnist_lt/ablation_*.yaml``, all the ``lfme`` recipe): instance sampling; + KD; + SpES;
class-balanced sampling; + KD; + SpES; SpIS + KD + SpES (full LFME). Per seed, the experts and the
offline store are built once in ``OUT/seed<s>/shared`` (the full-LFME config with stages experts and
offline); every row's run folder links ``experts/`` and ``offline/`` there, so its own experts and
offline stages find them up to date and only the student trains. All rows therefore see the same
experts and the same stored views, and differ only in sampling and loss.

Writes ``OUT/ablations.md`` (many / medium / few / overall test top-1, mean +- std over seeds when
there are several; the count of seeds is given) and ``OUT/ablations.json`` (every number).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from lfme_fast.io import atomic_write_json, atomic_write_text

__all__ = ["VARIANTS", "run_ablations", "format_table", "link_shared", "main"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "fmnist_lt"
#: (key, row label) in the paper's Table 3 order.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("instance", "Instance sampling"),
    ("instance_kd", "  + KD"),
    ("instance_kd_spes", "  + KD + SpES"),
    ("balanced", "Class-balanced sampling"),
    ("balanced_kd", "  + KD"),
    ("balanced_kd_spes", "  + KD + SpES"),
    ("balanced_kd_spes_spis", "SpIS + KD + SpES (LFME)"),
)
COLUMNS = ("many", "medium", "few", "overall")


def link_shared(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative symlink); an existing correct link is kept. Rows link a shared
    ``experts/`` and ``offline/`` this way, so their own stages find them up to date."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link to the shared {target.name}; remove it")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(rel, link)


def _row(metrics: dict[str, Any]) -> dict[str, float | None]:
    subs = metrics["subsets"]
    return {"many": subs.get("many", {}).get("top1"), "medium": subs.get("medium", {}).get("top1"),
            "few": subs.get("few", {}).get("top1"), "overall": metrics.get("top1")}


def run_ablations(data: str | Path, out: str | Path, seeds: Sequence[int], overrides: Sequence[str] = (),
                  variants: Sequence[str] | None = None, log=print) -> dict[str, Any]:
    """Run every row for every seed (finished runs are skipped by their stage fingerprints); returns
    ``{"rows": {key: {seed: row}}, ...}`` and writes the markdown/JSON reports into ``out``."""
    from lfme_fast.config import load_config
    from lfme_fast.train import run

    out = Path(out)
    keys = [k for k, _ in VARIANTS if variants is None or k in variants]
    unknown = set(variants or ()) - {k for k, _ in VARIANTS}
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {sorted(unknown)}; known: {[k for k, _ in VARIANTS]}")
    common = [f"data.root={data}", *overrides]
    results: dict[str, dict[int, dict[str, float | None]]] = {k: {} for k in keys}
    t0 = time.perf_counter()
    for seed in seeds:
        shared = out / f"seed{seed}" / "shared"
        log(f"[ablations] seed {seed}: experts + offline store in {shared}")
        run(load_config(CONFIG_DIR / "ablation_balanced_kd_spes_spis.yaml",
                        [*common, f"seed={seed}", f"output_dir={shared}", "stages=[experts, offline]"]))
        for i, key in enumerate(keys):
            run_dir = out / f"seed{seed}" / key
            link_shared(shared / "experts", run_dir / "experts")
            link_shared(shared / "offline", run_dir / "offline")
            log(f"[ablations] seed {seed}, row {i + 1}/{len(keys)}: {key} ({time.perf_counter() - t0:.0f} s so far)")
            run(load_config(CONFIG_DIR / f"ablation_{key}.yaml", [*common, f"seed={seed}", f"output_dir={run_dir}"]))
            results[key][seed] = _row(json.loads((run_dir / "metrics.json").read_text()))
    convention = json.loads((out / f"seed{seeds[0]}" / keys[0] / "metrics.json").read_text())["convention"]
    report = {"data": str(data), "seeds": list(seeds), "overrides": list(overrides), "convention": convention,
              "metric": "test top-1 (%): per subset the mean of its classes' accuracies, overall over all images",
              "rows": {k: {str(s): r for s, r in v.items()} for k, v in results.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    table = format_table(results, seeds, convention, overrides)
    atomic_write_json(out / "ablations.json", report)
    atomic_write_text(out / "ablations.md", table)
    log(table)
    return report


def _cell(values: list[float | None]) -> str:
    vals = [100.0 * v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def format_table(results: dict[str, dict[int, dict[str, float | None]]], seeds: Sequence[int], convention: str,
                 overrides: Sequence[str] = ()) -> str:
    """Markdown table of the rows (mean ± sample std over seeds when there are several)."""
    labels = dict(VARIANTS)
    n = len(seeds)
    lines = ["# LFME ablation (paper Table 3) on Fashion-MNIST-LT", "",
             f"Test top-1 (%), {'mean ± std over ' if n > 1 else ''}{n} seed{'s' if n > 1 else ''} "
             f"({', '.join(map(str, seeds))}); subsets: {convention}.",
             f"Overrides: {' '.join(overrides) if overrides else 'none (the configs as shipped)'}.", "",
             "| variant | many | medium | few | overall |", "|---|---|---|---|---|"]
    for key, per_seed in results.items():
        cells = [_cell([per_seed[s][c] for s in seeds if s in per_seed]) for c in COLUMNS]
        lines.append(f"| {labels[key].strip()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfme_fast.ablations", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared Fashion-MNIST-LT (python -m data_prep fmnist-lt)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--out", default="runs/ablations", help="output folder (default runs/ablations)")
    parser.add_argument("--epochs", type=int, help="student epochs (default: the configs' optim.epochs)")
    parser.add_argument("--expert-epochs", type=int, help="expert epochs (default: the configs' experts.epochs)")
    parser.add_argument("--variants", help="comma-separated subset of the rows (default all)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    if args.expert_epochs:
        overrides.append(f"experts.epochs={args.expert_epochs}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    run_ablations(args.data, args.out, seeds, overrides, variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
