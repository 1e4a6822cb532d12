"""The offline expert-output store: views, header identity checks, dense and top-k round trips, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lfme_fast.augment import image_sizes
from lfme_fast.checkpoint import save_model_file
from lfme_fast.loaders import LoaderOptions, build_loader
from lfme_fast.models import build_model
from lfme_fast.offline import (
    ExpertSource,
    OfflineStore,
    OfflineStoreError,
    build_views,
    eval_view_boxes,
    store_header,
    write_offline,
)
from lfme_fast.shards import ShardReader, load_manifest

SUBSETS = (("many", [0, 1, 2, 3]), ("medium", [4, 5, 6]), ("few", [7, 8, 9]))


def make_experts(run_dir: Path, seed: int = 0) -> list[ExpertSource]:
    """Untrained (seeded) 28 px experts saved where the LFME recipe keeps them."""
    out = []
    for k, (name, classes) in enumerate(SUBSETS):
        torch.manual_seed(seed + k)
        model = build_model("resnet_small28", len(classes)).eval()
        path = run_dir / "experts" / name / "model.pt"
        save_model_file(path, model, {"arch": "resnet_small28"})
        out.append(ExpertSource(name, np.asarray(classes), model, path))
    return out


def build_store(root: Path, run_dir: Path, *, views: int = 2, kind: str = "center", topk=None, seed: int = 0,
                experts=None, **kw):
    experts = experts or make_experts(run_dir)
    h, w = image_sizes(root, "train")
    table = build_views(h, w, views, seed, kind, "pad_crop")
    header = store_header(run_dir=run_dir, manifest=load_manifest(root), split="train", resolution=28,
                          mode="pad_crop", num_views=views, view_seed=seed, view_kind=kind, experts=experts, topk=topk)

    def make_loader(tab, k):
        return build_loader(LoaderOptions(root, "train", backend="torch", train=False, batch_size=256, views=tab,
                                          fixed_view=k, num_workers=0))

    store = write_offline(run_dir, header, experts, table, make_loader, 10, show_progress=False, log=lambda m: None,
                          eval_views=eval_view_boxes(h, w, "pad_crop") if kind == "random" else None, **kw)
    return store, header, experts


@pytest.fixture(scope="module")
def dense_store(fmnist_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_dense")
    store, header, experts = build_store(fmnist_dir, run_dir, views=2)
    return run_dir, store, header, experts


def test_views_view0_is_eval_view():
    h = np.array([28, 28]); w = np.array([28, 28])
    v = build_views(h, w, 3, 5, "center", "pad_crop")
    assert v.boxes.shape == (2, 3, 4)
    assert (v.boxes[:, 0] == [0, 0, 28, 28]).all() and not v.flips[:, 0].any()  # small images: whole image
    big = build_views(np.array([375]), np.array([500]), 2, 5, "center", "imagenet")
    assert big.boxes[0, 0].tolist() == [23, 86, 328, 328]  # centre crop of 0.875 x shorter side
    rnd = build_views(h, w, 2, 5, "random", "pad_crop")
    assert not (rnd.boxes[:, 0] == [0, 0, 28, 28]).all()
    again = build_views(h, w, 3, 5, "center", "pad_crop")
    assert (again.boxes == v.boxes).all() and (again.flips == v.flips).all()


def test_dense_store_layout_and_values(fmnist_dir, dense_store):
    run_dir, store, header, experts = dense_store
    n = len(ShardReader(fmnist_dir, "train"))
    d = run_dir / "offline"
    names = sorted(p.name for p in d.iterdir())
    assert names == ["confidence.npy", "expert0.logits.npy", "expert1.logits.npy", "expert2.logits.npy",
                     "header.json", "views.npz"]
    assert not (run_dir / "offline.partial").exists()
    arr = np.load(d / "expert1.logits.npy", mmap_mode="r")
    assert arr.dtype == np.float16 and arr.shape == (n, 2, 3)
    saved = json.loads((d / "header.json").read_text())
    assert saved["dataset"]["fingerprint"] == load_manifest(fmnist_dir)["splits"]["train"]["fingerprint"]
    assert saved["dataset"]["name"] == "fmnist-lt" and saved["augmentation"]["num_views"] == 2
    assert saved["experts"][0]["path"] == "experts/many/model.pt" and len(saved["experts"][0]["sha256"]) == 64
    assert saved["storage"]["logit_bytes_per_image"] == pytest.approx(2 * 2 * 10)  # 2 views, 10 fp16 logits
    assert store.bytes_per_image == pytest.approx(40.0)

    # stored = live forward on the same view, to float16 rounding
    idx = np.array([0, 5, n - 1])
    loader = build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=n,
                                        views=store.views, fixed_view=1, num_workers=0))
    loader.set_epoch(0)
    batch = next(iter(loader))
    with torch.no_grad():
        live = experts[2].model(batch.images[idx])
    stored = store.teacher_logits(2, idx, np.ones(3, dtype=np.int64))
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), live, atol=2e-2, rtol=2e-3)

    # SpIS confidence: the subset expert's probability of the true class, centre view
    labels = ShardReader(fmnist_dir, "train").labels
    conf = store.confidence
    assert conf.shape == (n,) and np.isfinite(conf).all() and ((conf > 0) & (conf <= 1)).all()
    loader0 = build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=n,
                                         views=store.views, fixed_view=0, num_workers=0))
    loader0.set_epoch(0)
    b0 = next(iter(loader0))
    i = int(np.flatnonzero(labels == 8)[0])
    with torch.no_grad():
        p = torch.softmax(experts[2].model(b0.images[i:i + 1]), 1)[0, 1]
    assert conf[i] == pytest.approx(float(p), rel=1e-4)


def test_open_refuses_mismatch(dense_store, tmp_path):
    run_dir, store, header, experts = dense_store
    assert OfflineStore.open(run_dir, header).num_views == 2
    for mutate, field in [
        (lambda h: h["dataset"].update(fingerprint="other"), "dataset.fingerprint"),
        (lambda h: h["augmentation"].update(num_views=4), "augmentation.num_views"),
        (lambda h: h["augmentation"].update(view_seed=1), "augmentation.view_seed"),
        (lambda h: h["subsets"][1]["classes"].append(9), "subsets[1].classes"),
        (lambda h: h["experts"][0].update(sha256="0" * 64), "experts[0].sha256"),
        (lambda h: h["storage"].update(topk=2), "storage.topk"),
    ]:
        bad = json.loads(json.dumps(header))
        mutate(bad)
        with pytest.raises(OfflineStoreError, match=field.replace("[", r"\[").replace("]", r"\]")):
            OfflineStore.open(run_dir, bad)
    with pytest.raises(OfflineStoreError, match="no offline store"):
        OfflineStore.open(tmp_path)


def test_load_modes_agree(dense_store):
    run_dir, store, header, _ = dense_store
    idx = torch.tensor([3, 1, 4, 1, 5])
    views = torch.tensor([0, 1, 1, 0, 1])
    ref = store.teachers(idx, views)
    for load in ("ram", "cpu"):
        other = OfflineStore.open(run_dir, header, load=load).teachers(idx, views)
        for a, b in zip(ref, other):
            assert torch.equal(a, b)


def test_topk_round_trip(fmnist_dir, dense_store, tmp_path):
    run_dir, dense, _, experts = dense_store
    # the many expert has 4 classes: top-2 stores 2 (value, index) pairs; the 3-class experts keep 2 as well
    store, header, _ = build_store(fmnist_dir, tmp_path, views=2, topk=2, experts=make_experts(tmp_path))
    d = tmp_path / "offline"
    vals = np.load(d / "expert0.values.npy", mmap_mode="r")
    ind = np.load(d / "expert0.indices.npy", mmap_mode="r")
    assert vals.dtype == np.float16 and ind.dtype == np.int16 and vals.shape[1:] == (2, 2)
    assert store.bytes_per_image == pytest.approx(2 * 3 * 2 * (2 + 2))
    idx = torch.arange(0, 40)
    v = torch.tensor(np.arange(40) % 2)
    for l in range(3):
        full = dense.teacher_logits(l, idx, v).float()
        got = store.teacher_logits(l, idx, v)
        top_vals, top_pos = full.topk(2, dim=1)
        # kept entries are exact, the others are pushed far below
        assert torch.equal(got.gather(1, top_pos), top_vals)
        mask = torch.ones_like(got, dtype=torch.bool).scatter_(1, top_pos, False)
        assert (got[mask] < top_vals.min() - 100).all()
    # confidences do not depend on top-k (they come from the full logits)
    np.testing.assert_array_equal(store.confidence, dense.confidence)


def test_resume_after_interruption(fmnist_dir, tmp_path):
    experts = make_experts(tmp_path)
    calls = {"n": 0}

    class Boom(RuntimeError):
        pass

    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 2, 0, "center", "pad_crop")
    header = store_header(run_dir=tmp_path, manifest=load_manifest(fmnist_dir), split="train", resolution=28,
                          mode="pad_crop", num_views=2, view_seed=0, view_kind="center", experts=experts, topk=None)

    def make_loader(tab, k):
        calls["n"] += 1
        if k == 1 and calls["n"] == 2:
            raise Boom("killed during view 1")
        return build_loader(LoaderOptions(fmnist_dir, "train", backend="torch", train=False, batch_size=512,
                                          views=tab, fixed_view=k, num_workers=0))

    with pytest.raises(Boom):
        write_offline(tmp_path, header, experts, table, make_loader, 10, show_progress=False, log=lambda m: None)
    assert not (tmp_path / "offline").exists()
    progress = json.loads((tmp_path / "offline.partial" / "progress.json").read_text())
    assert progress["done_views"] == [0]
    logs = []
    store = write_offline(tmp_path, header, experts, table, make_loader, 10, show_progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert calls["n"] == 3  # view 0 was not recomputed
    ref, _, _ = build_store(fmnist_dir, tmp_path / "ref", views=2, experts=make_experts(tmp_path / "ref"))
    idx = torch.arange(0, 64)
    for v in (0, 1):
        for a, b in zip(store.teachers(idx, torch.full((64,), v)), ref.teachers(idx, torch.full((64,), v))):
            assert torch.equal(a, b)


def test_random_views_confidence_from_eval_view(fmnist_dir, dense_store, tmp_path):
    _, dense, _, _ = dense_store
    store, header, _ = build_store(fmnist_dir, tmp_path, views=1, kind="random", experts=make_experts(tmp_path))
    assert header["augmentation"]["view_kind"] == "random"
    # the confidences come from the (unstored) eval view: equal to the centre-view store's
    np.testing.assert_allclose(store.confidence, dense.confidence, rtol=1e-5)
