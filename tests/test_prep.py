"""data_prep end to end: real writers, read back by the stock ffcv Loader and the stock DALI reader."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_prep.cli import main as prep_main
from data_prep.images import BadImage, EncodeSettings, canonicalize_encoded
from data_prep.longtail import lt_counts
from data_prep.pipeline import PrepOptions, prepare
from data_prep.sources import SourceError, list_dataset, synthetic_dataset
from lfme_fast.shards import ShardReader, load_manifest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _jpeg(rng, h, w, mode="RGB", fmt="JPEG") -> bytes:
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90)
    return buf.getvalue()


def _read_ffcv(beton: Path, crop: int | None = None):
    """Stock ffcv Loader, sequential. Variable-size images need a cropping decoder: ``crop`` px, centre."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    decoder = SimpleRGBImageDecoder() if crop is None else CenterCropRGBImageDecoder((crop, crop), ratio=1.0)
    loader = Loader(str(beton), batch_size=7, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [decoder], "label": [IntDecoder()], "index": [IntDecoder()]})
    images, labels, indices = [], [], []
    for img, lab, idx in loader:  # ffcv reuses its batch buffers: copy before the next batch
        images.extend(np.array(im) for im in img)
        labels.append(np.array(lab).ravel())
        indices.append(np.array(idx).ravel())
    return images, np.concatenate(labels), np.concatenate(indices)


def _ffcv_stored_jpeg(beton: Path, i: int) -> bytes:
    """The bytes the beton stores for sample i's image field (ffcv's own Reader tables)."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    ptr = reader.metadata["f0"]["data_ptr"][i]
    size = reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0]
    return bytes(np.memmap(beton, dtype=np.uint8, mode="r")[ptr: ptr + size])


def _read_dali(wds_dir: Path, split: str):
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(str(p) for p in wds_dir.glob(f"{split}-*.tar"))

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                         ext=["jpg", "cls"], random_shuffle=False, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    images, labels = [], []
    while len(labels) < n:
        imgs, cls = p.run()
        for i in range(len(cls)):
            if len(labels) < n:
                labels.append(int(bytes(np.asarray(cls[i])).decode()))
                images.append(np.asarray(imgs[i]))
    return images, np.asarray(labels)


@pytest.fixture()
def messy_dataset(tmp_path):
    """A 3-class list dataset with every kind of bad file the prep must handle."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    files = {}
    for i in range(12):
        files[f"train/c{i % 3}/img{i}.JPEG"] = _jpeg(rng, 300 + 10 * i, 400 - 7 * i)
    files["train/c0/cmyk.JPEG"] = _jpeg(rng, 64, 80, mode="CMYK")
    files["train/c1/gray.JPEG"] = _jpeg(rng, 50, 60, mode="L")
    files["train/c2/png_in_disguise.JPEG"] = _jpeg(rng, 40, 30, fmt="PNG")
    good = _jpeg(rng, 120, 160)
    files["train/c0/truncated.JPEG"] = good[: len(good) // 2]
    files["train/c1/empty.JPEG"] = b""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    lines = [f"{rel} {int(rel.split('/')[1][1])}" for rel in files]
    lines.append("train/c2/missing.JPEG 2")
    lines.append(f"{next(iter(files))} 0")  # duplicate of the first line
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Toy_train.txt").write_text("\n".join(lines) + "\n")
    (lists / "Toy_val.txt").write_text("\n".join(f"train/c{i % 3}/img{i}.JPEG {i % 3}" for i in range(6)) + "\n")
    return root, lists


def _run_cli(root, lists, out, *extra):
    prep_main(["imagenet-lt", "--root", str(root), "--lists", str(lists), "--out", str(out), "--workers", "2",
               "--shard-size", "4", *extra])


def test_messy_list_dataset_end_to_end(messy_dataset, tmp_path, capsys):
    root, lists = messy_dataset
    out = tmp_path / "out"
    _run_cli(root, lists, out)
    summary = capsys.readouterr().out
    assert "4 skipped" in summary and "images/s" in summary

    manifest = load_manifest(out)
    train = manifest["splits"]["train"]
    # 12 good + cmyk + gray + png kept; truncated, empty, missing and the duplicate skipped.
    assert train["num_samples"] == 15 and sum(train["class_counts"]) == 15
    assert manifest["ffcv_fields"] == ["image", "label", "index"]
    assert set(manifest["subsets"]) == {"lfme", "strict"}
    skipped = (out / "skipped.txt").read_text()
    for name, reason in [("truncated.JPEG", "corrupt"), ("empty.JPEG", "empty"), ("missing.JPEG", "missing"),
                         ("img0.JPEG", "duplicate")]:
        assert any(name in line and reason in line for line in skipped.splitlines()), (name, skipped)
    converted = (out / "converted.txt").read_text()
    assert "cmyk.JPEG" in converted and "cmyk-converted" in converted
    assert "gray.JPEG" in converted and "png_in_disguise.JPEG" in converted and "png-converted" in converted

    reader = ShardReader(out, "train")
    stored = [simplejpeg.decode_jpeg(bytes(reader.get_bytes(i))) for i in range(len(reader))]
    assert max(max(im.shape[:2]) for im in stored) <= 256  # default max side for imagenet-lt
    assert all(im.shape[2] == 3 for im in stored)

    beton = out / "ffcv" / "train.beton"
    ffcv_images, ffcv_labels, ffcv_indices = _read_ffcv(beton, crop=24)
    np.testing.assert_array_equal(ffcv_labels, reader.labels)
    np.testing.assert_array_equal(ffcv_indices, np.arange(len(reader)))
    assert ffcv_images[0].shape == (24, 24, 3)
    for i in range(len(reader)):  # the beton stores the shard's JPEG verbatim: no second compression
        assert _ffcv_stored_jpeg(beton, i) == bytes(reader.get_bytes(i))
    dali_images, dali_labels = _read_dali(out / "wds", "train")
    np.testing.assert_array_equal(dali_labels, reader.labels)
    for a, c in zip(stored, dali_images):
        assert a.shape == c.shape and np.abs(a.astype(int) - c.astype(int)).mean() < 1.0


def test_strict_turns_skips_into_errors(messy_dataset, tmp_path, capsys):
    root, lists = messy_dataset
    with pytest.raises(SystemExit):
        _run_cli(root, lists, tmp_path / "strict", "--strict")
    assert "duplicate" in capsys.readouterr().err


def test_rerun_reuses_shards_and_rewrites_only_damaged(messy_dataset, tmp_path, capsys):
    root, lists = messy_dataset
    out = tmp_path / "out"
    _run_cli(root, lists, out, "--formats", "wds")
    capsys.readouterr()
    n_shards = len(list((out / "wds").glob("*-*.json")))
    assert n_shards == 5 + 2  # 19 unique train entries and 6 val entries in shards of 4
    _run_cli(root, lists, out, "--formats", "wds")
    assert f"({n_shards} shard(s) reused" in capsys.readouterr().out
    (out / "wds" / "train-00001.json").unlink()
    before = (out / "wds" / "train-00000.tar").stat().st_mtime_ns
    _run_cli(root, lists, out, "--formats", "wds")
    assert f"({n_shards - 1} shard(s) reused" in capsys.readouterr().out
    assert (out / "wds" / "train-00000.tar").stat().st_mtime_ns == before


def test_interrupted_prep_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    import data_prep.pipeline as pipeline

    source = synthetic_dataset(scale=0.0005, val_per_class=0)
    updates = {"n": 0}
    original_update = pipeline._Progress.update

    def interrupted_update(self, n):
        updates["n"] += 1
        if updates["n"] > 4:  # like Ctrl-C in the middle of the second shard
            raise KeyboardInterrupt
        original_update(self, n)

    monkeypatch.setattr(pipeline._Progress, "update", interrupted_update)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, PrepOptions(EncodeSettings(), shard_size=20, workers=1, chunk=8))
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in (out / "wds").glob("train-*.json"))
    assert finished == ["train-00000.json"]  # the first shard completed; the second did not
    assert (out / "wds" / "train-00000.tar").exists()
    assert not (out / "wds" / "train-00001.tar").exists()
    assert not list((out / "wds").glob(".*.tmp"))


@pytest.mark.parametrize("lines, message", [
    (["a/x.JPEG 0", "a/y.JPEG five"], ":2: expected 'relative/path label'"),
    (["a/x.JPEG 0", "a/y.JPEG -1"], ":2: label -1 out of range"),
    (["a/x.JPEG 0", "a/y.JPEG 2"], "class(es) [1] have no training images"),
])
def test_bad_lists_are_errors_naming_the_culprit(tmp_path, lines, message):
    (tmp_path / "imgs").mkdir()
    lst = tmp_path / "Bad_train.txt"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=None) as info:
        list_dataset("imagenet-lt", tmp_path / "imgs", {"train": lst})
    assert message in str(info.value) and "Bad_train.txt" in str(info.value)


def test_val_label_out_of_range_names_file_and_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "T_train.txt").write_text("a.JPEG 0\nb.JPEG 1\n")
    (tmp_path / "T_val.txt").write_text("c.JPEG 0\nd.JPEG 7\n")
    with pytest.raises(SourceError, match=r"T_val.txt:2: label 7 out of range 0\.\.1"):
        list_dataset("places-lt", tmp_path / "imgs", {"train": tmp_path / "T_train.txt",
                                                       "val": tmp_path / "T_val.txt"})


def test_class_emptied_by_skips_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.JPEG").write_bytes(_jpeg(np.random.default_rng(0), 20, 20))
    (root / "b.JPEG").write_bytes(b"not an image")
    (tmp_path / "T_train.txt").write_text("a.JPEG 0\nb.JPEG 1\n")
    source = list_dataset("places-lt", root, {"train": tmp_path / "T_train.txt"})
    with pytest.raises(SourceError, match=r"class\(es\) \[1\] have no usable images after skipping 1"):
        prepare(source, tmp_path / "out", PrepOptions(EncodeSettings(), workers=1, formats=("wds",)))


def test_canonicalize_rejects_and_converts():
    rng = np.random.default_rng(1)
    with pytest.raises(BadImage, match="not-an-image"):
        canonicalize_encoded(b"GARBAGE-bytes", EncodeSettings())
    big = _jpeg(rng, 600, 800)
    out = canonicalize_encoded(big, EncodeSettings(max_side=256))
    assert (out.height, out.width) == (192, 256)
    small = _jpeg(rng, 100, 120)
    assert canonicalize_encoded(small, EncodeSettings(max_side=256)).jpeg == small  # stored verbatim


def test_fmnist_lt_profile_and_readback(tmp_path, capsys):
    out = tmp_path / "fm"
    prep_main(["fmnist-lt", "--root", str(SHARED / "fashion-mnist"), "--out", str(out), "--imbalance-ratio", "100",
               "--val-per-class", "20"])
    manifest = load_manifest(out)
    counts = manifest["splits"]["train"]["class_counts"]
    np.testing.assert_array_equal(counts, lt_counts(6000 - 20, 10, 100))
    assert counts[0] / counts[-1] == pytest.approx(100, rel=0.02)
    assert manifest["splits"]["val"]["class_counts"] == [20] * 10
    assert manifest["splits"]["test"]["class_counts"] == [1000] * 10
    assert manifest["writer"]["ffcv_write_mode"] == "raw"
    # Val images are held out of the training pool: no origin appears in both.
    origins = {s: {ln.split("\t")[3] for ln in (out / "meta" / f"{s}.tsv").read_text().splitlines()[1:]}
               for s in ("train", "val")}
    assert not origins["train"] & origins["val"]
    images, labels, indices = _read_ffcv(out / "ffcv" / "val.beton")
    np.testing.assert_array_equal(labels, ShardReader(out, "val").labels)
    assert images[0].shape == (28, 28, 3)
    _, dali_labels = _read_dali(out / "wds", "val")
    np.testing.assert_array_equal(dali_labels, labels)


def test_cifar_pickles(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    labels = np.repeat(np.arange(10), 30)
    for i in range(1, 6):
        sel = labels[i - 1::5]
        batch = {b"data": rng.integers(0, 255, (len(sel), 3072), dtype=np.uint8), b"labels": sel.tolist()}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (root / "test_batch").write_bytes(pickle.dumps({b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
                                                   b"labels": list(range(10)) * 2}))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    out = tmp_path / "c10"
    prep_main(["cifar10-lt", "--root", str(root), "--out", str(out), "--imbalance-ratio", "10",
               "--val-per-class", "2", "--formats", "wds"])
    manifest = load_manifest(out)
    np.testing.assert_array_equal(manifest["splits"]["train"]["class_counts"], lt_counts(28, 10, 10))
    assert manifest["class_names"][3] == "c3"
    img = simplejpeg.decode_jpeg(bytes(ShardReader(out, "test").get_bytes(0)))
    assert img.shape == (32, 32, 3)


def test_synthetic_is_labelled_synthetic(tmp_path, capsys):
    out = tmp_path / "syn"
    prep_main(["synthetic-lt", "--scale", "0.0005", "--out", str(out), "--val-per-class", "0", "--formats", "wds"])
    captured = capsys.readouterr()
    assert "SYNTHETIC" in captured.out and "SYNTHETIC" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["num_classes"] == 1000
    sizes = [ShardReader(out, "train").size[i] for i in range(10)]
    assert all(s > 5000 for s in sizes)  # realistic JPEGs, stored at max side 256


def test_fmnist_lt_class_order_permutes_the_profile():
    from data_prep.longtail import class_order_permutation, select_lt_indices
    from data_prep.sources import fmnist_dataset

    root = next((p for p in (Path("/usr/share/datasets/fashion-mnist"), SHARED / "fashion-mnist") if p.is_dir()), None)
    if root is None:
        pytest.skip("Fashion-MNIST idx files not found")
    default = fmnist_dataset(root, 100, 20, 0)
    permuted = fmnist_dataset(root, 100, 20, 0, class_order=3)
    perm = class_order_permutation(10, 3)
    assert permuted.extra["class_permutation"] == perm.tolist() and permuted.extra["class_order"] == 3
    assert "class_permutation" not in default.extra
    profile = lt_counts(6000 - 20, 10, 100)
    want = np.empty(10, dtype=np.int64)
    want[perm] = profile  # class perm[r] gets the r-th largest count
    np.testing.assert_array_equal(np.bincount(permuted.splits["train"].labels, minlength=10), want)
    np.testing.assert_array_equal(np.bincount(default.splits["train"].labels, minlength=10), profile)
    assert perm.tolist() != list(range(10))  # seed 3 really reorders
    with pytest.raises(ValueError, match="permutation"):
        select_lt_indices(np.repeat(np.arange(3), 10), 2, class_order=[0, 0, 1])
