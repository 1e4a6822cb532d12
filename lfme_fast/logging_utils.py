"""Run logging: JSONL metric logs, console messages and the training progress bar.

Everything here is a no-op on non-main processes, so callers never branch on the rank themselves.
The JSONL log is rewritten atomically on every record (through ``lfme_fast.io``): a crash never leaves
a half-written line, and a resumed run can drop the records written after its checkpoint
(:meth:`JsonlLog.truncate_after`). Logs are small (one line per epoch plus one every ``log_every``
steps), so rewriting the file costs nothing measurable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lfme_fast.io import atomic_write_text

__all__ = ["JsonlLog", "Console", "ProgressBar", "TensorBoardWriter", "read_jsonl"]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file (an absent file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(v: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become None; numpy scalars become Python numbers."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlLog:
    """Append-only (from the reader's point of view) JSONL log written by the main process.

    Args:
        path: the ``.jsonl`` file; existing records are kept (a resumed run continues the file).
        enabled: false on non-main processes.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = read_jsonl(self.path) if enabled else []

    def write(self, record: dict[str, Any]) -> None:
        """Add one record (a ``time`` field, seconds since the epoch, is added when absent)."""
        if not self.enabled:
            return
        record = _json_safe({"time": round(time.time(), 3), **record})
        self.records.append(record)
        self._flush()

    def truncate_after(self, global_step: int) -> int:
        """Drop step/epoch records later than ``global_step`` (a resumed run redoes them); returns
        how many were dropped."""
        if not self.enabled:
            return 0
        keep = [r for r in self.records if r.get("global_step", -1) <= global_step]
        dropped = len(self.records) - len(keep)
        if dropped:
            self.records = keep
            self._flush()
        return dropped

    def _flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


class Console:
    """Prints to stdout on the main process only, with a ``[tag]`` prefix."""

    def __init__(self, enabled: bool = True, tag: str = "lfme"):
        self.enabled = enabled
        self.tag = tag

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.tag}] {msg}", flush=True)


class ProgressBar:
    """A tqdm bar showing loss and samples/s (global: all processes), or nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self._bar = None
        self._t0 = time.perf_counter()
        self._samples = 0
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                             file=sys.stderr)

    def update(self, steps: int, samples: int, loss: float | None = None) -> None:
        """Advance by ``steps`` optimizer steps that consumed ``samples`` images (all processes)."""
        self._samples += samples
        if self._bar is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        post = {"img/s": f"{self._samples / elapsed:.0f}"}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class TensorBoardWriter:
    """Scalars to TensorBoard on the main process; a no-op when disabled.

    Raises:
        RuntimeError: enabled but the ``tensorboard`` package is not installed (``log.tensorboard``).
    """

    def __init__(self, log_dir: str | os.PathLike, enabled: bool):
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "log.tensorboard=true needs the 'tensorboard' package, which is not installed "
                f"({exc}); install it or set log.tensorboard=false"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, record: dict[str, Any], step: int, prefix: str = "") -> None:
        """Write every finite numeric field of ``record`` at ``step``."""
        if self._writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._writer.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
