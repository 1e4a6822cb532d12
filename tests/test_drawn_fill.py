"""Offline stores with ``fill: drawn``: only the (sample, view) rows the student's plan draws are
computed, the student trains on exactly those (reading another row is refused, never a silent zero),
the computed rows equal a live teacher forward on that view, and a store made for another plan is
rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfme_fast.checkpoint import load_model_file
from lfme_fast.config import load_config
from lfme_fast.loaders import LoaderOptions, build_loader
from lfme_fast.models import build_model
from lfme_fast.offline import ArrayStore, IndexSampler, OfflineStoreError, drawn_identity, drawn_pairs
from lfme_fast.recipes import run
from lfme_fast.recipes.cbd import feature_array
from lfme_fast.sampling import ClassBalancedSampler, build_sampler
from lfme_fast.shards import ShardReader

REPO = Path(__file__).resolve().parents[1]


def cbd_cfg(root, out, *extra):
    """configs/smoke_cbd.yaml on the fixture, one standard teacher, every pad-crop view, drawn fill."""
    return load_config(REPO / "configs" / "smoke_cbd.yaml", [
        f"data.root={root}", f"output_dir={out}", "data.test_split=val", "eval.thresholds=[100, 20]",
        "cbd.teachers=[{seed: 0, augment: standard}]", "cbd.views=all", "cbd.fill=drawn", "data.batch_size=32",
        "optim.epochs=2", "log.progress=false", *extra])


#: (sample, view) pairs each ArrayStore.rows call was asked for during drawn_run (the student's reads)
READ_PAIRS: list[tuple[np.ndarray, np.ndarray]] = []


@pytest.fixture(scope="module")
def drawn_run(fmnist_dir, tmp_path_factory):
    cfg = cbd_cfg(fmnist_dir, tmp_path_factory.mktemp("drawn") / "run")
    original = ArrayStore.rows

    def spy(self, indices, views=None):
        idx, v = original(self, indices, views)
        READ_PAIRS.append((torch.as_tensor(idx).cpu().numpy().copy(), torch.as_tensor(v).cpu().numpy().copy()))
        return idx, v

    READ_PAIRS.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ArrayStore, "rows", spy)
        run(cfg)
    return cfg


def student_pairs(root, cfg, views):
    """The (sample, view) pairs of the CBD student's plan, rebuilt independently of the recipe."""
    labels = ShardReader(root, "train").labels
    sampler = build_sampler("class_balanced", labels, seed=cfg.seed, total_epochs=cfg.optim.epochs,
                            samples_per_class=cfg.cbd.samples_per_class)
    opts = LoaderOptions(root, "train", backend="torch", train=True, batch_size=cfg.data.batch_size, sampler=sampler,
                         total_epochs=cfg.optim.epochs, views=views, num_workers=0, seed=cfg.seed)
    # the trainer stops each epoch at max_steps_per_epoch: later rows are never read
    return drawn_pairs(opts, cfg.optim.epochs, grad_accum=cfg.train.grad_accum,
                       max_steps=cfg.train.max_steps_per_epoch)


def test_store_computes_exactly_the_student_draws(drawn_run, fmnist_dir):
    cfg = drawn_run
    store = ArrayStore.open(cfg.run_dir)
    header = store.header
    assert header["views"]["fill"] == "drawn" and header["views"]["num_views"] == 162
    assert header["views"]["draws"]["epochs"] == 2 and header["views"]["draws"]["sampler"] == "class_balanced"
    want = student_pairs(fmnist_dir, cfg, store.views)
    drawn = np.asarray(store.drawn)
    # view 0 (the eval view) of every sample is not forced: a CBD store has no per-sample array
    np.testing.assert_array_equal(drawn, want)
    assert 0 < drawn.mean() < 0.05  # 2 epochs of the student's draws over ~930 x 162 rows
    assert header["storage"]["drawn_rows"] == int(want.sum())
    # what the student actually read (spied on the store), not a re-derivation of its plan: exactly the
    # computed rows, each one read at least once
    assert READ_PAIRS
    read = np.zeros_like(drawn)
    for idx, v in READ_PAIRS:
        read[idx, v] = True
    np.testing.assert_array_equal(read, drawn)
    assert json.loads((cfg.run_dir / "metrics.json").read_text())["top1"] >= 0.0


def test_drawn_rows_equal_a_live_teacher_and_other_rows_are_refused(drawn_run, fmnist_dir):
    cfg = drawn_run
    store = ArrayStore.open(cfg.run_dir)
    drawn = np.asarray(store.drawn)
    idx, views = np.nonzero(drawn)
    pick = np.linspace(0, idx.size - 1, 24).astype(np.int64)
    idx, views = idx[pick], views[pick]
    state, meta = load_model_file(cfg.run_dir / "teachers" / "t0" / "model.pt")
    teacher = build_model(meta["arch"], meta["num_classes"], classifier=meta["classifier"])
    teacher.load_state_dict(state)
    teacher.eval()
    for v in np.unique(views):
        rows = idx[views == v]
        loader = build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=64,
                                            views=store.views, fixed_view=int(v), sampler=IndexSampler(rows),
                                            num_workers=0))
        batch = next(iter(loader))
        assert batch.indices.tolist() == rows.tolist()
        with torch.no_grad():
            live = F.normalize(teacher.forward_features(batch.images), dim=1)
        stored = store.gather(feature_array(0), batch.indices, batch.views).float()
        torch.testing.assert_close(stored, live, atol=1e-3, rtol=0)
    i, v = np.argwhere(~drawn)[0]
    with pytest.raises(OfflineStoreError, match=rf"sample {i} view {v} was not drawn"):
        store.gather(feature_array(0), np.array([i]), np.array([v]))


def test_store_for_another_plan_is_rebuilt(drawn_run, fmnist_dir, tmp_path):
    """Three student epochs draw other rows: the two-epoch store's header is refused and a new one built."""
    import shutil

    cfg = drawn_run
    header = ArrayStore.open(cfg.run_dir).header
    other_plan = {**header, "views": {**header["views"], "draws": {**header["views"]["draws"], "epochs": 3}}}
    with pytest.raises(OfflineStoreError, match=r"views"):
        ArrayStore.open(cfg.run_dir, other_plan)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(cfg.run_dir / "teachers", other / "teachers")
    (other / "offline").symlink_to(cfg.run_dir / "offline")
    cfg3 = cbd_cfg(fmnist_dir, other, "optim.epochs=3", "stages=[teachers, offline]", "cbd.epochs=2")
    run(cfg3)
    assert not (other / "offline").is_symlink()  # the old store was not taken: a new one replaced the link
    store = ArrayStore.open(other)
    assert store.header["views"]["draws"]["epochs"] == 3
    np.testing.assert_array_equal(np.asarray(store.drawn), student_pairs(fmnist_dir, cfg3, store.views))
    assert ArrayStore.open(cfg.run_dir).header["views"]["draws"]["epochs"] == 2  # the first run's store is intact


def test_a_linked_stage_is_never_retrained_into_its_owner(drawn_run, fmnist_dir, tmp_path):
    """A run whose teachers/ links to another run's but whose settings differ refuses to train there."""
    cfg = drawn_run
    other = tmp_path / "linked"
    other.mkdir()
    (other / "teachers").symlink_to(cfg.run_dir / "teachers")
    before = (cfg.run_dir / "teachers" / "t0" / "model.pt").stat().st_mtime_ns
    with pytest.raises(RuntimeError, match=r"stage 'teacher-t0' is not up to date in .* outside this run"):
        run(cbd_cfg(fmnist_dir, other, "cbd.epochs=3", "stages=[teachers]"))
    assert (cfg.run_dir / "teachers" / "t0" / "model.pt").stat().st_mtime_ns == before


def test_drawn_identity_and_pairs_check_their_input(fmnist_dir):
    assert drawn_identity("all", sampler="x", epochs=1, global_batch=1, seed=0) == {}
    with pytest.raises(ValueError, match="fill must be one of all, drawn"):
        drawn_identity("some", sampler="x", epochs=1, global_batch=1, seed=0)
    sampler = ClassBalancedSampler(ShardReader(fmnist_dir, "train").labels, samples_per_class=4, seed=0)
    with pytest.raises(ValueError, match="one-view training loader"):
        drawn_pairs(LoaderOptions(fmnist_dir, "train", backend="torch", train=True, batch_size=8, sampler=sampler,
                                  num_workers=0), 1)


def test_lfme_drawn_store_keeps_every_confidence(fmnist_dir, tmp_path):
    """LFME's per-sample SpIS confidences need every sample: view 0 is filled for all, the rest as drawn."""
    out = tmp_path / "lfme"
    cfg = load_config(REPO / "configs" / "fmnist_lt" / "lfme.yaml", [
        f"data.root={fmnist_dir}", f"output_dir={out}", "data.test_split=val", "data.batch_size=64",
        "experts.thresholds=[100, 20]", "eval.thresholds=[100, 20]", "experts.epochs=1",
        "experts.batch_size=[32, 16, 8]", "optim.epochs=2", "lfme.views=all", "lfme.fill=drawn",
        "log.progress=false", "experts.eval_test=false"])
    run(cfg)
    store = ArrayStore.open(out)
    drawn = np.asarray(store.drawn)
    assert drawn[:, 0].all() and 0 < drawn[:, 1:].mean() < 0.05
    conf = store.per_sample("confidence")
    assert (conf > 0).all()  # every sample's confidence was computed
    assert json.loads((out / "metrics.json").read_text())["recipe"]["name"] == "lfme"


@pytest.mark.parametrize("accum", [1, 2])
def test_drawn_rows_are_the_same_on_any_process_count(fmnist_dir, accum):
    """The rows all processes together read (the union of their drawn masks) depend on the global batch
    only: 1, 2 and 4 processes, with accumulation 1 or 2, draw the same (sample, view) rows, so a drawn
    store carries over to another process count (its header names the global batch, not the split)."""
    from lfme_fast.augment import all_pad_crop_views, image_sizes

    labels = ShardReader(fmnist_dir, "train").labels
    views = all_pad_crop_views(*image_sizes(fmnist_dir, "train"), seed=0)
    global_batch, epochs = 64, 2

    def union(world: int, acc: int) -> np.ndarray:
        mask = np.zeros((labels.size, views.num_views), dtype=bool)
        for rank in range(world):
            sampler = build_sampler("class_balanced", labels, seed=3, num_replicas=world, rank=rank,
                                    samples_per_class=4)
            opts = LoaderOptions(fmnist_dir, "train", backend="torch", train=True,
                                 batch_size=global_batch // (world * acc), sampler=sampler, total_epochs=epochs,
                                 views=views, num_workers=0, seed=3, num_replicas=world, rank=rank)
            mask |= drawn_pairs(opts, epochs, grad_accum=acc)
        return mask

    reference = union(1, 1)
    assert 0 < reference.sum() <= epochs * labels.size
    for world in (1, 2, 4):
        np.testing.assert_array_equal(union(world, accum), reference)

