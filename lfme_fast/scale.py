"""Scaling out: batch semantics across process counts, and per-process resource defaults.

Two ways to give a batch size (issue 14):

* **per process** (``data.batch_size``, ``experts.batch_size``, ``cbd.batch_size``): every process
  draws that many samples per micro-batch, so the batch one optimizer step sees (the *global batch*)
  is ``batch_size x world size x train.grad_accum`` and grows with the process count;
* **global** (``data.global_batch_size``, ``experts.global_batch_size``, ``cbd.global_batch_size``):
  the paper's batch. The per-process batch follows from the launch,
  ``global / (world size x train.grad_accum)``, and must divide exactly (:class:`BatchError`, which
  names the key). Setting both forms in one section is a :class:`~lfme_fast.config.ConfigError`.

With the global form a run is *world-size invariant*: the samplers shard one global order in
per-process batches (:meth:`lfme_fast.sampling.Sampler.shard_batches`), so a 1-process and an
8-process run with the same seed and global batch draw the same global batches in the same order,
and the run's fingerprints do not depend on the process count (a checkpoint written on 8 GPUs
resumes on 4).

:func:`resolve_world` turns a loaded config into the config of one launch (per-process batches
filled in) and :func:`describe` is the line every run prints and records.

:func:`default_num_workers` is the loader-worker default: the CPUs this process may use (its CPU
affinity and the cgroup's CPU quota) divided by the processes on this machine (``LOCAL_WORLD_SIZE``),
so eight processes on one machine no longer start eight times as many workers as it has cores.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BatchError", "BatchPlan", "resolve_batch", "resolve_world", "world_invariant", "describe",
           "usable_cpus", "local_world_size", "default_num_workers", "batch_sections"]


class BatchError(ValueError):
    """A batch setting that the launch cannot honour; the message names the key, the world size and the
    accumulation."""


@dataclass(frozen=True)
class BatchPlan:
    """One batch setting resolved for one launch.

    ``per_process`` samples per micro-batch on each process; ``global_batch`` = ``per_process x
    world_size x grad_accum`` (what one optimizer step sees); ``semantics`` 'global' (the config gave the
    global batch) or 'per_process' (it gave the per-process one); ``key`` the config key it came from.
    """

    key: str
    per_process: int
    global_batch: int
    world_size: int
    grad_accum: int
    semantics: str

    def as_record(self) -> dict[str, Any]:
        """The fields a run records (``log.jsonl`` start records, checkpoints)."""
        return {"world_size": self.world_size, "per_process_batch": self.per_process,
                "grad_accum": self.grad_accum, "global_batch": self.global_batch, "batch_semantics": self.semantics,
                "batch_key": self.key}


def resolve_batch(key: str, per_process: int | None, global_batch: int | None, world_size: int,
                  grad_accum: int, what: str = "") -> BatchPlan:
    """The :class:`BatchPlan` of one setting: exactly one of ``per_process`` / ``global_batch`` is given.

    ``key`` names the setting in messages (``data`` -> ``data.batch_size`` / ``data.global_batch_size``;
    a key ending in ``]`` is used as is). ``what`` adds context to the error (an expert's subset).

    Raises:
        BatchError: both or neither given, or the global batch does not divide into ``world_size x
            grad_accum`` whole per-process batches.
    """
    if world_size < 1 or grad_accum < 1:
        raise BatchError(f"world size and grad_accum must be >= 1, got {world_size}, {grad_accum}")
    gkey, pkey = (key, key) if key.endswith("]") else (f"{key}.global_batch_size", f"{key}.batch_size")
    if (per_process is None) == (global_batch is None):
        raise BatchError(f"{key}: set exactly one of batch_size (per process) and global_batch_size, got "
                         f"batch_size={per_process}, global_batch_size={global_batch}")
    if per_process is not None:
        if per_process < 1:
            raise BatchError(f"{pkey} must be >= 1, got {per_process}")
        return BatchPlan(pkey, int(per_process), int(per_process) * world_size * grad_accum, world_size, grad_accum,
                         "per_process")
    share = world_size * grad_accum
    context = f" ({what})" if what else ""
    if global_batch < share:
        raise BatchError(
            f"{gkey}={global_batch}{context} is smaller than world size {world_size} x train.grad_accum "
            f"{grad_accum} = {share}: each process needs at least one sample per micro-batch. Launch at most "
            f"{max(1, global_batch // grad_accum)} processes, lower train.grad_accum, or raise {gkey}.")
    if global_batch % share:
        lower, upper = (global_batch // share) * share, -(-global_batch // share) * share
        if global_batch % grad_accum == 0:
            # process counts R that work: R divides the micro-step G / grad_accum
            other = f"or a process count that divides {global_batch // grad_accum}"
        else:
            other = f"or a train.grad_accum that divides {global_batch} (no process count works with {grad_accum})"
        raise BatchError(
            f"{gkey}={global_batch}{context} does not divide into world size {world_size} x train.grad_accum "
            f"{grad_accum} = {share} equal per-process batches; use a multiple of {share} (e.g. {lower} or {upper}) "
            f"{other}.")
    return BatchPlan(gkey, global_batch // share, int(global_batch), world_size, grad_accum, "global")


def batch_sections(cfg: Any) -> list[str]:
    """Names of the config's sections that carry both ``batch_size`` and ``global_batch_size``
    (``data`` and the recipe sections that train models of their own: ``experts``, ``cbd``)."""
    out = []
    for name in ["data", *sorted(getattr(cfg, "sections", {}) or {})]:
        sec = getattr(cfg, name)
        names = {f.name for f in dataclasses.fields(sec)}
        if {"batch_size", "global_batch_size"} <= names:
            out.append(name)
    return out


def world_invariant(cfg: Any) -> bool:
    """True when every batch of the config is given in the global form, so what the run trains does not
    depend on the process count (its fingerprints leave the world size out)."""
    return all(getattr(cfg, s).global_batch_size is not None for s in batch_sections(cfg))


def _per_process(section: str, value: Any, world_size: int, grad_accum: int) -> Any:
    if isinstance(value, tuple):  # one global batch per expert subset
        return tuple(resolve_batch(f"{section}.global_batch_size[{i}]", None, int(v), world_size, grad_accum)
                     .per_process for i, v in enumerate(value))
    return resolve_batch(section, None, int(value), world_size, grad_accum).per_process


def resolve_world(cfg: Any, world_size: int) -> Any:
    """``cfg`` for a launch of ``world_size`` processes: every section given a global batch gets its
    per-process ``batch_size`` filled in (``data.eval_batch_size`` too when it was left null), so the code
    that builds loaders reads per-process sizes whatever the config's form. A config in the per-process
    form comes back unchanged.

    Raises:
        BatchError: a global batch does not divide into the launch (the message names the key).
    """
    accum = int(cfg.train.grad_accum)
    changes: dict[str, Any] = {}
    sections = dict(getattr(cfg, "sections", {}) or {})
    for name in batch_sections(cfg):
        sec = getattr(cfg, name)
        if sec.global_batch_size is None:
            continue
        try:
            per = _per_process(name, sec.global_batch_size, world_size, accum)
        except BatchError:
            if name == "data" or not getattr(sec, "BATCH_ERRORS_LATE", False):
                raise
            # the section's stage reports it with what only it knows (an expert's subset and size)
            per = None
        extra = {}
        if name == "data" and sec.eval_batch_size is None:
            extra["eval_batch_size"] = per
        new = dataclasses.replace(sec, batch_size=per, **extra)
        if name == "data":
            changes["data"] = new
        else:
            sections[name] = new
    if not changes and sections == dict(getattr(cfg, "sections", {}) or {}):
        return cfg
    return dataclasses.replace(cfg, sections=sections, **changes)


def describe(plan: BatchPlan) -> str:
    """``world size 8, per-process batch 32, grad_accum 1, global batch 256 (data.global_batch_size)``."""
    return (f"world size {plan.world_size}, per-process batch {plan.per_process}, grad_accum {plan.grad_accum}, "
            f"global batch {plan.global_batch} ({plan.key})")


# ---------------------------------------------------------------------------------------------------
# CPUs per process
# ---------------------------------------------------------------------------------------------------


def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``),
    or None when there is no quota. A quota of 1.5 CPUs means 1.5 cores' time per period, whatever the
    affinity mask says."""
    base = Path(root)
    try:
        text = (base / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return float(text[0]) / float(text[1])
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((base / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask (``os.sched_getaffinity``; a SLURM job step or
    ``taskset`` narrows it) capped by the cgroup CPU quota (containers, Kubernetes limits), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def local_world_size() -> int:
    """Processes of this job on this machine: ``LOCAL_WORLD_SIZE`` (torchrun / accelerate launch), else
    SLURM's ``SLURM_NTASKS_PER_NODE`` when it is a plain number, else 1."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def default_num_workers(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Loader workers per process when ``data.num_workers`` is null: :func:`usable_cpus` divided by
    :func:`local_world_size` (at least 1), so the processes on one machine share its cores instead of
    each starting one worker per core.

    Exception: a SLURM task started by ``srun`` itself (no ``LOCAL_WORLD_SIZE``) with
    ``SLURM_CPUS_PER_TASK`` set already has its own CPUs (SLURM binds each task to them), so it gets
    that many, capped by :func:`usable_cpus`, instead of a further division by the tasks per node."""
    cpus = usable_cpus(cgroup_root)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not os.environ.get("LOCAL_WORLD_SIZE", "").isdigit() and per_task.isdigit() and int(per_task) >= 1:
        return max(1, min(cpus, int(per_task)))
    return max(1, cpus // local_world_size())
