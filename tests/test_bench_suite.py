"""The benchmark suite's new parts at tiny sizes: the epoch / data-wait measurement, host memory against
loader processes, the GPU script's CPU fallback, the CBD step rows and the results page. No figure is
asserted here (those come from ``make bench`` writing JSON); what is asserted is that each part measures
what it says: waits against steps, shared pages, the page's contents from given JSONs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lfme_fast.bench import common, epoch, gpu, memory, report

# ---- the timing loop, on a fake clock ----------------------------------------------------------------


class _Clock:
    """A perf_counter that only moves when the fake loader or step says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timed_loop_splits_waits_from_steps(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)

    def batches():
        for k in range(4):
            clock.now += 3.0 if k == 0 else 2.0  # the first batch fills the pipeline
            yield torch.zeros(5)
        clock.now += 0.5  # the loader's end of epoch

    def step(batch):
        clock.now += 1.0
        return len(batch)

    r = epoch.timed_loop(batches(), step, "cpu")
    assert r["batches"] == 4 and r["samples"] == 20
    assert r["epoch_s"] == pytest.approx(3 + 3 * 2 + 4 * 1 + 0.5)
    assert r["data_wait_s"] == pytest.approx(3 + 3 * 2 + 0.5)
    assert r["data_wait_fraction"] == pytest.approx(9.5 / 13.5)
    assert r["data_wait_fraction_after_first_batch"] == pytest.approx(6.5 / 10.5)
    assert r["first_batch_wait_s"] == 3.0 and r["end_of_epoch_wait_s"] == 0.5 and r["step_median_s"] == 1.0
    assert r["samples_per_s"] == pytest.approx(20 / 13.5)
    # max_batches stops the loop early without counting the unread rest
    assert epoch.timed_loop(batches(), step, "cpu", max_batches=2)["batches"] == 2


def test_timed_loop_without_batches_is_an_error():
    with pytest.raises(ValueError, match="no batch"):
        epoch.timed_loop([], lambda b: 1, "cpu")


# ---- common helpers --------------------------------------------------------------------------------


def test_run_isolated_returns_and_reports_the_childs_error():
    assert common.run_isolated(math.sqrt, 4.0) == 2.0
    with pytest.raises(common.IsolatedError, match="ValueError: math domain error") as info:
        common.run_isolated(math.sqrt, -1.0)
    assert "Traceback" in info.value.detail
    record = common.error_record(info.value)
    assert record["error"].startswith("ValueError") and "Traceback" in record["traceback"]


def test_mapped_file_memory_sees_a_touched_mapping(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.arange(64 * 4096, dtype=np.uint8).tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mm[::4096].astype(np.int64).sum()) >= 0  # touch every page
    import os

    m = common.mapped_file_memory(os.getpid(), tmp_path)
    assert m["files"] == [str(path.resolve())]
    assert m["rss"] == 64 * 4096 and m["pss"] == m["rss"]  # mapped by this process alone
    total = common.process_memory(os.getpid())
    assert total["Rss"] >= m["rss"] and total["Pss"] <= total["Rss"]
    del mm


# ---- the epoch benchmark -----------------------------------------------------------------------------


def test_epoch_bench_tiny(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "bench_epoch.json"
    epoch.main(["--data", str(synthetic_dir), "--backends", "synthetic,torch", "--resolution", "32",
                "--batch-size", "8", "--workers", "1", "--warmup-steps", "1", "--ceiling-steps", "2", "--no-isolate",
                "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["benchmark"] == "epoch" and "cpu_count" in res["machine"] and res["dataset"]["num_images"] == 41
    for name in ("synthetic", "torch"):
        row = res["backends"][name]
        assert "error" not in row, row.get("traceback")
        assert row["batches"] == 41 // 8 and row["samples"] == 40  # drop_last: one whole epoch
        assert 0.0 <= row["data_wait_fraction"] < 1.0 and row["ceiling_samples_per_s"] > 0
        assert row["data_wait_s"] <= row["epoch_s"] and row["ratio_to_ceiling"] > 0
    assert res["backends"]["torch"]["warmup_epoch_s"] > 0


def test_epoch_bench_records_a_failing_backend(synthetic_dir):
    cfg = epoch.EpochConfig(root=str(synthetic_dir), resolution=32, batch_size=8, workers=1)
    rows = epoch.run(["no_such_backend"], cfg, isolate=False, log=lambda m: None)
    assert "unknown loader backend" in rows["no_such_backend"]["error"]


# ---- host memory against loader processes ---------------------------------------------------------


def test_memory_bench_two_processes_share_one_copy(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "bench_memory.json"
    memory.main(["--data", str(synthetic_dir), "--backend", "torch", "--workers", "0", "--processes", "2",
                 "--batch-size", "8", "--resolution", "32", "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    row = res["counts"]["2"]
    assert "error" not in row, row.get("traceback")
    assert row["processes"] == 2 and [p["images_read"] for p in row["per_process"]] == [41, 41]
    shard_bytes = res["dataset_files"]["bytes"]
    for p in row["per_process"]:
        # each process has the whole (small) shard resident, but pays for half of it: the pages are shared
        assert p["dataset_rss"] == pytest.approx(shard_bytes, rel=0.05)
        assert p["dataset_pss"] == pytest.approx(p["dataset_rss"] / 2, rel=0.05)
        assert p["pss"] < p["rss"]
    assert row["dataset_copies"] == pytest.approx(1.0, abs=0.05)


def test_memory_summary_counts_private_copies():
    one = {"rss": 10, "pss": 10, "anonymous": 5, "dataset_rss": 100, "dataset_pss": 100}
    shared = memory.summarise([{**one, "dataset_pss": 50}, {**one, "dataset_pss": 50}])
    private = memory.summarise([one, one])  # what a copy per process would look like
    assert shared["dataset_copies"] == 1.0 and private["dataset_copies"] == 2.0
    assert shared["pss_total"] == 20 and shared["dataset_pss_total"] == 100


# ---- the GPU script's CPU fallback -------------------------------------------------------------------


def _gpu_main(argv: list[str]) -> None:
    """The GPU script's main, its budget counted from now (by default it counts from the process's start:
    pytest's, which may be minutes ago)."""
    gpu.main(argv, started_s=time.perf_counter())


def test_gpu_script_cpu_fallback_starts(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    # ResNet-10 only: ResNet-50 goes through the same code with another arch and would double the time
    _gpu_main(["--data", str(synthetic_dir), "--cpu-fallback", "--no-isolate", "--archs", "resnet10",
              "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["device"] == "cpu-fallback" and "CPU fallback" in res["note"] and res["status"] == "complete"
    assert res["config"]["batch_size"] == gpu.FALLBACK_SIZES.batch_size
    assert res["config"]["cudnn_benchmark"] is False  # on only for the GPU measurements
    assert {"torch_version", "dali_version", "cuda_available"} <= set(res["gpu"])
    assert res["decode"]["dali@hw0"]["hw_decoder_load"] == 0.0  # plumbed through (CPU decoding ignores it)
    assert "hardware decoder was not used" in res["decode"]["dali@hw0"]["note"]
    assert "hardware decoder was not used" in res["decode"]["dali@hw0"]["output"]  # the page's text
    for backend in ("dali", "ffcv", "torch", "dali@hw0"):
        row = res["decode"][backend]
        assert "error" not in row, row.get("traceback")
        assert row["images_per_s"] > 0 and row["batches_per_epoch"] == gpu.FALLBACK_SIZES.max_batches
    for arch in ("resnet10",):
        for feed in ("synthetic", "dali", "ffcv", "torch"):
            row = res["train"][arch][feed]
            assert "error" not in row, row.get("traceback")
            assert row["batches"] == gpu.FALLBACK_SIZES.max_batches and 0 <= row["data_wait_fraction"] < 1
    for key in ("plain_ce_s", "offline_kd_s", "live_kd_s", "ecl_s", "cbd_offline_s", "cbd_live_s"):
        assert res["step"][key] > 0, key
    row = res["compile"]["resnet10"]  # the fallback compiles with aot_eager: the section runs, no figure
    assert "error" not in row, row.get("traceback")
    assert row["backend"] == "aot_eager" and row["compiled"]["supported"] and row["compiled"]["graphs"] >= 1
    assert row["eager"]["steps_per_s"] > 0 and row["compiled"]["first_step_s"] > 0


def test_compile_bench_records_on_off_and_unavailable(tmp_path, monkeypatch, capsys):
    from lfme_fast import compiling
    from lfme_fast.bench import compile as compile_bench

    out = tmp_path / "bench_compile.json"
    starts = []

    class CountingStopwatch(common.Stopwatch):
        def start(self) -> None:
            starts.append(1)
            super().start()

    monkeypatch.setattr(compile_bench, "Stopwatch", CountingStopwatch)
    compile_bench.main(["--device", "cpu", "--cases", "resnet_small28@28:4", "--steps", "3", "--warmup", "1",
                        "--backend", "aot_eager", "--no-isolate", "--json-out", str(out)])
    res = json.loads(out.read_text())
    (row,) = res["results"]
    assert res["machine"]["cpu_count"] and row["num_classes"] == 10 and row["eager"]["steps_timed"] == 3
    # one timing (a CUDA event pair on a GPU) around all steady steps of each variant, the compiling step apart
    assert len(starts) == 3 and row["compiled"]["steps_timed"] == 3 and row["eager"]["timed_block_s"] > 0
    assert row["cudnn_benchmark"] is False  # a CPU case; GPU cases turn it on
    assert row["compiled"]["supported"] and row["speedup"] > 0 and row["compiled"]["compile_s"] is not None
    # no C++ compiler: the case says why instead of a figure
    monkeypatch.setattr(compiling, "_cpp_compiler", lambda: None)
    row = compile_bench.measure_case(compile_bench.CompileCase("resnet_small28", 28, 4, steps=1, warmup=0,
                                                               num_classes=10))
    assert row["compiled"] == {"supported": False, "error": compiling.compile_unavailable("cpu")}
    assert "C++ compiler" in row["compiled"]["error"] and row["eager"]["steps_per_s"] > 0
    capsys.readouterr()


def test_gpu_budget_skips_what_would_start_late():
    late = gpu._Budget(-1.0, lambda m: None).run("part", dict, isolate=False)
    assert "over the time budget" in late["skipped"]
    on_time = gpu._Budget(60.0, lambda m: None).run("part", dict, isolate=False)
    reserved = gpu._Budget(60.0, lambda m: None).run("part", dict, isolate=False, reserve_s=61.0)
    assert "over the time budget" in reserved["skipped"] and "needs about 61 s" in reserved["skipped"]
    assert "skipped" not in on_time and on_time["wall_s"] >= 0
    failed = gpu._Budget(60.0, lambda m: None).run("part", math.sqrt, -1.0, isolate=False)
    assert failed["error"].startswith("ValueError")  # recorded, the script goes on


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed orphan is one until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("waitid", [True, False])
def test_run_isolated_kills_a_child_past_its_time_limit_with_the_processes_it_started(tmp_path, monkeypatch, waitid):
    if not waitid:  # macOS before Python 3.13 has no os.waitid: whether the child is unreaped comes from exitcode
        monkeypatch.delattr(os, "waitid", raising=False)
    marker = tmp_path / "grandchild.pid"
    t0 = time.perf_counter()
    with pytest.raises(common.IsolatedTimeout, match="timed out after 5 s") as info:
        common.run_isolated(subprocess.run, ["sh", "-c", f"echo $$ > '{marker}'; exec sleep 120"], timeout_s=5.0)
    assert time.perf_counter() - t0 < 15 and info.value.timeout_s == 5.0
    grandchild = int(marker.read_text())
    deadline = time.time() + 5
    while _running(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(grandchild)  # a loader worker would not outlive its measurement either


def _wait_for_file(path: Path, seconds: float = 20.0) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {seconds} s")


def _gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while _running(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _running(pid)


def test_run_isolated_kills_a_worker_forked_after_the_descendants_were_listed(tmp_path, monkeypatch):
    """The timeout kills the child's whole process group: a worker forked between the listing of the
    descendants and the kill is in it too (the listing alone would miss it)."""
    sh_pid, late_pid = tmp_path / "sh.pid", tmp_path / "late.pid"
    script = (f"trap 'sleep 120 & echo $! > \"{late_pid}\"' USR1; echo $$ > '{sh_pid}'; "
              "while :; do sleep 0.1; done")
    listed: list[int] = []
    real = common.child_pids

    def list_then_fork(pid: int) -> list[int]:
        out = real(pid)
        listed.extend(out)
        os.kill(int(_wait_for_file(sh_pid)), signal.SIGUSR1)  # the shell forks a new worker now
        _wait_for_file(late_pid)
        return out

    monkeypatch.setattr(common, "child_pids", list_then_fork)
    with pytest.raises(common.IsolatedTimeout):
        common.run_isolated(subprocess.run, ["sh", "-c", script], timeout_s=4.0)
    late = int(late_pid.read_text())
    assert late not in listed  # forked after the listing...
    assert _gone(late) and _gone(int(sh_pid.read_text()))  # ...and killed with the group all the same


_TERMINATED_SCRIPT = """
import subprocess, sys, time
from lfme_fast.bench import common, gpu
gpu.machine_info = gpu.gpu_info = dict  # quick: nothing to describe
def run(root, **kw):  # one part whose process starts a worker, then hangs
    common.run_isolated(subprocess.run, ["sh", "-c", "echo $$ > '" + sys.argv[2] + "'; exec sleep 120"],
                        timeout_s=300)
gpu.run = run
gpu.main(["--data", sys.argv[1], "--cpu-fallback", "--json-out", sys.argv[3]], started_s=time.perf_counter())
"""


def test_gpu_script_on_sigterm_kills_the_running_part_and_says_so(synthetic_dir, tmp_path):
    worker, out, log = tmp_path / "worker.pid", tmp_path / "bench_gpu.json", tmp_path / "log.txt"
    with open(log, "w") as f:  # a file, not a pipe: a surviving worker would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", _TERMINATED_SCRIPT, str(synthetic_dir), str(worker), str(out)],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pid = int(_wait_for_file(worker, 60))
        proc.send_signal(signal.SIGTERM)  # as an outer `timeout` does
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert _gone(pid)  # the part's worker does not keep running (on a GPU: holding it)
    res = json.loads(out.read_text())
    assert res["status"].startswith("stopped by SIGTERM") and res["dataset"]["num_images"] == 41


_KILLED_PARENT_SCRIPT = """
import time
from lfme_fast.bench import common
common.run_isolated(time.sleep, 120)
"""


def test_run_isolated_child_dies_with_a_killed_parent():
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT_SCRIPT], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, child = time.time() + 60, None
        while child is None and time.time() < deadline:  # the child, once it leads its own group
            kids = [k for k in common.child_pids(proc.pid) if _running(k)]
            child = next((k for k in kids if _pgid(k) == k), None)
            time.sleep(0.05)
        assert child is not None
        proc.kill()  # SIGKILL: no handler runs in the parent
        proc.wait(timeout=10)
        assert _gone(child)
    finally:
        proc.kill()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_gpu_part_past_its_time_limit_is_recorded_and_the_next_part_runs():
    # the limit: at most part_limit_s, else the budget left plus the margin
    budget = gpu._Budget(60.0, lambda m: None, margin_s=5.0, part_limit_s=2.0)
    t0 = time.perf_counter()
    hung = budget.run("hangs", time.sleep, 120, isolate=True)
    assert hung["timed_out"] and "timed out after 2 s" in hung["error"] and hung["timeout_s"] == 2.0
    assert time.perf_counter() - t0 < 12
    after = budget.run("next part", dict, isolate=False)
    assert "error" not in after and "skipped" not in after
    late = gpu._Budget(0.5, lambda m: None, margin_s=1.0).run("hangs late", time.sleep, 120, isolate=True)
    assert late["timed_out"] and late["timeout_s"] <= 1.5


def test_gpu_script_writes_its_json_after_every_part(synthetic_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench_gpu.json"
    seen = []

    def fake_decode(backend, cfg, epochs):
        seen.append(json.loads(out.read_text()))  # what a kill at this moment would leave
        if backend == "b":
            raise RuntimeError("broken loader")
        return {"backend": backend, "images_per_s": 1.0}

    monkeypatch.setattr(gpu, "measure_decode", fake_decode)
    _gpu_main(["--data", str(synthetic_dir), "--cpu-fallback", "--no-isolate", "--sections", "decode",
              "--backends", "a,b,c", "--dali-hw-loads", "", "--json-out", str(out)])
    capsys.readouterr()
    assert [sorted(s.get("decode", {})) for s in seen] == [[], ["a"], ["a", "b"]]
    assert all(s["status"].startswith("running") and s["dataset"]["num_images"] == 41 for s in seen)
    res = json.loads(out.read_text())
    assert res["status"] == "complete" and res["decode"]["c"]["images_per_s"] == 1.0
    assert res["decode"]["b"]["error"] == "RuntimeError: broken loader"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary name, nothing left behind


def test_gpu_script_records_a_failing_dataset_description_and_measures_on(synthetic_dir, tmp_path, monkeypatch,
                                                                         capsys):
    from lfme_fast.bench import loader

    def broken(root, split):
        raise ModuleNotFoundError("No module named 'simplejpeg'")

    monkeypatch.setattr(loader, "dataset_stats", broken)
    monkeypatch.setattr(gpu, "measure_decode", lambda backend, cfg, epochs: {"images_per_s": 2.0})
    out = tmp_path / "bench_gpu.json"
    _gpu_main(["--data", str(synthetic_dir), "--cpu-fallback", "--no-isolate", "--sections", "decode",
              "--backends", "a", "--dali-hw-loads", "", "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["dataset"]["error"].startswith("ModuleNotFoundError") and res["dataset"]["dir"] == str(synthetic_dir)
    assert res["status"] == "complete" and res["decode"]["a"]["images_per_s"] == 2.0


def _without_packages(monkeypatch, *names: str) -> None:
    """Make ``names`` look uninstalled, as on the fixed GPU image: find_spec finds nothing and (for
    simplejpeg) the JPEG codec module cannot load it, so its "auto" codec is Pillow."""
    import importlib.util

    from lfme_fast import jpeg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, package=None: None if name in names else real(name, package))
    if "simplejpeg" in names:
        def missing():
            raise ImportError(f"the 'simplejpeg' JPEG codec is not installed (test): {jpeg.INSTALL_HINT}")

        monkeypatch.setattr(jpeg, "load_simplejpeg", missing)


def test_gpu_script_records_missing_packages_as_skipped_rows(synthetic_dir, tmp_path, monkeypatch, capsys):
    _without_packages(monkeypatch, "nvidia.dali", "ffcv", "simplejpeg")
    out = tmp_path / "bench_gpu.json"
    _gpu_main(["--data", str(synthetic_dir), "--cpu-fallback", "--no-isolate", "--archs", "resnet10",
              "--sections", "decode,train", "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["status"] == "complete" and res["config"]["packages"] == {"nvidia.dali": False, "ffcv": False,
                                                                         "simplejpeg": False}
    assert res["config"]["jpeg_codec"].startswith("Pillow ") and res["dataset"]["num_images"] == 41
    for rows in (res["decode"], res["train"]["resnet10"]):
        assert rows["dali"] == {"skipped": "needs nvidia.dali (not installed here)"}
        assert rows["ffcv"] == {"skipped": "needs ffcv (not installed here)"}
        assert "error" not in rows["torch"], rows["torch"].get("traceback")  # the loader path measured anyway
    assert res["decode"]["dali@hw0"]["skipped"].startswith("needs nvidia.dali")
    assert res["decode"]["torch"]["images_per_s"] > 0 and res["train"]["resnet10"]["synthetic"]["samples_per_s"] > 0


def test_gpu_script_runs_the_parts_without_a_dataset_when_preparation_fails(tmp_path, monkeypatch, capsys):
    from lfme_fast.bench import loader

    def broken(scale, cache, max_side=None):
        raise OSError("disk full")

    monkeypatch.setattr(loader, "prepare_synthetic", broken)
    out = tmp_path / "bench_gpu.json"
    _gpu_main(["--cache", str(tmp_path), "--cpu-fallback", "--no-isolate", "--archs", "resnet10",
              "--sections", "decode,train", "--backends", "torch", "--json-out", str(out)])
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert res["status"] == "complete" and res["dataset"]["error"] == "OSError: disk full"
    for row in (res["decode"]["torch"], res["train"]["resnet10"]["synthetic"]):
        assert row["skipped"].startswith("needs a prepared dataset (preparing the synthetic set failed: OSError")


def test_pillow_codec_answers_like_simplejpeg_on_the_synthetic_sets_images():
    simplejpeg = pytest.importorskip("simplejpeg")
    from data_prep.synthetic import synthetic_image, synthetic_jpeg
    from lfme_fast.jpeg import codec

    pil = codec("pillow")
    image = synthetic_image(0, 3, 2)  # ~500x320, as the synthetic set's sources
    for sub in ("420", "444"):
        data = pil.encode_jpeg(image, quality=90, colorspace="RGB", colorsubsampling=sub)
        assert pil.decode_jpeg_header(data) == simplejpeg.decode_jpeg_header(data)
        assert np.array_equal(pil.decode_jpeg(data), simplejpeg.decode_jpeg(data, colorspace="RGB"))
        small = pil.decode_jpeg(data, colorspace="RGB", min_height=100, min_width=100)  # a DCT-scaled decode
        assert 100 <= small.shape[0] < image.shape[0] and small.shape[1] >= 100 and small.flags.writeable
    for name in ("pillow", "simplejpeg"):  # the synthetic set's encoder takes the codec by name
        data = synthetic_jpeg(0, 3, 2, codec=name)
        assert simplejpeg.decode_jpeg_header(data) == (*image.shape[:2], "YCbCr", "420")
    for bad in (data[: len(data) // 2], b"not a jpeg"):  # simplejpeg's error type, which data_prep catches
        with pytest.raises(ValueError):
            pil.decode_jpeg(bad)


_PREPARE_WITHOUT_FFCV_OR_SIMPLEJPEG = """
import json, sys
from pathlib import Path
import numpy as np
sys.modules["simplejpeg"] = None  # as on the GPU image: neither is installed (a fresh interpreter: no leak)
sys.modules["ffcv"] = None
import data_prep.images
import data_prep.synthetic as synthetic
synthetic.default_histogram = lambda: np.array([6, 3, 2])  # 11 images
from lfme_fast.bench.loader import dataset_stats, prepare_synthetic
from lfme_fast.jpeg import codec
root = prepare_synthetic(1.0, Path(sys.argv[1]))
stats = dataset_stats(root, "train")  # the header reads take the "auto" codec: Pillow here
print(json.dumps({"root": str(root), "manifest": json.loads((root / "manifest.json").read_text()), "stats": stats,
                  "codec": codec("auto").name, "images_module_has_simplejpeg": hasattr(data_prep.images, "simplejpeg"),
                  "simplejpeg_still_absent": sys.modules["simplejpeg"] is None}))
"""


def test_prepare_synthetic_without_ffcv_or_simplejpeg(tmp_path):
    # a fresh interpreter: nothing of this process's simplejpeg is there
    proc = subprocess.run([sys.executable, "-c", _PREPARE_WITHOUT_FFCV_OR_SIMPLEJPEG, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    root = Path(res["root"])
    assert res["manifest"]["formats"] == ["wds"] and not (root / "ffcv").exists()  # only what can be written
    assert res["manifest"]["writer"]["jpeg_codec"] == "pillow" and root.name == "synthetic_lt_scale1_pillow"
    assert res["codec"].startswith("Pillow ") and res["simplejpeg_still_absent"]
    assert not res["images_module_has_simplejpeg"]  # data_prep.images binds no stand-in module
    assert res["stats"]["num_images"] == 11 and res["stats"]["stored_max_side"] == 256
    from PIL import Image

    from lfme_fast.shards import ShardReader

    import io

    reader = ShardReader(root, "train")
    with Image.open(io.BytesIO(bytes(reader.get_bytes(0)))) as img:  # real JPEGs, stored at max side 256
        assert img.format == "JPEG" and max(img.size) == 256


def test_prepare_synthetic_keys_its_cache_on_the_jpeg_codec(tmp_path, monkeypatch):
    """A Pillow-made synthetic set is never reused as a simplejpeg one; a set that records no codec was
    written by simplejpeg (every set before the codec was recorded) and is reused."""
    pytest.importorskip("simplejpeg")
    import data_prep.synthetic as synthetic
    from lfme_fast.bench import loader
    from lfme_fast.shards import load_manifest

    monkeypatch.setattr(synthetic, "default_histogram", lambda: np.array([4, 2, 1]))  # 7 images
    monkeypatch.setattr(common, "package_available", lambda name: False)  # no beton: quicker

    def missing():
        raise ImportError("no simplejpeg (test)")

    with monkeypatch.context() as m:
        from lfme_fast import jpeg

        m.setattr(jpeg, "load_simplejpeg", missing)
        pil_root = loader.prepare_synthetic(1.0, tmp_path)
    assert pil_root.name.endswith("_pillow") and load_manifest(pil_root)["writer"]["jpeg_codec"] == "pillow"
    root = loader.prepare_synthetic(1.0, tmp_path)
    assert root != pil_root and "jpeg_codec" not in load_manifest(root)["writer"]
    manifest_path = root / "manifest.json"
    stamp = manifest_path.stat().st_mtime_ns
    assert loader.prepare_synthetic(1.0, tmp_path) == root and manifest_path.stat().st_mtime_ns == stamp  # reused
    # a set whose manifest says Pillow under the simplejpeg name is prepared again
    old = json.loads(manifest_path.read_text())
    old["writer"]["jpeg_codec"] = "pillow"
    manifest_path.write_text(json.dumps(old))
    assert loader.prepare_synthetic(1.0, tmp_path) == root
    assert "jpeg_codec" not in load_manifest(root)["writer"]


# ---- the CBD step rows ---------------------------------------------------------------------------


def test_cbd_step_reads_the_stored_features_through_the_recipes_loss(tmp_path):
    from lfme_fast.bench.cbd_step import CBDStep
    from lfme_fast.recipes.cbd import CBDLoss

    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    ids = [(torch.tensor([3, 5]), torch.tensor([1, 0]))]
    s = CBDStep("resnet10", 10, 2, x, y, torch.device("cpu"), torch.contiguous_format,
                lambda: torch.autocast("cpu", enabled=False), store_dir=tmp_path / "cbd", store_samples=8, views=2,
                store_load="ram", batch_ids=ids)
    assert isinstance(s.loss, CBDLoss) and s.describe()["cbd_store_bytes_per_image"] == 2 * 512 * 2 * 2
    feats = s.loss.teacher_features(*ids[0])
    raw = [np.asarray(s.store.raw(f"teacher{k}.features")[0]) for k in range(2)]
    want = np.concatenate([r[[3, 5], [1, 0]] for r in raw], axis=1)
    np.testing.assert_array_equal(feats.numpy(), want)
    assert np.allclose(np.linalg.norm(raw[0][3, 1].astype(np.float32)), 1.0, atol=1e-2)  # unit-norm features
    before = [p.detach().clone() for p in s.student.parameters()]
    s.offline()
    s.live()
    assert any(not torch.equal(a, b) for a, b in zip(before, s.student.parameters()))


# ---- the results page ------------------------------------------------------------------------------


MACHINE = {"cpu_count": 2, "cpu_model": "Test CPU", "date_utc": "2026-01-01T00:00:00Z", "torch_version": "2.x"}


def _fake_results(d: Path, gpu_device: str = "cuda") -> None:
    def put(name, obj):
        (d / name).write_text(json.dumps(obj))

    put("bench_prep.json", {"images": 100, "workers": 2, "source_mean_bytes": 110000, "settings": {"max_side": 256},
                            "images_per_s": {"wds_phase": 489.4, "ffcv_phase": 523.0, "total": 250.0},
                            "seconds": {"wds_phase": 1.0, "ffcv_phase": 1.0, "total": 2.0, "ffcv_import_untimed": 9.3},
                            "storage": {"wds_bytes_per_image": 27500, "beton_bytes_per_image": 26600,
                                        "projected_imagenet_lt_wds_gb": 3.19, "projected_imagenet_lt_beton_gb": 3.08},
                            "machine": MACHINE})
    put("bench_sampler.json", {"repeats": 20, "machine": MACHINE, "cases": {"imagenet_lt": {
        "num_samples": 115846, "numba_class_balanced": {"indices": {"median_s": 0.00047},
                                                        "indices_and_weights": {"median_s": 0.00061}},
        "python_oltr_class_aware": {"median_s": 0.129}, "speedup_vs_python": {"indices_median": 274.6,
                                                                             "indices_and_weights_median": 213.7}}}})
    put("bench_loader.json", {"machine": MACHINE, "config": {"batch_size": 256, "resolution": 224, "workers": 2,
                                                             "epochs": 6, "dtype": "float32"},
                              "dataset": {"num_images": 5847, "stored_max_side": 256},
                              "raw_limit": {"images_per_s": 4304.0, "images_per_cpu_s": 2329.0},
                              "backends": {"ffcv": {"images_per_s": 4135.0, "images_per_cpu_s": 2286.0,
                                                    "ratio_to_raw_limit": 0.9606},
                                           "ffcv_2views": {"images_per_s": 3900.0, "images_per_cpu_s": 2100.0},
                                           "dali": {"error": "ImportError: no DALI"}},
                              "summary": {"ratio_ffcv_to_torch_fullsize": 5.9977}})
    put("bench_train.json", {"machine": MACHINE, "torch_threads_used": 2, "results": [
        {"model": "resnet10", "resolution": 224, "device": "cpu", "precision": "fp32", "batch_size": 32,
         "supported": True, "samples_per_s": 7.45}]})
    put("bench_step.json", {"machine": MACHINE, "model": "resnet10", "batch_size": 64, "resolution": 112,
                            "device": "cpu", "precision": "fp32", "num_classes": 1000, "repeats": 15,
                            "plain_ce_s": 0.969, "offline_kd_s": 0.933, "live_kd_s": 1.995, "ecl_s": 2.5,
                            "ecl_one_view_s": 1.9, "cbd_offline_s": 1.01, "cbd_live_s": 3.2,
                            "ratio_offline_over_plain": 0.9625, "ratio_live_over_offline": 2.138})
    epoch_rows = {"ffcv": {"samples_per_s": 55.5, "ceiling_samples_per_s": 60.0, "ratio_to_ceiling": 0.925,
                           "data_wait_fraction": 0.0412, "data_wait_fraction_after_first_batch": 0.03,
                           "first_batch_wait_s": 0.2},
                  "torch": {"error": "RuntimeError: boom"}}
    put("bench_epoch.json", {"machine": MACHINE, "dataset": {"num_images": 5847},
                             "config": {"arch": "resnet10", "resolution": 112, "batch_size": 64, "device": "cpu",
                                        "precision": "fp32", "workers": 2}, "backends": epoch_rows})
    per = {"rss": 400 * 2**20, "pss": 250 * 2**20}
    put("bench_memory.json", {"machine": MACHINE, "config": {"backend": "ffcv", "workers_per_process": 1,
                                                             "batch_size": 64, "resolution": 224},
                              "dataset_files": {"bytes": 155 * 2**20},
                              "counts": {str(n): {"rss_mean": per["rss"], "pss_mean": per["pss"],
                                                  "pss_total": n * per["pss"],
                                                  "dataset_rss_per_process_max": 150 * 2**20,
                                                  "dataset_pss_total": 150 * 2**20, "dataset_copies": 1.0}
                                         for n in (1, 2, 4)}})
    put("bench_gpu.json", {"device": gpu_device, "machine": MACHINE,
                           "gpu": {"gpu": "NVIDIA Test GPU", "driver_version": "999.1", "cuda_version": "13.0",
                                   "torch_version": "2.x", "dali_version": "2.4.0"},
                           "config": {"batch_size": 256, "resolution": 224, "workers": 16, "precision": "bf16"},
                           "decode": {"dali": {"images_per_s": 12345.0, "best_epoch_images_per_s": 13000.0},
                                      "ffcv": {"images_per_s": 8000.0}},
                           "train": {"resnet10": {"synthetic": {**epoch_rows["ffcv"], "samples_per_s": 20000.0},
                                                  "dali": {**epoch_rows["ffcv"], "samples_per_s": 11111.0}}},
                           "step": {"plain_ce_s": 0.05, "offline_kd_s": 0.051, "live_kd_s": 0.09,
                                    "model": "resnet10", "batch_size": 256, "resolution": 224},
                           "compile": {"resnet10": {"resolution": 224, "batch_size": 256,
                                                    "eager": {"steps_per_s": 20.0},
                                                    "compiled": {"supported": True, "steps_per_s": 25.0,
                                                                 "compile_s": 41.5},
                                                    "speedup": 1.25},
                                       "resnet50": {"skipped": "over the time budget (460 s of 450 s used)"}}})
    put("bench_compile_cpu.json", {"machine": MACHINE, "device": "cpu", "mode": "default", "backend": "inductor",
                                   "load_average": [1.5, 1.2, 1.0], "compile_available": True, "results": [
                                       {"arch": "resnet_small28", "resolution": 28, "batch_size": 64,
                                        "precision": "fp32", "torch_threads": 1, "eager": {"steps_per_s": 12.34},
                                        "compiled": {"supported": True, "steps_per_s": 15.5, "compile_s": 33.3},
                                        "speedup": 1.256},
                                       {"arch": "resnet10", "resolution": 64, "batch_size": 32,
                                        "eager": {"steps_per_s": 3.21},
                                        "compiled": {"supported": False, "error": "InductorError: no compiler"}}]})


def test_report_renders_every_section_from_fake_results(tmp_path):
    _fake_results(tmp_path)
    page = report.write_page(tmp_path)
    text = page.read_text()
    assert page == tmp_path / "BENCHMARKS.md"
    for snippet in ("489", "275×", "**4,304**", "4,135", "96%", "6.00×", "failed: ImportError",
                    "LFME on stored float16 logits | 0.933", "CBD with live teacher forwards | 3.200",
                    "**4.1%**", "failed: RuntimeError: boom", "1.00", "12,345", "NVIDIA Test GPU", "driver 999.1",
                    "11,111.0", "Test CPU", "resnet_small28 | 28 | 64 | 12.34 | 15.50 | 1.26× | 33.3",
                    "not measured: InductorError: no compiler", "resnet10 | 224 | 256 | 20.00 | 25.00 | 1.25× | 41.5",
                    "not measured: over the time budget"):
        assert snippet in text, snippet
    assert "not measured yet" not in text
    # every JSON is there; only the GPU step result lacks its ECL/CBD rows, and the page says so
    missing = text.split("## Missing figures")[1].split("\n## ")[0].strip().splitlines()
    assert missing == ["- GPU student step: no CBD, ECL rows"]
    for png in report.PLOTS:
        assert (tmp_path / png).stat().st_size > 1000, png
        assert f"]({png})" in text, png


def test_report_lists_missing_figures_and_drops_stale_plots(tmp_path):
    _fake_results(tmp_path, gpu_device="cpu-fallback")
    report.write_page(tmp_path)
    for name in ("bench_memory.json", "bench_epoch.json", "bench_loader.json"):
        (tmp_path / name).unlink()
    step = json.loads((tmp_path / "bench_step.json").read_text())
    for key in ("cbd_offline_s", "cbd_live_s"):
        del step[key]
    (tmp_path / "bench_step.json").write_text(json.dumps(step))
    text = report.write_page(tmp_path).read_text()
    missing = text.split("## Missing figures")[1].split("\n## ")[0]
    for name in ("bench_memory.json", "bench_epoch.json", "bench_loader.json", "no CBD rows", "CPU fallback"):
        assert name in missing, name
    assert "**The GPU figures are not measured yet**" in text
    for png in ("memory.png", "data_wait.png", "loader.png", "gpu_decode.png", "gpu_train.png", "data_wait_gpu.png"):
        assert not (tmp_path / png).exists(), png
    assert (tmp_path / "step_costs.png").exists()


def test_report_rejects_a_broken_json(tmp_path):
    (tmp_path / "bench_step.json").write_text("{not json")
    with pytest.raises(ValueError, match="bench_step.json is not valid JSON"):
        report.render(tmp_path)
