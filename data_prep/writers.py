"""Shard writers: webdataset tars with DALI indices, and FFCV ``.beton`` files.

Webdataset shards hold ``<key>.jpg`` (the canonical JPEG) and ``<key>.cls`` (the label as ASCII) per
sample; each tar gets the DALI index (format v1.2, what ``wds2idx`` writes) computed while writing, so
no tool has to re-scan the tar. The FFCV writer copies the very same JPEG bytes into its ``image``
field (no second compression), or stores decoded pixels in ``raw`` mode.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import types
from pathlib import Path
from typing import Sequence

import numpy as np

from lfme_fast import jpeg
from lfme_fast.io import atomic_path
from lfme_fast.shards import MANIFEST

TAR_BLOCK = 512


class WdsShardWriter:
    """Writes one webdataset tar (to a temporary name) and its DALI index; ``close()`` publishes both."""

    def __init__(self, tar_path: Path):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp_ctx = atomic_path(self.tar_path)
        self._tmp = self._tmp_ctx.__enter__()
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.index_lines: list[str] = []
        self.jpg_offsets: list[int] = []
        self.jpg_sizes: list[int] = []

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # The data block ends (padded) at the tar's current offset: exact even with long-name headers.
        return self._tar.offset - ((len(data) + TAR_BLOCK - 1) // TAR_BLOCK) * TAR_BLOCK

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        cls = str(int(label)).encode()
        cls_off = self._add(f"{key}.cls", cls)
        jpg_off = self._add(f"{key}.jpg", jpeg)
        self.index_lines.append(f"cls {cls_off} {len(cls)} {key}.cls jpg {jpg_off} {len(jpeg)} {key}.jpg")
        self.jpg_offsets.append(jpg_off)
        self.jpg_sizes.append(len(jpeg))

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        # The index is published first: a tar without its finished index is never taken as complete.
        with atomic_path(self.idx_path) as tmp:
            tmp.write_text(f"v1.2 {len(self.index_lines)}\n" + "".join(line + "\n" for line in self.index_lines))
        self._tmp_ctx.__exit__(None, None, None)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self._tmp_ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temporary file


class _BetonSource:
    """Indexable dataset for ffcv's writer: (image, label, index) from our random-access shard reader;
    ``raw`` decodes the JPEGs with the JPEG codec named ``codec`` (:func:`lfme_fast.jpeg.codec`)."""

    def __init__(self, reader, raw: bool, codec: str = "simplejpeg"):
        self.reader = reader
        self.raw = raw
        self.codec = codec  # a name: the object is made in the writer's worker processes

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        data = self.reader.get_bytes(i)
        if self.raw:
            image = jpeg.codec(self.codec).decode_jpeg(data, colorspace="RGB")
        else:
            image = bytes(data)
        return image, int(self.reader.labels[i]), int(i)


def _store_jpeg_verbatim(self, destination, image, malloc, codec: str = "simplejpeg"):
    """RGBImageField.encode replacement for already-encoded canonical JPEG bytes (no re-compression);
    ``codec`` names the JPEG codec that reads their headers."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    height, width, _, _ = jpeg.codec(codec).decode_jpeg_header(image)
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = height, width
    buffer = np.frombuffer(image, dtype=np.uint8)
    destination["data_ptr"], storage = malloc(buffer.nbytes)
    storage[:] = buffer


def _recorded_codec(reader) -> str:
    """The JPEG codec the reader's dataset was prepared with (its manifest's ``writer.jpeg_codec``);
    ``"simplejpeg"`` for a dataset that does not say (prepared before the codec was recorded)."""
    try:
        writer = json.loads((Path(reader.root) / MANIFEST).read_text()).get("writer") or {}
    except (AttributeError, OSError, ValueError):
        return "simplejpeg"
    return writer.get("jpeg_codec", "simplejpeg") if isinstance(writer, dict) else "simplejpeg"


def write_beton(path: Path, reader, *, write_mode: str = "jpg", max_resolution: int | None = None,
                jpeg_quality: int = 90, num_workers: int | None = None, chunksize: int = 256,
                codec: str | None = None) -> None:
    """Write ``ffcv/<split>.beton`` with fields image, label, index (in that order), atomically.

    ``write_mode='jpg'`` stores the shard's JPEG bytes verbatim; ``'raw'`` stores decoded RGB pixels
    (best for 28/32-pixel datasets, where decoding would dominate). ``codec`` names the JPEG codec
    (:func:`lfme_fast.jpeg.codec`) that reads the stored JPEGs' headers and, in ``raw`` mode, decodes
    them; None: the one the dataset was prepared with (its manifest's ``writer.jpeg_codec``, else simplejpeg).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    if write_mode not in ("jpg", "raw"):
        raise ValueError(f"write_mode must be 'jpg' or 'raw', got {write_mode!r}")
    codec = _recorded_codec(reader) if codec is None else codec
    jpeg.codec(codec)  # a missing codec fails here, not in the writer's workers
    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    if write_mode == "jpg":
        # Instance-level override: the field stays an RGBImageField (ffcv keys the on-disk type on the
        # exact class), so the stock Loader decodes it, but the bytes are our canonical JPEG as-is.
        image_field.encode = types.MethodType(functools.partial(_store_jpeg_verbatim, codec=codec), image_field)
    fields = {"image": image_field, "label": IntField(), "index": IntField()}
    # Each worker fills its own pages; small pages keep small splits small, but a page must hold the
    # largest image.
    largest = int(reader.size.max()) if len(reader) else 0
    page_size = MIN_PAGE_SIZE
    while page_size < 2 * largest:
        page_size *= 2
    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size,
                               num_workers=num_workers or os.cpu_count() or 1)
        writer.from_indexed_dataset(_BetonSource(reader, raw=write_mode == "raw", codec=codec),
                                    chunksize=chunksize)


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}"


def shard_ranges(n: int, shard_size: int) -> Sequence[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
