"""Fixed views and RandomResizedCrop geometry (lfme_fast.augment)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import simplejpeg

from lfme_fast.augment import (
    FixedViews,
    center_boxes,
    image_sizes,
    make_views,
    py_center_box,
    py_rrc_box,
    resolve_augment,
    sample_rrc_boxes,
)
from lfme_fast.shards import ShardReader


def test_rrc_boxes_inside_and_torchvision_distribution():
    rng = np.random.default_rng(0)
    h = rng.integers(150, 400, 2000)
    w = rng.integers(150, 400, 2000)
    boxes, flips = sample_rrc_boxes(h, w, k=4, seed=1)
    assert boxes.dtype == np.int32 and boxes.shape == (2000, 4, 4) and flips.shape == (2000, 4)
    y, x, bh, bw = (boxes[..., j].astype(np.int64) for j in range(4))
    assert (y >= 0).all() and (x >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (y + bh <= h[:, None]).all() and (x + bw <= w[:, None]).all()
    frac = (bh * bw) / (h * w)[:, None]
    aspect = bw / bh
    assert frac.min() > 0.07 and aspect.min() > 0.7 and aspect.max() < 1.45
    assert 0.45 < flips.mean() < 0.55
    # same distribution as the plain-Python torchvision port: compare mean area fraction and aspect
    pyrng = random.Random(0)
    ref = [py_rrc_box(int(a), int(b), pyrng) for a, b in zip(h, w)]
    ref_frac = np.mean([r[2] * r[3] / (a * b) for r, a, b in zip(ref, h, w)])
    ref_log_aspect = np.mean([math.log(r[3] / r[2]) for r in ref])
    assert abs(frac.mean() - ref_frac) < 0.02
    assert abs(np.log(aspect).mean() - ref_log_aspect) < 0.02
    # deterministic in the seed, different across seeds
    b2, f2 = sample_rrc_boxes(h, w, k=4, seed=1)
    np.testing.assert_array_equal(boxes, b2)
    np.testing.assert_array_equal(flips, f2)
    assert not np.array_equal(boxes, sample_rrc_boxes(h, w, k=4, seed=2)[0])


def test_rrc_fallback_is_clamped_center_crop():
    # a 10 x 1000 strip: no try can fit an aspect ratio <= 4/3 box of >= 8% area -> fallback
    boxes, _ = sample_rrc_boxes([10], [1000], k=3, seed=0)
    for b in boxes[0]:
        assert tuple(b) == py_rrc_box(10, 1000, random.Random(0)) == (0, (1000 - 13) // 2, 10, 13)


def test_center_boxes_match_ffcv():
    ffcv_rgb = pytest.importorskip("ffcv.fields.rgb_image")
    h = np.array([256, 192, 28, 300])
    w = np.array([192, 256, 28, 301])
    boxes = center_boxes(h, w)
    for i in range(len(h)):
        assert tuple(boxes[i]) == ffcv_rgb.get_center_crop(int(h[i]), int(w[i]), None, 0.875)
        assert tuple(boxes[i]) == py_center_box(int(h[i]), int(w[i]))


def test_make_views_and_choose():
    h = np.array([200, 256, 100])
    w = np.array([256, 180, 100])
    views = make_views(h, w, k=5, seed=7)
    np.testing.assert_array_equal(views.boxes[:, 0], center_boxes(h, w))
    assert not views.flips[:, 0].any()
    assert views.num_views == 5 and views.num_samples == 3
    idx = np.array([2, 0, 1, 2, 2])
    c = views.choose(4, idx)
    assert c.dtype == np.int64 and c.shape == (5,) and c[0] == c[3] == c[4]  # a function of (epoch, index)
    np.testing.assert_array_equal(c, views.choose(4, idx))
    big = np.arange(50_000)
    counts = np.bincount(views.choose(1, big), minlength=5)
    assert counts.min() > 9_500 and counts.max() < 10_500  # uniform over views
    assert (views.choose(1, big) != views.choose(2, big)).mean() > 0.7  # re-drawn every epoch
    assert (views.choose(1, big) == FixedViews(views.boxes, views.flips, 8).choose(1, big)).mean() < 0.3
    no_center = make_views(h, w, k=2, seed=7, include_center=False)
    assert not np.array_equal(no_center.boxes[:, 0], center_boxes(h, w))


def test_fixed_views_validation_and_save(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, K, 4\]"):
        FixedViews(np.zeros((3, 4)), np.zeros((3, 1), bool), 0)
    with pytest.raises(ValueError, match="flips"):
        FixedViews(np.ones((3, 2, 4)), np.zeros((3, 1), bool), 0)
    v = make_views([50, 60], [70, 80], k=3, seed=1)
    v.save(tmp_path / "v.npz")
    w = FixedViews.load(tmp_path / "v.npz")
    np.testing.assert_array_equal(v.boxes, w.boxes)
    np.testing.assert_array_equal(v.flips, w.flips)
    assert w.seed == 1


def test_image_sizes_from_headers_and_cache(synthetic_dir):
    reader = ShardReader(synthetic_dir, "train")
    h, w = image_sizes(synthetic_dir, "train")
    assert (synthetic_dir / "meta" / "train.sizes.npy").exists()
    for i in range(len(reader)):
        img = simplejpeg.decode_jpeg(reader.get_bytes(i).tobytes())
        assert img.shape[:2] == (h[i], w[i])
    assert max(h.max(), w.max()) == 256  # stored at max side 256
    h2, w2 = image_sizes(synthetic_dir, "train")  # from the cache
    np.testing.assert_array_equal(h, h2)
    np.testing.assert_array_equal(w, w2)


def test_resolve_augment():
    assert resolve_augment("auto", 28) == "pad_crop"
    assert resolve_augment("auto", 32) == "pad_crop"
    assert resolve_augment("auto", 256) == "imagenet"
    assert resolve_augment("none", 256) == "none"
    with pytest.raises(ValueError, match="augment must be one of"):
        resolve_augment("mixup", 32)


def test_normalize_batch_matches_numpy():
    """Normalise + mirror + layout in one pass, against numpy (odd width: the mirror's middle column)."""
    from lfme_fast.augment import IMAGENET_MEAN, IMAGENET_STD, normalize_batch, normalize_coefficients

    src = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    ref = (src - np.array(IMAGENET_MEAN) * 255) / (np.array(IMAGENET_STD) * 255)
    flips = np.array([False, True, False])
    ref[1] = ref[1, :, ::-1]
    coef = normalize_coefficients()
    chw = np.empty((3, 3, 5, 7), np.float32)
    normalize_batch(src, coef, flips, chw, False)
    np.testing.assert_allclose(chw, ref.transpose(0, 3, 1, 2), atol=1e-5)
    hwc = np.empty((3, 5, 7, 3), np.float32)
    normalize_batch(src, coef, flips, hwc, True)
    np.testing.assert_allclose(hwc, ref, atol=1e-5)


def test_copy_and_window_kernels_match_numpy():
    from numba import njit

    from lfme_fast.augment import copy_image, pad_crop_window, window_into

    @njit
    def copy(src, dst, flip):
        copy_image(src, dst, flip)

    @njit
    def window(src, y, x, dst):
        window_into(src, y, x, dst)

    src = np.random.default_rng(1).integers(1, 256, (6, 5, 3), dtype=np.uint8)
    for flip in (False, True):
        dst = np.empty_like(src)
        copy(src, dst, flip)
        np.testing.assert_array_equal(dst, src[:, ::-1] if flip else src)
    ref = pad_crop_window(src, -2, 3)
    assert (ref[:2] == 0).all() and (ref[:, 2:] == 0).all()  # rows above / columns right of the image
    np.testing.assert_array_equal(ref[2:, :2], src[:4, 3:])
    for y, x in ((-2, 3), (0, 0), (4, -4), (-6, 0), (1, -1)):
        dst = np.full_like(src, 7)
        window(src, y, x, dst)
        np.testing.assert_array_equal(dst, pad_crop_window(src, y, x), err_msg=str((y, x)))


def test_draw_rrc_and_pad_crop_per_position():
    """Epoch geometry is a function of (seed, epoch, index, occurrence): reproducible, fresh for a
    repeated index, for another epoch and another seed; boxes inside the image; pad offsets in range."""
    from lfme_fast.augment import draw_pad_crop, draw_rrc, occurrences

    rng = np.random.default_rng(0)
    h = rng.integers(100, 300, 50)
    w = rng.integers(100, 300, 50)
    idx = np.concatenate([np.arange(50), np.arange(10)])  # 0..9 twice
    np.testing.assert_array_equal(occurrences(idx), np.r_[np.zeros(50), np.ones(10)])
    b, f = draw_rrc(h, w, idx, seed=3, epoch=1)
    b2, f2 = draw_rrc(h, w, idx, seed=3, epoch=1)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(f, f2)
    assert b.dtype == np.int32 and b.shape == (60, 4) and f.dtype == np.bool_
    assert (b[:, :2] >= 0).all() and (b[:, 2:] >= 1).all()
    assert (b[:, 0] + b[:, 2] <= h[idx]).all() and (b[:, 1] + b[:, 3] <= w[idx]).all()
    assert (b[50:] != b[:10]).any(axis=1).sum() >= 9  # a repeat draws afresh
    assert (draw_rrc(h, w, idx, seed=3, epoch=2)[0] != b).any(axis=1).sum() >= 55
    assert (draw_rrc(h, w, idx, seed=4, epoch=1)[0] != b).any(axis=1).sum() >= 55
    # the same draw whatever else the epoch visits: position p depends on its index and occurrence only
    sub, _ = draw_rrc(h, w, idx[40:50], seed=3, epoch=1)
    np.testing.assert_array_equal(sub, b[40:50])
    area = b[:, 2].astype(float) * b[:, 3] / (h[idx] * w[idx])
    assert 0.07 < area.min() and area.max() <= 1.0  # scale (0.08, 1), up to rounding (rrc_box is tested above)
    assert 15 < f.sum() < 45
    p, pf = draw_pad_crop(np.full(50, 28), np.full(50, 28), idx, seed=0, epoch=0)
    assert p[:, :2].min() == -4 and p[:, :2].max() == 4 and (p[:, 2:] == 28).all()
    assert 15 < pf.sum() < 45
