"""Online verify's pure part (ha/verify_plan.py): batch planning, which regions a write
touched while a batch ran (skipped, never a mismatch), comparing digests, and the
progress record status shows and the verify file keeps."""

from __future__ import annotations

import pytest

from blockrep.ha import events, metrics
from blockrep.ha.bitmap import REGION_SIZE
from blockrep.ha.verify_plan import (
    MAX_BATCH,
    Progress,
    batch_size,
    compare,
    plan_batch,
    region_ranges,
    regions_touched,
    unsettled,
    verify_path,
)

MiB = 1 << 20


def test_batches_follow_the_rate_and_end_at_the_last_region() -> None:
    assert batch_size(0) == MAX_BATCH  # unlimited
    assert batch_size(1) == 1  # never zero regions
    assert batch_size(8 * REGION_SIZE) == 2  # about a quarter second of work
    assert batch_size(1 << 40) == MAX_BATCH
    assert plan_batch(0, 10, 4) == [0, 1, 2, 3]
    assert plan_batch(8, 10, 4) == [8, 9]
    assert plan_batch(10, 10, 4) == []
    covered = []
    pos = 3  # a resumed pass covers the rest exactly once
    while pos < 37:
        b = plan_batch(pos, 37, 5)
        covered += b
        pos = b[-1] + 1
    assert covered == list(range(3, 37))


def test_a_write_touching_a_region_boundary_marks_both_regions() -> None:
    assert regions_touched([(REGION_SIZE - 1, 2)], 10) == {0, 1}
    assert regions_touched([(REGION_SIZE, REGION_SIZE)], 10) == {1}
    assert regions_touched([(0, 0)], 10) == {0}  # a zero-length request still counts
    assert regions_touched([(9 * REGION_SIZE, 4 * REGION_SIZE)], 10) == {9}  # not past the end


def test_regions_written_during_a_batch_are_skipped_not_reported() -> None:
    batch = [4, 5, 6, 7]
    # dirty chunks at 64 KiB granularity: chunk 81 is in region 5; in flight: region 7 and 12
    skip = unsettled(batch, {81}, 64 << 10, [(7 * MiB + 10, 4096), (12 * MiB, 1)], 16)
    assert skip == {5, 7}  # region 12 is not in the batch
    mine = ["a", "b", "c", "d"]
    theirs = ["a", "x", "y", "z"]  # 5 and 7 differ because they were being written
    r = compare(batch, mine, theirs, skip)
    assert r.equal == [4] and r.mismatched == [6] and r.skipped == [5, 7]
    with pytest.raises(ValueError):
        compare(batch, mine, theirs[:3], set())


def test_status_and_verify_file_of_a_pass() -> None:
    length = 10 * MiB + 4096  # a short last region
    pr = Progress(position=11, nregions=11, length=length)
    pr.mismatched, pr.out_of_sync, pr.skipped_bytes = {2, 10}, {2, 10}, MiB
    d = pr.as_dict()
    assert d["position"] == d["total"] == length
    assert d["mismatched-bytes"] == MiB + 4096 and d["mismatched-regions"] == [2, 10]
    assert d["out-of-sync-bytes"] == MiB + 4096 and d["skipped-bytes"] == MiB
    assert region_ranges({2, 3, 10}, length) == [[2 * MiB, 2 * MiB], [10 * MiB, 4096]]
    saved = pr.encode("disk-1")
    back = Progress(nregions=11, length=length)
    back.decode(saved, "disk-1")
    assert (back.position, back.mismatched, back.out_of_sync) == (11, {2, 10}, {2, 10})
    for bad in (
        dict(saved, **{"disk-id": "disk-2"}),  # another disk's file: not resumed
        dict(saved, position=12),
        dict(saved, mismatched=[11]),
        dict(saved, position="3"),
        [],
    ):
        with pytest.raises(ValueError):
            Progress(nregions=11, length=length).decode(bad, "disk-1")
    assert verify_path("/d/x.blockrep-state.json") == "/d/x.blockrep-state.verify.json"


def test_a_mismatch_is_an_event_and_a_metric_but_progress_is_not() -> None:
    base = {"role": "primary", "replication": "Protected"}
    v = Progress(nregions=16, length=16 * MiB, running=True, run=1).as_dict()
    log = events.EventLog()
    log.observe({**base, "verify": v})
    assert log.observe({**base, "verify": {**v, "position": 8 * MiB}}) is None  # progress only
    found = {**v, "position": 9 * MiB, "mismatched-bytes": MiB, "mismatched-regions": [8]}
    ev = log.observe({**base, "verify": found})
    assert ev is not None and ev["changed"] == ["verify"], ev
    assert ev["verify"]["mismatched-regions"] == [8]
    done = {**found, "running": False, "last-result": "mismatches"}
    assert log.observe({**base, "verify": done}) is not None  # the end of the pass
    status = {
        "epoch": 1,
        "epoch-age": 0.1,
        "hidden-bytes": 0,
        "active-bytes": 0,
        "unacked-bytes": 0,
        "checkpoints": 1,
        "last-checkpoint-pause-ms": 0.1,
        "peer": "connected",
        "errors": [],
        "role": "primary",
        "verify": done,
    }
    m = metrics.values(status)
    assert m["verify_mismatched_bytes"] == MiB and m["verify_running"] == 0
    assert metrics.values({**status, "verify": None})["verify_mismatched_bytes"] == 0
    assert {k for k, _ in metrics.GAUGES} >= set(m)
