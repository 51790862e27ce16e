"""Same history on both sides (Why 5): the pairing copies what the activity logs and
bitmaps name — never a whole-disk comparison while an activity log is kept — and
names the rule of CONTINUITY §5 (in-sync, crashed-primary, crashed-secondary)."""

from __future__ import annotations

import pytest

from blockrep.ha import pairing
from blockrep.ha.bitmap import REGION_SIZE, RegionBitmap
from blockrep.ha.pairing import SyncPlan, plan_sync

MiB = 1 << 20


def _plan(has_al: bool, relation: str = "same") -> SyncPlan:
    return plan_sync(
        shared=False,
        relation=relation,
        alone=False,
        has_history=True,
        initial_sync=False,
        assume_synced=False,
        has_al=has_al,
    )


def test_same_history_with_an_activity_log_copies_marks_not_disks() -> None:
    assert _plan(True) is SyncPlan.RESYNC_AL
    # without one (--no-activity-log) only a comparison of the disks is safe
    assert _plan(False) is SyncPlan.RESYNC_DIFFERING


@pytest.mark.parametrize(
    ("own_al", "hello", "rule"),
    [
        ([], {"al": [], "written": []}, "in-sync"),
        ([3, 4], {"al": [], "written": []}, "crashed-primary"),
        ([3], {"al": [9], "written": []}, "crashed-primary"),
        ([], {"al": [9], "written": []}, "crashed-secondary"),
        ([], {"al": [], "written": [[5 * MiB, 4096]]}, "crashed-secondary"),
    ],
)
def test_rule_names_of_the_same_history(own_al, hello, rule) -> None:
    assert pairing.rule_name(SyncPlan.RESYNC_AL, hello, own_al) == rule


def test_same_history_regions_are_the_union_of_both_sides_marks() -> None:
    bm = RegionBitmap(REGION_SIZE, 64 * MiB)
    bm.mark(10 * MiB, 1)
    hello = {"al": [2, 70], "written": [[5 * MiB, MiB + 1]]}  # 70 is past the disk's end
    got = pairing.peer_behind_regions(bm, hello, [3, 4])
    assert got == [2, 3, 4, 5, 6, 10]
    with pytest.raises(pairing.PairingRefused, match="peer-behind refused"):
        pairing.peer_behind_regions(bm, {"al": "x"}, [])


def test_peer_behind_is_named_as_in_continuity() -> None:
    assert pairing.rule_name(SyncPlan.RESYNC_WRITTEN, {"disk-state": "UpToDate"}) == "peer-behind"
