"""The fast tier's guard (tests/tier_guard.py) fails what it should: a test run under
`-m "not slow"` that starts a server process (directly or through a child) or listens on a
socket, naming the test; and it leaves plain subprocesses and full runs alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tier_guard import server_kind

REPO = Path(__file__).resolve().parents[1]

FAKE_TESTS = '''
import socket
import subprocess
import sys

RAYLET = {raylet!r}  # a harmless script named like Ray's raylet


def test_plain_subprocess_is_fine():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_starts_a_raylet():
    subprocess.run([RAYLET, "0"], check=True)


def test_child_starts_a_raylet():
    subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                    RAYLET, "1.5"], check=True)


def test_listens_in_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
'''


@pytest.fixture(scope="module")
def fake_suite(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiers")
    raylet = folder / "raylet"
    raylet.write_text('#!/bin/sh\nsleep "$1"\n')
    raylet.chmod(0o755)
    (folder / "test_fake.py").write_text(FAKE_TESTS.format(raylet=str(raylet)))
    (folder / "test_fake_import.py").write_text(  # a server started while collecting
        f"import subprocess\nsubprocess.Popen([{str(raylet)!r}, '1'])\n\n\ndef test_nothing():\n    pass\n")
    return folder


def run_pytest(folder: Path, *args: str, file: str = "test_fake.py") -> subprocess.CompletedProcess:
    """pytest on the fake suite with only the guard plugin (no project conftest or ini)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # tests.tier_guard
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.tier_guard", "-p", "no:cacheprovider",
                           "-q", "-rA", *args, file],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_the_guard_fails_fast_tests_that_start_servers_and_names_them(fake_suite):
    done = run_pytest(fake_suite, "-m", "not slow")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "PASSED test_fake.py::test_plain_subprocess_is_fine" in out
    for name, what in [("test_starts_a_raylet", "started Ray"),
                       ("test_child_starts_a_raylet", "had a descendant process running Ray"),
                       ("test_listens_in_process", "listened on a socket")]:
        assert f"FAILED test_fake.py::{name}" in out, out
        assert f"test_fake.py::{name} (call): the fast tier (-m 'not slow') starts no Ray or server " \
               f"process, but this test {what}" in out, out
    assert "fast-tier guard" in out and "3 failed, 1 passed" in out


def test_a_server_started_outside_any_test_fails_the_session(fake_suite):
    done = run_pytest(fake_suite, "-m", "not slow", file="test_fake_import.py")
    assert done.returncode != 0, done.stdout + done.stderr
    assert "outside any test, this run started Ray" in done.stdout, done.stdout


def test_without_deselecting_slow_the_guard_is_off(fake_suite):
    # (no fake raylet here: unguarded, it would be this run's guard's to judge)
    done = run_pytest(fake_suite, "-k", "listens or plain")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout and "fast-tier guard" not in done.stdout


@pytest.mark.parametrize("expression, on", [
    ("not slow", True), ("not slow and not cuda", True), ("cuda", True),
    ("slow", False), ("slow or cuda", False), ("", False),
])
def test_which_runs_are_guarded(expression, on):
    config = type("C", (), {"option": type("O", (), {"markexpr": expression})()})()
    from tests.tier_guard import deselects_slow

    assert deselects_slow(config) is on


@pytest.mark.parametrize("argv, kind", [
    (["/x/site-packages/ray/core/src/ray/raylet/raylet", "--node"], "Ray"),
    (["ray::ClientAppActor.run"], "Ray"),
    (["/usr/bin/python3", "-u", "/v/lib/python3.12/site-packages/ray/dashboard/dashboard.py"], "Ray"),
    (["/v/bin/python", "-m", "streamlit", "run", "app.py"], "Streamlit"),
    ("/v/bin/python -m uvicorn app:app", "uvicorn"),
    (["/v/bin/flower-superlink", "--insecure"], "a Flower SuperLink"),
    (["flwr", "run", ".", "local"], "`flwr run`"),
    (["/usr/bin/chromium", "--headless"], "a browser"),
    (["/v/bin/fedpatch", "fit", "--config", "/tmp/pytest/test_ray_0/c.yaml"], None),
    (["/v/bin/python", "-m", "pytest", "-m", "not slow"], None),
    (["/v/bin/python", "-c", "import ray"], None),  # what it does is seen when it starts Ray
    (["git", "rev-parse", "HEAD"], None),
    (["/v/bin/python3", "/v/bin/flower-supernode", "--insecure"], "a Flower SuperNode"),  # a console script
    (["/bin/sh", "/tmp/x/raylet", "1"], "Ray"),
    (["/v/bin/python3", "-u", "/v/bin/flwr", "run", "."], "`flwr run`"),
    (["/bin/sh", "-c", "streamlit run app.py"], None),
])
def test_server_kind(argv, kind):
    assert server_kind(argv) == kind
