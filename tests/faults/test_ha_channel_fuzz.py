"""The control channel under fuzz while a pair replicates (issue 12, acceptance).

A pair on TCP loopback with ``--psk-file`` replicates (P's consumer writes random data
kept in a model, a checkpoint every ~0.5 s) while this test sends more than 100,000
mutated messages at the secondary's control port (tests/harness/channel_fuzz.py):

- as a stranger (many connections): broken answers to the server's challenge, over-long
  lines, garbage, verbs before authenticating. Every connection must end refused.
- as an authenticated client (it holds the secret, so for the protocol it is the peer):
  malformed versions of every verb, read-only verbs, unknown operations, lines that are
  not one JSON object, pipelined by hundreds. Every object must get one answer; only a
  well-formed read-only verb may be answered ok, and nothing may move S's state.

The pair must come out connected and level (the same epoch on both), take a final
checkpoint, and stop with both disks equal to the model; neither log may hold a
traceback or grow past 1 MiB (refusals are rate-limited).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from blockrep.ha import auth
from blockrep.testing import MiB, free_port
from tests.harness.channel_fuzz import peer_line, stranger_answer
from tests.harness.ha import HA, failover_cli
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.asyncio

SIZE = 4 * MiB
SEED = 1212
PEER_SESSIONS = 24  # authenticated connections, 3 at a time
LINES_PER_SESSION = 4_300
BATCH = 400  # lines per write: pipelined
STRANGERS = 2_400  # unauthenticated connections, 6 at a time
MIN_MESSAGES = 100_000
LOG_LIMIT = 1 << 20
FAST_S = ["--heartbeat-interval", "0.2"]
FAST_P = ["--heartbeat-interval", "0.2", "--checkpoint-interval", "0"]
# what no malformed message may change on S (status keys)
STATE_KEYS = ("role", "stage", "peer", "epoch", "epoch-uuid", "disk-state", "replication")


@dataclass
class Tally:
    messages: int = 0
    peer_lines: int = 0
    stranger_lines: int = 0
    strangers: int = 0
    replies: int = 0
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def doomed(self) -> bool:
        """Enough is wrong to fail: stop sending and go on to the final checks (a server
        that obeys malformed verbs is slow, and the rest of the count would tell nothing)."""
        return sum(self.accepted.values()) >= 200 or len(self.problems) >= 20

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text[:400])

    def accept(self, kind: str, reply: bytes) -> None:
        self.accepted[kind] += 1
        self.examples.setdefault(kind, reply[:160].decode(errors="replace").strip())


async def _read_to_eof(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """All the server sends until it closes; None if it is still open after ``timeout``."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return None
        except ConnectionError:
            return out
        if not chunk:
            return out
        out += chunk


async def _authenticate(port: int, psk: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 25)
    greeting = json.loads(await asyncio.wait_for(r.readline(), 15))
    sn, cn = bytes.fromhex(greeting["nonce"]), os.urandom(auth.NONCE_BYTES)
    answer = {"nonce": cn.hex(), "mac": auth.client_mac(psk, sn, cn).hex()}
    w.write(json.dumps(answer).encode() + b"\n")
    await w.drain()
    reply = json.loads(await asyncio.wait_for(r.readline(), 15))
    assert reply["auth"] == "ok", reply
    assert bytes.fromhex(reply["mac"]) == auth.server_mac(psk, sn, cn)
    return r, w


def _reply_kind(line: bytes) -> tuple[bool, str]:
    """(answered ok, the id's mutation kind) of one reply line."""
    try:
        msg = json.loads(line)
    except RecursionError:  # an id nested near the limit, echoed back
        return b'"ok": true' in line, "deep-id"
    if not isinstance(msg, dict) or not isinstance(msg.get("ok"), bool):
        return True, "not-a-reply"  # whatever this is, it is not a refusal
    rid = msg.get("id")
    if isinstance(rid, str) and rid.startswith(("any-", "refuse-")):
        return msg["ok"], rid.rsplit("-", 1)[0]
    return msg["ok"], f"refuse-id-{type(rid).__name__}"


async def _peer_session(port: int, psk: bytes, rnd: random.Random, base: int, t: Tally) -> None:
    """One authenticated connection: LINES_PER_SESSION mutated lines, pipelined."""
    r, w = await _authenticate(port, psk)
    got = 0

    async def replies() -> None:
        nonlocal got
        while line := await r.readline():
            got += 1
            ok, kind = _reply_kind(line)
            if ok and not kind.startswith("any-"):
                t.accept(kind, line)

    reader = asyncio.create_task(replies())
    sure = maybe = 0
    try:
        for start in range(0, LINES_PER_SESSION, BATCH):
            if t.doomed:
                break
            lines = [peer_line(rnd, base + start + i, SIZE) for i in range(BATCH)]
            sure += sum(x.replies for x in lines if not x.uncertain)
            maybe += sum(x.replies for x in lines if x.uncertain)
            w.write(b"".join(x.data for x in lines))
            await asyncio.wait_for(w.drain(), 60)
            t.messages += len(lines)
            t.peer_lines += len(lines)
        # every object is answered before the connection ends (EOF cancels what is in flight)
        deadline = time.monotonic() + 60
        last, quiet = got, time.monotonic()
        while got < sure + maybe and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if got != last:
                last, quiet = got, time.monotonic()
            elif got >= sure and time.monotonic() - quiet > 0.3:
                break
        if not sure <= got <= sure + maybe:
            t.problem(f"session {base}: {got} replies to {sure} (+{maybe} maybe) objects")
        t.replies += got
    finally:
        reader.cancel()
        w.close()


async def _huge_line(port: int, psk: bytes, t: Tally) -> None:
    """A line past the channel's 16 MiB bound: the connection is dropped, nothing else."""
    r, w = await _authenticate(port, psk)
    try:
        w.write(b'{"id": "refuse-huge", "op": "heartbeat", "pad": "' + b"x" * (17 << 20) + b'"}\n')
        await asyncio.wait_for(w.drain(), 60)
    except ConnectionError:
        pass
    rest = await _read_to_eof(r, 60)
    t.messages += 1
    t.peer_lines += 1
    if rest is None:
        t.problem("a line over 16 MiB: the connection stayed open")
    elif b'"ok": true' in rest:
        t.accept("huge-line", rest)
    w.close()


async def _stranger(port: int, rnd: random.Random, replay: bytes, t: Tally) -> bytes | None:
    """One unauthenticated connection with one mutated answer; returns the server's nonce."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        t.problem(f"stranger: cannot connect: {e}")
        return None
    try:
        greeting = json.loads(await asyncio.wait_for(r.readline(), 15))
        nonce = bytes.fromhex(greeting["nonce"])
        assert greeting == {"blockrep": 1, "auth": "psk", "nonce": nonce.hex()}, greeting
        assert len(nonce) == auth.NONCE_BYTES
        kind, data, n = stranger_answer(rnd, nonce, replay)
        try:
            w.write(data)
            w.write_eof()
            await asyncio.wait_for(w.drain(), 15)
        except ConnectionError:
            pass
        t.messages += n
        t.stranger_lines += n
        t.strangers += 1
        rest = await _read_to_eof(r, auth.HANDSHAKE_TIMEOUT + 10)
        if rest is None:
            t.problem(f"stranger {kind}: the connection stayed open")
        elif rest not in (b"", b'{"auth": "refused"}\n'):
            t.accept(f"stranger-{kind}", rest)
        return nonce
    finally:
        w.close()


async def _stalled(port: int, first: bytes, t: Tally) -> None:
    """A stranger that sends ``first`` and then nothing: dropped at the deadline."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(first)
    await w.drain()
    rest = await _read_to_eof(r, auth.HANDSHAKE_TIMEOUT + 10)
    if rest is None:
        t.problem(f"a stranger that sent {first!r} and stalled was never dropped")
    elif b'"ok"' in rest or b'"auth": "ok"' in rest:
        t.accept("stalled", rest)
    w.close()


async def _replicate(p: Any, pc: Any, rnd: random.Random, model: bytearray, stop: asyncio.Event,
                     t: Tally, counts: dict[str, int]) -> None:  # fmt: skip
    """P's consumer writes (kept in the model) and a checkpoint every ~0.5 s."""
    due = time.monotonic() + 0.5
    while not stop.is_set():
        await asyncio.wait_for(random_writes(pc, rnd, SIZE, 4, model=model), 30)
        counts["writes"] += 4
        if time.monotonic() >= due:
            try:
                await p.qmp_async("replication-checkpoint", timeout=30)
                counts["checkpoints"] += 1
            except AssertionError as e:
                t.problem(f"a checkpoint during the fuzz failed: {str(e)[:300]}")
            due = time.monotonic() + 0.5
        await asyncio.sleep(0.01)


async def _tcp_pair(ha: HA) -> tuple[Any, Any, int]:
    port = free_port()
    s = ha.secondary(listen=f"127.0.0.1:{port}", extra=FAST_S)
    p = ha.primary(f"127.0.0.1:{port}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    return p, s, port


def _log_check(node: Any, t: Tally) -> None:
    text = node.log_text()
    size = os.path.getsize(node.log)
    if "Traceback" in text:
        i = text.index("Traceback")
        last = collections.Counter(  # the exception line that ends each traceback
            next((x for x in part.splitlines() if x and not x.startswith(" ")), "?")
            for part in text.split("Traceback (most recent call last):\n")[1:]
        )
        t.problem(f"{node.name}'s log has {text.count('Traceback')} traceback(s) {dict(last)}; "
                  f"the first:\n{text[max(0, i - 200) : i + 1500]}")  # fmt: skip
    if size >= LOG_LIMIT:
        t.problem(f"{node.name}'s log is {size} bytes (limit {LOG_LIMIT})")


async def test_control_channel_fuzz_while_replicating(ha):
    deadline = time.monotonic() + 480  # ~60 s when every malformed verb is refused at once
    base = ha.make_disks(SIZE, SEED)
    p, s, port = await _tcp_pair(ha)
    psk = auth.load_psk(ha.psk_file())
    pc = await ha.client(p)
    model = bytearray(base)
    rnd = random.Random(SEED)
    await random_writes(pc, rnd, SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")
    before = await s.astatus()
    t = Tally()
    counts = {"writes": 0, "checkpoints": 0}

    # an answer that was right for another connection's nonce: a replay
    r, w = await asyncio.open_connection("127.0.0.1", port)
    old = bytes.fromhex(json.loads(await asyncio.wait_for(r.readline(), 15))["nonce"])
    w.close()
    cn = os.urandom(auth.NONCE_BYTES)
    replay = json.dumps({"nonce": cn.hex(), "mac": auth.client_mac(psk, old, cn).hex()}).encode()
    replay += b"\n"

    stop = asyncio.Event()
    writer = asyncio.create_task(_replicate(p, pc, random.Random(SEED + 1), model, stop, t, counts))

    async def strangers(k: int) -> None:
        srnd = random.Random(SEED * 100 + k)
        for _ in range(STRANGERS // 6):  # cheap: all of them, whatever the peer part found
            await _stranger(port, srnd, replay, t)

    async def peers(k: int) -> None:
        for i in range(k, PEER_SESSIONS, 3):
            if t.doomed:
                return
            await _peer_session(port, psk, random.Random(SEED * 1000 + i), i * 10**6, t)

    stalled = [b"", b'{"nonce": "', b"\x00" * 100]
    t0 = time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(
            *(strangers(k) for k in range(6)),
            *(peers(k) for k in range(3)),
            *(_stalled(port, first, t) for first in stalled),
            _huge_line(port, psk, t),
        ),
        deadline - time.monotonic(),
    )
    fuzz_seconds = time.monotonic() - t0
    stop.set()
    await asyncio.wait_for(writer, 60)

    # the pair is still paired and replicating, and takes a final checkpoint
    await p.qmp_async("replication-checkpoint")
    ps, ss = await p.astatus(), await s.astatus()
    for who, st in (("P", ps), ("S", ss)):
        if st["peer"] != "connected" or st["stage"] != "running" or st["errors"]:
            t.problem(f"{who} after the fuzz: peer {st['peer']}, stage {st['stage']}, "
                      f"errors {st['errors']}")  # fmt: skip
    if (ps["epoch"], ps["epoch-uuid"]) != (ss["epoch"], ss["epoch-uuid"]):
        t.problem(f"the epochs differ: P {ps['epoch']} {ps['epoch-uuid']}, "
                  f"S {ss['epoch']} {ss['epoch-uuid']}")  # fmt: skip
    for k in ("role", "disk-state", "replication"):
        if ss.get(k) != before.get(k):
            t.problem(f"S's {k} moved: {before.get(k)} -> {ss.get(k)}")
    if ss["epoch"] != before["epoch"] + counts["checkpoints"] + 1:
        t.problem(f"S's epoch is {ss['epoch']}: {before['epoch']} + {counts['checkpoints']} "
                  "checkpoints during the fuzz + 1 final")  # fmt: skip
    for kind, n in sorted(t.accepted.items()):
        t.problem(f"accepted {n} malformed message(s) of kind {kind}: {t.examples[kind]}")

    p.quit()
    s.quit()
    _log_check(p, t)
    _log_check(s, t)
    for who, disk in (("P", p.disk), ("S", s.disk)):
        if sha_file(disk) != sha(bytes(model)):
            t.problem(f"{who}'s disk differs from the model")
    await ha.aclose()

    summary = (
        f"{t.messages} messages ({t.peer_lines} authenticated, {t.stranger_lines} from "
        f"{t.strangers} strangers) in {fuzz_seconds:.1f} s, {t.replies} replies, "
        f"{counts['writes']} writes, {counts['checkpoints']} checkpoints"
    )
    assert not t.problems, summary + "\n" + "\n".join(t.problems)
    assert t.messages >= MIN_MESSAGES, summary
    assert t.strangers >= STRANGERS - 6 and counts["checkpoints"] >= 2, summary


# -- one malformed verb, looked at closely -------------------------------------------------------

MALFORMED_CHECKPOINTS = [
    {"id": 1, "op": "checkpoint"},  # no generation
    {"id": 2, "op": "checkpoint", "gen": None},
    {"id": 3, "op": "checkpoint", "gen": 5},
    {"id": 4, "op": "checkpoint", "gen": ""},
]


@pytest.mark.parametrize(
    "msg", MALFORMED_CHECKPOINTS, ids=lambda m: f"gen-{m.get('gen', 'missing')}"
)
async def test_a_malformed_checkpoint_is_refused_whole(ha, msg):
    """A checkpoint without a usable generation must change nothing on S: not its epoch,
    and not its buffers either (emptying them would keep P's unfinished epoch: after P
    dies S would fail over to writes no checkpoint covered)."""
    base = ha.make_disks(SIZE, SEED + 7)
    p, s, port = await _tcp_pair(ha)
    psk = auth.load_psk(ha.psk_file())
    pc = await ha.client(p)
    rnd = random.Random(SEED + 7)
    model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")
    checkpointed = bytes(model)
    await random_writes(pc, rnd, SIZE, 16, model=model)  # P's epoch, not checkpointed
    assert bytes(model) != checkpointed
    before = {k: (await s.astatus()).get(k) for k in STATE_KEYS}

    r, w = await _authenticate(port, psk)
    problems = []
    w.write(json.dumps(msg).encode() + b"\n")
    await w.drain()
    reply = json.loads(await asyncio.wait_for(r.readline(), 30))
    now = {k: (await s.astatus()).get(k) for k in STATE_KEYS}
    if reply.get("ok") is not False or now != before:
        problems.append(f"{msg} -> {reply}; S {before} -> {now}")
    w.close()

    os.kill(p.pid, signal.SIGKILL)
    p.proc.wait(10)
    await asyncio.to_thread(failover_cli, s)
    await s.wait_status(lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 30,
                        "S failed over")  # fmt: skip
    s.quit()
    got = sha_file(s.disk)
    await ha.aclose()
    if got != sha(checkpointed):
        which = "P's unfinished epoch" if got == sha(bytes(model)) else "neither"
        problems.append(f"after the failover S holds {which}, not the last checkpoint")
    assert not problems, "\n".join(problems)
