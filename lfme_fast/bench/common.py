"""Shared benchmark plumbing: machine/version description, atomic JSON results, process isolation
with a time limit, and optional-package look-ups. (The JPEG codec a benchmark uses where simplejpeg is
missing is chosen explicitly: :mod:`lfme_fast.jpeg`.)"""

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


def write_result(path: str | os.PathLike | None, result: dict[str, Any], *, echo: bool = True) -> None:
    """Print ``result`` as JSON (unless ``echo`` is False) and, if ``path`` is given, write it there
    atomically (a temporary name, then a rename: a reader or a kill never sees half a file)."""
    text = json.dumps(result, indent=2, sort_keys=False)
    if echo:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")


def process_age_s() -> float:
    """Seconds since this process started (Linux: its start time in ``/proc/self/stat`` against
    ``/proc/uptime``, to 10 ms); 0.0 where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


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

    How nothing is left behind: the child starts a process group of its own (``os.setsid``), which the
    processes it starts inherit, and a kill signals that whole group (:func:`_kill_tree`) — a worker
    forked a moment before the kill is in it too. Any way out of this function (an error, a
    ``KeyboardInterrupt``, a ``SystemExit`` raised by a SIGTERM handler as the GPU script installs) kills
    the child's group before it returns; and the child dies with this process (Linux's parent-death
    signal), so even a SIGKILL here does not leave it holding a GPU.
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
    proc = ctx.Process(target=_child_main, args=(writer, fn, args, os.getpid()), name=f"lfme-bench-{name}",
                       daemon=False)
    try:
        proc.start()
    except Exception as exc:  # e.g. an argument that cannot be pickled
        reader.close()
        writer.close()
        raise IsolatedError(f"{name}: its process did not start ({type(exc).__name__}: {exc})",
                            traceback.format_exc()) from None
    except BaseException:  # SIGTERM (the GPU script's Terminated) or Ctrl-C while it started: no orphan part
        if proc.pid is not None:
            _kill_tree(proc)
            proc.join(timeout=exit_grace_s)
        reader.close()
        writer.close()
        raise
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
            wait([proc.sentinel], timeout=exit_grace_s)
            _kill_tree(proc)  # before it is reaped: the workers it leaves are still in its group
            proc.join(timeout=exit_grace_s)
            raise IsolatedError(f"{name}: its process died without answering (exit code {proc.exitcode})") from None
        answered = True
    finally:
        reader.close()
        if not answered or wait([proc.sentinel], timeout=exit_grace_s) == []:
            _kill_tree(proc)  # no answer (an error on the way) or a hung exit: nothing of it may linger
        else:
            _kill_tree(proc, group_only=True)  # it exited: a worker it left behind in its group may not linger
        proc.join(timeout=exit_grace_s)
    if status == "error":
        raise payload
    return payload


def _kill_tree(proc: Any, group_only: bool = False) -> int:
    """SIGKILL ``proc`` (a started :class:`multiprocessing.Process` of :func:`run_isolated`), its
    process group and its descendants; returns how many processes were signalled.

    The group (the child's own, made by ``os.setsid`` in :func:`_child_main`) is killed with one
    ``killpg``: that also reaches a worker forked after any listing. It is signalled only while the
    child is not yet reaped (alive or a zombie), so its pid, which names the group, cannot have been
    reused, and only when the child leads its group — never the caller's group (a child that has not
    reached its ``setsid`` yet is still in the caller's). Descendants listed from ``/proc`` that left
    the group (a ``setsid`` of their own) are killed one by one. ``group_only``: a child known to have
    exited; only what remains of its group is killed.
    """
    import signal

    pid = proc.pid
    if pid is None or not _unreaped(proc):
        return 0  # never started, or reaped: its pid may name another process (or group) by now
    members = set(_group_members(pid)) if not group_only else set()
    try:
        descendants = [] if group_only else child_pids(pid)
    except OSError:  # no /proc: the group kill below still reaches the workers
        descendants = []
    try:
        own_group = os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        own_group = False
    if own_group:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
    if group_only:
        return 0
    proc.kill()  # a child still in the caller's group (killed before its setsid)
    for d in descendants:
        if d not in members:
            try:
                os.kill(d, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # already gone
    return len(members | set(descendants) | {pid})


def _unreaped(proc: Any) -> bool:
    """Whether ``proc``'s process is still an unreaped child of this process (running, or exited but not
    waited for); asked without reaping it. Without ``os.waitid`` (macOS before Python 3.13):
    ``proc.exitcode is None``, which reaps an exited child (then False) and otherwise means it is still
    running; only this process reaps it, so its pid and group stay its own until then."""
    if not hasattr(os, "waitid"):
        return proc.exitcode is None
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def _group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (from ``/proc/*/stat``; empty without ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if len(fields) > 2 and fields[2] == str(pgid):
            out.append(int(stat.parent.name))
    return out


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple, parent_pid: int | None = None) -> None:
    """Entry point of :func:`run_isolated`'s process: send ``("ok", result)`` or ``("error", IsolatedError)``.

    First it leads a process group of its own (the processes it starts join it: :func:`_kill_tree` kills
    them all with one signal) and asks to be killed when ``parent_pid`` dies (Linux only)."""
    import traceback

    try:
        os.setsid()
    except (OSError, AttributeError):  # a group leader already, or no setsid (Windows): killed by pid alone
        pass
    if parent_pid is not None:
        _die_with_parent(parent_pid)
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


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``; Linux only, else nothing):
    a measurement must not outlive a benchmark killed from outside, whatever the signal."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):  # not Linux / no prctl
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody will signal
        os._exit(1)


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
# Optional packages
# --------------------------------------------------------------------------------------------------

def package_available(name: str) -> bool:
    """Whether ``import name`` can find the package, looked up without importing it (importing ffcv
    compiles numba code for seconds). ``nvidia.dali`` without an ``nvidia`` package is False, not an error."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is absent, or a module without a spec
        return False
