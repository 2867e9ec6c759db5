"""The federation's rounds, written once: identify -> train -> aggregate -> evaluate.

`run_rounds` drives any `Transport`: Flower's Grid (server/app.py adapts it, for simulations on
Ray and for deployments over the network) or `InProcessTransport` (sites called directly: tests
and sweeps). Nothing here knows where images live: sites announce their factory name, categories
and image counts in the identify round, the server gives each factory an integer id (natural
order of the names: factory-2 before factory-10) for payload provenance, asks every factory for
its local coresets, aggregates per category over the factories that have it (budgets from the
patch counts they report), and sends each factory the banks of its categories to score its own
test images. What goes wrong is recorded in the report ("failed", "missing", "refused",
"rejected"), once per factory, with the reason; `run_dir/federated/federation.json` is rewritten
at every phase, so its "phase" shows where a run is, and kept when a run fails.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from federated.config import ExperimentConfig
from federated.errors import PayloadError
from federated.payload import Payload
from federated.protocol import (
    EVALUATE,
    IDENTIFY,
    PHASES,
    TRAIN,
    EvaluateReply,
    EvaluateRequest,
    Failure,
    Records,
    SiteInfo,
    TrainReply,
    TrainRequest,
    natural_key,
)
from federated.server_logic import (
    aggregate_all,
    aggregation_summary,
    load_received,
    save_global_banks,
    save_received,
    upload_stats,
    write_federation_json,
    write_run_config,
)
from federated.site import Site
from patchcore.bank_metadata import bank_metadata as patchcore_bank_metadata
from patchcore.config import to_dict
from patchcore.errors import ConfigError
from patchcore.model import backbone_id as model_backbone_id

log = logging.getLogger("fedpatch.server")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Transport(Protocol):
    """How the server reaches the sites. `exchange` sends one request per node and returns what
    came back within `timeout_s`: reply records, or a Failure naming why; a node absent from the
    result stayed silent."""

    def node_ids(self) -> list[int]: ...

    def exchange(self, kind: str, requests: Mapping[int, Records],
                 timeout_s: float) -> dict[int, Records | Failure]: ...


class InProcessTransport:
    """Sites called directly, in this process (no Flower, no timeouts): node k is sites[k]."""

    def __init__(self, sites: Sequence[Site]) -> None:
        self.sites = dict(enumerate(sites))

    def node_ids(self) -> list[int]:
        return list(self.sites)

    def exchange(self, kind: str, requests: Mapping[int, Records],
                 timeout_s: float) -> dict[int, Records | Failure]:
        out: dict[int, Records | Failure] = {}
        for node, records in sorted(requests.items()):
            try:
                out[node] = self.sites[node].answer(kind, records)
            except Exception as exc:  # a site's failure is reported, as over the network
                out[node] = Failure(f"{type(exc).__name__}: {exc}")
        return out


def short_reason(reason: str, limit: int = 300) -> str:
    """The last line of an error reason (Ray and Flower wrap a client's exception in a
    traceback), without colour codes: what the report keeps; the full text goes to the log."""
    lines = [line.strip() for line in _ANSI.sub("", str(reason)).splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    return last if len(last) <= limit else last[: limit - 3] + "..."


def wait_for_nodes(transport: Transport, expected: int, timeout_s: float,
                   poll_s: float = 0.5) -> list[int]:
    """Node ids, sorted, once at least `expected` nodes are connected; ConfigError after
    `timeout_s` saying how many arrived (nodes register after the server starts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(n) for n in transport.node_ids())
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


def new_report(config: ExperimentConfig) -> dict[str, Any]:
    """The federation report (federation.json) before anything happened."""
    f = config.federation
    spec = config.privacy_spec()
    return {"status": "running", "phase": "start", "num_factories": f.num_factories,
            "partition": f.partition, "aggregation_method": f.aggregation,
            "local_ratio": f.local, "global_ratio": f.global_ratio,
            "payload_dtype": f.payload_dtype, "min_clients": f.min_clients,
            "poison_mode": f.poison_mode,
            "privacy": spec.to_dict() if spec else {"epsilon": None, "note": "off: no noise"},
            "transform": to_dict(config.model.transform), "faults": list(f.faults),
            "sites": {}, "factories": {}, "aggregation": {}, "per_factory_metrics": {},
            "poisoning": {}, "failed": [], "missing": [], "refused": [], "rejected": [],
            "resumed": [], "seconds": {}}


def exchange(transport: Transport, kind: str, requests: Mapping[int, Records], timeout_s: float,
             report: dict[str, Any], names: Mapping[int, str] | None = None) -> dict[int, Records]:
    """One round: {node: reply records}; failures go to report["failed"], silence to
    report["missing"], each entry naming the node's factory when `names` knows it."""
    names, phase = names or {}, PHASES[kind]
    answers = transport.exchange(kind, requests, timeout_s)
    replies: dict[int, Records] = {}
    for node in sorted(requests):
        who = {"factory": names.get(node), "node_id": node, "phase": phase}
        answer = answers.get(node)
        if isinstance(answer, Failure):
            log.warning("node %d (%s) failed in %s: %s", node, names.get(node), phase, answer.reason)
            report["failed"].append({**who, "reason": short_reason(answer.reason)})
        elif answer is None:
            log.warning("node %d (%s) sent no %s reply within %g s", node, names.get(node), phase, timeout_s)
            report["missing"].append({**who, "reason": f"no reply within {timeout_s:g} s"})
        else:
            replies[node] = answer
    return replies


def identify(transport: Transport, nodes: Sequence[int], config: ExperimentConfig,
             report: dict[str, Any], bindings: Mapping[str, int] | None = None) -> dict[int, SiteInfo]:
    """{node: what its site announced}. A node is refused (report["refused"], no further part)
    when it claims a factory that already joined, or, with `bindings` ({factory: node id}, e.g.
    from SuperNode registration), a factory bound to another node or not bound at all."""
    f = config.federation
    replies = exchange(transport, IDENTIFY, {n: {} for n in nodes}, f.identify_timeout_s, report)
    sites: dict[int, SiteInfo] = {}
    owner: dict[str, int] = {}
    for node, records in sorted(replies.items()):
        try:
            info = SiteInfo.from_records(records)
        except (KeyError, TypeError, ValueError) as exc:
            report["failed"].append({"factory": None, "node_id": node, "phase": "identify",
                                     "reason": f"unreadable reply: {type(exc).__name__}: {exc}"})
            continue
        reason = ""
        if bindings is not None and info.factory not in bindings:
            reason = f"{info.factory} is not one of this federation's registered factories"
        elif bindings is not None and int(bindings[info.factory]) != node:
            reason = f"{info.factory} is bound to node {bindings[info.factory]}"
        elif info.factory in owner:
            reason = f"{info.factory} already joined from node {owner[info.factory]}"
        if reason:
            log.warning("refused node %d: %s", node, reason)
            report["refused"].append({"factory": info.factory, "node_id": node, "reason": reason})
            continue
        owner[info.factory], sites[node] = node, info
        report["sites"][info.factory] = {
            "node_id": node, "categories": info.categories,
            "train_images": sum(c.get("train", 0) for c in info.counts.values()),
            "test_images": sum(c.get("test", 0) for c in info.counts.values()), "counts": info.counts}
    return sites


def decode_train(replies: Mapping[int, Records], expected: Mapping[int, str],
                 report: dict[str, Any]) -> dict[str, dict[str, Payload]]:
    """{factory: {category: payload}}; upload stats per factory go to report["factories"],
    unreadable payloads to report["rejected"], unreadable or misaddressed replies to "failed"."""
    out: dict[str, dict[str, Payload]] = {}
    for node, records in sorted(replies.items()):
        try:
            reply = TrainReply.from_records(records)
        except (KeyError, TypeError, ValueError, PayloadError) as exc:
            report["failed"].append({"factory": expected.get(node), "node_id": node, "phase": "train",
                                     "reason": f"unreadable reply: {type(exc).__name__}: {exc}"})
            continue
        if reply.factory != expected.get(node):
            report["failed"].append({"factory": expected.get(node), "node_id": node, "phase": "train",
                                     "reason": f"replied as {reply.factory}"})
            continue
        for category, reason in sorted(reply.problems.items()):
            report["rejected"].append({"factory": reply.factory, "category": category, "reason": reason})
        stats = upload_stats(reply.payloads, reply.timings)
        report["factories"][reply.factory] = {"node_id": node, "factory_id": reply.factory_id,
                                              "train_images": reply.train_images, **stats,
                                              "release": reply.release, "device": reply.device}
        if reply.empty:
            report["missing"].append({"factory": reply.factory, "node_id": node, "phase": "train",
                                      "reason": "joined with an empty shard (no training images): "
                                      "nothing to send"})
        out[reply.factory] = reply.payloads
    return out


def evaluate_round(transport: Transport, config: ExperimentConfig, banks: Mapping[str, Any],
                   nodes: Mapping[str, int], ids: Mapping[str, int], sites: Mapping[int, SiteInfo],
                   report: dict[str, Any]) -> None:
    """Send each factory the banks of the categories it has test or held-out normal images of;
    collect its metrics and its held-out normals' scores (report["calibration_scores"])."""
    requests: dict[int, Records] = {}
    for factory, node in sorted(nodes.items()):
        counts = sites[node].counts
        mine = {c: banks[c] for c in sorted(counts)
                if c in banks and (counts[c].get("test", 0) > 0 or counts[c].get("validation", 0) > 0)}
        if mine:
            requests[node] = EvaluateRequest(factory, ids[factory], mine).to_records()
    names = {node: factory for factory, node in nodes.items()}
    for node, records in exchange(transport, EVALUATE, requests, config.federation.round_timeout_s,
                                  report, names).items():
        reply = EvaluateReply.from_records(records)
        report["per_factory_metrics"][reply.factory] = reply.metrics
        for category, scores in reply.calibration.items():
            report.setdefault("calibration_scores", {}).setdefault(category, {})[reply.factory] = scores.tolist()
        if reply.factory in report["factories"]:
            report["factories"][reply.factory]["seconds"].update(reply.timings)


class _Laps:
    """Seconds per phase (report["seconds"]) and the current phase, written to federation.json."""

    def __init__(self, report: dict[str, Any], run_dir: Path) -> None:
        self.report, self.run_dir = report, run_dir
        self.start = self.last = time.perf_counter()

    def __call__(self, done: str, next_phase: str) -> None:
        now = time.perf_counter()
        seconds = self.report["seconds"]
        seconds[f"{done}_s"], self.last = now - self.last, now
        seconds["total_s"] = now - self.start
        self.report["phase"] = next_phase
        write_federation_json(self.run_dir, self.report)


def run_rounds(transport: Transport, config: ExperimentConfig, run_dir: str | Path,
               resume_from: str | Path | None = None, evaluate: bool = True,
               bindings: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The whole federation; returns the report, also written to run_dir/federated/federation.json
    (even when the run fails: status "failed: ...", then the exception propagates). `bindings`:
    {factory: node id} that alone may speak for it (see `identify`)."""
    run_dir = Path(run_dir)
    report = new_report(config)
    f = config.federation
    lap = _Laps(report, run_dir)
    try:
        write_run_config(run_dir, config)
        held = load_received(resume_from, config) if resume_from else {}
        report["resumed"] = sorted(held, key=natural_key)
        lap("setup", "wait_nodes")
        report["nodes"] = wait_for_nodes(transport, f.num_factories, f.node_timeout_s)
        lap("wait_nodes", "identify")
        sites = identify(transport, report["nodes"], config, report, bindings)
        names = {node: info.factory for node, info in sites.items()}
        ids = {name: k for k, name in enumerate(sorted(set(names.values()) | set(held), key=natural_key))}
        lap("identify", "train")
        asks = {node: TrainRequest(name, ids[name]).to_records()
                for node, name in sorted(names.items()) if name not in held}
        received = decode_train(exchange(transport, TRAIN, asks, f.round_timeout_s, report, names),
                                names, report)
        save_received(received, run_dir, config)
        for name, by_category in held.items():
            received[name] = {c: p.with_factory_id(ids[name]) for c, p in by_category.items()}
            report["factories"][name] = {"resumed_from": str(resume_from), **upload_stats(by_category)}
        save_received({n: received[n] for n in held}, run_dir, config)
        lap("train_round", "aggregate")
        by_id = {ids[name]: payloads for name, payloads in received.items()}
        id_names = {k: name for name, k in ids.items()}
        backbone = model_backbone_id(config.model)
        results = aggregate_all(by_id, config, to_dict(config.model), backbone, report["rejected"],
                                report["poisoning"], names=id_names)
        report["aggregation"] = {c: aggregation_summary(r, id_names) for c, r in results.items()}
        for category, result in results.items():
            accepted = [by_id[k][category] for k in result.factory_ids]
            save_global_banks({category: result}, run_dir, bank_metadata(config, backbone, category, accepted),
                              id_names)
        lap("aggregate", "evaluate" if evaluate else "done")
        if evaluate:
            nodes = {name: node for node, name in names.items() if name in received}
            banks = {c: r.bank.numpy() for c, r in results.items()}  # (M, D) float32 each
            evaluate_round(transport, config, banks, nodes, ids, sites, report)
            report["calibration"] = calibrate_global_banks(run_dir, config, report.pop("calibration_scores", {}))
            lap("evaluate_round", "done")
        report["status"] = "complete"
    except Exception as exc:
        report["status"] = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        write_federation_json(run_dir, report)
    return report


def calibrate_global_banks(run_dir: Path, config: ExperimentConfig,
                           scores: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Give each global bank the threshold its sites' held-out normals calibrate: the
    threshold.quantile of their pooled image scores under that bank (the sites sent scores,
    never images), written into the bank's metadata. {category: what was calibrated on}."""
    from patchcore.bank_metadata import set_threshold
    from patchcore.memory_bank import MemoryBank
    from patchcore.threshold import Threshold, calibrate_threshold

    out: dict[str, Any] = {}
    for category, by_factory in sorted(scores.items()):
        pooled = [s for factory in sorted(by_factory, key=natural_key) for s in by_factory[factory]]
        if not pooled:
            continue
        threshold = calibrate_threshold(pooled, method="quantile", quantile=config.threshold.quantile)
        details = {**threshold.details, "source": "held-out training normals at the sites",
                   "factories": sorted(by_factory, key=natural_key)}
        path = run_dir / "federated" / "banks" / category
        bank = MemoryBank.load(path)
        set_threshold(bank.metadata, Threshold(threshold.value, threshold.method, details))
        bank.save(path)
        out[category] = {"threshold": threshold.value, "num_normal": len(pooled), "factories": details["factories"]}
    return out


def bank_metadata(config: ExperimentConfig, backbone_id: str, category: str,
                  accepted: Sequence[Payload]) -> dict[str, Any]:
    """What `PatchCore.from_bank` and a reader need besides the aggregation summary."""
    return patchcore_bank_metadata(config.model, config.seed, backbone_id, category=category, federated=True,
                                   num_patches=sum(p.num_patches for p in accepted),
                                   num_train_images=sum(p.num_images for p in accepted),
                                   resize=config.data.resize, crop=config.data.crop)
