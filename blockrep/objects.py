"""User-creatable objects (QEMU's ``-object`` / ``object-add``): TLS credentials and authz."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

from .block.options import check
from .errors import OptionError

X509_SCHEMA = {
    "qom-type": "str",
    "id": "str",
    "dir": "str",
    "endpoint": ("enum", ("server", "client")),
    "verify-peer": "bool",
    "priority": "str",
    "sanity-check": "bool",
    "passwordid": "str",
}
AUTHZ_SCHEMA = {"qom-type": "str", "id": "str", "identity": "str"}


@dataclass
class TLSCredsX509:
    """Certificates in ``dir`` named as QEMU names them (ca-cert.pem, server-cert.pem, ...)."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def server_context(self) -> ssl.SSLContext:
        if self.endpoint != "server":
            raise OptionError(f"TLS credentials '{self.id}' are not for a server endpoint")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self._path("server-cert.pem"), self._path("server-key.pem"))
        if self.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self._path("ca-cert.pem"))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        if self.endpoint != "client":
            raise OptionError(f"TLS credentials '{self.id}' are not for a client endpoint")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # the server's name is checked only where one is known (tls-hostname / inet host)
        ctx.check_hostname = False
        ctx.load_verify_locations(self._path("ca-cert.pem"))
        if os.path.exists(self._path("client-cert.pem")):
            ctx.load_cert_chain(self._path("client-cert.pem"), self._path("client-key.pem"))
        return ctx


@dataclass
class AuthzSimple:
    """Allows exactly one identity (for TLS: the client certificate's distinguished name)."""

    id: str
    identity: str

    def __call__(self, identity: str) -> bool:
        return identity == self.identity


def create_object(qom_type: str, props: dict[str, Any], typed: bool) -> Any:
    if qom_type == "tls-creds-x509":
        o = check(X509_SCHEMA, props, typed=typed, required=("id",))
        if "dir" not in o:
            raise OptionError("Parameter 'dir' is missing")
        if not os.path.isdir(o["dir"]):
            raise OptionError(f"Unable to access credentials {o['dir']}: No such file or directory")
        return TLSCredsX509(
            o["id"], o["dir"], o.get("endpoint", "client"), o.get("verify-peer", True)
        )
    if qom_type == "authz-simple":
        o = check(AUTHZ_SCHEMA, props, typed=typed, required=("id", "identity"))
        return AuthzSimple(o["id"], o["identity"])
    raise OptionError(
        f"Invalid parameter type for 'qom-type', unsupported object type '{qom_type}'"
    )
