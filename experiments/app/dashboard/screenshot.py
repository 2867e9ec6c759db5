"""PNG screenshots of the dashboard on a results folder, for reports and reviews.

    python experiments/app/dashboard/screenshot.py RESULTS_DIR OUT.png [--height 2400]

Starts the dashboard headless on a free port, waits for Streamlit's health check, then drives
headless Chromium (Debian's package: `apt-get install -y chromium`) over the DevTools protocol on
a pipe: load the page, wait until the app has finished running, screenshot the Inspection tab to
OUT.png, click the Federation tab, screenshot it to OUT-federation.png; then stop both.

Why not `chromium --screenshot --virtual-time-budget=...`: Streamlit draws the page from
messages on a websocket, which Chromium's virtual clock does not wait for, so that picture is
the loading skeleton. Waiting on the page itself needs no extra package: the protocol runs over
file descriptors 3 and 4 (`--remote-debugging-pipe`), NUL-separated JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from experiments.app.dashboard.launch import command
from experiments.app.local_server import free_port, stop

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe")
# the app is done when its title is drawn, nothing is running and no skeleton is left
READY_JS = """(() => !!document.querySelector('[data-testid="stApp"]')
  && document.body.innerText.includes('fedpatch dashboard')
  && !document.querySelector('[data-testid="stStatusWidget"]')
  && !document.querySelector('[data-testid="stSkeleton"]'))()"""
FEDERATION_TAB_JS = """(() => { const tabs = [...document.querySelectorAll('[role="tab"]')];
  const tab = tabs.find(t => t.innerText.includes('Federation')); if (tab) tab.click(); return !!tab; })()"""


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll Streamlit's health endpoint until it answers "ok"; RuntimeError if the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the dashboard server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the dashboard did not answer at {url} within {timeout:.0f} s")


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, chromium: str, size: tuple[int, int]):
        to_child, self._writer = os.pipe()
        self._reader, from_child = os.pipe()
        self._profile = tempfile.TemporaryDirectory(prefix="fedpatch-chromium-")

        def wire() -> None:  # in the child: its fds 3 and 4 become the two pipe ends
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={size[0]},{size[1]}",
             "about:blank"], preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buffer, self._next_id, self.session = b"", 0, None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._reader, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its debugging pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(line)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0, settle: float = 1.5) -> None:
        """Until `expression` holds twice in a row `settle` s apart (pictures finish loading)."""
        deadline, held = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            held = held + 1 if self.evaluate(expression) else 0
            if held >= 2:
                return
            time.sleep(settle)
        raise RuntimeError("the dashboard did not finish rendering in time")

    def screenshot(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._writer)
        os.close(self._reader)
        self._profile.cleanup()


def take(url: str, out: Path, chromium: str, size: tuple[int, int]) -> list[Path]:
    """OUT.png (Inspection tab) and OUT-federation.png (Federation tab)."""
    browser = Browser(chromium, size)
    try:
        browser.call("Page.navigate", url=url)
        browser.wait_for(READY_JS)
        shots = [browser.screenshot(out)]
        if browser.evaluate(FEDERATION_TAB_JS):
            time.sleep(1.0)
            browser.wait_for(READY_JS)
            shots.append(browser.screenshot(out.with_name(f"{out.stem}-federation{out.suffix}")))
        return shots
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", help="folder of runs, or one run folder")
    parser.add_argument("out", help="PNG to write (the Federation tab goes to OUT-federation.png)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    args = parser.parse_args(argv)
    if not Path(args.chromium).is_file():
        print(f"error: chromium not found at {args.chromium} (apt-get install -y chromium)", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(command(args.results_dir, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, server)
        shots = take(url, Path(args.out), args.chromium, (args.width, args.height))
    finally:
        stop(server, timeout=20)
    print("screenshots: " + ", ".join(str(p) for p in shots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
