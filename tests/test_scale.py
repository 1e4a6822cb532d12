"""Scaling out (issue 14), without launching processes: global batch semantics, world-size invariant
sharding of the samplers, topped-up small subsets, worker defaults, and the resume rules for another
process count. The multi-process runs are in tests/test_scale_launch.py."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lfme_fast.config import ConfigError, config_from_dict, fingerprint, load_config
from lfme_fast.sampling import build_sampler
from lfme_fast.trainer import epoch_batches
from lfme_fast.scale import (
    BatchError,
    default_num_workers,
    resolve_batch,
    resolve_world,
    usable_cpus,
    world_invariant,
)

REPO = Path(__file__).resolve().parents[1]


# ---- batch semantics ------------------------------------------------------------------------------

def test_resolve_batch_per_process_and_global():
    p = resolve_batch("data", 32, None, 8, 1)
    assert (p.per_process, p.global_batch, p.semantics) == (32, 256, "per_process")
    g = resolve_batch("data", None, 256, 8, 2)
    assert (g.per_process, g.global_batch, g.semantics, g.key) == (16, 256, "global", "data.global_batch_size")
    assert g.as_record() == {"world_size": 8, "per_process_batch": 16, "grad_accum": 2, "global_batch": 256,
                             "batch_semantics": "global", "batch_key": "data.global_batch_size"}


def test_resolve_batch_errors_name_the_key():
    with pytest.raises(BatchError, match=r"data\.global_batch_size=256 does not divide into world size 3 x "
                                         r"train\.grad_accum 1 = 3.*e\.g\. 255 or 258"):
        resolve_batch("data", None, 256, 3, 1)
    with pytest.raises(BatchError, match=r"or a process count that divides 128\."):
        resolve_batch("data", None, 256, 3, 2)
    # 100 samples in steps of 3 micro-batches: no process count can work, so none is suggested
    with pytest.raises(BatchError, match=r"or a train\.grad_accum that divides 100 \(no process count works"):
        resolve_batch("data", None, 100, 2, 3)
    with pytest.raises(BatchError, match=r"experts\.global_batch_size\[2\]=32 \(expert few\) is smaller than "
                                         r"world size 64"):
        resolve_batch("experts.global_batch_size[2]", None, 32, 64, 1, what="expert few")
    with pytest.raises(BatchError, match="set exactly one"):
        resolve_batch("data", 32, 256, 1, 1)


def _lfme_cfg(*overrides: str):
    return load_config(REPO / "configs" / "imagenet_lt" / "lfme.yaml", list(overrides))


def test_config_rejects_both_forms():
    with pytest.raises(ConfigError, match=r"data\.global_batch_size: is 256 but data\.batch_size is 64 too "
                                          r"\(override 'data\.batch_size=64'\)"):
        _lfme_cfg("data.batch_size=64")
    with pytest.raises(ConfigError, match=r"experts\.global_batch_size: is \(128, 64, 32\) but experts\.batch_size"):
        _lfme_cfg("experts.batch_size=32")
    with pytest.raises(ConfigError, match=r"cbd\.global_batch_size: is 64 but cbd\.batch_size is 32"):
        load_config(REPO / "configs" / "imagenet_lt" / "cbd.yaml", ["cbd.batch_size=32", "cbd.global_batch_size=64"])
    with pytest.raises(ConfigError, match=r"data\.global_batch_size: must be >= 1"):
        config_from_dict({"data": {"global_batch_size": 0}})


def test_paper_configs_use_the_global_form():
    for rel in ("imagenet_lt/lfme.yaml", "imagenet_lt/cbd_ens.yaml", "imagenet_lt/ecl.yaml", "places_lt/lfme.yaml",
                "inat18/lfme.yaml", "inat18/cbd_ens.yaml", "cifar10_lt/lfme.yaml", "cifar100_lt/lfme.yaml",
                "cifar100_lt/ecl.yaml"):
        cfg = load_config(REPO / "configs" / rel)
        assert cfg.data.batch_size is None and cfg.data.global_batch_size is not None, rel
        assert world_invariant(cfg), rel
    cfg = _lfme_cfg()
    assert cfg.experts.global_batch_size == (128, 64, 32) and cfg.experts.batch_size is None


def test_resolve_world_fills_per_process_batches():
    cfg = _lfme_cfg()
    one, eight = resolve_world(cfg, 1), resolve_world(cfg, 8)
    assert (one.data.batch_size, one.experts.batch_size) == (256, (128, 64, 32))
    assert (eight.data.batch_size, eight.experts.batch_size) == (32, (16, 8, 4))
    assert eight.data.global_batch_size == 256 and eight.data.eval_batch_size == 512  # set in the file: kept
    # the experts' own stage reports an impossible split (it knows the subset); data fails at once
    assert resolve_world(cfg, 64).experts.batch_size is None
    with pytest.raises(BatchError, match=r"data\.global_batch_size=256 is smaller than world size 512"):
        resolve_world(cfg, 512)
    per = load_config(REPO / "configs" / "smoke.yaml")
    assert resolve_world(per, 4) is per  # the per-process form is left alone


def test_fingerprint_ignores_the_per_process_batch_of_a_global_config():
    from lfme_fast.recipes.experts import EXPERT_KEYS
    from lfme_fast.trainer import MODEL_KEYS

    cfg = _lfme_cfg()
    for keys in (MODEL_KEYS, EXPERT_KEYS):
        assert fingerprint(resolve_world(cfg, 1), keys) == fingerprint(resolve_world(cfg, 8), keys)
    per = load_config(REPO / "configs" / "smoke.yaml")
    assert fingerprint(per, MODEL_KEYS) != fingerprint(load_config(REPO / "configs" / "smoke.yaml",
                                                                   ["data.batch_size=32"]), MODEL_KEYS)


# ---- world-size invariant sharding --------------------------------------------------------------

def _labels(n: int = 997, classes: int = 13, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, (200 * 0.8 ** np.arange(classes)).astype(int))
    labels = np.repeat(np.arange(classes), counts)
    return rng.permutation(labels)[:n] if n < labels.size else rng.permutation(labels)


def _global_steps(kind: str, labels: np.ndarray, world: int, global_batch: int, accum: int, epoch: int,
                  **kw) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (indices, weights) of every optimizer step of ``epoch``, assembled from ``world`` ranks the way
    the trainer consumes them: each rank reads micro-batches of ``global / (world x accum)`` in order,
    ``accum`` of them per step."""
    b = global_batch // (world * accum)
    shares = []
    for rank in range(world):
        s = build_sampler(kind, labels, seed=3, num_replicas=world, rank=rank, total_epochs=4, **kw).shard_batches(b)
        idx, w = s.indices_and_weights(epoch, 4)
        assert len(idx) == len(s) and len(idx) % b == 0
        shares.append((idx, w))
    micro = len(shares[0][0]) // b
    read = epoch_batches(micro, accum)  # what the trainer reads: whole windows of accum micro-batches
    assert read % accum == 0
    steps = []
    for s in range(read // accum):
        parts = [(shares[r][0][m * b:(m + 1) * b], shares[r][1][m * b:(m + 1) * b])
                 for m in range(s * accum, (s + 1) * accum) for r in range(world)]
        idx = np.concatenate([p[0] for p in parts])
        w = np.concatenate([p[1] for p in parts])
        order = np.argsort(idx, kind="stable")  # a step is a set of samples: compare it as one
        steps.append((idx[order], w[order]))
    return steps


@pytest.mark.parametrize("kind, kw", [
    ("instance", {}),
    ("class_balanced", {"samples_per_class": 4}),
    ("sqrt", {}),
    ("progressive", {}),
    ("subset", {"classes": [0, 2, 5, 7]}),
    ("class_balanced", {"samples_per_class": 4, "initial_weights": "curriculum", "num_samples": 2000}),
])
def test_same_global_batches_on_any_world_size(kind, kw):
    """Same seed and global batch: 1, 2, 4 and 8 processes (and accumulation 1, 2 or 4) draw the same
    global batches, with the same curriculum weights, in the same order, and as many of them (the
    trainer reads whole accumulation windows only)."""
    labels = _labels()
    if kw.get("initial_weights") == "curriculum":
        kw = {**kw, "initial_weights": np.linspace(0.1, 0.9, labels.size)}
    reference = _global_steps(kind, labels, 1, 64, 1, epoch=1, **kw)
    assert len(reference) >= 3
    for world, accum in ((2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (1, 2), (1, 4)):
        steps = _global_steps(kind, labels, world, 64, accum, epoch=1, **kw)
        assert len(steps) == len(reference), (world, accum)
        for s, ((i0, w0), (i1, w1)) in enumerate(zip(reference, steps)):
            assert np.array_equal(i0, i1), (world, accum, s)
            assert np.array_equal(w0, w1), (world, accum, s)


def test_epoch_batches_reads_whole_accumulation_windows():
    assert epoch_batches(31, 1) == 31
    assert epoch_batches(31, 2) == 30  # the half window at the end would be a 32-sample step
    assert epoch_batches(31, 2, drop_last=False) == 31  # a loader that keeps every sample keeps them all
    assert epoch_batches(1, 4) == 1  # an epoch shorter than one window is not emptied
    assert epoch_batches(31, 2, max_steps=3) == 6


def test_one_process_batches_unchanged_by_batch_sharding():
    """On one process, sharding in batches keeps exactly the drop_last batches of before (so single-process
    runs and their recorded results are unchanged)."""
    labels = _labels()
    plain = build_sampler("class_balanced", labels, seed=1).indices(0)
    sharded = build_sampler("class_balanced", labels, seed=1).shard_batches(64).indices(0)
    assert np.array_equal(sharded, plain[:(plain.size // 64) * 64])


def test_small_subset_is_topped_up_not_skipped():
    """A subset smaller than one micro-step of all processes (40 images; 16 processes x 4) gets one step
    per epoch made of every image plus repeats, instead of an empty loader."""
    labels = _labels()
    few = [12]  # the smallest class
    size = int((labels == 12).sum())
    assert size < 64
    shares = []
    for rank in range(16):
        s = build_sampler("subset", labels, seed=0, num_replicas=16, rank=rank, classes=few).shard_batches(4)
        assert s.topped_up == (size, 64) and len(s) == 4
        shares.append(s.indices(0))
    drawn = np.concatenate(shares)
    assert drawn.size == 64 and set(drawn.tolist()) == set(np.flatnonzero(labels == 12).tolist())
    counts = np.bincount(drawn)[np.flatnonzero(labels == 12)]
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # whole shuffle cycles: repeats spread evenly
    big = build_sampler("subset", labels, seed=0, num_replicas=2, rank=0, classes=[0]).shard_batches(4)
    assert big.topped_up is None


def test_expert_error_names_subset_size_and_world_size():
    from lfme_fast.recipes.experts import expert_batch_plan
    from lfme_fast.subsets import split_classes

    cfg = _lfme_cfg()
    labels = _labels(classes=13)
    counts = np.bincount(labels)
    subsets = split_classes(counts, "lfme", None)
    ctx = SimpleNamespace(launch_cfg=cfg, cfg=resolve_world(cfg, 64), labels=lambda split: labels,
                          accelerator=SimpleNamespace(num_processes=64))
    k = len(subsets) - 1
    with pytest.raises(ConfigError, match=rf"experts\.global_batch_size\[{k}\]=32 \(expert subset "
                                          rf"'{subsets[k].name}': {len(subsets[k])} classes, "
                                          rf"{int(np.isin(labels, subsets[k].classes).sum())} training images\) "
                                          r"is smaller than world size 64"):
        expert_batch_plan(ctx, k, subsets[k])
    ctx.accelerator.num_processes = 8
    ctx.cfg = resolve_world(cfg, 8)
    assert expert_batch_plan(ctx, k, subsets[k]).per_process == 4


# ---- loader workers -------------------------------------------------------------------------------

def test_default_num_workers_divides_usable_cpus(tmp_path, monkeypatch):
    cg = tmp_path / "cgroup"
    cg.mkdir()
    (cg / "cpu.max").write_text("max 100000\n")
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert usable_cpus(str(cg)) == affinity
    (cg / "cpu.max").write_text("1600000 100000\n")  # a 16-CPU quota
    assert usable_cpus(str(cg)) == min(affinity, 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cpus(str(cg)) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers(str(cg)) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_num_workers(str(cg)) == 1  # never 0
    (cg / "cpu.max").unlink()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers(str(cg)) == 8
    # srun's own tasks (8 per node, 12 CPUs each, bound by SLURM): the mask is this task's already
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    assert default_num_workers(str(cg)) == 12
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert default_num_workers(str(cg)) == 1  # without it, the conservative division
    # accelerate launch inside a one-task-per-node SLURM job: LOCAL_WORLD_SIZE wins
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_num_workers(str(cg)) == 8


# ---- resume on another process count --------------------------------------------------------------

def _loop(world: int, per_process: int, accum: int):
    from lfme_fast.trainer import _Loop

    loop = _Loop.__new__(_Loop)
    loop.acc = SimpleNamespace(num_processes=world)
    loop.loop = SimpleNamespace(grad_accum=accum)
    loop.batch = {"world_size": world, "per_process_batch": per_process, "grad_accum": accum,
                  "global_batch": per_process * world * accum}
    loop.ckpt_dir = Path("RUN/train/checkpoints")
    loop.messages = []
    loop.console = loop.messages.append
    return loop


def _info(world: int, batches_done: int, per_process: int, accum: int = 1, record: bool = True):
    from lfme_fast.checkpoint import CheckpointInfo

    batch = {"world_size": world, "per_process_batch": per_process, "grad_accum": accum,
             "global_batch": per_process * world * accum} if record else {}
    return CheckpointInfo(path=Path("ckpt"), tag="t", epoch=2, batches_done=batches_done, global_step=0,
                          world_size=world, fingerprint="f", batch=batch)


def test_resume_position_on_another_world_size():
    # same world size: as written; epoch boundary: from the start of the next epoch
    assert _loop(2, 32, 1)._resume_position(_info(2, 6, 32)) == 6
    assert _loop(8, 8, 1)._resume_position(_info(2, 0, 32)) == 0
    # 3 steps of global batch 64 done on 2 processes (32 each) -> 8 processes (8 each): same global position
    lp = _loop(8, 8, 1)
    assert lp._resume_position(_info(2, 3, 32)) == 3
    assert "continuing at global position 192" in lp.messages[0]
    # accumulation changes too: 4 micro-batches of 16 x 2 processes with accum 2 = 2 steps -> accum 4 on 1
    assert _loop(1, 16, 4)._resume_position(_info(2, 4, 16, accum=2)) == 8
    # another global batch mid-epoch: refuse, saying how to proceed
    with pytest.raises(RuntimeError, match=r"global batch 64 .*this run has 4 process\(es\), global batch 128.*"
                                           r"data\.global_batch_size.*Resume with 2 processes.*epoch-end checkpoint"
                                           r".*delete RUN/train/checkpoints"):
        _loop(4, 32, 1)._resume_position(_info(2, 3, 32))
    with pytest.raises(RuntimeError, match="without a recorded batch layout"):
        _loop(4, 16, 1)._resume_position(_info(2, 3, 32, record=False))


# ---- the shipped launch files ---------------------------------------------------------------------

def test_launch_files_are_valid():
    """launch/accelerate_{1x8,4x8}.yaml load with Accelerate (8 GPUs per machine) and the SLURM example
    is valid bash that launches with the 4x8 file."""
    import subprocess

    from accelerate.commands.config.config_args import load_config_from_file

    for name, machines in (("accelerate_1x8.yaml", 1), ("accelerate_4x8.yaml", 4)):
        c = load_config_from_file(str(REPO / "launch" / name))
        assert (c.num_machines, c.num_processes, str(c.distributed_type)) == (machines, 8 * machines,
                                                                              "DistributedType.MULTI_GPU")
    sbatch = REPO / "launch" / "slurm_4x8.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
    text = sbatch.read_text()
    assert "--config_file launch/accelerate_4x8.yaml" in text and '--machine_rank "$SLURM_NODEID"' in text


# ---- bounded-memory planning ----------------------------------------------------------------------

@pytest.mark.parametrize("kind, kw", [
    ("instance", {}),
    ("instance", {"num_samples": 2500}),
    ("class_balanced", {"samples_per_class": 4}),
    ("class_balanced", {"samples_per_class": 3, "num_samples": 1001}),  # the last group cut short
    ("sqrt", {"num_samples": 1500}),
    ("progressive", {}),
    ("subset", {"classes": [0, 2, 5, 7]}),
])
@pytest.mark.parametrize("weights", [False, True])
def test_streamed_plan_is_the_same_order(kind, kw, weights):
    """Planning an epoch in small chunks (the bounded-memory path of epochs above ``plan_chunk``) gives
    this rank's share bit for bit as the whole-epoch kernels do: every sampler, with and without
    curriculum weights, sharded in batches or contiguously (eval), on 1 and 3 processes."""
    labels = _labels()
    if weights:
        kw = {**kw, "initial_weights": np.random.default_rng(1).uniform(0.05, 1.0, labels.size),
              "schedule": "convex"}
    for reps in (1, 3):
        for rank in range(reps):
            for block in (None, 8):
                make = lambda: build_sampler(kind, labels, seed=7, num_replicas=reps, rank=rank, total_epochs=5, **kw)
                whole, streamed = make(), make()
                if block is not None:
                    whole.shard_batches(block)
                    streamed.shard_batches(block)
                streamed.plan_chunk = 48  # chunks of 48 positions (rounded to the alignment): many chunks
                assert streamed.global_length > streamed.plan_chunk
                for epoch in (0, 3):
                    i0, w0 = whole.indices_and_weights(epoch, 5)
                    i1, w1 = streamed.indices_and_weights(epoch, 5)
                    assert np.array_equal(i0, i1), (reps, rank, block, epoch)
                    assert np.array_equal(w0.view(np.uint32), w1.view(np.uint32)), (reps, rank, block, epoch)
                    assert np.array_equal(whole.indices(epoch), streamed.indices(epoch))
                    o0, o1 = whole.epoch_share(epoch, 5), streamed.epoch_share(epoch, 5)
                    assert np.array_equal(o0.indices, i0) and np.array_equal(o0.weights.view(np.uint32),
                                                                              w0.view(np.uint32))
                    assert np.array_equal(o0.occurrences, o1.occurrences), (reps, rank, block, epoch)


@pytest.mark.parametrize("reps", [1, 2, 4, 9])
def test_occurrences_count_over_the_global_order(reps):
    """``epoch_share``'s occurrence numbers are those of the global order (the padded one for the
    contiguous share), whole or streamed, including an epoch shorter than the number of processes."""
    from lfme_fast.augment import occurrences

    for n, block in ((997, None), (997, 8), (5, None)):
        labels = _labels(n) if n > 100 else np.array([0, 1, 0, 1, 1])
        order = build_sampler("class_balanced", labels, seed=2).global_indices(1)
        if block is None:
            padded = np.resize(order, -(-order.size // reps) * reps)
            per = padded.size // reps
            expected = [occurrences(padded)[r * per:(r + 1) * per] for r in range(reps)]
        else:
            kept = (order.size // (reps * block)) * reps * block
            occ = occurrences(order)[:kept].reshape(-1, reps, block)
            expected = [occ[:, r, :].reshape(-1) for r in range(reps)]
        for rank in range(reps):
            for chunk in (None, 2):
                s = build_sampler("class_balanced", labels, seed=2, num_replicas=reps, rank=rank)
                if block is not None:
                    s.shard_batches(block)
                if chunk is not None:
                    s.plan_chunk = chunk
                share = s.epoch_share(1)
                assert np.array_equal(share.indices, s.indices(1)) and share.weights is None
                assert np.array_equal(share.occurrences, expected[rank]), (n, block, rank, chunk)


def _global_views(synthetic_dir, world: int, global_batch: int, augment: str, table=None) -> list[list[tuple]]:
    """Every optimizer step of epoch 1 as the sorted (index, box, flip, view) of its samples, assembled
    from ``world`` ranks' epoch plans (class-balanced sampler: tail images repeat within the epoch)."""
    from lfme_fast.loaders import LoaderOptions
    from lfme_fast.loaders.base import plan_epoch, resolve_spec

    b = global_batch // world
    plans = []
    for rank in range(world):
        opts = LoaderOptions(synthetic_dir, "train", train=True, batch_size=b, resolution=32, augment=augment,
                             num_replicas=world, rank=rank, seed=5, views=table, total_epochs=2)
        sampler = build_sampler("class_balanced", resolve_spec(opts).labels, seed=5, num_samples=96,
                                num_replicas=world, rank=rank)
        plans.append(plan_epoch(resolve_spec(opts.replace(sampler=sampler)), 1))
    steps = []
    for k in range(len(plans[0].indices) // b):
        rows = []
        for p in plans:
            for q in range(k * b, (k + 1) * b):
                view = -1 if p.views is None else int(p.views[q])
                rows.append((int(p.indices[q]), tuple(int(v) for v in p.boxes[q]), bool(p.flips[q]), view))
        steps.append(sorted(rows))
    return steps


@pytest.mark.parametrize("augment", ["imagenet", "views"])
def test_same_augmentation_on_any_world_size(synthetic_dir, augment):
    """Not only the samples: every global batch also gets the same crops, flips and replayed views on
    1, 2 and 4 processes, and the repeats of an oversampled image keep distinct draws (an image's
    occurrence number is counted over the global order, not within one process's share)."""
    from lfme_fast.augment import image_sizes, make_views

    table = None
    if augment == "views":
        h, w = image_sizes(synthetic_dir, "train")
        table = make_views(h, w, 4, seed=5)
    reference = _global_views(synthetic_dir, 1, 16, "imagenet", table)
    assert len(reference) == 6
    repeats = [r for step in reference for r in step]
    assert len({r[0] for r in repeats}) < len(repeats)  # images do repeat within the epoch
    for world in (2, 4):
        assert _global_views(synthetic_dir, world, 16, "imagenet", table) == reference, world


def test_sync_bn_converts_only_on_several_gpu_processes():
    import torch

    from lfme_fast.trainer import _maybe_sync_bn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    notes = []
    cpu2 = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert _maybe_sync_bn(model, cpu2, notes.append) is model and "ignored" in notes[0]
    gpu2 = SimpleNamespace(num_processes=2, device=torch.device("cuda", 0))
    converted = _maybe_sync_bn(model, gpu2, notes.append)  # conversion itself needs no GPU
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)
    assert set(converted.state_dict()) == set(model.state_dict())  # checkpoints and model.pt keep their keys


def test_a_batch_sharded_sampler_keeps_every_sample_in_a_loader_that_keeps_them(synthetic_dir):
    """A sampler sharded in batches for a training loader, handed to a loader that keeps every sample
    (drop_last=False), is read contiguously through a copy: no tail dropped, the original untouched."""
    from lfme_fast.loaders import LoaderOptions
    from lfme_fast.loaders.base import resolve_spec

    opts = LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, resolution=32, drop_last=False)
    s = build_sampler("instance", resolve_spec(opts).labels, seed=0).shard_batches(16)
    assert len(s) == 32  # 41 samples in whole blocks of 16
    spec = resolve_spec(opts.replace(sampler=s))
    assert len(spec.sampler) == 41 and spec.sampler is not s
    assert s.shard_block == 16
