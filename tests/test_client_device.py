"""`device: auto` is decided inside each client process, and federation.json says what it chose.

Under Ray a client actor gets CUDA only with a GPU share (federation.client_gpus > 0): a
zero-GPU actor may still see the GPUs (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), so clients.app asks
Ray what it was given. Ray is faked here (no GPU, no Ray start); tests/test_cuda.py and
`python -m experiments.bench.gpu_check` check the real thing on a GPU box.
"""

from __future__ import annotations

import sys
import types

import pytest

import clients.app as client_app
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from federated.protocol import TrainReply, from_flower, to_flower
from federated.rounds import InProcessTransport, run_rounds
from federated.site import Site
from patchcore.config import load_config
from tests.test_simulation import write_config


def fake_ray(initialized: bool = True, actor: str | None = "a1", gpus: list[str] | None = None):
    context = types.SimpleNamespace(get_actor_id=lambda: actor,
                                    get_accelerator_ids=lambda: {"GPU": list(gpus or []), "TPU": []})
    return types.SimpleNamespace(is_initialized=lambda: initialized, get_runtime_context=lambda: context)


@pytest.mark.parametrize("ray,configured,expected", [
    (None, "auto", "auto"),  # not under Ray (a deployed SuperNode, a test): the config decides
    (fake_ray(initialized=False), "auto", "auto"),
    (fake_ray(actor=None), "auto", "auto"),  # the driver, not a client actor
    (fake_ray(gpus=[]), "auto", "cpu"),  # client_gpus 0: the CPU, even where GPUs are visible
    (fake_ray(gpus=["0"]), "auto", "auto"),  # a GPU share: auto finds the GPU Ray made visible
    (fake_ray(gpus=[]), "cuda:1", "cuda:1"),  # an explicit device is never second-guessed
    (fake_ray(gpus=[]), "cpu", "cpu"),
])
def test_actor_device(monkeypatch, ray, configured, expected):
    if ray is None:
        monkeypatch.delitem(sys.modules, "ray", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "ray", ray)
    assert client_app.actor_device(configured) == expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-device")
    config = load_config(write_config(folder), ExperimentConfig, {"device": "auto"})
    return config, plan_factories(config)


@pytest.mark.parametrize("gpus,expected", [([], "cpu"), (["0"], "auto")])
def test_a_simulated_client_site_takes_the_actors_device(monkeypatch, tiny, gpus, expected):
    config, _ = tiny
    monkeypatch.setattr(client_app, "_CACHE", {"key": None, "plan": None, "model": None, "sites": {}})
    monkeypatch.setitem(sys.modules, "ray", fake_ray(gpus=gpus))
    site = client_app.site_for(config, {"partition-id": 0, "num-partitions": 3})
    assert site.device == expected and site._model is None  # resolved by PatchCore, in this process


def test_train_reply_carries_the_device_through_flower_records():
    reply = TrainReply("factory-0", 0, {}, 4, {"extract_s": 1.0}, device="cuda:0")
    back = TrainReply.from_records(from_flower(to_flower(reply.to_records())))
    assert back.device == "cuda:0"
    older = reply.to_records()
    del older["site"]["device"]  # a site from before the field
    assert TrainReply.from_records(older).device == ""
    assert "device" not in TrainReply("f", 0, {}, 0).to_records()["site"]  # empty: not sent


def test_federation_json_records_each_factorys_device(tiny, tmp_path):
    config, plan = tiny
    sites = [Site(config, s, plan.shifts, root=plan.root, device="cpu") for s in plan.shards]
    report = run_rounds(InProcessTransport(sites), config, tmp_path / "run")
    assert report["status"] == "complete"
    assert {name: f["device"] for name, f in report["factories"].items()} == {
        "factory-0": "cpu", "factory-1": "cpu", "factory-2": "cpu"}
