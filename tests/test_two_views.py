"""Two augmented views per sample (``LoaderOptions(views_per_sample=2)``) in every back end.

What must hold: ``Batch.images`` is exactly what a one-view loader with the same settings shows;
``Batch.images2`` shows the same samples with their own planned crops (``draw_rrc``/``draw_pad_crop``
with ``view=1``), which differ from view 0's; labels, indices and weights stay per sample.
Pixel tolerance: as in test_loaders.py (back ends decode and resize with different libraries).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import simplejpeg
import torch

from lfme_fast.augment import IMAGENET_MEAN, IMAGENET_STD, draw_pad_crop, draw_rrc, image_sizes, make_views
from lfme_fast.loaders import LoaderOptions, build_loader, resolve_spec
from lfme_fast.loaders.base import plan_epoch
from lfme_fast.sampling import Sampler
from lfme_fast.shards import ShardReader

BACKENDS = ["torch", "ffcv", "dali"]
PIXEL_TOL = 0.06
_MEAN, _STD = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255


def _available(backend):
    if backend == "ffcv":
        pytest.importorskip("ffcv")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


class OrderSampler(Sampler):
    """A fixed order (repeats allowed); weight of sample i is i / 1000 + epoch."""

    def __init__(self, order):
        self.order = np.asarray(order, dtype=np.int64)

    def indices(self, epoch):
        return self.order

    def indices_and_weights(self, epoch, total_epochs):
        return self.order, (self.order / 1000.0 + epoch).astype(np.float32)


def _decode(root, split, i):
    return simplejpeg.decode_jpeg(ShardReader(root, split).get_bytes(int(i)).tobytes(), colorspace="RGB")


def _rrc_reference(root, i, box, flip, res):
    y, x, h, w = (int(v) for v in box)
    crop = _decode(root, "train", i)[y:y + h, x:x + w]
    crop = crop[:, ::-1] if flip else crop
    crop = cv2.resize(np.ascontiguousarray(crop), (res, res), interpolation=cv2.INTER_AREA if h > res else
                      cv2.INTER_LINEAR)
    return ((crop - _MEAN) / _STD).transpose(2, 0, 1).astype(np.float32)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    rows = [(b.indices.clone(), b.labels.clone(), b.weights.clone(), b.images.float().clone(),
             None if b.images2 is None else b.images2.float().clone()) for b in loader]
    return [torch.cat(col) if col[0] is not None else None for col in zip(*rows)], [len(r[0]) for r in rows]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_follow_their_plans(backend, synthetic_dir):
    _available(backend)
    labels = ShardReader(synthetic_dir, "train").labels
    h, w = image_sizes(synthetic_dir, "train")
    order = np.r_[np.arange(16), np.arange(5)]  # 0..4 twice; 21 samples: a short last batch of 5
    res = 48
    opts = LoaderOptions(synthetic_dir, "train", backend=backend, train=True, batch_size=8, resolution=res,
                         augment="imagenet", sampler=OrderSampler(order), total_epochs=2, num_workers=2,
                         seed=5, drop_last=False, views_per_sample=2)
    loader = build_loader(opts)
    assert len(loader) == 3
    (idx, lab, wts, view1, view2), sizes = _epoch(loader, 1)
    assert sizes == [8, 8, 5]
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_array_equal(lab.numpy(), labels[order])
    np.testing.assert_allclose(wts.numpy(), order / 1000.0 + 1, rtol=1e-6)
    assert view2.shape == view1.shape == (21, 3, res, res)

    # view 0 is exactly the one-view loader's output
    (idx1, _, _, one, none), _ = _epoch(build_loader(opts.replace(views_per_sample=1)), 1)
    assert none is None
    np.testing.assert_array_equal(idx1.numpy(), order)
    np.testing.assert_array_equal(view1.numpy(), one.numpy())

    # view 1 is the plan's second draw: its own crops, which differ from view 0's
    boxes0, flips0 = draw_rrc(h, w, order, seed=5, epoch=1)
    boxes1, flips1 = draw_rrc(h, w, order, seed=5, epoch=1, view=1)
    assert (boxes0 != boxes1).any(axis=1).all()
    for p in range(len(order)):
        ref = _rrc_reference(synthetic_dir, order[p], boxes1[p], flips1[p], res)
        diff = np.abs(view2[p].numpy() - ref).mean()
        assert diff < PIXEL_TOL, (backend, p, diff)
        assert np.abs(view2[p].numpy() - view1[p].numpy()).mean() > 2 * PIXEL_TOL, (backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_pad_crop(backend, fmnist_dir):
    _available(backend)
    n = len(ShardReader(fmnist_dir, "train"))
    order = np.arange(0, n, 7)[:16]
    opts = LoaderOptions(fmnist_dir, "train", backend=backend, train=True, batch_size=16, sampler=OrderSampler(order),
                         total_epochs=1, num_workers=1, seed=3, views_per_sample=2)
    b = next(iter(build_loader(opts)))
    assert b.images.shape == b.images2.shape == (16, 3, 28, 28)
    boxes, flips = draw_pad_crop(*image_sizes(fmnist_dir, "train"), order, seed=3, epoch=0, view=1)
    for j, i in enumerate(order):
        padded = np.pad(_decode(fmnist_dir, "train", i), ((4, 4), (4, 4), (0, 0)))
        y, x = int(boxes[j, 0]) + 4, int(boxes[j, 1]) + 4
        win = padded[y:y + 28, x:x + 28]
        win = win[:, ::-1] if flips[j] else win
        ref = ((win - _MEAN) / _STD).transpose(2, 0, 1)
        assert np.abs(b.images2[j].numpy() - ref).max() < 0.05, (backend, j)
    assert not torch.equal(b.images, b.images2)


def test_two_view_plan_is_batch_major(synthetic_dir):
    """The plan's pixel stream: each batch's samples in view 0, then the same samples in view 1."""
    order = np.arange(11)
    spec = resolve_spec(LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, resolution=32,
                                      sampler=OrderSampler(order), drop_last=False, views_per_sample=2))
    plan = plan_epoch(spec, 0)
    assert plan.num_views == 2 and spec.pixel_batch_size == 8
    np.testing.assert_array_equal(plan.indices, [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 8, 9, 10])
    np.testing.assert_array_equal(plan.weights[:8], np.tile((order[:4] / 1000.0).astype(np.float32), 2))
    assert [(s.start, s.stop) for s in plan.batch_slices(4)] == [(0, 8), (8, 16), (16, 22)]
    one = plan_epoch(resolve_spec(LoaderOptions(synthetic_dir, "train", train=True, batch_size=4, resolution=32,
                                                sampler=OrderSampler(order), drop_last=False)), 0)
    np.testing.assert_array_equal(plan.boxes[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18]], one.boxes)


def test_two_views_need_random_augmentation(synthetic_dir):
    base = dict(train=True, batch_size=4, resolution=32)
    with pytest.raises(ValueError, match="views_per_sample must be 1 or 2, got 3"):
        LoaderOptions(synthetic_dir, "train", views_per_sample=3, **base)
    with pytest.raises(ValueError, match="needs a training loader"):
        LoaderOptions(synthetic_dir, "val", views_per_sample=2, **{**base, "train": False})
    h, w = image_sizes(synthetic_dir, "train")
    with pytest.raises(ValueError, match="needs a training loader"):
        LoaderOptions(synthetic_dir, "train", views_per_sample=2, views=make_views(h, w, k=2, seed=0), **base)
    with pytest.raises(ValueError, match="augment='none' gives the deterministic 'resize' geometry"):
        build_loader(LoaderOptions(synthetic_dir, "train", views_per_sample=2, augment="none", **base))
