"""The Flower ServerApp: one round of local coresets in, one global bank per category out.

`main` waits for the factories' nodes, asks each which factory it is (a cheap query round, so
that a factory that later fails is named), sends each a train message, decodes the local
coresets that come back and keeps them (run_dir/federated/payloads), aggregates them per category
(federated/server_logic.py: validation, quorum, poisoning screen), saves the global banks, then
sends every factory the banks of its categories and collects the metrics it measures on its own
test images. A factory that errs, does not answer in time, or joins with nothing to send is
recorded in federation.json ("failed" / "missing", with the reason), not allowed to crash the
run; so is a payload that fails validation ("rejected"). With the run config key "resume-from"
(an earlier run folder), the payloads saved there are reused and only the other factories are
asked to train. Like the ClientApp, it reads the run config ("config", "overrides", "run-dir"), with
defaults baked in by `build_server_app` for `run_simulation`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.app import (ASSIGNMENT, BANKS, FEATURES, METRICS, PAYLOAD, RELEASE, SITE, TIMINGS,
                         unpack_payloads)
from federated.aggregation import AggregationResult
from federated.config import ExperimentConfig
from federated.partition import factory_name
from federated.payload import Payload
from federated.plan import experiment_config, plan_factories
from federated.server_logic import (aggregate_all, aggregation_summary, load_received,
                                    save_global_banks, save_received, upload_stats,
                                    write_federation_json, write_run_config)
from patchcore.config import to_dict
from patchcore.errors import ConfigError
from patchcore.model import backbone_id as model_backbone_id

log = logging.getLogger("fedpatch.server")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str, limit: int = 300) -> str:
    """The last line of an error reason (Ray wraps a client's exception in its traceback),
    without colour codes: what federation.json keeps; the full text goes to the log."""
    lines = [line.strip() for line in _ANSI.sub("", str(reason)).splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    return last if len(last) <= limit else last[: limit - 3] + "..."


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float, poll_s: float = 0.5) -> list[int]:
    """Node ids, sorted, once at least `expected` nodes are connected; ConfigError after
    `timeout_s` saying how many arrived (nodes register after the ServerApp starts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= expected:
            if len(nodes) > expected:
                log.warning("%d nodes connected, %d factories configured: all are asked",
                            len(nodes), expected)
            return nodes
        if time.monotonic() >= deadline:
            raise ConfigError(f"only {len(nodes)} of {expected} factory nodes connected within "
                              f"federation.node_timeout_s = {timeout_s:g} s; start more "
                              f"supernodes or lower federation.num_factories")
        time.sleep(poll_s)


def exchange(grid: Grid, contents: Mapping[int, RecordDict], message_type: str, timeout_s: float,
             report: dict[str, Any], phase: str,
             names: Mapping[int, int] | None = None) -> dict[int, Message]:
    """Send one message per node and return {node id: reply with content}; errors go to
    report["failed"], silence (no reply within `timeout_s`) to report["missing"], each entry
    naming the node's factory when `names` ({node id: factory id}) knows it."""
    names = names or {}

    def who(node: int) -> dict[str, Any]:
        return {"factory": factory_name(names[node]) if node in names else None, "node_id": node}

    messages = [Message(content, dst_node_id=node, message_type=message_type)
                for node, content in contents.items()]
    replies: dict[int, Message] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("node %d failed in %s: %s", node, phase, reply.error.reason)
            report["failed"].append({**who(node), "phase": phase,
                                     "reason": short_reason(reply.error.reason)})
        else:
            replies[node] = reply
    answered = set(replies) | {f["node_id"] for f in report["failed"] if f["phase"] == phase}
    for node in sorted(set(contents) - answered):
        log.warning("node %d sent no %s reply within %g s", node, phase, timeout_s)
        report["missing"].append({**who(node), "phase": phase,
                                  "reason": f"no reply within {timeout_s:g} s"})
    return replies


def identify(grid: Grid, nodes: Iterable[int], config: ExperimentConfig,
             report: dict[str, Any]) -> dict[int, int]:
    """{node id: factory id}, asked of every node (nodes that fail to say are reported)."""
    f = config.federation
    ask = {node: RecordDict({ASSIGNMENT: ConfigRecord({"factory-id": k % f.num_factories})})
           for k, node in enumerate(nodes)}
    replies = exchange(grid, ask, MessageType.QUERY, f.round_timeout_s, report, "identify")
    return {node: int(reply.content[SITE]["factory-id"]) for node, reply in replies.items()}


def decode_train_replies(replies: Mapping[int, Message],
                         report: dict[str, Any]) -> tuple[dict[int, dict[str, Payload]], dict[int, int]]:
    """({factory id: {category: payload}}, {factory id: node id}); upload stats per factory go
    to report["factories"], unreadable payloads to report["rejected"], unreadable replies and
    a second answer for one factory to report["failed"]."""
    payloads: dict[int, dict[str, Payload]] = {}
    nodes: dict[int, int] = {}
    for node, reply in sorted(replies.items()):
        try:
            content = reply.content
            factory_id = int(content[SITE]["factory-id"])
            decoded, problems = unpack_payloads(content[FEATURES], content[PAYLOAD])
            seconds = {k: float(v) for k, v in content[TIMINGS].items()} if TIMINGS in content else {}
        except (KeyError, TypeError, ValueError) as exc:
            report["failed"].append({"node_id": node, "phase": "train",
                                     "reason": f"unreadable reply: {type(exc).__name__}: {exc}"})
            continue
        if factory_id in nodes:
            report["failed"].append({"node_id": node, "phase": "train", "reason":
                                     f"{factory_name(factory_id)} already answered from node "
                                     f"{nodes[factory_id]}"})
            continue
        for category, reason in sorted(problems.items()):
            report["rejected"].append({"factory": factory_name(factory_id), "category": category,
                                       "reason": reason})
        stats = upload_stats(decoded, seconds)
        if RELEASE in content:
            stats["release"] = {k: float(v) for k, v in content[RELEASE].items()}
        report["factories"][factory_name(factory_id)] = {"node_id": node, **stats}
        if not decoded and not problems and content[SITE].get("status") == "empty":
            report["missing"].append({"factory": factory_name(factory_id), "node_id": node,
                                      "phase": "train", "reason": "joined with an empty shard "
                                      "(no training images): nothing to send"})
        payloads[factory_id], nodes[factory_id] = decoded, node
    return payloads, nodes


def bank_metadata(config: ExperimentConfig, backbone_id: str, category: str,
                  accepted: Iterable[Payload]) -> dict[str, Any]:
    """What `PatchCore.from_bank` and a reader need besides the aggregation summary."""
    accepted = list(accepted)
    return {"model": to_dict(config.model), "seed": config.seed, "backbone_id": backbone_id,
            "category": category, "federated": True,
            "num_patches": sum(p.num_patches for p in accepted),
            "num_train_images": sum(p.num_images for p in accepted),
            "preprocess": {"resize": config.data.resize, "crop": config.data.crop}}


def save_banks(results: Mapping[str, AggregationResult], payloads: Mapping[int, Mapping[str, Payload]],
               config: ExperimentConfig, backbone_id: str, run_dir: Path) -> None:
    """One safetensors bank per category, each with its own provenance."""
    for category, result in results.items():
        accepted = [payloads[k][category] for k in result.factory_ids]
        save_global_banks({category: result}, run_dir,
                          bank_metadata(config, backbone_id, category, accepted))


def evaluate_round(grid: Grid, config: ExperimentConfig, results: Mapping[str, AggregationResult],
                   payloads: Mapping[int, Mapping[str, Payload]], nodes: Mapping[int, int],
                   report: dict[str, Any]) -> None:
    """Send each factory the banks of the categories it trained on; collect its metrics."""
    contents: dict[int, RecordDict] = {}
    for factory_id, node in sorted(nodes.items()):
        mine = {c: Array(results[c].bank.numpy()) for c in sorted(payloads[factory_id])
                if c in results}  # (M, D) float32 each
        if mine:
            contents[node] = RecordDict({BANKS: ArrayRecord(mine), ASSIGNMENT: ConfigRecord(
                {"factory-id": factory_id})})
    replies = exchange(grid, contents, MessageType.EVALUATE, config.federation.round_timeout_s,
                       report, "evaluate")
    for node, reply in sorted(replies.items()):
        factory = factory_name(int(reply.content[SITE]["factory-id"]))
        per_category: dict[str, dict[str, float]] = {}
        for key, value in reply.content[METRICS].items():
            category, _, metric = key.rpartition(".")
            per_category.setdefault(category, {})[metric] = float(value)
        report["per_factory_metrics"][factory] = per_category
        if factory in report["factories"] and TIMINGS in reply.content:
            report["factories"][factory]["seconds"].update(
                {k: float(v) for k, v in reply.content[TIMINGS].items()})


def new_report(config: ExperimentConfig) -> dict[str, Any]:
    f = config.federation
    spec = config.privacy_spec()
    return {"status": "running", "num_factories": f.num_factories, "partition": f.partition,
            "aggregation_method": f.aggregation, "local_ratio": f.local_ratio,
            "global_ratio": f.global_ratio, "payload_dtype": f.payload_dtype,
            "min_clients": f.min_clients, "poison_mode": f.poison_mode,
            "privacy": spec.to_dict() if spec else {"epsilon": None, "note": "off: no noise"},
            "transform": to_dict(config.model.transform), "faults": list(f.faults),
            "factories": {}, "aggregation": {}, "per_factory_metrics": {}, "poisoning": {},
            "failed": [], "missing": [], "rejected": [], "resumed": [], "seconds": {}}


class _Laps:
    """Seconds per phase, for report["seconds"]."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.start, self.last = seconds, time.perf_counter(), time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[f"{phase}_s"], self.last = now - self.last, now
        self.seconds["total_s"] = now - self.start


def run_server(grid: Grid, context: Context, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The whole federation, one train round and one evaluate round; returns the report that
    is also written to run_dir/federated/federation.json (even when the run fails)."""
    settings = {**defaults, **dict(context.run_config)}
    config, run_dir = experiment_config(settings)
    resume_from = str(settings.get("resume-from", "") or "")
    report = new_report(config)
    lap, f = _Laps(report["seconds"]), config.federation
    try:
        plan_factories(config)  # lists (and for `synthetic`, writes) the data once, up front
        write_run_config(run_dir, config)
        held = load_received(resume_from, config) if resume_from else {}
        report["resumed"] = [factory_name(k) for k in sorted(held)]
        report["nodes"] = wait_for_nodes(grid, f.num_factories, f.node_timeout_s)
        lap("wait_nodes")
        names = identify(grid, report["nodes"], config, report)
        lap("identify")
        train = {node: RecordDict({ASSIGNMENT: ConfigRecord({"factory-id": k})})
                 for node, k in sorted(names.items()) if k not in held}
        replies = exchange(grid, train, MessageType.TRAIN, f.round_timeout_s, report, "train", names)
        lap("train_round")
        payloads, nodes = decode_train_replies(replies, report)
        save_received(payloads, run_dir, config)
        for k, by_category in held.items():
            payloads[k] = dict(by_category)
            report["factories"][factory_name(k)] = {"resumed_from": resume_from,
                                                    **upload_stats(by_category)}
            node = next((n for n, fk in sorted(names.items()) if fk == k), None)
            if node is not None:  # it is evaluated on its own test images like the others
                nodes[k] = node
        save_received(held, run_dir, config)
        backbone_id = model_backbone_id(config.model)
        results = aggregate_all(payloads, config, to_dict(config.model), backbone_id,
                                report["rejected"], report["poisoning"])
        report["aggregation"] = {c: aggregation_summary(r) for c, r in results.items()}
        save_banks(results, payloads, config, backbone_id, run_dir)
        lap("aggregate")
        write_federation_json(run_dir, report)
        evaluate_round(grid, config, results, payloads, nodes, report)
        lap("evaluate_round")
        report["status"] = "complete"
    except Exception as exc:
        report["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        write_federation_json(run_dir, report)
    return report


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to `defaults` (for `run_simulation`)."""
    baked = dict(defaults or {})
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, baked)

    return server


app = build_server_app()
