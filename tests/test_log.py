"""Structured logs: each line is one bunyan JSON record."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from snapper_zone.common.log import (
    TRACE,
    BunyanFormatter,
    bunyan_level,
    child,
    parse_level,
    setup_logging,
)

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """setup_logging into a buffer; put the root logger back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    setup_logging("snapperd", "trace", buf)
    yield buf
    for h in list(root.handlers):
        if h not in saved[0]:
            root.removeHandler(h)
    root.setLevel(saved[1])


def records(buf: io.StringIO) -> list[dict[str, Any]]:
    lines = buf.getvalue().splitlines()
    assert all(line.startswith("{") for line in lines), lines
    return [json.loads(line) for line in lines]


def test_core_fields(stream: io.StringIO) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    logging.getLogger("snapperd").info("hello %s", "world")
    (rec,) = records(stream)
    assert rec["v"] == 0
    assert rec["name"] == "snapperd"
    assert rec["hostname"] == socket.gethostname()
    assert rec["pid"] == os.getpid()
    assert rec["level"] == 30
    assert rec["msg"] == "hello world"
    assert TIME_RE.fullmatch(rec["time"]), rec["time"]
    when = datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
    assert before <= when <= datetime.now(UTC) + timedelta(seconds=1)
    assert "component" not in rec  # the service's own logger adds nothing


def test_level_numbers(stream: io.StringIO) -> None:
    log = logging.getLogger("snapperd")
    log.log(TRACE, "t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [r["level"] for r in records(stream)] == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize(
    ("levelno", "bunyan"),
    [(1, 10), (TRACE, 10), (10, 20), (15, 20), (20, 30), (30, 40), (40, 50), (50, 60), (99, 60)],
)
def test_bunyan_level(levelno: int, bunyan: int) -> None:
    assert bunyan_level(levelno) == bunyan


def test_parse_level() -> None:
    assert parse_level("warn") == logging.WARNING
    assert parse_level("FATAL") == logging.CRITICAL
    assert parse_level("trace") == TRACE
    assert parse_level(logging.DEBUG) == logging.DEBUG
    assert parse_level("20") == 20
    with pytest.raises(ValueError, match="unknown log level"):
        parse_level("loud")


def test_level_filters(stream: io.StringIO) -> None:
    buf = io.StringIO()
    setup_logging("snapperd", "warn", buf)
    log = logging.getLogger("snapperd")
    log.info("hidden")
    log.warning("shown")
    assert [r["msg"] for r in records(buf)] == ["shown"]
    assert stream.getvalue() == ""  # the first handler was replaced, not kept


def test_extra_fields(stream: io.StringIO) -> None:
    vm = str(uuid.uuid4())
    logging.getLogger("snapper_zone.receive").info(
        "received",
        extra={"vm": vm, "snapshot": "s1", "bytes": 12345, "path": Path("/x"), "ok": True},
    )
    (rec,) = records(stream)
    assert rec["vm"] == vm
    assert rec["snapshot"] == "s1"
    assert rec["bytes"] == 12345
    assert rec["path"] == "/x"  # not JSON by itself: rendered as text, never an error
    assert rec["ok"] is True
    assert rec["component"] == "snapper_zone.receive"
    assert rec["name"] == "snapperd"


def test_extra_cannot_clobber_core_fields(stream: io.StringIO) -> None:
    logging.getLogger("snapperd").info("x", extra={"time": 1.5, "hostname": "evil", "v": 9})
    (rec,) = records(stream)
    assert TIME_RE.fullmatch(rec["time"])
    assert rec["hostname"] == socket.gethostname()
    assert rec["v"] == 0
    assert (rec["time_"], rec["hostname_"], rec["v_"]) == (1.5, "evil", 9)


def test_exception_renders_err_stack(stream: io.StringIO) -> None:
    class ZfsError(Exception):
        code = "ZfsReceiveFailed"

    def fail() -> None:
        raise ZfsError("cannot receive: destination has been modified")

    try:
        fail()
    except ZfsError:
        logging.getLogger("snapperd").exception("receive failed", extra={"vm": "v1"})
    (rec,) = records(stream)
    assert rec["level"] == 50
    assert rec["msg"] == "receive failed"
    assert rec["vm"] == "v1"
    err = rec["err"]
    assert err["message"] == "cannot receive: destination has been modified"
    assert err["name"] == "ZfsError"
    assert err["code"] == "ZfsReceiveFailed"
    assert err["stack"].startswith("Traceback (most recent call last):")
    assert "in fail" in err["stack"]
    assert err["stack"].rstrip().endswith("cannot receive: destination has been modified")


def test_err_passed_as_field(stream: io.StringIO) -> None:
    logging.getLogger("snapperd").warning("retrying", extra={"err": OSError(5, "I/O error")})
    (rec,) = records(stream)
    assert rec["err"]["name"] == "OSError"
    assert rec["err"]["code"] == "EIO"
    assert "I/O error" in rec["err"]["message"]


def test_multiline_message_stays_one_line(stream: io.StringIO) -> None:
    logging.getLogger("snapperd").error("zfs said:\ncannot open 'x'\n", extra={"b": b"\xff"})
    assert len(stream.getvalue().splitlines()) == 1
    (rec,) = records(stream)
    assert rec["msg"] == "zfs said:\ncannot open 'x'\n"
    assert rec["b"] == "\\xff"


def test_unencodable_fields_keep_the_line(stream: io.StringIO) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    logging.getLogger("snapperd").info("odd", extra={"loop": loop})
    (rec,) = records(stream)
    assert rec["msg"] == "odd"
    assert "log_error" in rec


def test_child_adds_fields(stream: io.StringIO) -> None:
    log = child(logging.getLogger("snapperd"), vm="v1", snapshot="s1")
    log.info("start")
    log.info("progress", extra={"bytes": 10, "snapshot": "override"})
    sub = child(log, dataset="disk0")
    sub.info("dataset")
    start, progress, dataset = records(stream)
    assert (start["vm"], start["snapshot"]) == ("v1", "s1")
    assert (progress["vm"], progress["snapshot"], progress["bytes"]) == ("v1", "override", 10)
    assert (dataset["vm"], dataset["snapshot"], dataset["dataset"]) == ("v1", "s1", "disk0")


def test_formatter_alone() -> None:
    fmt = BunyanFormatter("snapper", hostname="cn7")
    rec = logging.LogRecord("snapper", logging.WARNING, __file__, 1, "m %d", (1,), None)
    out = json.loads(fmt.format(rec))
    assert (out["name"], out["hostname"], out["level"], out["msg"]) == ("snapper", "cn7", 40, "m 1")
