"""Predict classes for a folder or list of images with a trained model: ``lfme-predict``.

::

    lfme-predict --run RUN --images DIR --out preds.csv --topk 5
    python -m lfme_fast.predict --model RUN/train/model.json --images list.txt

* ``--run RUN`` takes the run's exported model (``RUN/<stage>/model.json``; a run with several, e.g.
  ``experts``, asks for ``--model``); ``--model`` takes a ``model.json``, its ``model.safetensors`` or its
  folder (:mod:`lfme_fast.export`).
* ``--images`` is a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff), a text
  file with one image path per line (relative to the file's folder; a trailing integer label, as in the
  split lists, is ignored) or one image.
* Decoding is the fast path of the loaders, batch-parallel in threads: JPEGs with libjpeg-turbo
  (simplejpeg), scaled down in the DCT to the smallest size the crop needs, other formats (and JPEGs
  simplejpeg refuses, e.g. CMYK) with PIL. Then the model's own evaluation preprocessing from
  ``model.json``: centre crop or resize to the resolution (PIL's antialiased bilinear, as the torch loader),
  normalise with its mean/std.
* Output: a CSV, one row per input in input order: ``path, status (ok | skipped), top1_class, top1_name,
  top1_prob, ..., topK_prob, error``. An image that cannot be read is a ``skipped`` row with the reason,
  and is also named on stderr: nothing is dropped silently. Class ids are the dataset's (for an LFME
  expert: its subset's classes).

Exit codes: 0 when at least one image was predicted, 1 when none could be read, 2 for a usage error (one
line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lfme_fast.export import ExportError, load_exported

__all__ = ["IMAGE_SUFFIXES", "Prediction", "UsageError", "find_run_model", "list_images", "load_image",
           "predict_images", "write_predictions", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UsageError(ValueError):
    """A bad argument (no model, no images, top-k too large); reported in one line, exit code 2."""


@dataclass
class Prediction:
    """One input image: ``classes``/``names``/``probs`` (best first) when ``ok``, else ``error``."""

    path: str
    ok: bool
    classes: list[int]
    names: list[str]
    probs: list[float]
    error: str = ""


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------


def find_run_model(run_dir: str | os.PathLike) -> Path:
    """The exported model of a run folder: the one ``RUN/<stage>/model.json``.

    Raises:
        UsageError: not a folder, no exported model, or several (the message lists them: pass ``--model``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_dir}: not a folder")
    found = sorted(run_dir.glob("*/model.json"))
    if not found:
        raise UsageError(f"--run {run_dir}: no exported model (RUN/<stage>/model.json); train it first, or "
                         "give a model with --model")
    if len(found) > 1:
        raise UsageError(f"--run {run_dir}: several models ({', '.join(str(p) for p in found)}); choose one with "
                         "--model")
    return found[0]


def _list_file_entries(list_file: Path) -> list[Path]:
    entries = []
    for raw in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        # "path label" as in the split lists: drop the label unless the whole line names a file
        if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not (list_file.parent / line).exists():
            line = parts[0]
        path = Path(line)
        entries.append(path if path.is_absolute() else list_file.parent / path)
    return entries


def list_images(source: str | os.PathLike) -> list[Path]:
    """The images of ``source``: a folder (recursive, sorted, by suffix), a list file or one image.

    Raises:
        UsageError: ``source`` does not exist, or names no image at all.
    """
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"--images {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return images
    if not source.is_file():
        raise UsageError(f"--images {source}: no such folder or file")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    images = _list_file_entries(source)
    if not images:
        raise UsageError(f"--images {source}: the list names no image")
    return images


# ---------------------------------------------------------------------------------------------------
# decoding and preprocessing
# ---------------------------------------------------------------------------------------------------


def _decode(data: bytes, prep: dict[str, Any]) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: JPEGs with the ``"auto"`` JPEG codec (:func:`lfme_fast.jpeg.codec`:
    simplejpeg, else Pillow), downscaled in the DCT no further than the crop needs; anything else (or a
    JPEG the codec refuses) with PIL."""
    if data[:2] == b"\xff\xd8":
        try:
            from lfme_fast.jpeg import codec

            jpeg_codec = codec("auto")
            h, w, _, _ = jpeg_codec.decode_jpeg_header(data)
            # the crop must keep at least `resolution` pixels: scale the decode so that it still does
            keep = prep["crop_ratio"] or 1.0
            need = prep["resolution"] / (keep * min(h, w)) if prep["resize"] == "center_crop" else \
                prep["resolution"] / min(h, w)
            need = min(1.0, need)
            return jpeg_codec.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h * need),
                                          min_width=math.ceil(w * need))
        except (ValueError, OSError):
            pass  # CMYK, arithmetic coding, a damaged file...: PIL decides below
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def load_image(path: str | os.PathLike, prep: dict[str, Any]) -> np.ndarray:
    """Image ``path`` preprocessed to uint8 ``(R, R, 3)`` as ``prep`` (a ``model.json`` "preprocess") says:
    a centred square of ``crop_ratio`` x the shorter side (``center_crop``) or the whole image
    (``resize``), resized to ``R`` with PIL's antialiased bilinear filter.

    Raises:
        OSError / ValueError (PIL's errors): the file cannot be read or decoded.
    """
    from PIL import Image

    from lfme_fast.augment import py_center_box

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file")
    arr = _decode(data, prep)
    size = int(prep["resolution"])
    h, w = arr.shape[:2]
    y, x, bh, bw = py_center_box(h, w, prep["crop_ratio"]) if prep["resize"] == "center_crop" else (0, 0, h, w)
    if (bh, bw) == (size, size) and (y, x) == (0, 0) and (h, w) == (size, size):
        return np.ascontiguousarray(arr)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=(x, y, x + bw, y + bh)))


def _load_or_error(path: Path, prep: dict[str, Any]) -> np.ndarray | str:
    from PIL import UnidentifiedImageError

    try:
        return load_image(path, prep)
    except UnidentifiedImageError:  # PIL's message names an in-memory buffer, not the file
        return "not a readable image (unknown format or damaged file)"
    except Exception as exc:  # noqa: BLE001 - any failure to read one image skips that image, reported
        return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _normalise(images: list[np.ndarray], prep: dict[str, Any], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(prep["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------


def predict_images(model: Any, paths: Sequence[Path], *, topk: int = 5, batch_size: int = 64,
                   workers: int | None = None, device: str | torch.device = "cpu",
                   progress: bool = False) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per path, in order; decoding runs ``workers`` threads, up to two
    batches ahead of the model.

    Args:
        model: an :class:`lfme_fast.export.ExportedModel` (its ``info`` gives preprocessing and classes).
        topk: classes per image (at most the model's class count).
    """
    info = model.info
    prep, classes, names = info["preprocess"], info["classes"], info["class_names"]
    if not 1 <= topk <= len(classes):
        raise UsageError(f"--topk {topk}: must be in 1..{len(classes)} (the model's classes)")
    device = torch.device(device)
    workers = workers or min(32, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True)
    batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[list[Path], list[Future]]] = deque()

        def submit(k: int) -> None:
            if k < len(batches):
                pending.append((batches[k], [pool.submit(_load_or_error, p, prep) for p in batches[k]]))

        submit(0)
        submit(1)
        for k in range(len(batches)):
            batch, futures = pending.popleft()
            submit(k + 2)
            loaded = [f.result() for f in futures]
            good = [i for i, a in enumerate(loaded) if not isinstance(a, str)]
            rows: dict[int, Prediction] = {}
            if good:
                with torch.no_grad():
                    probs = torch.softmax(model(_normalise([loaded[i] for i in good], prep, device)).float(), 1)
                top_p, top_i = probs.topk(topk, dim=1)
                for r, i in enumerate(good):
                    cols = top_i[r].tolist()
                    rows[i] = Prediction(str(batch[i]), True, [int(classes[c]) for c in cols],
                                         [names[c] for c in cols], [float(p) for p in top_p[r].tolist()])
            for i, path in enumerate(batch):
                yield rows.get(i) or Prediction(str(path), False, [], [], [], loaded[i])
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()


def write_predictions(path: str | os.PathLike, predictions: Sequence[Prediction], topk: int) -> None:
    """The CSV (atomically): ``path, status, top<i>_class, top<i>_name, top<i>_prob ..., error``."""
    from lfme_fast.io import atomic_write_text

    header = ["path", "status"]
    for i in range(1, topk + 1):
        header += [f"top{i}_class", f"top{i}_name", f"top{i}_prob"]
    header.append("error")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for p in predictions:
        row = [p.path, "ok" if p.ok else "skipped"]
        for i in range(topk):
            row += [p.classes[i], p.names[i], f"{p.probs[i]:.6f}"] if p.ok else ["", "", ""]
        writer.writerow(row + [p.error])
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lfme-predict`` argument parser."""
    p = _OneLineParser(prog="lfme-predict",
                       description="Predict classes for a folder or list of images with a trained model (its "
                                   "model.safetensors + model.json, written by every training stage). Unreadable "
                                   "images are listed as skipped in the CSV and on stderr.",
                       epilog="example: lfme-predict --run runs/smoke --images photos/ --out preds.csv --topk 3")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder: its exported model RUN/<stage>/model.json")
    src.add_argument("--model", help="a model.json, its model.safetensors, or their folder")
    p.add_argument("--images", required=True,
                   help="a folder (recursive), a text file of image paths (one per line) or one image")
    p.add_argument("--out", default="preds.csv", help="CSV to write (default preds.csv)")
    p.add_argument("--topk", type=int, default=5, help="classes per image, best first (default 5, at most the "
                                                       "model's class count)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of a usage error")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_path = find_run_model(args.run) if args.run else Path(args.model)
    paths = list_images(args.images)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_exported(model_path, device=device)
    preds = list(predict_images(model, paths, topk=args.topk, batch_size=args.batch_size, workers=args.workers or None,
                                device=device, progress=not args.no_progress))
    write_predictions(args.out, preds, args.topk)
    skipped = [p for p in preds if not p.ok]
    for p in skipped:
        print(f"lfme-predict: skipped {p.path}: {p.error}", file=sys.stderr)
    print(f"lfme-predict: {len(preds) - len(skipped)} image(s) predicted, {len(skipped)} skipped -> {args.out}",
          file=sys.stderr)
    return 0 if len(skipped) < len(preds) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``lfme-predict``; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, ExportError) as exc:
        if args.debug:
            raise
        print(f"lfme-predict: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
