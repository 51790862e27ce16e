"""A CA and a server and client certificate in QEMU's tls-creds-x509 layout.

One directory serves both ends of a pair: each node runs a server (control channel,
link, consumer export) and is a client of its peer, so both nodes get a copy of the
same directory and every connection is verified against the same CA. The layout is
the one ``blockrep.tls`` reads and QEMU's ``-object tls-creds-x509,dir=…`` reads, so
the directory works for qemu-nbd, qemu-img, libnbd's tools and blockrep alike.

Why these choices:

* RSA 2048 with SHA-256: what every TLS stack in play (GnuTLS in QEMU and libnbd,
  OpenSSL in Python) accepts without question. The leaves' critical keyUsage names
  digitalSignature and keyEncipherment, the usages of QEMU's documented certtool
  templates (``signing_key``, ``encryption_key``), which its credential check
  looks for; keyEncipherment is also what an RSA key exchange would need.
* ``ca-key.pem`` stays in the directory, mode 0600: QEMU and blockrep never read
  it, but it is what issues more certificates of the same CA later. A node needs
  only the other five files.
* Everything is made in memory first and each file is written to a temporary name
  (keys created 0600, never wider) and renamed into place, so a refused or failed
  run leaves no half-written credential and no key readable by others.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import BlockrepError
from .tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY, peer_dn

CA_KEY = "ca-key.pem"
# every file a run writes, in the order it writes them
FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
KEY_FILES = frozenset({CA_KEY, SERVER_KEY, CLIENT_KEY})

ORGANIZATION = "blockrep"
DEFAULT_CLIENT_CN = "blockrep-client"
DEFAULT_DAYS = 3650
RSA_BITS = 2048
# the names a server certificate always answers to: a pair on loopback or a unix socket
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


class TlsInitError(BlockrepError):
    """tls-init refused (an existing file without ``force``, a bad option)."""


@dataclass(frozen=True)
class TlsInitResult:
    dir: str
    files: tuple[str, ...]
    client_dn: str  # as QEMU's authz objects and blockrep.tls.peer_dn print it
    server_dn: str
    server_sans: tuple[str, ...]


def _name(cn: str) -> tuple[x509.Name, str]:
    """The subject and its DN in QEMU's format (peer_dn over ssl's view of the subject)."""
    rdns = [("organizationName", NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    rdns.append(("commonName", NameOID.COMMON_NAME, cn))
    name = x509.Name([x509.NameAttribute(oid, value) for _, oid, value in rdns])
    dn = peer_dn({"subject": tuple(((ssl_name, value),) for ssl_name, _, value in rdns)})
    return name, dn


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or any(c.isspace() or c in "/\\@" for c in value):
        raise TlsInitError(f"--san '{value}' is neither an IP address nor a host name")
    return x509.DNSName(value)


def server_sans(extra: Sequence[str] = (), hostname: str | None = None) -> tuple[str, ...]:
    """The server certificate's alternative names: loopback, the host name, ``extra``."""
    names: list[str] = []
    host = socket.gethostname() if hostname is None else hostname
    # a host name that cannot be a DNS name is left out (named by --san if wanted)
    usable = bool(host) and host.isascii() and not any(c.isspace() or c in "/\\@" for c in host)
    for n in (*DEFAULT_SANS, *([host] if usable else []), *extra):
        if n not in names:
            names.append(n)
    return tuple(names)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # an hour back: a peer whose clock is a little behind still accepts it
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    subject: x509.Name,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: Sequence[str] = (),
) -> tuple[bytes, bytes]:
    key = _new_key()
    b = (
        _builder(subject, ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sans]), False)
    return _cert_pem(b.sign(ca_key, hashes.SHA256())), _key_pem(key)


def make_credentials(
    *,
    cn_server: str | None = None,
    cn_client: str = DEFAULT_CLIENT_CN,
    days: int = DEFAULT_DAYS,
    sans: Sequence[str] = (),
    hostname: str | None = None,
) -> tuple[dict[str, bytes], TlsInitResult]:
    """Every file's contents (by file name) and what they are; nothing is written."""
    if days < 1:
        raise TlsInitError(f"--days must be at least 1, not {days}")
    for what, cn in (("--cn-server", cn_server), ("--cn-client", cn_client)):
        if cn is not None and not cn.strip():
            raise TlsInitError(f"{what} must not be empty")
    all_sans = server_sans(sans, hostname)
    for n in all_sans:
        _general_name(n)  # refuse a bad --san before any key is made
    server_cn = cn_server or (hostname if hostname is not None else socket.gethostname())
    server_cn = server_cn or "localhost"

    ca_key = _new_key()
    # a CA name of its own per run: two runs' certificates are told apart by issuer too
    ca_name, _ = _name(f"blockrep CA {secrets.token_hex(4)}")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_name, server_dn = _name(server_cn)
    client_name, client_dn = _name(cn_client)
    server_cert, server_key = _leaf(
        ca_cert, ca_key, server_name, days, ExtendedKeyUsageOID.SERVER_AUTH, all_sans
    )
    client_cert, client_key = _leaf(
        ca_cert, ca_key, client_name, days, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    contents = {
        CA_CERT: _cert_pem(ca_cert),
        CA_KEY: _key_pem(ca_key),
        SERVER_CERT: server_cert,
        SERVER_KEY: server_key,
        CLIENT_CERT: client_cert,
        CLIENT_KEY: client_key,
    }
    result = TlsInitResult("", FILES, client_dn, server_dn, all_sans)
    return contents, result


def _write_new(path: str, data: bytes, mode: int) -> str:
    """``data`` in a fresh temporary file beside ``path`` created with ``mode``."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrows os.open's mode, never widens it: set it
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def tls_init(
    directory: str,
    *,
    cn_server: str | None = None,
    cn_client: str = DEFAULT_CLIENT_CN,
    days: int = DEFAULT_DAYS,
    sans: Sequence[str] = (),
    force: bool = False,
    hostname: str | None = None,
) -> TlsInitResult:
    """Write a new CA and its server and client certificates into ``directory``.

    Refuses, changing nothing, when any of the files exists and ``force`` is not set
    (all six are replaced together with it: certificates of two CAs in one directory
    would never verify each other). A directory it creates is mode 0700.
    """
    if not force:
        for name in FILES:
            p = os.path.join(directory, name)
            if os.path.lexists(p):
                raise TlsInitError(f"{p} exists (--force replaces every file of the directory)")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise TlsInitError(f"{directory} exists and is not a directory")
    contents, result = make_credentials(
        cn_server=cn_server, cn_client=cn_client, days=days, sans=sans, hostname=hostname
    )
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
    temps: list[tuple[str, str]] = []
    try:
        for name in FILES:
            path = os.path.join(directory, name)
            mode = 0o600 if name in KEY_FILES else 0o644
            temps.append((_write_new(path, contents[name], mode), path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return TlsInitResult(directory, FILES, result.client_dn, result.server_dn, result.server_sans)
