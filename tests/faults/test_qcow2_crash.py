"""Crash safety of the qcow2 driver: a writer killed with SIGKILL at a random moment.

Each run starts tests/harness/qcow2_crash_writer.py on a fresh overlay with a seeded
workload (writes that allocate L2 tables and refcount blocks and, with 512-byte
clusters, grow and relocate the refcount table; write_zeroes, discard, flush and
make_empty), kills it after a seeded number of ops plus a seeded delay, and then:

* ``qemu-img check`` exits 0 or 3 (leaks are allowed after a crash, corruption never);
* ``blockrep img check`` agrees with it; ``blockrep img check -r leaks`` leaves an
  image qemu-img calls clean;
* the image reopens read/write in blockrep, everything the writer flushed before the
  kill reads back as written (bytes touched after the last flush may hold either
  version and are skipped), and a write + flush after the crash keeps it clean.

Everything is seeded: a failure names its config and seed and reproduces.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blockrep.block import Graph
from blockrep.cli.img import main as img_main
from blockrep.qcow2.create import create_file
from tests.harness import qcow2_crash_writer as W
from tests.harness.tools import tool

WRITER = Path(W.__file__)

SECTOR = W.SECTOR
GiB = 1 << 30
MiB = 1 << 20
BASE_SIZE = 16 * MiB
WRITER_TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(120)

# name: cluster, virtual size, backing?, creator, driver options, ops, number of runs
CONFIGS: dict[str, dict[str, Any]] = {
    # 512-byte clusters over 1 GiB: a 256 KiB L1, new L2 tables at every scattered
    # write; with 64-bit refcounts a refcount block covers 32 KiB, so past 2 MiB of
    # file the one-cluster refcount table is full and must grow and move.
    "c512": dict(
        cluster=512,
        size=1 * GiB,
        backing=False,
        creator="blockrep",
        nops=160,
        runs=10,
        refcount_bits=64,
        max_len=256 << 10,
        qcow2_opts={"l2-cache-size": 16 * 512, "refcount-cache-size": 8 * 512},
    ),
    # 64 MiB with 64-bit refcounts: the reftable moves after 2 MiB of file while
    # L1 and refcount block 0 stay in place, so make_empty takes the in-place path
    # that also moves the reftable back to cluster 1.
    "c512-moved-reftable": dict(
        cluster=512,
        size=64 * MiB,
        backing=False,
        creator="blockrep",
        nops=140,
        runs=6,
        refcount_bits=64,
        max_len=256 << 10,
        empty_rate=0.03,
        qcow2_opts={},
    ),
    "c512-backing": dict(
        cluster=512,
        size=1 * GiB,
        backing=True,
        creator="qemu-img",
        nops=140,
        runs=8,
        qcow2_opts={},
    ),
    # small caches force L2 / refcount block evictions in the middle of writes
    "c4k": dict(
        cluster=4096,
        size=8 * GiB,
        backing=False,
        creator="qemu-img",
        nops=160,
        runs=10,
        refcount_bits=64,
        qcow2_opts={"l2-cache-size": 4 * 4096, "refcount-cache-size": 4 * 4096},
    ),
    "c4k-backing": dict(
        cluster=4096,
        size=8 * GiB,
        backing=True,
        creator="blockrep",
        nops=140,
        runs=10,
        qcow2_opts={},
    ),
    "c64k": dict(
        cluster=65536,
        size=16 * GiB,
        backing=False,
        creator="blockrep",
        nops=120,
        runs=7,
        qcow2_opts={"l2-cache-size": 2 * 65536},
    ),
    "c64k-backing": dict(
        cluster=65536,
        size=4 * GiB,
        backing=True,
        creator="qemu-img",
        nops=120,
        runs=7,
        qcow2_opts={},
    ),
}
# Runs aimed at make_empty: the kill lands inside the first make_empty of the workload.
EMPTY_RUNS = (
    [("c4k", 900 + i) for i in range(3)]
    + [("c64k-backing", 950 + i) for i in range(3)]
    + [("c512-moved-reftable", 970 + i) for i in range(4)]
)

RUNS = [
    (name, 1000 * k + s) for k, (name, c) in enumerate(CONFIGS.items()) for s in range(c["runs"])
]


# -- helpers -------------------------------------------------------------------------


def qemu_check(path: Path) -> tuple[int, dict[str, Any], str]:
    p = tool("qemu-img", "check", "--output", "json", "-f", "qcow2", str(path), check=False)
    try:
        data = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    return p.returncode, data, p.stdout + p.stderr


def blockrep_img(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = img_main(list(args))
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 backing file with the byte patterns of W.BASE_REGIONS, written by qemu-io."""
    d = tmp_path_factory.mktemp("base")
    base = d / "base.qcow2"
    p = tool("qemu-img", "create", "-f", "qcow2", str(base), str(BASE_SIZE), check=False)
    assert p.returncode == 0, p.stderr
    cmds: list[str] = []
    for off, n, byte in W.BASE_REGIONS:
        cmds += ["-c", f"write -P {byte} {off} {n}"]
    p = tool("qemu-io", "-f", "qcow2", *cmds, str(base), check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    os.chmod(base, 0o444)
    return base


def base_sector(s: int) -> bytes:
    for off, n, byte in W.BASE_REGIONS:
        if off <= s * SECTOR < off + n:
            return bytes([byte]) * SECTOR
    return bytes(SECTOR)


def make_overlay(path: Path, c: dict[str, Any], base: Path | None) -> None:
    if c["creator"] == "qemu-img":
        o = f"cluster_size={c['cluster']},refcount_bits={c.get('refcount_bits', 16)}"
        cmd = ["qemu-img", "create", "-f", "qcow2", "-o", o]
        if base is not None:
            cmd += ["-b", str(base), "-F", "qcow2"]
        p = tool(*cmd, str(path), str(c["size"]), check=False)
        assert p.returncode == 0, p.stderr
        return

    async def go() -> None:
        await create_file(
            str(path),
            c["size"],
            cluster_size=c["cluster"],
            backing_file=str(base) if base is not None else None,
            backing_format="qcow2" if base is not None else None,
            refcount_bits=c.get("refcount_bits", 16),
        )

    asyncio.run(go())


class Model:
    """What the image reads as, sector by sector (absent: the backing file / zero)."""

    def __init__(self, c: dict[str, Any], backing: bool) -> None:
        self.cs = c["cluster"]
        self.size = c["size"]
        self.backing = backing
        self.sectors: dict[int, bytes] = {}

    def base(self, s: int) -> bytes:
        return base_sector(s) if self.backing and s * SECTOR < BASE_SIZE else bytes(SECTOR)

    def expected(self, s: int) -> bytes:
        return self.sectors.get(s, self.base(s))

    def apply(self, seed: int, i: int, op: tuple) -> None:
        kind = op[0]
        if kind == "w":
            data = W.op_data(seed, i, op[2])
            for k in range(op[2] // SECTOR):
                self.sectors[op[1] // SECTOR + k] = data[k * SECTOR : (k + 1) * SECTOR]
        elif kind == "z":
            for k in range(op[2] // SECTOR):
                self.sectors[op[1] // SECTOR + k] = bytes(SECTOR)
        elif kind == "d":
            # whole clusters only (the image end counts as a boundary), as qcow2 does
            off, n = op[1], op[2]
            first = -(-off // self.cs)
            end = off + n
            last = end // self.cs
            if end == self.size and end % self.cs:
                last += 1
            for c in range(first, last):
                lo = c * self.cs // SECTOR
                hi = min((c + 1) * self.cs, self.size) // SECTOR
                for s in range(lo, hi):
                    self.sectors[s] = bytes(SECTOR)
        elif kind == "e":
            self.sectors.clear()


def touched(op: tuple) -> range | None:
    """Sectors an op may change; None means all of them."""
    if op[0] in ("w", "z", "d"):
        return range(op[1] // SECTOR, (op[1] + op[2]) // SECTOR + 1)
    if op[0] == "e":
        return None
    return range(0)


def run_writer(cfg: dict[str, Any], kill_at: int | None, delay: float) -> list[str]:
    """Start the writer; SIGKILL it ``delay`` seconds after it starts op ``kill_at``.

    stdout is read unbuffered from the raw pipe and drained to EOF after the kill,
    so no line the writer printed before dying is lost.
    """
    err_path = Path(cfg["image"] + ".stderr")
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=err_file,
            bufsize=0,
        )
    watchdog = threading.Timer(WRITER_TIMEOUT, lambda: _kill(proc))
    watchdog.start()
    buf = b""
    killed = False
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            if not killed and kill_at is not None and f"\nB {kill_at}\n".encode() in b"\n" + buf:
                if delay:
                    time.sleep(delay)
                _kill(proc)
                killed = True
    finally:
        watchdog.cancel()
        _kill(proc)
        proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    err = err_path.read_text(errors="replace")
    lines = buf.decode().splitlines()
    if not killed:
        # the writer ran to the end by itself: it must have done so cleanly
        assert proc.returncode == 0, f"writer failed (rc {proc.returncode}):\n{err}"
        assert lines and lines[-1] == "END", err
    else:
        assert proc.returncode in (0, -signal.SIGKILL), f"writer failed:\n{err}"
    return lines


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


async def verify_and_reuse(path: Path, model: Model, sectors: list[int], probe: int) -> None:
    g = Graph()
    try:
        node = await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}})
        assert node.length == model.size
        # read runs of consecutive sectors in one request
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1 and j - i < 255:
                j += 1
            got = await node.read(sectors[i] * SECTOR, (j - i + 1) * SECTOR)
            for k in range(i, j + 1):
                s = sectors[k]
                chunk = got[(k - i) * SECTOR : (k - i + 1) * SECTOR]
                if chunk != model.expected(s):
                    raise AssertionError(
                        f"flushed sector {s} (offset {s * SECTOR:#x}) reads wrong data after the crash"
                    )
            i = j + 1
        # the allocator must still work on the recovered image
        await node.write(probe, b"\xa5" * 3 * SECTOR)
        await node.flush()
        assert await node.read(probe, 3 * SECTOR) == b"\xa5" * 3 * SECTOR
    finally:
        await g.close_all()


def crash_run(
    tmp_path: Path, name: str, seed: int, base: Path | None, target_empty: bool = False
) -> None:
    c = CONFIGS[name]
    img = tmp_path / "overlay.qcow2"
    make_overlay(img, c, base)
    cfg = {
        "image": str(img),
        "seed": seed,
        "nops": c["nops"],
        "size": c["size"],
        "cluster": c["cluster"],
        "qcow2_opts": c["qcow2_opts"],
        "max_len": c.get("max_len", 128 << 10),
        "empty_rate": c.get("empty_rate", 0.015),
    }
    if target_empty:
        cfg["empty_rate"] = 0.05
    ops = W.gen_ops(cfg)
    krng = random.Random(seed * 7919 + 17)
    if target_empty:
        empties = [i for i, op in enumerate(ops) if op[0] == "e"]
        assert empties, "seed gives no make_empty"
        kill_at = empties[-1]  # the last one: the image has grown by then
        delay = krng.choice([0.0, 0.0005, 0.001, 0.002, 0.004])
    else:
        kill_at = krng.randrange(len(ops))
        delay = krng.choice([0.0, krng.uniform(0, 0.003), krng.uniform(0, 0.03)])
    lines = run_writer(cfg, kill_at, delay)
    where = f"[{name} seed={seed} kill_at={kill_at} delay={delay:.4f}]"

    flushed = [int(x.split()[1]) for x in lines if x.startswith("F ")]
    started = [int(x.split()[1]) for x in lines if x.startswith("B ")]
    last_flush = flushed[-1] if flushed else -1
    last_started = started[-1] if started else -1

    # 1. qemu-img: leaks allowed, corruption never
    rc, data, text = qemu_check(img)
    assert rc in (0, 3), f"{where} qemu-img check exit {rc} after the crash:\n{text}"

    # 2. blockrep's own check agrees; repairing leaks gives a clean image. The
    # repair runs even when nothing is reported: refcounts a killed writer left
    # past the end of the file are invisible to both checks, but the repair must
    # drop them, or they become leaks once the file grows over them (step 3).
    brc, btext = blockrep_img("check", "--output", "json", str(img))
    assert brc == rc, f"{where} blockrep img check exit {brc}, qemu-img {rc}:\n{btext}\n{text}"
    bleaks = json.loads(btext).get("leaks", 0)
    assert bleaks == data.get("leaks", 0), f"{where} leak counts differ:\n{btext}\n{text}"
    brc, btext = blockrep_img("check", "-r", "leaks", str(img))
    assert brc == 0, f"{where} blockrep img check -r leaks exit {brc}:\n{btext}"
    rc, data, text = qemu_check(img)
    assert rc == 0, f"{where} qemu-img check after blockrep repair exit {rc}:\n{text}"

    # 3. what was flushed is there
    model = Model(c, base is not None)
    for i in range(last_flush + 1):
        model.apply(seed, i, ops[i])
    unsure: set[int] = set()
    everything_unsure = False
    for i in range(last_flush + 1, min(last_started, len(ops) - 1) + 1):
        t = touched(ops[i])
        if t is None:
            everything_unsure = True
            break
        unsure.update(t)
    if everything_unsure:
        sectors: list[int] = []
    else:
        cand = set(model.sectors)
        if base is not None:
            for off, n, _ in W.BASE_REGIONS:
                cand.update(range(off // SECTOR, (off + n) // SECTOR, 7))
        sectors = sorted(cand - unsure)
    probe = (c["size"] - 64 * 1024) // SECTOR * SECTOR
    try:
        asyncio.run(verify_and_reuse(img, model, sectors, probe))
    except AssertionError as e:
        raise AssertionError(f"{where} {e}") from None
    rc, data, text = qemu_check(img)
    assert rc == 0, f"{where} qemu-img check after reopen + write exit {rc}:\n{text}"


# -- tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,seed", RUNS, ids=[f"{n}-s{s}" for n, s in RUNS])
def test_kill_writer(tmp_path: Path, name: str, seed: int, base_image: Path) -> None:
    crash_run(tmp_path, name, seed, base_image if CONFIGS[name]["backing"] else None)


@pytest.mark.parametrize("name,seed", EMPTY_RUNS, ids=[f"{n}-empty-s{s}" for n, s in EMPTY_RUNS])
def test_kill_writer_in_make_empty(tmp_path: Path, name: str, seed: int, base_image: Path) -> None:
    crash_run(
        tmp_path, name, seed, base_image if CONFIGS[name]["backing"] else None, target_empty=True
    )


def test_workload_grows_refcount_table_and_ends_clean(tmp_path: Path) -> None:
    """The c512 workload, run to the end, really relocates the refcount table."""
    c = CONFIGS["c512"]
    img = tmp_path / "full.qcow2"
    make_overlay(img, c, None)
    cfg = {
        "image": str(img),
        "seed": 4242,
        "nops": c["nops"],
        "size": c["size"],
        "cluster": c["cluster"],
        "qcow2_opts": c["qcow2_opts"],
        "empty_rate": 0.0,
        "max_len": c["max_len"],
    }
    lines = run_writer(cfg, None, 0)
    assert lines[-1] == "END"
    with open(img, "rb") as f:
        hdr = f.read(64)
    reftable_offset = int.from_bytes(hdr[48:56], "big")
    reftable_clusters = int.from_bytes(hdr[56:60], "big")
    assert reftable_offset != c["cluster"] and reftable_clusters > 1, (
        "workload too small to grow the refcount table"
    )
    rc, _, text = qemu_check(img)
    assert rc == 0, text
