#!/usr/bin/env python3
"""The cost of authentication on P's replicated throughput (issue 12, "Benchmark (bench/security)").

Three ``blockrep primary`` / ``blockrep secondary`` pairs on TCP loopback (control channel and
replication link on 127.0.0.1), the same disk size and the same run:

* ``insecure``: ``--insecure`` on both nodes, the reference;
* ``psk``: ``--psk-file`` (one 0600 file for both): a challenge-response on the control channel,
  the link opened for the authenticated peer only under a per-pairing secret export name; the
  data travels in the clear;
* ``tls``: ``--tls-dir`` (``blockrep tls-init``): control channel and replication link both TLS,
  client certificates checked.

The three pairs run side by side and the shots are interleaved (the order of the modes rotates
from one shot to the next), so the machine's drift over the run falls on all three alike. The
consumer is fio's nbd engine on P's consumer export (a unix socket, not authenticated: only the
pair's own endpoints differ). Before every shot a ``replication-checkpoint`` empties S's buffers,
so every shot starts alike (each cluster needs a copy-before-write on S); checkpoints are
otherwise off (``--checkpoint-interval 0``) so that none falls inside a shot. Measured:

* 1 MiB sequential writes at qd 8 over the whole disk (bench/replication.py's ``fio_seq``),
  --seq-shots per mode, median;
* 4 KiB random writes at qd 32 over the whole disk for --runtime seconds (``fio_rand``),
  --rand-shots per mode, median;
* the same over the first --hot-mib of the disk. Why a second random row: S's status, which its
  event log polls every 0.2 s, walks the whole hidden and active overlays
  (``_allocated_bytes`` in blockrep/replication/control.py); scattered over a large disk that
  walk is most of S's CPU, caps every mode alike and hides what authentication costs. In a hot
  window the overlays fill at once and the walk is short: the data path is what is measured.

The raw disks go to $TMPDIR (a disk file system), not /dev/shm: on tmpfs ``SEEK_DATA`` /
``SEEK_HOLE`` walk the page cache, so every block-status on a written raw file costs time in
proportion to its size (S's copy-before-write and the status walk above both ask).

After every shot P's ``query-ha-status`` must still say peer connected with no replication error;
at the end each pair takes a last checkpoint, both nodes quit, and P's disk must equal S's
(sha256): a mode that loses replication does not count as fast.

Results: bench/results/security.json and bench/results/security.md (figures per mode and the
ratios psk/insecure and tls/insecure).

Run: .venv/bin/python bench/security.py [--quick] [--size-mib 1024] [--runtime 8]
     [--seq-shots 3] [--rand-shots 3] [--hot-mib 64]
     [--dir DIR] [--modes insecure,psk,tls]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

from replication import fio_rand, fio_seq, log, make_golden, median, sh, sha256_file

from blockrep.testing import HA, HANode, MiB, blockrep_argv, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODES = ("insecure", "psk", "tls")
REFERENCE = "insecure"
PAIR_TIMEOUT = 120.0  # both nodes ready and paired
STEP_TIMEOUT = 120.0  # a checkpoint, a quit


class Failed(RuntimeError):
    """A pair stopped replicating (or never started): its figures do not count."""


class Pair:
    """One TCP loopback pair of one mode, its disks in ``disk_dir``, its sockets in an HA dir."""

    def __init__(self, mode: str, golden: str, disk_dir: str) -> None:
        self.mode = mode
        self.golden = golden
        self.ha = HA()
        self.disk_dir = tempfile.mkdtemp(prefix=f"{mode}-", dir=disk_dir)
        # the overlays in the buffer dir are named after the disk: keep the HA dir's tag in it
        self.p_disk = os.path.join(self.disk_dir, f"{self.ha.tag}-p.raw")
        self.s_disk = os.path.join(self.disk_dir, f"{self.ha.tag}-s.raw")
        self.p: HANode | None = None
        self.s: HANode | None = None
        self.port = free_port()
        self.link_port = free_port()
        self.ready_s: float | None = None

    def auth_args(self) -> list[str]:
        if self.mode == "insecure":
            return ["--insecure"]
        if self.mode == "psk":
            return ["--psk-file", self.ha.psk_file()]
        d = self.ha.path("tls")
        r = subprocess.run(blockrep_argv("tls-init", d), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Failed(f"blockrep tls-init failed: {r.stderr.strip()}")
        return ["--tls-dir", d]

    @property
    def uri(self) -> str:
        assert self.p is not None
        return f"nbd+unix:///disk?socket={self.p.export}"

    async def start(self) -> None:
        for d in (self.p_disk, self.s_disk):
            await asyncio.to_thread(shutil.copyfile, self.golden, d)
        sec = self.auth_args()
        t0 = time.monotonic()
        self.s = self.ha.secondary(
            disk=self.s_disk,
            listen=f"127.0.0.1:{self.port}",
            extra=[*sec, "--link-port", str(self.link_port)],
        )
        # the disks are byte-for-byte copies: no comparison before pairing
        self.p = self.ha.primary(
            f"127.0.0.1:{self.port}",
            disk=self.p_disk,
            extra=[*sec, "--checkpoint-interval", "0", "--assume-synced"],
        )
        try:
            await self.s.wait_ready(PAIR_TIMEOUT)
            await self.p.wait_ready(PAIR_TIMEOUT)
            await self.p.wait_status(lambda x: x["peer"] == "connected", PAIR_TIMEOUT, "paired")
        except AssertionError as e:
            raise Failed(f"{self.mode}: the pair did not start: {str(e)[-3000:]}") from None
        self.ready_s = time.monotonic() - t0

    async def checkpoint(self) -> None:
        assert self.p is not None
        try:
            await self.p.qmp_async("replication-checkpoint", timeout=STEP_TIMEOUT)
        except AssertionError as e:
            raise Failed(f"{self.mode}: checkpoint failed: {str(e)[-3000:]}") from None

    async def healthy(self) -> dict[str, Any]:
        """P's status after a shot: still paired, no replication error."""
        assert self.p is not None
        st = await self.p.astatus()
        if st.get("peer") != "connected" or st.get("replication-error"):
            raise Failed(
                f"{self.mode}: replication lost during the shot: peer {st.get('peer')}, "
                f"error {st.get('replication-error')}\n{self.p.log_text()[-2000:]}"
            )
        return st

    async def finish(self) -> dict[str, Any]:
        """A last checkpoint, both nodes quit, P's disk compared with S's."""
        assert self.p is not None and self.s is not None
        await self.checkpoint()
        await asyncio.to_thread(self.p.quit)
        await asyncio.to_thread(self.s.quit)
        p_sha, s_sha = await asyncio.gather(
            asyncio.to_thread(sha256_file, self.p_disk), asyncio.to_thread(sha256_file, self.s_disk)
        )
        return {"disks_equal": p_sha == s_sha, "p_sha256": p_sha, "s_sha256": s_sha}

    def tail(self) -> str:
        return "\n".join(
            f"--- {n.name} log tail ---\n{n.log_text()[-1500:]}"
            for n in (self.p, self.s)
            if n is not None
        )

    def close(self) -> None:
        self.ha.close()  # kills what is left by pid, removes the overlays and the socket dir
        shutil.rmtree(self.disk_dir, ignore_errors=True)


async def shot(pair: Pair, kind: str, a: argparse.Namespace) -> dict[str, Any]:
    await pair.checkpoint()
    if kind == "seq":
        r = await fio_seq(pair.uri, a.size_mib, fsync=False)
    elif kind == "rand":
        r = await fio_rand(pair.uri, a.size_mib, a.runtime)
    else:
        r = await fio_rand(pair.uri, a.hot_mib, a.runtime)
    await pair.healthy()
    return r


def rotated(modes: list[str], i: int) -> list[str]:
    k = i % len(modes)
    return modes[k:] + modes[:k]


async def start_pairs(
    pairs: dict[str, Any], names: list[str], make_pair: Any, work: str, base: str, size_mib: int
) -> None:
    """One pair per name on copies of one golden image (into ``pairs`` as they come up,
    so the caller's cleanup sees every pair started)."""
    golden = os.path.join(work, "golden.raw")
    log(f"golden image: {size_mib} MiB in {base}")
    await asyncio.to_thread(make_golden, golden, size_mib)
    for m in names:
        pairs[m] = make_pair(m, golden, work)
        await pairs[m].start()
        log(f"{m}: pair ready in {pairs[m].ready_s:.1f} s")
    os.unlink(golden)


async def shots_in_turn(
    pairs: dict[str, Any], names: list[str], shot_fn: Any, a: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Sequential, random (and hot-window) shots, the pairs taking turns each round."""
    kinds = [("seq", a.seq_shots), ("rand", a.rand_shots)]
    if a.hot_mib:
        kinds.append(("hot", a.rand_shots))
    shots: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {k: [] for k, _ in kinds} for m in names
    }
    for kind, n in kinds:
        for i in range(n):
            for m in rotated(names, i):
                r = await shot_fn(pairs[m], kind, a)
                shots[m][kind].append(r)
                log(f"{m} {kind} shot {i}: {r['mib_s']:.1f} MiB/s, {r['iops']:.0f} IOPS")
    return shots


def summarise(shots: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "shots": shots,
        "mib_s_median": median([s["mib_s"] for s in shots]),
        "iops_median": median([s["iops"] for s in shots]),
        "clat_p99_ms_median": median(
            [s["clat_p99_ms"] for s in shots if s.get("clat_p99_ms") is not None]
        ),
    }


def check_space(a: argparse.Namespace, modes: list[str], disk_dir: str) -> None:
    """The disks (two per pair plus the golden one) must fit, with room to spare."""
    need = (2 * len(modes) + 1) * a.size_mib * MiB + 512 * MiB
    st = os.statvfs(disk_dir)
    free = st.f_bavail * st.f_frsize
    if free < need:
        sys.exit(
            f"{disk_dir} has {free // MiB} MiB free, the run needs about {need // MiB} MiB: "
            "pass --dir elsewhere or a smaller --size-mib"
        )


async def amain(a: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)

    modes = [m for m in a.modes.split(",") if m]
    if REFERENCE not in modes or any(m not in MODES for m in modes):
        sys.exit(f"--modes: a subset of {','.join(MODES)} that includes {REFERENCE}")
    base = a.dir or tempfile.gettempdir()
    if a.hot_mib >= a.size_mib:
        sys.exit("--hot-mib must be smaller than the disk (--size-mib)")
    check_space(a, modes, base)
    work = tempfile.mkdtemp(prefix="blockrep-secbench-", dir=base)
    res: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "fio_version": sh("fio", "--version").strip(),
        "blockrep_rev": subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        or "?",
        "command": " ".join(["bench/security.py", *sys.argv[1:]]),
        "args": {
            "size_mib": a.size_mib,
            "runtime": a.runtime,
            "seq_shots": a.seq_shots,
            "rand_shots": a.rand_shots,
            "hot_mib": a.hot_mib,
            "modes": modes,
            "disk_dir": base,
            "buffer_dir": "/dev/shm" if os.path.isdir("/dev/shm") else "(the HA dir)",
        },
        "modes": {},
    }
    pairs: dict[str, Pair] = {}
    t0 = time.monotonic()
    try:
        await start_pairs(pairs, modes, Pair, work, base, a.size_mib)
        shots = await shots_in_turn(pairs, modes, shot, a)
        for m in modes:
            fin = await pairs[m].finish()
            res["modes"][m] = {
                "pair_ready_s": pairs[m].ready_s,
                **{k: summarise(v) for k, v in shots[m].items()},
                **fin,
            }
            log(f"{m}: P's disk {'equals' if fin['disks_equal'] else 'DIFFERS FROM'} S's")
    except Failed as e:
        log(f"FAILED: {e}")
        for p in pairs.values():
            print(p.tail(), file=sys.stderr)
        res["failed"] = str(e)
    finally:
        for p in pairs.values():
            p.close()
        shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.monotonic() - t0
    res["machine"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    md = markdown(res)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{a.name}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, f"{a.name}.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote bench/results/{a.name}.json and .md in {res['wall_s']:.0f} s")
    bad = "failed" in res or not all(v["disks_equal"] for v in res["modes"].values())
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# markdown


def fnum(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def ratio(x: float | None, y: float | None) -> str:
    return "-" if x is None or not y else f"{x / y:.2f}"


ROWS = (
    ("seq write 1M qd8 after checkpoint (MiB/s)", "seq", "mib_s_median", 0),
    ("rand write 4k qd32 (IOPS)", "rand", "iops_median", 0),
    ("rand write 4k qd32 (MiB/s)", "rand", "mib_s_median", 1),
    ("rand write 4k qd32, p99 completion latency (ms)", "rand", "clat_p99_ms_median", 1),
    ("rand write 4k qd32 in the first {hot} MiB (IOPS)", "hot", "iops_median", 0),
    ("rand write 4k qd32 in the first {hot} MiB (MiB/s)", "hot", "mib_s_median", 1),
    (
        "rand write 4k qd32 in the first {hot} MiB, p99 completion latency (ms)",
        "hot",
        "clat_p99_ms_median",
        1,
    ),
)


def markdown(res: dict[str, Any]) -> str:
    m, ar = res["machine"], res["args"]
    modes = [x for x in ar["modes"] if x in res["modes"]]
    others = [x for x in modes if x != REFERENCE]
    L = [
        "# Security benchmark: the cost of authentication on P's replicated throughput (same run)",
        "",
        f"`.venv/bin/python {res['command']}`",
        "",
        f"{res['fio_version']}; Python {m['python']}, {m['openssl']}; {m['cpus']} CPUs; "
        f"load average at start {m['loadavg_start']}, at end {m['loadavg_end']}; "
        f"blockrep {res['blockrep_rev']}; {res['wall_s']:.0f} s.",
        f"Disk {ar['size_mib']} MiB raw (written, not sparse) in `{ar['disk_dir']}`, hidden/active in "
        f"`{ar['buffer_dir']}`; sequential: median of {ar['seq_shots']} shots over the whole disk; "
        f"random: median of {ar['rand_shots']} shots of {ar['runtime']} s.",
        "Each mode is one `blockrep primary` / `blockrep secondary` pair, control channel and "
        "replication link on TCP 127.0.0.1; the three run side by side and the shots alternate "
        "between them. The consumer (fio, nbd engine) writes to P's consumer export on a unix "
        "socket; every shot starts right after a `replication-checkpoint` (no other checkpoint). "
        "`psk` authenticates (HMAC challenge-response, secret export name on the link) but does "
        "not encrypt; `tls` encrypts the control channel and the link (x509, client certificate "
        "checked).",
        f"The hot-window rows write the first {ar['hot_mib']} MiB only: S's status, which its event "
        "log polls every 0.2 s, walks the whole hidden and active overlays, and with writes "
        "scattered over the whole disk that walk is most of S's CPU and caps every mode alike "
        "(see the docstring of bench/security.py); in the window the data path is what counts.",
        "",
    ]
    if res.get("failed"):
        L += ["## Failure", "", "```", res["failed"][:3000], "```", ""]
    if not modes:
        return "\n".join(L) + "\n"
    L += [
        "## P throughput",
        "",
        "| case | "
        + " | ".join(modes)
        + " | "
        + " | ".join(f"{x} / {REFERENCE}" for x in others)
        + " |",
        "|---|" + "---|" * (len(modes) + len(others)),
    ]
    for label, kind, key, nd in ROWS:
        if kind not in res["modes"][REFERENCE]:
            continue
        vals = {x: res["modes"][x][kind][key] for x in modes}
        cells = [label.format(hot=ar["hot_mib"]), *(fnum(vals[x], nd) for x in modes)]
        cells += [ratio(vals[x], vals[REFERENCE]) for x in others]
        L.append("| " + " | ".join(cells) + " |")
    if "psk" in modes:
        dev = [
            abs(res["modes"]["psk"][k][key] / res["modes"][REFERENCE][k][key] - 1)
            for _, k, key, _ in ROWS
            if key != "clat_p99_ms_median"
            and k in res["modes"][REFERENCE]
            and res["modes"][REFERENCE][k][key]
            and res["modes"]["psk"][k][key] is not None
        ]
        if dev:
            L += [
                "",
                "`psk` adds no work per request (a challenge-response when the control channel "
                "opens, then the same clear-text link as `insecure`): how far psk / insecure "
                f"strays from 1.00 (here up to {max(dev):.0%}) is this run's noise, and a tls / "
                "insecure ratio inside that band says nothing.",
            ]
    L += [
        "",
        "## Every shot",
        "",
        "| mode | pair ready (s) | seq shots (MiB/s) | rand shots (IOPS) | hot rand shots (IOPS) "
        "| P's disk = S's after the last checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for x in modes:
        v = res["modes"][x]
        hot = ", ".join(fnum(s["iops"]) for s in v["hot"]["shots"]) if "hot" in v else "-"
        L.append(
            f"| {x} | {fnum(v['pair_ready_s'], 1)} | "
            + ", ".join(fnum(s["mib_s"]) for s in v["seq"]["shots"])
            + " | "
            + ", ".join(fnum(s["iops"]) for s in v["rand"]["shots"])
            + f" | {hot} | {'yes' if v['disks_equal'] else 'NO'} |"
        )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 128 MiB, 2 s, 1 shot each")
    ap.add_argument("--size-mib", type=int, default=None, help="disk size = seq write size (1024)")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per random shot (8)")
    ap.add_argument("--seq-shots", type=int, default=None, help="sequential shots per mode (3)")
    ap.add_argument("--rand-shots", type=int, default=None, help="random shots per mode (3)")
    ap.add_argument(
        "--hot-mib",
        type=int,
        default=64,
        help="window of the second random row, MiB from the start (64; 0: no such row)",
    )
    ap.add_argument(
        "--dir", default=None, help="where the raw disks go (default $TMPDIR; not tmpfs)"
    )
    ap.add_argument("--modes", default=",".join(MODES), help="modes to measure (with insecure)")
    ap.add_argument("--name", default="security", help="results file name under bench/results")
    a = ap.parse_args()
    a.size_mib = a.size_mib or (128 if a.quick else 1024)
    a.runtime = a.runtime or (2 if a.quick else 8)
    a.seq_shots = a.seq_shots or (1 if a.quick else 3)
    a.rand_shots = a.rand_shots or (1 if a.quick else 3)
    if shutil.which("fio") is None:
        sys.exit("fio not found (make debs)")
    try:
        rc = asyncio.run(amain(a))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted; every started process was stopped and the temp files removed")
    sys.exit(rc)


if __name__ == "__main__":
    main()
