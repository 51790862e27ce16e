"""``blockrep demo``: a pair on loopback, a workload, a failover, and the proof.

1. Start a Secondary and a Primary (``blockrep secondary`` / ``blockrep primary``
   processes) on unix sockets in a temporary directory, on two identical disks
   (or one shared disk with ``--mode shared``).
2. Run a mixed workload: random writes through P's NBD export, speculative
   writes through S's, checkpoints every few hundred milliseconds.
3. Stop P's writes and take a last checkpoint: remember P's disk as it is now.
4. More writes on both sides: P's will be rolled back, S's kept.
5. Kill P (SIGKILL) and fail S over.
6. Prove with sha256 that S's disk is exactly the last checkpoint plus S's own
   writes since, print a short report, clean up.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from typing import Any

from ..testing import Process, blockrep_argv, nbd_client
from .ha import qmp_call

MiB = 1 << 20


def _start(args: list[str], log: str) -> Process:
    return Process(blockrep_argv(*args), log)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def _workload(
    p,
    s,
    rnd: random.Random,
    size: int,
    seconds: float,
    p_writes: bool,
    s_model: bytearray | None,
    on_tick=None,
) -> tuple[int, int]:
    """Random writes on P (and S) for ``seconds``; returns bytes written on (P, S)."""
    pb = sb = 0
    end = time.monotonic() + seconds
    last_tick = time.monotonic()
    while time.monotonic() < end:
        batch = []
        for _ in range(16):
            off = rnd.randrange(0, size - 65536)
            n = rnd.choice([4096, 16384, 65536, 1000, 513])
            data = rnd.randbytes(n)
            if p_writes and rnd.random() < 0.7:
                batch.append(p.write(off, data))
                pb += n
            else:
                batch.append(s.write(off, data))
                sb += n
                if s_model is not None:
                    s_model[off : off + n] = data
        await asyncio.gather(*batch)
        if on_tick is not None and time.monotonic() - last_tick > 0.3:
            last_tick = time.monotonic()
            await on_tick()
    return pb, sb


async def run_demo(mode: str, size_mib: int, keep: bool, seed: int) -> int:
    shared = mode == "shared"
    d = tempfile.mkdtemp(prefix="blockrep-demo-")
    procs: list[Process] = []
    rnd = random.Random(seed)
    size = size_mib * MiB
    report: dict[str, Any] = {"mode": mode, "disk-mib": size_mib}
    try:
        print(f"blockrep demo ({mode} disks) in {d}")
        base = rnd.randbytes(size)
        p_disk = os.path.join(d, "primary.raw")
        s_disk = p_disk if shared else os.path.join(d, "secondary.raw")
        with open(p_disk, "wb") as f:
            f.write(base)
        if not shared:
            shutil.copyfile(p_disk, s_disk)
        sock = lambda n: os.path.join(d, n)  # noqa: E731
        common = ["--shared"] if shared else []
        sec = _start(
            [
                "secondary",
                "--disk",
                s_disk,
                "--listen",
                f"unix:{sock('ctl')}",
                "--export",
                f"unix:{sock('s.nbd')}",
                "--qmp",
                f"unix:{sock('s.qmp')}",
                "--state-file",
                sock("s.state"),
                *common,
            ],
            sock("secondary.log"),
        )
        procs.append(sec)
        sec.wait_ready(sock("s.qmp"), timeout=60)
        pri = _start(
            [
                "primary",
                "--disk",
                p_disk,
                "--secondary",
                f"unix:{sock('ctl')}",
                "--export",
                f"unix:{sock('p.nbd')}",
                "--qmp",
                f"unix:{sock('p.qmp')}",
                "--checkpoint-interval",
                "0",
                "--state-file",
                sock("p.state"),
                *common,
            ],
            sock("primary.log"),
        )
        procs.append(pri)
        pri.wait_ready(sock("p.nbd"), timeout=60)
        print("1. primary and secondary paired; the disks were verified identical")

        gp, p = await nbd_client(sock("p.nbd"), "disk")
        gs, s = await nbd_client(sock("s.nbd"), "disk")

        async def checkpoint() -> None:
            await asyncio.get_running_loop().run_in_executor(
                None, qmp_call, sock("p.qmp"), "replication-checkpoint"
            )

        t0 = time.monotonic()
        pb, sb = await _workload(p, s, rnd, size, 3.0, True, None, on_tick=checkpoint)
        dt = time.monotonic() - t0
        report["workload-p-mib-s"] = round(pb / MiB / dt, 2)
        report["workload-s-mib-s"] = round(sb / MiB / dt, 2)
        print(
            f"2. mixed workload for {dt:.1f} s: P wrote {pb / MiB:.1f} MiB, S wrote {sb / MiB:.1f} MiB (speculative), "
            "checkpoints every 0.3 s"
        )

        await checkpoint()
        checkpoint_state = bytearray(await p.read(0, size))
        print(f"3. last checkpoint taken: P's disk sha256 {sha(checkpoint_state)[:16]}…")

        s_after = bytearray(checkpoint_state)
        pb2, sb2 = await _workload(p, s, rnd, size, 1.0, True, s_after)
        print(
            f"4. after the checkpoint: P wrote {pb2 / MiB:.1f} MiB (to be rolled back), "
            f"S wrote {sb2 / MiB:.1f} MiB (to be kept)"
        )
        await gp.close_all()

        status = qmp_call(sock("p.qmp"), "query-ha-status")
        report["checkpoints"] = status["checkpoints"]
        report["checkpoint-pause-p50-ms"] = status["checkpoint-pause-p50-ms"]
        report["checkpoint-pause-p99-ms"] = status["checkpoint-pause-p99-ms"]

        pri.kill(10)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: qmp_call(sock("s.qmp"), "ha-failover", timeout=600)
        )
        report["failover-s"] = round(time.monotonic() - t0, 3)
        print(f"5. primary killed (SIGKILL); secondary failed over in {report['failover-s']:.3f} s")

        got = bytes(await s.read(0, size))
        await gs.close_all()
        qmp_call(sock("s.qmp"), "quit")
        sec.proc.wait(30)
        with open(s_disk, "rb") as disk_file:
            on_disk = disk_file.read()
        expect = sha(s_after)
        ok = sha(got) == expect and sha(on_disk) == expect
        print("6. proof (sha256):")
        print(f"   last checkpoint + S's writes : {expect}")
        print(f"   secondary, read through NBD  : {sha(got)}")
        print(f"   secondary disk file          : {sha(on_disk)}")
        print(
            f"   P's writes after the checkpoint rolled back: {sha(on_disk) != sha(checkpoint_state) or sb2 == 0}"
        )
        if not ok:
            i = next((i for i in range(size) if on_disk[i] != s_after[i]), -1)
            print(
                f"   first difference at offset {i}: disk {on_disk[i : i + 8].hex()} expected {s_after[i : i + 8].hex()} "
                f"checkpoint {checkpoint_state[i : i + 8].hex()} base {base[i : i + 8].hex()}"
            )
        print("report:", json.dumps(report))
        print(
            "RESULT:",
            "PASS — the secondary holds exactly the last checkpoint plus its own writes"
            if ok
            else "FAIL",
        )
        return 0 if ok else 1
    finally:
        for pr in procs:
            pr.stop(signal.SIGKILL, 10)
        if keep:
            print(f"(kept {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="blockrep demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("separate", "shared"), default="separate")
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(argv)
    return asyncio.run(run_demo(a.mode, a.size_mib, a.keep, a.seed))
