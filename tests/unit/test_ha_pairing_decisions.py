"""The pairing's decisions as the manager takes them (ha/pairing.py): the hello and the
node state made into the handshake's Sides, handshake.decide's verdict carried out or
mapped to a refusal, the refusals that are not the table's (a failed-over
`blockrep secondary`, a busy secondary), and the secondary's split-brain check. The
table itself is tested row by row in test_ha_handshake_rules.py."""

from __future__ import annotations

import pytest

from blockrep.ha.bitmap import REGION_SIZE, RegionBitmap
from blockrep.ha.handshake import ALL, Direction, Relation, Rule, compare_histories, decide
from blockrep.ha.handshake import Comparison as _Comparison
from blockrep.ha.node_state import NodeState
from blockrep.ha.pairing import (
    Refusal,
    judge_hello,
    local_side,
    peer_side,
    refusal_of,
    rule_name,
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


MiB = 1 << 20
SIZE = 64 * MiB
N = SIZE // REGION_SIZE


def _state(history: list[str], marks: tuple[int, ...] = ()) -> NodeState:
    st = NodeState("/nonexistent/state.json", node_id="p")
    st.history = H(*history)
    st.peer_bitmap = RegionBitmap(REGION_SIZE, SIZE, marks)
    return st


def _decide(
    mine: NodeState, al: tuple[int, ...], h: dict[str, object], initial: bool = False,
    clean: bool = False,
):  # fmt: skip
    peer = peer_side({"node-id": "s", **h}, SIZE, N)
    return decide(local_side(mine, al, SIZE, clean), peer, initial_sync=initial)


def test_same_history_copies_the_activity_logs_not_the_disk() -> None:
    # Why 5: equal histories compared whole disks; now P's AL ∪ S's stale AL ∪ marks
    d = _decide(_state(["epoch:a"]), (3, 4), hello(history=["epoch:a"], al=[9]))
    assert d.rule is Rule.CRASHED_PRIMARY and d.direction is Direction.LOCAL_TO_PEER
    assert d.regions == {3, 4, 9}
    d = _decide(_state(["epoch:a"]), (), hello(history=["epoch:a"], al=[], written=[]))
    assert d.regions == frozenset() and not d.refused
    # the rule names what the marks and the clean-shutdown flags say (CONTINUITY §5)
    both_clean = hello(history=["epoch:a"], **{"clean-shutdown": True})
    assert _decide(_state(["epoch:a"]), (), both_clean, clean=True).rule is Rule.IN_SYNC
    s_al = hello(history=["epoch:a"], al=[9], **{"clean-shutdown": False})
    d = _decide(_state(["epoch:a"]), (), s_al, clean=True)
    assert d.rule is Rule.CRASHED_SECONDARY and d.regions == {9}


def test_peer_behind_copies_the_bitmap_and_the_activity_log() -> None:
    d = _decide(_state(["epoch:a", "degraded:x"], (1, 2)), (7,), hello(history=["epoch:a"]))
    assert d.rule is Rule.PEER_BEHIND and d.regions == {1, 2, 7}


def test_failover_discard_copies_both_sides_marks() -> None:
    # the survivor (I2 marks + alone writes) meets the old primary (its AL and bitmap)
    mine = _state(["epoch:a", "failover:f"], (1, 2))
    d = _decide(mine, (), hello(history=["epoch:a"], al=[2, 7, 99], written=[[9 * MiB + 5, MiB]]))
    assert d.rule is Rule.FAILOVER_DISCARD and d.direction is Direction.LOCAL_TO_PEER
    assert d.regions == {1, 2, 7, 9, 10}  # 99 is past the disk: ignored


def test_a_fresh_peer_gets_the_whole_disk_and_two_fresh_disks_need_initial_sync() -> None:
    d = _decide(_state(["degraded:x"]), (), hello(history=[]))
    assert d.rule is Rule.FULL and d.regions is ALL
    d = _decide(_state([]), (), hello(history=[]))
    assert d.refused and d.rule is Rule.JUST_CREATED  # the manager then compares the disks
    assert _decide(_state([]), (), hello(history=[]), initial=True).regions is ALL


def test_the_peers_data_winning_makes_this_primary_stale() -> None:
    mine = _state(["epoch:a"])
    h = hello(
        history=["epoch:a", "failover:f"], written=[[0, MiB]], **{"alone-since": "failover:f"}
    )
    d = _decide(mine, (), h)
    assert d.direction is Direction.PEER_TO_LOCAL
    r = refusal_of(d, h, [], None, "a")
    assert r is not None and r.peer is PeerStatus.STALE and "stale" in r.message


def test_split_brain_refusal_reports_both_sides() -> None:
    mine = _state(["epoch:a", "degraded:p"], (0,))
    theirs = [[MiB, 2 * MiB]]
    h = hello(history=["epoch:a", "failover:s"], written=theirs, **{"alone-since": "failover:s"})
    d = _decide(mine, (), h)
    assert d.refused and d.rule is Rule.SPLIT_BRAIN
    r = refusal_of(d, h, [[0, MiB]], "degraded:p", "a")
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN
    assert r.split_brain == {
        "common-epoch": "a",
        "primary": {"since": "degraded:p", "written": [[0, MiB]]},
        "secondary": {"since": "failover:s", "written": theirs},
    }
    assert r.message.startswith("split brain: both nodes wrote since epoch a: primary wrote 1")


def test_an_interrupted_resync_resumes_from_its_source() -> None:
    mine = _state(["epoch:a", "failover:f"], (5, 6))  # the remainder stays in P's bitmap
    h = hello(history=["epoch:a"], **{"disk-state": "Inconsistent", "resync-source": "p"})
    d = _decide(mine, (), h)
    assert d.rule is Rule.RESUME and d.regions == {5, 6}
    # from another source: the whole disk (its marks say nothing of this resync)
    h2 = {**h, "resync-source": "someone-else"}
    assert _decide(mine, (), h2).regions is ALL


def test_rule_names_and_the_discard_local_resolve() -> None:
    mine = _state(["epoch:a", "degraded:p"], (1,))
    h = hello(history=["epoch:a"], **{"disk-state": "Outdated"}, written=[[3 * MiB, 1]])
    d = _decide(mine, (), h)
    assert d.regions == {1, 3} and rule_name(d, h) == "discard-local"
    ok = hello(history=["epoch:a"])
    assert rule_name(_decide(mine, (), ok), ok) == "peer-behind"


@pytest.mark.parametrize(
    "bad",
    [
        {"al": "x"},
        {"al": [1.5]},
        {"written": [[1]]},
        {"written": {"a": 1}},
        {"history": "x"},
        {"disk-state": "Broken"},
        {"last-role": "king"},
    ],  # fmt: skip
)
def test_an_ill_formed_hello_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        peer_side({"node-id": "s", **hello(history=["epoch:a"]), **bad}, SIZE, N)


def test_judge_hello_pairs_when_histories_agree_and_secondary_is_idle() -> None:
    assert judge_hello(Comparison("same", "g1"), hello(), [], None) is None
    assert judge_hello(Comparison("peer-behind", "g1"), hello(stage=None), [[0, 1]], "d") is None


def test_judge_hello_stale_primary_when_secondary_went_on_and_primary_wrote_nothing() -> None:
    r = judge_hello(
        Comparison("self-behind", "g1"),
        hello(**{"alone-since": "failover:x", "failed-over": True}),
        [],
        None,
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
        hello(written=theirs, **{"alone-since": "failover:s", "failed-over": True}),
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
    h = hello(**{"failed-over": True})
    r = judge_hello(Comparison("self-behind", "g1"), h, [[0, 1 << 20]], "degraded:p")
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
    mine = _state([*_epochs(80), "degraded:p"], (0,))
    d = _decide(mine, (), hello(history=_epochs(80)[-64:], **{"history-trimmed": True}))
    assert d.rule is Rule.PEER_BEHIND and d.regions == {0}


def test_crash_between_the_two_appends_is_not_split_brain() -> None:
    # S appended the last epoch, P crashed before it did and then went on alone
    e = _epochs(5)
    p, s = H(*e[:4], "degraded:p"), H(*e)
    rel = compare_histories(p, s)
    assert rel.relation is Relation.PEER_BEHIND
    assert judge_hello(rel, hello(), [[0, 1 << 20]], "degraded:p") is None
    # the epoch P crashed in is in its activity log: the table copies it with the bitmap
    d = _decide(_state([*e[:4], "degraded:p"], (0,)), (8,), hello(history=e))
    assert not d.refused and d.direction is Direction.LOCAL_TO_PEER and d.regions == {0, 8}
    # the secondary's side of the same hello sees no split brain either
    assert secondary_split_brain(s, [str(x) for x in p], None, 0) is None
    # the other way round (P one epoch ahead, S failed over): S went on, P is stale
    rel2 = compare_histories(H(*e), H(*e[:4], "failover:s"))
    assert rel2.relation is Relation.SELF_BEHIND
    h2 = hello(history=[*e[:4], "failover:s"], **{"alone-since": "failover:s"})
    r = refusal_of(_decide(_state(e), (), h2), h2, [], None, e[3])
    assert r is not None and r.peer is PeerStatus.STALE


def test_both_alone_after_the_common_epoch_is_still_split_brain() -> None:
    e = _epochs(3)
    rel = compare_histories(H(*e, "degraded:p"), H(*e, "failover:s"))
    assert rel.relation is Relation.DIVERGED
    r = judge_hello(rel, hello(**{"failed-over": True}), [[0, 1 << 20]], "degraded:p")
    assert r is not None and r.peer is PeerStatus.SPLIT_BRAIN
    assert r.split_brain is not None and r.split_brain["common-epoch"] == e[-1].split(":")[1]
