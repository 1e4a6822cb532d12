"""The preparation pipeline: source -> canonical JPEGs (parallel) -> webdataset shards -> index -> beton.

Resumable: a shard is finished when its sidecar ``wds/<split>-NNNNN.json`` exists with the same input
fingerprint (written last, after the tar and its index); a re-run skips finished shards and a beton
whose recorded fingerprint matches. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.images import BadImage, EncodeSettings, canonicalize_encoded, encode_array
from data_prep.sources import DatasetSource, SourceError, SplitSource
from data_prep.writers import WdsShardWriter, shard_name, shard_ranges, write_beton
from lfme_fast.io import atomic_path, atomic_write_json, atomic_write_text, read_json_with_fingerprint
from lfme_fast.shards import MANIFEST, ShardReader, beton_path, index_path

FORMAT_VERSION = 1


@dataclass
class PrepOptions:
    """Writer settings: shard size, workers, strictness, FFCV write mode and which formats to write."""

    settings: EncodeSettings
    shard_size: int = 5000
    workers: int = 0  # 0: all cores
    strict: bool = False
    write_mode: str = "jpg"
    formats: tuple[str, ...] = ("wds", "ffcv")
    chunk: int = 64

    def to_json(self) -> dict:
        return {**self.settings.to_json(), "shard_size": self.shard_size, "ffcv_write_mode": self.write_mode,
                "formats": list(self.formats), "format_version": FORMAT_VERSION}


@dataclass
class PrepStats:
    images: int = 0
    bytes: int = 0
    skipped: list = field(default_factory=list)  # (split, origin, reason)
    converted: list = field(default_factory=list)  # (split, origin, note)
    reused_shards: int = 0
    seconds: float = 0.0


# Worker state, inherited through fork: the source holds fetch closures that do not pickle.
_WORK: dict = {}


def _canonicalize_chunk(task: tuple[str, list[int]]) -> list[tuple[int, object]]:
    split, positions = task
    source: SplitSource = _WORK["source"].splits[split]
    settings: EncodeSettings = _WORK["settings"]
    out = []
    for p in positions:
        try:
            payload = source.fetch(p)
            result = (canonicalize_encoded(payload, settings) if isinstance(payload, (bytes, bytearray))
                      else encode_array(np.asarray(payload), settings))
        except BadImage as exc:
            result = exc
        out.append((p, result))
    return out


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _split_fingerprint(source: DatasetSource, split: SplitSource, opts: PrepOptions) -> str:
    positions = split.positions()
    return _fingerprint(source.name, split.name, source.checksums, source.extra, opts.to_json(),
                        hashlib.sha256(positions.tobytes()).hexdigest(),
                        hashlib.sha256(split.labels.tobytes()).hexdigest())


def _load_sidecar(path: Path, fingerprint: str) -> dict | None:
    """A finished shard's metadata, or None when it must be (re)written."""
    meta = read_json_with_fingerprint(path, fingerprint)
    if meta is None:
        return None
    if meta["tar"] is None:  # every sample of this shard was skipped: nothing to publish
        return meta
    tar = path.with_suffix(".tar")
    if not (tar.exists() and tar.with_suffix(".idx").exists()) or tar.stat().st_size != meta.get("tar_bytes"):
        return None
    return meta


class _Progress:
    """One tqdm bar over all images of a split, showing images/s."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5,
                        disable=None if sys.stderr.isatty() else False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _write_split_shards(pool, source: DatasetSource, split: SplitSource, out: Path, opts: PrepOptions,
                        stats: PrepStats) -> list[dict]:
    wds = out / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    positions = split.positions()
    fingerprint = _split_fingerprint(source, split, opts)
    ranges = shard_ranges(len(positions), opts.shard_size)
    metas: list[dict | None] = []
    for shard, (lo, hi) in enumerate(ranges):
        meta = _load_sidecar(wds / f"{shard_name(split.name, shard)}.json", f"{fingerprint}:{shard}")
        metas.append(meta)
    pending = [s for s, m in enumerate(metas) if m is None]
    stats.reused_shards += len(ranges) - len(pending)
    progress = _Progress(len(positions), f"{source.name}/{split.name}")
    progress.update(sum(hi - lo for s, (lo, hi) in enumerate(ranges) if metas[s] is not None))
    try:
        for shard in pending:
            lo, hi = ranges[shard]
            metas[shard] = _write_one_shard(pool, split, positions[lo:hi], wds, shard,
                                            f"{fingerprint}:{shard}", opts, progress)
    finally:
        progress.close()
    return metas


def _write_one_shard(pool, split: SplitSource, positions: np.ndarray, wds: Path, shard: int, fingerprint: str,
                     opts: PrepOptions, progress: _Progress) -> dict:
    name = shard_name(split.name, shard)
    chunks = [(split.name, positions[i:i + opts.chunk].tolist()) for i in range(0, len(positions), opts.chunk)]
    writer = WdsShardWriter(wds / f"{name}.tar")
    kept, skipped, converted = [], [], []
    try:
        for results in pool.imap(_canonicalize_chunk, chunks):
            for p, result in results:
                if isinstance(result, BadImage):
                    if opts.strict:
                        raise SourceError(f"{split.origins[p]}: {result} (--strict turns skips into errors)")
                    skipped.append([split.origins[p], str(result)])
                    continue
                writer.add(split.keys[p], result.jpeg, int(split.labels[p]))
                kept.append(p)
                if result.note:
                    converted.append([split.origins[p], result.note])
            progress.update(len(results))
    except BaseException:
        writer.abort()
        raise
    if kept:
        writer.close()
    else:  # an empty tar would be a malformed shard for DALI (its index needs >= 1 sample)
        writer.abort()
        for stale in (wds / f"{name}.tar", wds / f"{name}.idx"):
            stale.unlink(missing_ok=True)
    meta = {"fingerprint": fingerprint, "tar": f"{name}.tar" if kept else None,
            "tar_bytes": (wds / f"{name}.tar").stat().st_size if kept else 0,
            "positions": kept, "labels": split.labels[kept].tolist(), "offsets": writer.jpg_offsets,
            "sizes": writer.jpg_sizes, "skipped": skipped, "converted": converted}
    atomic_write_json(wds / f"{name}.json", meta)
    return meta


def _write_index(split: SplitSource, metas: list[dict], out: Path) -> tuple[np.ndarray, int]:
    metas = [m for m in metas if m["tar"] is not None]

    def cat(key, dtype):
        return np.concatenate([np.asarray(m[key], dtype) for m in metas] + [np.zeros(0, dtype)])

    labels, offset, size = cat("labels", np.int64), cat("offsets", np.int64), cat("sizes", np.int64)
    shard = np.concatenate([np.full(len(m["labels"]), s, np.int32) for s, m in enumerate(metas)]
                           + [np.zeros(0, np.int32)])
    with atomic_path(index_path(out, split.name)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, label=labels, shard=shard, offset=offset, size=size)
    positions = [p for m in metas for p in m["positions"]]
    rows = ["index\tkey\tlabel\torigin"] + [f"{i}\t{split.keys[p]}\t{split.labels[p]}\t{split.origins[p]}"
                                            for i, p in enumerate(positions)]
    atomic_write_text(out / "meta" / f"{split.name}.tsv", "\n".join(rows) + "\n")
    return labels, int(size.sum())


def _check_classes(split: str, labels: np.ndarray, num_classes: int, skipped: int) -> list[str]:
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty) and split == "train":
        raise SourceError(f"train split: class(es) {empty[:10].tolist()} have no usable images"
                          + (f" after skipping {skipped} bad file(s); see skipped.txt" if skipped else ""))
    return [f"{split}: class(es) {empty[:20].tolist()} have no images"] if len(empty) else []


def _write_beton_if_needed(out: Path, split: str, opts: PrepOptions, split_fp: str) -> bool:
    path = beton_path(out, split)
    stamp = path.with_suffix(".json")
    fp = _fingerprint(split_fp, opts.write_mode, opts.settings.to_json())
    if path.exists() and stamp.exists():
        recorded = json.loads(stamp.read_text())
        if recorded.get("fingerprint") == fp and recorded.get("bytes") == path.stat().st_size:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[prep] writing {path}", file=sys.stderr)
    write_beton(path, ShardReader(out, split), write_mode=opts.write_mode, max_resolution=opts.settings.max_side,
                jpeg_quality=opts.settings.quality, num_workers=opts.workers or os.cpu_count())
    atomic_write_json(stamp, {"fingerprint": fp, "bytes": path.stat().st_size})
    return True


def _subsets_json(train_counts: np.ndarray) -> dict:
    from lfme_fast.subsets import CONVENTIONS, describe_convention, split_classes

    out = {}
    for conv in CONVENTIONS:
        out[conv] = {"description": describe_convention(conv, None),
                     "subsets": {s.name: s.classes.tolist() for s in split_classes(train_counts, conv)}}
    return out


def prepare(source: DatasetSource, out: str | Path, opts: PrepOptions) -> PrepStats:
    """Convert every split of ``source`` into ``out`` and write ``manifest.json`` last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for note in source.notes:
        print(f"[prep] NOTE: {note}", file=sys.stderr)
    stats = PrepStats()
    t0 = time.perf_counter()
    num_classes = len(source.class_names)
    manifest_splits, warnings = {}, []
    _WORK.update(source=source, settings=opts.settings)
    workers = opts.workers or os.cpu_count() or 1
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            all_metas = {name: _write_split_shards(pool, source, split, out, opts, stats)
                         for name, split in source.splits.items()}
    finally:
        _WORK.clear()
    for name, split in source.splits.items():
        metas = all_metas[name]
        labels, nbytes = _write_index(split, metas, out)
        split_skipped = [[o, r] for o, r in split.skipped] + [s for m in metas for s in m["skipped"]]
        stats.skipped += [(name, o, r) for o, r in split_skipped]
        stats.converted += [(name, o, n) for m in metas for o, n in m["converted"]]
        warnings += _check_classes(name, labels, num_classes, len(split_skipped))
        stats.images += len(labels)
        stats.bytes += nbytes
        manifest_splits[name] = {"num_samples": int(len(labels)),
                                 "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
                                 "shards": [m["tar"] for m in metas if m["tar"]], "jpeg_bytes": nbytes,
                                 "skipped": len(split_skipped), "converted": sum(len(m["converted"]) for m in metas),
                                 "fingerprint": _split_fingerprint(source, split, opts)}
    _write_reports(out, stats)
    # The manifest must exist before the beton writer's ShardReader opens the splits; it is
    # rewritten at the end with the beton files, so its presence alone never claims a finished beton.
    manifest = _manifest(source, opts, manifest_splits, warnings, stats, formats_done=["wds"])
    atomic_write_json(out / MANIFEST, manifest)
    if "ffcv" in opts.formats:
        for name in source.splits:
            _write_beton_if_needed(out, name, opts, manifest_splits[name]["fingerprint"])
            manifest_splits[name]["beton"] = f"ffcv/{name}.beton"
            manifest_splits[name]["beton_bytes"] = beton_path(out, name).stat().st_size
    stats.seconds = time.perf_counter() - t0
    manifest = _manifest(source, opts, manifest_splits, warnings, stats, formats_done=list(opts.formats))
    atomic_write_json(out / MANIFEST, manifest)
    return stats


def _manifest(source: DatasetSource, opts: PrepOptions, splits: dict, warnings: list, stats: PrepStats,
              formats_done: list[str]) -> dict:
    train_counts = np.asarray(splits["train"]["class_counts"]) if "train" in splits else None
    return {
        "format_version": FORMAT_VERSION,
        "dataset": source.name,
        "synthetic": source.synthetic,
        "notes": source.notes,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "splits": splits,
        "subsets": _subsets_json(train_counts) if train_counts is not None else {},
        "writer": opts.to_json(),
        "formats": formats_done,
        "ffcv_fields": ["image", "label", "index"],
        "source": {"checksums": source.checksums, **{k: v for k, v in source.extra.items()}},
        "warnings": warnings,
        "prep_seconds": round(stats.seconds, 3),
    }


def _write_reports(out: Path, stats: PrepStats) -> None:
    """skipped.txt and converted.txt list every file not stored as-is; written even when empty."""
    atomic_write_text(out / "skipped.txt", "".join(f"{s}\t{o}\t{r}\n" for s, o, r in stats.skipped))
    atomic_write_text(out / "converted.txt", "".join(f"{s}\t{o}\t{n}\n" for s, o, n in stats.converted))
