"""The HA manager tests' view of ``blockrep primary|secondary`` processes: blockrep.testing's
HA pair, with every status held to the README schema (`blockrep status --json`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from blockrep import testing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# README "The HA manager": `blockrep status --json` keys and their types
PEER_STATES = {
    "connecting",
    "syncing",
    "connected",
    "peer-lost",
    "degraded",
    "failed-over",
    "split-brain",
    "stale",
    "refused",
}
STAGES = {"none", "running", "failover", "failover-failed", "done"}
# CONTINUITY.md §8 (README: disk-state, peer-role, peer-disk-state, replication)
ROLES = {"primary", "secondary", "none"}
DISK_STATES = {"UpToDate", "Consistent", "Outdated", "Inconsistent"}
REPLICATION_STATES = {
    "Connecting",
    "Established",
    "Protected",
    "SyncSource",
    "SyncTarget",
    "PausedSync",
    "VerifySource",
    "VerifyTarget",
    "SplitBrain",
    "Unrelated",
    "StandAlone",
}
NUM = (int, float)


def _ranges_ok(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, list)
        and len(r) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        for r in v
    )


def check_status_schema(s: dict[str, Any], role: str | None = None) -> None:
    """Every documented key present with the documented type (README, `blockrep status --json`)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, NUM) and not isinstance(v, bool)

    assert isinstance(s, dict), s
    assert s["role"] in ROLES, s["role"]
    if role is not None and role != "up":  # `blockrep up`: the role changes at run time
        assert s["role"] == role
    assert s["mode"] in ("separate", "shared"), s["mode"]
    assert isinstance(s["stage"], str) and s["stage"] in STAGES, s["stage"]
    assert isinstance(s["peer"], str) and s["peer"] in PEER_STATES, s["peer"]
    assert is_int(s["epoch"]) and s["epoch"] >= 0
    assert s["epoch-uuid"] is None or isinstance(s["epoch-uuid"], str)
    assert is_num(s["epoch-age"]) and s["epoch-age"] >= 0
    for k in ("hidden-bytes", "active-bytes", "unacked-bytes", "checkpoints"):
        assert is_int(s[k]) and s[k] >= 0, (k, s[k])
    assert s["keep-buffer-pages"] in (None, True, False), s["keep-buffer-pages"]
    for k in ("last-checkpoint-pause-ms", "checkpoint-pause-p50-ms", "checkpoint-pause-p99-ms"):
        assert is_num(s[k]) and s[k] >= 0, (k, s[k])
    assert s["checkpoint-pause-p50-ms"] <= s["checkpoint-pause-p99-ms"] + 1e-9
    assert s["replication-error"] is None or isinstance(s["replication-error"], str)
    assert isinstance(s["errors"], list) and all(isinstance(e, str) for e in s["errors"])
    af = s["auto-failover"]
    assert (
        isinstance(af, dict) and isinstance(af["enabled"], bool) and isinstance(af["reason"], str)
    ), af
    if "timeout" in af:
        assert is_num(af["timeout"])
    assert s["alone-since"] is None or isinstance(s["alone-since"], str)
    h = s["history"]
    assert h["current"] is None or isinstance(h["current"], str), h
    assert h["common"] is None or isinstance(h["common"], str), h
    assert is_int(h["length"]) and h["length"] == s["epoch"] and isinstance(h["trimmed"], bool), h
    if "resync" in s:
        r = s["resync"]
        assert r["direction"] in ("local-to-peer", "peer-to-local"), r
        for k in ("done-bytes", "total-bytes", "saved-by-checksums", "rate"):
            assert is_int(r[k]) and r[k] >= 0, (k, r)
        assert is_num(r["percent"]) and 0 <= r["percent"] <= 100, r
        assert r["eta"] is None or is_num(r["eta"]), r
        assert isinstance(r["paused"], bool), r
    assert _ranges_ok(s["written-alone"]), s["written-alone"]
    if "split-brain" in s:
        sb = s["split-brain"]
        assert sb["common-epoch"] is None or isinstance(sb["common-epoch"], str)
        assert _ranges_ok(sb["primary"]["written"]) and _ranges_ok(sb["secondary"]["written"]), sb
    if "sync" in s:
        sy = s["sync"]
        assert isinstance(sy["what"], str) and is_int(sy["current"]) and is_int(sy["total"]), sy
    assert s["disk-state"] in DISK_STATES, s["disk-state"]
    assert s["peer-role"] is None or s["peer-role"] in ROLES, s["peer-role"]
    assert s["peer-disk-state"] is None or s["peer-disk-state"] in DISK_STATES
    assert s["replication"] in REPLICATION_STATES, s["replication"]
    assert is_int(s["out-of-sync-bytes"]) and s["out-of-sync-bytes"] >= 0
    if s["replication"] == "Protected":  # 0, or what a verify found and nobody repaired yet
        found = (s.get("verify") or {}).get("out-of-sync-bytes", 0)
        assert s["out-of-sync-bytes"] == found and s["peer-role"] is not None, s
    vols = s["volumes"]
    assert isinstance(vols, list) and len(vols) >= 1, vols
    for v in vols:
        assert is_int(v["volume"]) and isinstance(v["disk"], str), v
        assert is_int(v["size"]) and v["size"] >= 0 and isinstance(v["export"], str), v
    assert isinstance(s["jobs"], list)
    for j in s["jobs"]:
        assert (
            isinstance(j["id"], str) and isinstance(j["type"], str) and isinstance(j["status"], str)
        ), j
        assert is_int(j["current"]) and is_int(j["total"]), j


def buffers_in_memory(ha: testing.HA) -> bool:
    """Whether the buffer directory the harness gives a secondary (/dev/shm when there
    is one) is tmpfs or ramfs, as stat(1) says: what keep-buffer-pages=auto keys on."""
    bdir = "/dev/shm" if os.path.isdir("/dev/shm") else ha.dir
    r = subprocess.run(["stat", "-f", "-c", "%T", bdir], capture_output=True, text=True)
    return r.stdout.strip() in ("tmpfs", "ramfs")


def scrape_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("blockrep_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Node(testing.HANode):
    def status(self) -> dict[str, Any]:
        s = super().status()
        check_status_schema(s, self.role)
        return s

    def status_cli(self) -> dict[str, Any]:
        """`blockrep status --json` as a user runs it."""
        r = subprocess.run(
            [sys.executable, "-m", "blockrep.cli", "status", "--qmp", f"unix:{self.qmp}", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        check_status_schema(s, self.role)
        return s


class HA(testing.HA):
    node_class = Node


def failover_cli(node: testing.HANode) -> None:
    """`blockrep failover --qmp unix:PATH` as an operator runs it; it must succeed."""
    r = subprocess.run(
        [sys.executable, "-m", "blockrep.cli", "failover", "--qmp", f"unix:{node.qmp}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, f"{node.name}: blockrep failover: {r.stderr}\n{node.log_text()}"


def regions_of(ranges: list[list[int]] | list[tuple[int, int]], region: int) -> set[int]:
    """The region numbers a list of [offset, length] ranges touches."""
    return {i for o, n in ranges if n > 0 for i in range(o // region, (o + n - 1) // region + 1)}


def log_size(node_log: str) -> int:
    """Where a node's log file ends now: a restarted node of the same name appends to it."""
    try:
        return os.path.getsize(node_log)
    except OSError:
        return 0


async def wait_log(node: testing.HANode, text: str, since: int = 0, timeout: float = 40.0) -> str:
    """Until ``text`` is in the node's log past byte ``since`` (this life's lines only:
    a restarted node appends to its earlier life's log). Returns that part of the log."""
    deadline = time.monotonic() + timeout
    while True:
        with open(node.log, "rb") as f:
            f.seek(since)
            part = f.read().decode(errors="replace")
        if text in part:
            return part
        if node.proc.poll() is not None:
            raise AssertionError(f"{node.name} exited ({node.proc.returncode}):\n{part}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: no {text!r} after {timeout} s:\n{part}")
        await asyncio.sleep(0.03)
