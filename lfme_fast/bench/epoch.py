"""A training epoch end to end, and how long it waits for data: ``python -m lfme_fast.bench epoch``.

For each loader back end (each in its own process, as a training job runs one loader): a real
training loader (class-balanced order, RandomResizedCrop + flip, all cores) feeds a real model
(forward, cross-entropy, backward, SGD step) for one whole epoch of a prepared dataset (default: the
synthetic ImageNet-LT-shaped set the loader benchmark uses). The loop times, per batch,

* ``next(iterator)`` — the time the training loop waits for its next batch, and
* the step (forward + loss + backward + optimiser),

and reports the **data-wait fraction**: the summed waits over the epoch's time (iterator creation
to the last step finished). The wait for the first batch (the loader's pipeline filling at an epoch
boundary) is part of it and is also reported on its own.

Before the timed epoch, each process runs one loader-only epoch (compilation, worker start-up, page
cache) and ``--ceiling-steps`` model steps on one resident batch after a few warm-up steps: the
compute ceiling (samples/s with no loader at all) in the same process, so the timed epoch can be
read against it. Backend ``synthetic`` feeds that resident batch as a whole epoch.

On a CPU the loader's workers and the model share the cores, so the data-wait fraction there
measures the contention as much as the loader; on a GPU (``--device cuda``: bf16 autocast,
channels_last, batches in bf16) it is the figure the GPU benchmark reports per back end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from lfme_fast.bench.common import Stopwatch, error_record, machine_info, run_isolated, write_result

__all__ = ["EpochConfig", "SyntheticLoader", "build_training_loader", "measure_backend", "timed_loop", "main"]


@dataclass(frozen=True)
class EpochConfig:
    """One measurement's settings (picklable: it crosses into the measuring process)."""

    root: str
    split: str = "train"
    arch: str = "resnet10"
    resolution: int = 112
    batch_size: int = 64
    workers: int = 0  # 0: every core
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    warmup_steps: int = 2
    ceiling_steps: int = 10
    max_batches: int | None = None  # None: the whole epoch
    loader_options: tuple[tuple[str, Any], ...] = ()  # back-end keyword options, e.g. (("batches_ahead", 3),)
    hw_decoder_load: float | None = None  # DALI mixed decoding's hardware-decoder share (None: DALI's default)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


class SyntheticLoader:
    """A loader that hands out one resident batch ``num_batches`` times: the model alone."""

    def __init__(self, batch: Any, num_batches: int):
        self.batch = batch
        self.num_batches = int(num_batches)

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes between epochs."""

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.batch


def timed_loop(batches: Iterable[Any], step: Callable[[Any], int], device: Any,
               max_batches: int | None = None) -> dict[str, Any]:
    """Drive ``step`` over ``batches`` as a training loop does and time where the time goes.

    ``step(batch)`` returns the number of samples it trained on. Per batch, ``next()`` on the
    iterator is the wait and the call of ``step`` is the step (host wall clock: on a GPU a step
    returns once queued, and the host blocks in a later step when the GPU falls behind, so waits stay
    the loop's real waits). The epoch is timed with a :class:`Stopwatch` (CUDA events on a GPU) from
    before the iterator is created to the last step finished. The ``next()`` that ends the epoch is
    a wait too (the loader's end of epoch), not a batch.
    """
    watch = Stopwatch(device)
    watch.start()
    it = iter(batches)
    waits: list[float] = []
    steps: list[float] = []
    samples = 0
    end_wait = 0.0
    while max_batches is None or len(steps) < max_batches:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            end_wait = time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        samples += int(step(batch))
        steps.append(time.perf_counter() - t1)
        waits.append(t1 - t0)
        del batch  # a loader may reuse its memory a few batches later
    epoch_s = watch.stop()
    return summarise_loop(waits, steps, samples, epoch_s, end_wait)


def summarise_loop(waits: Sequence[float], steps: Sequence[float], samples: int, epoch_s: float,
                   end_wait: float = 0.0) -> dict[str, Any]:
    """The figures of one timed loop (see :func:`timed_loop`)."""
    if not steps:
        raise ValueError("the loader produced no batch: nothing to time (dataset smaller than one batch?)")
    wait_total = sum(waits) + end_wait
    after_first = epoch_s - waits[0]
    return {
        "batches": len(steps), "samples": samples, "epoch_s": epoch_s,
        "samples_per_s": samples / epoch_s,
        "data_wait_s": wait_total, "data_wait_fraction": wait_total / epoch_s,
        # without the pipeline fill at the epoch's start (on a long epoch the two converge)
        "data_wait_fraction_after_first_batch": (wait_total - waits[0]) / after_first if after_first > 0 else None,
        "first_batch_wait_s": waits[0], "end_of_epoch_wait_s": end_wait,
        "wait_median_s": statistics.median(waits), "wait_max_s": max(waits),
        "step_median_s": statistics.median(steps), "step_total_s": sum(steps),
    }


def build_training_loader(backend: str, cfg: EpochConfig, total_epochs: int):
    """The training loader a run would build: class-balanced order, RandomResizedCrop + flip, all
    cores; bf16 channels_last batches on a GPU. Returns (loader, number of classes)."""
    from lfme_fast.loaders import LoaderOptions, build_loader
    from lfme_fast.sampling import build_sampler
    from lfme_fast.shards import ShardReader

    labels = ShardReader(cfg.root, cfg.split).labels
    sampler = build_sampler("class_balanced", labels, samples_per_class=4, seed=0)
    options = LoaderOptions(cfg.root, cfg.split, backend=backend, train=True, batch_size=cfg.batch_size,
                            sampler=sampler, total_epochs=total_epochs, resolution=cfg.resolution,
                            augment="imagenet", num_workers=cfg.workers or os.cpu_count() or 1,
                            device=cfg.device, dtype=torch.bfloat16 if cfg.cuda else torch.float32,
                            channels_last=cfg.cuda, hw_decoder_load=cfg.hw_decoder_load)
    return build_loader(options, **dict(cfg.loader_options)), int(labels.max()) + 1


def _train_step(model: torch.nn.Module, cfg: EpochConfig) -> Callable[[Any], int]:
    """forward + CE + backward + SGD on a :class:`~lfme_fast.loaders.Batch` (bf16 autocast on a GPU)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dev_type = torch.device(cfg.device).type

    def step(batch: Any) -> int:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=cfg.cuda):
            loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch.labels.shape[0])

    return step


def _keep(batch: Any):
    """A copy of ``batch`` that outlives the loader's buffer reuse."""
    from lfme_fast.loaders import Batch

    return Batch(batch.images.clone(), batch.labels.clone(), batch.indices.clone())


def _random_batch(cfg: EpochConfig, num_classes: int):
    """Random tensors shaped, typed and laid out like the loader's batches (backend ``synthetic``)."""
    from lfme_fast.loaders import Batch

    fmt = torch.channels_last if cfg.cuda else torch.contiguous_format
    dtype = torch.bfloat16 if cfg.cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, cfg.resolution, cfg.resolution, generator=g)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g)
    return Batch(x.to(cfg.device, dtype=dtype).contiguous(memory_format=fmt), y.to(cfg.device),
                 torch.arange(cfg.batch_size, device=cfg.device))


def _warmup_epoch(loader: Any, backend: str, cfg: EpochConfig) -> tuple[float, Any]:
    """Epoch 0 through the loader alone (compilation, workers, page cache): its seconds and a copy of
    its first batch (the resident batch of the ceiling: the loader's real layout and dtype)."""
    loader.set_epoch(0)
    first = None
    t0 = time.perf_counter()
    for batch in loader:
        if first is None:
            first = _keep(batch)
    seconds = time.perf_counter() - t0
    if first is None:
        raise ValueError(f"{backend}: the loader produced no batch in an epoch (batch {cfg.batch_size})")
    return seconds, first


def measure_backend(backend: str, cfg: EpochConfig) -> dict[str, Any]:
    """Warm up, measure the compute ceiling, then time one training epoch fed by ``backend``
    (a registered loader back end, or ``synthetic``: the resident batch for a whole epoch)."""
    from lfme_fast.models import build_model
    from lfme_fast.shards import ShardReader

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    loader = None
    if backend == "synthetic":
        num_classes = int(ShardReader(cfg.root, cfg.split).labels.max()) + 1
    else:
        loader, num_classes = build_training_loader(backend, cfg, total_epochs=2)
    build_s = time.perf_counter() - t0
    if loader is None:
        warm_s, resident = 0.0, _random_batch(cfg, num_classes)
    else:
        warm_s, resident = _warmup_epoch(loader, backend, cfg)
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.cuda else torch.contiguous_format
    model = build_model(cfg.arch, num_classes).to(cfg.device, memory_format=fmt).train()
    step = _train_step(model, cfg)
    for _ in range(cfg.warmup_steps):
        step(resident)
    ceiling = timed_loop(SyntheticLoader(resident, cfg.ceiling_steps), step, cfg.device)
    if loader is None:  # 'synthetic': the resident batch for as many batches as an epoch would have
        batches = cfg.max_batches or max(1, len(ShardReader(cfg.root, cfg.split)) // cfg.batch_size)
        loader = SyntheticLoader(resident, batches)
    loader.set_epoch(1)
    epoch = timed_loop(loader, step, cfg.device, cfg.max_batches)
    close = getattr(loader, "close", None)
    if close:
        close()
    return {**epoch, "backend": backend, "build_s": build_s, "warmup_epoch_s": warm_s,
            "ceiling_samples_per_s": ceiling["samples_per_s"], "ceiling_step_median_s": ceiling["step_median_s"],
            "ratio_to_ceiling": epoch["samples_per_s"] / ceiling["samples_per_s"],
            "torch_threads": torch.get_num_threads()}


def run(backends: Sequence[str], cfg: EpochConfig, *, isolate: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every back end (each in its own process when ``isolate``); failures are recorded."""
    rows: dict[str, Any] = {}
    for backend in backends:
        log(f"[bench epoch] {backend}: build, warm-up epoch, ceiling, timed epoch ...")
        try:
            rows[backend] = run_isolated(measure_backend, backend, cfg, isolate=isolate)
            r = rows[backend]
            log(f"[bench epoch] {backend}: {r['samples_per_s']:.1f} samples/s, data wait "
                f"{100 * r['data_wait_fraction']:.1f}% (ceiling {r['ceiling_samples_per_s']:.1f}/s)")
        except Exception as exc:  # recorded; the other back ends still run
            rows[backend] = error_record(exc)
            log(f"[bench epoch] {backend}: {rows[backend]['error']}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring and ``--help``."""
    from lfme_fast.bench.loader import add_dataset_args, dataset_root, dataset_stats

    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench epoch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--backends", default="ffcv,torch",
                   help="comma list of loader back ends and/or 'synthetic' (default ffcv,torch)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--arch", default="resnet10", help="model (default resnet10)")
    p.add_argument("--resolution", type=int, default=None, help="crop side (default 112 on CPU, 224 on GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    p.add_argument("--workers", type=int, default=0, help="loader workers/threads (default: all cores)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed model steps before the ceiling")
    p.add_argument("--ceiling-steps", type=int, default=10, help="timed steps on a resident batch (default 10)")
    p.add_argument("--max-batches", type=int, default=None, help="stop the timed epoch early (default: whole epoch)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (tests)")
    p.add_argument("--json-out", default="results/bench_epoch.json", help="default results/bench_epoch.json")
    args = p.parse_args(argv)

    gpu = torch.device(args.device).type == "cuda"
    root = dataset_root(args)
    cfg = EpochConfig(root=str(root), split=args.split, arch=args.arch,
                      resolution=args.resolution or (224 if gpu else 112),
                      batch_size=args.batch_size or (256 if gpu else 64), workers=args.workers, device=args.device,
                      threads=args.threads, warmup_steps=args.warmup_steps, ceiling_steps=args.ceiling_steps,
                      max_batches=args.max_batches)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    t0 = time.perf_counter()
    machine = machine_info()
    rows = run(backends, cfg, isolate=not args.no_isolate)
    write_result(args.json_out, {
        "benchmark": "epoch",
        "what": "one training epoch (class-balanced loader -> forward/CE/backward/SGD) per loader back end; "
                "data_wait_fraction = time in next(iterator) / epoch time",
        "machine": machine, "load_average": os.getloadavg(),
        "config": {"arch": cfg.arch, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
                   "workers": cfg.workers or os.cpu_count(), "device": cfg.device,
                   "precision": "bf16 autocast, channels_last" if gpu else "fp32",
                   "sampler": "ClassBalancedSampler(4 per class)",
                   "augment": "RandomResizedCrop + flip", "ceiling_steps": cfg.ceiling_steps,
                   "max_batches": cfg.max_batches},
        "dataset": dataset_stats(Path(root), args.split),
        "backends": rows, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
