"""A TCP proxy on 127.0.0.1 that can blackhole the HA control link.

``blackhole()`` stops forwarding in both directions without closing anything: bytes
stay in the kernel buffers, new connections are accepted and then left hanging —
what a partitioned network looks like to both ends. ``heal()`` closes the stalled
connections (as TCP would after a long partition) and forwards new ones again.
"""

from __future__ import annotations

import select
import socket
import threading


class BlackholeProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.blackholed = False
        self.closed = False
        self.lock = threading.Lock()
        self.conns: list[list[socket.socket]] = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                r, _, _ = select.select([self.lsock], [], [], 0.05)
                if not r:
                    continue
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            with self.lock:
                if self.blackholed:
                    self.conns.append([c])  # held open, never forwarded
                    continue
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            pair = [c, u]
            with self.lock:
                self.conns.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: list[socket.socket]) -> None:
        c, u = pair
        peer = {c: u, u: c}
        try:
            while not self.closed and pair in self.conns:
                if self.blackholed:
                    threading.Event().wait(0.02)
                    continue
                r, _, _ = select.select([c, u], [], [], 0.05)
                if self.blackholed:
                    continue  # read nothing more: the data stays where it is
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("eof")
                    peer[s].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: list[socket.socket]) -> None:
        with self.lock:
            if pair in self.conns:
                self.conns.remove(pair)
        for s in pair:
            try:
                s.close()
            except OSError:
                pass

    def blackhole(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        """Close the stalled connections, forward new ones."""
        with self.lock:
            old = list(self.conns)
        for pair in old:
            self._drop(pair)
        self.blackholed = False

    def close(self) -> None:
        self.closed = True
        self.heal()
        try:
            self.lsock.close()
        except OSError:
            pass
