"""Shared test helpers: running coroutines, making images, calling the reference tools."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Coroutine
from typing import Any

import pytest

from blockrep.block import Graph
from blockrep.block.qcow2 import create as qcow2_create

TOOL_TIMEOUT = 60


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def tool(
    *args: str, check: bool = True, timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run a reference tool (qemu-img, qemu-io, ...) with a time bound."""
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is not installed; `make test` installs it")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


async def make_qcow2(
    path: str,
    size: int,
    *,
    cluster_size: int = 65536,
    backing: str | None = None,
    backing_fmt: str | None = None,
    version: int = 3,
) -> None:
    open(path, "wb").close()
    g = Graph()
    f = await g.add({"driver": "file", "filename": path})
    await qcow2_create(
        f,
        size,
        cluster_size=cluster_size,
        backing_file=backing,
        backing_format=backing_fmt,
        version=version,
    )
    await g.close_all()


def make_raw(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def open_image(g: Graph, path: str, fmt: str, read_only: bool = False):
    return await g.add(
        {"driver": fmt, "read-only": read_only, "file": {"driver": "file", "filename": path}}
    )
