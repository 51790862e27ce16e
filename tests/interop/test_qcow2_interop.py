"""qcow2 interop: blockrep against real qemu-img / qemu-io (QEMU 7.2).

Differential tests: one scenario is run on both implementations and every image is
compared, byte for byte where QEMU's on-disk result is deterministic, otherwise by
content (``qemu-img compare``), metadata (``qemu-img check``) and block status
(``qemu-img map``).

The blockrep CLI costs ~0.2 s of interpreter start-up per call, so the bulk CLI
comparisons run many ``blockrep`` argument vectors in one Python process
(:func:`br_batch`, through the same ``blockrep.cli.main`` the console script calls);
a few tests call the console script itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockrep.block import Graph
from blockrep.block.qcow2 import create as qcow2_create

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
if not (QEMU_IMG and QEMU_IO):  # pragma: no cover - environment
    pytest.skip("qemu-img / qemu-io not installed", allow_module_level=True)

VENV_BIN = Path(sys.executable).parent
BLOCKREP = shutil.which("blockrep", path=str(VENV_BIN)) or shutil.which("blockrep")
TIMEOUT = 60
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# -- helpers ------------------------------------------------------------------------


def run(args: list[str], *, cwd: Path | str | None = None, ok: tuple[int, ...] | None = (0,), stdin: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, input=stdin
    )
    if ok is not None and p.returncode not in ok:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        )
    return p


def qimg(*args, cwd=None, ok=(0,)) -> subprocess.CompletedProcess:
    return run([QEMU_IMG, *args], cwd=cwd, ok=ok)


def qio(path: Path | str, cmds: list[str], fmt: str = "qcow2", cwd=None) -> None:
    args: list[str] = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = run([*args, str(path)], cwd=cwd)
    # qemu-io reports failed commands on stdout/stderr but exits 0
    bad = [ln for ln in (p.stdout + p.stderr).splitlines() if "failed" in ln or "error" in ln.lower()]
    assert not bad, f"qemu-io {cmds}: {bad}"


def br(*args, cwd=None, ok=(0,)) -> subprocess.CompletedProcess:
    """The installed ``blockrep`` console script."""
    assert BLOCKREP, "blockrep console script not installed in the venv"
    return run([BLOCKREP, *args], cwd=cwd, ok=ok)


_BATCH = r"""
import contextlib, io, json, os, sys
from blockrep.cli import main
res = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a crash is a result too
            rc = 'crash: %r' % (e,)
    res.append([rc, out.getvalue(), err.getvalue()])
sys.stdout.write(json.dumps(res))
"""


def br_batch(cmds: list[list[str]], cwd: Path | str | None = None) -> list[tuple[int, str, str]]:
    """Run many ``blockrep`` argument vectors in one interpreter: [(rc, stdout, stderr)]."""
    p = run([sys.executable, "-c", _BATCH], cwd=cwd, stdin=json.dumps([[str(a) for a in c] for c in cmds]))
    return [tuple(r) for r in json.loads(p.stdout)]


async def api_create(path: Path, size: int, **kw) -> None:
    path.write_bytes(b"")
    g = Graph()
    try:
        f = await g.add({"driver": "file", "filename": str(path)})
        await qcow2_create(f, size, **kw)
        await g.close_node(f)
    finally:
        await g.close_all()


@contextlib.asynccontextmanager
async def opened(path: Path, read_only: bool = False, fmt: str = "qcow2"):
    g = Graph()
    try:
        node = await g.add(
            {"driver": fmt, "read-only": read_only, "file": {"driver": "file", "filename": str(path)}}
        )
        yield node
    finally:
        await g.close_all()


async def br_read_all(path: Path) -> bytes:
    async with opened(path, read_only=True) as n:
        return await n.read(0, n.length)


def qemu_content(path: Path, tmp: Path, fmt: str = "qcow2") -> bytes:
    """What QEMU reads from an image (whole chain), via qemu-img convert -O raw."""
    out = tmp / f"qemu-view-{path.name}.raw"
    qimg("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_check_ok(path: Path) -> None:
    p = qimg("check", path, ok=None)
    assert p.returncode == 0, f"qemu-img check {path.name} exit {p.returncode}:\n{p.stdout}{p.stderr}"
    assert "No errors were found" in p.stdout


def first_diff(a: bytes, b: bytes) -> int:
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            for j in range(i, i + 4096):
                if a[j] != b[j]:
                    return j
    return min(len(a), len(b))


def assert_same_bytes(got: bytes, want: bytes, what: str) -> None:
    if got != want:
        raise AssertionError(
            f"{what}: lengths {len(got)} vs {len(want)}, first difference at byte {first_diff(got, want)}"
        )


def fill(pattern: int, n: int) -> bytes:
    return bytes([pattern]) * n


# -- 1. create: byte-identical files ------------------------------------------------------

CREATE_CASES: list[tuple[str, list[str], str | None]] = []
for _cs in ("512", "4096", "65536", "2M"):
    for _compat in ("0.10", "1.1"):
        for _size in ("64M", "1G"):
            CREATE_CASES.append((f"cs{_cs}-{_compat}-{_size}", ["-o", f"cluster_size={_cs},compat={_compat}"], _size))
CREATE_CASES += [
    ("default-64M", [], "64M"),
    ("default-3G", [], "3G"),
    ("default-1T", [], "1T"),
    ("zero-size", [], "0"),
    ("unaligned-size-1000000", [], "1000000"),
    ("tiny-size-1k", [], "1k"),
    ("refcount1", ["-o", "refcount_bits=1"], "64M"),
    ("refcount8", ["-o", "refcount_bits=8"], "64M"),
    ("refcount64", ["-o", "refcount_bits=64"], "1G"),
    ("refcount64-cs512", ["-o", "refcount_bits=64,cluster_size=512"], "1G"),
    ("lazy", ["-o", "lazy_refcounts=on"], "64M"),
    ("backing-raw", ["-b", "base.raw", "-F", "raw"], None),
    ("backing-raw-larger", ["-b", "base.raw", "-F", "raw"], "1G"),
    ("backing-qcow2", ["-b", "base.qcow2", "-F", "qcow2"], None),
    ("backing-qcow2-v2", ["-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10"], None),
    ("backing-qcow2-cs512", ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=512"], None),
    ("backing-qcow2-cs2M", ["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=2M"], "2G"),
    ("backing-opt-form", ["-o", "backing_file=base.raw,backing_fmt=raw"], None),
    ("backing-long-name-cs512", ["-b", "d" * 40 + "/../base.raw", "-F", "raw", "-o", "cluster_size=512"], None),
]


def test_create_byte_identical_cli(tmp_path: Path) -> None:
    qimg("create", "-q", "-f", "raw", tmp_path / "base.raw", "48M")
    qimg("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "80M")
    (tmp_path / ("d" * 40)).mkdir()
    cmds = []
    for name, opts, size in CREATE_CASES:
        tail = [size] if size else []
        qimg("create", "-q", "-f", "qcow2", *opts, f"q-{name}.qcow2", *tail, cwd=tmp_path)
        cmds.append(["img", "create", "-q", "-f", "qcow2", *opts, f"b-{name}.qcow2", *tail])
    results = br_batch(cmds, cwd=tmp_path)
    bad = []
    for (name, _, _), (rc, out, err) in zip(CREATE_CASES, results):
        if rc != 0:
            bad.append(f"{name}: blockrep exit {rc}: {err.strip()}")
            continue
        q = (tmp_path / f"q-{name}.qcow2").read_bytes()
        b = (tmp_path / f"b-{name}.qcow2").read_bytes()
        if q != b:
            bad.append(f"{name}: sizes {len(b)} vs qemu {len(q)}, first diff at {first_diff(b, q)}")
    assert not bad, "blockrep img create differs from qemu-img create:\n" + "\n".join(bad)
    # and blockrep's own fresh images are clean for qemu
    for name, _, _ in CREATE_CASES[:4]:
        qemu_check_ok(tmp_path / f"b-{name}.qcow2")


def test_create_console_script_and_messages(tmp_path: Path) -> None:
    """The real console script: same file, same 'Formatting ...' line as qemu-img."""
    qimg("create", "-q", "-f", "raw", tmp_path / "base.raw", "16M")
    for args in (["-o", "cluster_size=4096", "x.qcow2", "64M"], ["-b", "base.raw", "-F", "raw", "x.qcow2"]):
        q = qimg("create", "-f", "qcow2", *args, cwd=tmp_path)
        qbytes = (tmp_path / "x.qcow2").read_bytes()
        (tmp_path / "x.qcow2").unlink()
        b = br("img", "create", "-f", "qcow2", *args, cwd=tmp_path)
        assert b.stdout == q.stdout
        assert_same_bytes((tmp_path / "x.qcow2").read_bytes(), qbytes, f"create {args}")
        (tmp_path / "x.qcow2").unlink()


@pytest.mark.parametrize(
    "kw,qopts,size",
    [
        ({}, "", 64 * MiB),
        ({"cluster_size": 512}, "cluster_size=512", 64 * MiB),
        ({"cluster_size": 2 * MiB, "version": 2}, "cluster_size=2M,compat=0.10", GiB),
        ({"cluster_size": 4096, "refcount_bits": 64}, "cluster_size=4096,refcount_bits=64", GiB),
        ({"lazy_refcounts": True, "refcount_bits": 1}, "lazy_refcounts=on,refcount_bits=1", 64 * MiB),
    ],
)
async def test_create_byte_identical_api(tmp_path: Path, kw, qopts, size) -> None:
    q, b = tmp_path / "q.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", *(["-o", qopts] if qopts else []), q, str(size))
    await api_create(b, size, **kw)
    assert_same_bytes(b.read_bytes(), q.read_bytes(), f"api create {kw}")


async def test_create_api_backing_byte_identical(tmp_path: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "32M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "q.qcow2")
    await api_create(tmp_path / "b.qcow2", 32 * MiB, backing_file="base.qcow2", backing_format="qcow2")
    assert_same_bytes((tmp_path / "b.qcow2").read_bytes(), (tmp_path / "q.qcow2").read_bytes(), "backing")


# -- 2. make_empty -------------------------------------------------------------------


async def _fill_overlay(path: Path, size: int, cs: int, seed: int) -> None:
    rnd = random.Random(seed)
    async with opened(path) as n:
        for _ in range(25):
            off = rnd.randrange(0, size - 1)
            ln = min(size - off, rnd.randrange(1, 4 * cs + 1))
            await n.write(off, fill(rnd.randrange(1, 256), ln))
        await n.write_zeroes(0, min(size, 3 * cs), True)
        await n.write_zeroes(size // 2, min(size // 2, 2 * cs + 100), False)
        await n.discard(cs, min(size - cs, 2 * cs))
        await n.write(size - 10, b"tail-bytes")


async def _make_empty(path: Path) -> None:
    async with opened(path) as n:
        await n.make_empty()
        await n.flush()


MAKE_EMPTY_CASES = [
    # (cluster size, compat, size, backing fmt, refcount bits)
    (65536, "1.1", 64 * MiB, "raw", 16),
    (512, "1.1", 16 * MiB, "qcow2", 16),
    (4096, "1.1", 128 * MiB, "raw", 16),
    (2 * MiB, "1.1", 64 * MiB, "qcow2", 16),
    (65536, "1.1", 16 * MiB, None, 16),
    (4096, "1.1", 16 * MiB, "raw", 1),
    # the L1 table does not fit one refblock: QEMU's (and blockrep's) O(data) fallback
    (512, "1.1", 128 * MiB, "raw", 64),
    # v2 has no dirty bit: fallback too
    (65536, "0.10", 16 * MiB, "raw", 16),
    (4096, "0.10", 16 * MiB, "qcow2", 16),
]


@pytest.mark.parametrize("cs,compat,size,bfmt,rbits", MAKE_EMPTY_CASES)
async def test_make_empty_matches_qemu_commit(tmp_path: Path, cs, compat, size, bfmt, rbits) -> None:
    """blockrep make_empty == QEMU's bdrv_make_empty (run by ``qemu-img commit``) on the same file."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if bfmt:
        qimg("create", "-q", "-f", bfmt, a / f"base.{bfmt}", str(size))
        qio(a / f"base.{bfmt}", [f"write -P 0x5a {cs} {min(size // 2, 4 * MiB)}"], fmt=bfmt)
        shutil.copy(a / f"base.{bfmt}", b / f"base.{bfmt}")
    await api_create(
        a / "top.qcow2",
        size,
        cluster_size=cs,
        version=3 if compat == "1.1" else 2,
        backing_file=f"base.{bfmt}" if bfmt else None,
        backing_format=bfmt,
        refcount_bits=rbits,
    )
    fresh = (a / "top.qcow2").read_bytes()
    l1_entries = -(-size // (cs * (cs // 8)))
    l1_clusters = -(-l1_entries * 8 // cs)
    completely_empty = compat == "1.1" and 3 + l1_clusters <= cs * 8 // rbits
    await _fill_overlay(a / "top.qcow2", size, cs, seed=cs + size)
    if not completely_empty and l1_entries <= 64:
        # QEMU's fallback discards cluster by cluster and allocates every missing L2
        # table on the way; with all of them present the result is deterministic
        async with opened(a / "top.qcow2") as n:
            for i in range(l1_entries):
                await n.write(i * cs * (cs // 8) + cs // 2, b"L2")
    qemu_check_ok(a / "top.qcow2")
    before = (a / "top.qcow2").read_bytes()
    assert before != fresh
    shutil.copy(a / "top.qcow2", b / "top.qcow2")

    await _make_empty(a / "top.qcow2")
    got = (a / "top.qcow2").read_bytes()
    qemu_check_ok(a / "top.qcow2")
    if bfmt and (completely_empty or l1_entries <= 64):
        qimg("commit", "-q", b / "top.qcow2")  # QEMU empties the overlay after the commit
        assert_same_bytes(got, (b / "top.qcow2").read_bytes(), "make_empty vs qemu-img commit")
    if bfmt:
        # the emptied overlay reads as its (unchanged, for blockrep) base
        base = qemu_content(a / f"base.{bfmt}", tmp_path, fmt=bfmt)
        assert_same_bytes(await br_read_all(a / "top.qcow2"), base, "emptied overlay content")
        assert_same_bytes(qemu_content(a / "top.qcow2", tmp_path), base, "emptied overlay, read by qemu")
    else:
        assert not any(await br_read_all(a / "top.qcow2"))
    async with opened(a / "top.qcow2", read_only=True) as n:
        assert all(e.depth > 0 or not e.present for e in await n.block_status(0, size))
    if completely_empty:
        # QEMU's make_completely_empty: the fresh image, zero-extended to (3 + l1_clusters) clusters
        want = fresh + bytes((3 + l1_clusters) * cs - len(fresh))
        assert_same_bytes(got, want, "make_empty vs fresh create")
