"""The JPEG codec, chosen explicitly: ``simplejpeg`` (libjpeg-turbo) or the same calls on Pillow.

Why an explicit codec: this project encodes and decodes JPEGs with simplejpeg (strict decoding, DCT-scaled
decodes, fast header reads), but some machines lack it — e.g. a GPU machine without network whose image
has Pillow only, where the GPU benchmark must still run. Rather than make ``import simplejpeg`` answer with something else (editing ``sys.modules``
leaks into every module imported meanwhile, and nothing records that it happened), every caller asks
:func:`codec` for one by name and can record which it got (``.name``):

* ``"simplejpeg"``: simplejpeg itself; an :class:`ImportError` with the install command when it is missing.
  Dataset preparation of real data keeps this one by default: its strict decode turns libjpeg-turbo's
  "corrupt data" warnings into errors, so damaged files are skipped instead of stored.
* ``"pillow"``: Pillow (which bundles libjpeg-turbo as well) behind simplejpeg's signatures — see
  :class:`PillowCodec` for what differs.
* ``"auto"``: simplejpeg when it imports, else Pillow. Exact wherever only header sizes are read, and
  fine for synthetic images, which are known to be intact.

A codec has ``encode_jpeg``, ``decode_jpeg_header`` and ``decode_jpeg`` with simplejpeg's signatures (the
subset this project uses), ``kind`` (``"simplejpeg"`` or ``"pillow"``: what a manifest records) and
``name`` (with the version: ``"simplejpeg 1.9.0"``, ``"Pillow 13.0.0"``). Codecs are picklable (by kind).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["CODECS", "INSTALL_HINT", "PillowCodec", "SimpleJpegCodec", "codec", "load_simplejpeg"]

#: The names :func:`codec` takes.
CODECS = ("auto", "simplejpeg", "pillow")

#: What to run when the ``simplejpeg`` codec is asked for and missing.
INSTALL_HINT = "pip install 'simplejpeg>=1.7'"

#: simplejpeg's chroma subsampling names -> Pillow's ``subsampling`` values, and back.
_PIL_SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
_SUBSAMPLING_NAMES = {0: "444", 1: "422", 2: "420"}


def load_simplejpeg():
    """The ``simplejpeg`` module, or an :class:`ImportError` whose one-line message says how to install it.

    The one place this module imports simplejpeg (tests replace it to act as a machine without it)."""
    try:
        import simplejpeg
    except ImportError as exc:
        raise ImportError(f"the 'simplejpeg' JPEG codec is not installed ({exc}): {INSTALL_HINT}, "
                          "or use the 'pillow' codec") from None
    return simplejpeg


def codec(name: str = "auto") -> "SimpleJpegCodec | PillowCodec":
    """The JPEG codec called ``name``: ``"simplejpeg"``, ``"pillow"`` or ``"auto"`` (simplejpeg when it
    imports, else Pillow). Cheap: callers may ask per image."""
    if name == "simplejpeg":
        return SimpleJpegCodec()
    if name == "pillow":
        return PillowCodec()
    if name == "auto":
        try:
            return SimpleJpegCodec()
        except ImportError:
            return PillowCodec()
    raise ValueError(f"unknown JPEG codec {name!r}: choose one of {', '.join(CODECS)}")


class SimpleJpegCodec:
    """simplejpeg's own ``encode_jpeg``, ``decode_jpeg_header`` and ``decode_jpeg``."""

    kind = "simplejpeg"

    def __init__(self) -> None:
        module = load_simplejpeg()
        self.name = f"simplejpeg {getattr(module, '__version__', 'unknown')}"
        self.encode_jpeg = module.encode_jpeg
        self.decode_jpeg_header = module.decode_jpeg_header
        self.decode_jpeg = module.decode_jpeg

    def __reduce__(self):  # picklable by kind: the other process imports simplejpeg itself
        return (SimpleJpegCodec, ())

    def __repr__(self) -> str:
        return f"<JPEG codec {self.name}>"


class PillowCodec:
    """simplejpeg's calls on Pillow.

    Answers as simplejpeg does: ``encode_jpeg`` of HxWx3 RGB / BGR or GRAY arrays with chroma subsampling
    444 / 422 / 420, ``decode_jpeg_header`` -> ``(height, width, colorspace, subsampling)``, ``decode_jpeg``
    to RGB / BGR (HxWx3) or GRAY (HxWx1), a writable copy; ``min_height`` / ``min_width`` decode at the
    smallest DCT scale still covering both (Pillow's ``draft``); bad data raises :class:`ValueError`.

    What differs: Pillow scales by 1/2, 1/4 and 1/8 only (simplejpeg also by other eighths), so a scaled
    decode may come out larger; ``strict`` is not honoured — a truncated file raises, but a scan with
    corrupt data inside may decode with libjpeg's warnings, which is why real dataset preparation stays on
    simplejpeg; ``fastdct``, ``fastupsample``, ``min_factor`` and ``buffer`` are accepted and ignored;
    Pillow reports both CMYK and YCCK files as ``"CMYK"``.
    """

    kind = "pillow"

    def __init__(self) -> None:
        import PIL

        self.name = f"Pillow {PIL.__version__}"

    def __reduce__(self):
        return (PillowCodec, ())

    def __repr__(self) -> str:
        return f"<JPEG codec {self.name}>"

    @staticmethod
    def _open(data: Any):
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(bytes(data)))
        except Exception as exc:  # Pillow's UnidentifiedImageError / OSError -> simplejpeg's ValueError
            raise ValueError(f"not a readable JPEG ({exc})") from None
        if img.format != "JPEG":
            img.close()
            raise ValueError(f"not a JPEG (Pillow reads it as {img.format})")
        return img

    @staticmethod
    def _scale(img: Any, min_height: int, min_width: int) -> None:
        if min_height > 0 or min_width > 0:  # the smallest DCT scale (1/2, 1/4, 1/8) still covering both
            img.draft(None, (max(1, int(min_width)), max(1, int(min_height))))

    def encode_jpeg(self, image: Any, quality: int = 85, colorspace: str = "RGB", colorsubsampling: str = "444",
                    fastdct: bool = True, **_ignored: Any) -> bytes:
        """JPEG bytes of ``image`` (HxWx3 uint8 RGB or BGR, or HxW / HxWx1 GRAY)."""
        from PIL import Image

        arr = np.ascontiguousarray(image, dtype=np.uint8)
        space = colorspace.upper()
        if space == "GRAY" and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)):
            img = Image.fromarray(arr.reshape(arr.shape[0], arr.shape[1]))  # uint8 HxW: mode L
        elif space in ("RGB", "BGR") and arr.ndim == 3 and arr.shape[2] == 3:
            img = Image.fromarray(np.ascontiguousarray(arr[..., ::-1]) if space == "BGR" else arr)  # mode RGB
        else:
            raise ValueError(f"colorspace {colorspace!r} with shape {arr.shape}: the Pillow codec writes "
                             "HxWx3 RGB or BGR, or HxW(x1) GRAY")
        options: dict[str, Any] = {"quality": int(quality)}
        if img.mode == "RGB":
            if colorsubsampling not in _PIL_SUBSAMPLING:
                raise ValueError(f"colorsubsampling {colorsubsampling!r}: the Pillow codec writes "
                                 f"{', '.join(_PIL_SUBSAMPLING)}")
            options["subsampling"] = _PIL_SUBSAMPLING[colorsubsampling]
        out = io.BytesIO()
        img.save(out, "JPEG", **options)
        return out.getvalue()

    def decode_jpeg_header(self, data: Any, min_height: int = 0, min_width: int = 0, min_factor: float = 1.0,
                           strict: bool = True) -> tuple[int, int, str, str]:
        """``(height, width, colorspace, subsampling)`` from the header (the scaled size with ``min_*``)."""
        from PIL import JpegImagePlugin

        with self._open(data) as img:
            self._scale(img, min_height, min_width)
            width, height = img.size
            space = {"L": "Gray", "CMYK": "CMYK"}.get(img.mode, "YCbCr")
            sampling = _SUBSAMPLING_NAMES.get(JpegImagePlugin.get_sampling(img), "unknown")
        return height, width, space, "Gray" if space == "Gray" else sampling

    def decode_jpeg(self, data: Any, colorspace: str = "RGB", fastdct: bool = False, fastupsample: bool = False,
                    min_height: int = 0, min_width: int = 0, min_factor: float = 1.0, buffer: Any = None,
                    strict: bool = True) -> np.ndarray:
        """The decoded image: uint8 HxWx3 (RGB, BGR) or HxWx1 (GRAY), a writable array."""
        space = colorspace.upper()
        if space not in ("RGB", "BGR", "GRAY"):
            raise ValueError(f"colorspace {colorspace!r}: the Pillow codec decodes to RGB, BGR or GRAY")
        with self._open(data) as img:
            self._scale(img, min_height, min_width)
            try:
                img.load()  # a truncated scan raises here (Pillow's LOAD_TRUNCATED_IMAGES is off by default)
            except Exception as exc:
                raise ValueError(f"JPEG does not decode ({exc})") from None
            if space == "GRAY":
                return np.array(img.convert("L"))[..., None]
            rgb = np.array(img.convert("RGB"))  # np.array: a writable copy, as simplejpeg returns
        return np.ascontiguousarray(rgb[..., ::-1]) if space == "BGR" else rgb
