"""One-shot device check: does this machine's GPU give fedpatch the right numbers, and how fast?

    python -m experiments.bench.gpu_check --out DIR [--quick] [--budget-s 450] [--features EMB.npy]
        [--mvtec-root DIR]
    make gpu-check OUT=DIR                                   (default OUT=results/gpu-check)

Steps, each in its own process with a timeout, each timed and recorded as ok, skipped (why) or
failed (the one-line error):
  environment  torch and CUDA versions, the device, its free/total memory
  cuda_tests   `pytest -m cuda tests/test_cuda.py tests/test_privacy.py` (junit XML + log in DIR)
  coreset_cpu  greedy coreset on the CPU (experiments/bench/gpu_coreset.py; real embeddings with
               --features, else a seeded clustered (N, 1024) set)
  coreset_gpu  the same rows on CUDA in fp32 and bf16, plus the full set: speed and radius ratios
  end_to_end   experiments/bench/patchcore.py on the shared hazelnut images (WRN50-2, weights
               none, --repeats 3; 1 with --quick): end-to-end fit+predict per image / backbone
               forward per image, on CUDA (on the CPU with --quick or without a GPU)
  federation   `fedpatch federate` on configs/default.yaml (sizes reduced), 4 factories sharing one
               GPU (federation.client_gpus 0.25): every client must report a CUDA device
The steps share an overall --budget-s (450 s: the check fits in 8 minutes on one GPU); a step is
given what is left of it at most, and skipped when too little is. Writes DIR/report.md (the table
of steps first), DIR/results.json and each step's log; files of an earlier check in DIR are
overwritten. Exit code 0 when no step failed (skips are fine), 1 otherwise. Without CUDA the GPU
steps are skipped, and report.md says so on its first lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STEPS = ("environment", "cuda_tests", "coreset_cpu", "coreset_gpu", "end_to_end", "federation")
RESERVE_S = 10.0  # kept back from the budget for writing the report
MIN_STEP_S = 15.0  # a step with less time than this left is skipped, not started
# (full, --quick) timeout of each process, in seconds; the budget caps them further
TIMEOUTS = {"environment": (60, 60), "cuda_tests": (150, 120), "coreset": (150, 60),
            "end_to_end": (150, 120), "federation": (240, 180)}
FEDERATION_FACTORIES = 4
RATIO_LINE = re.compile(r"end-to-end fit\+predict per image / backbone forward per image:\s*([0-9.]+)x"
                        r"(?:\s*\(([0-9.]+) ms vs ([0-9.]+) ms\))?")
STAGE_LINE = re.compile(r"^(decode \+ preprocess|backbone forward alone|extraction \(train\)|"
                        r"coreset selection|scoring \(test\))\s+([0-9.]+) s", re.M)


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | skipped | failed
    seconds: float = 0.0
    reason: str = ""  # why it was skipped
    error: str = ""  # why it failed, one line
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2)}
        out.update({k: v for k, v in (("reason", self.reason), ("error", self.error)) if v})
        return {**out, **self.numbers}


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _kill_tree(proc: subprocess.Popen) -> None:
    """The process, its group and every descendant seen before the kill (Ray's, too), by pid."""
    from experiments.app.simulation import descendants  # only on a timeout: it imports flwr

    pids = list(descendants(proc.pid))
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is ours alone
    except OSError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def run_process(cmd: list[str], timeout_s: float, log: Path,
                env: dict[str, str] | None = None) -> tuple[int | None, str, float]:
    """(exit code, or None when it ran past `timeout_s` and was killed; its output; seconds)."""
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc = None
    return rc, log.read_text(errors="replace"), time.monotonic() - start


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def probe_environment() -> dict[str, Any]:
    """What torch sees (run in a child process: the check itself never initialises CUDA)."""
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if info["cuda_available"]:
        free, total = torch.cuda.mem_get_info(0)
        info.update(device_count=torch.cuda.device_count(), device_name=torch.cuda.get_device_name(0),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    free_gib=round(free / 2**30, 2), total_gib=round(total / 2**30, 2),
                    cudnn=torch.backends.cudnn.version(), tf32_conv=bool(torch.backends.cudnn.allow_tf32),
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    return info


class Check:
    """The steps of one check, run in order within one time budget."""

    def __init__(self, out: Path, budget_s: float, quick: bool, features: str | None,
                 mvtec_root: str | None) -> None:
        self.out, self.budget_s, self.quick = out, budget_s, quick
        self.features, self.mvtec_root = features, mvtec_root
        self.start = time.monotonic()
        self.steps: dict[str, Step] = {}
        self.env: dict[str, Any] = {}

    @property
    def cuda(self) -> bool:
        return bool(self.env.get("cuda_available"))

    def timeout(self, key: str) -> float | None:
        """Seconds the next process may run: its own limit, capped by what is left of the
        budget; None when too little is left to start it."""
        left = self.budget_s - (time.monotonic() - self.start) - RESERVE_S
        limit = min(float(TIMEOUTS[key][1 if self.quick else 0]), left)
        return limit if limit >= MIN_STEP_S else None

    def launch(self, key: str, cmd: list[str], log: str, **env: str) -> tuple[int | None, str, float] | Step:
        """Run a step's process; a Step (skipped) when the budget is spent."""
        limit = self.timeout(key)
        if limit is None:
            return Step(key, "skipped", reason=f"the check's time budget (--budget-s {self.budget_s:g}) was spent")
        rc, output, seconds = run_process(cmd, limit, self.out / log, child_env(**env))
        if rc is None:
            return Step(key, "failed", seconds, error=f"timed out after {limit:.0f} s (log: {log})")
        return rc, output, seconds

    def run(self) -> list[Step]:
        for method in (self.environment, self.cuda_tests, self.coreset, self.end_to_end, self.federation):
            for step in method():
                self.steps[step.name] = step
        return [self.steps.get(n, Step(n, "skipped", reason="not reached")) for n in STEPS]

    def environment(self) -> list[Step]:
        probe = self.out / "environment.json"
        ran = self.launch("environment", [sys.executable, "-m", "experiments.bench.gpu_check", "--probe", str(probe)],
                          "environment.log")
        if isinstance(ran, Step):
            return [ran]
        rc, output, seconds = ran
        if rc != 0 or not probe.is_file():
            return [Step("environment", "failed", seconds, error=last_line(output) or f"exit code {rc}")]
        self.env = json.loads(probe.read_text())
        return [Step("environment", "ok", seconds, numbers=self.env)]

    def cuda_tests(self) -> list[Step]:
        xml = self.out / "pytest-cuda.xml"
        xml.unlink(missing_ok=True)
        ran = self.launch("cuda_tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                         "tests/test_cuda.py", "tests/test_privacy.py", f"--junitxml={xml}"],
                          "pytest-cuda.log")
        if isinstance(ran, Step):
            return [ran]
        rc, output, seconds = ran
        return [judge_tests(junit_counts(xml), rc, output, seconds, self.cuda)]

    def coreset(self) -> list[Step]:
        rows, cpu_rows = ((20_000, 10_000) if self.quick else (100_000, 20_000)) if self.cuda else \
            ((4_000, 4_000) if self.quick else (10_000, 10_000))
        result_path = self.out / "coreset.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "experiments.bench.gpu_coreset", "--rows", str(rows),
               "--cpu-rows", str(cpu_rows), "--json", str(result_path)]
        cmd += ["--features", self.features] if self.features else []
        ran = self.launch("coreset", cmd, "coreset.log")
        if isinstance(ran, Step):
            return [Step(n, ran.status, ran.seconds, ran.reason, ran.error) for n in ("coreset_cpu", "coreset_gpu")]
        rc, output, seconds = ran
        if not result_path.is_file():
            error = last_line(output) or f"exit code {rc}"
            return [Step(n, "failed", seconds, error=error) for n in ("coreset_cpu", "coreset_gpu")]
        result = json.loads(result_path.read_text())
        shared = {"features": result["features"], "ratio": result["ratio"], "projection_dim": result["projection_dim"],
                  "process_s": round(seconds, 2)}  # both parts ran in one process (torch import, features)
        return [coreset_step(name, result[part], shared)
                for name, part in (("coreset_cpu", "cpu"), ("coreset_gpu", "gpu"))]

    def end_to_end(self) -> list[Step]:
        roots = [Path(self.mvtec_root)] if self.mvtec_root else [REPO.parent / "shared" / "data" / "mvtec",
                                                                 REPO / "shared" / "data" / "mvtec"]
        root = next((r for r in roots if (r / "hazelnut" / "train").is_dir()), None)
        if root is None:
            return [Step("end_to_end", "skipped",
                         reason=f"no shared hazelnut images at {' or '.join(str(r) for r in roots)} (--mvtec-root)")]
        on_gpu = self.cuda and not self.quick
        cmd = [sys.executable, "experiments/bench/patchcore.py", "--root", str(root), "--category", "hazelnut",
               "--backbone", "wide_resnet50_2", "--weights", "none", "--repeats", "1" if self.quick else "3"]
        ran = self.launch("end_to_end", cmd, "end_to_end.log", **({} if on_gpu else {"CUDA_VISIBLE_DEVICES": ""}))
        if isinstance(ran, Step):
            return [ran]
        rc, output, seconds = ran
        return [parse_bench(output, rc, seconds, "cuda" if on_gpu else "cpu")]

    def federation(self) -> list[Step]:
        if not self.env:
            return [Step("federation", "skipped", reason="CUDA not confirmed: the environment step did not finish")]
        if not self.cuda:
            return [Step("federation", "skipped", reason="no CUDA device: federation.client_gpus=0.25 needs a GPU "
                                                         "(Ray could not place the client actors)")]
        scratch = Path(tempfile.mkdtemp(prefix="fedpatch-gpu-check-"))
        try:
            ran = self.launch("federation", federate_command(scratch, self.env), "federation.log",
                              FLWR_HOME=str(scratch / "flwr-home"))
            if isinstance(ran, Step):
                return [ran]
            rc, output, seconds = ran
            report = scratch / "run" / "federated" / "federation.json"
            if report.is_file():
                shutil.copyfile(report, self.out / "federation.json")
            return [judge_federation(report, rc, output, seconds)]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def junit_counts(xml: Path) -> dict[str, Any] | None:
    """{tests, failures, errors, skipped, passed, first_failure} of a pytest junit XML; None if absent."""
    if not xml.is_file():
        return None
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            counts["first_failure"] = (f"{case.get('classname')}::{case.get('name')}: "
                                       f"{message[0][:200] if message else ''}")
            break
    return counts


def judge_tests(counts: dict[str, Any] | None, rc: int, output: str, seconds: float, cuda: bool) -> Step:
    if counts is None:
        return Step("cuda_tests", "failed", seconds,
                    error=f"pytest wrote no junit XML (exit code {rc}): {last_line(output)}")
    numbers = {k: counts[k] for k in ("tests", "passed", "skipped", "failures", "errors")}
    if counts["failures"] or counts["errors"]:
        bad = counts["failures"] + counts["errors"]
        return Step("cuda_tests", "failed", seconds, error=f"{bad} of {counts['tests']} CUDA tests failed; first: "
                    f"{counts.get('first_failure', '')}", numbers=numbers)
    if rc != 0:
        return Step("cuda_tests", "failed", seconds, error=f"pytest exit code {rc}: {last_line(output)}",
                    numbers=numbers)
    if counts["passed"] > 0:
        return Step("cuda_tests", "ok", seconds, numbers=numbers)
    if cuda:
        return Step("cuda_tests", "failed", seconds, error="CUDA is available but no CUDA test ran", numbers=numbers)
    return Step("cuda_tests", "skipped", seconds, numbers=numbers,  # pytest's own process saw no GPU
                reason=f"no CUDA device: all {counts['skipped']} CUDA tests skipped ('needs a CUDA device')")


def coreset_step(name: str, part: dict[str, Any], shared: dict[str, Any]) -> Step:
    status = part.get("status", "failed")
    numbers = {k: v for k, v in part.items() if k not in ("status", "reason", "error", "wall_s")}
    return Step(name, status, float(part.get("wall_s", 0.0)), part.get("reason", ""), part.get("error", ""),
                numbers={**shared, **numbers})


def parse_bench(output: str, rc: int, seconds: float, device: str) -> Step:
    """experiments/bench/patchcore.py's ratio line (required) and per-stage lines (when found)."""
    ratio = RATIO_LINE.search(output)
    if rc != 0 or ratio is None:
        why = f"exit code {rc}" if rc != 0 else "no 'end-to-end fit+predict ... : X.XXx' line"
        return Step("end_to_end", "failed", seconds, error=f"{why}: {last_line(output)}")
    numbers: dict[str, Any] = {"device": device, "e2e_over_forward": float(ratio.group(1)),
                               "stages_s": {name: float(s) for name, s in STAGE_LINE.findall(output)}}
    if ratio.group(2):
        numbers.update(e2e_ms_per_image=float(ratio.group(2)), forward_ms_per_image=float(ratio.group(3)))
    reported = re.search(r"^device (\S+?),", output, re.M)
    if reported:
        numbers["device_reported"] = reported.group(1)
    return Step("end_to_end", "ok", seconds, numbers=numbers)


def federate_command(scratch: Path, env: dict[str, Any]) -> list[str]:
    """`fedpatch federate` on the offline synthetic demo config, sizes reduced, four clients
    sharing one GPU."""
    cpus = max(1, min(2, int(env.get("cpu_count") or 1) // FEDERATION_FACTORIES))
    settings = {"data.root": str(scratch / "synthetic"), "data.synthetic.n_train": 24,
                "data.synthetic.n_test_good": 4, "data.synthetic.n_test_defect": 4,
                "model.backbone.weights": "none", "device": "auto",
                "federation.num_factories": FEDERATION_FACTORIES, "federation.client_gpus": 0.25,
                "federation.client_cpus": cpus, "federation.node_timeout_s": 60,
                "federation.identify_timeout_s": 120, "federation.round_timeout_s": 150}
    cmd = [sys.executable, "-m", "experiments.app.cli", "federate", "--config", str(REPO / "configs" / "default.yaml"),
           "--out", str(scratch / "run"), "--quiet"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def judge_federation(report_path: Path, rc: int, output: str, seconds: float) -> Step:
    """ok when the federation completed and every factory's client computed on CUDA."""
    if not report_path.is_file():
        return Step("federation", "failed", seconds, error=f"no federation.json (exit code {rc}): {last_line(output)}")
    report = json.loads(report_path.read_text())
    factories = report.get("factories", {})
    devices = {name: f.get("device", "") for name, f in sorted(factories.items())}
    numbers = {"factories": len(factories), "devices": devices, "client_gpus": 0.25,
               "train_s": {name: f.get("seconds", {}).get("total_s") for name, f in sorted(factories.items())},
               "federation_status": report.get("status")}
    problems = [f"{k}: {len(report.get(k) or [])}" for k in ("failed", "missing", "rejected") if report.get(k)]
    if rc != 0 or report.get("status") != "complete" or problems:
        return Step("federation", "failed", seconds, numbers=numbers,
                    error=f"status {report.get('status')}, exit code {rc}"
                          f"{'; ' + ', '.join(problems) if problems else ''}: {last_line(output)}")
    not_cuda = {n: d or "not reported" for n, d in devices.items() if not d.startswith("cuda")}
    if len(devices) != FEDERATION_FACTORIES or not_cuda:
        return Step("federation", "failed", seconds, numbers=numbers,
                    error=f"{len(devices)} of {FEDERATION_FACTORIES} factories replied; not on CUDA: {not_cuda}")
    return Step("federation", "ok", seconds, numbers=numbers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for report.md, results.json and the logs (created)")
    p.add_argument("--quick", action="store_true", help="smaller sizes; end-to-end on the CPU")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole check's time limit (default 450)")
    p.add_argument("--features", help="(N, D) .npy of real patch embeddings for the coreset step")
    p.add_argument("--mvtec-root", help="folder holding hazelnut/ (default ../shared/data/mvtec)")
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)  # the environment step's child
    args = p.parse_args(argv)
    if args.probe:
        Path(args.probe).write_text(json.dumps(probe_environment(), indent=2) + "\n")
        return 0
    if not args.out:
        p.error("--out DIR is required")
    from experiments.bench.gpu_report import write_results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s, args.quick, args.features, args.mvtec_root)
    steps = check.run()
    code = 1 if any(s.status == "failed" for s in steps) else 0
    write_results(out, steps, check.env or None, quick=args.quick, budget_s=args.budget_s,
                  wall_s=time.monotonic() - check.start, exit_code=code)
    print((out / "report.md").read_text().split("\n\n## ")[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
