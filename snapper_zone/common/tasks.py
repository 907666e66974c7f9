"""Stopping background tasks without losing a cancellation.

``task.cancel()`` then ``with suppress(CancelledError): await task`` also
swallows a cancellation of the *caller* that arrives while it waits, and
Python 3.11's ``asyncio.wait_for`` can drop a cancellation that lands as its
inner future completes, leaving a ``while True`` loop running that its stopper
then waits on forever. So: ``asyncio.timeout()`` instead of ``wait_for``
everywhere, and this to stop a task.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended; a cancellation of the
    caller meanwhile still propagates. Their exceptions are retrieved (a task
    that failed before it was stopped has been logged by its owner)."""
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for t in tasks:
        if not t.cancelled():
            t.exception()
