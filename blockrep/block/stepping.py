"""Coroutines stepped by hand: started in the caller's step, finished elsewhere.

The fast path (fastpath.py) runs requests as callbacks; where one must fall back to a
coroutine, that coroutine takes its first step at once (``start_now``), so what it does
before it first waits — a local pwrite, a request queued on the replication link —
keeps its place in request order, and only the rest runs as a task. Quorum's fan-out
starts its children the same way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from ..errors import BlockError
from .node import Done

log = logging.getLogger("blockrep.block")

_RUNNING: set[asyncio.Future[None]] = set()  # coroutines start_now() handed to tasks


def start_now(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro``: its first step here and now, the rest as a task."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return
    t = asyncio.ensure_future(resume_later(coro, yielded))
    _RUNNING.add(t)
    t.add_done_callback(_RUNNING.discard)


async def report(aw: Awaitable[None], done: Done, what: str) -> None:
    """Await a general-path request and hand its outcome to a fast-path ``done``:
    None, its BlockError, or EIO for a bug (logged) or a cancellation (shutdown)."""
    try:
        await aw
    except BlockError as e:
        done(e)
    except asyncio.CancelledError:
        done(BlockError(errno.EIO, "request cancelled"))
        raise
    except Exception as e:  # noqa: BLE001 - a bug costs this request, never the loop
        log.exception("%s failed", what)
        done(BlockError(errno.EIO, str(e)))
    else:
        done(None)


async def resume_later(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """A task's body: go on with a coroutine already stepped once."""
    await resume(coro, yielded)


@types.coroutine
def resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """Await a coroutine that was already stepped once and yielded ``yielded``.

    What ``await`` does after its first step: pass the yielded future up to the
    task, and pass the task's answer (a value, an exception, a cancellation) down.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - thrown in by the task: forwarded
            try:
                yielded = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return
