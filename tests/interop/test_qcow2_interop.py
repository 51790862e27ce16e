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
from blockrep.qcow2.create import create_file

pytestmark = pytest.mark.interop

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
# interop tests are never skipped: `make test` installs the tools, and a run without
# them fails here instead of passing with nothing checked
assert QEMU_IMG and QEMU_IO, "qemu-img / qemu-io not installed; `make test` installs them"

VENV_BIN = Path(sys.executable).parent
BLOCKREP = shutil.which("blockrep", path=str(VENV_BIN)) or shutil.which("blockrep")
TIMEOUT = 60
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# -- helpers ------------------------------------------------------------------------


def run(
    args: list[str],
    *,
    cwd: Path | str | None = None,
    ok: tuple[int, ...] | None = (0,),
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        input=stdin,
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
    bad = [
        ln for ln in (p.stdout + p.stderr).splitlines() if "failed" in ln or "error" in ln.lower()
    ]
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
    p = run(
        [sys.executable, "-c", _BATCH],
        cwd=cwd,
        stdin=json.dumps([[str(a) for a in c] for c in cmds]),
    )
    return [tuple(r) for r in json.loads(p.stdout)]


async def api_create(path: Path, size: int, **kw) -> None:
    await create_file(str(path), size, **kw)


@contextlib.asynccontextmanager
async def opened(path: Path, read_only: bool = False, fmt: str = "qcow2"):
    g = Graph()
    try:
        node = await g.add(
            {
                "driver": fmt,
                "read-only": read_only,
                "file": {"driver": "file", "filename": str(path)},
            }
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
    assert p.returncode == 0, (
        f"qemu-img check {path.name} exit {p.returncode}:\n{p.stdout}{p.stderr}"
    )
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
            CREATE_CASES.append(
                (
                    f"cs{_cs}-{_compat}-{_size}",
                    ["-o", f"cluster_size={_cs},compat={_compat}"],
                    _size,
                )
            )
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
    (
        "backing-long-name-cs512",
        ["-b", "d" * 40 + "/../base.raw", "-F", "raw", "-o", "cluster_size=512"],
        None,
    ),
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
    for (name, _, _), (rc, _out, err) in zip(CREATE_CASES, results, strict=True):
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
    for args in (
        ["-o", "cluster_size=4096", "x.qcow2", "64M"],
        ["-b", "base.raw", "-F", "raw", "x.qcow2"],
    ):
        q = qimg("create", "-f", "qcow2", *args, cwd=tmp_path)
        qbytes = (tmp_path / "x.qcow2").read_bytes()
        (tmp_path / "x.qcow2").unlink()
        b = br("img", "create", "-f", "qcow2", *args, cwd=tmp_path)
        assert b.stdout == q.stdout
        assert_same_bytes((tmp_path / "x.qcow2").read_bytes(), qbytes, f"create {args}")
        (tmp_path / "x.qcow2").unlink()
    # raw: QEMU rounds the size up to whole sectors
    qimg("create", "-q", "-f", "raw", tmp_path / "q.raw", "1000000")
    br("img", "create", "-q", "-f", "raw", tmp_path / "b.raw", "1000000")
    assert (tmp_path / "b.raw").stat().st_size == (tmp_path / "q.raw").stat().st_size == 1000448


@pytest.mark.parametrize(
    "kw,qopts,size",
    [
        ({}, "", 64 * MiB),
        ({"cluster_size": 512}, "cluster_size=512", 64 * MiB),
        ({"cluster_size": 2 * MiB, "version": 2}, "cluster_size=2M,compat=0.10", GiB),
        ({"cluster_size": 4096, "refcount_bits": 64}, "cluster_size=4096,refcount_bits=64", GiB),
        (
            {"lazy_refcounts": True, "refcount_bits": 1},
            "lazy_refcounts=on,refcount_bits=1",
            64 * MiB,
        ),
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
    await api_create(
        tmp_path / "b.qcow2", 32 * MiB, backing_file="base.qcow2", backing_format="qcow2"
    )
    assert_same_bytes(
        (tmp_path / "b.qcow2").read_bytes(), (tmp_path / "q.qcow2").read_bytes(), "backing"
    )


# -- 2. make_empty -------------------------------------------------------------------


async def _fill_overlay(path: Path, size: int, cs: int, seed: int) -> None:
    rnd = random.Random(seed)
    async with opened(path) as n:
        for _ in range(15):
            off = rnd.randrange(0, size - 1)
            ln = min(size - off, rnd.randrange(1, 2 * cs + 1), 1 * MiB)
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
    (4096, "1.1", 64 * MiB, "raw", 16),
    (2 * MiB, "1.1", 32 * MiB, "qcow2", 16),
    (65536, "1.1", 16 * MiB, None, 16),
    (4096, "1.1", 16 * MiB, "raw", 1),
    # the L1 table does not fit one refblock: QEMU's (and blockrep's) O(data) fallback
    (512, "1.1", 128 * MiB, "raw", 64),
    # v2 has no dirty bit: fallback too
    (65536, "0.10", 16 * MiB, "raw", 16),
    (4096, "0.10", 16 * MiB, "qcow2", 16),
]


@pytest.mark.parametrize("cs,compat,size,bfmt,rbits", MAKE_EMPTY_CASES)
async def test_make_empty_matches_qemu_commit(
    tmp_path: Path, cs, compat, size, bfmt, rbits
) -> None:
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
        assert_same_bytes(
            qemu_content(a / "top.qcow2", tmp_path), base, "emptied overlay, read by qemu"
        )
    else:
        assert not any(await br_read_all(a / "top.qcow2"))
    async with opened(a / "top.qcow2", read_only=True) as n:
        assert all(e.depth > 0 or not e.present for e in await n.block_status(0, size))
    if completely_empty:
        # QEMU's make_completely_empty: the fresh image, zero-extended to (3 + l1_clusters) clusters
        want = fresh + bytes((3 + l1_clusters) * cs - len(fresh))
        assert_same_bytes(got, want, "make_empty vs fresh create")


async def test_make_empty_after_refcount_table_grew(tmp_path: Path) -> None:
    """QEMU's make_completely_empty also applies when the refcount table was moved and
    grown (9 MiB of 512-byte clusters need more refblocks than one reftable cluster
    holds): the result is still the fresh image, relocated tables included."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        qimg("create", "-q", "-f", "raw", d / "base.raw", "16M")
    await api_create(
        a / "top.qcow2", 16 * MiB, cluster_size=512, backing_file="base.raw", backing_format="raw"
    )
    fresh = (a / "top.qcow2").read_bytes()
    async with opened(a / "top.qcow2") as n:
        for i in range(9):
            await n.write(i * MiB, fill(i + 1, MiB))
    assert _header(a / "top.qcow2")["rt_offset"] != 512, "premise: the reftable moved"
    qemu_check_ok(a / "top.qcow2")
    shutil.copy(a / "top.qcow2", b / "top.qcow2")
    await _make_empty(a / "top.qcow2")
    qimg("commit", "-q", b / "top.qcow2")
    qemu_check_ok(a / "top.qcow2")
    assert not any(await br_read_all(a / "top.qcow2"))
    want = (b / "top.qcow2").read_bytes()
    assert_same_bytes(
        want, fresh + bytes(11 * 512 - len(fresh)), "premise: QEMU's result is the fresh image"
    )
    assert_same_bytes((a / "top.qcow2").read_bytes(), want, "make_empty vs qemu-img commit")


# -- 3. images made and written by QEMU, read by blockrep ----------------------------------


class Model:
    """What a qcow2 image reads as, following QEMU's semantics of each qemu-io command."""

    def __init__(
        self, size: int, cs: int, v3: bool, backing: bytes | None, qemu: bool = False
    ) -> None:
        self.size, self.cs, self.v3 = size, cs, v3
        self.has_backing = backing is not None
        # QEMU 7.2 ignores discard on a v2 image with a backing file (qcow2_co_pdiscard
        # returns -ENOTSUP: the backing data must not reappear); blockrep discards
        self.v2_backing_discard_ignored = qemu and not v3 and self.has_backing
        self.backing = bytearray(size)
        if backing is not None:
            n = min(size, len(backing))
            self.backing[:n] = backing[:n]
        self.data = bytearray(self.backing)

    def write(self, off: int, data: bytes) -> None:
        self.data[off : off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        self.data[off : off + n] = bytes(n)

    def discard(self, off: int, n: int) -> None:
        """Whole clusters only (the image end counts as a cluster boundary)."""
        if self.v2_backing_discard_ignored:
            return
        cs, end = self.cs, off + n
        first = -(-off // cs) * cs
        last = end // cs * cs
        if end == self.size:
            last = end
        for c in range(first, last, cs):
            stop = min(c + cs, self.size)
            # v3 discard leaves a zero cluster; v2 drops the mapping (backing shows through)
            self.data[c:stop] = bytes(stop - c) if self.v3 else self.backing[c:stop]

    def make_empty(self) -> None:
        self.data = bytearray(self.backing)


def qemu_io_script(cs: int, size: int) -> list[tuple]:
    """qemu-io operations: unaligned, across cluster boundaries, zero, discard, compressed."""
    return [
        ("write", 0x11, 100, 2 * cs + 300),
        ("write", 0x22, 3 * cs - 1000, 3000),
        ("zero", 4 * cs + 512, 2 * cs),  # partial clusters at both ends
        ("zero-unmap", 8 * cs, 2 * cs),
        ("write", 0x66, 8 * cs + cs // 2, 700),  # into a zero cluster
        ("discard", 50, 2 * cs),  # only cluster 1 is whole
        ("write-compressed", 0x33, 10 * cs, 2 * cs),
        ("write", 0x44, size - 700, 700),
        ("discard", 11 * cs, cs),  # half of the compressed run
        ("write", 0x55, 12 * cs + 7, 1),
        ("zero-unmap", 13 * cs, cs + 4096),
        ("write", 0x77, 10 * cs + 100, 10),  # COW of a compressed cluster
        ("discard", size - 2 * cs, 2 * cs),
        ("write", 0x88, size - cs - 10, 20),
    ]


def apply_qemu_io(path: Path, script: list[tuple], model: Model, fmt: str = "qcow2") -> None:
    cmds = []
    for op in script:
        kind = op[0]
        if kind == "write":
            _, pat, off, n = op
            cmds.append(f"write -P {pat:#x} {off} {n}")
            model.write(off, fill(pat, n))
        elif kind == "write-compressed":
            _, pat, off, n = op
            cmds.append(f"write -c -P {pat:#x} {off} {n}")
            model.write(off, fill(pat, n))
        elif kind in ("zero", "zero-unmap"):
            _, off, n = op
            cmds.append(f"write -z {'-u ' if kind == 'zero-unmap' else ''}{off} {n}")
            model.zero(off, n)
        elif kind == "discard":
            _, off, n = op
            cmds.append(f"discard {off} {n}")
            model.discard(off, n)
        else:  # pragma: no cover
            raise ValueError(kind)
    qio(path, cmds, fmt=fmt)


def make_qemu_chain(
    tmp: Path, depth: int, bottom: str, cs: int, compat: str, size: int
) -> tuple[Path, Model]:
    """A chain written entirely by QEMU: bottom (raw or qcow2) <- ... <- top; depth = images."""
    v3 = compat == "1.1"
    if depth == 1:
        top = tmp / "top.qcow2"
        qimg(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cs},compat={compat}",
            top,
            str(size),
        )
        model = Model(size, cs, v3, None, qemu=True)
        apply_qemu_io(top, qemu_io_script(cs, size), model)
        return top, model
    # bottom: a pattern over the first two thirds, so reads through it see both
    bottom_path = tmp / f"l0.{bottom}"
    qimg("create", "-q", "-f", bottom, bottom_path, str(size))
    content = bytearray(size)
    qio(
        bottom_path,
        [f"write -P 0xb0 0 {size * 2 // 3}", f"write -P 0xb1 {cs + 3} 5000"],
        fmt=bottom,
    )
    content[: size * 2 // 3] = fill(0xB0, size * 2 // 3)
    content[cs + 3 : cs + 5003] = fill(0xB1, 5000)
    prev, prev_fmt = bottom_path, bottom
    for level in range(1, depth):
        path = tmp / f"l{level}.qcow2"
        qimg(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cs},compat={compat}",
            "-b",
            prev.name,
            "-F",
            prev_fmt,
            path,
            str(size),
        )
        model = Model(size, cs, v3, bytes(content), qemu=True)
        if level == depth - 1:
            apply_qemu_io(path, qemu_io_script(cs, size), model)
        else:
            apply_qemu_io(
                path,
                [
                    ("write", 0xC0 + level, 5 * cs + 11, 3 * cs),
                    ("discard", 0, 2 * cs),
                    ("zero", 9 * cs, cs),
                ],
                model,
            )
        content = model.data
        prev, prev_fmt = path, "qcow2"
    return prev, model


QEMU_WRITTEN = [
    # (depth, bottom, cluster size, compat)
    (1, None, 4096, "1.1"),
    (1, None, 65536, "1.1"),
    (1, None, 2 * MiB, "1.1"),
    (1, None, 4096, "0.10"),
    (1, None, 65536, "0.10"),
    (2, "raw", 65536, "1.1"),
    (2, "qcow2", 4096, "1.1"),
    (2, "raw", 65536, "0.10"),
    (2, "qcow2", 2 * MiB, "0.10"),
    (3, "raw", 4096, "1.1"),
    (3, "qcow2", 65536, "1.1"),
    (3, "qcow2", 65536, "0.10"),
]


def _size_for(cs: int) -> int:
    return max(4 * MiB, 16 * cs) + 512 * 3 if cs < MiB else 16 * cs


@pytest.mark.parametrize("depth,bottom,cs,compat", QEMU_WRITTEN)
async def test_qemu_written_images_read_in_blockrep(
    tmp_path: Path, depth, bottom, cs, compat
) -> None:
    size = _size_for(cs)
    top, model = make_qemu_chain(tmp_path, depth, bottom or "qcow2", cs, compat, size)
    truth = qemu_content(top, tmp_path)
    assert_same_bytes(bytes(model.data), truth, "test model vs QEMU's own reading")
    got = await br_read_all(top)
    assert_same_bytes(got, truth, "blockrep read of a qemu-written image")
    # unaligned reads straddling clusters agree too
    async with opened(top, read_only=True) as n:
        for off, ln in ((cs - 1, 2), (3 * cs - 1001, 3002), (10 * cs + 95, cs), (size - 701, 701)):
            assert await n.read(off, ln) == truth[off : off + ln], (off, ln)
    # blockrep opened the image read/write-capable and closed it: still clean and unchanged
    before = top.read_bytes()
    async with opened(top) as n:
        assert n.length == size
    assert top.read_bytes() == before
    qemu_check_ok(top)


# -- 4/5. map, info and check agree with qemu-img -------------------------------------------


def build_image_zoo(tmp: Path) -> list[Path]:
    """Images in many states, all made by QEMU, in subdirectories of ``tmp``."""
    imgs: list[Path] = []

    def sub(name: str) -> Path:
        d = tmp / name
        d.mkdir()
        return d

    for cs, compat, size in (
        (65536, "1.1", "64M"),
        (512, "1.1", "3M"),
        (2 * MiB, "0.10", "1G"),
        (4096, "0.10", "5000k"),
    ):
        d = sub(f"fresh-{cs}-{compat}")
        qimg(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cs},compat={compat}",
            d / "f.qcow2",
            size,
        )
        imgs.append(d / "f.qcow2")
    d = sub("fresh-over-raw")
    qimg("create", "-q", "-f", "raw", d / "b.raw", "8M")
    qio(d / "b.raw", ["write -P 1 1M 1M", "write -P 2 5M 4097"], fmt="raw")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", d / "t.qcow2", "12M")
    imgs.append(d / "t.qcow2")
    for depth, bottom, cs, compat in QEMU_WRITTEN:
        d = sub(f"w{depth}-{bottom}-{cs}-{compat}")
        top, _ = make_qemu_chain(d, depth, bottom or "qcow2", cs, compat, _size_for(cs))
        imgs.append(top)
    d = sub("compressed")
    qimg("create", "-q", "-f", "raw", d / "src.raw", "4M")
    qio(
        d / "src.raw",
        ["write -P 0x41 0 1M", "write -P 0x42 2M 100k", f"write -P 0 {3 * MiB} 64k"],
        fmt="raw",
    )
    qimg("convert", "-c", "-O", "qcow2", d / "src.raw", d / "c.qcow2")
    imgs.append(d / "c.qcow2")
    d = sub("compressed-v2-overlay")
    qimg(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4096",
        tmp / "compressed" / "src.raw",
        d / "c.qcow2",
    )
    qimg("create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", d / "t.qcow2")
    qio(d / "t.qcow2", ["write -P 9 100k 300k", "write -z 2M 64k"])
    imgs.append(d / "t.qcow2")
    d = sub("zeroes")
    qimg("create", "-q", "-f", "qcow2", d / "z.qcow2", "8M")
    qio(
        d / "z.qcow2",
        [
            "write -P 1 0 4M",
            "write -z 0 1M",
            "write -z -u 1M 1M",
            "discard 2M 1M",
            "write -z 6M 1M",
            "write -z -u 7M 64k",
        ],
    )
    imgs.append(d / "z.qcow2")
    return imgs


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("zoo")
    return root, build_image_zoo(root)


def _map_cmds(img: Path) -> list[list[str]]:
    return [
        ["map", "--output", "json", str(img)],
        ["map", "--output", "json", "--start-offset", "65536", "--max-length", "3000000", str(img)],
    ]


def test_map_agrees_with_qemu_img(image_zoo) -> None:
    tmp_path, imgs = image_zoo
    jobs = [(img, c) for img in imgs for c in _map_cmds(img)]
    results = br_batch([["img", *c] for _, c in jobs], cwd=tmp_path)
    bad = []
    for (img, c), (rc, out, err) in zip(jobs, results, strict=True):
        q = qimg(*c, cwd=tmp_path)
        name = f"{img.relative_to(tmp_path)} {' '.join(c[:-1])}"
        if rc != 0:
            bad.append(f"{name}: blockrep exit {rc}: {err.strip()}")
            continue
        try:
            got = json.loads(out)
        except ValueError:
            bad.append(f"{name}: blockrep printed no JSON: {out[:200]!r}")
            continue
        want = json.loads(q.stdout)
        if got != want:
            diff = next(
                (i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                min(len(got), len(want)),
            )
            bad.append(
                f"{name}: first difference at extent {diff}: blockrep "
                f"{got[diff] if diff < len(got) else None} vs qemu {want[diff] if diff < len(want) else None}"
            )
    assert not bad, "blockrep img map differs from qemu-img map:\n" + "\n".join(bad)


def test_map_human_output_console_script(tmp_path: Path) -> None:
    d = tmp_path
    qimg("create", "-q", "-f", "raw", d / "b.raw", "8M")
    qio(d / "b.raw", ["write -P 1 1M 1M"], fmt="raw")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", d / "t.qcow2")
    qio(d / "t.qcow2", ["write -P 2 0 100k", "write -z 1M 64k", "write -P 3 7M 1"])
    for args in (["map", "t.qcow2"], ["map", "--output=json", "t.qcow2"]):
        q = qimg(*args, cwd=d)
        b = br("img", *args, cwd=d)
        assert b.stdout == q.stdout, args


def _info_cmds(img: Path) -> list[list[str]]:
    return [
        ["info", "--output", "json", str(img)],
        ["info", "--output", "json", "--backing-chain", str(img)],
        ["info", str(img)],
        ["check", "--output", "json", str(img)],
        ["check", str(img)],
    ]


def test_info_and_check_agree_with_qemu_img(image_zoo) -> None:
    tmp_path, imgs = image_zoo
    jobs = [(img, c) for img in imgs for c in _info_cmds(img)]
    results = br_batch([["img", *c] for _, c in jobs], cwd=tmp_path)
    bad = []
    for (img, c), (rc, out, err) in zip(jobs, results, strict=True):
        q = qimg(*c, cwd=tmp_path, ok=None)
        name = f"{img.relative_to(tmp_path)} {' '.join(c[:-1])}"
        if rc != q.returncode:
            bad.append(f"{name}: blockrep exit {rc} vs qemu-img {q.returncode}: {err.strip()}")
            continue
        if "json" in c:
            try:
                got, want = json.loads(out), json.loads(q.stdout)
            except ValueError:
                bad.append(f"{name}: output is not JSON: {out[:200]!r}")
                continue
        else:
            got, want = out, q.stdout
        if got != want:
            bad.append(f"{name}:\n  blockrep: {got}\n  qemu-img: {want}")
    assert not bad, "blockrep img info/check differ from qemu-img:\n" + "\n".join(bad)


def _header(path: Path) -> dict[str, int]:
    b = path.read_bytes()[:104]
    f = struct.unpack(">4sIQIIQIIQQIIQ", b[:72])
    return {
        "cluster_bits": f[4],
        "l1_size": f[7],
        "l1_offset": f[8],
        "rt_offset": f[9],
        "refcount_order": struct.unpack(">I", b[96:100])[0] if f[1] >= 3 else 4,
    }


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    h = _header(path)
    cs = 1 << h["cluster_bits"]
    bits = 1 << h["refcount_order"]
    assert bits == 16, "test images use 16-bit refcounts"
    per_block = cs * 8 // bits
    with open(path, "rb") as fh:
        fh.seek(h["rt_offset"] + 8 * (cluster // per_block))
        block = struct.unpack(">Q", fh.read(8))[0]
    assert block, "no refcount block for that cluster"
    _poke(path, block + 2 * (cluster % per_block), struct.pack(">H", value))


def _data_offsets(path: Path) -> list[int]:
    m = json.loads(qimg("map", "--output", "json", path).stdout)
    return [e["offset"] for e in m if e["data"] and e["depth"] == 0 and "offset" in e]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_check_leaks_and_corruption_like_qemu(tmp_path: Path, compat: str) -> None:
    src = tmp_path / "src.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size=4096,compat={compat}", src, "64M")
    qio(src, ["write -P 1 0 40k", "write -P 2 9M 8k", "write -P 3 40M 4k"])
    cs = 4096
    cases: dict[str, Path] = {}

    def variant(name: str) -> Path:
        p = tmp_path / f"{name}.qcow2"
        shutil.copy(src, p)
        cases[name] = p
        return p

    variant("clean")
    # leaks: the first L1 entry dropped, its L2 table and data clusters stay refcounted
    p = variant("leak-l1")
    _poke(p, _header(p)["l1_offset"], bytes(8))
    # leak: a free cluster past the data gets a refcount
    p = variant("leak-free-cluster")
    with open(p, "ab") as fh:
        fh.write(bytes(cs))
    _set_refcount(p, p.stat().st_size // cs - 1, 1)
    # corruption: a data cluster in use with refcount 0
    p = variant("corrupt-rc0")
    _set_refcount(p, _data_offsets(p)[0] // cs, 0)
    # corruption + leak: refcount 2 on a cluster mapped once with OFLAG_COPIED
    p = variant("corrupt-rc2")
    _set_refcount(p, _data_offsets(p)[-1] // cs, 2)
    # corruption: the L1 table's own refcount dropped
    p = variant("corrupt-l1-rc0")
    _set_refcount(p, _header(p)["l1_offset"] // cs, 0)

    names = list(cases)
    cmds = []
    for n in names:
        cmds += [["img", "check", "--output", "json", f"{n}.qcow2"], ["img", "check", f"{n}.qcow2"]]
    results = br_batch(cmds, cwd=tmp_path)
    expected_rc = {
        "clean": 0,
        "leak-l1": 3,
        "leak-free-cluster": 3,
        "corrupt-rc0": 2,
        "corrupt-rc2": 2,
        "corrupt-l1-rc0": 2,
    }
    bad = []
    for i, n in enumerate(names):
        for j, c in enumerate((["check", "--output", "json"], ["check"])):
            rc, out, err = results[2 * i + j]
            q = qimg(*c, f"{n}.qcow2", cwd=tmp_path, ok=None)
            if q.returncode != expected_rc[n]:
                bad.append(f"{n}: the test's premise is wrong, qemu-img check exits {q.returncode}")
            if rc != q.returncode:
                bad.append(
                    f"{n} {c}: blockrep exit {rc} vs qemu-img {q.returncode}: {err.strip()[:300]}"
                )
            elif "--output" in c and json.loads(out) != json.loads(q.stdout):
                bad.append(f"{n} {c}:\n  blockrep {out}\n  qemu-img {q.stdout}")
            elif "--output" not in c and out != q.stdout:
                bad.append(f"{n} {c}:\n  blockrep {out!r}\n  qemu-img {q.stdout!r}")
    assert not bad, "\n".join(bad)

    # repair: both fix the leaks, and the repaired images are clean for qemu
    for n in ("leak-l1", "leak-free-cluster"):
        mine, theirs = tmp_path / f"{n}.mine.qcow2", tmp_path / f"{n}.theirs.qcow2"
        shutil.copy(cases[n], mine)
        shutil.copy(cases[n], theirs)
        q = qimg("check", "-r", "leaks", "--output", "json", theirs.name, cwd=tmp_path, ok=None)
        b = br("img", "check", "-r", "leaks", "--output", "json", mine.name, cwd=tmp_path, ok=None)
        assert b.returncode == q.returncode == 0, (b.returncode, q.returncode, b.stderr)
        bj, qj = json.loads(b.stdout), json.loads(q.stdout)
        bj.pop("filename"), qj.pop("filename")
        assert bj == qj
        qemu_check_ok(mine)
        assert_same_bytes(
            qemu_content(mine, tmp_path), qemu_content(theirs, tmp_path), f"{n} repaired content"
        )


# -- 6. compare and convert ------------------------------------------------------------


def test_compare_and_convert_agree_with_qemu_img(tmp_path: Path) -> None:
    d = tmp_path
    qimg("create", "-q", "-f", "raw", d / "base.raw", "8M")
    qio(d / "base.raw", ["write -P 0x10 0 3M"], fmt="raw")
    qimg(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.raw",
        "-F",
        "raw",
        d / "mid.qcow2",
    )
    qio(d / "mid.qcow2", ["write -P 0x20 1M 100k", "write -z 2M 64k", "write -c -P 0x21 5M 64k"])
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    qio(d / "top.qcow2", ["write -P 0x30 100 5000", "discard 6M 1M", "write -P 0x31 8388000 192"])
    qimg("convert", "-O", "raw", d / "top.qcow2", d / "same.raw")
    shutil.copy(d / "same.raw", d / "diff.raw")
    _poke(d / "diff.raw", 4 * MiB + 1234, b"X")
    shutil.copy(d / "same.raw", d / "bigger.raw")
    os.truncate(d / "bigger.raw", 9 * MiB)
    shutil.copy(d / "same.raw", d / "bigger-dirty.raw")
    with open(d / "bigger-dirty.raw", "ab") as fh:
        fh.write(bytes(4096) + b"Z" + bytes(4095))
    qimg("create", "-q", "-f", "qcow2", d / "empty.qcow2", "8M")

    compares = [
        ["compare", "top.qcow2", "same.raw"],
        ["compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "same.raw"],
        ["compare", "top.qcow2", "diff.raw"],
        ["compare", "top.qcow2", "mid.qcow2"],
        ["compare", "top.qcow2", "bigger-dirty.raw"],
        ["compare", "-s", "top.qcow2", "bigger-dirty.raw"],
        ["compare", "empty.qcow2", "top.qcow2"],
        ["compare", "-q", "top.qcow2", "diff.raw"],
        ["compare", "top.qcow2", "missing.qcow2"],
        ["compare", "top.qcow2", "bigger.raw"],
        ["compare", "-s", "top.qcow2", "bigger.raw"],
    ]
    converts = [
        ["convert", "-O", "raw", "top.qcow2", "b-out.raw"],
        ["convert", "-f", "qcow2", "-O", "qcow2", "top.qcow2", "b-out.qcow2"],
        ["convert", "-O", "qcow2", "-o", "cluster_size=512", "mid.qcow2", "b-mid512.qcow2"],
        ["convert", "-O", "qcow2", "-o", "compat=0.10", "top.qcow2", "b-outv2.qcow2"],
    ]
    results = br_batch([["img", *c] for c in compares + converts], cwd=d)
    bad = []
    for c, (rc, out, err) in zip(compares, results[: len(compares)], strict=True):
        q = qimg(*c, cwd=d, ok=None)
        if rc != q.returncode or out != q.stdout:
            bad.append(
                f"{c}: blockrep ({rc}, {out!r}, {err.strip()!r}) vs qemu-img ({q.returncode}, {q.stdout!r}, {q.stderr.strip()!r})"
            )
    for c, (rc, _out, err) in zip(converts, results[len(compares) :], strict=True):
        if rc != 0:
            bad.append(f"{c}: blockrep exit {rc}: {err}")
            continue
        dst, src = d / c[-1], d / c[-2]
        if dst.suffix == ".qcow2":
            p = qimg("check", dst, ok=None)
            if p.returncode != 0:
                bad.append(f"{c}: qemu-img check exit {p.returncode}: {p.stdout}")
            if (
                "compat=0.10" in c
                and json.loads(qimg("info", "--output", "json", dst).stdout)["format-specific"][
                    "data"
                ]["compat"]
                != "0.10"
            ):
                bad.append(f"{c}: not a v2 image")
            if (
                "cluster_size=512" in c
                and json.loads(qimg("info", "--output", "json", dst).stdout)["cluster-size"] != 512
            ):
                bad.append(f"{c}: cluster size not honoured")
        p = qimg("compare", src, dst, ok=None)
        if p.returncode != 0:
            bad.append(f"{c}: qemu-img compare: {p.stdout}")
    assert not bad, "\n".join(bad)
    # the converted qcow2 keeps no backing file and zero areas stay unallocated
    info = json.loads(qimg("info", "--output", "json", d / "b-out.qcow2").stdout)
    assert "backing-filename" not in info
    assert (d / "b-out.qcow2").stat().st_size < 8 * MiB


def test_compare_console_script_exit_codes(tmp_path: Path) -> None:
    qimg("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    qimg("create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    assert (
        br("img", "compare", "a.qcow2", "b.qcow2", cwd=tmp_path).stdout == "Images are identical.\n"
    )
    qio(tmp_path / "b.qcow2", ["write -P 7 512k 1"])
    p = br("img", "compare", "a.qcow2", "b.qcow2", cwd=tmp_path, ok=(1,))
    assert p.stdout == qimg("compare", "a.qcow2", "b.qcow2", cwd=tmp_path, ok=(1,)).stdout


# -- 7. random sequences through the Python API, judged by QEMU --------------------------------


async def _random_ops(node, model: Model, rnd: random.Random, count: int, path: Path) -> object:
    size, cs = model.size, model.cs
    for _ in range(count):
        op = rnd.choice(
            [
                "write",
                "write",
                "write",
                "zero",
                "zero",
                "discard",
                "discard",
                "read",
                "reopen",
                "empty",
            ]
        )
        if rnd.random() < 0.5:  # aligned-ish to clusters, else anywhere
            off = rnd.randrange(0, max(1, size // cs)) * cs
            n = rnd.randrange(1, 4) * cs
        else:
            off = rnd.randrange(0, size)
            n = rnd.randrange(1, min(3 * cs, 300 * KiB) + 2)
        n = max(1, min(n, size - off))
        if op == "write":
            data = rnd.randbytes(min(n, 512)) * (-(-n // 512))
            await node.write(off, data[:n])
            model.write(off, data[:n])
        elif op == "zero":
            await node.write_zeroes(off, n, rnd.random() < 0.5)
            model.zero(off, n)
        elif op == "discard":
            await node.discard(off, n)
            model.discard(off, n)
        elif op == "read":
            assert await node.read(off, n) == bytes(model.data[off : off + n]), (off, n)
        elif op == "empty" and rnd.random() < 0.3:
            await node.make_empty()
            model.make_empty()
        elif op == "reopen":
            g = node._interop_graph  # type: ignore[attr-defined]
            await g.close_all()
            node = await _open_rw(path)
    return node


async def _open_rw(path: Path):
    g = Graph()
    node = await g.add({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}})
    node._interop_graph = g  # type: ignore[attr-defined]
    return node


RANDOM_CHAINS = [
    # seed, [(fmt, cluster size, version, size)] bottom first
    (1, [("qcow2", 65536, 3, 3 * MiB)]),
    (2, [("qcow2", 512, 3, 1 * MiB)]),
    (3, [("qcow2", 4096, 2, 2 * MiB + 4096)]),
    (4, [("raw", 0, 0, 2 * MiB), ("qcow2", 65536, 3, 2 * MiB + 512)]),
    (5, [("raw", 0, 0, 1 * MiB), ("qcow2", 4096, 2, 2 * MiB)]),
    (6, [("qcow2", 4096, 3, 2 * MiB), ("qcow2", 512, 3, 2 * MiB), ("qcow2", 65536, 3, 3 * MiB)]),
    (7, [("raw", 0, 0, 3 * MiB), ("qcow2", 65536, 2, 3 * MiB), ("qcow2", 4096, 3, 3 * MiB)]),
    (8, [("qcow2", 2 * MiB, 3, 4 * MiB), ("qcow2", 65536, 3, 4 * MiB)]),
    (9, [("qcow2", 65536, 3, 2 * MiB), ("qcow2", 4096, 2, 2 * MiB), ("qcow2", 512, 2, 2 * MiB)]),
    (10, [("qcow2", 4096, 3, 2 * MiB)]),
    (11, [("raw", 0, 0, 2 * MiB), ("qcow2", 512, 3, 2 * MiB)]),
    (12, [("qcow2", 65536, 3, 1 * MiB), ("qcow2", 65536, 3, 2 * MiB)]),
]
# seed -> {layer index: refcount bits}; refcount_bits=1 makes every shared cluster a COW
RANDOM_REFCOUNT_BITS = {10: {0: 1}, 11: {1: 64}, 12: {0: 8, 1: 2}}


@pytest.mark.parametrize(
    "seed,layers", RANDOM_CHAINS, ids=[f"seed{s}-depth{len(lay)}" for s, lay in RANDOM_CHAINS]
)
async def test_random_blockrep_writes_judged_by_qemu(tmp_path: Path, seed: int, layers) -> None:
    rnd = random.Random(seed)
    rbits = RANDOM_REFCOUNT_BITS.get(seed, {})
    content: bytes | None = None
    prev: tuple[str, str] | None = None
    written: list[Path] = []
    for i, (fmt, cs, version, size) in enumerate(layers):
        path = tmp_path / f"l{i}.{fmt}"
        if fmt == "raw":
            path.write_bytes(b"")
            os.truncate(path, size)
            data = bytearray(size)
            for _ in range(8):
                off, n = rnd.randrange(size), rnd.randrange(1, 200 * KiB)
                n = min(n, size - off)
                data[off : off + n] = fill(rnd.randrange(1, 256), n)
            path.write_bytes(data)
            content = bytes(data)
        else:
            await api_create(
                path,
                size,
                cluster_size=cs,
                version=version,
                refcount_bits=rbits.get(i, 16),
                backing_file=prev[0] if prev else None,
                backing_format=prev[1] if prev else None,
            )
            model = Model(size, cs, version >= 3, content)
            node = await _open_rw(path)
            try:
                node = await _random_ops(node, model, rnd, 40, path)
            finally:
                await node._interop_graph.close_all()
            written.append(path)
            content = bytes(model.data)
            # blockrep's reading, QEMU's reading and the model agree layer by layer
            assert_same_bytes(await br_read_all(path), content, f"blockrep read of {path.name}")
        prev = (path.name, fmt)
    top = tmp_path / f"l{len(layers) - 1}.qcow2"
    (tmp_path / "model.raw").write_bytes(content)
    for p in written:
        qemu_check_ok(p)
    cmp = qimg("compare", "-f", "raw", "-F", "qcow2", tmp_path / "model.raw", top, ok=None)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert_same_bytes(qemu_content(top, tmp_path), content, "QEMU's reading vs model")
    # and on these blockrep-written images the two maps agree too
    results = br_batch([["img", "map", "--output", "json", p.name] for p in written], cwd=tmp_path)
    for p, (rc, out, err) in zip(written, results, strict=True):
        assert rc == 0, err
        assert json.loads(out) == json.loads(
            qimg("map", "--output", "json", p.name, cwd=tmp_path).stdout
        ), p.name


@pytest.mark.parametrize(
    "depth,bottom,cs,compat", QEMU_WRITTEN[::2] + [QEMU_WRITTEN[3], QEMU_WRITTEN[7]]
)
async def test_blockrep_writes_into_qemu_written_images(
    tmp_path: Path, depth, bottom, cs, compat
) -> None:
    """Images QEMU wrote (compressed, zero and discarded clusters, v2 and v3) written on by
    blockrep, then judged by QEMU; then written on by QEMU again and read by blockrep."""
    size = _size_for(cs)
    top, qmodel = make_qemu_chain(tmp_path, depth, bottom or "qcow2", cs, compat, size)
    model = Model(size, cs, compat == "1.1", bytes(qmodel.backing) if depth > 1 else None)
    model.data = bytearray(qmodel.data)
    rnd = random.Random(cs + depth)
    node = await _open_rw(top)
    try:
        # hit the compressed clusters, the zero clusters and the tail explicitly
        for off, n in ((10 * cs + 5, 10), (11 * cs - 3, 6), (8 * cs + 1, cs), (size - 1, 1)):
            await node.write(off, b"\xee" * n)
            model.write(off, b"\xee" * n)
        await node.discard(4 * cs, 2 * cs)
        model.discard(4 * cs, 2 * cs)
        node = await _random_ops(node, model, rnd, 30, top)
    finally:
        await node._interop_graph.close_all()
    qemu_check_ok(top)
    assert_same_bytes(
        qemu_content(top, tmp_path), bytes(model.data), "QEMU reading blockrep's writes"
    )
    # QEMU writes again on top of blockrep's metadata; blockrep reads it back
    cmds = [f"write -P 0x99 {cs // 2} {3 * cs}", f"write -z {6 * cs} {cs}"]
    # QEMU compresses only into unallocated clusters (else EIO)
    if compat == "1.1":
        cmds += [f"discard {14 * cs} {cs}", f"write -c -P 0x98 {14 * cs} {cs}"]
    else:
        free = [
            e["start"]
            for e in json.loads(qimg("map", "--output", "json", top).stdout)
            if e["depth"] > 0 or not e["present"]
        ]
        free = [c for c in free if c % cs == 0 and c >= 7 * cs and c + cs <= size]
        if free:
            cmds.append(f"write -c -P 0x98 {free[0]} {cs}")
    qio(top, cmds)
    qemu_check_ok(top)
    assert_same_bytes(
        await br_read_all(top), qemu_content(top, tmp_path), "blockrep reading QEMU's writes"
    )
