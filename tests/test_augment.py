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
    # a function of (epoch, index, occurrence): index 2's three occurrences walk through three views
    assert c.dtype == np.int64 and c.shape == (5,) and c[3] == (c[0] + 1) % 5 and c[4] == (c[0] + 2) % 5
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


# ---- planned colour augmentation (SimCLR colour jitter + grayscale) --------------------------------

def _colour_row(apply=1, b=1.0, c=1.0, s=1.0, hue=0.0, gray=0, order=(0, 1, 2, 3)):
    code = order[0] | order[1] << 2 | order[2] << 4 | order[3] << 6
    return np.array([apply, b, c, s, hue, gray, code], dtype=np.float32)


def test_draw_colour_per_position_and_simclr_distribution():
    """Colour rows are a function of (seed, epoch, index, occurrence) like the crops, with SimCLR's
    distribution: jitter p 0.8 (brightness/contrast/saturation ~ U[0.2, 1.8], hue ~ U[-0.2, 0.2], a
    uniform op order), grayscale p 0.2 independently; rows without jitter are the identity."""
    from lfme_fast.augment import IDENTITY_ORDER, draw_colour

    idx = np.concatenate([np.arange(50), np.arange(10)])  # 0..9 twice
    c = draw_colour(idx, seed=3, epoch=1)
    assert c.dtype == np.float32 and c.shape == (60, 7)
    np.testing.assert_array_equal(c, draw_colour(idx, seed=3, epoch=1))
    np.testing.assert_array_equal(draw_colour(idx[40:50], seed=3, epoch=1), c[40:50])  # position = (index, occ)
    assert (c[50:] != c[:10]).any(axis=1).sum() >= 9  # a repeat draws afresh
    assert (draw_colour(idx, seed=3, epoch=2) != c).any(axis=1).sum() >= 55
    assert (draw_colour(idx, seed=4, epoch=1) != c).any(axis=1).sum() >= 55

    big = draw_colour(np.arange(200_000), seed=0, epoch=0)
    on = big[:, 0] == 1
    assert set(np.unique(big[:, 0])) == {0.0, 1.0} and set(np.unique(big[:, 5])) == {0.0, 1.0}
    assert abs(on.mean() - 0.8) < 0.005
    assert abs(big[:, 5].mean() - 0.2) < 0.005
    assert abs(big[on, 5].mean() - 0.2) < 0.006 and abs(big[~on, 5].mean() - 0.2) < 0.01  # independent
    for col in (1, 2, 3):
        f = big[on, col]
        assert 0.2 <= f.min() < 0.201 and 1.799 < f.max() <= 1.8
        np.testing.assert_allclose(np.quantile(f, [0.25, 0.5, 0.75]), [0.6, 1.0, 1.4], atol=0.01)  # uniform
    hue = big[on, 4]
    assert -0.2 <= hue.min() < -0.199 and 0.199 < hue.max() <= 0.2 and abs(hue.mean()) < 0.002
    codes = big[on, 6].astype(np.int64)
    perms = np.stack([(codes >> (2 * k)) & 3 for k in range(4)], axis=1)
    assert (np.sort(perms, axis=1) == np.arange(4)).all()  # every order is a permutation of the 4 ops
    counts = np.bincount(np.unique(codes, return_inverse=True)[1])
    assert counts.size == 24 and counts.min() > 0.9 * on.sum() / 24 and counts.max() < 1.1 * on.sum() / 24
    assert abs(np.corrcoef(big[on, 1], big[on, 2])[0, 1]) < 0.01  # factors drawn independently
    np.testing.assert_array_equal(big[~on][:, [1, 2, 3, 4, 6]], [[1, 1, 1, 0, IDENTITY_ORDER]] * int((~on).sum()))

    half = draw_colour(np.arange(20_000), seed=0, epoch=0, strength=0.5)
    hon = half[:, 0] == 1
    assert 0.6 <= half[hon, 1:4].min() < 0.61 and 1.39 < half[hon, 1:4].max() <= 1.4
    assert np.abs(half[hon, 4]).max() <= 0.1
    strong = draw_colour(np.arange(20_000), seed=0, epoch=0, strength=2.0)
    assert strong[:, 1:4].min() >= 0.0 and strong[:, 1:4].max() <= 2.6  # lower bound max(0, 1 - 1.6)
    with pytest.raises(ValueError, match="colour_strength"):
        draw_colour(idx, seed=0, epoch=0, strength=3.0)


def test_check_colour():
    from lfme_fast.augment import check_colour

    check_colour("none", 1.0)
    check_colour("simclr", 0.5)
    with pytest.raises(ValueError, match="colour must be one of"):
        check_colour("autoaugment", 1.0)
    with pytest.raises(ValueError, match="colour_strength"):
        check_colour("simclr", -0.1)


def test_colour_kernel_matches_numpy_reference():
    """colour_image (float32, row planes) against colour_reference (float64, torchvision's HSV
    formulation) for every op order, with and without grayscale: at most one grey level apart."""
    from lfme_fast.augment import colour_batch, colour_image, colour_reference, draw_colour

    rng = np.random.default_rng(0)
    n = 96
    ramp = np.linspace(0, 200, 33)[None, :, None]
    images = np.clip(rng.integers(0, 120, (n, 17, 33, 3)) + ramp, 0, 255).astype(np.uint8)
    images[:, :2] = rng.integers(0, 256, (n, 2, 1, 1))  # grey pixels: no chroma
    images[:, 2, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]  # saturated primaries
    rows = draw_colour(np.arange(n), seed=1, epoch=0, strength=1.5)
    rows[:24, 0] = 1
    rows[:24, 6] = [a | b << 2 | c << 4 | d << 6 for a in range(4) for b in range(4) for c in range(4)
                    for d in range(4) if len({a, b, c, d}) == 4]  # all 24 orders
    out = images.copy()
    colour_batch(out, rows)
    ref = np.stack([colour_reference(images[i], rows[i]) for i in range(n)])
    diff = np.abs(out.astype(np.int64) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert (out != images).any(axis=(1, 2, 3)).sum() >= 0.7 * n  # the jitter really changed the images

    one = images[0].copy()
    colour_image(one, _colour_row(apply=0))
    np.testing.assert_array_equal(one, images[0])  # identity row
    colour_image(one, _colour_row(apply=0, gray=1))
    assert (one[..., 0] == one[..., 1]).all() and (one[..., 1] == one[..., 2]).all()


def test_colour_reference_known_values():
    """The reference against values worked out by hand from torchvision's definitions."""
    from lfme_fast.augment import colour_reference

    px = np.array([[[255, 0, 0], [0, 128, 255], [100, 100, 100]]], dtype=np.uint8)
    # hue + 1/3 turn: red -> green, azure -> (255, 0, 128)-ish magenta-pink; grey unchanged
    out = colour_reference(px, _colour_row(hue=1 / 3))
    np.testing.assert_array_equal(out[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 0, 128])
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])
    np.testing.assert_array_equal(colour_reference(px, _colour_row(b=0.0)), np.zeros_like(px))
    mean = (px.astype(float) @ [0.2989, 0.587, 0.114]).mean()
    np.testing.assert_array_equal(colour_reference(px, _colour_row(c=0.0)), np.full_like(px, round(mean)))
    luma = np.floor(px.astype(float) @ [0.2989, 0.587, 0.114] + 0.5)
    np.testing.assert_array_equal(colour_reference(px, _colour_row(s=0.0)), np.repeat(luma[..., None], 3, -1))
    np.testing.assert_array_equal(colour_reference(px, _colour_row(apply=0, gray=1)),
                                  np.repeat(luma[..., None], 3, -1))
    # order matters: brightness x2 then contrast 0 (the mean of the brightened image) vs the reverse
    bc = colour_reference(px, _colour_row(b=2.0, c=0.0, order=(0, 1, 2, 3)))
    cb = colour_reference(px, _colour_row(b=2.0, c=0.0, order=(1, 0, 2, 3)))
    assert (bc == bc[0, 0]).all() and (cb == cb[0, 0]).all() and bc[0, 0, 0] != cb[0, 0, 0]
    np.testing.assert_array_equal(cb, np.full_like(px, np.floor(min(255.0, 2 * mean) + 0.5)))
