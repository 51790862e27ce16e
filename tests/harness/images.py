"""Test images: qcow2 made by blockrep's one creator, raw files, and node options."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from blockrep.block import Graph, Node
from blockrep.qcow2.create import create_file

MiB = 1 << 20


async def make_qcow2(
    path: str | os.PathLike[str],
    size: int,
    *,
    cluster_size: int = 65536,
    backing: str | None = None,
    backing_fmt: str | None = None,
    version: int = 3,
) -> None:
    await create_file(
        str(path),
        size,
        cluster_size=cluster_size,
        backing_file=backing,
        backing_format=backing_fmt,
        version=version,
    )


def make_raw(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def raw(path: str, size: int = 4 * MiB) -> str:
    """A sparse raw file of ``size`` bytes; returns its path."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def open_image(g: Graph, path: str, fmt: str, read_only: bool = False) -> Node:
    return await g.add(
        {"driver": fmt, "read-only": read_only, "file": {"driver": "file", "filename": path}}
    )


def file_opts(path: str) -> dict[str, Any]:
    return {"driver": "file", "filename": path}


def fmt_opts(name: str, path: str, fmt: str = "qcow2", **extra: Any) -> dict[str, Any]:
    return {"driver": fmt, "node-name": name, "file": file_opts(path), **extra}


def qcow2(
    path: str | os.PathLike[str],
    size: int = 4 * MiB,
    backing: str | None = None,
    cluster: int | None = None,
) -> str:
    """An empty qcow2 file (over a qcow2 backing file when ``backing``); returns its path.

    Callable from a coroutine too: the creator then runs on a loop in a thread of its own.
    """
    coro = make_qcow2(
        path,
        size,
        cluster_size=cluster or 65536,
        backing=backing,
        backing_fmt="qcow2" if backing else None,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
    else:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, coro).result()
    return str(path)
