"""The CBD rows of ``python -m lfme_fast.bench step``: a CBD student step on stored teacher features
against the same step with the teachers run live, next to a plain CE step.

The CBD student (:mod:`lfme_fast.recipes.cbd`: backbone + projection ``g`` to the concatenated
teacher width) is trained with ``(1 - alpha) CE + alpha * beta * (1 - cos(g(f_s), concat_k f_t,k))``.

* ``cbd_offline``: the teachers' L2-normalised features are gathered by ``(index, view)`` from a
  generic offline store (:class:`lfme_fast.offline.ArrayStore`, float16 ``[N, K, D]`` per teacher,
  written by the real store writer, read like the recipe: RAM on the CPU, the device on a GPU)
  through the recipe's own :class:`~lfme_fast.recipes.cbd.CBDLoss`; what training costs with CBD's
  offline stage.
* ``cbd_live``: the same loss with every teacher (the step's backbone, no grad) run forward on the
  batch: the cost the offline store removes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CBDStep", "make_feature_store"]


def make_feature_store(directory: Path, num_samples: int, num_views: int, num_teachers: int, width: int,
                       seed: int = 0, load: str = "ram"):
    """A synthetic CBD store (random unit-norm float16 teacher features) written and opened by the real
    store code (:func:`lfme_fast.bench.step.write_synthetic_store`)."""
    from lfme_fast.bench.step import write_synthetic_store
    from lfme_fast.offline import ArraySpec, ArrayStore
    from lfme_fast.recipes.cbd import feature_array

    gen = torch.Generator().manual_seed(seed)

    def produce(batch):
        n = len(batch.indices)
        return {feature_array(k): F.normalize(torch.randn(n, width, generator=gen), dim=1) for k in range(num_teachers)}

    write_synthetic_store(directory, num_samples, num_views, recipe="cbd", fields={"teachers": num_teachers},
                          arrays=[ArraySpec(feature_array(k), width) for k in range(num_teachers)], produce=produce)
    return ArrayStore.open(directory, load=load)


class CBDStep:
    """CBD student steps on fixed tensors, with stored or with live teacher features.

    Args:
        arch: backbone of the student and of every teacher. num_classes: classifier width.
        num_teachers: teachers whose features are concatenated (CBD-ENS: 4).
        x, y: the batch ``(B, 3, H, W)`` and its labels; device, memory_format, autocast: as the step
        benchmark's. store_dir: where the synthetic store is written. store_samples / views: its rows
        and stored views. store_load: ``ram`` / ``mmap`` / a device. batch_ids: ``(indices, views)``
        pairs on the device, cycled through by the offline step (a real batch brings its own).
    """

    def __init__(self, arch: str, num_classes: int, num_teachers: int, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, memory_format: torch.memory_format, autocast: Callable[[], Any], *,
                 store_dir: Path, store_samples: int, views: int, store_load: str,
                 batch_ids: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float = 0.4, beta: float = 100.0):
        from lfme_fast.models import build_model
        from lfme_fast.recipes.cbd import CBDLoss, CBDStudent, feature_width

        width = feature_width(arch)
        torch.manual_seed(0)
        self.student = CBDStudent(build_model(arch, num_classes), num_teachers * width).to(
            device, memory_format=memory_format).train()
        self.teachers = [build_model(arch, num_classes).to(device, memory_format=memory_format).eval()
                         for _ in range(num_teachers)]
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.store = make_feature_store(store_dir, store_samples, views, num_teachers, width, load=store_load)
        self.loss = CBDLoss(self.store, num_teachers, alpha, beta, device)
        self.alpha, self.beta = alpha, beta
        self.x, self.y, self.device, self.autocast = x, y, device, autocast
        self.batch_ids = list(batch_ids)
        self.num_teachers, self.width = num_teachers, width
        self._i = 0

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def offline(self) -> None:
        """One student step with the teachers' features read from the store (the recipe's loss)."""
        idx, vw = self.batch_ids[self._i % len(self.batch_ids)]
        self._i += 1
        batch = SimpleNamespace(images=self.x, labels=self.y, indices=idx, views=vw)
        with self.autocast():
            logits, projected = self.loss.forward(self.student, batch)
        self._finish(self.loss(batch, (logits.float(), projected.float())).loss)

    def live(self) -> None:
        """The same step with every teacher run forward on the batch instead of the store."""
        from lfme_fast.losses import cbd_feature_loss, weighted_cross_entropy

        with torch.no_grad(), self.autocast():
            teachers = torch.cat([F.normalize(t.forward_features(self.x).float(), dim=1) for t in self.teachers], 1)
        with self.autocast():
            logits, projected = self.student(self.x, with_features=True)
        ce = weighted_cross_entropy(logits.float(), self.y)
        self._finish(cbd_feature_loss(projected.float(), teachers, self.alpha, self.beta, ce=ce.loss).loss)

    def describe(self) -> dict[str, Any]:
        """What the rows measured (for the result)."""
        return {"cbd_teachers": self.num_teachers, "cbd_teacher_width": self.width,
                "cbd_store_bytes_per_image": float(self.store.data_bytes_per_image),
                "cbd_loss": f"(1 - {self.alpha}) CE + {self.alpha} * {self.beta} * (1 - cos(g(f_s), concat f_t))"}
