"""`fedpatch federate`: the federation alone (Flower on Ray), resumable.

Writes RUN/federated/banks/<category>.safetensors, RUN/federated/federation.json (who sent what,
who failed or stayed silent and why, what was rejected, the poisoning screen, ε/δ/σ),
RUN/federated/payloads/ (what the server received: `--resume RUN` reuses it, so factories that
already delivered are not asked to extract again) and RUN/manifest.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.app.reports import format_table
from experiments.app.runs import Manifest, new_run_dir, write_config
from experiments.app.simulation import check_placeable, run_federation
from federated.config import ExperimentConfig
from federated.plan import plan_factories
from federated.server_logic import load_received
from patchcore.config import load_config


def run_federate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    config = load_config(args.config, ExperimentConfig, overrides)
    check_placeable(config)
    plan_factories(config)  # the data are valid before anything is written
    if args.resume:
        load_received(args.resume, config)  # resumable with these settings, or one line why not
    run_dir = new_run_dir(config.output_dir, "federate", args.out)
    write_config(run_dir, config)
    manifest = Manifest(run_dir, config, "federate")
    manifest.write(status="running", resumed_from=args.resume)
    start = time.time()
    try:
        report = run_federation(args.config, overrides, run_dir, resume_from=args.resume)
    except Exception as exc:
        manifest.write(status=f"failed: {type(exc).__name__}")
        raise
    manifest.time("federation", time.time() - start)
    manifest.write(status="complete")
    rows = [{"factory": name, "bytes_sent": s.get("bytes_sent"), "upload_ratio": s.get("upload_ratio"),
             "resumed": "yes" if "resumed_from" in s else ""} for name, s in sorted(report["factories"].items())]
    print(format_table(rows, ("factory", "bytes_sent", "upload_ratio", "resumed")))
    for kind in ("failed", "missing", "refused", "rejected"):
        for entry in report.get(kind, []):
            print(f"{kind}: {entry.get('factory') or 'node ' + str(entry.get('node_id'))}: {entry['reason']}")
    for category, screen in sorted(report.get("poisoning", {}).items()):
        for reason in (screen.get("reasons") or {}).values():
            print(f"poisoning ({category}, {screen['mode']}): {reason}")
    print(f"banks: {run_dir / 'federated' / 'banks'}")
    return 0
