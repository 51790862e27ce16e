"""Differential: the same backup / commit / mirror sequence, over QMP, on
qemu-storage-daemon 7.2 and on blockrep daemon, from identical images.

Guest writes go through an NBD export of the node (qemu-io with an nbd+unix URI),
so they pass the copy-before-write filter, the mirror's dirty tracking and, after
a pivot, reach the new node, on both daemons. Afterwards every image must have
the same guest-visible contents (qemu-img compare and sha256 of the logical
bytes), each job's event trace must be the same (QEMU's backup drain blip
``paused``/``running`` removed) and ``qemu-img check`` must be clean on
everything blockrep wrote.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.harness.images import MiB, fmt_opts, qcow2
from tests.harness.processes import QSD, daemon
from tests.harness.qmp import QMPSession
from tests.harness.tools import check_clean, logical_sha256, qio, tool

pytestmark = pytest.mark.interop

IMAGES = ["src", "bt", "bn", "xb", "xm", "xt", "ms", "mt"]


def prepare(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    p = {n: os.path.join(d, f"{n}.qcow2") for n in IMAGES}
    qcow2(p["src"])
    qio(p["src"], "qcow2", "write -P 0x41 0 1M", "write -P 0x42 2M 192k", "write -z 3M 64k")
    qcow2(p["bt"])
    qcow2(p["bn"])
    qcow2(p["xb"])
    qio(p["xb"], "qcow2", "write -P 0x01 0 4M")
    qcow2(p["xm"], backing=p["xb"])
    qio(p["xm"], "qcow2", "write -P 0x02 512k 1M")
    qcow2(p["xt"], backing=p["xm"])
    qio(p["xt"], "qcow2", "write -P 0x03 1M 64k", "write -P 0x04 3M 1M")
    qcow2(p["ms"])
    qio(p["ms"], "qcow2", "write -P 0x51 0 3M")
    qcow2(p["mt"])


def nbd_io(sock: str, export: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = tool(*args, f"nbd+unix:///{export}?socket={sock}")
    assert "failed" not in r.stdout, r.stdout


def strip_blips(trace: list[str]) -> list[str]:
    out: list[str] = []
    for t in trace:
        if (
            t == "running"
            and out
            and out[-1] == "paused"
            and len(out) >= 2
            and out[-2] == "running"
        ):
            out.pop()
            continue
        out.append(t)
    return out


async def scenario(s: QMPSession, d: str) -> dict[str, list]:
    p = {n: os.path.join(d, f"{n}.qcow2") for n in IMAGES}
    nbd = os.path.join(d, "nbd.sock")
    for n in ("src", "bt", "bn", "xb", "ms", "mt"):
        await s.x("blockdev-add", **fmt_opts(n, p[n]))
    await s.x("blockdev-add", **fmt_opts("xm", p["xm"], backing="xb"))
    await s.x("blockdev-add", **fmt_opts("xt", p["xt"], backing="xm"))
    await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    for n in ("src", "ms"):
        await s.x(
            "block-export-add", type="nbd", id=f"e-{n}", **{"node-name": n}, name=n, writable=True
        )

    # backup sync=full
    await s.x(
        "blockdev-backup", **{"job-id": "b1", "device": "src", "target": "bt", "sync": "full"}
    )
    await s.wait_status("b1", "null")
    # backup sync=none while the guest writes through the export
    await s.x(
        "blockdev-backup", **{"job-id": "b2", "device": "src", "target": "bn", "sync": "none"}
    )
    await s.wait_status("b2", "running")
    await asyncio.to_thread(
        nbd_io,
        nbd,
        "src",
        "write -P 0x91 4096 4096",
        "write -P 0x92 1M 128k",
        "write -P 0x93 4096 512",
        "write -z 2M 64k",
    )
    await s.x("job-cancel", id="b2")
    await s.wait_status("b2", "null")
    # non-active commit, then active commit with job-complete
    await s.x(
        "block-commit", **{"job-id": "c1", "device": "xt", "top-node": "xm", "base-node": "xb"}
    )
    await s.wait_status("c1", "null")
    await s.x("block-commit", **{"job-id": "c2", "device": "xt"})
    await s.wait("BLOCK_JOB_READY", device="c2")
    await s.x("job-complete", id="c2")
    await s.wait_status("c2", "null")
    # mirror with writes while READY; after the pivot the export writes to mt
    await s.x("blockdev-mirror", **{"job-id": "m1", "device": "ms", "target": "mt", "sync": "full"})
    await s.wait("BLOCK_JOB_READY", device="m1")
    await asyncio.to_thread(nbd_io, nbd, "ms", "write -P 0xa1 2M 64k", "write -P 0xa2 100000 3000")
    await s.x("job-complete", id="m1")
    await s.wait_status("m1", "null")
    await asyncio.to_thread(nbd_io, nbd, "ms", "write -P 0xa3 3M 4096")
    traces = {j: strip_blips(s.job_trace(j)) for j in ("b1", "b2", "c1", "c2", "m1")}
    data = {
        e: [x for x in s.of(e) if x.get("device") in traces]
        for e in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY")
    }
    for e in ("block-export-del",):
        for n in ("src", "ms"):
            await s.x(e, id=f"e-{n}")
    await s.x("nbd-server-stop")
    return {"traces": [traces], "data": [data]}


async def run_on(sock: str, d: str) -> dict[str, list]:
    s = await QMPSession(sock).open()
    try:
        return await asyncio.wait_for(scenario(s, d), 90)
    finally:
        await s.close()


def test_backup_commit_mirror_same_images_as_qemu(tmp_path):
    if shutil.which("qemu-storage-daemon") is None:
        pytest.fail("qemu-storage-daemon is not installed; `make test` installs it")
    qd, bd = str(tmp_path / "qemu"), str(tmp_path / "blockrep")
    prepare(qd)
    prepare(bd)

    q = QSD(str(tmp_path), "qsd")
    try:
        qemu = asyncio.run(run_on(q.sock, qd))
    finally:
        q.stop()
    with daemon(tmp_path, name="br") as d:
        ours = asyncio.run(run_on(d.qmp_sock, bd))

    assert ours["traces"] == qemu["traces"]
    for ev, qlist in qemu["data"][0].items():
        assert ours["data"][0][ev] == qlist, (ev, ours["data"][0][ev], qlist)
    for n in IMAGES:
        a, b = os.path.join(qd, f"{n}.qcow2"), os.path.join(bd, f"{n}.qcow2")
        check_clean(b)
        r = tool("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b, check=False)
        assert r.returncode == 0, (n, r.stdout, r.stderr)
        assert logical_sha256(a, "qcow2") == logical_sha256(b, "qcow2"), n
    # the commit rewrote xt's backing file name to the base image in both
    for base in (qd, bd):
        info = tool("qemu-img", "info", "--output=json", os.path.join(base, "xt.qcow2")).stdout
        assert os.path.join(base, "xb.qcow2") in info
    # sanity: the scenario did what it says
    qio(
        os.path.join(bd, "bn.qcow2"),
        "qcow2",
        "read -P 0x41 0 64k",
        "read -P 0 1M 128k",
        "read -P 0x42 2M 64k",
    )
    qio(os.path.join(bd, "mt.qcow2"), "qcow2", "read -P 0xa1 2M 64k", "read -P 0xa3 3M 4096")
    qio(
        os.path.join(bd, "xb.qcow2"),
        "qcow2",
        "read -P 0x02 512k 512k",
        "read -P 0x03 1M 64k",
        "read -P 0x04 3M 1M",
    )
    assert MiB
