"""The reference tools (qemu-img, qemu-io, nbdinfo, ...) run with a time bound, and the
checks made with them on image files. A missing tool fails the test, never skips it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Coroutine
from typing import Any

import pytest

TOOL_TIMEOUT = 60


def run(coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
    """Run a coroutine to completion; with ``timeout``, bounded."""
    if timeout is None:
        return asyncio.run(coro)
    return asyncio.run(asyncio.wait_for(coro, timeout))


def run_async(coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
    return run(coro, timeout)


def tool(
    *args: str, check: bool = True, timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run a reference tool with a time bound; with ``check``, a failure is an assertion."""
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is not installed; `make test` installs it")
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def sha(b: bytes | bytearray) -> str:
    return hashlib.sha256(b).hexdigest()


def read_file(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sha_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_clean(
    path: str | os.PathLike[str], fmt: str | None = None, force_share: bool = False
) -> None:
    """qemu-img check: no check errors, no corruptions, no leaks."""
    args = ["qemu-img", "check", "--output=json"]
    if force_share:
        args.append("-U")
    if fmt:
        args += ["-f", fmt]
    r = tool(*args, str(path), check=False)
    assert r.returncode == 0, (str(path), r.returncode, r.stdout, r.stderr)
    info = json.loads(r.stdout)
    assert info.get("check-errors", 0) == 0 and info.get("corruptions", 0) == 0, info
    assert info.get("leaks", 0) == 0, info


def qio(path: str, fmt: str, *cmds: str) -> str:
    """qemu-io commands on an image file; none of them may fail."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = tool(*args, path)
    assert "failed" not in r.stdout, r.stdout
    return r.stdout


def assert_file_pattern(path, fmt: str, pattern: int, offset: int, length: int) -> None:
    """qemu-io on a file (the daemon that wrote it has exited): exactly ``pattern`` there."""
    r = tool(
        "qemu-io",
        "-r",
        "-f",
        fmt,
        "-c",
        f"read -P {pattern:#x} {offset} {length}",
        str(path),
        check=False,
    )
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, (
        str(path),
        r.stdout,
        r.stderr,
    )
    assert f"read {length}/{length} bytes at offset {offset}" in r.stdout, (
        str(path),
        r.stdout,
        r.stderr,
    )


def allocated_ranges(path, fmt: str = "qcow2") -> list[tuple[int, int]]:
    """Ranges an image holds in its own layer (qemu-img map, depth 0 data)."""
    r = tool("qemu-img", "map", "--output=json", "-f", fmt, str(path))
    out = []
    for e in json.loads(r.stdout):
        if e.get("depth", 0) == 0 and e.get("data") and e.get("present", True):
            out.append((e["start"], e["length"]))
    return out


def logical_sha256(path: str, fmt: str) -> str:
    """sha256 of an image's guest-visible bytes (qemu-img convert to raw)."""
    out = path + ".logical.raw"
    tool("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    digest = sha_file(out)
    os.unlink(out)
    return digest


def convert_to_raw(source: str, out: str, *, force_share: bool = False) -> bytes:
    """qemu-img convert ``source`` (a file or a json: filename) to raw; its bytes."""
    tool("qemu-img", "convert", *(["-U"] if force_share else []), "-O", "raw", source, out)
    data = read_file(out)
    os.unlink(out)
    return data
