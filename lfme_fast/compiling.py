"""Optional ``torch.compile`` of the trained model (config key ``train.compile``).

``train.compile`` is ``false`` (eager, the default), ``true`` (``torch.compile`` with its default mode)
or a mode name (:data:`COMPILE_MODES`). :func:`compile_setting` turns the config value into the mode
to use or None; :func:`compile_unavailable` says why compilation cannot run on this machine (no C++
compiler for Inductor's CPU kernels, no Triton for its GPU kernels, a Python that TorchDynamo does not
support), so that asking for it fails before a run writes anything (a ConfigError from
:func:`lfme_fast.trainer.build_accelerator`) instead of at the first forward with a compiler
traceback; :func:`compile_model` applies it (and checks again, for direct ``train_model`` callers).

Where it is applied (:mod:`lfme_fast.trainer`): to the model *after* ``accelerator.prepare``, i.e.
around the DistributedDataParallel wrapper in a multi-process run (as Accelerate itself does), so
that TorchDynamo's DDP optimiser splits the graph at the gradient buckets and the all-reduce still
overlaps the backward. Checkpoints, hooks and the returned model always use the module underneath
(``accelerator.unwrap_model(..., keep_torch_compile=False)``): state-dict keys never carry the
``_orig_mod.`` prefix of a compiled module, so a checkpoint written with compile on loads without it
and the other way round (and :func:`lfme_fast.models.load_pretrained` strips the prefix from foreign
checkpoints anyway). ``train.compile`` is not part of a stage's fingerprint: turning it on or off
resumes the same run.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

__all__ = ["COMPILE_MODES", "DEFAULT_BACKEND", "compile_setting", "compile_unavailable", "compile_model",
           "CompileUnavailable"]

#: ``torch.compile`` modes accepted by ``train.compile`` (``true`` = ``"default"``). ``reduce-overhead``
#: adds CUDA graphs (GPU only; on a CPU it is the default mode); the ``max-autotune`` modes benchmark
#: kernel choices at compile time (minutes).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileUnavailable(RuntimeError):
    """``torch.compile`` was asked for but cannot run on this machine (the message says why)."""


def compile_setting(value: Any) -> str | None:
    """The ``torch.compile`` mode for a ``train.compile`` value (``False``/None -> None, ``True`` ->
    ``"default"``, a mode name -> itself). Raises ValueError for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(f"expected false, true or one of {', '.join(COMPILE_MODES)}; got {value!r}")


def _cpp_compiler() -> str | None:
    """The C++ compiler Inductor would call for CPU kernels, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return str(get_cpp_compiler())
    except Exception:  # a private API: fall back to looking for the usual names on PATH
        for name in ("g++", "c++", "clang++"):
            found = shutil.which(name)
            if found:
                return found
        return None


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:
        import importlib.util

        return importlib.util.find_spec("triton") is not None


def compile_unavailable(device: Any) -> str | None:
    """Why ``torch.compile`` (TorchDynamo + Inductor) cannot compile a model for ``device`` here, or
    None when it can (the check looks for the tools; it compiles nothing)."""
    dev = torch.device(device)
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            import sys

            return f"TorchDynamo does not support this Python ({sys.version.split()[0]}) or platform"
    except Exception as exc:  # torch built without dynamo
        return f"torch._dynamo cannot be imported ({type(exc).__name__}: {exc})"
    if dev.type == "cpu" and _cpp_compiler() is None:
        return ("Inductor compiles CPU kernels with a C++ compiler and none was found (install g++ or clang++, "
                "or set CXX)")
    if dev.type == "cuda" and not _has_triton():
        return "Inductor generates GPU kernels with Triton, which is not installed (pip install triton)"
    return None


#: The TorchDynamo backend :func:`compile_model` uses by default: Inductor, what ``train.compile`` is for,
#: unless the environment variable ``LFME_COMPILE_BACKEND`` names another. The tests use ``"aot_eager"``
#: (the same graph capture and AOT autograd, no code generation) to check the training path in seconds,
#: also in launched multi-process runs.
DEFAULT_BACKEND = os.environ.get("LFME_COMPILE_BACKEND") or "inductor"


def compile_model(model: torch.nn.Module, mode: str, device: Any, *, backend: str | None = None) -> torch.nn.Module:
    """``torch.compile(model, mode=mode)`` after checking that it can run on ``device``
    (:class:`CompileUnavailable` otherwise). Compilation itself happens at the first forward.
    ``backend``: a TorchDynamo backend other than Inductor (default :data:`DEFAULT_BACKEND`)."""
    compile_setting(mode)  # a mode name check
    backend = backend or DEFAULT_BACKEND
    if backend == "inductor":
        why = compile_unavailable(device)
        if why:
            raise CompileUnavailable(f"train.compile={mode!r}: torch.compile cannot run on this machine: {why}. "
                                     "Set train.compile: false to train eagerly.")
        return torch.compile(model, mode=mode)
    return torch.compile(model, backend=backend)  # another backend (tests: "aot_eager"): modes are Inductor's
