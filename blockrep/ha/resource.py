"""The resource file: one replicated resource described in TOML (issue 11, CONTINUITY.md).

A resource is one consistency group: all its volumes (a VM's several disks) share one
checkpoint and fail over together. The file (exactly two ``[nodes.NAME]`` tables)::

    [resource]
    name = "r0"
    mode = "separate"              # or "shared"
    checkpoint-interval = 2.0      # seconds, > 0 (default 2.0, as `blockrep primary`)
    region-size = 1048576          # bytes, a power of two >= 4096 (default 1 MiB)
    failover-point = "checkpoint"  # or "latest" (CONTINUITY.md §6)
    [security]                     # one of these for a pair on TCP (auth.py)
    psk-file = "/etc/blockrep/r0.psk"  # or tls-dir = "/etc/blockrep/tls", or insecure = true
    [nodes.alpha]                  # the table's name is the node's name
    address = "10.0.0.1:7789"      # control address: HOST:PORT, [v6]:PORT or unix:PATH
    qmp = "unix:/run/blockrep/r0.qmp"
    buffer-dir = "/dev/shm"        # optional (the manager's default when absent)
    keep-buffer-pages = "auto"     # optional: or "on", "off" (config.BufferPages)
    link-port = 7790               # optional: the replication link (default address's + 1)
    export-tls-dir = "/etc/blockrep/export-tls"  # optional: the consumer exports on TLS
    disks = ["/srv/r0-root.raw", "/srv/r0-data.raw"]             # one per volume
    exports = ["127.0.0.1:10809", "nbd://127.0.0.1:10810/data"]  # one per volume

An export is an address (its export is then named ``disk``, as ``blockrep primary``'s
is) or an NBD URI naming it (``nbd://HOST:PORT/NAME``, ``nbd+unix:///NAME?socket=PATH``),
so several volumes can share one NBD server. Paths are kept as written.

``failover-point`` is what a failover keeps (config.FailoverPoint, CONTINUITY.md §6).

Every refusal is an OptionError starting ``resource file SOURCE:`` that names the key and
its table: a typo must never fall back silently to a default.
"""

from __future__ import annotations

import enum
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..address import SocketAddress
from ..errors import OptionError
from .config import BufferPages, FailoverPoint

DEFAULT_CHECKPOINT_INTERVAL = 2.0  # seconds: `blockrep primary --checkpoint-interval`'s default
DEFAULT_REGION_SIZE = 1 << 20
MIN_REGION_SIZE = 4096  # a region smaller than a page would make the bitmaps bigger than useful
DEFAULT_EXPORT_NAME = "disk"  # the consumer export's name in `blockrep primary|secondary`

# Resource and node names end up in unit instances, file names, logs and host-name matches.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class Mode(enum.StrEnum):
    SEPARATE = "separate"  # each node has its own disk (SPEC.md non-shared mode)
    SHARED = "shared"  # both nodes reach one disk (SPEC.md §3 shared-disk mode)


@dataclass(frozen=True)
class ExportSpec:
    """Where a volume's consumer NBD export is served on a node, and under which name."""

    address: SocketAddress
    name: str = DEFAULT_EXPORT_NAME

    def describe(self) -> str:
        return f"{self.address.describe()} (export '{self.name}')"


@dataclass(frozen=True)
class Volume:
    index: int  # position in the node's disks/exports lists; pairs with the peer's same index
    disk: str
    export: ExportSpec


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: SocketAddress  # the control address the peer reaches this node at
    qmp: str  # a unix socket path ("unix:" stripped)
    buffer_dir: str | None
    volumes: tuple[Volume, ...]
    link_port: int = 0  # 0: the address's port + 1
    export_tls_dir: str | None = None
    keep_buffer_pages: BufferPages = BufferPages.AUTO

    @property
    def disks(self) -> tuple[str, ...]:
        return tuple(v.disk for v in self.volumes)

    @property
    def exports(self) -> tuple[ExportSpec, ...]:
        return tuple(v.export for v in self.volumes)


@dataclass(frozen=True)
class Security:
    """How the nodes know each other (auth.py): a secret, certificates, or nothing."""

    psk_file: str | None = None
    tls_dir: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class Resource:
    name: str
    mode: Mode
    checkpoint_interval: float
    region_size: int
    failover_point: FailoverPoint
    security: Security
    nodes: tuple[NodeConfig, NodeConfig]  # in the file's order
    source: str = field(default="", compare=False)  # the file, for messages

    @property
    def volume_count(self) -> int:
        return len(self.nodes[0].volumes)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise OptionError(
            f"resource file {self.source}: no node '{name}' in resource {self.name}"
            f" (nodes: {', '.join(self.node_names)})"
        )

    def peer_of(self, name: str) -> NodeConfig:
        me = self.node(name)
        return self.nodes[1] if self.nodes[0] is me else self.nodes[0]

    def local_node_name(self, node: str | None = None, hostname: str | None = None) -> str:
        """This node's name: ``node`` (``--node``) if given, else the host name.

        The host name matches a node by its full name or, failing that, by its first
        label (``alpha.example.com`` is node ``alpha``), as ``uname -n`` varies by distro.
        """
        if node is not None:
            return self.node(node).name
        host = socket.gethostname() if hostname is None else hostname
        for candidate in (host, host.split(".", 1)[0]):
            if candidate in self.node_names:
                return candidate
        raise OptionError(
            f"resource file {self.source}: this host '{host}' is not a node of resource"
            f" {self.name} (nodes: {', '.join(self.node_names)}); name one with --node"
        )


# -- parsing --------------------------------------------------------------------------------

_RESOURCE_KEYS = ("name", "mode", "checkpoint-interval", "region-size", "failover-point")
_SECURITY_KEYS = ("psk-file", "tls-dir", "insecure")
_NODE_KEYS = ("address", "qmp", "buffer-dir", "keep-buffer-pages", "disks", "exports",
              "link-port", "export-tls-dir")  # fmt: skip
_TOP_KEYS = ("resource", "security", "nodes")
_REQUIRED: Any = object()
_NAME_RULE = "a name of letters, digits, '.', '-' and '_' (starting with a letter or digit)"
_ADDRESS_FORMS = "HOST:PORT, [v6]:PORT or unix:PATH"


class _Table:
    """One TOML table being read, with what its messages need to say where a key is."""

    def __init__(self, data: dict[str, Any], name: str, source: str) -> None:
        self.data = data
        self.name = name  # "[resource]", "[nodes.alpha]"; "" for the top level
        self.place = f"in {name}" if name else "at the top level"
        self.source = source

    def error(self, text: str) -> OptionError:
        return OptionError(f"resource file {self.source}: {text}")

    def refuse_unknown(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                extra = "" if self.name else _misplaced(key)
                raise self.error(
                    f"unknown key '{key}' {self.place} (known: {', '.join(known)}){extra}"
                )

    def get(self, key: str, check: Callable[[Any], Any], expected: str, default: Any) -> Any:
        """``check(value)``, None meaning refused; ``default`` when absent (_REQUIRED: refuse)."""
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(f"missing key '{key}' {self.place}")
            return default
        value = self.data[key]
        out = check(value)
        if out is None:
            raise self.error(f"key '{key}' {self.place} must be {expected}, not {_shown(value)}")
        return out

    def string(self, key: str) -> str | None:
        return self.get(key, _nonempty_str, "a non-empty string", None)

    def table(self, key: str, name: str) -> _Table:
        """The sub-table ``key`` (shown as ``name``), which must be present."""
        data = self.get(key, lambda v: v if isinstance(v, dict) else None, f"a table {name}", None)
        if data is None:
            raise self.error(f"missing table {name}")
        return _Table(data, name, self.source)


def _shown(value: Any) -> str:
    """A refused value as the message shows it: scalars as written, the rest by TOML type."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool | int | float):  # lower(): TOML's true/false; numbers unchanged
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    kinds: dict[type, str] = {list: "an array", dict: "a table"}
    return kinds.get(type(value), "a date or time")


def _nonempty_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _name(v: Any) -> str | None:
    return v if isinstance(v, str) and _NAME_RE.match(v) else None


def _positive_seconds(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")
    return float(v) if ok else None  # TOML has inf and nan: neither is an interval


def _region_size(v: Any) -> int | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= MIN_REGION_SIZE
    return v if ok and v & (v - 1) == 0 else None


_SECONDS = (_positive_seconds, "a number of seconds > 0")
_REGION_SIZE = (_region_size, f"a power of two >= {MIN_REGION_SIZE} (bytes)")


def _enum(cls: type[enum.StrEnum]) -> tuple[Callable[[Any], Any], str]:
    """A check for one of ``cls``'s values, and how to say what it expects."""
    values = [m.value for m in cls]
    check = lambda v: cls(v) if isinstance(v, str) and v in values else None  # noqa: E731
    return check, "one of " + ", ".join(f"'{v}'" for v in values)


def _address(v: Any) -> SocketAddress | None:
    if not isinstance(v, str):
        return None
    try:
        addr = SocketAddress.from_str(v)
    except ValueError:
        return None
    return addr if addr.path or (addr.host and 0 < int(addr.port) < 65536) else None


def _export(text: str) -> ExportSpec | None:
    if "://" not in text:
        addr = _address(text)
        return ExportSpec(addr) if addr is not None else None
    try:
        addr, name, tls = SocketAddress.from_nbd_uri(text)
    except (OptionError, ValueError):
        return None
    # TLS on the consumer export is not offered; an empty name would be a second default
    if tls or not name or (addr.type == "inet" and not 0 < int(addr.port) < 65536):
        return None
    return ExportSpec(addr, name)


def _str_list(v: Any) -> list[str] | None:
    ok = isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)
    return v if ok else None


def _qmp_path(v: Any) -> str | None:
    return (v.removeprefix("unix:") or None) if isinstance(v, str) else None


def _parse_node(name: str, t: _Table) -> NodeConfig:
    t.refuse_unknown(_NODE_KEYS)
    address = t.get("address", _address, f"an address ({_ADDRESS_FORMS})", _REQUIRED)
    qmp = t.get("qmp", _qmp_path, "a unix socket (unix:PATH or PATH)", _REQUIRED)
    buffer_dir = t.string("buffer-dir")
    disks = t.get("disks", _str_list, "a non-empty array of paths", _REQUIRED)
    exports_text = t.get("exports", _str_list, "a non-empty array of exports", _REQUIRED)
    if len(disks) != len(exports_text):
        raise t.error(
            f"{t.name} has {len(disks)} disks but {len(exports_text)} exports (one export per disk)"
        )
    for i, disk in enumerate(disks):
        if disk in disks[:i]:
            raise t.error(f"disk '{disk}' appears twice in 'disks' {t.place}")
    exports: list[ExportSpec] = []
    for text in exports_text:
        spec = _export(text)
        if spec is None:
            raise t.error(
                f"export '{text}' in 'exports' {t.place} is neither an address ({_ADDRESS_FORMS})"
                " nor an NBD URI (nbd://HOST:PORT/NAME, nbd+unix:///NAME?socket=PATH)"
            )
        if spec in exports:
            raise t.error(
                f"two volumes {t.place} are both exported at {spec.describe()};"
                " give each its own address or name it with an NBD URI"
            )
        exports.append(spec)
    volumes = tuple(Volume(i, d, e) for i, (d, e) in enumerate(zip(disks, exports, strict=True)))
    port = t.get("link-port", lambda v: v if type(v) is int and 0 < v < 65536 else None,
                 "a TCP port (1-65535)", 0)  # fmt: skip
    pages = t.get("keep-buffer-pages", *_enum(BufferPages), BufferPages.AUTO)
    return NodeConfig(
        name, address, qmp, buffer_dir, volumes, port, t.string("export-tls-dir"), pages
    )


def _syntax_error(e: tomllib.TOMLDecodeError, text: str, source: str) -> OptionError:
    """tomllib (3.11) gives the position only inside its message; say it as compilers do."""
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e), re.S)
    if m:
        what, line, col = m.group(1), int(m.group(2)), int(m.group(3))
    else:  # "(at end of document)": the position of the end
        what = re.sub(r" \(at end of document\)$", "", str(e))
        line, col = text.count("\n") + 1, len(text) - text.rfind("\n")
    return OptionError(f"resource file {source}, line {line}, column {col}: {what}")


def _misplaced(key: str) -> str:
    """A hint for a known key written at the top level (a forgotten table header)."""
    if key in _RESOURCE_KEYS:
        return f"; '{key}' belongs in [resource]"
    return f"; '{key}' belongs in a [nodes.NAME] table" if key in _NODE_KEYS else ""


def parse_resource(text: str, source: str) -> Resource:
    """The resource described by ``text``; ``source`` names it in every message."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, text, source) from None
    top = _Table(data, "", source)
    top.refuse_unknown(_TOP_KEYS)

    res = top.table("resource", "[resource]")
    res.refuse_unknown(_RESOURCE_KEYS)
    name = res.get("name", _name, _NAME_RULE, _REQUIRED)
    mode = res.get("mode", *_enum(Mode), _REQUIRED)
    interval = res.get("checkpoint-interval", *_SECONDS, DEFAULT_CHECKPOINT_INTERVAL)
    region_size = res.get("region-size", *_REGION_SIZE, DEFAULT_REGION_SIZE)
    failover_point = res.get("failover-point", *_enum(FailoverPoint), FailoverPoint.CHECKPOINT)
    security = Security()
    if "security" in top.data:
        sec = top.table("security", "[security]")
        sec.refuse_unknown(_SECURITY_KEYS)
        insecure = sec.get("insecure", lambda v: v if type(v) is bool else None, "a boolean", False)
        security = Security(sec.string("psk-file"), sec.string("tls-dir"), insecure)

    nodes_t = top.table("nodes", "[nodes]")
    nodes: list[NodeConfig] = []
    for node_name in nodes_t.data:
        if _name(node_name) is None:
            raise top.error(f"node name '{node_name}' in [nodes] must be {_NAME_RULE}")
        # a dotted name (a host's FQDN) is one quoted key in TOML: show it as written
        shown = f'"{node_name}"' if "." in node_name else node_name
        nodes.append(_parse_node(node_name, nodes_t.table(node_name, f"[nodes.{shown}]")))
    if len(nodes) != 2:
        listed = f" ({', '.join(n.name for n in nodes)})" if nodes else ""
        raise top.error(f"[nodes] must describe exactly two nodes, not {len(nodes)}{listed}")
    a, b = nodes
    if len(a.volumes) != len(b.volumes):
        raise top.error(
            f"node '{a.name}' has {len(a.volumes)} disks and node '{b.name}'"
            f" has {len(b.volumes)}; every node needs one disk per volume"
        )
    if a.address == b.address:
        raise top.error(
            f"nodes '{a.name}' and '{b.name}' have the same address {a.address.describe()}"
        )
    return Resource(name, mode, interval, region_size, failover_point, security, (a, b), source)


def load_resource(path: str) -> Resource:
    """The resource file at ``path`` (messages name it as given)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise OptionError(f"resource file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise OptionError(f"resource file {path}: not UTF-8 text (byte {e.start})") from None
    return parse_resource(text, path)
