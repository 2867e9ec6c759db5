"""Hostile or broken payloads at the server: each is rejected with a logged one-line reason, the
honest payloads still make the bank, and nothing crashes (Flower-free server logic + wire format)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from federated.config import ExperimentConfig
from federated.payload import PAYLOAD_FORMAT_VERSION, Payload, encode
from federated.protocol import FEATURES, PAYLOAD, SITE, from_flower, pack_payloads, to_flower, unpack_payloads
from federated.server_logic import aggregate_all
from patchcore.config import load_config
from tests.test_simulation import write_config

DIM, BACKBONE = 48, "toy:layer2+layer3:p3:d48"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ExperimentConfig:
    path = write_config(tmp_path_factory.mktemp("hostile"), num_factories=4, max_bytes=32 * DIM * 2,
                        max_vectors=30)
    return load_config(path, ExperimentConfig)


def honest(factory_id: int, n: int = 20, seed: int = 0, dtype: str = "float16") -> Payload:
    x = np.random.default_rng(seed + factory_id).normal(size=(n, DIM)).astype(np.float32)
    return encode(x, num_patches=400, num_images=4, backbone_id=BACKBONE, factory_id=factory_id,
                  dtype=dtype)


HOSTILE = {
    "wrong dimension": (lambda p: encode(np.ones((20, DIM + 16)), num_patches=400, num_images=4,
                                         backbone_id=BACKBONE, factory_id=3),
                        f"feature dimension {DIM + 16} does not match the expected {DIM}"),
    "wrong dtype": (lambda p: dataclasses.replace(p, features=p.features.astype(np.float64)),
                    "dtype float64 is not one of float16, float32, int8"),
    "integer features without scales": (lambda p: dataclasses.replace(p, features=p.features.astype(np.int8)),
                                        "int8 features need float32 scales"),
    "NaN": (lambda p: dataclasses.replace(
                p, features=np.where(np.arange(DIM) == 3, np.nan, p.features).astype(np.float16)),
            "non-finite values (NaN/inf) in 20 of 20 vectors"),
    "inf": (lambda p: dataclasses.replace(p, features=np.full_like(p.features, np.inf)), "non-finite values"),
    "more vectors than the cap": (lambda p: honest(3, n=31), "31 vectors exceed the limit of 30"),
    "more bytes than the cap": (lambda p: honest(3, n=30, dtype="float32"),
                                f"{30 * DIM * 4} feature bytes exceed the limit of {32 * DIM * 2}"),
    "more vectors than its own patches": (lambda p: dataclasses.replace(p, num_patches=10),
                                          "20 vectors sent but only 10 patches extracted"),
    "wrong backbone id": (lambda p: dataclasses.replace(p, backbone_id="resnet18:layer2:p3:d48"),
                          "backbone 'resnet18:layer2:p3:d48' does not match"),
    "wrong format version": (lambda p: dataclasses.replace(p, format_version=PAYLOAD_FORMAT_VERSION + 1),
                             f"format version {PAYLOAD_FORMAT_VERSION + 1} is not supported"),
    "impersonation": (lambda p: dataclasses.replace(p, factory_id=0), "claims factory-0 but was sent by factory-3"),
    "empty": (lambda p: dataclasses.replace(p, features=np.zeros((0, DIM), np.float16)), "features are empty"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payload_is_rejected_logged_and_the_rest_aggregates(config, case, caplog):
    mutate, message = HOSTILE[case]
    sent = {k: {"disc": honest(k)} for k in range(3)}
    sent[3] = {"disc": mutate(honest(3))}
    rejected: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="fedpatch.server"):
        results = aggregate_all(sent, config, {"target_embed_dim": DIM}, BACKBONE, rejected)
    assert [(r["factory"], r["category"]) for r in rejected] == [("factory-3", "disc")]
    assert message in rejected[0]["reason"] and "\n" not in rejected[0]["reason"]
    assert "rejected factory-3/disc: " in caplog.text and message in caplog.text
    assert results["disc"].factory_ids == [0, 1, 2]  # the honest ones still make the bank
    assert np.isfinite(results["disc"].bank.numpy()).all()


def test_int8_payloads_are_accepted_and_decoded(config):
    sent = {k: {"disc": honest(k, dtype="int8")} for k in range(3)}
    results = aggregate_all(sent, config, {"target_embed_dim": DIM}, BACKBONE, [])
    assert results["disc"].bank.dtype.is_floating_point and results["disc"].factory_ids == [0, 1, 2]
    expected = np.concatenate([sent[k]["disc"].decoded() for k in range(3)])
    assert np.allclose(np.sort(results["disc"].bank.numpy(), axis=None), np.sort(expected, axis=None))


@pytest.mark.parametrize("tamper, problem", [
    (lambda a, s: s.__setitem__("disc.format_version", 99), "format version 99 is not supported"),
    (lambda a, s: s.__delitem__("disc.backbone_id"), "missing key(s): backbone_id"),
    (lambda a, s: s.__setitem__("disc.num_patches", "lots"), "'num_patches' must be an integer"),
    (lambda a, s: a.__delitem__("disc"), "missing key(s): features"),
])
def test_unreadable_wire_payloads_become_problems_not_exceptions(tamper, problem):
    arrays, scalars = pack_payloads({"disc": honest(0), "stripes": honest(0, seed=5)})
    arrays, scalars = dict(arrays.items()), dict(scalars.items())
    tamper(arrays, scalars)
    wire = from_flower(to_flower({FEATURES: arrays, PAYLOAD: scalars}))  # as it crosses Flower
    payloads, problems = unpack_payloads(wire[FEATURES], wire[PAYLOAD])
    assert sorted(payloads) == ["stripes"] and problem in problems["disc"]


def test_int8_scales_travel_with_their_features():
    payload = honest(0, dtype="int8")
    arrays, scalars = pack_payloads({"disc": payload})
    assert sorted(arrays) == ["disc", "disc#scales"]
    back, problems = unpack_payloads(arrays, scalars)
    assert not problems and back["disc"] == payload


def test_a_reply_without_its_records_is_a_failure_not_a_crash(config):
    from federated.rounds import decode_train, new_report

    reply = {FEATURES: {"disc": np.ones((2, DIM), np.float16)}, PAYLOAD: {}}  # no "site" record
    report = new_report(config)
    assert decode_train({7: reply}, {7: "factory-0"}, report) == {}
    failed = report["failed"][0]
    assert failed["node_id"] == 7 and failed["factory"] == "factory-0"
    assert "unreadable reply: KeyError" in failed["reason"] and SITE in failed["reason"]  # the missing record is named
