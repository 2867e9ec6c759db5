"""`fedpatch study dp_padim` on tiny synthetic factories: its runs, ledger and clipping tables, and
the stand-in public source named in the findings (no AutoVI beside a synthetic data root)."""

from __future__ import annotations

import math

import pytest

from tests.test_studies import rows, study


def test_dp_padim_study_ledger_spends_each_epsilon_and_runs_every_method(tmp_path):
    out = study(tmp_path, "dp_padim", seeds=("0",))
    methods = {r["method"] for r in rows(out / "runs.csv")}
    for e in ("1", "4", "8", "∞"):
        assert f"DP-PaDiM ε={e} federated" in methods and (e == "∞" or f"DP-PaDiM ε={e} centralized" in methods)
    assert {"federated", "centralized", "PaDiM federated"} <= methods
    assert "DP-PaDiM ε=8 federated, no scale blocks" in methods
    ledger = rows(out / "ledger.csv")
    assert {float(r["epsilon"]) for r in ledger} == {1.0, 4.0, 8.0}
    for r in ledger:  # each factory's composed release spends exactly its ε at δ = 1e-5
        assert float(r["factory_epsilon"]) == pytest.approx(float(r["epsilon"]), rel=1e-4)
    for category in {r["category"] for r in ledger}:
        mine = [r for r in ledger if r["category"] == category and float(r["epsilon"]) == 8.0]
        composed = math.sqrt(sum(float(r["mu"]) ** 2 for r in mine))
        assert composed == pytest.approx(float(mine[0]["factory_mu"]), rel=1e-4)
    report = (out / "report.md").read_text()
    assert "STAND-IN" in report and "target (within 0.02 of PatchCore federated)" in report
