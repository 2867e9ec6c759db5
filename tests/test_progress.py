"""Progress output: tqdm bars on a terminal, occasional plain lines elsewhere, nothing when quiet."""

import io

from patchcore import progress
from patchcore.progress import track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_off_a_terminal_a_line_every_tenth_and_one_at_the_end(monkeypatch):
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.0)
    out = io.StringIO()
    assert list(track(range(1000), "extract", stream=out)) == list(range(1000))
    text = lines(out)
    assert len(text) == 10 and "\r" not in out.getvalue()  # 10%, 20%, ... 90%, then the end
    assert text[0].startswith("extract: 100/1000 (10%)") and text[-1].startswith("extract: 1000/1000 done in")


def test_off_a_terminal_a_fast_loop_prints_only_its_end():
    out = io.StringIO()
    list(track(iter(range(5000)), "coreset", stream=out))  # no len(): the count alone
    assert lines(out) == [lines(out)[0]] and lines(out)[0].startswith("coreset: 5000 done in")


def test_off_a_terminal_a_slow_loop_still_says_something(monkeypatch):
    clock = iter(range(0, 10_000, 40))  # every step takes 40 s
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    list(track(range(3), "score", stream=out))
    assert lines(out)[:2] == ["score: 1/3 (33%) 40 s, ~80 s left", "score: 2/3 (67%) 80 s, ~40 s left"]
    assert len(lines(out)) == 3 and "done in" in lines(out)[2]  # each step past 30 s, then the end


def test_quiet_prints_nothing_and_a_terminal_gets_a_bar():
    out = io.StringIO()
    items = [1, 2]
    assert track(items, "x", enabled=False, stream=out) is items and out.getvalue() == ""
    term = Terminal()
    bar = track(range(3), "fit", stream=term)
    from tqdm import tqdm

    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2] and "\r" in term.getvalue()


def test_a_closed_or_plain_stream_is_not_a_terminal():
    out = io.StringIO()
    assert progress._interactive(out) is False
    out.close()
    assert progress._interactive(out) is False


def test_a_consumer_that_stops_at_the_last_item_still_gets_the_closing_line():
    out = io.StringIO()
    items = track(range(3), "extract", stream=out)
    taken = [v for v, _ in zip(items, range(3))]  # zip stops after the third item, without asking for more
    del items  # closed
    assert taken == [0, 1, 2] and lines(out)[-1].startswith("extract: 3/3 done in")
    out = io.StringIO()
    items = iter(track(range(3), "extract", stream=out))
    next(items)
    del items  # given up early: no "done"
    assert out.getvalue() == ""
