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
    with pytest.raises(ConfigError, match=r"^model.coreset.ration: unknown key \(did you mean 'ratio'\?\); "
                                          r"valid keys here: method, num_starts, precision, projection_dim, "
                                          r"pruning, ratio \(in .*c.yaml\)$"):
        load_config(p)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2])
def test_ratio_outside_unit_interval(tmp_path, ratio):
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{format: synthetic}}\nmodel: {{coreset: {{ratio: {ratio}}}}}\n")
    with pytest.raises(ConfigError, match=rf"^model.coreset.ratio: must be in \(0, 1\], got {ratio} \(in "):
        load_config(p)


def test_wrong_type_and_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: abc\n")
    with pytest.raises(ConfigError, match="seed: must be int, got 'abc'"):
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
    with pytest.raises(ConfigError, match="^federation.factories: unknown key \\(did you mean 'num_factories'"):
        build(ExperimentConfig, {"federation": {"factories": 3}})
    with pytest.raises(ConfigError, match="^federation: unknown key"):
        build(Config, {"federation": {}})


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name, monkeypatch):
    monkeypatch.setenv("FEDPATCH_DATA_ROOT", "/somewhere")
    build(ExperimentConfig, __import__("yaml").safe_load((CONFIGS / name).read_text()))


def test_strict_like_the_yaml_it_reads():
    """A YAML int is a float (1 -> 1.0); a string never becomes a number or a boolean, a float
    never an int, a bool never a number; a list is kept as a tuple; a null section is its defaults."""
    c = build(Config, {"model": {"coreset": {"ratio": 1}, "backbone": {"layers": ["layer3"]}}, "threshold": None})
    assert c.model.coreset.ratio == 1.0 and isinstance(c.model.coreset.ratio, float)
    assert c.model.backbone.layers == ("layer3",) and c.threshold == Config().threshold
    assert build(Config, {"data": {"resize": [320, 240], "crop": None}}).data.resize == (320, 240)
    for bad, line in [({"model": {"coreset": {"ratio": "0.5"}}}, "model.coreset.ratio: must be float, got '0.5'"),
                      ({"model": {"coreset": {"ratio": True}}}, "model.coreset.ratio: must be float, got True"),
                      ({"seed": 1.0}, "seed: must be int, got 1.0"),
                      ({"seed": True}, "seed: must be int, got True"),
                      ({"data": {"require_masks": "yes"}}, "data.require_masks: must be bool, got 'yes'"),
                      ({"data": {"require_masks": 1}}, "data.require_masks: must be bool, got 1"),
                      ({"data": {"root": 3}}, "data.root: must be str, got 3"),
                      ({"data": {"resize": "256"}}, "data.resize: must be int | [int, int], got '256'"),
                      ({"data": {"categories": ["a", 1]}}, "data.categories[1]: must be str, got 1"),
                      ({"model": 5}, "model: must be a mapping, got 5"),
                      ({"model": {"patch_size": 4}}, "model.patch_size: must be odd and >= 1, got 4"),
                      ({"model": {"coreset": {"method": "fast"}}},
                       "model.coreset.method: must be one of approximate, exact, got 'fast'")]:
        with pytest.raises(ConfigError) as info:
            build(Config, bad)
        assert str(info.value) == line


def test_sections_behave_like_the_dataclasses_they_replace():
    from patchcore.config import BackboneConfig, CoresetConfig, ModelConfig, replace, to_dict

    assert BackboneConfig("resnet18", ("layer2",), "none") == BackboneConfig(name="resnet18", layers=("layer2",),
                                                                              weights="none")
    c = ExperimentConfig()
    assert hash(c) == hash(ExperimentConfig()) and build(ExperimentConfig, to_dict(c)) == c
    with pytest.raises(Exception):
        c.seed = 1  # frozen
    with pytest.raises(ConfigError, match=r"^model.coreset.ratio: must be in \(0, 1\], got 2"):
        CoresetConfig(ratio=2)  # built in code: the same check, the key named in full
    assert replace(ModelConfig(), num_neighbours=3).num_neighbours == 3
    with pytest.raises(ConfigError, match="^model.num_neighbours: must be >= 1, got 0"):
        replace(ModelConfig(), num_neighbours=0)
    unchecked = c.model_copy(update={"federation": c.federation.model_copy(update={"min_clients": 9})})
    with pytest.raises(ConfigError, match=r"^federation.min_clients: must be <= federation.num_factories \(4\), got 9"):
        unchecked.validate()  # model_copy does not validate; validate() does, and returns the copy
    assert c.validate() == c


def test_allowed_values_live_in_one_place():
    """The modules that act on a choice use the config's own tuple, the one its Literal is built from."""
    import typing

    import patchcore.config as cfg
    from federated import aggregation, partition, payload, robust, shift
    from federated import config as fcfg
    from patchcore import backbones, coreset, features, memory_bank, threshold

    def allowed(model, name):
        return typing.get_args(model.model_fields[name].annotation)

    assert coreset.METHODS is cfg.CORESET_METHODS == allowed(cfg.CoresetConfig, "method")
    assert coreset.PRECISIONS is cfg.CORESET_PRECISIONS == allowed(cfg.CoresetConfig, "precision")
    assert coreset.PRUNING is cfg.CORESET_PRUNING == allowed(cfg.CoresetConfig, "pruning")
    assert memory_bank.NN_PRECISIONS is cfg.NN_PRECISIONS == allowed(cfg.ModelConfig, "nn_precision")
    assert memory_bank.NN_BACKENDS is cfg.NN_BACKENDS == allowed(cfg.ModelConfig, "nn_backend")
    assert backbones.PRECISIONS is cfg.MODEL_PRECISIONS == allowed(cfg.ModelConfig, "precision")
    assert tuple(backbones.REGISTRY) == cfg.BACKBONES == allowed(cfg.BackboneConfig, "name")
    assert threshold.METHODS is cfg.THRESHOLD_METHODS == allowed(cfg.ThresholdConfig, "method")
    assert ("auto", *features.WEIGHTINGS) == cfg.LAYER_WEIGHTINGS == allowed(cfg.ModelConfig, "layer_weighting")
    assert cfg.DATA_FORMATS == allowed(cfg.DataConfig, "format")
    assert partition.SCHEMES == allowed(fcfg.FederationConfig, "partition")
    assert aggregation.METHODS is fcfg.AGGREGATIONS == allowed(fcfg.FederationConfig, "aggregation")
    assert robust.MODES is fcfg.POISON_MODES == allowed(fcfg.FederationConfig, "poison_mode")
    assert tuple(payload.DTYPES) == fcfg.PAYLOAD_DTYPES == allowed(fcfg.FederationConfig, "payload_dtype")
    assert shift.FAMILIES is fcfg.SHIFT_FAMILIES == fcfg.FederationConfig().shift_families


def _fit(tmp_path, capsys, yaml_text: str) -> tuple[int, list[str], Path]:
    from experiments.app.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("data: {format: synthetic}\n" + yaml_text)
    code = main(["fit", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    return code, err.splitlines(), path


def test_cli_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    code, lines, path = _fit(tmp_path, capsys, "model:\n  coreset:\n    ration: 0.5\n")
    assert code == 2 and lines == [
        "error: model.coreset.ration: unknown key (did you mean 'ratio'?); valid keys here: method, num_starts, "
        f"precision, projection_dim, pruning, ratio (in {path})"]
    assert not (tmp_path / "run").exists()


def test_cli_wrong_type_is_one_line_exit_2(tmp_path, capsys):
    code, lines, path = _fit(tmp_path, capsys, "model:\n  coreset:\n    num_starts: ten\n")
    assert code == 2 and lines == [f"error: model.coreset.num_starts: must be int, got 'ten' (in {path})"]


def test_cli_out_of_range_is_one_line_exit_2(tmp_path, capsys):
    code, lines, path = _fit(tmp_path, capsys, "model:\n  coreset:\n    ratio: 1.5\n")
    assert code == 2 and lines == [f"error: model.coreset.ratio: must be in (0, 1], got 1.5 (in {path})"]
    from experiments.app.cli import main

    code = main(["fit", "--config", str(path), "--set", "model.coreset.ratio=0", "--quiet"])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: model.coreset.ratio: must be in (0, 1], got 0 (set by an override of {path})"]


def test_explain_lists_every_key_with_its_default_and_description(capsys):
    from experiments.app.cli import main

    assert main(["config", "--explain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["key", "type", "default", "allowed", "description"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["model.coreset.ratio"][1:4] == ["float", "0.1", "(0,"]
    assert rows["federation.partition"][1:4] == ["str", "iid", "iid"]  # allowed: iid | category | ...
    from patchcore.config import explain

    keys = [r["key"] for r in explain(ExperimentConfig)]
    assert set(keys) == set(rows) and len(keys) == len(set(keys)) and "federation.privacy.epsilon" in keys
    assert all(r["description"] for r in explain(ExperimentConfig)), "every key needs a Field(description=...)"


def test_explain_with_a_config_shows_its_values(tmp_path, capsys):
    from experiments.app.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("data: {format: synthetic}\nmodel: {coreset: {ratio: 0.25}}\n")
    assert main(["config", "--explain", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2] == "value"
    assert next(line for line in lines if line.startswith("model.coreset.ratio ")).split()[2] == "0.25"


def test_the_committed_reference_is_the_commands_output(capsys):
    """configs/REFERENCE.md cannot go stale: regenerate it with
    `fedpatch config --explain --markdown > configs/REFERENCE.md`."""
    from experiments.app.cli import main

    assert main(["config", "--explain", "--markdown"]) == 0
    assert (CONFIGS / "REFERENCE.md").read_text() == capsys.readouterr().out
