"""A real Linux guest for the tests: the Debian cloud kernel from /boot, a busybox
initramfs built here (cpio "newc" written in Python), and ``qemu-system-x86_64`` on TCG
with its virtio disk on an NBD export (unix socket, export name ``disk``).

The guest talks over its serial console (QEMU's stdio): it reads commands from it and
reports with marker lines ``@@G KIND ARGS...``, so kernel messages on the same console
never look like a report. Every wait has a deadline; QEMU is killed by pid.

The init script runs the program named by ``blockrep_run=NAME`` on the kernel command line
(the kernel hands unknown ``key=value`` parameters to init as environment variables).
Programs (shell, busybox ash):

* ``writer``: mounts /dev/vda on /mnt (ext4, noatime: reading a file writes nothing), says
  ``READY``, then serves console commands: ``write K`` creates the next K files
  f0001, f0002, ... each of 4-64 KiB from /dev/urandom, written with ``conv=fsync`` and
  followed by ``sync``; *after* the sync returns it prints ``DURABLE NAME SHA256``. After
  the K files: ``IDLE COUNT``. ``quit`` unmounts and powers off.
* ``verify``: mounts /dev/vda (replaying the journal), prints ``FILE NAME SHA256`` for
  every file in the root directory, ``FILES N``, unmounts (``UMOUNTED``) and powers off.

Either program prints ``FAIL WHAT`` and powers off when a step fails.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
MARK = "@@G"
# modules the cloud kernel builds as modules that a virtio disk needs (ext4 is built in)
MODULES = ("virtio_pci", "virtio_blk")

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -echo 2>/dev/null
say() { echo "@@G $*"; }
fail() { say FAIL "$*"; poweroff -f; sleep 5; }
for m in $(cat /modules.order); do insmod "/modules/$m" || fail "insmod $m"; done
n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1)); [ $n -gt 200 ] && fail "no /dev/vda"; sleep 0.05
done
say BOOTED "$(cut -d' ' -f1 /proc/uptime)"
. "/programs/$blockrep_run"
poweroff -f
sleep 5
"""

_WRITER = r"""mount -t ext4 -o noatime /dev/vda /mnt || fail mount
i=0
say READY
while read -r cmd arg; do
  case "$cmd" in
  write)
    k=0
    while [ $k -lt "$arg" ]; do
      i=$((i + 1)); k=$((k + 1))
      name=$(printf 'f%04d' $i)
      kib=$((RANDOM % 61 + 4))
      dd if=/dev/urandom of=/mnt/$name bs=1024 count=$kib conv=fsync 2>/dev/null \
        || fail "write $name"
      sync
      sum=$(sha256sum /mnt/$name) || fail "sha256sum $name"
      say DURABLE $name ${sum%% *}
    done
    say IDLE $i
    ;;
  quit) umount /mnt || fail umount; say UMOUNTED; break ;;
  esac
done
"""

_VERIFY = r"""mount -t ext4 -o noatime /dev/vda /mnt || fail mount
n=0
for f in /mnt/*; do
  [ -f "$f" ] || continue
  sum=$(sha256sum "$f") || fail "sha256sum $f"
  say FILE "${f#/mnt/}" ${sum%% *}
  n=$((n + 1))
done
say FILES $n
umount /mnt || fail umount
say UMOUNTED
"""

PROGRAMS = {"writer": _WRITER, "verify": _VERIFY}


# -- the kernel and its modules -------------------------------------------------------------


def kernel() -> tuple[str, str]:
    """The newest /boot/vmlinuz-* (a cloud kernel first) and its module directory."""
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    cloud = [k for k in found if "cloud" in k]
    for k in reversed(cloud or found):
        version = os.path.basename(k)[len("vmlinuz-") :]
        moddir = f"/lib/modules/{version}"
        if os.access(k, os.R_OK) and os.path.isfile(f"{moddir}/modules.dep"):
            return k, moddir
    raise AssertionError(
        f"no readable /boot/vmlinuz-* with its modules ({found}); "
        "`make test` installs linux-image-cloud-amd64"
    )


def module_closure(moddir: str, names: Iterable[str]) -> list[str]:
    """The module files (paths relative to ``moddir``) to load, dependencies first.

    A name built into the kernel (modules.builtin) needs nothing."""
    deps: dict[str, list[str]] = {}
    with open(f"{moddir}/modules.dep") as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path.strip()] = rest.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(p)).replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            visit(d)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif not _builtin(moddir, name):
            raise AssertionError(f"kernel module {name} not found in {moddir}")
    return order


def _builtin(moddir: str, name: str) -> bool:
    try:
        with open(f"{moddir}/modules.builtin") as f:
            return any(os.path.basename(line.strip()).startswith(name + ".ko") for line in f)
    except OSError:
        return False


def _module_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if not path.endswith(".ko"):
        raise AssertionError(f"{path}: compressed module format not handled")
    return data


def _static_elf(path: str) -> bool:
    """No PT_INTERP program header: the binary runs without a dynamic loader."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# -- initramfs: cpio newc --------------------------------------------------------------------


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out += name.encode() + b"\0"
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.out += b"\0" * (-len(self.out) % 512)
        return bytes(self.out)


def build_initramfs(path: str, moddir: str, programs: dict[str, str] | None = None) -> str:
    """Write the guest's initramfs to ``path``: static busybox, the virtio modules, the init
    script and ``programs`` (default: writer and verify). Returns ``path``."""
    if not os.path.isfile(BUSYBOX) or not _static_elf(BUSYBOX):
        raise AssertionError(
            f"{BUSYBOX} is missing or not static; `make test` installs busybox-static"
        )
    a = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "modules", "programs"):
        a.dir(d)
    a.chardev("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    with open(BUSYBOX, "rb") as f:
        a.file("bin/busybox", f.read(), 0o755)
    names = []
    for rel in module_closure(moddir, MODULES):
        name = re.sub(r"\.xz$", "", os.path.basename(rel))
        a.file(f"modules/{name}", _module_bytes(f"{moddir}/{rel}"))
        names.append(name)
    a.file("modules.order", ("\n".join(names) + "\n").encode())
    for name, text in (programs or PROGRAMS).items():
        a.file(f"programs/{name}", text.encode())
    a.file("init", _INIT.encode(), 0o755)
    with open(path, "wb") as f:
        f.write(a.finish())
    return path


# -- the guest -------------------------------------------------------------------------------


@dataclass
class Marker:
    """One ``@@G KIND ARGS`` line, with when the host read it (time.monotonic)."""

    kind: str
    args: list[str]
    at: float
    index: int = 0  # its place among all markers


@dataclass
class Guest:
    """One QEMU process booting the guest with ``program`` on the NBD export ``export``
    (a unix socket path). ``start`` boots; markers are collected by a reader thread."""

    kernel: str
    initrd: str
    export: str
    program: str
    log_path: str
    memory_mib: int = 256
    markers: list[Marker] = field(default_factory=list)
    started: float = 0.0
    proc: subprocess.Popen | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        append = f"console=ttyS0 quiet loglevel=3 panic=-1 blockrep_run={self.program}"
        drive = f"file=nbd:unix:{self.export}:exportname=disk,format=raw,if=virtio,cache=none"
        return [
            QEMU, "-accel", "tcg", "-m", str(self.memory_mib), "-nodefaults", "-no-reboot",
            "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-kernel", self.kernel, "-initrd", self.initrd, "-append", append,
            "-drive", drive,
        ]  # fmt: skip

    def start(self) -> Guest:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                at = line.find(MARK + " ")
                if at < 0:
                    continue
                kind, *args = line[at + len(MARK) + 1 :].split()
                with self._lock:
                    self.markers.append(Marker(kind, args, time.monotonic(), len(self.markers)))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def console(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def seen(self, kind: str) -> list[Marker]:
        """The markers of ``kind`` read so far (a snapshot)."""
        with self._lock:
            return [m for m in self.markers if m.kind == kind]

    def send(self, line: str) -> None:
        """One command line to the guest's console."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, pred: Callable[[list[Marker]], bool], timeout: float, what: str) -> list[Marker]:
        """Until ``pred(markers)``; fails on a FAIL marker, QEMU exiting, or the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snap = list(self.markers)
            if pred(snap):
                return snap
            fails = [m for m in snap if m.kind == "FAIL"]
            exited = self.proc is not None and self.proc.poll() is not None
            if fails or exited or time.monotonic() > deadline:
                if exited and self._reader is not None:
                    self._reader.join(5)  # the last lines of a guest that powered off
                    with self._lock:
                        snap = list(self.markers)
                    if pred(snap):
                        return snap
                why = "guest failed" if fails else "QEMU exited" if exited else f"{timeout} s"
                raise AssertionError(f"waiting for {what}: {why}\n{self.console()[-6000:]}")
            time.sleep(0.02)

    def wait_kind(self, kind: str, count: int = 1, timeout: float = 60.0) -> list[Marker]:
        """Until ``count`` markers of ``kind`` were read; returns them."""
        self.wait(lambda ms: sum(m.kind == kind for m in ms) >= count, timeout, f"{count} {kind}")
        return self.seen(kind)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"QEMU still running after {timeout} s\n{self.console()[-4000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL QEMU by pid and reap it (idempotent)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)
        if self._reader is not None:
            self._reader.join(5)
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


class Guests:
    """The guests a test boots, with one initramfs; ``close`` kills every QEMU by pid."""

    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        self.kernel, moddir = kernel()
        self.initrd = build_initramfs(os.path.join(workdir, "guest-initrd.cpio"), moddir)
        self.guests: list[Guest] = []

    def boot(self, export: str, program: str) -> Guest:
        n = len(self.guests)
        log = os.path.join(self.dir, f"guest{n}-{program}.console")
        g = Guest(self.kernel, self.initrd, export, program, log)
        self.guests.append(g)
        return g.start()

    def close(self) -> None:
        for g in self.guests:
            try:
                g.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass


# -- ext4 on the host: e2fsprogs --------------------------------------------------------------


def mkfs_ext4(path: str) -> None:
    """A fresh ext4 on a raw file, initialised in full (no lazy init writing in the guest)."""
    _e2(["mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", path])


def e2fsck_clean(path: str) -> str:
    """``e2fsck -fn``: fails unless the file system is clean. Returns its report."""
    r = _e2(["e2fsck", "-fn", path], check=False)
    if r.returncode != 0:
        raise AssertionError(f"e2fsck -fn {path}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def debugfs_dump(path: str, names: Iterable[str], outdir: str) -> dict[str, bytes | None]:
    """Each file ``/NAME`` of the ext4 in ``path``, read by debugfs without mounting
    (None: not there)."""
    names = list(names)
    os.makedirs(outdir, exist_ok=True)
    cmds = os.path.join(outdir, "cmds")
    with open(cmds, "w") as f:
        for n in names:
            f.write(f"dump /{n} {shlex.quote(os.path.join(outdir, n))}\n")
    _e2(["debugfs", "-f", cmds, path])
    out: dict[str, bytes | None] = {}
    for n in names:
        p = os.path.join(outdir, n)
        if os.path.exists(p):
            with open(p, "rb") as f:
                out[n] = f.read()
        else:
            out[n] = None
    return out


def _e2(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise AssertionError(f"{argv[0]} is not installed; `make test` installs e2fsprogs")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r
