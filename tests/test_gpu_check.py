"""The one-shot device check (`python -m experiments.bench.gpu_check`): on this CPU-only machine it runs
what it can, skips the GPU steps saying why, and exits 0; its verdicts on GPU results (tests that
passed or failed, a client not on CUDA, the bench's ratio line) are checked on made-up inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.bench import gpu_check, gpu_coreset
from experiments.bench.gpu_report import render, write_results
from tests.conftest import REPO

NO_GPU = not torch.cuda.is_available()


# The --quick check itself (~90 s here; on a GPU box its federation step starts Ray): slow.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "experiments.bench.gpu_check", "--out", str(out), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    return done, out, time.monotonic() - start


@slow
def test_quick_check_exits_0_and_says_gpu_steps_were_skipped(quick_check):
    done, out, seconds = quick_check
    assert done.returncode == 0, done.stdout + done.stderr
    report = (out / "report.md").read_text()
    head = report.split("| step |")[0]
    if NO_GPU:
        assert "no CUDA device: GPU steps skipped" in head  # said first, before the table
    results = json.loads((out / "results.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] in ("ok", "skipped", "failed") for s in steps.values())
    assert results["exit_code"] == 0 and results["quick"] is True and results["wall_s"] < 450
    assert report.index("| step | status |") < report.index("## a. environment")
    for name in gpu_check.STEPS:
        assert f"| {gpu_check_title(name)} | {steps[name]['status']} |" in report
    if NO_GPU:
        assert results["cuda"] is False
        for name in ("cuda_tests", "coreset_gpu", "federation"):
            assert steps[name]["status"] == "skipped" and "no CUDA device" in steps[name]["reason"]
        assert steps["cuda_tests"]["skipped"] == steps["cuda_tests"]["tests"] >= 10
    assert (out / "pytest-cuda.xml").is_file() and (out / "pytest-cuda.log").is_file()


def gpu_check_title(name: str) -> str:
    from experiments.bench.gpu_report import TITLES

    return TITLES[name]


@slow
def test_quick_check_cpu_coreset_numbers_are_there(quick_check):
    _, out, _ = quick_check
    steps = {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    cpu = steps["coreset_cpu"]
    assert cpu["status"] == "ok" and cpu["rows"] > 0 and cpu["picks"] > 0
    assert cpu["float32"]["seconds"] > 0 and cpu["float32"]["ms_per_step"] > 0 and cpu["float32"]["radius"] > 0
    assert cpu["features"]["dim"] == 1024


@slow
def test_quick_check_end_to_end_ratio_on_the_shared_images(quick_check, shared_mvtec):
    _, out, _ = quick_check
    e2e = {s["name"]: s for s in json.loads((out / "results.json").read_text())["steps"]}["end_to_end"]
    assert e2e["status"] == "ok" and e2e["device"] == "cpu" and e2e["e2e_over_forward"] > 0
    assert {"backbone forward alone", "coreset selection"} <= set(e2e["stages_s"])


def test_a_spent_budget_skips_steps_instead_of_running_them(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=1.0, quick=True, features=None, mvtec_root=str(tmp_path))
    steps = {s.name: s for s in check.run()}
    assert steps["environment"].status == "skipped" and "budget" in steps["environment"].reason
    assert steps["coreset_cpu"].status == steps["coreset_gpu"].status == "skipped"
    assert "no shared hazelnut images" in steps["end_to_end"].reason
    assert "CUDA not confirmed" in steps["federation"].reason
    assert not list(tmp_path.glob("*.log"))  # nothing was started
    data = write_results(tmp_path, list(steps.values()), None, quick=True, budget_s=1.0, wall_s=0.1, exit_code=0)
    head = (tmp_path / "report.md").read_text().split("| step |")[0]
    assert data["cuda"] is None and "CUDA not confirmed" in head and "no CUDA device" not in head  # no pretending


def test_a_step_past_its_timeout_is_killed(tmp_path):
    start = time.monotonic()
    rc, _, seconds = gpu_check.run_process([sys.executable, "-c", "import time; time.sleep(60)"], 1.0,
                                           tmp_path / "sleep.log")
    assert rc is None and seconds < 10 and time.monotonic() - start < 30


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="1" skipped="0" tests="3"><testcase classname="tests.test_cuda" name="test_a"/>
<testcase classname="tests.test_cuda" name="test_b"><failure message="AssertionError: radius 1.2 vs 1.0&#10;more">
trace</failure></testcase><testcase classname="tests.test_privacy" name="test_c"/></testsuite></testsuites>"""


def test_junit_counts_and_the_tests_verdict(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(JUNIT)
    counts = gpu_check.junit_counts(xml)
    assert (counts["tests"], counts["passed"], counts["failures"]) == (3, 2, 1)
    step = gpu_check.judge_tests(counts, 1, "", 3.0, cuda=True)
    assert step.status == "failed" and "1 of 3 CUDA tests failed" in step.error
    assert "tests.test_cuda::test_b: AssertionError: radius 1.2 vs 1.0" in step.error
    ok = dict(counts, failures=0, passed=3, first_failure=None)
    assert gpu_check.judge_tests(ok, 0, "", 3.0, cuda=True).status == "ok"
    skipped = dict(counts, failures=0, passed=0, skipped=3)
    step = gpu_check.judge_tests(skipped, 0, "", 3.0, cuda=False)
    assert step.status == "skipped" and step.reason.startswith("no CUDA device")
    assert gpu_check.judge_tests(skipped, 0, "", 3.0, cuda=True).status == "failed"  # a GPU, yet nothing ran
    assert gpu_check.judge_tests(ok, 0, "", 3.0, cuda=False).status == "ok"  # pytest's process saw the GPU
    assert gpu_check.judge_tests(None, 4, "ERROR: usage", 1.0, cuda=True).error.startswith("pytest wrote no junit XML")


BENCH_OUTPUT = """device cuda, torch threads 16, backbone wide_resnet50_2 (none, float32)
category hazelnut: 28 train, 23 test images; 21952 patches -> bank 2195
decode + preprocess          3.46 s   (  14.8 img/s)
backbone forward alone       0.36 s   ( 141.0 img/s)
extraction (train)           0.40 s   (  70.7 img/s)
coreset selection            0.05 s   (21952 -> 2195)
scoring (test)               0.30 s   (  76.8 img/s)
end-to-end fit+predict per image / backbone forward per image: 2.10x (14.7 ms vs 7.0 ms)
"""


def test_the_bench_ratio_line_is_parsed_and_its_absence_is_a_failure():
    step = gpu_check.parse_bench(BENCH_OUTPUT, 0, 20.0, "cuda")
    assert step.status == "ok" and step.numbers["e2e_over_forward"] == 2.10
    assert step.numbers["e2e_ms_per_image"] == 14.7 and step.numbers["device_reported"] == "cuda"
    assert step.numbers["stages_s"]["coreset selection"] == 0.05 and len(step.numbers["stages_s"]) == 5
    changed = "end-to-end fit+predict per image / backbone forward per image: 1.50x\n"  # a shorter line still works
    assert gpu_check.parse_bench(changed, 0, 1.0, "cpu").numbers["e2e_over_forward"] == 1.5
    broken = gpu_check.parse_bench("Traceback ...\nRuntimeError: boom\n", 1, 1.0, "cuda")
    assert broken.status == "failed" and "exit code 1: RuntimeError: boom" in broken.error


def _federation(tmp_path: Path, devices: dict[str, str], status: str = "complete") -> Path:
    report = {"status": status, "failed": [], "missing": [], "rejected": [],
              "factories": {n: {"device": d, "seconds": {"total_s": 1.5}} for n, d in devices.items()}}
    path = tmp_path / "federation.json"
    path.write_text(json.dumps(report))
    return path


def test_federation_verdict_needs_every_client_on_cuda(tmp_path):
    cuda = {f"factory-{k}": "cuda" for k in range(4)}
    assert gpu_check.judge_federation(_federation(tmp_path, cuda), 0, "", 30.0).status == "ok"
    one_cpu = gpu_check.judge_federation(_federation(tmp_path, {**cuda, "factory-2": "cpu"}), 0, "", 30.0)
    assert one_cpu.status == "failed" and "'factory-2': 'cpu'" in one_cpu.error
    three = gpu_check.judge_federation(_federation(tmp_path, {f"factory-{k}": "cuda" for k in range(3)}), 0, "", 1.0)
    assert three.status == "failed" and "3 of 4 factories" in three.error
    absent = gpu_check.judge_federation(tmp_path / "absent.json", 2, "error: x", 1.0)
    assert absent.error.startswith("no federation.json")
    cmd = gpu_check.federate_command(tmp_path, {"cpu_count": 16})
    assert "federation.client_gpus=0.25" in cmd and "federation.client_cpus=2" in cmd
    assert "federation.num_factories=4" in cmd and cmd[cmd.index("--config") + 1].endswith("configs/default.yaml")


def test_a_gpu_report_renders(tmp_path):
    """The report of a GPU run, from real coreset bookkeeping (its 'GPU' half run on the CPU)."""
    x = gpu_coreset.clustered_features(3000, 64, seed=0)
    coreset = gpu_coreset.measure(x, 1000, 0.1, 32, gpu=torch.device("cpu"))
    assert coreset["gpu"]["status"] == "ok" and coreset["gpu"]["same_subset"]["fp32_picks_identical"]
    shared = {"features": {"source": "synthetic", "rows": 3000, "dim": 64}, "ratio": 0.1, "projection_dim": 32}
    env = {"torch": "2.x", "torch_cuda": "12.8", "cuda_available": True, "device_name": "NVIDIA H200",
           "free_gib": 139.0, "total_gib": 140.0, "cpu_count": 16}
    fed = gpu_check.judge_federation(_federation(tmp_path, {f"factory-{k}": "cuda" for k in range(4)}), 0, "", 30.0)
    steps = [gpu_check.Step("environment", "ok", 2.0, numbers=env),
             gpu_check.Step("cuda_tests", "ok", 30.0, numbers={"tests": 11, "passed": 11, "skipped": 0,
                                                                 "failures": 0, "errors": 0}),
             gpu_check.coreset_step("coreset_cpu", coreset["cpu"], shared),
             gpu_check.coreset_step("coreset_gpu", coreset["gpu"], shared),
             gpu_check.parse_bench(BENCH_OUTPUT, 0, 20.0, "cuda"), fed]
    data = write_results(tmp_path, steps, env, quick=False, budget_s=450, wall_s=120.0, exit_code=0)
    report = (tmp_path / "report.md").read_text()
    assert report == render(data) and "no CUDA device" not in report
    assert report.splitlines()[2].startswith("CUDA device: NVIDIA H200")
    assert "| CUDA, all rows | 3000 | 300 | bfloat16 |" in report
    assert "client devices: cuda" in report and "fit+predict / forward = 2.1x" in report
    assert json.loads((tmp_path / "results.json").read_text())["steps"][3]["same_subset"]["rows"] == 1000
