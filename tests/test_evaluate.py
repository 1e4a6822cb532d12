"""Metrics, restricted (within-subset) accuracy, gathering/dedup and the written reports."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lfme_fast.evaluate import (
    Predictions,
    classification_metrics,
    evaluate,
    predict,
    subset_accuracy,
    write_reports,
)

COUNTS = [500, 200, 150, 50, 30, 10]  # lfme convention: many 0,1,2 / medium 3,4 / few 5


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5, 5])
    preds = np.array([0, 1, 1, 2, 3, 0, 4, 5, 0, 0])
    m = classification_metrics(Predictions(np.arange(10), labels, preds), COUNTS, "lfme", split="test")
    assert m["top1"] == pytest.approx(6 / 10)
    assert m["per_class_top1"] == pytest.approx([0.5, 1.0, 1.0, 0.5, 1.0, 1 / 3])
    assert m["subsets"]["many"]["top1"] == pytest.approx((0.5 + 1 + 1) / 3)  # mean over classes
    assert m["subsets"]["medium"]["top1"] == pytest.approx(0.75)
    assert m["subsets"]["few"]["top1"] == pytest.approx(1 / 3)
    assert m["subsets"]["many"]["num_samples"] == 4 and m["subsets"]["few"]["num_classes"] == 1
    assert m["convention"].startswith("lfme (many >= 100")
    assert m["mean_class_top1"] == pytest.approx(np.mean([0.5, 1.0, 1.0, 0.5, 1.0, 1 / 3]))
    assert m["split"] == "test" and m["train_class_counts"] == COUNTS
    json.dumps(m)  # JSON-safe

    strict = classification_metrics(Predictions(np.arange(10), labels, preds), COUNTS, "strict")
    assert strict["convention"].startswith("strict")


def test_empty_subset_and_missing_classes_report_null():
    labels, preds = np.array([0, 1]), np.array([0, 0])
    m = classification_metrics(Predictions(np.arange(2), labels, preds), [500, 300, 200], "lfme")
    assert m["subsets"]["medium"]["num_classes"] == 0 and m["subsets"]["medium"]["top1"] is None
    assert m["per_class_top1"][2] is None  # no test sample of class 2


def test_subset_accuracy_full_and_local():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0],   # label 2: overall argmax 0, within {1, 2} -> 2 (right)
                           [0.0, 3.0, 1.0, 9.0],   # label 1: within {1, 2} -> 1 (right)
                           [0.0, 3.0, 1.0, 0.0],   # label 2: within -> 1 (wrong)
                           [9.0, 0.0, 0.0, 0.0]])  # label 0: not in the subset, ignored
    labels = torch.tensor([2, 1, 2, 0])
    assert subset_accuracy(logits, labels, [1, 2]) == pytest.approx(2 / 3)
    local = logits[:, [1, 2]]  # an expert's outputs over its own classes
    assert subset_accuracy(local, labels, [1, 2], local=True) == pytest.approx(2 / 3)
    assert math.isnan(subset_accuracy(logits, labels, [3]))
    with pytest.raises(ValueError, match="columns"):
        subset_accuracy(logits, labels, [1, 2], local=True)


class _Loader:
    """Batches with a duplicated sample (as sharding padding produces)."""

    def __init__(self, x, y, order, bs):
        self.x, self.y, self.order, self.bs = x, y, order, bs

    def __iter__(self):
        for lo in range(0, len(self.order), self.bs):
            idx = torch.as_tensor(self.order[lo:lo + self.bs])
            yield SimpleNamespace(images=self.x[idx], labels=self.y[idx], indices=idx)


def test_predict_dedupes_and_restores_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(7, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loader = _Loader(x, y, [3, 1, 0, 6, 2, 5, 4, 3, 1], bs=4)
    model.train()
    p = predict(model, loader, keep_logits=True)
    assert model.training
    assert p.indices.tolist() == list(range(7))
    assert p.labels.tolist() == y.tolist()
    with torch.no_grad():
        ref = model.eval()(x)
    assert np.allclose(p.logits, ref.numpy(), atol=1e-6) and p.preds.tolist() == ref.argmax(1).tolist()

    m = evaluate(model, loader, [100, 50, 10], "lfme")
    assert m["num_samples"] == 7 and "top1_within_subset" in m["subsets"]["many"]


def test_write_reports(tmp_path):
    labels = np.repeat(np.arange(6), 3)
    preds = labels.copy()
    preds[::4] = 0
    m = classification_metrics(Predictions(np.arange(labels.size), labels, preds, np.eye(6)[preds]), COUNTS,
                               split="test")
    files = write_reports(tmp_path, m, title="t", class_names=list("abcdef"))
    assert sorted(files) == ["metrics.json", "metrics.md", "per_class_accuracy.png"]
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == pytest.approx(m["top1"])
    md = (tmp_path / "metrics.md").read_text()
    assert m["convention"] in md and "| 5 | f | 10 |" in md and "within subset" in md
    assert (tmp_path / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
