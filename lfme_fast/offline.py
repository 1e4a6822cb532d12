"""Offline expert outputs for LFME: one pass after the experts train, no teacher forward ever after.

The pass feeds every training sample, in each of its ``K`` stored views, to every expert and writes
the experts' logits, index-aligned with the dataset, as float16 ``.npy`` files that training opens
memory-mapped (or loads into RAM / onto the GPU when they fit). The student's loader replays the same
views (:class:`lfme_fast.augment.FixedViews` + ``Batch.views``), so the stored logits are exactly what
a live teacher would output for the image the student sees (up to float16 rounding).

Layout (``RUN/offline/``)::

    header.json                the store's identity (below) and its storage figures
    views.npz                  FixedViews: boxes [N, K, 4] (y, x, h, w), flips [N, K], seed
    expert<l>.logits.npy       dense: float16 [N, K, C_l]      (C_l = |S_l|, expert l's label space)
    expert<l>.values.npy       top-k: float16 [N, K, k] logits of the k largest classes, and
    expert<l>.indices.npy             int16/int32 [N, K, k] their positions in the expert's label space
    confidence.npy             float32 [N]: SpIS p_i, the subset expert's softmax probability of the
                               true class (its own label space), centre view

The header records what the numbers depend on, and :meth:`OfflineStore.open` refuses a store whose
recorded identity differs from the run's (``expected=``), naming the first mismatching field:

* ``dataset``: manifest dataset name, split, number of samples, the split's data_prep fingerprint;
* ``augmentation``: resolution, augmentation mode, K, view seed, view kind;
* ``subsets``: each expert's subset name and class list (column j of expert l = class ``classes[j]``);
* ``experts``: each expert checkpoint's path (relative to the run folder) and sha256;
* ``storage``: dtype, top-k.

Views: view 0 is the evaluation view (the centre crop for ImageNet-style images; the whole image for
small, <= 64 px images, whose eval transform is the identity), so ``K = 1`` with ``view_kind="center"``
is the cheap approximation "the student sees the eval view of every image". ``view_kind="center"`` with
``K > 1``: view 0 centre plus ``K - 1`` random crops + flips; ``"random"``: all ``K`` random (the SpIS
confidences then come from an extra centre-view pass that is not stored). Random crops are
RandomResizedCrop boxes (scale 0.08..1 for ImageNet-style images; 0.35..1 for small images, where
0.08 of 28 px leaves a few pixels).

Writes are atomic and resumable: everything goes to ``RUN/offline.partial/`` (arrays created with
``np.lib.format.open_memmap`` and filled in place), a ``progress.json`` there records finished views,
and the folder is renamed to ``RUN/offline`` only when complete. A rerun with the same header resumes
after the last finished view. Several processes (Accelerate) each fill their own share of the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lfme_fast.augment import FixedViews, center_boxes, make_views, sample_rrc_boxes
from lfme_fast.io import atomic_write_json
from lfme_fast.losses import topk_to_dense

__all__ = [
    "FORMAT",
    "OfflineStoreError",
    "OfflineStore",
    "ExpertSource",
    "build_views",
    "file_sha256",
    "store_header",
    "write_offline",
    "COMPARED_FIELDS",
]

FORMAT = "lfme_fast.offline/1"
#: Header fields that must match the run for a store to be used (dotted paths into header.json).
COMPARED_FIELDS = ("format", "dataset", "augmentation", "subsets", "experts", "storage.dtype", "storage.topk")
#: Small-image random views: RandomResizedCrop area range (0.08 of a 28 px image is ~8 px wide).
SMALL_IMAGE_SCALE = (0.35, 1.0)
DEFAULT_SCALE = (0.08, 1.0)


class OfflineStoreError(ValueError):
    """A store that is missing, incomplete or does not match the run; the message names the field."""


@dataclass(frozen=True)
class ExpertSource:
    """One trained expert for the offline pass: its subset name and classes (column j of its output =
    global class ``classes[j]``), the model (eval mode) and its checkpoint file (hashed into the header)."""

    name: str
    classes: np.ndarray
    model: torch.nn.Module
    checkpoint: Path


# ---------------------------------------------------------------------------------------------------
# views and header
# ---------------------------------------------------------------------------------------------------


def build_views(heights: Any, widths: Any, num_views: int, seed: int, kind: str = "center",
                mode: str = "imagenet") -> FixedViews:
    """``K`` replayable views per sample (see the module docstring).

    Args:
        heights, widths: stored image sizes (``augment.image_sizes``).
        num_views: ``K >= 1``.
        seed: view seed (boxes and the per-epoch choice of view).
        kind: ``"center"`` (view 0 = eval view) or ``"random"`` (all random).
        mode: the resolved augmentation mode (``imagenet``: eval view = centre crop; ``pad_crop`` /
            ``none``: eval view = the whole image).
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if kind not in ("center", "random"):
        raise ValueError(f"view kind must be 'center' or 'random', got {kind!r}")
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    small = mode != "imagenet"
    scale = SMALL_IMAGE_SCALE if small else DEFAULT_SCALE
    if not small:
        return make_views(h, w, num_views, seed, include_center=kind == "center", scale=scale)
    boxes, flips = sample_rrc_boxes(h, w, num_views, seed, scale=scale, _first=1 if kind == "center" else 0)
    if kind == "center":
        boxes[:, 0] = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], axis=1)
        flips[:, 0] = False
    return FixedViews(boxes, flips, seed)


def eval_view_boxes(heights: Any, widths: Any, mode: str) -> FixedViews:
    """A one-view table holding each sample's eval view (centre crop, or whole image for small images)."""
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    if mode == "imagenet":
        boxes = center_boxes(h, w)
    else:
        boxes = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], axis=1).astype(np.int32)
    return FixedViews(boxes[:, None, :], np.zeros((h.size, 1), dtype=np.bool_), 0)


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


def store_header(*, run_dir: str | os.PathLike, manifest: dict[str, Any], split: str, resolution: int, mode: str,
                 num_views: int, view_seed: int, view_kind: str, experts: Sequence[ExpertSource],
                 topk: int | None) -> dict[str, Any]:
    """The identity of a store (the fields :meth:`OfflineStore.open` compares); also the ``expected=``
    a run passes to it."""
    run_dir = Path(run_dir)
    split_info = manifest.get("splits", {}).get(split)
    if split_info is None:
        raise OfflineStoreError(f"the dataset manifest has no split {split!r}")

    def rel(p: Path) -> str:
        # abspath, not resolve(): a run folder whose experts/ is a symlink to a shared expert run (the
        # ablations) still records "experts/<subset>/model.pt"; the sha256 pins the content anyway.
        here, base = os.path.abspath(p), os.path.abspath(run_dir)
        return Path(os.path.relpath(here, base)).as_posix() if here.startswith(base + os.sep) else here

    return {
        "format": FORMAT,
        "dataset": {"name": manifest.get("dataset"), "split": split, "num_samples": int(split_info["num_samples"]),
                    "fingerprint": split_info.get("fingerprint")},
        "augmentation": {"resolution": int(resolution), "mode": mode, "num_views": int(num_views),
                         "view_seed": int(view_seed), "view_kind": view_kind},
        "subsets": [{"name": e.name, "classes": [int(c) for c in e.classes]} for e in experts],
        "experts": [{"subset": e.name, "path": rel(e.checkpoint), "sha256": file_sha256(e.checkpoint)}
                    for e in experts],
        "storage": {"dtype": "float16", "topk": None if topk is None else int(topk)},
    }


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def _first_difference(have: Any, want: Any, prefix: str) -> str | None:
    """Dotted path of the first differing leaf between two JSON-like values, or None."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            d = _first_difference(have.get(k, "<missing>"), want.get(k, "<missing>"), f"{prefix}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(have, list) and isinstance(want, list):
        if len(have) != len(want):
            return f"{prefix} (length {len(have)} != {len(want)})"
        for i, (a, b) in enumerate(zip(have, want)):
            d = _first_difference(a, b, f"{prefix}[{i}]")
            if d is not None:
                return d
        return None
    return None if have == want else prefix


def compare_headers(have: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise :class:`OfflineStoreError` naming the first compared field where ``have`` != ``expected``."""
    for field in COMPARED_FIELDS:
        a, b = _lookup(have, field), _lookup(expected, field)
        where = _first_difference(a, b, field)
        if where is not None:
            raise OfflineStoreError(
                f"offline store does not match this run: field {where!r} differs (store: "
                f"{json.dumps(_lookup(have, where.split(' ')[0].split('[')[0]), default=str)[:200]}, run: "
                f"{json.dumps(_lookup(expected, where.split(' ')[0].split('[')[0]), default=str)[:200]}); "
                "rebuild it (the LFME 'offline' stage does so when its inputs change)")


# ---------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------


def _index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _file_names(l: int, topk_active: bool) -> list[str]:
    return [f"expert{l}.values.npy", f"expert{l}.indices.npy"] if topk_active else [f"expert{l}.logits.npy"]


class OfflineStore:
    """A finished offline store, read-only: per-expert logits by ``(sample index, view)``.

    Open with :meth:`open`. ``load``: ``"mmap"`` (default; pages come from the OS cache on demand),
    ``"ram"`` (read everything into memory), or a torch device (``"cuda"``, ``"cpu"``...) to hold the
    arrays as tensors there, so gathers are device-side and never synchronise.
    """

    def __init__(self, directory: Path, header: dict[str, Any], arrays: list[tuple[Any, ...]], views: FixedViews,
                 confidence: np.ndarray, device: torch.device | None):
        self.directory = directory
        self.header = header
        self._arrays = arrays  # per expert: (dense,) or (values, indices); numpy or torch
        self.views = views
        self.confidence = confidence
        self.device = device
        self.subset_classes = [np.asarray(s["classes"], dtype=np.int64) for s in header["subsets"]]
        self.subset_names = [s["name"] for s in header["subsets"]]

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str | os.PathLike, expected: dict[str, Any] | None = None, *,
             load: str = "mmap") -> "OfflineStore":
        """Open ``RUN/offline`` (or a store folder given directly).

        Raises:
            OfflineStoreError: no finished store there, a file is missing or has the wrong shape, or
                ``expected`` (a :func:`store_header`) differs in a compared field (named in the message).
        """
        path = Path(run_dir)
        directory = path if (path / "header.json").exists() else path / "offline"
        hpath = directory / "header.json"
        if not hpath.exists():
            raise OfflineStoreError(f"no offline store at {directory} (header.json missing): run the 'offline' stage")
        header = json.loads(hpath.read_text())
        if expected is not None:
            compare_headers(header, expected)
        n = int(header["dataset"]["num_samples"])
        k_views = int(header["augmentation"]["num_views"])
        topk = header["storage"].get("topk")
        arrays = []
        for l, classes in enumerate(header["subsets"]):
            c_l = len(classes["classes"])
            active = topk is not None and topk < c_l
            width = topk if active else c_l
            group = []
            for name in _file_names(l, active):
                fpath = directory / name
                if not fpath.exists():
                    raise OfflineStoreError(f"offline store {directory} is incomplete: {name} is missing")
                arr = np.load(fpath, mmap_mode="r")
                if arr.shape != (n, k_views, width):
                    raise OfflineStoreError(f"{fpath}: shape {arr.shape}, header says {(n, k_views, width)}")
                group.append(arr)
            arrays.append(tuple(group))
        views = FixedViews.load(directory / "views.npz")
        if views.boxes.shape[:2] != (n, k_views):
            raise OfflineStoreError(f"{directory / 'views.npz'}: {views.boxes.shape[:2]} views, header says {(n, k_views)}")
        confidence = np.load(directory / "confidence.npy")
        device = None
        if load == "ram":
            arrays = [tuple(np.array(a) for a in g) for g in arrays]  # a copy: a memmap view would stay lazy
        elif load != "mmap":
            device = torch.device(load)
            arrays = [tuple(torch.from_numpy(np.array(a)).to(device) for a in g) for g in arrays]
        return cls(directory, header, arrays, views, confidence, device)

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self._arrays)

    @property
    def num_samples(self) -> int:
        return int(self.header["dataset"]["num_samples"])

    @property
    def num_views(self) -> int:
        return int(self.header["augmentation"]["num_views"])

    @property
    def topk(self) -> int | None:
        return self.header["storage"].get("topk")

    @property
    def bytes_per_image(self) -> float:
        """Stored expert-output bytes per training image (all experts, all views)."""
        return float(self.header["storage"]["logit_bytes_per_image"])

    # ---- reading -------------------------------------------------------------------------------
    def _rows(self, indices: Any, views: Any) -> tuple[Any, Any]:
        """``(sample, view)`` index arrays in the arrays' own form, converted once per batch: int64
        tensors on the arrays' device, or int64 numpy arrays (memory-mapped or RAM store)."""
        first = self._arrays[0][0]
        if isinstance(first, torch.Tensor):
            idx = torch.as_tensor(indices, device=first.device).long()
            v = torch.zeros_like(idx) if views is None else torch.as_tensor(views, device=first.device).long()
            return idx, v
        idx = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        idx = idx.astype(np.int64, copy=False)
        if views is None:
            v = np.zeros_like(idx)
        else:
            v = views.cpu().numpy() if isinstance(views, torch.Tensor) else np.asarray(views)
            v = v.astype(np.int64, copy=False)
        return idx, v

    @staticmethod
    def _gather(arr: Any, rows: tuple[Any, Any]) -> torch.Tensor:
        idx, v = rows
        if isinstance(arr, torch.Tensor):
            return arr[idx, v]
        return torch.from_numpy(np.asarray(arr[idx, v]))

    def _teacher(self, expert: int, rows: tuple[Any, Any], device: Any) -> torch.Tensor:
        group = self._arrays[expert]
        out = [self._gather(a, rows) for a in group]
        if device is not None:
            out = [t.to(device, non_blocking=True) for t in out]
        if len(out) == 1:
            return out[0]
        values, idx = out
        return topk_to_dense(values, idx.long(), len(self.subset_classes[expert]))

    def teacher_logits(self, expert: int, indices: Any, views: Any = None, device: Any = None) -> torch.Tensor:
        """Expert ``expert``'s logits ``(B, C_l)`` for samples ``indices`` in views ``views`` (None: view 0).

        Dense stores return the stored float16 values (the losses upcast to float32); top-k stores
        rebuild a float32 row with :func:`lfme_fast.losses.topk_to_dense` (missing classes far below
        the kept ones).
        """
        return self._teacher(expert, self._rows(indices, views), device)

    def teachers(self, indices: Any, views: Any = None, device: Any = None) -> list[torch.Tensor]:
        """Every expert's :meth:`teacher_logits` for one batch (the indices converted once)."""
        if not self._arrays:
            return []
        rows = self._rows(indices, views)
        return [self._teacher(l, rows, device) for l in range(self.num_experts)]


# ---------------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------------


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def _create_arrays(partial: Path, header: dict[str, Any], n: int, k_views: int, topk: int | None) -> None:
    for l, sub in enumerate(header["subsets"]):
        c_l = len(sub["classes"])
        active = topk is not None and topk < c_l
        width = topk if active else c_l
        for name in _file_names(l, active):
            fpath = partial / name
            if fpath.exists():
                continue
            dtype = _index_dtype(c_l) if name.endswith("indices.npy") else np.float16
            arr = np.lib.format.open_memmap(fpath, mode="w+", dtype=dtype, shape=(n, k_views, width))
            del arr
    cpath = partial / "confidence.npy"
    if not cpath.exists():
        arr = np.lib.format.open_memmap(cpath, mode="w+", dtype=np.float32, shape=(n,))
        arr[:] = np.nan
        del arr


def _open_partial(partial: Path, header: dict[str, Any], topk: int | None) -> list[tuple[np.ndarray, ...]]:
    groups = []
    for l, sub in enumerate(header["subsets"]):
        active = topk is not None and topk < len(sub["classes"])
        groups.append(tuple(np.load(partial / name, mmap_mode="r+") for name in _file_names(l, active)))
    return groups


@torch.no_grad()
def _run_view(view: int, loader: Any, experts: Sequence[ExpertSource], groups: list, confidence: np.ndarray | None,
              label_maps: list[np.ndarray], topk: int | None, accelerator: Any, progress: Callable[[int], None]) -> None:
    """Forward every batch of one view through every expert; write rows (and confidences)."""
    for batch in loader:
        autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
        idx = batch.indices.cpu().numpy()
        labels = batch.labels.cpu().numpy()
        with autocast:
            outs = [e.model(batch.images).float() for e in experts]
        for l, (logits, group) in enumerate(zip(outs, groups)):
            if group is None:  # confidence-only pass
                pass
            elif len(group) == 1:
                group[0][idx, view] = logits.cpu().numpy().astype(np.float16)
            else:
                vals, pos = logits.topk(topk, dim=1)
                group[0][idx, view] = vals.cpu().numpy().astype(np.float16)
                group[1][idx, view] = pos.cpu().numpy().astype(group[1].dtype)
            if confidence is not None:
                local = label_maps[l][labels]
                mine = local >= 0
                if mine.any():
                    probs = torch.softmax(logits[torch.from_numpy(mine).to(logits.device)], dim=1)
                    sel = torch.from_numpy(local[mine]).to(probs.device)
                    confidence[idx[mine]] = probs.gather(1, sel[:, None])[:, 0].cpu().numpy()
        progress(len(idx))


def write_offline(run_dir: str | os.PathLike, header: dict[str, Any], experts: Sequence[ExpertSource],
                  views: FixedViews, make_loader: Callable[[FixedViews, int], Any], num_classes: int, *,
                  eval_views: FixedViews | None = None, accelerator: Any = None,
                  log: Callable[[str], None] = print, show_progress: bool = True) -> OfflineStore:
    """Run the offline pass and publish ``RUN/offline`` atomically; returns the opened store.

    Args:
        run_dir: the run folder.
        header: :func:`store_header` of this run (written to header.json with storage figures added).
        experts: the trained experts, in the header's subset order, in eval mode on the device.
        views: the ``K`` views to store (e.g. :func:`build_views`).
        make_loader: ``make_loader(views_table, k)`` -> a loader over the training split that shows
            view ``k`` of ``views_table`` to every sample (``build_loader(..., train=False,
            views=views_table, fixed_view=k)``), this process's share of the rows.
        num_classes: size of the full label space (for the experts' label maps).
        eval_views: one-view table of the eval views (:func:`eval_view_boxes`); needed only when the
            store has no centre view (``view_kind="random"``), for the SpIS confidences.
        accelerator: optional; every process fills its share, the main one publishes.
    """
    run_dir = Path(run_dir)
    partial = run_dir / "offline.partial"
    n, k_views = int(header["dataset"]["num_samples"]), int(header["augmentation"]["num_views"])
    topk = header["storage"]["topk"]
    if views.boxes.shape[:2] != (n, k_views):
        raise ValueError(f"views table is {views.boxes.shape[:2]}, header says {(n, k_views)}")
    if [e.name for e in experts] != [s["name"] for s in header["subsets"]]:
        raise ValueError("experts are not in the header's subset order")
    t0 = time.perf_counter()
    if _is_main(accelerator):
        _prepare_partial(partial, header, views, topk, log)
    _barrier(accelerator)
    done_views = json.loads((partial / "progress.json").read_text())["done_views"]
    groups = _open_partial(partial, header, topk)
    confidence = np.load(partial / "confidence.npy", mmap_mode="r+")
    label_maps = []
    for e in experts:
        m = np.full(num_classes, -1, dtype=np.int64)
        m[np.asarray(e.classes, dtype=np.int64)] = np.arange(len(e.classes))
        label_maps.append(m)
    center_in_store = header["augmentation"]["view_kind"] == "center"
    todo = [k for k in range(k_views) if k not in done_views]
    passes = len(todo) + (0 if center_in_store else 1)
    pbar = _Progress(passes * n, "offline", show_progress and _is_main(accelerator))
    for k in todo:
        loader = make_loader(views, k)
        _run_view(k, loader, experts, groups, confidence if (k == 0 and center_in_store) else None, label_maps,
                  topk, accelerator, pbar)
        for g in groups:
            for a in g:
                a.flush()
        confidence.flush()
        _barrier(accelerator)
        if _is_main(accelerator):
            done_views.append(k)
            atomic_write_json(partial / "progress.json", {"header": header, "done_views": done_views})
        log(f"[offline] view {k + 1}/{k_views} written ({time.perf_counter() - t0:.1f} s)")
    if not center_in_store:
        # SpIS confidences come from the eval (centre) view, which an all-random store does not hold:
        # one extra pass over the eval views, not stored.
        if eval_views is None:
            raise ValueError("a store without a centre view needs eval_views= for the SpIS confidences")
        _run_view(0, make_loader(eval_views, 0), experts, [None] * len(experts), confidence, label_maps, topk,
                  accelerator, pbar)
        confidence.flush()
        _barrier(accelerator)
    pbar.close()
    del groups
    if _is_main(accelerator):
        _publish(run_dir, partial, header, len(experts), time.perf_counter() - t0, log)
    _barrier(accelerator)
    return OfflineStore.open(run_dir, header)


def _prepare_partial(partial: Path, header: dict[str, Any], views: FixedViews, topk: int | None,
                     log: Callable[[str], None]) -> None:
    """Create (or keep, for a resume with the same header) ``offline.partial`` with its empty arrays,
    the views and ``progress.json``. Main process only."""
    n, k_views = int(header["dataset"]["num_samples"]), int(header["augmentation"]["num_views"])
    ppath = partial / "progress.json"
    done_views: list[int] = []
    if ppath.exists():
        try:
            prev = json.loads(ppath.read_text())
            compare_headers(prev["header"], header)
            done_views = list(prev["done_views"])
            log(f"[offline] resuming {partial}: views {done_views} already written")
        except (OfflineStoreError, KeyError, ValueError):
            shutil.rmtree(partial)  # an interrupted pass for other inputs: start over
    elif partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    views.save(partial / "views.npz")
    _create_arrays(partial, header, n, k_views, topk)
    atomic_write_json(ppath, {"header": header, "done_views": done_views})


def _publish(run_dir: Path, partial: Path, header: dict[str, Any], num_experts: int, seconds: float,
             log: Callable[[str], None]) -> None:
    """Check the confidences, write the final header (with storage figures) and rename the finished
    ``offline.partial`` onto ``offline`` (replacing an older store or a link to one). Main process only."""
    n, k_views = int(header["dataset"]["num_samples"]), int(header["augmentation"]["num_views"])
    conf = np.load(partial / "confidence.npy")
    if np.isnan(conf).any():
        bad = int(np.flatnonzero(np.isnan(conf))[0])
        raise RuntimeError(f"offline pass left sample {bad} without a confidence (is its class in no subset?)")
    data_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                     for g in _open_partial(partial, header, header["storage"]["topk"]) for a in g)
    total_bytes = sum(p.stat().st_size for p in partial.iterdir() if p.name != "progress.json")
    full = dict(header)
    full["storage"] = {**header["storage"],
                       "files": sorted(p.name for p in partial.iterdir() if p.suffix in (".npy", ".npz")),
                       "logit_bytes_per_image": data_bytes / max(n, 1),
                       "total_bytes_per_image": total_bytes / max(n, 1),
                       "total_bytes": total_bytes}
    full["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    full["pass_seconds"] = round(seconds, 3)
    atomic_write_json(partial / "header.json", full)
    (partial / "progress.json").unlink()
    final = run_dir / "offline"
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        old = run_dir / f"offline.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    if not final.exists():
        os.replace(partial, final)
    log(f"[offline] {final}: {n} images x {k_views} view(s) x {num_experts} experts, "
        f"{full['storage']['logit_bytes_per_image']:.1f} bytes of expert outputs per image "
        f"({full['storage']['total_bytes_per_image']:.1f} with views and confidences), {seconds:.1f} s")


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
