"""Progress of a stream for people (a one-line bar) and for programs (JSON lines).

On a terminal: one line redrawn in place at most ~10 times a second, with
bytes moved, rate (MB/s, 10^6 bytes) and ETA when the size is known. Not on a
terminal: one JSON object per line on stderr: a ``start`` event, ``progress``
at most once a second, and ``done`` (with ``ok`` and ``error``), so logs and
callers such as a CN agent can follow a push without parsing a bar.

The formatting functions are pure; the reporters take a clock so they can be
tested without waiting.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol, TextIO

Clock = Callable[[], float]


def format_bytes(n: float) -> str:
    """Binary units, 3 significant-ish digits: ``512 B``, ``1.5 KiB``, ``12.0 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# The one size grammar (``--bwlimit``, ``--capacity``, sizes in config files):
# a number, optionally fractional, then an optional unit K, M, G, T, P, E (binary:
# powers of 1024, as ZFS quotes sizes), optionally followed by "iB" or "B";
# case-insensitive. ``50MiB``, ``1.5G``, ``100k``, ``4096``, ``512B``.
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_UNITS = "KMGTPE"


class SizeError(ValueError):
    """Text that is not a size: the message says what is expected."""


def parse_size(text: str) -> int:
    """``50MiB`` -> 52428800: the one size parser (bytes; fractions rounded down).

    SizeError on anything else (negative, empty, unknown unit, NaN, ...)."""
    m = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise SizeError(f"{text!r} is not a size: a number of bytes with an optional unit "
                        "K, M, G, T, P or E (powers of 1024; e.g. 50MiB, 1.5G, 100k)")
    unit = m.group(2).upper()
    power = _UNITS.index(unit) + 1 if unit else 0
    # Decimal: 1.1T is exact, as float would not be for every input.
    return int(Decimal(m.group(1)) * (1 << (10 * power)))


def format_size(n: int) -> str:
    """Bytes in the largest unit that states them exactly (``parse_size``'s inverse):
    ``52428800`` -> ``50MiB``, ``1000`` -> ``1000``."""
    if n < 0:
        raise SizeError(f"{n} is not a size: negative")
    for power in range(len(_UNITS), 0, -1):
        if n and n % (1 << (10 * power)) == 0:
            return f"{n >> (10 * power)}{_UNITS[power - 1]}iB"
    return str(n)


def format_rate(bytes_per_second: float) -> str:
    """MB/s in decimal units, as network and disk rates are usually quoted."""
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def format_eta(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``--:--`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360000:
        return "--:--"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def eta(done: int, total: int | None, rate: float) -> float | None:
    if not total or rate <= 0:
        return None
    return max(total - done, 0) / rate


def render_bar(label: str, done: int, total: int | None, rate: float,
               width: int = 80) -> str:
    """One line, at most ``width`` characters: label, bar or bytes, rate, ETA."""
    tail = f" {format_bytes(done)}"
    if total:
        frac = min(done / total, 1.0)
        tail += f"/{format_bytes(total)} {frac * 100:3.0f}%"
    tail += f" {format_rate(rate)} ETA {format_eta(eta(done, total, rate))}"
    room = width - len(tail) - 1
    if total and room >= 20:
        bar_w = max(room - min(len(label), room // 2) - 3, 10)
        label_w = room - bar_w - 3
        filled = int(bar_w * min(done / total, 1.0))
        bar = "[" + "#" * filled + "-" * (bar_w - filled) + "]"
        return f"{_clip(label, label_w):<{label_w}} {bar}{tail}"[:width]
    return f"{_clip(label, max(room, 0))}{tail}"[:width]


def _clip(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    return text[: max(n - 1, 0)] + "…" if n > 0 else ""


class Reporter(Protocol):
    """Follows one stream at a time: ``start``, any number of ``advance``, ``done``."""

    def start(self, label: str, total: int | None, **fields: Any) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def done(self, ok: bool = True, error: str | None = None) -> None: ...


class _Base:
    def __init__(self, stream: TextIO, clock: Clock) -> None:
        self.stream = stream
        self.clock = clock
        self.label = ""
        self.total: int | None = None
        self.bytes = 0
        self.started = 0.0
        self.last = 0.0
        self.fields: dict[str, Any] = {}

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        self.label, self.total, self.fields = label, total, fields
        self.bytes = 0
        self.started = self.last = self.clock()

    @property
    def rate(self) -> float:
        return self.bytes / max(self.clock() - self.started, 1e-6)


class TtyProgress(_Base):
    """A bar on a terminal, redrawn in place (``\\r``) at most every ``interval`` s."""

    def __init__(self, stream: TextIO, clock: Clock = time.monotonic,
                 interval: float = 0.1, width: int = 80) -> None:
        super().__init__(stream, clock)
        self.interval = interval
        self.width = width

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        super().start(label, total, **fields)
        self._draw()

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._draw()

    def _draw(self) -> None:
        # Clear to end of line: a shorter redraw must not leave old characters.
        self.stream.write("\r" + render_bar(self.label, self.bytes, self.total, self.rate,
                                            self.width - 1) + "\x1b[K")
        self.stream.flush()

    def done(self, ok: bool = True, error: str | None = None) -> None:
        self._draw()
        self.stream.write(" done\n" if ok else f" FAILED: {error or 'error'}\n")
        self.stream.flush()


class JsonProgress(_Base):
    """JSON lines: ``start``, ``progress`` at most every ``interval`` s, ``done``."""

    def __init__(self, stream: TextIO, clock: Clock = time.monotonic,
                 interval: float = 1.0) -> None:
        super().__init__(stream, clock)
        self.interval = interval

    def _emit(self, event: str, **extra: Any) -> None:
        obj = {"event": event, "label": self.label, **self.fields, "bytes": self.bytes,
               "total": self.total, **extra}
        self.stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.stream.flush()

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        super().start(label, total, **fields)
        self._emit("start")

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.rate
            self._emit("progress", rate=round(rate), eta=_round(eta(self.bytes, self.total,
                                                                    rate)))

    def done(self, ok: bool = True, error: str | None = None) -> None:
        self._emit("done", ok=ok, error=error, rate=round(self.rate),
                   seconds=round(self.clock() - self.started, 3))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


class NoProgress:
    """For callers that want silence (tests, library use)."""

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def done(self, ok: bool = True, error: str | None = None) -> None:
        pass


def for_stream(stream: TextIO | None = None) -> Reporter:
    """A bar if ``stream`` (default stderr) is a terminal, JSON lines otherwise."""
    out = stream if stream is not None else sys.stderr
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    return TtyProgress(out) if tty else JsonProgress(out)


CHOICES = ("auto", "bar", "json", "none")


def for_choice(choice: str, stream: TextIO | None = None) -> Reporter:
    """The reporter a ``--progress`` choice names (``CHOICES``) on ``stream`` (stderr)."""
    out = stream if stream is not None else sys.stderr
    if choice == "none":
        return NoProgress()
    if choice == "json":
        return JsonProgress(out)
    if choice == "bar":
        return TtyProgress(out)
    return for_stream(out)
