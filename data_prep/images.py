"""Image canonicalisation: every stored sample becomes a baseline RGB JPEG within ``max_side``.

Both back ends read the same bytes: the webdataset shards hold them and the FFCV writer copies them
verbatim (see :mod:`data_prep.writers`), so no image is compressed twice.

Source quirks handled here (each gets a note or a :class:`BadImage` naming the reason):
- PNG (or GIF/BMP/WebP) content behind a ``.JPEG`` name: decoded and re-encoded, noted;
- CMYK/YCCK and grayscale JPEGs: converted to RGB and re-encoded, noted;
- truncated or corrupt files, empty files: :class:`BadImage`.

The JPEG work goes through the codec named by ``EncodeSettings.codec`` (:mod:`lfme_fast.jpeg`). It is
simplejpeg by default: its strict decode is what catches corrupt scans in real data. Synthetic sets,
known to be intact, may use ``"auto"`` (Pillow where simplejpeg is not installed); the manifest's
``writer.jpeg_codec`` records which codec wrote a dataset.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from lfme_fast import jpeg

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
    """How canonical JPEGs are written: longest side at most ``max_side`` (None keeps the size).

    ``codec`` names the JPEG codec (:func:`lfme_fast.jpeg.codec`) that checks, decodes and encodes:
    ``"simplejpeg"`` (default: strict decoding catches corrupt files), ``"pillow"`` or ``"auto"``.
    """

    max_side: int | None = 256
    quality: int = 90
    subsampling: str = "420"  # simplejpeg colorsubsampling; "444" for tiny images
    codec: str = "simplejpeg"

    def __post_init__(self) -> None:
        if self.codec not in jpeg.CODECS:
            raise ValueError(f"EncodeSettings.codec must be one of {jpeg.CODECS}, got {self.codec!r}")

    def to_json(self) -> dict:
        """The settings as the manifest's ``writer`` (and the shards' fingerprints) record them, with
        ``jpeg_codec`` (the codec resolved here, never ``"auto"``) only when it is not simplejpeg:
        simplejpeg wrote every dataset before the codec was a choice, so their fingerprints stay valid
        and a dataset that records no codec was written by simplejpeg."""
        out = {"max_side": self.max_side, "quality": self.quality, "subsampling": self.subsampling}
        kind = jpeg.codec(self.codec).kind
        if kind != "simplejpeg":
            out["jpeg_codec"] = kind
        return out


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
    data = jpeg.codec(settings.codec).encode_jpeg(np.ascontiguousarray(rgb), quality=settings.quality,
                                                  colorspace="RGB", colorsubsampling=settings.subsampling)
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
    codec = jpeg.codec(settings.codec)
    try:
        height, width, colorspace, _ = codec.decode_jpeg_header(data)
    except ValueError as exc:
        raise BadImage("corrupt", f"JPEG header unreadable ({exc})") from exc
    if colorspace.upper() in ("CMYK", "YCCK", "GRAY"):
        rgb, mode = _decode_with_pil(data, "jpeg")
        return encode_array(rgb, settings, note=f"{colorspace.lower()}-converted")
    # A full decode is the only reliable way to catch truncated/corrupt scans (simplejpeg's strict mode
    # raises on libjpeg-turbo's "premature end of data" warnings; the Pillow codec catches truncation
    # only). When we downsize anyway, let libjpeg-turbo's DCT scaling decode at the smallest scale that
    # still covers the target: about 2-4x cheaper.
    th, tw = _target_size(height, width, settings.max_side)
    try:
        rgb = codec.decode_jpeg(data, colorspace="RGB", strict=True, min_height=th, min_width=tw)
    except ValueError as exc:
        raise BadImage("corrupt", f"JPEG does not decode ({exc})") from exc
    if (th, tw) == (height, width):
        return Canonical(bytes(data), height, width)
    return encode_array(rgb, settings)
