#!/usr/bin/env python3
"""Block job benchmark: blockrep daemon vs qemu-storage-daemon in the same run.

1. Commit throughput: active block-commit of a qcow2 top with 256 MiB allocated
   (random data) into an empty base; MiB/s = 256 MiB / (block-commit .. BLOCK_JOB_READY).
2. Mirror throughput: blockdev-mirror sync=full of that 256 MiB image into an empty
   qcow2 of the same size; MiB/s = 256 MiB / (blockdev-mirror .. BLOCK_JOB_READY).
3. Copy-before-write overhead: fio (nbd engine) random writes of 4 KiB (qd 16) and
   1 MiB (qd 4) to an NBD export of a 512 MiB raw node, without a job, then with a
   blockdev-backup sync=none job running (every first write of a 64 KiB cluster
   copies the old data to a qcow2 target first).

Writes bench/results/jobs.json and bench/results/jobs.md. Usage:
    .venv/bin/python bench/jobs.py [--runtime 5] [--servers blockrep,qsd]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from qemu.qmp import EventListener, QMPClient

from blockrep.qcow2.create import create_file
from blockrep.testing import blockrep_argv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
DATA_MIB = 256
CBW_DISK_MIB = 512


def sh(*args: str, timeout: float = 600) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout


class Server:
    def __init__(self, kind: str, d: str) -> None:
        self.kind = kind
        self.sock = os.path.join(d, f"{kind}.qmp")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        if kind == "blockrep":
            cmd = [
                *blockrep_argv("daemon"),
                "-qmp",
                f"unix:{self.sock},server=on,wait=off",
            ]
        else:
            cmd = [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,id=m0,path={self.sock},server=on,wait=off",
                "--monitor",
                "chardev=m0",
            ]
        self.log = open(os.path.join(d, f"{kind}.log"), "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.c = QMPClient("bench")
        self.listener = EventListener()

    async def open(self) -> None:
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not start")
            await asyncio.sleep(0.02)
        self.c.register_listener(self.listener)
        await self.c.connect(self.sock)

    async def x(self, cmd: str, **args) -> object:
        return await asyncio.wait_for(self.c.execute(cmd, args), 60)

    async def wait(self, event: str, job: str, timeout: float = 600) -> dict:
        async def go() -> dict:
            while True:
                ev = await self.listener.get()
                d = ev.get("data", {})
                if ev["event"] == event and (d.get("device") == job or d.get("id") == job):
                    return d
                if (
                    ev["event"] == "BLOCK_JOB_COMPLETED"
                    and d.get("device") == job
                    and d.get("error")
                ):
                    raise RuntimeError(f"{job} failed: {d['error']}")

        return await asyncio.wait_for(go(), timeout)

    async def wait_status(self, job: str, status: str) -> None:
        while True:
            d = await self.wait("JOB_STATUS_CHANGE", job)
            if d["status"] == status:
                return

    async def close(self) -> None:
        try:
            await self.c.disconnect()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


async def qcow(path: str, size_mib: int, backing: str | None = None) -> str:
    await create_file(
        path, size_mib * MiB, backing_file=backing, backing_format="qcow2" if backing else None
    )
    return path


def node(name: str, path: str, fmt: str = "qcow2", **extra) -> dict:
    return {"driver": fmt, "node-name": name, "file": {"driver": "file", "filename": path}, **extra}


async def make_top(d: str, data: str) -> tuple[str, str]:
    base = await qcow(os.path.join(d, "base.qcow2"), DATA_MIB)
    top = await qcow(os.path.join(d, "top.qcow2"), DATA_MIB, backing=base)
    # 256 MiB of random data into top (qemu-img convert keeps it allocated)
    sh("qemu-img", "rebase", "-u", "-b", "", top)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", data, top)
    sh("qemu-img", "rebase", "-u", "-b", base, "-F", "qcow2", top)
    return base, top


async def commit_bench(kind: str, d: str, data: str) -> float:
    base, top = await make_top(d, data)
    s = Server(kind, d)
    try:
        await s.open()
        await s.x("blockdev-add", **node("b", base))
        await s.x("blockdev-add", **node("t", top, backing="b"))
        t0 = time.monotonic()
        await s.x("block-commit", **{"job-id": "c", "device": "t"})
        ready = await s.wait("BLOCK_JOB_READY", "c")
        dt = time.monotonic() - t0
        assert ready["len"] == DATA_MIB * MiB, ready
        await s.x("job-complete", id="c")
        await s.wait_status("c", "null")
    finally:
        await s.close()
    return DATA_MIB / dt


async def mirror_bench(kind: str, d: str, data: str) -> float:
    _, top = await make_top(d, data)
    tgt = await qcow(os.path.join(d, "mt.qcow2"), DATA_MIB)
    s = Server(kind, d)
    try:
        await s.open()
        await s.x("blockdev-add", **node("t", top, backing=None))
        await s.x("blockdev-add", **node("m", tgt))
        t0 = time.monotonic()
        await s.x(
            "blockdev-mirror", **{"job-id": "m", "device": "t", "target": "m", "sync": "full"}
        )
        await s.wait("BLOCK_JOB_READY", "m")
        dt = time.monotonic() - t0
        await s.x("job-complete", id="m")
        await s.wait_status("m", "null")
    finally:
        await s.close()
    return DATA_MIB / dt


def fio(uri: str, args: list[str], runtime: int) -> dict:
    cmd = [
        "fio",
        "--name=b",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={CBW_DISK_MIB}M",
        "--time_based",
        f"--runtime={runtime}",
        "--output-format=json",
        "--randrepeat=0",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 60).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]


CBW_CASES = [
    ("rand write 4k qd16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"], "iops"),
    ("rand write 1M qd4", ["--rw=randwrite", "--bs=1M", "--iodepth=4"], "bw"),
]


async def cbw_bench(kind: str, d: str, runtime: int) -> list[dict]:
    rows = []
    for case, fargs, metric in CBW_CASES:
        for with_job in (False, True):
            disk = os.path.join(d, "cbw.raw")
            with open(disk, "wb") as f:
                f.truncate(CBW_DISK_MIB * MiB)
            tgt = await qcow(os.path.join(d, "cbw-t.qcow2"), CBW_DISK_MIB)
            nbd = os.path.join(d, f"{kind}.nbd")
            s = Server(kind, d)
            try:
                await s.open()
                await s.x("blockdev-add", **node("src", disk, "raw"))
                await s.x("blockdev-add", **node("tgt", tgt))
                await s.x("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
                await s.x(
                    "block-export-add",
                    type="nbd",
                    id="e",
                    **{"node-name": "src"},
                    name="disk",
                    writable=True,
                )
                if with_job:
                    await s.x(
                        "blockdev-backup",
                        **{"job-id": "bk", "device": "src", "target": "tgt", "sync": "none"},
                    )
                job = await asyncio.to_thread(fio, f"nbd+unix:///disk?socket={nbd}", fargs, runtime)
                w = job["write"]
                v = w["iops"] if metric == "iops" else w["bw"] / 1024.0
                if with_job:
                    jobs = await s.x("query-jobs")
                    copied = jobs[0]["current-progress"] if jobs else 0
                    await s.x("job-cancel", id="bk")
                else:
                    copied = 0
                row = {
                    "server": kind,
                    "case": case,
                    "backup_sync_none": with_job,
                    "metric": "IOPS" if metric == "iops" else "MiB/s",
                    "value": v,
                    "copied_MiB": copied / MiB,
                }
                print(row, flush=True)
                rows.append(row)
            finally:
                await s.close()
    return rows


async def amain(args: argparse.Namespace) -> dict:
    d = tempfile.mkdtemp(prefix="blockrep-jobsbench-", dir=args.dir)
    try:
        data = os.path.join(d, "data.raw")
        with open(data, "wb") as f:
            for _ in range(DATA_MIB):
                f.write(os.urandom(MiB))
        res: dict = {
            "data_MiB": DATA_MIB,
            "cbw_disk_MiB": CBW_DISK_MIB,
            "runtime_s": args.runtime,
            "commit": {},
            "mirror": {},
            "cbw": [],
        }
        for kind in args.servers.split(","):
            sub = os.path.join(d, kind)
            os.makedirs(sub, exist_ok=True)
            res["commit"][kind] = await commit_bench(kind, sub, data)
            print(kind, "commit MiB/s", round(res["commit"][kind], 1), flush=True)
            for f in os.listdir(sub):
                if f.endswith(".qcow2"):
                    os.unlink(os.path.join(sub, f))
            res["mirror"][kind] = await mirror_bench(kind, sub, data)
            print(kind, "mirror MiB/s", round(res["mirror"][kind], 1), flush=True)
            for f in os.listdir(sub):
                if f.endswith(".qcow2"):
                    os.unlink(os.path.join(sub, f))
            res["cbw"] += await cbw_bench(kind, sub, args.runtime)
        return res
    finally:
        shutil.rmtree(d, ignore_errors=True)


def report(res: dict) -> str:
    kinds = list(res["commit"])
    lines = [
        "# Block job benchmark (blockrep daemon vs qemu-storage-daemon, same run)",
        "",
        f"Commit and mirror: {res['data_MiB']} MiB of random data allocated in a qcow2 top; time from the command "
        "to BLOCK_JOB_READY.",
        "",
        "| job | " + " | ".join(kinds) + " | blockrep / qsd |",
        "|---|" + "---|" * (len(kinds) + 1),
    ]
    for job in ("commit", "mirror"):
        v = res[job]
        ratio = f"{v['blockrep'] / v['qsd']:.2f}" if "blockrep" in v and v.get("qsd") else "-"
        lines.append(
            f"| {job} (MiB/s) | " + " | ".join(f"{v[k]:.0f}" for k in kinds) + f" | {ratio} |"
        )
    lines += [
        "",
        f"Copy-before-write overhead: fio nbd random writes over a {res['cbw_disk_MiB']} MiB raw export, "
        f"{res['runtime_s']} s each, without a job vs with blockdev-backup sync=none running "
        "(qcow2 target, 64 KiB clusters).",
        "",
        "| server | case | without job | with backup sync=none | with / without | copied by CBW |",
        "|---|---|---|---|---|---|",
    ]
    by: dict = {}
    for r in res["cbw"]:
        by.setdefault((r["server"], r["case"]), {})[r["backup_sync_none"]] = r
    res["cbw_ratio"] = {}
    for (srv, case), v in by.items():
        a, b = v[False], v[True]
        ratio = b["value"] / a["value"] if a["value"] else 0
        res["cbw_ratio"][f"{srv} {case}"] = ratio
        lines.append(
            f"| {srv} | {case} | {a['value']:.0f} {a['metric']} | {b['value']:.0f} {b['metric']} | "
            f"{ratio:.2f} | {b['copied_MiB']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--servers", default="blockrep,qsd")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    res = asyncio.run(amain(args))
    md = report(res)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "jobs.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(HERE, "results", "jobs.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
