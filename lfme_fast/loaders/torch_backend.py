"""The baseline: what someone writing ordinary PyTorch would use (no torchvision here).

A ``torch.utils.data.Dataset`` over the shard reader decodes each JPEG with PIL, applies the
transforms by hand (PIL's antialiased bilinear ``resize(box=...)`` for crops — what torchvision's
``RandomResizedCrop`` does on PIL images — and numpy for pad-crop/flip), and a ``DataLoader`` with
worker processes, a batch sampler fed by our sampler's order, persistent workers and pinned memory
(on CUDA) collates uint8 HWC batches. Normalisation happens on the target device after the copy.

Random augmentation is replayable: the batch sampler hands each worker ``(index, view, crop box,
flip)`` per sample, read from the epoch plan, whose geometry is a pure function of ``(seed, epoch,
index, occurrence)`` (:func:`lfme_fast.loaders.base.plan_geometry`) — the same draws as the other
back ends, whatever the number of workers, whichever worker gets the batch, and wherever an epoch
is resumed. Colour augmentation (``colour='simclr'``) travels the same way: each item carries its
colour row from the plan, and the worker applies it to the cropped uint8 image with the numba kernel
the other CPU paths share (:func:`lfme_fast.augment.colour_image`; torchvision's ColorJitter would
draw its own random parameters and could not replay them).
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lfme_fast.augment import colour_image, pad_crop_window
from lfme_fast.loaders.base import (
    Batch, BatchLoader, LoaderSpec, normalize_uint8_nhwc, num_batches, plan_batch, plan_epoch)
from lfme_fast.shards import ShardReader


class ShardImageDataset(Dataset):
    """Sample ``(i, view, y, x, h, w, flip, colour)`` -> ``(uint8 HWC image tensor, label, i, view)``: the
    stored image cropped to the box (resized to the resolution, or a zero-padded window for pad-crop),
    mirrored when ``flip`` and colour-jittered with the plan's ``colour`` row (None: no jitter);
    ``view`` is -1 without views."""

    def __init__(self, spec: LoaderSpec):
        self.reader = ShardReader(spec.root, spec.split)
        self.geometry = spec.geometry
        self.resolution = spec.resolution

    def __len__(self) -> int:
        return len(self.reader)

    def _resize_box(self, img: Image.Image, y: int, x: int, h: int, w: int) -> Image.Image:
        size = (self.resolution, self.resolution)
        if (y, x, h, w) == (0, 0, img.height, img.width) and img.size == size:
            return img
        return img.resize(size, Image.BILINEAR, box=(x, y, x + w, y + h))

    def __getitem__(self, item):
        i, view, y, x, h, w, flip, colour = item
        img = Image.open(io.BytesIO(self.reader.get_bytes(i).tobytes()))
        img = img.convert("RGB")
        if self.geometry == "pad_crop":
            arr = pad_crop_window(np.asarray(img), y, x)
            if flip:
                arr = arr[:, ::-1]
        elif self.geometry == "identity":
            arr = np.asarray(img)
        else:
            img = self._resize_box(img, y, x, h, w)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arr = np.asarray(img)
        # a writable contiguous copy: torch refuses read-only buffers (and the colour kernel works in place)
        out = np.array(arr, copy=True, order="C")
        if colour is not None:
            colour_image(out, np.asarray(colour, dtype=np.float32))
        return torch.from_numpy(out), int(self.reader.labels[i]), int(i), int(view)


class _PlanBatchSampler:
    """Batches of ``(index, view, y, x, h, w, flip, colour)`` from the current :class:`EpochPlan`, read when
    iterated, so persistent workers keep working across epochs and get each sample's geometry with
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
        colours = plan.colour.tolist() if plan.colour is not None else [None] * len(plan.indices)
        rows = zip(plan.indices.tolist(), views.tolist(), plan.boxes.tolist(), plan.flips.tolist(), colours)
        items = [(i, v, *box, f, c) for i, v, box, f, c in rows]
        for sl in plan.batch_slices(self.batch_size):
            yield items[sl]

    def __len__(self) -> int:
        return self.num_batches


class TorchLoader(BatchLoader):
    """``torch.utils.data.DataLoader`` + PIL baseline behind the :class:`BatchLoader` contract."""

    def __init__(self, spec: LoaderSpec, prefetch_factor: int = 2):
        self.spec = spec
        self.dataset = ShardImageDataset(spec)
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
        for images, labels, indices, _views in self.dataloader:
            # weights, view ids and a second view's split come from the plan, as in the other back ends
            yield plan_batch(plan, pos, normalize_uint8_nhwc(images, spec), labels, indices, spec.device)
            pos += int(labels.shape[0])
