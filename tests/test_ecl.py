"""Tests for the ECL building blocks (our reading of the ECL abstract, REFERENCE.md Sec. 1): the loss
terms in lfme_fast.losses against slow loop references, and lfme_fast.models.MultiExpert."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lfme_fast.losses import (
    ECLAccuracyEMA,
    balanced_contrastive_loss,
    balanced_softmax_loss,
    ecl_class_weights,
    ecl_feature_kd,
    ecl_loss,
    ecl_online_kd,
    ecl_raw_class_weights,
)
from lfme_fast.models import MultiExpert, count_parameters, resnet10, resnet_small28

M, N, C, D, P = 3, 8, 5, 6, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _stack(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(grad)


def _labels(n=N, c=C):
    return torch.randint(0, c, (n,))


# ----------------------------------------------------------------------------------- slow references


def _ref_kd(g, h, T, w=None):
    """sum_i mean_b w_b T^2 KL(softmax(mean_{j!=i} g_j / T) || softmax(h_i / T)), explicit loops."""
    m, n, _ = g.shape
    per = torch.zeros(m, n, dtype=g.dtype)
    for i in range(m):
        peers = torch.stack([g[j] for j in range(m) if j != i]).mean(0).detach()
        for b in range(n):
            p = torch.softmax(peers[b] / T, 0)
            q = torch.softmax(h[i, b] / T, 0)
            per[i, b] = T * T * (p * (p.log() - q.log())).sum()
    if w is not None:
        per = per * (w if w.dim() == 2 else w[None])
    return per.mean(1).sum()


def _ref_weights(a_lab, a_kd, labels, gamma, kappa):
    raw = [min(max((float(a_lab[y]) / float(a_kd[y])) ** gamma, 1 / kappa), kappa) for y in labels.tolist()]
    mean = sum(raw) / len(raw)
    return torch.tensor([r / mean for r in raw])


def _ref_feat(f):
    m, n, _ = f.shape
    total = 0.0
    for i in range(m):
        peers = torch.stack([f[j] for j in range(m) if j != i]).mean(0).detach()
        total = total + sum(1 - F.cosine_similarity(f[i, b], peers[b], dim=0) for b in range(n)) / n
    return total


def _ref_bcl(z, y, tau, protos=None):
    """Loop form of BCL: class-averaged denominator over the contrast set (anchor excluded)."""
    z = F.normalize(z, dim=1)
    targets, t_lab = list(z), y.tolist()
    if protos is not None:
        targets += list(F.normalize(protos, dim=1))
        t_lab += list(range(protos.shape[0]))
    losses = []
    for i in range(z.shape[0]):
        others = [k for k in range(len(targets)) if k != i]
        by_class: dict[int, list[int]] = {}
        for k in others:
            by_class.setdefault(t_lab[k], []).append(k)
        denom = sum(sum(torch.exp(z[i] @ targets[k] / tau) for k in ks) / len(ks) for ks in by_class.values())
        pos = by_class.get(int(y[i]), [])
        if not pos:
            continue
        losses.append(-sum(torch.log(torch.exp(z[i] @ targets[p] / tau) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses) if losses else torch.zeros(())


# ----------------------------------------------------------------------------------- online KD


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_online_kd_matches_reference(T):
    g, h = _stack(M, N, C), _stack(M, N, C)
    out = ecl_online_kd(g, h, T)
    torch.testing.assert_close(out.loss, _ref_kd(g, h, T))
    assert out["kd_per_sample"].shape == (M, N) and len(out["kd_per_expert"]) == M
    torch.testing.assert_close(sum(out["kd_per_expert"]), out.loss)


def test_online_kd_weights_shared_and_per_expert():
    g, h = _stack(M, N, C), _stack(M, N, C)
    w = torch.rand(N, dtype=torch.float64) + 0.5
    torch.testing.assert_close(ecl_online_kd(g, h, 2.0, w).loss, _ref_kd(g, h, 2.0, w))
    w2 = torch.rand(M, N, dtype=torch.float64) + 0.5
    torch.testing.assert_close(ecl_online_kd(g, h, 2.0, w2).loss, _ref_kd(g, h, 2.0, w2))
    with pytest.raises(ValueError, match="weights"):
        ecl_online_kd(g, h, 2.0, torch.ones(N + 1))


def test_online_kd_gradients_only_into_own_kd_head():
    g, h = _stack(M, N, C, grad=True), _stack(M, N, C, grad=True)
    out = ecl_online_kd(g, h, 2.0)
    out["kd_per_expert"][1].backward()
    assert g.grad is None  # peers' label logits are teachers: detached
    assert h.grad[1].abs().sum() > 0 and h.grad[0].abs().sum() == 0 and h.grad[2].abs().sum() == 0


def test_online_kd_zero_when_h_matches_peer_mean_and_validation():
    g = _stack(2, N, C)
    h = g.flip(0).clone()  # with 2 experts the peer mean of expert i is the other one's logits
    assert float(ecl_online_kd(g, h).loss) < 1e-12
    with pytest.raises(ValueError, match="at least 2 experts"):
        ecl_online_kd(_stack(1, N, C), _stack(1, N, C))
    with pytest.raises(ValueError, match="temperature"):
        ecl_online_kd(g, h, 0.0)
    with pytest.raises(ValueError, match="3-D"):
        ecl_online_kd(g[0], h[0])


def test_online_kd_half_precision_computes_in_fp32():
    g, h = torch.randn(M, N, C), torch.randn(M, N, C)
    out = ecl_online_kd(g.bfloat16(), h.bfloat16())
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ecl_online_kd(g.bfloat16().float(), h.bfloat16().float()).loss)


# ----------------------------------------------------------------------------------- re-weighting


@pytest.mark.parametrize("gamma, kappa", [(1.0, 4.0), (0.5, 2.0), (2.0, 10.0)])
def test_class_weights_match_reference_and_mean_one(gamma, kappa):
    a_lab, a_kd = torch.rand(C) * 0.9 + 0.05, torch.rand(C) * 0.9 + 0.05
    labels = _labels(32)
    w = ecl_class_weights(a_lab, a_kd, labels, gamma, kappa)
    torch.testing.assert_close(w, _ref_weights(a_lab, a_kd, labels, gamma, kappa))
    assert w.shape == (32,) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)
    assert not w.requires_grad


def test_raw_class_weights_clip_bounds_and_zero_guards():
    kappa = 4.0
    a_lab = torch.tensor([0.9, 0.01, 0.5, 0.0, 0.0, 0.3])
    a_kd = torch.tensor([0.01, 0.9, 0.5, 0.0, 0.2, 0.0])
    raw = ecl_raw_class_weights(a_lab, a_kd, 1.0, kappa)
    assert torch.isfinite(raw).all()
    assert float(raw.min()) >= 1 / kappa - 1e-6 and float(raw.max()) <= kappa + 1e-6
    torch.testing.assert_close(raw, torch.tensor([kappa, 1 / kappa, 1.0, 1.0, 1 / kappa, kappa]))
    # After renormalisation the weights keep their ratios, so they stay within a factor kappa^2.
    w = ecl_class_weights(a_lab, a_kd, torch.arange(6), 1.0, kappa)
    assert float(w.max() / w.min()) <= kappa**2 * (1 + 1e-6)
    torch.testing.assert_close(w / w[2], raw / raw[2])


def test_class_weights_gamma_zero_per_expert_and_validation():
    labels = _labels(10)
    assert torch.equal(ecl_class_weights(torch.rand(C), torch.rand(C), labels, gamma=0.0), torch.ones(10))
    a_lab, a_kd = torch.rand(M, C) + 0.1, torch.rand(M, C) + 0.1
    w = ecl_class_weights(a_lab, a_kd, labels)
    assert w.shape == (M, 10)
    torch.testing.assert_close(w.mean(1), torch.ones(M))
    for i in range(M):
        torch.testing.assert_close(w[i], _ref_weights(a_lab[i], a_kd[i], labels, 1.0, 4.0))
    with pytest.raises(ValueError, match="kappa"):
        ecl_class_weights(torch.rand(C), torch.rand(C), labels, kappa=0.5)
    with pytest.raises(ValueError, match="differ"):
        ecl_class_weights(torch.rand(C), torch.rand(C + 1), labels)
    with pytest.raises(ValueError, match="labels"):
        ecl_class_weights(torch.rand(C), torch.rand(C), labels.float())


# ----------------------------------------------------------------------------------- accuracy EMA


def _ref_ema(batches, m, init, mom=0.9):
    a_lab = [[init] * C for _ in range(m)]
    a_kd = [[init] * C for _ in range(m)]
    for pl, pk, y in batches:
        for c in range(C):
            idx = [b for b in range(len(y)) if int(y[b]) == c]
            if not idx:
                continue
            for i in range(m):
                a_lab[i][c] = mom * a_lab[i][c] + (1 - mom) * sum(float(pl[i, b, c]) for b in idx) / len(idx)
                a_kd[i][c] = mom * a_kd[i][c] + (1 - mom) * sum(float(pk[i, b, c]) for b in idx) / len(idx)
    return torch.tensor(a_lab), torch.tensor(a_kd)


def _probs(m=M, n=N):
    return torch.softmax(torch.randn(m, n, C), -1), torch.softmax(torch.randn(m, n, C), -1)


def test_ema_matches_reference_and_keeps_unseen_classes():
    ema = ECLAccuracyEMA(C, M)
    assert torch.allclose(ema.acc_label, torch.full((M, C), 1 / C))
    batches = []
    for step in range(4):
        y = torch.randint(0, C - 1, (N,))  # class C-1 never appears
        pl, pk = _probs()
        batches.append((pl, pk, y))
        ema.update(pl, pk, y)
    ref_lab, ref_kd = _ref_ema(batches, M, 1 / C)
    torch.testing.assert_close(ema.acc_label, ref_lab)
    torch.testing.assert_close(ema.acc_kd, ref_kd)
    assert float(ema.acc_label[0, C - 1]) == pytest.approx(1 / C) and int(ema.seen[C - 1]) == 0
    lab, kd = ema.acc()
    torch.testing.assert_close(lab, ref_lab.mean(0))
    torch.testing.assert_close(ema.acc(per_expert=True)[1], ref_kd)
    # A never-seen class has equal accuracies, hence raw weight 1.
    raw = ecl_raw_class_weights(lab, kd)
    assert float(raw[C - 1]) == pytest.approx(1.0)


def test_ema_stats_reduced_over_two_halves_equal_one_full_batch():
    pl, pk = _probs(n=16)
    y = _labels(16)
    full, split = ECLAccuracyEMA(C, M), ECLAccuracyEMA(C, M)
    full.update(pl, pk, y)
    s1 = split.batch_stats(pl[:, :8], pk[:, :8], y[:8])
    s2 = split.batch_stats(pl[:, 8:], pk[:, 8:], y[8:])
    split.update_from_stats(*(a + b for a, b in zip(s1, s2)))  # what an all-reduce over 2 ranks gives
    torch.testing.assert_close(split.acc_label, full.acc_label)
    torch.testing.assert_close(split.acc_kd, full.acc_kd)


def test_ema_state_round_trip_resumes_exactly():
    ema = ECLAccuracyEMA(C, M, momentum=0.9)
    for _ in range(3):
        ema.update(*_probs(), _labels())
    state = ema.state_dict()
    resumed = ECLAccuracyEMA(C, M, momentum=0.9)
    resumed.load_state_dict(state)
    for t in ("acc_label", "acc_kd", "seen"):
        assert torch.equal(getattr(resumed, t), getattr(ema, t))
    batch = (*_probs(), _labels())
    ema.update(*batch)
    resumed.update(*batch)
    assert torch.equal(resumed.acc_label, ema.acc_label) and torch.equal(resumed.acc_kd, ema.acc_kd)
    y = _labels()
    assert torch.equal(resumed.class_weights(y), ema.class_weights(y))
    state["acc_label"] += 1  # the saved state is a copy, not a view of the live tensors
    assert not torch.equal(ema.acc_label, state["acc_label"])
    with pytest.raises(ValueError, match="momentum"):
        ECLAccuracyEMA(C, M, momentum=0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="shape"):
        ECLAccuracyEMA(C + 1, M).load_state_dict(ema.state_dict())


def test_ema_single_expert_2d_probs_and_validation():
    ema = ECLAccuracyEMA(C)
    pl, pk = torch.softmax(torch.randn(N, C), -1), torch.softmax(torch.randn(N, C), -1)
    ema.update(pl, pk, _labels())
    assert ema.acc_label.shape == (1, C)
    with pytest.raises(ValueError, match="probs_label"):
        ema.update(*_probs(), _labels())  # 3 experts into a 1-expert EMA
    with pytest.raises(ValueError, match="momentum"):
        ECLAccuracyEMA(C, momentum=1.0)


# ----------------------------------------------------------------------------------- feature KD


def test_feature_kd_matches_reference_and_gradients():
    f = _stack(M, N, D, grad=True)
    out = ecl_feature_kd(f)
    torch.testing.assert_close(out.loss, _ref_feat(f))
    out["feat_per_expert"][2].backward()
    assert f.grad[2].abs().sum() > 0 and f.grad[:2].abs().sum() == 0  # peers' mean is detached
    same = torch.randn(1, N, D).expand(M, N, D)
    assert float(ecl_feature_kd(same).loss) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        ecl_feature_kd(_stack(1, N, D))


# ----------------------------------------------------------------------------------- BCL


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_bcl_matches_reference(tau):
    z = _stack(2 * N, P)
    y = _labels(N).repeat(2)  # two views per sample
    out = balanced_contrastive_loss(z, y, tau)
    torch.testing.assert_close(out.loss, _ref_bcl(z, y, tau))
    assert int(out["num_anchors"]) == 2 * N


def test_bcl_with_prototypes_matches_reference():
    z, protos = _stack(2 * N, P), _stack(C, P)
    y = _labels(N).repeat(2)
    torch.testing.assert_close(balanced_contrastive_loss(z, y, 0.1, protos).loss, _ref_bcl(z, y, 0.1, protos))
    with pytest.raises(ValueError, match="prototypes"):
        balanced_contrastive_loss(z, y, 0.1, protos[:2])


def test_bcl_skips_anchors_without_positives_and_normalises():
    z = _stack(4, P)
    y = torch.tensor([0, 0, 1, 2])  # anchors 2 and 3 have no positive
    out = balanced_contrastive_loss(z, y, 0.2)
    assert int(out["num_anchors"]) == 2 and float(out["con_per_sample"][2:].abs().sum()) == 0
    torch.testing.assert_close(out.loss, _ref_bcl(z, y, 0.2))
    torch.testing.assert_close(balanced_contrastive_loss(3 * z, y, 0.2).loss, out.loss)  # scale invariant
    none = balanced_contrastive_loss(z, torch.tensor([0, 1, 2, 3]), 0.2)
    assert float(none.loss) == 0.0


def test_bcl_class_averaging_ignores_how_many_copies_a_negative_class_has():
    """Class-averaging: duplicating every sample of a negative class leaves the loss of the other classes'
    anchors unchanged (the class enters the denominator through its mean), whereas SupCon's sum grows."""
    z = _stack(6, P)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    base = balanced_contrastive_loss(z, y, 0.1)["con_per_sample"]
    z2, y2 = torch.cat([z, z[4:], z[4:]]), torch.cat([y, y[4:], y[4:]])  # class 2 now has 6 rows
    dup = balanced_contrastive_loss(z2, y2, 0.1)["con_per_sample"]
    torch.testing.assert_close(dup[:4], base[:4])

    def supcon(zz, yy):
        zn = F.normalize(zz, dim=1)
        sim = zn @ zn.T / 0.1
        eye = torch.eye(len(yy), dtype=torch.bool)
        pos = (yy[:, None] == yy[None]) & ~eye
        log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), 1, keepdim=True)
        return -(log_prob * pos).sum(1) / pos.sum(1)

    assert (supcon(z2, y2)[:4] > supcon(z, y)[:4]).all()


# ----------------------------------------------------------------------------------- total


def _ecl_inputs(grad=False):
    counts = torch.tensor([50, 20, 10, 5, 2])
    return dict(
        label_logits=_stack(M, N, C, grad=grad), kd_logits=_stack(M, N, C, grad=grad),
        features=_stack(M, N, D, grad=grad), labels=_labels(), class_counts=counts,
    ), dict(proj=_stack(M, 2 * N, P, grad=grad), acc_label=torch.rand(C) + 0.05, acc_kd=torch.rand(C) + 0.05)


def _ref_total(a, k, lk=1.0, lf=1.0, lc=0.5, T=2.0, kd=True, rw=True, feat=True, con=True):
    g, y = a["label_logits"], a["labels"]
    total = sum(balanced_softmax_loss(g[i], y, a["class_counts"]).loss for i in range(M))
    if kd:
        w = _ref_weights(k["acc_label"], k["acc_kd"], y, 1.0, 4.0).double() if rw else None
        total = total + lk * _ref_kd(g, a["kd_logits"], T, w)
    if feat:
        total = total + lf * _ref_feat(a["features"])
    if con:
        total = total + lc * sum(_ref_bcl(k["proj"][i], y.repeat(2), 0.07) for i in range(M))
    return total


def test_ecl_loss_matches_reference_with_all_terms():
    a, k = _ecl_inputs()
    out = ecl_loss(**a, **k, proj_labels=a["labels"].repeat(2), lambda_kd=0.6, lambda_feat=2.0, lambda_con=0.3)
    torch.testing.assert_close(out.loss, _ref_total(a, k, 0.6, 2.0, 0.3))
    for name in ("bs", "kd", "feat", "con"):
        assert name in out and len(out[f"{name}_per_expert"]) == M
    torch.testing.assert_close(out.loss, out["bs"] + out["kd"] + out["feat"] + out["con"])
    assert out["kd_weights"].shape == (N,)
    floats = out.to_floats()
    assert set(floats) >= {"loss", "bs", "kd", "feat", "con", "kd_per_expert"} and "kd_weights" not in floats


@pytest.mark.parametrize("switch", ["kd", "reweight", "feature_kd", "contrastive"])
def test_ecl_loss_switches_remove_their_terms(switch):
    a, k = _ecl_inputs()
    out = ecl_loss(**a, **k, proj_labels=a["labels"].repeat(2), **{switch: False})
    flags = dict(kd=switch != "kd", rw=switch != "reweight", feat=switch != "feature_kd", con=switch != "contrastive")
    torch.testing.assert_close(out.loss, _ref_total(a, k, **flags))
    removed = {"kd": "kd", "reweight": "kd_weights", "feature_kd": "feat", "contrastive": "con"}[switch]
    assert removed not in out


def test_ecl_loss_all_off_is_sum_of_balanced_softmax_and_works_with_one_expert():
    a, k = _ecl_inputs()
    out = ecl_loss(**a, kd=False, feature_kd=False, contrastive=False)
    ref = sum(balanced_softmax_loss(a["label_logits"][i], a["labels"], a["class_counts"]).loss for i in range(M))
    torch.testing.assert_close(out.loss, ref)
    assert set(out.parts) == {"bs", "bs_per_expert"}
    one = ecl_loss(a["label_logits"][:1], None, None, a["labels"], a["class_counts"],
                   kd=False, feature_kd=False, contrastive=False)
    torch.testing.assert_close(one.loss, out["bs_per_expert"][0])


def test_ecl_loss_gradients_reach_the_right_tensors():
    a, k = _ecl_inputs(grad=True)
    out = ecl_loss(**a, **k, proj_labels=a["labels"].repeat(2))
    out["kd"].backward(retain_graph=True)
    assert a["label_logits"].grad is None and a["kd_logits"].grad.abs().sum() > 0
    assert a["features"].grad is None and k["proj"].grad is None
    out["con"].backward(retain_graph=True)
    assert k["proj"].grad.abs().sum() > 0 and a["features"].grad is None
    out["bs"].backward()
    assert a["label_logits"].grad.abs().sum() > 0


def test_ecl_loss_per_expert_weights_and_mean_reduction():
    a, k = _ecl_inputs()
    k["acc_label"], k["acc_kd"] = torch.rand(M, C) + 0.05, torch.rand(M, C) + 0.05
    out = ecl_loss(**a, **k, proj_labels=a["labels"].repeat(2), con_reduction="mean", feature_kd=False)
    assert out["kd_weights"].shape == (M, N)
    w = torch.stack([_ref_weights(k["acc_label"][i], k["acc_kd"][i], a["labels"], 1.0, 4.0) for i in range(M)])
    torch.testing.assert_close(out["kd"], _ref_kd(a["label_logits"], a["kd_logits"], 2.0, w.double()))
    con_sum = ecl_loss(**a, **k, proj_labels=a["labels"].repeat(2), feature_kd=False)["con"]
    torch.testing.assert_close(out["con"] * M, con_sum)


def test_ecl_loss_config_errors_name_the_key():
    a, k = _ecl_inputs()
    one = dict(a, label_logits=a["label_logits"][:1], kd_logits=a["kd_logits"][:1], features=a["features"][:1])
    with pytest.raises(ValueError, match="ecl.kd and ecl.feature_kd need at least 2"):
        ecl_loss(**one, contrastive=False, feature_kd=False, reweight=False)
    with pytest.raises(ValueError, match="lambda_kd"):
        ecl_loss(**a, **k, lambda_kd=-1.0, proj_labels=a["labels"].repeat(2))
    with pytest.raises(ValueError, match="temperature"):
        ecl_loss(**a, **k, temperature=0.0, proj_labels=a["labels"].repeat(2))
    with pytest.raises(ValueError, match="ecl.contrastive"):
        ecl_loss(**a, acc_label=k["acc_label"], acc_kd=k["acc_kd"])
    with pytest.raises(ValueError, match="proj_labels"):
        ecl_loss(**a, **k)  # 2N projection rows, N labels
    with pytest.raises(ValueError, match="ecl.reweight"):
        ecl_loss(**a, proj=k["proj"], proj_labels=a["labels"].repeat(2))
    with pytest.raises(ValueError, match="kappa"):
        ecl_loss(**a, **k, kappa=0.5, proj_labels=a["labels"].repeat(2))


# ----------------------------------------------------------------------------------- MultiExpert


@pytest.mark.parametrize(
    "name, size, stages", [("resnet10", 32, 4), ("resnet32", 16, 3), ("resnet_small28", 28, 3)]
)
@pytest.mark.parametrize("shared", [0, 2])
def test_multi_expert_shapes(name, size, stages, shared):
    model = MultiExpert(name, 7, num_experts=3, shared_stages=shared, feature_dim=32)
    assert model.num_stages == stages
    x = torch.randn(4, 3, size, size)
    out = model(x, with_proj=True)
    assert out.label_logits.shape == (3, 4, 7) and out.kd_logits.shape == (3, 4, 7)
    assert out.features.shape == (3, 4, 32) and out.proj.shape == (3, 4, 128)
    torch.testing.assert_close(out.proj.norm(dim=-1), torch.ones(3, 4))
    assert model(x).proj is None
    assert model.class_prototypes().shape == (3, 7, 128)


def _path_ids(model, i):
    return {id(p) for p in model.expert_parameters(i)}


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_multi_expert_shared_stages_share_parameter_objects(shared):
    model = MultiExpert("resnet_small28", 5, num_experts=3, shared_stages=shared)
    common = _path_ids(model, 0) & _path_ids(model, 1) & _path_ids(model, 2)
    assert common == {id(p) for p in model.shared.parameters()}
    assert bool(common) == (shared > 0)
    # A loss on expert 1 alone reaches the shared trunk and expert 1, never experts 0 and 2.
    out = model(torch.randn(4, 3, 28, 28), experts=[1])
    out.label_logits.sum().backward()
    assert all(p.grad is not None for p in model.experts[1].body.parameters())
    assert all(p.grad is None for i in (0, 2) for p in model.experts[i].parameters())
    assert all(p.grad is not None for p in model.shared.parameters())


def test_multi_expert_experts_differ_at_init():
    model = MultiExpert("resnet32", 5, num_experts=3)
    w = [e.body[0][0].weight for e in model.experts]  # each expert's own stem conv
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert not torch.equal(model.experts[0].label_head.weight, model.experts[1].label_head.weight)
    out = model.eval()(torch.randn(2, 3, 16, 16))
    assert not torch.allclose(out.label_logits[0], out.label_logits[1])


def _head_params(d_in, D, C_, H, P_, kd=True, proj=True):
    neck = d_in * D + 2 * D
    return neck + (2 if kd else 1) * (D * C_ + C_) + ((D * H + H) + 2 * H + (H * P_ + P_) if proj else 0)


@pytest.mark.parametrize("shared", [0, 2, 3])
def test_multi_expert_parameter_counts(shared):
    ref = resnet_small28(5)
    stem = count_parameters(ref.conv1) + count_parameters(ref.bn1)
    stage = [count_parameters(getattr(ref, f"layer{i}")) for i in (1, 2, 3)]
    model = MultiExpert("resnet_small28", 5, num_experts=3, shared_stages=shared)
    trunk = (stem + sum(stage[:shared])) if shared else 0
    own = (0 if shared else stem) + sum(stage[shared:])
    assert count_parameters(model) == trunk + 3 * (own + _head_params(128, 128, 5, 128, 128))
    # Separate backbones: three times the backbone (less its classifier) plus the heads.
    if shared == 0:
        assert count_parameters(model) == 3 * (count_parameters(ref) - count_parameters(ref.fc)
                                               + _head_params(128, 128, 5, 128, 128))
    lean = MultiExpert("resnet_small28", 5, num_experts=2, shared_stages=shared, kd_head=False, proj_head=False,
                       projection=False)
    assert count_parameters(lean) == trunk + 2 * (own + 128 * 5 + 5)
    assert lean(torch.randn(2, 3, 28, 28)).kd_logits is None


def test_multi_expert_resnet10_param_count_separate_backbones():
    ref = resnet10(10)
    model = MultiExpert("resnet10", 10, num_experts=2, feature_dim=64, proj_hidden=32)
    body = count_parameters(ref) - count_parameters(ref.fc)
    assert count_parameters(model) == 2 * (body + _head_params(512, 64, 10, 32, 128))


def test_multi_expert_inference_logits_and_subsets():
    model = MultiExpert("resnet_small28", 6, num_experts=3, shared_stages=1).eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.inference_logits(x), out.label_logits.mean(0))
        torch.testing.assert_close(model.inference_logits(x, experts=[2]), out.label_logits[2])
        torch.testing.assert_close(model.inference_logits(x, experts=[0, 2]), out.label_logits[[0, 2]].mean(0))
    with pytest.raises(ValueError, match="experts"):
        model.inference_logits(x, experts=[3])
    with pytest.raises(ValueError, match="experts"):
        model(x, experts=[1, 1])


def test_multi_expert_channels_last_matches_contiguous():
    model = MultiExpert("resnet_small28", 5, num_experts=2, shared_stages=1).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(x, with_proj=True)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), with_proj=True)
    for a, b in ((ref.label_logits, cl.label_logits), (ref.kd_logits, cl.kd_logits), (ref.proj, cl.proj)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_multi_expert_bad_arguments():
    with pytest.raises(ValueError, match=r"ecl.shared_stages must be an int in \[0, 3\]"):
        MultiExpert("resnet32", 5, shared_stages=4)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        MultiExpert("resnet10", 5, shared_stages=-1)
    with pytest.raises(ValueError, match="num_experts"):
        MultiExpert("resnet_small28", 5, num_experts=0)
    with pytest.raises(ValueError, match="unknown model"):
        MultiExpert("vgg", 5)
    with pytest.raises(ValueError, match="projection=False"):
        MultiExpert("resnet_small28", 5, projection=False, feature_dim=64)
    no_proj = MultiExpert("resnet_small28", 5, num_experts=2, proj_head=False)
    with pytest.raises(ValueError, match="proj_head"):
        no_proj(torch.randn(2, 3, 28, 28), with_proj=True)


def test_multi_expert_trains_with_ecl_loss_end_to_end():
    """One optimiser step on the full ECL loss with two views runs and lowers nothing to NaN."""
    model = MultiExpert("resnet_small28", 4, num_experts=3, shared_stages=1)
    ema = ECLAccuracyEMA(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(6, 3, 28, 28), torch.randint(0, 4, (6,))
    views = torch.cat([x, x.flip(3)])
    out = model(views, with_proj=True)
    parts = ecl_loss(out.label_logits[:, :6], out.kd_logits[:, :6], out.features[:, :6], y, [40, 20, 8, 2],
                     proj=out.proj, proj_labels=y.repeat(2), acc_label=ema.acc()[0], acc_kd=ema.acc()[1])
    parts.loss.backward()
    opt.step()
    ema.update(out.label_logits[:, :6].softmax(-1), out.kd_logits[:, :6].softmax(-1), y)
    assert math.isfinite(float(parts.loss.detach())) and int(ema.seen.sum()) == len(set(y.tolist()))
    assert all(p.grad is not None for n_, p in model.named_parameters()), "an unused parameter would break DDP"
