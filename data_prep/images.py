"""Image canonicalisation: every stored sample becomes a baseline RGB JPEG within ``max_side``.

Both back ends read the same bytes: the webdataset shards hold them and the FFCV writer copies them
verbatim (see :mod:`data_prep.writers`), so no image is compressed twice.

Source quirks handled here (each gets a note or a :class:`BadImage` naming the reason):
- PNG (or GIF/BMP/WebP) content behind a ``.JPEG`` name: decoded and re-encoded, noted;
- CMYK/YCCK and grayscale JPEGs: converted to RGB and re-encoded, noted;
- truncated or corrupt files, empty files: :class:`BadImage`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_OTHER_MAGIC = {b"GIF87a": "gif", b"GIF89a": "gif", b"BM": "bmp", b"RIFF": "webp"}


class BadImage(ValueError):
    """An input image that cannot be stored; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EncodeSettings:
    """How canonical JPEGs are written: longest side at most ``max_side`` (None keeps the size)."""

    max_side: int | None = 256
    quality: int = 90
    subsampling: str = "420"  # simplejpeg colorsubsampling; "444" for tiny images

    def to_json(self) -> dict:
        return {"max_side": self.max_side, "quality": self.quality, "subsampling": self.subsampling}


@dataclass(frozen=True)
class Canonical:
    """A stored sample: JPEG bytes, decoded size, and a note when the input needed conversion."""

    jpeg: bytes
    height: int
    width: int
    note: str = ""


def sniff_format(data: bytes) -> str:
    """Return 'jpeg', 'png', 'gif', 'bmp', 'webp' or 'unknown' from the file's magic bytes."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    for magic, name in _OTHER_MAGIC.items():
        if data.startswith(magic):
            return name
    return "unknown"


def _target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def encode_array(rgb: np.ndarray, settings: EncodeSettings, note: str = "") -> Canonical:
    """Resize (area interpolation) so the longest side fits ``max_side`` and JPEG-encode an RGB array."""
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadImage("bad-array", f"expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    h, w = _target_size(rgb.shape[0], rgb.shape[1], settings.max_side)
    if (h, w) != rgb.shape[:2]:
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    data = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=settings.quality, colorspace="RGB",
                                  colorsubsampling=settings.subsampling)
    return Canonical(bytes(data), h, w, note)


def _decode_with_pil(data: bytes, fmt: str) -> tuple[np.ndarray, str]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode: truncated files raise here
            mode = img.mode
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage("corrupt", f"{fmt} does not decode ({exc})") from exc
    return rgb, mode


def canonicalize_encoded(data: bytes, settings: EncodeSettings) -> Canonical:
    """Validate encoded image bytes and return the canonical JPEG (pass-through when already canonical)."""
    if not data:
        raise BadImage("empty", "file has 0 bytes")
    fmt = sniff_format(data)
    if fmt == "unknown":
        raise BadImage("not-an-image", f"unrecognised header {data[:8]!r}")
    if fmt != "jpeg":
        rgb, mode = _decode_with_pil(data, fmt)
        return encode_array(rgb, settings, note=f"{fmt}-converted(mode={mode})")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise BadImage("corrupt", f"JPEG header unreadable ({exc})") from exc
    if colorspace.upper() in ("CMYK", "YCCK", "GRAY"):
        rgb, mode = _decode_with_pil(data, "jpeg")
        return encode_array(rgb, settings, note=f"{colorspace.lower()}-converted")
    # A full decode is the only reliable way to catch truncated/corrupt scans (strict mode raises on
    # libjpeg-turbo's "premature end of data" warnings). When we downsize anyway, let libjpeg-turbo's
    # DCT scaling decode at the smallest scale that still covers the target: about 2-4x cheaper.
    th, tw = _target_size(height, width, settings.max_side)
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=th, min_width=tw)
    except ValueError as exc:
        raise BadImage("corrupt", f"JPEG does not decode ({exc})") from exc
    if (th, tw) == (height, width):
        return Canonical(bytes(data), height, width)
    return encode_array(rgb, settings)
