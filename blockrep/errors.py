"""Every error blockrep reports, in one tree. A leaf module: it imports nothing of blockrep.

Each error carries the text the user sees (QEMU's wording wherever QEMU has one) and
the QMP error class it becomes; ``qmp/`` turns any of them into a QMP error in one
place, and ``nbd/`` maps ``BlockError.errno`` onto NBD error codes in one place.
"""

from __future__ import annotations

import errno as _errno
import os


class BlockrepError(Exception):
    """A refusal or failure with a message for the user and the QMP class it maps to."""

    qmp_class: str = "GenericError"

    def __init__(self, message: str, qmp_class: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if qmp_class is not None:
            self.qmp_class = qmp_class

    def __str__(self) -> str:
        return self.message


class QMPError(BlockrepError):
    """A command refused by the QMP layer itself (bad arguments, unknown command)."""


class BlockError(BlockrepError):
    """An I/O or configuration error in the data path: an errno plus a message."""

    def __init__(self, err: int, message: str | None = None, qmp_class: str | None = None) -> None:
        super().__init__(message or os.strerror(err), qmp_class)
        self.errno = err


class OptionError(BlockError):
    """A bad option (command line, blockdev-add, a resource file)."""

    def __init__(self, message: str, qmp_class: str | None = None) -> None:
        super().__init__(_errno.EINVAL, message, qmp_class)


class JobError(BlockrepError):
    """A job verb refused."""


class JobCancelled(Exception):
    """Raised inside a job's coroutine when the job is cancelled (not an error to report)."""


class ReplicationError(BlockrepError):
    """A replication control operation refused or failed; the text is QEMU's."""


class ProtocolError(BlockrepError):
    """A peer broke a wire protocol (NBD, the HA control channel)."""
