"""Data loaders behind one contract: :func:`build_loader` -> :class:`BatchLoader` of :class:`Batch`.

Back ends: ``ffcv`` (stock ffcv Loader over the beton, ordered by our samplers), ``dali`` (NVIDIA DALI,
GPU decode when CUDA is available) and ``torch`` (the ordinary DataLoader + PIL baseline).
"""

from lfme_fast.augment import FixedViews
from lfme_fast.loaders.base import BACKENDS, Batch, BatchLoader, EpochPlan, LoaderSpec, build_loader

__all__ = ["BACKENDS", "Batch", "BatchLoader", "EpochPlan", "FixedViews", "LoaderSpec", "build_loader"]
