"""blockrep as a promotable clone in the lab, and a consumer gated on the Promoted role."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import time
import xml.etree.ElementTree as ET
from typing import Any

from .cluster import Lab
from .nodes import LabError, _run, wait_until


def install_blockrep_agent() -> str:
    """``blockrep ocf install`` (the default OCF root: Pacemaker looks nowhere else); the
    same file for every lab and the agent's own tests, so teardown leaves it."""
    from blockrep.testing import blockrep_argv

    out = _run(blockrep_argv("ocf", "install"), timeout=60)
    return out.strip()


class BlockrepCluster:
    """A blockrep resource (one volume per node, separate mode, failover-point latest,
    a PSK over the veth) run by the lab's Pacemaker as clone ``CLONE`` of ``ocf:blockrep:
    blockrep``, and the consumer gate colocated with its Promoted instance."""

    RES = "r0"
    PRIMITIVE = "r0"
    CLONE = "r0-clone"
    GATE = "consumer"

    def __init__(self, lab: Lab, size: int, checkpoint_interval: float = 0.5) -> None:
        self.lab = lab
        self.size = size
        self.checkpoint_interval = checkpoint_interval
        self.config = os.path.join(lab.dir, f"{self.RES}.toml")

    def disk(self, name: str) -> str:
        return os.path.join(self.lab.nodes[name].data, f"{self.RES}.raw")

    def qmp(self, name: str) -> str:
        return os.path.join(self.lab.nodes[name].data, f"{self.RES}.qmp")

    def export(self, name: str) -> str:
        return os.path.join(self.lab.nodes[name].data, f"{self.RES}.nbd")

    def gate(self, name: str) -> str:
        return os.path.join(self.lab.nodes[name].data, "gate")

    def write_config(self) -> None:
        psk = os.path.join(self.lab.dir, f"{self.RES}.psk")
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        lines = [
            "[resource]",
            f'name = "{self.RES}"',
            'mode = "separate"',
            f"checkpoint-interval = {self.checkpoint_interval}",
            # a cluster wants every acknowledged write kept by a failover
            'failover-point = "latest"',
            "[security]",
            f'psk-file = "{psk}"',
        ]
        for n in self.lab.nodes.values():
            lines += [
                f"[nodes.{n.name}]",
                f'address = "{n.addr}:7789"',
                f'qmp = "unix:{self.qmp(n.name)}"',
                'buffer-dir = "/dev/shm"',  # the node's own tmpfs: gone with a power-off
                f'disks = ["{self.disk(n.name)}"]',
                f'exports = ["nbd+unix:///disk?socket={self.export(n.name)}"]',
            ]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def make_disks(self, seed: int = 1) -> bytes:
        """Both disks with the same seeded bytes (a new resource with equal disks)."""
        import random

        data = random.Random(seed).randbytes(self.size)
        for name in self.lab.nodes:
            with open(self.disk(name), "wb") as f:
                f.write(data)
        return data

    def cib(self) -> tuple[str, str]:
        """The clone and the gate, their constraints (README's Pacemaker example)."""
        p = self.PRIMITIVE
        per_node = "".join(
            f'<instance_attributes id="{p}-ia-{n.name}" score="1">'
            f'<rule id="{p}-on-{n.name}" score="0">'
            f'<expression id="{p}-on-{n.name}-e" attribute="#uname" operation="eq" '
            f'value="{n.name}"/></rule>'
            f'<nvpair id="{p}-log-{n.name}" name="log" value="{n.data}/blockrep.log"/>'
            "</instance_attributes>"
            for n in self.lab.nodes.values()
        )
        ops = "".join(
            f'<op id="{p}-{name}" name="{name}" {extra}/>'
            for name, extra in (
                ("mon-p", 'interval="2s" role="Promoted" timeout="30s"'),
                ("mon-u", 'interval="3s" role="Unpromoted" timeout="30s"'),
                ("start", 'interval="0" timeout="120s"'),
                ("stop", 'interval="0" timeout="120s"'),
                ("promote", 'interval="0" timeout="120s"'),
                ("demote", 'interval="0" timeout="120s"'),
            )
        )
        ops = ops.replace(f'id="{p}-mon-p" name="mon-p"', f'id="{p}-mon-p" name="monitor"')
        ops = ops.replace(f'id="{p}-mon-u" name="mon-u"', f'id="{p}-mon-u" name="monitor"')
        clone = (
            f'<clone id="{self.CLONE}"><meta_attributes id="{self.CLONE}-meta">'
            + "".join(
                f'<nvpair id="{self.CLONE}-{k}" name="{k}" value="{v}"/>'
                for k, v in (
                    ("promotable", "true"),
                    ("promoted-max", "1"),
                    ("promoted-node-max", "1"),
                    ("clone-max", "2"),
                    ("clone-node-max", "1"),
                    ("notify", "true"),
                    ("priority", "1"),  # priority-fencing-delay protects the promoted node
                )
            )
            + f'</meta_attributes><primitive id="{p}" class="ocf" provider="blockrep" '
            f'type="blockrep"><instance_attributes id="{p}-ia">'
            f'<nvpair id="{p}-config" name="config" value="{self.config}"/>'
            f"</instance_attributes>{per_node}<operations>{ops}</operations></primitive></clone>"
        )
        gate, gate_cons = self.lab.gate_xml(self.CLONE, self.GATE)
        return clone + gate, gate_cons

    def setup(self, seed: int = 1) -> bytes:
        """Agent, resource file, disks and the seeded CIB; returns the disks' bytes."""
        install_blockrep_agent()
        self.write_config()
        data = self.make_disks(seed)
        self.lab.setup(*self.cib())
        return data

    def status(self, name: str, timeout: float = 10) -> dict[str, Any] | None:
        """``query-ha-status`` of the node's blockrep (None when nothing answers)."""
        from blockrep.cli.ha import qmp_call

        try:
            s = qmp_call(self.qmp(name), "query-ha-status", timeout=timeout)
        except (OSError, ConnectionError, ValueError, RuntimeError):
            return None
        return s if isinstance(s, dict) else None

    def protected(self, name: str) -> dict[str, Any] | None:
        s = self.status(name)
        if s and s.get("role") == "primary" and s.get("replication") == "Protected":
            return s
        return None

    def fence_constraint(self) -> str | None:
        """The node the agent's fence-peer constraint still lets be promoted (it forbids
        the Promoted role where ``#uname`` is not that node); None when there is none."""
        r = self.lab.x(
            self.lab.any_live(), "cibadmin", "--query", "--scope", "constraints", check=False
        )
        if r.returncode != 0:
            raise LabError(f"cibadmin --query: {r.stderr.strip()}")
        for loc in ET.fromstring(r.stdout).iter("rsc_location"):
            if loc.get("id") == f"blockrep-fence-{self.CLONE}":
                for e in loc.iter("expression"):
                    if e.get("attribute") == "#uname" and e.get("operation") == "ne":
                        return e.get("value")
                raise LabError(f"unexpected fence constraint: {ET.tostring(loc).decode()}")
        return None

    def stop_all(self, timeout: float = 90) -> None:
        """target-role Stopped on the clone; wait until no instance runs (orderly stops)."""
        self.lab.set_meta(self.CLONE, "target-role", "Stopped")
        wait_until(
            lambda: not self.lab.running_on(self.PRIMITIVE) and not self._any_blockrep(),
            timeout,
            "the clone to stop",
            every=0.3,
        )

    def _any_blockrep(self) -> bool:
        return any(self.status(n, timeout=2) is not None for n in self.lab.live())

    def read_disk(self, name: str) -> bytes:
        with open(self.disk(name), "rb") as f:
            return f.read()


BLOCK = 4096


class GatedConsumer:
    """A consumer that follows the Promoted instance through the gate: 4 KiB writes at
    seeded offsets in ``[0, span)`` through the export of the node whose gate is up, with
    a byte model of every acknowledged write.

    A write that fails (its node died under it) is *uncertain*: the disk may hold the old
    or the new block, until a later acknowledged write to the block settles it. A node
    whose write failed is not used again until its gate goes away (power-off, stop).
    """

    def __init__(self, cluster: BlockrepCluster, model: bytes, span: int, seed: int = 7) -> None:
        import random

        self.cluster = cluster
        self.model = bytearray(model)
        self.span = span
        self.rng = random.Random(seed)
        self.uncertain: dict[int, bytes] = {}  # block offset -> the new bytes not acknowledged
        self.errors: list[tuple[str, str]] = []  # (node, error) of failed writes
        self.acked: dict[str, list[int]] = {name: [] for name in cluster.lab.nodes}
        self.ack_times: dict[str, list[float]] = {name: [] for name in cluster.lab.nodes}
        self.write_timeout = 60.0
        self._clients: dict[str, Any] = {}
        self._failed: set[str] = set()
        self._locks: dict[str, int] = {}

    def total(self) -> int:
        return sum(len(v) for v in self.acked.values())

    def _gated(self) -> str | None:
        for name in self.cluster.lab.nodes:
            up = os.path.exists(self.cluster.gate(name))
            if name in self._failed:
                if up:
                    continue
                self._failed.discard(name)
            if up:
                return name
        return None

    async def _client(self, name: str) -> Any:
        if name not in self._clients:
            from blockrep.testing import nbd_client

            self._clients[name] = await asyncio.wait_for(
                nbd_client(self.cluster.export(name), "disk"), 10
            )
        return self._clients[name][1]

    async def _drop(self, name: str) -> None:
        c = self._clients.pop(name, None)
        if c is not None:
            try:
                await asyncio.wait_for(c[0].close_all(), 5)
            except BaseException:  # noqa: BLE001 - a dead server leaves the client broken
                pass

    def _lock_fd(self, name: str) -> int:
        if name not in self._locks:
            path = os.path.join(self.cluster.lab.nodes[name].data, "gate.lock")
            self._locks[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._locks[name]

    async def write_one(self) -> str | None:
        """One write through the gated node; its name, or None when no gate is up."""
        name = self._gated()
        if name is None:
            return None
        fd = self._lock_fd(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # the gate is stopping right now
        try:
            if not os.path.exists(self.cluster.gate(name)):
                return None
            off = self.rng.randrange(self.span // BLOCK) * BLOCK
            data = self.rng.randbytes(BLOCK)
            try:
                c = await self._client(name)
                await asyncio.wait_for(c.write(off, data), self.write_timeout)
            except Exception as e:  # noqa: BLE001 - every failure is recorded and asserted on
                self.errors.append((name, f"{type(e).__name__}: {e}"))
                self.uncertain[off] = data
                self._failed.add(name)
                await self._drop(name)
                return name
            self.model[off : off + BLOCK] = data
            self.uncertain.pop(off, None)
            self.acked[name].append(off)
            self.ack_times[name].append(time.monotonic())
            return name
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def run(self, stop: asyncio.Event, pause: float = 0.002) -> None:
        while not stop.is_set():
            if await self.write_one() is None:
                await asyncio.sleep(0.02)
            else:
                await asyncio.sleep(pause)

    async def wait_writes(self, name: str, n: int, timeout: float) -> None:
        """Until ``n`` more writes were acknowledged by ``name`` (the consumer runs)."""
        target = len(self.acked[name]) + n
        deadline = time.monotonic() + timeout
        while len(self.acked[name]) < target:
            if time.monotonic() > deadline:
                raise LabError(
                    f"{n} writes through {name} not acknowledged in {timeout:.0f} s "
                    f"(errors: {self.errors[-3:]})"
                )
            await asyncio.sleep(0.05)

    async def read_span(self, name: str) -> bytes:
        """``[0, span)`` read through ``name``'s export."""
        from blockrep.testing import nbd_client

        g, c = await asyncio.wait_for(nbd_client(self.cluster.export(name), "disk"), 10)
        try:
            parts = []
            for off in range(0, self.span, 1 << 20):
                parts.append(await asyncio.wait_for(c.read(off, min(1 << 20, self.span - off)), 30))
            return b"".join(parts)
        finally:
            await asyncio.wait_for(g.close_all(), 5)

    def mismatch(self, data: bytes, span_only: bool = False) -> str | None:
        """Where ``data`` (a disk, or its first ``span`` bytes) differs from the model: an
        uncertain block may hold the old or the new bytes; None when it matches."""
        model = self.model[: self.span] if span_only else self.model
        if len(data) != len(model):
            return f"{len(data)} bytes, the model has {len(model)}"
        if data == model:
            return None
        for off in range(0, len(model), BLOCK):
            got, want = data[off : off + BLOCK], model[off : off + BLOCK]
            if got != want and self.uncertain.get(off) != got:
                return f"block at {off} differs from the model (uncertain: {off in self.uncertain})"
        return None

    async def aclose(self) -> None:
        for name in list(self._clients):
            await self._drop(name)
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()
