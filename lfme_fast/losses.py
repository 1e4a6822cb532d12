"""Loss functions for lfme_fast: pure functions over logits/features.

Every function computes in float32 (float64 inputs stay float64) whatever the input dtype, so bf16/fp16
autocast outputs give the same losses as an fp32 run up to the inputs' own rounding. Functions that
return several named terms return a ``LossParts``; ``subset_kd_loss`` returns a scalar tensor.

Contents
--------
* ``weighted_cross_entropy``: ``mean_i v_i CE_i`` (LFME's self-paced instance selection weights v_i
  multiply each sample's CE).
* ``balanced_softmax_loss`` (Ren et al. 2020) and ``logit_adjusted_loss`` (Menon et al. 2021):
  CE on ``logits + log prior`` / ``logits + tau * log prior``. Softmax is shift invariant, so the two
  coincide at ``tau = 1`` (log counts vs. log normalised counts differ by a constant).
* ``subset_kd_loss``: LFME's per-expert distillation term (REFERENCE.md Sec. 1).
* ``lfme_loss``: ``mean_i v_i CE_i + sum_l w_l KD_l``.
* ``topk_to_dense``: rebuilds dense expert logits from stored top-k (values, indices) pairs.
* ``cbd_feature_loss``: CBD's ``(1 - a) CE + a b (1 - cos(f_s, f_t))``.
* ECL (our reading of the ECL abstract, REFERENCE.md Sec. 1; NCL supplies the defaults):
  ``ecl_online_kd``, ``ecl_class_weights`` (+ ``ecl_raw_class_weights``, ``ECLAccuracyEMA``),
  ``ecl_feature_kd``, ``balanced_contrastive_loss`` (BCL) and the total ``ecl_loss``.

Which samples each KD term covers
---------------------------------
LFME's total loss (paper Sec. 4.3) is ``sum_i v_i CE(x_i) + sum_l sum_i w_l KD_l(x_i)``: every expert
is distilled on *every* sample of the batch, including samples whose class is not in its subset, and
the paper's Sec. 4.4 says so on purpose (a many-shot image fed to the few-shot expert yields soft
targets over the few-shot classes that regularise those classifier rows). The official code does the
same. So ``subset_kd_loss`` covers all samples by default; its optional ``mask`` restricts a term to
some samples for ablations (e.g. "expert l only on images of S_l"), keeping the batch-mean
normalisation (masked-out samples contribute 0, the sum is still divided by the batch size) so that
masked and unmasked terms are on the same scale as the paper's sum over i.

KD value convention
-------------------
The paper writes KD_l as the cross-entropy ``H(tau(z_l), tau(z_hat_l))``; the official code uses
``kl_div(log_softmax(s[:, S_l] / T), softmax(t / T), reduction="batchmean")``. The two differ by the
teacher's entropy, a constant w.r.t. the student, so gradients are identical. We return the KL (zero
when the student matches the teacher), without the ``T^2`` factor unless ``t_squared=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LossParts",
    "weighted_cross_entropy",
    "balanced_softmax_loss",
    "logit_adjusted_loss",
    "subset_kd_loss",
    "lfme_loss",
    "topk_to_dense",
    "cbd_feature_loss",
    "ecl_online_kd",
    "ecl_raw_class_weights",
    "ecl_class_weights",
    "ecl_feature_kd",
    "balanced_contrastive_loss",
    "ECLAccuracyEMA",
    "ecl_loss",
    "TOPK_FILL_MARGIN",
]

# ``topk_to_dense(fill="min")`` puts missing classes this far below the row's smallest kept logit:
# exp(-1e4 / T) underflows to exactly 0 in fp32 for any T < ~100, yet the value stays finite in fp16
# (|x| < 65504 for logits of ordinary size) and under division by T, unlike -inf or finfo.min.
TOPK_FILL_MARGIN = 1.0e4


@dataclass(frozen=True)
class LossParts:
    """A loss and its named components.

    ``loss`` is the scalar to back-propagate. ``parts`` maps component names to tensors (still attached
    to the graph, so a caller may reuse one, e.g. CBD's CE) or lists of tensors. ``parts_obj["name"]``
    reads a component (``"loss"`` returns ``loss``); ``to_floats()`` gives detached Python numbers for
    logging (it synchronises with the device, so call it only when logging).
    """

    loss: torch.Tensor
    parts: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key == "loss":
            return self.loss
        try:
            return self.parts[key]
        except KeyError:
            raise KeyError(f"no loss component {key!r}; have {['loss', *self.parts]}") from None

    def __contains__(self, key: object) -> bool:
        return key == "loss" or key in self.parts

    def to_floats(self) -> dict[str, Any]:
        """``{"loss": float, name: float or list of floats}`` for scalar components; per-sample
        (non-scalar) tensors are left out."""

        def conv(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return float(v.detach()) if v.numel() == 1 else None
            if isinstance(v, (list, tuple)):
                items = [conv(x) for x in v]
                return None if any(x is None for x in items) else items
            return v if isinstance(v, (int, float)) else None

        out: dict[str, Any] = {"loss": float(self.loss.detach())}
        for k, v in self.parts.items():
            c = conv(v)
            if c is not None:
                out[k] = c
        return out


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 (keep float32/float64): softmax/log in half precision loses
    the small probabilities that KD and rare classes depend on."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a 2-D (batch, classes) tensor, got {shape}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")


def _check_labels(labels: torch.Tensor, batch: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor of length {batch}, got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")


def _per_sample(weights: Any, batch: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    w = torch.as_tensor(weights, device=ref.device)
    if w.dim() != 1 or w.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(w.shape)}")
    return w.to(ref.dtype)


def _log_prior(class_counts: Any, num_classes: int, ref: torch.Tensor, normalise: bool) -> torch.Tensor:
    counts = torch.as_tensor(np.asarray(class_counts) if not isinstance(class_counts, torch.Tensor) else class_counts)
    if counts.dim() != 1 or counts.shape[0] != num_classes:
        raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(counts.shape)}")
    # Value checks only on host tensors: on an accelerator they would force a sync every step.
    if counts.device.type == "cpu" and not bool((counts > 0).all()):
        bad = int(torch.nonzero(counts <= 0)[0, 0])
        raise ValueError(f"class_counts must be positive; class {bad} has count {counts[bad].item()}")
    counts = counts.to(device=ref.device, dtype=ref.dtype)
    if normalise:
        counts = counts / counts.sum()
    return counts.log()


# ---------------------------------------------------------------------------------------------------
# cross-entropy family
# ---------------------------------------------------------------------------------------------------


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None
) -> LossParts:
    """Per-sample cross-entropy times per-sample weights, averaged over the batch.

    ``loss = mean_i v_i CE(logits_i, y_i)`` (LFME SpIS: ``v_i`` multiplies sample i's CE); with
    ``weights=None`` this is ``F.cross_entropy``.

    Args:
        logits: ``(B, C)``, any float dtype (computed in fp32).
        labels: ``(B,)`` integer class ids.
        weights: optional ``(B,)`` per-sample weights (not detached: pass constants).

    Returns:
        ``LossParts`` with ``loss`` and parts ``ce`` (unweighted batch-mean CE, for logging) and
        ``ce_per_sample`` ``(B,)``.
    """
    _check_logits(logits)
    _check_labels(labels, logits.shape[0])
    x = _f32(logits)
    per = F.cross_entropy(x, labels.long(), reduction="none")
    loss = per.mean() if weights is None else (per * _per_sample(weights, x.shape[0], per, "weights")).mean()
    return LossParts(loss, {"ce": per.mean() if weights is not None else loss, "ce_per_sample": per})


def balanced_softmax_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: torch.Tensor | np.ndarray | Sequence[int],
    *,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> LossParts:
    """Balanced Softmax (Ren et al., NeurIPS 2020): CE on ``logits + log n_c``.

    Training adds the log training-set count of each class; inference uses the raw logits.

    Args:
        logits: ``(B, C)``; labels: ``(B,)``; class_counts: ``(C,)`` positive training counts.
        weights: optional ``(B,)`` per-sample weights as in ``weighted_cross_entropy``.

    Returns:
        ``LossParts`` as from ``weighted_cross_entropy`` on the adjusted logits.
    """
    _check_logits(logits)
    x = _f32(logits)
    return weighted_cross_entropy(x + _log_prior(class_counts, x.shape[1], x, normalise=False), labels, weights)


def logit_adjusted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: torch.Tensor | np.ndarray | Sequence[int],
    tau: float = 1.0,
    *,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> LossParts:
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE on ``logits + tau * log pi_c``,
    ``pi = counts / sum(counts)``. Equals ``balanced_softmax_loss`` at ``tau = 1``.

    Returns:
        ``LossParts`` as from ``weighted_cross_entropy`` on the adjusted logits.
    """
    _check_logits(logits)
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    x = _f32(logits)
    return weighted_cross_entropy(x + tau * _log_prior(class_counts, x.shape[1], x, normalise=True), labels, weights)


# ---------------------------------------------------------------------------------------------------
# LFME distillation
# ---------------------------------------------------------------------------------------------------


def subset_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    subset_classes: torch.Tensor | np.ndarray | Sequence[int],
    temperature: float = 2.0,
    t_squared: bool = False,
    teacher_is_log_probs: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LFME's distillation term for one expert (REFERENCE.md Sec. 1, paper Eq. 2).

    ``KD_l = (1/B) sum_i m_i KL(softmax(t_i / T) || softmax(s_i[S_l] / T))`` where ``s_i[S_l]`` are the
    student's logits at the subset's class ids (in the expert's order), ``t_i`` the expert's logits
    over its own label space, ``m_i`` the optional mask (all ones by default: every batch sample is
    distilled by every expert, as in the paper and the official code; see the module docstring).
    Multiplied by ``T^2`` when ``t_squared`` (Hinton's gradient-scale correction; LFME does not use it).

    Gradients reach only the student's logits at ``subset_classes``; the teacher is treated as a
    constant (detached).

    Args:
        student_logits: ``(B, C)`` student logits over the full label space.
        teacher_logits: ``(B, |S_l|)`` expert logits, column j belonging to class ``subset_classes[j]``.
            Entries of ``-inf`` (classes given zero probability) are allowed.
        subset_classes: ``(|S_l|,)`` class ids (tensor, ndarray or list). Pass a tensor already on the
            student's device to avoid a copy per call; id range/uniqueness are checked on host inputs.
        temperature: ``T > 0``, applied to both sides.
        t_squared: multiply by ``T^2``.
        teacher_is_log_probs: ``teacher_logits`` already holds the *target* log-probabilities (at the
            distillation temperature); they are used without temperature (only renormalised). Note that
            T=1 log-probabilities can simply be passed as logits with this flag off:
            ``softmax(log_softmax(z) / T) == softmax(z / T)``.
        mask: optional ``(B,)`` bool or float per-sample mask/weights.

    Returns:
        scalar tensor (fp32 for half/bf16 inputs).
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    batch = student_logits.shape[0]
    if teacher_logits.shape[0] != batch:
        raise ValueError(f"teacher_logits has batch {teacher_logits.shape[0]}, student_logits {batch}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    idx = subset_classes if isinstance(subset_classes, torch.Tensor) else torch.as_tensor(np.asarray(subset_classes))
    if idx.numel() == 0:
        raise ValueError("subset_classes is empty")
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"subset_classes must be a 1-D integer index, got dtype {idx.dtype}, shape {tuple(idx.shape)}")
    if idx.shape[0] != teacher_logits.shape[1]:
        raise ValueError(
            f"teacher_logits has {teacher_logits.shape[1]} columns but subset_classes has {idx.shape[0]} classes"
        )
    if idx.device.type == "cpu":
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= student_logits.shape[1]:
            raise ValueError(f"subset_classes ids must lie in [0, {student_logits.shape[1]}), got range [{lo}, {hi}]")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("subset_classes contains duplicate class ids")
    idx = idx.to(device=student_logits.device, dtype=torch.long)

    s = _f32(student_logits).index_select(1, idx)
    log_ps = F.log_softmax(s / temperature, dim=1)
    t = _f32(teacher_logits).detach().to(log_ps.dtype)
    log_pt = F.log_softmax(t if teacher_is_log_probs else t / temperature, dim=1)
    pt = log_pt.exp()
    # 0 * log 0 = 0: classes the teacher rules out (-inf) must not turn the sum into NaN.
    per_class = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    per_sample = per_class.sum(dim=1)
    if mask is not None:
        per_sample = per_sample * _per_sample(mask, batch, per_sample, "mask")
    kd = per_sample.sum() / batch  # "batchmean": divide by B even when masked (see module docstring)
    return kd * (temperature * temperature) if t_squared else kd


def lfme_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    ce_weights: torch.Tensor | Sequence[float] | None,
    expert_logits: Sequence[torch.Tensor],
    subsets: Sequence[torch.Tensor | np.ndarray | Sequence[int]],
    expert_weights: Sequence[float | torch.Tensor],
    temperature: float = 2.0,
    t_squared: bool = False,
    *,
    teacher_is_log_probs: bool = False,
    kd_masks: Sequence[torch.Tensor | None] | None = None,
) -> LossParts:
    """LFME student loss: ``mean_i v_i CE_i + sum_l w_l KD_l`` (paper Eq. 5, batch-averaged).

    Args:
        student_logits: ``(B, C)``.
        labels: ``(B,)`` class ids in the full label space.
        ce_weights: ``(B,)`` SpIS weights ``v_i`` or ``None`` (all ones). The official-code SpIS variant
            scales the student's *logits* instead: do that before calling and pass ``None`` here.
        expert_logits: L tensors, the l-th ``(B, |S_l|)`` (use ``topk_to_dense`` for top-k storage).
        subsets: L class-id indexes, ``subsets[l][j]`` = full-space id of expert l's output j.
        expert_weights: L SpES weights ``w_l``. A Python number equal to 0 skips that term's backward
            (its value is still computed, without a graph, for logging).
        temperature, t_squared, teacher_is_log_probs: as in ``subset_kd_loss``.
        kd_masks: optional L per-sample masks (or ``None`` entries) for ``subset_kd_loss``; default:
            every expert on every sample.

    Returns:
        ``LossParts`` with ``loss`` and parts ``ce`` (``mean_i v_i CE_i``, the term in the loss),
        ``ce_unweighted``, ``kd`` (``sum_l w_l KD_l``) and ``kd_per_expert`` (list of the L unweighted
        ``KD_l`` tensors).
    """
    n = len(expert_logits)
    if len(subsets) != n or len(expert_weights) != n:
        raise ValueError(
            f"expert_logits, subsets and expert_weights must have equal lengths, got {n}, {len(subsets)}, "
            f"{len(expert_weights)}"
        )
    if kd_masks is not None and len(kd_masks) != n:
        raise ValueError(f"kd_masks must have {n} entries, got {len(kd_masks)}")
    ce_parts = weighted_cross_entropy(student_logits, labels, ce_weights)
    total = ce_parts.loss
    kd_total = torch.zeros((), dtype=total.dtype, device=total.device)
    per_expert: list[torch.Tensor] = []
    for l in range(n):
        w = expert_weights[l]
        args = (student_logits, expert_logits[l], subsets[l], temperature, t_squared, teacher_is_log_probs,
                None if kd_masks is None else kd_masks[l])
        if not isinstance(w, torch.Tensor) and float(w) == 0.0:
            with torch.no_grad():
                per_expert.append(subset_kd_loss(*args))
            continue
        kd_l = subset_kd_loss(*args)
        per_expert.append(kd_l)
        kd_total = kd_total + w * kd_l
    return LossParts(
        total + kd_total,
        {"ce": ce_parts.loss, "ce_unweighted": ce_parts["ce"], "kd": kd_total, "kd_per_expert": per_expert},
    )


def topk_to_dense(
    values: torch.Tensor, indices: torch.Tensor, num_classes: int, fill: str | float = "min"
) -> torch.Tensor:
    """Rebuild dense ``(B, num_classes)`` fp32 expert logits from stored top-k pairs.

    ``indices`` are positions in the expert's own (subset) label space, ``0 <= idx < num_classes``.
    The kept entries are exact; the missing ``num_classes - k`` entries are an approximation chosen by
    ``fill``:

    * ``"min"`` (default): ``row_min(values) - TOPK_FILL_MARGIN`` (1e4 below the smallest kept logit).
      Their softmax mass is 0 to fp32 precision at any usual temperature, so the teacher distribution
      becomes the softmax over the top-k alone: the tail's true mass (largest when k is small and the
      expert is unsure) is moved proportionally onto the kept classes, and the student is pushed
      towards zero on the tail classes instead of the expert's small tail probabilities.
    * ``"kth"``: the row's smallest kept value; an upper bound for every missing logit, so it
      overestimates the tail mass (each missing class as likely as the k-th).
    * ``"residual"``: ``values`` must be T=1 log-probabilities of the full distribution; the missing
      mass ``1 - sum(exp(values))`` is spread uniformly over the missing classes (tail mass exact, tail
      shape flattened). Result is a dense log-probability row, usable as logits.
    * a number: that constant.

    With ``k == num_classes`` every fill gives back the original tensor exactly.

    Range/duplicate checks on ``indices`` run only for host tensors (on a GPU they would sync).
    """
    if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise ValueError("values and indices must be tensors")
    if values.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"values and indices must be equal-shape (B, k) tensors, got {tuple(values.shape)} "
                         f"and {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    batch, k = values.shape
    if not isinstance(num_classes, int) or num_classes < 1 or k > num_classes or k < 1:
        raise ValueError(f"need 1 <= k <= num_classes, got k={k}, num_classes={num_classes!r}")
    idx = indices.long()
    if idx.device.type == "cpu" and batch > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"indices must lie in [0, {num_classes}), got range [{lo}, {hi}]")
        srt = idx.sort(dim=1).values
        if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("indices contain a duplicate class id within a row")
    v = values.float()
    if isinstance(fill, str):
        if fill == "min":
            col = v.min(dim=1, keepdim=True).values - TOPK_FILL_MARGIN
        elif fill == "kth":
            col = v.min(dim=1, keepdim=True).values
        elif fill == "residual":
            missing = num_classes - k
            if missing == 0:
                col = v[:, :1]  # unused: every column is overwritten below
            else:
                # Clamp: rounding can make the kept mass exceed 1 by a hair.
                rest = (1.0 - v.exp().sum(dim=1, keepdim=True)).clamp_min(1e-12)
                col = (rest / missing).log()
        else:
            raise ValueError(f"fill must be 'min', 'kth', 'residual' or a number, got {fill!r}")
    elif isinstance(fill, (int, float)) and not isinstance(fill, bool):
        col = torch.full((batch, 1), float(fill), dtype=v.dtype, device=v.device)
    else:
        raise ValueError(f"fill must be 'min', 'kth', 'residual' or a number, got {fill!r}")
    out = col.expand(batch, num_classes).clone()
    return out.scatter_(1, idx, v)


# ---------------------------------------------------------------------------------------------------
# CBD
# ---------------------------------------------------------------------------------------------------


def cbd_feature_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    alpha: float = 0.4,
    beta: float = 100.0,
    ce: torch.Tensor | LossParts | None = None,
) -> LossParts:
    """Class-Balanced Distillation stage-2 loss (Iscen et al. 2021; REFERENCE.md Sec. 1).

    ``loss = (1 - alpha) * CE + alpha * beta * mean_i (1 - cos(f_s_i, f_t_i))`` on L2-normalised
    features. Teacher features are constants (detached). For CBD-ENS pass the concatenated teacher
    features and the student's projected features (same width). Without ``ce`` the loss is the feature
    term alone (``alpha * beta * distance``), for callers that combine terms themselves.

    Args:
        student_feat, teacher_feat: ``(B, D)`` features (any float dtype; computed in fp32).
        alpha: in ``[0, 1]``, default 0.4. beta: ``>= 0``, default 100.
        ce: optional scalar CE tensor (or a ``LossParts``, whose ``loss`` is used).

    Returns:
        ``LossParts`` with parts ``ce`` (the given CE or 0), ``cos_distance`` (batch mean of
        ``1 - cos``) and ``feat`` (``alpha * beta * cos_distance``).
    """
    _check_logits(student_feat, "student_feat")
    _check_logits(teacher_feat, "teacher_feat")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"student_feat {tuple(student_feat.shape)} and teacher_feat {tuple(teacher_feat.shape)} "
                         "must have the same shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a non-negative finite number, got {beta}")
    s = F.normalize(_f32(student_feat), dim=1)
    t = F.normalize(_f32(teacher_feat).detach().to(s.dtype), dim=1)
    dist = (1.0 - (s * t).sum(dim=1)).mean()
    feat = alpha * beta * dist
    if ce is None:
        return LossParts(feat, {"ce": torch.zeros_like(feat), "cos_distance": dist, "feat": feat})
    ce_t = ce.loss if isinstance(ce, LossParts) else ce
    if not isinstance(ce_t, torch.Tensor) or ce_t.numel() != 1:
        raise ValueError("ce must be a scalar tensor or a LossParts")
    ce_t = _f32(ce_t.reshape(()))
    return LossParts((1.0 - alpha) * ce_t + feat, {"ce": ce_t, "cos_distance": dist, "feat": feat})


# ---------------------------------------------------------------------------------------------------
# ECL (collaborative experts)
# ---------------------------------------------------------------------------------------------------
#
# The equations below are OUR READING of the ECL abstract (Xu et al., "Towards Effective Collaborative
# Learning in Long-Tailed Recognition", arXiv 2305.03378), fixed in REFERENCE.md Sec. 1 "ECL": only the
# abstract is public, so no formula here is the paper's own. NCL (Li et al., CVPR 2022) is the closest
# public relative and supplies the defaults; BCL (Zhu et al., CVPR 2022) defines the contrastive term.
#
# Shapes: M experts, N samples, C classes, D feature width, P projection width. Multi-expert tensors
# are stacked expert-first, ``(M, N, ...)``, as ``lfme_fast.models.MultiExpert`` returns them.


def _check_stacked(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 3-D (experts, batch, dim) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_positive(value: float, name: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _check_nonnegative(value: float, name: str) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")


def _peer_mean(x: torch.Tensor) -> torch.Tensor:
    """``out[i] = mean_{j != i} x[j]`` over dim 0, detached (peers are teachers, never students).

    Computed as ``(sum - x_i) / (M - 1)``: one reduction instead of M, exact enough in fp32 for
    logits/features of ordinary size (the tests compare against the explicit loop).
    """
    m = x.shape[0]
    if m < 2:
        raise ValueError(f"peer targets need at least 2 experts, got {m}")
    x = x.detach()
    return (x.sum(dim=0, keepdim=True) - x) / (m - 1)


def ecl_online_kd(
    label_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    temperature: float = 2.0,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """ECL online distillation into each expert's distillation classifier h_i (our reading, REFERENCE.md).

    ``L_kd,i(b) = T^2 KL(softmax(mean_{j != i} g_j(x_b) / T) || softmax(h_i(x_b) / T))``: the target is the
    detached mean of the *peers'* label-classifier logits (raw, without the balanced-softmax prior: the
    balanced prediction, the one used at inference), so gradients reach ``kd_logits`` only. NCL's NBOD
    distils every pair of balanced logits instead; routing it through h_i keeps g_i purely supervised so
    the two classifiers can be compared for re-weighting.

    Args:
        label_logits: ``(M, N, C)`` label-classifier logits g_i, M >= 2 (used as constants).
        kd_logits: ``(M, N, C)`` distillation-classifier logits h_i.
        temperature: ``T > 0`` on both sides; the ``T^2`` factor keeps gradient scale T-independent.
        weights: optional per-sample weights, ``(N,)`` shared by all experts or ``(M, N)`` per expert
            (e.g. ``ecl_class_weights``); detached.

    Returns:
        ``LossParts``: ``loss = sum_i mean_b w_b L_kd,i(b)``; parts ``kd_per_expert`` (list of M scalars
        ``mean_b w_b L_kd,i(b)``) and ``kd_per_sample`` ``(M, N)`` (unweighted, for re-weighting/logging).
    """
    _check_stacked(label_logits, "label_logits")
    _check_stacked(kd_logits, "kd_logits")
    if label_logits.shape != kd_logits.shape:
        raise ValueError(f"label_logits {tuple(label_logits.shape)} and kd_logits {tuple(kd_logits.shape)} differ")
    _check_positive(temperature, "temperature")
    log_q = F.log_softmax(_f32(kd_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_peer_mean(_f32(label_logits)).to(log_q.dtype) / temperature, dim=-1)
    # Target probabilities come from finite logits, so p > 0 everywhere: no 0 * log 0 guard needed.
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * (temperature * temperature)
    weighted = per_sample
    if weights is not None:
        w = torch.as_tensor(weights, device=per_sample.device).detach().to(per_sample.dtype)
        if w.shape not in (per_sample.shape[1:], per_sample.shape):
            raise ValueError(f"weights must have shape ({per_sample.shape[1]},) or {tuple(per_sample.shape)}, "
                             f"got {tuple(w.shape)}")
        weighted = per_sample * w
    per_expert = weighted.mean(dim=1)
    return LossParts(per_expert.sum(), {"kd_per_expert": list(per_expert.unbind(0)), "kd_per_sample": per_sample})


def ecl_raw_class_weights(
    acc_label: torch.Tensor, acc_kd: torch.Tensor, gamma: float = 1.0, kappa: float = 4.0
) -> torch.Tensor:
    """ECL class weights before batch renormalisation: ``clip((a_lab / a_kd)^gamma, 1/kappa, kappa)``.

    Our reading of the abstract's "comparing two classifiers' predictions" (REFERENCE.md): a class whose
    distillation classifier h lags its label classifier g (``a_kd < a_lab``) gets ``omega > 1``, i.e. more
    transfer. Division by zero is guarded by flooring both accuracies at 1e-12 (two zero accuracies give
    ``omega = 1``, a zero ``a_kd`` alone gives ``kappa``); the power is taken in the log domain, clipped to
    ``[-log kappa, log kappa]``, so no intermediate overflows.

    Args:
        acc_label, acc_kd: ``(..., C)`` per-class true-class probabilities (e.g. ``ECLAccuracyEMA``), equal shapes.
        gamma: finite exponent (0 gives all ones). kappa: clip bound, ``>= 1``.

    Returns:
        detached float32 tensor shaped like ``acc_label``.
    """
    if acc_label.shape != acc_kd.shape:
        raise ValueError(f"acc_label {tuple(acc_label.shape)} and acc_kd {tuple(acc_kd.shape)} differ")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    if not (kappa >= 1 and math.isfinite(kappa)):
        raise ValueError(f"kappa must be a finite number >= 1, got {kappa}")
    tiny = 1e-12
    a_lab = _f32(acc_label.detach()).clamp_min(tiny)
    a_kd = _f32(acc_kd.detach()).clamp_min(tiny)
    log_w = gamma * (a_lab.log() - a_kd.log())
    bound = math.log(kappa)
    return log_w.clamp(-bound, bound).exp()


def ecl_class_weights(
    acc_label: torch.Tensor,
    acc_kd: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 1.0,
    kappa: float = 4.0,
) -> torch.Tensor:
    """Per-sample ECL distillation weights ``omega_{y_b}``, renormalised to batch mean 1 (our reading, REFERENCE.md).

    ``omega_c = clip((acc_label[c] / acc_kd[c])^gamma, 1/kappa, kappa)`` (``ecl_raw_class_weights``), looked
    up at each sample's label and divided by the batch mean of the looked-up values, so the weights
    redistribute the distillation term across classes without changing its overall scale. After
    renormalisation any two weights are within a factor ``kappa^2`` of each other.

    Args:
        acc_label: ``(C,)`` label-classifier per-class accuracy proxy, or ``(M, C)`` one row per expert.
        acc_kd: same shape, for the distillation classifiers.
        labels: ``(N,)`` class ids.
        gamma, kappa: as in ``ecl_raw_class_weights``.

    Returns:
        detached ``(N,)`` weights (``(M, N)`` for per-expert inputs, each row with mean 1).
    """
    if acc_label.dim() not in (1, 2):
        raise ValueError(f"acc_label must be (C,) or (M, C), got {tuple(acc_label.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got {getattr(labels, 'shape', type(labels))}")
    _check_labels(labels, labels.shape[0])
    omega = ecl_raw_class_weights(acc_label, acc_kd, gamma, kappa)
    w = omega.index_select(-1, labels.to(device=omega.device, dtype=torch.long))
    if w.shape[-1] == 0:
        return w
    # Every omega >= 1/kappa > 0, so the mean is positive: no division guard needed.
    return w / w.mean(dim=-1, keepdim=True)


def ecl_feature_kd(features: torch.Tensor) -> LossParts:
    """ECL feature-level distillation (our reading, REFERENCE.md): ``L_feat,i = mean_b (1 - cos(f_i, sg(mean_{j != i} f_j)))``.

    The peers' mean is taken over raw (unnormalised) features and detached; cosine normalises both sides.

    Args:
        features: ``(M, N, D)`` expert features f_i, M >= 2.

    Returns:
        ``LossParts``: ``loss = sum_i L_feat,i``; part ``feat_per_expert`` (list of M scalars).
    """
    _check_stacked(features, "features")
    f = _f32(features)
    cos = F.cosine_similarity(f, _peer_mean(f), dim=-1, eps=1e-8)
    per_expert = (1.0 - cos).mean(dim=1)
    return LossParts(per_expert.sum(), {"feat_per_expert": list(per_expert.unbind(0))})


def balanced_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    prototypes: torch.Tensor | None = None,
) -> LossParts:
    """Balanced supervised contrastive loss (BCL, Zhu et al., CVPR 2022), sample-to-sample form by default.

    Every embedding ``z_i`` is an anchor. Its contrast set ``A(i)`` is every other embedding (and, with
    ``prototypes``, the C class prototypes, BCL's "class-complement"); ``A_c(i)`` are the members of class
    c, ``P(i) = A_{y_i}(i)`` the positives. With ``s = z . z' / tau`` on L2-normalised vectors:

        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{c : A_c(i) != {}} 1/|A_c(i)| sum_{k in A_c(i)} exp(s_ik) )

    The class-averaged denominator ("class-averaging") stops head classes, which fill most of a batch,
    from dominating the negatives. The loss is the mean of ``L_i`` over anchors with at least one
    positive (with two views of every sample, all of them); 0 when there are none. Prototypes are
    contrast targets only, never anchors, as in BCL. This matches BCL's published formulation; the
    ECL paper's own contrastive term is not public (REFERENCE.md).

    Args:
        embeddings: ``(N, P)``, e.g. both views of B samples stacked (N = 2B); L2-normalised here.
        labels: ``(N,)`` class ids (both views carry their sample's label).
        temperature: ``tau > 0`` (ECL default 0.07; BCL used 0.1).
        prototypes: optional ``(C, P)`` class prototypes, row c labelled c; L2-normalised here.

    Returns:
        ``LossParts``: parts ``con_per_sample`` ``(N,)`` (0 for anchors without positives) and
        ``num_anchors`` (how many anchors had a positive, a 0-d tensor).
    """
    _check_logits(embeddings, "embeddings")
    n = embeddings.shape[0]
    _check_labels(labels, n)
    _check_positive(temperature, "temperature")
    z = F.normalize(_f32(embeddings), dim=1)
    y = labels.to(device=z.device, dtype=torch.long)
    targets, target_labels = z, y
    if prototypes is not None:
        _check_logits(prototypes, "prototypes")
        if prototypes.shape[1] != z.shape[1]:
            raise ValueError(f"prototypes have width {prototypes.shape[1]}, embeddings {z.shape[1]}")
        protos = F.normalize(_f32(prototypes).to(z.dtype), dim=1)
        targets = torch.cat([z, protos], dim=0)
        target_labels = torch.cat([y, torch.arange(protos.shape[0], device=z.device)])
        if y.device.type == "cpu" and n and int(y.max()) >= protos.shape[0]:
            raise ValueError(f"labels reach {int(y.max())} but only {protos.shape[0]} prototypes were given")
    k = targets.shape[0]
    sim = z @ targets.T / temperature  # (N, K)
    not_self = torch.ones(n, k, dtype=torch.bool, device=z.device)
    not_self[:, :n].fill_diagonal_(False)
    same = (y[:, None] == target_labels[None, :]) & not_self
    # |A_c(i)| for the class of each column: that class's count in the contrast set, less the anchor
    # itself. Counted by pairwise comparison (K x K, small) rather than bincount, whose data-dependent
    # output size would force a host sync on an accelerator.
    counts = (target_labels[:, None] == target_labels[None, :]).sum(dim=0).to(z.dtype)
    col_count = counts[None, :] - same.to(z.dtype) - (~not_self).to(z.dtype)
    log_terms = sim - col_count.clamp_min(1.0).log()
    log_denom = torch.logsumexp(log_terms.masked_fill(~not_self, float("-inf")), dim=1)
    num_pos = same.sum(dim=1)
    log_prob = sim - log_denom[:, None]
    per_sample = -(log_prob * same).sum(dim=1) / num_pos.clamp_min(1)
    valid = num_pos > 0
    num_anchors = valid.sum()
    loss = (per_sample * valid).sum() / num_anchors.clamp_min(1)
    return LossParts(loss, {"con_per_sample": per_sample * valid, "num_anchors": num_anchors})


class ECLAccuracyEMA:
    """Per-class EMAs of each classifier's true-class probability, for ECL's re-weighting (our reading, REFERENCE.md).

    Holds ``acc_label[i, c]`` (expert i's label classifier g_i) and ``acc_kd[i, c]`` (its distillation
    classifier h_i): EMAs, over training batches, of the batch-mean softmax probability (T = 1, raw
    logits without the prior, i.e. the balanced prediction used at inference) of the true class, over
    the batch's samples of class c. A class absent from a batch keeps its value; a class never seen keeps
    the initial value ``init`` (default ``1/C``, chance level) for both classifiers, so its weight is 1.
    Because both EMAs start equal, every weight starts at 1 and leaves it only as evidence accumulates
    (a built-in warm-up; no bias correction on purpose).

    The state is kept per expert (``(M, C)``), as REFERENCE.md says ("per class, per classifier");
    ``acc(per_expert=False)`` averages over experts, which equals the EMA of the expert-mean probability
    (the update is linear and all experts see the same classes). The total loss in REFERENCE.md writes
    ``omega_{y_b}`` without an expert index, so the shared (averaged) weights are the default reading;
    per-expert weights are the alternative.

    Under several processes, reduce the statistics across ranks before updating so every rank holds the
    same state (and a checkpoint from any rank resumes exactly)::

        stats = ema.batch_stats(probs_label, probs_kd, labels)
        stats = [accelerator.reduce(s, "sum") for s in stats]  # or torch.distributed.all_reduce
        ema.update_from_stats(*stats)

    Compute the step's weights (``class_weights``) *before* updating with that step's batch.
    """

    def __init__(self, num_classes: int, num_experts: int = 1, momentum: float = 0.9,
                 init: float | None = None, device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        init = 1.0 / num_classes if init is None else float(init)
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"init must be a probability in [0, 1], got {init}")
        self.num_classes, self.num_experts = num_classes, num_experts
        self.momentum, self.init = float(momentum), init
        self.acc_label = torch.full((num_experts, num_classes), init, dtype=torch.float32, device=device)
        self.acc_kd = self.acc_label.clone()
        # Batches in which each class appeared (diagnostics: 0 = still at ``init``).
        self.seen = torch.zeros(num_classes, dtype=torch.long, device=device)

    def to(self, device: torch.device | str) -> "ECLAccuracyEMA":
        """Move the state to ``device`` (in place); returns self."""
        self.acc_label, self.acc_kd, self.seen = (t.to(device) for t in (self.acc_label, self.acc_kd, self.seen))
        return self

    def _as_stacked(self, probs: torch.Tensor, name: str) -> torch.Tensor:
        p = probs.unsqueeze(0) if probs.dim() == 2 else probs
        if p.dim() != 3 or p.shape[0] != self.num_experts or p.shape[2] != self.num_classes:
            raise ValueError(f"{name} must be ({self.num_experts}, N, {self.num_classes}) probabilities "
                             f"(or (N, C) with one expert), got {tuple(probs.shape)}")
        return p

    @torch.no_grad()
    def batch_stats(
        self, probs_label: torch.Tensor, probs_kd: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-class sums of the true-class probability, ``(M, C)`` each, and per-class counts ``(C,)``.

        Args:
            probs_label, probs_kd: ``(M, N, C)`` softmax probabilities of g and h (``(N, C)`` if M = 1).
            labels: ``(N,)`` class ids.
        """
        pl, pk = self._as_stacked(probs_label, "probs_label"), self._as_stacked(probs_kd, "probs_kd")
        _check_labels(labels, pl.shape[1])
        y = labels.to(device=pl.device, dtype=torch.long)
        idx = y.view(1, -1, 1).expand(pl.shape[0], -1, 1)
        sums = []
        for p in (pl, pk):
            true_p = p.float().gather(2, idx).squeeze(2)  # (M, N)
            sums.append(torch.zeros(p.shape[0], self.num_classes, device=p.device).index_add_(1, y, true_p))
        # index_add_, not bincount: bincount's data-dependent size would sync with an accelerator.
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=y.device).index_add_(0, y, torch.ones_like(y))
        return sums[0], sums[1], counts

    @torch.no_grad()
    def update_from_stats(self, sum_label: torch.Tensor, sum_kd: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA step from (possibly all-reduced) ``batch_stats``: classes with ``counts > 0`` move
        ``a <- m a + (1 - m) sum / count``; the others keep their value."""
        expect = (self.num_experts, self.num_classes)
        if tuple(sum_label.shape) != expect or tuple(sum_kd.shape) != expect or tuple(counts.shape) != expect[1:]:
            raise ValueError(f"stats must be {expect}, {expect}, ({self.num_classes},); got "
                             f"{tuple(sum_label.shape)}, {tuple(sum_kd.shape)}, {tuple(counts.shape)}")
        if self.acc_label.device != sum_label.device:
            self.to(sum_label.device)  # follow the training device once, on the first update
        present = counts > 0
        denom = counts.clamp_min(1).to(torch.float32)
        m = self.momentum
        for state, s in ((self.acc_label, sum_label), (self.acc_kd, sum_kd)):
            new = m * state + (1.0 - m) * (s.float() / denom)
            state.copy_(torch.where(present, new, state))
        self.seen += present.to(self.seen.dtype)

    def update(self, probs_label: torch.Tensor, probs_kd: torch.Tensor, labels: torch.Tensor) -> None:
        """One EMA step from this process's batch (``batch_stats`` then ``update_from_stats``)."""
        self.update_from_stats(*self.batch_stats(probs_label, probs_kd, labels))

    def acc(self, per_expert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(acc_label, acc_kd)``: ``(M, C)`` each, or ``(C,)`` averaged over experts (default)."""
        if per_expert:
            return self.acc_label, self.acc_kd
        return self.acc_label.mean(dim=0), self.acc_kd.mean(dim=0)

    def class_weights(self, labels: torch.Tensor, gamma: float = 1.0, kappa: float = 4.0,
                      per_expert: bool = False) -> torch.Tensor:
        """``ecl_class_weights`` on the current state: ``(N,)``, or ``(M, N)`` with ``per_expert``."""
        return ecl_class_weights(*self.acc(per_expert), labels.to(self.acc_label.device), gamma, kappa)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors cloned to CPU)."""
        return {"acc_label": self.acc_label.detach().cpu().clone(), "acc_kd": self.acc_kd.detach().cpu().clone(),
                "seen": self.seen.cpu().clone(), "momentum": self.momentum, "init": self.init}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output onto this object's device; shapes and momentum must match."""
        missing = [k for k in ("acc_label", "acc_kd", "seen", "momentum") if k not in state]
        if missing:
            raise ValueError(f"ECLAccuracyEMA state lacks {missing}")
        if float(state["momentum"]) != self.momentum:
            raise ValueError(f"checkpoint EMA momentum {state['momentum']} differs from the configured {self.momentum}")
        for key in ("acc_label", "acc_kd", "seen"):
            cur, new = getattr(self, key), torch.as_tensor(state[key])
            if new.shape != cur.shape:
                raise ValueError(f"checkpoint EMA {key} has shape {tuple(new.shape)}, expected {tuple(cur.shape)}")
            setattr(self, key, new.to(device=cur.device, dtype=cur.dtype).clone())
        self.init = float(state.get("init", self.init))


def _check_ecl_args(num_experts: int, kd: bool, feature_kd: bool, **scalars: float) -> None:
    if num_experts < 2 and (kd or feature_kd):
        raise ValueError(f"ecl.kd and ecl.feature_kd need at least 2 experts (peers), got {num_experts}")
    for name, value in scalars.items():
        (_check_positive if "temperature" in name else _check_nonnegative)(value, name)


def ecl_loss(
    label_logits: torch.Tensor,
    kd_logits: torch.Tensor | None,
    features: torch.Tensor | None,
    labels: torch.Tensor,
    class_counts: torch.Tensor | np.ndarray | Sequence[int],
    *,
    proj: torch.Tensor | None = None,
    proj_labels: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    acc_label: torch.Tensor | None = None,
    acc_kd: torch.Tensor | None = None,
    kd: bool = True,
    reweight: bool = True,
    feature_kd: bool = True,
    contrastive: bool = True,
    lambda_kd: float = 1.0,
    lambda_feat: float = 1.0,
    lambda_con: float = 0.5,
    temperature: float = 2.0,
    con_temperature: float = 0.07,
    gamma: float = 1.0,
    kappa: float = 4.0,
    con_reduction: str = "sum",
) -> LossParts:
    """ECL total loss, as REFERENCE.md writes it (our reading of the ECL abstract; NCL supplies the defaults):

        sum_i [ L_bs(g_i) + lambda_kd mean_b omega_{y_b} L_kd,i(b) + lambda_feat L_feat,i ] + lambda_con L_con

    * ``L_bs``: ``balanced_softmax_loss`` of each label classifier g_i;
    * ``L_kd,i``: ``ecl_online_kd`` (h_i from its peers' g, ``T = temperature``), switch ``kd``;
    * ``omega``: ``ecl_class_weights(acc_label, acc_kd, labels, gamma, kappa)``, switch ``reweight``
      (off: all ones). ``(C,)`` accuracies give weights shared by the experts (the formula's reading),
      ``(M, C)`` per-expert weights;
    * ``L_feat,i``: ``ecl_feature_kd``, switch ``feature_kd``;
    * ``L_con``: ``balanced_contrastive_loss`` of each expert's projections ``proj[i]``, summed over
      experts (``con_reduction="sum"``, default: each expert's own objective is then independent of M,
      as NCL/BCL train each model with its own contrastive term) or averaged (``"mean"``), switch
      ``contrastive``.

    A switched-off term is not computed and its parts are absent. Which views enter which term is the
    caller's choice: e.g. pass both views (N = 2B) everywhere, or the first view to the classifier terms
    and both views' projections (``proj_labels = labels.repeat(2)``) to the contrastive term.

    Args:
        label_logits: ``(M, N, C)`` g_i logits (raw; the log prior is added here).
        kd_logits: ``(M, N, C)`` h_i logits (needed when ``kd``).
        features: ``(M, N, D)`` f_i (needed when ``feature_kd``).
        labels: ``(N,)``; class_counts: ``(C,)`` positive training counts (for the balanced softmax).
        proj: ``(M, N', P)`` contrastive projections (needed when ``contrastive``).
        proj_labels: ``(N',)`` labels of ``proj``'s rows; default ``labels`` (then N' must equal N).
        prototypes: optional ``(M, C, P)`` BCL class-complement prototypes.
        acc_label, acc_kd: per-class accuracy proxies (``ECLAccuracyEMA.acc()``), needed when ``kd`` and ``reweight``.
        lambda_kd, lambda_feat, lambda_con: non-negative term weights; temperature, con_temperature: positive.
        gamma, kappa: re-weighting exponent and clip bound.

    Returns:
        ``LossParts``: parts ``bs`` and ``bs_per_expert``; if on, ``kd`` (``lambda_kd * sum_i ...``, the term in
        the loss), ``kd_per_expert`` (weighted, before lambda), ``kd_weights`` (per-sample omega, non-scalar);
        ``feat`` / ``feat_per_expert``; ``con`` / ``con_per_expert`` likewise.
    """
    _check_stacked(label_logits, "label_logits")
    m, n, c = label_logits.shape
    _check_labels(labels, n)
    if con_reduction not in ("sum", "mean"):
        raise ValueError(f"con_reduction must be 'sum' or 'mean', got {con_reduction!r}")
    _check_ecl_args(m, kd, feature_kd, lambda_kd=lambda_kd, lambda_feat=lambda_feat, lambda_con=lambda_con,
                    temperature=temperature, con_temperature=con_temperature)

    g = _f32(label_logits)
    ce = F.cross_entropy((g + _log_prior(class_counts, c, g, normalise=False)).reshape(m * n, c),
                         labels.long().repeat(m), reduction="none")
    bs_per_expert = ce.view(m, n).mean(dim=1)
    total = bs_per_expert.sum()
    parts: dict[str, Any] = {"bs": total, "bs_per_expert": list(bs_per_expert.unbind(0))}

    if kd:
        if kd_logits is None:
            raise ValueError("ecl.kd is on but kd_logits is None (build the model with its distillation heads)")
        weights = None
        if reweight:
            if acc_label is None or acc_kd is None:
                raise ValueError("ecl.reweight is on but acc_label/acc_kd were not given (ECLAccuracyEMA.acc())")
            weights = ecl_class_weights(acc_label.to(g.device), acc_kd.to(g.device), labels, gamma, kappa)
            parts["kd_weights"] = weights
        kd_parts = ecl_online_kd(label_logits, kd_logits, temperature, weights)
        parts["kd"] = lambda_kd * kd_parts.loss
        parts["kd_per_expert"] = kd_parts["kd_per_expert"]
        total = total + parts["kd"]

    if feature_kd:
        if features is None:
            raise ValueError("ecl.feature_kd is on but features is None")
        feat_parts = ecl_feature_kd(features)
        parts["feat"] = lambda_feat * feat_parts.loss
        parts["feat_per_expert"] = feat_parts["feat_per_expert"]
        total = total + parts["feat"]

    if contrastive:
        if proj is None:
            raise ValueError("ecl.contrastive is on but proj is None (forward with the projection heads, two views)")
        _check_stacked(proj, "proj")
        if proj.shape[0] != m:
            raise ValueError(f"proj has {proj.shape[0]} experts, label_logits {m}")
        y_con = labels if proj_labels is None else proj_labels
        if y_con.shape[0] != proj.shape[1]:
            raise ValueError(f"proj has {proj.shape[1]} rows but its labels have {y_con.shape[0]}: pass proj_labels")
        if prototypes is not None and (prototypes.dim() != 3 or prototypes.shape[0] != m):
            raise ValueError(f"prototypes must be ({m}, C, P), got {tuple(prototypes.shape)}")
        con_per_expert = torch.stack([
            balanced_contrastive_loss(proj[i], y_con, con_temperature,
                                      None if prototypes is None else prototypes[i]).loss
            for i in range(m)
        ])
        l_con = con_per_expert.sum() if con_reduction == "sum" else con_per_expert.mean()
        parts["con"] = lambda_con * l_con
        parts["con_per_expert"] = list(con_per_expert.unbind(0))
        total = total + parts["con"]

    return LossParts(total, parts)
