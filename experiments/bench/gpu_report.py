"""report.md and results.json of the device check (`python -m experiments.bench.gpu_check`).

report.md opens with what kind of machine it was ("no CUDA device: GPU steps skipped" where torch
saw none) and the table of steps; the numbers of each step follow. results.json holds the same
numbers, one entry per step with its status. No torch here: the check's own process stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.app.runs import git_commit, write_json

TITLES = {"environment": "a. environment", "cuda_tests": "b. CUDA tests (pytest -m cuda)",
          "coreset_cpu": "c. coreset on the CPU", "coreset_gpu": "c. coreset on CUDA vs the CPU",
          "end_to_end": "d. end-to-end fit+predict vs backbone forward",
          "federation": "e. 4-client federation sharing one GPU"}


def write_results(out: Path, steps: list[Any], env: dict[str, Any] | None, *, quick: bool, budget_s: float,
                  wall_s: float, exit_code: int) -> dict[str, Any]:
    """`env`: what the environment step saw; None when it did not finish (CUDA then unknown)."""
    data = {"quick": quick, "budget_s": budget_s, "wall_s": round(wall_s, 1),
            "cuda": None if env is None else bool(env.get("cuda_available")), "exit_code": exit_code,
            "git": git_commit(),
            "steps": [s.to_dict() for s in steps]}
    write_json(out / "results.json", data)
    (out / "report.md").write_text(render(data))
    return data


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "?"


def headline(data: dict[str, Any]) -> str:
    env = next((s for s in data["steps"] if s["name"] == "environment"), {})
    if data["cuda"] is None:
        why = env.get("error") or env.get("reason") or "not run"
        return (f"**CUDA not confirmed: the environment step did not finish ({why}); the GPU steps that "
                f"need it were skipped.**")
    if not data["cuda"]:
        return (f"**no CUDA device: GPU steps skipped.** torch {env.get('torch', '?')} saw no GPU here "
                f"({env.get('cpu_count', '?')} CPU cores); the steps that ran, ran on the CPU.")
    return (f"CUDA device: {env.get('device_name')} ({_f(env.get('free_gib'), 1)} of {_f(env.get('total_gib'), 1)} "
            f"GiB free), torch {env.get('torch')}, CUDA {env.get('torch_cuda')}.")


def detail(step: dict[str, Any]) -> str:
    """The step's one-line summary for the table."""
    if step["status"] == "skipped":
        return step.get("reason", "")
    if step["status"] == "failed":
        return step.get("error", "")
    name = step["name"]
    if name == "environment":
        gpu = (f"{step.get('device_name')}, {_f(step.get('free_gib'), 1)}/{_f(step.get('total_gib'), 1)} GiB free"
               if step.get("cuda_available") else "no CUDA device")
        return f"torch {step.get('torch')}, CUDA build {step.get('torch_cuda')}, {gpu}"
    if name == "cuda_tests":
        return f"{step['passed']} passed, {step['skipped']} skipped of {step['tests']}"
    if name == "coreset_cpu":
        f32 = step["float32"]
        return (f"{step['rows']} rows -> {step['picks']} picks: {_f(f32['seconds'])} s "
                f"({_f(f32['ms_per_step'], 3)} ms/step), radius {_f(f32['radius'], 3)}")
    if name == "coreset_gpu":
        same, full = step["same_subset"], step["full"]
        return (f"same {same['rows']} rows, CPU time / CUDA time: fp32 {same['speedup_vs_cpu_fp32']['float32']}x "
                f"(radius x{same['radius_vs_cpu_fp32']['float32']}), bf16 {same['speedup_vs_cpu_fp32']['bfloat16']}x "
                f"(radius x{same['radius_vs_cpu_fp32']['bfloat16']}); {full['rows']} rows: fp32 "
                f"{_f(full['float32']['ms_per_step'], 3)} ms/step, "
                f"bf16 {_f(full['bfloat16']['ms_per_step'], 3)} ms/step")
    if name == "end_to_end":
        per = (f" ({step['e2e_ms_per_image']} ms vs {step['forward_ms_per_image']} ms per image)"
               if "e2e_ms_per_image" in step else "")
        return f"on {step['device']}: fit+predict / forward = {step['e2e_over_forward']}x{per}"
    if name == "federation":
        return f"{step['factories']} factories, client devices: {', '.join(sorted(set(step['devices'].values())))}"
    return ""


def _coreset_section(steps: dict[str, dict[str, Any]]) -> list[str]:
    cpu, gpu = steps.get("coreset_cpu", {}), steps.get("coreset_gpu", {})
    source = cpu.get("features") or gpu.get("features") or {}
    lines = [f"Features: {source.get('source', '?')}, {source.get('rows', '?')} x {source.get('dim', '?')}; "
             f"ratio {cpu.get('ratio', gpu.get('ratio', '?'))}, "
             f"projection to {cpu.get('projection_dim', gpu.get('projection_dim', '?'))} dims.",
             "", "| run | rows | picks | precision | seconds | ms/step | coverage radius |",
             "|---|---|---|---|---|---|---|"]
    runs = []
    if cpu.get("status") == "ok":
        runs.append(("CPU", cpu, ("float32",)))
    if gpu.get("status") == "ok":
        runs += [("CUDA, the CPU's rows", gpu["same_subset"], ("float32", "bfloat16")),
                 ("CUDA, all rows", gpu["full"], ("float32", "bfloat16"))]
    for label, part, precisions in runs:
        for p in precisions:
            n = part[p]
            lines.append(f"| {label} | {part['rows']} | {part['picks']} | {p} | {_f(n['seconds'], 3)} | "
                         f"{_f(n['ms_per_step'], 3)} | {_f(n['radius'], 4)} |")
    if gpu.get("status") == "ok":
        same = gpu["same_subset"]
        speed, ratio = same["speedup_vs_cpu_fp32"], same["radius_vs_cpu_fp32"]
        lines += ["", f"Same rows against the CPU's fp32 run: CPU time / CUDA time fp32 {speed['float32']}x, "
                      f"bf16 {speed['bfloat16']}x; coverage radius CUDA / CPU fp32 {ratio['float32']}, bf16 "
                      f"{ratio['bfloat16']}; fp32 picks identical: {same['fp32_picks_identical']} "
                      f"(shared {same['fp32_picks_shared']:.1%}). All rows: bf16 radius / fp32 radius = "
                      f"{gpu['full']['bf16_radius_vs_fp32']}."]
    elif gpu:
        lines += ["", f"CUDA: {gpu.get('status')}: {gpu.get('reason') or gpu.get('error', '')}"]
    return lines


def render(data: dict[str, Any]) -> str:
    steps = {s["name"]: s for s in data["steps"]}
    counts = {k: sum(s["status"] == k for s in data["steps"]) for k in ("ok", "skipped", "failed")}
    lines = ["# fedpatch GPU check", "", headline(data), "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {TITLES.get(s['name'], s['name'])} | {s['status']} | {_f(s['seconds'], 1)} | {_cell(detail(s))} |"
              for s in data["steps"]]
    lines += ["", f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
                  f"{data['wall_s']} s of the {data['budget_s']:g} s budget{' (--quick)' if data['quick'] else ''}; "
                  f"exit code {data['exit_code']}. Commit {(data['git'] or {}).get('commit')}.", ""]
    env = steps.get("environment", {})
    lines += ["## a. environment", ""] + [f"- {k}: {v}" for k, v in env.items()
                                          if k not in ("name", "status", "seconds")]
    tests = steps.get("cuda_tests", {})
    counts = ", ".join(f"{k} {tests[k]}" for k in ("tests", "passed", "skipped", "failures", "errors") if k in tests)
    lines += ["", "## b. CUDA tests", "", "`pytest -m cuda tests/test_cuda.py tests/test_privacy.py`: "
              f"{counts or detail(tests)}. JUnit XML: `pytest-cuda.xml`, log: `pytest-cuda.log`."]
    if tests.get("error"):
        lines += ["", f"Failed: {tests['error']}"]
    lines += ["", "## c. coreset: CUDA vs CPU on the same features", ""] + _coreset_section(steps)
    e2e = steps.get("end_to_end", {})
    lines += ["", "## d. end-to-end fit+predict vs backbone forward", "",
              "`experiments/bench/patchcore.py --category hazelnut --backbone wide_resnet50_2 --weights none` "
              f"(log: `end_to_end.log`): {detail(e2e)}"]
    lines += [f"- {stage}: {s} s" for stage, s in e2e.get("stages_s", {}).items()]
    fed = steps.get("federation", {})
    lines += ["", "## e. federation: 4 clients sharing one GPU (federation.client_gpus 0.25)", "", detail(fed)]
    lines += [f"- {name}: {dev}, train {_f(fed.get('train_s', {}).get(name))} s"
              for name, dev in fed.get("devices", {}).items()]
    return "\n".join(lines) + "\n"
