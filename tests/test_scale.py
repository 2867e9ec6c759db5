"""Scale plumbing: Ray resources and cluster address from config/env, bounded Site cache per worker."""

import clients.app as client_app
from experiments.app.simulation import backend_config
from federated.config import ExperimentConfig, FederationConfig


def config(**federation) -> ExperimentConfig:
    return ExperimentConfig(federation=FederationConfig(**federation))


def test_client_resources_come_from_config(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    backend = backend_config(config(client_cpus=4, client_gpus=0.25))
    assert backend["client_resources"] == {"num_cpus": 4.0, "num_gpus": 0.25}
    assert "init_args" not in backend  # a local Ray instance


def test_ray_address_from_environment_and_config_wins(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert backend_config(config())["init_args"] == {"address": "10.0.0.5:6379"}
    assert backend_config(config(ray_address="auto"))["init_args"] == {"address": "auto"}


def test_site_cache_per_worker_is_bounded(monkeypatch):
    built = []

    class FakeSite:
        def __init__(self, cfg, shard, shifts, model=None, root=None, device=None):
            built.append(shard)
            self._model = model or object()

        @property
        def model(self):
            return self._model

    class FakePlan:
        shifts, root = {}, None

        def shard(self, factory_id):
            return factory_id

    monkeypatch.setattr(client_app, "Site", FakeSite)
    monkeypatch.setattr(client_app, "plan_factories", lambda cfg: FakePlan())
    monkeypatch.setattr(client_app, "MAX_SITES", 3)
    monkeypatch.setattr(client_app, "_CACHE", {"key": None, "plan": None, "model": None, "sites": {}})
    cfg = config(num_factories=10).model_copy(update={"seed": 123})
    node = lambda k: {"partition-id": k, "num-partitions": 10}  # noqa: E731
    first = client_app.site_for(cfg, node(0))
    for factory in range(1, 10):
        client_app.site_for(cfg, node(factory))
        assert len(client_app._CACHE["sites"]) <= 3
    assert list(client_app._CACHE["sites"]) == ["7", "8", "9"]
    model = first.model
    assert all(s.model is model for s in client_app._CACHE["sites"].values())  # one backbone
    client_app.site_for(cfg, node(8))  # a hit: nothing rebuilt, 8 becomes most recent
    assert len(built) == 10 and list(client_app._CACHE["sites"]) == ["7", "9", "8"]
