# `make demo` and `make test` create .venv when missing, install fedpatch (-e ".[dev]"), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedpatch-installed
export FLWR_TELEMETRY_ENABLED ?= 0

.PHONY: demo test test-fast lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedpatch compare --config configs/default.yaml

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# ruff (settings in pyproject.toml's [tool.ruff]); CI (.ci/run) runs it before the tests
lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) experiments/bench/patchcore.py

# One-shot device check (experiments/bench/gpu_check.py): report.md + results.json + logs in OUT, < 8 min
# on one GPU. No install step: a GPU box may have its own environment and no package registry;
# it uses $(PY) when that exists, else python3.
OUT ?= results/gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m experiments.bench.gpu_check --out $(OUT)

clean:
	rm -rf results .cache .pytest_cache
