"""The two builders every recipe goes through: ``loaders.build_loader(LoaderOptions)`` (with its back-end
registry) and ``sampling.build_sampler(kind, ...)`` (with its sampler registry), and the
``Sampler`` extension point as the loaders see it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfme_fast import loaders
from lfme_fast.loaders import (
    BACKENDS, BatchLoader, LoaderOptions, LoaderSpec, build_loader, register_backend, resolve_spec)
from lfme_fast.sampling import (
    SAMPLERS,
    ClassBalancedSampler,
    InstanceSampler,
    ProgressiveSampler,
    Sampler,
    SquareRootSampler,
    SubsetSampler,
    build_sampler,
)
from lfme_fast.shards import ShardReader

LABELS = np.repeat(np.arange(6), [30, 20, 10, 6, 3, 1])


class ReversedSampler(Sampler):
    """A user's own sampler: the dataset backwards, then every other index again (so a loader must
    take its order, repeats included, and not assume a permutation). No ``__len__``: the default
    (length of epoch 0) is used."""

    def __init__(self, n: int):
        self.n = n

    def indices(self, epoch: int) -> np.ndarray:
        back = np.arange(self.n - 1, -1, -1, dtype=np.int64)
        return np.concatenate([back, back[::2]])


# ---- Sampler contract ---------------------------------------------------------------------------


def test_sampler_default_len_and_weights():
    s = ReversedSampler(7)
    assert len(s) == 7 + 4
    idx, w = s.indices_and_weights(0, 3)
    np.testing.assert_array_equal(idx, s.indices(0))
    assert w.dtype == np.float32 and (w == 1).all()


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_own_sampler_drives_the_loader(backend, synthetic_dir):
    """A Sampler subclass defined here, through the loader builder: batches follow its order exactly."""
    if backend == "ffcv":
        pytest.importorskip("ffcv")
    labels = ShardReader(synthetic_dir, "train").labels
    sampler = ReversedSampler(len(labels))
    expect = sampler.indices(0)
    opts = LoaderOptions(synthetic_dir, "train", backend=backend, train=True, batch_size=5, sampler=sampler,
                         total_epochs=2, resolution=32, num_workers=1, drop_last=False)
    loader = build_loader(opts)
    assert len(loader) == -(-len(expect) // 5)
    loader.set_epoch(1)
    batches = list(loader)
    got = torch.cat([b.indices for b in batches]).numpy()
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), labels[expect])
    assert all(b.weights is not None and (b.weights == 1).all() for b in batches)
    assert batches[0].images.shape == (5, 3, 32, 32)


def test_loader_rejects_a_non_sampler(synthetic_dir):
    class DuckOrder:  # has indices() and __len__, but is not a Sampler
        def indices(self, epoch):
            return np.arange(4)

        def __len__(self):
            return 4

    with pytest.raises(TypeError, match="sampler must be a lfme_fast.sampling.Sampler, got DuckOrder"):
        build_loader(LoaderOptions(synthetic_dir, "train", train=True, batch_size=2, sampler=DuckOrder()))


# ---- build_sampler --------------------------------------------------------------------------------


def test_sampler_registry_names():
    assert SAMPLERS == {"instance": InstanceSampler, "class_balanced": ClassBalancedSampler,
                        "sqrt": SquareRootSampler, "progressive": ProgressiveSampler, "subset": SubsetSampler}


@pytest.mark.parametrize("kind, direct", [
    ("instance", lambda kw: InstanceSampler(LABELS, **kw)),
    ("class_balanced", lambda kw: ClassBalancedSampler(LABELS, samples_per_class=3, **kw)),
    ("sqrt", lambda kw: SquareRootSampler(LABELS, **kw)),
    ("progressive", lambda kw: ProgressiveSampler(LABELS, 5, **kw)),
    ("subset", lambda kw: SubsetSampler(LABELS, [1, 4], **kw)),
])
def test_build_sampler_equals_direct_construction(kind, direct):
    """The builder only chooses and constructs: order and weights equal the class built by hand."""
    v1 = np.linspace(0.2, 1.0, LABELS.size)
    kw = dict(seed=7, num_replicas=2, rank=1, initial_weights=v1, schedule="convex")
    built = build_sampler(kind, LABELS, samples_per_class=3, total_epochs=5,
                          classes=[1, 4] if kind == "subset" else None, **kw)
    ref = direct(kw)
    assert type(built) is type(ref) and len(built) == len(ref)
    for epoch in (0, 3):
        a, b = built.indices_and_weights(epoch, 5), ref.indices_and_weights(epoch, 5)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_build_sampler_passes_num_samples_and_schedule_default():
    s = build_sampler("class_balanced", LABELS, seed=0, num_samples=33)
    assert len(s) == 33 and s.schedule == "linear" and s.samples_per_class == 4


def test_build_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler kind 'oltr': choose one of instance, class_balanced"):
        build_sampler("oltr", LABELS, seed=0)
    with pytest.raises(ValueError, match=r"sampler 'progressive' \(ProgressiveSampler\) needs total_epochs="):
        build_sampler("progressive", LABELS, seed=0)
    with pytest.raises(ValueError, match=r"sampler 'subset' \(SubsetSampler\) needs classes="):
        build_sampler("subset", LABELS, seed=0)
    with pytest.raises(ValueError, match=r"sampler 'sqrt' \(SquareRootSampler\) does not take classes="):
        build_sampler("sqrt", LABELS, seed=0, classes=[1])
    # run-wide settings are ignored by kinds that do not use them
    assert isinstance(build_sampler("sqrt", LABELS, seed=0, total_epochs=9, samples_per_class=2), SquareRootSampler)


def test_build_sampler_takes_a_registered_user_class(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "reversed", lambda labels: ReversedSampler(len(labels)))
    s = build_sampler("reversed", LABELS, seed=0, total_epochs=3)  # run-wide arguments it lacks: ignored
    assert s.indices(0)[0] == LABELS.size - 1
    with pytest.raises(ValueError, match="does not take num_replicas="):
        build_sampler("reversed", LABELS, seed=0, num_replicas=2, rank=1)


# ---- LoaderOptions and the back-end registry ------------------------------------------------------


def test_loader_options_validate_and_replace():
    o = LoaderOptions("/data", "train", train=True, batch_size=8, dtype="bfloat16")
    assert o.backend == "torch" and o.dtype is torch.bfloat16 and o.sampler is None and o.augment == "auto"
    v = o.replace(split="val", train=False)
    assert (v.split, v.train, v.batch_size, o.split) == ("val", False, 8, "train")
    with pytest.raises(TypeError, match="LoaderOptions has no field batchsize"):
        o.replace(batchsize=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        o.replace(batch_size=0)
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        LoaderOptions("/data", "train", train=True, batch_size=8, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        LoaderOptions("/data", "train", train=True, batch_size=8, dtype=torch.int8)
    with pytest.raises(TypeError):
        LoaderOptions("/data", "train", batch_size=8)  # train is required
    with pytest.raises(AttributeError):
        o.batch_size = 4  # frozen


def test_backend_registry_is_lazy_and_extensible(synthetic_dir):
    assert {"ffcv", "dali", "torch"} <= set(BACKENDS)

    class CountingLoader(BatchLoader):
        def __init__(self, spec: LoaderSpec, tag: str):
            self.spec, self.tag = spec, tag

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            return iter(())

        def __len__(self):
            return 0

    try:
        register_backend("counting", CountingLoader)
        assert "counting" in BACKENDS  # the live view sees it
        ld = build_loader(LoaderOptions(synthetic_dir, "val", backend="counting", train=False, batch_size=3,
                                        resolution=16), tag="x")
        assert isinstance(ld, CountingLoader) and ld.tag == "x" and ld.spec.batch_size == 3
        with pytest.raises(ValueError, match="already registered"):
            register_backend("counting", "somewhere:Else")
        register_backend("broken", "lfme_fast.loaders.no_such_module:Loader")
        with pytest.raises(ImportError, match="loader back end 'broken'"):
            build_loader(LoaderOptions(synthetic_dir, "val", backend="broken", train=False, batch_size=3))
    finally:
        loaders._REGISTRY.pop("counting", None)
        loaders._REGISTRY.pop("broken", None)
    with pytest.raises(ValueError, match="target must read 'package.module:ClassName'"):
        register_backend("bad", "no_colon")


def test_base_imports_no_backend():
    """loaders.base is the contract only: importing it loads no back end (no import circle)."""
    import subprocess
    import sys

    code = ("import sys, lfme_fast.loaders.base; "
            "print(sorted(m for m in sys.modules if m.startswith('lfme_fast.loaders.') and m.endswith('_backend')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_builders_take_only_the_options_object(synthetic_dir):
    with pytest.raises(TypeError, match="build_loader\\(\\) takes a LoaderOptions, got PosixPath"):
        build_loader(synthetic_dir, backend="torch", train=False, batch_size=4)
    with pytest.raises(TypeError, match="resolve_spec\\(\\) takes a LoaderOptions, got str"):
        resolve_spec("somewhere")
