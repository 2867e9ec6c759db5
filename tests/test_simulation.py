"""The federation on Flower: a real Ray simulation with 3 factories on tiny synthetic data, the
client's messages checked for image content (marked slow: Ray), and the ClientApp called directly
and the Flower-free site/server logic on their own, on the same plan without Ray (fast)."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, Metadata, RecordDict

import experiments.app.simulation as simulation
from clients.app import build_client_app
from federated.config import ExperimentConfig
from federated.errors import QuorumError
from federated.payload import Payload, encode, raw_feature_bytes
from federated.plan import experiment_config, plan_factories
from federated.protocol import (
    ASSIGNMENT,
    BANKS,
    FEATURES,
    PAYLOAD,
    TrainReply,
    from_flower,
    pack_payloads,
    to_flower,
    unpack_payloads,
)
from federated.rounds import decode_train, exchange, new_report, wait_for_nodes
from federated.server_logic import aggregate_all, save_global_banks, upload_stats
from federated.site import Site
from patchcore.config import load_config
from patchcore.coreset import coreset_size
from patchcore.data import read_image
from patchcore.errors import ConfigError
from patchcore.memory_bank import MemoryBank
from patchcore.model import backbone_id
from server.app import GridTransport

DIM = 48  # != the 64-px image side, so no (n, D) array can pass for a grey image
SIZE, PATCHES = 64, 64  # 64-px images, stride-8 grid: 8 x 8 patches per image
TINY = {
    "seed": 0, "device": "cpu",
    # the federation's mechanics are checked on exact image counts: no training normal is held
    # out for calibration here (tests/test_protocol.py and test_deployment.py turn it on)
    "threshold": {"holdout": 0.0},
    "data": {"format": "synthetic", "resize": SIZE, "crop": SIZE, "batch_size": 8,
             "synthetic": {"categories": ["stripes", "disc"], "size": SIZE, "n_train": 6,
                           "n_test_good": 3, "n_test_defect": 3}},
    "model": {"backbone": {"name": "efficientnet_lite0", "layers": ["layer2", "layer3"],
                           "weights": "none"},
              # the paper's weighting, so target_embed_dim (small, for speed) sets the size
              "layer_weighting": "paper", "pretrain_embed_dim": DIM, "target_embed_dim": DIM},
    "federation": {"num_factories": 3, "partition": "iid", "domain_shift": True,
                   "local_ratio": 0.25, "global_ratio": 0.1, "client_cpus": 1,
                   # identify waits for every actor's first message (a ClientApp import each,
                   # two actors at a time on 2 CPUs): generous, for loaded CI machines
                   "node_timeout_s": 60, "identify_timeout_s": 300, "round_timeout_s": 300},
}


def write_config(folder: Path, **federation) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(folder / "results")
    cfg["data"]["root"] = str(folder.parent / "synthetic")  # shared by all tests of the module
    cfg["federation"].update(federation)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class RecordReplies:
    """A Flower mod that saves every message a client sends (arrays and scalars) to a folder;
    it runs inside the Ray workers, so the test can inspect what really left each client."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __call__(self, message: Message, context: Context, call_next) -> Message:
        reply = call_next(message, context)
        arrays, scalars = {}, {}
        if reply.has_content():
            for name, record in reply.content.items():
                if isinstance(record, ArrayRecord):
                    arrays.update({f"{name}/{k}": a.numpy() for k, a in record.items()})
                else:
                    scalars.update({f"{name}/{k}": v for k, v in record.items()})
        stem = f"{os.getpid()}-{time.time_ns()}-{reply.metadata.message_type}"
        np.savez(Path(self.folder) / f"{stem}.npz", **arrays)
        (Path(self.folder) / f"{stem}.json").write_text(json.dumps(scalars))
        return reply


slow = pytest.mark.slow  # the tests on `federation`: Ray start-up + a 3-factory run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config and its factory plan, without Flower or Ray (the synthetic images are
    generated in the same folder as the federation's)."""
    config_path = write_config(tmp_path_factory.mktemp("tiny"))
    config = load_config(config_path, ExperimentConfig)
    return {"config": config, "plan": plan_factories(config)}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, monkeypatch_module):
    """One real run_simulation (Ray); every client reply is recorded by RecordReplies."""
    folder = tmp_path_factory.mktemp("federation")
    recorded = folder / "recorded"
    recorded.mkdir()
    config_path = write_config(folder)
    monkeypatch_module.setattr(simulation, "build_client_app", functools.partial(
        build_client_app, mods=[RecordReplies(recorded)]))
    start = time.perf_counter()
    report = simulation.run_federation(config_path, {}, folder / "run")
    seconds = time.perf_counter() - start
    config = load_config(config_path, ExperimentConfig)
    return {"report": report, "run": folder / "run", "recorded": recorded, "config": config,
            "plan": plan_factories(config), "seconds": seconds}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@slow
def test_simulation_builds_one_bank_per_category_of_budget_size(federation):
    report, run = federation["report"], federation["run"]
    assert report["status"] == "complete"
    assert not report["failed"] and not report["missing"] and not report["rejected"]
    for category in ("disc", "stripes"):
        summary = report["aggregation"][category]
        bank = MemoryBank.load(run / "federated" / "banks" / category)
        # 6 train images x 64 patches = 384; global 10% -> 38 rows, out of 3 x 32 received
        assert summary["budget"] == coreset_size(6 * PATCHES, 0.1) == len(bank) == 38
        assert summary["union_size"] == 3 * coreset_size(2 * PATCHES, 0.25) == 96
        assert bank.dim == DIM and bank.metadata["category"] == category
        assert bank.metadata["backbone_id"] == backbone_id(federation["config"].model)
        assert sum(bank.metadata["kept_per_factory"].values()) == len(bank)


@slow
def test_simulation_metrics_come_back_from_every_factory(federation):
    metrics = federation["report"]["per_factory_metrics"]
    assert sorted(metrics) == ["factory-0", "factory-1", "factory-2"]
    for shard in federation["plan"].shards:
        got = metrics[shard.name]
        assert sorted(got) == sorted({r.category for r in shard.test})
        for values in got.values():
            # pixel metrics only where the factory's test images include a masked defect
            # (otherwise skipped, not reported as numbers)
            assert {"image_auroc", "num_images"} <= set(values)
            # strict JSON: a metric a factory's own test set leaves undefined (e.g. the F1 of
            # rejecting everything without anomalous images) comes back as null, never NaN
            assert all(v is None or isinstance(v, float) for v in values.values())
    assert any(isinstance(v["image_auroc"], float) for m in metrics.values() for v in m.values())
    assert any(isinstance(v.get("pixel_auroc"), float) for m in metrics.values() for v in m.values())


@slow
def test_federation_json_has_upload_stats(federation):
    saved = json.loads((federation["run"] / "federated" / "federation.json").read_text())
    assert saved["status"] == "complete"
    for name, stats in saved["factories"].items():
        per_category = stats["categories"]
        assert sorted(per_category) == ["disc", "stripes"]
        assert stats["bytes_sent"] == stats["vectors_sent"] * DIM * 2 == 2 * 32 * DIM * 2  # fp16
        assert stats["raw_feature_bytes"] == raw_feature_bytes(stats["num_patches"], DIM)
        assert stats["upload_ratio"] == pytest.approx(stats["bytes_sent"] / stats["raw_feature_bytes"])
        assert {"extract_s", "coreset_s", "encode_s", "total_s", "evaluate_s"} <= set(stats["seconds"])


@slow
def test_simulation_leaves_no_ray_process(federation):
    import ray

    assert not ray.is_initialized()
    actors = {int(f.name.split("-", 1)[0]) for f in federation["recorded"].glob("*.npz")}
    assert actors and os.getpid() not in actors  # the clients ran in Ray's worker processes
    alive = [p for p in actors if _status(p) not in (None, psutil.STATUS_ZOMBIE)]
    assert not alive, alive
    children = []
    for pid in simulation.descendants():
        try:
            children.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:  # exited meanwhile
            pass
    assert not [c for c in children if "ray" in c or "flwr" in c or "flower" in c], children


def _status(pid: int) -> str | None:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return None


def _training_pixel_rows(plan, factory: str) -> list[bytes]:
    """Every pixel row of the factory's training images, as raw bytes: uint8, and float32/fp16
    in [0, 1] as the loader would give them."""
    shard = next(s for s in plan.shards if s.name == factory)
    rows = []
    for record in shard.train:
        pixels = np.asarray(read_image(record.path).convert("RGB"))  # (H, W, 3) uint8
        for row in pixels:
            scaled = row.astype(np.float32) / 255.0
            rows += [row.tobytes(), scaled.tobytes(), scaled.astype(np.float16).tobytes()]
    return rows


def assert_no_pixels(arrays: dict[str, np.ndarray], pixel_rows: list[bytes],
                     num_patches: dict[str, int]) -> None:
    """Every array is a (n, D) float matrix of patch vectors, n at most the local coreset of the
    patches it was drawn from (`num_patches` by array name), holding no training image row."""
    for name, array in arrays.items():
        assert array.ndim == 2 and array.shape[1] == DIM, (name, array.shape)
        assert array.dtype in (np.float16, np.float32), (name, array.dtype)
        assert array.shape[0] <= coreset_size(num_patches[name], 0.25) <= 32, name
        assert array.shape != (SIZE, SIZE) and 3 not in array.shape
        blob = array.tobytes()
        assert not any(row in blob for row in pixel_rows), name


@slow
def test_every_message_sent_by_simulated_clients_is_free_of_pixels(federation):
    files = sorted(federation["recorded"].glob("*.npz"))
    kinds = [f.stem.rsplit("-", 1)[-1] for f in files]
    assert kinds.count("train") == 3 and kinds.count("evaluate") == 3 and kinds.count("query") == 3
    for file in files:
        scalars = json.loads(file.with_suffix(".json").read_text())
        factory = scalars['site/factory']
        with np.load(file, allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in saved.files}
        assert all(k.startswith(f"{FEATURES}/") for k in arrays)
        assert bool(arrays) == file.stem.endswith("train")  # identify, evaluate: numbers only
        num_patches = {k: scalars[f"{PAYLOAD}/{k.split('/', 1)[1]}.num_patches"] for k in arrays}
        assert_no_pixels(arrays, _training_pixel_rows(federation["plan"], factory), num_patches)
        for key, value in scalars.items():  # scalars only: numbers, short names
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (int, float, str)) and len(str(v)) < 80 for v in values), key


def _instruction(content: RecordDict, message_type: str, node_id: int) -> Message:
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=1, dst_node_id=node_id,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return Message(content, metadata=metadata)


def test_client_handlers_called_directly_send_only_coresets_and_numbers(tiny, tmp_path):
    settings = simulation.run_config(write_config(tmp_path), {}, tmp_path / "run")
    app = build_client_app(settings)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    ask = to_flower({ASSIGNMENT: {"factory": "factory-1", "factory-id": 1}})
    reply = app(_instruction(ask, MessageType.TRAIN, 7), context)
    assert not reply.has_error() and set(reply.content) == {"features", "payload", "site", "timings", "release"}
    arrays = {k: a.numpy() for k, a in reply.content[FEATURES].items()}
    assert sorted(arrays) == ["disc", "stripes"]
    payloads, problems = unpack_payloads(arrays, dict(reply.content[PAYLOAD]))
    assert_no_pixels(arrays, _training_pixel_rows(tiny["plan"], "factory-1"),
                     {c: p.num_patches for c, p in payloads.items()})
    assert not problems and all(p.factory_id == 1 and p.num_patches == 2 * PATCHES
                                for p in payloads.values())
    banks = ArrayRecord({c: Array(p.features.astype(np.float32)) for c, p in payloads.items()})
    ask = to_flower({ASSIGNMENT: {"factory": "factory-1", "factory-id": 1}})
    ask[BANKS] = banks
    answer = app(_instruction(ask, MessageType.EVALUATE, 7), context)
    assert not answer.has_error() and not any(isinstance(r, ArrayRecord)
                                              for r in answer.content.values())
    assert all(isinstance(v, float) for v in answer.content["metrics"].values())


# ---- Flower-free parts (no Ray: the fast tier) ---------------------------------------------


@pytest.fixture(scope="module")
def site_setup(tiny):
    config, plan = tiny["config"], tiny["plan"]
    site = Site(config, plan.shard(0), plan.shifts)
    payloads, seconds = site.local_payloads()
    return config, plan, site, payloads, seconds


def test_plan_is_deterministic_and_complete(tiny):
    config, plan = tiny["config"], tiny["plan"]
    again = plan_factories(config)
    assert [s.train for s in again.shards] == [s.train for s in plan.shards]
    assert sorted(plan.shifts) == ["factory-0", "factory-1", "factory-2"]
    assert sum(len(s.train) for s in plan.shards) == 12 and plan.categories == ["stripes", "disc"]
    with pytest.raises(Exception, match="out of range"):
        plan.shard(3)


def test_site_local_payloads_are_local_coresets(site_setup):
    config, _, site, payloads, seconds = site_setup
    assert sorted(payloads) == ["disc", "stripes"]
    for p in payloads.values():
        assert p.num_patches == 2 * PATCHES and p.num_images == 2
        assert p.features.shape == (coreset_size(2 * PATCHES, 0.25), DIM)
        assert p.features.dtype == np.float16 and p.backbone_id == site.model.backbone_id
    assert set(seconds) == {"extract_s", "coreset_s", "encode_s"}


def test_site_evaluate_returns_numbers_per_category(site_setup):
    _, plan, site, payloads, _ = site_setup
    metrics, calibration = site.evaluate({c: torch.from_numpy(p.features.astype(np.float32))
                                          for c, p in payloads.items()})
    assert sorted(metrics) == sorted({r.category for r in plan.shard(0).test})
    held = {r.category: sum(1 for v in plan.shard(0).validation if v.category == r.category)
            for r in plan.shard(0).validation}
    assert {c: len(v) for c, v in calibration.items()} == held  # one score per held-out normal
    assert all(isinstance(v, float) for m in metrics.values() for v in m.values())


def _bad(payload: Payload, features: np.ndarray | None = None, **fields) -> Payload:
    """A copy of `payload` with some fields (or the features) replaced."""
    config = {**payload.to_parts()[1], **fields}
    return Payload(payload.features if features is None else features, **config)


def test_aggregate_all_drops_invalid_payloads_with_a_logged_reason(site_setup, caplog, tmp_path):
    config, _, site, payloads, _ = site_setup
    good = payloads["disc"]
    nan = good.features.copy()
    nan[0, 0] = np.nan
    sent = {
        0: {"disc": good, "stripes": _bad(payloads["stripes"], backbone_id="resnet18:x")},
        1: {"disc": _bad(good, factory_id=1, features=nan)},
        2: {"disc": _bad(good, factory_id=0)},  # claims to be factory 0
        3: {"stripes": encode(np.ones((4, DIM + 1), np.float32), num_patches=40, num_images=1,
                              backbone_id=site.model.backbone_id, factory_id=3)},
    }
    rejected: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="fedpatch.server"):
        results = aggregate_all(sent, config, {"target_embed_dim": DIM}, site.model.backbone_id,
                                rejected)
    assert sorted(results) == ["disc"] and results["disc"].factory_ids == [0]
    reasons = {(r["factory"], r["category"]): r["reason"] for r in rejected}
    assert set(reasons) == {("factory-0", "stripes"), ("factory-1", "disc"),
                            ("factory-2", "disc"), ("factory-3", "stripes")}
    assert "backbone" in reasons[("factory-0", "stripes")]
    assert "non-finite" in reasons[("factory-1", "disc")]
    assert "claims factory-0" in reasons[("factory-2", "disc")]
    assert "dimension" in reasons[("factory-3", "stripes")]
    assert caplog.text.count("rejected") == 4 and "no valid payload" in caplog.text
    written = save_global_banks(results, tmp_path, {"model": {"target_embed_dim": DIM}, "seed": 0})
    meta = MemoryBank.load(written["disc"]).metadata
    assert meta["category"] == "disc" and meta["kept_per_factory"] == {"factory-0": len(results["disc"].bank)}


def test_oversized_payload_is_rejected(site_setup):
    config, _, site, payloads, _ = site_setup
    whole = encode(np.zeros((100, DIM), np.float32), num_patches=128, num_images=2,
                   backbone_id=site.model.backbone_id, factory_id=0)  # 100 > 25% of 128
    rejected: list[dict] = []
    with pytest.raises(QuorumError, match=r"only 0 of 3 factories sent valid payloads "
                                          r"\(federation.min_clients = 1\): no global bank"):
        aggregate_all({0: {"disc": whole}}, config, {"target_embed_dim": DIM},
                      site.model.backbone_id, rejected)
    assert "exceed the limit" in rejected[0]["reason"]


def test_upload_stats_and_wire_format_round_trip(site_setup):
    _, _, _, payloads, seconds = site_setup
    stats = upload_stats(payloads, seconds)
    assert stats["bytes_sent"] == sum(p.nbytes for p in payloads.values())
    assert stats["raw_feature_bytes"] == 2 * raw_feature_bytes(2 * PATCHES, DIM)
    arrays, scalars = pack_payloads(payloads)
    back = TrainReply.from_records(from_flower(to_flower(
        TrainReply("factory-0", 0, payloads, 4).to_records())))
    assert not back.problems and back.payloads == payloads and back.train_images == 4
    del scalars["disc.num_patches"]
    scalars["ghost.num_images"] = 1
    back, problems = unpack_payloads(arrays, scalars)
    assert sorted(back) == ["stripes"] and "num_patches" in problems["disc"]
    assert "features" in problems["ghost"]


def test_run_config_errors_are_one_line_config_errors(tmp_path):
    path = write_config(tmp_path)
    config, run_dir = experiment_config({"config": str(path), "run-dir": "x",
                                         "overrides": '{"federation.num_factories": 2}'})
    assert config.federation.num_factories == 2 and run_dir == Path("x")
    assert experiment_config({"config": str(path)})[1] is None
    with pytest.raises(ConfigError, match="lacks config"):
        experiment_config({"overrides": ""})
    with pytest.raises(ConfigError, match="not valid JSON"):
        experiment_config({"config": str(path), "overrides": "{nope", "run-dir": "x"})


def test_server_waits_for_nodes_then_says_how_many_came():
    class Transport:
        def __init__(self) -> None:
            self.calls = 0

        def node_ids(self):
            self.calls += 1
            return [11, 12, 13][: self.calls]

    assert wait_for_nodes(Transport(), 3, timeout_s=5, poll_s=0.01) == [11, 12, 13]
    with pytest.raises(ConfigError, match="only 2 of 3"):
        wait_for_nodes(type("T", (), {"node_ids": lambda self: [1, 2]})(), 3, 0.05, 0.01)


class FakeGrid:
    """A Grid whose node 1 answers, node 2 errs as a crashed ClientApp, node 3 stays silent, and
    node 4 dies: the SuperLink answers for it (sender 1: the SuperLink, not node 4)."""

    def __init__(self, content: RecordDict) -> None:
        self.content, self.sent = content, {}

    def push_messages(self, messages):
        for k, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{k}"
            self.sent[f"m{k}"] = m
        return list(self.sent)

    def pull_messages(self, ids):
        replies = []
        for mid in ids:
            asked = self.sent[mid]
            node = asked.metadata.dst_node_id
            metadata = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=node if node != 4 else 1,
                                dst_node_id=0, reply_to_message_id=mid, group_id="",
                                created_at=time.time(), ttl=600.0,
                                message_type=asked.metadata.message_type)
            if node == 1:
                replies.append(Message(self.content, metadata=metadata))
            elif node == 2:
                reason = "\x1b[36mray::ClientAppActor.run()\x1b[39m\n  File x\nMessage: boom"
                replies.append(Message(Error(code=1, reason=reason), metadata=metadata))
            elif node == 4:
                replies.append(Message(Error(code=3, reason="node went offline"), metadata=metadata))
        return replies


def test_failed_silent_and_dead_nodes_are_recorded_once_by_the_node_asked(site_setup, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # what Flower sets in a ServerApp's process (a Message reads its run id from there)
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    config, _, _, payloads, _ = site_setup
    content = to_flower(TrainReply("factory-0", 0, payloads, 2, {"extract_s": 1.0}).to_records())
    transport = GridTransport(FakeGrid(content), poll_s=0.01)
    report = new_report(config)
    names = {1: "factory-0", 2: "factory-1", 3: "factory-2", 4: "factory-3"}
    replies = exchange(transport, MessageType.TRAIN, {n: {} for n in names}, 0.3, report, names)
    received = decode_train(replies, names, report)
    assert sorted(replies) == [1] and received == {"factory-0": payloads}
    assert report["failed"] == [
        {"factory": "factory-1", "node_id": 2, "phase": "train", "reason": "Message: boom"},
        {"factory": "factory-3", "node_id": 4, "phase": "train", "reason": "node went offline"}]
    assert report["missing"] == [{"factory": "factory-2", "node_id": 3, "phase": "train",
                                  "reason": "no reply within 0.3 s"}]
    assert report["factories"]["factory-0"]["seconds"] == {"extract_s": 1.0}
