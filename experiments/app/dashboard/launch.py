"""Starting the dashboard's Streamlit server: shared by `fedpatch dashboard` and screenshot.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from experiments.app.extras import require
from patchcore.errors import ConfigError

APP = Path(__file__).resolve().with_name("app.py")


def results_folder(path: str | Path) -> Path:
    """The results folder as an absolute path, or ConfigError when it is not a folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"results folder {folder} does not exist: run `fedpatch compare` first "
                          f"or pass the folder that holds its runs")
    return folder.resolve()


def command(results_dir: str | Path, port: int) -> list[str]:
    """`python -m streamlit run app.py` headless on `port`, with the results folder after `--`;
    MissingExtraError (one line) when streamlit is not installed."""
    require("dashboard", "fedpatch dashboard")
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
            "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--", str(results_folder(results_dir))]


def serve(results_dir: str | Path, port: int) -> int:
    """Run the dashboard in the foreground until interrupted; the server's exit code."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    cmd = command(results_dir, port)
    print(f"dashboard on http://localhost:{port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(cmd)
