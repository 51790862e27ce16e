"""What identifies the shared disk, so that both sides can check they use the same one."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ..block.node import Node

_SAMPLE = 65536


def _host_file(node: Node) -> tuple[Node, int] | None:
    """The node under ``node`` that holds its bytes in a host file, and that file's
    descriptor (the ``file`` driver's ``fd``; -1 while it is closed)."""
    f: Node | None = node
    while f is not None:
        fd = getattr(f, "fd", None)
        if fd is not None:
            return (f, fd) if fd >= 0 else None
        f = f.file or f.backing
    return None


async def disk_identity(node: Node) -> dict[str, Any]:
    """``device``/``inode`` of the file under the node (equal on both nodes of one host,
    or of one shared file system); ``fingerprint``: sha256 of the first 64 KiB and
    of 64 KiB at a few fixed offsets, read through the node.
    """
    ident: dict[str, Any] = {"size": node.length}
    host = _host_file(node)
    if host is not None:
        f, fd = host
        st = os.fstat(fd)
        ident["device"] = st.st_dev
        ident["inode"] = st.st_ino
        ident["filename"] = f.describe_filename()
    h = hashlib.sha256()
    for quarter in range(4):
        off = (node.length * quarter // 4) & ~(_SAMPLE - 1)
        n = min(_SAMPLE, node.length - off)
        if n > 0:
            h.update(await node.read(off, n))
    ident["fingerprint"] = h.hexdigest()
    return ident
