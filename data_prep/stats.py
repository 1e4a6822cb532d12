"""Imbalance statistics of a long-tailed dataset, for the whole set and each cardinality-adjacent subset.

The four metrics are those of LFME (ECCV 2020) Sec. 3, on per-class counts ``N_i`` (``C`` classes,
``N`` samples; within a subset ``C`` and ``N`` are the subset's):

* ``ratio`` I_Ratio = max N_i / min N_i
* ``kl``    I_KL    = sum_i p_i log2(p_i / (1/C)), p_i = N_i / N (log base 2 reproduces the paper's Table 1)
* ``abs``   I_Abs   = sum_i |1/C - N_i/N|
* ``gini``  I_Gini  = sum_{i=1..C} (2i - C - 1) N_i / (C sum_i N_i), classes sorted ascending by count

Usage: ``python -m data_prep stats SOURCE [--convention lfme|strict] [--thresholds A,B] [--split train] [--json]``
where SOURCE is a split list ("relative/path label" lines), a ``.npy`` of per-class counts, or a prepared
dataset directory holding ``manifest.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lfme_fast.subsets import CONVENTIONS, describe_convention, parse_thresholds, resolve_thresholds, split_classes

__all__ = ["imbalance_metrics", "load_counts", "load_split_list_counts", "stats_report", "format_report", "main"]

METRIC_KEYS = ("classes", "samples", "ratio", "kl", "abs", "gini")


def _check_counts(counts: Any, what: str = "counts") -> np.ndarray:
    """Validate a 1-D array of positive integer per-class counts (an empty array is allowed)."""
    arr = np.asarray(counts)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of per-class counts, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}: class {i} has non-integer count {arr[i]!r}")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    nonpos = np.flatnonzero(arr <= 0)
    if nonpos.size:
        i = int(nonpos[0])
        raise ValueError(f"{what}: class {i} has {int(arr[i])} samples (every class needs at least 1)")
    return arr


def imbalance_metrics(counts: Any) -> dict[str, Any]:
    """The four LFME imbalance metrics of per-class ``counts`` (all classes must be non-empty).

    Returns ``{"classes", "samples", "ratio", "kl", "abs", "gini"}``. For no classes at all the four
    metrics are ``None`` (an empty subset).
    """
    arr = _check_counts(counts)
    n_classes = int(arr.size)
    if n_classes == 0:
        return {"classes": 0, "samples": 0, "ratio": None, "kl": None, "abs": None, "gini": None}
    c = np.sort(arr).astype(np.float64)
    total = float(c.sum())
    p = c / total
    ranks = np.arange(1, n_classes + 1, dtype=np.float64)
    return {
        "classes": n_classes,
        "samples": int(arr.sum()),
        "ratio": float(c[-1] / c[0]),
        # counts are >= 1, so p > 0 and the log is finite
        "kl": float(np.sum(p * np.log2(p * n_classes))),
        "abs": float(np.sum(np.abs(1.0 / n_classes - p))),
        "gini": float(np.sum((2.0 * ranks - n_classes - 1.0) * c) / (n_classes * total)),
    }


def load_split_list_counts(path: str | os.PathLike) -> np.ndarray:
    """Per-class counts of a split list file (plain or ``.gz``) with lines ``relative/path label``.

    Labels must be integers 0..C-1 with every class present; blank lines are ignored.
    """
    path = Path(path)
    labels: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open  # the shipped lists are gzipped
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            # the label is the last field; the path is everything before it
            parts = stripped.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'relative/path label', got {stripped!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0:
                raise ValueError(f"{path}:{lineno}: label {label} is negative")
            labels.append(label)
    if not labels:
        raise ValueError(f"{path}: split list has no entries")
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        shown = ", ".join(str(int(c)) for c in empty[:10]) + (" ..." if empty.size > 10 else "")
        raise ValueError(
            f"{path}: labels must cover 0..{counts.size - 1} without gaps, but class {int(empty[0])} has no "
            f"images (empty classes: {shown})"
        )
    return counts.astype(np.int64)


def _load_manifest_counts(directory: Path, split: str) -> np.ndarray:
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{directory} is a directory but holds no manifest.json (not a prepared dataset)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e})") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise ValueError(f"{manifest_path}: missing the 'splits' mapping")
    if split not in splits:
        raise ValueError(f"{manifest_path}: no split {split!r}; available: {sorted(splits)}")
    entry = splits[split]
    if not isinstance(entry, dict) or "class_counts" not in entry:
        raise ValueError(f"{manifest_path}: splits[{split!r}] has no 'class_counts'")
    values = entry["class_counts"]
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{manifest_path}: splits[{split!r}]['class_counts'] must be a list of ints")
    return _check_counts(np.asarray(values, dtype=np.int64), f"{manifest_path} split {split!r}")


def load_counts(source: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Per-class counts (int64) from a split list, a ``.npy`` of counts, or a prepared dataset directory.

    ``split`` only matters for a directory: counts come from ``manifest["splits"][split]["class_counts"]``.
    """
    path = Path(source)
    if not path.exists():
        raise ValueError(f"stats source {str(path)!r} does not exist")
    if path.is_dir():
        return _load_manifest_counts(path, split)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: cannot load as a plain .npy array ({e})") from None
        arr = _check_counts(arr, str(path))
        if arr.size == 0:
            raise ValueError(f"{path}: holds no classes")
        return arr
    return load_split_list_counts(path)


def stats_report(
    counts: Any, convention: str = "lfme", thresholds: Sequence[int] | None = None
) -> dict[str, Any]:
    """Imbalance metrics of the entire set and of each subset.

    Shape: ``{"convention": {...}, "entire": metrics, "<subset name>": metrics, ...}`` with subset names in
    many -> few order (``many``, ``medium``, ``few`` for the three-way split). Each subset entry also carries
    its count range under ``"range"``.
    """
    arr = _check_counts(counts)
    if arr.size == 0:
        raise ValueError("counts holds no classes")
    ts = resolve_thresholds(convention, thresholds)
    # explicit thresholds equal to a named convention are that convention (as describe_convention says)
    name = convention if thresholds is None or CONVENTIONS.get(convention) == ts else "custom"
    report: dict[str, Any] = {
        "convention": {
            "name": name,
            "thresholds": list(ts),
            "description": describe_convention(convention, thresholds),
        },
        "entire": imbalance_metrics(arr),
    }
    for subset in split_classes(arr, thresholds=ts):
        entry = imbalance_metrics(arr[subset.classes])
        entry["range"] = subset.range_text()
        report[subset.name] = entry
    return report


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """An aligned plain-text table of a :func:`stats_report` result, headed by the convention."""
    header = ["subset", "range", "classes", "samples", "I_Ratio", "I_KL", "I_Abs", "I_Gini"]
    rows = [header]
    for key, entry in report.items():
        if key == "convention":
            continue
        rows.append(
            [
                key,
                entry.get("range", "all"),
                _fmt(entry["classes"], 0),
                _fmt(entry["samples"], 0),
                _fmt(entry["ratio"], 1),
                _fmt(entry["kl"], 3),
                _fmt(entry["abs"], 3),
                _fmt(entry["gini"], 3),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"convention: {report['convention']['description']}"]
    for r in rows:
        # names left-aligned, numbers right-aligned
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [r[i].rjust(widths[i]) for i in range(2, len(r))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep stats",
        description="Imbalance metrics (I_Ratio, I_KL, I_Abs, I_Gini) of a dataset and its cardinality-adjacent subsets.",
    )
    parser.add_argument("source", help="split list ('path label' lines), .npy of per-class counts, or prepared dataset dir")
    parser.add_argument("--convention", choices=sorted(CONVENTIONS), default="lfme",
                        help="subset convention (default lfme: many >= 100, medium 21..99, few <= 20)")
    parser.add_argument("--thresholds", default=None,
                        help="custom descending inclusive lower bounds 'A,B,...' (overrides --convention)")
    parser.add_argument("--split", default="train", help="split to read from a prepared dataset dir (default train)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``stats SOURCE [--convention lfme|strict] [--thresholds A,B] [--split train] [--json]``."""
    parser = _build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        thresholds = parse_thresholds(args.thresholds) if args.thresholds is not None else None
        counts = load_counts(args.source, split=args.split)
        report = stats_report(counts, convention=args.convention, thresholds=thresholds)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
