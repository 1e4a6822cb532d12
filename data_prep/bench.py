"""Prep throughput benchmark: ``python -m data_prep.bench [--scale S] [--json-out PATH]``.

Writes synthetic ImageNet-LT-shaped JPEGs (~500x375, ~110 KB at quality 90) to files with a split list
first (untimed), then times the real ``imagenet-lt`` list preparation from those files, as a user's
``make prep-imagenet-lt`` would run it: canonicalisation (decode, resize to max side 256, encode),
webdataset shards + DALI indices, then the FFCV beton. Reports images/s per phase and in total, and
the storage per image of each format, with the machine and versions.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep import synthetic
from data_prep.images import EncodeSettings
from data_prep.pipeline import PrepOptions, prepare
from data_prep.sources import list_dataset
from lfme_fast.bench.common import machine_info, write_result


def _write_one(args):
    root, i, label = args
    path = Path(root) / "train" / f"c{label:04d}" / f"img{i:07d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(synthetic.synthetic_jpeg(0, i, label))
    return path.stat().st_size


def make_source_files(root: Path, scale: float, workers: int) -> tuple[Path, int]:
    """Synthetic JPEG files plus a train list (the benchmark's input; not timed)."""
    counts = synthetic.scaled_counts(synthetic.default_histogram(), scale)
    labels = synthetic.synthetic_labels(counts, seed=0)
    with mp.get_context("fork").Pool(workers) as pool:
        sizes = pool.map(_write_one, [(str(root), i, int(l)) for i, l in enumerate(labels)], chunksize=64)
    lists = root / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "Synthetic_train.txt").write_text(
        "".join(f"train/c{l:04d}/img{i:07d}.JPEG {l}\n" for i, l in enumerate(labels)))
    return lists / "Synthetic_train.txt", int(np.sum(sizes))


def run(scale: float, workers: int, max_side: int, quality: int, workdir: Path) -> dict:
    src_root = workdir / "src"
    t0 = time.perf_counter()
    train_list, src_bytes = make_source_files(src_root, scale, workers)
    gen_s = time.perf_counter() - t0
    source = list_dataset("synthetic-files", src_root, {"train": train_list})
    n = len(source.splits["train"].labels)
    out = workdir / "out"
    timings = {}
    opts = PrepOptions(EncodeSettings(max_side=max_side or None, quality=quality), workers=workers,
                       formats=("wds",))
    t0 = time.perf_counter()
    prepare(source, out, opts)
    timings["wds"] = time.perf_counter() - t0
    opts.formats = ("wds", "ffcv")
    # `import ffcv` JIT-compiles numba code (~12 s here): a once-per-process cost, timed apart so
    # the phase's images/s is the writer's own throughput.
    t0 = time.perf_counter()
    import ffcv.fields  # noqa: F401
    ffcv_import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepare(source, out, opts)  # shards are reused: this pass is the beton alone
    timings["ffcv"] = time.perf_counter() - t0
    total = timings["wds"] + timings["ffcv"]
    tar_bytes = sum(p.stat().st_size for p in (out / "wds").glob("*.tar"))
    beton_bytes = (out / "ffcv" / "train.beton").stat().st_size
    return {
        "benchmark": "prep",
        "dataset": "synthetic-lt files (SYNTHETIC JPEGs following the real ImageNet-LT histogram)",
        "images": n, "scale": scale, "workers": workers,
        "source_mean_bytes": src_bytes / n,
        "settings": {"max_side": max_side, "quality": quality},
        "seconds": {"generate_sources_untimed": round(gen_s, 3), "ffcv_import_untimed": round(ffcv_import_s, 3),
                    "wds_phase": round(timings["wds"], 3),
                    "ffcv_phase": round(timings["ffcv"], 3), "total": round(total, 3)},
        "images_per_s": {"wds_phase": n / timings["wds"], "ffcv_phase": n / timings["ffcv"], "total": n / total},
        "storage": {"wds_bytes_per_image": tar_bytes / n, "beton_bytes_per_image": beton_bytes / n,
                    "wds_total_bytes": tar_bytes, "beton_total_bytes": beton_bytes,
                    "projected_imagenet_lt_wds_gb": tar_bytes / n * 115846 / 1e9,
                    "projected_imagenet_lt_beton_gb": beton_bytes / n * 115846 / 1e9},
        "machine": machine_info(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.bench", description=__doc__)
    p.add_argument("--scale", type=float, default=0.02, help="fraction of ImageNet-LT's 115,846 images")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    p.add_argument("--json-out", default="results/bench_prep.json")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lfme_prep_bench_"))
    try:
        result = run(args.scale, args.workers, args.max_side, args.quality, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_result(args.json_out, result)


if __name__ == "__main__":
    main()
