"""A resource's volumes: one replicated device, one consumer export per volume.

All volumes of a resource are one consistency group (one checkpoint, one failover):
they are replicated as one device holding the disks end to end (block/concat.py), so
the bitmaps, the activity log and resync know nothing of volumes. Volume ``i`` starts
at the sum of the sizes before it; its consumer export serves a raw slice of the
device there (the export shifts its requests: no node sits above the device, which
stays the root replication expects). One volume is the disk itself, served whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..address import SocketAddress
from ..block.node import Node
from ..nbd.server import NBDServer
from ..tls import X509Credentials
from .config import VolumeSpec
from .consumer import ConsumerExport, ConsumerGroup, VolumeExport


def esc(value: str) -> str:
    """Escape a value for QEMU keyval syntax (``,`` → ``,,``)."""
    return value.replace(",", ",,")


def bases(specs: tuple[VolumeSpec, ...]) -> list[tuple[VolumeSpec, int, int]]:
    """Each volume with where it starts in the replicated device and its size."""
    out, base = [], 0
    for v in specs:
        size = os.path.getsize(v.disk)
        out.append((v, base, size))
        base += size
    return out


def base_keyval(specs: tuple[VolumeSpec, ...], prefix: str) -> str:
    """The replicated device's options (keyval, under ``prefix``): the raw disk, or for
    several volumes their disks end to end."""
    if len(specs) == 1:
        return f"{prefix}driver=raw,{prefix}file.filename={esc(specs[0].disk)}"
    parts = [f"{prefix}driver=concat"]
    for i, v in enumerate(specs):
        c = f"{prefix}children.{i}."
        parts.append(f"{c}driver=raw,{c}file.filename={esc(v.disk)}")
    return ",".join(parts)


async def serve(
    top: Node,
    vols: list[tuple[VolumeSpec, int, int]],
    guard: Callable[[int, int], None],
    tls_dir: str | None = None,
) -> tuple[ConsumerGroup, list[NBDServer]]:
    """The consumer's exports of ``top``, each volume its slice; one NBD server per
    address (volumes may share one); TLS from ``tls_dir`` (QEMU's x509 layout, the
    client's certificate required) when given."""
    tls = X509Credentials(tls_dir).server_context() if tls_dir else None
    by_address: dict[str, dict[str, ConsumerExport]] = {}
    members = []
    whole = len(vols) == 1
    for v, base, size in vols:
        exp = (
            ConsumerExport(top, guard, v.export_name)
            if whole
            else VolumeExport(top, guard, v.export_name, base, size)
        )
        members.append(exp)
        by_address.setdefault(v.export, {})[v.export_name] = exp
    servers = []
    for address, exports in by_address.items():
        server = NBDServer(dict(exports), tls=tls)
        servers.append(server)
        await server.listen(SocketAddress.from_str(address))
    return ConsumerGroup(members), servers
