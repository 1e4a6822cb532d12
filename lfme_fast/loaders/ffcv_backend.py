"""FFCV back end: the stock ``ffcv.loader.Loader`` over ``DIR/ffcv/<split>.beton``, ordered by our sampler.

* Order: :class:`SamplerOrder`, a ``TraversalOrder`` whose ``sample_order(epoch)`` returns this rank's
  indices of our :class:`~lfme_fast.loaders.base.EpochPlan`. ffcv's Loader rejects TraversalOrder
  subclasses and instances passed as ``order=`` but *calls* what it is given with itself, so we
  pass an instance whose ``__call__(loader)`` finishes ``TraversalOrder.__init__`` and returns
  itself (REFERENCE §3). ffcv's own ``distributed`` stays off: our samplers already shard.
* Pixels: one decoder written the ffcv way (an ``Operation`` whose generated code is
  numba-compiled), :class:`PlanDecoder`: per sample it decodes the JPEG (ffcv's libjpeg-turbo
  ``imdecode``), crops the box the epoch plan gives that *position* and resizes it (ffcv's
  ``resize_crop``, OpenCV INTER_AREA) or copies a pad-crop window, then mirrors and normalises into
  the float32 output in one vectorised pass (CPU) or mirrors into uint8 (GPU: normalised on the
  device) — one parallel loop per batch, the crop still in cache when it is normalised. The random
  geometry therefore comes from the plan (seeded by (seed, epoch, index, occurrence)), as in the
  other back ends, instead of from ffcv's per-thread generators: same crops as torch/DALI for the
  same order, exact replay on resume. With colour augmentation the crop is colour-jittered in place
  (the plan's colour row, :func:`~lfme_fast.augment.colour_image`) before it is mirrored and
  normalised, in the same loop.
* Position of a sample in the epoch: ffcv hands the decoder ``batch_indices``, a slice of the order
  array our :class:`SamplerOrder` returned (``order[:n][b * bs:(b + 1) * bs]``, numpy views), so
  the position is the slice's address offset from the plan's index array. The decoder checks the
  plan's indices at that position against ``batch_indices`` and raises a flag the loader turns
  into an error, should a future ffcv copy the order instead.
* Per-epoch state for compiled code: numba freezes arrays captured by a jitted function as
  constants at compile time, and ffcv compiles the pipeline once. Tables the decoder must read at
  run time (the plan's indices, boxes, flips) are therefore reached through their address
  (:func:`_address_as_pointer` + ``numba.carray``); the owning numpy arrays live on the loader's
  current plan, which is replaced only after the previous epoch's thread has stopped.
* Weights/views per batch: looked up positionally in the epoch plan (ffcv returns batches in order
  of the traversal order) and checked against the decoded ``index`` field.

Note: ffcv sets numba's *and torch's* thread counts (to 1 on import, to ``num_workers`` when a
Loader is made and when an epoch starts); this module restores the caller's counts after each, in
the calling thread. (ffcv's epoch thread also sets torch's process-wide count to ``num_workers``,
which with the default is this process's share of the machine's cores,
:func:`lfme_fast.scale.default_num_workers`.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator, Optional, Tuple

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Importing ffcv runs Compiler.set_num_threads(1), which sets numba's *and torch's* thread counts to
# 1 in the importing thread; we put back what the process had (restored after the ffcv imports).
_THREADS_BEFORE_FFCV = (torch.get_num_threads(), numba.get_num_threads())

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.transforms.ops import Convert  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

torch.set_num_threads(_THREADS_BEFORE_FFCV[0])
numba.set_num_threads(_THREADS_BEFORE_FFCV[1])

from lfme_fast.augment import (  # noqa: E402
    COLOUR_COLUMNS, colour_image, copy_image, normalize_coefficients, normalize_image, window_into)
from lfme_fast.loaders.base import (  # noqa: E402
    Batch, BatchLoader, EpochPlan, LoaderSpec, normalize_tensors, normalize_uint8_torch, num_batches, plan_batch,
    plan_epoch)
from lfme_fast.shards import beton_path  # noqa: E402


@intrinsic
def _address_as_pointer(typingctx, address):
    """``void*`` from an integer address (for ``numba.carray`` over memory we own)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


# ==================================================================================================
# Order
# ==================================================================================================

class _PlanHolder:
    """The loader's epoch plans, shared with :class:`SamplerOrder` (plain state, no back-reference)."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.plans: dict[int, EpochPlan] = {}

    def get(self, epoch: int) -> EpochPlan:
        plan = self.plans.get(epoch)
        if plan is None:
            self.plans = {epoch: plan_epoch(self.spec, epoch)}  # keep only the current epoch
            plan = self.plans[epoch]
        return plan


class SamplerOrder(TraversalOrder):
    """ffcv traversal order = our sampler's order for this rank (see the module docstring)."""

    def __init__(self, plans: _PlanHolder):  # noqa: D107 -- TraversalOrder.__init__ runs in __call__
        self.plans = plans

    def __call__(self, loader) -> "SamplerOrder":
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.plans.get(epoch).indices


# ==================================================================================================
# Pixel operations
# ==================================================================================================

#: Slots of the decoder's plan-state array (int64): address and length of the current plan's
#: indices, addresses of its boxes and flips, the flag the decoder raises when a batch is not a
#: slice of the plan's indices, and the address of the plan's colour rows (0 without colour jitter).
_ST_INDICES, _ST_LENGTH, _ST_BOXES, _ST_FLIPS, _ST_ERROR, _ST_COLOUR = range(6)
_ST_SIZE = 6


class PlanDecoder(SimpleRGBImageDecoder):
    """Decode, crop the plan's box, resize (or copy a pad-crop window), mirror, and normalise (see the
    module docstring), for every sample of a batch in one parallel loop.

    ``window``: copy the ``output_size`` window at the box corner (pad-crop, identity) instead of
    resizing the box to ``output_size``. ``coef``: :func:`~lfme_fast.augment.normalize_coefficients`
    for float32 output (``[3, H, W]``, or ``[H, W, 3]`` when ``channels_last``), or None for uint8
    ``[H, W, 3]`` output. ``state``: int64 array of ``_ST_SIZE`` the owner fills before each epoch
    (``_ST_*``). ``colour``: apply each position's colour row of the plan to the crop (uint8, after
    crop/resize, before mirror and normalise) with :func:`~lfme_fast.augment.colour_image`.
    """

    def __init__(self, output_size: tuple[int, int], window: bool, coef: Optional[np.ndarray],
                 channels_last: bool, state: np.ndarray, colour: bool = False):
        super().__init__()
        if state.dtype != np.int64 or state.shape != (_ST_SIZE,) or not state.flags.c_contiguous:
            raise ValueError(f"state must be a contiguous int64 array of {_ST_SIZE}")
        self.colour = bool(colour)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.window = bool(window)
        self.coef = None if coef is None else np.ascontiguousarray(coef, dtype=np.float32).reshape(2, 3)
        self.channels_last = bool(channels_last)
        self.state = state

    def _output(self) -> tuple[tuple[int, ...], np.dtype]:
        h, w = self.output_size
        if self.coef is None:
            return (h, w, 3), np.dtype("<u1")
        return ((h, w, 3) if self.channels_last else (3, h, w)), np.dtype("<f4")

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple[AllocationQuery, ...]]:
        max_width, max_height = int(self.metadata["width"].max()), int(self.metadata["height"].max())
        decoded = max_height * max_width * 3
        shape, dtype = self._output()
        u8 = np.dtype("<u1")
        # Scratch for the decoded JPEG and the resized crop, one per *thread*: reused image after image,
        # it stays in the core's cache (per-sample scratch, as ffcv's own decoders have, is cold memory
        # for every image: measured ~15% more CPU time per image). The per-sample buffers below are a
        # fallback only (untouched, so never paged in), should a thread id exceed numba's thread count.
        # Allocated once: ffcv calls this method more than once, and compiled code holds the addresses.
        if getattr(self, "scratch_decoded", None) is None or self.scratch_decoded.shape[1] < decoded:
            threads = numba.config.NUMBA_NUM_THREADS
            self.scratch_decoded = np.empty((threads, decoded), dtype=u8)
            self.scratch_crop = np.empty((threads,) + self.output_size + (3,), dtype=u8)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype),  # the batch
                 AllocationQuery((np.uint64(decoded),), u8),  # fallback: the decoded JPEG
                 AllocationQuery(self.output_size + (3,), u8)))  # fallback: the resized crop

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        state_addr = self.state.ctypes.data
        window = self.window
        jitter = self.colour  # a compile-time constant: without colour the branch is compiled away
        to_float = self.coef is not None
        coef = self.coef if to_float else np.zeros((2, 3), dtype=np.float32)  # 24 bytes, frozen: wanted
        channels_last = self.channels_last
        normalize, copy, window_copy, colour = normalize_image, copy_image, window_into, colour_image
        threads = self.scratch_decoded.shape[0]
        dec_shape, dec_addr = self.scratch_decoded.shape, self.scratch_decoded.ctypes.data
        crop_shape, crop_addr = self.scratch_crop.shape, self.scratch_crop.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, crop_storage = my_storage
            state = numba.carray(_address_as_pointer(state_addr), (5,), np.int64)
            scratch_decoded = numba.carray(_address_as_pointer(dec_addr), dec_shape, np.uint8)
            scratch_crop = numba.carray(_address_as_pointer(crop_addr), crop_shape, np.uint8)
            n = len(batch_indices)
            length = state[_ST_LENGTH]
            pos0 = (batch_indices.ctypes.data - state[_ST_INDICES]) // 8
            ok = length > 0 and 0 <= pos0 and pos0 + n <= length
            if ok:
                plan_indices = numba.carray(_address_as_pointer(state[_ST_INDICES]), (length,), np.int64)
                for j in range(n):
                    if plan_indices[pos0 + j] != batch_indices[j]:
                        ok = False
            if not ok:
                state[_ST_ERROR] = 1  # the loader raises when it receives this batch
                return destination[:n]
            boxes = numba.carray(_address_as_pointer(state[_ST_BOXES]), (length, 4), np.int32)
            flips = numba.carray(_address_as_pointer(state[_ST_FLIPS]), (length,), np.uint8)
            colours = numba.carray(_address_as_pointer(state[_ST_COLOUR]), (length if jitter else 0, COLOUR_COLUMNS),
                                   np.float32)
            for j in my_range(n):
                p = pos0 + j
                tid = numba.get_thread_id()
                if tid < threads:
                    temp_buffer, crop = scratch_decoded[tid], scratch_crop[tid]
                else:
                    temp_buffer, crop = temp_storage[j], crop_storage[j]
                field = metadata[batch_indices[j]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                y, x, h, w = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
                if window:
                    window_copy(image, y, x, crop)
                else:
                    resize_crop_c(image, y, y + h, x, x + w, crop)
                if jitter:
                    colour(crop, colours[p])
                if to_float:
                    normalize(crop, coef, destination[j], flips[p] != 0, channels_last)
                else:
                    copy(crop, destination[j], flips[p] != 0)
            return destination[:n]

        decode.is_parallel = True
        return decode


# ==================================================================================================
# Loader
# ==================================================================================================

def point_decoder_at(state: np.ndarray, plan: EpochPlan) -> None:
    """Point the compiled :class:`PlanDecoder` sharing ``state`` at ``plan``'s arrays; the caller keeps
    ``plan`` alive until the epoch's thread has stopped."""
    plan.boxes = np.ascontiguousarray(plan.boxes, dtype=np.int32)
    plan.flips = np.ascontiguousarray(plan.flips, dtype=np.bool_)
    if plan.indices.dtype != np.int64 or not plan.indices.flags.c_contiguous:
        raise RuntimeError("epoch plan indices must be contiguous int64")
    state[_ST_INDICES] = plan.indices.ctypes.data
    state[_ST_LENGTH] = len(plan.indices)
    state[_ST_BOXES] = plan.boxes.ctypes.data
    state[_ST_FLIPS] = plan.flips.ctypes.data
    state[_ST_ERROR] = 0
    if plan.colour is not None:
        plan.colour = np.ascontiguousarray(plan.colour, dtype=np.float32)
        if plan.colour.shape != (len(plan.indices), COLOUR_COLUMNS):
            raise RuntimeError(f"epoch plan colour rows must be [{len(plan.indices)}, {COLOUR_COLUMNS}], "
                               f"got {plan.colour.shape}")
    state[_ST_COLOUR] = 0 if plan.colour is None else plan.colour.ctypes.data


def allocate_buffers_once(loader: Loader) -> None:
    """Make ``loader`` allocate its pipeline buffers once instead of once per epoch.

    ffcv's EpochIterator asks the graph for fresh buffers (``batches_ahead + 2`` slots of every
    stage's output) at each epoch; first-touch page faults on ~1 GB of new memory then cost
    ~0.25 ms per image on a 2,500-image epoch (measured: 1190 vs 1670 images per CPU-second).
    Reuse is safe when an epoch's thread has stopped before the next starts
    (:meth:`FFCVLoader.__iter__` makes sure of it).
    """
    graph = loader.graph
    allocate = graph.allocate_memory
    cache: dict = {}

    def allocate_once(batch_size, batches_ahead):
        key = (batch_size, batches_ahead)
        if key not in cache:
            cache[key] = allocate(batch_size, batches_ahead)
        return cache[key]

    graph.allocate_memory = allocate_once


class FFCVLoader(BatchLoader):
    """Stock ffcv ``Loader`` behind the :class:`BatchLoader` contract."""

    def __init__(self, spec: LoaderSpec, batches_ahead: int = 3):
        path = beton_path(spec.root, spec.split)
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: prepare the dataset with the ffcv format "
                                    "(python -m data_prep ... --formats wds,ffcv)")
        self.spec = spec
        self.epoch = 0
        # ffcv's Loader sets numba's and torch's thread counts to num_workers in the calling thread
        # (at construction and at each epoch start): we put the caller's counts back each time.
        self._caller_threads = (torch.get_num_threads(), numba.get_num_threads())
        self._plans = _PlanHolder(spec)
        self._plan_state = np.zeros(_ST_SIZE, dtype=np.int64)  # read by PlanDecoder's compiled code
        geometry = spec.geometry
        window = geometry in ("pad_crop", "identity")  # a stored-size window, not a resized box
        if window:
            out_size = (int(spec.heights.max()), int(spec.widths.max()))  # one size: checked by resolve_spec
        else:
            out_size = (spec.resolution, spec.resolution)
        self._gpu_normalize = spec.cuda
        if spec.cuda:
            # Ship uint8 (4x fewer bytes), normalise on the GPU in torch (ffcv's GPU NormalizeImage needs cupy).
            # ffcv allocates the decoder's host buffers page-locked when CUDA is available (pin_memory() in
            # its AllocationQuery), so ToDevice's non_blocking copy runs asynchronously on ffcv's per-slot
            # CUDA stream, and the epoch iterator makes the training stream wait for it.
            image = [PlanDecoder(out_size, window, None, False, self._plan_state, spec.jitters_colour),
                     ToTensor(), ToDevice(spec.device, non_blocking=True), ToTorchImage(channels_last=True)]
        else:
            coef = normalize_coefficients(spec.mean, spec.std)
            image = [PlanDecoder(out_size, window, coef, spec.channels_last, self._plan_state, spec.jitters_colour),
                     ToTensor()]
            if spec.channels_last:
                image.append(ToTorchImage(channels_last=True))  # a permuted view of the NHWC floats
            if spec.dtype != torch.float32:
                image.append(Convert(spec.dtype))
        # Labels and indices stay on the CPU inside ffcv: the plan alignment check reads them there.
        self.loader = Loader(
            str(path), batch_size=spec.pixel_batch_size, num_workers=spec.num_workers, os_cache=spec.in_memory,
            order=SamplerOrder(self._plans), distributed=False, seed=spec.seed, drop_last=spec.drop_last,
            batches_ahead=batches_ahead,
            pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()],
                       "index": [IntDecoder(), ToTensor(), Squeeze()]})
        self._restore_threads()
        allocate_buffers_once(self.loader)
        self._epoch_iter = None
        if spec.cuda:
            self._mean, self._inv_std = normalize_tensors(spec, spec.device)

    def _restore_threads(self) -> None:
        torch.set_num_threads(self._caller_threads[0])
        numba.set_num_threads(self._caller_threads[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_batches(self.spec)

    def _stop_previous_epoch(self) -> None:
        it, self._epoch_iter = self._epoch_iter, None
        if it is not None and it.is_alive():  # an epoch left early: its thread still fills the buffers
            it.close()
            it.join()

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        # Stop an epoch left early before its plan can be replaced: its thread still reads the plan.
        self._stop_previous_epoch()
        if spec.device.type == "cuda":
            # ffcv's buffers are kept across epochs (allocate_buffers_once) but a new epoch iterator
            # forgets the events that guard them: wait once for the last epoch's kernels that read them.
            torch.cuda.current_stream(spec.device).synchronize()
        plan = self._plans.get(self.epoch)
        point_decoder_at(self._plan_state, plan)
        self.loader.next_epoch = self.epoch  # ffcv asks the order for sample_order(next_epoch)
        pos = 0
        dev = spec.device
        self._epoch_iter = iter(self.loader)
        self._restore_threads()
        for images, labels, indices in self._epoch_iter:
            # Squeeze() makes a last batch of one sample 0-d: back to 1-d
            labels, indices = labels.reshape(-1), indices.reshape(-1)
            n = int(labels.shape[0])
            expect = plan.indices[pos:pos + n]
            if self._plan_state[_ST_ERROR] or not np.array_equal(indices.numpy(), expect):
                raise RuntimeError(f"ffcv batch at position {pos} does not follow the epoch order (or ffcv "
                                   "no longer hands the decoder slices of the order array)")
            if self._gpu_normalize:  # uint8 NCHW view (NHWC memory) on the GPU: normalise there
                images = normalize_uint8_torch(images, self._mean, self._inv_std, spec.dtype, spec.channels_last)
            # ffcv reuses its output buffers batches_ahead + 2 batches later: plan_batch copies the small
            # tensors (the images are documented as valid until then, like ffcv's own).
            yield plan_batch(plan, pos, images, labels, indices, dev)
            pos += n
