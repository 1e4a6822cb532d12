"""Checkpoints, final model files and stage done-markers.

Training checkpoints (one folder per checkpoint, made visible by a pointer file)::

    STAGE/checkpoints/
        latest.json                 {"tag": "e0003-b000120", "epoch": 3, "batches_done": 120, ...}
        e0003-b000120/state.pt      model / optimizer / scheduler / scaler / hook states + position
        e0003-b000120/rng_rank0.pt  this rank's RNG states (one file per process)
        e0003-b000120/rng_rank1.pt

Every file is written atomically; ``latest.json`` is written by the main process only after every rank
has written its files (a barrier), so a checkpoint is either complete and pointed to, or ignored.
Older checkpoint folders are deleted after the pointer moves.

Each rank's RNG file holds two snapshots: the state at the *start* of the checkpoint's epoch and the
current one. A resumed run restores the epoch-start state, re-creates the epoch's iterator and skips
the batches already done, then restores the current state, so any randomness drawn at iterator
creation or per batch (from global generators) replays exactly as in an uninterrupted run.

Final models are single files ``{"state_dict", "meta"}`` (``save_model_file``/``load_model_file``).
A finished stage writes ``STAGE/done.json`` holding its fingerprint (``lfme_fast.config.fingerprint``)
and outputs; :func:`stage_done` says whether it may be skipped.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from lfme_fast.io import atomic_path, atomic_write_json, read_json_with_fingerprint

__all__ = [
    "CheckpointInfo",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "find_latest",
    "load_checkpoint_state",
    "load_rng_file",
    "save_model_file",
    "load_model_file",
    "write_done",
    "remove_checkpoints",
    "stage_done",
]

LATEST = "latest.json"
DONE = "done.json"


# ---------------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Snapshot of Python, NumPy, torch CPU and (if present) CUDA global generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state` snapshot."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint sits in training: ``batches_done`` batches of ``epoch`` are done (an
    end-of-epoch checkpoint has ``epoch + 1`` and ``0``), after ``global_step`` optimizer steps."""

    path: Path
    tag: str
    epoch: int
    batches_done: int
    global_step: int
    world_size: int
    fingerprint: str | None
    #: the batch layout it was written under (:meth:`lfme_fast.scale.BatchPlan.as_record`: per-process
    #: batch, grad_accum, global batch); empty for checkpoints written before it was recorded
    batch: dict[str, Any] = field(default_factory=dict)


def _tag(epoch: int, batches_done: int) -> str:
    return f"e{epoch:04d}-b{batches_done:06d}"


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    accelerator: Any,
    state: dict[str, Any],
    rng: dict[str, Any],
    epoch: int,
    batches_done: int,
    global_step: int,
    fingerprint: str | None,
    keep: int = 1,
    batch: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint on every rank (collective: every process must call it).

    Args:
        state: model/optimizer/... states, identical on every rank (written by the main process).
        rng: this rank's RNG snapshots (written by each rank).
        keep: number of checkpoint folders to keep (older ones are deleted after the pointer moves).
        batch: the batch layout (per-process batch, grad_accum, global batch), recorded so that a resume
            on another process count can continue mid-epoch from the same global position.

    Returns:
        the checkpoint folder.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = _tag(epoch, batches_done)
    folder = ckpt_dir / tag
    meta = {"tag": tag, "epoch": epoch, "batches_done": batches_done, "global_step": global_step,
            "world_size": accelerator.num_processes, "fingerprint": fingerprint, "batch": dict(batch or {})}
    if accelerator.is_main_process:
        with atomic_path(folder / "state.pt") as tmp:
            torch.save({**state, "meta": meta}, tmp)
    with atomic_path(folder / f"rng_rank{accelerator.process_index}.pt") as tmp:
        torch.save(rng, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(ckpt_dir / LATEST, meta)
        old = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("e") and p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def find_latest(ckpt_dir: str | Path) -> CheckpointInfo | None:
    """The checkpoint ``latest.json`` points to, or None when there is none (or it is incomplete)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    meta = json.loads(pointer.read_text())
    folder = ckpt_dir / meta["tag"]
    if not (folder / "state.pt").exists():
        return None
    return CheckpointInfo(path=folder, tag=meta["tag"], epoch=int(meta["epoch"]),
                          batches_done=int(meta["batches_done"]), global_step=int(meta["global_step"]),
                          world_size=int(meta["world_size"]), fingerprint=meta.get("fingerprint"),
                          batch=dict(meta.get("batch") or {}))


def load_checkpoint_state(info: CheckpointInfo) -> dict[str, Any]:
    """The shared state dict of a checkpoint (on CPU)."""
    # weights_only=False: the file holds optimizer/scheduler state and plain Python metadata that we
    # wrote ourselves; checkpoints from elsewhere go through models.load_pretrained instead.
    return torch.load(info.path / "state.pt", map_location="cpu", weights_only=False)


def load_rng_file(info: CheckpointInfo, rank: int) -> dict[str, Any]:
    """This rank's RNG snapshots ``{"epoch_start": ..., "current": ...}`` of a checkpoint."""
    path = info.path / f"rng_rank{rank}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: checkpoint {info.tag} was written by {info.world_size} "
                                f"process(es) and is incomplete for rank {rank}")
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------
# final model files
# ---------------------------------------------------------------------------------------------------


def save_model_file(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Save ``{"state_dict": ..., "meta": meta}`` atomically (CPU tensors)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": sd, "meta": meta}, tmp)


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a file written by :func:`save_model_file`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ValueError(f"{path} is not a model file written by lfme_fast (no 'state_dict')")
    return obj["state_dict"], obj.get("meta", {})


# ---------------------------------------------------------------------------------------------------
# stage done-markers
# ---------------------------------------------------------------------------------------------------


def write_done(stage_dir: str | Path, fingerprint: str, outputs: Iterable[str], extra: dict | None = None) -> None:
    """Mark a stage finished: ``STAGE/done.json`` with its fingerprint and output files (relative to
    ``stage_dir``). Call on the main process only."""
    atomic_write_json(Path(stage_dir) / DONE,
                      {"fingerprint": fingerprint, "outputs": sorted(outputs), **(extra or {})})


def remove_checkpoints(stage_dir: str | Path) -> None:
    """Delete ``STAGE/checkpoints`` (after the stage's final outputs and done-marker are written, the
    checkpoints can no longer be used: a finished stage is skipped, not resumed)."""
    shutil.rmtree(Path(stage_dir) / "checkpoints", ignore_errors=True)


def stage_done(stage_dir: str | Path, fingerprint: str) -> bool:
    """Whether ``STAGE/done.json`` exists with this fingerprint and every output it lists exists."""
    done = read_json_with_fingerprint(Path(stage_dir) / DONE, fingerprint)
    if done is None:
        return False
    return all((Path(stage_dir) / out).exists() for out in done.get("outputs", []))
