"""The event loop the long-running commands run on.

uvloop when it is installed (issue 15 measured +16–20 % on 4 KiB requests and +19 % on
sequential ones against asyncio's own loop), asyncio's loop otherwise — or always with
``BLOCKREP_LOOP=asyncio``, which keeps the standard loop one switch away (the tests run
both). ``status`` and logs need not say which: ``loop_name()`` does.

The cyclic garbage collector is tuned for a loop that runs callbacks by the hundred
thousand a second: what exists when the loop starts (modules, the graph's classes) is
frozen out of collections, and a young collection runs every GC_THRESHOLD allocations
instead of Python's 700 (issue 15: a replicating primary's CPU per 4 KiB write, six
alternating runs: 82, 92, 98 us with Python's collector, 68, 82, 79 tuned).
``BLOCKREP_GC=python`` keeps Python's own.

The loop polls a while after bytes arrive before it sleeps (polling.py), as set by
``BLOCKREP_POLL_MAX_NS``, ``BLOCKREP_POLL_GROW`` and ``BLOCKREP_POLL_SHRINK``.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from . import polling

T = TypeVar("T")

GC_THRESHOLD = 50_000  # allocations between young collections (Python: 700)


def _uvloop() -> Any:
    if os.environ.get("BLOCKREP_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def tune_gc() -> None:
    if os.environ.get("BLOCKREP_GC", "").lower() != "python":
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop, the collector tuned for it and the
    polling after I/O set from the environment (polling.py)."""
    try:
        polling.configure(os.environ)
    except ValueError as e:
        main.close()
        raise SystemExit(f"blockrep: {e}") from None
    tune_gc()
    uv = _uvloop()
    if uv is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
        return runner.run(main)


def loop_name() -> str:
    return "uvloop" if _uvloop() is not None else "asyncio"
