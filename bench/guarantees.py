#!/usr/bin/env python3
"""The cost of the data guarantees (issue 13, "Benchmark (bench/guarantees)").

Three measurements, one run:

* **throughput, ``latest`` vs ``checkpoint``**: two ``blockrep primary`` / ``blockrep
  secondary`` pairs on unix sockets side by side, one with ``--failover-point latest``, one with
  the default ``checkpoint``; fio's nbd engine on P's consumer export. Before every shot a
  ``replication-checkpoint`` empties S's buffers (no other checkpoint:
  ``--checkpoint-interval 0``) and the order of the two pairs alternates from shot to shot, as
  in bench/security.py. 1 MiB sequential writes qd 8 over the whole disk, 4 KiB random writes
  qd 32 for --runtime seconds over the whole disk and over the first --hot-mib (why a hot window:
  see bench/security.py's docstring), median of the shots; IOPS, MiB/s, p99 completion latency
  and the ratio latest / checkpoint.
* **time to the first acknowledged write after peer loss**: a fresh small pair per trial
  (--loss-mib, P ``--heartbeat-interval 0.1 --heartbeat-timeout 1``, S ``--heartbeat-interval
  0.1``); a writer (blockrep's own NBD client on P's export) writes 4 KiB at a random offset,
  waits for the acknowledgement, timestamps it, sleeps 10 ms, again. S is SIGKILLed (its
  sockets close) or SIGSTOPped (silent: only the heartbeat tells). With
  ``latest`` P freezes acknowledgements and runs ``--outdate-peer-command true`` (a cluster
  constraint placed at once: the command a real cluster runs, e.g. ``blockrep outdate`` on S's
  QMP, cannot answer for a dead S); with ``checkpoint`` nothing freezes. Measured from the kill:
  the moment P's log says it froze and says acknowledgements flow again (P's log is followed
  every 2 ms: the daemon's lines carry no time stamp), and the acknowledgement of the first
  write sent after the signal; also the longest gap between two acknowledgements around it.
  Median of --loss-trials trials per point. Every trial ends with P's disk equal to a model of
  the acknowledged writes (sha256).
* **verify**: on each throughput pair, idle and Protected after a checkpoint, ``blockrep verify
  --wait --restart`` unlimited; GiB/s from the pass's ``elapsed`` in P's status (and from the
  command's wall time), and the control-channel bytes per GiB verified from status
  ``verify.digest-bytes`` (the digest requests and answers the pass sent and received, counted by
  P where it encodes and decodes them).

Throughput pairs end with a last checkpoint, both nodes quit, and P's disk must equal S's
(sha256). Disks on $TMPDIR (a disk file system, not tmpfs), hidden/active in /dev/shm.

Results: bench/results/guarantees.json and bench/results/guarantees.md.

Run: .venv/bin/python bench/guarantees.py [--quick] [--size-mib 1024] [--runtime 8]
     [--seq-shots 3] [--rand-shots 3] [--hot-mib 64] [--loss-trials 3] [--loss-mib 64] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from replication import fio_rand, fio_seq, log, median, sh, sha256_file
from security import (
    Failed,
    check_space,
    fnum,
    ratio,
    rotated,
    shots_in_turn,
    start_pairs,
    summarise,
)

from blockrep.testing import HA, HANode, MiB, blockrep_argv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

POINTS = ("latest", "checkpoint")
PAIR_TIMEOUT = 120.0
STEP_TIMEOUT = 120.0
GiB = 1024 * MiB
BLOCK = 4096
LOSS_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1", "--checkpoint-interval", "0"]
LOSS_S = ["--heartbeat-interval", "0.1"]
FROZE = "acknowledgements frozen"
FLOWS = "acknowledgements flow again"


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io: bytes the process passed to read/write calls (any fd), by the kernel."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (ln.split(":") for ln in f)}


class Pair:
    """One unix-socket pair of one failover point; its disks in ``disk_dir``."""

    def __init__(self, point: str, golden: str, disk_dir: str) -> None:
        self.mode = point
        self.golden = golden
        self.ha = HA()
        self.disk_dir = tempfile.mkdtemp(prefix=f"{point}-", dir=disk_dir)
        self.p_disk = os.path.join(self.disk_dir, f"{self.ha.tag}-p.raw")
        self.s_disk = os.path.join(self.disk_dir, f"{self.ha.tag}-s.raw")
        self.p: HANode | None = None
        self.s: HANode | None = None
        self.ready_s: float | None = None

    @property
    def uri(self) -> str:
        assert self.p is not None
        return f"nbd+unix:///disk?socket={self.p.export}"

    async def start(self) -> None:
        for d in (self.p_disk, self.s_disk):
            await asyncio.to_thread(shutil.copyfile, self.golden, d)
        t0 = time.monotonic()
        self.s = self.ha.secondary(disk=self.s_disk, extra=["--failover-point", self.mode])
        self.p = self.ha.primary(
            f"unix:{self.ha.path('s.ctl')}",
            disk=self.p_disk,
            extra=["--checkpoint-interval", "0", "--assume-synced"],
        )
        try:
            await self.s.wait_ready(PAIR_TIMEOUT)
            await self.p.wait_ready(PAIR_TIMEOUT)
            st = await self.p.wait_status(
                lambda x: x["peer"] == "connected", PAIR_TIMEOUT, "paired"
            )
        except AssertionError as e:
            raise Failed(f"{self.mode}: the pair did not start: {str(e)[-3000:]}") from None
        if st.get("failover-point") != self.mode:
            raise Failed(f"{self.mode}: P says failover-point {st.get('failover-point')}")
        self.ready_s = time.monotonic() - t0

    async def checkpoint(self) -> None:
        assert self.p is not None
        try:
            await self.p.qmp_async("replication-checkpoint", timeout=STEP_TIMEOUT)
        except AssertionError as e:
            raise Failed(f"{self.mode}: checkpoint failed: {str(e)[-3000:]}") from None

    async def healthy(self) -> None:
        assert self.p is not None
        st = await self.p.astatus()
        if st.get("peer") != "connected" or st.get("replication-error"):
            raise Failed(
                f"{self.mode}: replication lost during the shot: peer {st.get('peer')}, "
                f"error {st.get('replication-error')}\n{self.p.log_text()[-2000:]}"
            )
        if st["acknowledgements"]["state"] != "flowing":
            raise Failed(f"{self.mode}: acknowledgements {st['acknowledgements']}")

    async def verify(self) -> dict[str, Any]:
        """``blockrep verify --wait --restart`` on the idle pair; status's ``verify`` after."""
        assert self.p is not None
        await self.checkpoint()
        argv = blockrep_argv("verify", "--qmp", f"unix:{self.p.qmp}", "--wait", "--restart")
        assert self.s is not None
        s_io0 = proc_io(self.s.pid)
        t0 = time.monotonic()
        r = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=600
        )
        wall = time.monotonic() - t0
        s_io1 = proc_io(self.s.pid)
        v = (await self.p.astatus())["verify"]
        if r.returncode != 0 or v.get("last-result") != "in-sync":
            raise Failed(
                f"{self.mode}: verify exit {r.returncode}, {v}\n{r.stdout[-1000:]}{r.stderr[-1000:]}"
            )
        gib = v["position"] / GiB
        return {
            "exit": r.returncode,
            "status": {
                k: v.get(k)
                for k in (
                    "position",
                    "total",
                    "elapsed",
                    "rate",
                    "skipped-bytes",
                    "mismatched-bytes",
                    "digest-bytes",
                    "last-result",
                )
            },  # fmt: skip
            "command_wall_s": wall,
            "gib_s": gib / v["elapsed"] if v.get("elapsed") else None,
            "gib_s_wall": gib / wall,
            "digest_bytes_per_gib": v["digest-bytes"] / gib if gib else None,
            # what S passed to read()/pread() meanwhile (the kernel's count; socket send/recv
            # are not in it): its own disk, hashed where it lies
            "s_rchar_bytes": s_io1["rchar"] - s_io0["rchar"],
        }

    async def finish(self) -> dict[str, Any]:
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
            f"--- {self.mode} {n.name} log tail ---\n{n.log_text()[-1500:]}"
            for n in (self.p, self.s)
            if n is not None
        )

    def close(self) -> None:
        self.ha.close()
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


# ---------------------------------------------------------------------------------------------
# peer loss


async def follow_log(
    path: str, start: int, marks: dict[str, float], lines: list[str], stop: asyncio.Event
) -> None:
    """The monotonic time each of FROZE / FLOWS first appears in P's log after ``start``, and
    the first line at all (P noticed something); the lines in ``lines``. Polled every 2 ms."""
    pos, buf = start, ""
    while not stop.is_set():
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
        if chunk:
            now = time.monotonic()
            pos += len(chunk)
            buf += chunk.decode(errors="replace")
            marks.setdefault("first_line", now)
            for key, text in (("froze", FROZE), ("flows", FLOWS)):
                if text in buf:
                    marks.setdefault(key, now)
        await asyncio.sleep(0.002)
    lines += buf.splitlines()


async def loss_trial(how: str, point: str, trial: int, a: argparse.Namespace) -> dict[str, Any]:
    """One fresh pair; S lost by ``how`` (``kill``: SIGKILL, its sockets close at once;
    ``stop``: SIGSTOP, silent, the sockets stay open and only the heartbeat can tell)."""
    ha = HA()
    size = a.loss_mib * MiB
    try:
        model = bytearray(ha.make_disks(size, 1300 + trial))
        s = ha.secondary(extra=[*LOSS_S, "--failover-point", point])
        p_extra = [*LOSS_P, "--assume-synced"]
        if point == "latest":
            p_extra += ["--outdate-peer-command", "true"]
        p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=p_extra)
        try:
            await s.wait_ready(PAIR_TIMEOUT)
            await p.wait_ready(PAIR_TIMEOUT)
            await p.wait_status(lambda x: x["peer"] == "connected", PAIR_TIMEOUT, "paired")
        except AssertionError as e:
            raise Failed(
                f"loss {point} {trial}: the pair did not start: {str(e)[-3000:]}"
            ) from None
        pc = await ha.client(p)
        acks: list[float] = []
        issued: list[float] = []  # issued[i]: when the write acknowledged at acks[i] was sent
        stop = asyncio.Event()

        async def writer() -> None:
            rnd = random.Random(trial)
            while not stop.is_set():
                off = rnd.randrange(0, size // BLOCK) * BLOCK
                data = rnd.randbytes(BLOCK)
                t = time.monotonic()
                await asyncio.wait_for(pc.write(off, data), 60)
                acks.append(time.monotonic())
                issued.append(t)
                model[off : off + BLOCK] = data
                await asyncio.sleep(0.01)

        w = asyncio.create_task(writer())
        await asyncio.sleep(1.0)
        marks: dict[str, float] = {}
        lines: list[str] = []
        log_stop = asyncio.Event()
        follower = asyncio.create_task(
            follow_log(p.log, os.path.getsize(p.log), marks, lines, log_stop)
        )
        await asyncio.sleep(0.05)
        t_kill = time.monotonic()
        os.kill(s.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        deadline = t_kill + 30
        while time.monotonic() < deadline and not (
            (point != "latest" or "flows" in marks) and any(t > t_kill for t in issued[-1:])
        ):
            if w.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # the writer goes on alone for a second
        stop.set()
        await asyncio.wait_for(w, 60)  # raises what the writer raised
        log_stop.set()
        await follower
        st = await p.astatus()
        # a write sent before the signal may be acknowledged just after it (S had it): the
        # first write *sent* after the signal is the one that meets the lost peer
        after = [t for t, t_sent in zip(acks, issued, strict=True) if t_sent > t_kill]
        gaps = [b - a_ for a_, b in zip(acks, acks[1:], strict=False) if b > t_kill - 0.5]
        if not after:
            raise Failed(f"loss {point} {trial}: no write acknowledged after the kill: {st}")
        for g in ha.graphs:
            await g.close_all()
        ha.graphs.clear()
        await asyncio.to_thread(p.quit)
        equal = (
            await asyncio.to_thread(sha256_file, p.disk) == hashlib.sha256(bytes(model)).hexdigest()
        )
        rel = {k: v - t_kill for k, v in marks.items()}
        return {
            "first_ack_after_kill_s": after[0] - t_kill,
            "max_ack_gap_s": max(gaps) if gaps else None,
            "p_log_first_line_s": rel.get("first_line"),
            "froze_s": rel.get("froze"),
            "flows_s": rel.get("flows"),
            "in_flight_at_signal_acked_s": next(
                (
                    t - t_kill
                    for t, t_sent in zip(acks, issued, strict=True)
                    if t_sent <= t_kill < t
                ),
                None,
            ),
            "acks_before": len(acks) - len(after),
            "acks_after": len(after),
            "acknowledgements": st["acknowledgements"],
            "peer": st.get("peer"),
            "p_disk_equals_model": equal,
            "p_log_after": [ln[:300] for ln in lines[:8]],
        }
    finally:
        ha.close()


# ---------------------------------------------------------------------------------------------


async def amain(a: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    base = a.dir or tempfile.gettempdir()
    if a.hot_mib >= a.size_mib:
        sys.exit("--hot-mib must be smaller than the disk (--size-mib)")
    check_space(a, list(POINTS), base)
    work = tempfile.mkdtemp(prefix="blockrep-guarbench-", dir=base)
    res: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "fio_version": sh("fio", "--version").strip(),
        "blockrep_rev": subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        or "?",
        "command": " ".join(["bench/guarantees.py", *sys.argv[1:]]),
        "args": {
            "size_mib": a.size_mib,
            "runtime": a.runtime,
            "seq_shots": a.seq_shots,
            "rand_shots": a.rand_shots,
            "hot_mib": a.hot_mib,
            "loss_trials": a.loss_trials,
            "loss_mib": a.loss_mib,
            "disk_dir": base,
        },
        "points": {},
        "loss": {},
    }
    pairs: dict[str, Pair] = {}
    t0 = time.monotonic()
    try:
        await start_pairs(pairs, list(POINTS), Pair, work, base, a.size_mib)
        shots = await shots_in_turn(pairs, list(POINTS), shot, a)
        verify: dict[str, dict[str, Any]] = {}
        for m in POINTS:
            verify[m] = await pairs[m].verify()
            v = verify[m]
            log(
                f"{m}: verify {fnum(v['gib_s'], 2)} GiB/s, "
                f"{fnum(v['digest_bytes_per_gib'])} digest bytes per GiB"
            )
        for m in POINTS:
            fin = await pairs[m].finish()
            res["points"][m] = {
                "pair_ready_s": pairs[m].ready_s,
                **{k: summarise(v) for k, v in shots[m].items()},
                "verify": verify[m],
                **fin,
            }
            log(f"{m}: P's disk {'equals' if fin['disks_equal'] else 'DIFFERS FROM'} S's")
            pairs.pop(m).close()
        cases = [f"{how}-{m}" for how in ("kill", "stop") for m in POINTS]
        for c in cases:
            res["loss"][c] = {"trials": []}
        for i in range(a.loss_trials):
            for c in rotated(cases, i):
                how, m = c.split("-")
                r = await loss_trial(how, m, i, a)
                res["loss"][c]["trials"].append(r)
                log(
                    f"loss {c} trial {i}: first ack after S was lost "
                    f"{r['first_ack_after_kill_s']:.3f} s, froze {fnum(r['froze_s'], 3)} s, "
                    f"flows {fnum(r['flows_s'], 3)} s"
                )
        for c in cases:
            t = res["loss"][c]["trials"]
            for key in ("first_ack_after_kill_s", "max_ack_gap_s", "froze_s", "flows_s",
                        "p_log_first_line_s"):  # fmt: skip
                xs = [x[key] for x in t if x[key] is not None]
                res["loss"][c][key + "_median"] = median(xs) if xs else None
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
    bad = (
        "failed" in res
        or not all(v["disks_equal"] for v in res["points"].values())
        or not all(
            t["p_disk_equals_model"] for v in res["loss"].values() for t in v.get("trials", [])
        )
    )
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# markdown

ROWS = (
    ("seq write 1M qd8 after checkpoint (MiB/s)", "seq", "mib_s_median", 0),
    ("seq write 1M qd8, p99 completion latency (ms)", "seq", "clat_p99_ms_median", 1),
    ("rand write 4k qd32 (IOPS)", "rand", "iops_median", 0),
    ("rand write 4k qd32 (MiB/s)", "rand", "mib_s_median", 1),
    ("rand write 4k qd32, p99 completion latency (ms)", "rand", "clat_p99_ms_median", 1),
    ("rand write 4k qd32 in the first {hot} MiB (IOPS)", "hot", "iops_median", 0),
    ("rand write 4k qd32 in the first {hot} MiB (MiB/s)", "hot", "mib_s_median", 1),
    ("rand write 4k qd32 in the first {hot} MiB, p99 latency (ms)", "hot", "clat_p99_ms_median", 1),
)


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def markdown(res: dict[str, Any]) -> str:
    m, ar = res["machine"], res["args"]
    pts = [x for x in POINTS if x in res["points"]]
    L = [
        "# Guarantees benchmark: failover-point latest vs checkpoint, peer loss, verify (same run)",
        "",
        f"`.venv/bin/python {res['command']}`",
        "",
        f"{res['fio_version']}; Python {m['python']}; {m['cpus']} CPUs; load average at start "
        f"{m['loadavg_start']}, at end {m['loadavg_end']}; blockrep {res['blockrep_rev']}; "
        f"{res['wall_s']:.0f} s.",
        f"Disk {ar['size_mib']} MiB raw (written, not sparse) in `{ar['disk_dir']}`, "
        "hidden/active in `/dev/shm`; sequential: median of "
        f"{ar['seq_shots']} shots over the whole disk; random: median of {ar['rand_shots']} "
        f"shots of {ar['runtime']} s. Two `blockrep primary` / `blockrep secondary` pairs on unix "
        "sockets side by side (S `--failover-point latest`, S default `checkpoint`; P learns it "
        "at pairing), the shots alternate between them, each right after a "
        "`replication-checkpoint`; the consumer is fio's nbd engine on P's consumer export.",
        "",
    ]
    if res.get("failed"):
        L += ["## Failure", "", "```", res["failed"][:3000], "```", ""]
    if len(pts) == 2:
        L += [
            "## P throughput",
            "",
            "| case | latest | checkpoint | latest / checkpoint |",
            "|---|---|---|---|",
        ]
        for label, kind, key, nd in ROWS:
            if kind not in res["points"]["checkpoint"]:
                continue
            lv, cv = (res["points"][x][kind][key] for x in POINTS)
            L.append(
                f"| {label.format(hot=ar['hot_mib'])} | {fnum(lv, nd)} | {fnum(cv, nd)} | "
                f"{ratio(lv, cv)} |"
            )
        L += [
            "",
            "With `latest` a write is acknowledged once S has it, as with `checkpoint` (P "
            "forwards every write synchronously in both modes): the difference is what a "
            "failover keeps and the freeze on peer loss, not the data path, so ratios near 1.00 "
            "are expected and their spread is this run's noise.",
            "",
            "| point | pair ready (s) | seq shots (MiB/s) | rand shots (IOPS) | hot shots (IOPS) "
            "| P's disk = S's after the last checkpoint |",
            "|---|---|---|---|---|---|",
        ]
        for x in pts:
            v = res["points"][x]
            hot = ", ".join(fnum(s["iops"]) for s in v["hot"]["shots"]) if "hot" in v else "-"
            L.append(
                f"| {x} | {fnum(v['pair_ready_s'], 1)} | "
                + ", ".join(fnum(s["mib_s"]) for s in v["seq"]["shots"])
                + " | "
                + ", ".join(fnum(s["iops"]) for s in v["rand"]["shots"])
                + f" | {hot} | {'yes' if v['disks_equal'] else 'NO'} |"
            )
        L += [
            "",
            "## Online verify (`blockrep verify --wait --restart`, unlimited, idle Protected "
            f"pair of {ar['size_mib']} MiB)",
            "",
            "| pair | GiB/s (pass's `elapsed`) | GiB/s (command wall time) | digest bytes on the "
            "control channel | bytes per GiB verified | S read() meanwhile (kernel) "
            "| skipped bytes | result |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in pts:
            v = res["points"][x]["verify"]
            s = v["status"]
            L.append(
                f"| {x} | {fnum(v['gib_s'], 2)} | {fnum(v['gib_s_wall'], 2)} | "
                f"{s['digest-bytes']} | {fnum(v['digest_bytes_per_gib'])} "
                f"({fnum((v['digest_bytes_per_gib'] or 0) / 1024, 1)} KiB) "
                f"| {fnum(v['s_rchar_bytes'] / MiB)} MiB | {s['skipped-bytes']} "
                f"| {s['last-result']} |"
            )
        L += [
            "",
            "Bytes on the wire: status `verify.digest-bytes`: P adds, per batch of regions, the "
            "length of the digest request and of S's answer as the channel's JSON lines "
            "(`blockrep/ha/verify.py`, re-encoded: within a few bytes per batch of what is "
            "sent); 1 MiB regions, a 16-byte BLAKE2b digest per region, hex in the answer. "
            "That is about 41 bytes per region (a region number in the request, 32 hex digits "
            "and JSON punctuation in the answer), 1024 regions per GiB. The data itself never "
            "crosses: S read() its own disk (the kernel's count in /proc/PID/io) to hash it. "
            "(The kernel's write count cannot cross-check the channel: socket send() is not in "
            "it.) ",
            "The command's wall time adds starting the CLI and its status polling.",
            "",
        ]
    cases = [c for c, v in res["loss"].items() if v.get("trials")]
    if cases:
        L += [
            f"## Time to the first acknowledged write after peer loss ({ar['loss_mib']} MiB "
            f"pairs, a fresh pair per trial, median of {ar['loss_trials']} trials)",
            "",
            "A writer (blockrep's NBD client on P's export) writes 4 KiB at a random offset, "
            "waits for the acknowledgement, sleeps 10 ms, again. S is lost: `kill` = SIGKILL "
            "(its sockets close, P sees it at once), `stop` = SIGSTOP (silent, sockets open: "
            "only the heartbeat tells). P `--heartbeat-interval 0.1 --heartbeat-timeout 1`, S "
            "`--heartbeat-interval 0.1`; the `latest` P has `--outdate-peer-command true` (a "
            "cluster constraint placed at once; `blockrep outdate` on S's QMP cannot answer for "
            "a dead S). Times in ms from the signal; P's log is followed every 2 ms (its lines "
            "carry no time stamp), so a log time is late by up to ~3 ms and may read a little "
            "after the acknowledgement it let through. A write sent before the signal may be "
            "acknowledged just after it (S had it already): the first write *sent* after the "
            "signal is the one that meets the lost peer.",
            "",
            "| S lost by - point | P's first log line | P froze acknowledgements | "
            "acknowledgements flow again | first write sent after the signal acknowledged | "
            "longest gap between "
            "acknowledgements | P's disk = model of acknowledged writes |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in cases:
            v = res["loss"][x]
            ok = all(t["p_disk_equals_model"] for t in v["trials"])
            L.append(
                f"| {x} | {ms(v['p_log_first_line_s_median'])} | {ms(v['froze_s_median'])} | "
                f"{ms(v['flows_s_median'])} | {ms(v['first_ack_after_kill_s_median'])} | "
                f"{ms(v['max_ack_gap_s_median'])} | {'yes' if ok else 'NO'} |"
            )
        L += [
            "",
            "Reading: with `kill` P learns of the loss from the next forward that fails, at "
            "once; with `stop` only from the heartbeat (`--heartbeat-timeout 1`). A frozen "
            "`latest` P runs `--outdate-peer-command` first (here `true`, a constraint placed "
            "at once) and asks the secondary itself only when that fails: the freeze costs "
            "the command's run time on top of the detection, which both points pay alike.",
            "",
            "Every trial (ms from the signal: first write sent after it acknowledged / froze / "
            "flows again; the write in flight at the signal, if any, acknowledged at):",
            "",
        ]
        for x in cases:
            for i, t in enumerate(res["loss"][x]["trials"]):
                ack = t["acknowledgements"]
                why = next((ln for ln in t["p_log_after"] if FROZE in ln), None)
                L.append(
                    f"* {x} {i}: {ms(t['first_ack_after_kill_s'])} / {ms(t['froze_s'])} / "
                    f"{ms(t['flows_s'])}; in flight {ms(t['in_flight_at_signal_acked_s'])}; "
                    f"{t['acks_before']} acks before, {t['acks_after']} "
                    f"after; peer {t['peer']}, outdate attempts {ack['outdate-attempts']}, "
                    f"peer-outdated {ack['peer-outdated']}"
                    + (f"; P: `{why.strip()}`" if why else "")
                )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 128 MiB, 2 s, 1 shot each")
    ap.add_argument("--size-mib", type=int, default=None, help="disk size = seq write size (1024)")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per random shot (8)")
    ap.add_argument("--seq-shots", type=int, default=None, help="sequential shots per point (3)")
    ap.add_argument("--rand-shots", type=int, default=None, help="random shots per point (3)")
    ap.add_argument("--hot-mib", type=int, default=64, help="hot random window (64; 0: none)")
    ap.add_argument("--loss-trials", type=int, default=None, help="peer-loss trials (3)")
    ap.add_argument("--loss-mib", type=int, default=64, help="disk of a peer-loss pair (64)")
    ap.add_argument("--dir", default=None, help="where the raw disks go (default $TMPDIR)")
    ap.add_argument("--name", default="guarantees", help="results file name under bench/results")
    a = ap.parse_args()
    a.size_mib = a.size_mib or (128 if a.quick else 1024)
    a.runtime = a.runtime or (2 if a.quick else 8)
    a.seq_shots = a.seq_shots or (1 if a.quick else 3)
    a.rand_shots = a.rand_shots or (1 if a.quick else 3)
    a.loss_trials = a.loss_trials or (1 if a.quick else 3)
    if shutil.which("fio") is None:
        sys.exit("fio not found (make debs)")
    try:
        rc = asyncio.run(amain(a))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted; every started process was stopped and the temp files removed")
    sys.exit(rc)


if __name__ == "__main__":
    main()
