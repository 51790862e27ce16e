"""Today's pairing decisions (ha/pairing.py), row by row: the primary's verdict on a
hello, the plan that brings the disks level, and the secondary's split-brain check."""

from __future__ import annotations

import pytest

from blockrep.ha.handshake import Comparison as _Comparison
from blockrep.ha.handshake import Relation, compare_histories
from blockrep.ha.pairing import (
    Refusal,
    SyncPlan,
    judge_hello,
    plan_sync,
    secondary_split_brain,
)
from blockrep.ha.role import PeerStatus
from blockrep.ha.states import HistoryEntry


def Comparison(relation: str, common: str | None) -> _Comparison:  # noqa: N802
    """handshake's Comparison for a relation and a common epoch id (as status shows it)."""
    e = HistoryEntry.parse(common) if common is not None else None
    return _Comparison(Relation(relation), e, (), ())


def H(*entries: str) -> list[HistoryEntry]:  # noqa: N802
    return [HistoryEntry.parse(x) for x in entries]


OK_HELLO = {"stage": "none", "failed-over": False, "written": [], "alone-since": None}


def hello(**kw: object) -> dict[str, object]:
    return {**OK_HELLO, **kw}


@pytest.mark.parametrize(
    ("relation", "alone", "has_history", "initial", "assume", "plan"),
    [
        ("peer-behind", True, True, False, False, SyncPlan.RESYNC_WRITTEN),
        # only writes made alone are copied by an incremental resync, even with --initial-sync
        ("peer-behind", True, True, True, False, SyncPlan.RESYNC_WRITTEN),
        ("peer-behind", False, True, False, False, SyncPlan.VERIFY),
        ("peer-behind", False, True, False, True, SyncPlan.NONE),
        ("peer-behind", False, True, True, False, SyncPlan.INITIAL_SYNC),
        ("same", False, True, True, False, SyncPlan.INITIAL_SYNC),
        ("same", False, True, False, False, SyncPlan.RESYNC_DIFFERING),
        ("same", True, True, False, False, SyncPlan.RESYNC_DIFFERING),
        ("same", False, True, False, True, SyncPlan.NONE),
        ("same", False, False, False, False, SyncPlan.VERIFY),  # two fresh nodes
        ("same", False, False, False, True, SyncPlan.NONE),
        ("unrelated", False, True, False, False, SyncPlan.VERIFY),
    ],
)
def test_plan_sync_separate(
    relation: str, alone: bool, has_history: bool, initial: bool, assume: bool, plan: SyncPlan
) -> None:
    got = plan_sync(
        shared=False,
        relation=relation,
        alone=alone,
        has_history=has_history,
        initial_sync=initial,
        assume_synced=assume,
    )
    assert got is plan


@pytest.mark.parametrize("relation", ["same", "peer-behind", "unrelated"])
@pytest.mark.parametrize("initial", [False, True])
def test_plan_sync_shared_only_checks_identity(relation: str, initial: bool) -> None:
    # one shared disk: nothing is ever copied, whatever the options say
    got = plan_sync(
        shared=True,
        relation=relation,
        alone=True,
        has_history=True,
        initial_sync=initial,
        assume_synced=False,
    )
    assert got is SyncPlan.SHARED_IDENTITY


def test_judge_hello_pairs_when_histories_agree_and_secondary_is_idle() -> None:
    assert judge_hello(Comparison("same", "g1"), hello(), [], None) is None
    assert judge_hello(Comparison("peer-behind", "g1"), hello(stage=None), [[0, 1]], "d") is None


def test_judge_hello_stale_primary_when_secondary_went_on_and_primary_wrote_nothing() -> None:
    r = judge_hello(
        Comparison("self-behind", "g1"), hello(**{"alone-since": "failover:x"}), [], None
    )
    assert r == Refusal(
        PeerStatus.STALE,
        "the secondary went on without this primary (it failed over at failover:x); "
        "this primary's disk is stale: not replicating",
    )


def test_judge_hello_split_brain_reports_both_sides() -> None:
    mine = [[0, 1 << 20]]
    theirs = [[1 << 20, 2 << 20]]
    r = judge_hello(
        Comparison("diverged", "g1"),
        hello(written=theirs, **{"alone-since": "failover:s"}),
        mine,
        "degraded:p",
    )
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN
    assert r.split_brain == {
        "common-epoch": "g1",
        "primary": {"since": "degraded:p", "written": mine},
        "secondary": {"since": "failover:s", "written": theirs},
    }
    assert r.message.startswith("split brain: both nodes wrote since epoch g1: primary wrote 1")
    assert "secondary 1 region(s)" in r.message


def test_judge_hello_failed_over_secondary_with_same_history_is_split_brain() -> None:
    # a failed-over secondary never takes a primary's data, even at an equal history
    r = judge_hello(Comparison("same", "g1"), hello(**{"failed-over": True}), [], None)
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN


def test_judge_hello_self_behind_with_own_writes_is_split_brain_not_stale() -> None:
    r = judge_hello(Comparison("self-behind", "g1"), hello(), [[0, 1 << 20]], "degraded:p")
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN


def test_judge_hello_busy_secondary_degrades() -> None:
    r = judge_hello(Comparison("same", "g1"), hello(stage="running"), [], None)
    assert r == Refusal(
        PeerStatus.DEGRADED, "the secondary is in stage running; restart it to pair again"
    )


def test_secondary_split_brain_only_when_both_went_alone_and_diverged() -> None:
    fo = HistoryEntry.parse("failover:s")
    assert secondary_split_brain(H("a", "failover:s"), ["a", "degraded:p"], fo, 3) == (
        "split brain: the primary wrote on its own since epoch a as did this node "
        "(3 MiB region(s)); nothing is overwritten"
    )
    # not alone: the primary decides alone
    assert secondary_split_brain(H("a", "b"), ["a", "c"], None, 0) is None
    # the primary is merely ahead, or sent no history
    assert secondary_split_brain(H("a", "failover:s"), ["a"], fo, 1) is None
    assert secondary_split_brain(H("a", "failover:s"), None, fo, 1) is None


# -- histories compared by content (issue 11, Why 2) ---------------------------------------


def _epochs(n: int) -> list[str]:
    return [f"epoch:{i:08d}-0000-4000-8000-000000000000" for i in range(n)]


def test_history_past_the_old_cap_still_finds_its_common_epoch() -> None:
    # the restarted secondary kept the last 64 of 80 epochs (state.py's cap); the primary
    # went on alone since: by position nothing matched and it verified (refused) the disks
    p = H(*_epochs(80), "degraded:p")
    s = H(*_epochs(80)[-64:])
    rel = compare_histories(p, s)
    assert rel.relation is Relation.PEER_BEHIND and rel.common == p[79]
    assert judge_hello(rel, hello(), [[0, 1 << 20]], "degraded:p") is None
    plan = plan_sync(
        shared=False,
        relation=rel.relation,
        lost_append=bool(rel.theirs_after),
        alone=True,
        has_history=True,
        initial_sync=False,
        assume_synced=False,
    )
    assert plan is SyncPlan.RESYNC_WRITTEN


def test_crash_between_the_two_appends_is_not_split_brain() -> None:
    # S appended the last epoch, P crashed before it did and then went on alone
    e = _epochs(5)
    p, s = H(*e[:4], "degraded:p"), H(*e)
    rel = compare_histories(p, s)
    assert rel.relation is Relation.PEER_BEHIND
    assert judge_hello(rel, hello(), [[0, 1 << 20]], "degraded:p") is None
    # P's bitmap does not cover the epoch it crashed in: compare the disks, copy what differs
    plan = plan_sync(
        shared=False,
        relation=rel.relation,
        lost_append=bool(rel.theirs_after),
        alone=True,
        has_history=True,
        initial_sync=False,
        assume_synced=False,
    )
    assert plan is SyncPlan.RESYNC_DIFFERING
    # the secondary's side of the same hello sees no split brain either
    assert secondary_split_brain(s, [str(x) for x in p], None, 0) is None
    # the other way round (P one epoch ahead, S failed over): S went on, P is stale
    rel2 = compare_histories(H(*e), H(*e[:4], "failover:s"))
    assert rel2.relation is Relation.SELF_BEHIND
    r = judge_hello(rel2, hello(**{"alone-since": "failover:s"}), [], None)
    assert r is not None and r.peer is PeerStatus.STALE


def test_both_alone_after_the_common_epoch_is_still_split_brain() -> None:
    e = _epochs(3)
    rel = compare_histories(H(*e, "degraded:p"), H(*e, "failover:s"))
    assert rel.relation is Relation.DIVERGED
    r = judge_hello(rel, hello(**{"failed-over": True}), [[0, 1 << 20]], "degraded:p")
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN
    assert r.split_brain is not None and r.split_brain["common-epoch"] == e[-1].split(":")[1]
