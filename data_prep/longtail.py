"""Exponential long-tailed profile for balanced datasets (CIFAR-LT, Fashion-MNIST-LT).

Class ``i`` (label order, class 0 largest) keeps ``int(n_max * (1/IR) ** (i / (C - 1)))`` training
images, the profile of the LDAM-DRW code (Cao et al., NeurIPS 2019) that CIFAR-10/100-LT results use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["lt_counts", "select_lt_indices"]


def lt_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Per-class image counts (int64[num_classes]) of the exponential long-tailed profile.

    ``n_max`` images for class 0 down to ``int(n_max / imbalance_ratio)`` for the last class.
    """
    if isinstance(n_max, bool) or not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    ir = float(imbalance_ratio)
    if not np.isfinite(ir) or ir < 1.0:
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    if num_classes == 1:
        return np.array([int(n_max)], dtype=np.int64)
    # Written exactly as the LDAM code does (python floats, then truncation) so counts match published ones.
    factor = 1.0 / ir
    return np.array(
        [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)], dtype=np.int64
    )


def class_order_permutation(num_classes: int, seed: int) -> np.ndarray:
    """The seeded class order of ``--class-order SEED``: ``perm[r]`` is the class given the ``r``-th
    largest count of the profile (rank 0 = the head)."""
    return np.random.default_rng(seed).permutation(num_classes).astype(np.int64)


def select_lt_indices(labels: Any, imbalance_ratio: float = 100, seed: int = 0,
                      class_order: Any = None) -> np.ndarray:
    """Indices of a long-tailed subset of a dataset with integer ``labels`` 0..C-1.

    ``n_max`` is the largest class size; class ``i`` keeps ``lt_counts(n_max, C, IR)[i]`` images, or,
    with ``class_order`` (a permutation of the classes, head first), class ``class_order[r]`` keeps the
    ``r``-th count. One
    ``np.random.default_rng(seed)`` is drawn from class by class in label order: each class's indices are
    permuted and the first ``n_i`` kept. The result is sorted ascending so the original file order is kept.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"labels must be non-negative; found label {int(arr.min())}")
    sizes = np.bincount(arr)
    num_classes = sizes.size
    targets = lt_counts(int(sizes.max()), num_classes, imbalance_ratio)
    if class_order is not None:
        perm = np.asarray(class_order, dtype=np.int64)
        if sorted(perm.tolist()) != list(range(num_classes)):
            raise ValueError(f"class_order must be a permutation of 0..{num_classes - 1}, got {perm.tolist()}")
        by_class = np.empty_like(targets)
        by_class[perm] = targets
        targets = by_class
    short = np.flatnonzero(sizes < targets)
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"class {c} has {int(sizes[c])} images but the imbalance-ratio-{imbalance_ratio} profile needs "
            f"{int(targets[c])} (n_max={int(sizes.max())}; classes must be large enough in label order)"
        )
    rng = np.random.default_rng(seed)
    # stable sort groups indices by class while keeping file order inside each class
    order = np.argsort(arr, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    kept = []
    for c in range(num_classes):
        members = order[starts[c] : starts[c + 1]]
        kept.append(members[rng.permutation(members.size)[: targets[c]]])
    out = np.concatenate(kept)
    out.sort()
    return out.astype(np.int64)
