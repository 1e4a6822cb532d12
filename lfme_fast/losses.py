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
