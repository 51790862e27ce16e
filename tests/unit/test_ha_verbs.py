"""The secondary's checks of each control request (ha/verbs.py), row by row: what the
primary sends passes, every malformed field is refused by name before anything runs."""

from __future__ import annotations

import pytest

from blockrep.ha import verbs
from blockrep.ha.channel import ChannelError
from blockrep.ha.states import EntryKind, HistoryEntry

GEN = "3f1c9a8e-52d3-4c49-9c55-7e3f1d2a0b11"


def test_what_the_primary_sends_passes():
    assert verbs.checkpoint({"gen": GEN}) == GEN
    h = verbs.hello({"size": 4096, "shared": False, "history": [f"epoch:{GEN}"]})
    assert h == verbs.Hello(4096, False, [HistoryEntry(EntryKind.EPOCH, GEN)])
    assert verbs.hello({"size": 0}).history is None
    assert verbs.start({"history": []}) == []
    assert verbs.start({}) is None
    gen, src = verbs.sync_target({"source": "node-a", "generation": f"epoch:{GEN}"})
    assert (gen, src) == (HistoryEntry(EntryKind.EPOCH, GEN), "node-a")
    assert verbs.sync_target({"source": "node-a", "generation": None})[0].id == "unknown"
    assert verbs.handover({"promote": True}) is True and verbs.handover({}) is False
    assert verbs.digests({"regions": [0, 3]}, 4) == [0, 3]


@pytest.mark.parametrize(
    "verb,msg,field",
    [
        ("checkpoint", {}, "'gen'"),
        ("checkpoint", {"gen": None}, "'gen'"),
        ("checkpoint", {"gen": 5}, "'gen'"),
        ("checkpoint", {"gen": ""}, "'gen'"),
        ("checkpoint", {"gen": "x" * 201}, "'gen'"),
        ("checkpoint", {"gen": "a\nb"}, "'gen'"),
        ("hello", {"size": 4096.0}, "'size'"),
        ("hello", {"size": True}, "'size'"),
        ("hello", {"size": -1}, "'size'"),
        ("hello", {"size": 1, "shared": ""}, "'shared'"),
        ("hello", {"size": 1, "shared": 0}, "'shared'"),
        ("hello", {"size": 1, "history": "epoch:x"}, "'history'"),
        ("hello", {"size": 1, "history": [1]}, "'history'"),
        ("start", {"history": {}}, "'history'"),
        ("sync_target", {"generation": f"epoch:{GEN}"}, "'source'"),
        ("sync_target", {"source": 7}, "'source'"),
        ("sync_target", {"source": "a", "generation": 5}, "'generation'"),
        ("sync_target", {"source": "a", "generation": "nokind:x"}, "'generation'"),
        ("handover", {"promote": 1}, "'promote'"),
        ("handover", {"promote": "yes"}, "'promote'"),
    ],
)
def test_malformed_fields_are_refused_by_name(verb, msg, field):
    with pytest.raises(ChannelError) as e:
        getattr(verbs, verb)(msg)
    assert field in str(e.value)


@pytest.mark.parametrize("regions", [None, [-1], [True], [1.0], [[0]], [4], "0"])
def test_digests_only_of_regions_on_the_disk(regions):
    with pytest.raises(ChannelError, match="'regions'"):
        verbs.digests({"regions": regions}, 4)
