"""Mutated messages for the HA control channel (issue 12's fuzz, tests/faults/test_ha_channel_fuzz.py).

Pure and seeded: a ``random.Random`` in, bytes and what the server must do with them out.

Two families:

- ``stranger_answer``: what a client without the proof sends after the server's greeting
  (bad JSON, truncated or over-long lines, wrong nonce lengths, wrong macs, binary
  garbage, deep nesting, verbs sent before authenticating). Every one must be refused.
- ``peer_line``: what an authenticated client sends. It holds the secret, so it *is* the
  peer as far as the protocol goes; the lines are therefore malformed versions of the
  state-changing verbs (wrong types, missing fields), read-only verbs, unknown operations
  and lines that are not one JSON object. A line the server parses to an object gets one
  reply; only an id starting with ``any-`` (a well-formed read-only verb) may get
  ``"ok": true``. Each must-refuse id names its mutation (``refuse-<kind>-<n>``), so an
  accepted one says which.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

from blockrep.ha import auth

VERBS = ("hello", "start", "checkpoint", "heartbeat", "handover", "sync-target", "digests")
NEAR_LIMIT = (900, 999)  # nesting the parser may or may not take (depends on the stack)


@dataclass
class Line:
    """One line for an authenticated connection and the server's duty."""

    data: bytes
    replies: int  # 1: the server parses it to an object and must answer it
    uncertain: bool = False  # nested near the parser's limit: it may be dropped instead
    kind: str = ""


# -- values of the wrong type ----------------------------------------------------------------


def _deep(rnd: random.Random, depth: int) -> Any:
    v: Any = rnd.choice([0, "x", None, True])
    for _ in range(depth):
        v = [v] if rnd.random() < 0.5 else {"a": v}
    return v


def junk(rnd: random.Random, depth: int = 0) -> Any:
    """A JSON value of some random type (never a string starting with 'any-')."""
    k = rnd.randrange(14)
    if k == 0:
        return None
    if k == 1:
        return rnd.choice([True, False])
    if k == 2:
        return rnd.randint(-(2**70), 2**70)
    if k == 3:
        return int("9" * rnd.randint(20, 4000))  # big, below Python's 4,300-digit limit
    if k == 4:
        return rnd.choice([rnd.uniform(-1e9, 1e9), 1e308, -0.0, float("inf"), float("nan")])
    if k == 5:
        return ""
    if k == 6:
        return "".join(chr(rnd.randrange(1, 0x2FFF)) for _ in range(rnd.randint(1, 40)))
    if k == 7:
        return "x" * rnd.randint(100, 2000)
    if k == 8 and depth < 3:
        return [junk(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    if k == 9 and depth < 3:
        return {rnd.choice(["a", "id", "op", "gen"]): junk(rnd, depth + 1)}
    if k == 10:
        return _deep(rnd, rnd.randint(2, 200))
    if k == 11:
        return -rnd.randint(1, 2**40)
    if k == 12:
        return rnd.choice(["checkpoint", "start", "epoch:", "\u0000", " ", "null"])
    return {}


def _not(rnd: random.Random, allowed: tuple[type, ...], null_ok: bool = False) -> Any:
    """A junk value of none of the ``allowed`` types (a bool is no int here); never null
    when ``null_ok`` (the field may be absent, and null reads as absent)."""
    while True:
        v = junk(rnd)
        if v is None and null_ok:
            continue
        if isinstance(v, bool):
            if bool not in allowed:
                return v
        elif not isinstance(v, allowed):
            return v


# -- the authenticated side ------------------------------------------------------------------


def _malformed_body(rnd: random.Random, size: int) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of a verb that must be refused whole."""
    verb = rnd.choice(VERBS[:3] + VERBS[4:] + ("unknown",))
    if verb == "hello":
        k = rnd.randrange(4)
        if k == 0:  # a size of the wrong type or value
            bad = rnd.choice(
                [
                    str(size),
                    [size],
                    {"size": size},
                    None,
                    True,
                    size + 1,
                    size - 1,
                    -1,
                    0,
                    float(size),
                    size + 0.5,
                    2**80,
                ]  # fmt: skip
            )
            return f"hello.size-{type(bad).__name__}", {"size": bad}
        if k == 1:
            return "hello.size-missing", {"history": junk(rnd)}
        if k == 2:  # the right size; the mode flag is not a boolean
            return "hello.shared-not-bool", {"size": size, "shared": _not(rnd, (bool,), True)}
        # the right size; the history is not a list of strings
        return "hello.history-not-list", {"size": size, "history": _not(rnd, (list,), True)}
    if verb == "start":
        bad = rnd.choice(
            [_not(rnd, (list,), True), [junk(rnd), 1], ["bogus:kind"], [""], ["epoch:"], "epoch:x"]
        )
        return f"start.history-{type(bad).__name__}", {"history": bad}
    if verb == "checkpoint":
        k = rnd.randrange(3)
        if k == 0:
            return "checkpoint.gen-missing", {}
        if k == 1:
            return "checkpoint.gen-empty", {"gen": ""}
        bad = _not(rnd, (str,))
        return f"checkpoint.gen-{type(bad).__name__}", {"gen": bad}
    if verb == "handover":
        bad = _not(rnd, (bool,), True)
        return f"handover.promote-{type(bad).__name__}", {"promote": bad}
    if verb == "sync-target":
        # null reads as absent here (a generation "unknown"): only wrong types
        if rnd.random() < 0.5:
            bad = _not(rnd, (str,), True)
            return f"sync-target.generation-{type(bad).__name__}", {
                "generation": bad,
                "source": os.urandom(16).hex(),
            }
        bad = _not(rnd, (str,), True)
        return f"sync-target.source-{type(bad).__name__}", {
            "generation": "epoch:" + os.urandom(16).hex(),
            "source": bad,
        }
    if verb == "digests":
        bad = rnd.choice(
            [
                _not(rnd, (list,)),
                [-1],
                [0, -rnd.randint(1, 2**40)],
                [1.0],
                [True],
                ["0"],
                [[0]],
                [None],
                [0, junk(rnd)],
            ]  # fmt: skip
        )
        if isinstance(bad, list) and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in bad
        ):
            bad = [-1]  # junk() drew a valid region: keep it malformed
        return "digests.regions-bad", {"regions": bad}
    op = rnd.choice(
        [
            None,
            7,
            ["checkpoint"],
            {"op": "checkpoint"},
            True,
            "",
            "Checkpoint",
            " checkpoint",
            "checkpoint\u0000",
            "quit",
            "failover",
            "query-status",
            "x" * 3000,
            "HELLO",
        ]  # fmt: skip
    )
    return "op-unknown", {"op": op}


def _read_only_body(rnd: random.Random) -> tuple[str, dict[str, Any]]:
    """A well-formed read-only verb: it may be answered ok."""
    k = rnd.randrange(4)
    if k == 0:
        return "heartbeat", {"op": "heartbeat"}
    if k == 1:
        return "heartbeat.extra", {"op": "heartbeat", "junk": junk(rnd)}
    if k == 2:  # in range or far out of it: either way nothing changes
        return "digests", {"op": "digests", "regions": rnd.choice([[], [0], [3, 1], [2**70]])}
    return "digests.empty", {"op": "digests", "regions": []}


def _dumps(v: Any) -> bytes:
    return json.dumps(v).encode()


def peer_line(rnd: random.Random, n: int, size: int) -> Line:
    """The ``n``-th line of an authenticated connection to a secondary of ``size`` bytes."""
    k = rnd.random()
    if k < 0.40:
        kind, fields = _malformed_body(rnd, size)
        op = fields.pop("op", kind.split(".")[0]) if kind == "op-unknown" else kind.split(".")[0]
        msg: dict[str, Any] = {"id": f"refuse-{kind}-{n}", "op": op, **fields}
        if kind == "op-unknown" and rnd.random() < 0.2:
            del msg["op"]
        if rnd.random() < 0.3:  # the id itself of the wrong type (still a refused verb)
            msg["id"] = junk(rnd)
        if rnd.random() < 0.1:
            del msg["id"]
        return Line(_dumps(msg) + b"\n", 1, kind=kind)
    if k < 0.55:
        kind, fields = _read_only_body(rnd)
        return Line(_dumps({"id": f"any-{kind}-{n}", **fields}) + b"\n", 1, kind=kind)
    return _raw_line(rnd, n)


def _raw_line(rnd: random.Random, n: int) -> Line:
    """A line that is not one JSON object, or one made by hand (numbers, nesting)."""
    k = rnd.randrange(10)
    if k == 0:
        data = rnd.choice([b"", b" ", b"\t \r", b"\r"])
    elif k == 1:  # a message cut short: a strict prefix of an object is never JSON
        full = _dumps({"id": f"refuse-cut-{n}", "op": rnd.choice(VERBS), "gen": "x"})
        data = full[: rnd.randrange(1, len(full) - 1)]
    elif k == 2:
        data = bytes(
            rnd.choice(b'{}[]":,0123456789abcnulltrue ') for _ in range(rnd.randint(1, 80))
        )
    elif k == 3:  # binary garbage (no newline inside: the line ends where we say)
        data = rnd.randbytes(rnd.randint(1, 300)).replace(b"\n", b"\xff")
    elif k == 4:
        data = _dumps(rnd.choice([[], [1, 2], 7, "checkpoint", None, [{"op": "checkpoint"}]]))
    elif k == 5:  # nesting far past the parser: dropped
        d = rnd.randint(3000, 5000) if rnd.random() < 0.95 else 100_000
        data = rnd.choice([b"[" * d + b"]" * d, b'{"op": ' + b"[" * d + b"]" * d + b"}"])
    elif k == 6:  # nesting near the parser's limit: answered or dropped, never a traceback
        d = rnd.randint(*NEAR_LIMIT)
        field = rnd.choice([b"id", b"op", b"gen"])
        data = b'{"' + field + b'": ' + b"[" * d + b"]" * d + b', "op": "checkpoint"}'
        if field == b"op":
            data = b'{"id": "refuse-deep-%d", "op": ' % n + b"[" * d + b"]" * d + b"}"
        return Line(data + b"\n", 1, uncertain=True, kind="near-limit")
    elif k == 7:  # a number past Python's 4,300 digits: not JSON to this parser
        digits = b"7" * rnd.randint(4400, 6000)
        data = rnd.choice([b'{"id": ' + digits + b', "op": "heartbeat"}',
                           b'{"id": "refuse-num-%d", "op": "checkpoint", "gen": ' % n + digits + b"}"])  # fmt: skip
    elif k == 8:  # numbers JSON allows and Python reads as floats (inf, nan) or huge
        num = rnd.choice([b"1e400", b"-1e400", b"NaN", b"Infinity", b"-0", b"1" * 4000])
        data = b'{"id": "refuse-num-%d", "op": "checkpoint", "gen": ' % n + num + b"}"
    else:  # duplicate keys: the last wins, and it is still malformed
        data = (
            b'{"id": "refuse-dup-%d", "op": "heartbeat", "op": "checkpoint", "gen": 1, "gen": []}'
            % n
        )
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        parsed = None
    return Line(data + b"\n", 1 if isinstance(parsed, dict) else 0, kind=f"raw{k}")


# -- the stranger's side -------------------------------------------------------------------------


def stranger_answer(
    rnd: random.Random, server_nonce: bytes, replay: bytes | None
) -> tuple[str, bytes, int]:
    """(kind, bytes, messages) a client without the proof sends after the greeting.

    Every one must be refused: ``psk`` here is NOT the pair's secret unless the answer is
    broken in another way (the mutations that use the pair's secret get it passed as
    ``replay``: an answer that was right for another connection's nonce)."""
    wrong = b"not the secret of this pair!!"
    cn = rnd.randbytes(32)
    good_shape = {"nonce": cn.hex(), "mac": auth.client_mac(wrong, server_nonce, cn).hex()}
    k = rnd.randrange(16)
    if k == 0:
        return (
            "bad-json",
            bytes(rnd.choice(b'{}":,abc0123 ') for _ in range(rnd.randint(1, 200))) + b"\n",
            1,
        )
    if k == 1:
        full = _dumps(good_shape)
        return "truncated", full[: rnd.randrange(1, len(full) - 1)] + rnd.choice([b"\n", b""]), 1
    if k == 2:  # over MAX_AUTH_LINE, and the mac in it would not help anyway
        pad = "p" * rnd.randint(auth.MAX_AUTH_LINE, 8 * auth.MAX_AUTH_LINE)
        return "huge", _dumps({**good_shape, "pad": pad}) + b"\n", 1
    if k == 3:  # a nonce of the wrong length
        n = rnd.choice([0, 1, 16, 31, 33, 64, 200])
        nonce = rnd.randbytes(n)
        mac = auth.client_mac(wrong, server_nonce, nonce)
        return "nonce-length", _dumps({"nonce": nonce.hex(), "mac": mac.hex()}) + b"\n", 1
    if k == 4:  # macs of the wrong length or not hex
        shape = rnd.choice(["", "00" * 31, "00" * 33, "zz" * 32, "0" * 63, good_shape["mac"][:-1]])
        return "mac-shape", _dumps({"nonce": cn.hex(), "mac": shape}) + b"\n", 1
    if k == 5:  # the server's own proof sent back (reflection), or the nonces swapped
        mac = rnd.choice(
            [auth.server_mac(wrong, server_nonce, cn), auth.client_mac(wrong, cn, server_nonce)]
        )
        return "reflect", _dumps({"nonce": cn.hex(), "mac": mac.hex()}) + b"\n", 1
    if k == 6:  # the server's nonce echoed as the client's
        mac = auth.client_mac(wrong, server_nonce, server_nonce)
        return "echo", _dumps({"nonce": server_nonce.hex(), "mac": mac.hex()}) + b"\n", 1
    if k == 7:
        data = rnd.randbytes(rnd.randint(1, 2000))
        return "binary", data + rnd.choice([b"\n", b""]), 1
    if k == 8:
        d = rnd.randint(10, auth.MAX_AUTH_LINE // 2 - 2)
        return "deep", rnd.choice([b"[" * d + b"]" * d, b'{"a":' * d + b"1" + b"}" * d]) + b"\n", 1
    if k == 9:  # verbs sent instead of authenticating
        verbs = [
            {"id": i, "op": op, "gen": os.urandom(16).hex(), "history": [], "size": 0}
            for i, op in enumerate(rnd.sample(VERBS, rnd.randint(1, len(VERBS))))
        ]
        return "verbs", b"".join(_dumps(v) + b"\n" for v in verbs), len(verbs)
    if k == 10:
        return (
            "types",
            _dumps({"nonce": junk(rnd), "mac": junk(rnd)})[: auth.MAX_AUTH_LINE - 1] + b"\n",
            1,
        )
    if k == 11:
        return "not-object", _dumps(rnd.choice([[], [good_shape], 1, "x", None])) + b"\n", 1
    if k == 12:
        return "empty", rnd.choice([b"\n", b"\r\n", b" \n"]), 1
    if k == 13 and replay is not None:  # right for another connection's nonce: a replay
        return "replay", replay, 1
    if k == 14:  # a bit of a well-shaped answer flipped
        raw = bytearray(auth.client_mac(wrong, server_nonce, cn))
        raw[rnd.randrange(32)] ^= 1 << rnd.randrange(8)
        return "bitflip", _dumps({"nonce": cn.hex(), "mac": raw.hex()}) + b"\n", 1
    # the answer in two lines, or with a second message glued on
    return "two-lines", _dumps(good_shape) + b"\n" + _dumps(good_shape) + b"\n", 2
