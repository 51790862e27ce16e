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
from ..block.file import FileNode
from ..block.graph import probe_format
from ..block.node import Extent, Node, is_zero
from ..block.options import parse_size, split_keyval
from ..block.qcow2 import Qcow2Node
from ..block.qcow2 import create as qcow2_create
from ..errors import BlockError, OptionError
from ..qcow2.check import check_image
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
    with open(filename, "wb"):
        pass
    graph = Graph()
    try:
        f = await graph.add({"driver": "file", "filename": filename})
        await qcow2_create(
            f,
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
    finally:
        await graph.close_all()


async def cmd_create(a: argparse.Namespace) -> int:
    opts = parse_o("\0".join(a.o or []))
    size = parse_img_size(a.size) if a.size is not None else None
    await create_image(a.filename, a.f or "raw", size, opts, a.b, a.F, a.q)
    return 0


# -- info -------------------------------------------------------------------------


def image_info(node: Node, filename: str) -> dict[str, Any]:
    f = node.file
    info: dict[str, Any] = {
        "virtual-size": node.length,
        "filename": filename,
        "format": node.driver_name,
    }
    if isinstance(f, FileNode):
        info["actual-size"] = f.allocated_size()
    info.update(node.info())
    if isinstance(node, Qcow2Node) and node.h.backing_file:
        bf = node.h.backing_file
        info["backing-filename"] = bf
        b = node.backing
        info["full-backing-filename"] = b.describe_filename() if b is not None else bf
        if node.h.backing_format:
            info["backing-filename-format"] = node.h.backing_format
    info["dirty-flag"] = False
    return info


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
            infos.append(image_info(cur, name))
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
        res = await check_image(node, repair=bool(fix))
        if fix:
            after = await check_image(node)
            res.corruptions_fixed = res.corruptions - after.corruptions
            res.leaks_fixed = res.leaks - after.leaks
            res.corruptions, res.leaks = after.corruptions, after.leaks
            # QEMU reports the statistics of the double check after a repair
            for k in (
                "image_end_offset",
                "total_clusters",
                "allocated_clusters",
                "fragmented_clusters",
                "compressed_clusters",
                "check_errors",
            ):
                setattr(res, k, getattr(after, k))
    finally:
        await graph.close_all()
    if a.output == "json":
        out: dict[str, Any] = {
            "filename": a.filename,
            "format": "qcow2",
            "check-errors": res.check_errors,
        }
        for key, val in (
            ("image-end-offset", res.image_end_offset),
            ("corruptions", res.corruptions),
            ("leaks", res.leaks),
            ("corruptions-fixed", res.corruptions_fixed),
            ("leaks-fixed", res.leaks_fixed),
            ("total-clusters", res.total_clusters),
            ("allocated-clusters", res.allocated_clusters),
            ("fragmented-clusters", res.fragmented_clusters),
            ("compressed-clusters", res.compressed_clusters),
        ):
            if val:
                out[key] = val
        print(dumps_pretty(out))
    else:
        for m in res.messages:
            print(m, file=sys.stderr)
        if not a.q:
            _print_check_human(res)
    if res.check_errors:
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


def _print_check_human(res: Any) -> None:
    if res.corruptions_fixed or res.leaks_fixed:
        print(
            f"The following inconsistencies were found and repaired:\n\n"
            f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now..."
        )
    if not (res.corruptions or res.leaks or res.check_errors):
        print("No errors were found on the image.")
    else:
        if res.corruptions:
            print(
                f"\n{res.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it."
            )
        if res.leaks:
            print(
                f"\n{res.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data."
            )
    if res.total_clusters and res.allocated_clusters:
        t = res.total_clusters
        print(
            "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters"
            % (
                res.allocated_clusters,
                t,
                res.allocated_clusters * 100.0 / t,
                res.fragmented_clusters * 100.0 / res.allocated_clusters,
                res.compressed_clusters * 100.0 / res.allocated_clusters,
            )
        )
    if res.image_end_offset:
        print(f"Image end offset: {res.image_end_offset}")


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
        pos = 0
        while pos < common:
            n = min(CHUNK, common - pos)
            d1, d2 = await n1.read(pos, n), await n2.read(pos, n)
            if d1 != d2:
                off = pos + _first_diff(d1, d2)
                progress.done()
                if not a.q:
                    print(f"Content mismatch at offset {off}!")
                return 1
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
                    off = pos + _first_diff(d, bytes(len(d)))
                    progress.done()
                    if not a.q:
                        print(f"Content mismatch at offset {off}!")
                    return 1
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="qcow2/raw image utility (qemu-img forms)")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("create", help="create an image")
    c.add_argument("-f")
    c.add_argument("-b")
    c.add_argument("-F")
    c.add_argument("-o", action="append")
    c.add_argument("-q", action="store_true")
    c.add_argument("-u", action="store_true")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("info", help="show image information")
    i.add_argument("-f")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("-U", "--force-share", dest="U", action="store_true")
    i.add_argument("filename")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("check", help="check an image's consistency")
    k.add_argument("-f")
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-r", choices=("leaks", "all"))
    k.add_argument("-q", action="store_true")
    k.add_argument("-U", "--force-share", dest="U", action="store_true")
    k.add_argument("filename")
    k.set_defaults(func=cmd_check)

    m = sub.add_parser("map", help="show the allocation of an image")
    m.add_argument("-f")
    m.add_argument("--output", choices=("human", "json"), default="human")
    m.add_argument("-s", "--start-offset")
    m.add_argument("-l", "--max-length")
    m.add_argument("-U", "--force-share", dest="U", action="store_true")
    m.add_argument("filename")
    m.set_defaults(func=cmd_map)

    cp = sub.add_parser("compare", help="compare the contents of two images")
    cp.add_argument("-f")
    cp.add_argument("-F")
    cp.add_argument("-s", action="store_true")
    cp.add_argument("-p", action="store_true")
    cp.add_argument("-q", action="store_true")
    cp.add_argument("-U", "--force-share", dest="U", action="store_true")
    cp.add_argument("filename1")
    cp.add_argument("filename2")
    cp.set_defaults(func=cmd_compare)

    cv = sub.add_parser("convert", help="copy an image, changing its format")
    cv.add_argument("-f")
    cv.add_argument("-O")
    cv.add_argument("-o", action="append")
    cv.add_argument("-B")
    cv.add_argument("-F")
    cv.add_argument("-p", action="store_true")
    cv.add_argument("-q", action="store_true")
    cv.add_argument("-U", "--force-share", dest="U", action="store_true")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.set_defaults(func=cmd_convert)
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
