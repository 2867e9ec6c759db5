"""Progress that suits where the output goes: every loop with a progress bar uses `track`.

On a terminal (or in a notebook) `track` is a tqdm bar. Anywhere else — a log file, CI, a pipe,
a Ray worker — a bar's carriage returns pile up into one endless line, so `track` prints a plain
line now and then instead: when the loop passes another 10% of its length (at most one line per
`MIN_GAP_S`), after `EVERY_S` without a line (slow steps, unknown lengths), and once at the end.
Disabled (`--quiet`), it returns the iterable itself: nothing is printed.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
STEP = 0.1  # a line each time another 10% of the loop is done ...
MIN_GAP_S = 5.0  # ... but not within 5 s of the last one (fast loops print only their end)
EVERY_S = 30.0  # a line after 30 s without one, whatever the progress


def track(iterable: Iterable[T], desc: str = "", enabled: bool = True, *, total: int | None = None,
          leave: bool = True, stream: TextIO | None = None) -> Iterable[T]:
    """`iterable`, reporting progress to `stream` (default: sys.stderr) unless `enabled` is False.

    `leave=False` is a bar that disappears when done (terminal only; a line stays a line)."""
    if not enabled:
        return iterable
    stream = stream if stream is not None else sys.stderr
    if _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, file=stream)
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return _lines(iterable, desc, total, stream)


def _interactive(stream: TextIO) -> bool:
    """A terminal, or a notebook's output (which is not a tty but draws tqdm's widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


def _lines(iterable: Iterable[T], desc: str, total: int | None, stream: TextIO) -> Iterator[T]:
    start = last = time.monotonic()
    count, taken, mark, exhausted = 0, 0, STEP, False
    try:
        for item in iterable:
            taken += 1
            yield item
            count += 1
            now = time.monotonic()
            crossed = bool(total) and count >= mark * total  # type: ignore[operator]
            due = (crossed and now - last >= MIN_GAP_S) or now - last >= EVERY_S
            if due and count != total:  # the last item's line is the closing one
                _say(stream, desc, count, total, now - start)
                last = now
            while total and count >= mark * total:
                mark += STEP
        exhausted = True
    finally:  # also when a consumer takes the last item and never asks again (the loop is closed)
        if exhausted or (total and taken == total):
            _say(stream, desc, taken, total, time.monotonic() - start, done=True)


def _say(stream: TextIO, desc: str, count: int, total: int | None, elapsed: float, done: bool = False) -> None:
    where = f"{count}/{total}" if total else str(count)
    if done:
        text = f"{desc}: {where} done in {elapsed:.1f} s"
    elif total:
        eta = elapsed / count * (total - count)
        text = f"{desc}: {where} ({100 * count / total:.0f}%) {elapsed:.0f} s, ~{eta:.0f} s left"
    else:
        text = f"{desc}: {where} after {elapsed:.0f} s"
    print(text, file=stream, flush=True)
