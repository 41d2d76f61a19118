from __future__ import annotations

import pytest

from ptxray.config import Config, ConfigError, config_from_dict, load_config, section_hash


def test_defaults_and_derived_in_channels():
    cfg = Config()
    assert cfg.model.in_channels == len(cfg.preprocess.channels) == 3
    one = cfg.with_overrides(["preprocess.channels=[raw]"])
    assert one.preprocess.channels == ("raw",) and one.model.in_channels == 1


def test_cli_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-4", "train.epochs=3", "compute.use_gpu=true", "preprocess.channels=raw,clahe"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.compute.use_gpu is True
    assert cfg.preprocess.channels == ("raw", "clahe")


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "unknown"]),
        ("nosection.x=1", ["nosection"]),
        ("train.epochs=many", ["train.epochs", "integer"]),
        ("preprocess.channels=[raw, sobel]", ["sobel"]),
        ("optim.lr", ["key=value"]),
        ("data.colour=grey", ["data.colour", "reject", "luminance"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_yaml_file_and_shipped_recipe(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\nsearch:\n  grid:\n    optim.lr: [0.1, 0.01]\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 0.01 and cfg.search.grid == {"optim.lr": [0.1, 0.01]}
    assert load_config("smoke").preprocess.image_size_px == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_and_hash_stability():
    cfg = load_config("smoke", ["optim.lr=0.5"])
    from ptxray.config import config_from_dict

    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert section_hash(cfg.preprocess) == section_hash(again.preprocess)
    assert section_hash(cfg.preprocess) != section_hash(cfg.with_overrides({"preprocess.beasf_gamma": 0.3}).preprocess)


def test_augment_where_and_hold_shard_are_checked():
    from ptxray.config import ConfigError, load_config

    assert load_config(None).augment.where == "auto"
    assert load_config(None, ["augment.where=device"]).augment.where == "device"
    with pytest.raises(ConfigError, match="augment.where: 'gpu'"):
        load_config(None, ["augment.where=gpu"])
    assert load_config(None, ["compute.hold_shard_mb=0"]).compute.hold_shard_mb == 0
    with pytest.raises(ConfigError, match="compute.hold_shard_mb"):
        load_config(None, ["compute.hold_shard_mb=-1"])


def test_old_flat_vanilla_keys_load_with_a_warning_naming_the_new_keys(tmp_path):
    from ptxray.config import MOVED_KEYS, VanillaUNetConfig

    assert set(MOVED_KEYS) == {f"model.{f}" for f in ("depth", "base_filters", "filter_growth", "kernel_size",
                                                       "dilation", "stride", "initializer", "dropout", "batch_norm")}
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  arch: unet_vanilla\n  depth: 4\n  base_filters: 8\n  cls_dropout: 0.1\n")
    with pytest.warns(FutureWarning, match=r"old\.yaml: .*model\.depth -> model\.vanilla\.depth, model\.base_filters -> model\.vanilla\.base_filters"):
        cfg = load_config(old)
    nested = tmp_path / "new.yaml"
    nested.write_text("model:\n  arch: unet_vanilla\n  cls_dropout: 0.1\n  vanilla:\n    depth: 4\n    base_filters: 8\n")
    assert cfg == load_config(nested)
    assert cfg.model.vanilla == VanillaUNetConfig(depth=4, base_filters=8) and cfg.model.cls_dropout == 0.1
    assert "depth" not in cfg.to_dict()["model"] and cfg.to_dict()["model"]["vanilla"]["depth"] == 4

    with pytest.warns(FutureWarning, match=r"overrides: .*model\.dropout -> model\.vanilla\.dropout"):
        overridden = load_config(nested, ["model.dropout=0.25", "optim.lr=1e-3"])
    assert overridden.model.vanilla.dropout == 0.25 and overridden.optim.lr == 1e-3
    assert load_config(nested, ["model.vanilla.dropout=0.25", "optim.lr=1e-3"]) == overridden
    # A saved config.yaml of an earlier run, read back through config_from_dict.
    flat = cfg.to_dict()
    flat["model"].update(flat["model"].pop("vanilla"))
    with pytest.warns(FutureWarning):
        assert config_from_dict(flat) == cfg

    both = tmp_path / "both.yaml"
    both.write_text("model:\n  depth: 4\n  vanilla:\n    depth: 5\n")
    with pytest.raises(ConfigError, match=r"both\.yaml: model\.depth=4 and model\.vanilla\.depth=5 disagree"):
        load_config(both)
    # The same through --set: given both ways with different values is an error, not "the last wins".
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"overrides: model\.depth=4 and model\.vanilla\.depth=5 disagree"):
        load_config(nested, ["model.depth=4", "model.vanilla.depth=5"])
    with pytest.warns(FutureWarning):
        assert load_config(nested, ["model.depth=4", "model.vanilla.depth=4"]).model.vanilla.depth == 4
