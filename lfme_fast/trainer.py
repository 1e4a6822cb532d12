"""The generic epoch loop every recipe uses (baseline model, LFME experts, LFME student, ...).

:func:`train_model` trains one model on one loader with:

* Accelerate: only the model, optimizer and scheduler are ``prepare``d; loaders shard themselves
  (``num_replicas``/``rank``) and are never wrapped.
* Mixed precision through the Accelerator (autocast inside the prepared model's forward, a grad scaler
  for fp16) and channels_last when asked.
* Gradient accumulation done here rather than by ``accelerator.accumulate``: with unprepared loaders
  Accelerate cannot see an epoch's end, so it would carry a partial window into the next epoch, and
  it divides every loss by the full window size. Here an epoch's batches are cut into windows of
  ``grad_accum`` (the last may be shorter), each micro-batch loss is divided by its window's actual
  length, and the all-reduce runs only on a window's last micro-batch (``no_sync`` before).
* A per-step LR schedule (:func:`build_scheduler`): warm-up, then cosine, step or constant.
* A per-epoch JSONL log (``STAGE/log.jsonl``; plus ``step`` records every ``log_every`` steps),
  optional TensorBoard, and a tqdm bar with loss and samples/s on the main process.
* Atomic checkpoints at every epoch end and every ``checkpoint_every_steps`` optimizer steps.
  A restarted run resumes from the latest one: it loads every state, re-creates the epoch's order
  (samplers depend on ``(seed, epoch)`` only) and skips the batches already done, so the following
  losses equal an uninterrupted run's (tested to 1e-6 on CPU).

Recipes customise it through ``forward_fn(model, batch) -> outputs``, ``loss_fn(batch, outputs) ->
LossParts`` and :class:`TrainHooks` (epoch start/end callbacks whose state is checkpointed).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lfme_fast.checkpoint import (
    find_latest,
    load_checkpoint_state,
    load_rng_file,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lfme_fast.compiling import compile_model, compile_setting
from lfme_fast.config import Config, OptimConfig
from lfme_fast.logging_utils import Console, JsonlLog, ProgressBar, TensorBoardWriter

__all__ = [
    "LoopSettings",
    "TrainHooks",
    "TrainResult",
    "TrainingInterrupted",
    "InterruptAfter",
    "LRSchedule",
    "build_optimizer",
    "build_scheduler",
    "train_model",
    "default_forward",
]


class TrainingInterrupted(RuntimeError):
    """Raised by :class:`InterruptAfter` (simulates a killed job in tests: whatever was checkpointed
    before stays, nothing after it is written)."""


class InterruptAfter:
    """A step hook (``on_step(global_step)``) that raises :class:`TrainingInterrupted` once
    ``steps`` optimizer steps of a training are done (counted from the start of that training, so a
    resumed run continues past it only when the hook is gone). Recipes take one ``on_step`` hook and
    pass it to every training they run (``Recipe(cfg, on_step=InterruptAfter(3))``)."""

    def __init__(self, steps: int):
        self.steps = int(steps)

    def __call__(self, global_step: int, desc: str = "train") -> None:
        if global_step >= self.steps:
            raise TrainingInterrupted(f"{desc}: stopped after {global_step} steps as asked")


@dataclass(frozen=True)
class LoopSettings:
    """How one :func:`train_model` call loops (everything except the optimizer settings).

    ``max_steps_per_epoch`` caps an epoch's optimizer steps (smoke runs); ``checkpoint_every_steps``
    adds mid-epoch checkpoints; ``desc`` names the stage in logs and the progress bar. ``tensorboard``
    writes ``STAGE/tensorboard`` for a direct :func:`train_model` call; recipes log through the
    Accelerate trackers of ``log.trackers`` instead (``from_config`` leaves it off). ``compile``: a
    ``torch.compile`` mode applied to the prepared model (``train.compile``; None: eager; see
    :mod:`lfme_fast.compiling`).
    """

    epochs: int
    grad_accum: int = 1
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int | None = None
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = False
    desc: str = "train"
    compile: str | None = None
    #: convert BatchNorm layers to SyncBatchNorm when training on several GPU processes (``train.sync_bn``)
    sync_bn: bool = False

    @classmethod
    def from_config(cls, cfg: Config, *, epochs: int | None = None, desc: str = "train") -> "LoopSettings":
        """Settings from ``cfg.train``/``cfg.log``; ``epochs`` defaults to ``cfg.optim.epochs``."""
        t = cfg.train
        return cls(epochs=epochs if epochs is not None else cfg.optim.epochs, grad_accum=t.grad_accum,
                   max_steps_per_epoch=t.max_steps_per_epoch, checkpoint_every_steps=t.checkpoint_every_steps,
                   log_every=t.log_every, progress=cfg.log.progress, desc=desc,
                   compile=compile_setting(t.compile), sync_bn=t.sync_bn)


class TrainHooks:
    """Callbacks around each epoch; subclass and override what you need. Called on every process.

    ``on_epoch_end`` may run collective operations (e.g. a distributed evaluation) and returns extra
    fields for the epoch's log record. ``state_dict``/``load_state_dict`` are saved in and restored
    from checkpoints, so a hook that keeps state across epochs (LFME's SpES weights) resumes exactly.
    """

    def on_epoch_start(self, epoch: int, model: torch.nn.Module) -> None:
        """Before the first batch of ``epoch`` (also on a resumed, partly done epoch)."""

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> dict[str, Any]:
        """After the last optimizer step of ``epoch``; ``model`` is the unwrapped model in train mode."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    """What :func:`train_model` returns. ``model`` is the unwrapped model (on the accelerator's device),
    ``history`` the epoch records written to the log, ``resumed_from`` the checkpoint tag or None."""

    model: torch.nn.Module
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None


# ---------------------------------------------------------------------------------------------------
# optimizer and schedule
# ---------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD over all parameters (weight decay on all of them, as in the LFME/OLTR code)."""
    if optim.name != "sgd":
        raise ValueError(f"optim.name={optim.name!r} is not supported (only 'sgd')")
    return torch.optim.SGD(model.parameters(), lr=optim.lr if lr is None else lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


class LRSchedule:
    """LR multiplier per optimizer step: linear warm-up over ``warmup_epochs``, then cosine to 0 over
    the remaining steps, or a ``gamma`` decay at each milestone epoch (``step``), or constant.

    A plain object rather than a lambda, so ``LambdaLR.state_dict`` captures it.
    """

    def __init__(self, optim: OptimConfig, steps_per_epoch: int, epochs: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.kind = optim.schedule
        self.total = steps_per_epoch * epochs
        self.warmup = int(round(optim.warmup_epochs * steps_per_epoch))
        self.milestones = [m * steps_per_epoch for m in optim.milestones]
        self.gamma = optim.gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / span)))
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :class:`LRSchedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(optim, steps_per_epoch, epochs))


def default_forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``model(batch.images)``."""
    return model(batch.images)


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Position:
    epoch: int = 0
    batches_done: int = 0  # of ``epoch``; always at a window boundary
    global_step: int = 0


def epoch_batches(num_batches: int, grad_accum: int = 1, max_steps: int | None = None,
                  drop_last: bool = True) -> int:
    """Loader batches a training epoch reads out of the loader's ``num_batches``: whole optimizer steps
    of ``grad_accum`` micro-batches when the loader drops its last partial batch (a shorter last window
    would be a smaller step that a run with the same global batch on another process count or
    accumulation does not take; an epoch shorter than one window keeps its batches), at most
    ``max_steps`` steps (``train.max_steps_per_epoch``)."""
    n = int(num_batches)
    if drop_last and grad_accum > 1 and n >= grad_accum:
        n = (n // grad_accum) * grad_accum
    if max_steps is not None:
        n = min(n, max_steps * grad_accum)
    return n


def _batches_per_epoch(loader: Any, loop: LoopSettings) -> int:
    # a loader without a spec (a custom one) is taken to drop its last partial batch, as training loaders do
    drop_last = bool(getattr(getattr(loader, "spec", None), "drop_last", True))
    n = epoch_batches(len(loader), loop.grad_accum, loop.max_steps_per_epoch, drop_last)
    if n < 1:
        raise ValueError(f"{loop.desc}: the loader yields no batch per epoch (len {len(loader)}); "
                         "lower the batch size or use more data")
    return n


def _batch_size(batch: Any) -> int:
    return int(batch.labels.shape[0])


class _Loop:
    """State of one :func:`train_model` call (kept in an object so each piece stays short)."""

    def __init__(self, model, loader, loss_fn, *, accelerator, optim, loop, stage_dir, lr, forward_fn, hooks,
                 fingerprint, channels_last, on_step, on_epoch=None):
        self.acc = accelerator
        self.loader = loader
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn or default_forward
        self.hooks = hooks or TrainHooks()
        self.loop = loop
        self.stage_dir = Path(stage_dir)
        self.ckpt_dir = self.stage_dir / "checkpoints"
        self.fingerprint = fingerprint
        self.on_step = on_step
        self.on_epoch = on_epoch
        self.main = accelerator.is_main_process
        self.console = Console(self.main, loop.desc)
        self.log = JsonlLog(self.stage_dir / "log.jsonl", enabled=self.main)
        self.tb = TensorBoardWriter(self.stage_dir / "tensorboard", enabled=loop.tensorboard and self.main)

        self.n_batches = _batches_per_epoch(loader, loop)
        self.steps_per_epoch = -(-self.n_batches // loop.grad_accum)
        self.batch = _batch_record(loader, accelerator.num_processes, loop.grad_accum)
        model = model.to(accelerator.device)
        if loop.sync_bn:
            model = _maybe_sync_bn(model, accelerator, self.console)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        optimizer = build_optimizer(model, optim, lr)
        scheduler = build_scheduler(optimizer, optim, self.steps_per_epoch, loop.epochs)
        self.pos = _Position()
        self.resumed_from = None
        self.resume_rng: dict[str, Any] | None = None
        self._maybe_resume(model, optimizer, scheduler)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        if loop.compile is not None:  # last, around the DDP wrapper (lfme_fast.compiling says why)
            self.model = compile_model(self.model, loop.compile, accelerator.device)
            self.console(f"torch.compile(mode={loop.compile!r}) of the model: it compiles during the first steps")

    def _unwrapped(self) -> torch.nn.Module:
        """The model under the DDP and ``torch.compile`` wrappers: its state-dict keys carry neither
        ``module.`` nor ``_orig_mod.``, so checkpoints load with compile on or off."""
        return self.acc.unwrap_model(self.model, keep_torch_compile=False)

    # ---- resume --------------------------------------------------------------------------------
    def _maybe_resume(self, model, optimizer, scheduler) -> None:
        info = find_latest(self.ckpt_dir)
        if info is None:
            return
        if self.fingerprint is not None and info.fingerprint != self.fingerprint:
            if info.world_size != self.acc.num_processes and info.batch.get("batch_semantics") != "global":
                # per-process batches: the process count is part of the configuration (the global batch
                # follows it), so this is not "another configuration" to discard quietly
                raise RuntimeError(
                    f"checkpoint {info.path} was written by {info.world_size} process(es) with per-process batches "
                    f"(global batch {info.batch.get('global_batch', 'not recorded')}); this launch has "
                    f"{self.acc.num_processes} process(es) and so another global batch. Relaunch with "
                    f"{info.world_size} processes to continue it, or delete {self.ckpt_dir} to start this stage "
                    "over. (Batches given as data.global_batch_size resume on any process count.)")
            self.console(f"ignoring checkpoint {info.path}: written for another configuration "
                         f"(fingerprint {info.fingerprint} != {self.fingerprint}); starting over")
            return
        batches_done = self._resume_position(info)
        state = load_checkpoint_state(info)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.hooks.load_state_dict(state.get("hooks", {}))
        self.pos = _Position(info.epoch, batches_done, info.global_step)
        self.resume_rng = load_rng_file(info, self.acc.process_index) if info.world_size == self.acc.num_processes \
            else None
        self.resumed_from = info.tag
        dropped = self.log.truncate_after(info.global_step)
        self.log.write({"event": "resume", "from": info.tag, "epoch": info.epoch, "batches_done": batches_done,
                        "global_step": info.global_step, "dropped_records": dropped,
                        "from_world_size": info.world_size, **self.batch})
        self.console(f"resumed from {info.path} (epoch {info.epoch}, {info.batches_done} batches done, "
                     f"step {info.global_step})")

    def _resume_position(self, info: Any) -> int:
        """Batches of ``info.epoch`` already done on this process, for a checkpoint written by any process
        count.

        Same process count: the checkpoint's own count. Another count at an epoch boundary: 0, the next
        epoch starts from its beginning (the epoch order depends on ``(seed, epoch)`` only). Another
        count mid-epoch: the global position (optimizer steps done x global batch) is kept when the
        global batch is the same (``data.global_batch_size``): with the global order sharded in
        per-process batches, step ``s`` starts at position ``s x G`` on any process count, so this
        process skips ``s x grad_accum`` of its micro-batches. Otherwise it refuses, saying how to
        proceed; an epoch is never silently restarted.
        """
        if info.world_size == self.acc.num_processes or info.batches_done == 0:
            return info.batches_done
        old = info.batch
        here = f"{self.acc.num_processes} process(es), global batch {self.batch.get('global_batch')}"
        fixes = (f"Resume with {info.world_size} processes; or wait for the next epoch-end checkpoint (an "
                 f"epoch boundary resumes on any process count); or delete {self.ckpt_dir} to restart this stage.")
        if not old or old.get("global_batch") is None or self.batch.get("global_batch") is None:
            raise RuntimeError(f"checkpoint {info.path} is mid-epoch and was written by {info.world_size} process(es) "
                               f"without a recorded batch layout, but this run has {here}: the global position "
                               f"cannot be mapped. {fixes}")
        if old["global_batch"] != self.batch["global_batch"]:
            raise RuntimeError(
                f"checkpoint {info.path} is mid-epoch, written by {info.world_size} process(es) with global batch "
                f"{old['global_batch']} ({old.get('per_process_batch')} per process x grad_accum "
                f"{old.get('grad_accum')}), but this run has {here}: a different global batch cannot continue the "
                f"epoch's order. Give the batch as data.global_batch_size (experts./cbd.global_batch_size for "
                f"those stages) = {old['global_batch']} so it stays the same on any process count. {fixes}")
        accum_old = int(old.get("grad_accum") or 1)
        if info.batches_done % accum_old:
            raise RuntimeError(f"checkpoint {info.path} is not at an optimizer-step boundary "
                               f"({info.batches_done} micro-batches, grad_accum {accum_old}). {fixes}")
        steps = info.batches_done // accum_old
        batches = steps * self.loop.grad_accum
        self.console(f"resuming mid-epoch on {self.acc.num_processes} process(es) from a checkpoint of "
                     f"{info.world_size}: {steps} steps of global batch {old['global_batch']} done in epoch "
                     f"{info.epoch}; continuing at global position {steps * old['global_batch']} "
                     f"({batches} micro-batches per process)")
        return batches

    def _checkpoint(self, epoch: int, batches_done: int, epoch_rng: dict[str, Any]) -> None:
        unwrapped = self._unwrapped()
        state = {
            "model": unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "hooks": self.hooks.state_dict(),
        }
        if batches_done >= self.n_batches:  # an epoch-end checkpoint resumes at the next epoch's start
            epoch, batches_done = epoch + 1, 0
        save_checkpoint(self.ckpt_dir, accelerator=self.acc, state=state,
                        rng={"epoch_start": epoch_rng, "current": rng_state()}, epoch=epoch,
                        batches_done=batches_done, global_step=self.pos.global_step, fingerprint=self.fingerprint,
                        batch=self.batch)

    # ---- one epoch -----------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> tuple[Any, dict[str, Any], int]:
        """Set the loader's epoch, skip done batches on a resumed epoch; return (iterator, epoch-start
        RNG snapshot, first batch index)."""
        skip = self.pos.batches_done if epoch == self.pos.epoch else 0
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng["epoch_start" if skip else "current"])
        epoch_rng = rng_state()
        self.loader.set_epoch(epoch)
        it = iter(self.loader)
        # Skipping by drawing the batches keeps any per-batch randomness in step; it costs reading them.
        for _ in range(skip):
            next(it)
        if skip and self.resume_rng is not None:
            set_rng_state(self.resume_rng["current"])
        self.resume_rng = None
        return it, epoch_rng, skip

    def _run_epoch(self, epoch: int, pbar: ProgressBar) -> dict[str, Any]:
        loop, acc = self.loop, self.acc
        self.model.train()
        self.hooks.on_epoch_start(epoch, self._unwrapped())
        it, epoch_rng, first = self._start_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        samples = 0
        t0 = time.perf_counter()
        window_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        audit = [] if epoch == 0 and first == 0 else None
        for b in range(first, self.n_batches):
            batch = next(it)
            if audit is not None:
                audit.append(batch.indices)
            w_start = (b // loop.grad_accum) * loop.grad_accum
            w_len = min(loop.grad_accum, self.n_batches - w_start)
            last = b == w_start + w_len - 1
            sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.model)
            with sync:
                parts = self.loss_fn(batch, self.forward_fn(self.model, batch))
                acc.backward(parts.loss / w_len)
            loss_d = parts.loss.detach().double()
            bs = _batch_size(batch)
            loss_sum += loss_d * bs
            window_loss += loss_d / w_len
            samples += bs
            if not last:
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pos.global_step += 1
            step_in_epoch = -(-(b + 1) // loop.grad_accum)
            logged = None
            if self.pos.global_step % loop.log_every == 0 or b + 1 == self.n_batches:
                logged, part_values = _reduced_log_values(acc, window_loss, parts)
                rec = {"event": "step", "epoch": epoch, "step_in_epoch": step_in_epoch,
                       "global_step": self.pos.global_step, "loss": logged,
                       "lr": self.scheduler.get_last_lr()[0], **part_values}
                self.log.write(rec)
                self.tb.scalars(rec, self.pos.global_step, f"{loop.desc}/step/")
            window_loss.zero_()
            pbar.update(1, bs * w_len * acc.num_processes, logged)
            if b + 1 < self.n_batches and loop.checkpoint_every_steps \
                    and self.pos.global_step % loop.checkpoint_every_steps == 0:
                self._checkpoint(epoch, b + 1, epoch_rng)
            if self.on_step is not None:
                self.on_step(self.pos.global_step, loop.desc)
        elapsed = time.perf_counter() - t0
        totals = acc.reduce(torch.tensor([float(loss_sum), float(samples)], dtype=torch.float64,
                                         device=acc.device), reduction="sum")
        if audit is not None:
            extra_audit = {"shards": _shard_audit(acc, audit)}
        else:
            extra_audit = {}
        extra = self.hooks.on_epoch_end(epoch, self._unwrapped()) or {}
        rec = {"event": "epoch", "epoch": epoch, "global_step": self.pos.global_step,
               "loss": float(totals[0] / max(totals[1], 1.0)), "samples": int(totals[1]),
               "batches_done": self.n_batches - first, "resumed_at_batch": first or None,
               "time_s": round(elapsed, 3), "samples_per_s": float(totals[1]) / max(elapsed, 1e-9),
               "lr": self.scheduler.get_last_lr()[0], "world_size": acc.num_processes, **extra_audit, **extra}
        self.log.write(rec)  # before the checkpoint: a resume drops records newer than its checkpoint
        self._checkpoint(epoch, self.n_batches, epoch_rng)
        self.tb.scalars(rec, epoch, f"{loop.desc}/epoch/")
        if self.on_epoch is not None:
            self.on_epoch(rec)
        self.console(f"epoch {epoch + 1}/{loop.epochs} loss {rec['loss']:.4f} "
                     f"{rec['samples_per_s']:.0f} img/s ({acc.num_processes} proc)"
                     + "".join(f" {k} {v:.4f}" for k, v in extra.items() if isinstance(v, float)))
        return rec

    def run(self) -> TrainResult:
        loop = self.loop
        history = []
        if self.pos.epoch == 0 and self.pos.batches_done == 0:
            self.log.write({"event": "start", "global_step": 0, "world_size": self.acc.num_processes,
                            "epochs": loop.epochs, "batches_per_epoch": self.n_batches,
                            "steps_per_epoch": self.steps_per_epoch, "grad_accum": loop.grad_accum,
                            "fingerprint": self.fingerprint, **self.batch})
        if self.batch:  # also on a resumed run (its resume record holds the same fields)
            self.console(f"world size {self.batch['world_size']}, per-process batch "
                         f"{self.batch['per_process_batch']}, grad_accum {self.batch['grad_accum']}, global batch "
                         f"{self.batch['global_batch']}" + (f" ({self.batch['batch_key']})"
                                                            if self.batch.get("batch_key") else ""))
        pbar = ProgressBar(loop.epochs * self.steps_per_epoch, loop.desc, loop.progress and self.main,
                           initial=self.pos.global_step)
        try:
            for epoch in range(self.pos.epoch, loop.epochs):
                history.append(self._run_epoch(epoch, pbar))
        finally:
            pbar.close()
            self.tb.close()
        model = self._unwrapped()
        return TrainResult(model=model, global_step=self.pos.global_step, history=history,
                           resumed_from=self.resumed_from)


def _batch_record(loader: Any, world_size: int, grad_accum: int) -> dict[str, Any]:
    """World size, per-process batch, accumulation and global batch of a training loader, as recorded
    in ``log.jsonl`` and checkpoints: the loader's :class:`~lfme_fast.scale.BatchPlan` when
    :meth:`RunContext.train_loader` attached one, else derived from its spec's batch size (empty when
    the loader has neither)."""
    plan = getattr(loader, "batch_plan", None)
    if plan is not None:
        return plan.as_record()
    per = getattr(getattr(loader, "spec", None), "batch_size", None)
    if per is None:
        return {}
    return {"world_size": world_size, "per_process_batch": int(per), "grad_accum": grad_accum,
            "global_batch": int(per) * world_size * grad_accum}


def _maybe_sync_bn(model: torch.nn.Module, acc: Any, console: Any) -> torch.nn.Module:
    """``train.sync_bn``: BatchNorm -> SyncBatchNorm when several GPU processes train (batch statistics
    over every process's share of the micro-step, as one process with the whole micro-step would
    compute them). On CPU (gloo) and on one process the model is returned unchanged, with a note."""
    if acc.num_processes < 2 or acc.device.type != "cuda":
        console(f"train.sync_bn: ignored ({acc.num_processes} process(es) on {acc.device.type}; SyncBatchNorm "
                "needs several GPU processes)")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _shard_audit(acc: Any, indices: list[Any]) -> dict[str, Any]:
    """Which samples each process drew in the first epoch: per-rank counts, how many distinct sample
    indices all ranks drew together and how many indices two or more ranks share (0 for disjoint
    shards of a permutation). A collective; run once per training, so its cost does not matter."""
    from accelerate.utils import gather_object

    local = torch.cat([torch.as_tensor(i).reshape(-1) for i in indices]).cpu().numpy() if indices else np.zeros(0)
    per_rank = gather_object([np.unique(local.astype(np.int64))])
    counts = gather_object([int(local.size)])
    union = np.concatenate(per_rank) if per_rank else np.zeros(0, np.int64)
    distinct = int(np.unique(union).size)
    return {"per_rank_samples": counts, "per_rank_distinct": [int(p.size) for p in per_rank],
            "distinct": distinct, "shared_between_ranks": int(union.size - distinct)}


def _reduced_log_values(acc: Any, window_loss: torch.Tensor, parts: Any) -> tuple[float, dict[str, Any]]:
    """The step's loss (mean over the accumulation window) and the last micro-batch's scalar loss
    components, each averaged over processes (one small all-reduce)."""
    floats = parts.to_floats() if hasattr(parts, "to_floats") else {}
    floats.pop("loss", None)
    names, values = [], []
    for k, v in floats.items():
        for j, x in enumerate(v if isinstance(v, list) else [v]):
            names.append((k, j if isinstance(v, list) else None))
            values.append(float(x))
    vec = torch.tensor([float(window_loss)] + values, dtype=torch.float64, device=acc.device)
    vec = acc.reduce(vec, reduction="mean").tolist()
    out: dict[str, Any] = {}
    for (k, j), x in zip(names, vec[1:]):
        if j is None:
            out[k] = x
        else:
            out.setdefault(k, []).append(x)
    return vec[0], out


def train_model(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: Callable[[Any, Any], Any],
    *,
    accelerator: Any,
    optim: OptimConfig,
    loop: LoopSettings,
    stage_dir: str | Path,
    lr: float | None = None,
    forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
    hooks: TrainHooks | None = None,
    fingerprint: str | None = None,
    channels_last: bool = False,
    on_step: Callable[[int, str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``loop.epochs`` epochs over ``loader``, resuming from ``stage_dir/checkpoints``.

    Args:
        model: an unwrapped ``nn.Module`` (moved to the accelerator's device here).
        loader: a self-sharding loader with ``set_epoch(epoch)``, ``__len__`` (batches per epoch on this
            process, equal on every process) and batches with ``.images``/``.labels``.
        loss_fn: ``loss_fn(batch, outputs) -> LossParts`` (``.loss`` is back-propagated).
        accelerator: an ``accelerate.Accelerator`` (one per process, shared by every stage).
        optim: optimizer and LR-schedule settings; ``lr`` overrides ``optim.lr`` (experts).
        loop: epochs, accumulation, logging, checkpoint cadence.
        stage_dir: where ``log.jsonl`` and ``checkpoints/`` go.
        forward_fn: ``forward_fn(model, batch) -> outputs`` (default ``model(batch.images)``).
        hooks: epoch callbacks (:class:`TrainHooks`).
        fingerprint: the stage's config fingerprint; a checkpoint written under another one is ignored.
        channels_last: convert the model to channels_last (the loader must deliver channels_last too).
        on_step: called as ``on_step(global_step, desc)`` after every optimizer step (after any
            mid-epoch checkpoint); :class:`InterruptAfter` uses it to simulate a killed job in tests.
        on_epoch: called with each epoch's log record (after it is written, on every process); recipes
            send it to the experiment trackers.

    Returns:
        :class:`TrainResult`; the model is left in train mode on the accelerator's device.
    """
    state = _Loop(model, loader, loss_fn, accelerator=accelerator, optim=optim, loop=loop, stage_dir=stage_dir,
                  lr=lr, forward_fn=forward_fn, hooks=hooks, fingerprint=fingerprint, channels_last=channels_last,
                  on_step=on_step, on_epoch=on_epoch)
    try:
        return state.run()
    finally:
        # Accelerate keeps references to every prepared object; drop them so the next stage's model
        # (expert after expert, then the student) does not keep this one's optimizer alive.
        accelerator.free_memory()


# ---------------------------------------------------------------------------------------------------
# run context: what every recipe needs (accelerator, dataset facts, loaders, samplers, models)
# ---------------------------------------------------------------------------------------------------

#: Config keys a trained model depends on (its stage fingerprint). Logging cadence, workers, eval
#: settings and paths are left out: changing them does not change the trained weights.
MODEL_KEYS = (
    "seed", "data.backend", "data.batch_size", "data.resolution", "data.augment", "data.train_split",
    "model", "optim", "train.sampler", "train.samples_per_class", "train.epoch_samples", "train.loss",
    "train.tau", "train.grad_accum", "train.max_steps_per_epoch", "precision",
)


def build_accelerator(cfg: Config) -> Any:
    """One ``Accelerator`` per process for the whole run (every stage shares it).

    The scheduler is stepped by the trainer once per optimizer step: Accelerate's default
    (``step_scheduler_with_optimizer=True``) steps it ``num_processes`` times per call, which assumes a
    prepared loader whose length shrank with the process count; ours shard themselves.

    ``log.trackers`` become Accelerate's ``log_with`` (checked first: a tracker whose package is missing
    is a :class:`~lfme_fast.config.ConfigError`, where Accelerate would drop it silently), logging under
    ``RUN/trackers``. Nothing is written here: trackers start in ``Recipe.setup`` once every check passed.
    ``train.compile`` is checked here too: a machine that cannot compile for the run's device (no C++
    compiler, no Triton) is a ConfigError before anything is written.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from lfme_fast.config import ConfigError
    from lfme_fast.logging_utils import check_trackers

    mp = cfg.precision.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    trackers = list(cfg.log.trackers)
    check_trackers(trackers)
    project = ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "trackers"))
    acc = Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False, log_with=trackers or None,
                      project_config=project)
    if compile_setting(cfg.train.compile) is not None:
        from lfme_fast import compiling

        why = compiling.compile_unavailable(acc.device) if compiling.DEFAULT_BACKEND == "inductor" else None
        if why:
            raise ConfigError(f"train.compile={cfg.train.compile!r}: torch.compile cannot run on this machine "
                              f"({acc.device.type}): {why}; set train.compile: false")
    return acc


class RunContext:
    """Dataset facts and component builders for one run on one process.

    Attributes: ``cfg``, ``accelerator``, ``manifest``, ``num_classes``, ``class_names``,
    ``train_counts`` (per-class training counts, int64), ``device``, ``channels_last`` (resolved).
    """

    def __init__(self, cfg: Config, accelerator: Any):
        from lfme_fast.shards import DataError, load_manifest

        if cfg.data.root is None:
            raise DataError("data.root is not set: pass data.root=PATH (a dataset prepared with python -m data_prep)")
        from lfme_fast.config import ConfigError
        from lfme_fast.scale import BatchError, resolve_batch, resolve_world

        #: the config as loaded (batch sizes as the file gave them); ``cfg`` is it resolved for this launch
        self.launch_cfg = cfg
        try:
            cfg = resolve_world(cfg, accelerator.num_processes)
        except BatchError as exc:
            raise ConfigError(str(exc)) from None
        self.cfg = cfg
        self.accelerator = accelerator
        d = self.launch_cfg.data
        #: the student's / baseline's batch layout on this launch (:class:`lfme_fast.scale.BatchPlan`)
        self.batch = resolve_batch("data", None if d.global_batch_size is not None else d.batch_size,
                                   d.global_batch_size, accelerator.num_processes, cfg.train.grad_accum)
        self._console = Console(accelerator.is_main_process, "scale")
        self.root = Path(cfg.data.root)
        self.manifest = load_manifest(self.root)
        splits = self.manifest.get("splits", {})
        for key in ("train_split", "val_split", "test_split"):
            split = getattr(cfg.data, key)
            if split is not None and split not in splits:
                raise DataError(f"data.{key}={split!r}: {self.root} has no such split (has {sorted(splits)})")
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = list(self.manifest.get("class_names") or [])
        self.train_counts = np.asarray(splits[cfg.data.train_split]["class_counts"], dtype=np.int64)
        self.device = accelerator.device
        cl = cfg.precision.channels_last
        self.channels_last = (self.device.type == "cuda") if cl == "auto" else bool(cl)
        self._labels: dict[str, np.ndarray] = {}

    # ---- facts ---------------------------------------------------------------------------------
    def labels(self, split: str) -> np.ndarray:
        """Labels of ``split`` (int64, cached)."""
        if split not in self._labels:
            from lfme_fast.shards import ShardReader

            self._labels[split] = ShardReader(self.root, split).labels
        return self._labels[split]

    def split_fingerprint(self, split: str) -> str | None:
        """The data_prep fingerprint of ``split`` (identifies its content, wherever the folder lives)."""
        return self.manifest["splits"][split].get("fingerprint")

    def model_fingerprint_extra(self) -> dict[str, Any]:
        """What a trained model depends on besides config keys: the data, and the process count when a
        batch is given per process (the global batch is ``batch_size x processes``). A config whose
        batches are all global (:func:`lfme_fast.scale.world_invariant`) records the global batches
        instead, so its stages (finished ones and checkpoints) carry over to another process count."""
        from lfme_fast.scale import batch_sections, world_invariant

        extra: dict[str, Any] = {"train_data": self.split_fingerprint(self.cfg.data.train_split)}
        globals_ = {s: getattr(self.launch_cfg, s).global_batch_size for s in batch_sections(self.launch_cfg)
                    if getattr(self.launch_cfg, s).global_batch_size is not None}
        if globals_:
            extra["global_batch"] = {s: list(v) if isinstance(v, tuple) else v for s, v in globals_.items()}
        if not world_invariant(self.launch_cfg):
            extra["world_size"] = self.accelerator.num_processes
        if self.cfg.train.sync_bn and self.accelerator.num_processes > 1 and self.device.type == "cuda":
            # batch statistics over all processes train another model (only where SyncBatchNorm applies;
            # added only then, so the fingerprints of runs without it are unchanged)
            extra["sync_bn"] = True
        return extra

    @property
    def loader_dtype(self) -> torch.dtype:
        """Images arrive in the autocast dtype on GPU (half the bytes); fp32 on CPU."""
        mp = self.cfg.precision.mixed_precision
        if self.device.type == "cuda" and mp != "no":
            return torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.float32

    # ---- builders ------------------------------------------------------------------------------
    def build_sampler(self, kind: str, labels: np.ndarray, total_epochs: int, *, seed_offset: int = 0,
                      **settings: Any) -> Any:
        """A self-sharding sampler of ``kind`` for this process (:func:`lfme_fast.sampling.build_sampler`):
        ``train.epoch_samples`` and ``train.samples_per_class`` from the config unless ``settings``
        override them (``classes`` for ``subset``, ``initial_weights``/``schedule`` for curricula)."""
        from lfme_fast.sampling import build_sampler

        t = self.cfg.train
        given = {"num_samples": None if kind == "subset" else t.epoch_samples,
                 "samples_per_class": t.samples_per_class, **settings}
        return build_sampler(kind, labels, seed=self.cfg.seed + seed_offset, num_replicas=self.accelerator.num_processes,
                             rank=self.accelerator.process_index, total_epochs=total_epochs, **given)

    @property
    def num_workers(self) -> int:
        """Loader workers per process: ``data.num_workers``, or when null the CPUs this process may use
        divided by the processes on this machine (:func:`lfme_fast.scale.default_num_workers`)."""
        from lfme_fast.scale import default_num_workers

        n = self.cfg.data.num_workers
        return default_num_workers() if n is None else int(n)

    def loader_options(self, split: str, *, train: bool, batch_size: int, sampler: Any = None, total_epochs: int = 1,
                       **changes: Any) -> Any:
        """The :class:`lfme_fast.loaders.LoaderOptions` of this run for ``split`` (data section, device,
        dtype, layout, seed, this process's rank); ``changes`` set further fields (``views``,
        ``colour``, ``views_per_sample``...)."""
        from lfme_fast.loaders import LoaderOptions

        d = self.cfg.data
        return LoaderOptions(self.root, split, train=train, batch_size=batch_size, backend=d.backend, sampler=sampler,
                             total_epochs=total_epochs, resolution=d.resolution, augment=d.augment, device=self.device,
                             dtype=self.loader_dtype, channels_last=self.channels_last, num_workers=d.num_workers,
                             in_memory=d.in_memory, hw_decoder_load=d.hw_decoder_load, seed=self.cfg.seed,
                             num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
                             **changes)

    def train_loader(self, sampler: Any, total_epochs: int, batch_size: int | None = None, *,
                     batch_plan: Any = None, what: str = "", **changes: Any) -> Any:
        """Training loader over ``data.train_split`` in ``sampler``'s order (this process's share);
        ``changes`` are further loader settings a recipe needs (``views_per_sample=2``, ``colour=...``).
        ``batch_plan`` (a :class:`lfme_fast.scale.BatchPlan`) is recorded with the loader for the
        trainer's start record (default: the ``data`` section's when ``batch_size`` is its per-process
        batch); ``what`` names the data in the one-time top-up message (an expert's subset)."""
        from lfme_fast.loaders import build_loader

        loader = build_loader(self.loader_options(self.cfg.data.train_split, train=True,
                                                  batch_size=batch_size or self.cfg.data.batch_size, sampler=sampler,
                                                  total_epochs=total_epochs, **changes))
        per = int(batch_size or self.cfg.data.batch_size)
        if batch_plan is not None:
            loader.batch_plan = batch_plan
        elif per == self.batch.per_process:
            loader.batch_plan = self.batch
        self.report_top_up(getattr(getattr(loader, "spec", None), "sampler", None), what or "training data")
        return loader

    def report_top_up(self, sampler: Any, what: str) -> None:
        """Say once (main process) that ``sampler``'s epoch was shorter than one micro-step of all
        processes and is topped up by repeating samples (:attr:`lfme_fast.sampling._ArraySampler.topped_up`)."""
        top = getattr(sampler, "topped_up", None)
        if top is None:
            return
        base, padded = top
        self._console(f"{what}: {base} samples per epoch is less than one micro-batch of all "
                      f"{self.accelerator.num_processes} process(es) ({padded} = processes x per-process batch); the epoch is topped up to {padded} "
                      f"by repeating samples, one optimizer step per epoch")

    def eval_loader(self, split: str, sampler: Any = None, **changes: Any) -> Any:
        """Evaluation loader (no augmentation) over ``split``: this process's share of all samples,
        or of ``sampler``'s order when given."""
        from lfme_fast.loaders import build_loader

        return build_loader(self.loader_options(split, train=False, batch_size=self.cfg.data.eval_batch_size,
                                                sampler=sampler, **changes))

    def build_model(self, num_classes: int, arch: str | None = None, seed_offset: int = 0) -> torch.nn.Module:
        """A fresh model (initialised from ``seed + seed_offset``, so every process builds the same one and
        the init does not depend on which stages ran before); ``model.pretrained`` is loaded if set."""
        from lfme_fast.models import build_model

        torch.manual_seed(self.cfg.seed + seed_offset)
        m = self.cfg.model
        return build_model(arch or m.arch, num_classes, pretrained_path=m.pretrained, classifier=m.classifier,
                           cosine_scale=m.cosine_scale, **m.kwargs)
