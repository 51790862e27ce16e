"""x509 credentials in QEMU's directory layout, the SSL contexts made from them, and
the peer identity QEMU's authz objects match.

The layout is QEMU's tls-creds-x509 one (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``), so one directory
serves qemu-nbd, QEMU and blockrep alike; the daemon's ``tls-creds-x509`` object
and the HA manager's ``--tls-dir`` both build their contexts here.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


@dataclass(frozen=True)
class X509Credentials:
    dir: str
    verify_peer: bool = True

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.path(SERVER_CERT), self.path(SERVER_KEY))
        if self.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.path(CA_CERT))
        return ctx

    def client_context(self, *, require_cert: bool = False) -> ssl.SSLContext:
        """A client context; the client certificate is loaded when present, or always
        with ``require_cert`` (a missing one then fails here, not at the handshake)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # the server's name is checked only where one is known (tls-hostname / inet host)
        ctx.check_hostname = False
        ctx.load_verify_locations(self.path(CA_CERT))
        if require_cert or os.path.exists(self.path(CLIENT_CERT)):
            ctx.load_cert_chain(self.path(CLIENT_CERT), self.path(CLIENT_KEY))
        return ctx


# ssl's long attribute names and the short ones of a distinguished name
_DN_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "domainComponent": "DC",
    "emailAddress": "EMAIL",
    "streetAddress": "STREET",
    "userId": "UID",
}


def _dn_escape(v: str) -> str:
    v = "".join("\\" + c if c in ',+"\\<>;' else c for c in v)
    if v.startswith(("#", " ")):
        v = "\\" + v
    if v.endswith(" ") and len(v) > 1:
        v = v[:-1] + "\\ "
    return v


def peer_dn(cert: dict[str, Any] | None) -> str:
    """The subject of a peer certificate (``SSLObject.getpeercert()``), "" without one.

    QEMU's format: gnutls_x509_crt_get_dn(), i.e. the RDNs in the certificate's own
    order (not RFC 4514's reversed one), e.g. "C=GB,O=Example Org,CN=laptop": an
    authz-simple identity that works with qemu-nbd must work here too.
    """
    if not cert:
        return ""
    rdns = [
        "+".join(f"{_DN_NAMES.get(k, k)}={_dn_escape(v)}" for k, v in rdn)
        for rdn in cert.get("subject", ())
    ]
    return ",".join(rdns)


def cert_file_dn(path: str) -> str:
    """The subject of the PEM certificate in ``path``, in peer_dn()'s format: what
    the other end sees when this certificate is presented."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    short = {
        NameOID.COUNTRY_NAME: "C",
        NameOID.STATE_OR_PROVINCE_NAME: "ST",
        NameOID.LOCALITY_NAME: "L",
        NameOID.ORGANIZATION_NAME: "O",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
        NameOID.COMMON_NAME: "CN",
        NameOID.DOMAIN_COMPONENT: "DC",
        NameOID.EMAIL_ADDRESS: "EMAIL",
        NameOID.STREET_ADDRESS: "STREET",
        NameOID.USER_ID: "UID",
    }
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the certificate {path}: {e}") from None
    return ",".join(
        "+".join(f"{short.get(a.oid, a.oid._name)}={_dn_escape(str(a.value))}" for a in rdn)
        for rdn in cert.subject.rdns
    )
