"""Augmentation geometry shared by every loader back end, and LFME's replayable fixed views.

Two kinds of things live here:

* **Fixed views** (:class:`FixedViews`, :func:`make_views`): the offline LFME pass stores ``K`` crop
  boxes + flips per sample; every later consumer (the expert forward pass that records teacher
  outputs, the student's loader) must see exactly those crops. Boxes are in *stored-image* pixel
  coordinates ``(y, x, h, w)``; view 0 is the eval centre view, so "view 0" replays the eval
  transform. Which view a sample shows in an epoch is a pure function of ``(seed, epoch, index,
  occurrence)`` (:meth:`FixedViews.choose`), so every back end, worker and rank agrees without
  communication, and the repeats of an oversampled image are spread over its views. A table is of one
  ``kind``: ``"rrc"`` boxes (cropped, then resized) or ``"pad_crop"`` windows (stored-size windows
  at an offset in ``[-pad, pad]^2``, zero outside: the small-image augmentation,
  :func:`pad_crop_views`, :func:`all_pad_crop_views`).
* **Per-epoch random geometry** (:func:`draw_rrc`, :func:`draw_pad_crop`): the crop box + flip of
  every position of an epoch, drawn from :func:`sample_key` ``(seed, epoch, index, occurrence)``;
  the epoch plan carries them to every back end (same crops everywhere, exact replay on resume).
* **Pixel kernels** the CPU paths share: normalise + mirror + layout in one vectorised pass
  (:func:`normalize_image`), mirrored copy, pad-crop window; numpy references for the tests and the
  torch baseline, and the mode resolution (``augment='auto'``).

Random draws use a private splitmix64 stream per ``(seed, sample, view)``: box sampling is then
independent of draw order and of how the work is split across threads.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, prange

from lfme_fast.io import atomic_save_npy

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AUGMENT_MODES",
    "FixedViews",
    "sample_rrc_boxes",
    "center_boxes",
    "make_views",
    "VIEW_KINDS",
    "pad_crop_views",
    "all_pad_crop_views",
    "num_pad_crop_views",
    "image_sizes",
    "resolve_augment",
    "rrc_box",
    "center_box",
    "view_hash",
    "normalize_coefficients",
    "normalize_batch",
    "sample_key",
    "occurrences",
    "view_occurrences",
    "VIEW_OCCURRENCE_STRIDE",
    "draw_rrc",
    "draw_pad_crop",
    "COLOUR_MODES",
    "COLOUR_COLUMNS",
    "check_colour",
    "draw_colour",
    "colour_image",
    "colour_batch",
    "colour_reference",
]

#: One normalisation for every dataset, 28-px ones included (RGB mean/std on the 0..1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENT_MODES = ("imagenet", "pad_crop", "none", "auto")
#: ``augment='auto'`` picks pad_crop when the largest stored side is at most this many pixels.
SMALL_IMAGE_MAX_SIDE = 64
#: Eval centre crop: crop side = shorter side * 0.875 (= 224/256), then resize to the resolution.
CENTER_CROP_RATIO = 0.875
PAD_CROP_PADDING = 4

# ==================================================================================================
# splitmix64 (Steele, Lea & Flood 2014): bijective mixer + Weyl increment; a stream is a local uint64.
# ==================================================================================================
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_VIEW_SALT = np.uint64(0x7F4A7C159E3779B9)
_BOX_SALT = np.uint64(0xC2B2AE3D27D4EB4F)
_INV53 = 1.0 / 9007199254740992.0


@njit(cache=True, inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _next_uniform(state):
    """``(state', u)``, u uniform in [0, 1) on the 2**-53 grid."""
    state = state + _GOLDEN
    return state, np.float64(_mix64(state) >> np.uint64(11)) * _INV53


@njit(cache=True)
def view_hash(seed, epoch, index, k):
    """View id in ``[0, k)`` for ``(seed, epoch, index)``: three chained splitmix64 mixes."""
    z = _mix64(np.uint64(seed) ^ _VIEW_SALT)
    z = _mix64(z + np.uint64(epoch) * _GOLDEN)
    z = _mix64(z ^ np.uint64(index))
    return np.int64(z % np.uint64(k))


@njit(cache=True, parallel=True)
def _choose_kernel(seed, epoch, indices, occ, k, out):
    # (hash + occurrence) mod K: each position is uniform over the K views (the hash is), and the
    # repeats of one index in an epoch walk through consecutive views, so r <= K repeats get r
    # distinct views and more repeats cover all K as evenly as possible (counts differ by <= 1).
    for p in prange(indices.shape[0]):
        out[p] = (view_hash(seed, epoch, indices[p], k) + occ[p]) % k


@njit(cache=True)
def rrc_box(height, width, scale_lo, scale_hi, log_r_lo, log_r_hi, state):
    """One torchvision ``RandomResizedCrop.get_params`` draw: ``(state', y, x, h, w)``.

    Ten tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); a try is kept if the box fits;
    after ten failures: the centred crop clamped to the ratio range (torchvision's fallback).
    """
    area = height * width
    for _ in range(10):
        state, u = _next_uniform(state)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u)
        state, u = _next_uniform(state)
        aspect = math.exp(log_r_lo + (log_r_hi - log_r_lo) * u)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            state, u = _next_uniform(state)
            y = int(u * (height - h + 1))
            state, u = _next_uniform(state)
            x = int(u * (width - w + 1))
            return state, y, x, h, w
    in_ratio = width / height
    r_lo = math.exp(log_r_lo)
    r_hi = math.exp(log_r_hi)
    if in_ratio < r_lo:
        w = width
        h = int(round(w / r_lo))
    elif in_ratio > r_hi:
        h = height
        w = int(round(h * r_hi))
    else:
        w = width
        h = height
    return state, (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def center_box(height, width, crop_ratio):
    """The eval centre view ``(y, x, h, w)``: a square of ``int(crop_ratio * shorter side)``, centred.

    Same arithmetic as ffcv's ``get_center_crop`` so the ffcv eval decoder and view 0 agree exactly.
    """
    c = max(1, int(crop_ratio * min(height, width)))
    return (height - c) // 2, (width - c) // 2, c, c


@njit(cache=True, parallel=True)
def _rrc_kernel(heights, widths, k, seed, scale_lo, scale_hi, log_r_lo, log_r_hi, first, boxes, flips):
    base = _mix64(np.uint64(seed) ^ _BOX_SALT)
    for i in prange(heights.shape[0]):
        for v in range(first, k):
            state = _mix64(base + np.uint64(i) * np.uint64(k) + np.uint64(v))
            state, y, x, h, w = rrc_box(np.int64(heights[i]), np.int64(widths[i]), scale_lo, scale_hi,
                                        log_r_lo, log_r_hi, state)
            boxes[i, v, 0] = y
            boxes[i, v, 1] = x
            boxes[i, v, 2] = h
            boxes[i, v, 3] = w
            state, u = _next_uniform(state)
            flips[i, v] = u < 0.5


@njit(cache=True, parallel=True)
def _center_kernel(heights, widths, crop_ratio, boxes):
    for i in prange(heights.shape[0]):
        y, x, h, w = center_box(np.int64(heights[i]), np.int64(widths[i]), crop_ratio)
        boxes[i, 0] = y
        boxes[i, 1] = x
        boxes[i, 2] = h
        boxes[i, 3] = w


# ==================================================================================================
# Per-epoch random geometry: one draw per position of the epoch, a pure function of
# (seed, epoch, index, occurrence) — the same whatever back end, worker count or resume point.
# ==================================================================================================
_AUGMENT_SALT = np.uint64(0x6A09E667F3BCC909)  # separates these streams from the view/box hashes above


@njit(cache=True)
def sample_key(seed, epoch, index, occurrence):
    """63-bit seed of one sample's augmentation draws in an epoch: chained splitmix64 mixes of
    ``(seed, epoch, index, occurrence)``; ``occurrence`` = how many times ``index`` already came up
    earlier in the epoch, so the repeats of an oversampled tail image get fresh crops."""
    z = _mix64(np.uint64(seed) ^ _AUGMENT_SALT)
    z = _mix64(z + np.uint64(epoch) * _GOLDEN)
    z = _mix64(z ^ np.uint64(index))
    z = _mix64(z + np.uint64(occurrence) * _GOLDEN)
    return np.int64(z >> np.uint64(1))


#: Occurrence offset of augmented view ``v`` (two-view loaders): view ``v`` of a position draws from
#: :func:`sample_key` with ``occurrence + v * VIEW_OCCURRENCE_STRIDE``, a stream no real repeat count
#: reaches (an epoch would need 2**32 repeats of one index), so the views of a sample differ from
#: each other and from its other occurrences, and view 0 is exactly the one-view draw.
VIEW_OCCURRENCE_STRIDE = 2**32


def view_occurrences(indices: np.ndarray, view: int = 0, occurrence: np.ndarray | None = None) -> np.ndarray:
    """Occurrence numbers of ``indices`` salted for augmented view ``view`` (see ``VIEW_OCCURRENCE_STRIDE``):
    ``occurrence`` (the epoch's occurrence numbers of these positions, e.g. counted over the global order
    of which ``indices`` is one process's share), or :func:`occurrences` of ``indices`` when None."""
    if not 0 <= int(view) < 2**31:
        raise ValueError(f"view must be a small non-negative integer, got {view}")
    idx = np.asarray(indices)
    if occurrence is None:
        occ = occurrences(idx)
    else:
        occ = np.ascontiguousarray(occurrence, dtype=np.int64).reshape(-1)
        if occ.size != idx.size:
            raise ValueError(f"occurrence has {occ.size} entries for {idx.size} indices")
    return occ + np.int64(view) * VIEW_OCCURRENCE_STRIDE


@njit(cache=True)
def _count_occurrences(indices, counts, out):
    # one sequential pass: position p gets the count of its index so far, then counts it
    for p in range(indices.shape[0]):
        i = indices[p]
        out[p] = counts[i]
        counts[i] += 1


def occurrences(indices: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """int64 per position: how many times ``indices[p]`` occurs in ``indices[:p]``.

    ``counts`` (int64 per index value, updated in place): occurrences already seen before ``indices``,
    for an order that is counted chunk by chunk (:meth:`lfme_fast.sampling.Sampler.epoch_share`)."""
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty(idx.size, dtype=np.int64)
    if idx.size == 0:
        return out
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:
        raise ValueError(f"occurrences counts non-negative indices, got {lo}")
    if counts is None:
        counts = np.zeros(hi + 1, dtype=np.int64)
    elif counts.dtype != np.int64 or counts.ndim != 1 or counts.size <= hi:
        raise ValueError(f"counts must be int64 [> {hi}], got {counts.dtype} {counts.shape}")
    _count_occurrences(idx, counts, out)
    return out


@njit(cache=True, parallel=True)
def _draw_rrc_kernel(seed, epoch, indices, occ, heights, widths, scale_lo, scale_hi, log_r_lo, log_r_hi,
                     boxes, flips):
    for p in prange(indices.shape[0]):
        i = indices[p]
        state = np.uint64(sample_key(seed, epoch, i, occ[p]))
        state, y, x, h, w = rrc_box(np.int64(heights[i]), np.int64(widths[i]), scale_lo, scale_hi, log_r_lo,
                                    log_r_hi, state)
        boxes[p, 0] = y
        boxes[p, 1] = x
        boxes[p, 2] = h
        boxes[p, 3] = w
        state, u = _next_uniform(state)
        flips[p] = u < 0.5


@njit(cache=True, parallel=True)
def _draw_pad_crop_kernel(seed, epoch, indices, occ, heights, widths, pad, boxes, flips):
    span = np.uint64(2 * pad + 1)
    for p in prange(indices.shape[0]):
        i = indices[p]
        state = np.uint64(sample_key(seed, epoch, i, occ[p]))
        state = _mix64(state + _GOLDEN)
        boxes[p, 0] = np.int64(state % span) - pad
        state = _mix64(state + _GOLDEN)
        boxes[p, 1] = np.int64(state % span) - pad
        boxes[p, 2] = heights[i]
        boxes[p, 3] = widths[i]
        state, u = _next_uniform(state)
        flips[p] = u < 0.5


def draw_rrc(heights, widths, indices, seed: int, epoch: int, scale=(0.08, 1.0),
             ratio=(3 / 4, 4 / 3), view: int = 0,
             occurrence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop boxes (torchvision's distribution) + flips (p = 0.5) for every position of
    an epoch that visits ``indices``: int32 ``[n, 4]`` ``(y, x, h, w)`` in stored pixels, bool ``[n]``.
    Position ``p`` draws from :func:`sample_key` ``(seed, epoch, indices[p], occurrence)``; ``view``
    > 0: the independent draws of a sample's further augmented views (:func:`view_occurrences`);
    ``occurrence``: the positions' occurrence numbers in the epoch when ``indices`` is only part of it
    (one process's share of the global order), else counted within ``indices``."""
    h, w = _as_sizes(heights, widths)
    idx = np.ascontiguousarray(indices, dtype=np.int64)
    boxes = np.empty((idx.size, 4), dtype=np.int32)
    flips = np.empty(idx.size, dtype=np.bool_)
    occ = view_occurrences(idx, view, occurrence)
    _draw_rrc_kernel(int(seed) % 2**63, int(epoch), idx, occ, h, w, float(scale[0]), float(scale[1]),
                     math.log(ratio[0]), math.log(ratio[1]), boxes, flips)
    return boxes, flips


def draw_pad_crop(heights, widths, indices, seed: int, epoch: int,
                  pad: int = PAD_CROP_PADDING, view: int = 0,
                  occurrence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad-crop windows + flips for every position of an epoch (the CIFAR recipe: zero-pad ``pad``,
    random crop back to the stored size, flip with p = 0.5): int32 ``[n, 4]`` ``(y, x, h, w)`` with
    ``y, x`` in ``[-pad, pad]`` (the window may leave the image: outside is zero) and bool ``[n]``.
    ``view`` and ``occurrence`` as for :func:`draw_rrc`."""
    h, w = _as_sizes(heights, widths)
    idx = np.ascontiguousarray(indices, dtype=np.int64)
    boxes = np.empty((idx.size, 4), dtype=np.int32)
    flips = np.empty(idx.size, dtype=np.bool_)
    occ = view_occurrences(idx, view, occurrence)
    _draw_pad_crop_kernel(int(seed) % 2**63, int(epoch), idx, occ, h, w, int(pad), boxes, flips)
    return boxes, flips


def _as_sizes(heights, widths) -> tuple[np.ndarray, np.ndarray]:
    h = np.ascontiguousarray(heights, dtype=np.int64).reshape(-1)
    w = np.ascontiguousarray(widths, dtype=np.int64).reshape(-1)
    if h.shape != w.shape:
        raise ValueError(f"heights and widths differ in length ({h.size} vs {w.size})")
    if h.size and (h.min() < 1 or w.min() < 1):
        raise ValueError("image sizes must be positive")
    return h, w


def sample_rrc_boxes(heights, widths, k: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                     _first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` RandomResizedCrop boxes + flips per image, torchvision's distribution.

    Returns ``boxes`` int32 ``[N, k, 4]`` as ``(y, x, h, w)`` in the given image's pixels and ``flips``
    bool ``[N, k]`` (p = 0.5). Deterministic in ``(seed, image position, view)``.
    """
    h, w = _as_sizes(heights, widths)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"bad scale {scale} or ratio {ratio}")
    boxes = np.zeros((h.size, k, 4), dtype=np.int32)
    flips = np.zeros((h.size, k), dtype=np.bool_)
    _rrc_kernel(h, w, k, int(seed) % 2**63, float(scale[0]), float(scale[1]), math.log(ratio[0]),
                math.log(ratio[1]), _first, boxes, flips)
    return boxes, flips


def center_boxes(heights, widths, crop_ratio: float = CENTER_CROP_RATIO) -> np.ndarray:
    """The eval centre view of each image as an int32 ``[N, 4]`` ``(y, x, h, w)`` box.

    Cropping this box and resizing it to ``resolution`` equals "resize the shorter side to
    ``resolution / crop_ratio``, centre-crop ``resolution``" up to rounding.
    """
    h, w = _as_sizes(heights, widths)
    boxes = np.zeros((h.size, 4), dtype=np.int32)
    _center_kernel(h, w, float(crop_ratio), boxes)
    return boxes


#: Kinds of view table. ``"rrc"``: boxes inside the image, cropped and resized to the resolution (the
#: ImageNet-style augmentation and its centre view). ``"pad_crop"``: stored-size windows whose corner
#: ``(y, x)`` lies in ``[-pad, pad]^2`` (zero outside the image), not resized: the pad-crop
#: augmentation of small images, replayed with the same pixel op as planned pad-crop.
VIEW_KINDS = ("rrc", "pad_crop")


@dataclass
class FixedViews:
    """``K`` replayable views per sample: ``boxes[i, k]`` = ``(y, x, h, w)`` in stored-image pixels,
    mirrored when ``flips[i, k]``.

    ``kind="rrc"``: crop the box, flip, resize to the loader's resolution (``y, x >= 0``, the box inside
    the image). ``kind="pad_crop"``: the stored-size window at corner ``(y, x)`` (may be negative: the
    zero padding), flip, no resize. The loaders replay a ``"pad_crop"`` table with the pad-crop pixel op
    (geometry ``"pad_crop"``), an ``"rrc"`` table with crop-and-resize (geometry ``"views"``).
    """

    boxes: np.ndarray  # int32 [N, K, 4]
    flips: np.ndarray  # bool [N, K]
    seed: int
    kind: str = "rrc"

    def __post_init__(self):
        self.boxes = np.ascontiguousarray(self.boxes, dtype=np.int32)
        self.flips = np.ascontiguousarray(self.flips, dtype=np.bool_)
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"view kind must be one of {VIEW_KINDS}, got {self.kind!r}")
        if self.boxes.ndim != 3 or self.boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [N, K, 4], got shape {self.boxes.shape}")
        if self.flips.shape != self.boxes.shape[:2]:
            raise ValueError(f"flips must be [N, K] = {self.boxes.shape[:2]}, got {self.flips.shape}")
        if self.boxes.size and self.boxes[..., 2:].min() < 1:
            raise ValueError("boxes need h, w >= 1")
        if self.kind == "rrc" and self.boxes.size and self.boxes[..., :2].min() < 0:
            raise ValueError("'rrc' boxes need y, x >= 0 (negative corners are 'pad_crop' windows)")
        self.seed = int(self.seed)

    @property
    def num_samples(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.boxes.shape[1])

    def choose(self, epoch: int, indices: np.ndarray, occurrence: np.ndarray | None = None) -> np.ndarray:
        """int64 view id per position of an epoch that visits ``indices`` (in order).

        View = ``(view_hash(seed, epoch, index) + occurrence) mod K``, where ``occurrence`` is how many
        times the index already came up earlier in ``indices`` (:func:`occurrences`; pass it when
        ``indices`` is only part of the epoch). Each position is uniform over the ``K`` views, and the
        repeats of an index are spread over them: ``r`` repeats in an epoch get ``min(r, K)`` distinct
        views, each view ``floor(r / K)`` or ``ceil(r / K)`` times. Deterministic for
        ``(seed, epoch, indices)``.
        """
        idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
        occ = occurrences(idx) if occurrence is None else np.ascontiguousarray(occurrence, dtype=np.int64).reshape(-1)
        if occ.shape != idx.shape:
            raise ValueError(f"occurrence has {occ.size} entries for {idx.size} indices")
        out = np.empty(idx.size, dtype=np.int64)
        _choose_kernel(self.seed % 2**63, int(epoch), idx, occ, self.num_views, out)
        return out

    def check_fits(self, heights: np.ndarray, widths: np.ndarray) -> None:
        """Raise if the table does not match the split: an ``"rrc"`` box that leaves its image, or a
        ``"pad_crop"`` window that is not of the stored size or does not overlap the image."""
        if self.num_samples != len(heights):
            raise ValueError(f"FixedViews has {self.num_samples} samples, the split has {len(heights)}")
        b = self.boxes.astype(np.int64)
        hh = np.asarray(heights, dtype=np.int64)[:, None]
        ww = np.asarray(widths, dtype=np.int64)[:, None]
        if self.kind == "rrc":
            bad = (b[..., 0] + b[..., 2] > hh) | (b[..., 1] + b[..., 3] > ww)
            what = "leaves the"
        else:
            bad = (b[..., 2] != hh) | (b[..., 3] != ww) | (np.abs(b[..., 0]) >= hh) | (np.abs(b[..., 1]) >= ww)
            what = "is not a stored-size window overlapping the"
        if bad.any():
            i, v = np.argwhere(bad)[0]
            raise ValueError(f"view {v} of sample {i}: {self.kind} box {self.boxes[i, v].tolist()} {what} "
                             f"{int(hh[i, 0])}x{int(ww[i, 0])} stored image")

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to one compressed ``.npz`` (boxes, flips, seed, kind), atomically."""
        from lfme_fast.io import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                # compressed: a view table is very regular (an 'all' pad-crop table repeats one
                # pattern per image) and is read once per run
                np.savez_compressed(f, boxes=self.boxes, flips=self.flips, seed=np.int64(self.seed),
                                    kind=np.str_(self.kind))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FixedViews":
        with np.load(path) as z:
            kind = str(z["kind"]) if "kind" in z.files else "rrc"  # tables written before kinds existed
            return cls(z["boxes"], z["flips"], int(z["seed"]), kind)


def make_views(heights, widths, k: int, seed: int, include_center: bool = True,
               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> FixedViews:
    """``K`` views per image: view 0 the eval centre view (no flip) when ``include_center``, the
    others RandomResizedCrop boxes + random flips."""
    boxes, flips = sample_rrc_boxes(heights, widths, k, seed, scale, ratio, _first=1 if include_center else 0)
    if include_center:
        boxes[:, 0, :] = center_boxes(heights, widths)
        flips[:, 0] = False
    return FixedViews(boxes, flips, seed)


# Pad-crop views are numbered by a code c in [0, 2 S^2), S = 2 pad + 1: flip = c >= S^2, and
# r = c mod S^2 gives the corner (r // S - pad, r % S - pad). The centre view (0, 0, no flip) has code
# pad * S + pad.
_PAD_VIEW_SALT = np.uint64(0x165667B19E3779F9)


def num_pad_crop_views(pad: int = PAD_CROP_PADDING) -> int:
    """Distinct pad-crop views: ``(2 pad + 1)^2`` corners x 2 flips (162 for pad 4)."""
    return 2 * (2 * int(pad) + 1) ** 2


@njit(cache=True)
def _pad_code_to_view(code, pad, height, width, boxes_row, flips, v):
    span = 2 * pad + 1
    r = code % (span * span)
    boxes_row[0] = r // span - pad
    boxes_row[1] = r % span - pad
    boxes_row[2] = height
    boxes_row[3] = width
    flips[v] = code >= span * span


@njit(cache=True, parallel=True)
def _pad_crop_views_kernel(heights, widths, k, seed, pad, include_center, boxes, flips):
    span = 2 * pad + 1
    total = 2 * span * span
    center = pad * span + pad
    base = _mix64(np.uint64(seed) ^ _PAD_VIEW_SALT)
    for i in prange(heights.shape[0]):
        # K distinct codes per image: the K smallest of one random key per code (a uniform random
        # K-subset in random order); the centre is excluded from the draw when it is view 0.
        keys = np.empty(total, dtype=np.uint64)
        for c in range(total):
            keys[c] = _mix64(base + np.uint64(i) * np.uint64(total) + np.uint64(c))
        if include_center:
            keys[center] = np.uint64(0xFFFFFFFFFFFFFFFF)
        order = np.argsort(keys)
        first = 0
        if include_center:
            _pad_code_to_view(center, pad, heights[i], widths[i], boxes[i, 0], flips[i], 0)
            first = 1
        for v in range(first, k):
            _pad_code_to_view(order[v - first], pad, heights[i], widths[i], boxes[i, v], flips[i], v)


def pad_crop_views(heights, widths, k: int, seed: int, include_center: bool = True,
                   pad: int = PAD_CROP_PADDING) -> FixedViews:
    """``K`` distinct pad-crop views per image (kind ``"pad_crop"``): view 0 the identity window (the
    eval view of small images, no flip) when ``include_center``; the others a seeded uniform draw
    without replacement from the other pad-crop views (corner in ``[-pad, pad]^2``, flip or not).
    Deterministic in ``(seed, image position)``."""
    h, w = _as_sizes(heights, widths)
    total = num_pad_crop_views(pad)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in 1..{total} (the distinct pad-crop views with pad {pad}), got {k}")
    boxes = np.zeros((h.size, k, 4), dtype=np.int32)
    flips = np.zeros((h.size, k), dtype=np.bool_)
    _pad_crop_views_kernel(h, w, int(k), int(seed) % 2**63, int(pad), bool(include_center), boxes, flips)
    return FixedViews(boxes, flips, seed, "pad_crop")


def all_pad_crop_views(heights, widths, seed: int, pad: int = PAD_CROP_PADDING) -> FixedViews:
    """Every distinct pad-crop view of every image (``num_pad_crop_views(pad)`` = 162 for pad 4), view
    0 the identity window. :meth:`FixedViews.choose` picks each position's view uniformly from them,
    i.e. a uniform corner in ``[-pad, pad]^2`` and a fair flip, independently: the distribution of
    :func:`draw_pad_crop`, so distilling over this table is exact for the standard augmentation.

    Views 1..161 are in a seeded random order per image (``pad_crop_views`` with K = all): the
    repeats of an image within an epoch take consecutive views, which are then unrelated crops, not
    a sweep of neighbouring corners."""
    return pad_crop_views(heights, widths, num_pad_crop_views(pad), seed, include_center=True, pad=pad)


# ==================================================================================================
# Normalisation: uint8 HWC -> float32 (x - mean) / std, flipped and laid out in the same pass
# ==================================================================================================

def normalize_coefficients(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """float32 ``[2, 3]``: row 0 the scale ``1 / (255 std)``, row 1 the bias ``-mean / std``, so that
    ``x * scale + bias == (x / 255 - mean) / std`` for a uint8 value ``x``."""
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    return np.stack([1.0 / (255.0 * s), -m / s]).astype(np.float32)


# The per-image kernels index with uint64 arithmetic on purpose: numba adds a negative-index
# wrap-around check to signed indices it cannot prove non-negative (``w - 1 - x``), and that check
# stops LLVM from vectorising the loop. Measured on one 224 px image: 11 us with or without the
# mirror, against 82 us for a lookup-table version and 80-120 us for signed reversed indexing.

@njit(cache=True, inline="always")
def normalize_image(src, coef, dst, flip, channels_last):
    """One image: ``src`` uint8 ``[H, W, 3]`` (C-contiguous) -> ``dst`` float32 ``[3, H, W]`` (or
    ``[H, W, 3]`` when ``channels_last``), mirrored left-right when ``flip``, in one pass."""
    h, w = src.shape[0], src.shape[1]
    rows = src.reshape(h, w * 3)
    s0, s1, s2 = coef[0, 0], coef[0, 1], coef[0, 2]
    b0, b1, b2 = coef[1, 0], coef[1, 1], coef[1, 2]
    three = np.uint64(3)
    last = three * np.uint64(w - 1)
    one, two = np.uint64(1), np.uint64(2)
    if channels_last:
        out = dst.reshape(h, w * 3)
        for y in range(h):
            r = rows[y]
            d = out[y]
            for x in range(w):
                o = three * np.uint64(x)
                i = last - o if flip else o
                d[o] = np.float32(r[i]) * s0 + b0
                d[o + one] = np.float32(r[i + one]) * s1 + b1
                d[o + two] = np.float32(r[i + two]) * s2 + b2
        return
    for y in range(h):
        r = rows[y]
        d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
        if flip:
            for x in range(w):
                i = last - three * np.uint64(x)
                d0[x] = np.float32(r[i]) * s0 + b0
                d1[x] = np.float32(r[i + one]) * s1 + b1
                d2[x] = np.float32(r[i + two]) * s2 + b2
        else:
            for x in range(w):
                i = three * np.uint64(x)
                d0[x] = np.float32(r[i]) * s0 + b0
                d1[x] = np.float32(r[i + one]) * s1 + b1
                d2[x] = np.float32(r[i + two]) * s2 + b2


@njit(cache=True, inline="always")
def copy_image(src, dst, flip):
    """uint8 ``[H, W, 3]`` -> uint8 ``[H, W, 3]``, mirrored left-right when ``flip`` (~4 us per 224 px image)."""
    h, w = src.shape[0], src.shape[1]
    rows = src.reshape(h, w * 3)
    out = dst.reshape(h, w * 3)
    three = np.uint64(3)
    last = three * np.uint64(w - 1)
    one, two = np.uint64(1), np.uint64(2)
    for y in range(h):
        r = rows[y]
        d = out[y]
        if flip:
            for x in range(w):
                o = three * np.uint64(x)
                i = last - o
                d[o] = r[i]
                d[o + one] = r[i + one]
                d[o + two] = r[i + two]
        else:
            for x in range(3 * w):
                d[x] = r[x]


@njit(cache=True, inline="always")
def window_into(src, y, x, dst):
    """``dst[r, c] = src[r + y, c + x]`` for a uint8 ``[H, W, 3]`` ``dst``, zero where that leaves
    ``src``: the compiled twin of :func:`pad_crop_window` (pad-crop windows, identity copies)."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    h, w = src.shape[0], src.shape[1]
    for r in range(out_h):
        sr = r + y
        for c in range(out_w):
            sc = c + x
            if 0 <= sr < h and 0 <= sc < w:
                for ch in range(3):
                    dst[r, c, ch] = src[sr, sc, ch]
            else:
                for ch in range(3):
                    dst[r, c, ch] = 0


@njit(cache=True, parallel=True)
def normalize_batch(src, coef, flips, dst, channels_last):
    """``src`` uint8 ``[N, H, W, 3]`` -> ``dst`` float32 ``[N, 3, H, W]`` (or ``[N, H, W, 3]`` when
    ``channels_last``), image ``i`` mirrored when ``flips[i]``; threads over images."""
    for i in prange(src.shape[0]):
        normalize_image(src[i], coef, dst[i], flips[i], channels_last)


# ==================================================================================================
# Image sizes from JPEG headers (cached)
# ==================================================================================================

def image_sizes(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(heights, widths)`` int32 of every stored image of ``split``, from the JPEG headers.

    Cached in ``DIR/meta/<split>.sizes.npy`` (``[N, 2]``), written atomically; the cache is used when
    it is newer than the split's index and has the right length. Read with the ``"auto"`` JPEG codec
    (:func:`lfme_fast.jpeg.codec`: simplejpeg, else Pillow), whose header sizes are exact either way.
    """
    from lfme_fast.jpeg import codec
    from lfme_fast.shards import ShardReader, index_path

    root = Path(root)
    cache = root / "meta" / f"{split}.sizes.npy"
    ipath = index_path(root, split)
    reader = ShardReader(root, split)
    if cache.exists() and ipath.exists() and cache.stat().st_mtime >= ipath.stat().st_mtime:
        try:
            sizes = np.load(cache)
            if sizes.shape == (len(reader), 2):
                return sizes[:, 0].copy(), sizes[:, 1].copy()
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    sizes = np.empty((len(reader), 2), dtype=np.int32)
    read_header = codec("auto").decode_jpeg_header
    for i in range(len(reader)):
        # The header parse reads a few hundred bytes: ~115k images in about a second (simplejpeg).
        h, w, _, _ = read_header(reader.get_bytes(i))
        sizes[i] = (h, w)
    try:
        atomic_save_npy(cache, sizes)
    except OSError:
        pass  # a read-only dataset directory just means no cache
    return sizes[:, 0].copy(), sizes[:, 1].copy()


def resolve_augment(augment: str, stored_max_side: int) -> str:
    """``'auto'`` -> ``'pad_crop'`` for images of at most 64 px, else ``'imagenet'``; validates names."""
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}")
    if augment == "auto":
        return "pad_crop" if stored_max_side <= SMALL_IMAGE_MAX_SIDE else "imagenet"
    return augment


# ==================================================================================================
# Reference geometry in plain Python: the raw-limit benchmark draws its crops with these, and the
# tests check the compiled draws and the pad-crop kernel against them
# ==================================================================================================

def py_rrc_box(height: int, width: int, rng: random.Random, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` in plain Python: ``(y, x, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def py_center_box(height: int, width: int, crop_ratio: float = CENTER_CROP_RATIO) -> tuple[int, int, int, int]:
    c = max(1, int(crop_ratio * min(height, width)))
    return (height - c) // 2, (width - c) // 2, c, c


def pad_crop_window(image: np.ndarray, y: int, x: int) -> np.ndarray:
    """The stored-size window of ``image`` whose top-left corner is ``(y, x)`` (may be negative or
    leave the image: those pixels are zero) — pad-crop with the offsets of :func:`draw_pad_crop`."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    y0, y1 = max(0, -y), min(h, h - y)
    x0, x1 = max(0, -x), min(w, w - x)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = image[y0 + y:y1 + y, x0 + x:x1 + x]
    return out


# ==================================================================================================
# Planned colour augmentation: SimCLR colour jitter + random grayscale, replayable like the crops
# ==================================================================================================
# The parameters of every position of an epoch are drawn from the same sample_key(seed, epoch, index,
# occurrence) as its crop, through a separate salt (the crop draws stay bit-identical whether colour is
# on or off), and travel in the epoch plan as one float32 row per position (columns below). The pixel
# maths is torchvision's ColorJitter + RandomGrayscale, per pixel on uint8 HWC images after crop/resize
# (:func:`colour_image`, shared by the ffcv, DALI-CPU and torch back ends; :func:`colour_reference` is
# its numpy twin for the tests). Unlike torchvision on uint8, the four ops are chained in float and
# rounded once at the end (torchvision truncates to uint8 after every op on uint8 tensors).

#: Loader ``colour`` settings: no colour augmentation, or SimCLR's (jitter with p 0.8, grayscale p 0.2).
COLOUR_MODES = ("none", "simclr")
#: Columns of one position's colour row (float32 ``[n, COLOUR_COLUMNS]``, see :func:`draw_colour`):
#: jitter applied (0/1), brightness / contrast / saturation factors, hue shift (turns), grayscale
#: (0/1), op order code (slot ``s`` runs op ``(code >> 2 s) & 3``).
COLOUR_APPLY, COLOUR_BRIGHTNESS, COLOUR_CONTRAST, COLOUR_SATURATION, COLOUR_HUE, COLOUR_GRAY, COLOUR_ORDER = range(7)
COLOUR_COLUMNS = 7
#: Op ids, torchvision ColorJitter's numbering (its ``fn_idx``); op ``k``'s parameter is column ``1 + k``.
OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE = range(4)
#: Order code of brightness, contrast, saturation, hue (the row of a position without jitter).
IDENTITY_ORDER = OP_BRIGHTNESS | OP_CONTRAST << 2 | OP_SATURATION << 4 | OP_HUE << 6
#: SimCLR at strength 1: brightness, contrast, saturation 0.8, hue 0.2 (scaled by the strength).
SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)
SIMCLR_P_JITTER = 0.8
SIMCLR_P_GRAY = 0.2
#: Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_COLOUR_SALT = np.uint64(0x3C6EF372FE94F82B)  # SHA-512 H2; _AUGMENT_SALT above is H0


def check_colour(colour: str, strength: float) -> None:
    """Validate the loader's ``colour`` / ``colour_strength`` pair (raise ValueError naming the bad one)."""
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour must be one of {COLOUR_MODES}, got {colour!r}")
    # hue = 0.2 * strength must stay a fraction of a half turn, as torchvision requires (|hue| <= 0.5)
    if not (isinstance(strength, (int, float)) and 0.0 <= float(strength) <= 2.5):
        raise ValueError(f"colour_strength must be a number in [0, 2.5], got {strength!r}")


@njit(cache=True, parallel=True)
def _draw_colour_kernel(seed, epoch, indices, occ, lo, hi, hue, p_jitter, p_gray, out):
    perm = np.empty((indices.shape[0], 4), dtype=np.int64)
    for p in prange(indices.shape[0]):
        state = _mix64(np.uint64(sample_key(seed, epoch, indices[p], occ[p])) ^ _COLOUR_SALT)
        state, u_apply = _next_uniform(state)
        state, u_b = _next_uniform(state)
        state, u_c = _next_uniform(state)
        state, u_s = _next_uniform(state)
        state, u_h = _next_uniform(state)
        # torchvision draws a random op order per call (torch.randperm(4)): Fisher-Yates over 4 slots
        for k in range(4):
            perm[p, k] = k
        for k in range(3, 0, -1):
            state, u = _next_uniform(state)
            j = int(u * (k + 1))
            t = perm[p, k]
            perm[p, k] = perm[p, j]
            perm[p, j] = t
        state, u_gray = _next_uniform(state)
        row = out[p]
        row[COLOUR_GRAY] = 1.0 if u_gray < p_gray else 0.0
        if u_apply < p_jitter:
            row[COLOUR_APPLY] = 1.0
            row[COLOUR_BRIGHTNESS] = lo[0] + (hi[0] - lo[0]) * u_b
            row[COLOUR_CONTRAST] = lo[1] + (hi[1] - lo[1]) * u_c
            row[COLOUR_SATURATION] = lo[2] + (hi[2] - lo[2]) * u_s
            row[COLOUR_HUE] = hue * (2.0 * u_h - 1.0)
            row[COLOUR_ORDER] = perm[p, 0] | perm[p, 1] << 2 | perm[p, 2] << 4 | perm[p, 3] << 6
        else:  # the identity parameters: a row reads the same whether or not one checks the flag
            row[COLOUR_APPLY] = 0.0
            row[COLOUR_BRIGHTNESS] = 1.0
            row[COLOUR_CONTRAST] = 1.0
            row[COLOUR_SATURATION] = 1.0
            row[COLOUR_HUE] = 0.0
            row[COLOUR_ORDER] = IDENTITY_ORDER


def draw_colour(indices, seed: int, epoch: int, strength: float = 1.0, p_jitter: float = SIMCLR_P_JITTER,
                p_gray: float = SIMCLR_P_GRAY, view: int = 0, occurrence: np.ndarray | None = None) -> np.ndarray:
    """SimCLR colour parameters for every position of an epoch that visits ``indices``: float32
    ``[n, COLOUR_COLUMNS]`` (columns ``COLOUR_*``).

    With probability ``p_jitter`` a position gets torchvision ``ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)``
    parameters (``s = strength``): brightness, contrast and saturation factors uniform in
    ``[max(0, 1 - 0.8 s), 1 + 0.8 s]``, a hue shift uniform in ``[-0.2 s, 0.2 s]`` and a uniformly
    random order of the four ops; otherwise the identity row. Independently, grayscale with
    probability ``p_gray``. Position ``p`` draws from :func:`sample_key` ``(seed, epoch, indices[p],
    occurrence)`` with its own salt, so the crop draws of :func:`draw_rrc` / :func:`draw_pad_crop` are
    unchanged by it. ``view`` and ``occurrence`` as for :func:`draw_rrc`.
    """
    check_colour("simclr", strength)
    if not (0.0 <= p_jitter <= 1.0 and 0.0 <= p_gray <= 1.0):
        raise ValueError(f"p_jitter and p_gray must be probabilities, got {p_jitter}, {p_gray}")
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    amounts = np.asarray(SIMCLR_JITTER, dtype=np.float64) * float(strength)
    lo = np.maximum(0.0, 1.0 - amounts[:3])
    hi = 1.0 + amounts[:3]
    out = np.empty((idx.size, COLOUR_COLUMNS), dtype=np.float32)
    occ = view_occurrences(idx, view, occurrence)
    _draw_colour_kernel(int(seed) % 2**63, int(epoch), idx, occ, lo, hi, float(amounts[3]), float(p_jitter),
                        float(p_gray), out)
    return out


# The kernel works one image row at a time on three float32 planes (r, g, b) of one row: each op is
# then a branch-free loop over the row that LLVM vectorises, and the row stays in L1 cache. A
# per-pixel version (each pixel through the op chain, with a branchy HSV conversion) measured
# 2.5-4.4 ms per 224 px image on one core; this one 0.45-0.52 ms (0.08 ms for grayscale alone).
# float32 differs from the float64 reference by at most one grey level (rounding).

@njit(cache=True, inline="always")
def _load_row(src, r, g, b):
    """Interleaved uint8 RGB row (flat, ``3 W``) -> float32 planes (uint64 indices: see normalize_image)."""
    three, one, two = np.uint64(3), np.uint64(1), np.uint64(2)
    for x in range(r.shape[0]):
        i = three * np.uint64(x)
        r[x] = np.float32(src[i])
        g[x] = np.float32(src[i + one])
        b[x] = np.float32(src[i + two])


@njit(cache=True, inline="always")
def _clip255(v):
    return min(max(v, np.float32(0.0)), np.float32(255.0))


@njit(cache=True, inline="always")
def _luma(r, g, b):
    return np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b


@njit(cache=True, inline="always")
def _hsv_channel(maxc, chroma, h6, n):
    """Channel ``n`` (5: red, 3: green, 1: blue) of the HSV colour (hue ``h6`` in sextants, value
    ``maxc``, chroma ``maxc - min``): ``maxc - chroma * clip(min(k, 4 - k), 0, 1)``, ``k = (n + h6) mod 6``,
    the branch-free form of the six-sector table of torchvision's ``_hsv2rgb``."""
    k = np.float32(n) + h6
    if k >= np.float32(6.0):
        k -= np.float32(6.0)
    return maxc - chroma * min(max(min(k, np.float32(4.0) - k), np.float32(0.0)), np.float32(1.0))


@njit(cache=True, inline="always")
def _hue_row(r, g, b, shift):
    """torchvision's ``adjust_hue`` on one row: RGB -> HSV, ``h = (h + shift) mod 1``, back to RGB.
    Grey pixels (no chroma) come back unchanged whatever their hue."""
    for x in range(r.shape[0]):
        rr, gg, bb = r[x], g[x], b[x]
        maxc = max(rr, max(gg, bb))
        chroma = maxc - min(rr, min(gg, bb))
        safe = chroma if chroma > np.float32(0.0) else np.float32(1.0)
        hr = (gg - bb) / safe
        hg = np.float32(2.0) + (bb - rr) / safe
        hb = np.float32(4.0) + (rr - gg) / safe
        h = hr if maxc == rr else (hg if maxc == gg else hb)  # in [-1, 5) sextants
        h = h / np.float32(6.0) + shift
        h6 = (h - np.floor(h)) * np.float32(6.0)  # [0, 6]
        r[x] = _hsv_channel(maxc, chroma, h6, 5)
        g[x] = _hsv_channel(maxc, chroma, h6, 3)
        b[x] = _hsv_channel(maxc, chroma, h6, 1)


@njit(cache=True, inline="always")
def _op_row(op, factor, mean, r, g, b):
    """One ColorJitter op on one row (0..255 float32 planes), clipped like torchvision's ``_blend``."""
    f = np.float32(factor)
    if op == OP_HUE:
        _hue_row(r, g, b, f)
        return
    for x in range(r.shape[0]):
        if op == OP_BRIGHTNESS:
            m = np.float32(0.0)
        elif op == OP_CONTRAST:  # blend with the image's mean grey level
            m = (np.float32(1.0) - f) * mean
        else:  # saturation: blend with the pixel's own grey level
            m = (np.float32(1.0) - f) * _luma(r[x], g[x], b[x])
        r[x] = _clip255(f * r[x] + m)
        g[x] = _clip255(f * g[x] + m)
        b[x] = _clip255(f * b[x] + m)


@njit(cache=True)
def _contrast_mean(img, params, code, r, g, b):
    """Mean grey level the contrast op blends with: that of the image as it is when contrast runs,
    i.e. after the ops ordered before it (torchvision computes it on its current input)."""
    before = 0
    while before < 4 and (code >> (2 * before)) & 3 != OP_CONTRAST:
        before += 1
    rows = img.reshape(img.shape[0], img.shape[1] * 3)
    total = 0.0
    for y in range(img.shape[0]):
        _load_row(rows[y], r, g, b)
        for slot in range(before):
            op = (code >> (2 * slot)) & 3
            _op_row(op, params[1 + op], np.float32(0.0), r, g, b)
        row = np.float32(0.0)
        for x in range(r.shape[0]):
            row += _luma(r[x], g[x], b[x])
        total += row
    return np.float32(total / max(1, img.shape[0] * img.shape[1]))


@njit(cache=True)
def colour_image(img, params):
    """Apply one :func:`draw_colour` row to a C-contiguous uint8 ``[H, W, 3]`` RGB image, in place.

    Jitter (when ``params[COLOUR_APPLY]``): the four ops in the row's order, chained in float32 and
    clipped to [0, 255] after each; then grayscale (when ``params[COLOUR_GRAY]``: the luma in all three
    channels); rounded once. One pass over the rows, two when contrast is not the first op (its mean).
    """
    jitter = params[COLOUR_APPLY] != 0
    gray = params[COLOUR_GRAY] != 0
    if not (jitter or gray):
        return
    planes = np.empty((3, img.shape[1]), dtype=np.float32)
    r, g, b = planes[0], planes[1], planes[2]
    code = int(params[COLOUR_ORDER])
    mean = _contrast_mean(img, params, code, r, g, b) if jitter else np.float32(0.0)
    half = np.float32(0.5)
    three, one, two = np.uint64(3), np.uint64(1), np.uint64(2)
    rows = img.reshape(img.shape[0], img.shape[1] * 3)  # images are C-contiguous (crop scratch, batch rows)
    for y in range(img.shape[0]):
        row = rows[y]
        _load_row(row, r, g, b)
        if jitter:
            for slot in range(4):
                op = (code >> (2 * slot)) & 3
                _op_row(op, params[1 + op], mean, r, g, b)
        if gray:
            for x in range(r.shape[0]):
                r[x] = _luma(r[x], g[x], b[x])
            g[:] = r
            b[:] = r
        for x in range(r.shape[0]):  # values are in [0, 255]: truncating v + 0.5 rounds half up
            i = three * np.uint64(x)
            row[i] = np.uint8(_clip255(r[x]) + half)
            row[i + one] = np.uint8(_clip255(g[x]) + half)
            row[i + two] = np.uint8(_clip255(b[x]) + half)


@njit(cache=True, parallel=True)
def colour_batch(images, colour):
    """:func:`colour_image` over a uint8 ``[N, H, W, 3]`` batch with rows ``colour[N, COLOUR_COLUMNS]``,
    in place; threads over images."""
    for i in prange(images.shape[0]):
        colour_image(images[i], colour[i])


# ---- numpy reference (tests): torchvision's formulation, vectorised over the image ----------------

def _luma_np(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * GRAY_WEIGHTS[0] + x[..., 1] * GRAY_WEIGHTS[1] + x[..., 2] * GRAY_WEIGHTS[2]


def _hue_np(x: np.ndarray, shift: float) -> np.ndarray:
    """torchvision's ``_rgb2hsv`` -> hue shift -> ``_hsv2rgb``, on a float [H, W, 3] image in 0..255."""
    rgb = x / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(axis=-1), rgb.min(axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, 1.0, maxc)
    div = np.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = np.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = np.mod(h + shift, 1.0)
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(np.int64) % 6
    v = maxc
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = np.stack([np.stack(c, axis=-1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])  # [6, H, W, 3]
    out = np.take_along_axis(table, i[None, ..., None].repeat(3, axis=-1), axis=0)[0]
    return out * 255.0


def colour_reference(image: np.ndarray, params) -> np.ndarray:
    """numpy reference of :func:`colour_image`: a new uint8 ``[H, W, 3]`` image (the input is kept)."""
    params = np.asarray(params, dtype=np.float64)
    x = np.asarray(image, dtype=np.float64)
    if params[COLOUR_APPLY]:
        code = int(params[COLOUR_ORDER])
        for slot in range(4):
            op = (code >> (2 * slot)) & 3
            f = float(params[1 + op])
            if op == OP_BRIGHTNESS:
                x = np.clip(f * x, 0.0, 255.0)
            elif op == OP_CONTRAST:
                x = np.clip(f * x + (1.0 - f) * _luma_np(x).mean(), 0.0, 255.0)
            elif op == OP_SATURATION:
                x = np.clip(f * x + (1.0 - f) * _luma_np(x)[..., None], 0.0, 255.0)
            else:
                x = _hue_np(x, f)
    if params[COLOUR_GRAY]:
        x = np.repeat(_luma_np(x)[..., None], 3, axis=-1)
    return np.floor(x + 0.5).astype(np.uint8)
