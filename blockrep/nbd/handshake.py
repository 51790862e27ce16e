"""The server side of NBD's fixed newstyle handshake, with no I/O (the h11 style).

Bytes from the client go in (``receive_data``), reply bytes come out
(``data_to_send``) and ``next_event`` says what the connection has to do next:
read more (``NeedData``, with the exact count, so nothing past the handshake is
consumed and no plaintext is read past a STARTTLS), upgrade to TLS (``StartTLS``),
enter transmission (``ExportChosen``) or end (``Abort``). A client that breaks the
protocol in a way that cannot be answered gets a ProtocolError; everything else is
answered with an option error and the negotiation goes on, as the spec asks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..errors import ProtocolError
from . import proto as p


class ExportInfo(Protocol):
    """What the handshake needs to know of an export."""

    name: str
    description: str
    writable: bool

    @property
    def size(self) -> int: ...


E = TypeVar("E", bound=ExportInfo)


def transmission_flags(writable: bool) -> int:
    """The transmission flags the server advertises for an export."""
    f = (
        p.TF_HAS_FLAGS
        | p.TF_SEND_FLUSH
        | p.TF_SEND_FUA
        | p.TF_SEND_DF
        | p.TF_SEND_CACHE
        | p.TF_CAN_MULTI_CONN
    )
    if writable:
        f |= p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES | p.TF_SEND_FAST_ZERO
    else:
        f |= p.TF_READ_ONLY
    return f


@dataclass(frozen=True)
class NeedData:
    """Feed exactly ``nbytes`` more bytes before asking again."""

    nbytes: int


@dataclass(frozen=True)
class StartTLS:
    """The ACK is queued: send it, then upgrade the socket before feeding more bytes."""


@dataclass(frozen=True)
class ExportChosen(Generic[E]):
    """The handshake is over; transmission on ``export`` begins after the queued replies."""

    export: E


@dataclass(frozen=True)
class Abort:
    """The client ended the negotiation (NBD_OPT_ABORT); close after the queued ACK."""


Event = NeedData | StartTLS | ExportChosen[E] | Abort

_CLIENT_FLAGS, _OPTION_HEADER, _OPTION_DATA, _DONE = range(4)


class ServerHandshake(Generic[E]):
    """One client's option negotiation.

    ``exports`` is consulted at each option, so exports added or removed while a
    client negotiates are seen as they are then. With ``tls`` the server requires
    TLS: every option but STARTTLS and ABORT is refused until the upgrade. A
    ``private`` server's export names are secrets: NBD_OPT_LIST is refused
    (NBD_REP_ERR_POLICY) and there is no default export.
    """

    def __init__(
        self, exports: Mapping[str, E], *, tls: bool = False, private: bool = False
    ) -> None:
        self.exports = exports
        self.private = private
        self.tls_required = tls
        self.tls_done = False
        self.no_zeroes = False
        self.structured = False
        self.meta_base_allocation = False
        self._state = _CLIENT_FLAGS
        self._in = bytearray()
        self._out = [p.pack_greeting(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)]
        self._option = 0
        self._length = 0

    def receive_data(self, data: bytes) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event[E]:
        while True:
            if self._state == _DONE:
                raise ProtocolError("the handshake is over")
            want = {_CLIENT_FLAGS: 4, _OPTION_HEADER: p.OPTION.size}.get(self._state, self._length)
            if len(self._in) < want:
                return NeedData(want - len(self._in))
            chunk = bytes(self._in[:want])
            del self._in[:want]
            event = self._step(chunk)
            if event is not None:
                if not isinstance(event, StartTLS):
                    self._state = _DONE
                return event

    def _step(self, chunk: bytes) -> Event[E] | None:
        if self._state == _CLIENT_FLAGS:
            (cflags,) = struct.unpack(">I", chunk)
            if cflags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
                raise ProtocolError(f"unknown client flags {cflags:#x}")
            self.no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
            self._state = _OPTION_HEADER
            return None
        if self._state == _OPTION_HEADER:
            magic, self._option, self._length = p.OPTION.unpack(chunk)
            if magic != p.IHAVEOPT:
                raise ProtocolError("bad option magic")
            if self._length > p.MAX_OPTION_LEN:
                raise ProtocolError(f"option length {self._length} too large")
            self._state = _OPTION_DATA
            if self._length:
                return None
            chunk = b""
        self._state = _OPTION_HEADER
        opt = self._option
        if self.tls_required and not self.tls_done and opt not in (p.OPT_STARTTLS, p.OPT_ABORT):
            if opt == p.OPT_EXPORT_NAME:
                raise ProtocolError("EXPORT_NAME before STARTTLS")
            self._error(opt, p.REP_ERR_TLS_REQD, "Option 0x%x not permitted before TLS" % opt)
            return None
        try:
            return self._handle_option(opt, chunk)
        except p.ParseError as e:
            self._error(opt, p.REP_ERR_INVALID, str(e))
            return None

    # -- replies -------------------------------------------------------------------------

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(p.pack_option_reply(opt, rep, data))

    def _error(self, opt: int, rep: int, msg: str) -> None:
        self._reply(opt, rep, msg.encode()[: p.MAX_STRING])

    def _lookup(self, name: str) -> E | None:
        # the default export ("") is the only one when there is only one
        if name == "" and len(self.exports) == 1 and not self.private:
            return next(iter(self.exports.values()))
        return self.exports.get(name)

    # -- options ---------------------------------------------------------------------------

    def _handle_option(self, opt: int, data: bytes) -> Event[E] | None:
        if opt == p.OPT_ABORT:
            self._reply(opt, p.REP_ACK)
            return Abort()
        if opt == p.OPT_EXPORT_NAME:
            exp = self._lookup(data.decode(errors="replace"))
            if exp is None:
                # this option has no error reply: the spec says to drop the connection
                raise ProtocolError("unknown export in EXPORT_NAME")
            flags = transmission_flags(exp.writable)
            self._out.append(p.pack_export_name_reply(exp.size, flags, self.no_zeroes))
            return ExportChosen(exp)
        if opt == p.OPT_LIST:
            if self.private:
                self._error(opt, p.REP_ERR_POLICY, "this server lists no exports")
            else:
                self._list(opt, data)
            return None
        if opt == p.OPT_STARTTLS:
            return self._starttls(opt, data)
        if opt == p.OPT_STRUCTURED_REPLY:
            if data:
                self._error(opt, p.REP_ERR_INVALID, "structured reply option must have no payload")
                return None
            self.structured = True
            self._reply(opt, p.REP_ACK)
            return None
        if opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
            return None
        if opt in (p.OPT_INFO, p.OPT_GO):
            return self._info(opt, data)
        self._error(opt, p.REP_ERR_UNSUP, "Unsupported option %d" % opt)
        return None

    def _list(self, opt: int, data: bytes) -> None:
        if data:
            self._error(opt, p.REP_ERR_INVALID, "NBD_OPT_LIST must have no payload")
            return
        for exp in self.exports.values():
            self._reply(opt, p.REP_SERVER, p.pack_server_reply(exp.name, exp.description))
        self._reply(opt, p.REP_ACK)

    def _starttls(self, opt: int, data: bytes) -> StartTLS | None:
        if data:
            self._error(opt, p.REP_ERR_INVALID, "NBD_OPT_STARTTLS must have no payload")
            return None
        if not self.tls_required:
            self._error(opt, p.REP_ERR_POLICY, "TLS not configured")
            return None
        if self.tls_done:
            self._error(opt, p.REP_ERR_INVALID, "TLS already negotiated")
            return None
        self._reply(opt, p.REP_ACK)
        # the caller upgrades before it feeds another byte, so from here on the
        # negotiation is under TLS
        self.tls_done = True
        return StartTLS()

    def _meta_context(self, opt: int, data: bytes) -> None:
        name, queries = p.parse_meta_request(data)
        if not self.structured:
            self._error(opt, p.REP_ERR_INVALID, "structured replies not negotiated")
            return
        if self._lookup(name) is None:
            self._error(opt, p.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        # an empty LIST query and the "base:" namespace both ask for every context
        wanted = opt == p.OPT_LIST_META_CONTEXT and not queries
        for q in queries:
            if q == p.META_BASE_ALLOCATION or (opt == p.OPT_LIST_META_CONTEXT and q == "base:"):
                wanted = True
        if opt == p.OPT_SET_META_CONTEXT:
            self.meta_base_allocation = wanted
        if wanted:
            self._reply(opt, p.REP_META_CONTEXT, p.pack_meta_context(0, p.META_BASE_ALLOCATION))
        self._reply(opt, p.REP_ACK)

    def _info(self, opt: int, data: bytes) -> ExportChosen[E] | None:
        name, infos = p.parse_info_request(data)
        exp = self._lookup(name)
        if exp is None:
            self._error(opt, p.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        flags = transmission_flags(exp.writable)
        self._reply(opt, p.REP_INFO, p.pack_info_export(exp.size, flags))
        if p.INFO_NAME in infos:
            self._reply(opt, p.REP_INFO, p.pack_info_name(exp.name))
        if p.INFO_DESCRIPTION in infos and exp.description:
            self._reply(opt, p.REP_INFO, p.pack_info_description(exp.description))
        self._reply(opt, p.REP_INFO, p.pack_info_block_size(1, 4096, p.MAX_BUFFER))
        self._reply(opt, p.REP_ACK)
        return ExportChosen(exp) if opt == p.OPT_GO else None
