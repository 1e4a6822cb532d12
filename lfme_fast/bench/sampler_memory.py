"""Memory of one process's epoch plan at 1e8 and 1e9 samples per epoch:
``python -m lfme_fast.bench sampler_memory [--json-out PATH] [--sizes 1e8 1e9]``.

The plan is what :meth:`lfme_fast.sampling.Sampler.epoch_share` returns for one process (what the
training loaders plan an epoch from): its int64 indices, float32 curriculum weights and int64
occurrence numbers (the LFME student's class-balanced sampler on the
ImageNet-LT histogram, 1000 classes, 115,846 images; ``train.epoch_samples`` = the size), sharded in
per-process batches of 32 (a global batch of 256 on 8 processes). Each case runs in a fresh process, which
reports its peak resident memory (``ru_maxrss``) above its resident memory just before planning (labels,
sampler and the numba kernels already loaded), and the planning time.

Two ways to plan:
* ``whole``: the whole global order at once (the path of epochs up to ``plan_chunk`` positions): every
  process holds the global order, its weights, an n-sized scratch buffer and the order's occurrence
  numbers, about 30 bytes per position whatever the process count, plus its share;
* ``chunked``: the streaming kernels (epochs above ``plan_chunk``, 4 Mi positions): the same order, bit
  for bit, a chunk at a time; a process holds its share (20 bytes per position of its share) plus one
  chunk and the per-class state and occurrence counters (two words per dataset sample).

``whole`` at 1e9 is not run by default (about 30 GB plus the share); its expected peak is given from the
per-position bytes measured at 1e8. A case whose share alone would not fit in the memory available when
it starts is skipped and recorded as such.
The loader's plan on top of this (crop boxes, flips: 17 bytes per position of the share) is not
included: it follows the share.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lfme_fast.bench.common import machine_info, write_result

BATCH = 32  # per process
#: bytes per position of a process's share: int64 index, float32 weight, int64 occurrence number
SHARE_BYTES_PER_POSITION = 20
#: the whole-epoch path's bytes per global position beyond the share (order, weights, scratch, occurrences)
WHOLE_BYTES_PER_POSITION = 30
SPC = 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(samples: int, mode: str, world: int, rank: int = 0) -> dict[str, Any]:
    """One case in this process (call it in a fresh one): peak memory above the pre-planning RSS."""
    import numpy as np

    from lfme_fast.bench.sampler import interleaved_labels, load_imagenet_lt_histogram
    from lfme_fast.sampling import build_sampler

    counts, _ = load_imagenet_lt_histogram()
    labels = interleaved_labels(counts)
    v1 = np.random.default_rng(0).uniform(0.1, 1.0, labels.size)
    sampler = build_sampler("class_balanced", labels, seed=0, num_replicas=world, rank=rank, num_samples=samples,
                            samples_per_class=SPC, initial_weights=v1).shard_batches(BATCH)
    # load the numba kernels of both paths on a tiny epoch first, so their compilation is not counted
    small = build_sampler("class_balanced", labels, seed=0, num_replicas=world, rank=rank, num_samples=10_000,
                          samples_per_class=SPC, initial_weights=v1).shard_batches(BATCH)
    small.epoch_share(0, 2)
    small.plan_chunk = 1024
    small.epoch_share(0, 2)
    sampler.plan_chunk = samples + 1 if mode == "whole" else type(sampler).plan_chunk
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    share = sampler.epoch_share(0, 2)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    idx = share.indices
    share_bytes = int(idx.nbytes + share.weights.nbytes + share.occurrences.nbytes)
    plan_peak = max(peak, peak_before) - before
    return {"samples_per_epoch": samples, "mode": mode, "world_size": world, "rank": rank,
            "per_process_batch": BATCH, "share_positions": int(idx.size), "share_bytes": share_bytes,
            "peak_above_start_bytes": int(plan_peak), "peak_above_start_gib": round(plan_peak / 2**30, 3),
            "beyond_share_bytes": int(plan_peak - share_bytes),
            "bytes_per_global_position": round(plan_peak / samples, 3),
            "plan_chunk": int(sampler.plan_chunk) if mode == "chunked" else None,
            "dataset_samples": int(labels.size), "seconds": round(seconds, 2)}


def _available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_case(samples: int, mode: str, world: int) -> dict[str, Any]:
    need = SHARE_BYTES_PER_POSITION * (samples // world) + (WHOLE_BYTES_PER_POSITION * samples if mode == "whole" else 0)
    avail = _available_bytes()
    if avail is not None and need > 0.9 * avail:
        return {"samples_per_epoch": samples, "mode": mode, "world_size": world,
                "skipped": f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"}
    code = (f"import json; from lfme_fast.bench.sampler_memory import measure; "
            f"print('RESULT', json.dumps(measure({samples}, {mode!r}, {world})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return {"samples_per_epoch": samples, "mode": mode, "world_size": world,
                "error": (res.stderr or res.stdout)[-2000:]}
    line = next(s for s in res.stdout.splitlines() if s.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cases (each in its own process) and write the JSON result."""
    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench sampler_memory", description=__doc__.split("\n")[0])
    p.add_argument("--json-out", default="results/bench_sampler_memory.json", help="where to write the JSON result")
    p.add_argument("--sizes", type=float, nargs="+", default=[1e8, 1e9], help="samples per epoch")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8], help="process counts (rank 0 is measured)")
    p.add_argument("--whole-up-to", type=float, default=1e8,
                   help="measure the whole-epoch path only up to this size (it needs ~30 B x size)")
    args = p.parse_args(argv)
    cases = []
    for size in (int(s) for s in args.sizes):
        for world in args.worlds:
            modes = ["chunked"] + (["whole"] if size <= args.whole_up_to else [])
            for mode in modes:
                r = _run_case(size, mode, world)
                print(json.dumps(r), flush=True)
                cases.append(r)
    whole = [c for c in cases if c.get("mode") == "whole" and "beyond_share_bytes" in c]
    per_pos = {c["world_size"]: c["beyond_share_bytes"] / c["samples_per_epoch"] for c in whole}
    expected = {}
    for size in (int(s) for s in args.sizes):
        if size > args.whole_up_to:
            for world, b in per_pos.items():
                share = SHARE_BYTES_PER_POSITION * (size // (world * BATCH)) * BATCH
                expected[f"{size:.0e} x {world} process(es)"] = {
                    "expected_peak_gib": round((b * size + share) / 2**30, 1),
                    "from": f"{b:.2f} bytes per position beyond the share, measured at {int(args.whole_up_to):.0e}"}
    result = {"benchmark": "sampler_memory", "what": __doc__.split("\n\n")[1].replace("\n", " "),
              "sampler": {"kind": "class_balanced", "samples_per_class": SPC, "curriculum_weights": True,
                          "histogram": "ImageNet-LT (1000 classes, 115,846 images)"},
              "cases": cases, "whole_path_not_run": expected, "machine": machine_info()}
    write_result(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
