"""The explicit JPEG codec (lfme_fast.jpeg): simplejpeg and its Pillow counterpart answer alike, a missing
simplejpeg is a clear error (or Pillow, for "auto"), nothing edits sys.modules, and data preparation keeps
simplejpeg's strict decode by default."""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.images import BadImage, EncodeSettings, canonicalize_encoded
from lfme_fast import jpeg

simplejpeg = pytest.importorskip("simplejpeg")

REPO = Path(__file__).resolve().parents[1]


def _smooth(height: int = 120, width: int = 160) -> np.ndarray:
    """A smooth RGB test image (gradients): JPEG keeps it within a few grey levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin((x + y) / 25)], axis=-1)
    return np.ascontiguousarray(rgb.clip(0, 255).astype(np.uint8))


def _corrupt_scan(data: bytes) -> bytes:
    """``data`` with 50 zero bytes in the middle of its entropy-coded scan (the file's length is kept)."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    return data[:start + 200] + bytes(50) + data[start + 250:]


def _without_simplejpeg(monkeypatch) -> None:
    """Act as a machine without simplejpeg: the codec module's one import of it fails."""
    def missing():
        raise ImportError(f"the 'simplejpeg' JPEG codec is not installed (test): {jpeg.INSTALL_HINT}")

    monkeypatch.setattr(jpeg, "load_simplejpeg", missing)


def test_codec_names_and_pickling():
    assert jpeg.codec("simplejpeg").name == f"simplejpeg {simplejpeg.__version__}"
    assert jpeg.codec().kind == jpeg.codec("auto").kind == "simplejpeg"  # installed here: auto takes it
    import PIL

    pil = jpeg.codec("pillow")
    assert (pil.kind, pil.name) == ("pillow", f"Pillow {PIL.__version__}")
    for c in (pil, jpeg.codec("simplejpeg")):  # picklable by kind (they cross into spawned processes)
        assert pickle.loads(pickle.dumps(c)).name == c.name
    with pytest.raises(ValueError, match="unknown JPEG codec 'turbo'"):
        jpeg.codec("turbo")


@pytest.mark.parametrize("sub", ["420", "422", "444"])
@pytest.mark.parametrize("size", [(120, 160), (37, 53)])  # an odd size: partial MCUs
def test_pillow_and_simplejpeg_agree_on_headers_and_pixels(sub, size):
    image = _smooth(*size)
    pil, sj = jpeg.codec("pillow"), jpeg.codec("simplejpeg")
    for encoder in (pil, sj):
        data = encoder.encode_jpeg(image, quality=95, colorspace="RGB", colorsubsampling=sub)
        header = sj.decode_jpeg_header(data)
        assert header == (*size, "YCbCr", sub)
        assert pil.decode_jpeg_header(data) == header
        a, b = pil.decode_jpeg(data, colorspace="RGB"), sj.decode_jpeg(data, colorspace="RGB")
        assert a.shape == b.shape == (*size, 3) and a.dtype == b.dtype == np.uint8 and a.flags.writeable
        assert np.abs(a.astype(int) - b).max() <= 2  # the same libjpeg-turbo decode (bundled twice)
        assert np.abs(a.astype(int) - image).mean() < 3.0  # a round trip within JPEG's loss
        bgr = pil.decode_jpeg(data, colorspace="BGR")
        np.testing.assert_array_equal(bgr, a[..., ::-1])


def test_pillow_codec_scaled_gray_and_bgr():
    image = _smooth(320, 480)
    pil, sj = jpeg.codec("pillow"), jpeg.codec("simplejpeg")
    data = pil.encode_jpeg(image, quality=90, colorsubsampling="420")
    small = pil.decode_jpeg(data, colorspace="RGB", min_height=100, min_width=100)  # a DCT-scaled decode
    assert 100 <= small.shape[0] < 320 and 100 <= small.shape[1] < 480 and small.flags.writeable
    assert pil.decode_jpeg_header(data, min_height=100, min_width=100)[:2] == small.shape[:2]
    gray = pil.encode_jpeg(image[..., :1], colorspace="GRAY")
    assert pil.decode_jpeg_header(gray) == sj.decode_jpeg_header(gray) == (320, 480, "Gray", "Gray")
    assert pil.decode_jpeg(gray, colorspace="GRAY").shape == (320, 480, 1)
    assert pil.decode_jpeg(gray).shape == sj.decode_jpeg(gray).shape == (320, 480, 3)
    from_bgr = pil.encode_jpeg(np.ascontiguousarray(image[..., ::-1]), quality=90, colorspace="BGR")
    assert np.abs(sj.decode_jpeg(from_bgr).astype(int) - image).mean() < 3.0
    with pytest.raises(ValueError, match="colorsubsampling"):
        pil.encode_jpeg(image, colorsubsampling="411")


def test_bad_data_is_a_value_error_for_both():
    data = jpeg.codec("simplejpeg").encode_jpeg(_smooth(), quality=90)
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(_smooth()).save(png, "PNG")
    for name in ("pillow", "simplejpeg"):
        c = jpeg.codec(name)
        for bad in (data[: len(data) // 2], b"not a jpeg", png.getvalue()):  # data_prep catches ValueError
            with pytest.raises(ValueError):
                c.decode_jpeg(bad)
        with pytest.raises(ValueError):
            c.decode_jpeg_header(b"not a jpeg")
    # what Pillow does not catch, and why data preparation stays on simplejpeg: corrupt data inside a scan
    corrupt = _corrupt_scan(data)
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        jpeg.codec("simplejpeg").decode_jpeg(corrupt, strict=True)
    assert jpeg.codec("pillow").decode_jpeg(corrupt).shape == (120, 160, 3)


def test_missing_simplejpeg_is_a_clear_import_error_and_auto_takes_pillow(monkeypatch):
    real = sys.modules["simplejpeg"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` fails, as where it is not installed
        with pytest.raises(ImportError) as info:
            jpeg.codec("simplejpeg")
        message = str(info.value)
        assert "\n" not in message and "pip install 'simplejpeg" in message and "'pillow' codec" in message
        auto = jpeg.codec("auto")
        assert auto.kind == "pillow" and auto.name.startswith("Pillow")
        # data preparation of real data does not quietly fall back: simplejpeg is its default codec
        with pytest.raises(ImportError, match="pip install"):
            canonicalize_encoded(auto.encode_jpeg(_smooth(), quality=90), EncodeSettings())
        with pytest.raises(ImportError, match="pip install"):
            EncodeSettings().to_json()
        assert EncodeSettings(codec="auto").to_json()["jpeg_codec"] == "pillow"
    assert sys.modules["simplejpeg"] is real  # nothing left behind
    assert jpeg.codec("auto").kind == "simplejpeg"


def test_no_module_edits_sys_modules():
    """The codec is chosen explicitly; no module installs a stand-in by editing ``sys.modules``."""
    offenders = [str(p.relative_to(REPO)) for d in ("lfme_fast", "data_prep") for p in (REPO / d).rglob("*.py")
                 if "sys.modules[" in p.read_text() or "setitem(sys.modules" in p.read_text()]
    assert offenders == []


# ---- data_prep: the codec is a setting, simplejpeg by default ---------------------------------------


def _inputs() -> dict[str, bytes]:
    from PIL import Image

    sj = jpeg.codec("simplejpeg")
    image = _smooth(300, 400)
    out = {"small": sj.encode_jpeg(_smooth(100, 120), quality=90, colorsubsampling="420"),
           "big": sj.encode_jpeg(image, quality=90, colorsubsampling="420"),
           "big444": sj.encode_jpeg(image, quality=90, colorsubsampling="444"),
           "gray": sj.encode_jpeg(np.ascontiguousarray(image[..., :1]), quality=90, colorspace="GRAY")}
    for name, mode, fmt in (("cmyk", "CMYK", "JPEG"), ("png", "RGB", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(image).convert(mode).save(buf, fmt)
        out[name] = buf.getvalue()
    return out


def test_data_prep_refuses_nothing_new_with_either_codec():
    settings = {name: EncodeSettings(max_side=256, codec=name) for name in jpeg.CODECS}
    # simplejpeg (the default, which wrote every earlier dataset) is not recorded: their fingerprints hold
    assert EncodeSettings().codec == "simplejpeg" and "jpeg_codec" not in EncodeSettings().to_json()
    assert settings["pillow"].to_json()["jpeg_codec"] == "pillow"
    assert "jpeg_codec" not in settings["auto"].to_json()  # resolved to simplejpeg here, never "auto"
    for name, data in _inputs().items():
        results = {codec: canonicalize_encoded(data, s) for codec, s in settings.items()}
        base = results["simplejpeg"]
        for codec, r in results.items():
            assert (r.height, r.width, r.note) == (base.height, base.width, base.note), (name, codec)
            decoded = jpeg.codec("simplejpeg").decode_jpeg(r.jpeg)  # a valid JPEG of the stated size
            assert decoded.shape == (r.height, r.width, 3), (name, codec)
        if name == "small":
            assert all(r.jpeg == data for r in results.values())  # stored verbatim either way
    assert base.note.startswith("png-converted") and (base.height, base.width) == (192, 256)
    good = _inputs()["big"]
    for bad, reason in ((b"", "empty"), (b"GARBAGE-bytes", "not-an-image"), (good[: len(good) // 2], "corrupt"),
                        (b"\xff\xd8\xff" + b"\x00" * 40, "corrupt")):
        for s in settings.values():
            with pytest.raises(BadImage) as info:
                canonicalize_encoded(bad, s)
            assert info.value.reason == reason
    with pytest.raises(BadImage, match="does not decode"):  # the default's strict decode
        canonicalize_encoded(_corrupt_scan(good), EncodeSettings())
    with pytest.raises(ValueError, match="EncodeSettings.codec"):
        EncodeSettings(codec="turbo")


def test_beton_writer_reads_with_the_codec_the_dataset_records(tmp_path):
    from data_prep.writers import _recorded_codec

    class Reader:
        root = tmp_path

    assert _recorded_codec(Reader()) == "simplejpeg"  # no manifest: the default
    (tmp_path / "manifest.json").write_text(json.dumps({"writer": {"max_side": 256}}))
    assert _recorded_codec(Reader()) == "simplejpeg"  # prepared before the codec was recorded
    (tmp_path / "manifest.json").write_text(json.dumps({"writer": None}))
    assert _recorded_codec(Reader()) == "simplejpeg"  # a manifest without writer settings
    (tmp_path / "manifest.json").write_text(json.dumps({"writer": {"jpeg_codec": "pillow"}}))
    assert _recorded_codec(Reader()) == "pillow"


def test_header_sizes_and_predict_decode_without_simplejpeg(synthetic_dir, tmp_path, monkeypatch):
    """augment.image_sizes and lfme-predict's decode use "auto": the same sizes on Pillow."""
    import shutil

    from lfme_fast.augment import image_sizes
    from lfme_fast.predict import _decode

    with_sj = image_sizes(synthetic_dir, "train")
    copy = tmp_path / "set"
    shutil.copytree(synthetic_dir, copy)
    for cached in (copy / "meta").glob("*.sizes.npy"):
        cached.unlink()
    data = jpeg.codec("simplejpeg").encode_jpeg(_smooth(300, 400), quality=90)
    prep = {"resolution": 64, "crop_ratio": 0.875, "resize": "center_crop"}
    want = _decode(data, prep)
    _without_simplejpeg(monkeypatch)
    assert jpeg.codec("auto").kind == "pillow"
    without = image_sizes(copy, "train")
    np.testing.assert_array_equal(without[0], with_sj[0])
    np.testing.assert_array_equal(without[1], with_sj[1])
    got = _decode(data, prep)  # Pillow scales by 1/2 where simplejpeg takes 3/8: both cover the crop
    assert min(got.shape[:2]) * 0.875 >= 64 and min(want.shape[:2]) * 0.875 >= 64
