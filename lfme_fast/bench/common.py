"""Shared benchmark plumbing: machine/version description, atomic JSON results, process isolation
with a time limit, and a JPEG codec fallback for machines without ``simplejpeg``."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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


def write_result(path: str | os.PathLike | None, result: dict[str, Any], *, echo: bool = True) -> None:
    """Print ``result`` as JSON (unless ``echo`` is False) and, if ``path`` is given, write it there
    atomically (a temporary name, then a rename: a reader or a kill never sees half a file)."""
    text = json.dumps(result, indent=2, sort_keys=False)
    if echo:
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


def run_isolated(fn: Callable[..., Any], *args: Any, isolate: bool = True, timeout_s: float | None = None,
                 exit_grace_s: float = 5.0, label: str | None = None) -> Any:
    """``fn(*args)`` in a fresh spawned process (``isolate``), else in this one; returns its result.

    Why a process per measurement: thread pools, compiled pipelines and allocator caches of one
    loader stay alive after it is closed and slow the next one down (the loader benchmark saw ~15%);
    a training job runs one loader. ``fn`` must be importable (a module-level function) and its
    arguments and result picklable. A failure in the child is raised here as :class:`IsolatedError`
    carrying the child's traceback; a child that dies without answering (killed, out of memory,
    crashed) also raises :class:`IsolatedError`.

    ``timeout_s`` (isolated only; None waits for ever): past it the child and every process it
    started (loader workers) are killed and :class:`IsolatedTimeout` is raised, so one hung
    measurement cannot hold the rest of a benchmark. After answering, the child gets
    ``exit_grace_s`` to exit before it is killed the same way (a CUDA or DALI teardown that hangs).
    Without ``isolate`` no limit can be enforced: ``fn`` runs to its end in this process. ``label``
    names the measurement in the errors (default: ``fn``'s name).
    """
    if not isolate:
        return fn(*args)
    import multiprocessing as mp
    import traceback
    from multiprocessing.connection import wait

    name = label or getattr(fn, "__name__", repr(fn))
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    # A plain Process rather than a ProcessPoolExecutor: a pool cannot kill its worker on a timeout,
    # and its shutdown waits on the worker; here the parent owns the process and can always reap it.
    # daemon=False: a measurement's loader starts worker processes, which a daemonic process may not.
    proc = ctx.Process(target=_child_main, args=(writer, fn, args), name=f"lfme-bench-{name}", daemon=False)
    try:
        proc.start()
    except Exception as exc:  # e.g. an argument that cannot be pickled
        reader.close()
        writer.close()
        raise IsolatedError(f"{name}: its process did not start ({type(exc).__name__}: {exc})",
                            traceback.format_exc()) from None
    writer.close()  # the child holds the only writer now: its exit ends the pipe (EOF) even if it never answers
    answered = False
    try:
        if not wait([reader, proc.sentinel], timeout=timeout_s):
            killed = _kill_tree(proc)
            raise IsolatedTimeout(f"{name}: timed out after {timeout_s:.0f} s; its process and {max(killed - 1, 0)} "
                                  f"process(es) it started were killed", timeout_s=timeout_s)
        try:
            status, payload = reader.recv()
        except (EOFError, OSError):
            proc.join(timeout=exit_grace_s)
            raise IsolatedError(f"{name}: its process died without answering (exit code {proc.exitcode})") from None
        answered = True
    finally:
        reader.close()
        if not answered or wait([proc.sentinel], timeout=exit_grace_s) == []:
            _kill_tree(proc)  # no answer (an error on the way) or a hung exit: nothing of it may linger
        proc.join(timeout=exit_grace_s)
    if status == "error":
        raise payload
    return payload


def _kill_tree(proc: Any) -> int:
    """SIGKILL ``proc`` (a started, not yet reaped :class:`multiprocessing.Process`) and its descendants;
    returns how many processes were signalled. The descendants are listed before the child dies (they
    are re-parented after), the child is killed before them (it cannot start more meanwhile)."""
    import signal

    if proc.pid is None or proc.exitcode is not None:
        return 0
    try:
        descendants = child_pids(proc.pid)
    except OSError:  # no /proc: the child alone (a DataLoader worker exits when its parent dies)
        descendants = []
    proc.kill()
    for pid in descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone
    return 1 + len(descendants)


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    """Entry point of :func:`run_isolated`'s process: send ``("ok", result)`` or ``("error", IsolatedError)``."""
    import traceback

    try:
        payload: tuple[str, Any] = ("ok", _call_reporting(fn, *args))
    except IsolatedError as exc:
        payload = ("error", exc)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: still an answer, not a silent death
        payload = ("error", IsolatedError(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    try:
        conn.send(payload)
    except Exception as exc:  # a result that cannot be pickled
        conn.send(("error", IsolatedError(f"{getattr(fn, '__name__', fn)}: its result cannot be sent back "
                                          f"({type(exc).__name__}: {exc})", traceback.format_exc())))
    finally:
        conn.close()


class IsolatedError(RuntimeError):
    """A measurement failed in its own process; ``detail`` is that process's traceback."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

    def __reduce__(self):  # picklable with its detail (it crosses the process boundary)
        return (IsolatedError, (str(self), self.detail))


class IsolatedTimeout(IsolatedError):
    """A measurement ran past its ``timeout_s`` and its process (with its children) was killed."""

    def __init__(self, message: str, detail: str = "", timeout_s: float | None = None):
        super().__init__(message, detail)
        self.timeout_s = timeout_s

    def __reduce__(self):
        return (IsolatedTimeout, (str(self), self.detail, self.timeout_s))


def _call_reporting(fn: Callable[..., Any], *args: Any) -> Any:
    import traceback

    try:
        return fn(*args)
    except IsolatedError:
        raise
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


# --------------------------------------------------------------------------------------------------
# Optional packages, and a JPEG codec for machines without simplejpeg (the GPU benchmark's image)
# --------------------------------------------------------------------------------------------------

def package_available(name: str) -> bool:
    """Whether ``import name`` can find the package, looked up without importing it (importing ffcv
    compiles numba code for seconds). ``nvidia.dali`` without an ``nvidia`` package is False, not an error."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is absent, or a module without a spec
        return False


#: Marks the stand-in module of :func:`pil_jpeg_module` (``simplejpeg.LFME_PIL_FALLBACK``).
_FALLBACK_FLAG = "LFME_PIL_FALLBACK"
_ABSENT = object()

#: simplejpeg's chroma subsampling names -> Pillow's ``subsampling`` values.
_PIL_SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
_SUBSAMPLING_NAMES = {-1: "Gray", 0: "444", 1: "422", 2: "420"}


def pil_jpeg_module():
    """A stand-in ``simplejpeg`` module built on Pillow (which bundles libjpeg-turbo as well).

    It answers the three calls this project makes — ``encode_jpeg``, ``decode_jpeg_header`` and
    ``decode_jpeg`` (RGB / BGR / GRAY, chroma subsampling 444/422/420, ``min_height``/``min_width``
    through Pillow's DCT-scaled ``draft`` decode) — with simplejpeg's signatures and its ``ValueError``
    on bad data. Why: the data preparation and the JPEG header reads import simplejpeg, which a fixed
    GPU image may lack; with this the GPU benchmark can still prepare its synthetic set and run the
    ``torch`` loader (which decodes with Pillow anyway). It is only installed by
    :func:`jpeg_codec_fallback`, never behind a benchmark that measures simplejpeg itself.
    """
    import io
    import types

    import numpy as np
    import PIL
    from PIL import Image, JpegImagePlugin

    def _open(data: Any):
        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except Exception as exc:  # Pillow's UnidentifiedImageError / OSError -> simplejpeg's ValueError
            raise ValueError(f"not a readable JPEG ({exc})") from None
        if img.format != "JPEG":
            img.close()
            raise ValueError(f"not a JPEG (Pillow reads it as {img.format})")
        return img

    def encode_jpeg(image, quality: int = 85, colorspace: str = "RGB", colorsubsampling: str = "444",
                    fastdct: bool = True, **_ignored: Any) -> bytes:
        arr = np.ascontiguousarray(image, dtype=np.uint8)
        space = colorspace.upper()
        if space == "GRAY" or arr.ndim == 2:
            img = Image.fromarray(arr.reshape(arr.shape[0], arr.shape[1]))  # uint8 HxW: mode L
        elif space in ("RGB", "BGR") and arr.ndim == 3 and arr.shape[2] == 3:
            img = Image.fromarray(np.ascontiguousarray(arr[..., ::-1]) if space == "BGR" else arr)  # mode RGB
        else:
            raise ValueError(f"colorspace {colorspace!r} with shape {arr.shape}: the Pillow fallback writes "
                             "HxWx3 RGB or BGR, or GRAY")
        options: dict[str, Any] = {"quality": int(quality)}
        if img.mode == "RGB":
            if colorsubsampling not in _PIL_SUBSAMPLING:
                raise ValueError(f"colorsubsampling {colorsubsampling!r}: the Pillow fallback writes "
                                 f"{', '.join(_PIL_SUBSAMPLING)}")
            options["subsampling"] = _PIL_SUBSAMPLING[colorsubsampling]
        out = io.BytesIO()
        img.save(out, "JPEG", **options)
        return out.getvalue()

    def _scale(img, min_height: int, min_width: int) -> None:
        if min_height > 0 or min_width > 0:  # the smallest DCT scale (1/2, 1/4, 1/8) still covering both
            img.draft(None, (max(1, int(min_width)), max(1, int(min_height))))

    def decode_jpeg_header(data, min_height: int = 0, min_width: int = 0, min_factor: float = 1.0,
                           strict: bool = True):
        with _open(data) as img:
            _scale(img, min_height, min_width)
            width, height = img.size
            space = {"L": "Gray", "CMYK": "CMYK"}.get(img.mode, "YCbCr")
            sampling = _SUBSAMPLING_NAMES.get(JpegImagePlugin.get_sampling(img), "unknown")
        return height, width, space, "Gray" if space == "Gray" else sampling

    def decode_jpeg(data, colorspace: str = "RGB", fastdct: bool = False, fastupsample: bool = False,
                    min_height: int = 0, min_width: int = 0, min_factor: float = 1.0, buffer: Any = None,
                    strict: bool = True):
        space = colorspace.upper()
        with _open(data) as img:
            _scale(img, min_height, min_width)
            try:
                img.load()  # a truncated scan raises here (Pillow's LOAD_TRUNCATED_IMAGES is off by default)
            except Exception as exc:
                raise ValueError(f"JPEG does not decode ({exc})") from None
            if space == "GRAY":
                return np.array(img.convert("L"))[..., None]
            if space not in ("RGB", "BGR"):
                raise ValueError(f"colorspace {colorspace!r}: the Pillow fallback decodes to RGB, BGR or GRAY")
            rgb = np.array(img.convert("RGB"))  # np.array: a writable copy, as simplejpeg returns
        return np.ascontiguousarray(rgb[..., ::-1]) if space == "BGR" else rgb

    import importlib.machinery

    mod = types.ModuleType("simplejpeg", "Stand-in for simplejpeg on Pillow (lfme_fast.bench.common.pil_jpeg_module)")
    mod.__spec__ = importlib.machinery.ModuleSpec("simplejpeg", None)
    mod.__version__ = f"Pillow {PIL.__version__} fallback"
    mod.encode_jpeg, mod.decode_jpeg_header, mod.decode_jpeg = encode_jpeg, decode_jpeg_header, decode_jpeg
    setattr(mod, _FALLBACK_FLAG, True)
    return mod


@contextlib.contextmanager
def jpeg_codec_fallback(active: bool | None = None) -> Iterator[Any]:
    """Within the block, ``import simplejpeg`` gives :func:`pil_jpeg_module`'s stand-in when
    ``active`` (None: when simplejpeg is not installed); the previous state is restored after.

    Modules that import simplejpeg at their top while the block runs (``data_prep.images``) keep the
    stand-in; a function that imports it when called needs the block around the call. Yields the
    stand-in, or None when nothing was installed.
    """
    if active is None:
        active = not package_available("simplejpeg")
    if not active:
        yield None
        return
    previous = sys.modules.get("simplejpeg", _ABSENT)
    module = pil_jpeg_module()
    sys.modules["simplejpeg"] = module
    try:
        yield module
    finally:
        if sys.modules.get("simplejpeg") is module:
            if previous is _ABSENT:
                del sys.modules["simplejpeg"]
            else:
                sys.modules["simplejpeg"] = previous


def jpeg_codec() -> str:
    """What ``import simplejpeg`` gives here: its version, the Pillow stand-in, or 'not installed'."""
    module = sys.modules.get("simplejpeg")
    if module is not None and getattr(module, _FALLBACK_FLAG, False):
        return f"{module.__version__} (simplejpeg is not installed)"
    if not package_available("simplejpeg"):
        return "not installed"
    try:
        import simplejpeg

        return f"simplejpeg {getattr(simplejpeg, '__version__', 'unknown')}"
    except Exception as exc:  # installed but broken: say how
        return f"simplejpeg does not import ({type(exc).__name__}: {exc})"
