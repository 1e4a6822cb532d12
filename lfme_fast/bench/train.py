"""Training-step throughput on synthetic tensors (no loader): ``python -m lfme_fast.bench train``.

Measures forward + backward + SGD step of the LFME backbones, images/s = batch / median step time:

* ResNet-10 at 224 px (ImageNet-LT) and ResNet-32 at 32 px (CIFAR-LT), by default;
* on CPU in fp32 and under bf16 autocast (reported as unsupported if it raises);
* on GPU, when one is present, in bf16 autocast with channels_last (and fp32 for reference).

The input batch stays on the device, so the figure is the model's ceiling, the most any loader can be
asked to feed. Results (with ``machine_info()``) are printed and written to ``--json-out``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import torch

from lfme_fast.bench.common import machine_info, repeat_timing, write_result

DEFAULT_CASES = ("resnet10@224", "resnet32@32")
#: Per-device default batch: CPU batches are small so that a case finishes in seconds.
DEFAULT_BATCH = {"cpu": {"resnet10": 32, "resnet32": 128}, "cuda": {"resnet10": 256, "resnet32": 512}}


def _parse_case(text: str) -> tuple[str, int]:
    name, _, res = text.partition("@")
    if not res.isdigit():
        raise argparse.ArgumentTypeError(f"case {text!r} must look like MODEL@RESOLUTION, e.g. resnet10@224")
    return name, int(res)


def bench_case(arch: str, resolution: int, *, device: str, precision: str, batch_size: int, steps: int,
               warmup: int, channels_last: bool, num_classes: int = 1000) -> dict[str, Any]:
    """Time one (model, resolution, device, precision) case; returns a result row."""
    from lfme_fast.models import build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(arch, num_classes).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device).to(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    dev_type = torch.device(device).type
    use_amp = precision == "bf16"
    row: dict[str, Any] = {"model": arch, "resolution": resolution, "device": device, "precision": precision,
                           "batch_size": batch_size, "channels_last": channels_last,
                           "params": count_parameters(model)}

    def step() -> None:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev_type == "cuda":
            torch.cuda.synchronize()

    try:
        timing = repeat_timing(step, repeats=steps, warmup=warmup)
    except RuntimeError as exc:  # e.g. an op without a bf16 CPU kernel
        row.update({"supported": False, "error": str(exc).splitlines()[0][:300]})
        return row
    row.update({"supported": True, "step_s_median": timing["median_s"], "step_s_min": timing["min_s"],
                "samples_per_s": batch_size / timing["median_s"], "steps_timed": steps, "warmup_steps": warmup})
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lfme_fast.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", help="write the results here (e.g. results/bench_train.json)")
    parser.add_argument("--cases", nargs="+", type=_parse_case, default=[_parse_case(c) for c in DEFAULT_CASES],
                        metavar="MODEL@RES", help=f"model and input side per case (default: {' '.join(DEFAULT_CASES)})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 10 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="one batch size for every case")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--cpu-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="precisions timed on the CPU (default: fp32 bf16; bf16 = autocast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a shared 2-core machine 1 thread can be "
                             "much faster than 2, which stall each other when another job holds a core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Read now: machine_info() imports ffcv, whose import sets torch's thread count to 1.
    threads = torch.get_num_threads()

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    t0 = time.perf_counter()
    for device in devices:
        dev_type = torch.device(device).type
        precisions = args.cpu_precisions if dev_type == "cpu" else ["bf16", "fp32"]
        steps = args.steps or (5 if dev_type == "cpu" else 30)
        warmup = args.warmup if args.warmup is not None else (2 if dev_type == "cpu" else 10)
        for arch, res in args.cases:
            batch = args.batch_size or DEFAULT_BATCH.get(dev_type, DEFAULT_BATCH["cpu"]).get(arch, 64)
            for precision in precisions:
                row = bench_case(arch, res, device=device, precision=precision, batch_size=batch, steps=steps,
                                 warmup=warmup, channels_last=dev_type == "cuda")
                rows.append(row)
                rate = f"{row['samples_per_s']:.1f} img/s" if row.get("supported") else f"unsupported: {row['error']}"
                print(f"[bench train] {arch}@{res} {device} {precision} batch {batch}: {rate}", flush=True)
    write_result(args.json_out, {
        "benchmark": "train",
        "what": "forward+backward+SGD step on synthetic on-device tensors (no loader); samples/s = batch / "
                "median step time",
        "machine": machine_info(),
        "results": rows,
        "torch_threads_used": threads,
        "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
