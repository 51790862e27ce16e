"""Truncated, garbage and hostile qcow2 files give a clear BlockError.

Every probe runs in its own subprocess with a 1 GiB address-space limit, a
wall-clock timeout and tracemalloc, so a crash (any exception but BlockError), a
hang or a huge allocation fails the test instead of taking pytest down. Where
qemu-img refuses the same file, its message is shown next to blockrep's in the
failure text; the assertions are on blockrep's own message.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

PROBE_TIMEOUT = 20
AS_LIMIT = 1 << 30
PEAK_LIMIT = 64 << 20
CS = 65536

# A probe: open (read-only or not), read some ranges, optionally write + flush.
PROBE = r"""
import asyncio, json, resource, sys, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
args = json.loads(sys.argv[1])

async def one(path, rw, reads, write):
    from blockrep.block import Graph
    from blockrep.block.node import BlockError
    out = {{"opened": False, "reads": []}}
    g = Graph()
    try:
        node = await g.add({{"driver": "qcow2", "read-only": not rw,
                            "file": {{"driver": "file", "filename": path}}}})
        out["opened"] = True
        out["size"] = node.length
        for off, n in reads:
            try:
                data = await node.read(off, n)
                out["reads"].append({{"ok": True, "crc": sum(data[::97]) & 0xffff, "first": data[:1].hex()}})
            except BlockError as e:
                out["reads"].append({{"ok": False, "errno": e.errno, "message": e.message}})
        if write:
            for off, n in reads:
                try:
                    await node.write(off, b"\x5a" * n)
                    await node.flush()
                    out.setdefault("writes", []).append({{"ok": True}})
                except BlockError as e:
                    out.setdefault("writes", []).append({{"ok": False, "message": e.message}})
    except BlockError as e:
        out["errno"] = e.errno
        out["message"] = e.message
    finally:
        try:
            await g.close_all()
        except BlockError:
            pass
    return out

def run(case):
    tracemalloc.start()
    res = asyncio.run(one(case["path"], case.get("rw", False), case.get("reads", []),
                          case.get("write", False)))
    res["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return res

if "serve" in args:
    # one case per stdin line, one "@@ json" answer line each, every case under an alarm
    import signal
    def alarm(*_):
        raise TimeoutError("hang")
    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin:
        case = json.loads(line)
        signal.alarm({per_case})
        try:
            res = run(case)
        except MemoryError:
            res = {{"crash": "MemoryError"}}
        except TimeoutError:
            res = {{"crash": "hang"}}
        except Exception as e:
            import traceback
            res = {{"crash": f"{{type(e).__name__}}: {{e}}", "tb": traceback.format_exc()}}
        finally:
            signal.alarm(0)
        sys.stdout.write("@@ " + json.dumps(res) + "\n")
        sys.stdout.flush()
elif "cases" in args:
    # many files in one process, each under an alarm so a hang is caught per case
    import signal
    def alarm(*_):
        raise TimeoutError("hang")
    signal.signal(signal.SIGALRM, alarm)
    results = []
    for case in args["cases"]:
        signal.alarm({per_case})
        try:
            results.append(run(case))
        except MemoryError:
            results.append({{"crash": "MemoryError"}})
        except TimeoutError:
            results.append({{"crash": "hang"}})
        except Exception as e:
            results.append({{"crash": f"{{type(e).__name__}}: {{e}}"}})
        finally:
            signal.alarm(0)
    print(json.dumps(results))
else:
    print(json.dumps(run(args)))
"""


def _probe_code(per_case: int = 10) -> str:
    return PROBE.format(limit=AS_LIMIT, per_case=per_case)


def _spawn(arg: dict[str, Any], timeout: float) -> dict[str, Any] | list[Any]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _probe_code(), json.dumps(arg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"blockrep hung (> {timeout} s) on {arg}")
    assert proc.returncode == 0, (
        f"blockrep crashed (exit {proc.returncode}) on {arg}:\n{err[-3000:]}"
    )
    return json.loads(out)


class Prober:
    """One long-lived probe process (saves an interpreter start per case); a case
    that crashes or hangs it fails and the next case gets a fresh process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _probe_code(), json.dumps({"serve": True})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.proc = None

    def ask(self, case: dict[str, Any]) -> dict[str, Any]:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(case) + "\n").encode())
        fd = proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + PROBE_TIMEOUT
        while b"\n" not in buf.split(b"@@ ", 1)[-1] or b"@@ " not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                pytest.fail(f"blockrep hung (> {PROBE_TIMEOUT} s) on {case}")
            chunk = os.read(fd, 65536)
            if not chunk:
                rc = proc.wait(timeout=10)
                self.stop()
                pytest.fail(f"blockrep crashed (exit {rc}) on {case}")
            buf += chunk
        res = json.loads(buf.split(b"@@ ", 1)[1].split(b"\n", 1)[0])
        assert "crash" not in res, (
            f"blockrep crashed on {case}: {res['crash']}\n{res.get('tb', '')}"
        )
        return res


_PROBER = Prober()


@pytest.fixture(scope="module", autouse=True)
def _prober() -> Any:
    yield _PROBER
    _PROBER.stop()


def probe(
    path: Path, rw: bool = False, reads: list[tuple[int, int]] = (), write: bool = False
) -> dict[str, Any]:
    res = _PROBER.ask({"path": str(path), "rw": rw, "reads": list(reads), "write": write})
    assert res["peak"] < PEAK_LIMIT, f"opening {path} allocated {res['peak']} bytes"
    return res


def qemu_info_error(path: Path) -> str:
    p = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "-U", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return p.stderr.strip() if p.returncode else ""


def assert_refused(path: Path, *needles: str, rw: bool = False) -> dict[str, Any]:
    """Opening fails with a BlockError whose message holds every needle (case-insensitive)."""
    res = probe(path, rw=rw, reads=[(0, 4096)])
    qemu = qemu_info_error(path)
    assert not res["opened"], f"blockrep opened {path.name}; qemu-img says: {qemu!r}"
    msg = res["message"]
    for n in needles:
        assert n.lower() in msg.lower(), f"blockrep: {msg!r} lacks {n!r} (qemu-img: {qemu!r})"
    return res


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("blockrep")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=30)


# -- images ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qemu-img image (64 KiB clusters, 16 MiB) with data in its first two clusters."""
    d = tmp_path_factory.mktemp("good")
    img = d / "good.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(img), "16M"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 128k", str(img)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return img


def hdr(path: Path) -> dict[str, int]:
    b = path.read_bytes()[:104]
    f = struct.unpack(">4sIQIIQIIQQIIQQQQII", b)
    keys = [
        "magic",
        "version",
        "backing_file_offset",
        "backing_file_size",
        "cluster_bits",
        "size",
        "crypt_method",
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "nb_snapshots",
        "snapshots_offset",
        "incompat",
        "compat",
        "autoclear",
        "refcount_order",
        "header_length",
    ]
    return dict(zip(keys, f, strict=True))


FIELDS = {  # offset, struct format
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompat": (72, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}


def patched(good: Path, tmp_path: Path, name: str = "bad.qcow2", **fields: int) -> Path:
    out = tmp_path / name
    shutil.copyfile(good, out)
    with open(out, "r+b") as f:
        for k, v in fields.items():
            off, fmt = FIELDS[k]
            f.seek(off)
            f.write(struct.pack(fmt, v))
    return out


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


# -- sanity ---------------------------------------------------------------------------


def test_good_image_opens_and_reads(good: Path) -> None:
    res = probe(good, reads=[(0, 4096), (1 << 20, 4096)])
    assert res["opened"] and res["size"] == 16 << 20
    assert res["reads"][0] == {"ok": True, "crc": res["reads"][0]["crc"], "first": "61"}
    assert res["reads"][1]["ok"] and res["reads"][1]["first"] == "00"


# -- truncated / garbage ------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.qcow2"
    p.write_bytes(b"")
    assert_refused(p, "not in qcow2 format")


def test_garbage(tmp_path: Path) -> None:
    p = tmp_path / "garbage.qcow2"
    p.write_bytes(random.Random(1).randbytes(CS))
    assert_refused(p, "not in qcow2 format")


@pytest.mark.parametrize("n", [4, 50, 100])
def test_truncated_header(good: Path, tmp_path: Path, n: int) -> None:
    p = tmp_path / f"trunc{n}.qcow2"
    p.write_bytes(good.read_bytes()[:n])
    assert_refused(p, "header")


def test_header_cluster_only(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "hdr.qcow2"
    p.write_bytes(good.read_bytes()[:CS])
    assert_refused(p, "beyond the end of the file")


def test_truncated_before_data(good: Path, tmp_path: Path) -> None:
    """Tables present, data cluster cut off: the read reports it."""
    p = tmp_path / "nodata.qcow2"
    data = good.read_bytes()
    l1 = hdr(good)["l1_table_offset"]
    l2 = peek_u64(good, l1) & 0x00FFFFFFFFFFFE00
    host = peek_u64(good, l2) & 0x00FFFFFFFFFFFE00
    p.write_bytes(data[:host])
    res = probe(p, reads=[(0, 4096), (4 << 20, 512)])
    assert res["opened"], res
    assert not res["reads"][0]["ok"] and "beyond the end" in res["reads"][0]["message"], res
    assert res["reads"][1]["ok"], res


# -- patched header fields ----------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 30, 0, 63])
def test_cluster_bits(good: Path, tmp_path: Path, bits: int) -> None:
    assert_refused(
        patched(good, tmp_path, cluster_bits=bits), f"Unsupported cluster size: 2^{bits}"
    )


def test_refcount_order_7(good: Path, tmp_path: Path) -> None:
    assert_refused(
        patched(good, tmp_path, refcount_order=7), "Reference count entry width too large"
    )


def test_huge_l1_size(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, l1_size=0x7FFFFFFF), "L1 table too large")


def test_l1_smaller_than_size(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, size=1 << 50), "L1 table is too small")


def test_huge_virtual_size(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, size=(1 << 63) + 512), "too large")


def test_l1_beyond_eof(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, l1_table_offset=1 << 40), "L1 table", "beyond the end")


def test_l1_unaligned(good: Path, tmp_path: Path) -> None:
    off = hdr(good)["l1_table_offset"] + 8
    assert_refused(patched(good, tmp_path, l1_table_offset=off), "Invalid L1 table offset")


def test_l1_offset_zero(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, l1_table_offset=0), "Invalid L1 table offset")


def test_refcount_table_beyond_eof(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, refcount_table_offset=1 << 40)
    assert_refused(p, "reference count table", "beyond the end")


def test_refcount_table_unaligned(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, refcount_table_offset=CS + 512)
    assert_refused(p, "Invalid reference count table offset")


@pytest.mark.parametrize("clusters", [0xFFFFFFFF, 129])
def test_refcount_table_clusters_huge(good: Path, tmp_path: Path, clusters: int) -> None:
    p = patched(good, tmp_path, refcount_table_clusters=clusters)
    assert_refused(p, "Reference count table too large")


def test_refcount_table_clusters_zero(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, refcount_table_clusters=0)
    assert_refused(p, "reference count table")


def test_header_length_too_small(good: Path, tmp_path: Path) -> None:
    assert_refused(patched(good, tmp_path, header_length=50), "qcow2 header too short")


@pytest.mark.parametrize("length", [CS + 8, 0xFFFFFFFF])
def test_header_length_too_big(good: Path, tmp_path: Path, length: int) -> None:
    assert_refused(
        patched(good, tmp_path, header_length=length), "qcow2 header exceeds cluster size"
    )


def test_unknown_incompatible_feature(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, incompat=1 << 10)
    res = assert_refused(p, "Unsupported qcow2 feature", "400")
    assert "Unknown incompatible feature" in res["message"]


def test_named_incompatible_feature(good: Path, tmp_path: Path) -> None:
    """The feature name table of a qemu-img image names a known-but-unsupported bit."""
    p = patched(good, tmp_path, incompat=1 << 4)
    assert_refused(p, "Unsupported qcow2 feature", "extended L2 entries")


def test_corrupt_bit(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, incompat=1 << 1)
    assert_refused(p, "corrupt", "read/write", rw=True)
    res = probe(p, rw=False, reads=[(0, 4096)])
    assert res["opened"], res
    assert res["reads"][0]["ok"] and res["reads"][0]["first"] == "61"
    # the header was not touched by the refused open
    assert hdr(p)["incompat"] == 1 << 1


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_version(good: Path, tmp_path: Path, version: int) -> None:
    assert_refused(patched(good, tmp_path, version=version), f"Unsupported qcow2 version {version}")


def test_backing_name_too_long(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, backing_file_offset=512, backing_file_size=4096)
    assert_refused(p, "Backing file name too long")


def test_backing_name_beyond_eof(good: Path, tmp_path: Path) -> None:
    p = tmp_path / "short.qcow2"
    p.write_bytes(
        patched(good, tmp_path, backing_file_offset=1000, backing_file_size=1000).read_bytes()[
            :1500
        ]
    )
    res = probe(p)
    assert not res["opened"], res
    assert "backing file name" in res["message"].lower() or "beyond the end" in res["message"], res


def test_header_extension_too_long(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    h = hdr(p)
    # the first header extension follows the header; give it a length past the cluster
    poke(p, h["header_length"] + 4, struct.pack(">I", 0x7FFFFFF0))
    assert_refused(p, "header extension")


def test_snapshot_table_beyond_eof(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, nb_snapshots=0xFFFFFF, snapshots_offset=4 * CS)
    res = probe(p)
    assert not res["opened"], res
    assert "snapshot" in res["message"].lower(), res


# -- backing chains -------------------------------------------------------------------


def _qemu(*args: str) -> None:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_backing_chain_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    _qemu("qemu-img", "create", "-f", "qcow2", str(a), "1M")
    _qemu("qemu-img", "create", "-f", "qcow2", "-b", str(a), "-F", "qcow2", str(b), "1M")
    _qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(b), "-F", "qcow2", str(a))
    for img in (a, b):
        res = probe(img)
        assert not res["opened"], res
        assert "loop" in res["message"].lower(), (res["message"], qemu_info_error(img))


def test_backing_self_loop(tmp_path: Path) -> None:
    a = tmp_path / "self.qcow2"
    _qemu("qemu-img", "create", "-f", "qcow2", str(a), "1M")
    _qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", str(a))
    res = probe(a)
    assert not res["opened"], res
    assert "loop" in res["message"].lower(), res


def test_backing_chain_deep_without_loop(tmp_path: Path) -> None:
    """A long (not looping) chain is not mistaken for a loop and does not blow the stack."""
    prev = tmp_path / "c0.qcow2"
    _qemu("qemu-img", "create", "-f", "qcow2", str(prev), "1M")
    for i in range(1, 12):
        cur = tmp_path / f"c{i}.qcow2"
        _qemu("qemu-img", "create", "-f", "qcow2", "-b", prev.name, "-F", "qcow2", str(cur), "1M")
        prev = cur
    res = probe(prev, reads=[(0, 512)])
    assert res["opened"] and res["reads"][0]["ok"], res


def test_missing_backing_file(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _qemu("qemu-img", "create", "-f", "qcow2", str(base), "1M")
    _qemu("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "1M")
    base.unlink()
    res = probe(top)
    assert not res["opened"], res
    assert "backing file" in res["message"].lower() and "no such file" in res["message"].lower(), (
        res
    )
    # the CLI says it the qemu-img way
    p = cli("img", "info", str(top))
    assert p.returncode == 1 and p.stderr.startswith(f"blockrep img: Could not open '{top}':"), (
        p.stderr
    )
    assert "No such file" in p.stderr


def test_backing_file_is_garbage(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _qemu("qemu-img", "create", "-f", "qcow2", str(base), "1M")
    _qemu("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "1M")
    base.write_bytes(b"\xff" * 4096)
    res = probe(top)
    assert not res["opened"], res
    assert "backing file" in res["message"].lower() and "qcow2" in res["message"], res


# -- hostile tables -------------------------------------------------------------------


def test_l1_entry_beyond_eof(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    poke(p, hdr(p)["l1_table_offset"], struct.pack(">Q", (1 << 63) | (1 << 40)))
    assert_refused(p, "L1 entry 0")


def test_l1_entry_unaligned(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    l1 = hdr(p)["l1_table_offset"]
    e = peek_u64(p, l1)
    poke(p, l1, struct.pack(">Q", e + 512))
    assert_refused(p, "L1 entry 0", "invalid")


def _l2_entry_at(p: Path, index: int) -> int:
    l2 = peek_u64(p, hdr(p)["l1_table_offset"]) & 0x00FFFFFFFFFFFE00
    return l2 + 8 * index


@pytest.mark.parametrize("rw", [False, True])
def test_l2_entry_beyond_eof(good: Path, tmp_path: Path, rw: bool) -> None:
    p = patched(good, tmp_path)
    poke(p, _l2_entry_at(p, 0), struct.pack(">Q", (1 << 63) | (1 << 40)))
    before = p.stat().st_size
    res = probe(p, rw=rw, reads=[(0, 4096), (CS, 4096)], write=rw)
    assert res["opened"], res
    bad, ok = res["reads"]
    assert not bad["ok"] and "beyond the end of the file" in bad["message"], res
    assert ok["ok"] and ok["first"] == "61", res
    if rw:
        # writing through the bad entry is refused too, and does not grow the file to 1 TiB
        assert not res["writes"][0]["ok"], res
        assert p.stat().st_size < before + (1 << 20)


@pytest.mark.parametrize("rw", [False, True])
def test_l2_entry_unaligned(good: Path, tmp_path: Path, rw: bool) -> None:
    p = patched(good, tmp_path)
    at = _l2_entry_at(p, 1)
    e = peek_u64(p, at)
    poke(p, at, struct.pack(">Q", e + 512))
    before = _qemu_check_errors(p)
    res = probe(p, rw=rw, reads=[(CS, 4096), (0, 4096)], write=rw)
    assert res["opened"], res
    bad, ok = res["reads"]
    assert not bad["ok"] and "unaligned" in bad["message"], res
    assert ok["ok"] and ok["first"] == "61", res
    if rw:
        assert not res["writes"][0]["ok"], res
        # nothing was freed or overwritten through the bad entry: qemu-img finds
        # the same damage as before, no more
        assert _qemu_check_errors(p) == before


def _qemu_check_errors(p: Path) -> str:
    r = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(p)], capture_output=True, text=True, timeout=30
    )
    return r.stderr


def test_l2_entry_compressed_garbage(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    poke(p, _l2_entry_at(p, 0), struct.pack(">Q", (1 << 62) | 0x3FFFFFFFFFFF))
    res = probe(p, reads=[(0, 4096)])
    assert res["opened"], res
    assert not res["reads"][0]["ok"], res
    assert "compress" in res["reads"][0]["message"].lower(), res


def test_refcount_table_entry_beyond_eof(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    poke(p, hdr(p)["refcount_table_offset"] + 8, struct.pack(">Q", 1 << 40))
    assert_refused(p, "Refcount block 1", "beyond the end of the file", rw=True)


def test_refcount_table_entry_unaligned(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path)
    rt = hdr(p)["refcount_table_offset"]
    poke(p, rt, struct.pack(">Q", peek_u64(p, rt) + 512))
    assert_refused(p, "Refcount block 0", "not aligned", rw=True)


def test_cli_reports_bad_images(good: Path, tmp_path: Path) -> None:
    p = patched(good, tmp_path, cluster_bits=30)
    for sub in ("info", "check"):
        r = cli("img", sub, str(p))
        assert r.returncode == 1, (sub, r.stdout, r.stderr)
        assert (
            r.stderr.strip()
            == f"blockrep img: Could not open '{p}': Unsupported cluster size: 2^30"
        )
        assert "Traceback" not in r.stderr


# -- fuzz: random header bytes ------------------------------------------------------


def test_random_header_mutations(good: Path, tmp_path: Path) -> None:
    """Seeded random corruptions of the first 512 bytes and of the tables: every
    open either fails with a BlockError or gives an image whose reads succeed or
    fail with a BlockError, all within the memory and time limits."""
    data = good.read_bytes()
    h = hdr(good)
    l1 = h["l1_table_offset"]
    l2 = peek_u64(good, l1) & 0x00FFFFFFFFFFFE00
    hot = [(0, 112), (112, 400), (h["refcount_table_offset"], 16), (l1, 16), (l2, 32)]
    cases = []
    for seed in range(60):
        rng = random.Random(seed)
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            start, n = rng.choice(hot)
            pos = start + rng.randrange(n)
            if rng.random() < 0.5:
                buf[pos] ^= 1 << rng.randrange(8)
            else:
                buf[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            buf = buf[: rng.randrange(len(buf))]
        path = tmp_path / f"fuzz{seed}.qcow2"
        path.write_bytes(bytes(buf))
        cases.append(
            {
                "path": str(path),
                "rw": rng.random() < 0.3,
                "reads": [[0, 4096], [CS - 512, 1024], [8 << 20, 512]],
            }
        )
    results = _spawn({"cases": cases}, timeout=40)
    assert isinstance(results, list) and len(results) == len(cases)
    for case, res in zip(cases, results, strict=True):
        assert "crash" not in res, f"{case['path']}: {res['crash']}"
        assert res["peak"] < PEAK_LIMIT, f"{case['path']}: {res['peak']} bytes"
        if not res["opened"]:
            assert res["message"], case
