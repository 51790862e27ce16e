"""The NBD protocol (NetworkBlockDevice/nbd doc/proto.md): constants and codecs.

No I/O here: every message is built or parsed by a pure function, so the wire
format is tested byte for byte and the server/client only move bytes.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from ..errors import ProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
# for messages: CMD_READ -> "READ"
CMD_NAMES = {
    v: k[4:] for k, v in dict(globals()).items() if k.startswith("CMD_") and isinstance(v, int)
}
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# base:allocation
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
META_BASE_ALLOCATION = "base:allocation"

# errors on the wire
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

MAX_BUFFER = 32 << 20  # largest READ/WRITE payload a server accepts (as QEMU)
MAX_STRING = 4096  # names, descriptions, queries
MAX_OPTION_LEN = 64 << 10

HEADER = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length


# each protocol error and the host errno it stands for; other host errnos map
# onto these (the spec: anything unknown is EINVAL)
_NBD_ERRNO = {
    NBD_EPERM: errno.EPERM,
    NBD_EIO: errno.EIO,
    NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL,
    NBD_ENOSPC: errno.ENOSPC,
    NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.ENOTSUP,
    NBD_ESHUTDOWN: errno.ESHUTDOWN,
}
_ERRNO_NBD = {
    **{host: nbd for nbd, host in _NBD_ERRNO.items()},
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EFBIG: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
}


def errno_to_nbd(err: int) -> int:
    """Map a host errno to the few the protocol knows (unknown → EINVAL, as the spec says)."""
    return _ERRNO_NBD.get(err, NBD_EINVAL)


def nbd_to_errno(err: int) -> int:
    return _NBD_ERRNO.get(err, errno.EIO)


@dataclass
class Request:
    flags: int
    type: int
    handle: int
    offset: int
    length: int


def parse_request(buf: bytes) -> Request:
    """Parse a 28-byte request header; raises ValueError on a bad magic."""
    magic, flags, typ, handle, offset, length = REQUEST.unpack(buf)
    if magic != REQUEST_MAGIC:
        raise ValueError(f"bad request magic {magic:#x}")
    return Request(flags, typ, handle, offset, length)


def pack_request(typ: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, typ, handle, offset, length)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def pack_simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def pack_chunk(handle: int, typ: int, payload: bytes = b"", flags: int = REPLY_FLAG_DONE) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, typ, handle, len(payload)) + payload


def pack_error_chunk(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return pack_chunk(handle, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


def pack_info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_name_list(name: str) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n


# -- handshake messages -------------------------------------------------------------


def pack_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    """The server's first bytes in the fixed newstyle handshake."""
    return HEADER.pack(NBDMAGIC, IHAVEOPT, flags)


def pack_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: no option-reply header, 124 zero bytes of
    padding unless the client set NBD_FLAG_C_NO_ZEROES."""
    reply = struct.pack(">QH", size, flags)
    return reply if no_zeroes else reply + bytes(124)


def pack_server_reply(name: str, description: str) -> bytes:
    """NBD_REP_SERVER payload: the name with its length, then the description to the end."""
    return pack_name_list(name) + description.encode()


def pack_info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def pack_info_description(description: str) -> bytes:
    return struct.pack(">H", INFO_DESCRIPTION) + description.encode()


def pack_meta_context(context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT payload."""
    return struct.pack(">I", context_id) + name.encode()


# -- structured reply chunks ----------------------------------------------------------


def pack_offset_data_header(handle: int, offset: int, length: int) -> bytes:
    """Everything of an NBD_REPLY_TYPE_OFFSET_DATA chunk before its ``length`` data
    bytes, so a large read is sent without joining header and data."""
    return CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + length
    ) + struct.pack(">Q", offset)


def pack_offset_hole(handle: int, offset: int, length: int, flags: int = REPLY_FLAG_DONE) -> bytes:
    return pack_chunk(handle, REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), flags)


def pack_block_status(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS with (length, flags) descriptors."""
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents
    )
    return pack_chunk(handle, REPLY_TYPE_BLOCK_STATUS, payload)


# The chunk parsers raise struct.error on a payload too short for its type; the
# client counts that as a broken connection.


def parse_offset_data(payload: bytes) -> tuple[int, bytes]:
    (offset,) = struct.unpack(">Q", payload[:8])
    return offset, payload[8:]


def parse_offset_hole(payload: bytes) -> tuple[int, int]:
    offset, length = struct.unpack(">QI", payload[:12])
    return offset, length


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """The context id and the (length, flags) descriptors; a trailing partial one is ignored."""
    (context_id,) = struct.unpack(">I", payload[:4])
    extents = []
    for i in range(4, len(payload) - 7, 8):
        length, flags = struct.unpack(">II", payload[i : i + 8])
        extents.append((length, flags))
    return context_id, extents


def parse_error_chunk(payload: bytes) -> tuple[int, str]:
    """NBD_REPLY_TYPE_ERROR{,_OFFSET}: the NBD errno and the message."""
    err, mlen = struct.unpack(">IH", payload[:6])
    return err, payload[6 : 6 + mlen].decode(errors="replace")


class ParseError(ProtocolError):
    """An option payload that does not follow the protocol (answered with ERR_INVALID)."""


class Reader:
    """Bounded cursor over an option payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ParseError("option payload too short")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> str:
        n = self.u32()
        if n > MAX_STRING:
            raise ParseError("string too long")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise ParseError("string is not UTF-8") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ParseError("trailing bytes in option payload")


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO payload: export name and requested info types."""
    r = Reader(data)
    name = r.string()
    n = r.u16()
    infos = [r.u16() for _ in range(n)]
    r.done()
    return name, infos


def pack_info_request(name: str, infos: list[int]) -> bytes:
    return pack_name_list(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT payload: export name and queries."""
    r = Reader(data)
    name = r.string()
    n = r.u32()
    if n > 256:
        raise ParseError("too many queries")
    queries = [r.string() for _ in range(n)]
    r.done()
    return name, queries


def pack_meta_request(name: str, queries: list[str]) -> bytes:
    return (
        pack_name_list(name)
        + struct.pack(">I", len(queries))
        + b"".join(pack_name_list(q) for q in queries)
    )
