"""LFME's two self-paced schedules (ECCV 2020, Sec. 4.2 / 4.3; REFERENCE.md Sec. 1).

* **SpES** (self-paced expert selection): :func:`expert_weight` turns the student's and an expert's
  validation accuracy into the weight ``w_l`` of that expert's distillation loss.
* **SpIS** (self-paced instance selection): :func:`initial_instance_weights` turns each sample's expert
  confidence ``p_i`` into an initial weight ``v_i^(1)``, and :func:`instance_weight` grows it to exactly 1
  by the last epoch along a linear, convex or concave curve. :func:`instance_weight_nb` is the same
  curve as a scalar ``@njit`` function, so the samplers can emit weights in their own hot loop.
* The official code's variant (min-max rescaled confidences, a linear ramp over ``E/2`` epochs that is
  never clamped) is :func:`official_initial_weights` / :func:`official_instance_weight`.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "SCHEDULE_KINDS",
    "SAMPLER_SCHEDULES",
    "schedule_code",
    "expert_weight",
    "instance_weight",
    "instance_weight_nb",
    "initial_instance_weights",
    "official_initial_weights",
    "official_progress",
    "official_instance_weight",
    "mean_shots_per_subset",
]

#: The paper's three schedule shapes (Table 4), in the order of their integer codes 0, 1, 2.
SCHEDULE_KINDS = ("linear", "convex", "concave")
#: What a sampler's ``schedule=`` accepts: the paper's three plus the official code's ramp (code 3).
SAMPLER_SCHEDULES = SCHEDULE_KINDS + ("official",)

_LOG2 = math.log(2.0)


def schedule_code(kind: str) -> int:
    """Integer code of a schedule name for :func:`instance_weight_nb` (index in ``SAMPLER_SCHEDULES``)."""
    try:
        return SAMPLER_SCHEDULES.index(kind)
    except ValueError:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SAMPLER_SCHEDULES}") from None


# --------------------------------------------------------------------------------------------------
# SpES
# --------------------------------------------------------------------------------------------------


def expert_weight(student_acc: float, expert_acc: float, alpha: float = 0.6) -> float:
    """Self-paced expert selection weight ``w_l`` (LFME Sec. 4.2).

    ``w = 1`` while ``student_acc <= alpha * expert_acc``; afterwards it decays linearly,
    ``w = max(0, (expert_acc - student_acc) / (expert_acc * (1 - alpha)))``, reaching 0 when the
    student matches the expert (and staying 0 when it is better). The two branches meet at
    ``student_acc = alpha * expert_acc`` (both give 1), so the weight is continuous.

    Accuracies may be fractions or percentages (the rule is scale-free) but must use the same scale.
    ``expert_acc == 0``: an expert that gets nothing right still "teaches" a student that also gets
    nothing right (first branch, ``0 <= 0``: ``w = 1``); a student with any accuracy is already
    better than it, so ``w = 0`` (the decay formula would divide by zero there).

    ``alpha`` must lie in ``[0, 1)``: at 1 the decay branch divides by zero (the paper's "alpha = 1
    is plain distillation" is the limit ``w = 1`` until the student passes the expert).
    """
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    s, e = float(student_acc), float(expert_acc)
    for name, val in (("student_acc", s), ("expert_acc", e)):
        if not math.isfinite(val) or val < 0.0:
            raise ValueError(f"{name} must be a finite non-negative accuracy, got {val!r}")
    if s <= alpha * e:
        return 1.0
    if e <= 0.0:
        return 0.0
    return max(0.0, (e - s) / (e * (1.0 - alpha)))


# --------------------------------------------------------------------------------------------------
# SpIS: the schedule f(v1, t)
# --------------------------------------------------------------------------------------------------


def _check_progress(progress: Any) -> float:
    t = float(progress)
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    return t


def instance_weight(v1: Any, progress: float, kind: str = "linear") -> Any:
    """Instance weight ``f(v1, t)`` at training progress ``t`` in ``[0, 1]`` (LFME Sec. 4.3, Table 4).

    * ``linear``:  ``(1 - v1) t + v1``
    * ``convex``:  ``1 - (1 - v1) cos(t pi / 2)``
    * ``concave``: ``v1 + (1 - v1) log(1 + t) / log 2`` (the paper's formula line drops the ``+ v1``;
      without it ``f(0) = 0``, contradicting its own "grows from v1 to 1")

    ``f(0) = v1`` and ``f(1) = 1`` exactly: the endpoints are returned directly rather than through the
    formula, because ``cos(pi / 2)`` and ``1 - (1 - v1)`` are not exact in floating point.

    ``v1`` is a float (a float is returned) or an array (an array of the same shape is returned,
    float32 stays float32, anything else becomes float64). ``v1`` is not range-checked.
    """
    t = _check_progress(progress)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
    scalar = np.ndim(v1) == 0 and not isinstance(v1, np.ndarray)
    arr = np.asarray(v1)
    out_dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    a = arr.astype(np.float64)
    if t == 0.0:
        out = a.copy()
    elif t == 1.0:
        out = np.ones_like(a)
    elif kind == "linear":
        out = (1.0 - a) * t + a
    elif kind == "convex":
        out = 1.0 - (1.0 - a) * math.cos(t * math.pi / 2.0)
    else:
        out = a + (1.0 - a) * (math.log1p(t) / _LOG2)
    if scalar:
        return float(out)
    return out.astype(out_dtype, copy=False)


@njit(cache=True)
def instance_weight_nb(v1, t, code):  # pragma: no cover - compiled; tested against instance_weight
    """Scalar ``@njit`` twin of :func:`instance_weight` for sampler hot loops.

    ``code`` is :func:`schedule_code`: 0 linear, 1 convex, 2 concave (``t`` in ``[0, 1]``, endpoints
    exact), 3 official (``v1 + (1 - v1) t`` with ``t`` = :func:`official_progress`, not clamped).
    ``t`` is not validated here: the caller checks it once per epoch, not once per sample.
    """
    if code == 3:
        return v1 + (1.0 - v1) * t
    if t <= 0.0:
        return v1
    if t >= 1.0:
        return 1.0
    if code == 0:
        return (1.0 - v1) * t + v1
    if code == 1:
        return 1.0 - (1.0 - v1) * math.cos(t * math.pi / 2.0)
    return v1 + (1.0 - v1) * (math.log1p(t) / math.log(2.0))


# --------------------------------------------------------------------------------------------------
# SpIS: the initial weights v1
# --------------------------------------------------------------------------------------------------


def mean_shots_per_subset(class_counts: Any, subset_of_class: Any) -> np.ndarray:
    """``mean_shots[l]`` = mean training images per class of subset ``l`` (NaN for an empty subset)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    sub = _as_subset_of_class(subset_of_class)
    if counts.shape != sub.shape:
        raise ValueError(f"class_counts has shape {counts.shape} but subset_of_class has shape {sub.shape}")
    num_subsets = int(sub.max()) + 1 if sub.size else 0
    totals = np.bincount(sub, weights=counts, minlength=num_subsets)
    sizes = np.bincount(sub, minlength=num_subsets).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return totals / sizes


def _as_subset_of_class(subset_of_class: Any) -> np.ndarray:
    sub = np.asarray(subset_of_class)
    if sub.ndim != 1 or not np.issubdtype(sub.dtype, np.integer):
        raise ValueError(f"subset_of_class must be a 1-D integer array (subset index per class), "
                         f"got dtype {sub.dtype} and shape {sub.shape}")
    if sub.size and sub.min() < 0:
        bad = int(np.flatnonzero(sub < 0)[0])
        raise ValueError(f"subset_of_class[{bad}] = {int(sub[bad])} is negative")
    return sub.astype(np.int64)


def _subset_ratio_per_sample(p, labels, subset_of_class, mean_shots):
    """Validate inputs; return (p float64, labels int64, per-sample subset, Nbar_Smin / Nbar_S(i))."""
    p = np.asarray(p, dtype=np.float64)
    labels = np.asarray(labels)
    if p.ndim != 1 or labels.shape != p.shape:
        raise ValueError(f"p and labels must be 1-D arrays of equal length, got shapes {p.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.all(np.isfinite(p)):
        bad = int(np.flatnonzero(~np.isfinite(p))[0])
        raise ValueError(f"p[{bad}] = {p[bad]!r} is not finite")
    sub = _as_subset_of_class(subset_of_class)
    shots = np.asarray(mean_shots, dtype=np.float64)
    if shots.ndim != 1:
        raise ValueError(f"mean_shots must be a 1-D array (one mean per subset), got shape {shots.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= sub.size):
        bad = int(np.flatnonzero((labels < 0) | (labels >= sub.size))[0])
        raise ValueError(f"labels[{bad}] = {int(labels[bad])} is not a class of subset_of_class "
                         f"(0..{sub.size - 1})")
    if sub.size and sub.max() >= shots.size:
        bad = int(np.flatnonzero(sub >= shots.size)[0])
        raise ValueError(f"class {bad} is in subset {int(sub[bad])} but mean_shots has only {shots.size} entries")
    # Only subsets that own a class take part: an empty subset's mean is undefined (NaN) and must
    # not become Nbar_Smin.
    used = np.unique(sub)
    used_shots = shots[used]
    if used.size and not np.all(np.isfinite(used_shots) & (used_shots > 0)):
        bad = int(used[np.flatnonzero(~(np.isfinite(used_shots) & (used_shots > 0)))[0]])
        raise ValueError(f"mean_shots[{bad}] = {shots[bad]!r} must be a positive number (subset {bad} has classes)")
    nbar_min = float(used_shots.min()) if used.size else 1.0
    sample_sub = sub[labels]
    return p, labels.astype(np.int64), sample_sub, nbar_min / shots[sample_sub]


def initial_instance_weights(p: Any, labels: Any, subset_of_class: Any, mean_shots: Any) -> np.ndarray:
    """Initial SpIS weights ``v_i = clip(p_i * Nbar_Smin / Nbar_S(i), 0, 1)`` (float64, one per sample).

    ``p[i]``: the expert's softmax probability of sample ``i``'s true class; ``labels[i]``: its class;
    ``subset_of_class[c]``: the subset of class ``c``; ``mean_shots[l]``: mean images per class of
    subset ``l`` (see :func:`mean_shots_per_subset`). ``Nbar_Smin`` is the smallest mean over the
    subsets that own at least one class.

    Ruling (REFERENCE.md): the paper's formula line writes the ratio inverted (``Nbar_Sl / Nbar_Smin``,
    which is >= 1 and would be clipped to 1 for almost every sample). Its text and intent — "at epoch 1
    each subset softly selects its Nbar_Smin easiest samples" — need ``Nbar_Smin / Nbar_Sl`` <= 1, which
    down-weights the many-shot subsets and leaves the fewest-shot subset at ``p_i``.
    """
    p, _, _, ratio = _subset_ratio_per_sample(p, labels, subset_of_class, mean_shots)
    return np.clip(p * ratio, 0.0, 1.0)


def official_initial_weights(p: Any, labels: Any, subset_of_class: Any, mean_shots: Any) -> np.ndarray:
    """The official code's initial weights: per-class min-max rescale of ``p`` to ``[Nbar_Smin / Nbar_Sl, 1]``.

    For each class ``c`` in subset ``l`` with floor ``f = Nbar_Smin / Nbar_Sl``:
    ``v_i = (p_i - min_c p) / (max_c p - min_c p) * (1 - f) + f``. So the least confident image of every
    class gets ``f`` and the most confident gets 1, whatever their absolute confidences; the fewest-shot
    subset (``f = 1``) is all ones. (The official code hard-codes rounded means 12 / 53 / 230 for
    ImageNet-LT; here the exact ``mean_shots`` are used.)

    NaN fix: when all ``p`` of a class are equal (including a one-image class) the official code divides
    0 by 0 and yields NaN, which poisons the loss. Such a class has no easy-to-hard order to express, so
    all its samples get 1.0 (fully selected, the value the official code would give the most confident
    image).
    """
    p, labels, sample_sub, ratio = _subset_ratio_per_sample(p, labels, subset_of_class, mean_shots)
    out = np.ones_like(p)
    if p.size == 0:
        return out
    num_classes = int(labels.max()) + 1
    # Per-class min / max without a Python loop over classes: scatter with ufunc.at.
    cmin = np.full(num_classes, np.inf)
    cmax = np.full(num_classes, -np.inf)
    np.minimum.at(cmin, labels, p)
    np.maximum.at(cmax, labels, p)
    span = (cmax - cmin)[labels]
    ok = span > 0
    floor = ratio  # Nbar_Smin / Nbar_S(i), per sample
    out[ok] = (p[ok] - cmin[labels][ok]) / span[ok] * (1.0 - floor[ok]) + floor[ok]
    return out


def official_progress(epoch: int, total_epochs: int) -> float:
    """Progress of the official ramp: ``(epoch + 1) / (E / 2)`` for 0-based ``epoch`` in ``[0, E)``.

    The official loop is 1-based (``for epoch in range(1, E + 1)``) and uses ``E / 2`` as the ramp
    length, so this runs from ``2 / E`` to 2 and is deliberately not clamped.
    """
    epoch, total_epochs = int(epoch), int(total_epochs)
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if not (0 <= epoch < total_epochs):
        raise ValueError(f"epoch must be in [0, {total_epochs}), got {epoch}")
    return (epoch + 1) / (total_epochs / 2.0)


def official_instance_weight(v1: Any, epoch: int, total_epochs: int) -> Any:
    """The official code's instance weight: ``v1 + (1 - v1) * (epoch + 1) / (E / 2)``, unclamped.

    Our reading of REFERENCE.md ("the linear schedule over E/2 epochs without clamping, weights reach
    ~2 by the end"), matching the official ``instance_weight_scheduler`` line for line: ``epoch`` is
    0-based here and the official one is 1-based, hence ``epoch + 1``. The weight passes 1 half-way
    through training and ends at ``2 - v1`` on the last epoch. (The official code multiplies the
    student's logits by this weight; applying it is the trainer's business.)

    Floats in, float out; arrays in, array out (float32 stays float32, else float64).
    """
    t = official_progress(epoch, total_epochs)
    scalar = np.ndim(v1) == 0 and not isinstance(v1, np.ndarray)
    arr = np.asarray(v1)
    out_dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    a = arr.astype(np.float64)
    out = a + (1.0 - a) * t
    if scalar:
        return float(out)
    return out.astype(out_dtype, copy=False)
