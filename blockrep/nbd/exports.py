"""What the NBD server needs of an export, and the checks a request passes before it
reaches one (pure: the request, the export's size and mode, the connection's options).

``blockrep.export.Export`` is the export; the server knows it only through ``NBDExport``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from ..errors import BlockError
from . import proto as p
from .handshake import ExportInfo

# how a write the export took ends: None, or the error to report
WriteDone = Callable[[BlockError | None], None]

# the flags a request may carry, by command; any other bit is EINVAL
ALLOWED_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_DF,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: 0,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_CACHE: 0,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
}


class BlockStatusExtent(Protocol):
    """One run of block status as the export reports it."""

    @property
    def length(self) -> int: ...

    @property
    def data(self) -> bool: ...

    @property
    def zero(self) -> bool: ...


class NBDExport(ExportInfo, Protocol):
    """What the server needs of an export (``blockrep.export.Export`` is the one)."""

    clients: set[Any]

    def enter(self) -> Awaitable[None]:
        """Admit one request (waits while the export is quiesced)."""
        ...

    def leave(self) -> None: ...

    def read(self, offset: int, nbytes: int) -> Awaitable[bytes]: ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]: ...

    def write_zeroes(
        self, offset: int, nbytes: int, may_unmap: bool, fua: bool
    ) -> Awaitable[None]: ...

    def discard(self, offset: int, nbytes: int) -> Awaitable[None]: ...

    def flush(self) -> Awaitable[None]: ...

    def block_status(self, offset: int, nbytes: int) -> Awaitable[Sequence[BlockStatusExtent]]: ...

    # The fast path (issue 15): a request without a task, or a refusal that leaves
    # nothing done so the server takes the general path above.

    def try_write(self, offset: int, data: bytes | memoryview, fua: bool, done: WriteDone) -> bool:
        """True when the export took the write, its own enter..leave included: ``done``
        then runs exactly once (maybe before try_write returns) with None or the
        error. False: nothing was done. ``data`` stays valid until ``done``."""
        ...

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        """The bytes, read synchronously; None for the general path."""
        ...

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        """(fd, file offset) when the bytes are exactly that open file's, right now."""
        ...


def check_request(req: p.Request, exp: NBDExport, structured: bool, meta: bool) -> int:
    """Validate a request before it reaches the export; 0 or an NBD errno.

    ``structured``: the client negotiated structured replies; ``meta``: it selected the
    base:allocation context (block status).
    """
    allowed = ALLOWED_FLAGS.get(req.type)
    if allowed is None or req.flags & ~allowed:
        return p.NBD_EINVAL
    if req.flags & p.CMD_FLAG_DF and not structured:
        return p.NBD_EINVAL
    if req.type == p.CMD_BLOCK_STATUS and not meta:
        return p.NBD_EINVAL
    if req.type in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES) and not exp.writable:
        return p.NBD_EPERM
    if req.type == p.CMD_FLUSH:
        return 0
    if req.type == p.CMD_READ and req.length > p.MAX_BUFFER:
        return p.NBD_EINVAL
    if req.offset > exp.size or req.length > exp.size - req.offset:
        return p.NBD_ENOSPC if req.type in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.NBD_EINVAL
    return 0
