"""Feature transform (shared random projection + per-vector clipping) in the model, the bank and
the feature-space id; privacy wiring in the config, the site and the manifest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federated.config import ExperimentConfig
from federated.plan import plan_factories
from federated.site import Site, release_seed
from patchcore.config import ModelConfig, TransformConfig, build, load_config
from patchcore.errors import BankFormatError, ConfigError
from patchcore.model import PatchCore, backbone_id, feature_transform
from patchcore.transform import FeatureTransform, clip_rows, projection_matrix
from tests.test_simulation import DIM, write_config


def test_projection_is_seeded_and_preserves_distances_on_average():
    a, b = projection_matrix(256, 64, seed=3), projection_matrix(256, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, projection_matrix(256, 64, seed=4))
    x = torch.randn(400, 256, generator=torch.Generator().manual_seed(0))
    t = FeatureTransform(256, projection_dim=64, projection_seed=3)
    y = t(x)
    assert y.shape == (400, 64) and t.out_dim == 64
    ratio = torch.pdist(y[:100]).pow(2).mean() / torch.pdist(x[:100]).pow(2).mean()
    assert 0.85 < float(ratio) < 1.15  # Johnson–Lindenstrauss: squared distances kept on average


def test_clip_then_tag_and_identity():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, fraction = clip_rows(x, 1.0)
    assert torch.allclose(clipped.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8])) and fraction == pytest.approx(1 / 3)
    assert FeatureTransform(2).identity and FeatureTransform(2).tag() == ""
    t = FeatureTransform(8, projection_dim=4, projection_seed=1, clip_norm=2.5)
    assert t.tag() == "rp4s1:clip2.5"
    assert float(t(torch.randn(50, 8) * 10).norm(dim=1).max()) <= 2.5 + 1e-5
    with pytest.raises(ConfigError, match="model.transform.projection_dim must be in \\[1, 8\\]"):
        FeatureTransform(8, projection_dim=9)


def test_backbone_id_names_the_transform_and_the_bank_must_match():
    plain = build(ModelConfig, {"backbone": {"name": "efficientnet_lite0", "weights": "none"}})
    projected = build(ModelConfig, {"backbone": {"name": "efficientnet_lite0", "weights": "none"},
                                    "transform": {"projection_dim": 64, "clip_norm": 100.0}})
    # Lite0's default weighting concatenates its 40 + 112 channels; the paper's keeps earlier ids
    assert backbone_id(plain) == "efficientnet_lite0:layer2+layer3:p3:d152:concat"
    paper = build(ModelConfig, {"backbone": {"name": "efficientnet_lite0", "weights": "none"},
                                "layer_weighting": "paper"})
    assert backbone_id(paper) == "efficientnet_lite0:layer2+layer3:p3:d1024"
    assert backbone_id(projected) == "efficientnet_lite0:layer2+layer3:p3:d152:concat:rp64s0:clip100"
    bf16 = build(ModelConfig, {"backbone": {"name": "efficientnet_lite0", "weights": "none"}, "precision": "bfloat16",
                               "transform": {"projection_dim": 64, "clip_norm": 100.0}})
    # not mixed with fp32
    assert backbone_id(bf16) == "efficientnet_lite0:layer2+layer3:p3:d152:concat:bfloat16:rp64s0:clip100"
    model = PatchCore(projected, device="cpu")
    emb, grid = model.embed(torch.rand(2, 3, 64, 64))
    assert emb.shape == (2, grid[0] * grid[1], 64) and float(emb.norm(dim=-1).max()) <= 100 + 1e-3
    bank = model.set_bank(torch.randn(10, 64))
    rebuilt = PatchCore.from_bank(bank, device="cpu")  # the transform comes back from the metadata
    assert rebuilt.transform == feature_transform(projected)
    from patchcore.memory_bank import MemoryBank
    with pytest.raises(BankFormatError, match="bank features have 1024 dims; the model's embeddings have 64"):
        PatchCore.from_bank(MemoryBank(torch.randn(5, 1024), bank.metadata), device="cpu")


def test_privacy_config_is_checked_with_the_key_named(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="federation.privacy.epsilon: needs model.transform.clip_norm"):
        load_config(path, ExperimentConfig, {"federation.privacy.epsilon": 1.0})
    with pytest.raises(ConfigError, match="federation.privacy.epsilon: must be > 0"):
        load_config(path, ExperimentConfig, {"federation.privacy.epsilon": -1.0, "model.transform.clip_norm": 5.0})
    with pytest.raises(ConfigError, match="federation.faults entry '9:crash': factory 9 does not exist"):
        load_config(path, ExperimentConfig, {"federation.faults": ["9:crash"]})
    with pytest.raises(ConfigError, match="federation.min_clients: must be <= federation.num_factories"):
        load_config(path, ExperimentConfig, {"federation.min_clients": 4})
    with pytest.raises(ConfigError, match="federation.poison_mode: must be one of"):
        load_config(path, ExperimentConfig, {"federation.poison_mode": "ban"})


def test_site_releases_clipped_vectors_plus_calibrated_noise(tmp_path):
    path = write_config(tmp_path)
    clip = 4.0
    on = load_config(path, ExperimentConfig, {"model.transform.clip_norm": clip, "federation.privacy.epsilon": 2.0,
                                              "federation.payload_dtype": "float32"})
    off = load_config(path, ExperimentConfig,
                      {"model.transform.clip_norm": clip, "federation.payload_dtype": "float32"})
    plan = plan_factories(on)
    noisy, _ = Site(on, plan.shard(0), plan.shifts).local_payloads()
    clean, _ = Site(off, plan.shard(0), plan.shifts).local_payloads()
    spec = on.privacy_spec()
    assert spec.sensitivity == 2 * clip and spec.sigma > 0
    for category in ("disc", "stripes"):
        assert float(np.linalg.norm(clean[category].features, axis=1).max()) <= clip + 1e-4  # clipped
        noise = noisy[category].features - clean[category].features  # (n, DIM): same coreset, plus noise
        assert noise.shape[1] == DIM and abs(noise.std() / spec.sigma - 1) < 0.1
    again, _ = Site(on, plan.shard(0), plan.shifts).local_payloads()
    assert np.array_equal(again["disc"].features, noisy["disc"].features)  # seeded per factory and category
    assert release_seed(0, 0, "disc") != release_seed(0, 1, "disc") != release_seed(0, 0, "stripes")


def test_every_manifest_carries_epsilon_delta_sigma(tmp_path):
    from experiments.app.runs import Manifest

    path = write_config(tmp_path)
    on = load_config(path, ExperimentConfig, {"model.transform.clip_norm": 4.0, "federation.privacy.epsilon": 1.0})
    data = Manifest(tmp_path, on, "test").data["privacy"]
    assert data["epsilon"] == 1.0 and data["delta"] == 1e-5 and data["sigma"] == pytest.approx(8 * 3.7306, rel=1e-3)
    assert "not_covered" in data
    off = Manifest(tmp_path, load_config(path, ExperimentConfig), "test").data["privacy"]
    assert off["epsilon"] is None and off["sigma"] == 0.0 and not math.isnan(off["sigma"])
    assert TransformConfig().clip_norm is None
