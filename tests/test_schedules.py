"""LFME's SpES / SpIS schedules (lfme_fast.schedules)."""

import math

import numpy as np
import pytest

from lfme_fast.schedules import (
    SAMPLER_SCHEDULES,
    SCHEDULE_KINDS,
    expert_weight,
    initial_instance_weights,
    instance_weight,
    instance_weight_nb,
    mean_shots_per_subset,
    official_initial_weights,
    official_instance_weight,
    official_progress,
    schedule_code,
)

# v1 values that stress the exact endpoints: tiny, round-off prone, and the extremes.
V1 = np.array([0.0, 1e-20, 1e-9, 0.1, 0.2, 0.3, 1 / 3, 0.7, 0.999999, 1.0])


# ---- SpES ----------------------------------------------------------------------------------------


def test_expert_weight_full_below_alpha():
    assert expert_weight(0.20, 0.50, alpha=0.6) == 1.0
    assert expert_weight(0.30, 0.50, alpha=0.6) == 1.0  # exactly alpha * expert: still the first branch


def test_expert_weight_linear_decay_between():
    # (0.5 - 0.4) / (0.5 * 0.4) = 0.5
    assert expert_weight(0.40, 0.50, alpha=0.6) == pytest.approx(0.5)
    # continuous at the switch point
    assert expert_weight(0.30 + 1e-12, 0.50, alpha=0.6) == pytest.approx(1.0)
    # percent scale gives the same weight
    assert expert_weight(40.0, 50.0, alpha=0.6) == pytest.approx(0.5)


def test_expert_weight_zero_when_student_matches_or_beats_expert():
    assert expert_weight(0.50, 0.50, alpha=0.6) == 0.0
    assert expert_weight(0.70, 0.50, alpha=0.6) == 0.0
    assert expert_weight(0.70, 0.50, alpha=0.3) == 0.0


def test_expert_weight_zero_expert_accuracy():
    assert expert_weight(0.0, 0.0) == 1.0  # nothing learnt on either side: keep distilling
    assert expert_weight(0.1, 0.0) == 0.0  # the student is already better


@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5, float("nan")])
def test_expert_weight_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        expert_weight(0.2, 0.5, alpha=alpha)


def test_expert_weight_rejects_bad_accuracy():
    with pytest.raises(ValueError, match="student_acc"):
        expert_weight(-0.1, 0.5)
    with pytest.raises(ValueError, match="expert_acc"):
        expert_weight(0.1, float("inf"))


# ---- SpIS schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_endpoints_exact(kind):
    np.testing.assert_array_equal(instance_weight(V1, 0.0, kind), V1)
    np.testing.assert_array_equal(instance_weight(V1, 1.0, kind), np.ones_like(V1))
    for v in V1:
        assert instance_weight(float(v), 0.0, kind) == float(v)
        assert instance_weight(float(v), 1.0, kind) == 1.0


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_monotone_in_progress(kind):
    ts = np.linspace(0.0, 1.0, 101)
    w = np.stack([instance_weight(V1, t, kind) for t in ts])
    assert np.all(np.diff(w, axis=0) >= -1e-15)
    # strictly increasing for v1 < 1
    assert np.all(np.diff(w[:, V1 < 0.5], axis=0) > 0)


def test_schedule_values_at_half():
    v1 = 0.2
    assert instance_weight(v1, 0.5, "linear") == pytest.approx(0.6)
    assert instance_weight(v1, 0.5, "convex") == pytest.approx(1 - 0.8 * math.sqrt(0.5))  # 0.434315
    assert instance_weight(v1, 0.5, "concave") == pytest.approx(0.2 + 0.8 * math.log2(1.5))  # 0.667970
    # convex lags linear, concave leads it
    assert instance_weight(v1, 0.5, "convex") < 0.6 < instance_weight(v1, 0.5, "concave")


def test_schedule_types_and_shapes():
    assert isinstance(instance_weight(0.3, 0.5), float)
    a32 = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    out = instance_weight(a32, 0.5, "convex")
    assert out.shape == (2, 2) and out.dtype == np.float32
    assert instance_weight(np.array([0, 1]), 0.5).dtype == np.float64


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan")])
def test_schedule_rejects_bad_progress(t):
    with pytest.raises(ValueError, match="progress"):
        instance_weight(0.5, t, "linear")


def test_schedule_rejects_bad_kind():
    with pytest.raises(ValueError, match="cubic"):
        instance_weight(0.5, 0.5, "cubic")
    with pytest.raises(ValueError, match="cubic"):
        schedule_code("cubic")


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_njit_schedule_matches_numpy(kind):
    code = schedule_code(kind)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        ref = instance_weight(V1, t, kind)
        got = np.array([instance_weight_nb(float(v), t, code) for v in V1])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
        if t in (0.0, 1.0):
            np.testing.assert_array_equal(got, ref)


def test_schedule_codes():
    assert SAMPLER_SCHEDULES[:3] == SCHEDULE_KINDS == ("linear", "convex", "concave")
    assert [schedule_code(k) for k in SAMPLER_SCHEDULES] == [0, 1, 2, 3]


# ---- initial weights -------------------------------------------------------------------------------

# three subsets (many, medium, few) with the ImageNet-LT mean shots; one class per subset
SUBSET_OF_CLASS = np.array([0, 1, 2])
MEAN_SHOTS = np.array([230.0, 53.0, 12.0])


def test_initial_weights_use_smin_over_sl():
    p = np.array([0.9, 0.9, 0.9, 0.5])
    labels = np.array([0, 1, 2, 2])
    v = initial_instance_weights(p, labels, SUBSET_OF_CLASS, MEAN_SHOTS)
    np.testing.assert_allclose(v, [0.9 * 12 / 230, 0.9 * 12 / 53, 0.9, 0.5])
    assert np.all(v <= 1.0)


def test_initial_weights_clip_and_ignore_empty_subsets():
    # subset 3 is empty (NaN mean): it must not become N_Smin
    p = np.array([1.5, -0.2, 0.4])
    labels = np.array([2, 2, 0])
    v = initial_instance_weights(p, labels, SUBSET_OF_CLASS, np.array([230.0, 53.0, 12.0, np.nan]))
    np.testing.assert_allclose(v, [1.0, 0.0, 0.4 * 12 / 230])


def test_initial_weights_bad_inputs():
    with pytest.raises(ValueError, match="labels\\[1\\] = 7"):
        initial_instance_weights([0.5, 0.5], [0, 7], SUBSET_OF_CLASS, MEAN_SHOTS)
    with pytest.raises(ValueError, match="mean_shots\\[1\\]"):
        initial_instance_weights([0.5], [0], SUBSET_OF_CLASS, [230.0, 0.0, 12.0])
    with pytest.raises(ValueError, match="equal length"):
        initial_instance_weights([0.5, 0.4], [0], SUBSET_OF_CLASS, MEAN_SHOTS)
    with pytest.raises(ValueError, match="p\\[0\\]"):
        initial_instance_weights([np.nan], [0], SUBSET_OF_CLASS, MEAN_SHOTS)


def test_mean_shots_per_subset():
    counts = np.array([300, 160, 50, 56, 10, 14])
    sub = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(mean_shots_per_subset(counts, sub), [230.0, 53.0, 12.0])


def test_official_initial_weights_rescale_within_class():
    # class 0 (many): p 0.2 / 0.6 / 1.0 -> [12/230, middle, 1]; class 2 (few): floor 1 -> all ones
    p = np.array([0.2, 0.6, 1.0, 0.3, 0.9])
    labels = np.array([0, 0, 0, 2, 2])
    v = official_initial_weights(p, labels, SUBSET_OF_CLASS, MEAN_SHOTS)
    f = 12 / 230
    np.testing.assert_allclose(v, [f, 0.5 * (1 - f) + f, 1.0, 1.0, 1.0])


def test_official_initial_weights_nan_fix():
    # equal confidences (and a one-image class) give 0/0 in the official code; here 1.0
    p = np.array([0.4, 0.4, 0.4, 0.7])
    labels = np.array([0, 0, 0, 1])
    v = official_initial_weights(p, labels, SUBSET_OF_CLASS, MEAN_SHOTS)
    assert not np.isnan(v).any()
    np.testing.assert_array_equal(v, [1.0, 1.0, 1.0, 1.0])
    # a genuinely spread class next to a constant one is unaffected
    v2 = official_initial_weights([0.4, 0.4, 0.1, 0.5], [0, 0, 1, 1], SUBSET_OF_CLASS, MEAN_SHOTS)
    np.testing.assert_allclose(v2, [1.0, 1.0, 12 / 53, 1.0])


def test_official_instance_weight_unclamped_ramp():
    v1 = np.array([0.1, 0.5, 1.0])
    e_total = 10
    # 0-based epoch e is the official 1-based epoch e + 1, ramp length E/2
    np.testing.assert_allclose(official_instance_weight(v1, 0, e_total), v1 + (1 - v1) * 0.2)
    np.testing.assert_allclose(official_instance_weight(v1, 4, e_total), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(official_instance_weight(v1, 9, e_total), 2.0 - v1)  # ~2 at the end
    assert official_progress(9, 10) == 2.0
    assert isinstance(official_instance_weight(0.1, 3, 10), float)
    with pytest.raises(ValueError, match="epoch"):
        official_instance_weight(v1, 10, 10)
    with pytest.raises(ValueError, match="total_epochs"):
        official_progress(0, 0)
