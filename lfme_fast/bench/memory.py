"""Host memory against the number of loader processes: ``python -m lfme_fast.bench memory``.

A machine with G GPUs runs G training processes, each with its own loader over the same prepared
dataset. If each of them held its own copy of the dataset (as ffcv users report with ffcv's
process cache, ffcv issue #120), host memory would grow by one dataset per GPU. Our loaders map the
dataset files (ffcv: the beton through ffcv's ``os_cache``; torch / DALI: the tar shards through
``np.memmap``), so the kernel keeps one copy in its page cache, shared by every process.

For N in ``--processes`` (default 1, 2, 4), N processes are started (spawned, as a launcher would),
each builds a training loader over the same dataset (instance shuffle: every sample is read once an
epoch) and reads a whole epoch. With all N alive and done reading, each process's memory is read from
``/proc/<pid>/smaps_rollup`` (its loader worker processes, if any, added in):

* RSS: every page the process has resident, shared or not;
* PSS: each page divided by the number of processes mapping it, so that the PSS of the N
  processes sums to what they take together;
* the dataset files' mappings alone (``/proc/<pid>/smaps``, mappings under the dataset directory):
  their RSS per process and their PSS summed over the processes. One shared copy shows as a summed
  PSS that stays at one process's RSS whatever N (``dataset_copies`` ~ 1); a copy per process would
  make it N times that.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lfme_fast.bench.common import (
    child_pids, error_record, machine_info, mapped_file_memory, process_memory, write_result)

__all__ = ["ReaderConfig", "measure_processes", "dataset_files_bytes", "main"]

_READY_TIMEOUT_S = 1800.0  # a reader that has not read its epoch by then is reported as failed


@dataclass(frozen=True)
class ReaderConfig:
    """What each reader process builds (picklable: it crosses into the spawned processes)."""

    root: str
    split: str = "train"
    backend: str = "ffcv"
    batch_size: int = 64
    resolution: int = 224
    workers: int = 1  # loader workers/threads per process
    threads: int = 1  # torch threads per process (N processes share the cores)


def _read_epoch(cfg: ReaderConfig) -> tuple[Any, int]:
    """Build the loader and read one whole epoch; returns (loader, images read)."""
    import torch

    from lfme_fast.loaders import LoaderOptions, build_loader

    torch.set_num_threads(cfg.threads)
    loader = build_loader(LoaderOptions(cfg.root, cfg.split, backend=cfg.backend, train=True,
                                        batch_size=cfg.batch_size, resolution=cfg.resolution, augment="imagenet",
                                        num_workers=cfg.workers, drop_last=False, in_memory=True))
    loader.set_epoch(0)
    images = 0
    for batch in loader:
        images += len(batch)
    return loader, images


def _reader_main(conn: Any, cfg: ReaderConfig) -> None:
    """A reader process: read an epoch, report, then hold its loader (and memory) until told to exit."""
    try:
        t0 = time.perf_counter()
        loader, images = _read_epoch(cfg)
        conn.send(("ready", os.getpid(), images, time.perf_counter() - t0))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.recv()  # measured: the parent says when to let go
    close = getattr(loader, "close", None)
    if close:
        close()


def _memory_of(pid: int, root: str) -> dict[str, Any]:
    """The process's memory with its descendants' added, and its dataset mappings."""
    total = process_memory(pid)
    data = mapped_file_memory(pid, root)
    kids = child_pids(pid)
    for kid in kids:
        try:
            for key, value in process_memory(kid).items():
                total[key] += value
            kid_data = mapped_file_memory(kid, root)
        except OSError:  # a worker that exited between listing and reading
            continue
        data["rss"] += kid_data["rss"]
        data["pss"] += kid_data["pss"]
        data["files"] = sorted(set(data["files"]) | set(kid_data["files"]))
    return {"pid": pid, "child_processes": len(kids), **{k.lower(): v for k, v in total.items()},
            "dataset_rss": data["rss"], "dataset_pss": data["pss"], "dataset_files_mapped": len(data["files"])}


def measure_processes(n: int, cfg: ReaderConfig) -> dict[str, Any]:
    """Start ``n`` readers, wait until every one has read its epoch, read their memory, let them go."""
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_reader_main, args=(child, cfg), name="bench-memory-reader")
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        ready = []
        for proc, conn in zip(procs, conns):
            if not conn.poll(_READY_TIMEOUT_S):
                raise TimeoutError(f"a reader did not finish its epoch within {_READY_TIMEOUT_S:.0f} s")
            try:
                msg = conn.recv()
            except EOFError:
                raise RuntimeError(f"a reader process died (exit code {proc.exitcode})") from None
            if msg[0] == "error":
                raise RuntimeError(f"a reader failed: {msg[1]}\n{msg[2]}")
            ready.append(msg)
        per_process = [{**_memory_of(pid, cfg.root), "images_read": images, "read_s": secs}
                       for _, pid, images, secs in ready]
    finally:
        for conn in conns:
            try:
                conn.send("exit")
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return summarise(per_process)


def summarise(per_process: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and means over the processes of one N (see the module docstring)."""
    n = len(per_process)
    total_pss = sum(p["pss"] for p in per_process)
    data_pss = sum(p["dataset_pss"] for p in per_process)
    data_rss = max(p["dataset_rss"] for p in per_process)
    return {
        "processes": n, "per_process": per_process,
        "rss_mean": sum(p["rss"] for p in per_process) / n, "pss_mean": total_pss / n, "pss_total": total_pss,
        "anonymous_total": sum(p["anonymous"] for p in per_process),
        "dataset_rss_per_process_max": data_rss, "dataset_pss_total": data_pss,
        # one shared copy: the summed PSS of the dataset's pages equals one process's RSS of them
        "dataset_copies": data_pss / data_rss if data_rss else None,
    }


def dataset_files_bytes(root: str | os.PathLike, split: str, backend: str) -> dict[str, Any]:
    """The files a back end reads for ``split`` and their total size."""
    from lfme_fast.shards import ShardReader, beton_path

    if backend == "ffcv":
        files = [beton_path(root, split)]
    else:
        files = [Path(f) for f in ShardReader(root, split).shard_files]
    return {"files": [str(f) for f in files], "bytes": sum(Path(f).stat().st_size for f in files)}


def run(counts: Sequence[int], cfg: ReaderConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One row per process count; a failing count is recorded and the others still run."""
    rows: dict[str, Any] = {}
    for n in counts:
        log(f"[bench memory] {n} process(es) reading {cfg.root} with the {cfg.backend} back end ...")
        try:
            row = measure_processes(n, cfg)
            log(f"[bench memory] {n}: PSS total {row['pss_total'] / 2**20:.0f} MiB, dataset PSS total "
                f"{row['dataset_pss_total'] / 2**20:.0f} MiB, copies {row['dataset_copies']}")
        except Exception as exc:
            row = error_record(exc)
            log(f"[bench memory] {n}: {row['error']}")
        rows[str(n)] = row
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring and ``--help``."""
    from lfme_fast.bench.loader import add_dataset_args, dataset_root, dataset_stats

    p = argparse.ArgumentParser(prog="python -m lfme_fast.bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(p)
    p.add_argument("--backend", default="ffcv", help="loader back end of every process (default ffcv)")
    p.add_argument("--processes", default="1,2,4", help="comma list of process counts (default 1,2,4)")
    p.add_argument("--workers", type=int, default=1, help="loader workers/threads per process (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--resolution", type=int, default=224, help="crop side (default 224)")
    p.add_argument("--json-out", default="results/bench_memory.json", help="default results/bench_memory.json")
    args = p.parse_args(argv)

    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        p.error(f"--processes needs positive counts, got {args.processes!r}")
    root = dataset_root(args).resolve()
    cfg = ReaderConfig(root=str(root), split=args.split, backend=args.backend, batch_size=args.batch_size,
                       resolution=args.resolution, workers=args.workers)
    t0 = time.perf_counter()
    machine = machine_info()
    rows = run(counts, cfg)
    write_result(args.json_out, {
        "benchmark": "memory",
        "what": "N loader processes over one prepared dataset, each having read a whole epoch: RSS and PSS per "
                "process (smaps_rollup, loader workers included) and of the dataset files' mappings",
        "machine": machine,
        "config": {"backend": cfg.backend, "workers_per_process": cfg.workers, "batch_size": cfg.batch_size,
                   "resolution": cfg.resolution, "in_memory": True, "sampler": "instance shuffle (every sample)"},
        "dataset": dataset_stats(root, args.split),
        "dataset_files": dataset_files_bytes(root, args.split, cfg.backend),
        "counts": rows, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
