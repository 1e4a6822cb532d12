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

__all__ = ["JsonlLog", "Console", "LogFile", "ProgressBar", "TensorBoardWriter", "read_jsonl", "check_trackers",
           "tracker_values", "flat_config", "tracker_init_kwargs"]

#: Open ``RUN/train.log`` files (:class:`LogFile`) every main-process :class:`Console` line is copied to.
_LOG_FILES: list[Any] = []


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
    """Prints to stdout on the main process only, with a ``[tag]`` prefix; every line is also copied to
    the open :class:`LogFile` (``RUN/train.log``), whichever Console printed it."""

    def __init__(self, enabled: bool = True, tag: str = "lfme"):
        self.enabled = enabled
        self.tag = tag

    def __call__(self, msg: str) -> None:
        if self.enabled:
            line = f"[{self.tag}] {msg}"
            print(line, flush=True)
            for f in _LOG_FILES:
                f.write(line + "\n")


class LogFile:
    """``RUN/train.log``: a copy of what the console printed, opened by a recipe once its checks pass.

    The file is appended to (a resumed or repeated run continues it, after a header line with the date),
    and each line is flushed as it is written: unlike result files it is not written atomically, because a
    log that grows line by line is what shows how far a killed run got. A no-op when ``enabled`` is false
    (non-main processes).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None

    def open(self, header: str = "") -> None:
        """Start copying Console lines into the file."""
        if not self.enabled or self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # line-buffered
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"==== {stamp} {header}".rstrip() + "\n")
        _LOG_FILES.append(self._file)

    def write(self, line: str) -> None:
        """A line for the file only (e.g. why a run stopped), not the console."""
        if self._file is not None:
            self._file.write(line.rstrip("\n") + "\n")

    def close(self) -> None:
        """Stop copying and close the file (idempotent)."""
        if self._file is None:
            return
        if self._file in _LOG_FILES:
            _LOG_FILES.remove(self._file)
        self._file.close()
        self._file = None


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


# ---------------------------------------------------------------------------------------------------
# experiment trackers (Accelerate's ``log_with``)
# ---------------------------------------------------------------------------------------------------

#: pip package of each Accelerate tracker whose name differs from its package (for install hints).
_TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def check_trackers(names: Any) -> None:
    """Every tracker in ``names`` (``log.trackers``) can start: its package is installed.

    Accelerate silently drops a tracker whose package is missing, so a run would train without the
    logging it was asked for; this says so before anything is written.

    Raises:
        lfme_fast.config.ConfigError: naming ``log.trackers``, the tracker and how to install it.
    """
    names = [str(n) for n in names]
    if not names:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from lfme_fast.config import ConfigError

    available = {str(t) for t in get_available_trackers()}
    built_in = set(LoggerType.list())
    for name in names:
        # "all" takes whatever is installed; a class registered with register_tracker_class needs nothing
        if name == "all" or name in available or name not in built_in:
            continue
        pkg = _TRACKER_PACKAGES.get(name, name)
        raise ConfigError(f"log.trackers: {name!r} needs the {pkg!r} package, which is not installed "
                          f"(pip install {pkg}, or pip install 'lfme_fast[log]' for tensorboard and wandb)")


def tracker_values(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric fields of a log record as flat tracker scalars ``prefix/key``; a per-subset dict
    (``{"many": 0.5, ...}``) becomes ``prefix/key/many``, a per-expert list ``prefix/key/0``. Booleans,
    strings, None and non-finite values are left out (trackers plot numbers)."""
    out: dict[str, float] = {}

    def add(key: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                add(f"{key}/{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                add(f"{key}/{i}", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)

    for k, v in record.items():
        if k not in ("time", "event"):
            add(f"{prefix}/{k}", v)
    return out


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"optim.lr": 0.1, ...}`` with scalar values only (lists and None become
    text), the shape trackers accept as hyperparameters (TensorBoard's ``add_hparams`` refuses lists)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


def tracker_init_kwargs(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_kwargs`` for ``accelerator.init_trackers``: wandb writes under
    ``RUN/trackers`` and runs offline unless ``WANDB_MODE`` says otherwise (training nodes often have no
    internet; ``wandb sync RUN/trackers/wandb/offline-run-*`` uploads later)."""
    return {"wandb": {"dir": str(Path(run_dir) / "trackers"), "mode": os.environ.get("WANDB_MODE", "offline")}}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
