"""DALI back end: sampler-driven ``fn.external_source`` over the shard JPEGs, DALI decode + augmentation.

The Python side (:class:`EpochSource`) only *fetches*: for each batch of this rank's epoch plan it
hands DALI the encoded JPEG bytes (zero-copy views into the memory-mapped shards), labels, indices
and, for the deterministic geometries, each sample's crop window and flip. Everything else is the
pure graph function :func:`augment_graph` — decode (``device='mixed'`` = nvJPEG on the GPU when CUDA
is available, else the CPU decoder with ``device_id=None``), crop/resize, mirror, normalise —
wrapped by the thin ``pipeline_def`` :func:`_pipeline`.

``external_source`` is given an iterable with ``cycle='raise'``: at the end of an epoch it raises
StopIteration and on ``reset()`` DALI calls ``iter()`` on it again, which starts the *current*
epoch plan (REFERENCE §3: without ``cycle='raise'`` the source does not survive a reset). It runs in
the pipeline's Python thread (``parallel=False``, see :class:`DALILoader` for why).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lfme_fast.augment import PAD_CROP_PADDING
from lfme_fast.loaders.base import (Batch, BatchLoader, EpochPlan, LoaderSpec, num_batches, plan_batch, plan_epoch,
                                    view_boxes)
from lfme_fast.shards import ShardReader

# Outputs of the external source, in order: always the first three, then what the geometry needs.
BASE_OUTPUTS = ("jpegs", "labels", "indices")
# Geometries whose crop window is computed on the Python side (per-sample ROI into fn.resize).
ROI_GEOMETRIES = ("views", "center", "resize")


class EpochSource:
    """The external source: ``iter()`` = this rank's batches of the current epoch plan.

    Each batch is a tuple of per-output batches (names in ``outputs``): JPEG byte arrays; int64
    labels and indices; float32 ROI start/end ``(y, x)`` and int32 flip for ROI geometries; int32
    ``(y, x)`` slice anchors for pad-crop (random offsets in ``[-pad, pad]``).
    """

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.reader = ShardReader(spec.root, spec.split)
        self.plan: EpochPlan = plan_epoch(spec, 0)
        extra = {"pad_crop": ("anchor",)}.get(spec.geometry, ())
        if spec.geometry in ROI_GEOMETRIES:
            extra = ("roi_start", "roi_end", "flip")
        self.outputs = BASE_OUTPUTS + extra

    def __iter__(self):
        # DALI calls iter() as soon as the previous epoch ends (before reset() and set_epoch), so the
        # plan is read lazily, at the first batch request, which comes after reset().
        return self._batches()

    def _batches(self):
        spec, reader, plan = self.spec, self.reader, self.plan
        geometry = spec.geometry
        labels_all = reader.labels
        rng = np.random.default_rng([spec.seed, plan.epoch, spec.rank])
        for sl in plan.batch_slices(spec.batch_size):
            idx = plan.indices[sl]
            n = len(idx)
            # JPEG bytes as zero-copy views into the memory-mapped shards: DALI copies them once.
            batch = [[reader.get_bytes(int(i)) for i in idx], labels_all[idx].astype(np.int64),
                     idx.astype(np.int64)]
            if geometry in ROI_GEOMETRIES:
                if geometry == "resize":
                    boxes = np.stack([np.zeros(n), np.zeros(n), spec.heights[idx], spec.widths[idx]], axis=1)
                    flips = np.zeros(n, dtype=np.bool_)
                else:
                    boxes, flips = view_boxes(spec, idx, None if plan.views is None else plan.views[sl])
                boxes = np.asarray(boxes, dtype=np.float32)
                batch += [np.ascontiguousarray(boxes[:, 0:2]), boxes[:, 0:2] + boxes[:, 2:4],
                          np.asarray(flips, dtype=np.int32)]
            elif geometry == "pad_crop":
                batch.append(rng.integers(-PAD_CROP_PADDING, PAD_CROP_PADDING + 1, size=(n, 2), dtype=np.int32))
            yield tuple(batch)


def augment_graph(jpegs, roi_start=None, roi_end=None, flip=None, anchor=None, *, geometry: str,
                  resolution: int, decode_device: str, mean, std, dtype, layout: str):
    """The DALI graph from encoded JPEGs to normalised images (a pure function of its inputs).

    geometry: 'rrc' (RandomResizedCrop, scale (0.08, 1), ratio (3/4, 4/3), 10 attempts, random mirror;
    the crop is fused into the decoder so only the window is decoded, DALI's recommended form),
    'views'/'center'/'resize' (resize the given ROI, ``roi_start``/``roi_end`` as absolute ``(y, x)``,
    mirror when ``flip``), 'pad_crop' (slice at ``anchor`` with zero padding, random mirror),
    'identity'.
    """
    from nvidia.dali import fn, types

    size = (resolution, resolution)
    if geometry == "rrc":
        images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                               random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3),
                                               num_attempts=10)
        images = fn.resize(images, size=size)
        mirror = fn.random.coin_flip(probability=0.5)
        return fn.crop_mirror_normalize(images, mirror=mirror, dtype=dtype, output_layout=layout,
                                        mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    if geometry in ROI_GEOMETRIES:
        images = fn.resize(images, size=size, roi_start=roi_start, roi_end=roi_end, roi_relative=False)
        mirror = flip
    elif geometry == "pad_crop":
        images = fn.slice(images, anchor, fn.shapes(images, dtype=types.INT32)[0:2], axis_names="HW",
                          normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad",
                          fill_values=0)
        mirror = fn.random.coin_flip(probability=0.5)
    elif geometry == "identity":
        mirror = 0
    else:
        raise ValueError(f"unknown geometry {geometry!r}")
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=dtype, output_layout=layout,
                                    mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])


def _pipeline(source: EpochSource, geometry: str, resolution: int, decode_device: str, mean, std, dtype,
              layout: str):
    """Thin ``pipeline_def`` wrapper: external source -> :func:`augment_graph` (+ labels, indices)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def pipe():
        nodes = dict(zip(source.outputs, fn.external_source(source=source, num_outputs=len(source.outputs),
                                                            batch=True, cycle="raise", parallel=False)))
        labels, indices = nodes.pop("labels"), nodes.pop("indices")
        images = augment_graph(**nodes, geometry=geometry, resolution=resolution, decode_device=decode_device,
                               mean=mean, std=std, dtype=dtype, layout=layout)
        return images, labels, indices

    return pipe


class DALILoader(BatchLoader):
    """DALI pipeline behind the :class:`BatchLoader` contract.

    GPU: chosen automatically when CUDA is available and the target device is CUDA (decode 'mixed',
    ``device_id`` = the target device's index, else the current CUDA device). CPU: ``device_id=None``.

    ``parallel=False`` for the external source: the callback only slices memory-mapped shards (about
    a microsecond per sample) while DALI's own threads decode; process-parallel sources would add a
    copy of every JPEG through shared memory and a worker pool for no work to parallelise.
    """

    def __init__(self, spec: LoaderSpec, prefetch_queue_depth: int = 2):
        from nvidia.dali import types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.spec = spec
        self.epoch = 0
        self.source = EpochSource(spec)
        gpu = spec.cuda and torch.cuda.is_available()
        if gpu:
            device_id = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        else:
            device_id = None
        self.gpu = gpu
        dtype = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
        self._layout = "HWC" if spec.channels_last else "CHW"
        pipe_fn = _pipeline(self.source, spec.geometry, spec.resolution, "mixed" if gpu else "cpu", spec.mean,
                            spec.std, dtype, self._layout)
        self.pipe = pipe_fn(batch_size=spec.batch_size, num_threads=max(1, spec.num_workers), device_id=device_id,
                            prefetch_queue_depth=prefetch_queue_depth, seed=spec.seed + 7919 * spec.rank)
        self.pipe.build()
        # prepare_first_batch=False: nothing is pulled from the source before the first __iter__ (after
        # set_epoch); PARTIAL keeps the short last batch of an eval epoch.
        self.iterator = DALIGenericIterator(self.pipe, ["images", "labels", "indices"], auto_reset=False,
                                            last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        self._started = False
        self._exhausted = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_batches(self.spec)

    def _restart(self) -> None:
        if self._started and not self._exhausted:
            for _ in self.iterator:  # an epoch left early: drain it so DALI can reset
                pass
        if self.source.plan.epoch != self.epoch:
            self.source.plan = plan_epoch(self.spec, self.epoch)
        if self._started:
            self.iterator.reset()  # DALI calls iter(source) again: the plan set above
        self._started = True
        self._exhausted = False

    def __iter__(self) -> Iterator[Batch]:
        self._restart()
        spec, plan = self.spec, self.source.plan
        dev = spec.device
        pos = 0
        while True:
            try:
                out = next(self.iterator)[0]
            except StopIteration:
                self._exhausted = True
                return
            labels = out["labels"].reshape(-1)
            indices = out["indices"].reshape(-1)
            n = int(labels.shape[0])
            if not np.array_equal(indices.cpu().numpy(), plan.indices[pos:pos + n]):
                raise RuntimeError(f"DALI batch at position {pos} does not follow the epoch order")
            images = out["images"]
            if self._layout == "HWC":
                images = images.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
            images = images.to(dev, non_blocking=True)
            if images.dtype != spec.dtype:
                fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
                images = images.to(dtype=spec.dtype, memory_format=fmt)
            yield plan_batch(plan, pos, images, labels, indices, dev)
            pos += n
