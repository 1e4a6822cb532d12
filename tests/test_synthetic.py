"""Seeded synthetic JPEGs (data_prep.synthetic)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.synthetic import (
    MAX_HEIGHT,
    MAX_WIDTH,
    MIN_HEIGHT,
    MIN_WIDTH,
    default_histogram,
    scaled_counts,
    synthetic_image,
    synthetic_jpeg,
    synthetic_labels,
)


def test_default_histogram_is_imagenet_lt():
    h = default_histogram()
    assert h.dtype == np.int64 and h.shape == (1000,)
    assert h.sum() == 115846 and h.min() == 5 and h.max() == 1280


def test_scaled_counts():
    h = default_histogram()
    np.testing.assert_array_equal(scaled_counts(h, 1.0), h)
    s = scaled_counts(h, 0.1)
    assert s.dtype == np.int64 and s.min() == 1  # round(0.5) -> 0 is lifted to 1
    np.testing.assert_array_equal(s, np.maximum(1, np.round(h * 0.1)))
    assert scaled_counts(np.array([1280, 5]), 0.01).tolist() == [13, 1]
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            scaled_counts(h, bad)
    with pytest.raises(ValueError, match="class 1"):
        scaled_counts(np.array([3, 0]), 0.5)


def test_synthetic_labels_histogram_and_shuffle():
    counts = scaled_counts(default_histogram(), 0.05)
    labels = synthetic_labels(counts, seed=0)
    assert labels.dtype == np.int64 and labels.size == counts.sum()
    np.testing.assert_array_equal(np.bincount(labels, minlength=counts.size), counts)
    np.testing.assert_array_equal(labels, synthetic_labels(counts, seed=0))
    assert not np.array_equal(labels, synthetic_labels(counts, seed=1))
    # interleaved, not grouped by class: many label changes between neighbours
    assert np.count_nonzero(np.diff(labels)) > 0.9 * labels.size
    with pytest.raises(ValueError):
        synthetic_labels(np.array([2, -1]))


def test_image_deterministic_sized_and_varied():
    a = synthetic_image(0, 7, 3)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, synthetic_image(0, 7, 3))
    shapes = set()
    for i in range(40):
        img = synthetic_image(0, i, i % 10)
        h, w, _ = img.shape
        assert MIN_HEIGHT <= h <= MAX_HEIGHT and MIN_WIDTH <= w <= MAX_WIDTH
        shapes.add((h, w))
        if i != 7 and img.shape == a.shape:
            assert not np.array_equal(img, a)
    assert len(shapes) > 30  # sizes vary from image to image
    b = synthetic_image(0, 8, 3)
    assert b.shape != a.shape or not np.array_equal(a, b)
    c = synthetic_image(1, 7, 3)  # another seed gives another image
    assert c.shape != a.shape or not np.array_equal(a, c)


def test_image_has_class_dependent_component():
    # same index (same texture and size), different labels: images differ, and per-class mean colours
    # are consistent across indices
    x0, x1 = synthetic_image(0, 5, 0), synthetic_image(0, 5, 1)
    assert x0.shape == x1.shape and not np.array_equal(x0, x1)
    means = {lab: np.mean([synthetic_image(0, i, lab).reshape(-1, 3).mean(0) for i in range(8)], axis=0)
             for lab in (0, 1, 2)}
    assert max(np.abs(means[0] - means[1]).max(), np.abs(means[0] - means[2]).max()) > 3.0


def test_jpeg_decodes_to_image_shape_and_is_deterministic():
    data = synthetic_jpeg(0, 11, 42)
    assert data[:2] == b"\xff\xd8"
    assert data == synthetic_jpeg(0, 11, 42)
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.mode == "RGB"
    h, w, _ = synthetic_image(0, 11, 42).shape
    assert img.size == (w, h)
    # lossy but close to the source
    err = np.abs(np.asarray(img, dtype=np.int16) - synthetic_image(0, 11, 42).astype(np.int16)).mean()
    assert err < 20
    assert len(synthetic_jpeg(0, 11, 42, quality=50)) < len(data)
    with pytest.raises(ValueError, match="quality"):
        synthetic_jpeg(0, 11, 42, quality=0)


def test_jpeg_size_is_realistic():
    sizes = [len(synthetic_jpeg(0, i, i * 37 % 1000)) for i in range(50)]
    assert 90_000 <= np.mean(sizes) <= 130_000


def test_rejects_bad_arguments():
    for args in ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 1.5, 0), (True, 0, 0)):
        with pytest.raises(ValueError):
            synthetic_image(*args)
