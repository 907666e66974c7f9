"""Cancellations are never lost: the one way to wait with a deadline and the one
way to stop a task.

CI once hung for its whole 90 minutes: a coordinator's mover was cancelled at
the moment its ZooKeeper answer arrived; Python 3.11's ``asyncio.wait_for``
returned the answer and dropped the cancellation, the mover went back to
waiting for work, and ``Coordinator.stop()`` waited for it forever.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from snapper_zone.common.tasks import cancel_and_wait

ROOT = Path(__file__).resolve().parent.parent


def test_no_wait_for_in_the_product() -> None:
    """``asyncio.timeout()`` instead: ``wait_for`` can swallow a cancellation (3.11)."""
    found = []
    for top in ("snapper_zone", "replication", "rebalance"):
        for f in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "wait_for" and \
                        isinstance(node.value, ast.Name) and node.value.id == "asyncio":
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.ImportFrom) and node.module == "asyncio" and \
                        any(a.name == "wait_for" for a in node.names):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert found == []
    assert len(list((ROOT / "rebalance").rglob("*.py"))) > 5  # the walk found the code


async def test_a_cancel_landing_with_the_answer_is_kept() -> None:
    """The race that hung CI, made deterministic: the awaited answer and the
    cancellation arrive in the same turn of the loop."""
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.Event()
    after: list[str] = []

    async def worker() -> None:
        while True:  # a service loop, as the mover's
            waiting.set()
            async with asyncio.timeout(10):
                await asyncio.shield(answer)
            after.append("went on")

    task = asyncio.create_task(worker())
    await waiting.wait()  # the worker is blocked on the answer now
    answer.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after == []


async def test_cancel_and_wait_stops_tasks_and_keeps_the_callers_cancel() -> None:
    started = asyncio.Event()
    cleaning = asyncio.Event()  # set when a stubborn task is in its cleanup
    release = asyncio.Event()  # ends that cleanup

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await release.wait()  # a cleanup that takes until the test says

    async def failing() -> None:
        raise RuntimeError("failed before it was stopped")

    release.set()
    a, b = asyncio.create_task(stubborn()), asyncio.create_task(failing())
    await started.wait()
    await cancel_and_wait(a, b)
    assert a.cancelled() and isinstance(b.exception(), RuntimeError)

    # The stopper itself cancelled while it waits: that cancel is not swallowed.
    release.clear()
    cleaning.clear()
    started.clear()
    c = asyncio.create_task(stubborn())
    await started.wait()
    stopper = asyncio.create_task(cancel_and_wait(c))
    await cleaning.wait()  # c is cancelled and in its cleanup: the stopper waits on it
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    await asyncio.wait([c])
    assert c.cancelled()
