"""The GPU path, measured in one script: ``python -m lfme_fast.bench gpu`` (``make bench-gpu``).

Sized to finish within 8 minutes on one H100/H200-class GPU, it writes ``results/bench_gpu.json``:

1. **decode**: each loader back end alone at batch 256, RandomResizedCrop 224 + flip + normalise,
   over a synthetic ImageNet-LT-shaped set (stored at max side 256): DALI with ``mixed`` decode
   (nvJPEG / the hardware decoder), the ffcv back end shipping uint8 batches that are normalised
   on the GPU, and the ``torch`` back end (DataLoader + Pillow, pinned uint8 batches normalised on the
   GPU: the loader path that needs neither DALI nor ffcv); images/s per epoch after a warm-up epoch.
   DALI again at each ``--dali-hw-loads`` value of ``hw_decoder_load`` (``data.hw_decoder_load``;
   0 = nvJPEG's CUDA decoder only, 1 = all JPEGs to the hardware decoder), rows ``dali@hw<load>``.
   Our DALI pipeline decodes a region of interest (``fn.decoders.image_slice``), and DALI's docs for
   older releases say ROI decoding does not use the hardware decoder: identical hw0 and hw1 figures
   mean it was not used (the rows say so).
2. **train**: ResNet-10 and ResNet-50 at 224, bf16 autocast, channels_last, ``cudnn.benchmark`` on,
   training samples/s fed by each back end and by a synthetic on-GPU tensor (the compute ceiling),
   with the data-wait fraction of the epoch (time in ``next(iterator)`` over the epoch time;
   :mod:`lfme_fast.bench.epoch`).
3. **step**: student step costs on stored outputs against plain CE and against live teachers
   (:mod:`lfme_fast.bench.step`: LFME, and the ECL / CBD rows it has).
4. **compile**: ``torch.compile`` on and off (``train.compile``) for the train section's models at
   224, bf16 channels_last: training steps/s eager and compiled after warm-up, the compile time apart
   (:mod:`lfme_fast.bench.compile`). Last, as the part the budget may skip; ``--sections compile``
   runs it alone.

Staying within the time: ``--budget-s`` (default 430) is when the last part may start, counted from the
start of the process (Python's start-up and the torch import count, and so does the dataset
preparation); a part starts only if its reserve (a guess of its length: ``Sizes.*_reserve_s``) still
fits, else it is recorded as skipped. Each part runs in its own process with a time limit of the budget
left plus ``--part-margin-s`` (default 20), and at most ``--part-limit-s`` (default 240, so that a part
hanging early leaves time for the others); past it the process and its process group (the processes it
started) are killed, the part is recorded with ``"timed_out": true`` and the script goes on. A part that
answers gets 5 s to exit and the reaping 5 s more, so the script ends by about budget + margin + 10 s
(460 s), within 8 minutes. The JSON is rewritten (atomically) after every part, with ``"status"`` saying
whether the run got to its end. A SIGTERM (an outer ``timeout``) ends the script as an exit would: the
running part's processes are killed, and the JSON keeps what it finished with a ``"status"`` saying it
was stopped; a part's process also dies with the script (Linux's parent-death signal) if that is killed
outright.

Missing packages: a back end whose package is not installed (``nvidia.dali``, ``ffcv``) gets
``{"skipped": "needs <package> ..."}`` rows and the other parts run. The synthetic set is prepared
without the ffcv beton when ffcv is absent, and its JPEGs are encoded, checked and their headers read by
the ``"auto"`` JPEG codec (:func:`lfme_fast.jpeg.codec`: simplejpeg, else Pillow); ``config.jpeg_codec``
records which, as does the set's manifest (``writer.jpeg_codec``). A part that fails records its error;
nothing stops the script.

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
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lfme_fast import jpeg
from lfme_fast.bench.common import (
    IsolatedTimeout,
    error_record,
    gpu_info,
    machine_info,
    package_available,
    process_age_s,
    run_isolated,
    write_result,
)
from lfme_fast.bench.epoch import EpochConfig, build_training_loader, measure_backend, timed_loop

__all__ = ["Sizes", "GPU_SIZES", "FALLBACK_SIZES", "PartSetup", "BACKEND_PACKAGES", "BUDGET_S", "Terminated",
           "backend_unavailable", "measure_decode", "run", "main"]


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
    #: Budget left that a part needs to start (the budget only decides when a part starts; these keep a part
    #: from starting when it would run far past it). Guesses for an H100/H200 at GPU_SIZES, each to replace by
    #: the first GPU run's wall_s: a cold Inductor compile of a ResNet's forward and backward plus the eager
    #: and compiled steps; a train part's process start, CUDA init, cuDNN autotuning, warm-up epoch and timed
    #: epoch over ~11.6k images; the step section's stores and models; one back end's four decode epochs.
    compile_reserve_s: float = 120.0
    train_reserve_s: float = 45.0
    step_reserve_s: float = 60.0
    decode_reserve_s: float = 20.0
    #: Longest any one part may run, whatever the budget left: a part that hangs early (a loader that never
    #: delivers) costs at most this, not the rest of the run. Above the longest reserve with room to spare.
    part_limit_s: float = 240.0


GPU_SIZES = Sizes(batch_size=256, resolution=224, decode_epochs=3, warmup_steps=10, ceiling_steps=30,
                  max_batches=None, step_batch_size=256, step_resolution=224, step_repeats=30,
                  step_store_samples=20000, scale=0.1)
FALLBACK_SIZES = Sizes(batch_size=8, resolution=32, decode_epochs=1, warmup_steps=1, ceiling_steps=2,
                       max_batches=3, step_batch_size=4, step_resolution=32, step_repeats=2,
                       step_store_samples=64, scale=0.01, compile_steps=2, compile_warmup=1,
                       compile_backend="aot_eager", compile_reserve_s=0.0, train_reserve_s=0.0,
                       step_reserve_s=0.0, decode_reserve_s=0.0)

#: Loader back end -> the package it imports (``torch`` needs only torch and Pillow).
BACKEND_PACKAGES = {"dali": "nvidia.dali", "ffcv": "ffcv"}

#: Default margin past the budget that a running part gets before it is killed (seconds).
PART_MARGIN_S = 20.0

#: Default budget (seconds from the process's start) after which no part starts: with the margin and a
#: part's exit grace (5 s to exit, 5 s to reap) the script ends by about 460 s, within 8 minutes.
BUDGET_S = 430.0

#: Recorded with each ``dali@hw<load>`` row (and shortened into its ``output`` text, which the page shows).
HW_DECODER_NOTE = ("our DALI pipeline decodes a region of interest (fn.decoders.image_slice); DALI's docs for "
                   "older releases say ROI decoding does not use the hardware JPEG decoder, so identical dali@hw0 "
                   "and dali@hw1 figures mean the hardware decoder was not used")
_HW_OUTPUT_NOTE = "ROI decode (image_slice): equal hw0/hw1 figures mean the hardware decoder was not used"


def backend_unavailable(backend: str, root: str | os.PathLike | None = None) -> str | None:
    """Why ``backend``'s rows cannot run here — its package is not installed, or (ffcv) the dataset at
    ``root`` was prepared without the beton — or None. Looked up without importing anything."""
    package = BACKEND_PACKAGES.get(backend)
    if package and not package_available(package):
        return f"needs {package} (not installed here)"
    if backend == "ffcv" and root is not None:
        try:
            formats = json.loads((Path(root) / "manifest.json").read_text()).get("formats", ["wds", "ffcv"])
        except (OSError, ValueError):
            return None  # unreadable manifest: let the part run and record its own error
        if "ffcv" not in formats:
            return "needs the ffcv beton (the dataset was prepared without it: ffcv was not installed then)"
    return None


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


@dataclass(frozen=True)
class PartSetup:
    """What each part's process sets before it measures (picklable: it crosses into that process)."""

    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark, as a GPU training sets it


def _part(setup: PartSetup, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under ``setup`` (module level: it is what the part's process runs). The settings are
    restored after, for the in-process runs of the tests."""
    previous = torch.backends.cudnn.benchmark
    if setup.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        return fn(*args)
    finally:
        torch.backends.cudnn.benchmark = previous


class _Budget:
    """Starts parts while the budget allows and stops the ones that run past it.

    A part starts only if ``reserve_s`` still fits in the ``seconds`` budget; it runs in its own process
    (``isolate``) with a time limit of the budget left plus ``margin_s`` (at most ``part_limit_s``), after
    which it is killed and recorded as timed out. So the whole run ends within about ``seconds + margin_s``.
    """

    def __init__(self, seconds: float, log: Callable[[str], None], *, margin_s: float = PART_MARGIN_S,
                 part_limit_s: float | None = None, setup: PartSetup = PartSetup()):
        self.seconds = seconds
        self.margin_s = margin_s
        self.part_limit_s = part_limit_s
        self.setup = setup
        self.t0 = time.perf_counter()
        self.log = log

    def run(self, name: str, fn: Callable[..., Any], *args: Any, isolate: bool,
            reserve_s: float = 0.0) -> dict[str, Any]:
        """``fn(*args)`` (in its own process when ``isolate``), or a skip record when the budget is spent or
        fewer than ``reserve_s`` seconds of it are left (a part known to take long); a timed-out or failed
        part returns its error record (``"timed_out": True`` for the former)."""
        elapsed = time.perf_counter() - self.t0
        if elapsed + reserve_s > self.seconds:
            need = f", this part needs about {reserve_s:.0f} s" if reserve_s else ""
            self.log(f"[bench gpu] {name}: skipped, {elapsed:.0f} s of the {self.seconds:.0f} s budget used{need}")
            return {"skipped": f"over the time budget ({elapsed:.0f} s of {self.seconds:.0f} s used{need})"}
        timeout = max(0.0, self.seconds - elapsed) + self.margin_s
        if self.part_limit_s is not None:
            timeout = min(timeout, self.part_limit_s)
        self.log(f"[bench gpu] {name} ..." + (f" (time limit {timeout:.0f} s)" if isolate else ""))
        t0 = time.perf_counter()
        try:
            out = run_isolated(_part, self.setup, fn, *args, isolate=isolate, timeout_s=timeout if isolate else None,
                               label=name)
            if not isinstance(out, dict):
                out = {"value": out}
        except IsolatedTimeout as exc:  # killed; the next part still gets its turn (no traceback: it was stopped)
            out = {"error": str(exc), "timed_out": True}
            self.log(f"[bench gpu] {name}: {out['error']}")
        except Exception as exc:  # recorded; the other parts still run
            out = error_record(exc)
            self.log(f"[bench gpu] {name}: {out['error']}")
        out["wall_s"] = time.perf_counter() - t0
        if isolate:
            out["timeout_s"] = round(timeout, 1)
        return out


def _step_costs(device: str, sizes: Sizes) -> dict[str, Any]:
    """The student-step benchmark's rows on this device (stored outputs vs plain CE vs live teachers)."""
    from lfme_fast.bench import step

    return step.run(device=device, batch_size=sizes.step_batch_size, resolution=sizes.step_resolution,
                    repeats=sizes.step_repeats, warmup=2 if device != "cpu" else 1,
                    store_samples=sizes.step_store_samples, views=1)


def run(root: Path | None, *, device: str, sizes: Sizes, backends: Sequence[str], archs: Sequence[str],
        sections: Sequence[str], workers: int = 0, isolate: bool = True, budget_s: float = BUDGET_S,
        log: Callable[[str], None] = print, dali_hw_loads: Sequence[float] = (),
        margin_s: float = PART_MARGIN_S, part_limit_s: float | None = None, setup: PartSetup = PartSetup(),
        checkpoint: Callable[[dict[str, Any]], None] | None = None, root_error: str | None = None) -> dict[str, Any]:
    """Every requested section; returns the result's ``decode`` / ``train`` / ``step`` / ``compile`` parts.

    ``checkpoint(parts)`` is called after every part with the parts so far (the script writes its JSON
    there). ``part_limit_s`` (default ``sizes.part_limit_s``) caps each part's time limit. ``root`` None
    (the dataset could not be prepared: ``root_error`` says why) skips the parts that read a dataset
    (decode, train) and runs the others.
    """
    budget = _Budget(budget_s, log, margin_s=margin_s, setup=setup,
                     part_limit_s=sizes.part_limit_s if part_limit_s is None else part_limit_s)
    base = EpochConfig(root=str(root or ""), resolution=sizes.resolution, batch_size=sizes.batch_size,
                       workers=workers, device=device, warmup_steps=sizes.warmup_steps,
                       ceiling_steps=sizes.ceiling_steps, max_batches=sizes.max_batches)
    no_data = None if root is not None else f"needs a prepared dataset ({root_error or 'none given'})"
    out: dict[str, Any] = {}

    def put(path: tuple[str, ...], row: dict[str, Any]) -> None:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = row
        if checkpoint is not None:
            checkpoint(out)

    def skipped(name: str, why: str) -> dict[str, Any]:
        log(f"[bench gpu] {name}: skipped, {why}")
        return {"skipped": why}

    if "decode" in sections:
        for b in backends:
            why = no_data or backend_unavailable(b, root)
            put(("decode", b), skipped(f"decode {b}", why) if why else
                budget.run(f"decode {b}", measure_decode, b, base, sizes.decode_epochs, isolate=isolate,
                           reserve_s=sizes.decode_reserve_s))
        for load in dali_hw_loads if "dali" in backends else ():
            name = f"decode dali, hw_decoder_load {load:g}"
            why = no_data or backend_unavailable("dali", root)
            row = skipped(name, why) if why else budget.run(
                name, measure_decode, "dali", dataclasses.replace(base, hw_decoder_load=float(load)),
                sizes.decode_epochs, isolate=isolate, reserve_s=sizes.decode_reserve_s)
            if "output" in row:
                row["output"] = f"{row['output']}; {_HW_OUTPUT_NOTE}"
            put(("decode", f"dali@hw{load:g}"), {**row, "hw_decoder_load": float(load), "note": HW_DECODER_NOTE})
    if "train" in sections:
        for arch in archs:
            cfg = dataclasses.replace(base, arch=arch)
            for feed in ("synthetic", *backends):
                why = no_data or (None if feed == "synthetic" else backend_unavailable(feed, root))
                put(("train", arch, feed), skipped(f"train {arch} fed by {feed}", why) if why else
                    budget.run(f"train {arch} fed by {feed}", measure_backend, feed, cfg, isolate=isolate,
                               reserve_s=sizes.train_reserve_s))
    if "step" in sections:
        put(("step",), budget.run("student step costs", _step_costs, device, sizes, isolate=isolate,
                                  reserve_s=sizes.step_reserve_s))
    if "compile" in sections:
        from lfme_fast.bench.compile import NUM_CLASSES, CompileCase, measure_case

        for arch in archs:
            case = CompileCase(arch=arch, resolution=sizes.resolution, batch_size=sizes.batch_size, device=device,
                               steps=sizes.compile_steps, warmup=sizes.compile_warmup, channels_last=device != "cpu",
                               backend=sizes.compile_backend, num_classes=NUM_CLASSES.get(arch, 1000),
                               cudnn_benchmark=setup.cudnn_benchmark)
            put(("compile", arch), budget.run(f"torch.compile on/off {arch}", measure_case, case, isolate=isolate,
                                              reserve_s=sizes.compile_reserve_s))
    return out


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or its error record: describing the machine must not cost the measurements."""
    try:
        return fn()
    except Exception as exc:
        return error_record(exc)


class Terminated(SystemExit):
    """What a SIGTERM raises in :func:`main` (exit status 128 + 15): an exit, so that every ``finally`` on
    the way out runs — the running part's processes are killed and the JSON says the run was stopped."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def main(argv: Sequence[str] | None = None, *, started_s: float | None = None) -> None:
    """Command line: see the module docstring and ``--help``.

    ``started_s``: the ``time.perf_counter()`` reading the budget counts from; None (the script): the
    start of this process, so that Python's start-up and the torch import count."""
    import signal
    import threading

    if started_s is None:
        started_s = time.perf_counter() - process_age_s()
    installed = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if installed else None
    try:
        _main(argv, started_s)
    finally:
        if installed:  # as it was (the tests call main in their own process)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main(argv: Sequence[str] | None, t0: float) -> None:
    from lfme_fast.bench.loader import DEFAULT_CACHE, dataset_stats, prepare_synthetic

    startup_s = time.perf_counter() - t0
    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="prepared dataset dir (default: a synthetic set in --cache)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"synthetic set size without --data (default {GPU_SIZES.scale} on a GPU, "
                        f"{FALLBACK_SIZES.scale} for the CPU fallback)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"synthetic sets' cache (default {DEFAULT_CACHE})")
    p.add_argument("--backends", default="dali,ffcv,torch",
                   help="loader back ends (default dali,ffcv,torch; one whose package is missing is recorded as "
                        "skipped)")
    p.add_argument("--archs", default="resnet10,resnet50",
                   help="models of the train section (default resnet10,resnet50)")
    p.add_argument("--sections", default="decode,train,step,compile",
                   help="which parts to run (default decode,train,step,compile)")
    p.add_argument("--workers", type=int, default=0, help="loader CPU threads/workers (default: all cores)")
    p.add_argument("--dali-hw-loads", default=None,
                   help="DALI decode again at these hw_decoder_load values (default 0,1 on a GPU, 0 in the CPU "
                        "fallback, where it only shows that the option reaches the loader; '' for none)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="start no part after this many seconds from the process's start, Python's start-up, the "
                        f"torch import and the dataset preparation included (default {BUDGET_S:g})")
    p.add_argument("--part-margin-s", type=float, default=PART_MARGIN_S,
                   help=f"a running part is killed this long after the budget's end (default {PART_MARGIN_S:g}: "
                        "the run ends within 8 minutes)")
    p.add_argument("--part-limit-s", type=float, default=None,
                   help=f"the longest any one part may run (default {GPU_SIZES.part_limit_s:g})")
    p.add_argument("--cpu-fallback", action="store_true", help="run the CPU fallback even when CUDA is available")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every part in this process (tests; no part can then be stopped at its time limit)")
    p.add_argument("--json-out", default="results/bench_gpu.json",
                   help="default results/bench_gpu.json (rewritten after every part)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_fallback
    sizes = GPU_SIZES if cuda else FALLBACK_SIZES
    device = "cuda" if cuda else "cpu"
    scale = args.scale if args.scale is not None else sizes.scale
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    codec = jpeg.codec("auto")  # what the synthetic set and the header reads use here
    packages = {"nvidia.dali": package_available("nvidia.dali"), "ffcv": package_available("ffcv"),
                "simplejpeg": codec.kind == "simplejpeg"}
    setup = PartSetup(cudnn_benchmark=cuda)
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "device": "cuda" if cuda else "cpu-fallback",
        "status": "running: this file is rewritten after every part; a run stopped from outside leaves "
                  "the parts it finished",
        "note": None if cuda else "CPU fallback at tiny sizes: shows the script runs; measures nothing about a GPU",
        "gpu": _guarded(gpu_info), "machine": _guarded(machine_info),
        "config": {**dataclasses.asdict(sizes), "precision": "bf16 autocast, channels_last" if cuda else "fp32",
                   "augment": "RandomResizedCrop + flip + normalise",
                   "sampler": "ClassBalancedSampler(4 per class)", "cudnn_benchmark": setup.cudnn_benchmark,
                   "workers": args.workers or os.cpu_count(), "budget_s": args.budget_s,
                   "part_margin_s": args.part_margin_s, "isolated": not args.no_isolate,
                   **({"part_limit_s": args.part_limit_s} if args.part_limit_s is not None else {}),
                   "jpeg_codec": codec.name,
                   "packages": packages},
        "startup_s": round(startup_s, 2),  # from the budget's start to here (Python start-up, imports)
        "dataset": None,
    }

    def save(echo: bool = False) -> None:
        write_result(args.json_out, {**result, "wall_s": time.perf_counter() - t0}, echo=echo)

    try:
        save()  # from here on a kill leaves a JSON saying how far the run got
        root: Path | None = args.data
        root_error = None
        if root is None:
            try:
                root = prepare_synthetic(scale, args.cache)
            except Exception as exc:  # the parts that need no dataset still run
                result["dataset"] = error_record(exc)
                root_error = f"preparing the synthetic set failed: {result['dataset']['error']}"
                print(f"[bench gpu] {root_error}", flush=True)
        if root is not None:
            try:  # before the parts (and guarded): a failure here must not lose their figures
                result["dataset"] = dataset_stats(Path(root), "train")
            except Exception as exc:
                result["dataset"] = {"dir": str(root), **error_record(exc)}
        save()

        def checkpoint(parts: dict[str, Any]) -> None:
            result.update(parts)
            save()

        parts = run(root, device=device, sizes=sizes, backends=split(args.backends), archs=split(args.archs),
                    sections=split(args.sections), workers=args.workers, isolate=not args.no_isolate,
                    budget_s=args.budget_s - (time.perf_counter() - t0), margin_s=args.part_margin_s,
                    part_limit_s=args.part_limit_s, setup=setup,
                    checkpoint=checkpoint, root_error=root_error,
                    dali_hw_loads=[float(x) for x in split(args.dali_hw_loads if args.dali_hw_loads is not None
                                                           else ("0,1" if cuda else "0"))])
    except Terminated:  # the running part's processes were killed on the way here (run_isolated's finally)
        result["status"] = (f"stopped by SIGTERM after {time.perf_counter() - t0:.0f} s: the parts it finished "
                            "are here")
        print(f"[bench gpu] {result['status']}", flush=True)
        save()
        raise
    result.update(parts)
    result["status"] = "complete"
    save(echo=True)


if __name__ == "__main__":
    main()
