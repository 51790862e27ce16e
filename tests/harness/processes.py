"""``blockrep daemon`` and ``qemu-storage-daemon`` processes for tests (by pid, time-bounded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from blockrep.testing import Process, blockrep_argv, drive_args

BLOCKREP = blockrep_argv()


class DaemonProc(Process):
    """``blockrep daemon ARGS``; ready when ``qmp_sock`` accepts."""

    def __init__(self, args: list[str], qmp_sock: str | None, log_path: str) -> None:
        self.args = args
        self.qmp_sock = qmp_sock
        super().__init__(blockrep_argv("daemon", *args), log_path, sock=qmp_sock)


@contextmanager
def daemon(tmp_path, *args: str, qmp: bool = True, name: str = "d") -> Iterator[DaemonProc]:
    """A running daemon with a QMP unix socket at ``tmp_path/<name>.qmp``."""
    sock = str(tmp_path / f"{name}.qmp")
    full = list(args)
    if qmp:
        full += ["-qmp", f"unix:{sock},server=on,wait=off"]
    d = DaemonProc(full, sock if qmp else None, str(tmp_path / f"{name}.log"))
    try:
        if qmp:
            d.wait_ready()
        yield d
    finally:
        d.stop()


class QSD(Process):
    """qemu-storage-daemon with a QMP monitor on a unix socket."""

    def __init__(self, dirpath: str, name: str = "qsd", extra: list[str] | None = None) -> None:
        self.qmp_sock = os.path.join(dirpath, f"{name}.qmp")
        argv = [
            "qemu-storage-daemon",
            "--chardev",
            f"socket,id=m0,path={self.qmp_sock},server=on,wait=off",
            "--monitor",
            "chardev=m0",
            *(extra or []),
        ]
        super().__init__(argv, os.path.join(dirpath, f"{name}.log"), sock=self.qmp_sock)


def start_daemon(d, name: str, drives: list[str]) -> DaemonProc:
    """``blockrep daemon`` with QMP at ``d/<name>.qmp`` and these -drive options."""
    args = ["-qmp", f"unix:{d}/{name}.qmp,server=on,wait=off", *drive_args(drives)]
    return DaemonProc(args, f"{d}/{name}.qmp", f"{d}/{name}.log")
