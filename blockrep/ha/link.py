"""The replication link: the secondary's disk as an NBD export for its paired primary only.

The primary writes through it (its replication filter's NBD client) and a resync reads
and writes through it, so it must be nobody else's. It is opened when an authenticated
``hello`` arrives on the control channel, and only for that peer:

- it listens where the peer reached this node: the local address of the control
  connection (never a wildcard) on a fixed port (``--link-port``, default the control
  port + 1), so it can be firewalled narrowly; on a unix control socket, next to it
  (``PATH.nbd``, 0600);
- its export's name is a fresh 128-bit secret handed to the peer in the hello's reply
  (over the authenticated channel), renewed at every hello; nothing lists it;
- TCP connections from any other host than the peer's are closed at once; at most
  MAX_LINK_CLIENTS connections at a time; a connection that has not chosen the export
  within the NBD server's handshake deadline is dropped;
- with ``tls-dir`` the link is TLS and the peer's client certificate must carry the
  authorized distinguished name, as on the control channel.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from typing import TYPE_CHECKING

from ..address import SocketAddress
from ..errors import BlockError
from ..objects import AuthzSimple, TLSCredsX509
from .auth import Method

if TYPE_CHECKING:
    from .secondary import Secondary

MAX_LINK_CLIENTS = 4  # the replication filter's connection, a resync's, a check's: room to spare
TLS_SERVER_ID = "blockrep-link-tls"
TLS_CLIENT_ID = "blockrep-link-tls-client"
AUTHZ_ID = "blockrep-link-authz"


def link_port(listen: SocketAddress, configured: int) -> int:
    return configured or int(listen.port) + 1


def _bind_host(sockname: object) -> str:
    """The local address a control connection arrived on, as a host to bind."""
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        return sockname[0]
    raise BlockError(errno.EINVAL, "the control connection has no local TCP address")


async def open_for_peer(self: Secondary, writer: asyncio.StreamWriter) -> tuple[str, str]:
    """Serve the link for the peer on this control connection: (address, export name)."""
    d = self.d
    listen = SocketAddress.from_str(self.cfg.listen)
    peer_host = None
    if listen.type == "unix":
        addr = SocketAddress.unix(listen.path + ".nbd")
    else:
        host = _bind_host(writer.get_extra_info("sockname"))
        peer = writer.get_extra_info("peername")
        peer_host = peer[0] if isinstance(peer, tuple) else None
        addr = SocketAddress.inet(host, link_port(listen, self.cfg.link_port))
    nbd = d.block_exports.nbd
    if nbd is not None and self.link_addr != _shown(addr):
        await d.block_exports.nbd_server_stop()  # the peer came in on another address
        nbd = None
    if nbd is None:
        await start(self, addr)
        nbd = d.block_exports.nbd
        assert nbd is not None
    nbd.admit_peer = (lambda h: h == peer_host) if peer_host else None
    # a new secret for this pairing; connections made with the old one go on
    exp = d.block_exports.exports[self.link_export]
    exp.name = secrets.token_hex(16)
    nbd.exports = {exp.name: exp}
    return self.link_addr, exp.name


async def start_if_unix(self: Secondary) -> None:
    """On a unix control socket the link's place is known: serve it from the start."""
    listen = SocketAddress.from_str(self.cfg.listen)
    if listen.type == "unix":
        await start(self, SocketAddress.unix(listen.path + ".nbd"))


def _shown(addr: SocketAddress) -> str:
    if addr.type == "unix":
        return f"unix:{addr.path}"
    return f"[{addr.host}]:{addr.port}" if ":" in addr.host else f"{addr.host}:{addr.port}"


async def start(self: Secondary, addr: SocketAddress) -> None:
    """Listen at ``addr`` (a unix socket made 0600), its export under a secret name."""
    d = self.d
    creds, authz = _tls_objects(self)
    await d.block_exports.nbd_server_start(addr.to_qapi(), creds, authz, MAX_LINK_CLIENTS)
    nbd = d.block_exports.nbd
    assert nbd is not None
    if addr.type == "unix":
        os.chmod(addr.path, 0o600)
    nbd.private = True  # the export's name is the secret: never listed
    await d.block_exports.export_add(
        self.link_export, self.link_export, secrets.token_hex(16), True, "replication link"
    )
    self.link_addr = _shown(addr)


def _tls_objects(self: Secondary) -> tuple[str | None, str | None]:
    """The link's TLS credentials and authorization as the daemon's objects."""
    sec = self.security
    if sec.method is not Method.TLS:
        return None, None
    assert sec.tls_dir is not None and sec.authorized_dn is not None
    objs = self.d.graph.objects
    objs[TLS_SERVER_ID] = TLSCredsX509(TLS_SERVER_ID, sec.tls_dir, "server", True)
    objs[AUTHZ_ID] = AuthzSimple(AUTHZ_ID, sec.authorized_dn)
    return TLS_SERVER_ID, AUTHZ_ID


def client_options(tls_dir: str | None, objects: dict[str, object]) -> dict[str, str]:
    """The primary's NBD client options for the link (tls-creds registered in
    ``objects``, the graph's user-creatable objects)."""
    if not tls_dir:
        return {}
    objects[TLS_CLIENT_ID] = TLSCredsX509(TLS_CLIENT_ID, tls_dir, "client", True)
    return {"tls-creds": TLS_CLIENT_ID}
