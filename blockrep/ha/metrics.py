"""Prometheus metrics (``--metrics HOST:PORT``): the status figures, refreshed every second.

The gauge names are README's; each is read from the same status dict that
``query-ha-status`` returns, so the two never disagree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..address import SocketAddress
from .states import ReplicationState

log = logging.getLogger("blockrep.ha")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]

# gauge (blockrep_<name>) → help text
GAUGES: tuple[tuple[str, str], ...] = (
    ("epoch", "current epoch number"),
    ("epoch_age_seconds", "time since the last checkpoint"),
    ("hidden_bytes", "bytes buffered in the hidden disk"),
    ("active_bytes", "bytes buffered in the active disk"),
    ("unacked_bytes", "bytes forwarded to the secondary and not yet acknowledged"),
    ("checkpoints_total", "checkpoints taken"),
    ("last_checkpoint_pause_ms", "consumer pause of the last checkpoint"),
    ("peer_connected", "1 if the peer is connected"),
    ("errors", "errors recorded"),
    ("out_of_sync_bytes", "bytes that may differ from the peer (0 when Protected)"),
    ("resync_done_bytes", "background resync: bytes done (0 when none runs)"),
    ("resync_total_bytes", "background resync: bytes to do, growing with new writes"),
    ("resync_percent", "background resync: percent done (0-100)"),
    ("resync_saved_bytes", "background resync: bytes the digests showed equal"),
    ("last_handshake_bytes", "bytes the last pairing sent to the peer"),
    ("role_primary", "1 if this node is primary"),
    ("verify_running", "online verify: 1 while a pass runs"),
    ("verify_position_bytes", "online verify: bytes of the disk verified by this pass"),
    ("verify_total_bytes", "online verify: bytes of the disk"),
    ("verify_mismatched_bytes", "online verify: bytes that differ from the peer (this pass)"),
    ("verify_skipped_bytes", "online verify: bytes skipped, written while they were hashed"),
    ("verify_out_of_sync_bytes", "online verify: bytes found different and not repaired yet"),
)

# the activity log's gauges (blockrep_al_<name>), set while the node has one (P)
AL_GAUGES: tuple[tuple[str, str], ...] = (
    ("regions", "activity log: durable hot regions"),
    ("limit", "activity log: most hot regions"),
    ("commits", "activity log: commits"),
)


def values(s: dict[str, Any]) -> dict[str, float]:
    """Each gauge's value from one status dict."""
    return {
        "epoch": s["epoch"],
        "epoch_age_seconds": s["epoch-age"],
        "hidden_bytes": s["hidden-bytes"],
        "active_bytes": s["active-bytes"],
        "unacked_bytes": s["unacked-bytes"],
        "checkpoints_total": s["checkpoints"],
        "last_checkpoint_pause_ms": s["last-checkpoint-pause-ms"],
        "peer_connected": 1 if s["peer"] == "connected" else 0,
        "errors": len(s["errors"]),
        "out_of_sync_bytes": s.get("out-of-sync-bytes", 0),
        "resync_done_bytes": (rs := s.get("resync") or {}).get("done-bytes", 0),
        "resync_total_bytes": rs.get("total-bytes", 0),
        "resync_percent": rs.get("percent", 0),
        "resync_saved_bytes": rs.get("saved-by-checksums", 0),
        "last_handshake_bytes": (s.get("last-handshake") or {}).get("bytes", 0),
        "role_primary": 1 if s["role"] == "primary" else 0,
        "verify_running": 1 if (v := s.get("verify") or {}).get("running") else 0,
        "verify_position_bytes": v.get("position", 0),
        "verify_total_bytes": v.get("total", 0),
        "verify_mismatched_bytes": v.get("mismatched-bytes", 0),
        "verify_skipped_bytes": v.get("skipped-bytes", 0),
        "verify_out_of_sync_bytes": v.get("out-of-sync-bytes", 0),
    }


def al_values(s: dict[str, Any]) -> dict[str, float]:
    """The activity log's gauges; empty when the node has no log."""
    al = s.get("al")
    return {k: al[k] for k, _ in AL_GAUGES} if isinstance(al, dict) else {}


def replication_values(s: dict[str, Any]) -> dict[str, float]:
    """``blockrep_replication_state{state=...}``: 1 for the current state, 0 for the others."""
    now = s.get("replication")
    return {st.value: 1 if st.value == now else 0 for st in ReplicationState}


def serve(address: str, status: StatusFn) -> asyncio.Task:
    """Start the HTTP endpoint and the task that refreshes the gauges; return the task."""
    from prometheus_client import Gauge, start_http_server

    addr = SocketAddress.from_str(address)
    start_http_server(int(addr.port), addr=addr.host)
    gauges = {k: Gauge(f"blockrep_{k}", h) for k, h in GAUGES}
    al = {k: Gauge(f"blockrep_al_{k}", h) for k, h in AL_GAUGES}
    rep = Gauge("blockrep_replication_state", "1 for the current replication state", ["state"])
    return asyncio.create_task(_refresh(gauges, al, rep, status))


async def _refresh(gauges: dict[str, Any], al: dict[str, Any], rep: Any, status: StatusFn) -> None:
    while True:
        try:
            s = await status()
            for k, v in values(s).items():
                gauges[k].set(v)
            for k, v in al_values(s).items():
                al[k].set(v)
            for state, v in replication_values(s).items():
                rep.labels(state=state).set(v)
        except Exception as e:  # metrics must never take the node down
            log.debug("metrics: %s", e)
        await asyncio.sleep(1.0)
