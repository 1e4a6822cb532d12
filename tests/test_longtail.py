"""Exponential long-tailed profile (data_prep.longtail) on the real Fashion-MNIST labels."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from data_prep.longtail import lt_counts, select_lt_indices

FMNIST_LABELS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
)


@pytest.fixture(scope="module")
def fmnist_labels() -> np.ndarray:
    if not FMNIST_LABELS.is_file():
        pytest.skip("shared Fashion-MNIST not present")
    with gzip.open(FMNIST_LABELS, "rb") as f:
        raw = f.read()
    # idx1 header: magic 0x00000801 then the item count, both big-endian uint32
    magic, count = np.frombuffer(raw[:8], dtype=">u4")
    assert magic == 0x801 and count == 60000
    return np.frombuffer(raw[8:], dtype=np.uint8).astype(np.int64)


def test_profile_fashion_mnist_ratios():
    assert lt_counts(6000, 10, 100).tolist() == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert lt_counts(6000, 10, 50).tolist() == [6000, 3884, 2515, 1628, 1054, 682, 442, 286, 185, 120]
    assert lt_counts(6000, 10, 10).tolist() == [6000, 4645, 3596, 2784, 2156, 1669, 1292, 1000, 774, 600]
    assert lt_counts(6000, 10, 1).tolist() == [6000] * 10
    assert lt_counts(6000, 10, 100).dtype == np.int64


def test_profile_matches_published_cifar_lt():
    # CIFAR-10-LT IR 100 (LDAM-DRW): 12,406 images; CIFAR-100-LT IR 100: 10,847 images
    c10 = lt_counts(5000, 10, 100)
    assert c10.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    c100 = lt_counts(500, 100, 100)
    assert c100.sum() == 10847 and c100[0] == 500 and c100[-1] == 5
    assert np.all(np.diff(c100) <= 0)


@pytest.mark.parametrize(
    "args, match",
    [((0, 10, 100), "n_max"), ((6000, 0, 100), "num_classes"), ((6000, 10, 0.5), "imbalance_ratio"),
     ((6000, 10, float("nan")), "imbalance_ratio"), ((6000.0, 10, 100), "n_max")],
)
def test_profile_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        lt_counts(*args)


@pytest.mark.parametrize("ratio", [100, 50, 10])
def test_select_real_fashion_mnist(fmnist_labels, ratio):
    idx = select_lt_indices(fmnist_labels, imbalance_ratio=ratio, seed=0)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted ascending, no duplicates: file order preserved
    assert idx.min() >= 0 and idx.max() < fmnist_labels.size
    per_class = np.bincount(fmnist_labels[idx], minlength=10)
    np.testing.assert_array_equal(per_class, lt_counts(6000, 10, ratio))


def test_select_deterministic_and_seed_dependent(fmnist_labels):
    a = select_lt_indices(fmnist_labels, 100, seed=0)
    b = select_lt_indices(fmnist_labels, 100, seed=0)
    c = select_lt_indices(fmnist_labels, 100, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.size == c.size == 14886
    assert not np.array_equal(a, c)
    # the largest class is kept whole whatever the seed
    np.testing.assert_array_equal(a[fmnist_labels[a] == 0], np.flatnonzero(fmnist_labels == 0))


def test_select_small_and_errors():
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 1])  # 4 and 4
    idx = select_lt_indices(labels, imbalance_ratio=4, seed=3)
    assert np.bincount(labels[idx]).tolist() == [4, 1]
    with pytest.raises(ValueError, match="class 1 has 2 images but .* needs 3"):
        select_lt_indices(np.array([0, 0, 0, 0, 1, 1]), imbalance_ratio=1.2)
    with pytest.raises(ValueError, match="non-negative"):
        select_lt_indices(np.array([0, -1]))
    with pytest.raises(ValueError, match="integers"):
        select_lt_indices(np.array([0.0, 1.0]))
