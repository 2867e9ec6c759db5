"""Run one study: its folder, manifest, shared cache; the study module does the rest.

Every study writes results/study-NAME-*/ with report.md (findings first, tables, plots),
runs.csv, summary.csv, differences.csv (paired bootstrap CIs), its own tables and manifest.json.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from typing import Any

from experiments.app.runs import Manifest, new_run_dir, write_config
from experiments.research.study import STUDIES
from experiments.research.study.core import Study
from federated.config import ExperimentConfig
from patchcore.config import load_config
from patchcore.errors import ConfigError


def run_study(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.name not in STUDIES:
        raise ConfigError(f"study {args.name!r} is unknown; valid: {', '.join(STUDIES)}")
    config = load_config(args.config, ExperimentConfig, overrides)
    out = new_run_dir(config.output_dir, f"study-{args.name}", args.out)
    write_config(out, config)
    manifest = Manifest(out, config, f"study-{args.name}")
    manifest.write(status="running", seeds=list(args.seeds))
    options = {"backbones": getattr(args, "backbones", None) or None, "levels": getattr(args, "levels", None) or None}
    study = Study(args.name, config, args.seeds, out, not args.quiet, options)
    module = importlib.import_module(f"experiments.research.study.{args.name}")
    start = time.time()
    module.run(study)
    study.tick("study", time.time() - start)
    if study.own_cache:
        shutil.rmtree(out / "features", ignore_errors=True)
    shutil.rmtree(out / "replays", ignore_errors=True)  # per-federation reports: summarised in the CSVs
    manifest.data["timings_s"].update(study.timings)
    manifest.write(status="complete", runs=len(study.results.runs))
    print((out / "report.md").read_text().split("## Setup")[0].strip())
    print(f"\nreport: {out / 'report.md'}")
    return 0
