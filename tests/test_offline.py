"""The offline store: generic named arrays (dense, top-k, per sample), header identity checks (backend
included), resume, ranks writing their shares; LFME's layer on it; and the replay faults of issue 9
(repeats spread over the views, pad-crop views replayed with the pad-crop op, 'all' pad-crop views)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import simplejpeg
import torch

from lfme_fast.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FixedViews,
    all_pad_crop_views,
    draw_pad_crop,
    image_sizes,
    make_views,
    occurrences,
    pad_crop_window,
)
from lfme_fast.checkpoint import save_model_file
from lfme_fast.loaders import BACKENDS, LoaderOptions, build_loader
from lfme_fast.loaders.base import plan_epoch, resolve_spec
from lfme_fast.models import build_model
from lfme_fast.offline import (
    ArraySpec,
    ArrayStore,
    ExpertSource,
    LFMEStore,
    OfflineStore,
    OfflineStoreError,
    build_views,
    eval_view_boxes,
    make_header,
    store_header,
    view_identity,
    write_offline,
    write_store,
)
from lfme_fast.sampling import ClassBalancedSampler
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


def views_loader(root: Path, table: FixedViews, k: int, batch_size: int = 256, **kw):
    return build_loader(LoaderOptions(root, "train", backend="torch", train=False, batch_size=batch_size,
                                      views=table, fixed_view=k, num_workers=0, **kw))


def build_store(root: Path, run_dir: Path, *, views: int | str = 2, kind: str = "center", topk=None, seed: int = 0,
                experts=None, backend: str = "torch", **kw):
    experts = experts or make_experts(run_dir)
    h, w = image_sizes(root, "train")
    table = build_views(h, w, views, seed, kind, "pad_crop")
    header = store_header(run_dir=run_dir, manifest=load_manifest(root), split="train", resolution=28,
                          mode="pad_crop", num_views=views, view_seed=seed, view_kind=kind, experts=experts,
                          topk=topk, backend=backend)
    store = write_offline(run_dir, header, experts, table, lambda tab, k: views_loader(root, tab, k), 10,
                          show_progress=False, log=lambda m: None,
                          eval_views=eval_view_boxes(h, w, "pad_crop") if kind == "random" else None, **kw)
    return store, header, experts


@pytest.fixture(scope="module")
def dense_store(fmnist_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_dense")
    store, header, experts = build_store(fmnist_dir, run_dir, views=2)
    return run_dir, store, header, experts


def reference_pixels(root: Path, i: int, y: int, x: int, flip: bool) -> np.ndarray:
    """Normalised CHW float pixels of sample ``i``'s pad-crop window at ``(y, x)``, mirrored when ``flip``."""
    img = simplejpeg.decode_jpeg(ShardReader(root, "train").get_bytes(i).tobytes(), colorspace="RGB")
    win = pad_crop_window(img, y, x)
    if flip:
        win = win[:, ::-1]
    return ((win - np.array(IMAGENET_MEAN) * 255) / (np.array(IMAGENET_STD) * 255)).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------------


def test_views_view0_is_eval_view():
    h = np.array([28, 28]); w = np.array([28, 28])
    v = build_views(h, w, 3, 5, "center", "pad_crop")
    assert v.boxes.shape == (2, 3, 4) and v.kind == "pad_crop"
    assert (v.boxes[:, 0] == [0, 0, 28, 28]).all() and not v.flips[:, 0].any()  # small images: identity window
    big = build_views(np.array([375]), np.array([500]), 2, 5, "center", "imagenet")
    assert big.kind == "rrc" and big.boxes[0, 0].tolist() == [23, 86, 328, 328]  # centre crop of 0.875 x shorter side
    rnd = build_views(h, w, 2, 5, "random", "pad_crop")
    assert rnd.kind == "pad_crop" and not ((rnd.boxes[:, 0, :2] == 0).all(axis=1) & ~rnd.flips[:, 0]).all()
    again = build_views(h, w, 3, 5, "center", "pad_crop")
    assert (again.boxes == v.boxes).all() and (again.flips == v.flips).all()
    ev = eval_view_boxes(h, w, "pad_crop")
    assert ev.kind == "pad_crop" and (ev.boxes[:, 0] == [0, 0, 28, 28]).all()
    with pytest.raises(ValueError, match="'all'.*'imagenet'"):
        build_views(np.array([375]), np.array([500]), "all", 0, "center", "imagenet")
    with pytest.raises(ValueError, match="1..162"):
        build_views(h, w, 200, 0, "center", "pad_crop")


def test_pad_crop_views_are_pad_crop_windows():
    """Issue 9 fault b: a pad-crop dataset's stored views are pad-crop views (corner in [-4, 4]^2, flip),
    the augmentation its experts trained with, not RandomResizedCrop boxes; the kind is in the header."""
    h = np.full(300, 28); w = np.full(300, 28)
    v = build_views(h, w, 8, 3, "center", "pad_crop")
    corners = v.boxes[:, :, :2]
    assert corners.min() == -4 and corners.max() == 4  # negative corners: the zero padding
    assert (v.boxes[:, :, 2] == 28).all() and (v.boxes[:, :, 3] == 28).all()  # stored-size windows, no resize
    assert v.kind == "pad_crop"
    assert v.flips[:, 1:].mean() == pytest.approx(0.5, abs=0.05)
    codes = (corners[..., 0] + 4) * 9 + (corners[..., 1] + 4) + 81 * v.flips
    assert all(len(set(row)) == 8 for row in codes.tolist())  # K distinct views per image
    ident = view_identity("pad_crop", 8, 3, "center")
    assert ident == {"kind": "pad_crop", "selection": "center", "num_views": 8, "seed": 3, "first_is_eval": True,
                     "pad": 4}
    assert view_identity("imagenet", 2, 0)["kind"] == "rrc"
    with pytest.raises(ValueError, match="y, x >= 0"):
        FixedViews(v.boxes, v.flips, 3)  # rrc tables keep refusing negative corners
    v.check_fits(h.astype(np.int64), w.astype(np.int64))
    bad = FixedViews(v.boxes.copy(), v.flips, 3, "pad_crop")
    bad.boxes[5, 2, 2] = 20
    with pytest.raises(ValueError, match="view 2 of sample 5"):
        bad.check_fits(h.astype(np.int64), w.astype(np.int64))


def test_all_pad_crop_views_follow_the_pad_crop_distribution(tmp_path):
    """Issue 9 fault b, ``views: all``: every one of the 162 pad-crop views is stored, view 0 the
    identity, and the per-(epoch, index, occurrence) choice is uniform over 81 corners x 2 flips, the
    distribution planned pad-crop (draw_pad_crop) draws from."""
    n = 40
    h = np.full(n, 32); w = np.full(n, 32)
    table = build_views(h, w, "all", 11, "center", "pad_crop")
    assert table.kind == "pad_crop" and table.num_views == 162
    assert table.boxes[:, 0].tolist() == [[0, 0, 32, 32]] * n and not table.flips[:, 0].any()
    cells = {(int(b[0]), int(b[1]), bool(f)) for b, f in zip(table.boxes[7], table.flips[7])}
    assert cells == {(y, x, f) for y in range(-4, 5) for x in range(-4, 5) for f in (False, True)}
    np.testing.assert_array_equal(table.boxes, all_pad_crop_views(h, w, 11).boxes)
    # chosen views over an oversampled epoch (every index 500 times, shuffled) vs planned pad-crop
    rng = np.random.default_rng(0)
    idx = rng.permutation(np.repeat(np.arange(n), 500))
    v = table.choose(3, idx)
    chosen = (table.boxes[idx, v, 0] + 4) * 9 + (table.boxes[idx, v, 1] + 4) + 81 * table.flips[idx, v]
    boxes, flips = draw_pad_crop(h, w, idx, 11, 3)
    planned = (boxes[:, 0] + 4) * 9 + (boxes[:, 1] + 4) + 81 * flips
    expected = idx.size / 162
    for codes in (chosen, planned):
        counts = np.bincount(codes, minlength=162)
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert counts.size == 162 and chi2 < 161 + 6 * np.sqrt(2 * 161), chi2  # uniform, df = 161
    # each index's 500 repeats cover all 162 views 3 or 4 times (stratified, not just uniform)
    per_index = np.bincount(idx * 162 + v, minlength=n * 162).reshape(n, 162)
    assert per_index.min() == 3 and per_index.max() == 4
    table.save(tmp_path / "v.npz")
    back = FixedViews.load(tmp_path / "v.npz")
    assert back.kind == "pad_crop" and back.seed == 11 and np.array_equal(back.boxes, table.boxes)
    print(f"views.npz for 'all' (162 views): {(tmp_path / 'v.npz').stat().st_size / n:.1f} bytes/image compressed")


def test_choose_spreads_repeats_over_views():
    """Issue 9 fault a: the repeats of an index within an epoch are spread over the K views
    (deterministically for (seed, epoch, indices)), not all shown the same view."""
    h = np.full(10, 64); w = np.full(10, 64)
    views = make_views(h, w, k=4, seed=7)
    idx = np.array([3, 1, 3, 3, 2, 3, 3, 1, 3, 3, 3])  # index 3 eight times, 1 twice
    c = views.choose(5, idx)
    rep3 = c[idx == 3]
    assert len(set(rep3[:4].tolist())) == 4  # the first K repeats: K distinct views
    assert np.bincount(rep3, minlength=4).tolist() == [2, 2, 2, 2]  # 8 repeats: each view twice
    assert c[1] != c[7]  # index 1's two occurrences differ too
    np.testing.assert_array_equal(c, views.choose(5, idx))  # deterministic
    assert not np.array_equal(c, views.choose(6, idx))  # re-drawn each epoch
    # a slice of the epoch gives the same views when it is told the occurrences
    np.testing.assert_array_equal(views.choose(5, idx[6:], occurrences(idx)[6:]), c[6:])
    one = make_views(h, w, k=1, seed=7)
    assert (one.choose(5, idx) == 0).all()
    # first occurrences are still uniform over the views
    big = np.arange(40_000)
    counts = np.bincount(views.choose(1, big), minlength=4)
    assert counts.min() > 9_500 and counts.max() < 10_500


def test_plan_spreads_tail_repeats_over_views(fmnist_dir):
    """Fault a through the loader: with class-balanced sampling a tail image comes up many times per
    epoch, and its repeats in the epoch plan show different stored views."""
    labels = ShardReader(fmnist_dir, "train").labels
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 4, 0, "center", "pad_crop")
    sampler = ClassBalancedSampler(labels, samples_per_class=4, seed=1)
    spec = resolve_spec(LoaderOptions(fmnist_dir, "train", backend="torch", train=True, batch_size=32,
                                      sampler=sampler, total_epochs=2, views=table, num_workers=0))
    plan = plan_epoch(spec, 1)
    counts = np.bincount(plan.indices)
    tail = int(np.argmax(counts))
    assert counts[tail] >= 4
    seen = plan.views[plan.indices == tail]
    assert len(set(seen[:4].tolist())) == 4
    np.testing.assert_array_equal(plan.views, table.choose(1, plan.indices))
    assert spec.geometry == "pad_crop"  # pad-crop views replay with the pad-crop pixel op
    # and the plan's geometry is the table's windows
    np.testing.assert_array_equal(plan.boxes, table.boxes[plan.indices, plan.views])
    np.testing.assert_array_equal(plan.flips, table.flips[plan.indices, plan.views])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_crop_views_replay_with_the_pad_crop_op(backend, fmnist_dir):
    """Fault b in the loaders: every back end shows a pad-crop view as the zero-padded stored-size
    window at its corner (mirrored when flipped), the same pixel op as planned pad-crop."""
    if backend == "ffcv":
        pytest.importorskip("ffcv")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 3, 2, "center", "pad_crop")
    # view 2: a sharp hand-made window (corner (-3, 4), flipped) so any crop-and-resize would show
    table.boxes[:, 2, :2] = (-3, 4)
    table.flips[:, 2] = True
    for k in (1, 2):
        loader = build_loader(LoaderOptions(fmnist_dir, "train", backend=backend, train=False, batch_size=64,
                                            views=table, fixed_view=k, num_workers=1))
        loader.set_epoch(0)
        b = next(iter(loader))
        assert b.images.shape == (64, 3, 28, 28) and (b.views == k).all()
        for j in (0, 17, 63):
            i = int(b.indices[j])
            y, x = table.boxes[i, k, :2]
            ref = reference_pixels(fmnist_dir, i, int(y), int(x), bool(table.flips[i, k]))
            assert np.abs(b.images[j].float().numpy() - ref).max() < 0.05, (backend, k, i)


# ---------------------------------------------------------------------------------------------------
# the LFME store
# ---------------------------------------------------------------------------------------------------


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
    assert saved["dataset"]["name"] == "fmnist-lt" and saved["views"]["num_views"] == 2
    assert saved["views"]["kind"] == "pad_crop" and saved["backend"] == "torch"
    assert saved["augmentation"] == {"resolution": 28, "mode": "pad_crop"}
    assert saved["checkpoints"][0]["path"] == "experts/many/model.pt" and len(saved["checkpoints"][0]["sha256"]) == 64
    assert saved["recipe"]["fields"]["subsets"][1] == {"name": "medium", "classes": [4, 5, 6]}
    assert saved["arrays"]["expert0.logits"] == {"width": 4, "dtype": "float16", "topk": None, "per_view": True}
    assert saved["storage"]["logit_bytes_per_image"] == pytest.approx(2 * 2 * 10)  # 2 views, 10 fp16 logits
    assert saved["storage"]["data_bytes_per_image"] == pytest.approx(2 * 2 * 10 + 4)  # + the fp32 confidence
    assert store.bytes_per_image == pytest.approx(40.0)
    assert isinstance(store, LFMEStore) and OfflineStore is LFMEStore

    # stored = live forward on the same view, to float16 rounding
    idx = np.array([0, 5, n - 1])
    loader = views_loader(fmnist_dir, store.views, 1, batch_size=n)
    loader.set_epoch(0)
    batch = next(iter(loader))
    with torch.no_grad():
        live = experts[2].model(batch.images[idx])
    stored = store.teacher_logits(2, idx, np.ones(3, dtype=np.int64))
    assert stored.dtype == torch.float16
    torch.testing.assert_close(stored.float(), live, atol=2e-2, rtol=2e-3)

    # SpIS confidence: the subset expert's probability of the true class, eval view (view 0)
    labels = ShardReader(fmnist_dir, "train").labels
    conf = store.confidence
    assert conf.shape == (n,) and conf.dtype == np.float32 and np.isfinite(conf).all()
    assert ((conf > 0) & (conf <= 1)).all()
    loader0 = views_loader(fmnist_dir, store.views, 0, batch_size=n)
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
        (lambda h: h["views"].update(num_views=4), "views.num_views"),
        (lambda h: h["views"].update(seed=1), "views.seed"),
        (lambda h: h["views"].update(kind="rrc"), "views.kind"),
        (lambda h: h["augmentation"].update(resolution=32), "augmentation.resolution"),
        (lambda h: h["recipe"]["fields"]["subsets"][1]["classes"].append(9), "recipe.fields.subsets[1].classes"),
        (lambda h: h["checkpoints"][0].update(sha256="0" * 64), "checkpoints[0].sha256"),
        (lambda h: h["arrays"]["expert0.logits"].update(topk=2), "arrays.expert0.logits.topk"),
    ]:
        bad = json.loads(json.dumps(header))
        mutate(bad)
        with pytest.raises(OfflineStoreError, match=field.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
            OfflineStore.open(run_dir, bad)
    with pytest.raises(OfflineStoreError, match="no offline store"):
        OfflineStore.open(tmp_path)


def test_store_records_and_checks_the_backend(fmnist_dir, dense_store):
    """Issue 9 fault c: the header records the loader back end (their JPEG decoders and resize filters
    differ) and a run on another back end is refused, with the field named."""
    run_dir, store, header, experts = dense_store
    assert json.loads((run_dir / "offline" / "header.json").read_text())["backend"] == "torch"
    other = store_header(run_dir=run_dir, manifest=load_manifest(fmnist_dir), split="train", resolution=28,
                         mode="pad_crop", num_views=2, view_seed=0, view_kind="center", experts=experts, topk=None,
                         backend="ffcv")
    assert other["backend"] == "ffcv"
    with pytest.raises(OfflineStoreError, match=r"field 'backend' differs \(store: \"torch\", run: \"ffcv\"\)"):
        OfflineStore.open(run_dir, other)
    with pytest.raises(ValueError, match="backend must be a registered loader back end"):
        store_header(run_dir=run_dir, manifest=load_manifest(fmnist_dir), split="train", resolution=28,
                     mode="pad_crop", num_views=2, view_seed=0, view_kind="center", experts=experts, topk=None,
                     backend="opencv")


def test_load_modes_agree(dense_store):
    run_dir, store, header, _ = dense_store
    idx = torch.tensor([3, 1, 4, 1, 5])
    views = torch.tensor([0, 1, 1, 0, 1])
    ref = store.teachers(idx, views)
    for load in ("ram", "cpu"):
        other = OfflineStore.open(run_dir, header, load=load)
        for a, b in zip(ref, other.teachers(idx, views)):
            assert torch.equal(a, b)
        np.testing.assert_array_equal(other.confidence, store.confidence)


def test_topk_round_trip(fmnist_dir, dense_store, tmp_path):
    run_dir, dense, _, experts = dense_store
    # the many expert has 4 classes: top-2 stores 2 (value, index) pairs; the 3-class experts keep 2 as well
    store, header, _ = build_store(fmnist_dir, tmp_path, views=2, topk=2, experts=make_experts(tmp_path))
    d = tmp_path / "offline"
    vals = np.load(d / "expert0.logits.values.npy", mmap_mode="r")
    ind = np.load(d / "expert0.logits.indices.npy", mmap_mode="r")
    assert vals.dtype == np.float16 and ind.dtype == np.int16 and vals.shape[1:] == (2, 2)
    assert store.bytes_per_image == pytest.approx(2 * 3 * 2 * (2 + 2))
    assert store.topk == 2
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
                          mode="pad_crop", num_views=2, view_seed=0, view_kind="center", experts=experts, topk=None,
                          backend="torch")

    def make_loader(tab, k):
        calls["n"] += 1
        if k == 1 and calls["n"] == 2:
            raise Boom("killed during view 1")
        return views_loader(fmnist_dir, tab, k, batch_size=512)

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
    np.testing.assert_array_equal(store.confidence, ref.confidence)


def test_random_views_confidence_from_eval_view(fmnist_dir, dense_store, tmp_path):
    _, dense, _, _ = dense_store
    store, header, _ = build_store(fmnist_dir, tmp_path, views=1, kind="random", experts=make_experts(tmp_path))
    assert header["views"]["selection"] == "random" and not header["views"]["first_is_eval"]
    # the confidences come from the (unstored) eval view: equal to the centre-view store's
    np.testing.assert_allclose(store.confidence, dense.confidence, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the generic store
# ---------------------------------------------------------------------------------------------------

FEATURE_DIM = 16


def feature_producer(seed: int = 0):
    """A CBD-shaped producer: L2-normalised 'penultimate features' of each image (a fixed random
    projection of its pixels) as array ``teacher0.features``."""
    proj = torch.randn(3 * 28 * 28, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))

    def produce(batch):
        return {"teacher0.features": torch.nn.functional.normalize(batch.images.flatten(1) @ proj, dim=1)}

    return produce, proj


def generic_header(root: Path, run_dir: Path, num_views: int | str = 2, arrays=None, backend="torch"):
    ckpt = run_dir / "teacher.bin"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"a teacher")
    return make_header(run_dir=run_dir, manifest=load_manifest(root), split="train",
                       views=view_identity("pad_crop", num_views, 0, "center"),
                       augmentation={"resolution": 28, "mode": "pad_crop"}, backend=backend,
                       checkpoints=[("teacher0", ckpt)], recipe="cbd", fields={"teachers": 1},
                       arrays=arrays or [ArraySpec("teacher0.features", FEATURE_DIM)])


def test_generic_producer_fills_a_feature_array(fmnist_dir, tmp_path):
    """Any producer (batch -> named arrays) fills a store: here CBD-like L2-normalised features, float16
    [N, K, D], read back by (index, view) equal to the live features on that view."""
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 2, 0, "center", "pad_crop")
    header = generic_header(fmnist_dir, tmp_path)
    produce, proj = feature_producer()
    store = write_store(tmp_path, header, table, produce, lambda tab, k: views_loader(fmnist_dir, tab, k),
                        show_progress=False, log=lambda m: None)
    assert type(store) is ArrayStore and store.names == ["teacher0.features"]
    n = store.num_samples
    arr = np.load(tmp_path / "offline" / "teacher0.features.npy", mmap_mode="r")
    assert arr.dtype == np.float16 and arr.shape == (n, 2, FEATURE_DIM)
    assert store.data_bytes_per_image == 2 * FEATURE_DIM * 2
    loader = views_loader(fmnist_dir, store.views, 1, batch_size=n)
    loader.set_epoch(0)
    batch = next(iter(loader))
    idx = torch.tensor([0, 9, n - 1])
    got = store.gather("teacher0.features", idx, torch.ones(3, dtype=torch.long))
    live = torch.nn.functional.normalize(batch.images[idx].flatten(1) @ proj, dim=1)
    torch.testing.assert_close(got.float(), live, atol=2e-3, rtol=2e-3)
    assert torch.allclose(got.float().norm(dim=1), torch.ones(3), atol=2e-3)
    with pytest.raises(OfflineStoreError, match="no array 'expert0.logits'"):
        store.gather("expert0.logits", idx)
    with pytest.raises(OfflineStoreError, match="'recipe.name' is 'cbd'"):
        LFMEStore.open(tmp_path)
    with pytest.raises(OfflineStoreError, match=r"field 'recipe\.fields\.teachers' differs"):
        ArrayStore.open(tmp_path, {**header, "recipe": {"name": "cbd", "fields": {"teachers": 2}}})


def fake_loader(n: int, batch_size: int = 100, skip=()):
    """Batches that carry only indices (and labels): enough for producers that do not look at pixels."""
    keep = np.array([i for i in range(n) if i not in set(skip)], dtype=np.int64)
    return [SimpleNamespace(indices=torch.from_numpy(keep[lo:lo + batch_size]),
                            labels=torch.zeros(len(keep[lo:lo + batch_size]), dtype=torch.long))
            for lo in range(0, len(keep), batch_size)]


def index_producer(batch):
    """Deterministic rows from the indices: row i = i * 0.01 + (0..D-1) / D (float16-exact enough)."""
    i = batch.indices.double()[:, None]
    return {"teacher0.features": (i * 0.01 + torch.arange(FEATURE_DIM) / FEATURE_DIM).float(),
            "score": i[:, 0].float()}


def features_only(batch):
    return {"teacher0.features": index_producer(batch)["teacher0.features"]}


def test_topk_per_sample_arrays_and_all_views(fmnist_dir, tmp_path):
    """A top-k array and a per-sample (eval view) array in one store over all 162 pad-crop views; the
    storage figures are the arrays' bytes; rows come back by (index, view)."""
    n = len(ShardReader(fmnist_dir, "train"))
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, "all", 0, "center", "pad_crop")
    arrays = [ArraySpec("teacher0.features", FEATURE_DIM, topk=4), ArraySpec("score", 1, "float32", per_view=False)]
    header = generic_header(fmnist_dir, tmp_path, "all", arrays)
    passes = []

    def make_loader(tab, k):
        passes.append(k)
        return fake_loader(n, 256)

    store = write_store(tmp_path, header, table, index_producer, make_loader, show_progress=False, log=lambda m: None)
    assert passes == list(range(162))  # view 0 is the eval view: no extra pass for 'score'
    st = store.header["storage"]
    assert st["array_bytes_per_image"] == {"teacher0.features": 162 * 4 * (2 + 2), "score": 4}
    assert st["data_bytes_per_image"] == 162 * 4 * 4 + 4
    d = tmp_path / "offline"
    assert sorted(p.name for p in d.iterdir()) == ["header.json", "score.npy", "teacher0.features.indices.npy",
                                                   "teacher0.features.values.npy", "views.npz"]
    idx = torch.tensor([2, 500])
    got = store.gather("teacher0.features", idx, torch.tensor([161, 3]))
    assert got.shape == (2, FEATURE_DIM) and got.dtype == torch.float32
    full = index_producer(SimpleNamespace(indices=idx))["teacher0.features"]
    top_v, top_p = full.topk(4, dim=1)
    torch.testing.assert_close(got.gather(1, top_p), top_v.half().float())
    np.testing.assert_array_equal(store.per_sample("score")[:, 0], np.arange(n, dtype=np.float32))
    print(f"'all' store: {st['data_bytes_per_image']} array bytes/image; "
          f"{(d / 'views.npz').stat().st_size / n:.1f} bytes/image of compressed views.npz")


def test_producer_errors_name_the_array(fmnist_dir, tmp_path):
    n = len(ShardReader(fmnist_dir, "train"))
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 2, 0, "center", "pad_crop")
    header = generic_header(fmnist_dir, tmp_path)
    for producer, match in [
        (lambda b: {"teacher0.features": torch.zeros(len(b.indices), 3)}, r"'teacher0.features' of shape \(256, 3\)"),
        (lambda b: {}, "no array 'teacher0.features'"),
        (lambda b: {**features_only(b), "logits": torch.zeros(1)}, r"\['logits'\] that the header does not"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_store(tmp_path, header, table, producer, lambda tab, k: fake_loader(n, 256), show_progress=False,
                        log=lambda m: None)
    with pytest.raises(ValueError, match="'views.kind'"):
        write_store(tmp_path, header, make_views(h, w, 2, 0), features_only, lambda tab, k: fake_loader(n),
                    show_progress=False, log=lambda m: None)
    # a loader that misses rows: the store is not published, and the error names a missing sample
    with pytest.raises(RuntimeError, match="without view 0, first sample 7"):
        write_store(tmp_path, header, table, features_only, lambda tab, k: fake_loader(n, skip=(7, 9)),
                    show_progress=False, log=lambda m: None)
    assert not (tmp_path / "offline").exists()


class ThreadAccelerator:
    """The slice of Accelerate's API the writer uses, for ranks run as threads of one process."""

    device = torch.device("cpu")

    def __init__(self, rank: int, world: int, barrier: threading.Barrier, slots: dict):
        self.process_index, self.num_processes, self._barrier = rank, world, barrier
        self.is_main_process = rank == 0
        self._slots = slots  # shared by the ranks: each one's term of a reduction

    def wait_for_everyone(self):
        self._barrier.wait(timeout=120)

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self._slots[self.process_index] = tensor.clone()
        self._barrier.wait(timeout=120)
        total = sum(self._slots[r] for r in range(self.num_processes))
        self._barrier.wait(timeout=120)  # every rank has read the terms before the next reduction
        return total

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("rank1_writes", [True, False])
def test_each_rank_writes_its_share(fmnist_dir, tmp_path, rank1_writes):
    """Two ranks, each with its loader's share of the rows, write one store equal to a one-process one.
    When rank 1's loader yields nothing, both ranks raise the main process's coverage error (rank 1 does
    not wait for a publication that never comes) and no store is published."""
    h, w = image_sizes(fmnist_dir, "train")
    table = build_views(h, w, 2, 0, "center", "pad_crop")
    produce, _ = feature_producer()
    single = write_store(tmp_path / "single", generic_header(fmnist_dir, tmp_path / "single"), table, produce,
                         lambda tab, k: views_loader(fmnist_dir, tab, k), show_progress=False, log=lambda m: None)
    header = generic_header(fmnist_dir, tmp_path / "dist")
    barrier = threading.Barrier(2)
    slots: dict = {}
    # one loader batch at a time: numba's parallel kernels in the loaders must not run in two threads at once
    lock = threading.Lock()
    errors, shares = [], {0: 0, 1: 0}

    def rank(r):
        acc = ThreadAccelerator(r, 2, barrier, slots)

        def make_loader(tab, k):
            if r == 1 and not rank1_writes:
                return
            with lock:
                loader = views_loader(fmnist_dir, tab, k, num_replicas=2, rank=r)
                loader.set_epoch(0)
                it = iter(loader)
            while True:
                with lock:
                    b = next(it, None)
                if b is None:
                    return
                shares[r] += len(b)
                yield b

        try:
            write_store(tmp_path / "dist", header, table, produce, make_loader, accelerator=acc, show_progress=False,
                        log=lambda m: None)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    if any(t.is_alive() for t in threads):  # a rank left waiting for the other: break the barrier
        barrier.abort()
        for t in threads:
            t.join()
    if not rank1_writes:
        assert len(errors) == 2 and all(isinstance(e, RuntimeError) and ("without view" in str(e) or
                                                                          "unwritten" in str(e)) for e in errors), errors
        assert not (tmp_path / "dist" / "offline").exists()
        return
    assert not errors, errors
    n = single.num_samples
    assert shares[0] + shares[1] == 2 * n and 0 < shares[1] < 2 * n  # both ranks wrote rows
    for name in ("teacher0.features.npy", "views.npz"):
        assert (tmp_path / "dist" / "offline" / name).read_bytes() == (tmp_path / "single" / "offline" / name).read_bytes()
