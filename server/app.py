"""The Flower ServerApp: a thin adapter from Flower's Grid to `federated.rounds.run_rounds`.

The rounds (identify, train, aggregate, evaluate), the report and every decision live in
federated/rounds.py; this file only moves protocol records (federated/protocol.py) over the
Grid. An error reply is mapped to the node its message was *sent to* (by the message id it
answers), because the SuperLink itself answers for a SuperNode that died (its sender is then the
SuperLink, not the node). The server holds no images and needs no data root: the sites say what
they have. It reads the run config: "config" (YAML), the flat keys of [tool.flwr.app.config],
"overrides", "run-dir" (an absolute folder on the machine that runs the ServerApp: the
SuperLink's), "resume-from" (an earlier run folder whose received payloads are reused) and
"site-nodes" (JSON {factory: node id}: which registered node may speak for each factory).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from federated.config import ExperimentConfig, FederationConfig
from federated.plan import DRIVER_KEY, experiment_config
from federated.protocol import Failure, Records, from_flower, to_flower
from federated.rounds import run_rounds
from patchcore.errors import ConfigError

log = logging.getLogger("fedpatch.server")
POLL_S = 1.0


class GridTransport:
    """federated.rounds.Transport over a Flower Grid (simulation or deployment)."""

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid, self.poll_s = grid, poll_s

    def node_ids(self) -> list[int]:
        return [int(n) for n in self.grid.get_node_ids()]

    def exchange(self, kind: str, requests: Mapping[int, Records],
                 timeout_s: float) -> dict[int, Records | Failure]:
        messages = {node: Message(to_flower(records), dst_node_id=node, message_type=kind)
                    for node, records in requests.items()}
        accepted = set(self.grid.push_messages(list(messages.values())))
        out: dict[int, Records | Failure] = {}
        pending: dict[str, int] = {}
        for node, message in messages.items():
            if message.metadata.message_id in accepted:
                pending[message.metadata.message_id] = node
            else:
                out[node] = Failure("the SuperLink did not accept the message for this node")
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    out[node] = Failure(reply.error.reason or f"error code {reply.error.code}")
                else:
                    try:
                        out[node] = from_flower(reply.content)
                    except Exception as exc:  # a malformed reply is that node's failure
                        out[node] = Failure(f"unreadable reply: {type(exc).__name__}: {exc}")
            if pending:
                time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        return out


def refuse_unplaceable(config: ExperimentConfig, settings: Mapping[str, Any]) -> None:
    """Under `flwr run`, Flower (not fedpatch) places the clients: settings fedpatch could not
    honour there are refused with the Flower option to use instead, never silently ignored."""
    if settings.get(DRIVER_KEY):
        return
    default, f = FederationConfig(), config.federation
    options = {"client_cpus": "options.backend.client-resources.num-cpus",
               "client_gpus": "options.backend.client-resources.num-gpus",
               "ray_address": "a Ray cluster for the local SuperLink"}
    for key, instead in options.items():
        if getattr(f, key) != getattr(default, key):
            raise ConfigError(f"federation.{key} is not honoured under `flwr run` (Flower places "
                              f"the clients there): remove it and set {instead} in the "
                              f"federation's configuration, or use `fedpatch federate`")


def run_server(grid: Grid, context: Context, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The whole federation through `grid`; returns the report (also in federation.json)."""
    settings = {**defaults, **dict(context.run_config)}
    config, run_dir = experiment_config(settings)
    if run_dir is None or not run_dir.is_absolute():
        raise ConfigError(f"run config 'run-dir' must be an absolute folder (got {str(run_dir or '')!r}): "
                          f"the ServerApp writes it on the SuperLink's machine, from the SuperLink's "
                          f"working directory")
    refuse_unplaceable(config, settings)
    resume_from = str(settings.get("resume-from", "") or "") or None
    return run_rounds(GridTransport(grid), config, Path(run_dir), resume_from,
                      bindings=site_bindings(settings.get("site-nodes", "")))


def site_bindings(text: Any) -> dict[str, int] | None:
    """The run config's "site-nodes": JSON {factory: node id} (the node each factory's registered
    key got); "" means no binding (the first node to claim a factory speaks for it)."""
    if not str(text or "").strip():
        return None
    try:
        value = json.loads(str(text))
        return {str(k): int(v) for k, v in value.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise ConfigError(f"run config 'site-nodes' must be a JSON object {{factory: node id}}, got {text!r}") from None


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to `defaults` (for `run_simulation`)."""
    baked = dict(defaults or {})
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, context, baked)
        except Exception as exc:
            log.error("fedpatch federation failed: %s: %s", type(exc).__name__, exc)
            raise

    return server


app = build_server_app()
