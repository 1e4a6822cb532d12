"""Epoch samplers for long-tailed training, with LFME's curriculum weights drawn in the same pass.

The extension point is :class:`Sampler`, one abstract method ``indices(epoch)`` returning this rank's
share of the epoch's global order as int64 dataset indices (FFCV's ``TraversalOrder`` is the model).
The built-in samplers keep the classes as CSR arrays (``class_offsets``, ``class_members``: the
indices of class ``c`` are ``class_members[class_offsets[c]:class_offsets[c + 1]]``, built with one
stable argsort, so the order of labels on disk does not matter) and generate a whole epoch in
``@njit`` functions over plain arrays, no per-index Python. The kernels start their random streams from
``seed + epoch`` (a private splitmix64 generator, see below for why not numba's ``np.random``), so an
epoch's order depends on ``(seed, epoch)`` only — not on which epochs were drawn before, nor on the
process or thread that draws it.

Samplers:

* :class:`ClassBalancedSampler` — OLTR's ``ClassAwareSampler`` (used by LFME): cycle over shuffled
  classes; from each chosen class take ``samples_per_class`` consecutive indices of that class's own
  reshuffling cycle.
* :class:`InstanceSampler` — a plain shuffle.
* :class:`SquareRootSampler` — class ``c`` drawn with probability ``~ sqrt(n_c)``.
* :class:`ProgressiveSampler` — progressively balanced (Kang et al., ICLR 2020).
* :class:`SubsetSampler` — a plain shuffle of the images of some classes (an LFME expert's data).

Class-probability sampling (square-root, progressive) draws each sample's class independently by
inverse CDF (``searchsorted(cum_probs, u, side="right")``, accelerated by a guide table), then takes
the next index of that class's
*reshuffling cycle* — not an i.i.d. draw inside the class: every image of a class is used once before
any is repeated, which lowers the variance of what the model sees without changing the class
frequencies.

Distributed use: every rank computes the same global order. By default (evaluation) it is padded to a
multiple of ``num_replicas`` by repeating its start, and each rank keeps the contiguous slice
``[rank * L, (rank + 1) * L)``: the shards are disjoint in position, equally long, and together are
the padded global order.

Training loaders call :meth:`Sampler.shard_batches` with the per-process batch ``b`` first; the
built-in samplers then shard the global order **in batches**: the order is cut into consecutive
blocks of ``b`` and block ``j`` goes to rank ``j mod R``. Micro-batch ``k`` of every rank together is
then positions ``[k R b, (k + 1) R b)`` of the one global order, so an optimizer step (``grad_accum``
micro-batches on each rank) sees positions ``[s G, (s + 1) G)`` with ``G = b R grad_accum`` the
global batch, whatever ``R`` is: a 1-process and an 8-process run with the same seed and global batch
draw the same global batches in the same order (world-size invariance, issue 14). The epoch keeps
its whole micro-steps of ``R b`` samples (on one process: exactly the ``drop_last`` batches of
before). An epoch shorter than one micro-step (a small expert subset under many processes) is
*topped up*: the global order is extended to ``R b`` positions by continuing the sampler's own order
(further shuffle cycles, so samples repeat within the epoch) instead of leaving the loader empty;
:attr:`_ArraySampler.topped_up` reports it.

Occurrence numbers: the loaders seed a position's crop, flip, colour and fixed view by
``(seed, epoch, index, occurrence)``, where ``occurrence`` counts the earlier positions of the same
index in the epoch. :meth:`Sampler.epoch_share` gives them with the indices; the built-in samplers
count them over the *global* order before sharding, so the repeats of an oversampled image get
distinct augmentations however the order is split, and a run draws the same augmentations on any
number of processes (on one process this is the count within its own order, as before).

Memory: an epoch of at most :attr:`_ArraySampler.plan_chunk` positions (4 Mi) is drawn whole, which
costs about 30 bytes per position on every process (the order, its weights, an n-sized scratch buffer,
the occurrence numbers) before the share is cut. A longer epoch is planned by the streaming kernels: the identical order
(tested bit for bit), a chunk at a time, keeping only this rank's positions, so a process holds its
share plus one chunk and one word per dataset sample (``lfme-bench sampler_memory``,
``results/bench_sampler_memory.json``).

Curriculum weights (LFME SpIS): a built-in sampler constructed with ``initial_weights=v1`` (one
float per dataset sample) and ``schedule`` returns, from ``indices_and_weights(epoch, total_epochs)``,
float32 weights aligned with the indices, computed inside the ``@njit`` kernel that draws the indices
(no second gather pass).
"""

from __future__ import annotations

import inspect
import math
import random
import threading
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import numpy as np
from numba import njit

from lfme_fast.augment import occurrences
from lfme_fast.schedules import (
    instance_weight,
    official_progress,
    schedule_code,
)

__all__ = [
    "Sampler",
    "SamplerShare",
    "ClassBalancedSampler",
    "InstanceSampler",
    "SquareRootSampler",
    "ProgressiveSampler",
    "SubsetSampler",
    "PythonClassAwareSampler",
    "SAMPLERS",
    "build_sampler",
    "class_csr",
    "curriculum_progress",
]

_SEED_MOD = 2**63  # the kernels take the epoch seed as a non-negative int64


# ==================================================================================================
# Random numbers: a private, counter-based splitmix64 stream.
#
# Draw number ``i`` of stream ``key`` is ``mix64(key + (i + 1) * GOLDEN)``: a pure function of
# (key, i), so a loop can compute a block of draws at once (LLVM vectorises it) before the dependent
# swaps, and two streams never interfere. Keys derive from ``seed + epoch``, so an epoch depends on
# (seed, epoch) only.
#
# Why not numba's np.random seeded with np.random.seed(seed + epoch) inside the kernel? (1) Speed: one
# numba Mersenne-Twister draw costs ~8 ns here, the whole per-index budget of a sampler that must beat
# OLTR's Python sampler 100x (one ImageNet-LT epoch in < 0.7 ms); a splitmix64 draw computed in a
# vectorised block costs well under 1 ns. (2) Isolation: np.random.seed inside njit resets numba's
# per-thread generator, the one FFCV's njit augmentations draw from, so reseeding it every epoch
# would replay their random streams. (3) Stability: the order does not change with numba's version.
# ==================================================================================================

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
# stream salts: the class sequence and the within-class draws use different keys
_SALT_CLASSES = np.uint64(0x243F6A8885A308D3)
_SALT_MEMBERS = np.uint64(0x13198A2E03707344)
_MAX_CLASS_OR_DRAW = 2**32 - 1  # _rand_below(k) is exact for k < 2**32


@njit(cache=True)
def _mix64(z):
    """splitmix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _stream_key(seed, salt):
    """Key of one stream for ``seed`` (= sampler seed + epoch, a non-negative int64)."""
    return _mix64(np.uint64(seed) ^ salt)


@njit(cache=True)
def _rand_below(key, ctr, k):
    """Draw ``ctr`` of stream ``key``, uniform in ``[0, k)`` for ``1 <= k < 2**32``.

    ``floor(z * k / 2**64)``, computed exactly from 32-bit halves (numba has no 128-bit integer); the
    bias is below ``k / 2**64``.
    """
    z = _mix64(key + (np.uint64(ctr) + np.uint64(1)) * _GOLDEN)
    kk = np.uint64(k)
    hi = (z >> _U32) * kk
    lo = ((z & _LOW32) * kk) >> _U32
    return np.int64((hi + lo) >> _U32)


@njit(cache=True)
def _rand_unit(key, ctr):
    """Draw ``ctr`` of stream ``key``, uniform in ``[0, 1)`` on the 2**-53 grid."""
    z = _mix64(key + (np.uint64(ctr) + np.uint64(1)) * _GOLDEN)
    return np.float64(z >> np.uint64(11)) * _INV53


# ==================================================================================================
# Hot loops: free @njit functions over plain arrays.
#
# Common arguments: ``seed`` (already seed + epoch), ``code`` / ``t`` (schedule code and progress, see
# schedules.instance_weight_nb; the kernels apply it through _schedule_block, the same arithmetic
# with the per-epoch constants hoisted), the outputs ``out_idx`` (int64, length n) and ``out_w``
# (float32, length n, or empty when no weights are wanted; _fill_from_class_cycles takes its uint32
# view), and the initial weights: ``v1`` per dataset index, or ``v1_sorted`` = ``v1[class_members]``
# (class-CSR order, so a class's weights are contiguous).
# Large scratch arrays come from the caller (numpy's allocator asks for transparent huge pages, which
# makes first touch ~4x cheaper than numba's allocator at 100 MB).
# Indexing: numba wraps negative indices, so ``a[lo + q]`` with a signed computed index pays a
# compare-and-select per access and stops LLVM from vectorising the loop (a class-by-class copy of
# 11.6 M members: 22 ms that way, 6 ms over the slice ``a[lo:lo + m]`` indexed by the loop counter,
# whose sign LLVM can prove). Hot loops therefore index slices by their loop counter, or use uint64
# positions (never mixed with int64 in arithmetic: numba types uint64 + int64 as float64).
# ==================================================================================================


@njit(cache=True)
def _fy_block(key, ctr0, p0, m, count, jbuf):
    """Swap targets of ``count`` incremental Fisher-Yates steps at positions ``p0..p0+count-1`` of an
    ``m``-long cycle: ``jbuf[s] = p0 + s + U[0, m - p0 - s)``, with draws ``ctr0 + s`` of ``key``.

    No loop-carried dependency, so LLVM vectorises it; the swaps follow in a separate scalar loop.
    """
    for s in range(count):
        p = p0 + s
        jbuf[s] = p + _rand_below(key, ctr0 + s, m - p)


@njit(cache=True, inline="always")
def _fy_swap_out(arr, jbuf, count, dst):
    """Carry out the first ``count`` Fisher-Yates steps of ``arr`` with the swap targets of
    :func:`_fy_block` (drawn with ``p0 = 0``), copying each fixed item to ``dst[p]`` as well."""
    for p in range(count):
        j = np.uint64(jbuf[p])
        x = arr[j]
        arr[j] = arr[p]
        arr[p] = x
        dst[p] = x


@njit(cache=True)
def _schedule_block(src, code, t, dst):
    """``dst[q] = f(src[q], t)`` for every ``q`` of ``src`` (float32 ``dst``, at least as long).

    The same float64 arithmetic as :func:`lfme_fast.schedules.instance_weight_nb` (same expressions,
    same operation order, rounded to float32 once at the store), but with the branch on ``code`` / ``t``
    and the transcendental constant (``cos(t pi / 2)``, ``log1p(t) / log 2``) hoisted out of the loop,
    so each loop is a vectorised multiply-add stream instead of a per-element call with branches and
    a ``cos`` / ``log1p``. Callers pass slices rather than ``(array, offset)``: see the note on
    indexing above. A change to the schedules must be made here too;
    ``tests/test_sampling.py::test_weights_bitwise_equal_numpy_schedule`` checks the two agree bit
    for bit for every schedule and sampler.
    """
    m = src.shape[0]
    if code == 3:  # official ramp: not clamped, no endpoint shortcuts
        for q in range(m):
            v = src[q]
            dst[q] = v + (1.0 - v) * t
    elif t <= 0.0:
        for q in range(m):
            dst[q] = src[q]
    elif t >= 1.0:
        for q in range(m):
            dst[q] = 1.0
    elif code == 0:
        for q in range(m):
            v = src[q]
            dst[q] = (1.0 - v) * t + v
    elif code == 1:
        k = math.cos(t * math.pi / 2.0)
        for q in range(m):
            v = src[q]
            dst[q] = 1.0 - (1.0 - v) * k
    else:
        k = math.log1p(t) / math.log(2.0)
        for q in range(m):
            v = src[q]
            dst[q] = v + (1.0 - v) * k


@njit(cache=True)
def _class_offsets(group_class, group_size, n, num_classes):
    """int64 ``[C + 1]``: where each class's draws start in a class-CSR buffer of the ``n`` positions
    laid out as groups of ``group_size`` (class ``group_class[g]``; the last group may be cut short)."""
    full_groups = n // group_size
    off = np.zeros(num_classes + 1, dtype=np.int64)
    for g in range(full_groups):
        off[np.int64(group_class[g]) + 1] += group_size
    if group_class.shape[0] > full_groups:
        off[np.int64(group_class[full_groups]) + 1] += n - full_groups * group_size
    for c in range(num_classes):
        off[c + 1] += off[c]
    return off


@njit(cache=True)
def _fill_from_class_cycles(group_class, group_size, class_offsets, class_members, v1_sorted, code, t, seed,
                            buf, scratch, wtmp, wtmp_bits, jbuf, out_idx, out_w_bits):
    """Fill the epoch given its class sequence: group ``g`` is ``group_size`` draws of class
    ``group_class[g]`` (the last group may be cut short at ``n = len(out_idx)``), each the next index
    of that class's own reshuffling cycle.

    Two cache-friendly passes instead of one pass that hops between classes: (a) class by class, all of
    the class's draws for the epoch come from an incremental Fisher-Yates over a scratch copy of its
    members (restarting at each wrap: a new uniform permutation, independent of the previous one),
    written to a class-CSR buffer; (b) the groups are laid out by reading each class's buffer
    sequentially. The one-pass version makes one random access into an N-sized array per index
    (~100 ns/index at 11.6 M samples).

    Weights ride along with the indices: a class's scheduled weights ``f(v1_sorted[lo:lo+m], t)`` are
    computed once per epoch in one vectorised streaming pass (:func:`_schedule_block`, into ``wtmp``),
    and each scratch / buffer entry is one uint64 holding ``index << 32 | float32 bits of its weight``
    (indices are < 2**32, checked at construction). So the shuffle swaps and the buffer writes are
    exactly those of the indices-only path (the old layout swapped a second float64 scratch, evaluated
    the schedule, ``cos`` / ``log1p`` included, per draw, and wrote and re-read a second n-sized
    buffer); pass (b) splits the words into ``out_idx`` and ``out_w_bits`` (the uint32 view of the
    float32 weights; empty when no weights are wanted, and then a word is just the index).

    Scratch (from the caller): ``buf`` (uint64, n), ``scratch`` (uint64, largest class), ``jbuf``
    (largest class), ``wtmp`` (float32, largest class, or empty) with ``wtmp_bits`` its uint32 view.
    """
    key = _stream_key(seed, _SALT_MEMBERS)
    num_classes = class_offsets.shape[0] - 1
    n = out_idx.shape[0]
    want_w = out_w_bits.shape[0] > 0
    num_groups = group_class.shape[0]
    full_groups = n // group_size  # all groups but a possibly cut-short last one
    buf_off = _class_offsets(group_class, group_size, n, num_classes)
    # (a) class by class: each class's draws for the epoch, in class-CSR order
    for c in range(num_classes):
        r = buf_off[c]
        end = buf_off[c + 1]
        if r == end:
            continue
        lo = class_offsets[c]
        m = class_offsets[c + 1] - lo
        members = class_members[lo:lo + m]
        if want_w:
            _schedule_block(v1_sorted[lo:lo + m], code, t, wtmp)
            for q in range(m):
                scratch[q] = (np.uint64(members[q]) << _U32) | np.uint64(wtmp_bits[q])
        else:
            for q in range(m):
                scratch[q] = np.uint64(members[q])
        while r < end:  # one pass of this loop per (partial) cycle of the class
            take = min(end - r, m)
            _fy_block(key, r, 0, m, take, jbuf)  # draw counter = buffer position: unique per draw
            _fy_swap_out(scratch, jbuf, take, buf[r:r + take])
            r += take
    # (b) lay out the groups; buf_off[c] becomes class c's read pointer. Unsigned positions: a signed
    # computed index costs a negative-index wraparound check on every access (see the note above).
    gs = np.uint64(group_size)
    for g in range(num_groups):
        c = np.uint64(group_class[g])
        ptr = np.uint64(buf_off[c])
        i = np.uint64(g) * gs
        cnt = gs if g < full_groups else np.uint64(n) - i
        if want_w:
            for s in range(cnt):
                x = buf[ptr + s]
                out_idx[i + s] = np.int64(x >> _U32)
                out_w_bits[i + s] = np.uint32(x & _LOW32)
        else:
            for s in range(cnt):
                out_idx[i + s] = np.int64(buf[ptr + s])
        buf_off[c] = np.int64(ptr + cnt)


@njit(cache=True)
def _class_cycle_groups(num_classes, seed, group_class):
    """OLTR's class cycle: ``group_class[g]`` = class of group ``g``, cycles of shuffled classes.

    Incremental Fisher-Yates: position ``ci`` of the current cycle is drawn when it is reached, which
    is a uniform shuffle of the cycle, reshuffled at each wrap.
    """
    key = _stream_key(seed, _SALT_CLASSES)
    num_groups = group_class.shape[0]
    cycle = np.arange(num_classes)
    jbuf = np.empty(num_classes, dtype=np.int64)
    g = 0
    while g < num_groups:  # one pass per (partial) cycle
        take = min(num_groups - g, num_classes)
        _fy_block(key, g, 0, num_classes, take, jbuf)  # draw counter = group index
        _fy_swap_out(cycle, jbuf, take, group_class[g:g + take])
        g += take


@njit(cache=True)
def _class_prob_groups(cum_probs, seed, group_class, i0=0):
    """``group_class[i]`` ~ class probabilities given by their cumulative sums ``cum_probs`` (draw ``i0 + i``:
    ``i0`` lets the streaming plan draw groups ``i0..`` of an epoch).

    Inverse CDF with a guide table (Chen & Asau 1974): cell ``floor(u C)`` points near the answer and a
    short walk finds ``searchsorted(cum_probs, u * total, side="right")`` exactly — a zero-probability
    class owns an empty interval and is never drawn.
    """
    key = _stream_key(seed, _SALT_CLASSES)
    num_classes = cum_probs.shape[0]
    total = cum_probs[num_classes - 1]
    guide = np.searchsorted(cum_probs, np.arange(num_classes) * (total / num_classes), side="right")
    for i in range(group_class.shape[0]):
        u = _rand_unit(key, i0 + i)
        x = u * total
        c = guide[min(np.int64(u * num_classes), num_classes - 1)]
        if c > num_classes - 1:
            c = num_classes - 1
        while c > 0 and cum_probs[c - 1] > x:
            c -= 1
        while c < num_classes - 1 and cum_probs[c] <= x:
            c += 1
        group_class[i] = c


@njit(cache=True)
def _fy_cycle(arr, key, ctr0, take, jbuf):
    """Fix the first ``take`` positions of an incremental Fisher-Yates over all of ``arr`` (in place),
    with draws ``ctr0 + p`` of ``key`` for position ``p``; swap targets in vectorised blocks of
    ``len(jbuf)``. Works on int64 indices and on packed uint64 (index, weight) words alike."""
    m = arr.shape[0]
    block = jbuf.shape[0]
    p = 0
    while p < take:
        cnt = min(block, take - p)
        _fy_block(key, ctr0 + p, p, m, cnt, jbuf)
        seg = arr[p:p + cnt]
        for s in range(cnt):
            j = np.uint64(jbuf[s])
            x = arr[j]
            arr[j] = seg[s]
            seg[s] = x
        p += cnt


@njit(cache=True)
def _shuffle_kernel(members, v1, seed, code, t, jbuf, work, work_idx, vbuf, wtmp, wtmp_bits, out_idx,
                    out_w_bits):
    """Consecutive independent permutations of ``members`` (one permutation when n == len(members)).

    Fisher-Yates drawn incrementally (position ``p`` of a cycle is fixed when it is reached), the swap
    targets computed in vectorised blocks of ``len(jbuf)``. Without weights, a full cycle is permuted
    in place in ``out_idx``; a final partial cycle (``n`` not a multiple of ``m``) needs the whole cycle
    as swap sources and uses ``work_idx`` (length ``m``, or empty when ``n % m == 0``).

    With weights (``out_w_bits``, the uint32 view of the float32 weights, non-empty), each cycle
    permutes packed uint64 words ``member << 32 | float32 bits of f(v1[member], t)`` in ``work``
    (length ``m``; ``work_idx`` is its int64 view), built by one near-sequential pass over
    ``v1[members]`` (members are ascending) with the schedule vectorised (:func:`_schedule_block`, in
    blocks through ``vbuf`` / ``wtmp``), and splits them into the outputs. The same swaps, so the same
    order, as without weights, and no random gather ``v1[out_idx[i]]`` over the whole dataset.
    """
    key = _stream_key(seed, _SALT_MEMBERS)
    n = out_idx.shape[0]
    m = members.shape[0]
    want_w = out_w_bits.shape[0] > 0
    wblock = vbuf.shape[0]
    start = 0
    while start < n:  # one cycle (permutation) per pass
        take = min(n - start, m)
        if want_w:
            for b0 in range(0, m, wblock):
                cnt = min(wblock, m - b0)
                mem = members[b0:b0 + cnt]
                for s in range(cnt):
                    vbuf[s] = v1[mem[s]]
                _schedule_block(vbuf[:cnt], code, t, wtmp)
                dst = work[b0:b0 + cnt]
                for s in range(cnt):
                    dst[s] = (np.uint64(mem[s]) << _U32) | np.uint64(wtmp_bits[s])
            _fy_cycle(work, key, start, take, jbuf)
            oi = out_idx[start:start + take]
            ow = out_w_bits[start:start + take]
            for s in range(take):
                x = work[s]
                oi[s] = np.int64(x >> _U32)
                ow[s] = np.uint32(x & _LOW32)
        else:
            arr = out_idx[start:start + m] if take == m else work_idx
            arr[:] = members
            _fy_cycle(arr, key, start, take, jbuf)
            if take < m:
                out_idx[start:start + take] = work_idx[:take]
        start += take



# ==================================================================================================
# Streaming kernels: the same epoch order, chunk by chunk, in bounded memory.
#
# The kernels above fill the whole global order at once (plus an n-sized scratch buffer): 20+ bytes per
# position, 22 GB for an epoch of 1e9 samples on every process. The streaming kernels below produce the
# identical order (same draws, same counters: tested bit for bit) a chunk of positions at a time,
# carrying the state the kernels above keep in scratch: the class cycle, each class's partly shuffled
# members and how many of its draws are taken, the shuffle cycle. So a process materialises only its
# share plus one chunk (:meth:`_ArraySampler.indices` switches to them above ``plan_chunk`` positions).
# ==================================================================================================


@njit(cache=True)
def _stream_class_cycle(num_classes, seed, g0, cycle, out):
    """Groups ``g0 .. g0 + len(out) - 1`` of :func:`_class_cycle_groups`, continuing its ``cycle`` state
    (``np.arange(num_classes)`` before group 0): group ``g`` is Fisher-Yates step ``g mod C`` of its
    cycle with draw ``g`` -- the draws :func:`_class_cycle_groups` makes in blocks."""
    key = _stream_key(seed, _SALT_CLASSES)
    for s in range(out.shape[0]):
        g = g0 + s
        p = g % num_classes
        j = p + _rand_below(key, g, num_classes - p)
        x = cycle[j]
        cycle[j] = cycle[p]
        cycle[p] = x
        out[s] = x


@njit(cache=True)
def _stream_class_draws(group_class, group_size, class_offsets, state, taken, ctr_base, seed, cbuf, out):
    """The next ``len(out)`` positions of :func:`_fill_from_class_cycles` (the chunk starts at a group
    boundary; ``group_class`` holds the classes of the groups it overlaps).

    Each position is the next draw ``k = taken[c]`` of its class ``c``: Fisher-Yates step ``k mod m`` over
    the class's ``m`` members in ``state`` (class-CSR words, carried from chunk to chunk) with draw
    counter ``ctr_base[c] + k``, ``ctr_base[c]`` being the class's offset in the full kernel's class-CSR
    buffer, so the counters, and the order, are the same. As in the full kernel, two cache-friendly
    passes: (a) class by class, the chunk's draws of the class into the class-CSR scratch ``cbuf``
    (at least ``len(out)``), (b) the groups laid out from it.
    """
    key = _stream_key(seed, _SALT_MEMBERS)
    num_classes = class_offsets.shape[0] - 1
    n = out.shape[0]
    num_groups = group_class.shape[0]
    full_groups = n // group_size
    off = _class_offsets(group_class, group_size, n, num_classes)
    # (a) class by class
    for c in range(num_classes):
        r = off[c]
        end = off[c + 1]
        if r == end:
            continue
        lo = class_offsets[c]
        m = class_offsets[c + 1] - lo
        st = state[lo:lo + m]
        k = taken[c]
        base = ctr_base[c]
        p = k % m
        while r < end:
            j = p + _rand_below(key, base + k, m - p)
            x = st[j]
            st[j] = st[p]
            st[p] = x
            cbuf[r] = x
            r += 1
            k += 1
            p += 1
            if p == m:
                p = 0
        taken[c] = k
    # (b) lay out the groups; off[c] becomes class c's read pointer
    for g in range(num_groups):
        c = group_class[g]
        ptr = off[c]
        i = g * group_size
        cnt = group_size if g < full_groups else n - i
        for s in range(cnt):
            out[i + s] = cbuf[ptr + s]
        off[c] = ptr + cnt


@njit(cache=True)
def _stream_shuffle(init, seed, pos0, state, out):
    """Positions ``pos0 .. pos0 + len(out) - 1`` of :func:`_shuffle_kernel`: position ``i`` is Fisher-Yates
    step ``i mod m`` of the current cycle with draw ``i``; ``state`` (``m`` words, carried from chunk to
    chunk) restarts from ``init`` at each cycle's first position."""
    key = _stream_key(seed, _SALT_MEMBERS)
    m = init.shape[0]
    for s in range(out.shape[0]):
        i = pos0 + s
        p = i % m
        if p == 0:
            state[:] = init
        j = p + _rand_below(key, i, m - p)
        x = state[j]
        state[j] = state[p]
        state[p] = x
        out[s] = x

# ==================================================================================================
# Helpers
# ==================================================================================================


def _as_labels(labels: Any) -> np.ndarray:
    """Validate labels as 1-D non-negative integers covering 0..C-1 with no empty class."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty: a sampler needs at least one sample")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    lo = int(arr.min())
    if lo < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"labels must be class ids 0..C-1; labels[{bad}] = {int(arr[bad])} is negative")
    counts = np.bincount(arr)
    if not counts.all():
        empty = np.flatnonzero(counts == 0)
        raise ValueError(
            f"labels must be class ids 0..C-1 with every class present; class {int(empty[0])} has no samples"
            f" ({empty.size} empty class{'es' if empty.size > 1 else ''} below the largest id {counts.size - 1})"
        )
    return arr


def class_csr(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(class_offsets, class_members)``: class ``c``'s indices are ``members[offsets[c]:offsets[c+1]]``.

    One stable argsort by label, so members of a class are in ascending index order. With at most
    65,536 classes the labels are sorted as uint16, for which numpy's stable sort is a radix sort:
    O(N), 0.4 s instead of 1.8 s (int64 timsort) at 11.6 M samples. Labels are validated as by the
    samplers (0..C-1, no empty class).
    """
    arr = _as_labels(labels)
    counts = np.bincount(arr)
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    keys = arr.astype(np.uint16) if counts.size <= 2**16 else arr
    members = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
    return offsets, members


def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def curriculum_progress(epoch: int, total_epochs: int) -> float:
    """SpIS progress ``t = epoch / (total_epochs - 1)`` (0 at the first epoch, 1 at the last; 1 if E = 1)."""
    epoch = _as_int(epoch, "epoch", 0)
    total_epochs = _as_int(total_epochs, "total_epochs", 1)
    if epoch >= total_epochs:
        raise ValueError(f"epoch must be in [0, total_epochs={total_epochs}), got {epoch}")
    return 1.0 if total_epochs == 1 else epoch / (total_epochs - 1)


def _shard_batches(order: np.ndarray, num_replicas: int, rank: int, batch: int) -> np.ndarray:
    """This rank's share of ``order`` in blocks of ``batch``: block ``j`` (positions ``[j b, (j+1) b)``)
    goes to rank ``j mod R``; only whole micro-steps of ``R b`` positions are kept (a copy, contiguous)."""
    step = num_replicas * batch
    steps = order.size // step
    return np.ascontiguousarray(order[:steps * step].reshape(steps, num_replicas, batch)[:, rank, :]).reshape(-1)


def _shard(order: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """This rank's contiguous share of ``order`` padded (by wrapping its start) to a multiple of R."""
    if num_replicas == 1:
        return order
    per_rank = -(-order.size // num_replicas)
    padded = np.resize(order, per_rank * num_replicas)  # np.resize repeats the array cyclically
    return padded[rank * per_rank:(rank + 1) * per_rank]


# ==================================================================================================
# The extension point
# ==================================================================================================


class SamplerShare(NamedTuple):
    """This rank's part of one epoch (:meth:`Sampler.epoch_share`): ``indices`` (int64), their float32
    curriculum ``weights`` (None unless asked for), and int64 ``occurrences``: how many times each
    position's index came up earlier in the epoch's global order."""

    indices: np.ndarray
    weights: np.ndarray | None
    occurrences: np.ndarray


class Sampler(ABC):
    """An epoch order: one abstract method, :meth:`indices`.

    Subclasses return this rank's share of epoch ``epoch``'s global order as an int64 array of
    dataset indices; the same ``(seed, epoch)`` must give the same order. This class declares
    everything the loaders (:func:`lfme_fast.loaders.build_loader`) call on a sampler, and nothing else:

    * :meth:`indices` (abstract) — the order of an epoch (eval loaders, and training without
      curriculum weights);
    * :meth:`indices_and_weights` — training loaders: the order plus float32 curriculum weights.
      The generic implementation looks ``initial_weights`` up after the fact; the built-in samplers
      override it to produce the weights inside their ``@njit`` pass;
    * ``len(sampler)`` (:meth:`__len__`) — this rank's epoch length, which must be the same for every
      epoch: loaders derive their batch count from it once. The default draws epoch 0; override it
      when an epoch is costly to draw;
    * :meth:`epoch_share` — what a loader plans an epoch from: the indices (with weights for training)
      and their occurrence numbers. The generic implementation counts occurrences within this rank's
      share, which is the global count on one process; a sampler that splits its order across
      processes overrides it to count over the global order (the built-in samplers do).

    A loader is given a sampler only through ``LoaderOptions(sampler=...)``, and checks that it is an
    instance of this class.
    """

    #: per-dataset-sample initial weights ``v1`` (float64) or None; see :meth:`indices_and_weights`
    initial_weights: np.ndarray | None = None
    #: schedule name, one of ``schedules.SAMPLER_SCHEDULES``
    schedule: str = "linear"

    def shard_batches(self, batch_size: int) -> "Sampler":
        """Make this sampler shard its global order in blocks of ``batch_size`` (the per-process batch of
        the training loader that will read it; see the module docstring) and return it.

        The built-in samplers implement it (world-size invariant training). This default keeps the
        subclass's own sharding unchanged: a custom sampler is then not guaranteed to give the same
        global batches on any process count.
        """
        return self

    @abstractmethod
    def indices(self, epoch: int) -> np.ndarray:
        """This rank's int64 dataset indices for ``epoch``."""

    def __len__(self) -> int:
        """This rank's number of indices per epoch (default: the length of epoch 0's order)."""
        return int(len(self.indices(0)))

    def epoch_share(self, epoch: int, total_epochs: int | None = None) -> SamplerShare:
        """This rank's :class:`SamplerShare` of ``epoch``: :meth:`indices_and_weights` when ``total_epochs``
        is given (training with curriculum weights), else :meth:`indices` with ``weights`` None; the
        occurrences are counted within the share (see the class docstring)."""
        if total_epochs is None:
            idx, w = np.asarray(self.indices(epoch), dtype=np.int64), None
        else:
            idx, w = self.indices_and_weights(epoch, total_epochs)
            idx = np.asarray(idx, dtype=np.int64)
        # counted over the distinct values' ranks: an out-of-range index is left for the loader to name
        _, rank = np.unique(idx, return_inverse=True)
        return SamplerShare(idx, w, occurrences(rank.reshape(-1)))

    def indices_and_weights(self, epoch: int, total_epochs: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, weights)``: float32 curriculum weights aligned with :meth:`indices`.

        Weight of index ``i`` = ``f(initial_weights[i], t)`` with ``t`` = :func:`curriculum_progress`
        (``epoch / (total_epochs - 1)``), or the official ramp when ``schedule == "official"``.
        Without ``initial_weights`` all weights are 1.
        """
        t, code = _progress_and_code(self.schedule, epoch, total_epochs)
        idx = self.indices(epoch)
        if self.initial_weights is None:
            return idx, np.ones(idx.size, dtype=np.float32)
        v1 = self.initial_weights[idx]
        if code == 3:
            w = v1 + (1.0 - v1) * t
        else:
            w = instance_weight(v1, t, self.schedule)
        return idx, w.astype(np.float32)


def _progress_and_code(schedule: str, epoch: int, total_epochs: int) -> tuple[float, int]:
    code = schedule_code(schedule)
    if code == 3:
        _as_int(epoch, "epoch", 0)
        _as_int(total_epochs, "total_epochs", 1)
        return official_progress(epoch, total_epochs), code
    return curriculum_progress(epoch, total_epochs), code


_EMPTY_F64 = np.zeros(0, dtype=np.float64)
_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_SHUFFLE_BLOCK = 4096  # swap targets (and scheduled weights) computed per vectorised block in _shuffle_kernel


class _ArraySampler(Sampler):
    """Shared machinery of the built-in samplers: validation, CSR, seeding, sharding, weights.

    Internal, not an extension point: subclasses implement ``_draw`` (build and run their kernels) and
    may override ``_default_length``. Scratch arrays persist between epochs (``_scratch``): fresh
    memory costs a page fault per 4 KiB on first touch, which at ImageNet-LT size is more than the
    whole epoch's sampling.
    """

    def __init__(self, labels: Any, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 num_samples: int | None = None, initial_weights: Any = None, schedule: str = "linear"):
        self.labels = _as_labels(labels)
        self.class_offsets, self.class_members = class_csr(self.labels)
        self.class_counts = np.diff(self.class_offsets)
        self.num_classes = int(self.class_counts.size)
        self.seed = _as_int(seed, "seed", 0)
        self.num_replicas = _as_int(num_replicas, "num_replicas", 1)
        self.rank = _as_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {self.rank}")
        self.num_samples = None if num_samples is None else _as_int(num_samples, "num_samples", 1)
        schedule_code(schedule)  # validates the name
        self.schedule = schedule
        self.initial_weights = None
        self._v1_sorted = _EMPTY_F64
        if initial_weights is not None:
            w = np.ascontiguousarray(initial_weights, dtype=np.float64)
            if w.shape != self.labels.shape:
                raise ValueError(f"initial_weights must have one value per sample (shape {self.labels.shape}), "
                                 f"got shape {w.shape}")
            if not np.all(np.isfinite(w)):
                bad = int(np.flatnonzero(~np.isfinite(w))[0])
                raise ValueError(f"initial_weights[{bad}] = {w[bad]!r} is not finite")
            self.initial_weights = w
            # class-CSR order: the kernels read a class's weights contiguously
            self._v1_sorted = np.ascontiguousarray(w[self.class_members])
        # the kernels draw bounded integers below 2**32 (class sizes, epoch lengths of shuffles)
        if max(self.labels.size, self.num_samples or 0) > _MAX_CLASS_OR_DRAW:
            raise ValueError(f"at most {_MAX_CLASS_OR_DRAW} samples are supported, got "
                             f"{max(self.labels.size, self.num_samples or 0)}")
        self._lock = threading.Lock()
        self._buffers: dict[str, np.ndarray] = {}
        #: per-process batch of the training loader when sharding in batches (:meth:`shard_batches`)
        self.shard_block: int | None = None

    def shard_batches(self, batch_size: int) -> "_ArraySampler":
        """Shard in blocks of ``batch_size`` from now on (see :meth:`Sampler.shard_batches`); returns self."""
        self.shard_block = _as_int(batch_size, "batch_size", 1)
        return self

    @property
    def topped_up(self) -> tuple[int, int] | None:
        """``(epoch length, topped-up length)`` when the epoch was shorter than one micro-step of the
        ranks together (``num_replicas x`` the batch) and is extended to it by repeating samples, else None."""
        base = self._base_length()
        return (base, self.global_length) if self.global_length > base else None

    def _take_share(self, order: np.ndarray) -> np.ndarray:
        if self.shard_block is not None:
            return _shard_batches(order, self.num_replicas, self.rank, self.shard_block)
        return _shard(order, self.num_replicas, self.rank)

    def _share_occurrences(self, order: np.ndarray) -> np.ndarray:
        """This rank's share of the occurrence numbers of the global ``order`` (of the padded order when
        the share wraps around its start: the padding repeats samples too)."""
        if self.shard_block is None and self.num_replicas > 1:
            order = np.resize(order, -(-order.size // self.num_replicas) * self.num_replicas)
        return self._take_share(occurrences(order))

    def __getstate__(self) -> dict:
        # locks do not pickle, and scratch is not worth shipping to another process
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_buffers"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    #: Epochs longer than this many positions are planned in chunks of about this size (streaming
    #: kernels: the same order in bounded memory, this rank's share plus one chunk; see
    #: ``results/bench_sampler_memory.json``). Shorter epochs use the whole-epoch kernels (faster).
    plan_chunk: int = 1 << 22

    def _scratch(self, name: str, size: int, dtype: Any) -> np.ndarray:
        """A reusable scratch array of ``size`` elements (call with ``self._lock`` held)."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size]

    # ---- lengths ---------------------------------------------------------------------------------
    def _default_length(self) -> int:
        return int(self.labels.size)

    def _base_length(self) -> int:
        return self.num_samples if self.num_samples is not None else self._default_length()

    @property
    def global_length(self) -> int:
        """Length of the (unpadded) global order of one epoch: ``num_samples`` (default: the data's size),
        topped up to one micro-step ``num_replicas x shard_block`` when it is shorter (see :attr:`topped_up`)."""
        n = self._base_length()
        if self.shard_block is not None:
            n = max(n, self.num_replicas * self.shard_block)
        return n

    def __len__(self) -> int:
        """Per-rank length: ``ceil(global_length / num_replicas)``; when sharding in batches, the whole
        micro-steps' share ``floor(global_length / (R b)) x b``."""
        if self.shard_block is not None:
            return (self.global_length // (self.num_replicas * self.shard_block)) * self.shard_block
        return -(-self.global_length // self.num_replicas)

    # ---- drawing ---------------------------------------------------------------------------------
    def _draw(self, seed: int, with_w: bool, code: int, t: float, out_idx: np.ndarray, out_w: np.ndarray,
              epoch: int) -> None:
        """Fill ``out_idx`` (and ``out_w`` if ``with_w``) with the epoch's global order."""
        raise NotImplementedError

    def _fill_groups(self, group_class: np.ndarray, group_size: int, seed: int, with_w: bool, code: int,
                     t: float, out_idx: np.ndarray, out_w: np.ndarray) -> None:
        """Run :func:`_fill_from_class_cycles` for a class sequence, with this sampler's scratch."""
        n = out_idx.size
        max_m = int(self.class_counts.max())
        wtmp = self._scratch("wtmp", max_m, np.float32) if with_w else _EMPTY_F32
        _fill_from_class_cycles(
            group_class, group_size, self.class_offsets, self.class_members,
            self._v1_sorted if with_w else _EMPTY_F64, code, t, seed,
            self._scratch("buf", n, np.uint64), self._scratch("scratch", max_m, np.uint64),
            wtmp, wtmp.view(np.uint32), self._scratch("jbuf", max_m, np.int64), out_idx,
            out_w.view(np.uint32) if with_w else _EMPTY_U32)

    def _shuffle(self, members: np.ndarray, seed: int, with_w: bool, code: int, t: float,
                 out_idx: np.ndarray, out_w: np.ndarray) -> None:
        """Run :func:`_shuffle_kernel` over ``members`` with this sampler's scratch."""
        # weights: packed words permuted in ``work`` (m); indices only: ``work`` for a partial cycle
        need_work = with_w or out_idx.size % members.size != 0
        work = self._scratch("work", members.size, np.uint64) if need_work else _EMPTY_U64
        wtmp = self._scratch("wtmp", _SHUFFLE_BLOCK, np.float32) if with_w else _EMPTY_F32
        _shuffle_kernel(members, self.initial_weights if with_w else _EMPTY_F64, seed, code, t,
                        self._scratch("jbuf", _SHUFFLE_BLOCK, np.int64), work, work.view(np.int64),
                        self._scratch("vbuf", _SHUFFLE_BLOCK, np.float64) if with_w else _EMPTY_F64,
                        wtmp, wtmp.view(np.uint32), out_idx,
                        out_w.view(np.uint32) if with_w else _EMPTY_U32)

    def _epoch_seed(self, epoch: int) -> int:
        epoch = _as_int(epoch, "epoch", 0)
        return (self.seed + epoch) % _SEED_MOD

    def _global(self, epoch: int, with_w: bool, code: int = 0, t: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        seed = self._epoch_seed(epoch)
        out_idx = np.empty(self.global_length, dtype=np.int64)
        out_w = np.empty(self.global_length, dtype=np.float32) if with_w else _EMPTY_F32
        with self._lock:
            self._draw(seed, with_w, code, float(t), out_idx, out_w, int(epoch))
        return out_idx, out_w

    def global_indices(self, epoch: int) -> np.ndarray:
        """The whole epoch's global order (identical on every rank), before padding and sharding."""
        return self._global(epoch, False)[0]

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's int64 dataset indices for ``epoch`` (see the module docstring on sharding)."""
        return self._plan_share(epoch, False)[0]

    def epoch_share(self, epoch: int, total_epochs: int | None = None) -> SamplerShare:
        """:meth:`Sampler.epoch_share` in one pass, the occurrences counted over the global order."""
        if total_epochs is None:
            idx, _, occ = self._plan_share(epoch, False, with_occ=True)
            return SamplerShare(idx, None, occ)
        t, code = _progress_and_code(self.schedule, epoch, total_epochs)
        with_w = self.initial_weights is not None
        idx, w, occ = self._plan_share(epoch, with_w, code, t, with_occ=True)
        return SamplerShare(idx, w if with_w else np.ones(idx.size, dtype=np.float32), occ)

    # ---- bounded-memory planning ---------------------------------------------------------------
    def _plan_share(self, epoch: int, with_w: bool, code: int = 0, t: float = 0.0, with_occ: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """This rank's share (indices, weights or None, occurrences or None) of ``epoch``: from the whole
        global order when it has at most :attr:`plan_chunk` positions, else streamed chunk by chunk (the
        same order)."""
        if self.global_length <= self.plan_chunk:
            out_idx, out_w = self._global(epoch, with_w, code, t)
            return (self._take_share(out_idx), self._take_share(out_w) if with_w else None,
                    self._share_occurrences(out_idx) if with_occ else None)
        return self._streamed_share(epoch, with_w, code, float(t), with_occ)

    def _stream_group_size(self) -> int:
        """Positions per group of the streamed order (chunks start at a group boundary)."""
        return 1

    def _stream(self, seed: int, with_w: bool, code: int, t: float, n: int, chunk: int, epoch: int):
        """Yield ``(lo, words)``: positions ``lo .. lo + len(words) - 1`` of the global order as uint64 words
        (``index << 32 | float32 bits of the weight`` with weights, else the index), ``chunk`` at a time."""
        raise NotImplementedError

    def _streamed_share(self, epoch: int, with_w: bool, code: int, t: float, with_occ: bool = False
                        ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`_plan_share` in bounded memory: the global order is streamed in chunks of about
        :attr:`plan_chunk` positions and only this rank's positions are kept (its share, by the same
        rules as :meth:`_take_share`). Occurrences are counted over the stream with one counter per
        dataset sample."""
        seed = self._epoch_seed(epoch)
        n, reps, rank, b = self.global_length, self.num_replicas, self.rank, self.shard_block
        gs = self._stream_group_size()
        if b is not None:  # blocks of b, block j to rank j mod R, whole micro-steps only
            step = reps * b
            kept = (n // step) * step
            size = (n // step) * b
            align = int(np.lcm(step, gs))
            segments = []
        else:  # the contiguous share [start, end) of the order repeated cyclically (np.resize padding)
            per = -(-n // reps)
            start, end = rank * per, (rank + 1) * per
            size, kept, step = per, 0, 1
            # (first, last + 1) position in the order, where in the share, and which pass over the order
            segments = [(max(start, k * n) - k * n, min(end, (k + 1) * n) - k * n, max(start, k * n) - start, k)
                        for k in range(start // n, (end - 1) // n + 1)]
            align = gs
        chunk = max(align, (self.plan_chunk // align) * align)
        share = np.empty(size, dtype=np.int64)
        wshare = np.empty(size, dtype=np.float32) if with_w else None
        oshare = np.empty(size, dtype=np.int64) if with_occ else None
        counts = np.zeros(self.labels.size, dtype=np.int64) if with_occ else None
        with self._lock:
            for lo, words in self._stream(seed, with_w, code, t, n, chunk, int(epoch)):
                hi = lo + words.size
                if with_w:
                    idx = (words >> _U32).astype(np.int64)
                    w = (words & _LOW32).astype(np.uint32).view(np.float32)
                else:
                    idx, w = words.view(np.int64), None
                occ = occurrences(idx, counts) if with_occ else None
                if b is not None:
                    top = min(hi, kept)
                    if top <= lo:
                        continue
                    o = (lo // step) * b
                    for arr, out in ((idx, share), (w, wshare), (occ, oshare)):
                        if out is not None:
                            blk = arr[:top - lo].reshape(-1, reps, b)[:, rank, :].reshape(-1)
                            out[o:o + blk.size] = blk
                    continue
                for s0, s1, base, _ in segments:
                    a, z = max(lo, s0), min(hi, s1)
                    if a < z:
                        for arr, out in ((idx, share), (w, wshare), (occ, oshare)):
                            if out is not None:
                                out[base + a - s0:base + z - s0] = arr[a - lo:z - lo]
        if with_occ:
            # pass k over the order (the padding) comes after k whole passes: add k x each sample's total
            for s0, s1, base, k in segments:
                if k:
                    part = slice(base, base + s1 - s0)
                    oshare[part] += k * counts[share[part]]
        return share, wshare, oshare

    def _packed(self, members: np.ndarray, v1: np.ndarray, with_w: bool, code: int, t: float) -> np.ndarray:
        """``members`` as uint64 stream words: ``member << 32 | float32 bits of f(v1, t)`` with weights
        (``v1`` aligned with ``members``), else the members themselves."""
        words = members.astype(np.uint64)
        if with_w:
            wt = np.empty(members.size, dtype=np.float32)
            _schedule_block(np.ascontiguousarray(v1, dtype=np.float64), code, t, wt)
            words = (words << _U32) | wt.view(np.uint32).astype(np.uint64)
        return words

    def _stream_groups(self, make_groups, seed: int, with_w: bool, code: int, t: float, n: int, chunk: int):
        """:meth:`_stream` for the group-based kernels (:func:`_fill_from_class_cycles`): ``make_groups()``
        returns a fresh ``gen(g0, out)`` writing the classes of groups ``g0 ..`` in order. One pass over
        the groups counts each class's draws (the counter offsets), a second one draws."""
        gs = self._stream_group_size()
        num_classes = self.num_classes
        num_groups = -(-n // gs)
        gbuf = np.empty(max(1, chunk // gs), dtype=np.int64)
        counts = np.zeros(num_classes, dtype=np.int64)
        gen = make_groups()
        last = 0
        for g0 in range(0, num_groups, gbuf.size):
            cnt = min(gbuf.size, num_groups - g0)
            gen(g0, gbuf[:cnt])
            counts += np.bincount(gbuf[:cnt], minlength=num_classes) * gs
            last = int(gbuf[cnt - 1])
        if n % gs:
            counts[last] -= gs - n % gs  # the last group is cut short at n
        ctr_base = np.zeros(num_classes, dtype=np.int64)
        np.cumsum(counts[:-1], out=ctr_base[1:])
        state = self._packed(self.class_members, self._v1_sorted if with_w else _EMPTY_F64, with_w, code, t)
        taken = np.zeros(num_classes, dtype=np.int64)
        out = np.empty(chunk, dtype=np.uint64)
        cbuf = np.empty(chunk, dtype=np.uint64)
        gen = make_groups()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            g0, g1 = lo // gs, -(-hi // gs)
            gen(g0, gbuf[:g1 - g0])
            _stream_class_draws(gbuf[:g1 - g0], gs, self.class_offsets, state, taken, ctr_base, seed, cbuf,
                                out[:hi - lo])
            yield lo, out[:hi - lo]

    def _stream_shuffle_of(self, members: np.ndarray, seed: int, with_w: bool, code: int, t: float, n: int,
                           chunk: int):
        """:meth:`_stream` for the shuffle kernel (:func:`_shuffle_kernel`) over ``members``."""
        v1 = self.initial_weights[members] if with_w else _EMPTY_F64
        init = self._packed(members, v1, with_w, code, t)
        state = init.copy()
        out = np.empty(chunk, dtype=np.uint64)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            _stream_shuffle(init, seed, lo, state, out[:hi - lo])
            yield lo, out[:hi - lo]

    def indices_and_weights(self, epoch: int, total_epochs: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, weights)`` of this rank, the float32 weights computed in the same njit pass.

        ``weights[k] = f(initial_weights[indices[k]], t)`` with ``f`` the sampler's ``schedule`` and
        ``t = epoch / (total_epochs - 1)`` (``t = 1`` when ``total_epochs == 1``); for
        ``schedule="official"`` the unclamped ramp of :func:`lfme_fast.schedules.official_instance_weight`.
        Without ``initial_weights`` the weights are ones.
        """
        t, code = _progress_and_code(self.schedule, epoch, total_epochs)
        if self.initial_weights is None:
            idx = self.indices(epoch)
            return idx, np.ones(idx.size, dtype=np.float32)
        return self._plan_share(epoch, True, code, t)[:2]


# ==================================================================================================
# Samplers
# ==================================================================================================


class ClassBalancedSampler(_ArraySampler):
    """OLTR's ``ClassAwareSampler`` (LFME's student sampler), one epoch per ``(seed, epoch)``.

    Cycle over the shuffled classes (reshuffled each time the cycle is exhausted); from each chosen
    class take ``samples_per_class`` consecutive indices of that class's own reshuffling cycle (a
    class smaller than ``samples_per_class`` wraps, reshuffling at each wrap). The epoch has
    ``num_samples`` indices, ``len(labels)`` by default (OLTR uses ``max count * C``; pass that as
    ``num_samples`` to match it). Within an epoch every class is visited ``k`` or ``k + 1`` times, so
    per-class draw counts differ by at most ``samples_per_class``.

    Unlike OLTR, the cycles restart each epoch from ``seed + epoch`` instead of carrying their state
    over: an epoch is reproducible on its own (resumption, every rank of a distributed job).
    """

    def __init__(self, labels: Any, samples_per_class: int = 4, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, num_samples: int | None = None, initial_weights: Any = None,
                 schedule: str = "linear"):
        self.samples_per_class = _as_int(samples_per_class, "samples_per_class", 1)
        super().__init__(labels, seed, num_replicas, rank, num_samples, initial_weights, schedule)

    def _draw(self, seed, with_w, code, t, out_idx, out_w, epoch):
        spc = self.samples_per_class
        group_class = self._scratch("group_class", -(-out_idx.size // spc), np.int64)
        _class_cycle_groups(self.num_classes, seed, group_class)
        self._fill_groups(group_class, spc, seed, with_w, code, t, out_idx, out_w)

    def _stream_group_size(self) -> int:
        return self.samples_per_class

    def _stream(self, seed, with_w, code, t, n, chunk, epoch):
        num_classes = self.num_classes

        def make_groups():
            cycle = np.arange(num_classes, dtype=np.int64)  # _class_cycle_groups' starting cycle
            return lambda g0, out: _stream_class_cycle(num_classes, seed, g0, cycle, out)

        return self._stream_groups(make_groups, seed, with_w, code, t, n, chunk)


class InstanceSampler(_ArraySampler):
    """Plain shuffle: a fresh permutation of all samples each epoch (several back to back if
    ``num_samples`` exceeds the dataset)."""

    def __init__(self, labels: Any, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 num_samples: int | None = None, initial_weights: Any = None, schedule: str = "linear"):
        super().__init__(labels, seed, num_replicas, rank, num_samples, initial_weights, schedule)
        self._members = np.arange(self.labels.size, dtype=np.int64)

    def _draw(self, seed, with_w, code, t, out_idx, out_w, epoch):
        self._shuffle(self._members, seed, with_w, code, t, out_idx, out_w)

    def _stream(self, seed, with_w, code, t, n, chunk, epoch):
        return self._stream_shuffle_of(self._members, seed, with_w, code, t, n, chunk)


class SubsetSampler(_ArraySampler):
    """Plain shuffle restricted to the images whose label is in ``classes`` (an LFME expert's data).

    ``labels`` are the *whole* dataset's labels and the returned indices are **global dataset
    indices** (positions in ``labels``), so the expert reads the same shards as the student. The epoch
    length defaults to the subset's size; each subset image appears exactly once per epoch then.
    Attributes: ``classes`` (sorted unique subset classes), ``subset_indices`` (sorted global indices
    of the subset's images) and ``label_map`` (length C; global class -> label in the expert's own label
    space ``0..len(classes)-1``, or -1 for classes outside the subset).
    """

    def __init__(self, labels: Any, classes: Sequence[int] | np.ndarray, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, num_samples: int | None = None, initial_weights: Any = None,
                 schedule: str = "linear"):
        super().__init__(labels, seed, num_replicas, rank, num_samples, initial_weights, schedule)
        cls = np.asarray(classes)
        if cls.ndim != 1 or cls.size == 0 or not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"classes must be a non-empty 1-D array of class ids, got {classes!r}")
        bad = (cls < 0) | (cls >= self.num_classes)
        if bad.any():
            raise ValueError(f"classes contains {int(cls[bad][0])}, not a class of labels (0..{self.num_classes - 1})")
        self.classes = np.unique(cls).astype(np.int64)
        self.label_map = np.full(self.num_classes, -1, dtype=np.int64)
        self.label_map[self.classes] = np.arange(self.classes.size, dtype=np.int64)
        self.subset_indices = np.flatnonzero(self.label_map[self.labels] >= 0).astype(np.int64)

    def _default_length(self) -> int:
        return int(self.subset_indices.size)

    def _draw(self, seed, with_w, code, t, out_idx, out_w, epoch):
        self._shuffle(self.subset_indices, seed, with_w, code, t, out_idx, out_w)

    def _stream(self, seed, with_w, code, t, n, chunk, epoch):
        return self._stream_shuffle_of(self.subset_indices, seed, with_w, code, t, n, chunk)


class _ClassProbabilitySampler(_ArraySampler):
    """Draws classes i.i.d. from ``class_probabilities(epoch)``; within a class, its reshuffling cycle."""

    def class_probabilities(self, epoch: int) -> np.ndarray:
        """Per-class sampling probabilities (float64, sum 1) for ``epoch``."""
        raise NotImplementedError

    def _draw(self, seed, with_w, code, t, out_idx, out_w, epoch):
        cum = np.cumsum(self.class_probabilities(epoch))
        group_class = self._scratch("group_class", out_idx.size, np.int64)
        _class_prob_groups(cum, seed, group_class)
        self._fill_groups(group_class, 1, seed, with_w, code, t, out_idx, out_w)

    def _stream(self, seed, with_w, code, t, n, chunk, epoch):
        cum = np.cumsum(self.class_probabilities(epoch))
        return self._stream_groups(lambda: (lambda g0, out: _class_prob_groups(cum, seed, out, g0)),
                                   seed, with_w, code, t, n, chunk)


class SquareRootSampler(_ClassProbabilitySampler):
    """Square-root sampling: class ``c`` with probability ``sqrt(n_c) / sum_k sqrt(n_k)``."""

    def class_probabilities(self, epoch: int) -> np.ndarray:
        p = np.sqrt(self.class_counts.astype(np.float64))
        return p / p.sum()


class ProgressiveSampler(_ClassProbabilitySampler):
    """Progressively balanced sampling (Kang et al., "Decoupling representation and classifier", 2020).

    ``p_c(epoch) = (1 - epoch / T) * n_c / N + (epoch / T) * 1 / C`` with ``T = total_epochs`` and
    0-based ``epoch`` — Kang et al.'s ``t / T`` read literally: epoch 0 is instance-balanced and the
    last epoch is ``(T - 1) / T`` of the way to class-balanced.
    """

    def __init__(self, labels: Any, total_epochs: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 num_samples: int | None = None, initial_weights: Any = None, schedule: str = "linear"):
        self.total_epochs = _as_int(total_epochs, "total_epochs", 1)
        super().__init__(labels, seed, num_replicas, rank, num_samples, initial_weights, schedule)

    def class_probabilities(self, epoch: int) -> np.ndarray:
        epoch = _as_int(epoch, "epoch", 0)
        if epoch >= self.total_epochs:
            raise ValueError(f"epoch must be in [0, total_epochs={self.total_epochs}), got {epoch}")
        r = epoch / self.total_epochs
        counts = self.class_counts.astype(np.float64)
        return (1.0 - r) * counts / counts.sum() + r / counts.size


# ==================================================================================================
# One builder for every recipe
# ==================================================================================================

#: Sampler kind (the config's ``train.sampler`` names) -> class. :func:`build_sampler` constructs any
#: class registered here, a user's own included, from the arguments its ``__init__`` accepts.
SAMPLERS: dict[str, type[Sampler]] = {
    "instance": InstanceSampler,
    "class_balanced": ClassBalancedSampler,
    "sqrt": SquareRootSampler,
    "progressive": ProgressiveSampler,
    "subset": SubsetSampler,
}

# Run-wide settings every caller knows: passed to the kinds that take them, ignored by the others (so
# a recipe need not branch on the kind). Any other argument a kind cannot take is an error when set.
_RUN_WIDE = frozenset({"seed", "samples_per_class", "total_epochs"})
_BUILDER_DEFAULTS = {"num_replicas": 1, "rank": 0, "num_samples": None, "classes": None,
                     "initial_weights": None, "schedule": None}


def build_sampler(kind: str, labels: Any, *, seed: int, num_replicas: int = 1, rank: int = 0,
                  num_samples: int | None = None, samples_per_class: int = 4, total_epochs: int | None = None,
                  classes: Sequence[int] | np.ndarray | None = None, initial_weights: Any = None,
                  schedule: str | None = None) -> Sampler:
    """The sampler of ``kind`` (a key of :data:`SAMPLERS`) over ``labels``, for rank ``rank`` of
    ``num_replicas``.

    ``samples_per_class`` (class_balanced) and ``total_epochs`` (progressive, where it is required)
    are run-wide settings, ignored by the kinds that do not use them; ``classes`` (required by
    ``subset``) selects the data, so it is an error for any other kind, as is any other argument set
    to a non-default value for a kind that does not take it. ``schedule`` None = the class default
    ('linear'). The samplers themselves are unchanged: same class, same arguments, same output.
    """
    cls = SAMPLERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown sampler kind {kind!r}: choose one of {', '.join(SAMPLERS)}")
    given = dict(seed=seed, num_replicas=num_replicas, rank=rank, num_samples=num_samples,
                 samples_per_class=samples_per_class, total_epochs=total_epochs, classes=classes,
                 initial_weights=initial_weights, schedule=schedule)
    params = inspect.signature(cls).parameters
    kwargs = {}
    for name, value in given.items():
        if name in params:
            required = params[name].default is inspect.Parameter.empty
            if value is None and required:
                raise ValueError(f"sampler {kind!r} ({cls.__name__}) needs {name}=")
            if value is not None:
                kwargs[name] = value
        elif name not in _RUN_WIDE and not _is_builder_default(name, value):
            raise ValueError(f"sampler {kind!r} ({cls.__name__}) does not take {name}= (got {value!r})")
    return cls(labels, **kwargs)


def _is_builder_default(name: str, value: Any) -> bool:
    default = _BUILDER_DEFAULTS[name]
    return value is None if default is None else value == default  # (arrays are never compared)


# ==================================================================================================
# Pure-Python reference (benchmark baseline)
# ==================================================================================================


class _RandomCycleIter:
    """OLTR's ``RandomCycleIter``: endless iterator over ``data``, reshuffled at each wrap."""

    def __init__(self, data, rng: random.Random):
        self.data_list = list(data)
        self.length = len(self.data_list)
        self.i = self.length - 1
        self.rng = rng

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        if self.i == self.length:
            self.i = 0
            self.rng.shuffle(self.data_list)
        return self.data_list[self.i]


def _class_aware_sample_generator(cls_iter, data_iter_list, n, num_samples_cls=1):
    """OLTR's generator, verbatim in logic: ``zip(*[it] * k)`` takes k consecutive items of one class."""
    i = 0
    j = 0
    while i < n:
        if j >= num_samples_cls:
            j = 0
        if j == 0:
            temp_tuple = next(zip(*[data_iter_list[next(cls_iter)]] * num_samples_cls))
            yield temp_tuple[j]
        else:
            yield temp_tuple[j]
        i += 1
        j += 1


class PythonClassAwareSampler:
    """Faithful pure-Python re-implementation of OLTR's ``ClassAwareSampler`` (the benchmark baseline).

    Same structure and per-sample Python work as OLTR (``RandomCycleIter`` per class and over classes,
    ``random.shuffle``, the ``zip`` trick), with two documented deviations: a private
    ``random.Random(seed)`` instead of the global ``random`` state, and an epoch length of
    ``num_samples`` (default ``len(labels)``, OLTR: ``max count * C``). As in OLTR, the cycles carry their
    state from one ``iter()`` to the next.
    """

    def __init__(self, labels: Any, samples_per_class: int = 4, num_samples: int | None = None, seed: int = 0):
        labels = [int(x) for x in labels]
        num_classes = len(set(labels))
        self.rng = random.Random(seed)
        self.class_iter = _RandomCycleIter(range(num_classes), self.rng)
        cls_data_list = [list() for _ in range(num_classes)]
        for i, label in enumerate(labels):
            cls_data_list[label].append(i)
        self.data_iter_list = [_RandomCycleIter(x, self.rng) for x in cls_data_list]
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        self.num_samples_cls = samples_per_class

    def __iter__(self):
        return _class_aware_sample_generator(self.class_iter, self.data_iter_list, self.num_samples,
                                             self.num_samples_cls)

    def __len__(self):
        return self.num_samples
