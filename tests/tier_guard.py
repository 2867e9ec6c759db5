"""The fast tier's guard: a run that deselects `slow` tests (`make test-fast`, `pytest -m "not
slow"`) must start no Ray and no server. While such a run is on, this plugin

- refuses to start a Ray / Flower / Streamlit / uvicorn / browser process (`subprocess.Popen`,
  so also `subprocess.run`, `call`, ...: Ray's own start-up goes through it),
- refuses a socket `listen()` in this process (an in-process server: uvicorn in a thread, ...),
- polls this process's descendants with psutil (grandchildren too: a `fedpatch` subprocess that
  would start Ray) and records any that is one of those servers,
- and checks that no Ray is initialised in this process after each test phase,

and fails the test during which it happened, naming it and the process. Everything that needs a
server is marked `slow` and runs in `make test` (and CI).

tests/conftest.py installs it; `python -m pytest -p tests.tier_guard ...` loads it alone
(tests/test_tiers.py does that to check the guard fails what it should)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import pytest

PLUGIN_NAME = "fedpatch-tier-guard"
# Set to the guarding pytest's pid for everything it starts: a process whose value names another
# pid belongs to a nested guarded pytest run (tests/test_tiers.py), which judges it itself.
GUARD_ENV = "FEDPATCH_TIER_GUARD_PID"
BETWEEN = "(between tests)"
POLL_S = 0.2  # Ray, a SuperLink or a browser lives for seconds: a poll this often sees them

# executables (by file name) that are, or start, a server
SERVER_EXECUTABLES = {
    "raylet": "Ray", "gcs_server": "Ray", "ray": "Ray",
    "flower-superlink": "a Flower SuperLink", "flower-supernode": "a Flower SuperNode",
    "flower-simulation": "a Flower simulation", "flwr-serverapp": "a Flower ServerApp process",
    "flwr-clientapp": "a Flower ClientApp process", "flwr-simulation": "a Flower simulation",
    "streamlit": "Streamlit", "uvicorn": "uvicorn",
    "chromium": "a browser", "chromium-browser": "a browser", "chrome": "a browser",
    "google-chrome": "a browser", "headless_shell": "a browser", "firefox": "a browser",
}
SERVER_MODULES = {"ray": "Ray", "streamlit": "Streamlit", "uvicorn": "uvicorn", "flwr": "Flower"}
RAY_PACKAGE_FILE = re.compile(r"[/\\](site|dist)-packages[/\\]ray[/\\]")
INTERPRETER = re.compile(r"python[\d.]*|sh|bash|dash")


class TierViolation(RuntimeError):
    """A fast-tier test started a Ray or server process."""


def deselects_slow(config: pytest.Config) -> bool:
    """Whether this run's `-m` expression leaves out a test marked only `slow`."""
    expression = config.option.markexpr
    if not expression:
        return False
    try:
        from _pytest.mark.expression import Expression

        return not Expression.compile(expression).evaluate(lambda name, **kwargs: name == "slow")
    except Exception:  # pytest internals moved: the plain reading
        return "not slow" in expression


def server_kind(argv: Sequence[str] | str) -> str | None:
    """What server a command line starts ("Ray", "Streamlit", ...), or None for anything else."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        try:
            argv = shlex.split(os.fsdecode(argv))
        except ValueError:
            argv = os.fsdecode(argv).split()
    argv = [os.fsdecode(a) for a in argv]
    if not argv:
        return None
    if argv[0].startswith("ray::"):  # a Ray worker names itself after its actor
        return "Ray"
    name = Path(argv[0]).name
    if name in SERVER_EXECUTABLES:
        return SERVER_EXECUTABLES[name]
    if name == "flwr" and "run" in argv[1:3]:
        return "`flwr run`"
    if RAY_PACKAGE_FILE.search(argv[0]):  # Ray's dashboard, monitors, ...
        return "Ray"
    if INTERPRETER.fullmatch(name):  # console scripts run as `python /venv/bin/streamlit ...`
        for k, arg in enumerate(argv[1:], 1):
            if arg == "-m":  # the interpreter's own -m (the first): the module decides
                return SERVER_MODULES.get(argv[k + 1].split(".")[0]) if k + 1 < len(argv) else None
            if arg == "-c":  # code: what it starts is seen when it starts it
                return None
            if not arg.startswith("-"):  # the script and its arguments
                return server_kind(argv[k:])
    return None


def _command_text(args: Any) -> str:
    if isinstance(args, (str, bytes, os.PathLike)):
        return os.fsdecode(args)
    return shlex.join(os.fsdecode(a) for a in args)


class TierGuard:
    """The pytest plugin: see the module docstring."""

    def __init__(self) -> None:
        self.current = BETWEEN
        self.violations: list[tuple[str, str]] = []  # (test node id, what it started)
        self._lock = threading.Lock()
        self._seen: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._originals: dict[str, Any] = {}
        self.failed: list[str] = []  # node ids of the tests failed for it
        self.late: list[str] = []  # what happened outside any test (collection, session end)

    # -- recording ------------------------------------------------------------------------------
    def _record(self, what: str) -> None:
        with self._lock:
            self.violations.append((self.current, what))

    def _pending(self, nodeid: str) -> list[str]:
        """The violations recorded for `nodeid` since the last call (each is reported once)."""
        with self._lock:
            mine = [what for test, what in self.violations if test == nodeid]
            self.violations = [(t, w) for t, w in self.violations if t != nodeid]
        return mine

    # -- the three watches ----------------------------------------------------------------------
    def _install(self) -> None:
        guard = self
        popen_init = subprocess.Popen.__init__
        listen = socket.socket.listen

        def guarded_popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
            kind = server_kind(args)
            if kind is not None:
                what = f"started {kind} ({_command_text(args)[:200]})"
                guard._record(what)
                raise TierViolation(f"the fast tier starts no {kind} process ({what}); mark the test slow")
            popen_init(self, args, *rest, **kwargs)

        def guarded_listen(self: socket.socket, *args: Any) -> None:
            try:
                where = self.getsockname()
            except OSError:
                where = "?"
            guard._record(f"listened on a socket {where} (an in-process server)")
            raise TierViolation(f"the fast tier runs no server (listen on {where}); mark the test slow")

        self._originals = {"popen": popen_init, "listen": listen, "env": os.environ.get(GUARD_ENV)}
        os.environ[GUARD_ENV] = str(os.getpid())
        subprocess.Popen.__init__ = guarded_popen_init  # type: ignore[method-assign]
        socket.socket.listen = guarded_listen  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._poll, name="tier-guard", daemon=True)
        self._thread.start()

    def _uninstall(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._originals:
            subprocess.Popen.__init__ = self._originals["popen"]  # type: ignore[method-assign]
            socket.socket.listen = self._originals["listen"]  # type: ignore[method-assign]
            if self._originals["env"] is None:
                os.environ.pop(GUARD_ENV, None)
            else:
                os.environ[GUARD_ENV] = self._originals["env"]

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._scan()

    def _scan(self) -> None:
        """Record each new descendant of this process that is a server (once per process)."""
        import psutil

        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                key = (child.pid, child.create_time())
                with self._lock:
                    if key in self._seen:
                        continue
                    self._seen.add(key)
                argv = child.cmdline()
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue
            kind = server_kind(argv)
            if kind is not None and not self._nested(child):
                self._record(f"had a descendant process running {kind} (pid {child.pid}: "
                             f"{shlex.join(argv)[:200]})")

    @staticmethod
    def _nested(process: Any) -> bool:
        """Started under a nested guarded pytest run (its own guard judges it)."""
        import psutil

        try:
            owner = process.environ().get(GUARD_ENV)
        except psutil.Error:
            return False
        return owner is not None and owner != str(os.getpid())

    def _ray_check(self) -> None:
        ray = sys.modules.get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            self._record("left Ray initialised in the test process (ray.init)")

    # -- pytest hooks ---------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        with self._lock:
            self.current = nodeid

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        self._scan()  # servers started since the last poll, before the report is final
        if call.when == "teardown":
            self._ray_check()
            with self._lock:
                self.current = BETWEEN  # what follows is no longer this test's
        found = self._pending(item.nodeid)
        if found:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} ({call.when}): the fast tier (-m {item.config.option.markexpr!r}) "
                               f"starts no Ray or server process, but this test " + "; ".join(found) +
                               ". Mark it @pytest.mark.slow (`make test` runs it).")
            self.failed.append(item.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._scan()
        self._uninstall()
        self.late = self._pending(BETWEEN)
        if self.late or self.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.failed or self.late:
            terminalreporter.section("fast-tier guard", red=True)
            for nodeid in dict.fromkeys(self.failed):
                terminalreporter.line(f"{nodeid} started Ray or a server: mark it slow")
            for what in self.late:
                terminalreporter.line(f"outside any test, this run {what}")


def install(config: pytest.Config) -> None:
    """Register the guard when this run deselects slow tests (and it is not registered yet)."""
    if deselects_slow(config) and not config.pluginmanager.has_plugin(PLUGIN_NAME):
        guard = TierGuard()
        guard._install()
        config.pluginmanager.register(guard, PLUGIN_NAME)


def pytest_configure(config: pytest.Config) -> None:  # loaded with `-p tests.tier_guard`
    install(config)
