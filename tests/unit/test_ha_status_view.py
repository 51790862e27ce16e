"""CONTINUITY.md §8: status's states from what a role knows (blockrep/ha/view.py), row by row."""

from __future__ import annotations

import pytest

from blockrep.ha import metrics
from blockrep.ha.events import EventLog, changed, snapshot
from blockrep.ha.role import PeerStatus
from blockrep.ha.states import DiskState, ReplicationState, Role
from blockrep.ha.view import Facts, view

P, S = Role.PRIMARY, Role.SECONDARY
UP, CONS, OUT, INC = (
    DiskState.UP_TO_DATE,
    DiskState.CONSISTENT,
    DiskState.OUTDATED,
    DiskState.INCONSISTENT,
)
R = ReplicationState
MiB = 1 << 20

# (facts, disk-state, peer-role, peer-disk-state, replication, out-of-sync-bytes)
ROWS = [
    # P connecting at start: serving, nothing known of S yet
    (Facts(P, "connecting", "none"), UP, None, None, R.CONNECTING, 0),
    # P copying to S before replicating (initial sync / resync)
    (
        Facts(P, "connecting", "none", sync="source", sync_left=3 * MiB, bitmap_bytes=MiB),
        UP,
        S,
        INC,
        R.SYNC_SOURCE,
        3 * MiB,
    ),
    # P paired and syncing: the peer is known (secondary, Inconsistent); paused → PausedSync
    (
        Facts(P, "syncing", "none", sync="source", sync_left=2 * MiB),
        UP,
        S,
        INC,
        R.SYNC_SOURCE,
        2 * MiB,
    ),
    (
        Facts(P, "syncing", "none", sync="source", sync_left=MiB, sync_paused=True),
        UP,
        S,
        INC,
        R.PAUSED_SYNC,
        MiB,
    ),
    # paired, the handshake done, nothing to copy yet: Established
    (Facts(P, "syncing", "none"), UP, S, None, R.ESTABLISHED, 0),
    # a sync target mid-copy is Inconsistent, whatever it persisted
    (Facts(S, "connecting", "none", sync="target", sync_left=MiB), INC, P, UP, R.SYNC_TARGET, MiB),
    # paired and checkpointing: Protected, nothing out of sync (the bitmap is the past's)
    (Facts(P, "connected", "running", bitmap_bytes=MiB), UP, S, UP, R.PROTECTED, 0),
    (Facts(S, "connected", "running"), UP, P, UP, R.PROTECTED, 0),
    # connected, replication not running yet: paired, no epoch
    (Facts(S, "connected", "none"), UP, P, None, R.ESTABLISHED, 0),
    # P alone after losing S: UpToDate; Connecting with --reconnect, else StandAlone
    (Facts(P, "degraded", "none", bitmap_bytes=2 * MiB), UP, None, None, R.STAND_ALONE, 2 * MiB),
    (
        Facts(P, "degraded", "none", bitmap_bytes=2 * MiB, reconnect=True),
        UP,
        None,
        None,
        R.CONNECTING,
        2 * MiB,
    ),
    # P learnt that S failed over without it: its disk is behind
    (Facts(P, "stale", "none", bitmap_bytes=MiB), OUT, None, None, R.STAND_ALONE, MiB),
    # both wrote alone
    (Facts(P, "split-brain", "none", bitmap_bytes=MiB), UP, None, None, R.SPLIT_BRAIN, MiB),
    (Facts(S, "split-brain", "none"), UP, None, None, R.SPLIT_BRAIN, 0),
    # the disks (size, history, contents) do not belong together
    (Facts(P, "refused", "none"), UP, None, None, R.UNRELATED, 0),
    # S that stopped hearing P waits for it; its disk (+ buffers) is the newest it knows
    (Facts(S, "peer-lost", "running"), UP, None, None, R.CONNECTING, 0),
    # S after failover: alone, UpToDate, not pairing
    (Facts(S, "failed-over", "done", bitmap_bytes=MiB), UP, None, None, R.STAND_ALONE, MiB),
    # S not yet paired in this life: what it persisted
    (Facts(S, "connecting", "none"), CONS, None, None, R.CONNECTING, 0),
    (Facts(S, "connecting", "none", disk_state=OUT), OUT, None, None, R.CONNECTING, 0),
    (Facts(S, "connecting", "none", disk_state=INC), INC, None, None, R.CONNECTING, 0),
    # a persisted Inconsistent disk stays Inconsistent, even on a primary
    (Facts(P, "degraded", "none", disk_state=INC), INC, None, None, R.STAND_ALONE, 0),
]


@pytest.mark.parametrize(("facts", "disk", "peer_role", "peer_disk", "rep", "oos"), ROWS)
def test_view_row(facts, disk, peer_role, peer_disk, rep, oos) -> None:
    v = view(facts)
    assert (v.disk_state, v.peer_role, v.peer_disk_state, v.replication, v.out_of_sync_bytes) == (
        disk,
        peer_role,
        peer_disk,
        rep,
        oos,
    )
    d = v.as_dict()
    assert set(d) == {
        "disk-state",
        "peer-role",
        "peer-disk-state",
        "replication",
        "out-of-sync-bytes",
    }
    assert all(type(x) in (str, int, type(None)) for x in d.values())  # no enum leaks into JSON


def test_every_peer_status_has_a_row() -> None:
    assert {p.value for p in PeerStatus} <= {f.peer for f, *_ in ROWS}


def test_protected_means_nothing_out_of_sync() -> None:
    for f, *_ in ROWS:
        v = view(f)
        if v.replication is R.PROTECTED:
            assert v.out_of_sync_bytes == 0 and v.peer_role is not None


def test_events_diff_watched_keys_only() -> None:
    a = {"role": "primary", "peer": "connected", "replication": "Protected", "epoch": 3}
    log = EventLog()
    first = log.observe(a)
    assert first is not None and first["seq"] == 1 and "replication" in first["changed"]
    assert log.observe({**a, "epoch": 4}) is None  # a new epoch is not a state change
    ev = log.observe({**a, "peer": "degraded", "replication": "StandAlone"})
    assert ev is not None and ev["changed"] == ["peer", "replication"]
    assert ev["replication"] == "StandAlone" and ev["seq"] == 2
    assert [e["seq"] for e in log.since(1)["events"]] == [2]
    assert log.since(2) == {"events": [], "cursor": 2, "lost": False}
    assert changed(snapshot(a), snapshot({**a, "last-handshake": {"rule": "x"}})) == [
        "last-handshake"
    ]


def test_metrics_replication_state_and_al() -> None:
    rv = metrics.replication_values({"replication": "Protected"})
    assert set(rv) == {r.value for r in R} and sum(rv.values()) == 1 and rv["Protected"] == 1
    assert metrics.al_values({}) == {}
    al = {"regions": 3, "limit": 1018, "commits": 7, "worst-case-resync-bytes": 3 * MiB}
    assert metrics.al_values({"al": al}) == {"regions": 3, "limit": 1018, "commits": 7}
