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
    s_writes: bool = True,
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
            if p_writes and (rnd.random() < 0.7 or not s_writes):
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


async def run_demo(
    mode: str, size_mib: int, keep: bool, seed: int, point: str = "checkpoint"
) -> tuple[bool, int]:
    """One pair, its workload, the failover: (proof holds, bytes of P's acknowledged
    writes the survivor does not have)."""
    shared = mode == "shared"
    latest = point == "latest"
    d = tempfile.mkdtemp(prefix="blockrep-demo-")
    procs: list[Process] = []
    rnd = random.Random(seed)
    size = size_mib * MiB
    report: dict[str, Any] = {"mode": mode, "disk-mib": size_mib, "failover-point": point}
    try:
        print(f"blockrep demo ({mode} disks, failover-point {point}) in {d}")
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
                "--failover-point",
                point,
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
        pb, sb = await _workload(
            p, s, rnd, size, 3.0, True, None, on_tick=checkpoint, s_writes=not latest
        )
        dt = time.monotonic() - t0
        report["workload-p-mib-s"] = round(pb / MiB / dt, 2)
        report["workload-s-mib-s"] = round(sb / MiB / dt, 2)
        print(
            f"2. workload for {dt:.1f} s: P wrote {pb / MiB:.1f} MiB, S wrote {sb / MiB:.1f} MiB "
            "(speculative; none with latest: S's export is read-only), checkpoints every 0.3 s"
        )

        await checkpoint()
        checkpoint_state = bytearray(await p.read(0, size))
        print(f"3. last checkpoint taken: P's disk sha256 {sha(checkpoint_state)[:16]}…")

        s_after = bytearray(checkpoint_state)
        pb2, sb2 = await _workload(p, s, rnd, size, 1.0, True, s_after, s_writes=not latest)
        p_final = bytes(await p.read(0, size))  # every write the consumer saw acknowledged
        print(
            f"4. after the checkpoint: P wrote {pb2 / MiB:.1f} MiB (acknowledged: "
            f"{'kept' if latest else 'to be rolled back'}), S wrote {sb2 / MiB:.1f} MiB"
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
        expect = sha(p_final) if latest else sha(s_after)
        ok = sha(got) == expect and sha(on_disk) == expect
        # bytes P's acknowledged writes changed after the last checkpoint that the
        # survivor does not hold (S's own writes there do not count as P's lost)
        lost = sum(
            1
            for a, c, b in zip(p_final, checkpoint_state, on_disk, strict=True)
            if a != c and b != a
        )
        report["acknowledged-bytes-lost"] = lost
        if latest:
            s_after = bytearray(p_final)
        print("6. proof (sha256):")
        what = "every acknowledged write  " if latest else "last checkpoint + S's writes"
        print(f"   {what} : {expect}")
        print(f"   secondary, read through NBD  : {sha(got)}")
        print(f"   secondary disk file          : {sha(on_disk)}")
        print(f"   bytes the consumer saw acknowledged that the survivor lacks: {lost}")
        if not ok:
            i = next((i for i in range(size) if on_disk[i] != s_after[i]), -1)
            print(
                f"   first difference at offset {i}: disk {on_disk[i : i + 8].hex()} expected {s_after[i : i + 8].hex()} "
                f"checkpoint {checkpoint_state[i : i + 8].hex()} base {base[i : i + 8].hex()}"
            )
        print("report:", json.dumps(report))
        holds = (
            "every write P acknowledged" if latest else "the last checkpoint plus its own writes"
        )
        print("RESULT:", f"PASS — the secondary holds exactly {holds}" if ok else "FAIL")
        return ok, lost
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
    ap.add_argument(
        "--failover-point",
        choices=("checkpoint", "latest"),
        default="checkpoint",
        help="latest: run the default and latest side by side and show what each lost",
    )
    a = ap.parse_args(argv)
    if a.failover_point == "checkpoint":
        ok, _ = asyncio.run(run_demo(a.mode, a.size_mib, a.keep, a.seed))
        return 0 if ok else 1
    results = {
        point: asyncio.run(run_demo(a.mode, a.size_mib, a.keep, a.seed, point))
        for point in ("checkpoint", "latest")
    }
    print("\nwhat the consumer lost at failover (bytes it had seen acknowledged):")
    for point, (ok, lost) in results.items():
        print(f"  failover-point {point:<10} {lost:>10} bytes  {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for ok, _ in results.values()) else 1
