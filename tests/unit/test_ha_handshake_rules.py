"""The handshake's decision table (CONTINUITY.md §5), row by row, and its properties.

P is the node that was primary at the common epoch, S the secondary. Every row is also
checked from the other side (decide(S, P)): both nodes compute the decision and must
agree on who copies to whom.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockrep.ha.handshake import (
    ALL,
    Direction,
    Relation,
    Rule,
    Side,
    compare_histories,
    decide,
)
from blockrep.ha.states import DiskState, EntryKind, HistoryEntry, Role


def E(i: int) -> HistoryEntry:
    return HistoryEntry(EntryKind.EPOCH, f"e{i}")


FO = HistoryEntry(EntryKind.FAILOVER, "f1")  # S failed over
DG = HistoryEntry(EntryKind.DEGRADED, "d1")  # P went on without S
BASE = (E(1), E(2), E(3))


def P(**kw: object) -> Side:
    s = Side("p", "disk-1", Role.PRIMARY, DiskState.UP_TO_DATE, BASE, clean_shutdown=True)
    return replace(s, **kw)  # type: ignore[arg-type]


def S(**kw: object) -> Side:
    s = Side("s", "disk-1", Role.SECONDARY, DiskState.UP_TO_DATE, BASE, clean_shutdown=True)
    return replace(s, **kw)  # type: ignore[arg-type]


def fs(*regions: int) -> frozenset[int]:
    return frozenset(regions)


# situation                   P side                                          S side                                                   --initial-sync  rule                          source  regions
TABLE = [
    ("no history, no flag",   P(history=()),                                  S(history=()),                                           False, Rule.JUST_CREATED,            None, ALL),
    ("no history, flag",      P(history=()),                                  S(history=()),                                           True,  Rule.JUST_CREATED,            "p",  ALL),
    ("equal, clean",          P(),                                            S(),                                                     False, Rule.IN_SYNC,                 None, fs()),
    ("P crashed mid-epoch",   P(clean_shutdown=False, al=fs(1, 2)),           S(),                                                     False, Rule.CRASHED_PRIMARY,         "p",  fs(1, 2)),
    ("S crashed",             P(al=fs(3)),                                    S(clean_shutdown=False),                                 False, Rule.CRASHED_SECONDARY,       "p",  fs(3)),
    ("P went on degraded",    P(history=BASE + (DG,), bitmap=fs(4), al=fs(5)), S(clean_shutdown=False),                                False, Rule.PEER_BEHIND,             "p",  fs(4, 5)),
    ("S failed over",         P(clean_shutdown=False, al=fs(1), bitmap=fs(2)), S(history=BASE + (FO,), bitmap=fs(6, 7), last_role=Role.PRIMARY), False, Rule.FAILOVER_DISCARD, "s", fs(1, 2, 6, 7)),
    ("both alone, S fenced P", P(history=BASE + (DG,), bitmap=fs(1), al=fs(2)), S(history=BASE + (FO,), bitmap=fs(3), fenced_peer=True), False, Rule.FENCED_PRIMARY_DISCARD, "s", fs(1, 2, 3)),
    ("both alone, no fence",  P(history=BASE + (DG,), bitmap=fs(1), al=fs(2)), S(history=BASE + (FO,), bitmap=fs(3)),                 False, Rule.SPLIT_BRAIN,             None, fs()),
    ("common epoch trimmed",  P(history=tuple(E(i) for i in range(50, 100)), history_trimmed=True), S(history=tuple(E(i) for i in range(1, 10))), False, Rule.FULL, "p", ALL),
    ("different disk-id",     P(),                                            S(disk_id="disk-2"),                                     False, Rule.UNRELATED,               None, fs()),
    ("no common epoch",       P(history=(E(7), E(8))),                         S(history=(E(1), E(2))),                                 False, Rule.UNRELATED,               None, fs()),
    ("S Inconsistent",        P(history=BASE + (DG,), bitmap=fs(10)),          S(disk_state=DiskState.INCONSISTENT, resync_source="p", resync_remaining=fs(8, 9)), False, Rule.RESUME, "p", fs(8, 9, 10)),
]  # fmt: skip
REFUSALS = {Rule.SPLIT_BRAIN, Rule.UNRELATED}


@pytest.mark.parametrize(
    ("p", "s", "initial_sync", "rule", "source", "regions"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_table_row(
    p: Side, s: Side, initial_sync: bool, rule: Rule, source: str | None, regions: object
) -> None:
    for local, peer in ((p, s), (s, p)):
        d = decide(local, peer, initial_sync=initial_sync)
        assert d.rule is rule, d.reason
        assert d.reason.startswith(str(rule))
        assert d.source == source
        assert d.regions == regions
        if source is None:
            assert d.refused is (rule is not Rule.IN_SYNC)
            assert d.direction is Direction.NONE and d.target is None
        else:
            assert not d.refused
            assert d.target == ({"p", "s"} - {source}).pop()
            mine = local.node == source
            assert d.direction is (Direction.LOCAL_TO_PEER if mine else Direction.PEER_TO_LOCAL)
        if d.refused:  # a refusal reports both sides' region lists
            assert d.marks == {"p": p.al | p.bitmap, "s": s.al | s.bitmap}


def test_split_brain_reports_what_each_side_wrote() -> None:
    d = decide(
        P(history=BASE + (DG,), bitmap=fs(1), al=fs(2)), S(history=BASE + (FO,), bitmap=fs(3))
    )
    assert d.refused and d.marks == {"p": fs(1, 2), "s": fs(3)}


# -- I3: an Inconsistent or Outdated side is never the sync source ----------------------------

OUT = DiskState.OUTDATED

I3_CASES = [
    ("crashed-primary", P(clean_shutdown=False, al=fs(1), disk_state=OUT), S()),
    ("peer-behind", P(history=BASE + (DG,), bitmap=fs(1), disk_state=OUT), S()),
    ("failover-discard", P(), S(history=BASE + (FO,), bitmap=fs(1), disk_state=OUT)),
    ("fenced-primary-discard", P(history=BASE + (DG,)), S(history=BASE + (FO,), fenced_peer=True, disk_state=OUT)),
    ("full", P(history=(E(50),), history_trimmed=True, disk_state=OUT), S(history=(E(1),))),
    ("just-created", P(history=(), disk_state=OUT), S(history=())),
    ("resume", P(disk_state=OUT), S(disk_state=DiskState.INCONSISTENT, resync_source="p")),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "p", "s"), I3_CASES, ids=[c[0] for c in I3_CASES])
def test_i3_refuses_a_stale_source(rule: str, p: Side, s: Side) -> None:
    for local, peer in ((p, s), (s, p)):
        d = decide(local, peer, initial_sync=True)
        assert d.rule == rule
        assert d.refused and d.source is None and d.direction is Direction.NONE
        assert "I3" in d.reason and "Outdated" in d.reason


def test_i3_both_inconsistent_refused() -> None:
    inc = DiskState.INCONSISTENT
    d = decide(P(disk_state=inc, resync_source="s"), S(disk_state=inc, resync_source="p"))
    assert d.rule is Rule.RESUME and d.refused and "I3" in d.reason


def test_inconsistent_side_is_the_target_even_when_it_was_primary() -> None:
    # the histories say P leads (crashed-primary), but P is a resync target mid-copy
    p = P(clean_shutdown=False, al=fs(1), disk_state=DiskState.INCONSISTENT, resync_source="s")
    d = decide(p, S(), initial_sync=False)
    assert (d.rule, d.source, d.target) == (Rule.RESUME, "s", "p")


def test_resume_from_another_source_copies_everything() -> None:
    s = S(disk_state=DiskState.INCONSISTENT, resync_source="elsewhere", resync_remaining=fs(1))
    d = decide(P(), s)
    assert (d.rule, d.source, d.regions) == (Rule.FULL, "p", ALL)


# -- history compared by content ---------------------------------------------------------------

HUNDRED = [E(i) for i in range(100)]


def test_trimmed_history_is_the_same_history() -> None:
    c = compare_histories(HUNDRED, HUNDRED[-64:])
    assert (c.relation, c.common) == (Relation.SAME, E(99))
    assert compare_histories(HUNDRED[-64:], HUNDRED).relation is Relation.SAME
    d = decide(P(history=HUNDRED), S(history=HUNDRED[-64:], history_trimmed=True))
    assert d.rule is Rule.IN_SYNC and not d.refused


def test_trimmed_history_then_degraded_is_incremental() -> None:
    p = P(history=[*HUNDRED, DG], bitmap=fs(3))
    s = S(history=HUNDRED[-64:], history_trimmed=True)
    assert compare_histories(list(p.history), list(s.history)).relation is Relation.PEER_BEHIND
    d = decide(s, p)
    assert (d.rule, d.source, d.regions) == (Rule.PEER_BEHIND, "p", fs(3))


@pytest.mark.parametrize(
    ("mine", "theirs", "relation", "common"),
    [
        ([], [], Relation.SAME, None),
        (list(BASE), list(BASE), Relation.SAME, E(3)),
        ([*BASE, DG], list(BASE), Relation.PEER_BEHIND, E(3)),
        (list(BASE), [*BASE, FO], Relation.SELF_BEHIND, E(3)),
        ([*BASE, DG], [*BASE, FO], Relation.DIVERGED, E(3)),
        ([*BASE, E(4)], list(BASE), Relation.PEER_BEHIND, E(3)),  # a lost append
        ([*BASE, E(4)], [*BASE, FO], Relation.SELF_BEHIND, E(3)),  # lost append, then failover
        ([*BASE, E(4), E(5)], [*BASE, FO], Relation.DIVERGED, E(3)),  # not a lost append
        ([*BASE, E(4)], [*BASE, E(5)], Relation.DIVERGED, E(3)),  # two different epochs
        ([E(1)], [E(2)], Relation.UNRELATED, None),
        ([E(1), E(2)], [E(2), E(1)], Relation.UNRELATED, None),  # no order both agree on
        ([E(1)], [], Relation.UNRELATED, None),
        # a resync target's resync-from:ID stands for the generation it copied
        ([E(1), HistoryEntry(EntryKind.RESYNC_FROM, "f1")], [E(1), FO], Relation.SAME, None),
    ],
)
def test_compare_histories(
    mine: list[HistoryEntry], theirs: list[HistoryEntry], relation: Relation, common: object
) -> None:
    c = compare_histories(mine, theirs)
    assert c.relation is relation
    if common is not None:
        assert c.common == common
    flipped = {
        Relation.PEER_BEHIND: Relation.SELF_BEHIND,
        Relation.SELF_BEHIND: Relation.PEER_BEHIND,
    }
    assert compare_histories(theirs, mine).relation is flipped.get(relation, relation)


# -- a crash between the two sides' appends of one epoch ----------------------------------------


def test_p_one_epoch_ahead_is_a_crashed_secondary_not_split_brain() -> None:
    d = decide(P(history=BASE + (E(4),), al=fs(1)), S(clean_shutdown=False))
    assert (d.rule, d.source, d.regions, d.refused) == (Rule.CRASHED_SECONDARY, "p", fs(1), False)


def test_s_one_epoch_ahead_then_failover_is_failover_discard() -> None:
    p = P(clean_shutdown=False, al=fs(1))
    s = S(history=BASE + (E(4), FO), bitmap=fs(2), last_role=Role.PRIMARY)
    d = decide(p, s)
    assert (d.rule, d.source, d.regions) == (Rule.FAILOVER_DISCARD, "s", fs(1, 2))


def test_s_one_epoch_ahead_p_degraded_is_peer_behind() -> None:
    d = decide(S(history=BASE + (E(4),)), P(history=BASE + (DG,), bitmap=fs(5)))
    assert (d.rule, d.source, d.refused) == (Rule.PEER_BEHIND, "p", False)


def test_more_than_one_epoch_ahead_is_a_full_copy() -> None:
    # the AL covers one unacknowledged epoch at most: anything older is not in it
    d = decide(P(history=BASE + (E(4), E(5)), al=fs(1)), S(clean_shutdown=False))
    assert (d.rule, d.source, d.regions) == (Rule.FULL, "p", ALL)


# -- beyond the plain rows ---------------------------------------------------------------------


def test_fresh_node_gets_a_full_sync() -> None:
    d = decide(S(history=(), disk_id="new"), P(history=BASE + (FO,)))
    assert (d.rule, d.source, d.target, d.regions) == (Rule.FULL, "p", "s", ALL)


def test_went_on_with_another_peer_is_a_full_copy() -> None:
    # S failed over, then paired with a third node: its bitmap covers only since E(9)
    d = decide(P(clean_shutdown=False), S(history=BASE + (FO, E(9)), last_role=Role.PRIMARY))
    assert (d.rule, d.source, d.regions) == (Rule.FULL, "s", ALL)


def test_trimmed_common_but_old_side_wrote_alone_is_refused() -> None:
    p = P(history=tuple(E(i) for i in range(50, 100)), history_trimmed=True)
    d = decide(p, S(history=(E(1), FO), bitmap=fs(1)))
    assert d.rule is Rule.SPLIT_BRAIN and d.refused


def test_resolve_discard_local_ends_split_brain() -> None:
    p = P(history=BASE + (DG,), bitmap=fs(1), discard_local=True)
    s = S(history=BASE + (FO,), bitmap=fs(3))
    for local, peer in ((p, s), (s, p)):
        d = decide(local, peer)
        assert (d.rule, d.source, d.target, d.regions, d.refused) == (
            Rule.SPLIT_BRAIN,
            "s",
            "p",
            fs(1, 3),
            False,
        )


def test_split_brain_where_one_side_wrote_nothing_resolves_itself() -> None:
    d = decide(P(history=BASE + (DG,)), S(history=BASE + (FO,), bitmap=fs(3)))
    assert (d.rule, d.source, d.regions) == (Rule.FAILOVER_DISCARD, "s", fs(3))


def test_clean_stop_with_a_non_empty_al_is_not_in_sync() -> None:
    d = decide(P(al=fs(4)), S())
    assert (d.rule, d.source, d.regions) == (Rule.CRASHED_PRIMARY, "p", fs(4))


# -- properties over random sides --------------------------------------------------------------

_entry = st.builds(
    HistoryEntry, st.sampled_from(list(EntryKind)), st.sampled_from([f"g{i}" for i in range(6)])
)
_regions = st.frozensets(st.integers(0, 7), max_size=3)


@st.composite
def _sides(draw: st.DrawFn) -> tuple[Side, Side, bool]:
    prefix = draw(st.lists(_entry, max_size=5))
    out = []
    for name, other in (("a", "b"), ("b", "a")):
        hist = prefix + draw(st.lists(_entry, max_size=3))
        cut = draw(st.integers(0, len(hist)))
        out.append(
            Side(
                node=name,
                disk_id=draw(st.sampled_from(["d1", "d1", "d2"])),
                last_role=draw(st.sampled_from(list(Role))),
                disk_state=draw(st.sampled_from(list(DiskState))),
                history=tuple(hist[cut:]),
                history_trimmed=cut > 0 or draw(st.booleans()),
                clean_shutdown=draw(st.booleans()),
                al=draw(_regions),
                bitmap=draw(_regions),
                resync_source=draw(st.sampled_from([None, other, "z"])),
                resync_remaining=draw(_regions),
                fenced_peer=draw(st.booleans()),
                discard_local=draw(st.booleans()),
            )
        )
    return out[0], out[1], draw(st.booleans())


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(_sides())
def test_decide_is_symmetric_and_keeps_i3_and_i4(sides: tuple[Side, Side, bool]) -> None:
    a, b, initial_sync = sides
    ab = decide(a, b, initial_sync=initial_sync)
    ba = decide(b, a, initial_sync=initial_sync)
    assert (ab.rule, ab.refused, ab.source, ab.target, ab.regions, ab.marks) == (
        ba.rule,
        ba.refused,
        ba.source,
        ba.target,
        ba.regions,
        ba.marks,
    )
    flip = {
        Direction.NONE: Direction.NONE,
        Direction.LOCAL_TO_PEER: Direction.PEER_TO_LOCAL,
        Direction.PEER_TO_LOCAL: Direction.LOCAL_TO_PEER,
    }
    assert ba.direction is flip[ab.direction]
    assert ab.reason.startswith(str(ab.rule))
    if ab.refused or ab.source is None:
        assert ab.source is ab.target is None and ab.direction is Direction.NONE
        return
    src = a if ab.source == "a" else b
    # I3: never a stale source
    assert src.disk_state not in (DiskState.INCONSISTENT, DiskState.OUTDATED)
    # I4: an incremental copy covers every region either side marked
    if ab.regions is not ALL:
        assert isinstance(ab.regions, frozenset)
        assert ab.regions >= (a.al | a.bitmap | b.al | b.bitmap)
