"""Progress display: pure formatting, and the two reporters driven by a fake clock."""

from __future__ import annotations

import io
import json

from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.common.progress import (
    JsonProgress,
    SizeError,
    TtyProgress,
    for_stream,
    format_bytes,
    format_eta,
    format_rate,
    format_size,
    parse_size,
    render_bar,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(1 << 30) == "1.0 GiB"
    assert format_bytes(3 << 50) == "3.0 PiB"
    assert format_bytes(1 << 62).endswith("PiB")


def test_format_rate_and_eta() -> None:
    assert format_rate(402_000_000) == "402.0 MB/s"
    assert format_eta(None) == "--:--"
    assert format_eta(float("nan")) == "--:--"
    assert format_eta(-1) == "--:--"
    assert format_eta(5) == "0:05"
    assert format_eta(125) == "2:05"
    assert format_eta(3725) == "1:02:05"


@given(label=st.text(max_size=120), done=st.integers(0, 1 << 45),
       total=st.none() | st.integers(1, 1 << 45), rate=st.floats(0, 1e10),
       width=st.integers(20, 200))
def test_bar_fits_the_line(label: str, done: int, total: int | None, rate: float,
                           width: int) -> None:
    line = render_bar(label, done, total, rate, width)
    assert len(line) <= width
    assert "\n" not in line or "\n" in label


def test_bar_content() -> None:
    line = render_bar("disk0", 512 << 20, 1 << 30, 100e6, 100)
    assert "disk0" in line and "[" in line and "50%" in line
    assert "100.0 MB/s" in line and "ETA 0:05" in line
    assert "ETA --:--" in render_bar("root", 10, None, 1e6)


def test_tty_redraws_at_most_ten_times_a_second() -> None:
    out, clock = io.StringIO(), Clock()
    p = TtyProgress(out, clock)
    p.start("vm/root", 1000)
    for _ in range(50):
        clock.now += 0.01  # 0.5 s of 50 small writes
        p.advance(10)
    p.done()
    draws = out.getvalue().count("\r")
    assert 2 <= draws <= 1 + 5 + 1 + 1  # start, ≤5 in 0.5 s, done (and rounding)
    assert out.getvalue().endswith("done\n")


def test_json_events() -> None:
    out, clock = io.StringIO(), Clock()
    p = JsonProgress(out, clock)
    p.start("vm/disk0", 4000, vm="v", dataset="disk0")
    for _ in range(30):
        clock.now += 0.1
        p.advance(100)
    p.done(ok=False, error="boom")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert 2 <= kinds.count("progress") <= 3  # every >= 1 s over 3 s
    assert events[0]["dataset"] == "disk0" and events[0]["total"] == 4000
    last = events[-1]
    assert last["ok"] is False and last["error"] == "boom" and last["bytes"] == 3000
    assert last["rate"] == 1000
    prog = next(e for e in events if e["event"] == "progress")
    assert prog["eta"] is not None and prog["rate"] > 0


def test_for_stream_picks_json_off_a_terminal() -> None:
    assert isinstance(for_stream(io.StringIO()), JsonProgress)


# -- the one size grammar (--bwlimit, --capacity, config sizes) ---------------------

UNITS = ["", "K", "M", "G", "T", "P", "E"]


@given(st.integers(0, 1 << 70))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(0, 10**6), st.sampled_from(UNITS),
       st.sampled_from(["", "B", "iB", "ib", "b"]), st.booleans(), st.sampled_from(["", " "]))
def test_parse_size_units(n: int, unit: str, tail: str, lower: bool, gap: str) -> None:
    text = f"{n}{gap}{unit.lower() if lower else unit}{tail if unit else tail[-1:]}"
    assert parse_size(text) == n * 1024 ** UNITS.index(unit)


@given(st.decimals(0, 10**6, places=3), st.sampled_from(UNITS[1:]))
def test_parse_size_fractions_round_down_exactly(x: object, unit: str) -> None:
    from decimal import Decimal
    assert isinstance(x, Decimal)
    got = parse_size(f"{x}{unit}")
    assert got == int(x * 1024 ** UNITS.index(unit))


def test_parse_size_examples_and_refusals() -> None:
    assert [parse_size(t) for t in ("50MiB", "1.5G", "100k", "4096", "512B", ".5K")] == \
        [50 << 20, 3 << 29, 100 << 10, 4096, 512, 512]
    for bad in ("", "-1G", "1G5", "5X", "1e3", "nan", "inf", "G", "1.2.3", "0x10", "1 GiBs"):
        try:
            parse_size(bad)
        except SizeError as e:
            assert "not a size" in str(e)
        else:
            raise AssertionError(f"{bad!r} parsed")
