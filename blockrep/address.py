"""Where a socket listens or connects: QEMU's SocketAddress, inet or unix.

One type for every spelling blockrep accepts: the QAPI dict (keyval
``server.host=…`` and JSON alike, flat or with the legacy ``data`` wrapper), an
NBD URI, and the ``HOST:PORT`` / ``[v6]:PORT`` / ``unix:PATH`` strings of the HA
command line. The QAPI and URI forms raise OptionError with QEMU's texts; the
command-line form raises ValueError, which the HA command reports as a usage error.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from .errors import OptionError

NBD_DEFAULT_PORT = 10809


@dataclass(frozen=True)
class SocketAddress:
    """An inet host and port (the port kept as text, as QAPI has it) or a unix socket path."""

    type: str  # "inet" or "unix"
    host: str = ""
    port: str = ""
    path: str = ""

    @classmethod
    def inet(cls, host: str, port: int | str) -> SocketAddress:
        return cls("inet", host=host, port=str(port))

    @classmethod
    def unix(cls, path: str) -> SocketAddress:
        return cls("unix", path=path)

    @classmethod
    def from_qapi(cls, value: Any) -> SocketAddress:
        """A SocketAddress dict: flat ``{type, host, port}`` or legacy ``{type, data: {...}}``.

        The texts name ``server`` whichever option held the address (``server`` of the
        nbd driver, ``addr`` of nbd-server-start): that is what blockrep has always said.
        """
        if not isinstance(value, dict):
            raise OptionError("Invalid parameter type for 'server', expected: object")
        if "data" in value and isinstance(value["data"], dict):
            value = {"type": value.get("type"), **value["data"]}
        typ = value.get("type", "inet")
        if typ == "inet":
            host, port = value.get("host"), value.get("port")
            if host is None:
                raise OptionError("Parameter 'server.host' is missing")
            if port is None:
                raise OptionError("Parameter 'server.port' is missing")
            return cls.inet(str(host), str(port))
        if typ == "unix":
            path = value.get("path")
            if path is None:
                raise OptionError("Parameter 'server.path' is missing")
            return cls.unix(str(path))
        raise OptionError(f"Parameter 'server.type' does not accept value '{typ}'")

    @classmethod
    def from_nbd_uri(cls, uri: str) -> tuple[SocketAddress, str, bool]:
        """``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH``.

        Returns the address, the export name and whether the URI asks for TLS (``nbds``).
        """
        u = urllib.parse.urlparse(uri)
        export = urllib.parse.unquote(u.path[1:]) if u.path.startswith("/") else u.path
        scheme, tls = u.scheme, False
        if scheme.startswith("nbds"):
            scheme, tls = "nbd" + scheme[4:], True
        if scheme in ("nbd", "nbd+tcp"):
            return cls.inet(u.hostname or "localhost", u.port or NBD_DEFAULT_PORT), export, tls
        if scheme == "nbd+unix":
            q = urllib.parse.parse_qs(u.query)
            if "socket" not in q:
                raise OptionError("Parameter 'socket' is required for nbd+unix URIs")
            return cls.unix(q["socket"][0]), export, tls
        raise OptionError(f"Unsupported NBD URI '{uri}'")

    @classmethod
    def from_str(cls, text: str) -> SocketAddress:
        """``unix:PATH``, or ``HOST:PORT`` / ``[v6]:PORT``, optionally prefixed ``tcp:``."""
        if text.startswith("unix:"):
            return cls.unix(text[5:])
        if text.startswith("tcp:"):
            text = text[4:]
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad address '{text}' (use HOST:PORT or unix:PATH)")
        return cls.inet(host.strip("[]"), int(port))

    def to_qapi(self) -> dict[str, str]:
        """The flat QAPI form, as blockdev-add's ``server`` and nbd-server-start's ``addr`` take."""
        if self.type == "unix":
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": self.host, "port": self.port}

    def nbd_uri(self, export: str) -> str:
        if self.type == "unix":
            return f"nbd+unix:///{export}?socket={self.path}"
        return f"nbd://{self.host}:{self.port}/{export}"

    def describe(self) -> str:
        return self.path if self.type == "unix" else f"{self.host}:{self.port}"


def bind_unix_private(path: str) -> socket.socket:
    """A unix stream socket bound at ``path`` (a stale one replaced) that only its
    owner may connect to: created 0600 (the umask is set around bind, so there is no
    moment when it is open to others)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock
