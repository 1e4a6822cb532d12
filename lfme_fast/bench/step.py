"""Student step cost: plain CE vs. LFME on offline logits vs. LFME with live expert forwards.

``python -m lfme_fast.bench step --json [--json-out results/bench_step.json]``

In one run, on the same model and the same batch (ResNet-10, ImageNet-LT's 1,000 classes split into
its three LFME subsets 391 / 463 / 146; CPU default batch 64 at 112 px; on a GPU bf16 autocast with
channels_last, batch 256 at 224 px):

* ``plain_ce``: forward, CE, backward, SGD step.
* ``offline_kd``: the same plus the three experts' stored float16 logits gathered by
  ``(index, view)`` from an :class:`lfme_fast.offline.OfflineStore` (memory-mapped ``.npy`` files of
  ``--store-samples`` rows and ``--views`` views, random indices per step; on a GPU the store is held
  on the device) and LFME's loss (weighted CE + three subset KD terms).
* ``live_kd``: the same loss with the teacher logits from three ResNet-10 experts run forward (no grad)
  on the batch: what training would cost without the offline store.
* ``ecl``: an ECL step (:mod:`lfme_fast.bench.ecl_step`): three experts of the same backbone trained
  together on two views of the batch, every ECL term on; ``ecl_one_view``: the same with the
  contrastive branch off (one view). Split, timed inside the timed ECL steps, into forward
  (``ecl_forward_s``, against ``plain_forward_s``, the plain model's forward interleaved as kind
  ``plain_forward``), losses (``ecl_losses_s``; ``ecl_losses_only_s`` against ``loss_only_ce_s``) and
  backward + optimiser (``ecl_backward_opt_s``), plus the second
  view's compute (``ecl_second_view_compute_s``) and loading (``loader_second_view_s``: the training
  loader with one vs two views per sample on the same data, ``--loader-data``, default a small
  synthetic ImageNet-LT-shaped set at the step's resolution; ``--no-loader`` skips it). ``--no-ecl``
  leaves the ECL rows out.
* ``cbd_offline`` / ``cbd_live``: a CBD student step (:mod:`lfme_fast.bench.cbd_step`: backbone +
  projection, ``(1 - alpha) CE + alpha * beta * cosine distance`` to the concatenated teacher
  features) with ``--cbd-teachers`` (default 4, CBD-ENS) teachers' float16 features gathered from a
  generic offline store through the recipe's ``CBDLoss``, and with those teachers run forward on the
  batch instead. ``--no-cbd`` leaves the CBD rows out.

Each step is timed with :class:`lfme_fast.bench.common.Stopwatch` (CUDA events on a GPU) between
device synchronisations. The kinds of step are interleaved (rotating order) and repeated
``--repeats`` times, so machine noise (easily 8 % between identical steps) hits all of them alike;
the median and minimum per kind are reported, with ``offline/plain`` and ``live/offline`` ratios.
Goal: offline <= 1.05 x plain.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lfme_fast.bench.common import Stopwatch, machine_info, write_result

#: ImageNet-LT under the lfme convention: many / medium / few class counts.
IMAGENET_LT_SUBSETS = (391, 463, 146)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_synthetic_store(directory: Path, num_samples: int, num_views: int, *, recipe: str, fields: dict[str, Any],
                          arrays: Sequence[Any], produce: Callable[[Any], dict[str, torch.Tensor]],
                          storage_extra: dict[str, Any] | None = None) -> None:
    """Write a synthetic store with the real store code: the generic writer fed index-only batches (no
    dataset, no models) and ``produce(batch) -> {array name: [B, D] tensor}``; fixed 1x1 views."""
    from types import SimpleNamespace

    from lfme_fast.augment import FixedViews
    from lfme_fast.offline import make_header, view_identity, write_store

    manifest = {"dataset": "synthetic", "splits": {"train": {"num_samples": num_samples, "fingerprint": None}}}
    header = make_header(run_dir=directory, manifest=manifest, split="train",
                         views=view_identity("imagenet", num_views, 0, "center"),
                         augmentation={"resolution": 0, "mode": "imagenet"}, backend="torch", checkpoints=[],
                         recipe=recipe, fields=fields, arrays=list(arrays))
    views = FixedViews(np.tile(np.array([0, 0, 1, 1], np.int32), (num_samples, num_views, 1)),
                       np.zeros((num_samples, num_views), bool), 0)

    def make_loader(table, k):
        for lo in range(0, num_samples, 8192):
            yield SimpleNamespace(indices=torch.arange(lo, min(num_samples, lo + 8192)))

    write_store(directory, header, views, produce, make_loader, show_progress=False, log=lambda m: None,
                storage_extra=storage_extra)


def make_store(directory: Path, num_samples: int, num_views: int, sizes: Sequence[int], seed: int = 0,
               load: str = "mmap"):
    """A synthetic LFME store (random float16 logits and confidences), written and read by the real
    store code (:func:`write_synthetic_store`)."""
    from lfme_fast.offline import LFMEStore, lfme_arrays

    gen = torch.Generator().manual_seed(seed)
    offsets = np.cumsum([0, *sizes])
    subsets = [{"name": f"s{l}", "classes": list(range(int(offsets[l]), int(offsets[l + 1])))}
               for l in range(len(sizes))]

    def produce(batch):
        out = {f"expert{l}.logits": torch.randn(len(batch.indices), c, generator=gen) * 3 for l, c in enumerate(sizes)}
        return {**out, "confidence": torch.full((len(batch.indices),), 0.5)}

    write_synthetic_store(directory, num_samples, num_views, recipe="lfme", fields={"subsets": subsets},
                          arrays=lfme_arrays(sizes, None), produce=produce,
                          storage_extra={"logit_bytes_per_image": 2.0 * num_views * sum(sizes)})
    return LFMEStore.open(directory, load=load)


def run(*, device: str, batch_size: int, resolution: int, repeats: int, warmup: int, store_samples: int,
        views: int, arch: str = "resnet10", threads: int | None = None,
        store_load: str | None = None, ecl: bool = True, ecl_experts: int = 3,
        loader: dict[str, Any] | None = None, cbd: bool = True, cbd_teachers: int = 4) -> dict[str, Any]:
    """Time the kinds of step; returns the result dict (see the module docstring). ``loader``: keyword
    arguments of :func:`lfme_fast.bench.ecl_step.loader_view_cost` (root, backend, workers, rounds), or
    None to skip the loading measurement."""
    from lfme_fast.losses import lfme_loss
    from lfme_fast.models import build_model

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sizes = IMAGENET_LT_SUBSETS
    num_classes = sum(sizes)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(arch, num_classes).to(dev, memory_format=fmt).train()
    experts = [build_model(arch, c).to(dev, memory_format=fmt).eval() for c in sizes]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, resolution, resolution, device=dev).to(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    v = torch.rand(batch_size, device=dev)
    offsets = np.cumsum([0, *sizes])
    subsets = [torch.arange(int(offsets[l]), int(offsets[l + 1]), device=dev) for l in range(len(sizes))]
    w = [1.0, 0.7, 0.4]
    tmp = tempfile.TemporaryDirectory(prefix="bench_step_")
    load = store_load or (str(dev) if cuda else "ram")
    store = make_store(Path(tmp.name), store_samples, views, sizes, load=load)
    gen = np.random.default_rng(1)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _synchronize(dev)

    def plain() -> None:
        with autocast():
            logits = model(x)
        finish(torch.nn.functional.cross_entropy(logits.float(), y))

    def batch_ids() -> tuple[torch.Tensor, torch.Tensor]:
        # A real batch arrives with its indices and view ids already on the device (Batch.indices/views).
        idx = torch.from_numpy(gen.integers(0, store_samples, batch_size))
        vw = torch.from_numpy(gen.integers(0, views, batch_size))
        return idx.to(dev), vw.to(dev)

    ids = [batch_ids() for _ in range(8)]
    counter = {"i": 0}

    def offline() -> None:
        idx, vw = ids[counter["i"] % len(ids)]
        counter["i"] += 1
        teachers = store.teachers(idx, vw, dev)
        with autocast():
            logits = model(x)
        finish(lfme_loss(logits, y, v, teachers, subsets, w, 2.0).loss)

    def live() -> None:
        with torch.no_grad(), autocast():
            teachers = [e(x) for e in experts]
        with autocast():
            logits = model(x)
        finish(lfme_loss(logits, y, v, teachers, subsets, w, 2.0).loss)

    kinds: dict[str, Callable[[], None]] = {"plain_ce": plain, "offline_kd": offline, "live_kd": live}
    ecl_step = None
    if ecl:
        from lfme_fast.bench.ecl_step import ECLStep

        x2 = torch.randn(batch_size, 3, resolution, resolution, device=dev).to(memory_format=fmt)
        ecl_step = ECLStep(arch, num_classes, ecl_experts, x, x2, y, dev, fmt, autocast)
        kinds["ecl"] = ecl_step.step
        kinds["ecl_one_view"] = lambda: ecl_step.step(two_views=False)

        def plain_forward() -> None:  # the plain model's forward alone, against the ECL step's forward
            with autocast():
                model(x)

        kinds["plain_forward"] = plain_forward
    cbd_step = None
    if cbd:
        from lfme_fast.bench.cbd_step import CBDStep

        cbd_step = CBDStep(arch, num_classes, cbd_teachers, x, y, dev, fmt, autocast, store_dir=Path(tmp.name) / "cbd",
                           store_samples=store_samples, views=views, store_load=load, batch_ids=ids)
        kinds["cbd_offline"] = cbd_step.offline
        kinds["cbd_live"] = cbd_step.live
    names = list(kinds)
    for _ in range(warmup):
        for fn in kinds.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    watch = Stopwatch(dev)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate which kind goes first
        for k in order:
            _synchronize(dev)
            watch.start()
            kinds[k]()
            times[k].append(watch.stop())
    loss_only = _loss_only_timings(store, ids, model, x, y, v, subsets, w, dev, autocast, repeats=max(50, repeats))
    tmp.cleanup()
    extra = _ecl_results(ecl_step, times, repeats, ecl_experts, loader, batch_size, resolution,
                         loss_only["loss_only_ce_s"]) if ecl_step is not None else {}
    if cbd_step is not None:
        extra.update(_cbd_results(cbd_step, times))
    med = {k: statistics.median(t) for k, t in times.items()}
    mins = {k: min(t) for k, t in times.items()}
    return {
        "benchmark": "student step: plain CE vs LFME on offline float16 logits vs LFME with live expert forwards",
        "plain_ce_s": med["plain_ce"], "offline_kd_s": med["offline_kd"], "live_kd_s": med["live_kd"],
        "plain_ce_min_s": mins["plain_ce"], "offline_kd_min_s": mins["offline_kd"], "live_kd_min_s": mins["live_kd"],
        "ratio_offline_over_plain": med["offline_kd"] / med["plain_ce"],
        "ratio_live_over_offline": med["live_kd"] / med["offline_kd"],
        "ratio_offline_over_plain_min": mins["offline_kd"] / mins["plain_ce"],
        "ratio_live_over_offline_min": mins["live_kd"] / mins["offline_kd"],
        "goal_offline_over_plain_max": 1.05,
        "model": arch, "experts": f"3 x {arch} ({'/'.join(map(str, sizes))} classes, no grad)",
        "num_classes": num_classes, "batch_size": batch_size, "resolution": resolution, "device": str(dev),
        "precision": "bf16 autocast, channels_last" if cuda else "fp32",
        "store": {"samples": store_samples, "views": views, "dtype": "float16",
                  "load": load, "where": {"mmap": "memory-mapped .npy", "ram": "numpy arrays in RAM"}.get(
                      load, f"tensors on {load}"),
                  "bytes_per_image": store.bytes_per_image},
        # The extra work of an offline step without the network (many repeats, so far less noisy than the
        # difference of two whole-step medians): gather + LFME loss forward/backward vs CE forward/backward.
        **loss_only,
        "offline_extra_s": loss_only["loss_only_offline_kd_s"] - loss_only["loss_only_ce_s"],
        "offline_extra_over_plain": (loss_only["loss_only_offline_kd_s"] - loss_only["loss_only_ce_s"])
        / med["plain_ce"],
        **extra,
        "repeats": repeats, "warmup": warmup, "all_times_s": times, "machine": machine_info(),
    }


def _cbd_results(cbd_step, times: dict[str, list[float]]) -> dict[str, Any]:
    """The CBD keys of the result: offline and live steps against plain CE and each other."""
    med = {k: statistics.median(times[k]) for k in ("plain_ce", "cbd_offline", "cbd_live")}
    return {
        **cbd_step.describe(),
        "cbd_offline_s": med["cbd_offline"], "cbd_offline_min_s": min(times["cbd_offline"]),
        "cbd_live_s": med["cbd_live"], "cbd_live_min_s": min(times["cbd_live"]),
        "ratio_cbd_offline_over_plain": med["cbd_offline"] / med["plain_ce"],
        "ratio_cbd_live_over_offline": med["cbd_live"] / med["cbd_offline"],
    }


def _ecl_results(ecl_step, times, repeats: int, num_experts: int, loader: dict[str, Any] | None,
                 batch_size: int, resolution: int, ce_loss_s: float) -> dict[str, Any]:
    """The ECL keys of the result: whole steps, their split, and the second view's loading."""
    from lfme_fast.bench.ecl_step import loader_view_cost

    med = {k: statistics.median(times[k]) for k in ("plain_ce", "ecl", "ecl_one_view", "plain_forward")}
    split = ecl_step.split(repeats)  # the timed steps' own parts (the warm-up steps come first)
    plain_fwd = med["plain_forward"]
    out: dict[str, Any] = {
        "ecl_experts": num_experts, "ecl_views": 2,
        "ecl_s": med["ecl"], "ecl_min_s": min(times["ecl"]),
        "ecl_one_view_s": med["ecl_one_view"], "ecl_one_view_min_s": min(times["ecl_one_view"]),
        "ratio_ecl_over_plain": med["ecl"] / med["plain_ce"],
        "ratio_ecl_over_plain_min": min(times["ecl"]) / min(times["plain_ce"]),
        "plain_forward_s": plain_fwd, **split, **ecl_step.losses_only(max(50, repeats)),
        "plain_backward_opt_s": med["plain_ce"] - plain_fwd - ce_loss_s,
        "ratio_ecl_forward_over_plain_forward": split["ecl_forward_s"] / plain_fwd,
        "ecl_second_view_compute_s": med["ecl"] - med["ecl_one_view"],
        "ecl_split_note": "ecl_forward_s (both views, 3 experts, autograd on), ecl_losses_s (loss terms' forward "
                          "+ EMA update), ecl_backward_opt_s (backward + SGD): medians timed inside the timed ECL "
                          "steps; ecl_losses_only_s: loss terms' forward + backward on detached outputs (compare "
                          "loss_only_ce_s); plain_forward_s: the plain model's forward, interleaved with the steps; "
                          "plain_backward_opt_s = plain_ce_s - plain_forward_s - loss_only_ce_s",
    }
    if loader is not None:
        cost = loader_view_cost(batch_size=batch_size, resolution=resolution, **loader)
        out.update(cost)
        out["ecl_step_with_loading_s"] = med["ecl"] + cost["loader_two_views_batch_s"]
        out["plain_step_with_loading_s"] = med["plain_ce"] + cost["loader_one_view_batch_s"]
        out["ratio_ecl_over_plain_with_loading"] = out["ecl_step_with_loading_s"] / out["plain_step_with_loading_s"]
    return out


def _loss_only_timings(store, ids, model, x, y, v, subsets, w, dev, autocast, repeats: int) -> dict[str, float]:
    """Median seconds of (a) CE forward/backward and (b) store gather + LFME loss forward/backward, both
    on the same detached student logits (the network's cost left out)."""
    from lfme_fast.losses import lfme_loss

    with torch.no_grad(), autocast():
        base = model(x).float()
    out: dict[str, list[float]] = {"loss_only_ce_s": [], "loss_only_offline_kd_s": []}
    for r in range(repeats + 2):
        for key in out:
            logits = base.clone().requires_grad_(True)
            _synchronize(dev)
            t0 = time.perf_counter()
            if key == "loss_only_ce_s":
                loss = torch.nn.functional.cross_entropy(logits, y)
            else:
                idx, vw = ids[r % len(ids)]
                loss = lfme_loss(logits, y, v, store.teachers(idx, vw, dev), subsets, w, 2.0).loss
            loss.backward()
            _synchronize(dev)
            if r >= 2:  # two warm-up rounds
                out[key].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lfme_fast.bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON (always done; kept for the CLI)")
    parser.add_argument("--json-out", help="also write the JSON here (e.g. results/bench_step.json)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    parser.add_argument("--resolution", type=int, default=None, help="default 112 on CPU, 224 on GPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of the three steps (15 CPU, 50 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--store-samples", type=int, default=20000, help="rows of the synthetic store")
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--arch", default="resnet10")
    parser.add_argument("--store-load", choices=["mmap", "ram", "cpu", "cuda"], default=None,
                        help="how the store is read (default: like the LFME recipe: on the GPU when training "
                             "there, else in RAM; 'mmap' for stores larger than memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-ecl", action="store_true", help="leave out the ECL rows")
    parser.add_argument("--ecl-experts", type=int, default=3, help="experts of the ECL step (default 3)")
    parser.add_argument("--no-cbd", action="store_true", help="leave out the CBD rows")
    parser.add_argument("--cbd-teachers", type=int, default=4, help="teachers of the CBD step (default 4, CBD-ENS)")
    parser.add_argument("--no-loader", action="store_true", help="skip the one- vs two-view loader measurement")
    parser.add_argument("--loader-data", default=None,
                        help="prepared dataset for the loader measurement (default: a synthetic ImageNet-LT-shaped "
                             "set of --loader-scale, prepared once into the loader benchmark's cache)")
    parser.add_argument("--loader-scale", type=float, default=0.01, help="synthetic set's scale (default 0.01)")
    parser.add_argument("--loader-backend", default="torch", help="loader back end (default torch)")
    parser.add_argument("--loader-workers", type=int, default=0, help="loader workers (default 0: in process)")
    parser.add_argument("--loader-rounds", type=int, default=3, help="timed epochs per loader (default 3)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    result = run(device=device, batch_size=args.batch_size or (256 if gpu else 64),
                 resolution=args.resolution or (224 if gpu else 112), repeats=args.repeats or (50 if gpu else 15),
                 warmup=args.warmup, store_samples=args.store_samples, views=args.views, arch=args.arch,
                 threads=args.threads, store_load=args.store_load, ecl=not args.no_ecl,
                 ecl_experts=args.ecl_experts, cbd=not args.no_cbd, cbd_teachers=args.cbd_teachers,
                 loader=None if args.no_ecl or args.no_loader else _loader_args(args))
    write_result(args.json_out, result)


def _loader_args(args: argparse.Namespace) -> dict[str, Any]:
    root = args.loader_data
    if root is None:
        from lfme_fast.bench.loader import DEFAULT_CACHE, prepare_synthetic

        root = prepare_synthetic(args.loader_scale, DEFAULT_CACHE)
    return {"root": root, "backend": args.loader_backend, "workers": args.loader_workers,
            "rounds": args.loader_rounds}


if __name__ == "__main__":
    main()
