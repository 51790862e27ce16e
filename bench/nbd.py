#!/usr/bin/env python3
"""NBD server benchmark: blockrep daemon vs qemu-storage-daemon (and nbdkit) in one run.

Same client (fio's nbd engine), a raw file per server (identical copies, 1 GiB), TCP and unix
socket: 1 MiB sequential write and read at qd 8, 4 KiB random read and write at qd 32, 4 KiB
random read at qd 1. All servers of a transport run at once and take their shots in turn,
round after round (the first server of each round rotates), so a machine that gets busier or
quieter weighs on all alike; each figure is the median of --shots.

Next to every figure: the server's CPU µs per request (utime+stime of the whole process over
the shots, divided by the requests fio made; bench/cpu.py). Goal lines of issue 15 at the top
(>= 1.5x qemu-storage-daemon on 1 MiB sequential read and write and 4 KiB random read and
write; judged on the unix socket, the issue's case, when it was measured).

Writes OUT/nbd.json and OUT/nbd.md (OUT = --out, default bench/results).
Run: .venv/bin/python bench/nbd.py [--quick] [--fill copy|write] [--shots 3] [--runtime 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

from cpu import CpuMeter, total_per_request_us
from machine import cpu_jiffies, describe_steal, stolen_fraction

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

# issue 15: plain NBD export >= 1.5x qemu-storage-daemon on these cases
GOAL_RATIO = 1.5
GOAL_CASES = ["seq read 1M qd8", "seq write 1M qd8", "rand read 4k qd32", "rand write 4k qd32"]
GOAL_TRANSPORT = "unix"  # the measured case; the other transport is shown for information

FILL_LABEL = {
    "copy": "copying one template (small page-cache folios)",
    "write": "1 MiB writes each (large page-cache folios)",
}
SERVER_LABEL = {"blockrep": "blockrep", "qsd": "qemu-storage-daemon", "nbdkit": "nbdkit file"}


def start_server(
    kind: str, disk: str, transport: str, d: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
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
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None,
    )
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


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def rotated(xs: list[str], i: int) -> list[str]:
    k = i % len(xs) if xs else 0
    return xs[k:] + xs[:k]


def make_disk(path: str, mib: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(chunk)


def make_disks(d: str, servers: list[str], mib: int, fill: str) -> dict[str, str]:
    """One file per server (they run at once, and QEMU locks the images it opens), all
    made the same way, so that every server starts from the same page-cache state.

    How a file was made matters on kernels whose page cache holds large folios: a file
    written with 1 MiB writes is cached in large folios, and a 4 KiB write into one
    costs the writer ~18 us of kernel time against ~4 us into the small folios a copy
    (sendfile) leaves (measured here, Linux 6.18, ext4). ``copy``: every server gets a
    copy of one template; ``write``: every server's file is written with 1 MiB writes.
    """
    disks = {s: os.path.join(d, f"{s}.raw") for s in servers}
    if fill == "write":
        for path in disks.values():
            make_disk(path, mib)
        return disks
    template = os.path.join(d, "template.raw")
    make_disk(template, mib)
    for path in disks.values():
        shutil.copyfile(template, path)
    os.unlink(template)
    return disks


def size_mib(size: str) -> int:
    s = size.strip().upper()
    mult = {"G": 1024, "M": 1, "K": 1 / 1024}
    if s and s[-1] in mult:
        return max(1, int(float(s[:-1]) * mult[s[-1]]))
    return max(1, int(s) >> 20)


def run_transport(
    transport: str, servers: list[str], disks: dict[str, str], d: str, args: argparse.Namespace
) -> list[dict]:
    """Every case on every server of one transport, shots in turn; one row per (server, case)."""
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    rows: list[dict] = []
    try:
        for kind in servers:
            procs[kind] = start_server(kind, disks[kind], transport, d)
        for name, fargs, key, metric in CASES:
            shots: dict[str, list[dict]] = {k: [] for k in servers}
            for i in range(args.shots):
                for kind in rotated(servers, i):
                    proc, uri = procs[kind]
                    meter = CpuMeter({"server": proc.pid})
                    jiffies = cpu_jiffies()
                    meter.start()
                    job = fio(uri, fargs, args.runtime, args.size)
                    cpu = meter.stop()
                    v = job[key]["bw"] / 1024.0 if metric == "bw" else job[key]["iops"]
                    shots[kind].append(
                        {
                            "value": v,
                            "requests": int(job[key]["total_ios"]),
                            "cpu_s": cpu,
                            "steal": stolen_fraction(jiffies, cpu_jiffies()),
                        }
                    )
            for kind in servers:
                vals = [s["value"] for s in shots[kind]]
                row = {
                    "server": kind,
                    "transport": transport,
                    "case": name,
                    "metric": "MiB/s" if metric == "bw" else "IOPS",
                    "value": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "cpu_us_per_req": total_per_request_us(shots[kind]).get("server"),
                    "shots": shots[kind],
                }
                rows.append(row)
                print(
                    f"[{time.strftime('%H:%M:%S')}] {transport} {kind} {name}: {row['value']:.0f} "
                    f"{row['metric']} (shots {', '.join(f'{x:.0f}' for x in vals)}), "
                    f"{fnum(row['cpu_us_per_req'], 1)} CPU us/req",
                    flush=True,
                )
    finally:
        for proc, _ in procs.values():
            stop(proc)
    return rows


def fnum(x: float | None, prec: int = 0) -> str:
    return "-" if x is None else f"{x:.{prec}f}"


def goals(table: dict[tuple[str, str], dict[str, dict]], transports: list[str]) -> dict:
    judged = GOAL_TRANSPORT if GOAL_TRANSPORT in transports else transports[0]
    out: dict = {}
    for case in GOAL_CASES:
        ratios: dict[str, float | None] = {}
        for t in transports:
            v = table.get((t, case), {})
            br, q = v.get("blockrep"), v.get("qsd")
            ratios[t] = br["value"] / q["value"] if br and q and q["value"] else None
        r = ratios.get(judged)
        out[f"plain NBD {case} >= {GOAL_RATIO}x qemu-storage-daemon"] = {
            "judged_on": judged,
            "ratios": ratios,
            "met": None if r is None else r >= GOAL_RATIO,
        }
    return out


def markdown(results: dict, transports: list[str]) -> str:
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results["rows"]:
        table.setdefault((r["transport"], r["case"]), {})[r["server"]] = r
    servers = results["servers"]
    m = results["machine"]
    lines = [
        "# NBD server benchmark (fio nbd engine, raw file, same run)",
        "",
        "## Goals (issue 15)",
        "",
    ]
    for name, gl in results["goals"].items():
        met = {True: "**met**", False: "**not met**", None: "not measured"}[gl["met"]]
        rs = ", ".join(
            f"{t} {fnum(x, 2)}x" + (" (judged)" if t == gl["judged_on"] else "")
            for t, x in gl["ratios"].items()
        )
        lines.append(f"* {name}: {met} ({rs})")
    lines += [
        "",
        f"{m['cpus']} CPUs; Python {m['python']}; load average at start {m['loadavg_start']}, at end "
        f"{m.get('loadavg_end')}; blockrep {results['blockrep_rev']}; file {results['size']} per "
        f"server, made by {FILL_LABEL[results.get('fill', 'copy')]}; {results['runtime_s']} s per shot, median of {results['shots']} shot(s) taken in "
        f"turn{'; QUICK run' if results['quick'] else ''}. "
        "Each cell: median [min-max], then the server's CPU µs per request (all threads, "
        "user + system, over all shots). Host steal during the shots (the hypervisor running "
        "something else while a vCPU wanted to run, /proc/stat): "
        + describe_steal([s.get("steal") for r in results["rows"] for s in r["shots"]])
        + ".",
        "",
        "| transport | case | "
        + " | ".join(SERVER_LABEL.get(s, s) for s in servers)
        + " | blockrep / qsd |",
        "|---|---|" + "---|" * len(servers) + "---|",
    ]
    for (transport, case), v in table.items():
        unit = "MiB/s" if "1M" in case else "IOPS"
        cells = []
        for s in servers:
            r = v.get(s)
            if r is None:
                cells.append("-")
                continue
            spread = f" [{r['min']:.0f}-{r['max']:.0f}]" if len(r["shots"]) > 1 else ""
            cells.append(f"{r['value']:.0f}{spread} {unit}, {fnum(r['cpu_us_per_req'], 1)} µs/req")
        br, q = v.get("blockrep"), v.get("qsd")
        ratio = f"{br['value'] / q['value']:.2f}" if br and q and q["value"] else "-"
        lines.append(f"| {transport} | {case} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 256M, 1 s shots, 1 shot")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per shot (4)")
    ap.add_argument("--shots", type=int, default=None, help="shots per case and server (3)")
    ap.add_argument("--size", default=None, help="file size per server (1G)")
    ap.add_argument("--dir", default=None, help="where the files go (a temp dir is made inside)")
    ap.add_argument("--servers", default="blockrep,qsd,nbdkit")
    ap.add_argument(
        "--fill",
        choices=("copy", "write"),
        default="copy",
        help="how each server's file is made: a copy of one template, or written with "
        "1 MiB writes (large page-cache folios); see make_disks",
    )
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    ap.add_argument("--name", default="nbd", help="results file name (NAME.json, NAME.md)")
    args = ap.parse_args()
    if args.runtime is None:
        args.runtime = 1 if args.quick else 4
    if args.shots is None:
        args.shots = 1 if args.quick else 3
    if args.size is None:
        args.size = "256M" if args.quick else "1G"
    servers = [s for s in args.servers.split(",") if s]
    transports = [t for t in args.transports.split(",") if t]
    d = tempfile.mkdtemp(prefix="blockrep-nbdbench-", dir=args.dir)
    results: dict = {
        "runtime_s": args.runtime,
        "shots": args.shots,
        "size": args.size,
        "fill": args.fill,
        "quick": args.quick,
        "servers": servers,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "blockrep_rev": subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        or "?",
        "rows": [],
    }
    t0 = time.monotonic()
    try:
        disks = make_disks(d, servers, size_mib(args.size), args.fill)
        for transport in transports:
            results["rows"] += run_transport(transport, servers, disks, d, args)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    results["wall_s"] = time.monotonic() - t0
    results["machine"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results["rows"]:
        table.setdefault((r["transport"], r["case"]), {})[r["server"]] = r
    results["goals"] = goals(table, transports)
    results["ratios"] = {
        f"{t} {c}": (v["blockrep"]["value"] / v["qsd"]["value"])
        if "blockrep" in v and "qsd" in v and v["qsd"]["value"]
        else None
        for (t, c), v in table.items()
    }
    md = markdown(results, transports)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out}/{args.name}.json and .md in {results['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
