"""``python -m lfme_fast.bench <name> [options]`` (console script ``lfme-bench``): run one benchmark.

Each benchmark is ``lfme_fast.bench.<name>.main(argv)`` with its own ``--help``; this dispatcher lists them
without importing them (the loader benchmark imports ffcv and DALI, which takes seconds).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> one-line summary (kept here so that ``--help`` imports no benchmark).
BENCHMARKS = {
    "sampler": "Numba class-balanced sampler vs. a pure-Python OLTR ClassAwareSampler: indices (+ weights) "
               "per second on the ImageNet-LT histogram and x100",
    "loader": "ffcv / DALI / torch loaders in images/s next to the raw decode+crop limit, each in its own "
              "process (default: a synthetic ImageNet-LT-shaped set)",
    "train": "training-step throughput on synthetic tensors (ResNet-10 @224, ResNet-32 @32; CPU fp32/bf16, "
             "GPU bf16 when present)",
    "step": "student step cost: plain CE vs. LFME on stored offline logits vs. LFME with live expert forwards "
            "(+ ECL, CBD rows)",
    "epoch": "a training epoch end to end per loader back end and its data-wait fraction (time in next(iterator) "
             "over the epoch time)",
    "memory": "host memory (RSS, PSS) against 1, 2, 4 loader processes over one prepared dataset",
    "sampler_memory": "one process's epoch plan (indices + curriculum weights) at 1e8 and 1e9 samples per epoch: "
                      "the whole-epoch kernels vs the chunked (streaming) plan, 1 and 8 processes",
    "gpu": "the GPU path in one script (DALI mixed decode, ffcv uint8 normalised on the GPU, ResNet-10/50 bf16 "
           "fed by each back end, step costs); a tiny CPU fallback without CUDA",
    "compile": "torch.compile on and off (train.compile): training steps/s of eager vs compiled models after "
               "warm-up, the compile time apart (resnet_small28, resnet10 on CPU; resnet10/50 bf16 on GPU)",
    "report": "results/BENCHMARKS.md with plots from whatever bench_*.json exist",
}


def build_parser() -> argparse.ArgumentParser:
    """The dispatcher's parser: one sub-command per benchmark (its options: ``<name> --help``)."""
    parser = argparse.ArgumentParser(
        prog="lfme-bench", description="Benchmarks of the fast paths; each writes a JSON result that records the "
        "machine and library versions (results/).",
        epilog="Options of a benchmark: lfme-bench <name> --help. Example: lfme-bench sampler --repeats 5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, summary in BENCHMARKS.items():
        # add_help=False: the benchmark's own parser answers --help with its real options
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> None:
    """Dispatch to ``lfme_fast.bench.<name>.main`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in BENCHMARKS:
        parser.parse_args(argv[:1])  # --help, or an error naming the valid choices (exit code 2)
        parser.error(f"choose a benchmark: {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"lfme_fast.bench.{argv[0]}")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
