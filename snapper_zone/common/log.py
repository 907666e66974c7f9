"""Structured logs: one bunyan-compatible JSON object per line.

Built on the stdlib :mod:`logging` module, so every module keeps using
``log = logging.getLogger(__name__)`` and passes fields the stdlib way::

    log.info("received", extra={"vm": vm_uuid, "snapshot": name, "bytes": n})
    log.exception("receive failed", extra={"vm": vm_uuid})   # -> err.stack

and the output can be read by Triton's ``bunyan`` tool::

    {"v":0,"name":"snapperd","hostname":"...","pid":123,"level":30,
     "msg":"received","time":"2024-05-01T12:00:00.123Z","vm":"...","bytes":42}

For fields shared by many calls (a transfer's vm and snapshot) ``child(log,
vm=...)`` returns an adapter that adds them to every record, like bunyan's
``log.child()``.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "TRACE",
    "BunyanFormatter",
    "ChildLogger",
    "bunyan_level",
    "child",
    "parse_level",
    "setup_logging",
]

# Bunyan has a level below DEBUG; give the stdlib one so `trace` logs work.
TRACE = 5

# bunyan: trace 10, debug 20, info 30, warn 40, error 50, fatal 60.
_BUNYAN_LEVELS: tuple[tuple[int, int], ...] = (
    (logging.DEBUG, 10),  # below DEBUG (TRACE and friends)
    (logging.INFO, 20),
    (logging.WARNING, 30),
    (logging.ERROR, 40),
    (logging.CRITICAL, 50),
)

_LEVEL_NAMES = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "critical": logging.CRITICAL,
}

# Everything a LogRecord carries by itself; any other attribute came from `extra`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)

# Bunyan's core fields. An `extra` of the same name (say a duration called
# "time") must not corrupt them, nor vanish: it is written as "time_".
_CORE = ("v", "name", "hostname", "pid", "level", "msg", "time")


def bunyan_level(levelno: int) -> int:
    """Map a stdlib level number to bunyan's (10..60); in-between levels round down."""
    for below, bunyan in _BUNYAN_LEVELS:
        if levelno < below:
            return bunyan
    return 60


def parse_level(level: int | str) -> int:
    """A stdlib level number from an int or a name (bunyan's or the stdlib's)."""
    if isinstance(level, int):
        return level
    key = level.strip().lower()
    if key in _LEVEL_NAMES:
        return _LEVEL_NAMES[key]
    if key.isdigit():
        return int(key)
    raise ValueError(f"unknown log level {level!r} (trace, debug, info, warn, error, fatal)")


def _format_time(created: float) -> str:
    # ISO-8601 UTC, milliseconds, 'Z': what bunyan (JavaScript's toISOString) writes.
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _err_field(exc: BaseException, tb_text: str | None = None) -> dict[str, Any]:
    """Bunyan's err serializer: message, name, stack, and code when the error has one."""
    if tb_text is None:
        tb_text = "".join(traceback.format_exception(exc))
    err: dict[str, Any] = {
        "message": str(exc),
        "name": type(exc).__name__,
        "stack": tb_text.rstrip("\n"),
    }
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, OSError) and exc.errno is not None:
        # Like node's err.code for system errors: "ENOENT", "EIO".
        code = errno.errorcode.get(exc.errno)
    if isinstance(code, str | int) and not isinstance(code, bool):
        err["code"] = code
    return err


def _json_default(obj: object) -> Any:
    # Logging must never raise over an odd field (a Path, a UUID, bytes...).
    if isinstance(obj, BaseException):
        return _err_field(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    return str(obj)


class BunyanFormatter(logging.Formatter):
    """Formats a LogRecord as one line of bunyan JSON.

    ``name`` is the service name (bunyan's ``name``, e.g. "snapperd"); the
    stdlib logger's own name goes into ``component`` when it says more.
    """

    def __init__(self, name: str, hostname: str | None = None) -> None:
        super().__init__()
        self.service = name
        self.hostname = hostname if hostname is not None else socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "v": 0,
            "name": self.service,
            "hostname": self.hostname,
            "pid": record.process,
            "level": bunyan_level(record.levelno),
            "msg": record.getMessage(),
            "time": _format_time(record.created),
        }
        if record.name not in ("root", self.service):
            out["component"] = record.name
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            out[f"{key}_" if key in _CORE else key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["err"] = _err_field(exc, self.formatException(record.exc_info))
        elif isinstance(out.get("err"), BaseException):
            out["err"] = _err_field(out["err"])
        if record.stack_info:
            out["stack_info"] = record.stack_info
        try:
            return json.dumps(out, default=_json_default)
        except (TypeError, ValueError) as e:
            # e.g. a circular structure in an extra; keep the line and say why.
            slim = {k: out[k] for k in _CORE}
            slim["log_error"] = f"cannot encode fields: {e}"
            return json.dumps(slim, default=_json_default)


class _BunyanHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    name: str, level: int | str = "info", stream: IO[str] | None = None
) -> logging.Logger:
    """Send every log record in the process to ``stream`` as bunyan JSON lines.

    Installs the handler on the root logger (so library loggers such as
    asyncssh's are structured too), replacing one installed by an earlier
    call, and returns ``logging.getLogger(name)``. ``stream`` defaults to
    stderr: stdout belongs to CLI output, and SMF captures both.
    """
    logging.addLevelName(TRACE, "TRACE")
    handler = _BunyanHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(BunyanFormatter(name))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BunyanHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    return logging.getLogger(name)


class ChildLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds fixed fields to each record; per-call ``extra`` wins."""

    def __init__(self, logger: logging.Logger, fields: Mapping[str, object]) -> None:
        super().__init__(logger, dict(fields))

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        # The stdlib adapter (3.11) replaces the call's extra; merge instead.
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs

    def child(self, **fields: object) -> ChildLogger:
        return ChildLogger(self.logger, {**(self.extra or {}), **fields})


def child(logger: logging.Logger | ChildLogger, **fields: object) -> ChildLogger:
    """Bunyan's ``log.child({...})``: a logger whose records all carry ``fields``."""
    if isinstance(logger, ChildLogger):
        return logger.child(**fields)
    return ChildLogger(logger, fields)
