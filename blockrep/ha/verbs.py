"""The control channel's requests as the secondary accepts them: each message checked
whole, by type, before anything is applied — a malformed one is refused with a
message naming the field, never half-applied (found by the channel fuzz, issue 12).

Pure functions of the message; ``secondary.py`` calls them first in each handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .channel import ChannelError
from .pairing import parse_history
from .states import EntryKind, HistoryEntry

MAX_ID = 200  # characters of an epoch's or a node's id


def _refuse(verb: str, key: str, value: Any, expected: str) -> ChannelError:
    return ChannelError(f"{verb}: '{key}' must be {expected}, not {str(value)[:60]!r}")


def _id(verb: str, msg: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    v = msg.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > MAX_ID or not v.isprintable():
        raise _refuse(verb, key, v, f"a non-empty string of at most {MAX_ID} characters")
    return v


def _bool(verb: str, msg: dict[str, Any], key: str) -> bool:
    v = msg.get(key, False)
    if not isinstance(v, bool):
        raise _refuse(verb, key, v, "true or false")
    return v


def checkpoint(msg: dict[str, Any]) -> str:
    """The new epoch's id (the primary's uuid)."""
    gen = _id("checkpoint", msg, "gen")
    assert gen is not None
    return gen


@dataclass(frozen=True)
class Hello:
    size: int
    shared: bool
    history: list[HistoryEntry] | None  # None: the primary sent none


def hello(msg: dict[str, Any]) -> Hello:
    size = msg.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _refuse("hello", "size", size, "a byte count")
    history = None
    if msg.get("history") is not None:
        try:
            history = parse_history(msg["history"])
        except ValueError as e:
            raise ChannelError(f"hello: 'history' is not a history: {e}") from None
    return Hello(size, _bool("hello", msg, "shared"), history)


def start(msg: dict[str, Any]) -> list[HistoryEntry] | None:
    if msg.get("history") is None:
        return None
    try:
        return parse_history(msg["history"])
    except ValueError as e:
        raise ChannelError(f"start: 'history' is not a history: {e}") from None


def sync_target(msg: dict[str, Any]) -> tuple[HistoryEntry, str]:
    """(the generation the copy starts from, the source node's id)."""
    source = _id("sync-target", msg, "source")
    text = _id("sync-target", msg, "generation", required=False)
    try:
        gen = HistoryEntry.parse(text) if text else HistoryEntry.parse("epoch:unknown")
    except ValueError:
        kinds = ", ".join(k.value for k in EntryKind)
        raise _refuse("sync-target", "generation", text, f"KIND:ID ({kinds})") from None
    assert source is not None
    return gen, source


def handover(msg: dict[str, Any]) -> bool:
    return _bool("handover", msg, "promote")


def digests(msg: dict[str, Any], regions_on_disk: int) -> list[int]:
    regions = msg.get("regions")
    if not isinstance(regions, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < regions_on_disk for r in regions
    ):
        raise ChannelError(
            f"digests: 'regions' must be a list of regions below {regions_on_disk}, "
            f"not {str(regions)[:60]}"
        )
    return regions
