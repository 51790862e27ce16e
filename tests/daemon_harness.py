"""Start and stop ``blockrep daemon`` processes for tests (by pid, time-bounded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

BLOCKREP = [sys.executable, "-m", "blockrep.cli"]


class DaemonProc:
    def __init__(self, args: list[str], qmp_sock: str | None, log_path: str) -> None:
        self.args = args
        self.qmp_sock = qmp_sock
        self.log_path = log_path
        self.log = open(log_path, "wb")
        if qmp_sock and os.path.exists(qmp_sock):
            os.unlink(qmp_sock)  # a stale socket must not look like a ready daemon
        self.proc = subprocess.Popen(
            [*BLOCKREP, "daemon", *args], stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, path: str | None = None, timeout: float = 20.0) -> None:
        path = path or self.qmp_sock
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.output()}")
            if path and os.path.exists(path):
                # the file appears at bind(), a moment before listen(): connect to be sure
                import socket

                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(path)
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.02)
        raise TimeoutError(f"daemon not ready: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


@contextmanager
def daemon(tmp_path, *args: str, qmp: bool = True, name: str = "d"):
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
