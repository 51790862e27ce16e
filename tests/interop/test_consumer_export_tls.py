"""The consumer export of a replicating primary on TLS (``--export-tls-dir DIR``, issue 12
Deliver 2): QEMU's and libnbd's TLS clients read and write it, plaintext clients and
clients of another CA are refused, and what they wrote is replicated byte for byte.

The certificates are a ``blockrep tls-init`` directory, as a user would make them; the
pair's own channel and link stay on unix sockets (what is under test is the export).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from dataclasses import dataclass

import pytest

from blockrep.testing import MiB, blockrep_argv, free_port
from tests.harness.tools import read_file, tool

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

SIZE = 8 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


def tls_init(d: str) -> None:
    r = subprocess.run(blockrep_argv("tls-init", d), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@dataclass(frozen=True)
class Export:
    """How each client names the primary's export, on TCP or on a unix socket."""

    tcp_port: int | None
    unix_path: str | None

    def image_opts(self, tls: bool = True) -> str:
        if self.tcp_port is not None:
            server = f"server.type=inet,server.host=127.0.0.1,server.port={self.tcp_port}"
        else:
            # a unix socket has no host name to check the certificate against: name one
            server = f"server.type=unix,server.path={self.unix_path}"
            if tls:
                server += ",tls-hostname=localhost"
        return f"driver=nbd,{server},export=disk" + (",tls-creds=tls0" if tls else "")

    def uri(self, creds: str | None) -> str:
        """libnbd's URI: ``nbds`` requires TLS, ``nbd`` does not use it."""
        scheme = "nbds" if creds else "nbd"
        query = [f"tls-certificates={creds}"] if creds else []
        if self.tcp_port is not None:
            base = f"{scheme}://127.0.0.1:{self.tcp_port}/disk"
        else:
            base = f"{scheme}+unix:///disk"
            query.insert(0, f"socket={self.unix_path}")
        return base + ("?" + "&".join(query) if query else "")


def qemu(cmd: str, exp: Export, creds: str | None, *args: str) -> subprocess.CompletedProcess:
    """``cmd`` (qemu-img / qemu-io) on the export; with ``creds``, over TLS."""
    objects = ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client"] if creds else []
    if cmd == "qemu-img":  # qemu-img SUBCOMMAND [options] then the image
        sub, rest = args[0], list(args[1:])
        out = rest.pop() if sub == "convert" else None
        argv = [cmd, sub, *rest, *objects, "--image-opts", exp.image_opts(bool(creds))]
        argv += [out] if out else []
    else:
        argv = [cmd, *args, *objects, "--image-opts", exp.image_opts(bool(creds))]
    return tool(*argv, check=False, timeout=60)


def clean_run(r: subprocess.CompletedProcess) -> bool:
    out = r.stdout + r.stderr
    return r.returncode == 0 and "failed" not in out and "error" not in out.lower()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_consumer_export_tls_for_qemu_and_libnbd(ha, transport):
    creds = ha.path("pki")
    tls_init(creds)
    stranger = ha.path("stranger-pki")  # a directory of another tls-init run
    tls_init(stranger)
    model = bytearray(ha.make_disks(SIZE, 31))

    if transport == "tcp":
        exp = Export(free_port(), None)
        where = ["--export", f"127.0.0.1:{exp.tcp_port}"]
    else:
        exp = Export(None, ha.path("p.nbd"))  # the harness's own --export unix:PATH
        where = []
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(
        f"unix:{ha.path('s.ctl')}",
        extra=[*FAST_P, *where, "--export-tls-dir", creds],
    )
    await s.wait_ready()
    await p.wait_ready()

    async def call(fn, *a):
        return await asyncio.to_thread(fn, *a)

    # qemu-io (tls-creds-x509) writes a pattern and reads it back
    r = await call(qemu, "qemu-io", exp, creds, "-c", "write -P 0xa5 1M 320k")
    assert clean_run(r), r.stdout + r.stderr + p.log_text()
    model[MiB : MiB + 320 * 1024] = b"\xa5" * (320 * 1024)
    r = await call(qemu, "qemu-io", exp, creds, "-c", "read -P 0xa5 1M 320k")
    assert clean_run(r) and "Pattern verification failed" not in r.stdout, r.stdout

    # nbdcopy (libnbd, TLS required) writes another region: a 512 KiB source lands at 0
    src = ha.path("src.raw")
    chunk = random.Random(32).randbytes(512 * 1024)
    with open(src, "wb") as f:
        f.write(chunk)
    await call(tool, "nbdcopy", src, exp.uri(creds))
    model[: len(chunk)] = chunk

    # nbdinfo over TLS sees the export and its size
    r = await call(tool, "nbdinfo", "--size", exp.uri(creds))
    assert r.stdout.strip() == str(SIZE), r.stdout

    # plaintext clients are refused ...
    r = await call(qemu, "qemu-img", exp, None, "info")
    assert r.returncode != 0, r.stdout
    r = await asyncio.to_thread(tool, "nbdinfo", "--size", exp.uri(None), check=False, timeout=30)
    assert r.returncode != 0, r.stdout
    # ... and so is a client whose certificates come from another CA
    r = await call(qemu, "qemu-img", exp, stranger, "info")
    assert r.returncode != 0, r.stdout
    r = await asyncio.to_thread(
        tool, "nbdinfo", "--size", exp.uri(stranger), check=False, timeout=30
    )
    assert r.returncode != 0, r.stdout

    # qemu-img convert over TLS reads back exactly the model
    out = ha.path("readback.raw")
    r = await call(qemu, "qemu-img", exp, creds, "convert", "-O", "raw", out)
    assert r.returncode == 0, r.stderr
    assert read_file(out) == model

    # after a checkpoint both disks hold the model, byte for byte
    await p.qmp_async("replication-checkpoint")
    ps, ss = await p.astatus(), await s.astatus()
    assert ps["peer"] == ss["peer"] == "connected", (ps, ss)
    assert ps["epoch"] == ss["epoch"] == 2, (ps["epoch"], ss["epoch"])
    assert ps["errors"] == [] and ss["errors"] == [], (ps["errors"], ss["errors"])
    assert read_file(p.disk) == model
    assert read_file(s.disk) == model
    assert os.path.getsize(s.disk) == SIZE
