"""A trained model outside the project: the export (safetensors + model.json) loads into a fresh model with
the same logits, ``lfme-predict`` predicts a folder (unreadable images listed, never dropped), and the run
logs to TensorBoard through Accelerate's trackers, with ``RUN/curves.png`` and ``RUN/train.log``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lfme_fast.config import load_config
from lfme_fast.logging_utils import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(fmnist_dir, tmp_path_factory):
    """The smoke config trained once through the command line, logging to TensorBoard (the fixture has no
    test split: val stands in)."""
    from lfme_fast.train import main

    out = tmp_path_factory.mktemp("export") / "run"
    rc = main(["--config", str(SMOKE), "--output-dir", str(out), f"data.root={fmnist_dir}", "data.test_split=val",
               "train.checkpoint_every_steps=null", "log.trackers=[tensorboard]"])
    assert rc == 0
    return out


def _stored_images(root: Path, split: str, n: int, dest: Path) -> list[Path]:
    """The first ``n`` stored JPEGs of a prepared split written out as files (what a user would have)."""
    from lfme_fast.shards import ShardReader

    reader = ShardReader(root, split)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = dest / f"img{i:03d}.jpg"
        p.write_bytes(reader.get_bytes(i).tobytes())
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------


def test_export_files_and_model_json(smoke_run, fmnist_dir):
    from lfme_fast.export import config_sha256

    stage = smoke_run / "train"
    for name in ("model.pt", "model.safetensors", "model.json"):
        assert (stage / name).is_file(), name
    done = json.loads((stage / "done.json").read_text())
    assert {"model.safetensors", "model.json"} <= set(done["outputs"])
    info = json.loads((stage / "model.json").read_text())
    manifest = json.loads((Path(fmnist_dir) / "manifest.json").read_text())
    assert info["format"] == "lfme_fast.model/1" and info["num_classes"] == 10
    assert info["architecture"]["builder"] == "build_model"
    assert info["architecture"]["args"]["name"] == "resnet_small28"
    assert info["classes"] == list(range(10)) and info["class_names"] == manifest["class_names"]
    prep = info["preprocess"]
    assert prep["resolution"] == 28 and prep["resize"] == "resize" and prep["crop_ratio"] is None
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["std"] == pytest.approx([0.229, 0.224, 0.225])
    t = info["training"]
    assert t["recipe"] == "baseline" and t["stage"] == "train" and t["global_step"] == 8
    assert t["config_sha256"] == config_sha256(load_config(smoke_run / "config.yaml"))
    assert t["stage_fingerprint"] == done["fingerprint"]


def test_export_round_trip_same_logits(smoke_run):
    """safetensors -> a fresh model built with plain code from model.json -> the trained model's logits."""
    from lfme_fast.checkpoint import load_model_file
    from lfme_fast.export import load_exported
    from lfme_fast.models import build_model

    stage = smoke_run / "train"
    info = json.loads((stage / "model.json").read_text())
    trained_state, _ = load_model_file(stage / "model.pt")
    trained = build_model(**info["architecture"]["args"])
    trained.load_state_dict(trained_state)
    trained.eval()

    fresh = build_model(**info["architecture"]["args"])  # random init: differs until the weights load
    x = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(x)
        assert not torch.allclose(fresh.eval()(x), expected)
        fresh.load_state_dict(load_file(str(stage / "model.safetensors")), strict=True)
        assert torch.equal(fresh(x), expected)
        exported = load_exported(stage)  # the same through the loader predict uses
        assert torch.equal(exported(x), expected)


def test_export_torchvision_names_and_multi_expert(tmp_path):
    """ImageNet ResNets export torchvision's key names; a multi-expert model (shared stages) exports every
    key and comes back with the same inference logits."""
    from lfme_fast.export import export_model, load_exported
    from lfme_fast.models import MultiExpert, build_model

    prep = {"resolution": 32, "resize": "center_crop", "crop_ratio": 0.875, "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)
    net = build_model("resnet10", 7)
    export_model(tmp_path / "r10", net, classes=range(7), class_names=list("abcdefg"), preprocess=prep, training={})
    keys = set(load_file(str(tmp_path / "r10" / "model.safetensors")))
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "layer4.0.bn2.bias", "fc.weight", "fc.bias"} <= keys
    assert json.loads((tmp_path / "r10" / "model.json").read_text())["architecture"]["parameter_names"] == "torchvision"

    multi = MultiExpert("resnet_small28", 5, num_experts=2, shared_stages=1, kd_head=True, proj_head=False).eval()
    export_model(tmp_path / "ecl", multi, classes=[3, 4, 5, 6, 7], class_names=list("vwxyz"), preprocess=prep,
                 training={"recipe": "ecl"})
    back = load_exported(tmp_path / "ecl" / "model.safetensors")
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), multi.inference_logits(x))
    assert back.class_names == list("vwxyz") and back.info["classes"] == [3, 4, 5, 6, 7]


class _Wrapper(torch.nn.Module):
    """A training wrapper like CBD's student: a backbone plus a head only the loss uses."""

    def __init__(self, backbone, same_logits=True):
        super().__init__()
        self.backbone = backbone
        self.projection = torch.nn.Linear(backbone.feature_dim, 8)
        self.same_logits = same_logits

    def forward(self, x):
        logits = self.backbone(x)
        return logits if self.same_logits else logits + self.projection(self.backbone.forward_features(x)).sum()


def test_export_of_a_training_wrapper_is_its_backbone(tmp_path):
    from lfme_fast.export import export_model, load_exported, read_model_info
    from lfme_fast.models import build_model

    prep = {"resolution": 28, "resize": "resize", "crop_ratio": None, "mean": [0.5] * 3, "std": [0.25] * 3}
    wrapper = _Wrapper(build_model("resnet_small28", 4)).train()
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    export_model(tmp_path / "w", wrapper, classes=range(4), class_names=list("abcd"), preprocess=prep, training={})
    assert wrapper.training and all(torch.equal(before[k], v) for k, v in wrapper.state_dict().items())
    info = read_model_info(tmp_path / "w")
    assert info["exported_module"] == "backbone" and info["architecture"]["args"]["name"] == "resnet_small28"
    assert set(load_file(str(tmp_path / "w" / "model.safetensors"))) == set(wrapper.backbone.state_dict())
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "w")(x), wrapper.eval()(x))

    # a wrapper whose logits are not its backbone's is exported whole, and cannot be rebuilt
    other = _Wrapper(build_model("resnet_small28", 4), same_logits=False)
    export_model(tmp_path / "o", other, classes=range(4), class_names=list("abcd"), preprocess=prep, training={})
    assert read_model_info(tmp_path / "o")["architecture"] is None
    from lfme_fast.export import ExportError

    with pytest.raises(ExportError, match="no architecture recorded"):
        load_exported(tmp_path / "o")


def test_load_exported_refuses_damaged_weights(smoke_run, tmp_path):
    import shutil

    from lfme_fast.export import ExportError, load_exported

    copy = tmp_path / "copy"
    shutil.copytree(smoke_run / "train", copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="checksum"):
        load_exported(copy)


# ---------------------------------------------------------------------------------------------------
# trackers, curves, train.log
# ---------------------------------------------------------------------------------------------------


def test_tensorboard_tracker_curves_and_train_log(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs = [r for r in read_jsonl(smoke_run / "train" / "log.jsonl") if r.get("event") == "epoch"]
    events = sorted((smoke_run / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under RUN/trackers"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
    assert scalars["train/loss"] == pytest.approx([e["loss"] for e in epochs])
    assert scalars["train/lr"] == pytest.approx([e["lr"] for e in epochs])
    assert scalars["train/epoch"] == [1.0, 2.0]
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert scalars["eval/top1"] == pytest.approx([metrics["top1"]])
    assert "train/shards/distinct" not in scalars  # bookkeeping is not a curve

    assert (smoke_run / "curves.png").read_bytes()[:8] == PNG
    log = (smoke_run / "train.log").read_text().splitlines()
    assert log[0].startswith("==== ") and "recipe baseline" in log[0]
    assert any(line.startswith("[train] epoch 2/2 loss") for line in log)
    assert any(line.startswith("[smoke] test top-1") for line in log)


# ---------------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------------


def test_predict_folder_matches_eval_and_lists_skipped(smoke_run, fmnist_dir, tmp_path, capsys):
    from lfme_fast.evaluate import predict
    from lfme_fast.export import load_exported
    from lfme_fast.loaders import LoaderOptions, build_loader
    from lfme_fast.predict import main

    images = tmp_path / "images"
    good = _stored_images(Path(fmnist_dir), "val", 12, images)
    (images / "nested").mkdir()
    (images / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "nested" / "empty.png").write_bytes(b"")
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "preds.csv"
    rc = main(["--run", str(smoke_run), "--images", str(images), "--out", str(out), "--topk", "3",
               "--batch-size", "5", "--workers", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(p) for p in good] + [str(images / "nested" / "broken.jpg"),
                                                                  str(images / "nested" / "empty.png")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [Path(r["path"]).name for r in skipped] == ["broken.jpg", "empty.png"]
    assert all(r["error"] and r["top1_class"] == "" for r in skipped)
    assert "skipped" in err and "broken.jpg" in err and "empty.png" in err and "12 image(s) predicted, 2 skipped" in err

    # The same images through the training code's eval loader give the same classes and probabilities.
    model = load_exported(smoke_run / "train")
    loader = build_loader(LoaderOptions(fmnist_dir, "val", train=False, batch_size=64, backend="torch", num_workers=0))
    ref = predict(model.model, loader, keep_logits=True)
    probs = torch.softmax(torch.from_numpy(ref.logits[:12]), 1)
    top_p, top_i = probs.topk(3, dim=1)
    names = model.class_names
    for r, row in enumerate(rows[:12]):
        assert [int(row[f"top{k}_class"]) for k in (1, 2, 3)] == top_i[r].tolist()
        assert row["top1_name"] == names[top_i[r, 0]]
        assert [float(row[f"top{k}_prob"]) for k in (1, 2, 3)] == pytest.approx(top_p[r].tolist(), abs=2e-6)


def test_predict_list_file_and_usage_errors(smoke_run, fmnist_dir, tmp_path, capsys):
    from lfme_fast.predict import main

    imgs = _stored_images(Path(fmnist_dir), "val", 3, tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/{imgs[0].name} 4\n# a comment\n{imgs[1]}\nimgs/missing.jpg 2\n")
    out = tmp_path / "p.csv"
    assert main(["--model", str(smoke_run / "train" / "model.json"), "--images", str(listing), "--out", str(out),
                 "--topk", "1", "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    assert "No such file" in rows[2]["error"]
    capsys.readouterr()

    for argv, message in [
        (["--run", str(tmp_path), "--images", str(listing)], "no exported model"),
        (["--run", str(smoke_run), "--images", str(tmp_path / "nowhere")], "no such folder or file"),
        (["--run", str(smoke_run), "--images", str(listing), "--topk", "11", "--out", str(out)], "--topk 11"),
    ]:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lfme-predict: error:") and message in err[0], err


def test_load_image_center_crop_matches_eval_loader(synthetic_dir):
    """The centre-crop preprocessing (with the DCT-scaled decode) shows what the eval loader shows."""
    from lfme_fast.loaders import LoaderOptions, resolve_spec
    from lfme_fast.loaders.torch_backend import ShardImageDataset
    from lfme_fast.predict import load_image
    from lfme_fast.augment import center_boxes
    from lfme_fast.export import preprocess_info
    from lfme_fast.shards import ShardReader

    spec = resolve_spec(LoaderOptions(synthetic_dir, "val", train=False, batch_size=4, resolution=64,
                                      augment="imagenet", num_workers=0))
    prep = preprocess_info(spec)
    assert prep["resize"] == "center_crop" and prep["crop_ratio"] == pytest.approx(0.875)
    data = ShardImageDataset(spec)
    boxes = center_boxes(spec.heights, spec.widths, spec.crop_ratio)
    reader = ShardReader(synthetic_dir, "val")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            path = Path(tmp) / f"{i}.jpg"
            path.write_bytes(reader.get_bytes(i).tobytes())
            ours = load_image(path, prep).astype(np.float64)
            ref = data[(i, -1, *boxes[i].tolist(), False, None)][0].numpy().astype(np.float64)
            assert ours.shape == ref.shape == (64, 64, 3)
            # decoders and scales differ (DCT-downscaled decode): levels close, a wrong crop would not be
            assert np.abs(ours - ref).mean() < 5.0  # measured 1.4..3.4 levels
            shifted = np.roll(ref, 8, axis=1)  # the crop 8 px off: about 20 levels
            assert np.abs(ours - shifted).mean() > 3 * np.abs(ours - ref).mean()
