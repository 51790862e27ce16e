#!/usr/bin/env python3
"""qcow2 benchmark: blockrep against qemu-img on the same file system, same run.

* make_empty of overlays holding 1, 64 and 1024 MiB: must stay flat (O(metadata)).
  Reference: `qemu-img commit` of the same overlay, which ends in QEMU's own
  make_empty after copying the data down (so it grows with the data), and a
  fresh `qemu-img create` of the overlay (the floor).
* Write throughput into a fresh overlay over a raw base: 1 MiB and 4 KiB
  requests, queue depth 1 and 16, blockrep's Python API vs `qemu-img bench -w`.
  Both are timed until the last request completed (qemu-img's "Run completed
  in"); the final flush is outside the timing on both sides.

Writes bench/results/qcow2.json and bench/results/qcow2.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time

from blockrep.block import Graph
from blockrep.qcow2.create import create_file

MiB = 1 << 20


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=600).stdout


async def make_overlay(path: str, base: str, size: int) -> None:
    await create_file(path, size, backing_file=os.path.basename(base), backing_format="raw")


async def open_qcow2(path: str):
    g = Graph()
    node = await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": path}})
    return g, node


async def fill(node, nbytes: int) -> None:
    chunk = os.urandom(MiB)
    for off in range(0, nbytes, MiB):
        await node.write(off, chunk)
    await node.flush()


async def bench_make_empty(d: str, base: str, size: int, fill_mib: int) -> dict:
    ov = os.path.join(d, f"me{fill_mib}.qcow2")
    await make_overlay(ov, base, size)
    g, node = await open_qcow2(ov)
    await fill(node, fill_mib * MiB)
    t0 = time.perf_counter()
    await node.make_empty()
    t_br = time.perf_counter() - t0
    await g.close_all()
    # reference 1: QEMU's commit of an overlay holding the same amount of data
    await make_overlay(ov, base, size)
    g, node = await open_qcow2(ov)
    await fill(node, fill_mib * MiB)
    await g.close_all()
    t0 = time.perf_counter()
    sh("qemu-img", "commit", "-q", ov)
    t_commit = time.perf_counter() - t0
    # the file system's own share: truncating a file that holds the same data
    junk = os.path.join(d, "junk.raw")
    with open(junk, "wb") as f:
        for _ in range(fill_mib):
            f.write(os.urandom(MiB))
        f.flush()
        os.fdatasync(f.fileno())
        t0 = time.perf_counter()
        f.truncate(4 * 65536)
        t_trunc = time.perf_counter() - t0
    os.unlink(junk)
    # reference 2: a fresh qemu-img create of the overlay
    t0 = time.perf_counter()
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        os.path.basename(base),
        "-F",
        "raw",
        ov,
        str(size),
    )
    t_create = time.perf_counter() - t0
    os.unlink(ov)
    return {
        "filled_mib": fill_mib,
        "blockrep_make_empty_s": t_br,
        "qemu_img_commit_s": t_commit,
        "qemu_img_create_s": t_create,
        "fs_truncate_s": t_trunc,
        "blockrep_metadata_s": max(0.0, t_br - t_trunc),
    }


async def blockrep_write(path: str, req: int, total: int, depth: int) -> float:
    g, node = await open_qcow2(path)
    buf = os.urandom(req)
    count = total // req
    sem = asyncio.Semaphore(depth)

    async def one(i: int) -> None:
        async with sem:
            await node.write(i * req, buf)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    # like qemu-img bench's "Run completed in": until the last request completed;
    # the flush that follows is outside the timing on both sides
    dt = time.perf_counter() - t0
    await node.flush()
    await g.close_all()
    return dt


def qemu_bench(path: str, req: int, total: int, depth: int) -> float:
    out = sh(
        "qemu-img",
        "bench",
        "-w",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-i",
        "threads",
        "-c",
        str(total // req),
        "-s",
        str(req),
        "-d",
        str(depth),
        "--flush-interval",
        str(total // req),
        path,
    )
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    assert m, out
    return float(m.group(1))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="directory on the file system to test")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="blockrep-bench-", dir=args.dir)
    size = 2 << 30
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.truncate(size)
    results: dict = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "dir": d},
        "qemu_img": sh("qemu-img", "--version").splitlines()[0],
        "make_empty": [],
        "write": [],
    }
    try:
        fills = [1, 64] if args.quick else [1, 64, 1024]
        for mib in fills:
            r = await bench_make_empty(d, base, size, mib)
            results["make_empty"].append(r)
            print(r, flush=True)
        cases = [
            (MiB, 256 * MiB, 1),
            (MiB, 256 * MiB, 16),
            (4096, 40 * MiB, 1),
            (4096, 40 * MiB, 16),
        ]
        if args.quick:
            cases = [(MiB, 64 * MiB, 1), (4096, 8 * MiB, 1)]
        for req, total, depth in cases:
            ov = os.path.join(d, "w.qcow2")
            await make_overlay(ov, base, size)
            t_br = await blockrep_write(ov, req, total, depth)
            sh(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                ov,
                str(size),
            )
            t_q = qemu_bench(ov, req, total, depth)
            row = {
                "request": req,
                "total_mib": total // MiB,
                "depth": depth,
                "blockrep_mib_s": total / MiB / t_br,
                "qemu_mib_s": total / MiB / t_q,
                "blockrep_iops": total / req / t_br,
                "qemu_iops": total / req / t_q,
            }
            row["ratio"] = row["blockrep_mib_s"] / row["qemu_mib_s"]
            results["write"].append(row)
            print(row, flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "qcow2.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "# qcow2 benchmark (blockrep vs qemu-img, same run)",
        "",
        f"{results['qemu_img']}, Python {results['machine']['python']}, {results['machine']['cpus']} CPUs",
        "",
        "## make_empty (must be flat)",
        "",
        "| data in overlay | blockrep make_empty | of which not truncate | file system truncate of that data | qemu-img commit (copy + make_empty) | qemu-img create (floor) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["make_empty"]:
        lines.append(
            f"| {r['filled_mib']} MiB | {r['blockrep_make_empty_s'] * 1000:.1f} ms | "
            f"{r['blockrep_metadata_s'] * 1000:.1f} ms | {r['fs_truncate_s'] * 1000:.1f} ms | "
            f"{r['qemu_img_commit_s'] * 1000:.1f} ms | {r['qemu_img_create_s'] * 1000:.1f} ms |"
        )
    lines += [
        "",
        "## Writes into a fresh overlay (raw base, 64 KiB clusters)",
        "",
        "| request | depth | blockrep MiB/s (IOPS) | qemu-img bench MiB/s (IOPS) | ratio blockrep/qemu |",
        "|---|---|---|---|---|",
    ]
    for r in results["write"]:
        req = "1 MiB" if r["request"] == MiB else f"{r['request'] // 1024} KiB"
        lines.append(
            f"| {req} | {r['depth']} | {r['blockrep_mib_s']:.0f} ({r['blockrep_iops']:.0f}) | "
            f"{r['qemu_mib_s']:.0f} ({r['qemu_iops']:.0f}) | {r['ratio']:.2f} |"
        )
    with open(os.path.join(out_dir, "qcow2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
