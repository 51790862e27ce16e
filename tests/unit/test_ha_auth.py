"""The control channel's authentication (ha/auth.py): the challenge-response byte for
byte, the exchange between two ends over a real socket, and every refusal."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os

import pytest

from blockrep.errors import OptionError
from blockrep.ha import auth
from blockrep.ha.auth import AuthError, Method, Security

KEY = b"0123456789abcdef0123456789abcdef"
NS = bytes(range(32))
NC = bytes(range(32, 64))


def test_macs_are_hmac_sha256_over_label_and_both_nonces():
    want_c = hmac.new(KEY, b"blockrep psk client\0" + NS + NC, hashlib.sha256).digest()
    want_s = hmac.new(KEY, b"blockrep psk server\0" + NC + NS, hashlib.sha256).digest()
    assert auth.client_mac(KEY, NS, NC) == want_c
    assert auth.server_mac(KEY, NS, NC) == want_s
    # a reflected client answer is never the server's proof, nor the other way round
    assert auth.client_mac(KEY, NS, NC) != auth.server_mac(KEY, NS, NC)
    assert auth.client_mac(KEY, NC, NS) != auth.server_mac(KEY, NS, NC)
    # golden values: the wire format must not change silently (old peers would be refused)
    assert want_c.hex() == "bd89bd6b88eafa384e8709f0e7b41c585d2fd944ebda1cb483ab45ad07229408"
    assert want_s.hex() == "ac1f7beda7cea4f43b33edb0d35a0867140a9dee12cbd540479652039b95a063"


def _psk(tmp_path, secret: bytes, name: str = "k.psk", mode: int = 0o600) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(secret)
    os.chmod(path, mode)
    return path


async def _exchange(server: Security, client: Security):
    """Run both sides over a real unix socket; the results (or exceptions) of each."""
    results: dict[str, object] = {}
    done = asyncio.Event()

    async def on_conn(r, w):
        try:
            await server.accept(r, w)
            results["server"] = "ok"
        except AuthError as e:
            results["server"] = e
        finally:
            done.set()
            w.close()

    path = f"/tmp/blockrep-auth-{os.getpid()}.sock"
    srv = await asyncio.start_unix_server(on_conn, path)
    try:
        r, w = await asyncio.open_unix_connection(path)
        try:
            await asyncio.wait_for(client.connect(r, w), 10)
            results["client"] = "ok"
        except AuthError as e:
            results["client"] = e
        w.close()  # a refusing client hangs up: the server's read ends
        await asyncio.wait_for(done.wait(), 10)
    finally:
        srv.close()
        os.unlink(path)
    return results["server"], results["client"]


async def test_same_secret_both_sides_proven(tmp_path):
    sec = Security.from_options(_psk(tmp_path, KEY), None)
    assert sec.method is Method.PSK
    assert await _exchange(sec, sec) == ("ok", "ok")


async def test_different_secrets_refused_on_both_sides(tmp_path):
    a = Security.from_options(_psk(tmp_path, KEY, "a.psk"), None)
    b = Security.from_options(_psk(tmp_path, KEY[::-1], "b.psk"), None)
    server, client = await _exchange(a, b)
    assert isinstance(server, AuthError) and "secret" in str(server)
    assert isinstance(client, AuthError) and "psk-files differ" in str(client)


async def test_methods_that_differ_are_named(tmp_path):
    psk = Security.from_options(_psk(tmp_path, KEY), None)
    none = Security(Method.INSECURE)
    _, client = await _exchange(psk, none)
    assert isinstance(client, AuthError) and "'psk'" in str(client) and "'insecure'" in str(client)
    _, client = await _exchange(none, psk)
    assert isinstance(client, AuthError) and "'insecure'" in str(client)


@pytest.mark.parametrize(
    "line",
    [
        b"x" * 5000,  # no newline within the bound
        b"[1, 2]\n",  # not an object
        b"{not json\n",
        b'{"nonce": "00", "mac": "00"}\n',  # wrong lengths
        b'{"nonce": "' + b"0" * 64 + b'", "mac": "' + b"0" * 64 + b'"}\n{"id": 1}\n',  # more after
        b"[" * 100000 + b"\n",
    ],
)
async def test_hostile_answers_to_the_challenge_are_refused(tmp_path, line):
    sec = Security.from_options(_psk(tmp_path, KEY), None)
    outcome: list[object] = []

    async def on_conn(r, w):
        try:
            await sec.accept(r, w)
            outcome.append("accepted")
        except AuthError as e:
            outcome.append(e)
        w.close()

    path = f"/tmp/blockrep-auth-h-{os.getpid()}.sock"
    srv = await asyncio.start_unix_server(on_conn, path)
    try:
        r, w = await asyncio.open_unix_connection(path)
        greeting = json.loads(await r.readline())
        assert greeting["blockrep"] == 1 and greeting["auth"] == "psk"
        w.write(line)
        await w.drain()
        for _ in range(100):
            if outcome:
                break
            await asyncio.sleep(0.05)
        w.close()
    finally:
        srv.close()
        os.unlink(path)
    assert len(outcome) == 1 and isinstance(outcome[0], AuthError), outcome


def test_bad_secret_files_are_refused(tmp_path):
    with pytest.raises(OptionError, match="readable by others"):
        Security.from_options(_psk(tmp_path, KEY, mode=0o644), None)
    with pytest.raises(OptionError, match="at least 16 bytes"):
        Security.from_options(_psk(tmp_path, b"short\n", "s.psk"), None)
    with pytest.raises(OptionError, match="No such file"):
        Security.from_options(os.path.join(tmp_path, "absent"), None)
    with pytest.raises(OptionError, match="not both"):
        Security.from_options(_psk(tmp_path, KEY, "b.psk"), str(tmp_path))


def test_tcp_without_authentication_names_every_way_out():
    with pytest.raises(OptionError) as e:
        auth.require_authentication("127.0.0.1:7000", None, None, False, "blockrep secondary")
    for word in ("127.0.0.1:7000", "--psk-file", "--tls-dir", "--insecure"):
        assert word in e.value.message
    # unix sockets, or any of the three: fine
    auth.require_authentication(None, None, None, False, "x")
    auth.require_authentication("h:1", "f", None, False, "x")
    auth.require_authentication("h:1", None, "d", False, "x")
    auth.require_authentication("h:1", None, None, True, "x")


async def _tls_accept_once(server: Security, tls_dir: str, connect_with: Security | None):
    """One TLS connection to a server checking ``server``; what its accept() said."""
    server_ctx, _ = server.contexts()
    _, client_ctx = Security.from_options(None, tls_dir).contexts()  # the directory's client
    seen: list[object] = []

    async def on_conn(r, w):
        try:
            await server.accept(r, w)
            seen.append("ok")
        except AuthError as e:
            seen.append(e)
        w.close()

    path = f"/tmp/blockrep-auth-t-{os.getpid()}.sock"
    srv = await asyncio.start_unix_server(on_conn, path, ssl=server_ctx)
    try:
        r, w = await asyncio.open_unix_connection(path, ssl=client_ctx, server_hostname="localhost")
        if connect_with is not None:
            await asyncio.wait_for(connect_with.connect(r, w), 10)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.05)
        w.close()
    finally:
        srv.close()
        await srv.wait_closed()
        os.unlink(path)
    return seen


async def test_tls_authorizes_its_own_client_certificate_dn(tmp_path):
    """With tls-dir the client's DN must be the authorized one: by default the DN of
    this directory's client-cert.pem, read from the file as the peer will see it."""
    from blockrep.tls_init import tls_init

    d = str(tmp_path / "tls")
    tls_init(d)
    sec = Security.from_options(None, d)
    assert sec.method is Method.TLS and sec.authorized_dn and "CN=" in sec.authorized_dn
    server_ctx, client_ctx = sec.contexts()
    assert server_ctx is not None and client_ctx is not None
    assert await _tls_accept_once(sec, d, sec) == ["ok"]
    # another DN authorized: the same certificate is refused
    other = Security(Method.TLS, tls_dir=d, authorized_dn="C=XX,O=other,CN=someone")
    seen = await _tls_accept_once(other, d, None)
    assert len(seen) == 1 and isinstance(seen[0], AuthError) and "not authorized" in str(seen[0])
