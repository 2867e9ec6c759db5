"""The protocol, the rounds over the in-process transport, and the run config: Flower-free and
fast (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from federated.config import ExperimentConfig
from federated.plan import DRIVER_KEY, FLAT_KEYS, experiment_config, plan_factories
from federated.protocol import (
    EvaluateReply,
    EvaluateRequest,
    SiteInfo,
    TrainRequest,
    from_flower,
    natural_key,
    to_flower,
)
from federated.rounds import InProcessTransport, run_rounds
from federated.site import Site, detect_format, folder_shard
from patchcore.config import load_config
from patchcore.errors import ConfigError, DataError
from server.app import refuse_unplaceable, run_server, site_bindings
from tests.conftest import REPO
from tests.test_simulation import write_config


def test_site_info_and_replies_survive_flower_records():
    info = SiteInfo("plant-lyon", {"disc": {"train": 3, "test": 2, "validation": 0},
                                   "stripes.v2": {"train": 1, "test": 0, "validation": 0}})
    back = SiteInfo.from_records(from_flower(to_flower(info.to_records())))
    assert back == info and back.categories == ["disc", "stripes.v2"]
    bank = np.arange(12, dtype=np.float32).reshape(3, 4)
    ask = EvaluateRequest.from_records(from_flower(to_flower(EvaluateRequest("a", 2, {"disc": bank}).to_records())))
    assert ask.factory == "a" and ask.factory_id == 2 and np.array_equal(ask.banks["disc"], bank)
    reply = EvaluateReply("a", {"disc": {"image_auroc": 0.75}, "x.y": {"aupro": 0.5}}, {"evaluate_s": 1.5})
    assert EvaluateReply.from_records(from_flower(to_flower(reply.to_records()))) == reply
    assert TrainRequest.from_records(TrainRequest("b", 7).to_records()) == TrainRequest("b", 7)
    scored = EvaluateReply("a", {}, {}, {"disc": np.array([1.5, 2.25])})
    back = EvaluateReply.from_records(from_flower(to_flower(scored.to_records())))
    assert list(back.calibration) == ["disc"] and back.calibration["disc"].tolist() == [1.5, 2.25]


def test_global_banks_get_the_threshold_their_sites_held_out_normals_calibrate(tiny, tmp_path):
    from patchcore.memory_bank import MemoryBank

    config, plan, _ = tiny
    sites = [Site(config, s, plan.shifts, root=plan.root) for s in plan.shards]
    report = run_rounds(InProcessTransport(sites), config, tmp_path / "run")
    held = {}
    for shard in plan.shards:
        for r in shard.validation:
            held.setdefault(r.category, set()).add(shard.name)
    assert held and set(report["calibration"]) == set(held)  # synthetic data: no validation split
    for category, owners in held.items():
        info = report["calibration"][category]
        assert set(info["factories"]) == owners and info["num_normal"] >= 1
        meta = MemoryBank.load(tmp_path / "run" / "federated" / "banks" / category).metadata
        assert meta["threshold"]["value"] == info["threshold"] and meta["threshold"]["method"] == "quantile"
        assert meta["threshold"]["details"]["source"] == "held-out training normals at the sites"


def test_factory_ids_follow_the_natural_order_of_names():
    names = ["factory-10", "factory-2", "plant-b", "factory-1", "plant-a"]
    assert sorted(names, key=natural_key) == ["factory-1", "factory-2", "factory-10", "plant-a", "plant-b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config = load_config(write_config(folder), ExperimentConfig, {"threshold.holdout": 0.1})  # the default
    return config, plan_factories(config), folder


def test_in_process_rounds_name_a_crash_once_and_refuse_a_second_claim(tiny, tmp_path):
    config, plan, _ = tiny
    config = load_config(write_config(tmp_path), ExperimentConfig, {"federation.faults": ["1:crash"]})
    sites = [Site(config, s, plan.shifts, root=plan.root) for s in plan.shards]
    impostor = Site(config, plan.shards[2], plan.shifts, root=plan.root)  # claims factory-2 again
    report = run_rounds(InProcessTransport([*sites, impostor]), config, tmp_path / "run")
    assert report["status"] == "complete" and report["phase"] == "done"
    assert [(f["factory"], f["phase"]) for f in report["failed"]] == [("factory-1", "train")]
    assert "injected fault" in report["failed"][0]["reason"]
    assert report["refused"] == [{"factory": "factory-2", "node_id": 3,
                                  "reason": "factory-2 already joined from node 2"}]
    assert sorted(report["factories"]) == ["factory-0", "factory-2"]
    assert report["aggregation"]["disc"]["factories"] == ["factory-0", "factory-2"]
    assert sorted(report["per_factory_metrics"]) == ["factory-0", "factory-2"]
    saved = json.loads((tmp_path / "run" / "federated" / "federation.json").read_text())
    assert saved["sites"]["factory-0"]["train_images"] == len(plan.shards[0].train)


def test_a_site_is_its_whole_folder_in_any_layout(tiny, tmp_path):
    config, plan, _ = tiny
    root = plan.root
    shard, site_config = folder_shard(config, root, "plant-x")
    everything = [r for s in plan.shards for r in s.train]
    assert len(shard.train) == len(everything) and shard.name == "plant-x"
    assert site_config.data.root == str(root) and site_config.data.format == "mvtec"
    assert {r.domain for r in shard.train} == {"plant-x"}
    only, _ = folder_shard(config, root, "plant-y", categories=("disc",))
    assert {r.category for r in only.train} == {"disc"}
    assert detect_format(root) == "mvtec"
    (tmp_path / "cat" / "train" / "good" / "rgb").mkdir(parents=True)
    assert detect_format(tmp_path) == "mvtec3d"
    (tmp_path / "cat" / "defects_config.json").write_text("[]")
    assert detect_format(tmp_path) == "autovi"
    with pytest.raises(DataError, match="site plant-z: data-path .* is not a folder"):
        folder_shard(config, tmp_path / "nope", "plant-z")
    with pytest.raises(ConfigError, match="data-format 'png' must be one of"):
        folder_shard(config, root, "plant-z", data_format="png")


def test_pyproject_declares_every_run_config_key_the_apps_read():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11 (the project allows 3.10)")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {"config", "run-dir", "resume-from", "site-nodes", "overrides", *FLAT_KEYS} == set(declared)
    for key, (_, keep) in FLAT_KEYS.items():
        assert declared[key] == keep and type(declared[key]) is type(keep), key  # typed, "keep" by default


def test_flat_keys_override_the_yaml_and_keep_values_do_not(tiny):
    _, _, folder = tiny
    path = str(folder / "tiny.yaml")
    config, _ = experiment_config({"config": path, "local-ratio": 0.5, "num-factories": 0, "seed": -1,
                                   "payload-dtype": "int8", "overrides": '{"federation.local_ratio": 0.4}'})
    assert config.federation.local_ratio == 0.4  # overrides JSON is applied last
    assert config.federation.payload_dtype == "int8" and config.federation.num_factories == 3 and config.seed == 0
    with pytest.raises(ConfigError, match="federation.payload_dtype"):
        experiment_config({"config": path, "payload-dtype": "bf16"})


def test_settings_flwr_run_cannot_honour_are_refused_not_ignored(tiny):
    _, _, folder = tiny
    config = load_config(folder / "tiny.yaml", ExperimentConfig, {"federation.client_gpus": 0.5})
    with pytest.raises(ConfigError, match=r"federation.client_gpus is not honoured under `flwr run`.*num-gpus"):
        refuse_unplaceable(config, {})
    refuse_unplaceable(config, {DRIVER_KEY: "ray"})  # fedpatch's own driver places them


def test_the_server_wants_an_absolute_run_dir(tiny):
    _, _, folder = tiny

    class Context:
        run_config = {"config": str(folder / "tiny.yaml"), "run-dir": "results/x"}

    with pytest.raises(ConfigError, match="'run-dir' must be an absolute folder"):
        run_server(None, Context(), {})
    assert Path("results/x").exists() is False


def test_bound_factories_are_spoken_for_only_by_their_node(tiny, tmp_path):
    config, plan, _ = tiny
    sites = [Site(config, s, plan.shifts, root=plan.root) for s in plan.shards]
    bindings = {"factory-0": 0, "factory-2": 7}  # factory-1 is not registered; factory-2 is node 7's
    report = run_rounds(InProcessTransport(sites), config, tmp_path / "run", evaluate=False,
                        bindings=bindings)
    assert report["refused"] == [
        {"factory": "factory-1", "node_id": 1,
         "reason": "factory-1 is not one of this federation's registered factories"},
        {"factory": "factory-2", "node_id": 2, "reason": "factory-2 is bound to node 7"}]
    assert sorted(report["factories"]) == ["factory-0"] and not report["failed"]
    with pytest.raises(ConfigError, match="'site-nodes' must be a JSON object"):
        site_bindings("[1, 2]")
    assert site_bindings("") is None and site_bindings('{"a": "3"}') == {"a": 3}


@pytest.mark.parametrize("layout, fmt, train, test", [  # train: training normals in the folder
    ("make_mvtec_tree", "mvtec", 3, 5), ("make_mvtec3d_tree", "mvtec3d", 2, 4),
    ("make_autovi_tree", "autovi", 2, 3)])
def test_site_folders_in_each_layout_are_detected_and_read_whole(tiny, tmp_path, layout, fmt, train, test):
    import tests.test_data_loaders as fixtures

    config, _, _ = tiny
    root = getattr(fixtures, layout)(tmp_path / "site")
    site = Site.from_folder(config, root, "plant-q")
    info = site.info()
    assert site.config.data.format == fmt and info.factory == "plant-q"
    (category,) = info.categories
    counts = info.counts[category]
    if fmt == "mvtec3d":  # its own validation split calibrates the threshold
        assert counts["train"] == train and counts["validation"] >= 1
    else:  # no validation split: threshold.holdout (0.1) holds ceil(0.1 n) = 1 training normal out
        assert counts["train"] == train - 1 and counts["validation"] == 1
    assert counts["test"] == test
    assert site._model is None  # announcing who it is loads no backbone


def test_cli_deploy_bad_site_is_one_line_exit_2_before_any_process(tiny, tmp_path, capsys):
    from experiments.app.cli import main

    _, _, folder = tiny
    for site, message in ((f"plant-a={tmp_path / 'nowhere'}", "error: site plant-a: data-path "),
                          ("plant-a", "error: --site expects NAME=FOLDER, got 'plant-a'")):
        code = main(["deploy", "--config", str(folder / "tiny.yaml"), "--site", site, "--quiet",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(message) and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
