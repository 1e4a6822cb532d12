"""Tests for lfme_fast.models: shapes, parameter counts (torchvision's numbers), checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lfme_fast.models import (
    MODELS,
    CosineClassifier,
    LoadReport,
    NormedLinear,
    build_model,
    count_parameters,
    load_pretrained,
    resnet10,
    resnet32,
    resnet_small28,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "name, size, feat_dim",
    [("resnet10", 32, 512), ("resnet32", 32, 64), ("resnet_small28", 28, 128), ("resnet50", 64, 2048)],
)
def test_forward_shapes(name, size, feat_dim):
    model = build_model(name, num_classes=7).eval()
    batch = 1 if name == "resnet50" else 2
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (batch, 7)
    assert feats.shape == (batch, feat_dim)
    assert model.feature_dim == feat_dim
    # forward == classifier(forward_features)
    torch.testing.assert_close(model.classifier(feats), logits)


def test_registry_names_and_unknown():
    assert set(MODELS) == {"resnet10", "resnet32", "resnet_small28", "resnet50", "resnet152"}
    with pytest.raises(ValueError, match="resnet10.*resnet152.*resnet32.*resnet50.*resnet_small28"):
        build_model("resnet18", 10)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet32", 0)


def test_param_counts_match_torchvision():
    assert count_parameters(build_model("resnet50", 1000)) == 25_557_032
    assert count_parameters(build_model("resnet152", 1000)) == 60_192_808
    # ResNet-18 layout with one block per stage: conv/bn/fc arithmetic gives 5,418,792.
    assert count_parameters(resnet10(1000)) == 5_418_792
    n32 = count_parameters(resnet32(10))
    assert n32 == 464_154  # LDAM's ResNet-32, 10 classes (the "0.46M" of the literature)
    assert count_parameters(resnet32(100)) == n32 + 90 * 65


def test_resnet152_torchvision_names():
    keys = set(build_model("resnet152", 365).state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer3.35.conv3.weight", "layer4.0.downsample.0.weight",
              "layer4.0.downsample.1.num_batches_tracked", "layer4.2.bn3.bias", "fc.weight", "fc.bias"]:
        assert k in keys
    assert "layer3.36.conv1.weight" not in keys


def test_resnet10_torchvision_structure():
    m = resnet10(10)
    keys = list(m.state_dict())
    assert keys[0] == "conv1.weight" and m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    assert isinstance(m.maxpool, nn.MaxPool2d)
    assert "layer1.0.downsample.0.weight" not in keys  # 64->64, stride 1: identity
    assert m.layer2[0].downsample[0].weight.shape == (128, 64, 1, 1)
    assert not hasattr(m.layer1[0], "conv3")


def test_resnet32_option_a_and_norm():
    m = resnet32(10)
    # Option A: the shortcut has no parameters, so only layers' convs/bns exist.
    assert not any("shortcut" in k for k in m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    mn = resnet32(10, use_norm=True).eval()
    assert isinstance(mn.linear, NormedLinear) and mn.linear.weight.shape == (64, 10)
    with torch.no_grad():
        out = mn(x)
    assert out.abs().max() <= 1.0 + 1e-5  # raw cosines with the default scale 1
    with torch.no_grad():
        out20 = resnet32(10, use_norm=True, norm_scale=20.0).eval()(x)
    assert out20.shape == (2, 10)


def test_resnet32_downsample_shortcut_values():
    m = resnet32(10)
    block = m.layer2[0]
    x = torch.randn(1, 16, 8, 8)
    sc = block.shortcut(x)
    assert sc.shape == (1, 32, 4, 4)
    torch.testing.assert_close(sc[:, 8:24], x[:, :, ::2, ::2])
    assert sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0


def test_small28_accepts_grey_option_and_backward():
    m = resnet_small28(10, in_chans=1)
    out = m(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert m.conv1.weight.grad is not None


def test_channels_last_forward_matches():
    m = resnet10(5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_load_pretrained_roundtrip_skips_mismatched_fc(tmp_path):
    src = resnet10(1000)
    path = tmp_path / "r10.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = resnet10(365)
    fc_before = dst.fc.weight.detach().clone()
    report = load_pretrained(dst, path)
    assert isinstance(report, LoadReport)
    assert set(report.skipped_classifier) == {"fc.weight", "fc.bias"}
    assert report.skipped_classifier["fc.weight"] == ((1000, 512), (365, 512))
    assert set(report.missing) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(dst.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    torch.testing.assert_close(dst.bn1.running_var, src.bn1.running_var)
    torch.testing.assert_close(dst.fc.weight, fc_before)  # fresh classifier kept
    with pytest.raises(ValueError, match="fc.weight"):
        load_pretrained(resnet10(365), path, skip_classifier=False)


def test_load_pretrained_same_classes_loads_everything(tmp_path):
    src = resnet32(10)
    path = tmp_path / "r32.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = build_model("resnet32", 10, pretrained_path=path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_load_pretrained_plain_state_dict_without_bn_counters(tmp_path):
    # Old torchvision checkpoints have no num_batches_tracked; they must still load strictly.
    src = resnet10(10)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    report = load_pretrained(resnet10(10), path)
    assert not report.skipped_classifier
    assert all(k.endswith("num_batches_tracked") for k in report.missing)


def test_load_pretrained_bad_key_and_shape(tmp_path):
    sd = resnet10(10).state_dict()
    extra = dict(sd, **{"layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="layer5.0.conv1.weight"):
        load_pretrained(resnet10(10), tmp_path / "extra.pth")
    report = load_pretrained(resnet10(10), tmp_path / "extra.pth", strict=False)
    assert report.unexpected == ["layer5.0.conv1.weight"]

    bad = dict(sd)
    bad["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):
        load_pretrained(resnet10(10), tmp_path / "bad.pth")

    missing = {k: v for k, v in sd.items() if k != "layer1.0.bn2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="layer1.0.bn2.weight"):
        load_pretrained(resnet10(10), tmp_path / "missing.pth")

    torch.save({"epoch": torch.tensor(3), "note": "x"}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_pretrained(resnet10(10), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        load_pretrained(resnet10(10), tmp_path / "nope.pth")


def test_load_pretrained_resnet32_classifier_named_linear(tmp_path):
    torch.save(resnet32(100).state_dict(), tmp_path / "c100.pth")
    dst = resnet32(10)
    report = load_pretrained(dst, tmp_path / "c100.pth")
    assert set(report.skipped_classifier) == {"linear.weight", "linear.bias"}


# ---- cosine classifier (CBD) and the feature interface every backbone shares -----------------------

_SIZES = {"resnet10": 32, "resnet32": 32, "resnet_small28": 28, "resnet50": 32, "resnet152": 32}
_DIMS = {"resnet10": 512, "resnet32": 64, "resnet_small28": 128, "resnet50": 2048, "resnet152": 2048}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_every_backbone_features_and_classifier(name, classifier):
    """Every registered backbone: forward_features -> (N, feature_dim) pooled features, forward =
    classifier(forward_features), with either head; the cosine head replaces the linear one under the
    same key with the same weight shape, without a bias."""
    model = build_model(name, 5, classifier=classifier, cosine_scale=16.0).eval()
    x = torch.randn(2, 3, _SIZES[name], _SIZES[name])
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert model.feature_dim == _DIMS[name] and feats.shape == (2, _DIMS[name])
    torch.testing.assert_close(model.classifier(feats), logits)
    head = model.classifier_name
    keys = {k for k in model.state_dict() if k.startswith(head + ".")}
    assert model.classifier.weight.shape == (5, _DIMS[name])
    if classifier == "cosine":
        assert isinstance(model.classifier, CosineClassifier) and keys == {f"{head}.weight"}
        assert model.classifier.out_features == 5  # evaluate.py reads it for empty ranks
        assert logits.abs().max() <= 16.0 + 1e-4  # |scale * cosine| <= scale
    else:
        assert keys == {f"{head}.weight", f"{head}.bias"}


def test_cosine_classifier_values():
    head = CosineClassifier(4, 3, scale=20.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [1.0, 1.0, 0, 0]]))
    x = torch.tensor([[5.0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    expected = 20.0 * torch.tensor([[1.0, 0.0, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1.0]])
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(head(x * 7.0), expected)  # invariant to the feature norm
    x.requires_grad_(True)
    head(x).sum().backward()
    assert head.weight.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="cosine_scale"):
        CosineClassifier(4, 3, scale=0.0)


def test_build_model_classifier_errors():
    with pytest.raises(ValueError, match="classifier must be one of"):
        build_model("resnet10", 5, classifier="arcface")
    with pytest.raises(ValueError, match="cosine_scale"):
        build_model("resnet10", 5, classifier="cosine", cosine_scale=-1.0)
    with pytest.raises(ValueError, match="use_norm"):
        build_model("resnet32", 5, classifier="cosine", use_norm=True)


def test_cosine_checkpoints_load(tmp_path):
    """A cosine model's checkpoint loads into a cosine model (everything); a linear backbone checkpoint
    loads into a cosine model with its head skipped (no bias to put anywhere), and a cosine checkpoint
    into a linear model skips the head too (it has no bias for it) instead of leaving a random bias."""
    src = build_model("resnet_small28", 6, classifier="cosine")
    torch.save(src.state_dict(), tmp_path / "cos.pth")
    dst = build_model("resnet_small28", 6, pretrained_path=tmp_path / "cos.pth", classifier="cosine")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)

    torch.save(build_model("resnet_small28", 6).state_dict(), tmp_path / "lin.pth")
    cos = build_model("resnet_small28", 6, classifier="cosine")
    report = load_pretrained(cos, tmp_path / "lin.pth")
    assert set(report.skipped_classifier) == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="classifier mismatch for key 'fc.bias'"):
        load_pretrained(cos, tmp_path / "lin.pth", skip_classifier=False)

    lin = build_model("resnet_small28", 6)
    before = lin.fc.weight.detach().clone()
    report = load_pretrained(lin, tmp_path / "cos.pth")
    assert set(report.skipped_classifier) == {"fc.weight"}
    torch.testing.assert_close(lin.fc.weight, before)
    torch.testing.assert_close(lin.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    with pytest.raises(ValueError, match="'fc.bias': checkpoint absent"):
        load_pretrained(lin, tmp_path / "cos.pth", skip_classifier=False)
