"""FFCV back end: the stock ``ffcv.loader.Loader`` over ``DIR/ffcv/<split>.beton``, ordered by our sampler.

* Order: :class:`SamplerOrder`, a ``TraversalOrder`` whose ``sample_order(epoch)`` returns this rank's
  indices of our :class:`~lfme_fast.loaders.base.EpochPlan`. ffcv's Loader rejects TraversalOrder
  subclasses and instances passed as ``order=`` but *calls* what it is given with itself, so we
  pass an instance whose ``__call__(loader)`` finishes ``TraversalOrder.__init__`` and returns
  itself (REFERENCE §3). ffcv's own ``distributed`` stays off: our samplers already shard.
* Pixels: ffcv's decoders (RandomResizedCrop / CenterCrop / Simple) and transforms; two additions
  written the ffcv way (an ``Operation`` whose generated code is numba-compiled):
  :class:`TableCropDecoder` (fixed views: the crop box of each sample comes from a table indexed by
  the batch's sample indices) and :class:`PadCropFlip` (28/32-px training augmentation).
* Per-epoch state for compiled code: numba freezes arrays captured by a jitted function as
  constants at compile time, and ffcv compiles the pipeline once. Tables the decoder must read at
  run time (the epoch, the boxes) are therefore reached through their address
  (:func:`_address_as_pointer` + ``numba.carray``); the owning numpy arrays live on the decoder
  object, so the memory outlives the compiled code. Recompiling each epoch instead would cost seconds.
* Weights/views per batch: looked up positionally in the epoch plan (ffcv returns batches in order
  of the traversal order) and checked against the decoded ``index`` field.

Note: ffcv sets numba's *and torch's* thread counts (to 1 on import, to ``num_workers`` when a
Loader is made and when an epoch starts); this module restores the caller's counts after each, in
the calling thread. (ffcv's epoch thread also sets torch's process-wide count to ``num_workers``,
which with the default — all cores — is torch's own default.)
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
from ffcv.fields.rgb_image import (  # noqa: E402
    IMAGE_MODES,
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402
from ffcv.transforms.ops import Convert  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

torch.set_num_threads(_THREADS_BEFORE_FFCV[0])
numba.set_num_threads(_THREADS_BEFORE_FFCV[1])

from lfme_fast.augment import (  # noqa: E402
    PAD_CROP_PADDING,
    flip_image_inplace,
    normalize_image_chw,
    normalize_table,
    view_hash,
)
from lfme_fast.loaders.base import (  # noqa: E402
    Batch, BatchLoader, EpochPlan, LoaderSpec, num_batches, plan_batch, plan_epoch)
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

class TableCropDecoder(SimpleRGBImageDecoder):
    """Decode, crop ``boxes[i, v]`` (``(y, x, h, w)`` stored pixels), resize (ffcv's ``resize_crop``,
    OpenCV INTER_AREA) and flip when ``flips[i, v]``, for each sample ``i`` of the batch.

    ``v`` is ``state[1]`` when ``state[1] >= 0`` (a forced view), else
    ``view_hash(seed, state[0] = epoch, i, K)`` — the same function as ``FixedViews.choose``.
    ``state`` is an int64 array the owner updates between epochs.
    """

    def __init__(self, output_size: tuple[int, int], boxes: np.ndarray, flips: np.ndarray, seed: int,
                 state: np.ndarray):
        super().__init__()
        self.output_size = output_size
        self.boxes = np.ascontiguousarray(boxes, dtype=np.int32)
        self.flips = np.ascontiguousarray(flips, dtype=np.uint8)
        self.seed = int(seed)
        if state.dtype != np.int64 or state.shape != (2,) or not state.flags.c_contiguous:
            raise ValueError("state must be a contiguous int64 array of 2 (epoch, forced view or -1)")
        self.state = state

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple[AllocationQuery, ...]]:
        widths = self.metadata["width"]
        heights = self.metadata["height"]
        max_width, max_height = np.uint64(widths.max()), np.uint64(heights.max())
        output_shape = (self.output_size[0], self.output_size[1], 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=u8),
                (AllocationQuery(output_shape, u8), AllocationQuery((max_height * max_width * np.uint64(3),), u8)))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        n, k = self.boxes.shape[:2]
        boxes_addr, flips_addr, state_addr = (self.boxes.ctypes.data, self.flips.ctypes.data,
                                              self.state.ctypes.data)
        seed = np.uint64(self.seed % 2**63)
        hash_view = view_hash
        flip = flip_image_inplace

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            boxes = numba.carray(_address_as_pointer(boxes_addr), (n, k, 4), np.int32)
            flips = numba.carray(_address_as_pointer(flips_addr), (n, k), np.uint8)
            state = numba.carray(_address_as_pointer(state_addr), (2,), np.int64)
            epoch, forced = state[0], state[1]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                v = forced if forced >= 0 else hash_view(seed, epoch, source_ix, k)
                y, x, h, w = boxes[source_ix, v, 0], boxes[source_ix, v, 1], boxes[source_ix, v, 2], \
                    boxes[source_ix, v, 3]
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, y, y + h, x, x + w, out)
                if flips[source_ix, v]:
                    flip(out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class PadCropFlip(Operation):
    """Zero-pad ``padding`` pixels, random crop back to the input size, horizontal flip with p = 0.5
    (the CIFAR recipe), on uint8 HWC batches; numba's per-thread generator supplies the randomness."""

    def __init__(self, padding: int = PAD_CROP_PADDING):
        super().__init__()
        self.padding = int(padding)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad = self.padding

        def pad_crop_flip(images, dst):
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
            for i in my_range(n):
                dy = np.random.randint(0, 2 * pad + 1) - pad  # source row = output row + dy
                dx = np.random.randint(0, 2 * pad + 1) - pad
                flip = np.random.random() < 0.5
                for r in range(h):
                    sr = r + dy
                    for c in range(w):
                        sc = (w - 1 - c if flip else c) + dx
                        if 0 <= sr < h and 0 <= sc < w:
                            for ch in range(3):
                                dst[i, r, c, ch] = images[i, sr, sc, ch]
                        else:
                            for ch in range(3):
                                dst[i, r, c, ch] = 0
            return dst[:n]

        pad_crop_flip.is_parallel = True
        return pad_crop_flip

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class RandomFlipInPlace(Operation):
    """Horizontal flip with probability ``flip_prob``, in place on uint8 HWC batches.

    Replaces ffcv's ``RandomHorizontalFlip``, which copies every image of the batch into a new
    buffer (mirrored or not); flipping the decoder's output in place touches only the flipped
    half and vectorises (measured: the stock op made the whole uint8 pipeline ~15% slower).
    """

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        flip_prob = self.flip_prob
        flip = flip_image_inplace

        def random_flip_inplace(images, _):
            n = images.shape[0]
            flips = np.random.rand(n) < flip_prob
            for i in my_range(n):
                if flips[i]:
                    flip(images[i])
            return images

        random_flip_inplace.is_parallel = True
        return random_flip_inplace

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), None


class NormalizeToCHW(Operation):
    """uint8 ``[N, H, W, 3]`` -> normalised float ``[N, 3, H, W]`` in one pass (numpy dtype ``dtype``),
    optionally with a random horizontal flip (p = ``flip_prob``) of the uint8 input first.

    Replaces ffcv's ``RandomHorizontalFlip`` + ``NormalizeImage`` + ``ToTorchImage(channels_last=False)``
    for contiguous NCHW output: that chain copies the whole batch for the flip, writes float HWC, then
    makes torch do a strided permuted copy, measured at ~0.5 ms per 224 px image on this machine —
    more than the JPEG decode itself. (With channels_last the stock chain is used: there the permute
    is a free view.)
    """

    def __init__(self, mean, std, dtype=np.float32, flip_prob: float = 0.0):
        super().__init__()
        self.table = normalize_table(mean, std).astype(dtype)
        self.dtype = np.dtype(dtype)
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        table = self.table  # 3 KB: frozen into the compiled code, which is what we want
        normalize = normalize_image_chw
        flip = flip_image_inplace
        flip_prob = self.flip_prob

        def normalize_to_chw(images, dst):
            n = images.shape[0]
            flips = np.random.rand(n) < flip_prob  # drawn outside the parallel loop, like ffcv's flip
            for i in my_range(n):
                if flips[i]:
                    flip(images[i])  # in place: the decoder's output buffer has no other reader
                normalize(images[i], table, dst[i])
            return dst[:n]

        normalize_to_chw.is_parallel = True
        return normalize_to_chw

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        h, w, c = previous_state.shape
        shape = (c, h, w)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=self.dtype),
                AllocationQuery(shape, self.dtype))


# ==================================================================================================
# Loader
# ==================================================================================================

def _whole_image_boxes(spec: LoaderSpec) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.zeros((spec.num_samples, 1, 4), dtype=np.int32)
    boxes[:, 0, 2] = spec.heights
    boxes[:, 0, 3] = spec.widths
    return boxes, np.zeros((spec.num_samples, 1), dtype=np.bool_)


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
        self._view_state = np.array([0, -1 if spec.fixed_view is None else spec.fixed_view], dtype=np.int64)
        res = (spec.resolution, spec.resolution)
        geometry = spec.geometry
        flip_in_normalize = 0.0  # rrc on the CPU NCHW path: the flip is folded into NormalizeToCHW
        if geometry == "views":
            image = [TableCropDecoder(res, spec.views.boxes, spec.views.flips, spec.views.seed, self._view_state)]
        elif geometry == "rrc":
            image = [RandomResizedCropRGBImageDecoder(res)]
            if spec.cuda or spec.channels_last:
                image.append(RandomFlipInPlace())
            else:
                flip_in_normalize = 0.5
        elif geometry == "center":
            image = [CenterCropRGBImageDecoder(res, ratio=spec.crop_ratio)]
        elif geometry == "pad_crop":
            image = [SimpleRGBImageDecoder(), PadCropFlip()]
        elif geometry == "identity":
            image = [SimpleRGBImageDecoder()]
        else:  # resize the whole image
            image = [TableCropDecoder(res, *_whole_image_boxes(spec), 0, self._view_state)]
        self._gpu_normalize = spec.cuda
        if spec.cuda:
            # Ship uint8 (4x fewer bytes), normalise on the GPU in torch (ffcv's GPU NormalizeImage needs cupy).
            image += [ToTensor(), ToDevice(spec.device, non_blocking=True), ToTorchImage(channels_last=True)]
        else:
            np_dtype = np.float16 if spec.dtype == torch.float16 else np.float32
            if spec.channels_last:
                mean = np.array(spec.mean) * 255
                std = np.array(spec.std) * 255
                image += [NormalizeImage(mean, std, np_dtype), ToTensor(), ToTorchImage(channels_last=True)]
            else:
                image += [NormalizeToCHW(spec.mean, spec.std, np_dtype, flip_prob=flip_in_normalize), ToTensor()]
            if spec.dtype == torch.bfloat16:
                image.append(Convert(torch.bfloat16))
        # Labels and indices stay on the CPU inside ffcv: the plan alignment check reads them there.
        self.loader = Loader(
            str(path), batch_size=spec.batch_size, num_workers=spec.num_workers, os_cache=spec.in_memory,
            order=SamplerOrder(self._plans), distributed=False, seed=spec.seed, drop_last=spec.drop_last,
            batches_ahead=batches_ahead,
            pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()],
                       "index": [IntDecoder(), ToTensor(), Squeeze()]})
        self._restore_threads()
        allocate_buffers_once(self.loader)
        self._epoch_iter = None
        if spec.cuda:
            self._mean = torch.tensor([m * 255 for m in spec.mean], device=spec.device).view(1, 3, 1, 1)
            self._inv_std = torch.tensor([1 / (s * 255) for s in spec.std], device=spec.device).view(1, 3, 1, 1)

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
        plan = self._plans.get(self.epoch)
        self._view_state[0] = self.epoch  # read by TableCropDecoder's compiled code
        self.loader.next_epoch = self.epoch  # ffcv asks the order for sample_order(next_epoch)
        pos = 0
        dev = spec.device
        self._stop_previous_epoch()
        self._epoch_iter = iter(self.loader)
        self._restore_threads()
        for images, labels, indices in self._epoch_iter:
            n = int(labels.shape[0])
            labels = labels.reshape(n)
            indices = indices.reshape(n)
            expect = plan.indices[pos:pos + n]
            if not np.array_equal(indices.numpy(), expect):
                raise RuntimeError(f"ffcv batch at position {pos} does not follow the epoch order")
            if self._gpu_normalize:
                x = (images.float() - self._mean).mul_(self._inv_std)
                fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
                images = x.to(dtype=spec.dtype, memory_format=fmt)
            # ffcv reuses its output buffers batches_ahead + 2 batches later: plan_batch copies the small
            # tensors (the images are documented as valid until then, like ffcv's own).
            yield plan_batch(plan, pos, images, labels, indices, dev)
            pos += n
