"""Strict config: unknown keys and bad values name the dotted key; defaults are the paper's."""

from pathlib import Path

import pytest

from federated.config import ExperimentConfig
from patchcore.config import Config, build, load_config
from patchcore.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers():
    c = Config()
    assert c.model.backbone.name == "wide_resnet50_2" and c.model.backbone.layers == ("layer2", "layer3")
    assert (c.model.patch_size, c.model.pretrain_embed_dim, c.model.target_embed_dim) == (3, 1024, 1024)
    assert (c.model.coreset.ratio, c.model.coreset.projection_dim, c.model.coreset.num_starts) == (0.1, 128, 10)
    assert c.model.coreset.method == "approximate" and c.model.num_neighbours == 1
    assert (c.data.resize, c.data.crop, c.model.smoothing_sigma) == (256, 224, 4.0)


def test_unknown_key_names_the_dotted_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  coreset:\n    ration: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.coreset.ration'"):
        load_config(p)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2])
def test_ratio_outside_unit_interval(tmp_path, ratio):
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{format: synthetic}}\nmodel: {{coreset: {{ratio: {ratio}}}}}\n")
    with pytest.raises(ConfigError, match=r"model.coreset.ratio must be in \(0, 1\]"):
        load_config(p)


def test_wrong_type_and_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: abc\n")
    with pytest.raises(ConfigError, match="seed must be int"):
        load_config(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_env_var_expansion_and_overrides(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("data: {format: mvtec, root: '${MY_ROOT}/mvtec'}\n")
    with pytest.raises(ConfigError, match="MY_ROOT"):
        load_config(p)
    monkeypatch.setenv("MY_ROOT", "/data")
    assert load_config(p).data.root == "/data/mvtec"
    assert load_config(p, overrides={"data.root": "/other"}).data.root == "/other"


def test_federation_section_is_strict_too():
    with pytest.raises(ConfigError, match="unknown config key 'federation.factories'"):
        build(ExperimentConfig, {"federation": {"factories": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'federation'"):
        build(Config, {"federation": {}})


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name, monkeypatch):
    monkeypatch.setenv("FEDPATCH_DATA_ROOT", "/somewhere")
    build(ExperimentConfig, __import__("yaml").safe_load((CONFIGS / name).read_text()))
