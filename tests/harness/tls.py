"""X.509 test PKI made with the ``openssl`` CLI, laid out as QEMU's tls-creds-x509 expects.

A credentials directory holds ``ca-cert.pem`` and either ``server-cert.pem`` /
``server-key.pem`` (endpoint=server) or ``client-cert.pem`` / ``client-key.pem``
(endpoint=client) -- the names QEMU, libnbd and blockrep read.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

SERVER_SUBJ = "/C=XX/O=blockrep test/CN=localhost"
CLIENT_SUBJ = "/C=XX/O=blockrep test/CN=client-good"
OTHER_CLIENT_SUBJ = "/C=XX/O=blockrep test/CN=client-other"
ROGUE_CLIENT_SUBJ = "/C=XX/O=rogue/CN=client-good"

# The DN as QEMU's authz check sees it: gnutls_x509_crt_get_dn() prints the RDNs in the
# certificate's order ("C=..,O=..,CN=.."), not RFC 4514's reversed "CN=..,O=..,C=.." order
# (checked against qemu-nbd --tls-authz in test_tls_authz_dn_format_matches_qemu_nbd).
CLIENT_DN = "C=XX,O=blockrep test,CN=client-good"
OTHER_CLIENT_DN = "C=XX,O=blockrep test,CN=client-other"
CLIENT_DN_RFC4514 = "CN=client-good,O=blockrep test,C=XX"


def _ssl(*args: str, cwd: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr}")


def _ca(work: str, name: str, subj: str) -> None:
    _ssl(
        "req",
        "-x509",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "30",
        "-keyout",
        f"{name}-key.pem",
        "-out",
        f"{name}-cert.pem",
        "-subj",
        subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=work,
    )


def _leaf(work: str, name: str, subj: str, ca: str, server: bool) -> None:
    ext = os.path.join(work, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n")
        f.write("keyUsage=critical,digitalSignature,keyEncipherment\n")
        if server:
            f.write("extendedKeyUsage=serverAuth\n")
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        else:
            f.write("extendedKeyUsage=clientAuth\n")
    _ssl(
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-keyout",
        f"{name}-key.pem",
        "-out",
        f"{name}.csr",
        "-subj",
        subj,
        cwd=work,
    )
    _ssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}-cert.pem",
        "-CAkey",
        f"{ca}-key.pem",
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        ext,
        "-out",
        f"{name}-cert.pem",
        cwd=work,
    )


def _creds(base: str, dirname: str, work: str, ca: str, leaf: str, role: str) -> str:
    d = os.path.join(base, dirname)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(work, f"{ca}-cert.pem"), os.path.join(d, "ca-cert.pem"))
    shutil.copy(os.path.join(work, f"{leaf}-cert.pem"), os.path.join(d, f"{role}-cert.pem"))
    shutil.copy(os.path.join(work, f"{leaf}-key.pem"), os.path.join(d, f"{role}-key.pem"))
    return d


def make_pki(base: str) -> dict[str, str]:
    """Create CA + server + clients under ``base``; returns credential directories by role.

    ``server``: server creds (trusts the good CA); ``client``: client-good signed by the CA;
    ``other``: client-other signed by the CA (valid, different DN); ``rogue``: a client cert
    signed by another CA (the directory's ca-cert.pem is still the good CA, so the client
    itself trusts the server).
    """
    work = os.path.join(base, "pki-work")
    os.makedirs(work, exist_ok=True)
    _ca(work, "ca", "/C=XX/O=blockrep test/CN=blockrep test CA")
    _ca(work, "evilca", "/C=XX/O=rogue/CN=rogue CA")
    _leaf(work, "server", SERVER_SUBJ, "ca", server=True)
    _leaf(work, "client", CLIENT_SUBJ, "ca", server=False)
    _leaf(work, "other", OTHER_CLIENT_SUBJ, "ca", server=False)
    _leaf(work, "rogue", ROGUE_CLIENT_SUBJ, "evilca", server=False)
    out = {
        "server": _creds(base, "tls-server", work, "ca", "server", "server"),
        "client": _creds(base, "tls-client", work, "ca", "client", "client"),
        "other": _creds(base, "tls-other", work, "ca", "other", "client"),
        "rogue": _creds(base, "tls-rogue", work, "ca", "rogue", "client"),
    }
    for d in out.values():
        for f in os.listdir(d):
            if f.endswith("-key.pem"):
                os.chmod(os.path.join(d, f), 0o600)
    return out
