"""Cardinality-adjacent subsets (lfme_fast.subsets) and imbalance statistics (data_prep.stats)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_prep import stats
from data_prep.stats import imbalance_metrics, load_counts, stats_report
from lfme_fast.subsets import (
    CONVENTIONS,
    Subset,
    describe_convention,
    parse_thresholds,
    split_classes,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splits"
IMAGENET_LT = SHARED / "ImageNet_LT"
PLACES_LT_TRAIN = SHARED / "Places_LT" / "Places_LT_train.txt"
SHIPPED = Path(__file__).resolve().parents[1] / "data_prep" / "histograms" / "imagenet_lt_train.npy"

needs_imagenet = pytest.mark.skipif(not IMAGENET_LT.is_dir(), reason="shared ImageNet-LT splits not present")


@pytest.fixture(scope="module")
def inlt_counts() -> np.ndarray:
    if not IMAGENET_LT.is_dir():
        pytest.skip("shared ImageNet-LT splits not present")
    return np.load(IMAGENET_LT / "class_count_ImageNet_LT.npy")


# ---------------------------------------------------------------- subsets


def test_split_three_way_boundaries_lfme_and_strict():
    counts = np.array([5, 20, 21, 99, 100, 101, 19, 1000])
    many, medium, few = split_classes(counts, "lfme")
    assert [s.name for s in (many, medium, few)] == ["many", "medium", "few"]
    assert many.classes.tolist() == [4, 5, 7]
    assert medium.classes.tolist() == [2, 3]
    assert few.classes.tolist() == [0, 1, 6]
    assert (many.lower, many.upper, medium.lower, medium.upper, few.lower, few.upper) == (100, None, 21, 99, None, 20)

    many, medium, few = split_classes(counts, "strict")
    assert many.classes.tolist() == [5, 7]
    assert medium.classes.tolist() == [1, 2, 3, 4]
    assert few.classes.tolist() == [0, 6]
    assert many.classes.dtype == np.int64


def test_split_custom_thresholds_any_L_and_empty_subsets():
    counts = np.array([1, 2, 3, 4, 5, 6])
    two = split_classes(counts, thresholds=(4,))
    assert [s.name for s in two] == ["many", "few"]
    assert two[0].classes.tolist() == [3, 4, 5] and two[1].classes.tolist() == [0, 1, 2]

    five = split_classes(counts, thresholds=[100, 50, 5, 2])
    assert [s.name for s in five] == ["subset0", "subset1", "subset2", "subset3", "subset4"]
    assert [len(s) for s in five] == [0, 0, 2, 3, 1]
    # every class lands in exactly one subset and its count lies in the subset's range
    all_ids = np.concatenate([s.classes for s in five])
    assert sorted(all_ids.tolist()) == list(range(6))
    for s in five:
        assert all(s.contains_count(int(counts[c])) for c in s.classes)
    # the thresholds override the convention
    assert [len(s) for s in split_classes(counts, "strict", thresholds=(4,))] == [3, 3]


@pytest.mark.parametrize(
    "bad, match",
    [((21, 100), "descending"), ((100, 100), "descending"), ((100, 0), "not positive"),
     ((), "at least one"), ((100, 2.5), "not an integer"), ("100,21", "string")],
)
def test_split_rejects_bad_thresholds(bad, match):
    with pytest.raises(ValueError, match=match):
        split_classes(np.array([1, 2, 3]), thresholds=bad)


def test_split_rejects_bad_counts_and_convention():
    with pytest.raises(ValueError, match="unknown convention 'oltr'"):
        split_classes([1, 2], "oltr")
    with pytest.raises(ValueError, match="class 1 has count -3"):
        split_classes([1, -3], "lfme")
    with pytest.raises(ValueError, match="1-D"):
        split_classes(np.ones((2, 2)), "lfme")


def test_subset_to_json_roundtrips_through_json():
    s = split_classes(np.array([150, 3, 40]), "lfme")[1]
    assert isinstance(s, Subset)
    data = json.loads(json.dumps(s.to_json()))
    assert data == {"name": "medium", "classes": [2], "num_classes": 1, "lower": 21, "upper": 99}


def test_describe_and_parse_thresholds():
    assert describe_convention("lfme", None) == "lfme (many >= 100, medium 21..99, few <= 20)"
    assert describe_convention("strict", None) == "strict (many >= 101, medium 20..100, few <= 19)"
    assert describe_convention("lfme", (100, 21)) == "lfme (many >= 100, medium 21..99, few <= 20)"
    assert describe_convention("lfme", (50,)) == "custom thresholds 50 (many >= 50, few <= 49)"
    assert parse_thresholds("100,21") == (100, 21)
    assert parse_thresholds(" 40, 30 ,10") == (40, 30, 10)
    with pytest.raises(ValueError, match="'x'"):
        parse_thresholds("100,x")
    with pytest.raises(ValueError, match="descending"):
        parse_thresholds("20,100")
    with pytest.raises(ValueError):
        parse_thresholds("")
    assert CONVENTIONS == {"lfme": (100, 21), "strict": (101, 20)}


@needs_imagenet
def test_imagenet_lt_subsets_equal_reference_class_lists(inlt_counts):
    lfme = split_classes(inlt_counts, "lfme")
    assert [len(s) for s in lfme] == [391, 463, 146]
    with open(IMAGENET_LT / "ImageNet_shots.pkl", "rb") as f:
        shots = pickle.load(f)
    for subset, key in zip(lfme, ("many_shot", "median_shot", "low_shot")):
        assert subset.classes.tolist() == sorted(int(c) for c in shots[key])

    strict = split_classes(inlt_counts, "strict")
    assert [len(s) for s in strict] == [385, 479, 136]
    masks = np.load(IMAGENET_LT / "imagenet_lt_shot_list.npy")
    for subset, mask in zip(strict, masks):
        assert subset.classes.tolist() == np.flatnonzero(mask).tolist()


# ---------------------------------------------------------------- metrics


def test_metrics_small_hand_computed():
    m = imbalance_metrics([1, 3])
    assert m["classes"] == 2 and m["samples"] == 4
    assert m["ratio"] == pytest.approx(3.0)
    assert m["kl"] == pytest.approx(0.25 * np.log2(0.5) + 0.75 * np.log2(1.5))
    assert m["abs"] == pytest.approx(0.5)
    assert m["gini"] == pytest.approx((-1 * 1 + 1 * 3) / (2 * 4))
    # balanced: every metric at its minimum; order of classes is irrelevant
    assert imbalance_metrics([7, 7, 7]) == {"classes": 3, "samples": 21, "ratio": 1.0, "kl": 0.0, "abs": 0.0, "gini": 0.0}
    assert imbalance_metrics([3, 1, 2]) == imbalance_metrics([1, 2, 3])


def test_metrics_empty_and_invalid():
    assert imbalance_metrics([]) == {"classes": 0, "samples": 0, "ratio": None, "kl": None, "abs": None, "gini": None}
    with pytest.raises(ValueError, match="class 1 has 0 samples"):
        imbalance_metrics([4, 0, 2])
    with pytest.raises(ValueError, match="non-integer"):
        imbalance_metrics([1.5, 2.0])


def test_lfme_table1_reproduced(inlt_counts):
    """LFME (ECCV 2020) Table 1, ImageNet-LT, lfme convention, at the paper's printed precision."""
    table1 = {
        "entire": (256.0, 0.707, 0.769, 0.524),
        "many": (12.8, 0.278, 0.481, 0.322),
        "medium": (4.7, 0.122, 0.356, 0.235),
        "few": (4.0, 0.099, 0.320, 0.209),
    }
    report = stats_report(inlt_counts, "lfme")
    for row, (ratio, kl, ab, gini) in table1.items():
        got = report[row]
        assert f"{got['ratio']:.1f}" == f"{ratio:.1f}", row
        assert f"{got['kl']:.3f}" == f"{kl:.3f}", row
        assert f"{got['abs']:.3f}" == f"{ab:.3f}", row
        assert f"{got['gini']:.3f}" == f"{gini:.3f}", row
    assert (report["entire"]["classes"], report["entire"]["samples"]) == (1000, 115846)
    assert [report[k]["classes"] for k in ("many", "medium", "few")] == [391, 463, 146]
    assert sum(report[k]["samples"] for k in ("many", "medium", "few")) == 115846


def test_stats_report_shape_and_empty_subset():
    report = stats_report(np.array([5, 6, 7]), thresholds=(100, 50))
    assert list(report) == ["convention", "entire", "many", "medium", "few"]
    assert report["many"]["classes"] == 0 and report["many"]["samples"] == 0 and report["many"]["gini"] is None
    assert report["few"]["classes"] == 3
    assert report["convention"]["name"] == "custom"
    assert report["convention"]["thresholds"] == [100, 50]
    json.dumps(report)  # must be JSON-serialisable as is


def test_shipped_histogram_equals_shared_copy(inlt_counts):
    shipped = np.load(SHIPPED)
    assert shipped.dtype == np.int64 and shipped.shape == (1000,)
    np.testing.assert_array_equal(shipped, inlt_counts)


# ---------------------------------------------------------------- sources


def _write_list(path: Path, labels, prefix="train/img") -> Path:
    path.write_text("".join(f"{prefix}_{i}.jpg {lab}\n" for i, lab in enumerate(labels)))
    return path


def test_load_counts_split_list(tmp_path):
    src = _write_list(tmp_path / "train.txt", [2, 0, 1, 2, 2, 0])
    # a trailing blank line is tolerated
    src.write_text(src.read_text() + "\n")
    np.testing.assert_array_equal(load_counts(src), [2, 1, 3])
    assert load_counts(src).dtype == np.int64


def test_load_counts_npy_and_manifest(tmp_path):
    np.save(tmp_path / "counts.npy", np.array([10, 4, 1], dtype=np.int32))
    np.testing.assert_array_equal(load_counts(tmp_path / "counts.npy"), [10, 4, 1])

    ds = tmp_path / "prepared"
    ds.mkdir()
    manifest = {"splits": {"train": {"class_counts": [9, 3, 1]}, "val": {"class_counts": [2, 2, 2]}}}
    (ds / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(load_counts(ds), [9, 3, 1])
    np.testing.assert_array_equal(load_counts(ds, split="val"), [2, 2, 2])
    with pytest.raises(ValueError, match="no split 'test'"):
        load_counts(ds, split="test")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        load_counts(tmp_path / "empty_dir")


def test_load_counts_bad_split_lists_name_file_line_class(tmp_path):
    bad = tmp_path / "malformed.txt"
    bad.write_text("a.jpg 0\nb.jpg 1\njust_a_path.jpg\n")
    with pytest.raises(ValueError, match=r"malformed\.txt:3:"):
        load_counts(bad)

    notint = tmp_path / "notint.txt"
    notint.write_text("a.jpg 0\nb.jpg one\n")
    with pytest.raises(ValueError, match=r"notint\.txt:2: label 'one'"):
        load_counts(notint)

    neg = tmp_path / "negative.txt"
    neg.write_text("a.jpg 0\nb.jpg -1\n")
    with pytest.raises(ValueError, match=r"negative\.txt:2: label -1 is negative"):
        load_counts(neg)

    gap = _write_list(tmp_path / "gap.txt", [0, 0, 1, 3])
    with pytest.raises(ValueError, match=r"gap\.txt.*class 2 has no images"):
        load_counts(gap)

    with pytest.raises(ValueError, match="does not exist"):
        load_counts(tmp_path / "missing.txt")


def test_load_counts_bad_npy(tmp_path):
    np.save(tmp_path / "zero.npy", np.array([3, 0, 1]))
    with pytest.raises(ValueError, match="class 1 has 0 samples"):
        load_counts(tmp_path / "zero.npy")
    np.save(tmp_path / "twod.npy", np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D"):
        load_counts(tmp_path / "twod.npy")


@pytest.mark.skipif(not PLACES_LT_TRAIN.is_file(), reason="shared Places-LT lists not present")
def test_real_places_lt_train_list_loads():
    counts = load_counts(PLACES_LT_TRAIN)
    assert counts.shape == (365,)
    assert counts.sum() == 62500 and counts.min() == 5 and counts.max() == 4980


# ---------------------------------------------------------------- CLI


def test_main_json_shape(tmp_path, capsys):
    src = _write_list(tmp_path / "train.txt", [0] * 150 + [1] * 50 + [2] * 10 + [3] * 5)
    assert stats.main([str(src), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("entire", "many", "medium", "few"):
        assert set(out[key]) >= {"classes", "samples", "ratio", "kl", "abs", "gini"}
    assert out["entire"]["samples"] == 215 and out["entire"]["ratio"] == 30.0
    assert [out[k]["classes"] for k in ("many", "medium", "few")] == [1, 1, 2]
    assert out["convention"]["description"].startswith("lfme")

    assert stats.main([str(src), "--json", "--thresholds", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [out[k]["classes"] for k in ("many", "few")] == [2, 2]


def test_main_table_names_convention(tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.array([300, 120, 50, 20, 19]))
    assert stats.main([str(tmp_path / "c.npy"), "--convention", "strict"]) == 0
    text = capsys.readouterr().out
    assert "strict (many >= 101, medium 20..100, few <= 19)" in text
    lines = text.splitlines()
    assert lines[1].split()[:2] == ["subset", "range"]
    assert [ln.split()[0] for ln in lines[2:]] == ["entire", "many", "medium", "few"]
    assert lines[5].split()[-6:-4] == ["1", "19"]  # one few-shot class (19 images) under strict


def test_main_reports_errors_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        stats.main([str(tmp_path / "nope.txt")])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "c.npy", np.array([3, 2]))
    with pytest.raises(SystemExit):
        stats.main([str(tmp_path / "c.npy"), "--thresholds", "5,9"])
    assert "descending" in capsys.readouterr().err


def test_report_names_convention_consistently():
    counts = np.array([150, 30, 10])
    assert stats_report(counts, "lfme", thresholds=(100, 21))["convention"]["name"] == "lfme"
    assert stats_report(counts, "strict")["convention"] == {
        "name": "strict",
        "thresholds": [101, 20],
        "description": "strict (many >= 101, medium 20..100, few <= 19)",
    }
