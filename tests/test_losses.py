"""Tests for lfme_fast.losses: CE family, LFME subset KD, top-k reconstruction, CBD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfme_fast.losses import (
    LossParts,
    balanced_softmax_loss,
    cbd_feature_loss,
    lfme_loss,
    logit_adjusted_loss,
    subset_kd_loss,
    topk_to_dense,
    weighted_cross_entropy,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(b=6, c=10):
    return torch.randn(b, c), torch.randint(0, c, (b,))


# ------------------------------------------------------------------------------------------ CE family


def test_weighted_ce_ones_equals_torch():
    logits, labels = _batch()
    ref = F.cross_entropy(logits, labels)
    torch.testing.assert_close(weighted_cross_entropy(logits, labels).loss, ref)
    parts = weighted_cross_entropy(logits, labels, torch.ones(6))
    torch.testing.assert_close(parts.loss, ref)
    torch.testing.assert_close(parts["ce"], ref)
    assert isinstance(parts, LossParts) and parts["loss"] is parts.loss


def test_weighted_ce_scales_per_sample_terms():
    logits, labels = _batch()
    per = F.cross_entropy(logits, labels, reduction="none")
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.0, 3.0])
    parts = weighted_cross_entropy(logits, labels, w)
    torch.testing.assert_close(parts.loss, (per * w).mean())
    torch.testing.assert_close(parts["ce_per_sample"], per)
    # Zero weight: that sample gets no gradient.
    x = logits.clone().requires_grad_(True)
    weighted_cross_entropy(x, labels, w).loss.backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[4].abs().sum() == 0 and x.grad[1].abs().sum() > 0


def test_weighted_ce_validation():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(logits, labels, torch.ones(5))
    with pytest.raises(ValueError, match="labels"):
        weighted_cross_entropy(logits, labels[:3])
    with pytest.raises(ValueError, match="logits"):
        weighted_cross_entropy(logits[0], labels)


def test_balanced_softmax_equals_logit_adjustment_at_tau1():
    logits, labels = _batch()
    counts = np.array([500, 300, 200, 100, 50, 20, 10, 5, 3, 1])
    bs = balanced_softmax_loss(logits, labels, counts).loss
    la = logit_adjusted_loss(logits, labels, counts, tau=1.0).loss
    torch.testing.assert_close(bs, la)
    ref = F.cross_entropy(logits + torch.log(torch.tensor(counts, dtype=torch.float32)), labels)
    torch.testing.assert_close(bs, ref)
    # tau = 0 is plain CE; tau = 2 differs.
    torch.testing.assert_close(logit_adjusted_loss(logits, labels, counts, tau=0.0).loss,
                               F.cross_entropy(logits, labels))
    assert not torch.allclose(logit_adjusted_loss(logits, labels, counts, tau=2.0).loss, bs)


def test_balanced_softmax_uniform_counts_is_ce():
    logits, labels = _batch()
    out = balanced_softmax_loss(logits, labels, [7] * 10).loss
    torch.testing.assert_close(out, F.cross_entropy(logits, labels))


def test_prior_validation():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="class 3"):
        balanced_softmax_loss(logits, labels, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="class_counts"):
        logit_adjusted_loss(logits, labels, [1, 2, 3])


# ------------------------------------------------------------------------------------------ subset KD


def _kl_by_hand(student, teacher, subset, T):
    """Direct Python loops: sum_j p_t log(p_t / p_s), averaged over rows."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s = [s_row[c] / T for c in subset]
        t = [v / T for v in t_row]
        zs = math.log(sum(math.exp(v) for v in s))
        zt = math.log(sum(math.exp(v) for v in t))
        total += sum(math.exp(tv - zt) * ((tv - zt) - (sv - zs)) for sv, tv in zip(s, t))
    return total / len(student)


def test_kd_zero_when_restricted_student_equals_teacher():
    student = torch.randn(4, 10)
    subset = torch.tensor([7, 2, 5])
    teacher = student[:, subset].clone()
    kd = subset_kd_loss(student, teacher, subset)
    assert abs(kd.item()) < 1e-6
    # Shift invariance: teacher logits + const per row still give 0.
    kd2 = subset_kd_loss(student, teacher + torch.randn(4, 1) * 5, subset)
    assert abs(kd2.item()) < 1e-5


def test_kd_matches_hand_computed_kl_and_official_formula():
    student = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.3, -1.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [-1.0, 1.5]])
    subset = [3, 1]
    T = 2.0
    kd = subset_kd_loss(student, teacher, subset, temperature=T)
    assert kd.dtype == torch.float32
    assert kd.item() == pytest.approx(_kl_by_hand(student, teacher, subset, T), rel=1e-5)
    official = F.kl_div(F.log_softmax(student[:, subset] / T, 1), F.softmax(teacher / T, 1), reduction="batchmean")
    torch.testing.assert_close(kd, official)


def test_kd_t_squared_factor():
    student, teacher, subset = torch.randn(5, 8), torch.randn(5, 3), torch.tensor([0, 4, 6])
    for T in (1.0, 2.0, 4.0):
        plain = subset_kd_loss(student, teacher, subset, temperature=T)
        sq = subset_kd_loss(student, teacher, subset, temperature=T, t_squared=True)
        torch.testing.assert_close(sq, plain * T * T)


def test_kd_gradient_only_on_subset_logits_and_not_teacher():
    student = torch.randn(3, 9, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    subset = torch.tensor([1, 3, 4, 8])
    subset_kd_loss(student, teacher, subset).backward()
    outside = [c for c in range(9) if c not in subset.tolist()]
    assert student.grad[:, outside].abs().sum() == 0
    assert student.grad[:, subset].abs().sum() > 0
    assert teacher.grad is None


def test_kd_mask_keeps_batchmean_normalisation():
    student, teacher, subset = torch.randn(4, 6), torch.randn(4, 2), [0, 5]
    mask = torch.tensor([True, False, True, False])
    masked = subset_kd_loss(student, teacher, subset, mask=mask)
    rows = [subset_kd_loss(student[i:i + 1], teacher[i:i + 1], subset) for i in range(4)]
    torch.testing.assert_close(masked, (rows[0] + rows[2]) / 4)
    torch.testing.assert_close(subset_kd_loss(student, teacher, subset), sum(rows) / 4)


def test_kd_teacher_log_probs_and_minus_inf():
    student, teacher, subset = torch.randn(3, 6), torch.randn(3, 4), [0, 1, 2, 3]
    T = 2.0
    # Target given directly as tempered log-probs gives the same loss.
    target = F.log_softmax(teacher / T, 1)
    torch.testing.assert_close(
        subset_kd_loss(student, target, subset, temperature=T, teacher_is_log_probs=True),
        subset_kd_loss(student, teacher, subset, temperature=T),
    )
    # -inf teacher entries (zero-probability classes) give a finite loss and finite gradients.
    t = teacher.clone()
    t[:, 0] = float("-inf")
    s = student.clone().requires_grad_(True)
    kd = subset_kd_loss(s, t, subset)
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(s.grad).all()


def test_kd_validation():
    student, teacher = torch.randn(2, 5), torch.randn(2, 3)
    with pytest.raises(ValueError, match="columns"):
        subset_kd_loss(student, teacher, [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        subset_kd_loss(student, teacher, [0, 1, 5])
    with pytest.raises(ValueError, match="duplicate"):
        subset_kd_loss(student, teacher, [0, 1, 1])
    with pytest.raises(ValueError, match="temperature"):
        subset_kd_loss(student, teacher, [0, 1, 2], temperature=0.0)
    with pytest.raises(ValueError, match="batch"):
        subset_kd_loss(student, teacher[:1], [0, 1, 2])


def test_lfme_loss_combines_terms():
    student, labels = _batch(b=5, c=8)
    subsets = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    experts = [torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2)]
    v = torch.rand(5)
    w = [1.0, 0.5, 0.0]
    out = lfme_loss(student, labels, v, experts, subsets, w, temperature=2.0)
    kds = [subset_kd_loss(student, e, s) for e, s in zip(experts, subsets)]
    ce = (F.cross_entropy(student, labels, reduction="none") * v).mean()
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["kd"], kds[0] + 0.5 * kds[1])
    torch.testing.assert_close(out.loss, ce + kds[0] + 0.5 * kds[1])
    assert len(out["kd_per_expert"]) == 3
    for a, b in zip(out["kd_per_expert"], kds):
        torch.testing.assert_close(a, b)
    floats = out.to_floats()
    assert set(floats) >= {"loss", "ce", "kd", "kd_per_expert"} and len(floats["kd_per_expert"]) == 3

    # Zero-weighted expert contributes no gradient: the gradient equals the run without it.
    x1 = student.clone().requires_grad_(True)
    lfme_loss(x1, labels, v, experts, subsets, w).loss.backward()
    x2 = student.clone().requires_grad_(True)
    lfme_loss(x2, labels, v, experts[:2], subsets[:2], w[:2]).loss.backward()
    torch.testing.assert_close(x1.grad, x2.grad)

    with pytest.raises(ValueError, match="equal lengths"):
        lfme_loss(student, labels, None, experts, subsets[:2], w)


# ------------------------------------------------------------------------------------------ top-k


def test_topk_full_equals_original():
    logits = torch.randn(4, 7)
    vals, idx = logits.topk(7, dim=1)
    for fill in ("min", "kth", "residual", -3.0):
        torch.testing.assert_close(topk_to_dense(vals, idx, 7, fill=fill), logits)
    # fp16 storage comes back as fp32.
    dense = topk_to_dense(vals.half(), idx.int(), 7)
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense, logits.half().float())


def test_topk_partial_fills():
    logits = torch.randn(3, 10) * 3
    vals, idx = logits.topk(4, dim=1)
    dense = topk_to_dense(vals, idx, 10)
    torch.testing.assert_close(dense.gather(1, idx), vals)
    p = F.softmax(dense / 2.0, 1)
    mask = torch.zeros(3, 10, dtype=torch.bool).scatter_(1, idx, True)
    assert p[~mask].max() < 1e-30  # missing mass ~ 0
    torch.testing.assert_close(p.gather(1, idx), F.softmax(vals / 2.0, 1))
    kth = topk_to_dense(vals, idx, 10, fill="kth")
    assert torch.equal(kth[~mask].view(3, 6), vals[:, -1:].expand(3, 6))
    # residual: exact tail mass on log-probabilities.
    logp = F.log_softmax(logits, 1)
    lv, li = logp.topk(4, dim=1)
    res = topk_to_dense(lv, li, 10, fill="residual")
    torch.testing.assert_close(res.exp().sum(1), torch.ones(3))
    # Usable as KD targets: small loss versus the full teacher.
    student = torch.randn(3, 10)
    assert torch.isfinite(subset_kd_loss(student, dense, torch.arange(10)))


def test_topk_validation():
    vals, idx = torch.randn(2, 3), torch.tensor([[0, 1, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="duplicate"):
        topk_to_dense(vals, idx, 5)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        topk_to_dense(vals, torch.tensor([[0, 1, 5], [0, 1, 2]]), 5)
    with pytest.raises(ValueError, match="k <= num_classes"):
        topk_to_dense(vals, idx, 2)
    with pytest.raises(ValueError, match="fill"):
        topk_to_dense(vals, torch.tensor([[0, 1, 2], [0, 1, 2]]), 5, fill="max")


# ------------------------------------------------------------------------------------------ CBD


def test_cbd_zero_for_identical_features_and_formula():
    f = torch.randn(4, 16)
    out = cbd_feature_loss(f, f * 3.0)  # scale does not matter: features are L2-normalised
    assert abs(out.loss.item()) < 1e-5 and abs(out["cos_distance"].item()) < 1e-6

    s, t = torch.randn(4, 16), torch.randn(4, 16)
    ce = torch.tensor(2.3)
    cos = F.cosine_similarity(s, t, dim=1)
    expected = 0.6 * 2.3 + 0.4 * 100.0 * (1 - cos).mean()
    out = cbd_feature_loss(s, t, alpha=0.4, beta=100.0, ce=ce)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out["feat"], 40.0 * (1 - cos).mean())
    # Without CE: feature term only. Opposite features: distance 2.
    torch.testing.assert_close(cbd_feature_loss(s, -s).loss, torch.tensor(80.0))


def test_cbd_teacher_detached_and_validation():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8, requires_grad=True)
    cbd_feature_loss(s, t).loss.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        cbd_feature_loss(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="alpha"):
        cbd_feature_loss(torch.randn(3, 8), torch.randn(3, 8), alpha=1.5)


# ------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_losses(dtype):
    logits, labels = torch.randn(8, 12) * 4, torch.randint(0, 12, (8,))
    teacher, subset = torch.randn(8, 5) * 4, torch.tensor([0, 3, 5, 9, 11])
    counts = np.arange(1, 13) * 10
    feat_s, feat_t = torch.randn(8, 32), torch.randn(8, 32)
    lo, te = logits.to(dtype), teacher.to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2)

    cases = [
        (weighted_cross_entropy(lo, labels).loss, weighted_cross_entropy(logits, labels).loss),
        (balanced_softmax_loss(lo, labels, counts).loss, balanced_softmax_loss(logits, labels, counts).loss),
        (subset_kd_loss(lo, te, subset), subset_kd_loss(logits, teacher, subset)),
        (lfme_loss(lo, labels, None, [te], [subset], [1.0]).loss,
         lfme_loss(logits, labels, None, [teacher], [subset], [1.0]).loss),
        (cbd_feature_loss(feat_s.to(dtype), feat_t.to(dtype)).loss, cbd_feature_loss(feat_s, feat_t).loss),
    ]
    for got, ref in cases:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, **tol)
    # Computed in fp32 on the rounded inputs: equal to the fp32 computation on upcast inputs.
    torch.testing.assert_close(subset_kd_loss(lo, te, subset), subset_kd_loss(lo.float(), te.float(), subset))
