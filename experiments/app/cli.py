"""`fedpatch`: the command line. The only place where errors become one line and an exit code.

    fedpatch fit      --config C            fit one bank per category        -> results/fit-*/
    fedpatch evaluate --run RUN             metrics, ROC, overlays           -> RUN/evaluation-*/
    fedpatch predict  IMAGE... --bank B     score, threshold, decision, overlay
    fedpatch compare  --config C            federated vs centralized vs local -> results/compare-*/
    fedpatch federate --config C [--resume RUN]   the federation alone          -> results/federate-*/
    fedpatch deploy   --config C --site NAME=DIR ...   SuperLink + SuperNodes on loopback -> results/deploy-*/
    fedpatch sweep privacy|encoding|poisoning|ratio --config C
                                            cost of each protection, local coreset ratio -> results/sweep-*/
    fedpatch study NAME --config C [--seeds 0 1 2]
                                            parity|shift|unified|factories|ratio|backbones|padim|clipping
                                            -> results/study-*/
    fedpatch dashboard [RESULTS_DIR]        Streamlit dashboard over compare/fit runs
    fedpatch serve    BANK                  HTTP inspection API (POST /inspect) around one bank
    fedpatch config   [--config C] [--explain [--markdown]]   the resolved config, or every key explained
    fedpatch audit    --config C            what a curious server learns from an upload -> results/audit-*/

A command's config is read and checked before torch, flwr or ray load (a typo costs a fraction of a
second). A run that fails leaves its folder's manifest saying so ("failed" / "interrupted", the
line printed here, the wall time), or no folder at all if it failed before any work
(experiments/app/runs.py: `failures_recorded`).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from patchcore.errors import FedpatchError


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            from patchcore.errors import ConfigError

            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    if getattr(args, "data_root", None):
        out["data.root"] = args.data_root
    if getattr(args, "category", None):
        out["data.categories"] = list(args.category)
    return out


def _config(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The experiment config, read and validated with nothing heavier than yaml imported."""
    from federated.config import ExperimentConfig
    from patchcore.config import load_config

    return load_config(args.config, ExperimentConfig, overrides)


# What to change when a GPU runs out of memory, per command (every key named is a real config key;
# tests/test_cli_oom.py checks them). Commands without a config take --device.
OOM_HINTS = {
    "predict": "run with --device cpu",
    "serve": "run with --device cpu",
    "evaluate": "lower data.batch_size (--set data.batch_size=N), or run with --set device=cpu",
}
OOM_HINT = ("lower data.batch_size, set model.precision: float16 (the backbone) or "
            "model.coreset.precision: bfloat16 (the coreset matrix), or run with device: cpu")
OOM_FEDERATED = ", or raise federation.client_gpus (fewer clients share a GPU)"
FEDERATED_COMMANDS = ("compare", "federate")  # the commands that run clients as Ray actors


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, without importing torch: only a command that loaded it can
    raise one (the CLI checks configs before torch loads)."""
    torch = sys.modules.get("torch")
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                  if isinstance(k, type))
    return bool(kinds) and isinstance(exc, kinds)


def oom_line(exc: BaseException, command: str) -> str:
    """One line: which command ran out of GPU memory, torch's own first words, what to change."""
    text = (str(exc).strip().splitlines() or ["CUDA out of memory"])[0]
    brief = re.match(r"CUDA out of memory\.\s*Tried to allocate [\d.]+ \w+", text)
    detail = brief.group(0) if brief else (text if len(text) <= 160 else text[:157] + "...")
    hint = OOM_HINTS.get(command, OOM_HINT + (OOM_FEDERATED if command in FEDERATED_COMMANDS else ""))
    return f"error: CUDA out of memory during {command or 'the command'} ({detail}): {hint}"


def _outcome(exc: BaseException, command: str = "") -> tuple[str, str] | None:
    """(manifest status, the one line printed) for an exception that ends a command; None: none."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted"
    if isinstance(exc, SystemExit):
        return None if exc.code in (0, None) else ("failed", f"exit code {exc.code}")
    if isinstance(exc, FedpatchError):
        return "failed", f"error: {exc}"
    if is_cuda_oom(exc):
        return "failed", oom_line(exc, command)
    text = str(exc).strip().splitlines()
    return "failed", (f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)  # a bug: traceback follows


def cmd_fit(args: argparse.Namespace) -> int:
    config = _config(args, _overrides(args))  # first: a bad config is reported before torch loads
    from experiments.app.runs import Manifest, new_run_dir, write_config
    from patchcore.cache import FeatureCache
    from patchcore.data.sources import categories, data_root, load_records
    from patchcore.fitting import fit_category
    from patchcore.model import PatchCore

    root = data_root(config.data, config.seed)
    records = {c: load_records(config.data, root, c, config.threshold.holdout, config.seed)
               for c in categories(config.data, root)}  # validate all first
    model = PatchCore(config.model, device=config.device, seed=config.seed)  # backbone, layers, weights
    model.cache = FeatureCache.under(config.data, "central")
    run_dir = new_run_dir(config.output_dir, "fit", args.out)
    write_config(run_dir, config)
    manifest = Manifest(run_dir, config, "fit")
    manifest.write(status="running", data_root=str(root))
    banks = {}
    for category, recs in records.items():
        start = time.time()
        model, _ = fit_category(config, category, recs, progress=not args.quiet, model=model)
        path, _ = model.bank.save(run_dir / "banks" / category)
        manifest.time(f"fit.{category}", time.time() - start)
        banks[category] = {"path": str(path), "size": len(model.bank),
                           "threshold": model.bank.metadata.get("threshold")}
        print(f"{category}: bank {len(model.bank)} x {model.bank.dim} "
              f"from {model.bank.metadata['num_patches']} patches ({time.time() - start:.1f} s) -> {path}")
    manifest.write(status="complete", banks=banks)
    print(f"run folder: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from experiments.app.reports import METRIC_COLUMNS, flat_metrics, format_table, write_evaluation
    from experiments.app.runs import Manifest, new_run_dir
    from federated.config import ExperimentConfig
    from patchcore.config import load_config
    from patchcore.data.sources import data_root, load_records
    from patchcore.errors import BankFormatError
    from patchcore.fitting import evaluate_scored, score_records
    from patchcore.memory_bank import MemoryBank
    from patchcore.metrics import f1_max
    from patchcore.model import PatchCore

    run = Path(args.run)
    config = load_config(args.config or run / "config.yaml", ExperimentConfig, _overrides(args))
    bank_dir = Path(args.banks) if args.banks else run / "banks"
    bank_files = sorted(bank_dir.glob("*.safetensors"))
    if not bank_files:
        raise BankFormatError(f"no memory banks (*.safetensors) in {bank_dir}")
    wanted = set(config.data.categories) if args.category else None
    banks = {p.stem: MemoryBank.load(p) for p in bank_files if wanted is None or p.stem in wanted}
    root = data_root(config.data, config.seed)
    tests = {c: [r for r in load_records(config.data, root, c) if r.split == "test"] for c in banks}
    out = new_run_dir(run, "evaluation", args.out)
    manifest = Manifest(out, config, "evaluate")
    manifest.write(status="running")
    results = {}
    for category, bank in banks.items():
        model = PatchCore.from_bank(bank, device=config.device)
        scored = score_records(model, tests[category], config, progress=not args.quiet, desc=f"score {category}")
        metrics = evaluate_scored(scored, config, root, category)
        stored = bank.metadata.get("threshold")
        threshold = stored["value"] if stored else f1_max(scored.labels, scored.scores)[1]
        metrics["threshold_source"] = (
            f"{stored['method']} on {stored.get('details', {}).get('source', 'validation split')}"
            if stored else "f1-max on the test set (optimistic)")
        results[category] = (scored, metrics, float(threshold))
    summary = write_evaluation(out, results, config, overlays=args.overlays)
    manifest.write(status="complete", banks={c: str(bank_dir / f"{c}.safetensors") for c in banks})
    rows = [{"category": c, **flat_metrics(v)} for c, v in summary.items()]
    columns = ("category", *METRIC_COLUMNS, *(("auc_spro_0.05",) if any("auc_spro_0.05" in r for r in rows) else ()))
    print(format_table(rows, columns))
    for category, metrics in summary.items():
        if category == "mean":
            continue
        print(f"{category}: F1-max {metrics['f1_max']:.3f} vs {metrics['f1_flag_all']:.3f} for rejecting every "
              f"image; threshold {metrics['threshold']:.4g} ({metrics['threshold_source']})")
        for metric, reason in (metrics.get("skipped") or {}).items():
            print(f"{category}: {metric} skipped: {reason}")
    print(f"evaluation folder: {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from experiments.app.predict import predict_images

    return predict_images(args)


def _port(text: str) -> int:
    """argparse type: a TCP port, 1-65535 (uvicorn hangs on an out-of-range one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer port, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1-65535, got {port}")
    return port


def _check_bindable(host: str, port: int) -> None:
    """One line instead of uvicorn's log and traceback when the address is taken or invalid."""
    import socket

    from patchcore.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror} (choose another --port)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from experiments.app.serve import create_app

    if args.max_upload_mb <= 0:
        from patchcore.errors import ConfigError

        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    app = create_app(args.bank, device=args.device, threshold=args.threshold,
                     max_upload_bytes=int(args.max_upload_mb * 2**20))  # a bad bank fails here, in one line
    _check_bindable(args.host, args.port)
    import uvicorn

    print(f"serving {args.bank} on http://{args.host}:{args.port} (docs: /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# compare, federate, sweep and deploy check their config here (sweep: research/commands.py), before importing their
# modules (which import torch, flwr and ray), and then read it again themselves.
def cmd_federate(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    _config(args, overrides)
    from experiments.app.federate import run_federate

    return run_federate(args, overrides)


def cmd_compare(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    _config(args, overrides)
    from experiments.app.compare import run_compare

    return run_compare(args, overrides)


def cmd_deploy(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    _config(args, {**overrides, "federation.num_factories": len(args.site)})  # one factory per --site
    from experiments.app.deploy import run_deploy

    return run_deploy(args, overrides)


def cmd_audit(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    _config(args, overrides)  # a bad config fails before torch loads
    from experiments.app.audit import run_audit

    return run_audit(args, overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved config as YAML (defaults without --config), or --explain: every key (dotted),
    its type, default (or the file's value), allowed values and what it does."""
    from federated.config import ExperimentConfig
    from patchcore.config import apply_overrides, build, explain, format_explain, load_config, to_dict

    overrides = _overrides(args)
    config = (load_config(args.config, ExperimentConfig, overrides) if args.config
              else build(ExperimentConfig, apply_overrides({}, overrides)) if overrides else None)
    if args.explain or args.markdown:
        table = format_explain(explain(ExperimentConfig, config), markdown=args.markdown,
                               value_header="value" if config is not None else "default")
        if args.markdown:
            table = (f"# Configuration reference\n\nEvery key of a fedpatch config (YAML, dotted keys as in "
                     f"`--set KEY=VALUE`), its type, default, allowed values and what it does.\n"
                     f"Generated by `fedpatch config --explain --markdown > configs/REFERENCE.md` from the "
                     f"models in patchcore/config.py and federated/config.py; a test keeps it current.\n\n{table}")
        print(table, end="")
    else:
        print(yaml.safe_dump(to_dict(config or ExperimentConfig()), sort_keys=False), end="")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from experiments.app.dashboard.launch import serve

    return serve(args.results_dir, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpatch",
                                     description="Federated PatchCore for industrial anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
        p.add_argument("--config", required=config_required, help="YAML config (see configs/)")
        p.add_argument("--data-root", help="dataset folder (overrides data.root)")
        p.add_argument("--category", action="append", help="only this category (repeatable)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. model.coreset.ratio=0.05")
        p.add_argument("--out", help="output folder (must be new or empty)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = sub.add_parser("fit", help="fit one memory bank per category")
    common(fit)
    fit.set_defaults(func=cmd_fit)
    ev = sub.add_parser("evaluate", help="score the test images of a fitted run")
    common(ev, config_required=False)
    ev.add_argument("--run", required=True, help="a run folder written by `fedpatch fit`")
    ev.add_argument("--banks", help="folder of banks (default: RUN/banks)")
    ev.add_argument("--overlays", type=int, default=8, help="heatmap overlays per category (0: none)")
    ev.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("predict", help="score images with a bank: score, threshold, decision, overlay")
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--bank", required=True, help="a .safetensors bank (its .json beside it)")
    pr.add_argument("--threshold", type=float, help="decision threshold (default: the bank's calibrated one)")
    pr.add_argument("--out", help="folder for overlays (must be new or empty)")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=cmd_predict)
    cmp = sub.add_parser("compare", help="federated vs centralized vs local-only PatchCore on the same images")
    common(cmp)
    cmp.set_defaults(func=cmd_compare)
    fed = sub.add_parser("federate", help="run the federation only (Flower on Ray): global banks + federation.json")
    common(fed)
    fed.add_argument("--resume", metavar="RUN", help="reuse the payloads an earlier run saved (RUN/federated/payloads)")
    fed.set_defaults(func=cmd_federate)
    dep = sub.add_parser("deploy", help="a real deployment on loopback: SuperLink + one SuperNode per site "
                         "folder (TLS, node authentication), `flwr run`, every process stopped")
    common(dep)
    dep.add_argument("--site", action="append", required=True, metavar="NAME=FOLDER",
                     help="a site and its own image folder (repeat per site)")
    dep.set_defaults(func=cmd_deploy)
    aud = sub.add_parser("audit", help="privacy audit: what a curious server learns from one factory's upload "
                         "(inversion, membership, attribution) under each payload setting")
    common(aud)
    aud.add_argument("--factory", type=int, default=0, help="the victim factory's id (default 0)")
    aud.add_argument("--settings", nargs="+", metavar="FAMILY", help="payload settings to audit (default all): "
                     "config fp32 fp16 int8 projection clip dp padim dp_padim")
    aud.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 64.0, 512.0, 4096.0],
                     help="per-vector DP epsilons (dp)")
    aud.add_argument("--image-epsilons", nargs="+", type=float, default=[1.0, 8.0],
                     help="per-image DP-PaDiM epsilons (dp_padim)")
    aud.add_argument("--projections", nargs="+", type=int, default=[256, 128], help="shared projection sizes")
    aud.add_argument("--clip-norm", type=float, help="clip radius of the clip and DP settings (default: "
                     "model.transform.clip_norm, else the 90th percentile of the attacker's own embedding norms, "
                     "pooled)")
    aud.add_argument("--attacker", nargs="+", choices=("other-product", "same-product", "synthetic"),
                     default=["other-product", "same-product", "synthetic"], help="the attacker's own images")
    aud.add_argument("--decoder", nargs="+", choices=("ridge", "mlp"), default=["ridge", "mlp"],
                     help="inversion decoders")
    aud.add_argument("--window", type=int, default=8, help="pixels under a grid cell: the window centred on it (8)")
    aud.add_argument("--max-candidates", type=int, default=200, help="membership images per class, at most")
    aud.add_argument("--max-attacker-rows", type=int, default=60000, help="attacker training patches, at most")
    aud.add_argument("--mlp-epochs", type=int, default=6, help="epochs of one MLP decoder's training")
    aud.add_argument("--mlp-seconds", type=float, default=300.0, help="safety cap on one MLP decoder's training")
    aud.add_argument("--synthetic-images", type=int, default=24, help="synthetic attacker images per product")
    aud.set_defaults(func=cmd_audit)
    cfg = sub.add_parser("config", help="print the resolved config, or --explain: every key, its type, "
                         "default, allowed values and what it does")
    cfg.add_argument("--config", help="a YAML config: its values instead of the defaults")
    cfg.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    cfg.add_argument("--explain", action="store_true", help="a table of every key instead of the YAML")
    cfg.add_argument("--markdown", action="store_true", help="the table as Markdown (configs/REFERENCE.md)")
    cfg.set_defaults(func=cmd_config)
    for plugin in _command_plugins():  # research commands (sweep, study): experiments/research/commands.py
        plugin(sub, common)
    dash = sub.add_parser("dashboard", help="Streamlit dashboard: per-image decisions, heatmaps, federation view")
    dash.add_argument("results_dir", nargs="?", default="results", metavar="RESULTS_DIR",
                      help="folder of runs, or one run folder (default: results)")
    dash.add_argument("--port", type=_port, default=8501)
    dash.set_defaults(func=cmd_dashboard)
    srv = sub.add_parser("serve", help="HTTP inspection API around one bank: POST /inspect, GET /health, /model, /docs")
    srv.add_argument("bank", help="a .safetensors bank (its .json beside it)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000)
    srv.add_argument("--threshold", type=float, help="decision threshold (default: the bank's calibrated one)")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB")
    srv.set_defaults(func=cmd_serve)
    return parser


def _command_plugins() -> list:
    """The `register(subparsers, common)` functions of the installed "fedpatch.commands" entry
    points (pyproject.toml). The research room adds its commands this way, so the product never
    imports research code (imports flow one way: research -> product)."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group="fedpatch.commands"), key=lambda ep: ep.name)]


def main(argv: Sequence[str] | None = None) -> int:
    from experiments.app.runs import failures_recorded

    args = build_parser().parse_args(argv)
    describe = functools.partial(_outcome, command=args.command)
    try:
        with failures_recorded(describe):  # a failed run's folder says so, or goes if empty
            return args.func(args)
    except FedpatchError as exc:
        print(_outcome(exc)[1], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a GPU out of memory is a setting to change, not a bug: one line
        if not is_cuda_oom(exc):
            raise
        print(oom_line(exc, args.command), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
