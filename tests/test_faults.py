"""Faults in a real Flower simulation (Ray): a crashing client, a silent one, an empty shard, a
quorum that is not met, and a run resumed from the payloads an earlier run saved."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from experiments.app.simulation import FederationError, run_federation
from federated.payload import load_payload
from patchcore.memory_bank import MemoryBank
from tests.test_simulation import write_config

pytestmark = pytest.mark.slow  # each test runs Ray (10-60 s)


def bank(run, category="disc") -> MemoryBank:
    return MemoryBank.load(run / "federated" / "banks" / f"{category}.safetensors")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """4 factories, factory-2 raises in its train handler; min_clients 3."""
    folder = tmp_path_factory.mktemp("crash")
    config = write_config(folder, num_factories=4, faults=["2:crash"], min_clients=3)
    return config, folder / "run", run_federation(config, {}, folder / "run")


def test_one_crashing_client_of_four_leaves_a_result_from_three(crashed):
    _, run, report = crashed
    assert report["status"] == "complete"
    assert [(f["factory"], f["phase"]) for f in report["failed"]] == [("factory-2", "train")]
    assert "injected fault: factory-2 crashed" in report["failed"][0]["reason"]
    assert "\n" not in report["failed"][0]["reason"] and report["missing"] == []
    for category in ("disc", "stripes"):
        assert report["aggregation"][category]["factory_ids"] == [0, 1, 3]
        assert set(bank(run, category).metadata["kept_per_factory"]) == {"factory-0", "factory-1", "factory-3"}
    assert sorted(report["per_factory_metrics"]) == ["factory-0", "factory-1", "factory-3"]
    saved = sorted(p.parent.name for p in (run / "federated" / "payloads").glob("*/disc.safetensors"))
    assert saved == ["factory-0", "factory-1", "factory-3"]  # what the server received, kept


def test_quorum_not_met_is_one_line_and_writes_no_bank(tmp_path):
    config = write_config(tmp_path, num_factories=4, faults=["1:crash", "2:crash"], min_clients=3)
    with pytest.raises(FederationError) as err:
        run_federation(config, {}, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    assert "only 2 of 4 factories sent valid payloads (federation.min_clients = 3)" in message
    assert not (tmp_path / "run" / "federated" / "banks").exists()
    report = json.loads((tmp_path / "run" / "federated" / "federation.json").read_text())
    assert report["status"].startswith("failed: QuorumError")
    assert sorted(f["factory"] for f in report["failed"]) == ["factory-1", "factory-2"]


def test_silent_client_and_empty_shard_are_named_with_their_reason(tmp_path):
    config = write_config(tmp_path, num_factories=4, faults=["1:hang", "3:empty"], min_clients=2,
                          round_timeout_s=40, hang_s=45)
    report = run_federation(config, {}, tmp_path / "run")
    assert report["status"] == "complete" and report["failed"] == []
    missing = {m["factory"]: m for m in report["missing"]}
    assert set(missing) == {"factory-1", "factory-3"}
    assert missing["factory-1"]["reason"] == "no reply within 40 s"
    assert "empty shard" in missing["factory-3"]["reason"]
    assert report["aggregation"]["disc"]["factory_ids"] == [0, 2]


def test_resume_reuses_saved_payloads_and_matches_a_clean_run(crashed, tmp_path):
    config, run, _ = crashed
    overrides = {"federation.faults": []}  # the crashed factory is back
    resumed = run_federation(config, overrides, tmp_path / "resumed", resume_from=run)
    assert resumed["resumed"] == ["factory-0", "factory-1", "factory-3"]
    factories = resumed["factories"]
    assert all("resumed_from" in factories[f"factory-{k}"] for k in (0, 1, 3))
    assert "extract_s" in factories["factory-2"]["seconds"]  # only factory-2 extracted
    assert "resumed_from" not in factories["factory-2"]
    clean = run_federation(config, overrides, tmp_path / "clean")
    assert clean["aggregation"]["disc"]["factory_ids"] == [0, 1, 2, 3]
    for category in ("disc", "stripes"):  # same payloads in, same bank out
        assert np.array_equal(bank(tmp_path / "resumed", category).features,
                              bank(tmp_path / "clean", category).features)
    payload, meta = load_payload(tmp_path / "resumed" / "federated" / "payloads" / "factory-0" / "disc")
    assert payload.factory_id == 0 and meta["category"] == "disc"


def test_resume_refuses_payloads_made_with_other_settings(crashed, tmp_path):
    config, run, _ = crashed
    with pytest.raises(Exception, match=r"cannot resume from .*factory-0.*local_ratio: 0.25 then, 0.5 now"):
        run_federation(config, {"federation.local_ratio": 0.5}, tmp_path / "r", resume_from=run)
    with pytest.raises(Exception, match="nothing to resume from: no saved payloads"):
        run_federation(config, {}, tmp_path / "r2", resume_from=tmp_path)


def test_cli_federate_quorum_failure_is_one_line_exit_2(tmp_path, capsys):
    from experiments.app.cli import main

    config = write_config(tmp_path, num_factories=3)
    code = main(["federate", "--config", str(config), "--quiet", "--out", str(tmp_path / "run"),
                 "--set", 'federation.faults=["0:crash", "2:empty"]', "--set", "federation.min_clients=2"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # Ray logs too
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: the federation did not complete: failed: QuorumError: only 1 of 3")
    assert not (tmp_path / "run" / "federated" / "banks").exists()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == errors[0]  # the line the CLI printed
    assert manifest["privacy"]["epsilon"] is None


@pytest.mark.parametrize("command", ["federate", "compare"])
def test_client_gpus_on_a_cpu_machine_is_one_line_exit_2_within_a_minute(command, tmp_path, capsys, monkeypatch):
    """Ray could never place such a client: no hang until the round timeout, no traceback."""
    import torch

    from experiments.app.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # this CPU machine, also on a GPU box
    config = write_config(tmp_path, num_factories=3)
    start = time.monotonic()
    code = main([command, "--config", str(config), "--quiet", "--out", str(tmp_path / "run"),
                 "--set", "federation.client_gpus=0.5"])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and seconds < 60
    assert err == ["error: federation.client_gpus = 0.5 but this machine has 0 GPU(s): Ray could not "
                   "place a single client; set it to 0 (or at most 0)"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_client_cpus_above_the_machine_is_refused_before_ray(tmp_path):
    from experiments.app.simulation import check_placeable
    from federated.config import ExperimentConfig
    from patchcore.config import load_config
    from patchcore.errors import ConfigError

    config = load_config(write_config(tmp_path), ExperimentConfig, {"federation.client_cpus": 3})
    with pytest.raises(ConfigError, match=r"federation.client_cpus = 3 but this machine has 2 CPU"):
        check_placeable(config, cpus=2, gpus=0)
    check_placeable(config, cpus=4, gpus=0)  # fits: no error
