"""Which event loop: blockrep's NBD export on uvloop vs asyncio's own loop (issue 15).

The same `blockrep daemon` command line with ``BLOCKREP_LOOP=asyncio`` and without (uvloop,
when installed), qemu-storage-daemon as the reference, one 1 GiB raw file on a unix
socket, fio's nbd engine. The three servers take their shots in turn, round after round,
so a machine that gets busier or quieter weighs on all three alike; each figure is the
median of the rounds. Writes bench/results/eventloop.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from nbd import CASES, fio, start_server  # noqa: E402

SERVERS = {"blockrep-asyncio": ("blockrep", "asyncio"), "blockrep-uvloop": ("blockrep", ""),
           "qsd": ("qsd", "")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="blockrep-loopbench-")
    disk = os.path.join(d, "disk.raw")
    with open(disk, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(chunk)
    shots: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            for name, (kind, loop) in SERVERS.items():
                os.environ["BLOCKREP_LOOP"] = loop
                proc, uri = start_server(kind, disk, "unix", d)
                try:
                    for case, fargs, key, metric in CASES:
                        job = fio(uri, fargs, args.runtime, "1G")
                        v = job[key]["bw"] / 1024.0 if metric == "bw" else job[key]["iops"]
                        shots.setdefault((case, name), []).append(v)
                        print(f"round {rnd} {name} {case}: {v:.0f}", flush=True)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    finally:
        os.environ.pop("BLOCKREP_LOOP", None)
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in shots.items()}
    lines = [
        "# Event loop: blockrep's NBD export on uvloop vs asyncio (bench/eventloop.py)",
        "",
        f"`blockrep daemon` serving a 1 GiB raw file on a unix socket, fio nbd engine, "
        f"{args.runtime} s per shot, median of {args.rounds} rounds taken in turn with "
        "qemu-storage-daemon (the reference) in the same run.",
        "",
        "| case | asyncio | uvloop | uvloop / asyncio | qemu-storage-daemon | uvloop / QSD |",
        "|---|---|---|---|---|---|",
    ]
    for case, *_ in CASES:
        a, u, q = (med[(case, n)] for n in SERVERS)
        unit = "MiB/s" if "1M" in case else "IOPS"
        lines.append(
            f"| {case} ({unit}) | {a:.0f} | {u:.0f} | {u / a:.2f} | {q:.0f} | {u / q:.2f} |"
        )
    lines += ["", "Every shot: " + json.dumps({f"{c} / {n}": v for (c, n), v in shots.items()})]
    out = os.path.join(ROOT, "bench", "results", "eventloop")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump({"median": {f"{c} / {n}": v for (c, n), v in med.items()}}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
