"""The secondary's hidden/active overlays in ``--buffer-dir``: named by owner, locked while live.

The overlays are throw-away buffers (a restart makes new ones), usually in /dev/shm.
A SIGKILLed secondary cannot remove its own, so the next secondary of the same disk
removes them at start. It removes only what it can prove is stale:

* the names carry the disk's identity, ``blockrep-STEM-DISKID-TAG-{hidden,active}.qcow2``
  (STEM the disk's file name, DISKID a digest of its absolute path, TAG one run's);
  another disk's buffers — even one with the same file name — never match;
* the hidden overlay is held with ``flock(2)`` for the owner's life, and it gets its
  name only once locked (made under a temporary name, then renamed), so a live
  secondary's buffers are never seen unlocked. The kernel drops the lock when its
  owner dies, however it dies: a lock we can take means the owner is gone.

``flock`` locks do not interact with the OFD byte-range locks the file driver takes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass

from ..qcow2.create import create_file

log = logging.getLogger("blockrep.ha")


def disk_tag(disk: str) -> str:
    """``STEM-DISKID``: which disk a set of buffers belongs to."""
    path = os.path.abspath(disk)
    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    return f"{os.path.basename(path)}-{digest}"


@dataclass
class Buffers:
    """One run's overlays and the lock that says they are in use."""

    hidden: str
    active: str
    lock_fd: int

    def remove(self) -> None:
        """An orderly stop: active first (an active without its hidden never exists), then hidden."""
        for path in (self.active, self.hidden):
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def remove_stale(bdir: str, disk: str) -> list[str]:
    """Remove the buffers earlier, dead runs of a secondary for ``disk`` left in ``bdir``.

    Returns the paths removed. Buffers whose owner is alive (their lock is held) stay.
    """
    pattern = re.compile(rf"blockrep-{re.escape(disk_tag(disk))}-([0-9a-f]+)-hidden\.qcow2")
    removed: list[str] = []
    try:
        names = os.listdir(bdir)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        hidden = os.path.join(bdir, name)
        try:
            fd = os.open(hidden, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its secondary is alive
            active = hidden[: -len("hidden.qcow2")] + "active.qcow2"
            for path in (active, hidden):
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
    for path in removed:
        log.warning("removed the stale buffer %s of an earlier secondary of this disk", path)
    return removed


async def create(bdir: str, disk: str, size: int) -> Buffers:
    """Make this run's overlays; the hidden one is locked before it gets its name."""
    prefix = os.path.join(bdir, f"blockrep-{disk_tag(disk)}-{uuid.uuid4().hex[:8]}")
    hidden, active = f"{prefix}-hidden.qcow2", f"{prefix}-active.qcow2"
    tmp = f"{prefix}-hidden.tmp"
    await create_file(tmp, size)
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, hidden)
        await create_file(active, size)
    except BaseException:
        for path in (tmp, hidden, active):
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(fd)
        raise
    return Buffers(hidden, active, fd)
