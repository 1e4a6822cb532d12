"""The offline store: per-sample teacher outputs computed once, replayed by the student without a
teacher forward pass.

A store holds **named per-sample arrays** ``[N, K, D]``: one row per training sample (index-aligned
with the dataset) and per stored view ``k < K``, ``D`` numbers each. They are float16 by default,
written as ``.npy`` files that training opens memory-mapped (or loads into RAM / onto a torch
device when they fit). Any recipe fills one with a **producer**: a function from a loader batch to a
dict of named ``[B, D]`` tensors (``produce(batch) -> {"expert0.logits": ..., ...}``). The student's
loader replays the same views (:class:`lfme_fast.augment.FixedViews` + ``Batch.views``), so the stored
numbers are what a live teacher would output for the image the student sees (up to float16 rounding).

* LFME (the thin layer at the end of this module: :func:`store_header`, :func:`write_offline`,
  :class:`LFMEStore`): ``expert<l>.logits`` (width ``|S_l|``, expert ``l``'s label space) and
  ``confidence`` (SpIS ``p_i``).
* CBD (:mod:`lfme_fast.recipes.cbd`): ``teacher<k>.features``, each teacher's L2-normalised penultimate
  features, ``[N, K, D_t]`` float16.

Layout (``RUN/offline/``)::

    header.json           the store's identity (below) and its storage figures
    views.npz             FixedViews: boxes int32 [N, K, 4] (y, x, h, w), flips bool [N, K], seed, kind
    <name>.npy            a dense array: [N, K, D] (dtype float16 unless the array says float32)
    <name>.values.npy     a top-k array: [N, K, k] the k largest values of each row, and
    <name>.indices.npy                   int16/int32 [N, K, k] their positions in 0..D-1
                          (an array declared per_view=False has K = 1: computed on the eval view)

    LFME: expert<l>.logits.npy (or expert<l>.logits.values/.indices.npy), float16 [N, K, |S_l|];
          confidence.npy, float32 [N, 1, 1]: the subset expert's softmax probability of the true
          class (its own label space), eval view.

``header.json`` records what the numbers depend on; :meth:`ArrayStore.open` refuses a store whose
recorded identity differs from the run's (``expected=``), naming the first differing field:

* ``format``: this module's store format;
* ``dataset``: manifest dataset name, split, number of samples, the split's data_prep fingerprint;
* ``views``: the view table's ``kind`` (``rrc`` boxes resized, or ``pad_crop`` windows),
  ``selection`` (``center``: view 0 is the eval view; ``random``; ``all``: every distinct pad-crop
  view), ``num_views`` K, ``seed``, ``first_is_eval``, and ``pad`` or the RandomResizedCrop ``scale``;
* ``augmentation``: the loader-resolved resolution and augmentation mode;
* ``backend``: the loader back end (ffcv / dali / torch): their JPEG decoders and resize filters
  differ, so their pixels, and the teachers' outputs on them, do too;
* ``checkpoints``: each producing checkpoint's name, path (relative to the run folder) and sha256;
* ``recipe``: the recipe's name and its own ``fields`` (a free JSON dict; LFME: its subsets,
  ``subsets[l] = {name, classes}``, column j of expert l = class ``classes[j]``);
* ``arrays``: per array: width ``D``, dtype, ``topk``, ``per_view``.

Views (:func:`build_views`): view 0 is the eval view with ``view_kind="center"`` (the centre crop for
ImageNet-style images, the whole image for small ones), so ``K = 1`` is the cheap approximation "the
student sees the eval view of every image". Random views follow the training augmentation of the
dataset: RandomResizedCrop boxes + flips for ImageNet-style images; pad-crop windows (corner in
``[-4, 4]^2``, flip) for pad-crop datasets (28/32 px), the very augmentation their experts and
baselines train with. ``num_views="all"`` (pad-crop only) stores all 162 distinct pad-crop views,
which makes distillation exact over the standard augmentation.

**Drawn fill** (``fill: drawn``; ``views.fill == "drawn"`` in the header): a student draws
only some ``(sample, view)`` pairs over its epochs (with ``views: all`` and a few epochs, under 5% of
the ``N x 162`` rows), and its plan is known before it trains (seed + epoch,
:func:`drawn_pairs`). Such a store computes only those rows, so exact pad-crop replay costs one
teacher forward per student draw instead of 162 per image. ``views.draws`` records what the plan
depends on (sampler, epochs, batch, seed, process count), ``drawn.npy`` (uint8 ``[N, K]``) which
rows were computed, and reading a row that was not is an error, never a silent zero.

Writes are atomic and resumable: everything goes to ``RUN/offline.partial/`` (arrays created with
``np.lib.format.open_memmap`` and filled in place), where ``progress.json`` records the finished
passes (one per view, plus one over the eval views when an eval-view array has no stored eval view)
and ``written.npy`` which rows each pass wrote; the folder is renamed to ``RUN/offline`` only when
every row of every pass is written. A rerun with the same header resumes after the last finished
pass. Several processes (Accelerate) each fill their own share of the rows (their loaders' shares).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lfme_fast.augment import (
    PAD_CROP_PADDING,
    FixedViews,
    all_pad_crop_views,
    center_boxes,
    make_views,
    num_pad_crop_views,
    pad_crop_views,
    sample_rrc_boxes,
)
from lfme_fast.io import atomic_write_json
from lfme_fast.losses import topk_to_dense
from lfme_fast.sampling import Sampler

__all__ = [
    "FORMAT",
    "COMPARED_FIELDS",
    "OfflineStoreError",
    "ArraySpec",
    "ArrayStore",
    "Producer",
    "make_header",
    "view_identity",
    "build_views",
    "eval_view_boxes",
    "file_sha256",
    "compare_headers",
    "store_identity",
    "write_store",
    "drawn_identity",
    "drawn_pairs",
    "sum_over_ranks",
    "IndexSampler",
    "FILLS",
    # LFME
    "ExpertSource",
    "LFMEStore",
    "OfflineStore",
    "lfme_arrays",
    "lfme_producer",
    "store_header",
    "write_offline",
]

FORMAT = "lfme_fast.offline/2"
#: Header fields that must match the run for a store to be used (top-level keys of header.json).
COMPARED_FIELDS = ("format", "dataset", "views", "augmentation", "backend", "checkpoints", "recipe", "arrays")
#: Small-image RandomResizedCrop views (augmentation mode 'none'): 0.08 of a 28 px image is ~8 px wide.
SMALL_IMAGE_SCALE = (0.35, 1.0)
DEFAULT_SCALE = (0.08, 1.0)
VIEW_SELECTIONS = ("center", "random", "all")
ARRAY_DTYPES = ("float16", "float32")
#: Files of a store folder that are not arrays.
_RESERVED = ("header.json", "views.npz", "progress.json", "written.npy", "drawn.npy")
#: The published store's record of which ``(sample, view)`` rows a ``fill: drawn`` store computed.
DRAWN_FILE = "drawn.npy"
#: The epoch-plan algorithm a drawn store was filled for (sampler sharding, view choice): a store made
#: for another is rebuilt. 2: one global order sharded in per-process batch blocks; 3: views chosen by
#: occurrence numbers counted over the global order (the same on any number of processes); 4: the plan
#: identified by its global batch (no process count, no accumulation: the rows are the same for any).
PLAN_VERSION = 4
#: How a store is filled: every ``(sample, view)`` row, or only those the student will draw.
FILLS = ("all", "drawn")

#: ``produce(batch) -> {array name: tensor [B, D] (or [B] when D = 1)}``, row b = sample
#: ``batch.indices[b]`` in the view the loader showed. Runs under ``torch.no_grad`` and the
#: accelerator's autocast; may return arrays the current pass does not need (they are ignored).
Producer = Callable[[Any], Mapping[str, torch.Tensor]]


class OfflineStoreError(ValueError):
    """A store that is missing, incomplete or does not match the run; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    """One named per-sample array of a store.

    ``name``: the file stem (``expert0.logits`` -> ``expert0.logits.npy``). ``width``: D, the numbers
    per (sample, view). ``dtype``: float16 (default) or float32. ``topk``: keep only the ``topk``
    largest values of each row and their positions (used when ``topk < width``; else dense).
    ``per_view``: one row per stored view (``[N, K, D]``); False: one row per sample, computed on the
    eval view (``[N, 1, D]``), e.g. LFME's SpIS confidences.
    """

    name: str
    width: int
    dtype: str = "float16"
    topk: int | None = None
    per_view: bool = True

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"array name must be a plain file stem, got {self.name!r}")
        if int(self.width) < 1:
            raise ValueError(f"array {self.name!r}: width must be >= 1, got {self.width}")
        if self.dtype not in ARRAY_DTYPES:
            raise ValueError(f"array {self.name!r}: dtype must be one of {ARRAY_DTYPES}, got {self.dtype!r}")
        if self.topk is not None and int(self.topk) < 1:
            raise ValueError(f"array {self.name!r}: topk must be >= 1 or None, got {self.topk}")

    @property
    def topk_active(self) -> bool:
        """True when the array is stored as top-k pairs (``topk < width``)."""
        return self.topk is not None and self.topk < self.width

    @property
    def index_dtype(self) -> np.dtype:
        """Dtype of the top-k positions: int16 while they fit, else int32."""
        return np.dtype(np.int16) if self.width <= np.iinfo(np.int16).max else np.dtype(np.int32)

    @property
    def files(self) -> list[str]:
        """File names: ``[<name>.npy]`` dense, ``[<name>.values.npy, <name>.indices.npy]`` top-k."""
        if self.topk_active:
            return [f"{self.name}.values.npy", f"{self.name}.indices.npy"]
        return [f"{self.name}.npy"]

    def file_dtypes(self) -> list[np.dtype]:
        return [np.dtype(self.dtype), self.index_dtype] if self.topk_active else [np.dtype(self.dtype)]

    def stored_views(self, num_views: int) -> int:
        return int(num_views) if self.per_view else 1

    def shape(self, num_samples: int, num_views: int) -> tuple[int, int, int]:
        """Shape of each file: ``[N, K (or 1), D (or topk)]``."""
        return (int(num_samples), self.stored_views(num_views), int(self.topk if self.topk_active else self.width))

    def bytes_per_image(self, num_views: int) -> int:
        """Stored bytes per sample, all files of the array."""
        _, k, d = self.shape(1, num_views)
        return sum(k * d * dt.itemsize for dt in self.file_dtypes())

    def to_json(self) -> dict[str, Any]:
        return {"width": int(self.width), "dtype": self.dtype, "topk": None if self.topk is None else int(self.topk),
                "per_view": bool(self.per_view)}

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> "ArraySpec":
        return cls(name, int(d["width"]), d["dtype"], d.get("topk"), bool(d.get("per_view", True)))


# ---------------------------------------------------------------------------------------------------
# views and header
# ---------------------------------------------------------------------------------------------------


def _view_table_kind(mode: str) -> str:
    """The kind of stored views for a resolved augmentation mode: pad-crop datasets store pad-crop
    windows (what their experts train on); every other mode RandomResizedCrop boxes."""
    return "pad_crop" if mode == "pad_crop" else "rrc"


def view_identity(mode: str, num_views: int | str, seed: int, kind: str = "center") -> dict[str, Any]:
    """The header's ``views`` section for :func:`build_views` with the same arguments (without
    building the table: a run compares it before deciding whether to build anything)."""
    table = _view_table_kind(mode)
    if num_views == "all":
        if table != "pad_crop":
            raise ValueError(f"views 'all' stores every pad-crop view; the augmentation mode is {mode!r}, "
                             "not 'pad_crop' (use a number of views)")
        return {"kind": "pad_crop", "selection": "all", "num_views": num_pad_crop_views(PAD_CROP_PADDING),
                "seed": int(seed), "first_is_eval": True, "pad": PAD_CROP_PADDING}
    if isinstance(num_views, bool) or not isinstance(num_views, (int, np.integer)) or num_views < 1:
        raise ValueError(f"num_views must be an integer >= 1 or 'all', got {num_views!r}")
    if kind not in ("center", "random"):
        raise ValueError(f"view kind must be 'center' or 'random', got {kind!r}")
    ident: dict[str, Any] = {"kind": table, "selection": kind, "num_views": int(num_views), "seed": int(seed),
                             "first_is_eval": kind == "center"}
    if table == "pad_crop":
        ident["pad"] = PAD_CROP_PADDING
    else:
        ident["scale"] = list(DEFAULT_SCALE if mode == "imagenet" else SMALL_IMAGE_SCALE)
    return ident


def build_views(heights: Any, widths: Any, num_views: int | str, seed: int, kind: str = "center",
                mode: str = "imagenet") -> FixedViews:
    """``K`` replayable views per sample (see the module docstring); :func:`view_identity` describes it.

    Args:
        heights, widths: stored image sizes (``augment.image_sizes``).
        num_views: ``K >= 1``, or ``"all"`` (pad-crop mode only: all 162 pad-crop views, view 0 the
            identity window).
        seed: view seed (the random views and the per-epoch choice of view).
        kind: ``"center"`` (view 0 = eval view) or ``"random"`` (all random). Ignored for ``"all"``.
        mode: the resolved augmentation mode. ``imagenet``: RandomResizedCrop(0.08-1) boxes, eval view
            = centre crop. ``pad_crop``: distinct pad-crop windows (corner in [-4, 4]^2, flip), eval
            view = the identity window. ``none``: RandomResizedCrop(0.35-1) boxes, eval view = the
            whole image.
    """
    ident = view_identity(mode, num_views, seed, kind)  # validates the arguments
    if ident["selection"] == "all":
        return all_pad_crop_views(heights, widths, seed)
    k, center = ident["num_views"], ident["selection"] == "center"
    if ident["kind"] == "pad_crop":
        return pad_crop_views(heights, widths, k, seed, include_center=center)
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    if mode == "imagenet":
        return make_views(h, w, k, seed, include_center=center, scale=DEFAULT_SCALE)
    boxes, flips = sample_rrc_boxes(h, w, k, seed, scale=SMALL_IMAGE_SCALE, _first=1 if center else 0)
    if center:  # the eval view of a small image in mode 'none' is the whole image
        boxes[:, 0] = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], axis=1)
        flips[:, 0] = False
    return FixedViews(boxes, flips, seed)


def eval_view_boxes(heights: Any, widths: Any, mode: str) -> FixedViews:
    """A one-view table holding each sample's eval view: the centre crop (``imagenet``), the identity
    pad-crop window (``pad_crop``: replayed with the pad-crop op, exactly the stored pixels) or the
    whole image (``none``)."""
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    if mode == "imagenet":
        boxes = center_boxes(h, w)
    else:
        boxes = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], axis=1).astype(np.int32)
    return FixedViews(boxes[:, None, :], np.zeros((h.size, 1), dtype=np.bool_), 0, _view_table_kind(mode))


def drawn_identity(fill: str, *, sampler: str, epochs: int, global_batch: int, seed: int,
                   **settings: Any) -> dict[str, Any]:
    """The ``views`` header entries of a store filled ``fill`` (``"all"``: none, so such headers are
    unchanged; ``"drawn"``: ``fill`` and ``draws``, what the student's plan depends on: its sampler and
    its settings, epochs, global batch and seed). Not the process count nor the accumulation: the
    processes together read whole global batches of one global order with augmentation drawn over it,
    so the rows the student reads are the same however the global batch is split."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if fill == "all":
        return {}
    draws = {"plan": PLAN_VERSION, "sampler": sampler, "epochs": int(epochs), "global_batch": int(global_batch),
             "seed": int(seed), **{k: settings[k] for k in sorted(settings)}}
    return {"fill": "drawn", "draws": draws}


def drawn_pairs(options: Any, epochs: int, *, grad_accum: int = 1, max_steps: int | None = None) -> np.ndarray:
    """bool ``[N, K]``: the ``(sample, stored view)`` rows that a training loader built from
    ``options`` (:class:`lfme_fast.loaders.LoaderOptions` with ``views=`` the store's table, and the
    student's sampler) shows over its ``epochs`` epochs, on this process, when the trainer reads
    :func:`lfme_fast.trainer.epoch_batches` of its batches per epoch (``grad_accum``, ``max_steps`` =
    ``train.max_steps_per_epoch``). No pixel work: the epoch plans only (seed + epoch), so this is
    what the student will read, row for row."""
    from lfme_fast.loaders.base import num_batches, plan_epoch, resolve_spec
    from lfme_fast.trainer import epoch_batches

    spec = resolve_spec(options)
    if spec.views is None or not spec.train or spec.views_per_sample != 1:
        raise ValueError("drawn_pairs needs a one-view training loader's options with views= (the store's table)")
    mask = np.zeros((spec.num_samples, spec.views.num_views), dtype=bool)
    stop = epoch_batches(num_batches(spec), grad_accum, max_steps, spec.drop_last) * spec.batch_size
    for epoch in range(int(epochs)):
        plan = plan_epoch(spec, epoch)
        mask[plan.indices[:stop], plan.views[:stop]] = True
    return mask


class IndexSampler(Sampler):
    """Exactly the given sample indices, every epoch (this process's rows of one drawn offline pass;
    not sharded again)."""

    def __init__(self, indices: Any):
        self._indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)

    def indices(self, epoch: int) -> np.ndarray:
        return self._indices

    def __len__(self) -> int:
        return int(self._indices.size)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _relative(path: Path, run_dir: Path) -> str:
    # abspath, not resolve(): a run folder whose experts/ is a symlink to a shared expert run (the
    # ablations) still records "experts/<subset>/model.pt"; the sha256 pins the content anyway.
    here, base = os.path.abspath(path), os.path.abspath(run_dir)
    return Path(os.path.relpath(here, base)).as_posix() if here.startswith(base + os.sep) else here


def _check_backend(backend: Any) -> str:
    from lfme_fast.loaders import BACKENDS

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be a registered loader back end ({', '.join(BACKENDS)}), got {backend!r}")
    return backend


def make_header(*, run_dir: str | os.PathLike, manifest: Mapping[str, Any], split: str, views: Mapping[str, Any],
                augmentation: Mapping[str, Any], backend: str,
                checkpoints: Sequence[tuple[str, str | os.PathLike]], recipe: str,
                fields: Mapping[str, Any] | None, arrays: Sequence[ArraySpec]) -> dict[str, Any]:
    """The identity of a store: the fields :meth:`ArrayStore.open` compares (``COMPARED_FIELDS``).

    Args:
        run_dir: the run folder (checkpoint paths are recorded relative to it).
        manifest: the prepared dataset's manifest (``shards.load_manifest``).
        split: the split the store covers (its samples are the rows).
        views: :func:`view_identity` of the view table.
        augmentation: the loader-resolved geometry, e.g. ``{"resolution": 28, "mode": "pad_crop"}``.
        backend: the loader back end that makes the pixels (``ffcv`` / ``dali`` / ``torch``).
        checkpoints: ``(name, path)`` of every producing model file (hashed with sha256).
        recipe: the recipe's name; ``fields``: its own identity fields (JSON-able).
        arrays: the arrays the producer fills.
    """
    split_info = manifest.get("splits", {}).get(split)
    if split_info is None:
        raise OfflineStoreError(f"the dataset manifest has no split {split!r}")
    names = [a.name for a in arrays]
    if len(set(names)) != len(names):
        raise ValueError(f"array names must be unique, got {names}")
    files = [f for a in arrays for f in a.files]
    clash = sorted({f for f in files if files.count(f) > 1 or f in _RESERVED})
    if clash:
        raise ValueError(f"array file names clash with each other or with the store's own files: {clash}")
    run_dir = Path(run_dir)
    header = {
        "format": FORMAT,
        "dataset": {"name": manifest.get("dataset"), "split": split, "num_samples": int(split_info["num_samples"]),
                    "fingerprint": split_info.get("fingerprint")},
        "views": dict(views),
        "augmentation": dict(augmentation),
        "backend": _check_backend(backend),
        "checkpoints": [{"name": str(name), "path": _relative(Path(p), run_dir), "sha256": file_sha256(p)}
                        for name, p in checkpoints],
        "recipe": {"name": str(recipe), "fields": dict(fields or {})},
        "arrays": {a.name: a.to_json() for a in arrays},
    }
    # one JSON round trip: tuples become lists, numpy scalars fail here, so a header compares equal
    # to the same header read back from header.json
    return json.loads(json.dumps(header))


def _first_difference(have: Any, want: Any, prefix: str) -> tuple[str, Any, Any] | None:
    """``(dotted path, store value, run value)`` of the first differing leaf, or None."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            d = _first_difference(have.get(k, "<missing>"), want.get(k, "<missing>"), f"{prefix}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(have, list) and isinstance(want, list):
        if len(have) != len(want):
            return f"{prefix} (length {len(have)} != {len(want)})", have, want
        for i, (a, b) in enumerate(zip(have, want)):
            d = _first_difference(a, b, f"{prefix}[{i}]")
            if d is not None:
                return d
        return None
    return None if have == want else (prefix, have, want)


def compare_headers(have: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`OfflineStoreError` naming the first compared field where ``have`` != ``expected``."""
    for field in COMPARED_FIELDS:
        diff = _first_difference(have.get(field, "<missing>"), expected.get(field, "<missing>"), field)
        if diff is not None:
            where, a, b = diff
            raise OfflineStoreError(
                f"offline store does not match this run: field {where!r} differs (store: "
                f"{json.dumps(a, default=str)[:200]}, run: {json.dumps(b, default=str)[:200]}); "
                "rebuild it (the recipe's 'offline' stage does so when its inputs change)")


def store_identity(header: Mapping[str, Any]) -> dict[str, Any]:
    """The compared fields of a header (``COMPARED_FIELDS``): what a stage that consumes the store
    should put in its own fingerprint (storage figures and timestamps left out)."""
    return {k: header.get(k) for k in COMPARED_FIELDS}


def _specs(header: Mapping[str, Any]) -> dict[str, ArraySpec]:
    return {name: ArraySpec.from_json(name, d) for name, d in header["arrays"].items()}


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


def _store_dir(path: str | os.PathLike, name: str) -> Path:
    path = Path(path)
    return path if (path / "header.json").exists() else path / name


class ArrayStore:
    """A finished store, read-only: named arrays by ``(sample index, view)``.

    Open with :meth:`open`. ``load``: ``"mmap"`` (default; pages come from the OS cache on demand),
    ``"ram"`` (read everything into memory), or a torch device (``"cuda"``, ``"cpu"``...) to hold the
    arrays as tensors there, so gathers are device-side and never synchronise.
    """

    def __init__(self, directory: Path, header: dict[str, Any], arrays: dict[str, tuple[Any, ...]],
                 views: FixedViews, device: torch.device | None, drawn: Any = None):
        self.directory = directory
        self.header = header
        self.specs = _specs(header)
        self._arrays = arrays  # name -> (dense,) or (values, indices); numpy or torch
        self.views = views
        self.device = device
        #: bool ``[N, K]`` of the computed rows of a ``fill: drawn`` store (numpy or torch), else None
        self.drawn = drawn

    @classmethod
    def open(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None, *, load: str = "mmap",
             name: str = "offline") -> "ArrayStore":
        """Open ``RUN/<name>`` (or a store folder given directly).

        Raises:
            OfflineStoreError: no finished store there, a file is missing or has the wrong shape or
                dtype, or ``expected`` (a :func:`make_header`) differs in a compared field (named).
        """
        directory = _store_dir(path, name)
        hpath = directory / "header.json"
        if not hpath.exists():
            raise OfflineStoreError(f"no offline store at {directory} (header.json missing): run the 'offline' stage")
        header = json.loads(hpath.read_text())
        if header.get("format") != FORMAT:
            raise OfflineStoreError(f"offline store {directory}: field 'format' is {header.get('format')!r}, this "
                                    f"code reads {FORMAT!r}; rebuild it")
        if expected is not None:
            compare_headers(header, expected)
        n, k_views = int(header["dataset"]["num_samples"]), int(header["views"]["num_views"])
        arrays = {}
        for spec in _specs(header).values():
            group = []
            for fname, dtype in zip(spec.files, spec.file_dtypes()):
                fpath = directory / fname
                if not fpath.exists():
                    raise OfflineStoreError(f"offline store {directory} is incomplete: {fname} is missing")
                arr = np.load(fpath, mmap_mode="r")
                if arr.shape != spec.shape(n, k_views) or arr.dtype != dtype:
                    raise OfflineStoreError(f"{fpath}: {arr.dtype} {arr.shape}, header says {dtype} "
                                            f"{spec.shape(n, k_views)}")
                group.append(arr)
            arrays[spec.name] = tuple(group)
        views = FixedViews.load(directory / "views.npz")
        if views.boxes.shape[:2] != (n, k_views) or views.kind != header["views"]["kind"]:
            raise OfflineStoreError(f"{directory / 'views.npz'}: {views.boxes.shape[:2]} {views.kind} views, header "
                                    f"says {(n, k_views)} {header['views']['kind']}")
        drawn = None
        if header["views"].get("fill", "all") == "drawn":
            dpath = directory / DRAWN_FILE
            if not dpath.exists():
                raise OfflineStoreError(f"offline store {directory} is incomplete: {DRAWN_FILE} is missing")
            drawn = np.load(dpath).astype(bool)
            if drawn.shape != (n, k_views):
                raise OfflineStoreError(f"{dpath}: shape {drawn.shape}, header says {(n, k_views)}")
        device = None
        if load == "ram":
            arrays = {k: tuple(np.array(a) for a in g) for k, g in arrays.items()}  # a memmap view would stay lazy
        elif load != "mmap":
            device = torch.device(load)
            arrays = {k: tuple(torch.from_numpy(np.array(a)).to(device) for a in g) for k, g in arrays.items()}
            drawn = None if drawn is None else torch.from_numpy(drawn).to(device)
        return cls(directory, header, arrays, views, device, drawn)

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The arrays' names, in header order."""
        return list(self.specs)

    @property
    def num_samples(self) -> int:
        return int(self.header["dataset"]["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.header["views"]["num_views"])

    @property
    def data_bytes_per_image(self) -> float:
        """Stored array bytes per training image (every array, every view)."""
        return float(self.header["storage"]["data_bytes_per_image"])

    def spec(self, name: str) -> ArraySpec:
        """The :class:`ArraySpec` of array ``name``."""
        try:
            return self.specs[name]
        except KeyError:
            raise OfflineStoreError(f"offline store {self.directory} has no array {name!r} "
                                    f"(it has {', '.join(self.specs)})") from None

    def raw(self, name: str) -> tuple[Any, ...]:
        """The stored form of array ``name``: ``(dense,)`` or ``(values, indices)`` (numpy or torch)."""
        self.spec(name)
        return self._arrays[name]

    # ---- reading -------------------------------------------------------------------------------
    def rows(self, indices: Any, views: Any = None) -> tuple[Any, Any]:
        """``(sample, view)`` index arrays in the arrays' own form, converted once per batch: int64
        tensors on the arrays' device, or int64 numpy arrays (memory-mapped or RAM store). ``views``
        None means view 0."""
        if self.device is not None:
            idx = torch.as_tensor(indices, device=self.device).long()
            v = torch.zeros_like(idx) if views is None else torch.as_tensor(views, device=self.device).long()
        else:
            idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
            idx = idx.astype(np.int64, copy=False)
            if views is None:
                v = np.zeros_like(idx)
            else:
                v = views.cpu().numpy() if isinstance(views, torch.Tensor) else np.asarray(views)
                v = v.astype(np.int64, copy=False)
        if self.drawn is not None:
            self._check_drawn(idx, v)
        return idx, v

    def _check_drawn(self, idx: Any, v: Any) -> None:
        """Refuse rows a ``fill: drawn`` store did not compute (they hold zeros, not teacher outputs).
        On a device store this costs one synchronising ``all()`` per batch."""
        ok = self.drawn[idx, v]
        if bool(ok.all()):
            return
        bad = int(np.flatnonzero(~np.asarray(ok.cpu() if isinstance(ok, torch.Tensor) else ok))[0])
        raise OfflineStoreError(
            f"offline store {self.directory} was filled only for the student plan in its header "
            f"(views.draws: {self.header['views'].get('draws')}); sample {int(idx[bad])} view {int(v[bad])} was not "
            "drawn by that plan. Rebuild the store for this run (delete it or run its 'offline' stage).")

    @staticmethod
    def _take(arr: Any, idx: Any, v: Any) -> torch.Tensor:
        if isinstance(arr, torch.Tensor):
            return arr[idx, v]
        return torch.from_numpy(np.asarray(arr[idx, v]))

    def gather(self, name: str, indices: Any = None, views: Any = None, device: Any = None, *,
               rows: tuple[Any, Any] | None = None) -> torch.Tensor:
        """Array ``name``'s rows ``(B, D)`` for samples ``indices`` in views ``views`` (None: view 0).

        Dense arrays come back in their stored dtype (float16 by default); top-k arrays as a float32
        row rebuilt with :func:`lfme_fast.losses.topk_to_dense` (missing entries far below the kept
        ones). ``rows``: a :meth:`rows` result, to convert a batch's indices once for several arrays.
        Arrays stored per sample (``per_view=False``) ignore ``views``.
        """
        spec = self.spec(name)
        idx, v = rows if rows is not None else self.rows(indices, views)
        if not spec.per_view:
            v = v * 0
        out = [self._take(a, idx, v) for a in self._arrays[name]]
        if device is not None:
            out = [t.to(device, non_blocking=True) for t in out]
        if len(out) == 1:
            return out[0]
        values, pos = out
        return topk_to_dense(values, pos.long(), spec.width)

    def per_sample(self, name: str) -> np.ndarray:
        """A ``per_view=False`` dense array as numpy ``[N, D]`` (a copy)."""
        spec = self.spec(name)
        if spec.per_view or spec.topk_active:
            raise OfflineStoreError(f"array {name!r} is not a dense per-sample array")
        arr = self._arrays[name][0]
        arr = arr.cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        return np.array(arr[:, 0, :])


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def sum_over_ranks(value: int, accelerator: Any) -> int:
    """``value`` summed over all processes (a collective; just ``value`` without an accelerator)."""
    if accelerator is None or accelerator.num_processes == 1:
        return int(value)
    t = torch.tensor([int(value)], device=accelerator.device)
    return int(accelerator.reduce(t, reduction="sum").item())


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def _needs_eval_pass(header: Mapping[str, Any]) -> bool:
    """An array computed on the eval view, and no stored view is the eval view: one extra pass."""
    return (not header["views"]["first_is_eval"]) and any(not s.per_view for s in _specs(header).values())


def _check_views(header: Mapping[str, Any], views: FixedViews) -> None:
    hv = header["views"]
    n = int(header["dataset"]["num_samples"])
    for field, have, want in (("dataset.num_samples", views.num_samples, n),
                              ("views.num_views", views.num_views, hv["num_views"]),
                              ("views.kind", views.kind, hv["kind"]),
                              ("views.seed", views.seed, hv["seed"])):
        if have != want:
            raise ValueError(f"the view table does not match the header: field {field!r} (table: {have!r}, "
                             f"header: {want!r})")


def _create_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """A zero-filled ``.npy`` (sparse on disk until written), unless one is already there (a resume)."""
    if not path.exists():
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        del arr  # closes the map: every rank reopens the file r+ and fills its rows in place


class _Partial:
    """``RUN/<name>.partial``: the arrays being filled, ``written.npy`` (uint8 ``[N, K + 1]``: which
    rows each pass wrote; column K is the eval pass) and ``progress.json`` (the header and the
    finished passes)."""

    def __init__(self, path: Path, header: Mapping[str, Any]):
        self.path = path
        self.header = header
        self.specs = _specs(header)
        self.n = int(header["dataset"]["num_samples"])
        self.k = int(header["views"]["num_views"])

    # ---- main process ------------------------------------------------------------------------
    def prepare(self, views: FixedViews, log: Callable[[str], None]) -> None:
        """Create (or keep, for a resume with the same header) the folder with its empty arrays,
        the views and ``progress.json``."""
        ppath = self.path / "progress.json"
        progress = {"header": self.header, "done_views": [], "eval_done": False}
        if ppath.exists():
            try:
                prev = json.loads(ppath.read_text())
                compare_headers(prev["header"], self.header)
                progress.update(done_views=list(prev["done_views"]), eval_done=bool(prev["eval_done"]))
                log(f"[offline] resuming {self.path}: views {progress['done_views']} already written")
            except (OfflineStoreError, KeyError, ValueError):
                shutil.rmtree(self.path)  # an interrupted pass for other inputs: start over
        elif self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        views.save(self.path / "views.npz")
        for spec in self.specs.values():
            for fname, dtype in zip(spec.files, spec.file_dtypes()):
                _create_npy(self.path / fname, dtype, spec.shape(self.n, self.k))
        _create_npy(self.path / "written.npy", np.dtype(np.uint8), (self.n, self.k + 1))
        atomic_write_json(ppath, progress)

    def progress(self) -> dict[str, Any]:
        return json.loads((self.path / "progress.json").read_text())

    def mark_done(self, views: Sequence[int] | None) -> None:
        """Record finished passes (the views now written; None: the eval pass)."""
        p = self.progress()
        if views is None:
            p["eval_done"] = True
        else:
            p["done_views"] = sorted(set(p["done_views"]) | {int(v) for v in views})
        atomic_write_json(self.path / "progress.json", p)

    # ---- every process ----------------------------------------------------------------------
    def open_arrays(self) -> dict[str, tuple[np.ndarray, ...]]:
        return {s.name: tuple(np.load(self.path / f, mmap_mode="r+") for f in s.files) for s in self.specs.values()}

    def open_written(self) -> np.ndarray:
        return np.load(self.path / "written.npy", mmap_mode="r+")

    # ---- publishing (main process) ----------------------------------------------------------
    @property
    def drawn_fill(self) -> bool:
        return self.header["views"].get("fill", "all") == "drawn"

    def check_complete(self) -> None:
        """Raise if a pass left a row unwritten (a loader that did not cover every sample). A drawn
        store's view columns are checked by each process against its own plan (:func:`write_store`)."""
        written = np.load(self.path / "written.npy", mmap_mode="r")
        cols = [] if self.drawn_fill else list(range(self.k))
        if self.drawn_fill and self.header["views"]["first_is_eval"] and any(not s.per_view for s in self.specs.values()):
            cols.append(0)  # view 0 carries the per-sample (eval-view) arrays: every sample, drawn or not
        cols += [self.k] if _needs_eval_pass(self.header) else []
        for c in cols:
            missing = np.flatnonzero(written[:, c] == 0)
            if missing.size:
                what = "the eval pass" if c == self.k else f"view {c}"
                raise RuntimeError(f"offline pass left {missing.size} sample(s) without {what}, first sample "
                                   f"{int(missing[0])}: the loaders of all ranks together must cover every sample")

    def publish(self, final: Path, seconds: float, storage_extra: Mapping[str, Any] | None) -> dict[str, Any]:
        """Write the final header (with storage figures) and rename the folder onto ``final``
        (replacing an older store or a link to one). Returns the header written."""
        self.check_complete()
        extra = dict(storage_extra or {})
        if self.drawn_fill:
            drawn = np.load(self.path / "written.npy", mmap_mode="r")[:, :self.k].astype(np.uint8)
            np.save(self.path / DRAWN_FILE, drawn)  # inside the .partial folder: published by the rename
            extra.update(drawn_rows=int(drawn.sum()), drawn_fraction=round(float(drawn.mean()), 6))
        (self.path / "written.npy").unlink()
        (self.path / "progress.json").unlink()
        per_array = {s.name: s.bytes_per_image(self.k) for s in self.specs.values()}
        data = sum(per_array.values())
        total = sum(p.stat().st_size for p in self.path.iterdir())
        full = dict(self.header)
        full["storage"] = {"files": sorted([p.name for p in self.path.iterdir()] + ["header.json"]),
                           "array_bytes_per_image": per_array, "data_bytes_per_image": data,
                           "total_bytes_per_image": total / max(self.n, 1), "total_bytes": total, **extra}
        full["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        full["pass_seconds"] = round(seconds, 3)
        atomic_write_json(self.path / "header.json", full)
        if final.is_symlink():
            final.unlink()
        elif final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(self.path, final)
            shutil.rmtree(old, ignore_errors=True)
        if not final.exists():
            os.replace(self.path, final)
        return full


def _as_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _write_rows(spec: ArraySpec, group: tuple[np.ndarray, ...], idx: np.ndarray, col: Any, value: Any) -> None:
    """Rows ``idx`` of array ``spec`` in view column ``col`` (one column, or one per row), from the
    producer's ``value``."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.ndim == 1 and spec.width == 1:
        t = t[:, None]
    if tuple(t.shape) != (idx.size, spec.width):
        raise ValueError(f"producer returned array {spec.name!r} of shape {tuple(t.shape)}, expected "
                         f"{(idx.size, spec.width)} (batch size, width)")
    t = t.float()
    if spec.topk_active:
        vals, pos = t.topk(spec.topk, dim=1)
        group[0][idx, col] = vals.cpu().numpy().astype(spec.dtype)
        group[1][idx, col] = pos.cpu().numpy().astype(spec.index_dtype)
    else:
        group[0][idx, col] = t.cpu().numpy().astype(spec.dtype)


@torch.no_grad()
def _run_pass(loader: Any, producer: Producer, targets: Mapping[str, int | None], specs: Mapping[str, ArraySpec],
              arrays: Mapping[str, tuple[np.ndarray, ...]], written: np.ndarray, written_col: int | None,
              accelerator: Any, progress: Callable[[int], None]) -> None:
    """Run ``producer`` on every batch of ``loader``; write array ``name`` at view column
    ``targets[name]`` for the batch's rows, and mark them in ``written[:, written_col]``. A column of
    None means each row's own view (``batch.views``: a drawn pass over (sample, view) pairs)."""
    for batch in loader:
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with autocast:
            out = producer(batch)
        unknown = sorted(set(out) - set(specs))
        if unknown:
            raise ValueError(f"producer returned array(s) {unknown} that the header does not declare "
                             f"({', '.join(specs)})")
        idx = _as_numpy(batch.indices).astype(np.int64, copy=False)
        views = getattr(batch, "views", None)  # only a drawn pass needs them (a column of None)
        own = None if views is None else _as_numpy(views).astype(np.int64, copy=False)
        for name, col in targets.items():
            if name not in out:
                raise ValueError(f"producer returned no array {name!r} (it returned {sorted(out)})")
            _write_rows(specs[name], arrays[name], idx, own if col is None else col, out[name])
        written[idx, own if written_col is None else written_col] = 1
        progress(len(idx))


def write_store(run_dir: str | os.PathLike, header: Mapping[str, Any], views: FixedViews, producer: Producer,
                make_loader: Callable[..., Any], *, eval_views: FixedViews | None = None,
                accelerator: Any = None, name: str = "offline", log: Callable[[str], None] = print,
                show_progress: bool = True, storage_extra: Mapping[str, Any] | None = None,
                store_class: type[ArrayStore] = ArrayStore, drawn: np.ndarray | None = None) -> ArrayStore:
    """Fill a store with ``producer`` and publish ``RUN/<name>`` atomically; returns it opened.

    One pass per stored view ``k``: ``make_loader(views, k)`` shows view ``k`` of every sample (this
    process's share of the rows; e.g. ``build_loader(LoaderOptions(..., train=False, views=views,
    fixed_view=k))``), ``producer`` maps each batch to its arrays, and every ``per_view`` array gets
    its column ``k``. Arrays computed on the eval view (``per_view=False``) are written in the pass of
    view 0 when it is the eval view (``header["views"]["first_is_eval"]``), else in one extra pass
    over ``eval_views`` (:func:`eval_view_boxes`).

    Args:
        run_dir: the run folder.
        header: :func:`make_header` of this run (written to header.json with storage figures added).
        views: the ``K`` views to store (:func:`build_views`); must match ``header["views"]``.
        producer: see :data:`Producer`; the models in it in eval mode, on the loader's device.
        make_loader: ``make_loader(views_table, k)`` -> an iterable of batches with ``indices``.
        eval_views: the one-view eval table, needed only for the extra eval pass.
        accelerator: optional; every process fills its share, the main one publishes.
        name: the store folder's name in ``run_dir``.
        storage_extra: figures added to ``header.json``'s ``storage`` (e.g. LFME's logit bytes).
        store_class: the class that opens the result (a recipe's layer over :class:`ArrayStore`).
        drawn: for a ``fill: drawn`` header, bool ``[N, K]``: the rows *this process's* student will
            read (:func:`drawn_pairs`). One pass then shows exactly those (sample, view) pairs,
            through ``make_loader(views, pair_views, rows)`` (``rows``: int64 sample indices, this
            process's own, not to be sharded again; ``pair_views``: each row's view, a per-position
            ``fixed_view``). View 0 gets a full pass first when it also fills eval-view arrays.
    """
    run_dir = Path(run_dir)
    _check_views(header, views)
    drawn_fill = header["views"].get("fill", "all") == "drawn"
    if drawn_fill != (drawn is not None):
        raise ValueError("a store with views.fill 'drawn' needs drawn= (and only such a store takes it)")
    if drawn is not None and drawn.shape != (views.num_samples, views.num_views):
        raise ValueError(f"drawn has shape {drawn.shape}, expected {(views.num_samples, views.num_views)} "
                         "(samples, views)")
    needs_eval = _needs_eval_pass(header)
    if needs_eval and eval_views is None:
        raise ValueError("a store whose view 0 is not the eval view needs eval_views= for its per-sample arrays "
                         f"({', '.join(s.name for s in _specs(header).values() if not s.per_view)})")
    partial = _Partial(run_dir / f"{name}.partial", header)
    t0 = time.perf_counter()
    if _is_main(accelerator):
        partial.prepare(views, log)
    _barrier(accelerator)
    progress = partial.progress()
    arrays, written = partial.open_arrays(), partial.open_written()
    specs = partial.specs
    per_view = [s.name for s in specs.values() if s.per_view]
    per_sample = [s.name for s in specs.values() if not s.per_view]
    todo = [k for k in range(partial.k) if k not in progress["done_views"]]
    eval_todo = needs_eval and not progress["eval_done"]

    # Drawn fill: view 0 first over every sample when it also carries the eval-view arrays, then one
    # pass over all of this process's remaining drawn (sample, view) pairs (a loader per view would
    # cost more to build than its few rows to compute).
    full_first = drawn is not None and 0 in todo and header["views"]["first_is_eval"] and bool(per_sample)
    pair_views = [k for k in todo if not (full_first and k == 0)] if drawn is not None else []
    if drawn is not None:
        pair_idx, col = np.nonzero(drawn[:, pair_views]) if pair_views else (np.zeros(0, np.int64),) * 2
        pair_view = np.asarray(pair_views, dtype=np.int64)[col] if pair_views else col
        total = pair_idx.size + int(full_first) * partial.n
    else:
        total = len(todo) * partial.n
    total += int(eval_todo) * partial.n
    pbar = _Progress(total, "offline", show_progress and _is_main(accelerator))

    def finish(done: Sequence[int] | None, what: str) -> None:
        for g in arrays.values():
            for a in g:
                a.flush()
        written.flush()
        _barrier(accelerator)
        if _is_main(accelerator):
            partial.mark_done(done)
        log(f"[offline] {what} written ({time.perf_counter() - t0:.1f} s)")

    for k in (todo if drawn is None else [0] if full_first else []):
        targets = {a: k for a in per_view}
        if k == 0 and header["views"]["first_is_eval"]:
            targets.update({a: 0 for a in per_sample})
        _run_pass(make_loader(views, k), producer, targets, specs, arrays, written, k, accelerator, pbar)
        finish([k], f"view {k + 1}/{partial.k}")
    if pair_views:
        if pair_idx.size:
            _run_pass(make_loader(views, pair_view, pair_idx.astype(np.int64)), producer, {a: None for a in per_view},
                      specs, arrays, written, None, accelerator, pbar)
        finish(pair_views, f"{pair_idx.size} drawn (image, view) rows of {len(pair_views)} views")
    if eval_todo:
        _run_pass(make_loader(eval_views, 0), producer, {a: 0 for a in per_sample}, specs, arrays, written,
                  partial.k, accelerator, pbar)
        finish(None, "eval view")
    pbar.close()
    if drawn is not None:
        # every process checks its own plan's rows (the main one cannot see the others'), and all
        # agree before the main one publishes: a store missing any rank's rows is never published
        missing = np.argwhere(drawn & (np.asarray(written[:, :partial.k]) == 0))
        total_missing = sum_over_ranks(len(missing), accelerator)
        if total_missing:
            first = (f", first on this process: sample {int(missing[0][0])} view {int(missing[0][1])}"
                     if len(missing) else "")
            raise RuntimeError(f"offline pass left {total_missing} drawn row(s) unwritten{first}; delete "
                               f"{partial.path} and run the 'offline' stage again")
    del arrays, written
    # The main process checks coverage; every process learns the outcome (raising on the main one alone
    # would leave the others waiting at the barrier below until the collective timeout).
    failure = None
    if _is_main(accelerator):
        try:
            partial.check_complete()
        except RuntimeError as exc:
            failure = exc
    if sum_over_ranks(int(failure is not None), accelerator):
        raise failure or RuntimeError("offline pass left rows unwritten (the main process names them)")
    if _is_main(accelerator):
        full = partial.publish(run_dir / name, time.perf_counter() - t0, storage_extra)
        st = full["storage"]
        log(f"[offline] {run_dir / name}: {partial.n} images x {partial.k} view(s), "
            f"{st['data_bytes_per_image']:.1f} bytes per image in {len(specs)} array(s) "
            f"({st['total_bytes_per_image']:.1f} with the views), {time.perf_counter() - t0:.1f} s")
    _barrier(accelerator)
    return store_class.open(run_dir, header, name=name)


class _Progress:
    """A tqdm bar over images (main process only); callable with the number of images just done."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=1.0)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# LFME: expert logits + SpIS confidences on the generic store
# ---------------------------------------------------------------------------------------------------

LFME_RECIPE = "lfme"
CONFIDENCE = "confidence"


def expert_array(l: int) -> str:
    """Name of expert ``l``'s logits array."""
    return f"expert{l}.logits"


@dataclass(frozen=True)
class ExpertSource:
    """One trained expert for the offline pass: its subset name and classes (column j of its output =
    global class ``classes[j]``), the model (eval mode) and its checkpoint file (hashed into the header)."""

    name: str
    classes: np.ndarray
    model: torch.nn.Module
    checkpoint: Path


def lfme_arrays(widths: Sequence[int], topk: int | None) -> list[ArraySpec]:
    """LFME's arrays: ``expert<l>.logits`` (float16, width ``|S_l|``, top-k when ``topk < |S_l|``)
    and ``confidence`` (float32, one per sample, eval view)."""
    return [ArraySpec(expert_array(l), int(w), "float16", topk) for l, w in enumerate(widths)] + \
        [ArraySpec(CONFIDENCE, 1, "float32", None, per_view=False)]


def store_header(*, run_dir: str | os.PathLike, manifest: Mapping[str, Any], split: str, resolution: int, mode: str,
                 num_views: int | str, view_seed: int, view_kind: str, experts: Sequence[ExpertSource],
                 topk: int | None, backend: str, fill: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LFME's store identity (:func:`make_header`): the views of ``build_views(..., num_views,
    view_seed, view_kind, mode)`` (plus ``fill``, :func:`drawn_identity`), the loader ``backend``, the
    experts' checkpoints and subsets, and their arrays. Also the ``expected=`` a run passes to
    :meth:`LFMEStore.open`."""
    return make_header(
        run_dir=run_dir, manifest=manifest, split=split,
        views={**view_identity(mode, num_views, view_seed, view_kind), **dict(fill or {})},
        augmentation={"resolution": int(resolution), "mode": mode}, backend=backend,
        checkpoints=[(e.name, e.checkpoint) for e in experts], recipe=LFME_RECIPE,
        fields={"subsets": [{"name": e.name, "classes": [int(c) for c in e.classes]} for e in experts]},
        arrays=lfme_arrays([len(e.classes) for e in experts], topk))


def lfme_producer(experts: Sequence[ExpertSource], num_classes: int) -> Producer:
    """The LFME producer: every expert's logits, and the SpIS confidence of each sample (its subset
    expert's softmax probability of the true class, in the expert's own label space)."""
    maps = []
    for e in experts:
        m = torch.full((num_classes,), -1, dtype=torch.long)
        m[torch.as_tensor(np.asarray(e.classes, dtype=np.int64))] = torch.arange(len(e.classes))
        maps.append(m)

    def produce(batch: Any) -> dict[str, torch.Tensor]:
        labels = batch.labels
        out: dict[str, torch.Tensor] = {}
        conf = None
        for l, e in enumerate(experts):
            logits = e.model(batch.images).float()
            out[expert_array(l)] = logits
            if conf is None:
                conf = torch.full((len(labels),), math.nan, device=logits.device)
            local = maps[l].to(labels.device)[labels].to(logits.device)
            mine = local >= 0
            probs = torch.softmax(logits, dim=1).gather(1, local.clamp(min=0)[:, None])[:, 0]
            conf = torch.where(mine, probs, conf)
        missing = torch.isnan(conf)
        if bool(missing.any()):
            j = int(torch.nonzero(missing)[0, 0])
            raise RuntimeError(f"sample {int(batch.indices[j])} (class {int(labels[j])}) is in no expert's subset: "
                               "it has no SpIS confidence")
        out[CONFIDENCE] = conf
        return out

    return produce


class LFMEStore(ArrayStore):
    """LFME's view of a store: per-expert logits by ``(sample index, view)`` and SpIS confidences.

    ``subset_names`` / ``subset_classes``: the experts' subsets (column j of expert l's logits =
    global class ``subset_classes[l][j]``); ``confidence``: float32 ``[N]``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        recipe = self.header["recipe"]
        if recipe.get("name") != LFME_RECIPE:
            raise OfflineStoreError(f"offline store {self.directory}: field 'recipe.name' is {recipe.get('name')!r}, "
                                    f"not {LFME_RECIPE!r}")
        subsets = recipe["fields"]["subsets"]
        self.subset_names = [s["name"] for s in subsets]
        self.subset_classes = [np.asarray(s["classes"], dtype=np.int64) for s in subsets]
        self.confidence = self.per_sample(CONFIDENCE)[:, 0].astype(np.float32)

    @classmethod
    def open(cls, path: str | os.PathLike, expected: Mapping[str, Any] | None = None, *, load: str = "mmap",
             name: str = "offline") -> "LFMEStore":
        """See :meth:`ArrayStore.open`."""
        return super().open(path, expected, load=load, name=name)  # type: ignore[return-value]

    @property
    def num_experts(self) -> int:
        return len(self.subset_names)

    @property
    def topk(self) -> int | None:
        return self.spec(expert_array(0)).topk if self.num_experts else None

    @property
    def bytes_per_image(self) -> float:
        """Stored expert-logit bytes per training image (all experts, all views)."""
        return float(self.header["storage"]["logit_bytes_per_image"])

    def teacher_logits(self, expert: int, indices: Any, views: Any = None, device: Any = None) -> torch.Tensor:
        """Expert ``expert``'s logits ``(B, C_l)`` for samples ``indices`` in views ``views`` (None: view 0).

        Dense stores return the stored float16 values (the losses upcast to float32); top-k stores
        rebuild a float32 row with :func:`lfme_fast.losses.topk_to_dense`.
        """
        return self.gather(expert_array(expert), indices, views, device)

    def teachers(self, indices: Any, views: Any = None, device: Any = None) -> list[torch.Tensor]:
        """Every expert's :meth:`teacher_logits` for one batch (the indices converted once)."""
        if not self.num_experts:
            return []
        rows = self.rows(indices, views)
        return [self.gather(expert_array(l), rows=rows, device=device) for l in range(self.num_experts)]


#: The LFME store under its former name (callers written before the generic store).
OfflineStore = LFMEStore


def write_offline(run_dir: str | os.PathLike, header: Mapping[str, Any], experts: Sequence[ExpertSource],
                  views: FixedViews, make_loader: Callable[..., Any], num_classes: int, *,
                  eval_views: FixedViews | None = None, accelerator: Any = None,
                  log: Callable[[str], None] = print, show_progress: bool = True,
                  drawn: np.ndarray | None = None) -> LFMEStore:
    """LFME's offline pass (:func:`write_store` with :func:`lfme_producer`); returns the opened store.

    Args:
        run_dir: the run folder.
        header: :func:`store_header` of this run.
        experts: the trained experts, in the header's subset order, in eval mode on the device.
        views: the ``K`` views to store (:func:`build_views`).
        make_loader: see :func:`write_store`.
        num_classes: size of the full label space (for the experts' label maps).
        eval_views: one-view table of the eval views (:func:`eval_view_boxes`); needed only when the
            store has no eval view (``view_kind="random"``), for the SpIS confidences.
        accelerator: optional; every process fills its share, the main one publishes.
        drawn: a ``fill: drawn`` store's rows of this process (see :func:`write_store`).
    """
    subsets = header["recipe"]["fields"]["subsets"]
    if [e.name for e in experts] != [s["name"] for s in subsets]:
        raise ValueError("experts are not in the header's subset order")
    k = int(header["views"]["num_views"])
    logit_bytes = sum(ArraySpec.from_json(expert_array(l), header["arrays"][expert_array(l)]).bytes_per_image(k)
                      for l in range(len(experts)))
    return write_store(run_dir, header, views, lfme_producer(experts, num_classes), make_loader,
                       eval_views=eval_views, accelerator=accelerator, log=log, show_progress=show_progress,
                       storage_extra={"logit_bytes_per_image": logit_bytes}, store_class=LFMEStore, drawn=drawn)
