"""Quorum, x-blockdev-change, blkdebug and block jobs through QMP (qemu.qmp), checked
against QEMU 7.2's measured behaviour (error texts, event fields and sequences).

The one intended difference: QEMU's backup start shows a ``paused``/``running``
pair of JOB_STATUS_CHANGE events (a drain while the copy-before-write filter is
inserted); blockrep has no drain there, so backup traces are compared with that
pair removed (``strip_drain_blip``) and otherwise must match exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.harness.images import MiB, file_opts, fmt_opts, qcow2, raw
from tests.harness.processes import daemon
from tests.harness.qmp import QMPSession, strip_drain_blip
from tests.harness.tools import check_clean, logical_sha256, qio, tool

EIO = "Input/output error"
ENOSPC = "No space left on device"


def with_daemon(tmp_path, fn, *args: str, name: str = "d") -> Any:
    with daemon(tmp_path, *args, name=name) as d:

        async def go() -> Any:
            s = await QMPSession(d.qmp_sock).open()
            try:
                return await fn(s)
            finally:
                await s.close()

        return asyncio.run(asyncio.wait_for(go(), 90))


def blkdebug(name: str, path: str, *rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "driver": "blkdebug",
        "node-name": name,
        "image": file_opts(path),
        "inject-error": list(rules),
    }


# -- quorum -------------------------------------------------------------------------------


def test_quorum_write_errors_and_flush(tmp_path):
    files = [raw(str(tmp_path / f"c{i}.raw"), MiB) for i in range(9)]

    async def go(s: QMPSession) -> None:
        # threshold 1, child b1 fails writes: the write succeeds, one REPORT_BAD
        await s.x("blockdev-add", **blkdebug("b0", files[0]))
        await s.x("blockdev-add", **blkdebug("b1", files[1], {"event": "none", "iotype": "write"}))
        await s.x("blockdev-add", **blkdebug("b2", files[2]))
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "q1", "vote-threshold": 1},
            children=["b0", "b1", "b2"],
        )
        out = await s.io("q1", "write -P 0x5a 4096 8192")
        assert "wrote 8192/8192 bytes at offset 4096" in out
        await s.settle()
        assert s.of("QUORUM_REPORT_BAD") == [
            {"node-name": "b1", "sectors-count": 16, "sector-num": 8, "type": "write", "error": EIO}
        ]
        assert s.of("QUORUM_FAILURE") == []
        s.clear()
        # threshold 2, b4 EIO and b5 ENOSPC: REPORT_BAD each, QUORUM_FAILURE; the error
        # vote is a tie and QEMU gives it to the last failing child (ENOSPC)
        await s.x("blockdev-add", **blkdebug("b3", files[3]))
        await s.x("blockdev-add", **blkdebug("b4", files[4], {"event": "none", "iotype": "write"}))
        await s.x(
            "blockdev-add",
            **blkdebug("b5", files[5], {"event": "none", "iotype": "write", "errno": 28}),
        )
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qb", "vote-threshold": 2},
            children=["b3", "b4", "b5"],
        )
        out = await s.io("qb", "write -P 0x33 1000 100")
        assert out.startswith(f"write failed: {ENOSPC}"), out
        await s.settle()
        assert s.events == [
            {
                "event": "QUORUM_REPORT_BAD",
                "data": {
                    "node-name": "b4",
                    "sectors-count": 2,
                    "sector-num": 1,
                    "type": "write",
                    "error": EIO,
                },
            },
            {
                "event": "QUORUM_REPORT_BAD",
                "data": {
                    "node-name": "b5",
                    "sectors-count": 2,
                    "sector-num": 1,
                    "type": "write",
                    "error": ENOSPC,
                },
            },
            {
                "event": "QUORUM_FAILURE",
                "data": {"reference": "qb", "sectors-count": 2, "sector-num": 1},
            },
        ]
        s.clear()
        # write-zeroes errors are reported as "write" (64 KiB = 128 sectors)
        await s.x(
            "x-blkdebug-set-rules",
            **{"node-name": "b1", "inject-error": [{"event": "none", "iotype": "write-zeroes"}]},
        )
        out = await s.io("q1", "write -z 65536 65536")
        assert "wrote 65536/65536" in out
        await s.settle()
        assert s.of("QUORUM_REPORT_BAD") == [
            {
                "node-name": "b1",
                "sectors-count": 128,
                "sector-num": 128,
                "type": "write",
                "error": EIO,
            }
        ]
        s.clear()
        # flush: REPORT_BAD with sector 0/0; failing past the threshold returns the
        # error but emits NO QUORUM_FAILURE
        await s.x("blockdev-add", **blkdebug("b6", files[6]))
        await s.x("blockdev-add", **blkdebug("b7", files[7], {"event": "none", "iotype": "flush"}))
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qf", "vote-threshold": 2},
            children=["b6", "b7"],
        )
        assert "wrote 512/512" in await s.io("qf", "write 0 512")
        out = await s.io("qf", "flush")
        assert EIO in out, out
        await s.settle()
        assert s.events == [
            {
                "event": "QUORUM_REPORT_BAD",
                "data": {
                    "node-name": "b7",
                    "sectors-count": 0,
                    "sector-num": 0,
                    "type": "flush",
                    "error": EIO,
                },
            }
        ]

    with_daemon(tmp_path, go)
    for i in (0, 2):
        with open(files[i], "rb") as f:
            f.seek(4096)
            assert f.read(8192) == b"\x5a" * 8192


def test_quorum_reads_vote_rewrite_and_fifo(tmp_path):
    pats = {
        "v0": 0x11,
        "v1": 0x11,
        "v2": 0x22,
        "d0": 0x11,
        "d1": 0x22,
        "d2": 0x33,
        "f0": 0x11,
        "f1": 0x22,
    }
    files = {}
    for n, p in pats.items():
        files[n] = raw(str(tmp_path / f"{n}.raw"), MiB)
        qio(files[n], "raw", f"write -P {p} 0 {MiB}")

    async def go(s: QMPSession) -> None:
        for n in ("v0", "v1", "v2", "d0", "d1", "d2"):
            await s.x("blockdev-add", **{"driver": "file", "node-name": n, "filename": files[n]})
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qv", "vote-threshold": 2, "rewrite-corrupted": True},
            children=["v0", "v1", "v2"],
        )
        out = await s.io("qv", "read -P 0x11 512 1024")
        assert "read 1024/1024" in out and "verification failed" not in out
        await s.settle()
        # a content mismatch: no "error" member
        assert s.events == [
            {
                "event": "QUORUM_REPORT_BAD",
                "data": {"node-name": "v2", "sectors-count": 2, "sector-num": 1, "type": "read"},
            }
        ]
        s.clear()
        # rewrite-corrupted repaired exactly the range read: a second read is quiet
        out = await s.io("qv", "read -P 0x11 512 1024")
        assert "verification failed" not in out
        await s.settle()
        assert s.events == []
        # all three differ with threshold 2: QUORUM_FAILURE only, EIO
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qd", "vote-threshold": 2},
            children=["d0", "d1", "d2"],
        )
        out = await s.io("qd", "read 0 512")
        assert out.startswith(f"read failed: {EIO}"), out
        await s.settle()
        assert s.events == [
            {
                "event": "QUORUM_FAILURE",
                "data": {"reference": "qd", "sectors-count": 1, "sector-num": 0},
            }
        ]
        s.clear()
        await s.x("blockdev-del", **{"node-name": "qd"})
        # all differ with threshold 1: the tie goes to the last child; losers are
        # reported in reverse child order
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qe", "vote-threshold": 1},
            children=["d0", "d1", "d2"],
        )
        out = await s.io("qe", "read -P 0x33 0 512")
        assert "verification failed" not in out, out
        await s.settle()
        assert [e["data"]["node-name"] for e in s.events] == ["d1", "d0"]
        s.clear()
        # fifo: first child fails reads -> REPORT_BAD with error, second child's data
        await s.x(
            "blockdev-add", **blkdebug("f0", files["f0"], {"event": "none", "iotype": "read"})
        )
        await s.x("blockdev-add", **{"driver": "file", "node-name": "f1", "filename": files["f1"]})
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "qf", "vote-threshold": 1, "read-pattern": "fifo"},
            children=["f0", "f1"],
        )
        out = await s.io("qf", "read -P 0x22 0 4096")
        assert "verification failed" not in out, out
        await s.settle()
        assert s.events == [
            {
                "event": "QUORUM_REPORT_BAD",
                "data": {
                    "node-name": "f0",
                    "sectors-count": 8,
                    "sector-num": 0,
                    "type": "read",
                    "error": EIO,
                },
            }
        ]
        s.clear()
        # fifo never compares: mismatching children, threshold 2, first child's data, no event
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{
                "node-name": "qg",
                "vote-threshold": 2,
                "read-pattern": "fifo",
                "rewrite-corrupted": True,
            },
            children=["v1", "v2"] if False else ["d0", "d1"],
        )
        out = await s.io("qg", "read -P 0x11 0 4096")
        assert "verification failed" not in out, out
        await s.settle()
        assert s.events == []

    with_daemon(tmp_path, go)
    with open(files["v2"], "rb") as f:
        data = f.read(4096)
    assert (
        data[:512] == b"\x22" * 512
        and data[512:1536] == b"\x11" * 1024
        and data[1536:] == b"\x22" * 2560
    )


def test_quorum_open_errors(tmp_path):
    a, b = raw(str(tmp_path / "a.raw"), MiB), raw(str(tmp_path / "b.raw"), 4096)

    async def go(s: QMPSession) -> None:
        await s.x("blockdev-add", **{"driver": "file", "node-name": "c0", "filename": a})
        await s.x("blockdev-add", **{"driver": "file", "node-name": "c1", "filename": b})
        await s.x(
            "blockdev-add", **{"driver": "file", "node-name": "c2", "filename": a, "locking": "off"}
        )
        q = {"driver": "quorum", "node-name": "q"}
        await s.err(
            "blockdev-add",
            {**q, "children": [], "vote-threshold": 1},
            "Number of provided children must be 1 or more",
        )
        await s.err(
            "blockdev-add", {**q, "children": ["c0"]}, "Parameter 'vote-threshold' is missing"
        )
        for t in (0, -1):
            await s.err(
                "blockdev-add",
                {**q, "children": ["c0"], "vote-threshold": t},
                "Parameter 'vote-threshold' expects a value >= 1",
            )
        await s.err(
            "blockdev-add",
            {**q, "children": ["c0"], "vote-threshold": 2},
            "threshold may not exceed children count",
        )
        await s.err(
            "blockdev-add",
            {**q, "children": ["c0"], "vote-threshold": 2, "read-pattern": "fifo"},
            "threshold may not exceed children count",
        )
        await s.err(
            "blockdev-add",
            {**q, "children": ["c0"], "vote-threshold": 1, "read-pattern": "bogus"},
            "Parameter 'read-pattern' does not accept value 'bogus'",
        )
        await s.err(
            "blockdev-add",
            {**q, "children": ["c0", "c1"], "vote-threshold": 1},
            "Could not refresh total sector count: Input/output error",
        )
        # rewrite-corrupted is accepted with the default pattern, and ignored with fifo
        await s.x(
            "blockdev-add", **q, children=["c0"], **{"vote-threshold": 1, "rewrite-corrupted": True}
        )
        await s.err(
            "blockdev-add",
            {**q, "children": ["c2"], "vote-threshold": 1},
            "Duplicate nodes with node-name='q'",
        )
        await s.x(
            "blockdev-add",
            **{
                "driver": "quorum",
                "node-name": "q2",
                "children": ["c2"],
                "vote-threshold": 1,
                "read-pattern": "fifo",
                "rewrite-corrupted": True,
            },
        )

    with_daemon(tmp_path, go)


def test_x_blockdev_change_refusals_and_child_names(tmp_path):
    files = [raw(str(tmp_path / f"n{i}.raw"), MiB) for i in range(12)]
    small = raw(str(tmp_path / "small.raw"), 8192)

    async def go(s: QMPSession) -> None:
        names = ["c0", "c1", "r", "c2", "c3", "c5", "c6", "t0", "t1", "t2", "t3", "t4"]
        for n, f in zip(names, files, strict=True):
            await s.x("blockdev-add", **{"driver": "file", "node-name": n, "filename": f})
        await s.x("blockdev-add", **{"driver": "file", "node-name": "sm", "filename": small})
        await s.x(
            "blockdev-add",
            **{"driver": "file", "node-name": "rf", "filename": small, "locking": "off"},
        )
        await s.x("blockdev-add", **{"driver": "raw", "node-name": "rw", "file": "rf"})
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "q", "vote-threshold": 1},
            children=["c0", "c1"],
        )
        chg = "x-blockdev-change"
        await s.err(
            chg,
            {"parent": "q", "child": "children.0", "node": "r"},
            "The parameters child and node are in conflict",
        )
        await s.err(chg, {"parent": "q"}, "Either child or node must be specified")
        await s.err(
            chg, {"parent": "nope", "node": "r"}, "Cannot find device='nope' nor node-name='nope'"
        )
        await s.err(
            chg, {"parent": "c2", "node": "r"}, "The node c2 does not support adding a child"
        )
        await s.err(chg, {"parent": "q", "node": "nope"}, "Node 'nope' not found")
        await s.err(chg, {"parent": "q", "node": "c0"}, "The node c0 already has a parent")
        await s.err(chg, {"parent": "q", "node": "rf"}, "The node rf already has a parent")
        await s.err(
            chg, {"parent": "q", "child": "children.9"}, "Node 'q' does not have child 'children.9'"
        )
        await s.err(chg, {"parent": "c2", "child": "x"}, "Node 'c2' does not have child 'x'")
        await s.err(
            chg, {"parent": "rw", "child": "file"}, "The node rw does not support removing a child"
        )

        # jobs.md 2: next_child_index rule, 2 initial children
        await s.x(chg, parent="q", node="r")  # children.2
        await s.x(chg, parent="q", node="c2")  # children.3
        await s.x(chg, parent="q", node="c3")  # children.4
        await s.x(chg, parent="q", child="children.1")
        await s.x(chg, parent="q", node="c1")  # children.5 (no reuse of .1)
        await s.err(
            chg, {"parent": "q", "child": "children.1"}, "Node 'q' does not have child 'children.1'"
        )
        await s.x(chg, parent="q", child="children.4")  # next stays 6
        await s.x(chg, parent="q", node="c5")  # children.6
        await s.x(chg, parent="q", child="children.0")
        await s.x(chg, parent="q", node="c6")  # children.7
        # a child of another size is accepted at add time (QEMU does not re-check)
        await s.x(chg, parent="q", node="sm")  # children.8
        for name in ("children.8", "children.2", "children.3", "children.5", "children.6"):
            await s.x(chg, parent="q", child=name)
        await s.err(
            chg,
            {"parent": "q", "child": "children.7"},
            "The number of children cannot be lower than the vote threshold 1",
        )

        # 3 initial children, threshold 2: the last index is reused once per delete
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "q3", "vote-threshold": 1},
            children=["t0", "t1", "t2"],
        )
        await s.x(chg, parent="q3", child="children.2")
        await s.x(chg, parent="q3", node="t3")  # children.2 again
        await s.x(chg, parent="q3", child="children.2")
        await s.x(chg, parent="q3", child="children.1")
        await s.x(chg, parent="q3", node="t4")  # children.1
        await s.x(chg, parent="q3", child="children.1")
        await s.err(
            chg,
            {"parent": "q3", "child": "children.0"},
            "The number of children cannot be lower than the vote threshold 1",
        )
        await s.x("blockdev-del", **{"node-name": "q3"})
        await s.x(
            "blockdev-add",
            driver="quorum",
            **{"node-name": "q4", "vote-threshold": 2},
            children=["t0", "t1"],
        )
        await s.err(
            chg,
            {"parent": "q4", "child": "children.0"},
            "The number of children cannot be lower than the vote threshold 2",
        )
        # a removed child is a free node again
        await s.x("blockdev-del", **{"node-name": "c0"})

    with_daemon(tmp_path, go)


# -- jobs ---------------------------------------------------------------------------------

COMPLETED_SEQ = [
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
]


async def query_job(s: QMPSession, job: str) -> dict[str, Any] | None:
    for j in await s.x("query-jobs"):
        if j["id"] == job:
            return j
    return None


async def query_block_job(s: QMPSession, job: str) -> dict[str, Any] | None:
    for j in await s.x("query-block-jobs"):
        if j["device"] == job:
            return j
    return None


def test_backup_full_and_none(tmp_path):
    src = qcow2(str(tmp_path / "src.qcow2"))
    qio(src, "qcow2", "write -P 0x41 0 1M", "write -P 0x42 2M 64k")
    src_sha = logical_sha256(src, "qcow2")
    t1 = qcow2(str(tmp_path / "t1.qcow2"))
    t2 = qcow2(str(tmp_path / "t2.qcow2"))

    async def go(s: QMPSession) -> None:
        await s.x("blockdev-add", **fmt_opts("t1", t1))
        await s.x("blockdev-add", **fmt_opts("t2", t2))
        # sync=full with the defaults
        await s.x(
            "blockdev-backup", **{"job-id": "j1", "device": "src0", "target": "t1", "sync": "full"}
        )
        await s.wait_status("j1", "null")
        assert strip_drain_blip(s.job_trace("j1")) == COMPLETED_SEQ
        assert s.of("BLOCK_JOB_COMPLETED") == [
            {"device": "j1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "backup"}
        ]
        assert await s.x("query-jobs") == [] and await s.x("query-block-jobs") == []
        # sync=none, auto-finalize/dismiss off: runs until cancelled
        s.clear()
        await s.x(
            "blockdev-backup",
            **{
                "job-id": "j2",
                "device": "src0",
                "target": "t2",
                "sync": "none",
                "auto-finalize": False,
                "auto-dismiss": False,
            },
        )
        await s.wait_status("j2", "running")
        await s.settle()
        assert await s.x("query-jobs") == [
            {
                "id": "j2",
                "type": "backup",
                "status": "running",
                "current-progress": 0,
                "total-progress": 4 * MiB,
            }
        ]
        assert await s.x("query-block-jobs") == [
            {
                "auto-finalize": False,
                "io-status": "ok",
                "device": "j2",
                "auto-dismiss": False,
                "busy": False,
                "len": 4 * MiB,
                "offset": 0,
                "status": "running",
                "paused": False,
                "speed": 0,
                "ready": False,
                "type": "backup",
            }
        ]
        for verb in ("dismiss", "finalize", "complete"):
            await s.err(
                f"job-{verb}",
                {"id": "j2"},
                f"Job 'j2' in state 'running' cannot accept command verb '{verb}'",
            )
        await s.err(
            "block-job-complete",
            {"device": "j2"},
            "Job 'j2' in state 'running' cannot accept command verb 'complete'",
        )
        # guest writes through the device: the first overwrite of a cluster copies the pre-image
        assert "wrote" in await s.io("src0", "write -P 0x77 4096 4096")
        assert "wrote" in await s.io("src0", "write -P 0x78 4096 4096")
        await s.x("job-pause", id="j2")
        await s.wait_status("j2", "paused")
        bj = await query_block_job(s, "j2")
        assert bj["status"] == "paused" and bj["paused"] is True
        await s.x("job-resume", id="j2")
        await s.x("block-job-set-speed", device="j2", speed=0)
        s.clear()
        await s.x("job-cancel", id="j2")
        await s.wait_status("j2", "concluded")
        assert s.job_trace("j2")[-3:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
        # QEMU counts the copy-before-write copies as progress: one 64 KiB cluster
        assert s.of("BLOCK_JOB_CANCELLED") == [
            {"device": "j2", "len": 4 * MiB, "offset": 65536, "speed": 0, "type": "backup"}
        ]
        (j,) = await s.x("query-jobs")
        assert j["status"] == "concluded" and j["error"] == "Operation canceled"
        (bj,) = await s.x("query-block-jobs")
        assert bj["error"] == "Operation canceled"
        await s.x("job-dismiss", id="j2")
        await s.wait_status("j2", "null")
        for verb in ("finalize", "cancel", "dismiss", "complete", "pause", "resume"):
            await s.err(f"job-{verb}", {"id": "j2"}, "Job not found")
        for verb in ("cancel", "complete", "pause", "resume", "finalize", "dismiss"):
            await s.err(
                f"block-job-{verb}", {"device": "j2"}, "Block job 'j2' not found", "DeviceNotActive"
            )
        await s.err(
            "block-job-set-speed",
            {"device": "j2", "speed": 1},
            "Block job 'j2' not found",
            "DeviceNotActive",
        )

    with_daemon(tmp_path, go, "-drive", f"if=none,id=src0,driver=qcow2,file.filename={src}")
    for p in (src, t1, t2):
        check_clean(p)
    assert logical_sha256(t1, "qcow2") == src_sha
    tool("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, t1, check=False)
    # t2 holds exactly the pre-image of the first overwrite: the 64 KiB cluster at 0
    qio(t2, "qcow2", "read -P 0x41 0 64k", "read -P 0 64k 4032k")
    qio(src, "qcow2", "read -P 0x41 0 4096", "read -P 0x78 4096 4096", "read -P 0x41 8192 1016k")


def test_backup_progress_cancel_and_manual_finalize(tmp_path):
    src = qcow2(str(tmp_path / "src.qcow2"))
    qio(src, "qcow2", "write -P 0x41 0 4M")
    tgts = [qcow2(str(tmp_path / f"t{i}.qcow2")) for i in range(3)]

    async def go(s: QMPSession) -> None:
        for i, t in enumerate(tgts):
            await s.x("blockdev-add", **fmt_opts(f"t{i}", t))
        # speed-limited: progress rises, then set-speed 0 lets it finish at total
        await s.x(
            "blockdev-backup",
            **{"job-id": "p", "device": "src0", "target": "t0", "sync": "full", "speed": 2 * MiB},
        )
        seen = []
        for _ in range(8):
            j = await query_job(s, "p")
            if j is None:
                break
            assert j["total-progress"] == 4 * MiB
            bj = await query_block_job(s, "p")
            assert bj["len"] == 4 * MiB and bj["offset"] >= j["current-progress"]
            seen.append(j["current-progress"])
            await asyncio.sleep(0.15)
        assert seen == sorted(seen) and any(0 < x < 4 * MiB for x in seen), seen
        await s.x("block-job-set-speed", device="p", speed=0)
        await s.wait_status("p", "null")
        (done,) = [e for e in s.of("BLOCK_JOB_COMPLETED") if e["device"] == "p"]
        assert done["offset"] == done["len"] == 4 * MiB and "error" not in done
        # cancel mid-way: speed=1 keeps it at the first chunk
        await s.x(
            "blockdev-backup",
            **{"job-id": "c", "device": "src0", "target": "t1", "sync": "full", "speed": 1},
        )
        await asyncio.sleep(0.4)
        j = await query_job(s, "c")
        assert j["status"] == "running" and j["current-progress"] < 4 * MiB
        await s.x("block-job-cancel", device="c")
        await s.wait_status("c", "null")
        assert strip_drain_blip(s.job_trace("c")) == [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
        ]
        (ev,) = s.of("BLOCK_JOB_CANCELLED")
        assert ev["speed"] == 1 and ev["len"] == 4 * MiB and ev["offset"] < 4 * MiB
        # auto-finalize=false: PENDING, finalize, then dismiss
        await s.x(
            "blockdev-backup",
            **{
                "job-id": "j3",
                "device": "src0",
                "target": "t2",
                "sync": "full",
                "auto-finalize": False,
                "auto-dismiss": False,
            },
        )
        await s.wait("BLOCK_JOB_PENDING", id="j3")
        assert s.of("BLOCK_JOB_PENDING") == [{"type": "backup", "id": "j3"}]
        await s.err(
            "job-dismiss",
            {"id": "j3"},
            "Job 'j3' in state 'pending' cannot accept command verb 'dismiss'",
        )
        await s.x("job-finalize", id="j3")
        await s.wait_status("j3", "concluded")
        await s.x("job-dismiss", id="j3")
        await s.wait_status("j3", "null")
        assert strip_drain_blip(s.job_trace("j3")) == [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]

    with_daemon(tmp_path, go, "-drive", f"if=none,id=src0,driver=qcow2,file.filename={src}")
    for p in tgts:
        check_clean(p)


def test_commit_non_active_and_active(tmp_path):
    base = qcow2(str(tmp_path / "base.qcow2"))
    mid = qcow2(str(tmp_path / "mid.qcow2"), backing=base)
    top = qcow2(str(tmp_path / "top.qcow2"), backing=mid)
    qio(base, "qcow2", "write -P 0x01 0 4M")
    qio(mid, "qcow2", "write -P 0x02 1M 1M")
    qio(top, "qcow2", "write -P 0x03 3M 512k")
    want = logical_sha256(top, "qcow2")

    async def go(s: QMPSession) -> None:
        await s.x("blockdev-add", **fmt_opts("xb", base))
        await s.x("blockdev-add", **fmt_opts("xm", mid, backing="xb"))
        await s.x("blockdev-add", **fmt_opts("xt", top, backing="xm"))
        await s.x(
            "block-commit", **{"job-id": "c1", "device": "xt", "top-node": "xm", "base-node": "xb"}
        )
        await s.wait_status("c1", "null")
        assert s.job_trace("c1") == COMPLETED_SEQ
        assert s.of("BLOCK_JOB_COMPLETED") == [
            {"device": "c1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "commit"}
        ]
        nodes = {n["node-name"]: n for n in await s.x("query-named-block-nodes")}
        assert nodes["xt"]["image"]["backing-filename"] == base
        s.clear()
        # active commit with a speed limit: 'complete' is refused until READY
        await s.x("block-commit", **{"job-id": "c2", "device": "xt", "speed": 1})
        await s.wait_status("c2", "running")
        await s.err(
            "job-complete",
            {"id": "c2"},
            "Job 'c2' in state 'running' cannot accept command verb 'complete'",
        )
        await s.x("block-job-set-speed", device="c2", speed=0)
        ready = await s.wait("BLOCK_JOB_READY", device="c2")
        assert ready == {
            "device": "c2",
            "len": 512 * 1024,
            "offset": 512 * 1024,
            "speed": 0,
            "type": "commit",
        }
        bj = await query_block_job(s, "c2")
        assert bj["status"] == "ready" and bj["ready"] is True and bj["busy"] is False
        # a write while READY is copied before the pivot
        assert "wrote" in await s.io("xt", "write -P 0x04 0 64k")
        await s.x("job-complete", id="c2")
        await s.wait_status("c2", "null")
        assert s.job_trace("c2") == [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        assert await s.x("query-jobs") == []

    with_daemon(tmp_path, go)
    for p in (base, mid, top):
        check_clean(p)
    qio(
        base,
        "qcow2",
        "read -P 0x04 0 64k",
        "read -P 0x01 64k 960k",
        "read -P 0x02 1M 1M",
        "read -P 0x03 3M 512k",
    )
    assert tool("qemu-img", "info", "--output=json", top).stdout.count(base) >= 1
    assert want  # top's view before the writes while ready


def test_active_commit_cancel_on_ready(tmp_path):
    base = qcow2(str(tmp_path / "base.qcow2"))
    top = qcow2(str(tmp_path / "top.qcow2"), backing=base)
    base2 = qcow2(str(tmp_path / "base2.qcow2"))
    top2 = qcow2(str(tmp_path / "top2.qcow2"), backing=base2)
    qio(top, "qcow2", "write -P 0x05 0 1M")

    async def go(s: QMPSession) -> None:
        await s.x("blockdev-add", **fmt_opts("b", base))
        await s.x("blockdev-add", **fmt_opts("t", top, backing="b"))
        await s.x("blockdev-add", **fmt_opts("b2", base2))
        await s.x("blockdev-add", **fmt_opts("t2", top2, backing="b2"))
        # soft cancel on READY completes without pivot (no CANCELLED)
        await s.x(
            "block-commit",
            **{"job-id": "c3", "device": "t", "auto-finalize": False, "auto-dismiss": False},
        )
        ready = await s.wait("BLOCK_JOB_READY", device="c3")
        assert ready["len"] == ready["offset"] == MiB
        await s.x("block-job-cancel", device="c3")
        await s.wait("BLOCK_JOB_PENDING", id="c3")
        await s.x("job-finalize", id="c3")
        await s.wait_status("c3", "concluded")
        await s.x("job-dismiss", id="c3")
        assert s.job_trace("c3") == [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        # forced cancel on READY (job-cancel is always forced): CANCELLED; READY of an empty top is len 0
        await s.x("block-commit", **{"job-id": "c4", "device": "t2"})
        ready = await s.wait("BLOCK_JOB_READY", device="c4")
        assert ready == {"device": "c4", "len": 0, "offset": 0, "speed": 0, "type": "commit"}
        await s.x("job-cancel", id="c4")
        await s.wait_status("c4", "null")
        assert s.job_trace("c4") == [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
        ]

    with_daemon(tmp_path, go)
    for p in (base, top, base2, top2):
        check_clean(p)
    qio(base, "qcow2", "read -P 0x05 0 1M")  # the data was copied, but t still backs onto b
    qio(top, "qcow2", "read -P 0x05 0 1M")


def test_mirror_lifecycle(tmp_path):
    src = qcow2(str(tmp_path / "src.qcow2"))
    qio(src, "qcow2", "write -P 0x61 0 2M")
    t = {n: qcow2(str(tmp_path / f"{n}.qcow2")) for n in ("m1", "m2", "m3")}
    small = qcow2(str(tmp_path / "small.qcow2"), MiB)

    async def go(s: QMPSession) -> None:
        for n, p in t.items():
            await s.x("blockdev-add", **fmt_opts(n, p))
        await s.x("blockdev-add", **fmt_opts("sm", small))
        # READY, complete -> pivot: the device now writes to m1
        await s.x(
            "blockdev-mirror", **{"job-id": "j1", "device": "disk0", "target": "m1", "sync": "full"}
        )
        assert await s.wait("BLOCK_JOB_READY", device="j1") == {
            "device": "j1",
            "len": 4 * MiB,
            "offset": 4 * MiB,
            "speed": 0,
            "type": "mirror",
        }
        await s.x("job-complete", id="j1")
        await s.wait_status("j1", "null")
        assert s.job_trace("j1") == [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        (blk,) = await s.x("query-block")
        assert blk["inserted"]["node-name"] == "m1"
        assert "wrote" in await s.io("disk0", "write -P 0x62 3M 64k")
        s.clear()
        # block-job-cancel on READY: COMPLETED, no pivot
        await s.x(
            "blockdev-mirror", **{"job-id": "j2", "device": "disk0", "target": "m2", "sync": "full"}
        )
        await s.wait("BLOCK_JOB_READY", device="j2")
        await s.x("block-job-cancel", device="j2")
        await s.wait_status("j2", "null")
        assert s.job_trace("j2") == [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        assert "error" not in s.of("BLOCK_JOB_COMPLETED")[0]
        (blk,) = await s.x("query-block")
        assert blk["inserted"]["node-name"] == "m1"
        s.clear()
        # running (speed-limited) mirror: complete refused; block-job-cancel cancels
        await s.x(
            "blockdev-mirror",
            **{"job-id": "m4", "device": "disk0", "target": "m3", "sync": "full", "speed": 1},
        )
        await s.wait_status("m4", "running")
        await s.err(
            "job-complete",
            {"id": "m4"},
            "Job 'm4' in state 'running' cannot accept command verb 'complete'",
        )
        await s.err(
            "blockdev-mirror",
            {"job-id": "m5", "device": "m2", "target": "m3", "sync": "full"},
            "Node 'm3' is busy: block device is in use by block job: mirror",
        )
        await s.err(
            "blockdev-mirror",
            {"job-id": "m4", "device": "m2", "target": "sm", "sync": "full"},
            "Job ID 'm4' already in use",
        )
        await asyncio.sleep(0.3)
        j = await query_job(s, "m4")
        assert 0 < j["current-progress"] < j["total-progress"] == 4 * MiB
        await s.x("block-job-cancel", device="m4")
        await s.wait_status("m4", "null")
        assert s.job_trace("m4") == [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null",
        ]
        (ev,) = s.of("BLOCK_JOB_CANCELLED")
        assert ev["speed"] == 1 and ev["type"] == "mirror" and ev["device"] == "m4"
        s.clear()
        # a size mismatch fails the started job, not the command
        await s.x(
            "blockdev-mirror", **{"job-id": "e", "device": "m2", "target": "sm", "sync": "full"}
        )
        await s.wait_status("e", "null")
        assert s.job_trace("e") == [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        assert s.of("BLOCK_JOB_COMPLETED") == [
            {
                "device": "e",
                "len": 0,
                "offset": 0,
                "speed": 0,
                "type": "mirror",
                "error": "Source and target image have different sizes",
            }
        ]

    with_daemon(tmp_path, go, "-drive", f"if=none,id=disk0,driver=qcow2,file.filename={src}")
    for p in [src, small, *t.values()]:
        check_clean(p)
    qio(t["m1"], "qcow2", "read -P 0x61 0 2M", "read -P 0x62 3M 64k")
    qio(t["m2"], "qcow2", "read -P 0x61 0 2M", "read -P 0x62 3M 64k")
    qio(src, "qcow2", "read -P 0 3M 64k")


def test_drive_mirror_to_nbd_of_another_daemon_and_to_a_file(tmp_path):
    src = qcow2(str(tmp_path / "src.qcow2"))
    qio(src, "qcow2", "write -P 0x71 0 1M", "write -P 0x72 3M 1M")
    dst_raw = raw(str(tmp_path / "dst.raw"))
    dst_q = qcow2(str(tmp_path / "dst.qcow2"))
    nbd_sock = str(tmp_path / "b.nbd")

    with daemon(
        tmp_path,
        "--blockdev",
        f"driver=raw,node-name=d,file.driver=file,file.filename={dst_raw}",
        "--nbd-server",
        f"addr.type=unix,addr.path={nbd_sock}",
        "--export",
        "type=nbd,id=e,node-name=d,name=exp,writable=on",
        name="B",
    ):

        async def go(s: QMPSession) -> None:
            uri = f"nbd+unix:///exp?socket={nbd_sock}"
            await s.x(
                "drive-mirror",
                **{
                    "job-id": "dm",
                    "device": "disk0",
                    "target": uri,
                    "format": "raw",
                    "mode": "existing",
                    "sync": "full",
                },
            )
            await s.wait("BLOCK_JOB_READY", device="dm")
            await s.x("job-complete", id="dm")
            await s.wait_status("dm", "null")
            assert s.job_trace("dm") == [
                "created",
                "running",
                "ready",
                "BLOCK_JOB_READY",
                "waiting",
                "pending",
                "BLOCK_JOB_COMPLETED",
                "concluded",
                "null",
            ]
            # after the pivot, guest writes go over NBD to daemon B
            assert "wrote" in await s.io("disk0", "write -P 0x73 2M 4096")
            s.clear()
            await s.x("blockdev-add", **fmt_opts("s2", src, **{"read-only": True}))
            await s.x(
                "drive-mirror",
                **{
                    "job-id": "df",
                    "device": "s2",
                    "target": dst_q,
                    "format": "qcow2",
                    "mode": "existing",
                    "sync": "full",
                },
            )
            await s.wait("BLOCK_JOB_READY", device="df")
            await s.x("block-job-complete", device="df")
            await s.wait_status("df", "null")
            assert s.job_trace("df")[-4:] == ["pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
            dm = {"device": "s2", "mode": "existing", "sync": "full"}
            await s.err(
                "drive-mirror",
                {**dm, "target": str(tmp_path / "nonexist.qcow2"), "format": "qcow2"},
                f"Could not open '{tmp_path}/nonexist.qcow2': No such file or directory",
            )
            await s.err(
                "drive-mirror",
                {**dm, "target": dst_q, "format": "bogus"},
                "Unknown file format 'bogus'",
            )
            await s.err(
                "drive-mirror",
                {**dm, "target": "nbd://127.0.0.1:1/x", "format": "raw"},
                "Failed to connect to '127.0.0.1:1': Connection refused",
            )
            await s.err(
                "drive-mirror",
                {**dm, "target": dst_q, "format": "qcow2", "sync": "incremental"},
                "Sync mode 'incremental' not supported",
            )
            await s.err(
                "drive-mirror",
                {**dm, "device": "nope", "target": dst_q, "format": "qcow2"},
                "Cannot find device='nope' nor node-name='nope'",
            )

        with_daemon(
            tmp_path, go, "-drive", f"if=none,id=disk0,driver=qcow2,file.filename={src}", name="A"
        )
    check_clean(src)
    check_clean(dst_q)
    qio(
        dst_raw,
        "raw",
        "read -P 0x71 0 1M",
        "read -P 0 1M 1M",
        "read -P 0x73 2M 4096",
        "read -P 0x72 3M 1M",
    )
    qio(src, "qcow2", "read -P 0 2M 4096")
    assert (
        tool(
            "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, dst_q, check=False
        ).returncode
        == 0
    )


def test_blkdebug_errors_fail_jobs(tmp_path):
    src = qcow2(str(tmp_path / "src.qcow2"))
    qio(src, "qcow2", "write -P 0x41 0 4M")
    tr = raw(str(tmp_path / "t.raw"))
    tm = raw(str(tmp_path / "tm.raw"))
    sr = raw(str(tmp_path / "sr.raw"))
    spare = raw(str(tmp_path / "spare.raw"))

    async def go(s: QMPSession) -> None:
        await s.err(
            "blockdev-add",
            blkdebug("bx", spare, {"event": "bogus"}),
            "Parameter 'event' does not accept value 'bogus'",
        )
        await s.err(
            "blockdev-add",
            blkdebug("bx", spare, {"errno": 5}),
            "Parameter 'inject-error[0].event' is missing",
        )
        # a QEMU event blockrep never emits is accepted (its rule just stays idle)
        await s.x("blockdev-add", **blkdebug("bx", spare, {"event": "l2_update"}))
        assert "wrote 512/512" in await s.io("bx", "write 0 512")
        await s.x(
            "blockdev-add",
            driver="raw",
            **{"node-name": "bt"},
            file={"driver": "blkdebug", "node-name": "bd", "image": file_opts(tr)},
        )
        await s.x(
            "x-blkdebug-set-rules", **{"node-name": "bd", "inject-error": [{"event": "write_aio"}]}
        )
        await s.x(
            "blockdev-backup", **{"job-id": "be", "device": "src0", "target": "bt", "sync": "full"}
        )
        await s.wait_status("be", "null")
        assert strip_drain_blip(s.job_trace("be")) == [
            "created",
            "running",
            "BLOCK_JOB_ERROR",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        assert s.of("BLOCK_JOB_ERROR") == [
            {"device": "be", "operation": "write", "action": "report"}
        ]
        assert s.of("BLOCK_JOB_COMPLETED") == [
            {
                "device": "be",
                "len": 4 * MiB,
                "offset": 0,
                "speed": 0,
                "type": "backup",
                "error": "Input/output error",
            }
        ]
        s.clear()
        # mirror: a source read error (ENOSPC)
        await s.x(
            "blockdev-add",
            driver="raw",
            **{"node-name": "ms"},
            file=blkdebug("md", sr, {"event": "none", "iotype": "read", "errno": 28}),
        )
        await s.x("blockdev-add", **{"driver": "raw", "node-name": "mt", "file": file_opts(tm)})
        await s.x(
            "blockdev-mirror", **{"job-id": "me", "device": "ms", "target": "mt", "sync": "full"}
        )
        await s.wait_status("me", "null")
        assert s.job_trace("me") == [
            "created",
            "running",
            "BLOCK_JOB_ERROR",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null",
        ]
        assert s.of("BLOCK_JOB_ERROR") == [
            {"device": "me", "operation": "read", "action": "report"}
        ]
        assert s.of("BLOCK_JOB_COMPLETED")[0]["error"] == ENOSPC
        # blkdebug once: only the first write fails, as qemu-io reports it
        await s.x(
            "x-blkdebug-set-rules",
            **{
                "node-name": "bd",
                "inject-error": [{"event": "none", "iotype": "write", "once": True}],
            },
        )
        assert (await s.io("bt", "write 0 512")).startswith(f"write failed: {EIO}")
        assert "wrote 512/512" in await s.io("bt", "write 0 512")

    with_daemon(tmp_path, go, "-drive", f"if=none,id=src0,driver=qcow2,file.filename={src}")
    check_clean(src)


def test_job_argument_errors(tmp_path):
    base = qcow2(str(tmp_path / "base.qcow2"))
    mid = qcow2(str(tmp_path / "mid.qcow2"), backing=base)
    top = qcow2(str(tmp_path / "top.qcow2"), backing=mid)
    other = qcow2(str(tmp_path / "other.qcow2"))
    small = qcow2(str(tmp_path / "small.qcow2"), MiB)
    bt = qcow2(str(tmp_path / "bt.qcow2"))

    async def go(s: QMPSession) -> None:
        await s.x("blockdev-add", **fmt_opts("yb", base))
        await s.x("blockdev-add", **fmt_opts("ym", mid, backing="yb"))
        await s.x("blockdev-add", **fmt_opts("yt", top, backing="ym"))
        await s.x("blockdev-add", **fmt_opts("other", other))
        await s.x("blockdev-add", **fmt_opts("small", small))
        await s.x("blockdev-add", **fmt_opts("bt", bt))
        c = "block-commit"
        await s.err(
            c, {"job-id": "c", "device": "nope"}, "Device 'nope' not found", "DeviceNotFound"
        )
        await s.err(c, {"job-id": "c", "device": "ym"}, "Need a root block node")
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "nope"},
            "Cannot find device='' nor node-name='nope'",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "base-node": "nope"},
            "Cannot find device='' nor node-name='nope'",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "other"},
            "'other' is not in this backing file chain",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "base-node": "other"},
            "'other' is not in this backing file chain",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "ym", "base-node": "ym"},
            "cannot commit an image into itself",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "yb"},
            "cannot commit an image into itself",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "yb", "base-node": "ym"},
            "'ym' is not in this backing file chain",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top-node": "ym", "top": mid},
            "'top-node' and 'top' are mutually exclusive",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "base-node": "yb", "base": base},
            "'base-node' and 'base' are mutually exclusive",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "top": "/nonexist"},
            "Top image file /nonexist not found",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "base": "/nonexist"},
            "Can't find '/nonexist' in the backing chain",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "backing-file": "x"},
            "'backing-file' specified, but 'top' is the active layer",
        )
        await s.err(
            c,
            {"job-id": "c", "device": "yt", "speed": -1},
            "Parameter 'speed' expects a non-negative value",
        )
        await s.err(c, {"job-id": "", "device": "yt"}, "Invalid job ID ''")
        await s.err(c, {"job-id": "1x", "device": "yt"}, "Invalid job ID '1x'")
        m = "blockdev-mirror"
        mm = {"job-id": "m", "device": "other", "target": "bt", "sync": "full"}
        await s.err(m, {**mm, "device": "nope"}, "Cannot find device='nope' nor node-name='nope'")
        await s.err(m, {**mm, "target": "nope"}, "Cannot find device='nope' nor node-name='nope'")
        await s.err(m, {**mm, "target": "other"}, "Can't mirror node into itself")
        for sync in ("incremental", "bitmap"):
            await s.err(m, {**mm, "sync": sync}, f"Sync mode '{sync}' not supported")
        await s.err(m, {**mm, "granularity": 1000}, "Parameter 'granularity' expects a power of 2")
        for g in (256, 128 * MiB):
            await s.err(
                m,
                {**mm, "granularity": g},
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            )
        await s.err(m, {**mm, "buf-size": -1}, "Invalid parameter 'buf-size'")
        await s.err(m, {**mm, "speed": -1}, "Parameter 'speed' expects a non-negative value")
        await s.err(m, {**mm, "replaces": "nope"}, "Failed to find node with node-name='nope'")
        b = "blockdev-backup"
        bb = {"job-id": "b", "device": "other", "target": "bt", "sync": "full"}
        await s.err(
            b,
            {**bb, "sync": "incremental"},
            "must provide a valid bitmap name for 'incremental' sync mode",
        )
        await s.err(
            b, {**bb, "sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"
        )
        await s.err(b, {**bb, "target": "other"}, "Source and target cannot be the same")
        await s.err(b, {**bb, "device": "nope"}, "Cannot find device='nope' nor node-name='nope'")
        await s.err(b, {**bb, "target": "nope"}, "Cannot find device='nope' nor node-name='nope'")
        await s.err(b, {**bb, "target": "small"}, "Source and target image have different sizes")
        await s.err(b, {**bb, "speed": -1}, "Parameter 'speed' expects a non-negative value")
        await s.err(
            b,
            {**bb, "filter-node-name": "yt"},
            "Could not create node: Duplicate nodes with node-name='yt'",
        )
        # target busy; duplicate id
        await s.x(b, **{**bb, "sync": "none"})
        await s.err(
            b,
            {**bb, "job-id": "b2", "device": "yt"},
            "Node 'bt' is busy: block device is in use by block job: backup",
        )
        await s.err(b, {**bb, "device": "yt", "target": "ym"}, "Job ID 'b' already in use")
        await s.x("job-cancel", id="b")
        await s.wait_status("b", "null")

    with_daemon(tmp_path, go)
    for p in (base, mid, top, other, small, bt):
        check_clean(p)
