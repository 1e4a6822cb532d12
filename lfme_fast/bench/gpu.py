"""The GPU path, measured in one script: ``python -m lfme_fast.bench gpu`` (``make bench-gpu``).

Sized to finish within 8 minutes on one H100/H200-class GPU (``--budget-s``: a section that would
start after the budget is recorded as skipped), it writes ``results/bench_gpu.json``:

1. **decode**: each loader back end alone at batch 256, RandomResizedCrop 224 + flip + normalise,
   over a synthetic ImageNet-LT-shaped set (stored at max side 256): DALI with ``mixed`` decode
   (nvJPEG / the hardware decoder) and the ffcv back end shipping uint8 batches that are normalised
   on the GPU; images/s per epoch after a warm-up epoch. DALI again at each ``--dali-hw-loads`` value
   of ``hw_decoder_load`` (``data.hw_decoder_load``; 0 = nvJPEG's CUDA decoder only, 1 = all JPEGs to
   the hardware decoder), rows ``dali@hw<load>``.
2. **train**: ResNet-10 and ResNet-50 at 224, bf16 autocast, channels_last, training samples/s fed by
   each back end and by a synthetic on-GPU tensor (the compute ceiling), with the data-wait fraction
   of the epoch (time in ``next(iterator)`` over the epoch time; :mod:`lfme_fast.bench.epoch`).
3. **step**: student step costs on stored outputs against plain CE and against live teachers
   (:mod:`lfme_fast.bench.step`: LFME, and the ECL / CBD rows it has).
4. **compile**: ``torch.compile`` on and off (``train.compile``) for the train section's models at
   224, bf16 channels_last: training steps/s eager and compiled after warm-up, the compile time apart
   (:mod:`lfme_fast.bench.compile`). Last, as the part the budget may skip; ``--sections compile``
   runs it alone.

Timing: epochs and steps use CUDA events after warm-up (:class:`~lfme_fast.bench.common.Stopwatch`);
the host waits of the data-wait fraction are wall clock. GPU name, driver, CUDA, cuDNN, torch and
DALI versions are recorded. Each measurement runs in its own process (a loader's threads and a
CUDA context do not linger into the next one).

Without CUDA the same script runs the same code at tiny sizes on the CPU (``"device":
"cpu-fallback"``), so that it is known to start; those figures measure nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lfme_fast.bench.common import error_record, gpu_info, machine_info, run_isolated, write_result
from lfme_fast.bench.epoch import EpochConfig, build_training_loader, measure_backend, timed_loop

__all__ = ["Sizes", "GPU_SIZES", "FALLBACK_SIZES", "measure_decode", "run", "main"]


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the GPU sizes, or the CPU fallback's tiny ones."""

    batch_size: int
    resolution: int
    decode_epochs: int  # timed epochs per back end, after one warm-up epoch
    warmup_steps: int
    ceiling_steps: int
    max_batches: int | None  # cap on an epoch's batches (None: the whole epoch)
    step_batch_size: int
    step_resolution: int
    step_repeats: int
    step_store_samples: int
    scale: float  # synthetic set size without --data
    compile_steps: int = 30
    compile_warmup: int = 10
    compile_backend: str = "inductor"  # the fallback's aot_eager only shows that the section runs
    #: budget left that a compile part needs to start: a guess (a cold Inductor compile of a ResNet's forward
    #: and backward, plus the eager and compiled steps) to replace by the first GPU run's compile_s
    compile_reserve_s: float = 120.0


GPU_SIZES = Sizes(batch_size=256, resolution=224, decode_epochs=3, warmup_steps=10, ceiling_steps=30,
                  max_batches=None, step_batch_size=256, step_resolution=224, step_repeats=30,
                  step_store_samples=20000, scale=0.1)
FALLBACK_SIZES = Sizes(batch_size=8, resolution=32, decode_epochs=1, warmup_steps=1, ceiling_steps=2,
                       max_batches=3, step_batch_size=4, step_resolution=32, step_repeats=2,
                       step_store_samples=64, scale=0.01, compile_steps=2, compile_warmup=1,
                       compile_backend="aot_eager", compile_reserve_s=0.0)


def measure_decode(backend: str, cfg: EpochConfig, epochs: int) -> dict[str, Any]:
    """Images/s of ``backend``'s training loader alone (no model): a warm-up epoch, then ``epochs``
    timed ones (each to its last batch ready on the device: CUDA events on a GPU)."""
    t0 = time.perf_counter()
    loader, _ = build_training_loader(backend, cfg, total_epochs=epochs + 1)
    build_s = time.perf_counter() - t0
    runs = []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        runs.append(timed_loop(loader, lambda batch: len(batch), cfg.device, cfg.max_batches))
    close = getattr(loader, "close", None)
    if close:
        close()
    rates = [r["samples_per_s"] for r in runs[1:]]
    return {"backend": backend, "images_per_s": statistics.median(rates), "best_epoch_images_per_s": max(rates),
            "epoch_images_per_s": rates, "warmup_epoch_s": runs[0]["epoch_s"], "build_s": build_s,
            "images_per_epoch": runs[1]["samples"], "batches_per_epoch": runs[1]["batches"],
            "output": ("bf16 NCHW channels_last on the GPU" if cfg.cuda else "float32 on the CPU (fallback)")}


class _Budget:
    """Skips what would start after ``seconds`` (the script must end within its time on the GPU)."""

    def __init__(self, seconds: float, log: Callable[[str], None]):
        self.seconds = seconds
        self.t0 = time.perf_counter()
        self.log = log

    def run(self, name: str, fn: Callable[..., Any], *args: Any, isolate: bool,
            reserve_s: float = 0.0) -> dict[str, Any]:
        """``fn(*args)`` (in its own process when ``isolate``), or a skip record when the budget is spent or
        fewer than ``reserve_s`` seconds of it are left (a part known to take long)."""
        elapsed = time.perf_counter() - self.t0
        if elapsed + reserve_s > self.seconds:
            need = f", this part needs about {reserve_s:.0f} s" if reserve_s else ""
            self.log(f"[bench gpu] {name}: skipped, {elapsed:.0f} s of the {self.seconds:.0f} s budget used{need}")
            return {"skipped": f"over the time budget ({elapsed:.0f} s of {self.seconds:.0f} s used{need})"}
        self.log(f"[bench gpu] {name} ...")
        t0 = time.perf_counter()
        try:
            out = run_isolated(fn, *args, isolate=isolate)
        except Exception as exc:  # recorded; the other parts still run
            out = error_record(exc)
            self.log(f"[bench gpu] {name}: {out['error']}")
        out["wall_s"] = time.perf_counter() - t0
        return out


def _step_costs(device: str, sizes: Sizes) -> dict[str, Any]:
    """The student-step benchmark's rows on this device (stored outputs vs plain CE vs live teachers)."""
    from lfme_fast.bench import step

    return step.run(device=device, batch_size=sizes.step_batch_size, resolution=sizes.step_resolution,
                    repeats=sizes.step_repeats, warmup=2 if device != "cpu" else 1,
                    store_samples=sizes.step_store_samples, views=1)


def run(root: Path, *, device: str, sizes: Sizes, backends: Sequence[str], archs: Sequence[str],
        sections: Sequence[str], workers: int = 0, isolate: bool = True, budget_s: float = 450.0,
        log: Callable[[str], None] = print, dali_hw_loads: Sequence[float] = ()) -> dict[str, Any]:
    """Every requested section; returns the result's ``decode`` / ``train`` / ``step`` parts."""
    budget = _Budget(budget_s, log)
    base = EpochConfig(root=str(root), resolution=sizes.resolution, batch_size=sizes.batch_size, workers=workers,
                       device=device, warmup_steps=sizes.warmup_steps, ceiling_steps=sizes.ceiling_steps,
                       max_batches=sizes.max_batches)
    out: dict[str, Any] = {}
    if "decode" in sections:
        out["decode"] = {b: budget.run(f"decode {b}", measure_decode, b, base, sizes.decode_epochs, isolate=isolate)
                         for b in backends}
        for load in dali_hw_loads if "dali" in backends else ():
            cfg = dataclasses.replace(base, hw_decoder_load=float(load))
            row = budget.run(f"decode dali, hw_decoder_load {load:g}", measure_decode, "dali", cfg,
                             sizes.decode_epochs, isolate=isolate)
            out["decode"][f"dali@hw{load:g}"] = {**row, "hw_decoder_load": float(load)}
    if "train" in sections:
        out["train"] = {}
        for arch in archs:
            cfg = dataclasses.replace(base, arch=arch)
            out["train"][arch] = {feed: budget.run(f"train {arch} fed by {feed}", measure_backend, feed, cfg,
                                                   isolate=isolate)
                                  for feed in ("synthetic", *backends)}
    if "step" in sections:
        out["step"] = budget.run("student step costs", _step_costs, device, sizes, isolate=isolate)
    if "compile" in sections:
        from lfme_fast.bench.compile import NUM_CLASSES, CompileCase, measure_case

        out["compile"] = {}
        for arch in archs:
            case = CompileCase(arch=arch, resolution=sizes.resolution, batch_size=sizes.batch_size, device=device,
                               steps=sizes.compile_steps, warmup=sizes.compile_warmup, channels_last=device != "cpu",
                               backend=sizes.compile_backend, num_classes=NUM_CLASSES.get(arch, 1000))
            out["compile"][arch] = budget.run(f"torch.compile on/off {arch}", measure_case, case, isolate=isolate,
                                              reserve_s=sizes.compile_reserve_s)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring and ``--help``."""
    from lfme_fast.bench.loader import DEFAULT_CACHE, dataset_stats, prepare_synthetic

    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared dataset dir (default: a synthetic set in --cache)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"synthetic set size without --data (default {GPU_SIZES.scale} on a GPU, "
                        f"{FALLBACK_SIZES.scale} for the CPU fallback)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"synthetic sets' cache (default {DEFAULT_CACHE})")
    p.add_argument("--backends", default="dali,ffcv", help="loader back ends (default dali,ffcv)")
    p.add_argument("--archs", default="resnet10,resnet50",
                   help="models of the train section (default resnet10,resnet50)")
    p.add_argument("--sections", default="decode,train,step,compile",
                   help="which parts to run (default decode,train,step,compile)")
    p.add_argument("--workers", type=int, default=0, help="loader CPU threads/workers (default: all cores)")
    p.add_argument("--dali-hw-loads", default=None,
                   help="DALI decode again at these hw_decoder_load values (default 0,1 on a GPU, 0 in the CPU "
                        "fallback, where it only shows that the option reaches the loader; '' for none)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no part after this many seconds from the script's start, dataset preparation "
                        "included (default 450: the run ends within 8 minutes)")
    p.add_argument("--cpu-fallback", action="store_true", help="run the CPU fallback even when CUDA is available")
    p.add_argument("--no-isolate", action="store_true", help="run every part in this process (tests)")
    p.add_argument("--json-out", default="results/bench_gpu.json", help="default results/bench_gpu.json")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_fallback
    sizes = GPU_SIZES if cuda else FALLBACK_SIZES
    device = "cuda" if cuda else "cpu"
    scale = args.scale if args.scale is not None else sizes.scale
    root = args.data if args.data is not None else prepare_synthetic(scale, args.cache)
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    machine, gpu = machine_info(), gpu_info()
    parts = run(root, device=device, sizes=sizes, backends=split(args.backends), archs=split(args.archs),
                sections=split(args.sections), workers=args.workers, isolate=not args.no_isolate,
                budget_s=args.budget_s - (time.perf_counter() - t0),
                dali_hw_loads=[float(x) for x in split(args.dali_hw_loads if args.dali_hw_loads is not None
                                                       else ("0,1" if cuda else "0"))])
    write_result(args.json_out, {
        "benchmark": "gpu",
        "device": "cuda" if cuda else "cpu-fallback",
        "note": None if cuda else "CPU fallback at tiny sizes: shows the script runs; measures nothing about a GPU",
        "gpu": gpu, "machine": machine,
        "config": {**dataclasses.asdict(sizes), "precision": "bf16 autocast, channels_last" if cuda else "fp32",
                   "augment": "RandomResizedCrop + flip + normalise", "sampler": "ClassBalancedSampler(4 per class)",
                   "cudnn_benchmark": torch.backends.cudnn.benchmark, "workers": args.workers or os.cpu_count(),
                   "budget_s": args.budget_s},
        "dataset": dataset_stats(Path(root), "train"),
        **parts, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
