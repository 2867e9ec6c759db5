"""The research commands of `fedpatch`: `sweep` and `study`.

They reach the product's command line through the "fedpatch.commands" entry point
(pyproject.toml), so experiments/app/ never imports this room; here we import the product's
helpers (config checking, override parsing), never the other way round.
"""

from __future__ import annotations

import argparse
from typing import Callable

from experiments.app.cli import _config, _overrides


def cmd_sweep(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    _config(args, overrides)  # a bad config fails before torch, flwr and ray are imported
    from experiments.research.sweeps import run_sweep

    return run_sweep(args, overrides)


def cmd_study(args: argparse.Namespace) -> int:
    from experiments.research.study import STUDIES
    from patchcore.errors import ConfigError

    if args.name not in STUDIES:
        raise ConfigError(f"study {args.name!r} is unknown; valid: {', '.join(STUDIES)}")
    overrides = _overrides(args)
    _config(args, overrides)
    from experiments.research.study.runner import run_study

    return run_study(args, overrides)


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `sweep` and `study` to the `fedpatch` subcommands; `common` adds --config, --set, ..."""
    sw = sub.add_parser("sweep", help="privacy / encoding / poisoning / ratio sweep on features extracted once")
    sw.add_argument("kind", choices=("privacy", "encoding", "poisoning", "ratio"))
    common(sw)
    sw.add_argument("--epsilons", nargs="+", metavar="EPS",
                    help="privacy: ε values (inf allowed); default 0.5 1 2 4 8 inf")
    sw.add_argument("--keep-banks", action="store_true", help="keep each variant's global banks (federations/NN/)")
    sw.set_defaults(func=cmd_sweep)
    st = sub.add_parser("study", help="a research question in one command: report.md with paired bootstrap CIs")
    st.add_argument("name", metavar="NAME",
                    help="parity, shift, unified, factories, ratio, backbones, padim, clipping, dp_padim")
    common(st)
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    st.add_argument("--levels", nargs="+", metavar="LEVEL",
                    help="the studied variable's values: shift conditions (e.g. severe geometric), factory counts, "
                         "coreset ratios, clipping quantiles (default: the study's full grid)")
    st.add_argument("--backbones", nargs="+", metavar="NAME[=WEIGHTS]",
                    help="backbones study: which (default: every one whose weights are at hand)")
    st.set_defaults(func=cmd_study)
