"""The ECL rows of ``python -m lfme_fast.bench step``: what an ECL step costs next to a plain CE step.

An ECL step (:mod:`lfme_fast.recipes.ecl`, every component on, REFERENCE.md's reading of the abstract)
runs M = 3 experts (``MultiExpert`` on the step benchmark's backbone, separate backbones as NCL) on two
augmented views of the batch, and computes the balanced softmax, online KD with re-weighting, feature
KD and the contrastive loss. It is timed through the recipe's own ``ECLLoss`` (forward and loss), so
the figures are those of the code that trains.

The split:

* **forward**: ``ECLLoss.forward`` (both views through the three experts, autograd on), against a
  plain model's forward;
* **losses**: the ECL loss terms' forward (and the EMA update); separately, their forward and backward
  on detached outputs (the network left out) against CE's;
* **backward + optimiser**: backward through the losses and the network, and the SGD step;

forward, losses and backward are timed inside the same steps whose total is reported (medians);
* **second view, compute**: the whole step against the same step with the contrastive branch off
  (one view);
* **second view, loading**: the training loader (:func:`loader_view_cost`) on the same data and order
  with one and with two views per sample, seconds per batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["ECLStep", "loader_view_cost", "lt_counts"]


def lt_counts(num_classes: int, most: int = 1280, fewest: int = 5) -> torch.Tensor:
    """Exponentially decaying training counts from ``most`` to ``fewest`` (ImageNet-LT's range): the
    balanced softmax's prior for the benchmark."""
    ratio = (fewest / most) ** (np.arange(num_classes) / max(1, num_classes - 1))
    return torch.as_tensor(np.maximum(fewest, np.round(most * ratio)), dtype=torch.float32)


class ECLStep:
    """One ECL training step on fixed tensors, and its parts timed separately.

    Args:
        arch: the backbone of every expert. num_classes: classifier width. num_experts: M.
        x, x2: the two views ``(B, 3, H, W)``; y: labels ``(B,)``; device: where everything lives.
        memory_format: the input/model layout (channels_last on GPU). autocast: a context factory.
    """

    def __init__(self, arch: str, num_classes: int, num_experts: int, x: torch.Tensor, x2: torch.Tensor,
                 y: torch.Tensor, device: torch.device, memory_format: torch.memory_format,
                 autocast: Callable[[], Any]):
        from lfme_fast.losses import ECLAccuracyEMA
        from lfme_fast.models import MultiExpert
        from lfme_fast.recipes.ecl import ECLConfig, ECLLoss

        torch.manual_seed(0)
        self.model = MultiExpert(arch, num_classes, num_experts).to(device, memory_format=memory_format).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        counts = lt_counts(num_classes).to(device)
        section = ECLConfig(num_experts=num_experts)
        # The EMA is updated by every step, as in training; its values do not change the step's cost.
        self.loss = ECLLoss(section, counts, ECLAccuracyEMA(num_classes, num_experts, device=device))
        self.loss_one_view = ECLLoss(dataclasses.replace(section, contrastive=False), counts,
                                     ECLAccuracyEMA(num_classes, num_experts, device=device))
        self.batch = SimpleNamespace(images=x, images2=x2, labels=y)
        self.device, self.autocast = device, autocast
        #: per-step ``(forward, losses, backward + SGD)`` seconds, by ``two_views``
        self.records: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, two_views: bool = True) -> None:
        """Forward, ECL loss, backward, SGD step (``two_views=False``: the contrastive branch off).

        Each call appends its parts' seconds to :attr:`records` (``(forward, losses, backward + SGD)``
        under key ``two_views``): the split is timed inside the very steps whose total is reported, so
        machine noise cannot make the parts disagree with the whole.
        """
        loss = self.loss if two_views else self.loss_one_view
        self._sync()
        t0 = time.perf_counter()
        with self.autocast():
            out = loss.forward(self.model, self.batch)
        self._sync()
        t1 = time.perf_counter()
        parts = loss(self.batch, _as_float(out))
        self._sync()
        t2 = time.perf_counter()
        parts.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        self.records[two_views].append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    def split(self, last: int, two_views: bool = True) -> dict[str, float]:
        """Medians over the ``last`` recorded steps: ``ecl_forward_s`` (both views through the experts,
        autograd on), ``ecl_losses_s`` (the loss terms' forward and the EMA update) and
        ``ecl_backward_opt_s`` (backward through losses and network, SGD step)."""
        recs = self.records[two_views][-last:]
        if not recs:
            raise ValueError("no recorded ECL step: call step() first")
        return {key: statistics.median(r[i] for r in recs)
                for i, key in enumerate(("ecl_forward_s", "ecl_losses_s", "ecl_backward_opt_s"))}

    def losses_only(self, repeats: int) -> dict[str, float]:
        """Median seconds of the loss terms alone, forward + backward on detached outputs (the network
        left out; compare ``loss_only_ce_s``), over ``repeats`` after one warm-up."""
        with torch.no_grad(), self.autocast():
            base = _as_float(self.loss.forward(self.model, self.batch))
        losses: list[float] = []
        for r in range(repeats + 1):
            out = _detached_leaf(base)
            self._sync()
            t0 = time.perf_counter()
            parts = self.loss(self.batch, out)
            parts.loss.backward()
            self._sync()
            if r:
                losses.append(time.perf_counter() - t0)
        return {"ecl_losses_only_s": statistics.median(losses)}


def _as_float(out: Any) -> Any:
    """The model output with every tensor in float32 (the losses run in fp32 under bf16 autocast)."""
    return dataclasses.replace(out, **{f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)
                                       if getattr(out, f.name) is not None})


def _detached_leaf(out: Any) -> Any:
    return dataclasses.replace(out, **{f.name: getattr(out, f.name).detach().clone().requires_grad_(True)
                                       for f in dataclasses.fields(out) if getattr(out, f.name) is not None})


def loader_view_cost(root: str | Path, *, batch_size: int, resolution: int, backend: str = "torch",
                     workers: int = 0, rounds: int = 3, split: str = "train") -> dict[str, Any]:
    """Seconds per training batch of one loader with one view and one with two views per sample, on the
    same data, sampler order and augmentation seed (``LoaderOptions(views_per_sample=1|2)``).

    One warm-up epoch each, then ``rounds`` timed epochs interleaved (one view, two views, ...) so that
    background load hits both alike; the figure per loader is the median over rounds of an epoch's
    seconds per batch. With ``workers=0`` the loading runs in the training process, as the Fashion-MNIST
    configs do; with workers it overlaps the step instead and this is its CPU-side cost per batch.
    """
    from lfme_fast.loaders import LoaderOptions, build_loader
    from lfme_fast.sampling import build_sampler
    from lfme_fast.shards import ShardReader

    labels = ShardReader(root, split).labels
    loaders = {}
    for views in (1, 2):
        sampler = build_sampler("instance", labels, seed=0)
        opts = LoaderOptions(root, split, train=True, batch_size=batch_size, backend=backend, sampler=sampler,
                             total_epochs=rounds + 1, resolution=resolution, augment="imagenet",
                             num_workers=workers, dtype=torch.float32, views_per_sample=views)
        loaders[views] = build_loader(opts)
    per_batch: dict[int, list[float]] = {1: [], 2: []}
    for epoch in range(rounds + 1):
        for views, loader in loaders.items():
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            n = sum(1 for _ in loader)
            if epoch:  # epoch 0 warms up (compilation, page cache)
                per_batch[views].append((time.perf_counter() - t0) / max(1, n))
    one, two = (statistics.median(per_batch[v]) for v in (1, 2))
    return {"loader_backend": backend, "loader_workers": workers, "loader_data": str(root),
            "loader_batches_per_epoch": n, "loader_rounds": rounds,
            "loader_one_view_batch_s": one, "loader_two_views_batch_s": two,
            "loader_second_view_s": two - one,
            "loader_one_view_images_per_s": batch_size / one, "loader_two_views_samples_per_s": batch_size / two,
            "loader_per_batch_s": {"1": per_batch[1], "2": per_batch[2]}}
