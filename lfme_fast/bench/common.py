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


# --------------------------------------------------------------------------------------------------
# Device timing, process isolation and process memory (shared by epoch, memory and gpu benchmarks)
# --------------------------------------------------------------------------------------------------

class Stopwatch:
    """Seconds taken by a block of work on ``device``.

    On a CUDA device the interval is measured with CUDA events recorded on the current stream: the
    time the GPU took, not the time the host took to queue the work (reading it synchronises on the
    end event). Elsewhere it is the wall clock. ``start()`` then ``stop()`` (returns the seconds).
    """

    def __init__(self, device: Any = "cpu"):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._t0 = 0.0
        self._events = None

    def start(self) -> None:
        """Mark the beginning of the interval."""
        if self.cuda:
            import torch

            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Mark the end of the interval and return its length in seconds."""
        if self.cuda:
            if self._events is None:
                raise RuntimeError("Stopwatch.stop() before start()")
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000.0
        return time.perf_counter() - self._t0


def device_timings(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, timed with a
    :class:`Stopwatch` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    watch = Stopwatch(device)
    times = []
    for _ in range(repeats):
        watch.start()
        fn()
        times.append(watch.stop())
    return times


def run_isolated(fn: Callable[..., Any], *args: Any, isolate: bool = True) -> Any:
    """``fn(*args)`` in a fresh spawned process (``isolate``), else in this one; returns its result.

    Why a process per measurement: thread pools, compiled pipelines and allocator caches of one
    loader stay alive after it is closed and slow the next one down (the loader benchmark saw ~15%);
    a training job runs one loader. ``fn`` must be importable (a module-level function) and its
    arguments and result picklable. A failure in the child is raised here as :class:`IsolatedError`
    carrying the child's traceback.
    """
    if not isolate:
        return fn(*args)
    import multiprocessing as mp
    import traceback
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_call_reporting, fn, *args).result()
        except BrokenProcessPool as exc:
            raise IsolatedError(f"{getattr(fn, '__name__', fn)}: its process died ({exc})") from None
        except IsolatedError:
            raise
        except Exception as exc:  # pragma: no cover - _call_reporting wraps every error
            raise IsolatedError(f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None


class IsolatedError(RuntimeError):
    """A measurement failed in its own process; ``detail`` is that process's traceback."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):  # picklable with its detail (it crosses the process boundary)
        return (IsolatedError, (str(self), self.detail))


def _call_reporting(fn: Callable[..., Any], *args: Any) -> Any:
    import traceback

    try:
        return fn(*args)
    except Exception as exc:
        raise IsolatedError(f"{type(exc).__name__}: {exc}", traceback.format_exc()) from None


def error_record(exc: BaseException) -> dict[str, Any]:
    """What a result records for a measurement that failed (the run goes on)."""
    import traceback

    detail = getattr(exc, "detail", "") or "".join(traceback.format_exception(exc))
    message = str(exc) if isinstance(exc, IsolatedError) else f"{type(exc).__name__}: {exc}"
    return {"error": message, "traceback": detail}


#: Fields of ``/proc/<pid>/smaps_rollup`` recorded per process (kB in the file, bytes in results).
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean", "Shared_Dirty",
                "Private_Clean", "Private_Dirty", "Anonymous", "Swap")


def _parse_smaps_kb(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = out.get(key, 0) + int(parts[0]) * 1024
    return out


def process_memory(pid: int) -> dict[str, int]:
    """Bytes of memory of process ``pid`` by kind (:data:`SMAPS_FIELDS`) from ``smaps_rollup``.

    RSS counts every resident page the process maps; PSS divides each page by the number of
    processes mapping it, so the PSS of N processes sums to the memory they take together: a file
    mapped by all of them counts once in that sum, a private copy N times.
    """
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    values = _parse_smaps_kb(text.splitlines()[1:])
    return {k: values.get(k, 0) for k in SMAPS_FIELDS}


def mapped_file_memory(pid: int, prefix: str | os.PathLike) -> dict[str, Any]:
    """RSS and PSS (bytes) of the mappings of process ``pid`` whose file lies under ``prefix``, and
    the distinct files mapped (``/proc/<pid>/smaps``)."""
    prefix = str(Path(prefix).resolve())
    rss = pss = 0
    files: set[str] = set()
    current: str | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
            path = head[5].strip() if len(head) == 6 else ""
            current = path if path.startswith(prefix) else None
            if current:
                files.add(current)
        elif current is not None:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key == "Rss":
                rss += int(parts[0]) * 1024
            elif key == "Pss":
                pss += int(parts[0]) * 1024
    return {"rss": rss, "pss": pss, "files": sorted(files)}


def child_pids(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def gpu_info() -> dict[str, Any]:
    """The GPU and its software stack: name, memory, capability, driver, CUDA, cuDNN, torch and DALI
    versions (``{"cuda_available": False}`` without one)."""
    import subprocess

    import torch

    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_version": torch.__version__}
    try:
        import nvidia.dali

        info["dali_version"] = nvidia.dali.__version__
    except Exception:  # DALI is optional; recorded as absent
        info["dali_version"] = None
    if not info["cuda_available"]:
        return info
    props = torch.cuda.get_device_properties(0)
    info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "compute_capability": f"{props.major}.{props.minor}", "gpu_count": torch.cuda.device_count(),
                 "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version()})
    try:  # the driver version is not exposed by torch
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        info["driver_version"] = out.strip().splitlines()[0]
    except Exception as exc:  # no nvidia-smi on PATH: say so rather than guess
        info["driver_version"] = None
        info["driver_version_error"] = f"{type(exc).__name__}: {exc}"
    return info
