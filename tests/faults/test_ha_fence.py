"""The secondary's fence command under faults (issue 11, Why §6).

* A ``--fence-command`` that cannot be started (no such program) is reported in status
  (automatic failover off, with the error) and the watchdog keeps running: once the
  program exists, the next attempt fences and S fails over.
* A fence that fails is tried again (bounded backoff) while the primary stays silent;
  status shows the attempts and the last error; S fails over only after a fence
  succeeded, and its disk then equals the model (the last checkpoint + S's own writes).
"""

from __future__ import annotations

import os
import random
import signal
import stat

import pytest

from blockrep.testing import MiB
from tests.harness.ha import HA
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(120)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


def _script(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


async def _pair_and_checkpoint(ha: HA, s_extra: list[str], seed: int) -> tuple:
    """A paired S/P, writes, a checkpoint, P writes past it: (s, p, sc, checkpoint, latest)."""
    rnd = random.Random(seed)
    base = ha.make_disks(SIZE, seed)
    s = ha.secondary(extra=[*s_extra, *FAST_S])
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    sc = await ha.client(s)
    model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 16, model)
    await p.qmp_async("replication-checkpoint")
    # after the checkpoint: forwarded to S's disk, rolled back by a failover
    latest = bytearray(model)
    await random_writes(pc, rnd, SIZE, 8, latest)
    return s, p, sc, model, latest


async def _kill_primary(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.proc.wait(10)


async def test_fence_command_that_cannot_start_is_reported_and_watchdog_lives(ha):
    fence = ha.path("fence.sh")  # does not exist yet
    s, p, sc, model, _ = await _pair_and_checkpoint(
        ha, ["--auto-failover", "--fence-command", fence, "--failover-timeout", "0.5"], 11
    )
    st = await s.astatus()
    af = st["auto-failover"]
    assert af["enabled"] is False, af  # old code: "enabled" though the fence can never run
    assert "cannot be started" in af["reason"] and "fence.sh" in af["reason"], af
    assert any("cannot be started" in e for e in st["errors"]), st["errors"]

    await _kill_primary(p)
    st = await s.wait_status(
        lambda x: x["peer"] == "peer-lost" and x["fence"]["attempts"] >= 2,
        15,
        "fence attempts that cannot start",
    )
    assert st["stage"] == "running" and st["alone-since"] is None, st
    assert "cannot be started" in st["fence"]["last-error"], st
    assert st["auto-failover"]["enabled"] is False

    # the program appears: the watchdog (still alive) fences and fails over
    _script(fence, "exit 0\n")
    st = await s.wait_status(
        lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 15, "failover"
    )
    assert st["auto-failover"]["enabled"] is True
    assert "fenced" in st["auto-failover"]["reason"], st["auto-failover"]

    rnd = random.Random(12)
    await random_writes(sc, rnd, SIZE, 6, model)  # S goes on alone
    assert sha(bytes(await sc.read(0, SIZE))) == sha(model)
    s.quit()
    assert sha_file(s.disk) == sha(model)


async def test_failed_fence_is_retried_until_it_succeeds(ha):
    counter = ha.path("fence.count")
    fence = ha.path("fence.sh")
    # fails its first two runs, succeeds from the third on
    _script(
        fence,
        f'n=$(cat "{counter}" 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > "{counter}"\n'
        '[ "$n" -ge 3 ]\n',
    )
    s, p, sc, model, _ = await _pair_and_checkpoint(
        ha, ["--auto-failover", "--fence-command", fence, "--failover-timeout", "1.0"], 13
    )
    st = await s.astatus()
    assert st["auto-failover"]["enabled"] is True

    await _kill_primary(p)
    st = await s.wait_status(lambda x: _runs(counter) >= 1, 15, "first fence")
    # not failed over while the fence fails
    assert st["stage"] == "running" and st["alone-since"] is None, st
    st = await s.wait_status(
        lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 20, "failover after retries"
    )
    assert _runs(counter) == 3  # the failover came with the first fence that succeeded
    assert sum("fence command failed (exit 1)" in e for e in st["errors"]) == 2, st["errors"]
    assert st["fence"] == {"attempts": 3, "last-error": None, "next-attempt-in": 0}
    assert "fenced" in st["auto-failover"]["reason"]

    rnd = random.Random(14)
    await random_writes(sc, rnd, SIZE, 6, model)
    assert sha(bytes(await sc.read(0, SIZE))) == sha(model)
    s.quit()
    assert sha_file(s.disk) == sha(model)


async def test_failing_fence_status_shows_attempts_and_last_error(ha):
    s, p, sc, _, latest = await _pair_and_checkpoint(
        ha, ["--auto-failover", "--fence-command", "false", "--failover-timeout", "1.0"], 15
    )
    st = await s.astatus()
    assert st["fence"] == {"attempts": 0, "last-error": None, "next-attempt-in": 0}
    await _kill_primary(p)
    st = await s.wait_status(lambda x: x["fence"]["attempts"] >= 2, 15, "two fence attempts")
    fence = st["fence"]
    assert fence["last-error"] == "fence command failed (exit 1)", st
    assert 0 <= fence["next-attempt-in"] <= 30, fence
    assert "fence command failed" in st["auto-failover"]["reason"], st
    assert "attempt" in st["auto-failover"]["reason"], st
    assert st["stage"] == "running" and st["peer"] == "peer-lost", st
    s.quit()
    assert sha_file(s.disk) == sha(latest)  # never failed over: S holds every forwarded write


def _runs(counter: str) -> int:
    try:
        with open(counter) as f:
            return int(f.read() or 0)
    except FileNotFoundError:
        return 0
