"""The loader contract every back end honours, and the back-end-independent planning behind it.

The trainer sees only :class:`Batch` and :class:`BatchLoader` from :func:`build_loader`; it never
branches on the back end. Everything that is not pixel work — which indices an epoch visits on this
rank, their curriculum weights, which fixed view each sample shows, resolution and augmentation
mode — is decided here once (:class:`LoaderSpec`, :class:`EpochPlan`), so the back ends cannot
disagree about it; they only decode, crop, flip, resize and normalise.

That includes the random geometry: each position of an epoch gets its crop box and flip from
:func:`lfme_fast.augment.draw_rrc` / :func:`~lfme_fast.augment.draw_pad_crop`, a pure function of
``(seed, epoch, index, occurrence)``. So every back end shows the same crops for the same order, and
an epoch resumed in a fresh process replays exactly the crops of the interrupted one.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lfme_fast.augment import (
    CENTER_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FixedViews,
    center_boxes,
    draw_pad_crop,
    draw_rrc,
    image_sizes,
    normalize_batch,
    normalize_coefficients,
    resolve_augment,
)
from lfme_fast.shards import ShardReader, load_manifest

BACKENDS = ("ffcv", "dali", "torch")


@dataclass
class Batch:
    """One batch, identical in form whatever the back end.

    ``images``: N,C,H,W on the target device in the training dtype (channels_last strides when asked),
    normalised with the ImageNet mean/std. ``labels``/``indices``: int64 on the device (indices are
    positions in the split, 0..N-1). ``weights``: float32 curriculum weights aligned with ``indices``
    (train with a sampler), else None. ``views``: int64 fixed-view id per sample, else None.

    Lifetime: a back end may reuse the memory of ``images`` a few batches later (ffcv keeps
    ``batches_ahead + 2`` output slots); use a batch before drawing the next few, or ``clone()`` it.
    Labels, indices, weights and views are never reused.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor | None = None
    views: torch.Tensor | None = None

    def __iter__(self):
        """``images, labels, indices, weights = batch``."""
        yield self.images
        yield self.labels
        yield self.indices
        yield self.weights

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class BatchLoader(ABC):
    """An epoch-aware iterable of :class:`Batch`. Call :meth:`set_epoch` before iterating an epoch."""

    @abstractmethod
    def set_epoch(self, epoch: int) -> None:
        """Select the sampler order, weights and view choice of ``epoch``."""

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """The batches of the current epoch."""

    @abstractmethod
    def __len__(self) -> int:
        """Batches per epoch on this rank."""


@dataclass
class LoaderSpec:
    """Everything a back end needs, resolved and validated once (see :func:`build_loader`)."""

    root: Path
    split: str
    train: bool
    batch_size: int
    mode: str  # resolved augmentation: 'imagenet' | 'pad_crop' | 'none'
    resolution: int
    heights: np.ndarray  # int32 stored image sizes
    widths: np.ndarray
    labels: np.ndarray  # int64, the split's labels
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    num_workers: int
    drop_last: bool
    in_memory: bool
    seed: int
    num_replicas: int
    rank: int
    total_epochs: int
    sampler: object | None  # lfme_fast.sampling.Sampler; None = eval share of 0..N-1
    use_weights: bool
    views: FixedViews | None
    fixed_view: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_ratio: float = CENTER_CROP_RATIO
    extra: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.labels.size)

    @property
    def stored_shape(self) -> tuple[int, int] | None:
        """``(h, w)`` when every stored image has the same size, else None."""
        if self.heights.size == 0:
            return None
        h, w = int(self.heights[0]), int(self.widths[0])
        if (self.heights == h).all() and (self.widths == w).all():
            return h, w
        return None

    @property
    def geometry(self) -> str:
        """What the back end must do per sample:

        'views' (crop the given box, flip, resize), 'rrc' (random resized crop + flip), 'center'
        (eval centre box, resize), 'pad_crop' (pad 4, random crop, flip), 'resize' (whole image to
        the resolution), 'identity' (stored pixels as they are).
        """
        if self.views is not None:
            return "views"
        if self.mode == "imagenet":
            return "rrc" if self.train else "center"
        if self.mode == "pad_crop":
            if self.train:
                return "pad_crop"
        shape = self.stored_shape
        return "identity" if shape == (self.resolution, self.resolution) else "resize"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class EpochPlan:
    """One epoch on this rank: the visited ``indices`` in order (truncated to whole batches when
    ``drop_last``), aligned ``weights`` (or None) and fixed-view ids ``views`` (or None), and the
    geometry of every position: ``boxes`` int32 ``[n, 4]`` ``(y, x, h, w)`` in stored pixels and
    ``flips`` bool ``[n]``.

    A box is resized to the loader's resolution, except for the 'pad_crop' geometry, where it is a
    stored-size window whose corner ``(y, x)`` lies in ``[-pad, pad]`` (outside the image is zero)
    and for 'identity' (the whole image, as stored).
    """

    epoch: int
    indices: np.ndarray
    weights: np.ndarray | None
    views: np.ndarray | None
    boxes: np.ndarray
    flips: np.ndarray

    def batch_slices(self, batch_size: int) -> Iterator[slice]:
        for lo in range(0, len(self.indices), batch_size):
            yield slice(lo, min(lo + batch_size, len(self.indices)))


def eval_share(num_samples: int, num_replicas: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s contiguous, disjoint share of ``0..N-1`` (no padding; sizes differ by <= 1)."""
    bounds = np.linspace(0, num_samples, num_replicas + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


def plan_epoch(spec: LoaderSpec, epoch: int) -> EpochPlan:
    """Indices, weights and views of ``epoch`` for this rank (no pixel work)."""
    if spec.sampler is None:
        indices = eval_share(spec.num_samples, spec.num_replicas, spec.rank)
        weights = None
    elif spec.use_weights:
        if not 0 <= epoch < spec.total_epochs:
            raise ValueError(f"epoch {epoch} is outside 0..total_epochs-1 = {spec.total_epochs - 1}: pass "
                             "build_loader(total_epochs=) the run's epoch count (the curriculum weights need it)")
        indices, weights = spec.sampler.indices_and_weights(epoch, spec.total_epochs)
        indices = np.asarray(indices, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != indices.shape:
            raise ValueError(f"sampler returned {weights.shape} weights for {indices.shape} indices")
    else:
        indices = np.asarray(spec.sampler.indices(epoch), dtype=np.int64)
        weights = None
    if indices.size and (indices.min() < 0 or indices.max() >= spec.num_samples):
        raise ValueError(f"sampler index out of range 0..{spec.num_samples - 1} for split {spec.split!r}")
    if spec.drop_last:
        keep = (len(indices) // spec.batch_size) * spec.batch_size
        indices = indices[:keep]
        weights = None if weights is None else weights[:keep]
    views = None
    if spec.views is not None:
        if spec.fixed_view is not None:
            views = np.full(indices.size, spec.fixed_view, dtype=np.int64)
        else:
            views = spec.views.choose(epoch, indices)
    indices = np.ascontiguousarray(indices)
    boxes, flips = plan_geometry(spec, epoch, indices, views)
    return EpochPlan(int(epoch), indices, weights, views, boxes, flips)


def plan_geometry(spec: LoaderSpec, epoch: int, indices: np.ndarray,
                  views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes ``[n, 4]`` and flips ``[n]`` of the samples at the epoch's positions (see
    :class:`EpochPlan`): their fixed views, seeded random draws, the eval centre view or the whole
    image, by ``spec.geometry``."""
    geometry = spec.geometry
    h, w = spec.heights, spec.widths
    if geometry == "views":
        return (np.ascontiguousarray(spec.views.boxes[indices, views]),
                np.ascontiguousarray(spec.views.flips[indices, views]))
    if geometry == "rrc":
        return draw_rrc(h, w, indices, spec.seed, epoch)
    if geometry == "pad_crop":
        return draw_pad_crop(h, w, indices, spec.seed, epoch)
    if geometry == "center":
        boxes = center_boxes(h[indices], w[indices], spec.crop_ratio)
    else:  # 'resize' / 'identity': the whole image
        boxes = np.zeros((indices.size, 4), dtype=np.int32)
        boxes[:, 2] = h[indices]
        boxes[:, 3] = w[indices]
    return boxes, np.zeros(indices.size, dtype=np.bool_)


def num_batches(spec: LoaderSpec) -> int:
    """Batches per epoch on this rank (the samplers have a fixed epoch length)."""
    n = len(spec.sampler) if spec.sampler is not None else len(eval_share(spec.num_samples, spec.num_replicas,
                                                                          spec.rank))
    return n // spec.batch_size if spec.drop_last else -(-n // spec.batch_size)


def normalize_uint8_nhwc(images: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """uint8 N,H,W,C (CPU or device) -> normalised N,C,H,W in ``spec.dtype`` on ``spec.device``.

    CUDA: copy the uint8 tensor (4x fewer bytes than float), convert on the GPU. CPU: one numba pass
    writes the normalised float32 in the requested memory order (torch's strided permute copy alone
    costs ~0.5 ms per 224 px image on this machine, more than decoding the JPEG).
    """
    if spec.cuda:
        x = images.to(spec.device, non_blocking=True).permute(0, 3, 1, 2)
        mean = torch.tensor([m * 255.0 for m in spec.mean], device=x.device).view(1, 3, 1, 1)
        inv_std = torch.tensor([1.0 / (s * 255.0) for s in spec.std], device=x.device).view(1, 3, 1, 1)
        x = (x.float() - mean).mul_(inv_std)
        fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
        return x.to(dtype=spec.dtype, memory_format=fmt)
    src = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, h, w, _ = src.shape
    coef = normalize_coefficients(spec.mean, spec.std)
    no_flips = np.zeros(n, dtype=np.bool_)  # the back ends hand over images already mirrored
    if spec.channels_last:
        out = np.empty((n, h, w, 3), dtype=np.float32)
        normalize_batch(np.ascontiguousarray(src), coef, no_flips, out, True)
        x = torch.from_numpy(out).permute(0, 3, 1, 2)
    else:
        out = np.empty((n, 3, h, w), dtype=np.float32)
        normalize_batch(np.ascontiguousarray(src), coef, no_flips, out, False)
        x = torch.from_numpy(out)
    return x if spec.dtype == torch.float32 else x.to(spec.dtype)


def plan_batch(plan: EpochPlan, pos: int, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
               device) -> Batch:
    """The :class:`Batch` of ``plan``'s samples ``pos:pos+n`` (``n = len(labels)``) on ``device``.

    ``labels``/``indices`` are copied (the pipelines reuse their output buffers); ``weights`` and
    ``views`` are sliced from the plan. ``images`` are passed through as they are.
    """
    n = int(labels.shape[0])
    weights = None if plan.weights is None else torch.from_numpy(plan.weights[pos:pos + n])
    views = None if plan.views is None else torch.from_numpy(plan.views[pos:pos + n])
    return Batch(images,
                 labels.to(device, dtype=torch.int64, non_blocking=True, copy=True),
                 indices.to(device, dtype=torch.int64, non_blocking=True, copy=True),
                 None if weights is None else weights.to(device, non_blocking=True),
                 None if views is None else views.to(device, non_blocking=True))


def resolve_spec(root, split, *, train: bool, batch_size: int, sampler=None, total_epochs: int = 1,
                 resolution: int | None = None, augment: str = "auto", device="cpu", dtype=torch.float32,
                 channels_last: bool = False, num_workers: int | None = None, drop_last: bool | None = None,
                 in_memory: bool = True, views: FixedViews | None = None, fixed_view: int | None = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> LoaderSpec:
    """Validate :func:`build_loader`'s arguments and resolve every default."""
    root = Path(root)
    load_manifest(root)  # a clear error when root is not a prepared dataset
    reader = ShardReader(root, split)
    labels = reader.labels
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (isinstance(num_replicas, int) and num_replicas >= 1 and 0 <= rank < num_replicas):
        raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    heights, widths = image_sizes(root, split)
    stored_max = int(max(heights.max(), widths.max())) if heights.size else 0
    mode = resolve_augment(augment, stored_max)
    if resolution is None:
        if mode == "imagenet":
            resolution = 224
        else:
            if (heights != heights[0]).any() or (widths != widths[0]).any() or heights[0] != widths[0]:
                raise ValueError(f"augment={mode!r} without a resolution needs square images of one size; "
                                 f"{split!r} has {heights.min()}..{heights.max()} x {widths.min()}..{widths.max()}"
                                 " (pass resolution=)")
            resolution = int(heights[0])
    resolution = int(resolution)
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if mode == "pad_crop" and train and views is None:
        shape = (int(heights[0]), int(widths[0])) if heights.size else None
        if shape is None or (heights != shape[0]).any() or (widths != shape[1]).any() or shape != (resolution,
                                                                                                    resolution):
            raise ValueError(f"augment='pad_crop' needs square images stored at the resolution ({resolution}); "
                             f"use augment='imagenet' for variable-size images")
    if views is not None:
        views.check_fits(heights.astype(np.int64), widths.astype(np.int64))
        if fixed_view is not None and not 0 <= int(fixed_view) < views.num_views:
            raise ValueError(f"fixed_view must be in 0..{views.num_views - 1}, got {fixed_view}")
    elif fixed_view is not None:
        raise ValueError("fixed_view needs views=")
    use_weights = False
    if sampler is None:
        if train:
            from lfme_fast.sampling import InstanceSampler

            sampler = InstanceSampler(labels, seed=seed, num_replicas=num_replicas, rank=rank)
    else:
        if len(sampler) < 1:
            raise ValueError("sampler yields no samples")
        use_weights = bool(train)
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if drop_last is None:
        drop_last = bool(train)
    return LoaderSpec(root=root, split=split, train=bool(train), batch_size=int(batch_size), mode=mode,
                      resolution=resolution, heights=heights, widths=widths, labels=labels,
                      device=torch.device(device), dtype=dtype, channels_last=bool(channels_last),
                      num_workers=int(num_workers), drop_last=bool(drop_last), in_memory=bool(in_memory),
                      seed=int(seed), num_replicas=num_replicas, rank=rank, total_epochs=int(total_epochs),
                      sampler=sampler, use_weights=use_weights, views=views,
                      fixed_view=None if fixed_view is None else int(fixed_view))


def build_loader(root, split, *, backend: str, train: bool, batch_size: int, sampler=None,
                 total_epochs: int = 1, resolution: int | None = None, augment: str = "auto",
                 device="cpu", dtype=torch.float32, channels_last: bool = False,
                 num_workers: int | None = None, drop_last: bool | None = None, in_memory: bool = True,
                 views: FixedViews | None = None, fixed_view: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, **backend_options) -> BatchLoader:
    """A :class:`BatchLoader` over prepared dataset ``root``'s ``split``.

    backend: 'ffcv' (the beton, stock ffcv Loader ordered by our sampler), 'dali' (shard JPEGs via
    external_source; GPU decode when CUDA is available) or 'torch' (the PIL + DataLoader baseline).
    sampler: None = sequential eval order (train=False) or an instance shuffle (train=True); a given
    sampler already yields this rank's share. Eval with several replicas: each rank gets a contiguous
    disjoint share of 0..N-1, no padding. augment: 'imagenet' (train RandomResizedCrop + flip; eval
    centre crop of 0.875 x shorter side resized to ``resolution``), 'pad_crop' (28/32 px: pad 4 +
    random crop + flip; eval identity), 'none' or 'auto'. views (+ fixed_view): replay fixed crops
    instead of random augmentation. Weights come from ``sampler.indices_and_weights(epoch,
    total_epochs)`` when a sampler is given and ``train``; otherwise ``Batch.weights`` is None.
    ``backend_options`` are passed to the back end (e.g. ``batches_ahead`` for ffcv).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    spec = resolve_spec(root, split, train=train, batch_size=batch_size, sampler=sampler,
                        total_epochs=total_epochs, resolution=resolution, augment=augment, device=device,
                        dtype=dtype, channels_last=channels_last, num_workers=num_workers, drop_last=drop_last,
                        in_memory=in_memory, views=views, fixed_view=fixed_view, seed=seed,
                        num_replicas=num_replicas, rank=rank)
    if backend == "torch":
        from lfme_fast.loaders.torch_backend import TorchLoader

        return TorchLoader(spec, **backend_options)
    if backend == "ffcv":
        from lfme_fast.loaders.ffcv_backend import FFCVLoader

        return FFCVLoader(spec, **backend_options)
    from lfme_fast.loaders.dali_backend import DALILoader

    return DALILoader(spec, **backend_options)
