"""`fedpatch deploy`: a real Flower deployment on this machine, as a factory's IT team runs one.

One SuperLink and one SuperNode per site, each a separate OS process on loopback, each SuperNode
pointed at its own image folder (`--node-config "data-path='...' factory='...'"`); TLS with a
certificate authority made here (the `cryptography` package, a Flower dependency); SuperNode
authentication (flwr 1.41: only nodes whose public key was registered with `flwr supernode
register` may join, and each factory name is bound to the node its key got: the run config's
"site-nodes" makes the server refuse any other node claiming it); the federation started with
`flwr run`, its log streamed, its final status
read back with `flwr ls`, so a ServerApp failure ends in one line and a non-zero exit (plain
`flwr run` exits 0 then). Every process started is stopped, by PID: SuperLink, SuperNodes and
whatever they spawned (Flower's executors and ClientApp processes), also when the run fails.

Layout of RUN/deploy/: certs/ (ca.crt, server.pem/key), keys/ (one OpenSSH EC key pair per
site), logs/ (one log per process), homes/ (a FLWR_HOME per process), superlink.db. Results are
written by the ServerApp, i.e. on the SuperLink's machine, into RUN/federated/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from experiments.app.local_server import free_port
from experiments.app.simulation import ProcessWatch
from federated.config import ExperimentConfig
from federated.site import folder_shard
from patchcore.config import load_config
from patchcore.errors import ConfigError, FedpatchError

PROJECT = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml + packages
CONNECTION = "fedpatch"


class DeployError(FedpatchError):
    """The deployment could not start, or its federation did not complete."""


@dataclass
class SiteSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "SiteSpec":
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--site expects NAME=FOLDER, got {text!r}")
        return cls(name.strip(), Path(path.strip()).expanduser().resolve())


def _bin(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink, ...)."""
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else name


def make_certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpatch deployment CA")])

    def build(subject, public_key, extensions):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=30)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(ca_key, hashes.SHA384())

    ca = build(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=0), True)])
    server = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), key.public_key(), [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(server.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair for one SuperNode (what `flwr supernode register` takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


@dataclass
class Deployment:
    """SuperLink + SuperNodes as OS processes; `run()` submits the federation and waits."""

    config_path: Path
    sites: list[SiteSpec]
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    echo: IO[str] | None = None  # where the run's log is streamed (None: only to logs/flwr-run.log)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    bindings: dict[str, int] = field(default_factory=dict)  # factory -> node id of its registered key

    def __post_init__(self) -> None:
        self.work = self.run_dir / "deploy"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        bin_dir = str(Path(sys.executable).parent)  # Flower starts its own helpers by name
        self.env["PATH"] = bin_dir + os.pathsep + self.env.get("PATH", "")
        self.env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
        self._watch = ProcessWatch()
        self._logs: list[IO[bytes]] = []

    # -- processes --------------------------------------------------------------------------
    def _env(self, name: str) -> dict[str, str]:
        """The environment of one process (or of the `flwr` CLI, "cli"): its own FLWR_HOME."""
        home = self.work / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return {**self.env, "FLWR_HOME": str(home)}

    def _spawn(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "ab")
        self._logs.append(log)
        cwd.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(args, cwd=cwd, env=self._env(name),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own group: stopped as one
        self.processes[name] = process
        return process

    def _cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`flwr ...` against this deployment's SuperLink (connection "fedpatch")."""
        return subprocess.run([_bin("flwr"), *args], cwd=PROJECT, env=self._env("cli"), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal one process group we started (SuperLink or a site's SuperNode), by its PID."""
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> list[int]:
        """Stop every process this deployment started (SuperNodes first), then anything they
        spawned that outlived them (an orphaned ClientApp); returns the pids killed at the end."""
        for name in [n for n in self.processes if n != "superlink"] + ["superlink"]:
            self.stop_process(name)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._watch.__exit__(None, None, None)
        killed = self._watch.reap(timeout_s=5.0)
        for log in self._logs:
            log.close()
        return killed

    # -- set-up -----------------------------------------------------------------------------
    def _wait_port(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise DeployError(f"the SuperLink exited (code {self.processes['superlink'].returncode}); "
                                  f"see {self.work / 'logs' / 'superlink.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise DeployError(f"the SuperLink did not listen on 127.0.0.1:{self.port} within {timeout_s:g} s")

    def start(self) -> None:
        """Certificates, SuperLink, node registration, SuperNodes; waits until all are online."""
        start = time.perf_counter()
        self._watch.__enter__()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        certs = make_certificates(self.work / "certs")
        self._spawn("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile",
            str(certs["cert"]), "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(self.port), "--database", str(self.work / "superlink.db")], self.work / "superlink")
        (Path(self._env("cli")["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{certs["ca"]}"\n')
        self._wait_port()
        for k, site in enumerate(self.sites):
            private, public = make_node_key(self.work / "keys", f"{k}-{site.name}")
            done = self._cli("supernode", "register", str(public), CONNECTION)
            found = re.search(r"SuperNode (\d+) registered", done.stdout + done.stderr)
            if done.returncode != 0 or not found:
                raise DeployError(f"registering site {site.name} failed: {_last_line(done)}")
            self.bindings.setdefault(site.name, int(found.group(1)))  # the first key of a name binds it
            node_config = f"data-path='{site.path}' factory='{site.name}'"
            self._spawn(f"site-{site.name}" + (f"-{k}" if f"site-{site.name}" in self.processes else ""), [
                _bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(certs["ca"]), "--auth-supernode-private-key", str(private),
                "--port", str(free_port()), "--node-config", node_config], self.work / f"site-{site.name}")
        self._wait_online(len(self.sites))
        self.timings["start_s"] = time.perf_counter() - start

    def _wait_online(self, expected: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise DeployError(f"{name} exited (code {process.returncode}); see "
                                      f"{self.work / 'logs' / (name + '.log')}")
            listed = self._cli("supernode", "list", CONNECTION, "--format", "json", timeout=30)
            nodes = _json_out(listed.stdout).get("nodes", [])
            if sum(1 for n in nodes if str(n.get("status", "")).startswith("online")) >= expected:
                return
            time.sleep(1.0)
        raise DeployError(f"not all {expected} SuperNodes came online within {timeout_s:g} s")

    # -- the run ----------------------------------------------------------------------------
    def submit(self) -> int:
        """Start the federation with `flwr run`; returns its run id."""
        settings = {"config": str(self.config_path), "run-dir": str(self.run_dir),
                    "overrides": json.dumps(self.overrides, sort_keys=True),
                    "site-nodes": json.dumps(self.bindings, sort_keys=True)}
        if any("'" in v for v in settings.values()):
            raise ConfigError(f"a path or value holds a single quote, which Flower's --run-config cannot "
                              f"carry: {settings}")
        run_config = " ".join(f"{k}='{v}'" for k, v in settings.items())  # TOML literal strings
        done = self._cli("run", str(PROJECT), CONNECTION, "--run-config", run_config, "--format", "json")
        answer = _json_out(done.stdout)
        if done.returncode != 0 or not answer.get("success"):
            (self.work / "logs" / "flwr-run.log").write_text(done.stdout + done.stderr)
            why = answer.get("error-message") or answer.get("error") or _last_line(done)
            raise DeployError(f"`flwr run` was refused: {why} (see {self.work / 'logs' / 'flwr-run.log'})")
        self._submitted = time.perf_counter()
        return int(answer["run-id"])

    def wait(self, run_id: int) -> dict[str, Any]:
        """Stream the run's log until it ends; its report, or DeployError naming why it failed."""
        with open(self.work / "logs" / "flwr-run.log", "w") as log:
            stream = subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], cwd=PROJECT,
                                      env=self._env("cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            for line in stream.stdout:  # type: ignore[union-attr]
                log.write(line)
                if self.echo is not None:
                    self.echo.write(line)
            stream.wait()
        self.timings["run_s"] = time.perf_counter() - self._submitted
        status, details = self.status(run_id)
        report_path = self.run_dir / "federated" / "federation.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if status != "finished:completed" or report.get("status") != "complete":
            why = report.get("status") or details or status
            raise DeployError(f"the federation did not complete ({status}): {why}; log: "
                              f"{self.work / 'logs' / 'flwr-run.log'}")
        return report

    def status(self, run_id: int) -> tuple[str, str]:
        done = self._cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=30)
        try:
            run = _json_out(done.stdout)["runs"][0]
            return str(run.get("status", "")), str(run.get("status-details", ""))
        except (KeyError, IndexError):
            return "unknown", _last_line(done)

    def run(self) -> dict[str, Any]:
        return self.wait(self.submit())


def _json_out(text: str) -> dict[str, Any]:
    """The JSON object a `flwr ... --format json` command printed (after any other lines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                value = json.loads("\n".join(lines[i:]))
                return value if isinstance(value, dict) else {}
            except json.JSONDecodeError:
                continue
    return {}


def _last_line(done: subprocess.CompletedProcess) -> str:
    text = (done.stderr or "") + (done.stdout or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def check_sites(config: ExperimentConfig, sites: list[SiteSpec]) -> dict[str, dict[str, int]]:
    """Each site's folder read as its SuperNode will read it (one line naming a bad one), before
    any process starts; {site: {"train": n, "test": n}}."""
    if len({s.name for s in sites}) != len(sites):
        raise ConfigError("--site names must be distinct")
    counts = {}
    for site in sites:
        shard, _ = folder_shard(config, site.path, site.name)
        counts[site.name] = {"train": len(shard.train), "test": len(shard.test)}
    return counts


def run_deploy(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """The `fedpatch deploy` command."""
    from experiments.app.reports import format_table
    from experiments.app.runs import Manifest, new_run_dir, write_config

    sites = [SiteSpec.parse(s) for s in args.site]
    overrides = {**overrides, "federation.num_factories": len(sites)}
    config = load_config(args.config, ExperimentConfig, overrides)
    counts = check_sites(config, sites)
    run_dir = new_run_dir(config.output_dir, "deploy", args.out).resolve()
    write_config(run_dir, config)
    manifest = Manifest(run_dir, config, "deploy")
    manifest.write(status="running", sites={s.name: {"path": str(s.path), **counts[s.name]} for s in sites})
    deployment = Deployment(Path(args.config).resolve(), sites, run_dir, overrides,
                            echo=None if args.quiet else sys.stdout)
    try:
        deployment.start()
        report = deployment.run()
    except BaseException as exc:
        manifest.write(status=f"failed: {type(exc).__name__}")
        raise
    finally:
        deployment.stop()
    for phase, seconds in deployment.timings.items():
        manifest.time(phase, seconds)
    manifest.write(status="complete")
    rows = [{"site": name, "train_images": s.get("train_images"), "bytes_sent": s.get("bytes_sent"),
             "train_s": s.get("seconds", {}).get("total_s"),
             "backbone_load_s": s.get("seconds", {}).get("backbone_load_s")}
            for name, s in sorted(report["factories"].items())]
    print(format_table(rows, ("site", "train_images", "bytes_sent", "train_s", "backbone_load_s")))
    print(f"results: {run_dir / 'federated'} (written by the ServerApp, beside the SuperLink)")
    return 0
