"""Who may use a pair's endpoints: the peer that proves it holds the pair's secret.

Three ways, chosen per node (``--psk-file``, ``--tls-dir``, ``--insecure``; the
resource file's ``[security]``):

- ``psk``: a shared secret. The control channel opens with a mutual challenge-response
  (each side proves it holds the secret over the other's fresh nonce, HMAC-SHA256); the
  secret itself never crosses the wire. It authenticates, it does not encrypt.
- ``tls``: x509 in QEMU's layout; both ends present certificates from the pair's CA and
  the client's distinguished name must be the one authorized (default: the DN of this
  node's own ``client-cert.pem``: both nodes hold the same directory).
- ``insecure``: anyone who reaches the port is the peer (only on request, or on unix
  sockets, which are created 0600).

The server speaks first, one JSON line, so a client learns at once what the other end
wants: ``{"blockrep": 1, "auth": "psk", "nonce": HEX}``. With ``psk`` the client answers
``{"nonce": HEX, "mac": HEX}`` and the server ``{"auth": "ok", "mac": HEX}`` or
``{"auth": "refused"}``. Every line of this exchange is bounded (MAX_AUTH_LINE) and the
whole exchange by a deadline; a hostile client costs one short-lived connection.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from typing import Any

from ..address import SocketAddress
from ..errors import OptionError
from ..tls import CLIENT_CERT, X509Credentials, cert_file_dn, peer_dn

VERSION = 1
NONCE_BYTES = 32
MAX_AUTH_LINE = 1024
MIN_PSK_BYTES = 16
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may take to prove itself (QEMU's NBD default)

_CLIENT = b"blockrep psk client\0"
_SERVER = b"blockrep psk server\0"


class Method(enum.StrEnum):
    """How this node's TCP endpoints know the peer (status shows the value)."""

    INSECURE = "insecure"
    PSK = "psk"
    TLS = "tls"


class AuthError(Exception):
    """The peer did not prove itself (or spoke something else): the connection is dropped."""


# -- the challenge-response: pure functions, tested byte for byte ---------------------------


def client_mac(psk: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(psk, _CLIENT + server_nonce + client_nonce, hashlib.sha256).digest()


def server_mac(psk: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Distinct from the client's (another label, the nonces swapped): a reflected
    answer proves nothing."""
    return hmac.new(psk, _SERVER + client_nonce + server_nonce, hashlib.sha256).digest()


def load_psk(path: str) -> bytes:
    """The secret in ``path``: at least 16 bytes, readable by its owner only."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise OptionError(f"psk-file {path}: {e.strerror or e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise OptionError(
            f"psk-file {path}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod 600 it"
        )
    key = data.strip()
    if len(key) < MIN_PSK_BYTES:
        raise OptionError(f"psk-file {path}: the secret must be at least {MIN_PSK_BYTES} bytes")
    return key


CLI_OPTIONS = ("--psk-file FILE", "--tls-dir DIR", "--insecure")
RESOURCE_KEYS = ("psk-file", "tls-dir", "insecure = true (in [security])")


def require_authentication(
    tcp: str | None,
    psk_file: str | None,
    tls_dir: str | None,
    insecure: bool,
    where: str,
    options: tuple[str, str, str] = CLI_OPTIONS,
) -> None:
    """Refuse a pair on TCP (``tcp`` names the address) that nobody authenticates."""
    if tcp is None or psk_file or tls_dir or insecure:
        return
    psk, tls, none = options
    raise OptionError(
        f"{where}: the pair's control channel and replication link on TCP ({tcp}) would "
        f"accept anyone who reaches them: give {psk} (a shared secret) or {tls} "
        f"(x509 certificates, see 'blockrep tls-init'), or {none} to run without "
        "authentication"
    )


def for_pair(
    pair: SocketAddress,
    psk_file: str | None,
    tls_dir: str | None,
    insecure: bool,
    where: str,
    options: tuple[str, str, str] = CLI_OPTIONS,
) -> Security:
    """The security of a pair whose control channel is at ``pair``; refused on TCP
    without any (require_authentication), or with an unusable secret or directory."""
    tcp = pair.describe() if pair.type == "inet" else None
    require_authentication(tcp, psk_file, tls_dir, insecure, where, options)
    return Security.from_options(psk_file, tls_dir)


@dataclass(frozen=True)
class Security:
    """What this node's channel and link demand of the peer, and prove to it."""

    method: Method
    psk: bytes | None = None
    tls_dir: str | None = None
    authorized_dn: str | None = None  # tls: the peer's client certificate DN

    @classmethod
    def from_options(
        cls, psk_file: str | None, tls_dir: str | None, tls_authz: str | None = None
    ) -> Security:
        if psk_file and tls_dir:
            raise OptionError("give --psk-file or --tls-dir, not both")
        if tls_dir:
            creds = X509Credentials(tls_dir)
            try:
                dn = tls_authz or cert_file_dn(creds.path(CLIENT_CERT))
            except ValueError as e:
                raise OptionError(f"tls-dir {tls_dir}: {e}") from None
            return cls(Method.TLS, tls_dir=tls_dir, authorized_dn=dn)
        if psk_file:
            return cls(Method.PSK, psk=load_psk(psk_file))
        return cls(Method.INSECURE)

    def contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        """(server, client) TLS contexts; both ends present certificates."""
        if self.tls_dir is None:
            return None, None
        creds = X509Credentials(self.tls_dir)
        return creds.server_context(), creds.client_context(require_cert=True)

    def authorize_dn(self, dn: str) -> bool:
        return self.authorized_dn is not None and hmac.compare_digest(
            dn.encode(), self.authorized_dn.encode()
        )

    # -- the exchange on one connection --------------------------------------------------

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's side: greet, then check the client; raises AuthError."""
        if self.method is Method.TLS:
            ssl_obj = writer.get_extra_info("ssl_object")
            dn = peer_dn(ssl_obj.getpeercert() if ssl_obj is not None else None)
            if not self.authorize_dn(dn):
                raise AuthError(f"client certificate '{dn}' is not authorized")
        nonce = secrets.token_bytes(NONCE_BYTES)
        greeting: dict[str, Any] = {"blockrep": VERSION, "auth": self.method.value}
        if self.method is Method.PSK:
            greeting["nonce"] = nonce.hex()
        await _send(writer, greeting)
        if self.method is not Method.PSK:
            return
        assert self.psk is not None
        msg = await read_bounded_line(reader)
        theirs, mac = _hex(msg, "nonce", NONCE_BYTES), _hex(msg, "mac", 32)
        if not hmac.compare_digest(mac, client_mac(self.psk, nonce, theirs)):
            await _send(writer, {"auth": "refused"})
            raise AuthError("the client does not hold the pair's secret (psk-file)")
        await _send(writer, {"auth": "ok", "mac": server_mac(self.psk, nonce, theirs).hex()})

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The client's side: read the greeting, prove, check the server's proof."""
        greeting = await read_bounded_line(reader)
        if greeting.get("blockrep") != VERSION:
            raise AuthError("the peer is not a blockrep control channel of this version")
        theirs = greeting.get("auth")
        if theirs != self.method.value:
            raise AuthError(
                f"the peer wants authentication '{theirs}' and this node is set up for "
                f"'{self.method.value}': give both nodes the same psk-file or tls-dir"
            )
        if self.method is not Method.PSK:
            return
        assert self.psk is not None
        server_nonce = _hex(greeting, "nonce", NONCE_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES)
        mac = client_mac(self.psk, server_nonce, nonce)
        await _send(writer, {"nonce": nonce.hex(), "mac": mac.hex()})
        reply = await read_bounded_line(reader)
        if reply.get("auth") != "ok":
            raise AuthError("the peer refused this node's secret: the psk-files differ")
        proof = _hex(reply, "mac", 32)
        if not hmac.compare_digest(proof, server_mac(self.psk, server_nonce, nonce)):
            raise AuthError("the peer does not hold the pair's secret (psk-file)")


async def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()


def _hex(msg: dict[str, Any], key: str, nbytes: int) -> bytes:
    v = msg.get(key)
    try:
        b = bytes.fromhex(v) if isinstance(v, str) else b""
    except ValueError:
        b = b""
    if len(b) != nbytes:
        raise AuthError(f"malformed authentication message ({key})")
    return b


async def read_bounded_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    """One JSON object of at most MAX_AUTH_LINE bytes. The exchange is lock-step, so
    nothing may follow the line before this side answers: bytes after it are refused."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await reader.read(MAX_AUTH_LINE + 1 - len(buf))
        if not chunk:
            raise AuthError("the connection closed during authentication")
        buf += chunk
        if len(buf) > MAX_AUTH_LINE:
            raise AuthError("authentication message too long")
    line, _, rest = bytes(buf).partition(b"\n")
    if rest:
        raise AuthError("data sent before authentication finished")
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        raise AuthError("malformed authentication message") from None
    if not isinstance(msg, dict):
        raise AuthError("malformed authentication message")
    return msg
