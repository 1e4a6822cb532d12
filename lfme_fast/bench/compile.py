"""``torch.compile`` on and off (config key ``train.compile``): ``python -m lfme_fast.bench compile``.

For each case (model at a resolution, default ``resnet_small28@28`` and ``resnet10@64`` on a CPU,
``resnet10@224`` and ``resnet50@224`` on a GPU) one process measures the training step (forward,
cross-entropy, backward, SGD step on a resident batch) twice, each on a fresh model built from the
same seed:

* **eager**: ``--warmup`` untimed steps, then ``--steps`` timed steps;
* **compiled**: the model through :func:`lfme_fast.compiling.compile_model` (Inductor, ``--mode``),
  exactly what ``train.compile`` does to a training. Its first step compiles the forward and the
  backward; that step is timed on its own (``first_step_s``, and ``compile_s`` = first step minus a
  steady step) and never enters the step figures. Then ``--warmup`` untimed steps and ``--steps``
  timed steps.

The ``--steps`` steady steps are timed as one block, one start and one end mark around all of them
(``step_s_mean`` = block / steps; steps/s and samples/s from it): the host queues step after step as
a training loop does, so eager mode's launch overhead counts only where the GPU waits for it, and no
per-step synchronisation adds gaps that a training loop does not have. ``speedup`` = compiled / eager
steps/s. On a GPU the steps are bf16 autocast and channels_last (the training path) with
``torch.backends.cudnn.benchmark`` on (a training's setting: convolution algorithms chosen by timing
during the warm-up), timed with CUDA events; on a CPU fp32 in torch's default layout
(``--channels-last`` to change it), wall clock. Inductor's on-disk
caches are pointed at a fresh folder per process, so ``compile_s`` is a cold compile. When
compilation cannot run here (no C++ compiler, no Triton) or fails, the case records why instead of a
figure. Results: ``results/bench_compile_cpu.json`` (``_gpu`` on a GPU) with :func:`machine_info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lfme_fast.bench.common import Stopwatch, error_record, machine_info, run_isolated, write_result

__all__ = ["CompileCase", "measure_case", "run", "main", "DEFAULT_CASES"]

#: Classes of each model's usual dataset (the classifier's width); others: 1000 (ImageNet-LT).
NUM_CLASSES = {"resnet_small28": 10, "resnet32": 100}

#: Per device: (arch, resolution, batch size) measured by default.
DEFAULT_CASES = {"cpu": (("resnet_small28", 28, 64), ("resnet10", 64, 32)),
                 "cuda": (("resnet10", 224, 256), ("resnet50", 224, 256))}


@dataclass(frozen=True)
class CompileCase:
    """One measurement's settings (picklable: it crosses into the measuring process)."""

    arch: str
    resolution: int
    batch_size: int
    device: str = "cpu"
    mode: str = "default"
    steps: int = 10
    warmup: int = 2
    channels_last: bool | None = None  # None: on a GPU only
    num_classes: int = 1000
    threads: int | None = None  # torch CPU threads (None: torch's default)
    backend: str = "inductor"  # a TorchDynamo backend; "aot_eager" only shows that the code runs
    cudnn_benchmark: bool = True  # torch.backends.cudnn.benchmark on a GPU (as a training sets it)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def layout_channels_last(self) -> bool:
        return self.cuda if self.channels_last is None else bool(self.channels_last)


def _fresh_inductor_caches() -> str:
    """Point Inductor's on-disk caches at a new folder (cold compile) and return it."""
    folder = tempfile.mkdtemp(prefix="lfme_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    return folder


def _step_fn(model: torch.nn.Module, case: CompileCase) -> Callable[[], None]:
    """forward + CE + backward + SGD on one resident batch (bf16 autocast on a GPU)."""
    fmt = torch.channels_last if case.layout_channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch_size, 3, case.resolution, case.resolution, generator=g)
    x = x.to(case.device, dtype=torch.bfloat16 if case.cuda else torch.float32).contiguous(memory_format=fmt)
    y = torch.randint(0, case.num_classes, (case.batch_size,), generator=g).to(case.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dev_type = torch.device(case.device).type

    def step() -> None:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=case.cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _run(step: Callable[[], None], n: int) -> None:
    """``n`` untimed steps (warm-up)."""
    for _ in range(n):
        step()


def _timed_block(step: Callable[[], None], device: str, n: int) -> float:
    """Seconds of ``n`` back-to-back steps: one :class:`Stopwatch` (a CUDA event pair on a GPU) around
    all of them, so the host keeps queueing ahead as in training (a pair and a synchronise per step
    would add a host round trip per step, which falls hardest on eager mode's many small launches)."""
    watch = Stopwatch(device)
    watch.start()
    _run(step, n)
    return watch.stop()


def _build(case: CompileCase) -> torch.nn.Module:
    from lfme_fast.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if case.layout_channels_last else torch.contiguous_format
    return build_model(case.arch, case.num_classes).to(case.device, memory_format=fmt).train()


def _summary(block_s: float, steps: int, batch_size: int) -> dict[str, Any]:
    """Figures of ``steps`` steps timed as one block of ``block_s`` seconds."""
    mean = block_s / steps
    return {"step_s_mean": mean, "steps_per_s": 1.0 / mean, "samples_per_s": batch_size / mean,
            "steps_timed": steps, "timed_block_s": block_s}


def measure_case(case: CompileCase) -> dict[str, Any]:
    """Eager, then compiled, in this process (see the module docstring); returns the case's row."""
    from lfme_fast import compiling

    if case.threads:
        torch.set_num_threads(case.threads)
    if case.cuda:  # for eager and compiled alike; the warm-up steps do the algorithm search
        torch.backends.cudnn.benchmark = case.cudnn_benchmark
    row: dict[str, Any] = {**dataclasses.asdict(case), "channels_last": case.layout_channels_last,
                           "precision": "bf16 autocast" if case.cuda else "fp32",
                           "torch_threads": torch.get_num_threads(),
                           "cudnn_benchmark": bool(case.cuda and torch.backends.cudnn.benchmark),
                           "timing": "steady steps as one block: " + ("one CUDA event pair" if case.cuda
                                                                       else "wall clock")}
    eager_step = _step_fn(_build(case), case)
    _run(eager_step, case.warmup)
    row["eager"] = _summary(_timed_block(eager_step, case.device, case.steps), case.steps, case.batch_size)

    why = compiling.compile_unavailable(case.device) if case.backend == "inductor" else None
    if why:
        row["compiled"] = {"supported": False, "error": why}
        return row
    cache = _fresh_inductor_caches()
    row["cold_inductor_caches"] = True
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        model = compiling.compile_model(_build(case), case.mode, case.device, backend=case.backend)
        step = _step_fn(model, case)
        first = _timed_block(step, case.device, 1)  # compiles forward and backward: timed on its own
        _run(step, case.warmup)
        block = _timed_block(step, case.device, case.steps)
    except Exception as exc:  # recorded as what happened on this machine
        row["compiled"] = {"supported": False, **error_record(exc)}
        return row
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    compiled = {"supported": True, **_summary(block, case.steps, case.batch_size), "first_step_s": first,
                "compile_s": first - block / case.steps,
                "graphs": int(counters["stats"].get("unique_graphs", 0)),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    row["compiled"] = compiled
    row["speedup"] = compiled["steps_per_s"] / row["eager"]["steps_per_s"]
    return row


def run(cases: Sequence[CompileCase], *, isolate: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Every case, each in its own process when ``isolate``; a failed case records its error."""
    rows = []
    for case in cases:
        log(f"[bench compile] {case.arch}@{case.resolution} batch {case.batch_size} on {case.device}: eager, "
            f"then torch.compile(mode={case.mode!r}, backend={case.backend!r}) ...")
        t0 = time.perf_counter()
        try:
            row = run_isolated(measure_case, case, isolate=isolate)
        except Exception as exc:
            row = {**dataclasses.asdict(case), **error_record(exc)}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if "eager" in row:
            c = row.get("compiled", {})
            after = (f"compiled {c['steps_per_s']:.2f} steps/s (x{row['speedup']:.2f}), compile {c['compile_s']:.1f} s"
                     if c.get("supported") else f"compiled: {c.get('error', '?')}")
            log(f"[bench compile]   eager {row['eager']['steps_per_s']:.2f} steps/s; {after}")
        else:
            log(f"[bench compile]   failed: {row.get('error')}")
    return rows


def _parse_case(text: str) -> tuple[str, int, int | None]:
    arch, _, rest = text.partition("@")
    res, _, batch = rest.partition(":")
    if not res.isdigit() or (batch and not batch.isdigit()):
        raise argparse.ArgumentTypeError(f"case {text!r} must look like MODEL@RES or MODEL@RES:BATCH")
    return arch, int(res), int(batch) if batch else None


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring and ``--help``."""
    from lfme_fast.compiling import COMPILE_MODES, _cpp_compiler

    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cases", nargs="+", type=_parse_case, default=None, metavar="MODEL@RES[:BATCH]",
                   help="default: resnet_small28@28:64 resnet10@64:32 on a CPU, resnet10@224:256 resnet50@224:256 "
                        "on a GPU")
    p.add_argument("--mode", default="default", choices=COMPILE_MODES, help="torch.compile mode (default 'default')")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2 CPU, 10 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true", help="channels_last on a CPU too")
    p.add_argument("--backend", default="inductor", help="TorchDynamo backend (default inductor; aot_eager: "
                                                          "tests only, measures no code generation)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off on a GPU (default on, as a training sets it)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (tests)")
    p.add_argument("--json-out", default=None, help="default results/bench_compile_{cpu,gpu}.json")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    gpu = dev_type == "cuda"
    defaults = DEFAULT_CASES["cuda" if gpu else "cpu"]
    given = args.cases or [(a, r, b) for a, r, b in defaults]
    default_batch = {a: b for a, _, b in defaults}
    cases = [CompileCase(arch=a, resolution=r, batch_size=b or default_batch.get(a, 32), device=device,
                         mode=args.mode, steps=args.steps or (30 if gpu else 10),
                         warmup=args.warmup if args.warmup is not None else (10 if gpu else 2),
                         channels_last=True if args.channels_last else None, threads=args.threads,
                         backend=args.backend, num_classes=NUM_CLASSES.get(a, 1000),
                         cudnn_benchmark=not args.no_cudnn_benchmark)
             for a, r, b in given]
    t0 = time.perf_counter()
    machine = machine_info()
    rows = run(cases, isolate=not args.no_isolate)
    from lfme_fast.compiling import compile_unavailable

    write_result(args.json_out or f"results/bench_compile_{'gpu' if gpu else 'cpu'}.json", {
        "benchmark": "compile",
        "what": "training step (forward, CE, backward, SGD) on a resident batch, eager vs torch.compile "
                "(lfme_fast.compiling.compile_model, as train.compile does); steps/s from the steady steps after "
                "warm-up timed as one block (one CUDA event pair on a GPU); the compiling first step timed apart "
                "(compile_s = first step - mean steady step; cold Inductor caches); cudnn.benchmark on a GPU",
        "machine": machine, "load_average": os.getloadavg(),
        "device": device, "mode": args.mode, "backend": args.backend,
        "compile_available": compile_unavailable(device) is None, "compile_unavailable": compile_unavailable(device),
        "cpp_compiler": _cpp_compiler() if not gpu else None,
        "results": rows, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
