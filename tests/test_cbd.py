"""The CBD recipe on the tiny Fashion-MNIST-LT fixture: all four stages end to end (layout, metrics,
logged loss parts), stored teacher features equal live teacher forwards on the replayed views, a
second run skips everything, an interrupted teacher resumes, strong teachers jitter colour and
standard ones do not, and bad configs / foreign stores are refused naming the key or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfme_fast.checkpoint import load_model_file
from lfme_fast.config import ConfigError, load_config
from lfme_fast.logging_utils import read_jsonl
from lfme_fast.losses import cbd_feature_loss, weighted_cross_entropy
from lfme_fast.models import build_model
from lfme_fast.offline import ArrayStore, OfflineStoreError
from lfme_fast.recipes import run
from lfme_fast.recipes.cbd import CBDLoss, CBDRecipe, CBDStudent, feature_array

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke_cbd.yaml"
WIDTH = 128  # resnet_small28's feature width


def smoke_cfg(root, out, *extra):
    """configs/smoke_cbd.yaml sized for the fixture (~930 images, no test split): 2 teachers (standard
    seed 0, strong seed 1), 2 stored views, 2 steps per epoch of 32 images."""
    return load_config(SMOKE, [f"data.root={root}", f"output_dir={out}", "data.test_split=val",
                               "eval.thresholds=[100, 20]", "cbd.views=2", "data.batch_size=32",
                               "train.max_steps_per_epoch=2", "log.progress=false", *extra])


@pytest.fixture(scope="module")
def cbd_run(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cbd") / "run"
    cfg = smoke_cfg(fmnist_dir, out)
    return cfg, run(cfg)


def load_teacher(path: Path) -> torch.nn.Module:
    state, meta = load_model_file(path)
    model = build_model(meta["arch"], meta["num_classes"], classifier=meta["classifier"])
    model.load_state_dict(state)
    return model.eval()


def student_batch(root, store, batch_size=128):
    from lfme_fast.loaders import LoaderOptions, build_loader
    from lfme_fast.sampling import ClassBalancedSampler
    from lfme_fast.shards import ShardReader

    sampler = ClassBalancedSampler(ShardReader(root, "train").labels, samples_per_class=4, seed=3)
    loader = build_loader(LoaderOptions(root, "train", backend="torch", train=True, batch_size=batch_size,
                                        sampler=sampler, total_epochs=2, views=store.views, num_workers=0))
    loader.set_epoch(1)
    return next(iter(loader))


def test_end_to_end_layout_and_metrics(cbd_run):
    cfg, _ = cbd_run
    out = cfg.run_dir
    for rel in ("teachers/t0/model.pt", "teachers/t1/model.pt", "teachers/t1/done.json", "offline/header.json",
                "offline/views.npz", "offline/teacher0.features.npy", "offline/teacher1.features.npy",
                "student/model.pt", "student/log.jsonl", "metrics.json", "metrics.md", "per_class_accuracy.png"):
        assert (out / rel).exists(), rel
    assert not (out / "offline.partial").exists()
    assert not any((out / d / "checkpoints").exists() for d in ("teachers/t0", "teachers/t1", "student"))

    metrics = json.loads((out / "metrics.json").read_text())
    info = metrics["recipe"]
    assert info["name"] == "cbd" and (info["alpha"], info["beta"], info["projection"], info["views"]) == \
        (0.4, 100.0, True, 2)
    assert info["teachers"] == [{"name": "t0", "seed": 0, "augment": "standard"},
                                {"name": "t1", "seed": 1, "augment": "strong"}]
    per_image = 2 * 2 * WIDTH * 2  # teachers x views x width x float16
    assert info["bytes_per_image"] == per_image and metrics["cbd"]["bytes_per_image"] == per_image
    header = json.loads((out / "offline" / "header.json").read_text())
    assert header["storage"]["feature_bytes_per_image"] == per_image
    assert [c["name"] for c in header["checkpoints"]] == ["t0", "t1"] and header["backend"] == "torch"
    assert header["arrays"] == {feature_array(k): {"width": WIDTH, "dtype": "float16", "topk": None, "per_view": True}
                                for k in range(2)}
    teachers = metrics["cbd"]["teachers"]
    assert [t["augment"] for t in teachers] == ["standard", "strong"]
    assert all(0.0 <= t["top1"] <= 1.0 and set(t["subsets"]) == {"many", "medium", "few"} for t in teachers)
    assert 0.0 <= metrics["top1"] <= 1.0

    # teachers: the record's seed (model init, sampler, augmentation) offset from the run's seed
    seeds = [load_model_file(out / "teachers" / f"t{k}" / "model.pt")[1]["seed"] for k in range(2)]
    assert seeds == [1000, 2000]
    # the student: backbone (cosine head, no bias) + projection 128 -> 2 x 128, one model file
    state, meta = load_model_file(out / "student" / "model.pt")
    assert tuple(state["projection.0.weight"].shape) == (2 * WIDTH, WIDTH) and "backbone.fc.bias" not in state
    assert meta["teacher_width"] == 2 * WIDTH
    # every logged step carries the parts, and loss = (1 - alpha) ce + alpha * beta * cos_distance
    steps = [r for r in read_jsonl(out / "student" / "log.jsonl") if r.get("event") == "step"]
    assert steps
    for r in steps:
        assert r["feat"] == pytest.approx(40.0 * r["cos_distance"], rel=1e-5)
        assert r["loss"] == pytest.approx(0.6 * r["ce"] + r["feat"], rel=1e-5)


def test_stored_features_are_normalised_and_equal_live_teachers(cbd_run, fmnist_dir):
    cfg, _ = cbd_run
    store = ArrayStore.open(cfg.run_dir)
    for k in range(2):
        arr = store.raw(feature_array(k))[0]
        assert arr.dtype == np.float16 and arr.shape == (store.num_samples, 2, WIDTH)
        norms = np.linalg.norm(np.asarray(arr, dtype=np.float32), axis=2)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # L2-normalised, to float16 rounding
    batch = student_batch(fmnist_dir, store)
    assert set(batch.views.tolist()) == {0, 1}  # the student's batch replays both stored views
    teachers = [load_teacher(cfg.run_dir / "teachers" / f"t{k}" / "model.pt") for k in range(2)]
    with torch.no_grad():
        live = [F.normalize(t.forward_features(batch.images), dim=1) for t in teachers]
    loss_fn = CBDLoss(store, 2, 0.4, 100.0, "cpu")
    stored = loss_fn.teacher_features(batch.indices, batch.views)
    assert stored.dtype == torch.float16 and stored.shape == (len(batch.indices), 2 * WIDTH)
    # the stored row is the live forward on the very view the student sees (float16: 2^-11 relative)
    torch.testing.assert_close(stored.float(), torch.cat(live, dim=1), atol=1e-3, rtol=0)
    # and the recipe's loss on it equals cbd_feature_loss on the live features
    torch.manual_seed(0)
    student = CBDStudent(build_model("resnet_small28", 10, classifier="cosine"), 2 * WIDTH)
    logits, projected = loss_fn.forward(student, batch)
    got = loss_fn(batch, (logits, projected))
    want = cbd_feature_loss(projected, torch.cat(live, dim=1), 0.4, 100.0,
                            ce=weighted_cross_entropy(logits, batch.labels).loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-3, atol=1e-4)


def test_second_run_skips_every_stage(cbd_run):
    cfg, _ = cbd_run
    out = cfg.run_dir
    files = ["teachers/t0/model.pt", "teachers/t1/model.pt", "offline/header.json", "offline/teacher0.features.npy",
             "student/model.pt", "student/log.jsonl", "metrics.json"]
    before = {f: (out / f).stat().st_mtime_ns for f in files}
    run(cfg)
    assert {f: (out / f).stat().st_mtime_ns for f in files} == before


def test_store_from_another_teacher_set_is_refused(cbd_run, fmnist_dir, tmp_path):
    """A run with teachers [t0] finds the store of teachers [t0, t1] and refuses it, naming the field."""
    cfg, _ = cbd_run
    other = tmp_path / "other"
    (other / "teachers").mkdir(parents=True)
    shutil.copytree(cfg.run_dir / "teachers" / "t0", other / "teachers" / "t0")  # same teacher: skipped, not trained
    (other / "offline").symlink_to(cfg.run_dir / "offline")
    cfg2 = smoke_cfg(fmnist_dir, other, "cbd.teachers=[{seed: 0, augment: standard}]", "stages=[teachers, student]")
    with pytest.raises(OfflineStoreError, match=r"field 'checkpoints \(length 2 != 1\)'.*Run the 'offline' stage"):
        run(cfg2)
    assert not (other / "student" / "model.pt").exists()


def test_interrupted_teacher_resumes(fmnist_dir, tmp_path):
    from lfme_fast.trainer import InterruptAfter, TrainingInterrupted

    out = tmp_path / "run"
    cfg = smoke_cfg(fmnist_dir, out, "stages=[teachers]", "cbd.epochs=2")  # 2 x 2 steps per teacher
    with pytest.raises(TrainingInterrupted):
        run(cfg, on_step=InterruptAfter(3))
    t0 = out / "teachers" / "t0"
    assert not (t0 / "done.json").exists() and not (t0 / "model.pt").exists()  # nothing half-written looks done
    run(cfg)
    events = [r["event"] for r in read_jsonl(t0 / "log.jsonl")]
    assert "resume" in events and (t0 / "done.json").exists() and (out / "teachers" / "t1" / "done.json").exists()


def test_strong_teachers_jitter_colour_and_standard_ones_do_not(cbd_run, fmnist_dir):
    from lfme_fast.loaders import build_loader
    from lfme_fast.loaders.base import plan_epoch, resolve_spec
    from lfme_fast.sampling import InstanceSampler
    from lfme_fast.shards import ShardReader

    _, recipe = cbd_run
    standard, strong = recipe.teachers
    sampler = InstanceSampler(ShardReader(fmnist_dir, "train").labels, seed=0)
    opts = {t.record.augment: recipe.teacher_loader_options(t, sampler) for t in (standard, strong)}
    assert (opts["standard"].colour, opts["strong"].colour, opts["strong"].colour_strength) == ("none", "simclr", 1.0)
    assert (opts["standard"].seed, opts["strong"].seed) == (1000, 2000)  # each teacher its own augmentation draws
    assert plan_epoch(resolve_spec(opts["standard"]), 0).colour is None
    assert plan_epoch(resolve_spec(opts["strong"]), 0).colour is not None
    # pixels: the strong loader shows the same crops as without colour, jittered
    jittered = next(iter(build_loader(opts["strong"]))).images
    plain = next(iter(build_loader(opts["strong"].replace(colour="none")))).images
    changed = (jittered - plain).flatten(1).abs().amax(dim=1) > 1e-3
    assert 0.5 < float(changed.float().mean()) < 1.0  # p 0.8 jitter or grayscale per image (some keep colours)


@pytest.mark.parametrize("override, key", [
    ("cbd.alpha=1.5", "cbd.alpha"),
    ("cbd.beta=-1", "cbd.beta"),
    ("cbd.teachers=[]", "cbd.teachers"),
    ("cbd.teachers=[{seed: 0, augment: strong}, {seed: 0, augment: strong}]", "cbd.teachers[1]"),
    ("cbd.teachers=[{seed: 0, augment: heavy}]", "cbd.teachers[0].augment"),
    ("cbd.views=0", "cbd.views"),
    ("optim.schedule=step", "optim.schedule"),
    ("cbd.projection=false", "cbd.projection"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert str(err.value).startswith(key + ":") or f"{key}:" in str(err.value), str(err.value)


def test_views_all_needs_pad_crop_data(synthetic_dir, tmp_path):
    """'all' pad-crop views on RandomResizedCrop data fails at setup, before any teacher trains."""
    cfg = load_config(SMOKE, [f"data.root={synthetic_dir}", f"output_dir={tmp_path / 'run'}", "data.test_split=val",
                              "cbd.views=all"])
    with pytest.raises(ConfigError, match="cbd.views: views 'all' stores every pad-crop view"):
        run(cfg)
    assert not (tmp_path / "run" / "teachers").exists()


def test_projection_false_only_with_matching_widths():
    with pytest.raises(ConfigError, match=r"cbd.projection: false needs the student's feature width \(128.*= 256"):
        load_config(SMOKE, ["cbd.projection=false"])
    cfg = load_config(SMOKE, ["cbd.projection=false", "cbd.teachers=[{seed: 0, augment: standard}]"])
    assert cfg.cbd.projection is False  # one teacher of the student's width: g may be the identity
    student = CBDStudent(build_model("resnet_small28", 10), WIDTH, projection=False)
    assert isinstance(student.projection, torch.nn.Identity)
    with pytest.raises(ValueError, match="projection=False needs"):
        CBDStudent(build_model("resnet_small28", 10), 2 * WIDTH, projection=False)


def test_cbd_configs_resolve():
    configs = Path(SMOKE).parent
    for rel, n_teachers, arch in (("fmnist_lt/cbd.yaml", 1, "resnet_small28"),
                                  ("fmnist_lt/cbd_ens.yaml", 4, "resnet_small28"),
                                  ("imagenet_lt/cbd.yaml", 1, "resnet50"),
                                  ("imagenet_lt/cbd_ens.yaml", 4, "resnet50"),
                                  ("imagenet_lt/cbd_resnet10.yaml", 4, "resnet10"),
                                  ("inat18/cbd_ens.yaml", 4, "resnet50")):
        cfg = load_config(configs / rel)
        assert CBDRecipe.STAGES == cfg.stages and cfg.model.classifier == "cosine", rel
        assert len(cfg.cbd.teachers) == n_teachers and cfg.cbd.arch == arch == cfg.model.arch, rel
        assert cfg.train.sampler == "class_balanced" and (cfg.cbd.alpha, cfg.cbd.beta) == (0.4, 100.0), rel
        if n_teachers == 4:  # the official CBD-ENS set
            assert [t.augment for t in cfg.cbd.teachers] == ["standard", "standard", "strong", "strong"], rel
    assert load_config(configs / "inat18" / "cbd_ens.yaml").optim.weight_decay == 2e-4
    assert load_config(configs / "inat18" / "cbd_ens.yaml").optim.epochs == 200


def test_two_processes_run_all_four_stages(fmnist_dir, tmp_path):
    """configs/smoke_cbd.yaml as a real 2-process CPU job (gloo, accelerate launch): every stage runs,
    each rank writes its share of the store, and the store equals a single-process pass over the
    same teachers."""
    import os
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    common = [f"data.root={fmnist_dir}", "data.test_split=val", "eval.thresholds=[100, 20]", "cbd.views=2",
              "data.batch_size=32", "train.max_steps_per_epoch=2", "log.progress=false"]
    dist = tmp_path / "dist"
    with socket.socket() as s:  # a free port: other jobs on this machine may hold the default 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend",
           "no", "lfme_fast/train.py",
           "--config", str(SMOKE), "--output-dir", str(dist), *common]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((dist / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["cbd"]["teachers"]) == 2

    # every row of the store (each rank wrote its share) is the live teacher forward on its view
    from lfme_fast.loaders import LoaderOptions, build_loader

    store = ArrayStore.open(dist)
    teachers = [load_teacher(dist / "teachers" / f"t{k}" / "model.pt") for k in range(2)]
    for view in range(2):
        loader = build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=1024,
                                            views=store.views, fixed_view=view, num_workers=0))
        (batch,) = list(loader)
        with torch.no_grad():
            live = torch.cat([F.normalize(t.forward_features(batch.images), dim=1) for t in teachers], dim=1)
        stored = CBDLoss(store, 2, 0.4, 100.0, "cpu").teacher_features(batch.indices, torch.full_like(batch.indices,
                                                                                                        view))
        torch.testing.assert_close(stored.float(), live, atol=1e-3, rtol=0)
