"""The qcow2 codec, byte for byte: headers and extensions, L1/L2 entries, refcounts.

The reference is what QEMU 7.2 writes: images made by ``qemu-img create`` (and
changed by ``qemu-io`` or ``qemu-img convert -c``) are compared with what the
codec builds, and the codec's reading of them with the layout qemu-img uses.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from blockrep.errors import BlockError
from blockrep.qcow2.create import create_file
from blockrep.qcow2.format import (
    COMPRESSED,
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    QEMU_FEATURES,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    FormatError,
    Header,
    compressed_geometry,
    entry_kind,
    parse_header,
    size_to_l1,
)
from blockrep.qcow2.refcount import Refcounts, rc_get, rc_set

MiB = 1 << 20


def qemu(*args: str) -> None:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is not installed; `make test` installs it")
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def qemu_image(path: Path, size: int, *opts: str) -> bytes:
    qemu("qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(size))
    return path.read_bytes()


def fresh_header(size: int, cluster_size: int, version: int = 3, **kw: object) -> Header:
    """The header qemu-img create writes: reftable in cluster 1, L1 in cluster 3."""
    cb = cluster_size.bit_length() - 1
    h = Header(
        version=version,
        cluster_bits=cb,
        size=size,
        l1_size=size_to_l1(size, cb),
        l1_table_offset=3 * cluster_size,
        refcount_table_offset=cluster_size,
        refcount_table_clusters=1,
        **kw,  # type: ignore[arg-type]
    )
    if version == 2:
        h.header_length = 72
    return h


# -- header -----------------------------------------------------------------------

HEADER_CASES = [
    # (id, cluster size, qemu-img options, Header fields)
    ("v3", 65536, (), {}),
    ("v3-4k", 4096, ("-o", "cluster_size=4096"), {}),
    ("v3-512", 512, ("-o", "cluster_size=512"), {}),
    ("v3-2M", 2 * MiB, ("-o", "cluster_size=2M"), {}),
    ("v2", 65536, ("-o", "compat=0.10"), {"version": 2}),
    ("v3-lazy", 65536, ("-o", "lazy_refcounts=on"), {"compatible_features": 1}),
    ("v3-refcount1", 65536, ("-o", "refcount_bits=1"), {"refcount_order": 0}),
    ("v3-refcount64", 65536, ("-o", "refcount_bits=64"), {"refcount_order": 6}),
]


@pytest.mark.parametrize(
    "cs,opts,fields", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_header_packs_as_qemu_img_writes_it(tmp_path, cs, opts, fields):
    size = 5 * MiB
    image = qemu_image(tmp_path / "ref.qcow2", size, *opts)
    ref = image[:cs]
    h = fresh_header(size, cs, **fields)
    packed = h.pack(cs)
    assert packed + bytes(cs - len(packed)) == ref
    parsed = parse_header(ref, len(image))
    assert (parsed.version, parsed.cluster_bits, parsed.size) == (h.version, h.cluster_bits, size)
    assert (parsed.l1_size, parsed.l1_table_offset) == (h.l1_size, 3 * cs)
    assert (parsed.refcount_table_offset, parsed.refcount_table_clusters) == (cs, 1)
    assert parsed.refcount_order == h.refcount_order
    assert parsed.compatible_features == h.compatible_features
    assert parsed.header_length == (72 if h.version == 2 else 112)
    if h.version == 3 and cs > 4096:
        # the feature name table comes back in QEMU's order and names
        assert parsed.feature_names == {(t, b): n for t, b, n in QEMU_FEATURES}
    else:
        assert parsed.feature_names == {}
    # what was read packs to the same bytes again
    again = parsed.pack(cs)
    assert again == packed


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_header_with_backing_file_packs_as_qemu_img_writes_it(tmp_path, version, fmt):
    cs = 65536
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    # -u: qemu-img does not open the backing file, so a raw file may claim to be qcow2
    opts = ["-u", "-b", "base.raw", "-F", fmt]
    if version == 2:
        opts += ["-o", "compat=0.10"]
    ref = qemu_image(tmp_path / "ref.qcow2", MiB, *opts)[:cs]
    h = fresh_header(MiB, cs, version, backing_file="base.raw", backing_format=fmt)
    packed = h.pack(cs)
    assert packed + bytes(cs - len(packed)) == ref
    # the name follows the extensions: header, [backing format], [features], end
    fixed = 72 if version == 2 else 112
    exts = 16 + (8 + 8 * 48 if version == 3 else 0) + 8
    assert h.backing_file_offset == fixed + exts
    assert h.backing_file_size == len("base.raw")
    assert ref[h.backing_file_offset : h.backing_file_offset + 8] == b"base.raw"
    parsed = parse_header(ref, 4 * cs)
    assert parsed.backing_file == "base.raw"
    assert parsed.backing_format == fmt
    assert (parsed.backing_file_offset, parsed.backing_file_size) == (fixed + exts, 8)
    assert parsed.pack(cs) == packed


def test_header_extension_layout():
    h = Header(
        size=MiB,
        l1_size=1,
        l1_table_offset=3 * 65536,
        refcount_table_offset=65536,
        refcount_table_clusters=1,
        backing_format="qcow2",
        unknown_extensions=[(0x12345678, b"abc")],
    )
    b = h.pack(65536)
    pos = 112
    # backing format: type, length, data padded to 8 bytes
    assert b[pos : pos + 16] == struct.pack(">II", EXT_BACKING_FORMAT, 5) + b"qcow2\0\0\0"
    pos += 16
    assert struct.unpack_from(">II", b, pos) == (EXT_FEATURE_TABLE, 8 * 48)
    assert b[pos + 8 : pos + 8 + 48] == b"\0\0dirty bit" + bytes(48 - 11)
    pos += 8 + 8 * 48
    # unknown extensions are kept verbatim, after QEMU's own
    assert b[pos : pos + 16] == struct.pack(">II", 0x12345678, 3) + b"abc" + bytes(5)
    pos += 16
    assert b[pos:] == struct.pack(">II", EXT_END, 0)
    parsed = parse_header(b + bytes(4 * 65536 - len(b)), 4 * 65536)
    assert parsed.unknown_extensions == [(0x12345678, b"abc")]
    assert parsed.backing_format == "qcow2"


def test_compression_type_byte_and_dirty_bit_round_trip():
    h = fresh_header(MiB, 65536, incompatible_features=INCOMPAT_DIRTY)
    fixed = h.pack_fixed()
    assert len(fixed) == 112
    assert struct.unpack_from(">QQQII", fixed, 72) == (INCOMPAT_DIRTY, 0, 0, 4, 112)
    assert fixed[104:] == bytes(8)  # compression type zlib, then padding
    assert parse_header(h.pack(65536) + bytes(4 * 65536), 5 * 65536).incompatible_features == 1


def test_v3_header_of_104_bytes_has_no_compression_type_field():
    h = fresh_header(MiB, 65536, header_length=104)
    assert len(h.pack_fixed()) == 104
    buf = h.pack(65536)
    assert struct.unpack_from(">II", buf, 104)[0] == EXT_FEATURE_TABLE
    assert parse_header(buf + bytes(4 * 65536), 5 * 65536).header_length == 104


# -- whole images -----------------------------------------------------------------

CREATE_CASES = [
    (3 * MiB, 65536, 3, 16, None),
    (0, 65536, 3, 16, None),
    (100 * MiB, 4096, 3, 16, None),
    (MiB, 65536, 2, 16, None),
    (MiB, 65536, 3, 1, None),
    (MiB, 65536, 3, 2, None),
    (MiB, 65536, 3, 4, None),
    (MiB, 65536, 3, 8, None),
    (MiB, 65536, 3, 32, None),
    (MiB, 65536, 3, 64, None),
    (MiB, 512, 3, 16, "base.raw"),
]


@pytest.mark.parametrize("size,cs,version,bits,backing", CREATE_CASES)
def test_create_file_is_qemu_img_create(tmp_path, size, cs, version, bits, backing):
    opts = ["-o", f"cluster_size={cs},refcount_bits={bits}"]
    if version == 2:
        opts = ["-o", f"cluster_size={cs},compat=0.10"]
    if backing:
        (tmp_path / backing).write_bytes(bytes(size))
        opts += ["-b", backing, "-F", "raw"]
    ref = qemu_image(tmp_path / "ref.qcow2", size, *opts)
    ours = tmp_path / "ours.qcow2"
    asyncio.run(
        create_file(
            str(ours),
            size,
            cluster_size=cs,
            backing_file=backing,
            backing_format="raw" if backing else None,
            version=version,
            refcount_bits=bits,
        )
    )
    assert ours.read_bytes() == ref


# -- L1 and L2 entries ------------------------------------------------------------


def test_entry_flags_are_the_spec_bits():
    assert OFLAG_COPIED == 1 << 63
    assert OFLAG_COMPRESSED == 1 << 62
    assert OFLAG_ZERO == 1
    # bits 9..55 hold the host offset; 1..8 are reserved in L2 entries
    assert L1E_OFFSET_MASK == L2E_OFFSET_MASK == ((1 << 56) - 1) & ~511


@pytest.mark.parametrize(
    "entry,version,kind",
    [
        (0, 3, UNALLOCATED),
        (0x50000 | OFLAG_COPIED, 3, NORMAL),
        (0x50000, 3, NORMAL),  # shared (COPIED clear) is still normal
        (OFLAG_ZERO, 3, ZERO_PLAIN),
        (0x50000 | OFLAG_COPIED | OFLAG_ZERO, 3, ZERO_ALLOC),
        (OFLAG_COMPRESSED | 0x50123, 3, COMPRESSED),
        (OFLAG_ZERO, 2, UNALLOCATED),  # v2 has no zero flag
        (0x50000 | OFLAG_ZERO, 2, NORMAL),
    ],
)
def test_entry_kind(entry, version, kind):
    assert entry_kind(entry, version) == kind


@pytest.mark.parametrize("cb", [9, 12, 16, 21])
def test_compressed_entry_geometry(cb):
    x = 62 - (cb - 8)
    for offset, sectors in [(0x30000, 1), (0x30123, 2), ((1 << x) - 1, 1 << (cb - 8))]:
        entry = OFLAG_COMPRESSED | ((sectors - 1) << x) | offset
        assert compressed_geometry(entry & ~OFLAG_COPIED, cb) == (
            offset,
            sectors * 512 - (offset & 511),
        )


def _l2_entries(img: bytes, h: Header) -> list[int]:
    l1 = struct.unpack_from(f">{h.l1_size}Q", img, h.l1_table_offset)
    l2_off = l1[0] & L1E_OFFSET_MASK
    return list(struct.unpack_from(f">{h.l2_entries}Q", img, l2_off))


def test_l2_entries_qemu_io_writes(tmp_path):
    p = tmp_path / "z.qcow2"
    qemu_image(p, MiB)
    qemu(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -P 0x22 128k 64k",
        "-c",
        "write -z 128k 64k",
        str(p),
    )
    img = p.read_bytes()
    h = parse_header(img, len(img))
    e = _l2_entries(img, h)
    assert entry_kind(e[0], 3) == NORMAL and e[0] & OFLAG_COPIED
    assert e[1] == OFLAG_ZERO
    assert entry_kind(e[1], 3) == ZERO_PLAIN
    # zeroing an allocated cluster without unmap keeps its host cluster
    assert entry_kind(e[2], 3) == ZERO_ALLOC
    assert e[2] & ~(L2E_OFFSET_MASK | OFLAG_ZERO) == OFLAG_COPIED
    assert e[3:] == [0] * (len(e) - 3)
    host = e[0] & L2E_OFFSET_MASK
    assert img[host : host + 65536] == b"\x11" * 65536


def test_compressed_entries_qemu_img_writes(tmp_path):
    raw = tmp_path / "src.raw"
    data = b"".join(bytes([i]) * 1000 + bytes(range(256)) * 4 for i in range(70))[: 2 * 65536]
    assert len(data) == 2 * 65536
    raw.write_bytes(data)
    dst = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(dst))
    img = dst.read_bytes()
    h = parse_header(img, len(img))
    for i, entry in enumerate(_l2_entries(img, h)[:2]):
        assert entry_kind(entry, 3) == COMPRESSED
        assert not entry & OFLAG_COPIED
        off, nb = compressed_geometry(entry, h.cluster_bits)
        assert off + nb <= len(img) + 511
        out = zlib.decompressobj(-12).decompress(img[off : off + nb], 65536)
        assert out == data[i * 65536 : (i + 1) * 65536]


# -- refcounts --------------------------------------------------------------------


@pytest.mark.parametrize("order", range(7))
def test_refcount_entry_round_trip_every_width(order):
    bits = 1 << order
    block = bytearray(64)
    n = len(block) * 8 // bits
    top = (1 << bits) - 1
    values = [(i * 0x9E3779B97F4A7C15) & top for i in range(n)]
    values[0], values[-1] = top, 1
    for i, v in enumerate(values):
        rc_set(block, i, order, v)
    assert [rc_get(block, i, order) for i in range(n)] == values
    # writing one entry leaves its neighbours alone
    rc_set(block, 1, order, 0)
    assert rc_get(block, 0, order) == top
    assert [rc_get(block, i, order) for i in range(2, n)] == values[2:]


@pytest.mark.parametrize(
    "order,index,value,expect",
    [
        # sub-byte widths fill each byte from its least significant bit (QEMU's ro0..ro2)
        (0, 0, 1, b"\x01\0"),
        (0, 3, 1, b"\x08\0"),
        (0, 9, 1, b"\0\x02"),
        (1, 1, 3, b"\x0c\0"),
        (1, 5, 2, b"\0\x08"),
        (2, 0, 0xA, b"\x0a\0"),
        (2, 1, 0xA, b"\xa0\0"),
        (2, 3, 0x5, b"\0\x50"),
        # whole-byte widths are big-endian
        (3, 1, 0xAB, b"\0\xab"),
        (4, 0, 0x1234, b"\x12\x34"),
    ],
)
def test_refcount_entry_bytes(order, index, value, expect):
    block = bytearray(len(expect))
    rc_set(block, index, order, value)
    assert bytes(block) == expect


@pytest.mark.parametrize("order,width", [(5, 4), (6, 8)])
def test_wide_refcount_entry_bytes(order, width):
    block = bytearray(3 * width)
    rc_set(block, 1, order, 0x0102030405060708 & ((1 << (8 * width)) - 1))
    assert bytes(block[width : 2 * width]) == bytes(range(9 - width, 9))
    assert bytes(block[:width]) == bytes(width) == bytes(block[2 * width :])


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_block_qemu_img_writes(tmp_path, bits):
    cs = 65536
    img = qemu_image(tmp_path / "r.qcow2", MiB, "-o", f"refcount_bits={bits}")
    h = parse_header(img, len(img))
    assert h.refcount_bits == bits
    reftable = Refcounts.parse_reftable(img[cs : 2 * cs], len(img), cs)
    assert reftable == [2 * cs]
    block = img[2 * cs : 3 * cs]
    # header, refcount table, refcount block and L1 table: one reference each
    assert [rc_get(block, c, h.refcount_order) for c in range(6)] == [1, 1, 1, 1, 0, 0]
    expect = bytearray(cs)
    for c in range(4):
        rc_set(expect, c, h.refcount_order, 1)
    assert block == bytes(expect)


def test_reftable_entries_are_checked():
    cs = 65536
    with pytest.raises(BlockError, match=r"Refcount block 1 offset 0x30200 is not aligned"):
        Refcounts.parse_reftable(struct.pack(">QQ", 2 * cs, 3 * cs + 512), 8 * cs, cs)
    with pytest.raises(BlockError, match=r"Refcount block 0 at 0x80000 lies beyond the end"):
        Refcounts.parse_reftable(struct.pack(">Q", 8 * cs), 8 * cs, cs)
    assert Refcounts.parse_reftable(struct.pack(">QQQ", 2 * cs, 0, 0), 8 * cs, cs) == [2 * cs]


# -- malformed headers ------------------------------------------------------------


def _valid() -> bytearray:
    h = fresh_header(MiB, 65536)
    b = h.pack(65536)
    return bytearray(b + bytes(4 * 65536 - len(b)))


def _with(offset: int, fmt: str, value: int) -> bytes:
    b = _valid()
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


MALFORMED = [
    (b"QFI\xfa" + bytes(200), "Image is not in qcow2 format"),
    (b"QFI\xfb" + bytes(20), "Could not read qcow2 header: Input/output error"),
    (_with(4, ">I", 4), "Unsupported qcow2 version 4"),
    (_with(20, ">I", 8), r"Unsupported cluster size: 2\^8"),
    (_with(20, ">I", 22), r"Unsupported cluster size: 2\^22"),
    (_with(96, ">I", 7), "Reference count entry width too large; may not exceed 64 bits"),
    (_with(100, ">I", 100), "qcow2 header too short"),
    (_with(72, ">Q", 1 << 2), "Unsupported qcow2 feature[(]s[)]: external data file"),
    (_with(72, ">Q", 1 << 40), "Unknown incompatible feature: 10000000000"),
    (_with(104, ">B", 1), "Unknown compression type '1'"),
    (_with(32, ">I", 1), "qcow2 encryption is not supported by blockrep"),
    (_with(36, ">I", 0), "L1 table is too small"),
    (_with(40, ">Q", 3 * 65536 + 8), "Invalid L1 table offset"),
    (_with(48, ">Q", 64 * 65536), "Invalid reference count table offset: reference count"),
    (_with(56, ">I", 0), "Image does not contain a reference count table"),
    (_with(116, ">I", 1 << 20), r"Invalid header extension 0x6803f857: length 1048576 too large"),
]


@pytest.mark.parametrize("buf,message", MALFORMED)
def test_malformed_header_is_refused(buf, message):
    with pytest.raises(FormatError, match=message):
        parse_header(buf, max(len(buf), 4 * 65536))


def test_backing_file_name_checks():
    b = _valid()
    struct.pack_into(">QI", b, 8, 600, 2000)
    with pytest.raises(FormatError, match="Backing file name too long"):
        parse_header(bytes(b), len(b))
    struct.pack_into(">QI", b, 8, 65536 - 4, 8)
    with pytest.raises(FormatError, match="Could not read backing file name: beyond end of file"):
        parse_header(bytes(b[:65536]), 65536)
    b = _valid()
    struct.pack_into(">QI", b, 8, 600, 2)
    b[600:602] = b"\xff\xfe"
    with pytest.raises(FormatError, match="Backing file name is not valid UTF-8"):
        parse_header(bytes(b), len(b))


def test_header_that_does_not_fit_a_cluster_is_refused():
    h = fresh_header(MiB, 512, backing_file="x" * 400)
    with pytest.raises(FormatError, match="do not fit in one cluster"):
        h.pack(512)
    assert len(h.pack()) > 512  # without a cluster size there is no limit
