"""What a role was told at start: a typed, frozen view of ``blockrep primary|secondary``'s argv.

The argparse Namespace stops at the CLI: the roles read these fields, so a missing or
misspelt option is a type error here rather than an AttributeError in the middle of a
pairing. Defaults that depend on the disk (state file) are resolved once, here.
"""

from __future__ import annotations

import argparse
import enum
import os
from dataclasses import dataclass
from typing import TypedDict


class Mode(enum.StrEnum):
    """How the two nodes hold the data (SPEC §2/§3); the values are what status shows."""

    SEPARATE = "separate"  # each node has its own disk; P forwards every write
    SHARED = "shared"  # both see one disk; S buffers only its own writes


class FailoverPoint(enum.StrEnum):
    """Which writes survive a failover (CONTINUITY.md §6); status shows the value."""

    CHECKPOINT = "checkpoint"  # COLO: the last checkpoint plus the secondary's own writes
    LATEST = "latest"  # every write the primary acknowledged (DRBD protocol C)


class OutdateFailure(enum.StrEnum):
    """What a primary with failover-point latest does when it cannot outdate a lost peer."""

    FREEZE = "freeze"  # acknowledge no write until the peer is outdated or back (the promise)
    CONTINUE = "continue"  # go on alone, giving up the promise (status says so)


class BufferPages(enum.StrEnum):
    """The secondary's ``keep-buffer-pages`` (README: what a checkpoint does with them)."""

    AUTO = "auto"  # keep them where the buffer's file is in memory (tmpfs, ramfs)
    ON = "on"  # rewrite the buffers' metadata in place; their pages stay
    OFF = "off"  # QEMU's emptied image in a fresh file; the old pages are freed


def default_state_file(disk: str) -> str:
    return os.path.abspath(disk) + ".blockrep-state.json"


def default_buffer_dir(disk: str) -> str:
    """/dev/shm when writable: the overlays are throw-away and hot."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return os.path.dirname(os.path.abspath(disk))


def parse_rate(text: str) -> int:
    """A rate in bytes/s: ``0``, ``50M``, ``1G``, ``4096`` (K, M, G: powers of 1024)."""
    t = text.strip().upper().removesuffix("B/S").removesuffix("/S")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a rate in bytes/s (like 50M): {text!r}")
    return int(digits) * mult


def qmp_socket_path(qmp: str) -> str:
    """``unix:PATH`` or a bare path → the path."""
    return qmp[5:] if qmp.startswith("unix:") else qmp


@dataclass(frozen=True)
class VolumeSpec:
    """One volume of a node: its disk and where its consumer export is served."""

    disk: str
    export: str  # HOST:PORT or unix:PATH
    export_name: str = "disk"


class _Common(TypedDict):
    disk: str
    mode: Mode
    export: str
    qmp: str | None
    metrics: str | None
    tls_dir: str | None
    psk_file: str | None
    insecure: bool
    export_tls_dir: str | None
    failover_point: FailoverPoint
    state_file: str
    heartbeat_interval: float
    heartbeat_timeout: float


@dataclass(frozen=True, kw_only=True)
class RoleConfig:
    """The options both roles take."""

    disk: str  # absolute path of the raw file this node serves
    mode: Mode
    export: str  # consumer NBD address: HOST:PORT or unix:PATH
    qmp: str | None  # QMP socket (unix:PATH), or None for none
    metrics: str | None  # Prometheus HOST:PORT, or None
    tls_dir: str | None  # x509 directory: channel and link on TLS, peer certificate checked
    psk_file: str | None  # a shared secret: the channel's challenge-response (auth.py)
    insecure: bool  # TCP without authentication, on request only
    export_tls_dir: str | None  # x509 directory: the consumer export on TLS
    state_file: str
    # a secondary: what its failover keeps; a primary: its own promise once it is one
    failover_point: FailoverPoint = FailoverPoint.CHECKPOINT
    heartbeat_interval: float
    heartbeat_timeout: float
    export_name: str = "disk"  # the consumer export's NBD name
    # a resource of several volumes (``blockrep up``): one consistency group replicated
    # as one device, the disks end to end (block/concat.py); () = the one volume above
    volumes: tuple[VolumeSpec, ...] = ()

    @property
    def shared(self) -> bool:
        return self.mode is Mode.SHARED

    @property
    def pair_address(self) -> str:
        """Where the control channel is (the secondary's address)."""
        raise NotImplementedError

    def volume_specs(self) -> tuple[VolumeSpec, ...]:
        return self.volumes or (VolumeSpec(self.disk, self.export, self.export_name),)

    @staticmethod
    def _common(ns: argparse.Namespace) -> _Common:
        disk = os.path.abspath(ns.disk)
        return {
            "disk": disk,
            "mode": Mode.SHARED if getattr(ns, "shared", False) else Mode.SEPARATE,
            "export": ns.export,
            "qmp": ns.qmp or None,
            "metrics": getattr(ns, "metrics", None) or None,
            "tls_dir": getattr(ns, "tls_dir", None) or None,
            "psk_file": getattr(ns, "psk_file", None) or None,
            "insecure": bool(getattr(ns, "insecure", False)),
            "export_tls_dir": getattr(ns, "export_tls_dir", None) or None,
            "failover_point": FailoverPoint(getattr(ns, "failover_point", None) or "checkpoint"),
            "state_file": ns.state_file or default_state_file(disk),
            "heartbeat_interval": float(ns.heartbeat_interval),
            "heartbeat_timeout": float(ns.heartbeat_timeout),
        }


@dataclass(frozen=True, kw_only=True)
class PrimaryConfig(RoleConfig):
    secondary: str  # the secondary's control address
    checkpoint_interval: float  # seconds; 0 = only on demand
    assume_synced: bool
    initial_sync: bool
    connect_timeout: float
    reconnect: bool
    progress: bool  # progress bars on stderr
    activity_log: bool = True  # False: --no-activity-log (unsafe: a crash copies nothing it wrote)
    resync_rate: int = 0  # bytes/s ceiling of a background resync (0: unlimited)
    resync_min_rate: int = 0  # bytes/s it keeps even while the consumer is busy
    outdate_peer_command: str | None = None  # failover-point latest: makes a lost peer Outdated
    on_outdate_failure: OutdateFailure = OutdateFailure.FREEZE

    @property
    def pair_address(self) -> str:
        return self.secondary

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> PrimaryConfig:
        return cls(
            **cls._common(ns),
            secondary=ns.secondary,
            checkpoint_interval=float(ns.checkpoint_interval),
            assume_synced=bool(ns.assume_synced),
            initial_sync=bool(ns.initial_sync),
            connect_timeout=float(ns.connect_timeout),
            reconnect=bool(ns.reconnect),
            progress=bool(ns.progress),
            activity_log=not getattr(ns, "no_activity_log", False),
            resync_rate=int(ns.resync_rate),
            resync_min_rate=int(ns.resync_min_rate),
            outdate_peer_command=getattr(ns, "outdate_peer_command", None) or None,
            on_outdate_failure=OutdateFailure(getattr(ns, "on_outdate_failure", "freeze")),
        )


@dataclass(frozen=True, kw_only=True)
class SecondaryConfig(RoleConfig):
    listen: str  # control address the primary connects to
    buffer_dir: str | None  # None: default_buffer_dir(disk), decided when the overlays are made
    auto_failover: bool
    failover_timeout: float
    fence_command: str | None
    link_port: int = 0  # TCP: the replication link's port (0: the control port + 1)
    keep_buffer_pages: BufferPages = BufferPages.AUTO

    @property
    def pair_address(self) -> str:
        return self.listen

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> SecondaryConfig:
        return cls(
            **cls._common(ns),
            listen=ns.listen,
            buffer_dir=ns.buffer_dir or None,
            auto_failover=bool(ns.auto_failover),
            failover_timeout=float(ns.failover_timeout),
            fence_command=ns.fence_command or None,
            link_port=int(getattr(ns, "link_port", 0) or 0),
            keep_buffer_pages=BufferPages(getattr(ns, "keep_buffer_pages", None) or "auto"),
        )
