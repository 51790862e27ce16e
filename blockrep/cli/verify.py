"""``blockrep verify`` and ``blockrep resync --out-of-sync`` (online verify, ha/verify.py).

Exit codes of ``verify --wait`` (and of a refusal without it): 0 the disks are in sync,
1 mismatches found, 2 an error (refused, the pass stopped: replication lost, cancelled).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

IN_SYNC, MISMATCHES, ERROR = 0, 1, 2


def _result_code(result: str | None) -> int:
    if result == "in-sync":
        return IN_SYNC
    if result == "mismatches":
        return MISMATCHES
    return ERROR


def _summary(v: dict[str, Any]) -> str:
    lines = [
        f"verify: {v['last-result'] or 'running'}: {v['position']} of {v['total']} bytes, "
        f"{v['mismatched-bytes']} bytes differ, {v['skipped-bytes']} bytes skipped "
        "(written while verified)"
    ]
    region = v.get("region-size", 1 << 20)
    for r in v["mismatched-regions"]:
        lines.append(f"mismatch: region {r} (offset {r * region}, {region} bytes)")
    if v["mismatched-bytes"]:
        lines.append("repair with: blockrep resync --out-of-sync")
    return "\n".join(lines)


def cmd_verify(argv: list[str]) -> int:
    from ..ha.config import parse_rate
    from .ha import qmp_call
    from .up import add_target, target_qmp

    p = argparse.ArgumentParser(
        prog="blockrep verify",
        description="compare the two disks of a Protected pair by digests (on the primary)",
    )
    add_target(p)
    p.add_argument("--wait", action="store_true", help="wait for the end: exit 0 in sync, "
                   "1 mismatches found, 2 error")  # fmt: skip
    p.add_argument(
        "--rate", type=parse_rate, default=0, help="bytes/s of disk (100M; 0: unlimited)"
    )
    p.add_argument("--restart", action="store_true", help="from the start, not the saved position")
    p.add_argument("--cancel", action="store_true", help="stop a running verify (position kept)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = target_qmp(p, a)
    try:
        if a.cancel:
            v = qmp_call(path, "ha-verify-cancel")
            print(json.dumps(v) if a.json else f"verify cancelled at {v['position']} bytes")
            return IN_SYNC
        v = qmp_call(path, "ha-verify", {"rate": a.rate, "restart": a.restart})
        run = v["run"]
        if not a.wait:
            print(json.dumps(v) if a.json else f"verify started at {v['position']} bytes")
            return IN_SYNC
        while True:
            v = qmp_call(path, "query-ha-status").get("verify") or {}
            if v.get("run") != run or not v.get("running"):
                break
            time.sleep(0.2)
    except (OSError, RuntimeError) as e:
        print(f"blockrep verify: {e}", file=sys.stderr)
        return ERROR
    if v.get("run") != run:
        print("blockrep verify: another verify started meanwhile", file=sys.stderr)
        return ERROR
    code = _result_code(v.get("last-result"))
    print(json.dumps(v) if a.json else _summary(v))
    if code == ERROR:
        print(f"blockrep verify: {v.get('last-result')}", file=sys.stderr)
    return code


def cmd_resync_out_of_sync(argv: list[str]) -> int:
    """``blockrep resync --out-of-sync``: copy what verify found different to the peer."""
    from .ha import qmp_call
    from .up import add_target, target_qmp

    p = argparse.ArgumentParser(prog="blockrep resync --out-of-sync")
    p.add_argument("--out-of-sync", action="store_true", required=True)
    add_target(p)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = target_qmp(p, a)
    try:
        r = qmp_call(path, "ha-resync-out-of-sync", timeout=3600)
    except (OSError, RuntimeError) as e:
        print(f"blockrep resync: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(r)
        if a.json
        else f"resync --out-of-sync: {len(r['regions'])} region(s), {r['bytes']} bytes copied "
        "to the peer"
    )
    return 0
