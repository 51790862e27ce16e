"""resolve.discard_point and pairing.rule_name: where a discard-local resolve cuts a
history, and when the keeping side names the rule discard-local."""

from __future__ import annotations

import pytest

from blockrep.ha import pairing
from blockrep.ha.handshake import Decision, Direction, Rule
from blockrep.ha.resolve import ResolveRefused, discard_point
from blockrep.ha.states import EntryKind, HistoryEntry


def _h(*names: str) -> list[HistoryEntry]:
    return [HistoryEntry.parse(n) for n in names]


def test_cuts_back_to_the_common_epoch():
    mine = _h("epoch:a", "epoch:b", "failover:x")
    theirs = _h("epoch:a", "epoch:b", "degraded:y")
    assert discard_point(mine, theirs) == 2
    assert mine[:2][-1] == HistoryEntry(EntryKind.EPOCH, "b")


def test_refused_without_a_split_brain():
    with pytest.raises(ResolveRefused, match="not a split brain"):
        discard_point(_h("epoch:a"), _h("epoch:a", "degraded:y"))  # only the peer wrote
    with pytest.raises(ResolveRefused, match="not met its peer"):
        discard_point(_h("epoch:a", "failover:x"), None)


def _decision(rule: Rule, refused: bool = False) -> Decision:
    return Decision(rule, Direction.LOCAL_TO_PEER, "p", "s", frozenset({1}), "why", refused)


def test_rule_name():
    out = {"disk-state": "Outdated"}
    assert pairing.rule_name(_decision(Rule.PEER_BEHIND), out) == "discard-local"
    assert pairing.rule_name(_decision(Rule.FAILOVER_DISCARD), out) == "discard-local"
    assert pairing.rule_name(_decision(Rule.SPLIT_BRAIN), out) == "discard-local"
    assert pairing.rule_name(_decision(Rule.SPLIT_BRAIN, refused=True), out) == "split-brain"
    assert pairing.rule_name(_decision(Rule.FULL), out) == "full"
    ok = {"disk-state": "Consistent"}
    assert pairing.rule_name(_decision(Rule.PEER_BEHIND), ok) == "peer-behind"
