#!/usr/bin/env python3
"""NBD server benchmark: blockrep daemon vs qemu-storage-daemon (and nbdkit) in one run.

Same client (fio's nbd engine), same 1 GiB raw file, TCP and unix socket:
1 MiB sequential write and read at qd 8, 4 KiB random read and write at qd 32,
4 KiB random read at qd 1. Writes bench/results/nbd.json and bench/results/nbd.md
with each ratio blockrep / qemu-storage-daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile

from blockrep.testing import blockrep_argv, free_port, wait_accepting

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = [
    ("seq write 1M qd8", ["--rw=write", "--bs=1M", "--iodepth=8"], "write", "bw"),
    ("seq read 1M qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], "read", "bw"),
    ("rand read 4k qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "read", "iops"),
    ("rand write 4k qd32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "write", "iops"),
    ("rand read 4k qd1", ["--rw=randread", "--bs=4k", "--iodepth=1"], "read", "iops"),
]


def start_server(kind: str, disk: str, transport: str, d: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = os.path.join(d, f"{kind}.sock")
    if os.path.exists(path):
        os.unlink(path)
    if transport == "tcp":
        addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        uri = f"nbd://127.0.0.1:{port}/disk"
    else:
        addr = f"addr.type=unix,addr.path={path}"
        uri = f"nbd+unix:///disk?socket={path}"
    if kind == "blockrep":
        cmd = [
            *blockrep_argv("daemon"),
            "--blockdev",
            f"driver=file,node-name=f0,filename={disk}",
            "--blockdev",
            "driver=raw,node-name=disk,file=f0",
            "--nbd-server",
            addr,
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        ]
    elif kind == "qsd":
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={disk},aio=threads",
            "--blockdev",
            "driver=raw,node-name=disk,file=f0",
            "--nbd-server",
            addr,
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        ]
    else:
        cmd = ["nbdkit", "-f", "-e", "disk"]
        cmd += ["-i", "127.0.0.1", "-p", str(port)] if transport == "tcp" else ["-U", path]
        cmd += ["file", disk]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_accepting(path if transport == "unix" else ("127.0.0.1", port), proc)
    return proc, uri


def fio(uri: str, args: list[str], runtime: int, size: str) -> dict:
    cmd = [
        "fio",
        "--name=b",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--output-format=json",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 60).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=6)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--servers", default="blockrep,qsd,nbdkit")
    ap.add_argument("--transports", default="tcp,unix")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="blockrep-nbdbench-", dir=args.dir)
    disk = os.path.join(d, "disk.raw")
    with open(disk, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024 if args.size == "1G" else 256):
            f.write(chunk)
    results: dict = {"runtime_s": args.runtime, "size": args.size, "rows": []}
    try:
        for transport in args.transports.split(","):
            for kind in args.servers.split(","):
                proc, uri = start_server(kind, disk, transport, d)
                try:
                    for name, fargs, key, metric in CASES:
                        job = fio(uri, fargs, args.runtime, args.size)
                        v = job[key]["bw"] / 1024.0 if metric == "bw" else job[key]["iops"]
                        row = {
                            "server": kind,
                            "transport": transport,
                            "case": name,
                            "metric": "MiB/s" if metric == "bw" else "IOPS",
                            "value": v,
                        }
                        results["rows"].append(row)
                        print(row, flush=True)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in results["rows"]:
        table.setdefault((r["transport"], r["case"]), {})[r["server"]] = r["value"]
    lines = [
        "# NBD server benchmark (fio nbd engine, 1 GiB raw file, same run)",
        "",
        "| transport | case | blockrep | qemu-storage-daemon | nbdkit file | blockrep / qsd |",
        "|---|---|---|---|---|---|",
    ]
    for (transport, case), v in table.items():
        unit = "MiB/s" if "1M" in case else "IOPS"
        br, q, nk = v.get("blockrep"), v.get("qsd"), v.get("nbdkit")
        ratio = f"{br / q:.2f}" if br and q else "-"
        cells = [f"{x:.0f} {unit}" if x is not None else "-" for x in (br, q, nk)]
        lines.append(f"| {transport} | {case} | {cells[0]} | {cells[1]} | {cells[2]} | {ratio} |")
    results["ratios"] = {
        f"{t} {c}": (v.get("blockrep", 0) / v["qsd"]) if v.get("qsd") else None
        for (t, c), v in table.items()
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "nbd.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(HERE, "results", "nbd.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
