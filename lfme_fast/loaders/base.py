"""The loader contract every back end honours, and the back-end-independent planning behind it.

The trainer sees only :class:`Batch` and :class:`BatchLoader` from
:func:`lfme_fast.loaders.build_loader`; it never branches on the back end. Every setting of a loader
is one :class:`LoaderOptions` value, validated and resolved against the dataset by
:func:`resolve_spec`. This module knows no back end: the registry of back ends lives in
:mod:`lfme_fast.loaders`, and the back ends import this module, never the other way round.

Everything that is not pixel work — which indices an epoch visits on this rank, their curriculum
weights, which fixed view each sample shows, resolution and augmentation mode — is decided here once
(:class:`LoaderSpec`, :class:`EpochPlan`), so the back ends cannot disagree about it; they only
decode, crop, flip, resize and normalise.

That includes the random geometry: each position of an epoch gets its crop box and flip from
:func:`lfme_fast.augment.draw_rrc` / :func:`~lfme_fast.augment.draw_pad_crop`, a pure function of
``(seed, epoch, index, occurrence)``. So every back end shows the same crops for the same order, and
an epoch resumed in a fresh process replays exactly the crops of the interrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lfme_fast.augment import (
    CENTER_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FixedViews,
    center_boxes,
    check_colour,
    draw_colour,
    draw_pad_crop,
    draw_rrc,
    image_sizes,
    normalize_batch,
    normalize_coefficients,
    resolve_augment,
)
from lfme_fast.scale import default_num_workers
from lfme_fast.shards import ShardReader, load_manifest


@dataclass
class Batch:
    """One batch, identical in form whatever the back end.

    ``images``: N,C,H,W on the target device in the training dtype (channels_last strides when asked),
    normalised with the ImageNet mean/std. ``labels``/``indices``: int64 on the device (indices are
    positions in the split, 0..N-1). ``weights``: float32 curriculum weights aligned with ``indices``
    (train with a sampler), else None. ``views``: int64 fixed-view id per sample, else None.
    ``images2``: with ``LoaderOptions(views_per_sample=2)``, a second, independently augmented view
    of the same samples (same shape, dtype, device and layout as ``images``; row ``j`` of both is
    sample ``indices[j]``), else None. ``images`` is then the first view — exactly what a one-view
    loader with the same settings shows — so one-view code runs unchanged on a two-view loader.

    Lifetime: a back end may reuse the memory of ``images``/``images2`` a few batches later (ffcv keeps
    ``batches_ahead + 2`` output slots); use a batch before drawing the next few, or ``clone()`` it.
    Labels, indices, weights and views are never reused.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor | None = None
    views: torch.Tensor | None = None
    images2: torch.Tensor | None = None

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


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoaderOptions:
    """Every setting of a loader, in one value: ``build_loader(LoaderOptions(root, split, train=True,
    batch_size=256, ...))``.

    ``root``/``split``: a prepared dataset (``python -m data_prep``) and one of its splits. The other
    fields are keyword-only; ``train`` and ``batch_size`` are required.

    * ``backend``: a name registered in :data:`lfme_fast.loaders.BACKENDS` ('ffcv': the beton, stock
      ffcv Loader ordered by our sampler; 'dali': shard JPEGs via external_source, GPU decode when
      CUDA is available; 'torch': the PIL + DataLoader baseline).
    * ``train``: training loader (random augmentation, ``drop_last``, curriculum weights) or eval.
    * ``sampler``: a :class:`lfme_fast.sampling.Sampler` yielding this rank's share (a training loader
      with ``drop_last``, the default, first calls its ``shard_batches(batch_size)``: the global order is
      sharded in per-process batches, so the global batches do not depend on the process count). None: the
      sequential eval order (``train=False``; with several replicas each rank gets a contiguous,
      disjoint share of 0..N-1, no padding) or an instance shuffle (``train=True``). Weights come from
      ``sampler.indices_and_weights(epoch, total_epochs)`` when a sampler is given and ``train``;
      otherwise ``Batch.weights`` is None.
    * ``total_epochs``: the run's epoch count (curriculum weights need it).
    * ``resolution``: output side; None = 224 for 'imagenet', else the stored (square) size.
    * ``augment``: 'imagenet' (train RandomResizedCrop + flip; eval centre crop of 0.875 x shorter
      side resized to ``resolution``), 'pad_crop' (28/32 px: pad 4 + random crop + flip; eval
      identity), 'none' or 'auto' (pad_crop for images of at most 64 px, else imagenet).
    * ``colour``/``colour_strength``: colour augmentation on top of ``augment``, for training loaders
      without ``views`` (eval loaders and view replay never jitter colours). 'none', or 'simclr':
      SimCLR's colour jitter (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s`` with ``s =
      colour_strength`` in [0, 2.5], applied with p 0.8, ops in a random order per sample) and random
      grayscale (p 0.2), planned per position like the crops (:func:`lfme_fast.augment.draw_colour`)
      and applied after crop/resize in every back end. CBD's "strong" teachers: ``colour='simclr'``,
      strength 1.
    * ``device``/``dtype``/``channels_last``: where and how ``Batch.images`` arrive (float32,
      bfloat16 or float16; a dtype name is accepted).
    * ``num_workers``: None = the CPUs this process may use (affinity, cgroup quota) divided by the
      processes on this machine (``LOCAL_WORLD_SIZE``): :func:`lfme_fast.scale.default_num_workers`.
      ``drop_last``: None = ``train``. ``in_memory``: ffcv's os_cache / the shard reader's page cache (False: read through).
    * ``views`` (+ ``fixed_view``): replay stored fixed crops (:class:`FixedViews`) instead of random
      augmentation; ``fixed_view`` shows that view of every sample (an int), or view ``fixed_view[j]``
      at position ``j`` of the sampler's order (an int array as long as the order: an offline pass
      over chosen (sample, view) pairs), else each epoch picks one.
    * ``seed``: the augmentation draws (and the default instance shuffle).
    * ``num_replicas``/``rank``: this process's place in a distributed run.
    * ``views_per_sample``: 1, or 2 for two independently augmented views of every sample in each
      batch (``Batch.images`` and ``Batch.images2``; contrastive / consistency recipes). Training
      loaders with random augmentation only (no ``views``).
    * ``hw_decoder_load``: DALI's GPU (``mixed``) decoding only: the share of the JPEGs given to the
      GPU's hardware JPEG decoder (A100/H100-class GPUs; the rest go to nvJPEG's CUDA decoder), in
      [0, 1]; None: DALI's default (0.65). Ignored by CPU decoding and by the other back ends.

    Argument-only checks (batch size, rank, epoch count, dtype, fixed view) fail here, at
    construction; the checks that need the dataset fail in :func:`resolve_spec`.
    """

    root: str | os.PathLike
    split: str
    _: KW_ONLY
    train: bool
    batch_size: int
    backend: str = "torch"
    sampler: Any = None
    total_epochs: int = 1
    resolution: int | None = None
    augment: str = "auto"
    colour: str = "none"
    colour_strength: float = 1.0
    device: Any = "cpu"
    dtype: Any = torch.float32
    channels_last: bool = False
    num_workers: int | None = None
    drop_last: bool | None = None
    in_memory: bool = True
    views: FixedViews | None = None
    fixed_view: int | np.ndarray | None = None
    seed: int = 0
    num_replicas: int = 1
    rank: int = 0
    views_per_sample: int = 1
    hw_decoder_load: float | None = None

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (isinstance(self.num_replicas, int) and self.num_replicas >= 1 and 0 <= self.rank < self.num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {self.num_replicas}, "
                             f"{self.rank}")
        if self.total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {self.total_epochs}")
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else getattr(torch, str(self.dtype), None)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        object.__setattr__(self, "dtype", dtype)  # frozen: normalise a dtype name once, here
        if self.fixed_view is not None and self.views is None:
            raise ValueError("fixed_view needs views=")
        if self.views_per_sample not in (1, 2):
            raise ValueError(f"views_per_sample must be 1 or 2, got {self.views_per_sample!r}")
        if self.views_per_sample > 1 and (not self.train or self.views is not None):
            given = "train=False" if not self.train else "fixed views (views=)"
            raise ValueError(f"views_per_sample=2 needs a training loader with random augmentation, got {given}")
        check_colour(self.colour, self.colour_strength)
        if self.hw_decoder_load is not None:
            load = self.hw_decoder_load
            if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0.0 <= float(load) <= 1.0:
                raise ValueError(f"hw_decoder_load must be a number in [0, 1] or None, got {load!r}")
            object.__setattr__(self, "hw_decoder_load", float(load))

    def replace(self, **changes: Any) -> LoaderOptions:
        """A copy with ``changes`` applied (validated again), e.g. ``opts.replace(split="val", train=False)``."""
        unknown = sorted(set(changes) - _OPTION_FIELDS)
        if unknown:
            raise TypeError(f"LoaderOptions has no field {', '.join(unknown)}; "
                            f"fields: {', '.join(sorted(_OPTION_FIELDS))}")
        return dataclasses.replace(self, **changes)


_OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(LoaderOptions))


@dataclass
class LoaderSpec:
    """Everything a back end needs, resolved and validated once (see :func:`resolve_spec`)."""

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
    fixed_view: int | np.ndarray | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_ratio: float = CENTER_CROP_RATIO
    colour: str = "none"  # 'none' | 'simclr' (see LoaderOptions)
    colour_strength: float = 1.0
    extra: dict = field(default_factory=dict)
    views_per_sample: int = 1  # augmented views of each sample per batch (see LoaderOptions)
    hw_decoder_load: float | None = None  # DALI mixed decoding's hardware-decoder share (see LoaderOptions)

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

        Replayed views keep their table's pixel op: an "rrc" table's boxes are cropped and resized
        ('views'); a "pad_crop" table's windows are copied as pad-crop windows ('pad_crop'), exactly
        as the experts and baselines saw them, with the boxes taken from the table.
        """
        if self.views is not None:
            return "pad_crop" if self.views.kind == "pad_crop" else "views"
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

    @property
    def pixel_batch_size(self) -> int:
        """Images a back end decodes per batch: ``batch_size`` x ``views_per_sample`` (see :class:`EpochPlan`)."""
        return self.batch_size * self.views_per_sample

    @property
    def jitters_colour(self) -> bool:
        """Whether the epoch plans carry colour rows: colour augmentation on a training loader without
        fixed views (replayed views and eval loaders show the stored colours)."""
        return self.colour != "none" and self.train and self.views is None


@dataclass
class EpochPlan:
    """One epoch on this rank: the visited ``indices`` in order (truncated to whole batches when
    ``drop_last``), aligned ``weights`` (or None) and fixed-view ids ``views`` (or None), and the
    geometry of every position: ``boxes`` int32 ``[n, 4]`` ``(y, x, h, w)`` in stored pixels and
    ``flips`` bool ``[n]``; ``colour``: float32 ``[n, COLOUR_COLUMNS]`` colour-jitter rows
    (:func:`lfme_fast.augment.draw_colour`, applied after crop/resize with
    :func:`lfme_fast.augment.colour_image`) when the loader jitters colours, else None.

    A box is resized to the loader's resolution, except for the 'pad_crop' geometry, where it is a
    stored-size window whose corner ``(y, x)`` lies in ``[-pad, pad]`` (outside the image is zero)
    and for 'identity' (the whole image, as stored).

    Two views (``num_views = 2``): the plan is the *pixel stream* the back ends decode, and every
    per-position array above is laid out batch-major over views. Logical batch ``k`` (samples
    ``k*B .. k*B+m-1`` of the epoch, ``m <= B``) occupies positions ``2kB .. 2kB+2m-1``: its ``m``
    samples in view 0, then the same ``m`` samples in view 1. A back end therefore decodes batches of
    ``2B`` positions (:meth:`batch_slices`, :attr:`LoaderSpec.pixel_batch_size`) exactly as it decodes
    one-view batches, and :func:`plan_batch` splits each into ``Batch.images`` / ``Batch.images2``.
    View ``v`` draws its crop, flip and colour from the sample's usual key with the occurrence salted
    by ``v`` (:func:`lfme_fast.augment.view_occurrences`), so view 0 is the one-view plan.
    """

    epoch: int
    indices: np.ndarray
    weights: np.ndarray | None
    views: np.ndarray | None
    boxes: np.ndarray
    flips: np.ndarray
    colour: np.ndarray | None = None
    num_views: int = 1
    #: int64 ``[n]``: each position's occurrence number in the epoch's global order (how many times its
    #: index came up before; :meth:`lfme_fast.sampling.Sampler.epoch_share`), which seeds its draws
    occurrences: np.ndarray | None = None

    def batch_slices(self, batch_size: int) -> Iterator[slice]:
        """Positions of each batch of ``batch_size`` samples (``num_views`` x as many positions)."""
        step = batch_size * self.num_views
        for lo in range(0, len(self.indices), step):
            yield slice(lo, min(lo + step, len(self.indices)))


def eval_share(num_samples: int, num_replicas: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s contiguous, disjoint share of ``0..N-1`` (no padding; sizes differ by <= 1)."""
    bounds = np.linspace(0, num_samples, num_replicas + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


def plan_epoch(spec: LoaderSpec, epoch: int) -> EpochPlan:
    """Indices, weights and views of ``epoch`` for this rank (no pixel work)."""
    if spec.sampler is None:
        indices = eval_share(spec.num_samples, spec.num_replicas, spec.rank)
        weights = None
        occ = np.zeros(indices.size, dtype=np.int64)  # every index once
    else:
        if spec.use_weights and not 0 <= epoch < spec.total_epochs:
            raise ValueError(f"epoch {epoch} is outside 0..total_epochs-1 = {spec.total_epochs - 1}: pass "
                             "LoaderOptions(total_epochs=) the run's epoch count (the curriculum weights need it)")
        share = spec.sampler.epoch_share(epoch, spec.total_epochs if spec.use_weights else None)
        indices = np.asarray(share.indices, dtype=np.int64)
        weights = None if share.weights is None else np.asarray(share.weights, dtype=np.float32)
        occ = np.asarray(share.occurrences, dtype=np.int64)
        for name, arr in (("weights", weights), ("occurrences", occ)):
            if arr is not None and arr.shape != indices.shape:
                raise ValueError(f"sampler returned {arr.shape} {name} for {indices.shape} indices")
    if indices.size and (indices.min() < 0 or indices.max() >= spec.num_samples):
        raise ValueError(f"sampler index out of range 0..{spec.num_samples - 1} for split {spec.split!r}")
    if spec.drop_last:
        keep = (len(indices) // spec.batch_size) * spec.batch_size
        indices, occ = indices[:keep], occ[:keep]
        weights = None if weights is None else weights[:keep]
    views = None
    if spec.views is not None:
        if spec.fixed_view is not None and np.ndim(spec.fixed_view) > 0:
            if spec.fixed_view.size < indices.size:
                raise ValueError(f"fixed_view has {spec.fixed_view.size} entries for an order of {indices.size}")
            views = spec.fixed_view[:indices.size]
        elif spec.fixed_view is not None:
            views = np.full(indices.size, spec.fixed_view, dtype=np.int64)
        else:
            views = spec.views.choose(epoch, indices, occ)
    indices = np.ascontiguousarray(indices)
    occ = np.ascontiguousarray(occ)
    boxes, flips = plan_geometry(spec, epoch, indices, views, occurrence=occ)
    plan = EpochPlan(int(epoch), indices, weights, views, boxes, flips,
                     plan_colour(spec, epoch, indices, occurrence=occ), occurrences=occ)
    if spec.views_per_sample > 1:
        plan = _view_stream(spec, plan)
    return plan


def _view_stream(spec: LoaderSpec, plan: EpochPlan) -> EpochPlan:
    """``plan`` (view 0) as the batch-major pixel stream of ``spec.views_per_sample`` views (see
    :class:`EpochPlan`): every per-position array of the plan, each view's from :func:`_view_plan`."""
    num_views, n, bs = spec.views_per_sample, len(plan.indices), spec.batch_size
    per_view = [plan] + [_view_plan(spec, plan, v) for v in range(1, num_views)]
    # stream position of view v of logical position p: num_views * (batch start) + v * (batch size) + offset
    p = np.arange(n, dtype=np.int64)
    lo = (p // bs) * bs
    m = np.minimum(bs, n - lo)
    streams = {}
    for f in dataclasses.fields(EpochPlan):
        arrays = [getattr(q, f.name) for q in per_view]
        if not isinstance(arrays[0], np.ndarray):  # epoch, num_views, and absent (None) arrays
            continue
        out = np.empty((num_views * n,) + arrays[0].shape[1:], dtype=arrays[0].dtype)
        for v, a in enumerate(arrays):
            out[num_views * lo + v * m + (p - lo)] = a
        streams[f.name] = out
    return dataclasses.replace(plan, num_views=num_views, **streams)


def _view_plan(spec: LoaderSpec, plan: EpochPlan, view: int) -> EpochPlan:
    """Augmented view ``view`` of ``plan``'s positions: the same samples, their own random draws."""
    boxes, flips = plan_geometry(spec, plan.epoch, plan.indices, plan.views, view=view, occurrence=plan.occurrences)
    return dataclasses.replace(plan, boxes=boxes, flips=flips,
                               colour=plan_colour(spec, plan.epoch, plan.indices, view=view,
                                                  occurrence=plan.occurrences))


def plan_geometry(spec: LoaderSpec, epoch: int, indices: np.ndarray, views: np.ndarray | None, view: int = 0,
                  occurrence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes ``[n, 4]`` and flips ``[n]`` of the samples at the epoch's positions (see
    :class:`EpochPlan`): their fixed views, seeded random draws, the eval centre view or the whole
    image, by ``spec.geometry``. ``view``: which augmented view's random draws (two-view loaders);
    ``occurrence``: the positions' occurrence numbers in the epoch's global order (None: counted
    within ``indices``)."""
    geometry = spec.geometry
    h, w = spec.heights, spec.widths
    if spec.views is not None:  # replay: 'views' boxes or 'pad_crop' windows, both from the table
        if geometry == "pad_crop" and spec.stored_shape != (spec.resolution, spec.resolution):
            # the pad-crop op outputs stored-size windows: a batch at another resolution would not stack
            raise ValueError(f"pad-crop views need square images stored at the resolution ({spec.resolution}); "
                             f"split {spec.split!r} is stored at {spec.stored_shape or 'several sizes'}")
        return (np.ascontiguousarray(spec.views.boxes[indices, views]),
                np.ascontiguousarray(spec.views.flips[indices, views]))
    if geometry == "rrc":
        return draw_rrc(h, w, indices, spec.seed, epoch, view=view, occurrence=occurrence)
    if geometry == "pad_crop":
        return draw_pad_crop(h, w, indices, spec.seed, epoch, view=view, occurrence=occurrence)
    if geometry == "center":
        boxes = center_boxes(h[indices], w[indices], spec.crop_ratio)
    else:  # 'resize' / 'identity': the whole image
        boxes = np.zeros((indices.size, 4), dtype=np.int32)
        boxes[:, 2] = h[indices]
        boxes[:, 3] = w[indices]
    return boxes, np.zeros(indices.size, dtype=np.bool_)


def plan_colour(spec: LoaderSpec, epoch: int, indices: np.ndarray, view: int = 0,
                occurrence: np.ndarray | None = None) -> np.ndarray | None:
    """Colour-jitter rows of the epoch's positions (:func:`lfme_fast.augment.draw_colour`, seeded by
    ``(seed, epoch, index, occurrence)`` like the crops), or None when the loader does not jitter colours."""
    if not spec.jitters_colour:
        return None
    return draw_colour(indices, spec.seed, epoch, spec.colour_strength, view=view, occurrence=occurrence)


def num_batches(spec: LoaderSpec) -> int:
    """Batches per epoch on this rank (the samplers have a fixed epoch length)."""
    n = len(spec.sampler) if spec.sampler is not None else len(eval_share(spec.num_samples, spec.num_replicas,
                                                                          spec.rank))
    return n // spec.batch_size if spec.drop_last else -(-n // spec.batch_size)


def normalize_tensors(spec: LoaderSpec, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` of ``spec`` in uint8 units as float32 ``[1, 3, 1, 1]`` tensors on ``device``,
    made once per loader and device (kept in ``spec.extra``: no host-to-device copy per batch)."""
    device = torch.device(device)
    key = ("normalize_tensors", str(device))
    if key not in spec.extra:
        mean = torch.tensor([m * 255.0 for m in spec.mean], dtype=torch.float32).view(1, 3, 1, 1)
        inv_std = torch.tensor([1.0 / (s * 255.0) for s in spec.std], dtype=torch.float32).view(1, 3, 1, 1)
        spec.extra[key] = (mean.to(device), inv_std.to(device))
    return spec.extra[key]


def normalize_uint8_torch(images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, dtype: torch.dtype,
                          channels_last: bool) -> torch.Tensor:
    """uint8 N,C,H,W (any strides, on any device) -> ``(x - mean) * inv_std`` in ``dtype``, laid out
    channels_last when asked, else contiguous: the GPU half of the uint8 path (ffcv's batches and
    DALI's colour-jittered ones are shipped as uint8, 4x fewer bytes than float32, and normalised on
    the device). The arithmetic is float32 whatever ``dtype`` (bf16 cannot hold ``x - mean`` exactly);
    three kernels: convert with the target layout, subtract and scale in place, cast."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(dtype=torch.float32, memory_format=fmt)
    x.sub_(mean).mul_(inv_std)
    return x if dtype == torch.float32 else x.to(dtype=dtype, memory_format=fmt)


def normalize_uint8_nhwc(images: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """uint8 N,H,W,C (CPU or device) -> normalised N,C,H,W in ``spec.dtype`` on ``spec.device``.

    CUDA: copy the uint8 tensor (4x fewer bytes than float), convert on the GPU. CPU: one numba pass
    writes the normalised float32 in the requested memory order (torch's strided permute copy alone
    costs ~0.5 ms per 224 px image on this machine, more than decoding the JPEG).
    """
    if spec.cuda:
        x = images.to(spec.device, non_blocking=True).permute(0, 3, 1, 2)
        mean, inv_std = normalize_tensors(spec, x.device)
        return normalize_uint8_torch(x, mean, inv_std, spec.dtype, spec.channels_last)
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
    """The :class:`Batch` of ``plan``'s positions ``pos:pos+n`` (``n = len(labels)``) on ``device``.

    ``labels``/``indices`` are copied (the pipelines reuse their output buffers); ``weights`` and
    ``views`` are sliced from the plan. ``images`` are passed through as they are; with two views
    (``plan.num_views == 2``) the ``n`` positions are ``m = n / 2`` samples twice (see
    :class:`EpochPlan`), split into ``images`` (first view) and ``images2`` (rows ``m:``, a view
    into the same tensor).
    """
    n = int(labels.shape[0])
    m = n // plan.num_views
    if m * plan.num_views != n:
        raise RuntimeError(f"a batch of {n} images at position {pos} is not {plan.num_views} views of whole samples")
    images2 = None
    if plan.num_views == 2:
        images, images2 = images[:m], images[m:]
        labels, indices = labels[:m], indices[:m]
    weights = None if plan.weights is None else torch.from_numpy(plan.weights[pos:pos + m])
    views = None if plan.views is None else torch.from_numpy(plan.views[pos:pos + m])
    return Batch(images, owned_copy(labels, device), owned_copy(indices, device),
                 None if weights is None else weights.to(device, non_blocking=True),
                 None if views is None else views.to(device, non_blocking=True),
                 images2)


def owned_copy(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` as int64 on ``device``, in memory of its own (the pipelines reuse their output buffers).

    To a GPU, a host tensor goes through pinned memory that this copy owns: a non-blocking copy
    straight from the pipeline's pinned buffer would run only when the GPU reaches it, after the
    pipeline may have written a later batch's labels there (the training loop never waits on the
    GPU per step). Torch's pinned-memory allocator keeps the owned block until the copy has run.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        staged = torch.empty(t.shape, dtype=torch.int64, pin_memory=True)
        staged.copy_(t)  # a host copy, done before this returns
        return staged.to(device, non_blocking=True)
    return t.to(device, dtype=torch.int64, non_blocking=True, copy=True)


def resolve_spec(options: LoaderOptions) -> LoaderSpec:
    """Validate ``options`` against the dataset and resolve every default."""
    if not isinstance(options, LoaderOptions):
        raise TypeError(f"resolve_spec() takes a LoaderOptions, got {type(options).__name__}")
    o = options
    root, split, train, resolution = Path(o.root), o.split, o.train, o.resolution
    views, fixed_view = o.views, o.fixed_view
    load_manifest(root)  # a clear error when root is not a prepared dataset
    reader = ShardReader(root, split)
    labels = reader.labels
    heights, widths = image_sizes(root, split)
    stored_max = int(max(heights.max(), widths.max())) if heights.size else 0
    mode = resolve_augment(o.augment, stored_max)
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
        if fixed_view is not None and np.ndim(fixed_view) == 0 and not 0 <= int(fixed_view) < views.num_views:
            raise ValueError(f"fixed_view must be in 0..{views.num_views - 1}, got {fixed_view}")
        if fixed_view is not None and np.ndim(fixed_view) > 0:
            fixed_view = np.ascontiguousarray(fixed_view, dtype=np.int64)
            if fixed_view.ndim != 1 or o.sampler is None:
                raise ValueError("a per-position fixed_view must be a 1-D array aligned with a sampler's order")
            if fixed_view.size and (fixed_view.min() < 0 or fixed_view.max() >= views.num_views):
                raise ValueError(f"fixed_view must be in 0..{views.num_views - 1}")
    sampler = _resolve_sampler(o, labels)
    num_workers = default_num_workers() if o.num_workers is None else o.num_workers
    drop_last = bool(train) if o.drop_last is None else o.drop_last
    spec = LoaderSpec(root=root, split=split, train=bool(train), batch_size=int(o.batch_size), mode=mode,
                      resolution=resolution, heights=heights, widths=widths, labels=labels,
                      device=torch.device(o.device), dtype=o.dtype, channels_last=bool(o.channels_last),
                      num_workers=int(num_workers), drop_last=bool(drop_last), in_memory=bool(o.in_memory),
                      seed=int(o.seed), num_replicas=o.num_replicas, rank=o.rank, total_epochs=int(o.total_epochs),
                      sampler=sampler, use_weights=o.sampler is not None and bool(train), views=views,
                      fixed_view=(None if fixed_view is None else int(fixed_view) if np.ndim(fixed_view) == 0
                                  else fixed_view), colour=o.colour,
                      colour_strength=float(o.colour_strength), views_per_sample=o.views_per_sample,
                      hw_decoder_load=o.hw_decoder_load)
    if spec.views_per_sample > 1 and spec.geometry not in ("rrc", "pad_crop"):
        raise ValueError(f"views_per_sample={spec.views_per_sample} needs random crops (augment 'imagenet' or "
                         f"'pad_crop'); augment={o.augment!r} gives the deterministic {spec.geometry!r} geometry")
    return spec


def _whole_batches(o: LoaderOptions) -> bool:
    """Whether the loader reads its sampler sharded in per-process batches: a training loader that drops
    the last partial batch (the default). One that keeps it (``drop_last=False``) reads the contiguous
    share of every sample instead, as before."""
    return bool(o.train) and (o.drop_last is None or bool(o.drop_last))


def _resolve_sampler(o: LoaderOptions, labels: np.ndarray) -> Any:
    """``o.sampler`` checked against the :class:`~lfme_fast.sampling.Sampler` contract; without one, an
    instance shuffle for training and None (the eval share of 0..N-1) for evaluation."""
    from lfme_fast.sampling import InstanceSampler, Sampler  # here: importing the numba kernels is not free

    if o.sampler is None:
        if not o.train:
            return None
        sampler = InstanceSampler(labels, seed=o.seed, num_replicas=o.num_replicas, rank=o.rank)
        # sharded in batches, like the recipes' samplers: the same global batches on any process count
        return sampler.shard_batches(int(o.batch_size)) if _whole_batches(o) else sampler
    if not isinstance(o.sampler, Sampler):
        raise TypeError(f"sampler must be a lfme_fast.sampling.Sampler, got {type(o.sampler).__name__}: subclass "
                        "Sampler (implement indices(epoch); its docstring lists what the loaders call)")
    sampler = o.sampler
    block = getattr(sampler, "shard_block", None)
    if _whole_batches(o):
        # A training loader reads its sampler's global order sharded in blocks of its per-process batch
        # (world-size invariant global batches, lfme_fast.sampling); a sampler already sharded for
        # another batch size is copied rather than changed under its other loader.
        if block is not None and block != int(o.batch_size):
            sampler = copy.copy(sampler)
        sampler = sampler.shard_batches(int(o.batch_size))
    elif hasattr(sampler, "shard_block"):
        # A loader that keeps every sample (eval, drop_last=False) reads the contiguous share, from a copy:
        # a training loader built from the same sampler (before or after) shards it in batches in place,
        # which here would drop the tail.
        sampler = copy.copy(sampler)
        sampler.shard_block = None
    if len(sampler) < 1:
        raise ValueError("sampler yields no samples")
    return sampler
