"""The NBD codec (nbd/proto) and the server's sans-I/O handshake, byte for byte.

Expected bytes are written from the NBD spec (NetworkBlockDevice/nbd doc/proto.md)
with literal numbers, not the module's constants, so a wrong constant fails here.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest

from blockrep.address import SocketAddress
from blockrep.errors import OptionError, ProtocolError
from blockrep.nbd import proto as p
from blockrep.nbd.handshake import (
    Abort,
    ExportChosen,
    NeedData,
    ServerHandshake,
    StartTLS,
    transmission_flags,
)
from blockrep.tls import peer_dn

IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
REQUEST_MAGIC = bytes.fromhex("25609513")
SIMPLE_REPLY_MAGIC = bytes.fromhex("67446698")
STRUCTURED_REPLY_MAGIC = bytes.fromhex("668e33ef")
NBD_REP_ERR = 1 << 31


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def option(opt: int, data: bytes = b"") -> bytes:
    """A client's option request as the spec lays it out."""
    return IHAVEOPT + u32(opt) + u32(len(data)) + data


def opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + u32(opt) + u32(rep) + u32(len(data)) + data


# -- constants and fixed messages ------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert p.pack_greeting() == b"NBDMAGIC" + IHAVEOPT + b"\x00\x03"
    assert p.pack_greeting(1) == b"NBDMAGIC" + IHAVEOPT + b"\x00\x01"


def test_option_request_and_reply_headers() -> None:
    assert p.pack_option(7, b"abc") == IHAVEOPT + b"\x00\x00\x00\x07\x00\x00\x00\x03abc"
    assert p.pack_option(5) == IHAVEOPT + u32(5) + u32(0)
    assert p.pack_option_reply(3, 1) == OPT_REPLY_MAGIC + u32(3) + u32(1) + u32(0)
    assert p.pack_option_reply(7, NBD_REP_ERR | 6, b"no") == (
        OPT_REPLY_MAGIC + u32(7) + b"\x80\x00\x00\x06" + u32(2) + b"no"
    )


def test_reply_type_constants_follow_the_spec() -> None:
    assert (p.REP_ACK, p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT) == (1, 2, 3, 4)
    errors = [p.REP_ERR_UNSUP, p.REP_ERR_POLICY, p.REP_ERR_INVALID, p.REP_ERR_PLATFORM]
    errors += [p.REP_ERR_TLS_REQD, p.REP_ERR_UNKNOWN, p.REP_ERR_SHUTDOWN]
    errors += [p.REP_ERR_BLOCK_SIZE_REQD, p.REP_ERR_TOO_BIG]
    assert errors == [NBD_REP_ERR | n for n in range(1, 10)]
    assert (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE) == (1, 2)
    assert (p.REPLY_TYPE_BLOCK_STATUS, p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET) == (
        5,
        32769,
        32770,
    )


def test_info_replies() -> None:
    # NBD_INFO_EXPORT: type 0, size u64, transmission flags u16
    assert p.pack_info_export(1 << 30, 0x0D) == b"\x00\x00" + u64(1 << 30) + b"\x00\x0d"
    # NBD_INFO_BLOCK_SIZE: type 3, minimum, preferred, maximum
    assert p.pack_info_block_size(1, 4096, 32 << 20) == (
        b"\x00\x03" + u32(1) + u32(4096) + u32(32 << 20)
    )
    assert p.pack_info_name("disk") == b"\x00\x01disk"
    assert p.pack_info_description("a disk") == b"\x00\x02a disk"


def test_server_and_meta_context_payloads() -> None:
    assert p.pack_server_reply("disk", "desc") == u32(4) + b"disk" + b"desc"
    assert p.pack_meta_context(0, "base:allocation") == u32(0) + b"base:allocation"


def test_export_name_reply_padding() -> None:
    assert p.pack_export_name_reply(4096, 3, no_zeroes=True) == u64(4096) + u16(3)
    padded = p.pack_export_name_reply(4096, 3, no_zeroes=False)
    assert padded == u64(4096) + u16(3) + bytes(124) and len(padded) == 134


def test_info_request_round_trip() -> None:
    raw = u32(4) + b"disk" + u16(2) + u16(1) + u16(3)
    assert p.pack_info_request("disk", [1, 3]) == raw
    assert p.parse_info_request(raw) == ("disk", [1, 3])
    with pytest.raises(p.ParseError, match="trailing bytes"):
        p.parse_info_request(raw + b"x")
    with pytest.raises(p.ParseError, match="too short"):
        p.parse_info_request(u32(10) + b"disk")
    with pytest.raises(p.ParseError, match="too long"):
        p.parse_info_request(u32(4097) + bytes(4097) + u16(0))
    with pytest.raises(p.ParseError, match="not UTF-8"):
        p.parse_info_request(u32(1) + b"\xff" + u16(0))


def test_meta_request_round_trip() -> None:
    raw = u32(1) + b"d" + u32(2) + u32(5) + b"base:" + u32(15) + b"base:allocation"
    assert p.pack_meta_request("d", ["base:", "base:allocation"]) == raw
    assert p.parse_meta_request(raw) == ("d", ["base:", "base:allocation"])
    with pytest.raises(p.ParseError, match="too many queries"):
        p.parse_meta_request(u32(0) + u32(257))


# -- transmission -------------------------------------------------------------------------


def test_request_header_encode_and_parse() -> None:
    raw = REQUEST_MAGIC + u16(1) + u16(1) + u64(0xABCD) + u64(4096) + u32(512)
    assert p.pack_request(1, 0xABCD, 4096, 512, flags=1) == raw
    assert len(raw) == p.REQUEST.size == 28
    assert p.parse_request(raw) == p.Request(
        flags=1, type=1, handle=0xABCD, offset=4096, length=512
    )
    with pytest.raises(ValueError, match="bad request magic 0x25609514"):
        p.parse_request(bytes.fromhex("25609514") + raw[4:])


def test_command_numbers() -> None:
    cmds = (p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_CACHE)
    assert cmds + (p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS) == tuple(range(8))


def test_simple_reply() -> None:
    assert p.pack_simple_reply(7) == SIMPLE_REPLY_MAGIC + u32(0) + u64(7)
    assert p.pack_simple_reply(7, 28) == SIMPLE_REPLY_MAGIC + u32(28) + u64(7)


def chunk(flags: int, typ: int, handle: int, payload: bytes) -> bytes:
    return (
        STRUCTURED_REPLY_MAGIC + u16(flags) + u16(typ) + u64(handle) + u32(len(payload)) + payload
    )


def test_offset_data_chunk() -> None:
    data = b"x" * 10
    head = p.pack_offset_data_header(9, 4096, len(data))
    assert head + data == chunk(1, 1, 9, u64(4096) + data)
    assert p.parse_offset_data(u64(4096) + data) == (4096, data)


def test_offset_hole_chunk() -> None:
    assert p.pack_offset_hole(9, 8192, 512) == chunk(1, 2, 9, u64(8192) + u32(512))
    assert p.pack_offset_hole(9, 0, 1, flags=0) == chunk(0, 2, 9, u64(0) + u32(1))
    assert p.parse_offset_hole(u64(8192) + u32(512)) == (8192, 512)


def test_block_status_chunk() -> None:
    raw = p.pack_block_status(3, 0, [(4096, 0), (8192, 3)])
    assert raw == chunk(1, 5, 3, u32(0) + u32(4096) + u32(0) + u32(8192) + u32(3))
    # a trailing partial descriptor is not an extent
    payload = u32(1) + u32(4096) + u32(2) + b"\x00\x00"
    assert p.parse_block_status(payload) == (1, [(4096, 2)])


def test_error_chunk() -> None:
    raw = p.pack_error_chunk(4, 5, "I/O error")
    assert raw == chunk(1, 32769, 4, u32(5) + u16(9) + b"I/O error")
    assert p.parse_error_chunk(u32(5) + u16(9) + b"I/O error") == (5, "I/O error")
    long = p.pack_error_chunk(4, 22, "m" * 5000)
    assert len(long) == 20 + 6 + 4096  # the message is cut to the string limit
    assert p.pack_chunk(4, 0) == chunk(1, 0, 4, b"")


@pytest.mark.parametrize(
    ("nbd", "host"),
    [
        (1, errno.EPERM),
        (5, errno.EIO),
        (12, errno.ENOMEM),
        (22, errno.EINVAL),
        (28, errno.ENOSPC),
        (75, errno.EOVERFLOW),
        (95, errno.ENOTSUP),
        (108, errno.ESHUTDOWN),
    ],
)
def test_errno_mapping_both_ways(nbd: int, host: int) -> None:
    assert p.nbd_to_errno(nbd) == host
    assert p.errno_to_nbd(host) == nbd


def test_errno_mapping_of_other_values() -> None:
    assert p.errno_to_nbd(errno.EROFS) == 1
    assert p.errno_to_nbd(errno.EACCES) == 1
    assert p.errno_to_nbd(errno.EFBIG) == 28
    assert p.errno_to_nbd(errno.EDQUOT) == 28
    assert p.errno_to_nbd(errno.ENOENT) == 22  # the spec: unknown errors are EINVAL
    assert p.nbd_to_errno(99) == errno.EIO


def test_transmission_flags() -> None:
    # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_DF, CAN_MULTI_CONN, SEND_CACHE
    common = 1 | 4 | 8 | 128 | 256 | 1024
    assert transmission_flags(False) == common | 2  # READ_ONLY
    assert transmission_flags(True) == common | 32 | 64 | 2048  # TRIM, WRITE_ZEROES, FAST_ZERO


# -- the sans-I/O handshake ---------------------------------------------------------------


@dataclass
class FakeExport:
    name: str
    size: int = 1 << 20
    writable: bool = False
    description: str = ""


def negotiate(hs: ServerHandshake, data: bytes) -> tuple[object, bytes]:
    """Feed ``data`` as the handshake asks for it; the first event that is not
    NeedData (or NeedData when the bytes run out) and everything sent so far."""
    sent = b""
    pos = 0
    while True:
        event = hs.next_event()
        sent += hs.data_to_send()
        if not isinstance(event, NeedData) or pos == len(data):
            return event, sent
        take = data[pos : pos + event.nbytes]
        pos += len(take)
        hs.receive_data(take)


CLIENT_FLAGS = u32(3)  # FIXED_NEWSTYLE | NO_ZEROES


def started(exports: dict[str, FakeExport], tls: bool = False) -> ServerHandshake:
    hs = ServerHandshake(exports, tls=tls)
    event, sent = negotiate(hs, CLIENT_FLAGS)
    assert sent == b"NBDMAGIC" + IHAVEOPT + b"\x00\x03"
    assert event == NeedData(16)
    return hs


def test_handshake_asks_for_exact_byte_counts() -> None:
    hs = ServerHandshake({})
    assert hs.next_event() == NeedData(4)
    assert hs.data_to_send() == b"NBDMAGIC" + IHAVEOPT + b"\x00\x03"
    hs.receive_data(b"\x00\x00")
    assert hs.next_event() == NeedData(2)
    hs.receive_data(b"\x00\x01")
    assert hs.next_event() == NeedData(16)
    assert hs.no_zeroes is False
    hs.receive_data(option(3, b"xyz")[:16])
    assert hs.next_event() == NeedData(3)


def test_unknown_client_flags_end_the_connection() -> None:
    hs = ServerHandshake({})
    with pytest.raises(ProtocolError, match="unknown client flags 0x4"):
        negotiate(hs, u32(4))


def test_opt_list() -> None:
    exports = {"a": FakeExport("a", description="first"), "b": FakeExport("b")}
    event, sent = negotiate(started(exports), option(3))
    assert event == NeedData(16)
    assert sent == (
        opt_reply(3, 2, u32(1) + b"a" + b"first") + opt_reply(3, 2, u32(1) + b"b") + opt_reply(3, 1)
    )
    _, sent = negotiate(started(exports), option(3, b"x"))
    assert sent == opt_reply(3, NBD_REP_ERR | 3, b"NBD_OPT_LIST must have no payload")


def test_opt_go_unknown_export() -> None:
    hs = started({"disk": FakeExport("disk")})
    event, sent = negotiate(hs, option(7, u32(4) + b"nope" + u16(0)))
    assert event == NeedData(16)
    assert sent == opt_reply(7, NBD_REP_ERR | 6, b"export 'nope' not present")


def test_opt_go_replies_and_chooses_the_export() -> None:
    disk = FakeExport("disk", size=1 << 30, writable=True, description="the disk")
    hs = started({"disk": disk, "other": FakeExport("other")})
    event, sent = negotiate(hs, option(7, u32(4) + b"disk" + u16(2) + u16(1) + u16(2)))
    assert event == ExportChosen(disk)
    flags = 1 | 4 | 8 | 128 | 256 | 1024 | 32 | 64 | 2048
    assert sent == (
        opt_reply(7, 3, u16(0) + u64(1 << 30) + u16(flags))
        + opt_reply(7, 3, u16(1) + b"disk")
        + opt_reply(7, 3, u16(2) + b"the disk")
        + opt_reply(7, 3, u16(3) + u32(1) + u32(4096) + u32(32 << 20))
        + opt_reply(7, 1)
    )
    with pytest.raises(ProtocolError):
        hs.next_event()


def test_opt_info_does_not_end_the_negotiation() -> None:
    hs = started({"disk": FakeExport("disk")})
    # the only export is the default one ("")
    event, sent = negotiate(hs, option(6, u32(0) + u16(0)))
    assert event == NeedData(16)
    assert sent.endswith(opt_reply(6, 1))
    assert sent.startswith(opt_reply(6, 3, u16(0) + u64(1 << 20) + u16(transmission_flags(False))))


def test_malformed_option_payload_is_answered_with_err_invalid() -> None:
    hs = started({"disk": FakeExport("disk")})
    event, sent = negotiate(hs, option(7, u32(4) + b"disk" + u16(0) + b"!"))
    assert event == NeedData(16)
    assert sent == opt_reply(7, NBD_REP_ERR | 3, b"trailing bytes in option payload")


def test_unsupported_option() -> None:
    _, sent = negotiate(started({}), option(42))
    assert sent == opt_reply(42, NBD_REP_ERR | 1, b"Unsupported option 42")


def test_bad_option_header_ends_the_connection() -> None:
    with pytest.raises(ProtocolError, match="bad option magic"):
        negotiate(started({}), b"IHAVEOPX" + u32(3) + u32(0))
    # the length is refused before any payload is read
    with pytest.raises(ProtocolError, match="option length 65537 too large"):
        negotiate(started({}), IHAVEOPT + u32(3) + u32((64 << 10) + 1))


def test_opt_abort() -> None:
    event, sent = negotiate(started({}), option(2))
    assert event == Abort()
    assert sent == opt_reply(2, 1)


def test_export_name() -> None:
    disk = FakeExport("disk", size=4096)
    hs = ServerHandshake({"disk": disk})
    event, sent = negotiate(hs, u32(1) + option(1, b"disk"))  # no NO_ZEROES
    assert event == ExportChosen(disk)
    assert sent.endswith(u64(4096) + u16(transmission_flags(False)) + bytes(124))
    with pytest.raises(ProtocolError, match="unknown export in EXPORT_NAME"):
        negotiate(started({"disk": disk}), option(1, b"nope"))


def test_structured_replies_and_base_allocation() -> None:
    hs = started({"disk": FakeExport("disk")})
    query = u32(4) + b"disk" + u32(1) + u32(15) + b"base:allocation"
    _, sent = negotiate(hs, option(10, query))
    assert sent == opt_reply(10, NBD_REP_ERR | 3, b"structured replies not negotiated")
    _, sent = negotiate(hs, option(8))
    assert sent == opt_reply(8, 1)
    assert hs.structured
    _, sent = negotiate(hs, option(10, query))
    assert sent == opt_reply(10, 4, u32(0) + b"base:allocation") + opt_reply(10, 1)
    assert hs.meta_base_allocation
    # LIST with no query lists every context; an unknown one is simply not there
    _, sent = negotiate(hs, option(9, u32(4) + b"disk" + u32(0)))
    assert sent == opt_reply(9, 4, u32(0) + b"base:allocation") + opt_reply(9, 1)
    _, sent = negotiate(hs, option(10, u32(4) + b"disk" + u32(1) + u32(7) + b"qemu:x:"))
    assert sent == opt_reply(10, 1)
    assert not hs.meta_base_allocation


def test_tls_required() -> None:
    disk = FakeExport("disk")
    hs = started({"disk": disk}, tls=True)
    _, sent = negotiate(hs, option(7, u32(4) + b"disk" + u16(0)))
    assert sent == opt_reply(7, NBD_REP_ERR | 5, b"Option 0x7 not permitted before TLS")
    event, sent = negotiate(hs, option(5))
    assert event == StartTLS()
    assert sent == opt_reply(5, 1)
    _, sent = negotiate(hs, option(5))
    assert sent == opt_reply(5, NBD_REP_ERR | 3, b"TLS already negotiated")
    event, _ = negotiate(hs, option(7, u32(4) + b"disk" + u16(0)))
    assert event == ExportChosen(disk)
    with pytest.raises(ProtocolError, match="EXPORT_NAME before STARTTLS"):
        negotiate(started({"disk": disk}, tls=True), option(1, b"disk"))


def test_starttls_without_tls_configured() -> None:
    _, sent = negotiate(started({}), option(5))
    assert sent == opt_reply(5, NBD_REP_ERR | 2, b"TLS not configured")
    _, sent = negotiate(started({}, tls=True), option(5, b"x"))
    assert sent == opt_reply(5, NBD_REP_ERR | 3, b"NBD_OPT_STARTTLS must have no payload")


# -- what surrounds the codec: the peer identity and NBD URIs -----------------------------------


def test_peer_dn_in_certificate_order_with_escapes() -> None:
    cert = {
        "subject": (
            (("countryName", "GB"),),
            (("organizationName", "Example, Org"),),
            (("commonName", "laptop"), ("userId", "#7 ")),
        )
    }
    assert peer_dn(cert) == "C=GB,O=Example\\, Org,CN=laptop+UID=\\#7\\ "
    assert peer_dn(None) == ""


def test_nbd_uris() -> None:
    assert SocketAddress.from_nbd_uri("nbd://h:1234/disk") == (
        SocketAddress.inet("h", 1234),
        "disk",
        False,
    )
    assert SocketAddress.from_nbd_uri("nbd://h") == (SocketAddress.inet("h", 10809), "", False)
    unix, name, tls = SocketAddress.from_nbd_uri("nbds+unix:///a%20b?socket=/tmp/s")
    assert (unix, name, tls) == (SocketAddress.unix("/tmp/s"), "a b", True)
    assert unix.nbd_uri("x") == "nbd+unix:///x?socket=/tmp/s"
    with pytest.raises(OptionError, match="Parameter 'socket' is required for nbd\\+unix URIs"):
        SocketAddress.from_nbd_uri("nbd+unix:///x")
    with pytest.raises(OptionError, match="Unsupported NBD URI 'http://x/'"):
        SocketAddress.from_nbd_uri("http://x/")


def test_socket_address_strings_and_qapi() -> None:
    assert SocketAddress.from_str("[::1]:10809") == SocketAddress.inet("::1", 10809)
    assert SocketAddress.from_str("tcp:h:1") == SocketAddress.inet("h", 1)
    assert SocketAddress.from_str("unix:/s") == SocketAddress.unix("/s")
    with pytest.raises(ValueError, match="bad address 'h:x' \\(use HOST:PORT or unix:PATH\\)"):
        SocketAddress.from_str("tcp:h:x")
    legacy = {"type": "unix", "data": {"path": "/s"}}
    assert SocketAddress.from_qapi(legacy).to_qapi() == {"type": "unix", "path": "/s"}
    assert SocketAddress.from_qapi({"host": "h", "port": 5}) == SocketAddress.inet("h", "5")
    with pytest.raises(OptionError, match="Parameter 'server.port' is missing"):
        SocketAddress.from_qapi({"type": "inet", "host": "h"})
    with pytest.raises(OptionError, match="Parameter 'server.type' does not accept value 'vsock'"):
        SocketAddress.from_qapi({"type": "vsock"})
