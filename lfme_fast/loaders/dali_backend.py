"""DALI back end: sampler-driven ``fn.external_source`` over the shard JPEGs, DALI decode + augmentation.

The Python side (:class:`EpochSource`) only *fetches*: for each batch of this rank's epoch plan it
hands DALI the encoded JPEG bytes (zero-copy views into the memory-mapped shards), labels, indices
and each sample's crop box and flip from the plan (the same seeded draws as the other back ends).
Everything else is the pure graph function :func:`augment_graph` — decode only the crop box
(``fn.decoders.image_slice``; ``device='mixed'`` = nvJPEG on the GPU when CUDA is available, else
the CPU decoder with ``device_id=None``), resize, mirror, normalise — wrapped by the thin
``pipeline_def`` :func:`_pipeline`.

Colour augmentation (``colour='simclr'``): each batch also carries the plan's colour rows. On the
CPU pipeline they go with the cropped images into ``numba_function`` (DALI's numba plugin), which runs
the very kernel the ffcv and torch back ends use (:func:`lfme_fast.augment.colour_image`), so the
three agree up to decoding and resizing. DALI's own colour ops do not fit: ``fn.color_twist`` /
``fn.hsv`` rotate hue in YIQ space (torchvision turns it in HSV), ``fn.brightness_contrast``
contrasts around a fixed centre (torchvision: the image's mean grey), and a static graph cannot run
the four ops in a per-sample random order. On a GPU pipeline the images stay on the device: the graph
only mirrors them (uint8) and :func:`colour_batch_torch`, the same maths in torch, jitters them
before they are normalised.

``external_source`` is given an iterable with ``cycle='raise'``: at the end of an epoch it raises
StopIteration and on ``reset()`` DALI calls ``iter()`` on it again, which starts the *current*
epoch plan (REFERENCE §3: without ``cycle='raise'`` the source does not survive a reset). It runs in
the pipeline's Python thread (``parallel=False``, see :class:`DALILoader` for why).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lfme_fast.augment import COLOUR_APPLY, COLOUR_GRAY, COLOUR_ORDER, GRAY_WEIGHTS, OP_HUE, colour_image
from lfme_fast.loaders.base import (
    Batch, BatchLoader, EpochPlan, LoaderSpec, normalize_uint8_nhwc, num_batches, plan_batch, plan_epoch)
from lfme_fast.shards import ShardReader

# Outputs of the external source, in order.
SOURCE_OUTPUTS = ("jpegs", "labels", "indices", "anchor", "shape", "flip")


class EpochSource:
    """The external source: ``iter()`` = this rank's batches of the current epoch plan.

    Each batch is a tuple of per-output batches (names in ``SOURCE_OUTPUTS``): JPEG byte arrays; int64
    labels and indices; float32 crop-box corner ``(y, x)`` and size ``(h, w)`` in stored pixels and
    int32 flip, from the plan; with ``colour``, also each sample's float32 colour row (output "colour").
    """

    def __init__(self, spec: LoaderSpec, colour: bool = False):
        self.spec = spec
        self.reader = ShardReader(spec.root, spec.split)
        self.plan: EpochPlan = plan_epoch(spec, 0)
        self.colour = bool(colour)
        if self.colour and self.plan.colour is None:
            raise ValueError("colour rows asked of a loader whose plans carry none")
        self.outputs = SOURCE_OUTPUTS + (("colour",) if self.colour else ())

    def __iter__(self):
        # DALI calls iter() as soon as the previous epoch ends (before reset() and set_epoch), so the
        # plan is read lazily, at the first batch request, which comes after reset().
        return self._batches()

    def _batches(self):
        reader, plan = self.reader, self.plan
        labels_all = reader.labels
        for sl in plan.batch_slices(self.spec.batch_size):
            idx = plan.indices[sl]
            boxes = plan.boxes[sl].astype(np.float32)
            # JPEG bytes as zero-copy views into the memory-mapped shards: DALI copies them once.
            batch = ([reader.get_bytes(int(i)) for i in idx], labels_all[idx].astype(np.int64), idx.astype(np.int64),
                     np.ascontiguousarray(boxes[:, 0:2]), np.ascontiguousarray(boxes[:, 2:4]),
                     plan.flips[sl].astype(np.int32))
            if self.colour:
                batch += (np.ascontiguousarray(plan.colour[sl], dtype=np.float32),)
            yield batch


# ---- colour augmentation ---------------------------------------------------------------------------

def _colour_setup(outs, ins):
    """numba_function setup: the jittered image has its input's shape."""
    out_shapes, in_shapes = outs[0], ins[0]
    for s in range(len(out_shapes)):
        for d in range(3):
            out_shapes[s][d] = in_shapes[s][d]


def _colour_run(out, image, colour):
    """numba_function body, one sample: ``out`` = ``image`` colour-jittered with its plan row."""
    out[:] = image
    colour_image(out, colour)


def _colour_cpu(images, colour):
    """DALI node: uint8 HWC ``images`` (CPU) jittered by the per-sample ``colour`` rows, with the numba kernel."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.fn.experimental import numba_function

    return numba_function(images, colour, run_fn=_colour_run, setup_fn=_colour_setup, out_types=[types.UINT8],
                          in_types=[types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1])


def _luma_torch(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0] * GRAY_WEIGHTS[0] + x[..., 1] * GRAY_WEIGHTS[1] + x[..., 2] * GRAY_WEIGHTS[2]


def _hue_torch(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue turned by ``shift`` (turns, per sample) on float ``[N, H, W, 3]``: the branch-free HSV
    round trip of :func:`lfme_fast.augment.colour_image`."""
    r, g, b = x.unbind(-1)
    maxc, minc = x.amax(-1), x.amin(-1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = h / 6.0 + shift.view(-1, 1, 1)
    h6 = (h - torch.floor(h)) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):  # red, green, blue
        k = n + h6
        k = torch.where(k >= 6.0, k - 6.0, k)
        out.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=-1)


def colour_batch_torch(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """:func:`lfme_fast.augment.colour_image` for a uint8 ``[N, H, W, 3]`` batch on any device (the GPU
    pipeline's images): the same ops, order, clipping and rounding, batched (each slot evaluates the
    blend ops and the hue turn for every sample and keeps the one its row names, without host syncs).
    Returns a new uint8 tensor."""
    x = images.float()
    p = colour.to(device=x.device, dtype=torch.float32)
    apply = (p[:, COLOUR_APPLY] != 0).view(-1, 1, 1, 1)
    code = p[:, COLOUR_ORDER].long()
    for slot in range(4):
        op = (code >> (2 * slot)) & 3
        factor = p.gather(1, (1 + op).view(-1, 1)).view(-1, 1, 1, 1)
        luma = _luma_torch(x)
        # brightness, contrast and saturation all blend with a grey: 0, the image's mean, the pixel's own
        grey = torch.where((op == 1).view(-1, 1, 1), luma.mean(dim=(1, 2), keepdim=True).expand_as(luma), luma)
        grey = torch.where((op == 0).view(-1, 1, 1), torch.zeros_like(luma), grey).unsqueeze(-1)
        blended = (factor * x + (1.0 - factor) * grey).clamp(0.0, 255.0)
        stepped = torch.where((op == OP_HUE).view(-1, 1, 1, 1), _hue_torch(x, factor.view(-1)), blended)
        x = torch.where(apply, stepped, x)
    gray = (p[:, COLOUR_GRAY] != 0).view(-1, 1, 1, 1)
    x = torch.where(gray, _luma_torch(x).unsqueeze(-1).expand_as(x), x)
    return torch.floor(x.clamp(0.0, 255.0) + 0.5).to(torch.uint8)


def decoder_arguments(spec: LoaderSpec, decode_device: str) -> dict:
    """Extra arguments of the JPEG decoder op for ``decode_device`` ('mixed' or 'cpu').

    'mixed' (nvJPEG on the GPU): ``hw_decoder_load`` when the loader sets one (the share of the JPEGs
    given to the hardware decoder of A100/H100-class GPUs; DALI's default 0.65 otherwise), and the
    largest stored image side as ``preallocate_height_hint``/``preallocate_width_hint``, so the hardware
    decoder's buffers are allocated once for the dataset instead of growing with the first large
    images. 'cpu': none (those arguments apply only to the mixed decoder).
    """
    if decode_device != "mixed":
        return {}
    args: dict = {}
    if spec.hw_decoder_load is not None:
        args["hw_decoder_load"] = float(spec.hw_decoder_load)
    if spec.heights.size:
        args["preallocate_height_hint"] = int(spec.heights.max())
        args["preallocate_width_hint"] = int(spec.widths.max())
    return args


def augment_graph(jpegs, anchor, shape, flip, colour=None, *, geometry: str, resolution: int, decode_device: str,
                  mean, std, dtype, layout: str, decoder: dict | None = None):
    """The DALI graph from encoded JPEGs to normalised images (a pure function of its inputs).

    ``anchor``/``shape``: each sample's crop box ``(y, x)``/``(h, w)`` in stored pixels; ``flip``: mirror.
    geometry 'rrc'/'views'/'center'/'resize': decode only the box (DALI's ROI decoding) and resize it
    to ``resolution``; 'pad_crop' (and 'identity', whose window is the whole image): decode, then the
    stored-size window at ``anchor`` with zero padding where it leaves the image. ``colour``: each
    sample's colour row, applied to the crop with the numba kernel (CPU decoding only: GPU pipelines
    jitter in torch, see the module docstring). ``decoder``: extra arguments of the decoder op
    (:func:`decoder_arguments`).
    """
    from nvidia.dali import fn, types

    decoder = dict(decoder or {})
    if geometry in ("pad_crop", "identity"):  # identity: the window (0, 0, H, W)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **decoder)
        images = fn.slice(images, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                          out_of_bounds_policy="pad", fill_values=0)
    elif geometry in ("rrc", "views", "center", "resize"):
        images = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device, output_type=types.RGB,
                                         axis_names="HW", normalized_anchor=False, normalized_shape=False, **decoder)
        images = fn.resize(images, size=(resolution, resolution))
    else:
        raise ValueError(f"unknown geometry {geometry!r}")
    if colour is not None:
        if decode_device != "cpu":
            raise ValueError("colour rows in the graph need CPU decoding (GPU pipelines jitter in torch)")
        images = _colour_cpu(images, colour)
    return fn.crop_mirror_normalize(images, mirror=flip, dtype=dtype, output_layout=layout,
                                    mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])


def _pipeline(source: EpochSource, geometry: str, resolution: int, decode_device: str, mean, std, dtype,
              layout: str, decoder: dict | None = None):
    """Thin ``pipeline_def`` wrapper: external source -> :func:`augment_graph` (+ labels, indices)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def pipe():
        nodes = dict(zip(source.outputs, fn.external_source(source=source, num_outputs=len(source.outputs),
                                                            batch=True, cycle="raise", parallel=False)))
        labels, indices = nodes.pop("labels"), nodes.pop("indices")
        images = augment_graph(**nodes, geometry=geometry, resolution=resolution, decode_device=decode_device,
                               mean=mean, std=std, dtype=dtype, layout=layout, decoder=decoder)
        return images, labels, indices

    return pipe


class DALILoader(BatchLoader):
    """DALI pipeline behind the :class:`BatchLoader` contract.

    GPU: chosen automatically when CUDA is available and the target device is CUDA (decode 'mixed',
    ``device_id`` = the target device's index, else the current CUDA device; the decoder's
    ``hw_decoder_load`` and preallocation hints from :func:`decoder_arguments`). CPU: ``device_id=None``.
    ``decode_device`` records which ('mixed' or 'cpu').

    ``parallel=False`` for the external source: the callback only slices memory-mapped shards (about
    a microsecond per sample) while DALI's own threads decode; process-parallel sources would add a
    copy of every JPEG through shared memory and a worker pool for no work to parallelise.
    """

    def __init__(self, spec: LoaderSpec, prefetch_queue_depth: int = 2):
        from lfme_fast.loaders import backend_missing

        missing = backend_missing("dali")
        if missing:  # DALI is an optional extra: say which one to install, not just "No module named nvidia"
            raise ImportError(missing)
        from nvidia.dali import types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.spec = spec
        self.epoch = 0
        gpu = spec.cuda and torch.cuda.is_available()
        if gpu:
            device_id = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        else:
            device_id = None
        self.gpu = gpu
        # Colour jitter: in the graph (numba kernel) on the CPU; in torch after the graph on the GPU, whose
        # graph then ends with uint8 HWC mirrored images (mean 0, std 1: crop_mirror_normalize only mirrors).
        self._colour_after = gpu and spec.jitters_colour
        self.source = EpochSource(spec, colour=spec.jitters_colour and not gpu)
        dtype = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
        self._layout = "HWC" if spec.channels_last else "CHW"
        mean, std = spec.mean, spec.std
        if self._colour_after:
            dtype, self._layout, mean, std = types.UINT8, "HWC", (0.0, 0.0, 0.0), (1 / 255.0,) * 3
        self.decode_device = "mixed" if gpu else "cpu"
        pipe_fn = _pipeline(self.source, spec.geometry, spec.resolution, self.decode_device, mean, std,
                            dtype, self._layout, decoder_arguments(spec, self.decode_device))
        self.pipe = pipe_fn(batch_size=spec.pixel_batch_size, num_threads=max(1, spec.num_workers),
                            device_id=device_id, prefetch_queue_depth=prefetch_queue_depth,
                            seed=spec.seed + 7919 * spec.rank)
        self.pipe.build()
        # prepare_first_batch=False: nothing is pulled from the source before the first __iter__ (after
        # set_epoch); PARTIAL keeps the short last batch of an eval epoch.
        self.iterator = DALIGenericIterator(self.pipe, ["images", "labels", "indices"], auto_reset=False,
                                            last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        self._started = False
        self._exhausted = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return num_batches(self.spec)

    def _restart(self) -> None:
        if self._started and not self._exhausted:
            # An epoch left early (train.max_steps_per_epoch, or the batches after the last whole
            # accumulation window): drain it so DALI can reset. The drained batches are decoded for
            # nothing, at most grad_accum - 1 of them when no step cap is set.
            for _ in self.iterator:
                pass
        if self.source.plan.epoch != self.epoch:
            self.source.plan = plan_epoch(self.spec, self.epoch)
        if self._started:
            self.iterator.reset()  # DALI calls iter(source) again: the plan set above
        self._started = True
        self._exhausted = False

    def __iter__(self) -> Iterator[Batch]:
        self._restart()
        spec, plan = self.spec, self.source.plan
        dev = spec.device
        pos = 0
        while True:
            try:
                out = next(self.iterator)[0]
            except StopIteration:
                self._exhausted = True
                return
            labels = out["labels"].reshape(-1)
            indices = out["indices"].reshape(-1)
            n = int(labels.shape[0])
            if not np.array_equal(indices.cpu().numpy(), plan.indices[pos:pos + n]):
                raise RuntimeError(f"DALI batch at position {pos} does not follow the epoch order")
            images = out["images"]
            if self._colour_after:  # GPU: uint8 NHWC, mirrored; jitter and normalise on the device
                colour = torch.from_numpy(plan.colour[pos:pos + n]).to(images.device, non_blocking=True)
                yield plan_batch(plan, pos, normalize_uint8_nhwc(colour_batch_torch(images, colour), spec), labels,
                                 indices, dev)
                pos += n
                continue
            if self._layout == "HWC":
                images = images.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
            images = images.to(dev, non_blocking=True)
            if images.dtype != spec.dtype:
                fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
                images = images.to(dtype=spec.dtype, memory_format=fmt)
            yield plan_batch(plan, pos, images, labels, indices, dev)
            pos += n
