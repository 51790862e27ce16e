"""qcow2 on-disk structures, parsed and built without I/O (docs/interop/qcow2.txt).

Everything here is a pure function of bytes, so the codec is tested byte for byte
and every check of a hostile header happens before a single table is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
# What QEMU 7.2 writes: the v3 header plus compression_type and 7 bytes of padding.
QEMU_HEADER_LEN = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023

# L1/L2 entry bits
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_SUPPORTED = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_TYPE_INCOMPAT, FEATURE_TYPE_COMPAT, FEATURE_TYPE_AUTOCLEAR = 0, 1, 2

# The feature name table QEMU 7.2 writes into every v3 image, in its order.
QEMU_FEATURES: list[tuple[int, int, str]] = [
    (FEATURE_TYPE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPAT, 2, "external data file"),
    (FEATURE_TYPE_INCOMPAT, 3, "compression type"),
    (FEATURE_TYPE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
]

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


class FormatError(Exception):
    """The file is not a qcow2 image we can open; the message says why."""


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = QEMU_HEADER_LEN
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    # extensions we do not interpret, kept verbatim (type, data) as QEMU does
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack_fixed(self) -> bytes:
        """The fixed part of the header (72 bytes for v2, header_length for v3)."""
        b = _V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return b
        b += _V3.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        if self.header_length > V3_HEADER_LEN:
            b += bytes([self.compression_type]) + bytes(self.header_length - V3_HEADER_LEN - 1)
        return b

    def pack(self, cluster_size: int | None = None) -> bytes:
        """Header, extensions, end marker and backing file name, as QEMU lays them out.

        Sets ``backing_file_offset``/``backing_file_size`` to where the name lands.
        """
        exts = b""
        if self.backing_format:
            exts += _ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        # QEMU 7.2 leaves the feature name table out of images with clusters of
        # 4 KiB and less, so that a backing file name still fits in cluster 0.
        if self.version >= 3 and (cluster_size is None or cluster_size > 4096):
            table = b"".join(
                struct.pack(">BB46s", t, bit, name.encode()) for t, bit, name in QEMU_FEATURES
            )
            exts += _ext(EXT_FEATURE_TABLE, table)
        for etype, data in self.unknown_extensions:
            exts += _ext(etype, data)
        exts += struct.pack(">II", EXT_END, 0)
        fixed_len = V2_HEADER_LEN if self.version == 2 else self.header_length
        name = (self.backing_file or "").encode()
        if name:
            self.backing_file_offset = fixed_len + len(exts)
            self.backing_file_size = len(name)
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        out = self.pack_fixed() + exts + name
        if cluster_size is not None and len(out) > cluster_size:
            raise FormatError("Header and backing file name do not fit in one cluster")
        return out


def _ext(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack(">II", etype, len(data)) + data + bytes(pad)


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and sanity-check a qcow2 header from the first cluster of a file.

    ``buf`` must hold at least the first min(file_size, 2 MiB) bytes. Every field
    that later sizes an allocation or a read is bounded here.
    """
    if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
        if buf[:4] == MAGIC:
            raise FormatError("Could not read qcow2 header: Input/output error")
        raise FormatError("Image is not in qcow2 format")
    f = _V2.unpack_from(buf, 0)
    h = Header(
        version=f[1],
        backing_file_offset=f[2],
        backing_file_size=f[3],
        cluster_bits=f[4],
        size=f[5],
        crypt_method=f[6],
        l1_size=f[7],
        l1_table_offset=f[8],
        refcount_table_offset=f[9],
        refcount_table_clusters=f[10],
        nb_snapshots=f[11],
        snapshots_offset=f[12],
    )
    if h.version not in (2, 3):
        raise FormatError(f"Unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    cs = h.cluster_size
    if h.version == 2:
        h.header_length = V2_HEADER_LEN
        h.refcount_order = 4
    else:
        if len(buf) < V3_HEADER_LEN:
            raise FormatError("Could not read qcow2 header: Input/output error")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LEN)
        if h.header_length < V3_HEADER_LEN:
            raise FormatError("qcow2 header too short")
        if h.header_length > cs:
            raise FormatError("qcow2 header exceeds cluster size")
        if h.header_length > V3_HEADER_LEN and len(buf) > V3_HEADER_LEN:
            h.compression_type = buf[V3_HEADER_LEN]
    if len(buf) < h.header_length:
        raise FormatError("Could not read qcow2 header: Input/output error")
    if h.refcount_order > 6:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")
    ext_end = h.backing_file_offset if h.backing_file_offset else cs
    if h.backing_file_offset > cs:
        ext_end = cs
    _parse_extensions(h, buf[: min(len(buf), cs)], h.header_length, ext_end)
    unknown = h.incompatible_features & ~INCOMPAT_SUPPORTED
    if unknown:
        raise FormatError("Unsupported qcow2 feature(s): " + _feature_list(h, unknown))
    if h.compression_type != 0:
        raise FormatError(f"Unknown compression type '{h.compression_type}'")
    if h.crypt_method:
        raise FormatError("qcow2 encryption is not supported by blockrep")
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_offset > cs:
            raise FormatError("Backing file name too long")
        end = h.backing_file_offset + h.backing_file_size
        if end > len(buf) or end > file_size:
            raise FormatError("Could not read backing file name: beyond end of file")
        raw = buf[h.backing_file_offset : end]
        try:
            h.backing_file = raw.decode()
        except UnicodeDecodeError:
            raise FormatError("Backing file name is not valid UTF-8") from None
    if h.size > (1 << 62):
        raise FormatError("Image size too large")
    # L1 table
    if h.l1_size > MAX_L1_BYTES // 8:
        raise FormatError("Active L1 table too large")
    if h.l1_size < size_to_l1(h.size, h.cluster_bits):
        raise FormatError("L1 table is too small")
    if h.l1_size:
        _check_table(h.l1_table_offset, h.l1_size * 8, cs, file_size, "L1 table")
    # refcount table
    if h.refcount_table_clusters == 0:
        raise FormatError("Image does not contain a reference count table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise FormatError("Reference count table too large")
    _check_table(
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        cs,
        file_size,
        "reference count table",
    )
    if h.nb_snapshots:
        _check_table(h.snapshots_offset, h.nb_snapshots * 40, cs, file_size, "snapshot table")
    return h


def _check_table(offset: int, nbytes: int, cs: int, file_size: int, what: str) -> None:
    if offset % cs:
        raise FormatError(f"Invalid {what} offset")
    if offset == 0:
        raise FormatError(f"Invalid {what} offset")
    if offset + nbytes > file_size:
        raise FormatError(
            f"Invalid {what} offset: {what} at {offset:#x} (+{nbytes} bytes) lies beyond "
            f"the end of the file ({file_size} bytes)"
        )


def _feature_list(h: Header, mask: int) -> str:
    names = []
    for bit in range(64):
        if mask & (1 << bit):
            name = h.feature_names.get((FEATURE_TYPE_INCOMPAT, bit))
            names.append(name if name else f"Unknown incompatible feature: {1 << bit:x}")
    return ", ".join(names)


def _parse_extensions(h: Header, buf: bytes, start: int, end: int) -> None:
    if h.version == 2:
        start = V2_HEADER_LEN
    pos = start
    while pos + 8 <= min(end, len(buf)):
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            return
        if pos + elen > end or pos + elen > len(buf):
            raise FormatError(f"Invalid header extension 0x{etype:x}: length {elen} too large")
        data = bytes(buf[pos : pos + elen])
        if etype == EXT_BACKING_FORMAT:
            if elen > 1023:
                raise FormatError(f"ERROR: ext_backing_format: len={elen} too large")
            h.backing_format = data.decode(errors="replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, elen - elen % 48, 48):
                t, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode(errors="replace")
                h.feature_names[(t, bit)] = name
        elif etype in (EXT_DATA_FILE, EXT_CRYPTO):
            h.unknown_extensions.append((etype, data))
        elif etype == EXT_BITMAPS:
            pass  # bitmaps are dropped; the autoclear bit is cleared on a writable open
        else:
            h.unknown_extensions.append((etype, data))
        pos += elen + ((-elen) % 8)


def size_to_l1(size: int, cluster_bits: int) -> int:
    """L1 entries needed for a virtual size (each L2 table maps cs/8 clusters)."""
    shift = cluster_bits + (cluster_bits - 3)
    return (size + (1 << shift) - 1) >> shift


# What an L2 entry maps a guest cluster to (QEMU's QCow2ClusterType)
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED = range(5)


def entry_kind(entry: int, version: int) -> int:
    """The cluster type of an L2 entry; v2 images have no zero flag."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if version >= 3 and entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return NORMAL
    return UNALLOCATED


def compressed_geometry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster's data from its L2 entry."""
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)
