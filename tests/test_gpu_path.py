"""The GPU path's options, on the CPU: ``train.compile`` (torch.compile of the trained model) and
``data.hw_decoder_load`` (DALI mixed decoding), their validation and plumbing, the uint8 -> normalised
conversion that runs on the GPU (checked here on CPU tensors against the CPU path), and the parts that
need CUDA, skipped without it.

Compiled training runs here use TorchDynamo's ``aot_eager`` backend (graph capture and AOT autograd,
no code generation) so that they take seconds; Inductor's speed is measured by ``lfme-bench compile``.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from lfme_fast import compiling
from lfme_fast.checkpoint import find_latest, load_checkpoint_state, load_model_file
from lfme_fast.config import ConfigError, TrainConfig, config_from_dict, load_config
from lfme_fast.loaders import LoaderOptions, resolve_spec
from lfme_fast.loaders.base import normalize_tensors, normalize_uint8_nhwc, normalize_uint8_torch

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (DALI mixed decoding / ffcv's pinned uint8 "
                                                 "batches); this machine has none")


# ---- config keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("false", False), ("true", True), ("max-autotune", "max-autotune"),
                                             ("reduce-overhead", "reduce-overhead"), ("off", False)])
def test_train_compile_values(value, expected):
    cfg = config_from_dict({}, [f"train.compile={value}"])
    assert cfg.train.compile == expected
    assert compiling.compile_setting(cfg.train.compile) == {False: None, True: "default"}.get(expected, expected)


def test_train_compile_rejects_unknown_mode():
    with pytest.raises(ConfigError, match=r"train\.compile: expected .*max-autotune.*got 'fast' \(override"):
        config_from_dict({}, ["train.compile=fast"])
    with pytest.raises(ValueError, match="expected false, true or one of"):
        compiling.compile_setting("fast")


def test_config_compile_modes_match_the_compiling_module():
    hint = typing.get_type_hints(TrainConfig)["compile"]
    literal = next(a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal)
    assert typing.get_args(literal) == compiling.COMPILE_MODES


def test_hw_decoder_load_config():
    cfg = config_from_dict({"data": {"backend": "dali", "hw_decoder_load": 0.25}})
    assert cfg.data.hw_decoder_load == 0.25
    assert config_from_dict({}).data.hw_decoder_load is None
    with pytest.raises(ConfigError, match=r"data\.hw_decoder_load: must be in \[0, 1\] or null, got 1\.5 \(override"):
        config_from_dict({}, ["data.backend=dali", "data.hw_decoder_load=1.5"])
    with pytest.raises(ConfigError, match=r"data\.hw_decoder_load: applies to data\.backend: dali only .* 'ffcv'"):
        config_from_dict({"data": {"backend": "ffcv", "hw_decoder_load": 0.5}})
    with pytest.raises(ConfigError, match=r"data\.hw_decoder_load: expected float \| null"):
        config_from_dict({}, ["data.backend=dali", "data.hw_decoder_load=[1]"])


def test_readme_documents_the_keys():
    text = (REPO / "README.md").read_text()
    for key in ("train.compile", "data.hw_decoder_load"):
        assert key in text, f"README does not document {key}"


# ---- torch.compile -----------------------------------------------------------------------------------

def test_compile_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiling, "_cpp_compiler", lambda: None)
    why = compiling.compile_unavailable("cpu")
    assert why and "C++ compiler" in why
    with pytest.raises(compiling.CompileUnavailable, match=r"train\.compile='default'.*C\+\+ compiler.*"
                                                           r"train\.compile: false"):
        compiling.compile_model(torch.nn.Linear(2, 2), "default", "cpu")


def test_compile_available_here_or_says_why():
    why = compiling.compile_unavailable("cpu")
    assert why is None or isinstance(why, str)
    if why is None:
        assert compiling._cpp_compiler()


def _cfg(root: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "smoke.yaml", [
        f"data.root={root}", f"output_dir={out}", "data.test_split=val", "stages=[train]", "data.batch_size=32",
        "data.augment=none", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=2", "train.log_every=1",
        *extra])


def _step_losses(out: Path) -> dict[int, float]:
    from lfme_fast.logging_utils import read_jsonl

    return {r["global_step"]: r["loss"] for r in read_jsonl(out / "train" / "log.jsonl") if r["event"] == "step"}


def test_compiled_training_checkpoints_load_without_compile(fmnist_dir, tmp_path, monkeypatch):
    """train.compile=true compiles the model of the loop (graphs are captured), its losses follow the eager
    run's, and its checkpoints and model.pt carry plain keys: an eager run resumes from them."""
    from torch._dynamo.utils import counters

    from lfme_fast.models import build_model
    from lfme_fast.train import run
    from lfme_fast.trainer import InterruptAfter, TrainingInterrupted

    monkeypatch.setattr(compiling, "DEFAULT_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run(_cfg(fmnist_dir, eager))
    assert sum(counters["stats"].values()) == 0  # nothing was compiled in the eager run
    with pytest.raises(TrainingInterrupted):
        run(_cfg(fmnist_dir, compiled, "train.compile=true"), on_step=InterruptAfter(4))
    assert counters["stats"]["unique_graphs"] >= 1, "train.compile=true did not compile the model"
    info = find_latest(compiled / "train" / "checkpoints")
    keys = list(load_checkpoint_state(info)["model"])
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    # resume with compile off: the same fingerprint (compile is not a model key), plain keys load
    run(_cfg(fmnist_dir, compiled))
    ref, got = _step_losses(eager), _step_losses(compiled)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}"
    state, meta = load_model_file(compiled / "train" / "model.pt")
    assert not any("_orig_mod" in k for k in state)
    build_model(meta["arch"], meta["num_classes"]).load_state_dict(state)  # strict: every key, no prefix
    torch._dynamo.reset()


def test_compiled_training_under_bf16_autocast_and_channels_last(fmnist_dir, tmp_path, monkeypatch):
    """The GPU recipe's combination on the CPU: Accelerate's bf16 autocast forward, a channels_last model
    and torch.compile around them: graphs are captured and the losses are finite."""
    import math

    from torch._dynamo.utils import counters

    from lfme_fast.train import run

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(compiling, "DEFAULT_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "bf16"
    # one Accelerate state per process: drop the fp32 one earlier tests made (and this one afterwards)
    AcceleratorState._reset_state()
    try:
        run(_cfg(fmnist_dir, out, "train.compile=true", "precision.mixed_precision=bf16",
                 "precision.channels_last=true", "optim.epochs=1"))
    finally:
        AcceleratorState._reset_state()
    assert counters["stats"]["unique_graphs"] >= 1
    losses = _step_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    torch._dynamo.reset()


def test_compiled_run_fails_clearly_without_a_compiler(fmnist_dir, tmp_path, monkeypatch, capsys):
    """No C++ compiler: a config error before the run writes anything (one line, exit code 2 on the
    command line); a direct train_model call with compile on fails as clearly."""
    from lfme_fast.train import main, run
    from lfme_fast.trainer import LoopSettings

    monkeypatch.setattr(compiling, "_cpp_compiler", lambda: None)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.compile=True: torch\.compile cannot run on this machine \(cpu\): "
                                          r".*C\+\+ compiler.*set train\.compile: false"):
        run(_cfg(fmnist_dir, out, "train.compile=true"))
    assert not out.exists()
    code = main(["--config", str(REPO / "configs" / "smoke.yaml"), f"data.root={fmnist_dir}", "train.compile=true",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "torch.compile cannot run on this machine" in err and not out.exists()
    assert LoopSettings.from_config(_cfg(fmnist_dir, out, "train.compile=max-autotune")).compile == "max-autotune"


# ---- the uint8 path normalised on the device ------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_normalise_in_torch_matches_the_cpu_path(synthetic_dir, channels_last, dtype):
    """The torch conversion the GPU runs (ffcv's uint8 batches, DALI's jittered ones) gives the CPU
    path's values, dtype and layout, here on CPU tensors."""
    spec = resolve_spec(LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, resolution=32,
                                      dtype=dtype, channels_last=channels_last))
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8, generator=g)
    ref = normalize_uint8_nhwc(nhwc, spec)  # the CPU path (numba)
    mean, inv_std = normalize_tensors(spec, "cpu")
    assert normalize_tensors(spec, "cpu")[0] is mean  # made once per loader and device
    got = normalize_uint8_torch(nhwc.permute(0, 3, 1, 2), mean, inv_std, dtype, channels_last)
    assert got.dtype == ref.dtype == dtype and got.shape == (5, 3, 7, 9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt) and ref.is_contiguous(memory_format=fmt)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


# ---- DALI: hw_decoder_load and the mixed decoder's arguments --------------------------------------------

def test_loader_options_hw_decoder_load(synthetic_dir):
    assert LoaderOptions(synthetic_dir, "train", train=True, batch_size=4).hw_decoder_load is None
    opts = LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, backend="dali", hw_decoder_load=1)
    assert opts.hw_decoder_load == 1.0 and isinstance(opts.hw_decoder_load, float)
    assert resolve_spec(opts).hw_decoder_load == 1.0
    for bad in (-0.1, 1.01, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="hw_decoder_load must be a number in"):
            LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, hw_decoder_load=bad)


def test_run_context_passes_hw_decoder_load(synthetic_dir, tmp_path):
    from lfme_fast.trainer import RunContext, build_accelerator

    cfg = config_from_dict({"data": {"root": str(synthetic_dir), "backend": "dali", "hw_decoder_load": 0.4,
                                     "val_split": "val", "test_split": "val"}, "output_dir": str(tmp_path)})
    ctx = RunContext(cfg, build_accelerator(cfg))
    assert ctx.loader_options("train", train=True, batch_size=4).hw_decoder_load == 0.4
    assert ctx.loader_options("val", train=False, batch_size=4).hw_decoder_load == 0.4


def test_decoder_arguments(synthetic_dir):
    from lfme_fast.loaders.dali_backend import decoder_arguments

    spec = resolve_spec(LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, backend="dali",
                                      hw_decoder_load=0.3))
    assert decoder_arguments(spec, "cpu") == {}
    assert decoder_arguments(spec, "mixed") == {"hw_decoder_load": 0.3,
                                                "preallocate_height_hint": int(spec.heights.max()),
                                                "preallocate_width_hint": int(spec.widths.max())}
    spec.hw_decoder_load = None
    assert "hw_decoder_load" not in decoder_arguments(spec, "mixed")  # DALI's default


@pytest.mark.parametrize("train", [True, False], ids=["rrc", "center"])
def test_mixed_graph_carries_hw_decoder_load(synthetic_dir, train):
    """The DALI graph of a GPU loader, defined without a GPU (device_id=None: defined and serialised,
    not built): its decoder runs on 'mixed' with the loader's hw_decoder_load and size hints."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import types

    from lfme_fast.loaders.dali_backend import EpochSource, _pipeline, decoder_arguments

    spec = resolve_spec(LoaderOptions(synthetic_dir, "train", train=train, batch_size=4, backend="dali",
                                      hw_decoder_load=0.3, augment="imagenet", resolution=32))
    assert spec.geometry == ("rrc" if train else "center")
    pipe = _pipeline(EpochSource(spec), spec.geometry, spec.resolution, "mixed", spec.mean, spec.std, types.FLOAT,
                     "CHW", decoder_arguments(spec, "mixed"))(batch_size=4, num_threads=1, device_id=None)
    pipe._build_graph()
    decoders = [str(op.spec) for op in pipe._ops if "decoders__Image" in str(op.spec)]
    assert len(decoders) == 1, [str(op.spec).splitlines()[0] for op in pipe._ops]
    text = decoders[0]
    assert "device: mixed" in text and "hw_decoder_load: 0.300000" in text
    assert f"preallocate_width_hint: {int(spec.widths.max())}" in text


def test_cpu_dali_loader_ignores_hw_decoder_load(synthetic_dir):
    """A CPU DALI loader (no GPU) accepts the option and decodes exactly as without it."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from lfme_fast.loaders import build_loader

    def first_batch(load):
        loader = build_loader(LoaderOptions(synthetic_dir, "val", train=False, batch_size=4, backend="dali",
                                            resolution=32, augment="imagenet", num_workers=1, hw_decoder_load=load))
        assert loader.decode_device == "cpu"
        loader.set_epoch(0)
        return next(iter(loader)).images.clone()

    torch.testing.assert_close(first_batch(0.9), first_batch(None), rtol=0, atol=0)


# ---- GPU only ---------------------------------------------------------------------------------------------

@NEEDS_CUDA
def test_dali_loader_decodes_mixed_on_the_gpu(synthetic_dir):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from lfme_fast.loaders import build_loader

    loader = build_loader(LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, backend="dali",
                                        resolution=64, augment="imagenet", device="cuda", dtype=torch.bfloat16,
                                        channels_last=True, hw_decoder_load=0.5))
    assert loader.decode_device == "mixed"
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch.images.is_cuda and batch.images.dtype == torch.bfloat16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)


@NEEDS_CUDA
def test_ffcv_ships_pinned_uint8_and_normalises_on_the_gpu(synthetic_dir):
    pytest.importorskip("ffcv", reason="ffcv is not installed")
    from lfme_fast.loaders import build_loader

    opts = LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, backend="ffcv", resolution=64,
                         augment="imagenet", device="cuda", dtype=torch.bfloat16, channels_last=True)
    loader = build_loader(opts)
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch.images.is_cuda and batch.images.dtype == torch.bfloat16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    # the decoder's host buffers (what ToDevice copies from, non_blocking) are page-locked; an
    # operation's allocation is an array or a tuple of arrays (the plan decoder's)
    host = []
    for m in loader._epoch_iter.memory_allocations["operation"].values():
        host.extend(a for a in (m if isinstance(m, tuple) else (m,)) if isinstance(a, np.ndarray))
    assert len(host) >= 2 and all(torch.from_numpy(m).is_pinned() for m in host)
    loader._stop_previous_epoch()  # no epoch thread issuing CUDA copies at interpreter shutdown


@NEEDS_CUDA
@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_labels_are_their_batchs_while_the_gpu_lags_behind(synthetic_dir, backend):
    """The training loop never waits on the GPU per step, so the loader runs batches ahead of it. A
    batch's labels and indices must still be its own: a queued copy from a pipeline's reused pinned
    buffer would read a later batch's (plan_batch stages them in pinned memory of their own)."""
    if backend == "ffcv":
        pytest.importorskip("ffcv", reason="ffcv is not installed")
    from lfme_fast.loaders import build_loader
    from lfme_fast.loaders.base import plan_epoch

    opts = LoaderOptions(synthetic_dir, "train", train=True, batch_size=2, backend=backend, resolution=32,
                         augment="imagenet", device="cuda", drop_last=False)
    spec = resolve_spec(opts.replace(device="cpu"))
    loader = build_loader(opts)
    loader.set_epoch(0)
    got_idx, got_lab = [], []
    for batch in loader:
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time per batch: the host runs far ahead
        got_idx.append(batch.indices)
        got_lab.append(batch.labels)
    torch.cuda.synchronize()
    idx, lab = torch.cat(got_idx).cpu().numpy(), torch.cat(got_lab).cpu().numpy()
    np.testing.assert_array_equal(idx, plan_epoch(spec, 0).indices)
    np.testing.assert_array_equal(lab, spec.labels[idx])


def test_owned_copy_does_not_alias_the_pipeline_buffer():
    """plan_batch's labels and indices survive the pipeline rewriting its buffer (on the CPU here; the
    CUDA path stages through pinned memory, tested above when a GPU is present)."""
    from lfme_fast.loaders.base import owned_copy

    buf = torch.arange(6, dtype=torch.int32)
    out = owned_copy(buf, "cpu")
    buf.fill_(-1)
    assert out.dtype == torch.int64 and out.tolist() == [0, 1, 2, 3, 4, 5]


def test_two_process_compiled_run_with_accumulation(fmnist_dir, tmp_path, free_port):
    """torch.compile around DDP on 2 gloo processes (``LFME_COMPILE_BACKEND=aot_eager``), with gradient
    accumulation (``no_sync`` reaches DDP through the compiled wrapper): the run completes every step and
    its model.pt carries plain keys."""
    import os
    import subprocess
    import sys

    from lfme_fast.logging_utils import read_jsonl
    from lfme_fast.models import build_model

    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "lfme_fast/train.py", "--config", "configs/smoke.yaml", f"data.root={fmnist_dir}", "data.test_split=val",
           "stages=[train]", "data.batch_size=16", "train.grad_accum=2", "train.max_steps_per_epoch=2",
           "train.compile=true", "--output-dir", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "LFME_COMPILE_BACKEND": "aot_eager"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "torch.compile(mode='default') of the model" in res.stdout + res.stderr
    log = read_jsonl(out / "train" / "log.jsonl")
    assert [r["world_size"] for r in log if r["event"] == "epoch"] == [2, 2]
    assert [r["global_step"] for r in log if r["event"] == "step"] == [1, 2, 3, 4]
    state, meta = load_model_file(out / "train" / "model.pt")  # (a finished stage keeps no checkpoints)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state)
    build_model(meta["arch"], meta["num_classes"]).load_state_dict(state)
