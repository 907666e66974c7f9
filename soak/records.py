"""What a soak run records: plain data, no I/O, so invariants can be judged offline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# vm -> zone uuid -> snapshot name -> dataset label -> guid (complete snapshots only)
Holdings = dict[str, dict[str, dict[str, dict[str, int]]]]


@dataclass
class PushRecord:
    cn: str
    vm: str
    snapshot: str
    t: float  # seconds since the run started
    ok: bool
    durability: str = ""
    zones: list[str] = field(default_factory=list)  # the zones the ack named
    guids: dict[str, int] = field(default_factory=dict)  # the CN's, at push time
    bytes: int = 0
    error: str = ""
    cut_after: int | None = None  # a push truncated on purpose (a fault)
    attempts: list[str] = field(default_factory=list)  # failed tries before the outcome
    # zone uuid -> "ok" | "missing" | "incomplete" | "guid-mismatch" | "unreachable":
    # what each named zone answered right after the ack.
    ack_check: dict[str, str] = field(default_factory=dict)

    @property
    def acked(self) -> bool:
        return self.ok and bool(self.zones)


@dataclass
class DeleteRecord:
    vm: str
    snapshot: str
    t: float
    zone: str
    ok: bool
    error: str = ""


@dataclass
class RestoreRecord:
    vm: str
    snapshot: str
    t: float
    zone: str
    ok: bool
    identical: bool | None = None
    error: str = ""
    final: bool = False  # part of the after-settle sample


@dataclass
class FaultRecord:
    kind: str
    planned_at: float
    started: float
    ended: float
    target: str = ""
    detail: str = ""
    error: str = ""
    # For a loss (kill, replace, lose): seconds from the loss until every
    # snapshot acked before it was on two zones again; None if it never was.
    back_to_two_s: float | None = None
    loss: bool = False


@dataclass
class PartialState:
    """What a zone reports of unfinished receives for one VM."""

    resume_tokens: list[str] = field(default_factory=list)  # dataset labels with a token
    incomplete: list[tuple[str, int]] = field(default_factory=list)  # (name, created)


@dataclass
class RssSample:
    name: str
    pid: int
    kib: int


def to_json(obj: Any) -> Any:
    return asdict(obj)


@dataclass
class AgentRun:
    """One life of one ``snapper agent`` process (wall-clock times, ``time.time()``)."""

    cn: str
    vm: str
    started: float
    ended: float | None = None  # None while it runs
    killed: bool = False  # SIGKILL (a fault), not the driver's SIGTERM at the end
    # What it printed, one JSON object per push (``snapper agent --json``):
    # snapshot, ok, error, started/ended/retry_at on the agent's (compressed) clock.
    outcomes: list[dict[str, Any]] = field(default_factory=list)
