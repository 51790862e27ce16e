"""JSON text laid out as QEMU prints it.

QEMU builds its JSON output from a QDict, a hash table of 512 buckets whose
iteration order is bucket order, newest entry first within a bucket. Printing
our dicts in that same order makes ``blockrep img ... --output json`` read
exactly like ``qemu-img``'s.
"""

from __future__ import annotations

import json
from typing import Any


def _tdb_hash(name: str) -> int:
    b = name.encode()
    value = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        value = (value + ((c << (i * 5 % 24)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    buckets: dict[int, list[str]] = {}
    for k in keys:
        buckets.setdefault(_tdb_hash(k) % 512, []).insert(0, k)
    return [k for b in sorted(buckets) for k in buckets[b]]


def _reorder(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _reorder(obj[k]) for k in qdict_order(list(obj))}
    if isinstance(obj, list):
        return [_reorder(v) for v in obj]
    return obj


def dumps_pretty(obj: Any) -> str:
    """QEMU's qobject_to_json_pretty: 4-space indent, keys in QDict order."""
    return json.dumps(_reorder(obj), indent=4, separators=(",", ": "))
