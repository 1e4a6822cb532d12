"""Epoch samplers (lfme_fast.sampling): balance, grouping, determinism, sharding, weights, errors."""

import pickle

import numpy as np
import pytest

from lfme_fast import sampling as S
from lfme_fast.sampling import (
    ClassBalancedSampler,
    InstanceSampler,
    ProgressiveSampler,
    PythonClassAwareSampler,
    Sampler,
    SquareRootSampler,
    SubsetSampler,
    build_sampler,
    class_csr,
    curriculum_progress,
)
from lfme_fast.schedules import SCHEDULE_KINDS, instance_weight, official_instance_weight

# A long-tailed label set: 40 classes, 300 down to 2 images (exponential profile), interleaved on
# "disk" so that nothing relies on labels being sorted.
COUNTS = np.round(300 * (2 / 300) ** (np.arange(40) / 39)).astype(np.int64)
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(40), COUNTS))
N = LABELS.size
V1 = np.random.default_rng(7).random(N)


def _all_samplers(**kw):
    return [
        ClassBalancedSampler(LABELS, **kw),
        InstanceSampler(LABELS, **kw),
        SquareRootSampler(LABELS, **kw),
        ProgressiveSampler(LABELS, total_epochs=10, **kw),
        SubsetSampler(LABELS, classes=[0, 5, 39], **kw),
    ]


# ---- CSR -----------------------------------------------------------------------------------------


def test_class_csr_groups_interleaved_labels():
    offsets, members = class_csr(LABELS)
    assert offsets[0] == 0 and offsets[-1] == N
    np.testing.assert_array_equal(np.diff(offsets), COUNTS)
    for c in (0, 17, 39):
        got = members[offsets[c]:offsets[c + 1]]
        np.testing.assert_array_equal(got, np.flatnonzero(LABELS == c))  # ascending within a class


def test_class_csr_many_classes_uses_general_sort():
    # more than 2**16 classes: the uint16 radix-sort shortcut does not apply
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(70_000), 2))
    offsets, members = class_csr(labels)
    np.testing.assert_array_equal(labels[members], np.repeat(np.arange(70_000), 2))
    assert np.all(np.diff(members.reshape(-1, 2), axis=1) > 0)  # ascending within a class
    idx = ClassBalancedSampler(labels, samples_per_class=2).indices(0)
    assert np.all(labels[idx[0::2]] == labels[idx[1::2]])


# ---- ClassBalancedSampler ------------------------------------------------------------------------


@pytest.mark.parametrize("spc", [1, 4, 7])
def test_class_balanced_epoch_is_balanced(spc):
    idx = ClassBalancedSampler(LABELS, samples_per_class=spc, seed=3).indices(0)
    assert idx.dtype == np.int64 and idx.size == N
    draws = np.bincount(LABELS[idx], minlength=40)
    # each class is visited k or k+1 times (and the last visit may be cut short): spread <= spc
    assert draws.max() - draws.min() <= spc
    assert draws.min() > 0


def test_class_balanced_groups_come_from_one_class():
    spc = 4
    idx = ClassBalancedSampler(LABELS, samples_per_class=spc, seed=1).indices(2)
    full = (idx.size // spc) * spc
    groups = LABELS[idx[:full]].reshape(-1, spc)
    assert np.all(groups == groups[:, :1])
    # the class cycle: consecutive runs of 40 groups are permutations of all classes
    first_cycle = groups[:40, 0]
    np.testing.assert_array_equal(np.sort(first_cycle), np.arange(40))


def test_class_balanced_within_class_cycles():
    # a class with m images drawn k times uses each image floor(k/m) or ceil(k/m) times
    idx = ClassBalancedSampler(LABELS, samples_per_class=4, seed=5).indices(0)
    for c in range(40):
        members = np.flatnonzero(LABELS == c)
        drawn = idx[LABELS[idx] == c]
        k, m = drawn.size, members.size
        uses = np.array([np.count_nonzero(drawn == i) for i in members])
        assert uses.min() >= k // m and uses.max() <= -(-k // m), c
        assert set(drawn.tolist()) <= set(members.tolist())


def test_class_balanced_small_class_wraps():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])  # classes 1 and 2 have one image each
    idx = ClassBalancedSampler(labels, samples_per_class=4, num_samples=24).indices(0)
    groups = labels[idx].reshape(-1, 4)
    assert np.all(groups == groups[:, :1])
    for row, g in zip(idx.reshape(-1, 4), groups[:, 0]):
        if g == 0:
            assert len(set(row.tolist())) == 4  # 4 distinct of 8 within one cycle
        else:
            assert np.all(row == np.flatnonzero(labels == g)[0])


def test_class_balanced_num_samples():
    s = ClassBalancedSampler(LABELS, num_samples=1001)
    assert len(s) == 1001 and s.indices(0).size == 1001


def test_first_draw_uniform_within_class():
    # the first image drawn from a 5-image class over many epochs is uniform (RNG/bounds check)
    labels = np.array([0] * 5 + [1] * 3)
    s = ClassBalancedSampler(labels, samples_per_class=1, num_samples=2)
    firsts = np.array([s.indices(e) for e in range(3000)])
    from_c0 = np.where(labels[firsts[:, 0]] == 0, firsts[:, 0], firsts[:, 1])
    counts = np.bincount(from_c0, minlength=5)
    # 600 expected each, sd ~22: 5 sd bound
    assert np.all(np.abs(counts - 600) < 110), counts


# ---- determinism and sharding ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", _all_samplers(seed=11), ids=lambda s: type(s).__name__)
def test_deterministic_in_seed_and_epoch(sampler):
    again = pickle.loads(pickle.dumps(sampler))  # a fresh copy (another process would do the same)
    a0, a1 = sampler.indices(0), sampler.indices(1)
    np.testing.assert_array_equal(again.indices(1), a1)  # order of calls does not matter
    np.testing.assert_array_equal(again.indices(0), a0)
    assert not np.array_equal(a0, a1)
    other_seed = pickle.loads(pickle.dumps(sampler))
    other_seed.seed = 12
    assert not np.array_equal(other_seed.indices(0), a0)


@pytest.mark.parametrize("replicas", [2, 3, 7])
@pytest.mark.parametrize("make", [
    lambda **kw: ClassBalancedSampler(LABELS, samples_per_class=4, seed=2, **kw),
    lambda **kw: SubsetSampler(LABELS, classes=[1, 2], seed=2, **kw),
    lambda **kw: SquareRootSampler(LABELS, seed=2, **kw),
], ids=["class_balanced", "subset", "sqrt"])
def test_rank_shards_partition_the_global_order(make, replicas):
    global_order = make().indices(4)
    shards = [make(num_replicas=replicas, rank=r) for r in range(replicas)]
    parts = [s.indices(4) for s in shards]
    per_rank = -(-global_order.size // replicas)
    assert all(p.size == per_rank == len(s) for p, s in zip(parts, shards))
    # contiguous shares of the padded global order: disjoint positions that together cover it
    padded = np.concatenate(parts)
    pad = padded.size - global_order.size
    assert 0 <= pad < replicas
    np.testing.assert_array_equal(padded[:global_order.size], global_order)
    np.testing.assert_array_equal(padded[global_order.size:], global_order[:pad])
    assert set(padded.tolist()) == set(global_order.tolist())


# ---- curriculum weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_weights_aligned_with_indices(kind):
    s = ClassBalancedSampler(LABELS, seed=4, initial_weights=V1, schedule=kind)
    total = 9
    for epoch in (0, 3, 8):
        idx, w = s.indices_and_weights(epoch, total)
        np.testing.assert_array_equal(idx, s.indices(epoch))  # weights do not change the order
        assert w.dtype == np.float32 and w.shape == idx.shape
        t = epoch / (total - 1)
        np.testing.assert_allclose(w, instance_weight(V1[idx], t, kind), rtol=0, atol=1e-7)
    # the schedule's endpoints: v1 at the first epoch, exactly 1 at the last
    idx, w = s.indices_and_weights(0, total)
    np.testing.assert_array_equal(w, V1[idx].astype(np.float32))
    idx, w = s.indices_and_weights(total - 1, total)
    np.testing.assert_array_equal(w, np.ones(idx.size, np.float32))


@pytest.mark.parametrize("sampler", _all_samplers(seed=9, initial_weights=V1, num_replicas=3, rank=1),
                         ids=lambda s: type(s).__name__)
def test_weights_aligned_for_every_sampler_and_shard(sampler):
    idx, w = sampler.indices_and_weights(2, 5)
    np.testing.assert_array_equal(idx, sampler.indices(2))
    np.testing.assert_allclose(w, instance_weight(V1[idx], 0.5, "linear"), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["class_balanced", "instance", "sqrt"])
@pytest.mark.parametrize("schedule", ["linear", "official"])
def test_curriculum_weights_do_not_change_the_order(kind, schedule):
    """A sampler built with SpIS weights draws the same indices as one built without them (LFME plans
    its student's drawn offline rows before the weights exist), sharded in batches or not."""
    for reps, rank, block in ((1, 0, None), (3, 1, 8)):
        plain = build_sampler(kind, LABELS, seed=6, num_replicas=reps, rank=rank)
        weighted = build_sampler(kind, LABELS, seed=6, num_replicas=reps, rank=rank, initial_weights=V1,
                                 schedule=schedule)
        if block is not None:
            plain.shard_batches(block)
            weighted.shard_batches(block)
        for epoch in (0, 4):
            idx, _ = weighted.indices_and_weights(epoch, 5)
            np.testing.assert_array_equal(idx, plain.indices(epoch))
            np.testing.assert_array_equal(weighted.epoch_share(epoch, 5).occurrences,
                                          plain.epoch_share(epoch).occurrences)


def test_official_schedule_weights():
    s = InstanceSampler(LABELS, initial_weights=V1, schedule="official")
    idx, w = s.indices_and_weights(9, 10)
    np.testing.assert_allclose(w, official_instance_weight(V1[idx], 9, 10), rtol=0, atol=1e-6)
    assert w.max() > 1.5  # unclamped: reaches 2 - v1


def test_weights_default_to_ones_and_single_epoch_is_last():
    s = ClassBalancedSampler(LABELS)
    idx, w = s.indices_and_weights(0, 5)
    np.testing.assert_array_equal(w, np.ones(idx.size, np.float32))
    assert curriculum_progress(0, 1) == 1.0
    s2 = ClassBalancedSampler(LABELS, initial_weights=V1)
    assert np.all(s2.indices_and_weights(0, 1)[1] == 1.0)


def test_generic_base_class_weights():
    class Reverse(Sampler):
        initial_weights = V1
        schedule = "convex"

        def indices(self, epoch):
            return np.arange(N - 1, -1, -1, dtype=np.int64)

    idx, w = Reverse().indices_and_weights(1, 3)
    np.testing.assert_allclose(w, instance_weight(V1[idx], 0.5, "convex"), atol=1e-7)


def _numpy_schedule(v1, epoch, total, kind):
    """The schedule computed directly in numpy (float64), rounded to float32 once: the reference."""
    if kind == "official":
        return official_instance_weight(v1, epoch, total).astype(np.float32)
    return instance_weight(v1, curriculum_progress(epoch, total), kind).astype(np.float32)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS + ("official",))
@pytest.mark.parametrize("make", [
    lambda **kw: ClassBalancedSampler(LABELS, samples_per_class=4, seed=5, **kw),
    lambda **kw: ClassBalancedSampler(LABELS, samples_per_class=7, seed=5, num_samples=3 * N + 5, **kw),
    lambda **kw: SquareRootSampler(LABELS, seed=5, **kw),
    lambda **kw: InstanceSampler(LABELS, seed=5, num_samples=N + 4097, **kw),
    lambda **kw: SubsetSampler(LABELS, classes=[0, 5, 39], seed=5, num_replicas=2, rank=1, **kw),
], ids=["class_balanced", "class_balanced_wrapping", "sqrt", "instance_chained", "subset_shard"])
def test_weights_bitwise_equal_numpy_schedule(make, kind):
    # the kernels precompute a class's scheduled weights in one hoisted pass and carry them packed with
    # the indices: the result must be bit for bit the float64 schedule rounded once to float32
    s = make(initial_weights=V1, schedule=kind)
    total = 7
    for epoch in (0, 1, 3, total - 1):  # both endpoints (t = 0, t = 1) and interior epochs
        idx, w = s.indices_and_weights(epoch, total)
        np.testing.assert_array_equal(idx, s.indices(epoch))
        assert w.dtype == np.float32
        expect = _numpy_schedule(V1[idx], epoch, total, kind)
        np.testing.assert_array_equal(w.view(np.uint32), expect.view(np.uint32))


def test_packed_kernel_keeps_indices_above_2_31():
    # pass (a) packs (index << 32 | weight bits) into one uint64: indices up to 2**32 - 2 must survive
    members = np.array([2**32 - 2, 2**32 - 3, 2**31 + 1, 2**31, 5, 2**32 - 10], dtype=np.int64)
    offsets = np.array([0, 4, 6], dtype=np.int64)
    v1_sorted = np.array([0.1, 0.9, 0.25, 0.5, 1.0, 0.0])
    group_class = np.array([0, 1, 0, 1, 1], dtype=np.int64)
    n = 9
    out_idx = np.empty(n, np.int64)
    out_w = np.empty(n, np.float32)
    wtmp = np.empty(4, np.float32)
    S._fill_from_class_cycles(group_class, 2, offsets, members, v1_sorted, 1, 0.3, 17,
                              np.empty(n, np.uint64), np.empty(4, np.uint64), wtmp, wtmp.view(np.uint32),
                              np.empty(4, np.int64), out_idx, out_w.view(np.uint32))
    pos = {int(m): k for k, m in enumerate(members)}
    assert set(out_idx[:2].tolist()) <= set(members[:4].tolist()) and out_idx.max() >= 2**32 - 3
    expect = instance_weight(v1_sorted[[pos[int(i)] for i in out_idx]], 0.3, "convex").astype(np.float32)
    np.testing.assert_array_equal(out_w, expect)
    # the same order without weights
    out_idx2 = np.empty(n, np.int64)
    S._fill_from_class_cycles(group_class, 2, offsets, members, v1_sorted[:0], 1, 0.3, 17,
                              np.empty(n, np.uint64), np.empty(4, np.uint64), wtmp[:0],
                              wtmp[:0].view(np.uint32), np.empty(4, np.int64), out_idx2, np.zeros(0, np.uint32))
    np.testing.assert_array_equal(out_idx2, out_idx)


# ---- other samplers --------------------------------------------------------------------------------


def test_instance_sampler_is_a_permutation_and_chains_permutations():
    s = InstanceSampler(LABELS, seed=1)
    np.testing.assert_array_equal(np.sort(s.indices(0)), np.arange(N))
    long = InstanceSampler(LABELS, seed=1, num_samples=2 * N + 10).indices(0)
    np.testing.assert_array_equal(np.sort(long[:N]), np.arange(N))
    np.testing.assert_array_equal(np.sort(long[N:2 * N]), np.arange(N))
    assert np.unique(long[2 * N:]).size == 10


def test_subset_sampler_covers_subset_once_with_global_indices():
    classes = [3, 0, 39, 3]
    s = SubsetSampler(LABELS, classes=classes, seed=2)
    expected = np.flatnonzero(np.isin(LABELS, [0, 3, 39]))
    for epoch in (0, 1):
        idx = s.indices(epoch)
        np.testing.assert_array_equal(np.sort(idx), expected)  # each subset image exactly once
    assert len(s) == expected.size
    np.testing.assert_array_equal(s.classes, [0, 3, 39])
    assert s.label_map[0] == 0 and s.label_map[3] == 1 and s.label_map[39] == 2 and s.label_map[1] == -1


def test_square_root_class_frequencies():
    labels = np.repeat(np.arange(3), [1600, 100, 4])
    idx = SquareRootSampler(labels, seed=0, num_samples=100_000).indices(0)
    freq = np.bincount(labels[idx], minlength=3) / idx.size
    expected = np.sqrt([1600, 100, 4]) / np.sqrt([1600, 100, 4]).sum()  # 40/52, 10/52, 2/52
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_progressive_class_frequencies():
    labels = np.repeat(np.arange(2), [900, 100])
    s = ProgressiveSampler(labels, total_epochs=4, seed=0, num_samples=50_000)
    f0 = np.bincount(labels[s.indices(0)], minlength=2) / 50_000
    f2 = np.bincount(labels[s.indices(2)], minlength=2) / 50_000
    np.testing.assert_allclose(f0, [0.9, 0.1], atol=0.01)  # instance-balanced
    np.testing.assert_allclose(f2, [0.7, 0.3], atol=0.01)  # halfway: 0.5 * 0.9 + 0.5 * 0.5
    np.testing.assert_allclose(s.class_probabilities(3), [0.6, 0.4])
    with pytest.raises(ValueError, match="epoch"):
        s.indices(4)


def test_class_probability_draws_match_searchsorted_exactly():
    # the guide-table inverse CDF equals searchsorted(side="right"); zero-probability classes never drawn
    probs = np.array([0.0, 0.3, 0.0, 0.0, 0.2, 0.5, 0.0])
    cum = np.cumsum(probs)
    out = np.empty(20_000, np.int64)
    S._class_prob_groups(cum, 5, out)
    key = S._stream_key(5, S._SALT_CLASSES)
    u = np.array([S._rand_unit(key, i) for i in range(out.size)])
    np.testing.assert_array_equal(out, np.searchsorted(cum, u * cum[-1], side="right"))
    assert set(np.unique(out).tolist()) == {1, 4, 5}


def test_python_reference_sampler_semantics():
    p = PythonClassAwareSampler(LABELS, samples_per_class=4, seed=0)
    idx = np.fromiter(iter(p), dtype=np.int64)
    assert idx.size == len(p) == N
    groups = LABELS[idx[: (N // 4) * 4]].reshape(-1, 4)
    assert np.all(groups == groups[:, :1])
    draws = np.bincount(LABELS[idx], minlength=40)
    assert draws.max() - draws.min() <= 4


# ---- bad inputs --------------------------------------------------------------------------------------


def test_bad_labels():
    with pytest.raises(ValueError, match="negative"):
        ClassBalancedSampler(np.array([0, 1, -1]))
    with pytest.raises(ValueError, match="class 2 has no samples"):
        ClassBalancedSampler(np.array([0, 1, 3, 3]))
    with pytest.raises(ValueError, match="integers"):
        InstanceSampler(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        InstanceSampler(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="empty"):
        SquareRootSampler(np.array([], np.int64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassBalancedSampler(LABELS, samples_per_class=0)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(LABELS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler(LABELS, rank=-1)
    with pytest.raises(ValueError, match="num_replicas"):
        InstanceSampler(LABELS, num_replicas=0)
    with pytest.raises(ValueError, match="num_samples"):
        InstanceSampler(LABELS, num_samples=0)
    with pytest.raises(ValueError, match="seed"):
        InstanceSampler(LABELS, seed=-1)
    with pytest.raises(ValueError, match="initial_weights"):
        ClassBalancedSampler(LABELS, initial_weights=np.ones(3))
    with pytest.raises(ValueError, match="initial_weights\\[0\\]"):
        ClassBalancedSampler(LABELS, initial_weights=np.full(N, np.nan))
    with pytest.raises(ValueError, match="schedule"):
        ClassBalancedSampler(LABELS, schedule="cubic")
    with pytest.raises(ValueError, match="classes contains 40"):
        SubsetSampler(LABELS, classes=[0, 40])
    with pytest.raises(ValueError, match="classes"):
        SubsetSampler(LABELS, classes=[])
    with pytest.raises(ValueError, match="total_epochs"):
        ProgressiveSampler(LABELS, total_epochs=0)
    s = ClassBalancedSampler(LABELS)
    with pytest.raises(ValueError, match="epoch"):
        s.indices(-1)
    with pytest.raises(ValueError, match="epoch must be in"):
        s.indices_and_weights(5, 5)


# ---- benchmark plumbing (no timing asserted) -------------------------------------------------------


def test_bench_histogram_and_cases():
    import argparse

    from lfme_fast.bench import sampler as bench

    counts, source = bench.load_imagenet_lt_histogram()
    assert counts.size == 1000 and counts.sum() == 115_846, source
    labels = bench.interleaved_labels(np.array([3, 1, 2]), seed=0)
    np.testing.assert_array_equal(np.bincount(labels), [3, 1, 2])
    args = argparse.Namespace(python_limit_s=60.0, python_budget_s=5.0, python_prefix=500)
    case = bench.bench_case("tiny", COUNTS, 1, args)
    assert case["num_samples"] == N
    assert case["python_oltr_class_aware"]["extrapolated"] is False
    assert case["numba_class_balanced"]["indices"]["median_s"] > 0
    assert set(case["other_samplers"]) >= {"instance", "square_root", "progressive", "subset_many_shot"}
    # an epoch estimated above the limit is extrapolated from the prefixes, and says so
    slow = bench._time_python(LABELS, 1, limit_s=0.0, budget_s=1.0, prefix=200)
    assert slow["extrapolated"] is True and slow["repeats"] == 0 and "extrapolated" in slow["note"]
