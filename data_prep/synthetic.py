"""Seeded synthetic JPEGs that follow a real long-tailed histogram, for loader benchmarks at real scale.

No ImageNet/Places images are available here, so prep and loader benchmarks use synthetic images with
realistic geometry (width 400..500, height 300..400, around ImageNet's 500x375) and realistic encoded size
(~110 KB at JPEG quality 90, 4:2:0 chroma subsampling as in camera JPEGs), labelled by the real
ImageNet-LT training histogram shipped in ``histograms/imagenet_lt_train.npy``.

Generation must be much cheaper than the JPEG work being benchmarked, so an image is composed, not
synthesised: a few textured noise tiles are made once per seed; each image is a (possibly flipped)
crop of one tile (vertically flipped or not), chosen and offset by a hash of ``(seed, index)``, plus a class-dependent colour tint
and sinusoidal stripe pattern (so that labels carry a learnable signal). One image costs a uint8
crop-and-add (well under a millisecond) on top of the encode.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "MIN_WIDTH",
    "MAX_WIDTH",
    "MIN_HEIGHT",
    "MAX_HEIGHT",
    "default_histogram",
    "scaled_counts",
    "synthetic_labels",
    "synthetic_image",
    "synthetic_jpeg",
]

MIN_WIDTH, MAX_WIDTH = 400, 500
MIN_HEIGHT, MAX_HEIGHT = 300, 400

_HISTOGRAM_PATH = Path(__file__).resolve().parent / "histograms" / "imagenet_lt_train.npy"

_NUM_TILES = 8
_MAX_OFFSET = 64  # crops start anywhere in [0, _MAX_OFFSET) inside a tile
_TILE_H = MAX_HEIGHT + _MAX_OFFSET
_TILE_W = MAX_WIDTH + _MAX_OFFSET
# Tile pixels stay <= _TILE_MAX and the class pattern <= 255 - _TILE_MAX, so the uint8 sum never wraps.
_TILE_MAX = 191
_PATTERN_MAX = 255 - _TILE_MAX
# Noise levels tuned so that quality-90 4:2:0 encodes average ~110 KB over the size range.
_LUMA_SIGMA = 36.0
_CHROMA_SIGMA = 16.0
_SMOOTH_SIGMA = 30.0
_SMOOTH_CELL = 24  # pixels per cell of the low-frequency structure

_MASK64 = (1 << 64) - 1


def default_histogram() -> np.ndarray:
    """The real ImageNet-LT training histogram (int64[1000], 115,846 images, 5..1280), shipped with the package."""
    if not _HISTOGRAM_PATH.is_file():
        raise FileNotFoundError(f"shipped histogram missing: {_HISTOGRAM_PATH}")
    return np.load(_HISTOGRAM_PATH, allow_pickle=False).astype(np.int64)


def scaled_counts(counts: Any, scale: float) -> np.ndarray:
    """Scale a per-class histogram: each class gets ``max(1, round(c * scale))`` images, ``0 < scale <= 1``."""
    scale_f = float(scale)
    if not (0.0 < scale_f <= 1.0) or math.isnan(scale_f):
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {arr.dtype}")
    if arr.min() < 1:
        bad = int(np.flatnonzero(arr < 1)[0])
        raise ValueError(f"counts must be positive; class {bad} has {int(arr[bad])}")
    return np.maximum(1, np.round(arr.astype(np.float64) * scale_f)).astype(np.int64)


def synthetic_labels(counts: Any, seed: int = 0) -> np.ndarray:
    """Label of every synthetic image: class ``c`` appears ``counts[c]`` times, in a seeded shuffled order.

    Real split lists are not sorted by class, so neither is this.
    """
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"counts must be a non-empty 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.min() < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"counts must be non-negative; class {bad} has {int(arr[bad])}")
    labels = np.repeat(np.arange(arr.size, dtype=np.int64), arr.astype(np.int64))
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer: a cheap, well-spread 64-bit hash (no RNG object per image)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _smooth_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colour structure: bilinear upsampling of a coarse random grid, float32 (h, w, 3)."""
    gh, gw = height // _SMOOTH_CELL + 2, width // _SMOOTH_CELL + 2
    grid = rng.normal(size=(gh, gw, 3)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) / _SMOOTH_CELL
    xs = np.arange(width, dtype=np.float32) / _SMOOTH_CELL
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


@functools.lru_cache(maxsize=4)
def _tiles(seed: int) -> tuple[np.ndarray, ...]:
    """The seed's textured noise tiles (uint8, values 0.._TILE_MAX), made once and cached."""
    rng = np.random.default_rng([seed, 0x5EED])
    tiles = []
    for _ in range(_NUM_TILES):
        base = 96.0 + _SMOOTH_SIGMA * _smooth_field(rng, _TILE_H, _TILE_W)
        # mostly luminance noise (shared by the channels), a little chroma noise, like sensor texture
        luma = rng.normal(scale=_LUMA_SIGMA, size=(_TILE_H, _TILE_W, 1)).astype(np.float32)
        chroma = rng.normal(scale=_CHROMA_SIGMA, size=(_TILE_H, _TILE_W, 3)).astype(np.float32)
        tile = np.clip(base + luma + chroma, 0, _TILE_MAX).astype(np.uint8)
        tile.setflags(write=False)
        tiles.append(tile)
    return tuple(tiles)


@functools.lru_cache(maxsize=4096)
def _class_pattern(label: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent uint8 patterns: a row (1, MAX_WIDTH, 3) and a diagonal source (MAX_WIDTH + MAX_HEIGHT, 3).

    The row holds the class's colour tint plus vertical stripes; the diagonal source, read through a
    strided view (see :func:`_diagonal_view`), gives diagonal stripes. Each class has its own tint, stripe
    frequencies and colour mix; the two patterns sum to at most _PATTERN_MAX per channel.
    """
    rng = np.random.default_rng(_splitmix64(label ^ 0xC1A55))
    tint = rng.uniform(0, 0.4, size=3)
    fx, fd = rng.uniform(1.0, 24.0, size=2)  # stripe cycles across the maximal width / diagonal length
    px, pd = rng.uniform(0, 2 * np.pi, size=2)
    cx, cd = rng.uniform(0, 1, size=(2, 3))
    xs = np.arange(MAX_WIDTH) / MAX_WIDTH
    ds = np.arange(MAX_WIDTH + MAX_HEIGHT) / (MAX_WIDTH + MAX_HEIGHT)
    wave_x = 0.5 * (1 + np.sin(2 * np.pi * fx * xs + px))[:, None] * cx * 0.3
    wave_d = 0.5 * (1 + np.sin(2 * np.pi * fd * ds + pd))[:, None] * cd * 0.3
    row = np.floor(_PATTERN_MAX * (tint + wave_x)).astype(np.uint8)[None, :, :]
    diag = np.ascontiguousarray(np.floor(_PATTERN_MAX * wave_d).astype(np.uint8))
    row.setflags(write=False)
    diag.setflags(write=False)
    return row, diag


def _diagonal_view(diag: np.ndarray, height: int, width: int) -> np.ndarray:
    """Read-only (height, width, 3) view whose pixel (y, x) is ``diag[y + x]``: diagonal stripes, no copy.

    A strided view keeps the add as cheap as a contiguous one (a broadcast along the middle axis is ~30x
    slower in numpy).
    """
    item = diag.strides[1]
    return as_strided(diag, shape=(height, width, 3), strides=(diag.strides[0], diag.strides[0], item), writeable=False)


def _image_params(seed: int, index: int) -> tuple[int, int, int, int, int, bool]:
    """(height, width, tile, dy, dx, flip_y), all a deterministic hash of (seed, index)."""
    h1 = _splitmix64(_splitmix64(seed) ^ index)
    h2 = _splitmix64(h1)
    width = MIN_WIDTH + h1 % (MAX_WIDTH - MIN_WIDTH + 1)
    height = MIN_HEIGHT + (h1 >> 16) % (MAX_HEIGHT - MIN_HEIGHT + 1)
    tile = (h1 >> 32) % _NUM_TILES
    dy = (h2 & 0xFFFF) % _MAX_OFFSET
    dx = (h2 >> 16 & 0xFFFF) % _MAX_OFFSET
    return int(height), int(width), int(tile), int(dy), int(dx), bool(h2 >> 40 & 1)


def synthetic_image(seed: int, index: int, label: int) -> np.ndarray:
    """The synthetic RGB image (uint8, C-contiguous H x W x 3) of image ``index`` with class ``label``.

    Deterministic in ``(seed, index, label)``; the size (width 400..500, height 300..400) and texture depend
    on ``(seed, index)``, a colour tint and stripe pattern on ``label``.
    """
    seed = _check_int("seed", seed)
    index = _check_int("index", index)
    label = _check_int("label", label)
    height, width, tile_id, dy, dx, flip_y = _image_params(seed, index)
    tile = _tiles(seed)[tile_id]
    if flip_y:
        # a vertical flip is a free view; a horizontal one would make the add ~30x slower (negative inner stride)
        tile = tile[::-1]
    crop = tile[dy : dy + height, dx : dx + width]
    row, diag = _class_pattern(label)
    out = np.add(crop, row[:, :width])  # fresh C-contiguous uint8 array; no overflow by construction
    np.add(out, _diagonal_view(diag, height, width), out=out)
    return out


def synthetic_jpeg(seed: int, index: int, label: int, quality: int = 90, codec: str = "auto") -> bytes:
    """JPEG bytes (4:2:0 subsampling) of :func:`synthetic_image`, encoded by the JPEG codec ``codec``
    (:func:`lfme_fast.jpeg.codec`; ``"auto"``: simplejpeg, or Pillow where simplejpeg is not installed)."""
    from lfme_fast import jpeg  # imported lazily: only the JPEG path needs it

    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    image = synthetic_image(seed, index, label)
    return jpeg.codec(codec).encode_jpeg(image, quality=int(quality), colorspace="RGB", colorsubsampling="420")
