"""The baseline: what someone writing ordinary PyTorch would use (no torchvision here).

A ``torch.utils.data.Dataset`` over the shard reader decodes each JPEG with PIL, applies the
transforms by hand (PIL's antialiased bilinear ``resize(box=...)`` for crops — what torchvision's
``RandomResizedCrop`` does on PIL images — and numpy for pad-crop/flip), and a ``DataLoader`` with
worker processes, a batch sampler fed by our sampler's order, persistent workers and pinned memory
(on CUDA) collates uint8 HWC batches. Normalisation happens on the target device after the copy.

Random augmentation is replayable: the batch sampler hands each worker ``(index, view, epoch,
occurrence)`` per sample (``occurrence`` = how many times ``index`` already came up earlier in this
epoch's plan, so the repeats of an oversampled tail image get fresh crops), and the sample's
RandomResizedCrop box + flip (or pad-crop offsets + flip) are drawn from a ``random.Random`` seeded by
:func:`sample_key` — a splitmix64 hash of ``(loader seed, epoch, index, occurrence)``. The draws are
therefore the same whatever the number of workers, whichever worker gets the batch, and wherever
an epoch is resumed (the plan, hence the occurrence counts, is a function of ``(seed, epoch)``).
"""

from __future__ import annotations

import io
import random
from typing import Iterator

import numpy as np
import torch
from numba import njit
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lfme_fast.augment import _GOLDEN, _mix64, pad_crop_flip, py_center_box, py_rrc_box
from lfme_fast.loaders.base import Batch, BatchLoader, LoaderSpec, normalize_uint8_nhwc, num_batches, plan_epoch
from lfme_fast.shards import ShardReader


_AUGMENT_SALT = np.uint64(0x6A09E667F3BCC909)  # separates these streams from the view/box hashes in augment.py


@njit(cache=True)
def sample_key(seed, epoch, index, occurrence):
    """63-bit seed of one sample's augmentation draws: chained splitmix64 mixes of
    ``(seed, epoch, index, occurrence)`` (the mixer of :mod:`lfme_fast.augment`)."""
    z = _mix64(np.uint64(seed) ^ _AUGMENT_SALT)
    z = _mix64(z + np.uint64(epoch) * _GOLDEN)
    z = _mix64(z ^ np.uint64(index))
    z = _mix64(z + np.uint64(occurrence) * _GOLDEN)
    return np.int64(z >> np.uint64(1))


def occurrences(indices: np.ndarray) -> np.ndarray:
    """int64 per position: how many times ``indices[p]`` occurs in ``indices[:p]``."""
    idx = np.asarray(indices, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    srt = idx[order]
    pos = np.arange(idx.size, dtype=np.int64)
    starts = np.ones(idx.size, dtype=bool)
    starts[1:] = srt[1:] != srt[:-1]
    first = np.maximum.accumulate(np.where(starts, pos, 0))
    out = np.empty(idx.size, dtype=np.int64)
    out[order] = pos - first
    return out


class ShardImageDataset(Dataset):
    """Sample ``(i, view, epoch, occurrence)`` -> ``(uint8 HWC image tensor, label, i, view)``; ``view`` is -1
    without views. Random geometry is a pure function of ``(spec.seed, epoch, i, occurrence)``."""

    def __init__(self, spec: LoaderSpec):
        self.reader = ShardReader(spec.root, spec.split)
        self.geometry = spec.geometry
        self.resolution = spec.resolution
        self.crop_ratio = spec.crop_ratio
        self.views = spec.views
        self.seed = int(spec.seed) % 2**63

    def __len__(self) -> int:
        return len(self.reader)

    def rng(self, epoch: int, i: int, occurrence: int) -> random.Random:
        """The sample's own generator (Mersenne Twister seeded by :func:`sample_key`)."""
        return random.Random(int(sample_key(self.seed, epoch, i, occurrence)))

    def _resize_box(self, img: Image.Image, y: int, x: int, h: int, w: int, flip: bool) -> np.ndarray:
        size = (self.resolution, self.resolution)
        if (y, x, h, w) == (0, 0, img.height, img.width) and img.size == size:
            out = img
        else:
            out = img.resize(size, Image.BILINEAR, box=(x, y, x + w, y + h))
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.array(out)  # a writable copy: torch refuses read-only buffers

    def __getitem__(self, item):
        i, view, epoch, occurrence = item
        img = Image.open(io.BytesIO(self.reader.get_bytes(i).tobytes()))
        img = img.convert("RGB")
        geometry = self.geometry
        if geometry == "views":
            y, x, h, w = (int(v) for v in self.views.boxes[i, view])
            arr = self._resize_box(img, y, x, h, w, bool(self.views.flips[i, view]))
        elif geometry == "rrc":
            rng = self.rng(epoch, i, occurrence)
            y, x, h, w = py_rrc_box(img.height, img.width, rng)
            arr = self._resize_box(img, y, x, h, w, rng.random() < 0.5)
        elif geometry == "center":
            arr = self._resize_box(img, *py_center_box(img.height, img.width, self.crop_ratio), False)
        elif geometry == "pad_crop":
            arr = pad_crop_flip(np.array(img), self.rng(epoch, i, occurrence))
        elif geometry == "resize":
            arr = self._resize_box(img, 0, 0, img.height, img.width, False)
        else:  # identity
            arr = np.array(img)
        return torch.from_numpy(np.ascontiguousarray(arr)), int(self.reader.labels[i]), int(i), int(view)


class _PlanBatchSampler:
    """Batches of ``(index, view, epoch, occurrence)`` from the current :class:`EpochPlan`, read when
    iterated, so persistent workers keep working across epochs and learn each sample's epoch with
    its index (no state to update in the worker processes).

    It holds the plan itself, not the loader: a loader <-> DataLoader reference cycle would leave the
    worker shutdown to the cyclic garbage collector, which (measured) stalls 5 s per worker in
    DataLoader's join timeout.
    """

    def __init__(self, plan, batch_size: int, num_batches: int):
        self.plan = plan
        self.batch_size = batch_size
        self.num_batches = num_batches

    def __iter__(self):
        plan = self.plan
        views = plan.views if plan.views is not None else np.full(len(plan.indices), -1, dtype=np.int64)
        idx = plan.indices.tolist()
        vw = views.tolist()
        occ = occurrences(plan.indices).tolist()
        epoch = int(plan.epoch)
        for sl in plan.batch_slices(self.batch_size):
            yield [(i, v, epoch, k) for i, v, k in zip(idx[sl], vw[sl], occ[sl])]

    def __len__(self) -> int:
        return self.num_batches


class TorchLoader(BatchLoader):
    """``torch.utils.data.DataLoader`` + PIL baseline behind the :class:`BatchLoader` contract."""

    def __init__(self, spec: LoaderSpec, prefetch_factor: int = 2):
        self.spec = spec
        self.dataset = ShardImageDataset(spec)
        sample_key(0, 0, 0, 0)  # compile (or load from numba's cache) before workers fork
        self.epoch = 0
        self.batch_sampler = _PlanBatchSampler(plan_epoch(spec, 0), spec.batch_size, num_batches(spec))
        workers = spec.num_workers
        self.dataloader = DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=workers,
            pin_memory=spec.cuda,
            persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batch_sampler.plan = plan_epoch(self.spec, self.epoch)

    def __len__(self) -> int:
        return num_batches(self.spec)

    @property
    def plan(self):
        return self.batch_sampler.plan

    def close(self) -> None:
        """Stop the persistent worker processes now (they also stop when the loader is dropped)."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None

    def __iter__(self) -> Iterator[Batch]:
        spec, plan = self.spec, self.batch_sampler.plan
        pos = 0
        for images, labels, indices, views in self.dataloader:
            n = labels.shape[0]
            weights = None if plan.weights is None else torch.from_numpy(plan.weights[pos:pos + n])
            pos += n
            dev = spec.device
            yield Batch(
                images=normalize_uint8_nhwc(images, spec),
                labels=labels.to(dev, non_blocking=True),
                indices=indices.to(dev, non_blocking=True),
                weights=None if weights is None else weights.to(dev, non_blocking=True),
                views=views.to(dev, non_blocking=True) if plan.views is not None else None,
            )
