"""Config schema: every shipped YAML loads, validates and is complete; overrides are typed; errors name
the dotted key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lfme_fast.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    fingerprint,
    load_config,
    missing_keys,
    save_config,
)
from lfme_fast.recipes import get_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert "smoke.yaml" in names
    for recipe in ("ce_instance", "ce_balanced", "balanced_softmax", "logit_adjusted", "experts"):
        assert f"fmnist_lt/{recipe}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_loads_and_is_complete(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # a complete record: every schema key is written in the file, nothing is left to defaults
    assert missing_keys(path) == []
    # the file carries exactly the common sections plus its recipe's own
    recipe = get_recipe(cfg.recipe)  # resolves lazily registered recipes (lfme -> lfme_fast.recipes.lfme)
    assert set(cfg.sections) == set(recipe.SECTIONS)
    raw = yaml.safe_load(path.read_text())
    common = {"name", "seed", "recipe", "stages", "output_dir", "data", "model", "optim", "train", "precision",
              "eval", "log"}
    assert set(raw) == common | set(recipe.SECTIONS)
    assert set(cfg.stages) <= set(recipe.STAGES)


def test_roundtrip_through_saved_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["optim.lr=0.05", "recipe=lfme", "stages=null",
                                                        "experts.thresholds=[500, 50]"])
    assert cfg.experts.thresholds == (500, 50) and cfg.lfme.temperature == 2.0
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert missing_keys(tmp_path / "config.yaml") == []


def test_overrides_are_parsed_and_typed():
    cfg = config_from_dict({"name": "x", "recipe": "lfme"}, [
        "optim.lr=1e-3",  # YAML 1.1 reads this as a string; float fields accept it
        "optim.epochs=3",
        "optim.warmup_epochs=1",  # int into a float field
        "experts.thresholds=[1000, 200]",
        "experts.batch_size=[64, 32, 16]",
        "model.kwargs.use_norm=true",
        "precision.channels_last=false",
        "data.val_split=null",
        "seed=7",
        "precision.mixed_precision=no",  # YAML 1.1: unquoted no/off are booleans; choice fields take the word
        "lfme.spes=off",
    ])
    assert cfg.precision.mixed_precision == "no" and cfg.lfme.spes == "off"
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.experts.thresholds == (1000, 200)
    assert cfg.experts.batch_size == (64, 32, 16)
    assert cfg.model.kwargs == {"use_norm": True}
    assert cfg.precision.channels_last is False
    assert cfg.data.val_split is None
    assert cfg.seed == 7


def test_derived_defaults_are_resolved():
    cfg = config_from_dict({"name": "abc", "data": {"batch_size": 32}, "optim": {"epochs": 7, "lr": 0.2}})
    assert cfg.output_dir == "runs/abc"
    assert cfg.data.eval_batch_size == 32
    assert cfg.stages == get_recipe("baseline").STAGES == ("train", "eval")
    cfg = config_from_dict({"name": "abc", "recipe": "lfme", "data": {"batch_size": 32},
                            "optim": {"epochs": 7, "lr": 0.2}})
    assert (cfg.experts.epochs, cfg.experts.batch_size, cfg.experts.lr, cfg.experts.arch) == (7, 32, 0.2, "resnet10")
    assert cfg.stages == ("experts", "offline", "student", "eval")
    # stages come back in the recipe's order whatever order the file used
    assert config_from_dict({"name": "a", "stages": ["eval", "train"]}).stages == ("train", "eval")


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    ("nosuch=1", "unknown key 'nosuch'"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("train.grad_accum=true", "train.grad_accum: expected int"),
    ("data.backend=tf", "data.backend: expected 'ffcv' | 'dali' | 'torch'"),
    ("data=1", "'data' is a section"),
    ("optim.lr.x=1", "'optim.lr' is not a section"),
    ("stages=[train]", "not a stage of recipe 'lfme'"),
    ("recipe=nope", "unknown recipe 'nope'"),
    ("optim.milestones=[5, 3]", "optim.milestones"),
    ("experts.thresholds=[20, 100]", "experts.thresholds"),
    ("eval.thresholds=[]", "eval.thresholds"),
    ("experts.batch_size=[64, 32]", "one entry per subset"),
    ("model.arch=vgg", "unknown architecture 'vgg'"),
    ("lfme.spes=sometimes", "lfme.spes"),
    ("lfme.spis=on", "lfme.spis"),  # True has no matching word among paper/official/off
    ("log.progress=maybe", "log.progress: expected bool"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
])
def test_bad_overrides_name_key_and_source(override, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"name": "x", "recipe": "lfme"}, [override])
    msg = str(err.value)
    assert fragment in msg
    assert f"override {override!r}" in msg


def test_bad_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"sampler": "instance", "los": "ce"}}))
    with pytest.raises(ConfigError, match=r"unknown key 'train\.los' \(file .*bad\.yaml\)"):
        load_config(path)
    path.write_text(yaml.safe_dump({"name": "x", "data": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int \| null, got 'big' \(file .*bad\.yaml\)"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")


def test_override_not_of_form_key_value():
    with pytest.raises(ConfigError, match="section.key=value"):
        config_from_dict({"name": "x"}, ["optim.lr"])


def test_fingerprint_tracks_only_named_keys():
    a = config_from_dict({"name": "a"})
    keys = ("seed", "optim", "model")
    same = config_from_dict({"name": "b", "log": {"progress": False}, "train": {"log_every": 3}})
    assert fingerprint(a, keys) == fingerprint(same, keys)
    for change in (["seed=1"], ["optim.lr=0.3"], ["model.arch=resnet32"], ["model.kwargs.use_norm=true"]):
        assert fingerprint(config_from_dict({"name": "a"}, change), keys) != fingerprint(a, keys), change
    assert fingerprint(a, keys, {"data": 1}) != fingerprint(a, keys, {"data": 2})


def test_config_to_dict_is_plain():
    d = config_to_dict(config_from_dict({"name": "x", "recipe": "experts"}, ["experts.thresholds=[9, 3]"]))
    assert d["experts"]["thresholds"] == [9, 3]
    assert "sections" not in d and "lfme" not in d
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_sections_belong_to_their_recipe(tmp_path):
    # a baseline config may not carry another recipe's section: an unknown key naming the owner
    with pytest.raises(ConfigError, match=r"unknown key 'lfme' \(file .*\).*belongs to recipe\(s\) lfme"):
        path = tmp_path / "b.yaml"
        path.write_text(yaml.safe_dump({"name": "x", "lfme": {"kd": True}}))
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'experts' \(override 'experts.epochs=3'\).*belongs to recipe\(s\) experts, lfme"):
        config_from_dict({"name": "x"}, ["experts.epochs=3"])
    # a recipe override switches the schema, whatever its position among the overrides
    cfg = config_from_dict({"name": "x"}, ["experts.epochs=3", "recipe=experts"])
    assert cfg.experts.epochs == 3 and cfg.stages == ("experts",)
    with pytest.raises(AttributeError, match="no section 'lfme'"):
        cfg.lfme
    # the smoke config carries the common sections only and loads
    raw = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    assert "experts" not in raw and "lfme" not in raw
    assert load_config(REPO / "configs" / "smoke.yaml").sections == {}


def test_model_classifier_keys():
    """model.classifier / model.cosine_scale: typed, validated, and passed to build_model by the trainer."""
    smoke = REPO / "configs" / "smoke.yaml"
    cfg = load_config(smoke, ["model.classifier=cosine", "model.cosine_scale=16"])
    assert cfg.model.classifier == "cosine" and cfg.model.cosine_scale == 16.0
    with pytest.raises(ConfigError, match="model.classifier"):
        load_config(smoke, ["model.classifier=arcface"])
    with pytest.raises(ConfigError, match="model.cosine_scale: must be positive"):
        load_config(smoke, ["model.cosine_scale=0"])
    from lfme_fast.models import CosineClassifier
    from lfme_fast.trainer import RunContext

    model = RunContext.build_model(type("Ctx", (), {"cfg": cfg})(), 7)
    assert isinstance(model.classifier, CosineClassifier) and model.classifier.scale == 16.0


def test_recipe_samples_per_class_must_agree_with_train():
    # the students read their section's samples_per_class; a different train value would be ignored silently
    for recipe in ("lfme", "cbd"):
        with pytest.raises(ConfigError, match=rf"{recipe}\.samples_per_class: is 4 but train\.samples_per_class is 8"):
            config_from_dict({"name": "x", "recipe": recipe}, ["train.samples_per_class=8"])
        cfg = config_from_dict({"name": "x", "recipe": recipe}, ["train.samples_per_class=8",
                                                                 f"{recipe}.samples_per_class=8"])
        assert cfg.sections[recipe].samples_per_class == 8
