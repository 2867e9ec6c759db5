"""A CUDA out-of-memory error ends a command with one line naming the settings to change.

No GPU needed: the command function is replaced by one that raises torch's OOM exception (the
real allocation failure is tests/test_cuda.py's, on a GPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import experiments.app.cli as cli
from federated.config import ExperimentConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
TORCH_MESSAGE = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                 "139.81 GiB of which 1.25 GiB is free. Of the allocated memory 130.10 GiB is "
                 "allocated by PyTorch. If reserved but unallocated memory is large try setting "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.\n"
                 "See documentation for Memory Management")


def _oom_classes():
    return [c for c in {getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)}
            if c is not None]


@pytest.mark.parametrize("kind", _oom_classes(), ids=lambda c: c.__module__ + "." + c.__name__)
@pytest.mark.parametrize("command,argv", [
    ("fit", ["fit", "--config", str(DEFAULT_CONFIG)]),
    ("federate", ["federate", "--config", str(DEFAULT_CONFIG)]),
    ("predict", ["predict", "part.png", "--bank", "bank.safetensors"]),
])
def test_cuda_oom_is_one_line_with_the_setting_to_change(monkeypatch, capsys, kind, command, argv):
    def out_of_memory(args):
        raise kind(TORCH_MESSAGE)

    monkeypatch.setattr(cli, f"cmd_{command}", out_of_memory)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"error: CUDA out of memory during {command} "
                           f"(CUDA out of memory. Tried to allocate 20.00 GiB): ")
    assert "Traceback" not in line and "PYTORCH_CUDA_ALLOC_CONF" not in line
    if command == "predict":
        assert line.endswith("run with --device cpu")
    else:
        assert "data.batch_size" in line and "device: cpu" in line
        assert ("federation.client_gpus" in line) == (command == "federate")


def _config_keys(cls, prefix: str = "") -> set[str]:
    keys = set()
    for name, field in cls.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            keys |= _config_keys(field.annotation, prefix + name + ".")
    return keys


def test_every_key_the_hints_name_is_a_real_config_key():
    config = ExperimentConfig()
    named = set()
    for hint in [cli.OOM_HINT, cli.OOM_FEDERATED, *cli.OOM_HINTS.values()]:
        named |= set(re.findall(r"\b(?:data|model|federation|threshold)\.[a-z_.]*[a-z_]", hint))
        named |= {"device"} if re.search(r"\bdevice: cpu|device=cpu", hint) else set()
    assert {"data.batch_size", "model.precision", "model.coreset.precision",
            "federation.client_gpus", "device"} <= named
    for key in named:
        value = config
        for part in key.split("."):
            assert hasattr(value, part), f"{key} is not a config key"
            value = getattr(value, part)
    json.dumps(sorted(named))


def test_a_run_folder_records_the_oom_line(monkeypatch, capsys, tmp_path):
    """A command that opened its run folder and then ran out of GPU memory leaves its manifest
    saying so, with the same line (experiments/app/runs.py: failures_recorded)."""
    from experiments.app.runs import Manifest, new_run_dir, write_config
    from patchcore.config import load_config

    def fit_then_oom(args):
        config = load_config(args.config, ExperimentConfig, {})
        run_dir = new_run_dir(str(tmp_path), "fit", str(tmp_path / "run"))
        write_config(run_dir, config)
        Manifest(run_dir, config, "fit").write(status="running")
        (run_dir / "banks").mkdir()
        (run_dir / "banks" / "partial.txt").write_text("a result")  # so the folder is kept
        raise torch.cuda.OutOfMemoryError(TORCH_MESSAGE)

    monkeypatch.setattr(cli, "cmd_fit", fit_then_oom)
    assert cli.main(["fit", "--config", str(DEFAULT_CONFIG)]) == 2
    line = capsys.readouterr().err.strip()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == line
