"""Sampler throughput: ``python -m lfme_fast.bench sampler [--json-out PATH] [--repeats N]``.

Indices (and indices + SpIS weights) per second for one epoch of :class:`ClassBalancedSampler` on
the real ImageNet-LT training histogram (1000 classes, 115,846 images) and on a 100x larger one
(every class count x100: 11.58 M images), labels interleaved (shuffled) as they would be on disk. The
baseline, measured in the same run, is :class:`PythonClassAwareSampler` (OLTR's pure-Python
ClassAwareSampler). The other built-in samplers are timed too, for reference.

Timing: median and min over ``--repeats`` epochs (each repeat a different epoch, as in training),
after a warm-up that includes numba compilation (or loading its on-disk cache), reported separately
as ``first_call_s``. The Python sampler is first timed on two consecutive fixed-size prefixes (the
first pays for the initial shuffle of every class, the second gives the steady rate); only if a whole
epoch would take longer than ``--python-limit-s`` (60 s) at that rate is it extrapolated instead of
measured, which the JSON then says (``extrapolated: true``). Its number of repeats is capped so that
it stays within ``--python-budget-s`` (recorded as ``repeats``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lfme_fast.bench.common import machine_info, repeat_timing, write_result
from lfme_fast.sampling import PythonClassAwareSampler, build_sampler

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_HISTOGRAM = Path("shared/data/splits/ImageNet_LT/class_count_ImageNet_LT.npy")
_PACKAGED_HISTOGRAM = Path("data_prep/histograms/imagenet_lt_train.npy")


def load_imagenet_lt_histogram() -> tuple[np.ndarray, str]:
    """``(counts, path)``: the ImageNet-LT per-class training counts and the file they came from.

    Tries the shared split file (``../shared/data/splits/ImageNet_LT/class_count_ImageNet_LT.npy`` next
    to the repository, or under the working directory's parent), then the copy shipped in the
    ``data_prep`` package (``data_prep/histograms/imagenet_lt_train.npy``).
    """
    candidates = [
        _REPO_ROOT.parent / _SHARED_HISTOGRAM,
        Path.cwd().parent / _SHARED_HISTOGRAM,
        _REPO_ROOT / "data_prep" / "splits" / "ImageNet_LT" / "class_count_ImageNet_LT.npy",  # shipped copy
        _REPO_ROOT / _PACKAGED_HISTOGRAM,
    ]
    try:  # the installed data_prep package, wherever it lives
        import data_prep

        candidates.append(Path(data_prep.__file__).resolve().parent / "histograms" / "imagenet_lt_train.npy")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            counts = np.load(path).astype(np.int64).ravel()
            if counts.size == 0 or counts.min() < 1:
                raise ValueError(f"{path} is not a per-class count histogram (min {counts.min()})")
            return counts, str(path)
    raise FileNotFoundError("ImageNet-LT histogram not found; tried: " + ", ".join(str(p) for p in candidates))


def interleaved_labels(counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels with ``counts[c]`` samples of class ``c``, shuffled (classes interleaved on disk)."""
    labels = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _time_epochs(fn: Callable[[int], Any], repeats: int) -> dict[str, float]:
    """Time ``fn(epoch)`` for ``repeats`` distinct epochs after a warm-up call at epoch 0."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    epoch = iter(range(1, repeats + 1))
    stats = repeat_timing(lambda: fn(next(epoch)), repeats=repeats, warmup=0)
    stats["first_call_s"] = first
    return stats


def _rates(stats: dict[str, float], n: int) -> dict[str, float]:
    return {"indices_per_s_median": n / stats["median_s"], "indices_per_s_max": n / stats["min_s"]}


def _time_python(labels: np.ndarray, repeats: int, limit_s: float, budget_s: float, prefix: int) -> dict[str, Any]:
    """Time the pure-Python OLTR sampler for one epoch (or extrapolate from a prefix, see module doc)."""
    n = int(labels.size)
    t0 = time.perf_counter()
    sampler = PythonClassAwareSampler(labels, samples_per_class=4, seed=0)
    construct = time.perf_counter() - t0
    out: dict[str, Any] = {"construct_s": construct}
    # Two consecutive prefixes: the first also pays for the first shuffle of every class it visits
    # (with 4 per visit, a prefix of 1 M indices visits every class), the second runs at the steady
    # rate of the epochs that are timed below. Extrapolating from the first alone overestimates ~3x.
    prefix = max(1, min(prefix, n // 2))
    it = iter(sampler)
    t0 = time.perf_counter()
    first = len(list(itertools.islice(it, prefix)))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = len(list(itertools.islice(it, prefix)))
    second_s = time.perf_counter() - t0
    estimate = second_s * n / second
    out.update(prefix_samples=prefix, first_prefix_s=first_s, second_prefix_s=second_s, estimated_epoch_s=estimate)
    if estimate > limit_s:
        out.update(extrapolated=True, repeats=0, median_s=estimate, min_s=estimate,
                   note=f"one epoch would take ~{estimate:.0f} s > {limit_s:.0f} s: time extrapolated linearly "
                        f"from the steady rate of indices {first}..{first + second}")
        return out
    reps = max(1, min(repeats, int(budget_s // max(estimate, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = list(iter(sampler))  # the cycles' state carries over between epochs, as in OLTR
        times.append(time.perf_counter() - t0)
        assert len(result) == n
        del result
    out.update(extrapolated=False, repeats=reps, median_s=statistics.median(times), min_s=min(times),
               mean_s=statistics.fmean(times))
    if reps < repeats:
        out["note"] = f"repeats capped at {reps} to stay within a {budget_s:.0f} s budget"
    return out


def bench_case(name: str, counts: np.ndarray, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    """All measurements for one histogram."""
    labels = interleaved_labels(counts, seed=0)
    n = int(labels.size)
    v1 = np.random.default_rng(1).random(n)
    total_epochs = repeats + 2
    print(f"[bench sampler] {name}: {n:,} samples, {counts.size} classes", flush=True)

    t0 = time.perf_counter()
    sampler = build_sampler("class_balanced", labels, samples_per_class=4, seed=0, initial_weights=v1,
                            schedule="linear")
    construct = time.perf_counter() - t0
    idx = _time_epochs(sampler.indices, repeats)
    idx_w = _time_epochs(lambda e: sampler.indices_and_weights(e, total_epochs), repeats)
    py = _time_python(labels, repeats, args.python_limit_s, args.python_budget_s, args.python_prefix)

    case: dict[str, Any] = {
        "num_samples": n,
        "num_classes": int(counts.size),
        "labels": "interleaved (shuffled with seed 0)",
        "samples_per_class": 4,
        "numba_class_balanced": {"construct_s": construct, "indices": {**idx, **_rates(idx, n)},
                                 "indices_and_weights": {**idx_w, **_rates(idx_w, n)}},
        "python_oltr_class_aware": {**py, **_rates(py, n)},
    }
    speed = {
        "indices_median": py["median_s"] / idx["median_s"],
        "indices_best": py["min_s"] / idx["min_s"],
        "indices_and_weights_median": py["median_s"] / idx_w["median_s"],
        "indices_and_weights_best": py["min_s"] / idx_w["min_s"],
    }
    speed["goal_100x_met"] = speed["indices_median"] >= 100.0
    case["speedup_vs_python"] = speed
    print(f"  numba {idx['median_s'] * 1e3:.2f} ms/epoch (+weights {idx_w['median_s'] * 1e3:.2f} ms), "
          f"python {py['median_s'] * 1e3:.0f} ms{' (extrapolated)' if py['extrapolated'] else ''}: "
          f"{speed['indices_median']:.0f}x", flush=True)

    others: dict[str, Any] = {}
    many = np.flatnonzero(counts >= 100)  # LFME's many-shot subset: an expert's epoch
    if many.size == 0:
        many = np.array([int(np.argmax(counts))])
    for label, kind, classes in (("instance", "instance", None), ("square_root", "sqrt", None),
                                 ("progressive", "progressive", None), ("subset_many_shot", "subset", many)):
        s = build_sampler(kind, labels, seed=0, total_epochs=total_epochs, classes=classes, initial_weights=v1)
        m = len(s)
        st = _time_epochs(s.indices, repeats)
        st_w = _time_epochs(lambda e, s=s: s.indices_and_weights(e, total_epochs), repeats)
        others[label] = {"epoch_samples": m, "indices": {**st, **_rates(st, m)},
                         "indices_and_weights": {**st_w, **_rates(st_w, m)}}
    t0 = time.perf_counter()
    for e in range(repeats):
        np.random.default_rng(e).permutation(n)
    others["numpy_permutation_reference"] = {"median_s_approx": (time.perf_counter() - t0) / repeats,
                                             "note": "np.random.default_rng(e).permutation(N), mean over repeats"}
    case["other_samplers"] = others
    return case


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sampler benchmark and write its JSON (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench sampler", description=__doc__.split("\n")[0])
    p.add_argument("--json-out", default="results/bench_sampler.json", help="where to write the JSON result")
    p.add_argument("--repeats", type=int, default=20, help="timed epochs per measurement (after a warm-up)")
    p.add_argument("--scale", type=int, default=100, help="multiplier of the large case (0 skips it)")
    p.add_argument("--python-limit-s", type=float, default=60.0,
                   help="extrapolate the Python sampler from a prefix if an epoch would take longer")
    p.add_argument("--python-budget-s", type=float, default=120.0,
                   help="cap the Python sampler's repeats to stay within this many seconds per case")
    p.add_argument("--python-prefix", type=int, default=1_000_000,
                   help="indices of the Python sampler timed first, to estimate an epoch")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    counts, source = load_imagenet_lt_histogram()
    result: dict[str, Any] = {
        "benchmark": "sampler",
        "description": "one epoch of ClassBalancedSampler (OLTR ClassAwareSampler semantics, 4 per class) vs "
                       "the pure-Python OLTR sampler, ImageNet-LT histogram and a x-scaled copy",
        "histogram_source": source,
        "repeats": args.repeats,
        "machine": machine_info(),
        "cases": {},
    }
    result["cases"]["imagenet_lt"] = bench_case("imagenet_lt", counts, args.repeats, args)
    if args.scale > 1:
        result["cases"][f"imagenet_lt_x{args.scale}"] = bench_case(
            f"imagenet_lt_x{args.scale}", counts * args.scale, args.repeats, args)
    result["goal"] = ">= 100x faster than the pure-Python OLTR sampler (median indices/s)"
    result["goal_met"] = all(c["speedup_vs_python"]["goal_100x_met"] for c in result["cases"].values())
    write_result(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
