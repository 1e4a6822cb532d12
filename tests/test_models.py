"""Tests for lfme_fast.models: shapes, parameter counts (torchvision's numbers), checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lfme_fast.models import (
    MODELS,
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
