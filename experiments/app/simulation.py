"""Run the federation from Python: the same ClientApp and ServerApp, on Flower's Ray simulation.

`run_federation` is what sweeps and `fedpatch compare` call. Flower 1.41's `run_simulation` takes
no run config (only `flwr run` does), so the apps are built with the run config baked in
(`build_client_app(defaults)`, `build_server_app(defaults)`); Ray pickles them into its workers.
One simulated supernode per factory; Ray gives each client actor `client_cpus`/`client_gpus`.

Ray is always shut down before returning, also on errors, and every process the run started
(Ray's GCS, raylet, worker actors) is waited for, so a sweep or a pytest session does not
accumulate them; the environment variable Flower changes (PYTHONPATH) is restored.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from clients.app import build_client_app
from federated.config import ExperimentConfig
from federated.plan import DRIVER_KEY
from federated.server_logic import load_received
from patchcore.config import load_config
from patchcore.errors import ConfigError, FedpatchError
from server.app import build_server_app

log = logging.getLogger("fedpatch.simulation")


class FederationError(FedpatchError):
    """The simulated federation did not complete (see federation.json for what happened)."""


def backend_config(config: ExperimentConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: resources per client actor, and a Ray cluster to join when
    federation.ray_address or RAY_ADDRESS names one (otherwise Ray starts a local instance)."""
    f = config.federation
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": float(f.client_cpus), "num_gpus": float(f.client_gpus)}}
    address = f.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        backend["init_args"] = {"address": address}
    return backend


def check_placeable(config: ExperimentConfig, cpus: int | None = None, gpus: int | None = None) -> None:
    """Fail fast, naming the key, when a local Ray could never place one client: Ray would
    otherwise leave the server waiting for replies until its round timeout. (A Ray cluster,
    federation.ray_address, is checked by Ray itself.)"""
    f = config.federation
    if f.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if f.client_gpus > gpus:
        raise ConfigError(f"federation.client_gpus = {f.client_gpus:g} but this machine has "
                          f"{gpus} GPU(s): Ray could not place a single client; set it to 0 "
                          f"(or at most {gpus})")
    if f.client_cpus > cpus:
        raise ConfigError(f"federation.client_cpus = {f.client_cpus:g} but this machine has "
                          f"{cpus} CPU(s): Ray could not place a single client; set it to at most {cpus}")


def run_config(config_path: str | Path, overrides: dict[str, Any], run_dir: str | Path,
               resume_from: str | Path | None = None) -> dict[str, str]:
    """The run config both apps read, with absolute paths (Ray workers may start elsewhere)."""
    settings = {"config": str(Path(config_path).expanduser().resolve()),
                "overrides": json.dumps(overrides or {}, sort_keys=True),
                "run-dir": str(Path(run_dir).expanduser().resolve()),
                DRIVER_KEY: "ray"}
    if resume_from:
        settings["resume-from"] = str(Path(resume_from).expanduser().resolve())
    return settings


def shutdown_ray() -> None:
    """Stop the Ray instance this process started (or disconnect from a cluster it joined)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def _descendant_processes(root: int | None = None) -> list[psutil.Process]:
    """The live (non-zombie) descendants of `root` (default: this process); [] when it is gone."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in children if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    """Still running (the same process: psutil compares its start time, so a pid reused by a
    stranger is not alive) and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(root: int | None = None) -> dict[int, float]:
    """{pid: start time} of the live (non-zombie) descendants of `root` (default: this process)."""
    found = {}
    for process in _descendant_processes(root):
        try:
            found[process.pid] = process.create_time()
        except psutil.Error:  # exited meanwhile
            pass
    return found


class ProcessWatch:
    """Remembers every process this one starts while a simulation runs (Ray's GCS, raylet and
    worker actors), so that they can be waited for afterwards: after `ray.shutdown()` the
    workers outlive the raylet by a few seconds, no longer as our descendants."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.seen: dict[int, psutil.Process] = {}
        self._before: dict[int, psutil.Process] = {}  # children that existed before: not ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _poll(self, interval_s: float) -> None:
        while not self._stop.is_set():
            # psutil.Process equality is pid + start time: a reused pid is a new process
            self.seen.update({p.pid: p for p in _descendant_processes()
                              if self._before.get(p.pid) != p})
            self._stop.wait(interval_s)

    def __enter__(self) -> "ProcessWatch":
        self._before = {p.pid: p for p in _descendant_processes()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def survivors(self) -> list[int]:
        return [pid for pid, process in self.seen.items() if _alive(process)]

    def reap(self, timeout_s: float = 15.0) -> list[int]:
        """Wait up to `timeout_s` for the seen processes to exit, then kill what is left (same
        pid and start time: never a stranger that reused a pid); returns the killed pids."""
        deadline = time.monotonic() + timeout_s
        while (left := self.survivors()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            try:
                self.seen[pid].kill()  # psutil checks the pid was not reused before signalling
            except psutil.Error:
                pass
        return left


def run_federation(config_path: str | Path, overrides: dict[str, Any], run_dir: str | Path,
                   verbose: bool = False, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Run one federation (train round, aggregation, evaluate round) and return the parsed
    run_dir/federated/federation.json; the global banks are in run_dir/federated/banks/.
    `resume_from`: an earlier run folder whose saved payloads are reused (those factories are
    not asked to train again)."""
    from flwr.simulation import run_simulation

    config = load_config(config_path, ExperimentConfig, overrides)  # fail before Ray starts
    check_placeable(config)
    if resume_from:
        load_received(resume_from, config)  # nothing to resume, or other settings: fail now
    settings = run_config(config_path, overrides, run_dir, resume_from)
    report_path = Path(settings["run-dir"]) / "federated" / "federation.json"
    report_path.unlink(missing_ok=True)  # never return a previous run's report
    saved_pythonpath = os.environ.get("PYTHONPATH")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's per-run "tip" warning
    quiet = _DropDeprecationNotice()
    if not verbose:
        logging.getLogger("flwr").addFilter(quiet)
    watch = ProcessWatch()
    try:
        with watch:
            run_simulation(server_app=build_server_app(settings),
                           client_app=build_client_app(settings),
                           num_supernodes=config.federation.num_factories,
                           backend_config=backend_config(config),  # type: ignore[arg-type]
                           verbose_logging=verbose)
    except SystemExit as exc:  # Flower exits the process on some setup errors
        raise FederationError(f"the Flower simulation stopped (exit code {exc.code}); "
                              f"run with verbose=True for Flower's log") from None
    except Exception:
        if report_path.is_file():  # the ServerApp failed and said why in its report
            _read_report(report_path)
        raise
    finally:
        logging.getLogger("flwr").removeFilter(quiet)
        shutdown_ray()
        if killed := watch.reap():
            log.warning("killed %d Ray process(es) still alive 15 s after shutdown: %s",
                        len(killed), killed)
        if saved_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_pythonpath
    report = _read_report(report_path)
    report["ray_processes"] = sorted(watch.seen)  # every process this run started (all gone now)
    return report


class _DropDeprecationNotice(logging.Filter):
    """Flower 1.41 warns on every `run_simulation` call that it prefers `flwr run`; both are
    supported here (README), so the notice is noise in `fedpatch compare`'s output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated feature" not in record.getMessage().lower()


def _read_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FederationError(f"the federation wrote no report ({path}); the server did not run")
    report = json.loads(path.read_text())
    if report.get("status") != "complete":
        raise FederationError(f"the federation did not complete: {report.get('status')} "
                              f"(details in {path})")
    return report
