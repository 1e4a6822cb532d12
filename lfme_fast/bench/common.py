"""Shared benchmark plumbing: machine/version description and atomic JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from lfme_fast.io import atomic_write_text


def machine_info() -> dict[str, Any]:
    """Hardware and library versions to record next to every figure."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in ("torch", "numpy", "numba", "ffcv", "nvidia.dali", "accelerate", "simplejpeg", "cv2", "PIL"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            info[f"{name}_version"] = getattr(mod, "__version__", "unknown")
        except Exception:  # a missing optional library is recorded, not fatal
            info[f"{name}_version"] = None
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["cuda_version"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        info["cuda_available"] = False
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_result(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    """Print ``result`` as JSON and, if ``path`` is given, write it there atomically."""
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")


def repeat_timing(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall-clock ``fn`` ``repeats`` times after ``warmup`` calls; median/min/mean in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "repeats": repeats}
