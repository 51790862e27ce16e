"""``blockrep img``: image utility with qemu-img's argument forms and output."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from ..block import Graph
from ..block.graph import probe_format
from ..block.image_info import image_info
from ..block.node import Extent, Node, is_zero
from ..block.options import parse_size, split_keyval
from ..errors import BlockError, OptionError
from ..qcow2.create import create_file
from ..qcow2.driver import Qcow2Node
from .image_check import check_exit_code, human_image_check, json_image_check
from .qemu_json import dumps_pretty

PROG = "blockrep img"


class ImgError(Exception):
    """Ends the command with ``qemu-img: <message>`` on stderr and an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary unit."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    if value <= 0:
        return "0 B"
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = (exp - 1) // 10
    i = max(0, min(i, len(suffixes) - 1))
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}B"


def _hex(v: int) -> str:
    return "0" if v == 0 else f"{v:#x}"


def parse_img_size(text: str) -> int:
    try:
        size = parse_size(text)
    except OptionError:
        raise ImgError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
            "blockrep img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    return size


async def open_image(
    graph: Graph,
    filename: str,
    fmt: str | None,
    *,
    read_only: bool = True,
    force_share: bool = False,
    no_backing: bool = False,
) -> Node:
    if not os.path.exists(filename):
        raise ImgError(
            f"Could not open '{filename}': Could not open '{filename}': No such file or directory"
        )
    fmt = fmt or probe_format(filename)
    opts: dict[str, Any] = {
        "driver": fmt,
        "read-only": read_only,
        "file": {"driver": "file", "filename": filename, "force-share": force_share},
    }
    if no_backing and fmt == "qcow2":
        opts["backing"] = None
    try:
        return await graph.add(opts)
    except BlockError as e:
        raise ImgError(f"Could not open '{filename}': {e.message}") from None


def parse_o(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split("\0") if text else []:
        for k, v in split_keyval(part):
            out[k] = v if v is not None else "on"
    return out


def _onoff(v: str) -> bool:
    if v in ("on", "true", "yes"):
        return True
    if v in ("off", "false", "no"):
        return False
    raise ImgError(f"Parameter expects 'on' or 'off', got '{v}'")


# -- create -----------------------------------------------------------------------


async def create_image(
    filename: str,
    fmt: str,
    size: int | None,
    opts: dict[str, str],
    backing: str | None = None,
    backing_fmt: str | None = None,
    quiet: bool = False,
    out: Callable[[str], None] = print,
) -> None:
    backing = backing or opts.pop("backing_file", None)
    backing_fmt = backing_fmt or opts.pop("backing_fmt", None)
    if fmt == "raw":
        if backing:
            raise ImgError(f"{filename}: Backing file not supported for file format 'raw'")
        unknown = set(opts) - {"size", "preallocation"}
        if unknown:
            raise ImgError(
                f"Invalid parameter '{sorted(unknown)[0]}'\nblockrep img: Invalid options for file format 'raw'"
            )
        if size is None:
            raise ImgError("Image creation needs a size parameter")
        if not quiet:
            out(f"Formatting '{filename}', fmt=raw size={size}")
        with open(filename, "wb") as f:
            f.truncate(-(-size // 512) * 512)  # QEMU rounds the size up to whole sectors
        return
    if fmt != "qcow2":
        raise ImgError(f"Unknown file format '{fmt}'")
    known = {
        "cluster_size",
        "compat",
        "lazy_refcounts",
        "refcount_bits",
        "size",
        "preallocation",
        "extended_l2",
        "compression_type",
        "encryption",
        "data_file",
    }
    unknown = set(opts) - known
    if unknown:
        raise ImgError(
            f"Invalid parameter '{sorted(unknown)[0]}'\nblockrep img: Invalid options for file format 'qcow2'"
        )
    cluster_size = parse_size(opts.get("cluster_size", "65536"), "cluster_size")
    compat = opts.get("compat", "1.1")
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ImgError(f"Parameter 'version' does not accept value '{compat}'")
    lazy = _onoff(opts.get("lazy_refcounts", "off"))
    refcount_bits = int(opts.get("refcount_bits", "16"))
    if opts.get("preallocation", "off") != "off":
        raise ImgError("blockrep img create supports preallocation=off only")
    if _onoff(opts.get("extended_l2", "off")):
        raise ImgError("blockrep does not support extended L2 entries")
    if opts.get("compression_type", "zlib") != "zlib":
        raise ImgError("blockrep supports compression_type=zlib only")
    if "size" in opts and size is None:
        size = parse_img_size(opts["size"])
    if backing:
        graph = Graph()
        path = (
            backing if os.path.isabs(backing) else os.path.join(os.path.dirname(filename), backing)
        )
        if backing_fmt is None:
            raise ImgError(
                f"Backing file specified without backing format\n"
                f"Detected format of {probe_format(path)}."
            )
        try:
            b = await open_image(graph, path, backing_fmt, force_share=True)
            if size is None:
                size = b.length
        except ImgError as e:
            raise ImgError(f"{filename}: {e}") from None
        finally:
            await graph.close_all()
    if size is None:
        raise ImgError("Image creation needs a size parameter")
    if not quiet:
        line = (
            f"Formatting '{filename}', fmt=qcow2 cluster_size={cluster_size} extended_l2=off "
            f"compression_type=zlib size={size}"
        )
        if backing:
            line += f" backing_file={backing}"
            if backing_fmt:
                line += f" backing_fmt={backing_fmt}"
        if version == 2:
            line += " compat=0.10"
        line += f" lazy_refcounts={'on' if lazy else 'off'} refcount_bits={refcount_bits}"
        out(line)
    try:
        await create_file(
            filename,
            -(-size // 512) * 512,  # qcow2_co_create_opts rounds up to whole sectors
            cluster_size=cluster_size,
            backing_file=backing,
            backing_format=backing_fmt,
            version=version,
            refcount_bits=refcount_bits,
            lazy_refcounts=lazy,
        )
    except BlockError as e:
        raise ImgError(f"{filename}: {e.message}") from None


async def cmd_create(a: argparse.Namespace) -> int:
    opts = parse_o("\0".join(a.o or []))
    size = parse_img_size(a.size) if a.size is not None else None
    await create_image(a.filename, a.f or "raw", size, opts, a.b, a.F, a.q)
    return 0


# -- info -------------------------------------------------------------------------


def _human_spec(data: dict[str, Any]) -> list[str]:
    lines = []
    for k, v in data.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        lines.append(f"    {k.replace('-', ' ')}: {v}")
    return lines


def human_info(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size']) if 'actual-size' in info else 'unavailable'}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info.get("full-backing-filename") not in (None, info["backing-filename"]):
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        lines.extend(_human_spec(spec["data"]))
    return "\n".join(lines)


async def cmd_info(a: argparse.Namespace) -> int:
    graph = Graph()
    try:
        node = await open_image(graph, a.filename, a.f, force_share=a.U)
        infos = []
        cur: Node | None = node
        name = a.filename
        while cur is not None:
            infos.append(image_info(cur, opened_as=name))
            if not a.backing_chain:
                break
            cur = cur.backing
            if cur is not None:
                name = cur.describe_filename()
        if a.output == "json":
            print(dumps_pretty(infos if a.backing_chain else infos[0]))
        else:
            print("\n\n".join(human_info(i) for i in infos))
    finally:
        await graph.close_all()
    return 0


# -- check ------------------------------------------------------------------------


async def cmd_check(a: argparse.Namespace) -> int:
    graph = Graph()
    try:
        fix = a.r
        node = await open_image(graph, a.filename, a.f, read_only=not fix, force_share=a.U)
        if not isinstance(node, Qcow2Node):
            raise ImgError("This image format does not support checks", 63)
        res = await node.check(repair=bool(fix))
        if fix:
            res.take_double_check(await node.check())
    finally:
        await graph.close_all()
    if a.output == "json":
        print(dumps_pretty(json_image_check(res, a.filename)))
    else:
        for m in res.messages:
            print(m, file=sys.stderr)
        if not a.q:
            for paragraph in human_image_check(res):
                print(paragraph)
    return check_exit_code(res)


# -- map --------------------------------------------------------------------------


async def image_map(node: Node, start: int = 0, length: int | None = None) -> list[Extent]:
    end = node.length if length is None else min(node.length, start + length)
    out: list[Extent] = []
    pos = start
    step = 1 << 30
    while pos < end:
        n = min(step, end - pos)
        for e in await node.block_status(pos, n):
            if (
                out
                and out[-1].start + out[-1].length == e.start
                and out[-1].same_kind(e)
                and not getattr(e, "compressed", False)
            ):
                out[-1].length += e.length
            else:
                out.append(e)
        pos += n
    return out


def map_json(extents: list[Extent]) -> str:
    rows = []
    for e in extents:
        s = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {str(e.present).lower()}, "zero": {str(e.zero).lower()}, '
            f'"data": {str(e.data).lower()}'
        )
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        rows.append(s + "}")
    return "[" + ",\n".join(rows) + "]"


async def cmd_map(a: argparse.Namespace) -> int:
    graph = Graph()
    try:
        node = await open_image(graph, a.filename, a.f, force_share=a.U)
        start = parse_size(a.start_offset) if a.start_offset else 0
        length = parse_size(a.max_length) if a.max_length else None
        extents = await image_map(node, start, length)
    finally:
        await graph.close_all()
    if a.output == "json":
        print(map_json(extents))
        return 0
    print("%-16s%-16s%-16s%s" % ("Offset", "Length", "Mapped to", "File"))
    for e in extents:
        if e.data and e.offset is None:
            raise ImgError("File contains external, encrypted or compressed clusters.")
        if e.data and e.offset is not None and e.file is not None:
            print(
                "%-16s%-16s%-16s%s"
                % (_hex(e.start), _hex(e.length), _hex(e.offset), e.file.describe_filename())
            )
    return 0


# -- compare ----------------------------------------------------------------------

CHUNK = 1 << 20


def _first_diff(a: bytes, b: bytes) -> int:
    """Offset of the first differing 512-byte sector (QEMU reports sector starts)."""
    for i in range(0, len(a), 512):
        if a[i : i + 512] != b[i : i + 512]:
            return i
    return -1


async def cmd_compare(a: argparse.Namespace) -> int:
    graph = Graph()
    try:
        try:
            n1 = await open_image(graph, a.filename1, a.f, force_share=a.U)
            n2 = await open_image(graph, a.filename2, a.F or a.f if a.F else None, force_share=a.U)
        except ImgError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        common = min(n1.length, n2.length)
        progress = Progress(a.p, common + abs(n1.length - n2.length))

        def mismatch(offset: int) -> int:
            progress.done()
            if not a.q:
                print(f"Content mismatch at offset {offset}!")
            return 1

        pos = 0
        while pos < common:
            n = min(CHUNK, common - pos)
            d1, d2 = await n1.read(pos, n), await n2.read(pos, n)
            if d1 != d2:
                return mismatch(pos + _first_diff(d1, d2))
            pos += n
            progress.update(pos)
        if n1.length != n2.length:
            if a.s:
                progress.done()
                if not a.q:
                    print("Strict mode: Image size mismatch!")
                return 1
            if not a.q:
                print("Warning: Image size mismatch!")
            longer = n1 if n1.length > n2.length else n2
            while pos < longer.length:
                n = min(CHUNK, longer.length - pos)
                d = await longer.read(pos, n)
                if not is_zero(d):
                    return mismatch(pos + _first_diff(d, bytes(len(d))))
                pos += n
                progress.update(pos)
        progress.done()
        if not a.q:
            print("Images are identical.")
        return 0
    finally:
        await graph.close_all()


# -- convert ----------------------------------------------------------------------


class Progress:
    """qemu-img's ``-p``: a tqdm bar on a terminal, qemu-img's text otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = max(total, 1)
        self.bar = None
        self.last = -1.0
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024)
        elif enabled:
            self._print(0.0)

    def _print(self, pct: float) -> None:
        sys.stdout.write(f"    ({pct:3.2f}/100%)\r")
        sys.stdout.flush()

    def update(self, pos: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(pos - self.bar.n)
            return
        pct = pos * 100.0 / self.total
        if pct - self.last >= 1.0 or pct >= 100.0:
            self.last = pct
            self._print(pct)

    def done(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()
        else:
            self._print(100.0)
            sys.stdout.write("\n")


async def cmd_convert(a: argparse.Namespace) -> int:
    graph = Graph()
    try:
        src = await open_image(graph, a.src, a.f, force_share=a.U)
        out_fmt = a.O or "raw"
        opts = parse_o("\0".join(a.o or []))
        await create_image(a.dst, out_fmt, src.length, opts, a.B, a.F if a.B else None, quiet=True)
        dst = await open_image(graph, a.dst, out_fmt, read_only=False)
        await copy_image(src, dst, Progress(a.p, src.length), skip_unallocated=bool(a.B))
        await dst.flush()
    finally:
        await graph.close_all()
    return 0


async def copy_image(
    src: Node, dst: Node, progress: Progress, skip_unallocated: bool = False
) -> None:
    """Copy every byte that is not known to read as zero (the target starts zeroed)."""
    total = src.length
    pos = 0
    while pos < total:
        n = min(2 * CHUNK, total - pos)
        for e in await src.block_status(pos, n):
            if e.zero or (skip_unallocated and e.depth > 0):
                continue
            o = e.start
            while o < e.start + e.length:
                m = min(CHUNK, e.start + e.length - o)
                data = await src.read(o, m)
                if not is_zero(data):
                    await dst.write(o, data)
                o += m
        pos += n
        progress.update(pos)
    progress.done()


# -- entry ------------------------------------------------------------------------


_FLAG: dict[str, Any] = {"action": "store_true"}
_OUTPUT = ("--output", {"choices": ("human", "json"), "default": "human"})
_FORCE_SHARE = ("-U", "--force-share", {"dest": "U", "action": "store_true"})

# Each command's arguments in qemu-img's order: a bare name takes a value (or is a
# positional), a tuple is the names and then argparse's keywords.
_COMMANDS: list[tuple[str, str, Callable[[argparse.Namespace], Any], list[Any]]] = [
    (
        "create",
        "create an image",
        cmd_create,
        ["-f", "-b", "-F", ("-o", {"action": "append"}), ("-q", _FLAG), ("-u", _FLAG)]
        + ["filename", ("size", {"nargs": "?"})],
    ),
    (
        "info",
        "show image information",
        cmd_info,
        ["-f", _OUTPUT, ("--backing-chain", _FLAG), _FORCE_SHARE, "filename"],
    ),
    (
        "check",
        "check an image's consistency",
        cmd_check,
        ["-f", _OUTPUT, ("-r", {"choices": ("leaks", "all")}), ("-q", _FLAG), _FORCE_SHARE]
        + ["filename"],
    ),
    (
        "map",
        "show the allocation of an image",
        cmd_map,
        ["-f", _OUTPUT, ("-s", "--start-offset", {}), ("-l", "--max-length", {}), _FORCE_SHARE]
        + ["filename"],
    ),
    (
        "compare",
        "compare the contents of two images",
        cmd_compare,
        ["-f", "-F", ("-s", _FLAG), ("-p", _FLAG), ("-q", _FLAG), _FORCE_SHARE]
        + ["filename1", "filename2"],
    ),
    (
        "convert",
        "copy an image, changing its format",
        cmd_convert,
        ["-f", "-O", ("-o", {"action": "append"}), "-B", "-F", ("-p", _FLAG), ("-q", _FLAG)]
        + [_FORCE_SHARE, "src", "dst"],
    ),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="qcow2/raw image utility (qemu-img forms)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_text, func, arguments in _COMMANDS:
        cmd = sub.add_parser(name, help=help_text)
        for arg in arguments:
            if isinstance(arg, str):
                cmd.add_argument(arg)
            else:
                cmd.add_argument(*arg[:-1], **arg[-1])
        cmd.set_defaults(func=func)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(args.func(args))
    except ImgError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except BlockError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return 1
