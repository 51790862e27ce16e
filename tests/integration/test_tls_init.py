"""``blockrep tls-init DIR``: the files and their modes, the overwrite rules, and that the
directory it writes is accepted by blockrep's TLS (blockrep.tls.X509Credentials), by
QEMU's tls-creds-x509 (qemu-nbd, qemu-img, qemu-io, served by ``blockrep daemon`` and by
qemu-nbd) and by libnbd's nbdinfo -- and that the DN it prints is the one servers see.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from blockrep.testing import blockrep_argv, free_port
from blockrep.tls import X509Credentials, peer_dn
from tests.harness.processes import daemon
from tests.harness.tools import read_file, tool

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
FILES = (
    "ca-cert.pem",
    "ca-key.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)
KEYS = {"ca-key.pem", "server-key.pem", "client-key.pem"}


def tls_init(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        blockrep_argv("tls-init", *args),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=set_umask,
    )


def printed_dn(r: subprocess.CompletedProcess) -> str:
    m = re.search(r"^client DN: (.+)$", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1)


def make_dir(path: str, *args: str) -> str:
    """A tls-init directory; returns the client DN it printed."""
    r = tls_init(path, *args)
    assert r.returncode == 0, r.stderr
    return printed_dn(r)


def load(d: str, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(read_file(os.path.join(d, name)))


def snapshot(d: str) -> dict[str, bytes]:
    return {n: read_file(os.path.join(d, n)) for n in sorted(os.listdir(d))}


# -- the files ------------------------------------------------------------------------------


def test_tls_init_writes_qemu_layout_keys_private_whatever_the_umask(tmp_path):
    d = str(tmp_path / "new" / "pki")
    # umask 0 would leave files 0666 and the directory 0777 if the modes were not forced
    r = tls_init(d, "--san", "10.1.2.3", "--san", "node-b.example", umask=0)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(d)) == sorted(FILES)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in FILES:
        mode = stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode)
        assert mode == (0o600 if name in KEYS else 0o644), (name, oct(mode))

    ca = load(d, "ca-cert.pem")
    server = load(d, "server-cert.pem")
    client = load(d, "client-cert.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for leaf, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    ips = {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "node-b.example", socket.gethostname()} <= names
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    # the printed DN is the client certificate's subject in QEMU's order
    assert printed_dn(r) == "O=blockrep,CN=blockrep-client"
    assert re.search(r"^server DN: O=blockrep,CN=", r.stdout, re.M), r.stdout


def test_tls_init_refuses_to_overwrite_without_force(tmp_path):
    d = str(tmp_path / "pki")
    make_dir(d)
    before = snapshot(d)
    r = tls_init(d, "--cn-client", "other")
    assert r.returncode == 1
    assert os.path.join(d, "ca-cert.pem") in r.stderr and "--force" in r.stderr, r.stderr
    assert snapshot(d) == before  # nothing changed, no temporary left behind

    # one leftover file is enough to refuse, and nothing else is created
    lone = str(tmp_path / "lone")
    os.mkdir(lone)
    with open(os.path.join(lone, "client-key.pem"), "wb") as f:
        f.write(b"precious")
    r = tls_init(lone)
    assert r.returncode == 1 and os.path.join(lone, "client-key.pem") in r.stderr, r.stderr
    assert snapshot(lone) == {"client-key.pem": b"precious"}

    # --force replaces all six together: a new CA, and the leaves chain to it
    r = tls_init(d, "--force", "--cn-client", "laptop")
    assert r.returncode == 0, r.stderr
    after = snapshot(d)
    assert sorted(after) == sorted(FILES)
    assert all(after[n] != before[n] for n in FILES)
    ca = load(d, "ca-cert.pem")
    load(d, "server-cert.pem").verify_directly_issued_by(ca)
    load(d, "client-cert.pem").verify_directly_issued_by(ca)
    assert printed_dn(r) == "O=blockrep,CN=laptop"
    for name in KEYS:
        assert stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode) == 0o600


def test_tls_init_rejects_bad_options_changing_nothing(tmp_path):
    d = str(tmp_path / "pki")
    for args in (("--days", "0"), ("--san", "no/such name"), ("--cn-client", " ")):
        r = tls_init(d, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("blockrep tls-init: "), r.stderr
        assert not os.path.exists(d), args


# -- a real handshake with blockrep.tls -----------------------------------------------------


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str | None = None,
    payload: bytes = b"",
) -> tuple[str, bytes]:
    """One TLS session over a unix socket pair: the server echoes ``payload`` back.

    Returns the client DN the server saw (peer_dn) and the bytes the client read back;
    raises the ssl error of the side that refused.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(20)
    b.settimeout(20)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                seen["dn"] = peer_dn(s.getpeercert())
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                s.sendall(got)
        except (OSError, ssl.SSLError) as e:
            seen["error"] = e

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            c.sendall(payload)
            back = b""
            while len(back) < len(payload):
                chunk = c.recv(65536)
                if not chunk:
                    break
                back += chunk
            # TLS 1.3: a server refusing the client's certificate shows on this read
            c.recv(1)
    finally:
        t.join(20)
        a.close()
        b.close()
    if "error" in seen:
        raise seen["error"]  # type: ignore[misc]
    return str(seen["dn"]), back


def test_tls_init_directory_handshakes_with_blockrep_tls(tmp_path):
    d = str(tmp_path / "pki")
    dn = make_dir(d, "--san", "node-b.example", "--cn-client", "pair client")
    creds = X509Credentials(d)
    payload = random.Random(12).randbytes(300_000)
    seen_dn, back = handshake(
        creds.server_context(), creds.client_context(require_cert=True), None, payload
    )
    assert seen_dn == dn == "O=blockrep,CN=pair client"
    assert back == payload
    # the server certificate answers to every name a peer may reach it by
    for host in ("localhost", "127.0.0.1", "::1", "node-b.example", socket.gethostname()):
        ctx = creds.client_context(require_cert=True)
        ctx.check_hostname = True
        _, back = handshake(creds.server_context(), ctx, host, payload[:1000])
        assert back == payload[:1000], host
    ctx = creds.client_context(require_cert=True)
    ctx.check_hostname = True
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(creds.server_context(), ctx, "not-in-the-certificate.example")


def _mixed(ca_dir: str, leaf_dir: str, dest: str, role: str) -> str:
    """A directory trusting ``ca_dir``'s CA with ``leaf_dir``'s ``role`` certificate."""
    os.makedirs(dest)
    for name, src in (
        ("ca-cert.pem", ca_dir),
        (f"{role}-cert.pem", leaf_dir),
        (f"{role}-key.pem", leaf_dir),
    ):
        with open(os.path.join(dest, name), "wb") as f:
            f.write(read_file(os.path.join(src, name)))
    return dest


def test_certificate_of_another_tls_init_run_is_refused(tmp_path):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    make_dir(a)
    make_dir(b)
    server = X509Credentials(a).server_context()
    # a client of run b that trusts a's CA: the server refuses its certificate
    stranger = _mixed(a, b, str(tmp_path / "stranger"), "client")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server, X509Credentials(stranger).client_context(require_cert=True), None, b"x")
    # run b's own client does not trust a's server either
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, X509Credentials(b).client_context(require_cert=True), None, b"x")
    # and run a's client, the control, is admitted
    dn, back = handshake(server, X509Credentials(a).client_context(require_cert=True), None, b"ok")
    assert back == b"ok" and dn == "O=blockrep,CN=blockrep-client"


# -- QEMU and libnbd accept the directory ---------------------------------------------------


def qemu_client(d: str, port: int, cmd: str, *args: str, export: str = "disk"):
    return tool(
        cmd,
        *args,
        "--object",
        f"tls-creds-x509,id=tls0,dir={d},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0",
        check=False,
        timeout=30,
    )


def blockrep_tls_daemon_args(disk: str, port: int, d: str, authz: str | None = None) -> list[str]:
    addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0"
    args = [
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=raw,node-name=disk,file=f0",
        "-object",
        f"tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=on",
    ]
    if authz is not None:
        args += ["-object", "authz-simple,id=auth0,identity=" + authz.replace(",", ",,")]
        addr += ",tls-authz=auth0"
    return [
        *args,
        "--nbd-server",
        addr,
        "--export",
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
    ]


def _write_model(disk: str, size: int) -> bytearray:
    model = bytearray(random.Random(5).randbytes(size))
    with open(disk, "wb") as f:
        f.write(model)
    return model


@pytest.mark.interop
def test_tls_init_directory_works_with_qemu_and_libnbd_on_blockrep_daemon(tmp_path):
    d = str(tmp_path / "pki")
    dn = make_dir(d)
    other = str(tmp_path / "other")
    make_dir(other)
    disk = str(tmp_path / "disk.raw")
    model = _write_model(disk, 4 * MiB)
    port = free_port()
    # authz on the printed DN: admitted only if blockrep prints what the server matches
    with daemon(tmp_path, *blockrep_tls_daemon_args(disk, port, d, authz=dn)):
        r = qemu_client(d, port, "qemu-img", "info", "--output", "json")
        assert r.returncode == 0, r.stderr
        assert '"virtual-size": 4194304' in r.stdout, r.stdout
        r = qemu_client(d, port, "qemu-io", "-c", "write -P 0x5a 1M 192k")
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        model[MiB : MiB + 192 * 1024] = b"\x5a" * (192 * 1024)
        r = qemu_client(d, port, "qemu-io", "-c", "read -P 0x5a 1M 192k")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        r = tool(
            "nbdinfo", "--size", f"nbds://127.0.0.1:{port}/disk?tls-certificates={d}", check=False
        )
        assert r.returncode == 0 and r.stdout.strip() == str(4 * MiB), r.stdout + r.stderr
        # another run's directory: refused both ways (untrusted server, untrusted client)
        r = qemu_client(other, port, "qemu-img", "info")
        assert r.returncode != 0
        r = tool(
            "nbdinfo",
            "--size",
            f"nbds://127.0.0.1:{port}/disk?tls-certificates={other}",
            check=False,
        )
        assert r.returncode != 0
        # plaintext refused
        r = tool("qemu-img", "info", f"nbd://127.0.0.1:{port}/disk", check=False, timeout=30)
        assert r.returncode != 0
        out = str(tmp_path / "copy.raw")
        r = tool(
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "--object",
            f"tls-creds-x509,id=tls0,dir={d},endpoint=client",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
            out,
            check=False,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert read_file(out) == model
    assert read_file(disk) == model


@pytest.mark.interop
def test_tls_init_directory_is_accepted_by_qemu_nbd_with_the_printed_dn(tmp_path):
    """QEMU's own server side: qemu-nbd loads the directory (its credential checks on
    key usage, purpose and CA pass) and its authz-simple admits exactly the printed DN."""
    d = str(tmp_path / "pki")
    dn = make_dir(d, "--cn-client", "backup host")
    disk = str(tmp_path / "disk.raw")
    model = _write_model(disk, MiB)

    def qemu_nbd(identity: str, port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-x",
                "disk",
                "-t",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "--object",
                f"tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=on",
                "--object",
                "authz-simple,id=auth0,identity=" + identity.replace(",", ",,"),
                "--tls-creds",
                "tls0",
                "--tls-authz",
                "auth0",
                disk,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def with_server(identity: str, check: Callable[[int], None]) -> None:
        port = free_port()
        p = qemu_nbd(identity, port)
        try:
            _wait_port(port, p)
            check(port)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait(10)

    def admitted(port: int) -> None:
        r = qemu_client(d, port, "qemu-io", "-c", "write -P 0x3c 4k 8k")
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        r = tool("nbdinfo", "--size", f"nbds://127.0.0.1:{port}/disk?tls-certificates={d}")
        assert r.stdout.strip() == str(MiB)

    def refused(port: int) -> None:
        r = qemu_client(d, port, "qemu-img", "info")
        assert r.returncode != 0, r.stdout

    with_server(dn, admitted)
    model[4096 : 3 * 4096] = b"\x3c" * 8192
    # the same valid certificate, an authz list naming another DN: refused
    with_server(dn.replace("backup host", "someone else"), refused)
    assert read_file(disk) == model


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"qemu-nbd exited {proc.returncode}: {err}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")
