"""Dataset sources: what each dataset looks like on disk, turned into per-split sample lists.

A :class:`SplitSource` lists a split's samples in source order (``labels``, ``keys``, ``origins``) and
fetches sample ``p``'s payload: encoded image bytes (file datasets, synthetic) or a uint8 array
(CIFAR pickles, Fashion-MNIST idx). Problems found while listing (duplicates, labels out of range, empty
classes, malformed lines) are raised as :class:`SourceError` naming the file and line, or, where skipping
is sane (duplicate entries), recorded in ``SplitSource.skipped``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Union

import numpy as np

from data_prep.images import BadImage, EncodeSettings

Payload = Union[bytes, np.ndarray]

SPLIT_NAMES = ("train", "val", "test")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


class SourceError(ValueError):
    """Input that cannot be converted; the message names the file (and line) at fault."""


@dataclass
class SplitSource:
    """One split in source order. ``fetch(p)`` returns sample p's payload or raises BadImage."""

    name: str
    labels: np.ndarray
    keys: list[str]
    origins: list[str]
    fetch: Callable[[int], Payload]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason) found while listing
    keep: np.ndarray | None = None  # source positions to convert (None: all)

    def positions(self) -> np.ndarray:
        return np.arange(len(self.labels), dtype=np.int64) if self.keep is None else self.keep


@dataclass
class DatasetSource:
    """A whole dataset: class names, splits, default encoding and the checksums of its source files."""

    name: str
    class_names: list[str]
    splits: dict[str, SplitSource]
    settings: EncodeSettings
    checksums: dict[str, str]
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Split lists ("relative/path label"): ImageNet-LT, Places-LT, iNaturalist 2018


@dataclass
class ListEntry:
    path: str
    label: int
    line: int


def read_text(path: str | os.PathLike) -> str:
    """The text of ``path``, gunzipped when it ends in ``.gz`` (the shipped lists in ``data_prep/splits``)."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def parse_split_list(list_file: Path) -> list[ListEntry]:
    """Parse "relative/path label" lines (plain or ``.gz``); a malformed line is an error naming file and line."""
    entries = []
    try:
        text = read_text(list_file)
    except OSError as exc:
        raise SourceError(f"cannot read split list {list_file}: {exc}") from exc
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise SourceError(f"{list_file}:{lineno}: expected 'relative/path label', got {raw!r}")
        entries.append(ListEntry(parts[0], int(parts[1]), lineno))
    if not entries:
        raise SourceError(f"{list_file}: no entries")
    return entries


def find_split_lists(lists_dir: Path, skip: Collection[str] = ()) -> dict[str, Path]:
    """Find ``*_train.txt``, ``*_val.txt``, ``*_test.txt`` (or ``.txt.gz``) in ``lists_dir`` (open-set lists
    are ignored).

    Splits in ``skip`` (lists the user gave explicitly) are not looked for.
    """
    found: dict[str, Path] = {}
    for split in SPLIT_NAMES:
        if split in skip:
            continue
        matches = sorted([*Path(lists_dir).glob(f"*_{split}.txt"), *Path(lists_dir).glob(f"*_{split}.txt.gz")])
        if len(matches) > 1:
            raise SourceError(f"{lists_dir}: several {split} lists {[m.name for m in matches]}; pass them explicitly")
        if matches:
            found[split] = matches[0]
    if "train" not in found and "train" not in skip:
        raise SourceError(f"{lists_dir}: no *_train.txt split list; give yours with --train FILE (the ImageNet-LT "
                          "and iNaturalist-2018 training lists are not shipped: data_prep/splits/SOURCES.md says "
                          "where to get them)")
    return found


def _check_labels(entries: list[ListEntry], list_file: Path, num_classes: int) -> None:
    for e in entries:
        if not 0 <= e.label < num_classes:
            raise SourceError(f"{list_file}:{e.line}: label {e.label} out of range 0..{num_classes - 1}")


def _dedupe(entries: list[ListEntry], list_file: Path, strict: bool) -> tuple[list[ListEntry], list]:
    first_line: dict[str, int] = {}
    kept, skipped = [], []
    for e in entries:
        if e.path in first_line:
            msg = f"{list_file}:{e.line}: duplicate of line {first_line[e.path]} ({e.path})"
            if strict:
                raise SourceError(msg)
            skipped.append((f"{list_file}:{e.line}:{e.path}", "duplicate"))
            continue
        first_line[e.path] = e.line
        kept.append(e)
    return kept, skipped


def _file_fetcher(root: Path, paths: list[str]) -> Callable[[int], bytes]:
    def fetch(p: int) -> bytes:
        try:
            with open(root / paths[p], "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise BadImage("missing", str(root / paths[p])) from exc
        except OSError as exc:
            raise BadImage("unreadable", f"{root / paths[p]}: {exc}") from exc
    return fetch


def _class_names_from_paths(entries: list[ListEntry], num_classes: int) -> list[str]:
    """A class's name is the directory between the split folder and the file ('train/<name>/x.jpg')."""
    votes: list[Counter] = [Counter() for _ in range(num_classes)]
    for e in entries:
        parts = e.path.split("/")
        votes[e.label][("/".join(parts[1:-1]) or parts[0])] += 1
    return [v.most_common(1)[0][0] if v else f"class_{i}" for i, v in enumerate(votes)]


def load_class_names(path: Path, num_classes: int) -> list[str]:
    """Class names from ``classnames.txt`` ("id name" per line, in label order) or iNat ``categories.json``
    (either may be ``.gz``)."""
    if path.name.endswith((".json", ".json.gz")):
        cats = json.loads(read_text(path))
        names = [f"class_{i}" for i in range(num_classes)]
        for c in cats:
            if 0 <= int(c["id"]) < num_classes:
                names[int(c["id"])] = c["name"]
        return names
    lines = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
    if len(lines) != num_classes:
        raise SourceError(f"{path}: {len(lines)} class names for {num_classes} classes")
    return [ln.split(maxsplit=1)[-1] for ln in lines]


def list_dataset(name: str, root: Path, lists: dict[str, Path], *, class_names_file: Path | None = None,
                 num_classes: int | None = None, strict: bool = False) -> DatasetSource:
    """A dataset described by split lists over an image root (ImageNet-LT, Places-LT, iNaturalist)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image root {root} is not a directory (set it with --root)")
    parsed = {split: parse_split_list(path) for split, path in lists.items()}
    train = parsed["train"]
    num_classes = num_classes or max(e.label for e in train) + 1
    for split, entries in parsed.items():
        _check_labels(entries, lists[split], num_classes)
    present = np.bincount([e.label for e in train], minlength=num_classes)
    empty = np.flatnonzero(present == 0)
    if len(empty):
        raise SourceError(f"{lists['train']}: class(es) {empty[:10].tolist()} have no training images "
                          f"(labels must be 0..C-1 with every class present; C={num_classes})")
    splits = {}
    for split, entries in parsed.items():
        entries, skipped = _dedupe(entries, lists[split], strict)
        paths = [e.path for e in entries]
        splits[split] = SplitSource(
            name=split, labels=np.array([e.label for e in entries], dtype=np.int64),
            keys=[f"{i:09d}" for i in range(len(entries))],
            origins=[f"{p} (line {e.line})" for p, e in zip(paths, entries)],
            fetch=_file_fetcher(root, paths), skipped=skipped)
    if class_names_file is None:
        class_names = _class_names_from_paths(train, num_classes)
    else:
        class_names = load_class_names(Path(class_names_file), num_classes)
    checksums = {f"{split}_list": sha256_file(p) for split, p in lists.items()}
    return DatasetSource(name, class_names, splits, EncodeSettings(max_side=256, quality=90), checksums,
                         extra={"root": str(root), "lists": {k: str(v) for k, v in lists.items()}})


# --------------------------------------------------------------------------------------------------
# Array datasets: CIFAR pickles and Fashion-MNIST idx, made long-tailed


def _array_fetcher(images: np.ndarray) -> Callable[[int], np.ndarray]:
    return lambda p: images[p]


def _lt_splits(train_x, train_y, test_x, test_y, ir: float, val_per_class: int, seed: int,
               class_order: Any = None) -> dict:
    """Long-tailed train split plus a balanced held-out val split and the full test split.

    ``val_per_class`` images per class are reserved from the training pool first (so val never overlaps
    train), then the LT profile of :func:`data_prep.longtail.select_lt_indices` is applied to the rest:
    n_max is therefore the class size minus ``val_per_class``. ``val_per_class=0`` gives the exact
    standard profile and no val split.
    """
    from data_prep.longtail import select_lt_indices

    rng = np.random.default_rng(seed + 1)
    num_classes = int(train_y.max()) + 1
    val_idx = []
    for c in range(num_classes):
        members = np.flatnonzero(train_y == c)
        if len(members) <= val_per_class:
            raise SourceError(f"class {c} has {len(members)} training images; cannot hold out {val_per_class}")
        val_idx.append(rng.permutation(members)[:val_per_class])
    val_idx = np.sort(np.concatenate(val_idx)) if val_per_class else np.zeros(0, np.int64)
    pool = np.setdiff1d(np.arange(len(train_y)), val_idx)
    train_idx = pool[select_lt_indices(train_y[pool], imbalance_ratio=ir, seed=seed, class_order=class_order)]
    splits = {"train": (train_idx, train_x, train_y)}
    if val_per_class:
        splits["val"] = (val_idx, train_x, train_y)
    splits["test"] = (np.arange(len(test_y)), test_x, test_y)
    out = {}
    for split, (idx, xs, ys) in splits.items():
        origin_set = "test" if split == "test" else "train"
        out[split] = SplitSource(split, ys[idx].astype(np.int64), [f"{origin_set}{i:06d}" for i in idx],
                                 [f"{origin_set}[{i}]" for i in idx], _array_fetcher(xs[idx]))
    return out


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise SourceError(f"{path}: unreadable idx file ({exc})") from exc
    magic = int.from_bytes(data[:4], "big")
    if magic not in (0x801, 0x803):
        raise SourceError(f"{path}: bad idx magic {magic:#x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated idx file ({arr.size} values for shape {dims})")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise SourceError(f"{root}: missing {stem}[.gz] (Fashion-MNIST idx files; `apt-get install "
                      f"dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)")


def fmnist_dataset(root: Path, ir: float = 100, val_per_class: int = 20, seed: int = 0,
                   class_order: int | None = None) -> DatasetSource:
    """Fashion-MNIST-LT: the real Fashion-MNIST idx files with the exponential LT profile.

    ``class_order`` (a seed): the profile's counts go to a seeded permutation of the classes instead of
    label order (the default order puts two easy classes, bag and ankle boot, in the tail); the
    permutation is recorded in the manifest (``extra.class_permutation``, head first)."""
    from data_prep.longtail import class_order_permutation

    root = Path(root)
    files = {k: _find(root, k) for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    arrays = {k: _read_idx(v) for k, v in files.items()}
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64)
    test_x, test_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise SourceError(f"{root}: image and label counts differ")
    perm = None if class_order is None else class_order_permutation(int(train_y.max()) + 1, class_order)
    splits = _lt_splits(train_x, train_y, test_x, test_y, ir, val_per_class, seed, perm)
    checksums = {p.name: sha256_file(p) for p in files.values()}
    extra = {"imbalance_ratio": ir, "val_per_class": val_per_class, "seed": seed, "root": str(root)}
    if perm is not None:
        extra.update(class_order=class_order, class_permutation=perm.tolist())
    return DatasetSource("fmnist-lt", FMNIST_CLASSES, splits,
                         EncodeSettings(max_side=None, quality=95, subsampling="444"), checksums, extra=extra)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError as exc:
        raise SourceError(f"missing CIFAR batch {path}") from exc
    except Exception as exc:  # corrupt pickles raise a zoo of exception types
        raise SourceError(f"{path}: not a readable CIFAR pickle ({exc})") from exc


def _cifar_arrays(batches: list[dict], label_key: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise SourceError(f"{path}: CIFAR batch lacks key {exc}") from exc
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def cifar_dataset(root: Path, num_classes: int, ir: float = 100, val_per_class: int = 20,
                  seed: int = 0) -> DatasetSource:
    """CIFAR-10-LT / CIFAR-100-LT from the standard python pickle batches."""
    root = Path(root)
    if num_classes == 10:
        train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = [root / "test_batch"], root / "batches.meta", b"labels", b"label_names"
    else:
        train_files, test_files = [root / "train"], [root / "test"]
        meta_file, label_key, names_key = root / "meta", b"fine_labels", b"fine_label_names"
    train_x, train_y = _cifar_arrays([_unpickle(p) for p in train_files], label_key, root)
    test_x, test_y = _cifar_arrays([_unpickle(p) for p in test_files], label_key, root)
    names = [n.decode() for n in _unpickle(meta_file)[names_key]]
    splits = _lt_splits(train_x, train_y, test_x, test_y, ir, val_per_class, seed)
    checksums = {p.name: sha256_file(p) for p in [*train_files, *test_files, meta_file]}
    return DatasetSource(f"cifar{num_classes}-lt", names, splits,
                         EncodeSettings(max_side=None, quality=95, subsampling="444"), checksums,
                         extra={"imbalance_ratio": ir, "val_per_class": val_per_class, "seed": seed,
                                "root": str(root)})


# --------------------------------------------------------------------------------------------------
# Synthetic ImageNet-LT-shaped JPEGs (loader benchmarks at real scale)


def synthetic_dataset(scale: float = 1.0, seed: int = 0, val_per_class: int = 2,
                      histogram: np.ndarray | None = None) -> DatasetSource:
    """Seeded synthetic JPEGs following a class histogram (default: the real ImageNet-LT one)."""
    from data_prep import synthetic

    counts = synthetic.scaled_counts(synthetic.default_histogram() if histogram is None else histogram, scale)
    num_classes = len(counts)
    splits = {}
    val_counts = np.full(num_classes, val_per_class, dtype=np.int64)
    for split, split_counts, split_seed in (("train", counts, seed), ("val", val_counts, seed + 7919)):
        if split_counts.sum() == 0:
            continue
        labels = synthetic.synthetic_labels(split_counts, seed=split_seed)

        def fetch(p, labels=labels, split_seed=split_seed):
            return synthetic.synthetic_jpeg(split_seed, int(p), int(labels[p]))

        splits[split] = SplitSource(split, labels, [f"{i:09d}" for i in range(len(labels))],
                                    [f"synthetic[{split_seed}:{i}]" for i in range(len(labels))], fetch)
    return DatasetSource("synthetic-lt", [f"synthetic_{i}" for i in range(num_classes)], splits,
                         EncodeSettings(max_side=256, quality=90), {"histogram": hashlib.sha256(
                             np.ascontiguousarray(counts).tobytes()).hexdigest()}, synthetic=True,
                         notes=["SYNTHETIC DATA: seeded generated JPEGs for loader benchmarks, not real images"],
                         extra={"scale": scale, "seed": seed})
