"""User-creatable objects (QEMU's ``-object`` / ``object-add``): TLS credentials and authz."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

from .block.options import check
from .errors import OptionError
from .tls import X509Credentials

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
    """QEMU's tls-creds-x509: certificates in ``dir`` for one endpoint (server or client)."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True

    def server_context(self) -> ssl.SSLContext:
        if self.endpoint != "server":
            raise OptionError(f"TLS credentials '{self.id}' are not for a server endpoint")
        return X509Credentials(self.dir, self.verify_peer).server_context()

    def client_context(self) -> ssl.SSLContext:
        if self.endpoint != "client":
            raise OptionError(f"TLS credentials '{self.id}' are not for a client endpoint")
        return X509Credentials(self.dir, self.verify_peer).client_context()


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
