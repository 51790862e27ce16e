"""CONTINUITY.md §8 in status, events and metrics (issue 11, Deliver 6, first part).

A pair reports Protected / UpToDate / its peer's role on both sides, with one volume;
`blockrep events --once` prints that state; a `blockrep events` stream started before S
is killed shows P's replication and peer change (Protected → StandAlone), and P then
counts the bytes it wrote alone as out of sync. Disks are compared byte for byte.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from blockrep.testing import MiB, free_port
from tests.harness.ha import HA, REPO, scrape_metrics
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(120)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


@pytest.fixture
async def ha():
    h = HA()
    try:
        yield h
    finally:
        await h.aclose()


def _sigint_default() -> None:
    """In the stream's child before exec: SIGINT at its default, so that Python turns it
    into KeyboardInterrupt. A job started in the background (``.ci/run &``) inherits
    SIGINT ignored, and Python then leaves it ignored: the stream would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _events_cli(qmp: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blockrep.cli", "events", "--qmp", f"unix:{qmp}", *extra]


async def test_states_in_status_events_and_metrics(ha):
    ha.make_disks(SIZE, 11)
    pm = free_port()
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=[*FAST_P, "--metrics", f"127.0.0.1:{pm}"])
    await s.wait_ready()
    await p.wait_ready()

    ps = await p.wait_status(lambda x: x["replication"] == "Protected", 10, "P protected")
    ss = await s.wait_status(lambda x: x["replication"] == "Protected", 10, "S protected")
    assert ps["role"] == "primary" and ps["peer"] == "connected"  # the old keys are kept
    assert (ps["disk-state"], ps["peer-role"], ps["peer-disk-state"]) == (
        "UpToDate",
        "secondary",
        "UpToDate",
    )
    assert (ss["disk-state"], ss["peer-role"], ss["peer-disk-state"]) == (
        "UpToDate",
        "primary",
        "UpToDate",
    )
    assert ps["out-of-sync-bytes"] == ss["out-of-sync-bytes"] == 0
    assert ps["volumes"] == [
        {
            "volume": 0,
            "disk": p.disk,
            "size": SIZE,
            "offset": 0,
            "export": f"unix:{p.export}",
            "export-name": "disk",
        }  # fmt: skip
    ]
    assert ss["volumes"][0]["disk"] == s.disk and ss["volumes"][0]["size"] == SIZE
    assert p.status_cli()["replication"] == "Protected"  # as a user runs it

    m = scrape_metrics(pm)
    for _ in range(30):  # the gauges are refreshed every second
        if m.get('blockrep_replication_state{state="Protected"}') == 1:
            break
        time.sleep(0.2)
        m = scrape_metrics(pm)
    assert m['blockrep_replication_state{state="Protected"}'] == 1, m
    assert m['blockrep_replication_state{state="StandAlone"}'] == 0, m
    assert m["blockrep_out_of_sync_bytes"] == 0 and m["blockrep_al_limit"] > 0, m

    once = subprocess.run(
        _events_cli(p.qmp, "--once"), capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert len(lines) == 1, once.stdout
    now = json.loads(lines[0])
    assert (now["role"], now["replication"], now["disk-state"], now["peer-role"]) == (
        "primary",
        "Protected",
        "UpToDate",
        "secondary",
    )

    stream = subprocess.Popen(
        _events_cli(p.qmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=_sigint_default,
    )
    try:
        pc = await ha.client(p)
        rnd = random.Random(11)
        await random_writes(pc, rnd, SIZE, 16)
        await p.qmp_async("replication-checkpoint")
        sc = await ha.client(s)
        assert sha(bytes(await sc.read(0, SIZE))) == sha(bytes(await pc.read(0, SIZE)))

        s.kill()
        st = await p.wait_status(lambda x: x["peer"] == "degraded", 10, "degraded")
        assert (st["replication"], st["peer-role"], st["peer-disk-state"]) == (
            "StandAlone",  # no --reconnect: it does not try to pair again
            None,
            None,
        )
        assert st["disk-state"] == "UpToDate"  # alone after losing its peer
        await pc.write(3 * MiB, rnd.randbytes(4096))
        st = await p.wait_status(lambda x: x["out-of-sync-bytes"] >= MiB, 10, "out of sync")
        time.sleep(1.0)  # the node polls its status every 0.2 s; the client too
    finally:
        stream.send_signal(signal.SIGINT)
        out, err = stream.communicate(timeout=30)
    assert stream.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    # the stream starts with the node's kept log (its pairing), then follows it live
    reps = [e["replication"] for e in events]
    assert reps[0] == "Connecting" and "Protected" in reps, out
    assert reps.index("Protected") < reps.index("StandAlone"), out
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    change = [e for e in events if e["replication"] == "StandAlone"]
    assert change, out
    assert {"peer", "replication", "peer-role"} <= set(change[0]["changed"]), change[0]
    assert change[0]["peer"] == "degraded" and change[0]["peer-role"] is None

    # the survivor's disk is what its consumer reads, byte for byte
    assert sha(bytes(await pc.read(0, SIZE))) == sha_file(p.disk)
