"""``python -m data_prep <dataset> --out DIR [options]`` and ``python -m data_prep stats SOURCE``.

Datasets: imagenet-lt, places-lt, inat18 (image root + split lists), cifar10-lt, cifar100-lt (python
pickle batches), fmnist-lt (Fashion-MNIST idx files) and synthetic-lt (seeded JPEGs for benchmarks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.images import EncodeSettings
from data_prep.sources import SourceError, find_split_lists

FMNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
LIST_DATASETS = {"imagenet-lt": "ImageNet-LT", "places-lt": "Places-LT", "inat18": "iNaturalist 2018"}
ARRAY_DATASETS = ("cifar10-lt", "cifar100-lt", "fmnist-lt")
DATASETS = (*LIST_DATASETS, *ARRAY_DATASETS, "synthetic-lt")

# Storage defaults per dataset. ImageNet-LT-like data: longest side 256 at JPEG quality 90 — a
# RandomResizedCrop to 224 rarely needs more pixels, and decoding ~256x192 instead of ~500x375 is what
# makes the loader fast (REFERENCE §3: ffcv 1312 img/s at full size vs 4710 at max side 256 on 2 cores).
# 28/32-pixel datasets: full size, quality 95 without chroma subsampling, raw pixels in the beton.
DEFAULTS = {
    "imagenet-lt": dict(max_side=256, quality=90, subsampling="420", write_mode="jpg", shard_size=5000),
    "places-lt": dict(max_side=256, quality=90, subsampling="420", write_mode="jpg", shard_size=5000),
    "inat18": dict(max_side=256, quality=90, subsampling="420", write_mode="jpg", shard_size=5000),
    "synthetic-lt": dict(max_side=256, quality=90, subsampling="420", write_mode="jpg", shard_size=5000),
    "cifar10-lt": dict(max_side=0, quality=95, subsampling="444", write_mode="raw", shard_size=10000),
    "cifar100-lt": dict(max_side=0, quality=95, subsampling="444", write_mode="raw", shard_size=10000),
    "fmnist-lt": dict(max_side=0, quality=95, subsampling="444", write_mode="raw", shard_size=10000),
}


def _add_common(p: argparse.ArgumentParser, dataset: str) -> None:
    d = DEFAULTS[dataset]
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--max-side", type=int, default=d["max_side"],
                   help=f"longest stored side in pixels, 0 keeps the size (default {d['max_side']})")
    p.add_argument("--quality", type=int, default=d["quality"], help=f"JPEG quality (default {d['quality']})")
    p.add_argument("--subsampling", choices=["444", "422", "420"], default=d["subsampling"])
    p.add_argument("--write-mode", choices=["jpg", "raw"], default=d["write_mode"],
                   help="FFCV image storage: jpg (the shard's bytes verbatim) or raw pixels")
    p.add_argument("--shard-size", type=int, default=d["shard_size"], help="samples per webdataset shard")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--formats", default="wds,ffcv", help="comma list of wds,ffcv (wds is always written)")
    p.add_argument("--strict", action="store_true", help="turn skipped files into errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join(DATASETS) + ",stats}")
    for name, title in LIST_DATASETS.items():
        p = sub.add_parser(name, help=f"{title}: image root + split lists ('relative/path label' lines)")
        p.add_argument("--root", required=True, type=Path, help="image root the list paths are relative to")
        p.add_argument("--lists", type=Path, help="directory holding *_train.txt, *_val.txt, *_test.txt (or .txt.gz; "
                                                  "the public lists ship in data_prep/splits/)")
        for split in ("train", "val", "test"):
            p.add_argument(f"--{split}", type=Path, help=f"{split} list (overrides --lists)")
        p.add_argument("--class-names", type=Path, help="classnames.txt or categories.json (default: found in "
                                                        "--lists, else the directory names)")
        _add_common(p, name)
    for name in ARRAY_DATASETS:
        default_root = FMNIST_DEFAULT_ROOT if name == "fmnist-lt" else None
        p = sub.add_parser(name, help=f"{name}: exponential long-tailed profile of the balanced set")
        p.add_argument("--root", type=Path, default=default_root, required=default_root is None)
        p.add_argument("--imbalance-ratio", type=float, default=100.0, help="n_max / n_min (100, 50, 10)")
        p.add_argument("--val-per-class", type=int, default=20,
                       help="balanced val images per class held out of the training pool before the LT "
                            "profile (0: exact standard profile, no val split)")
        p.add_argument("--seed", type=int, default=0)
        if name == "fmnist-lt":
            p.add_argument("--class-order", type=int, metavar="SEED",
                           help="give the profile's counts to a seeded permutation of the classes (recorded in "
                                "the manifest) instead of label order, whose tail holds two easy classes")
        _add_common(p, name)
    p = sub.add_parser("synthetic-lt", help="SYNTHETIC seeded JPEGs following a class histogram (benchmarks)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the histogram (1.0: 115,846 images)")
    p.add_argument("--histogram", type=Path, help=".npy of per-class counts (default: real ImageNet-LT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=int, default=2)
    _add_common(p, "synthetic-lt")
    sub.add_parser("stats", help="imbalance metrics: python -m data_prep stats SOURCE [--json]", add_help=False)
    return parser


def _list_source(args):
    from data_prep.sources import list_dataset

    explicit = {split: getattr(args, split) for split in ("train", "val", "test") if getattr(args, split)}
    found = find_split_lists(args.lists, skip=explicit) if args.lists else {}
    lists = {split: explicit.get(split) or found[split] for split in ("train", "val", "test")
             if split in explicit or split in found}
    if "train" not in lists:
        raise SourceError("no training list: pass --lists DIR or --train FILE")
    names = args.class_names
    if names is None and args.lists:
        for candidate in ("classnames.txt", "categories.json", "classnames.txt.gz", "categories.json.gz"):
            if (args.lists / candidate).exists():
                names = args.lists / candidate
    return list_dataset(args.dataset, args.root, lists, class_names_file=names, strict=args.strict)


def build_source(args):
    """The DatasetSource for parsed CLI ``args``."""
    from data_prep import sources

    if args.dataset in LIST_DATASETS:
        return _list_source(args)
    if args.dataset == "fmnist-lt":
        return sources.fmnist_dataset(args.root, args.imbalance_ratio, args.val_per_class, args.seed,
                                      args.class_order)
    if args.dataset in ("cifar10-lt", "cifar100-lt"):
        return sources.cifar_dataset(args.root, 10 if args.dataset == "cifar10-lt" else 100,
                                     args.imbalance_ratio, args.val_per_class, args.seed)
    import numpy as np

    hist = np.load(args.histogram) if args.histogram else None
    return sources.synthetic_dataset(args.scale, args.seed, args.val_per_class, hist)


def options_from_args(args):
    from data_prep.pipeline import PrepOptions

    formats = tuple(sorted(set(f.strip() for f in args.formats.split(",") if f.strip()) | {"wds"}))
    unknown = set(formats) - {"wds", "ffcv"}
    if unknown:
        raise SourceError(f"--formats: unknown format(s) {sorted(unknown)} (known: wds, ffcv)")
    if not 1 <= args.quality <= 100:
        raise SourceError(f"--quality must be in 1..100, got {args.quality}")
    settings = EncodeSettings(max_side=args.max_side or None, quality=args.quality, subsampling=args.subsampling)
    return PrepOptions(settings=settings, shard_size=args.shard_size, workers=args.workers, strict=args.strict,
                       write_mode=args.write_mode, formats=formats)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stats":
        from data_prep import stats

        sys.exit(stats.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from data_prep.pipeline import prepare

    try:
        source = build_source(args)
        opts = options_from_args(args)
        result = prepare(source, args.out, opts)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    rate = result.images / result.seconds if result.seconds else float("nan")
    synthetic = " SYNTHETIC" if source.synthetic else ""
    print(f"[prep] done{synthetic} {source.name} -> {args.out}: {result.images} images, "
          f"{result.bytes / 1e6:.1f} MB JPEG, {result.seconds:.1f} s, {rate:.0f} images/s"
          f" ({result.reused_shards} shard(s) reused, {len(result.skipped)} skipped"
          f"{' -> ' + str(args.out / 'skipped.txt') if result.skipped else ''}, {len(result.converted)} converted)")


if __name__ == "__main__":
    main()
