"""``blockrep tls-init DIR``: a CA plus server and client certificates for a pair."""

from __future__ import annotations

import argparse
import sys

from ..tls_init import DEFAULT_CLIENT_CN, DEFAULT_DAYS, FILES, TlsInitError, tls_init


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="blockrep tls-init",
        description=(
            "write a new CA and a server and client certificate in QEMU's tls-creds-x509 "
            "layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, "
            "client-key.pem; plus ca-key.pem, which only issuing more certificates needs). "
            "Copy the directory to both nodes of the pair."
        ),
    )
    p.add_argument("dir", help="the directory (created mode 0700 if missing)")
    p.add_argument("--cn-server", help="the server certificate's CN (default: the host name)")
    p.add_argument(
        "--cn-client",
        default=DEFAULT_CLIENT_CN,
        help=f"the client certificate's CN (default: {DEFAULT_CLIENT_CN})",
    )
    p.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default: {DEFAULT_DAYS})"
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST",
        help="another name or IP address of the server certificate (repeatable); "
        "localhost, 127.0.0.1, ::1 and the host name are always in it",
    )
    p.add_argument("--force", action="store_true", help="replace the files of an earlier run")
    a = p.parse_args(argv)
    try:
        r = tls_init(
            a.dir,
            cn_server=a.cn_server,
            cn_client=a.cn_client,
            days=a.days,
            sans=a.san,
            force=a.force,
        )
    except TlsInitError as e:
        print(f"blockrep tls-init: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"blockrep tls-init: {e}", file=sys.stderr)
        return 1
    print(f"blockrep tls-init: wrote {r.dir}: {' '.join(FILES)}")
    print(f"server DN: {r.server_dn}")
    print(f"server names: {' '.join(r.server_sans)}")
    print(f"client DN: {r.client_dn}")
    return 0
