"""The region bitmap and the durable per-node state (CONTINUITY.md §2): bytes, round trips,
every way a state file can be damaged, history kept by count, state.py's format read."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrep.errors import BlockrepError
from blockrep.ha import node_state
from blockrep.ha.bitmap import RUNS_MAX, RegionBitmap
from blockrep.ha.node_state import (
    HISTORY_KEEP,
    DiskId,
    NodeState,
    ResyncPosition,
    StateFileError,
    default_path,
)
from blockrep.ha.states import DiskState, EntryKind, HistoryEntry, ReplicationState, Role

MiB = 1 << 20
U1 = "0b6f1f8e-3c33-4a2c-9f7e-6a1d2b3c4d5e"
U2 = "7d9c0a11-5e2b-4f1a-8c3d-2e4f6a8b0c1d"
U3 = "c4a2e9f0-1b3d-4e5f-a6b7-c8d9e0f1a2b3"


# -- RegionBitmap ----------------------------------------------------------------------------


def test_mark_reports_only_new_regions_and_touches_every_overlapped_region() -> None:
    bm = RegionBitmap(MiB, 8 * MiB)
    assert bm.mark(MiB - 1, 2) is True  # straddles regions 0 and 1
    assert list(bm) == [0, 1]
    assert bm.mark(0, 4096) is False
    assert bm.mark(MiB, MiB) is False  # exactly region 1
    assert bm.mark(2 * MiB, 0) is False  # an empty write touches nothing
    assert bm.mark(7 * MiB, MiB) is True
    assert (bm.count, len(bm), bm.bytes) == (3, 3, 3 * MiB)
    assert 7 in bm and 6 not in bm and -1 not in bm and 8 not in bm


def test_marks_outside_the_disk_are_refused() -> None:
    bm = RegionBitmap(MiB, 4 * MiB)
    with pytest.raises(ValueError, match="outside the disk"):
        bm.mark(4 * MiB - 1, 2)
    with pytest.raises(ValueError, match="outside the disk"):
        bm.mark_regions([4])
    with pytest.raises(ValueError, match="power of two"):
        RegionBitmap(3 * MiB, MiB)


def test_bytes_and_ranges_are_clamped_to_the_disk_length_and_merged() -> None:
    length = 5 * MiB + 4096  # the last region holds only 4 KiB
    bm = RegionBitmap(MiB, length, [0, 1, 3, 5])
    assert bm.nregions == 6
    assert bm.bytes == 3 * MiB + 4096
    assert bm.ranges() == [[0, 2 * MiB], [3 * MiB, MiB], [5 * MiB, 4096]]
    assert bm.runs() == [[0, 2], [3, 1], [5, 1]]
    bm.mark_regions([4])
    assert bm.ranges() == [[0, 2 * MiB], [3 * MiB, 2 * MiB + 4096]]


def test_clear_range_clears_only_regions_it_covers_whole() -> None:
    length = 4 * MiB + 512
    bm = RegionBitmap(MiB, length, range(5))
    assert bm.clear_range(MiB // 2, 2 * MiB) == 1  # covers region 1 whole, 0 and 2 in part
    assert list(bm) == [0, 2, 3, 4]
    assert bm.clear_range(4 * MiB, 512) == 1  # the short last region, up to the disk's end
    assert bm.clear_range(3 * MiB, MiB - 1) == 0
    assert list(bm) == [0, 2, 3]
    assert bm.clear_regions([0, 1]) == 1
    bm.clear()
    assert (bm.count, list(bm), bm.ranges()) == (0, [], [])


def test_union_and_update_need_the_same_disk() -> None:
    a = RegionBitmap(MiB, 16 * MiB, [1, 2])
    b = RegionBitmap(MiB, 16 * MiB, [2, 9])
    u = a | b
    assert list(u) == [1, 2, 9] and list(a) == [1, 2]
    assert a.update(b) is True and a == u
    assert a.update(b) is False
    with pytest.raises(ValueError, match="different disks"):
        a.union(RegionBitmap(MiB, 8 * MiB))


def test_regrid_never_loses_a_byte_and_resized_refuses_marks_past_the_end() -> None:
    bm = RegionBitmap(MiB, 10 * MiB, [3, 4, 9])
    coarse = bm.regrid(4 * MiB)
    assert list(coarse) == [0, 1, 2]  # 3 → [0,4M), 4 → [4,8M), 9 → [8,10M)
    fine = bm.regrid(MiB // 2)
    assert fine.ranges() == bm.ranges()
    assert bm.resized(20 * MiB).ranges() == bm.ranges()
    with pytest.raises(ValueError):
        bm.resized(9 * MiB)


def test_serialisation_bytes_runs() -> None:
    bm = RegionBitmap(MiB, 5 * MiB + 4096, [0, 1, 2, 4])
    assert bm.encode() == b'{"length":5246976,"region-size":1048576,"runs":[[0,3],[4,1]]}'
    assert RegionBitmap(MiB, 0).encode() == b'{"length":0,"region-size":1048576,"runs":[]}'
    assert RegionBitmap.decode(bm.encode()) == bm


def test_serialisation_bytes_bits_when_runs_would_be_larger() -> None:
    # every other region of 4096: 2048 runs (> RUNS_MAX), 512 bytes of bits
    bm = RegionBitmap(4096, 4096 * 4096, range(0, 4096, 2))
    assert len(bm.runs()) > RUNS_MAX
    bits = base64.b64encode(b"\x55" * 512).decode()
    expected = '{"bits":"%s","length":16777216,"region-size":4096}' % bits
    assert bm.encode() == expected.encode()
    assert RegionBitmap.decode(bm.encode()) == bm
    # the same number of runs, but clustered at the start of a huge disk: runs are smaller
    sparse = RegionBitmap(4096, 1 << 40, range(0, 2 * (RUNS_MAX + 1), 2))
    assert "runs" in sparse.to_dict()


@pytest.mark.parametrize(
    "d, problem",
    [
        ([], "is an object"),
        ({"region-size": MiB, "length": MiB, "runs": [], "x": 1}, "unknown bitmap field"),
        ({"region-size": 3, "length": MiB, "runs": []}, "power of two"),
        ({"region-size": True, "length": MiB, "runs": []}, "region-size"),
        ({"region-size": MiB, "length": -1, "runs": []}, "length"),
        ({"region-size": MiB, "length": MiB}, "exactly one of runs and bits"),
        ({"region-size": MiB, "length": MiB, "runs": [], "bits": ""}, "exactly one"),
        ({"region-size": MiB, "length": 4 * MiB, "runs": [[0, 2], [1, 1]]}, "run 1"),
        ({"region-size": MiB, "length": 4 * MiB, "runs": [[3, 2]]}, "run 0"),
        ({"region-size": MiB, "length": 4 * MiB, "runs": [[0, 0]]}, "run 0"),
        ({"region-size": MiB, "length": 4 * MiB, "runs": [[0, True]]}, "run 0"),
        ({"region-size": MiB, "length": 4 * MiB, "runs": "0-3"}, "runs should be a list"),
        ({"region-size": MiB, "length": 4 * MiB, "bits": "!!"}, "not base64"),
        ({"region-size": MiB, "length": 4 * MiB, "bits": "AAA="}, "2 bytes, not 1"),
        ({"region-size": MiB, "length": 4 * MiB, "bits": "EA=="}, "past the end"),
    ],
)
def test_bitmap_decoding_names_what_is_wrong(d: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RegionBitmap.from_dict(d)


ops = st.lists(
    st.tuples(st.sampled_from(["mark", "clear", "regions"]), st.integers(0, 70), st.integers(0, 9))
)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from([64 * 4096, 64 * 4096 + 100, 7]))
def test_bitmap_against_a_set_model(steps: list[tuple[str, int, int]], length: int) -> None:
    rs = 4096
    bm, model = RegionBitmap(rs, length), set[int]()
    n = -(-length // rs)
    for op, a, b in steps:
        off = min(a * rs // 2, length)
        nbytes = min(b * rs // 3, length - off)
        if op == "mark":
            new = set(range(off // rs, (off + nbytes - 1) // rs + 1)) if nbytes else set()
            assert bm.mark(off, nbytes) == bool(new - model)
            model |= new
        elif op == "clear":
            end = off + nbytes
            stop = n if end == length else end // rs
            gone = set(range(-(-off // rs), stop)) & model
            assert bm.clear_range(off, nbytes) == len(gone)
            model -= gone
        else:
            regs = [r for r in (a, b) if r < n]
            assert bm.mark_regions(regs) == bool(set(regs) - model)
            model |= set(regs)
        assert list(bm) == sorted(model) and len(bm) == len(model)
    assert bm.bytes == sum(min((r + 1) * rs, length) - r * rs for r in model)
    assert sum(n for _, n in bm.ranges()) == bm.bytes
    assert RegionBitmap.decode(bm.encode()) == bm


# -- NodeState: round trip and the file's bytes ------------------------------------------------


def full_state(path: str) -> NodeState:
    s = NodeState(
        path,
        node_id="node-a",
        disk_id=DiskId(U1, 8 * MiB),
        history=[HistoryEntry.parse(U2), HistoryEntry(EntryKind.FAILOVER, U3)],
        history_trimmed=True,
        last_role=Role.PRIMARY,
        clean_shutdown=False,
        disk_state=DiskState.INCONSISTENT,
        peer_bitmap=RegionBitmap(MiB, 8 * MiB, [1, 2, 7]),
        fenced_peer_at=1700000000.5,
    )
    s.resync = ResyncPosition(
        ReplicationState.SYNC_TARGET,
        HistoryEntry(EntryKind.RESYNC_FROM, U1),
        RegionBitmap(MiB, 8 * MiB, [2, 7]),
        "node-b",
    )
    return s


def test_round_trip_keeps_every_field(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "disk.img.blockrep-state.json")
    s = full_state(path)
    s.save()
    t = NodeState.load(path)
    assert t == s
    assert (t.fresh, t.legacy, t.unsaved) == (False, False, False)
    assert t.alone_since == HistoryEntry(EntryKind.FAILOVER, U3)
    assert t.encode() == s.encode()
    assert not os.path.exists(path + ".tmp")


def test_file_bytes_are_canonical_and_checksummed() -> None:
    s = NodeState(
        "/x",
        node_id="n1",
        disk_id=DiskId("d1", 3 * MiB + 512),
        history=[HistoryEntry.parse("e1"), HistoryEntry.parse("failover:f1")],
        last_role=Role.SECONDARY,
        clean_shutdown=False,
        disk_state=DiskState.UP_TO_DATE,
        peer_bitmap=RegionBitmap(MiB, 3 * MiB + 512, [0, 1, 3]),
        fenced_peer_at=1700000000.25,
    )
    body = (
        b'{"clean-shutdown":false,"disk-id":{"size":3146240,"uuid":"d1"},'
        b'"disk-state":"UpToDate","fenced-peer-at":1700000000.25,'
        b'"history":["epoch:e1","failover:f1"],"history-trimmed":false,'
        b'"last-role":"secondary","node-id":"n1","peer-bitmap":{"length":3146240,'
        b'"region-size":1048576,"runs":[[0,2],[3,1]]},"resync":null}'
    )
    digest = "8bfef6b12864b5959d81e073b90cecef50539ab9d64cf714c0681cca12ea9660"
    assert hashlib.sha256(body).hexdigest() == digest
    expected = (
        b'{"body":' + body + b',"format":"blockrep-node-state","sha256":"' + digest.encode()
    ) + b'","version":1}\n'
    assert s.encode() == expected
    assert NodeState.decode("/x", expected) == s


def test_a_missing_file_is_a_fresh_node_and_nothing_is_written(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "state.json")
    s = NodeState.load(path, region_size=4 * MiB)
    assert s.fresh and s.history == [] and s.disk_id is None and s.resync is None
    assert s.peer_bitmap.region_size == 4 * MiB
    assert not os.path.exists(path)
    assert s.start(Role.SECONDARY) is True  # nothing ran before: nothing to recover
    t = NodeState.load(path)
    assert (t.clean_shutdown, t.last_role, t.node_id) == (False, Role.SECONDARY, s.node_id)
    assert default_path("d.img") == os.path.abspath("d.img") + ".blockrep-state.json"


def test_clean_shutdown_is_cleared_at_start_and_set_by_stop(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    NodeState.load(path).start(Role.PRIMARY)
    s = NodeState.load(path)
    assert s.start(Role.PRIMARY) is False  # the first run never stopped: a crash
    s.stop()
    s = NodeState.load(path)
    assert s.clean_shutdown is True
    assert s.start(Role.NONE) is True
    assert NodeState.load(path).clean_shutdown is False


def test_disk_id_is_made_once_and_refuses_another_size(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState.load(path)
    d = s.ensure_disk_id(64 * MiB)
    assert NodeState.load(path).disk_id == d
    assert s.ensure_disk_id(64 * MiB) == d
    assert s.peer_bitmap.length == 64 * MiB
    with pytest.raises(StateFileError, match=f"{64 * MiB} bytes.*not of {32 * MiB} bytes"):
        NodeState.load(path).ensure_disk_id(32 * MiB)
    other = NodeState(str(tmp_path / "t.json"))
    other.ensure_disk_id(64 * MiB)
    assert other.disk_id is not None and other.disk_id.uuid != d.uuid
    other.adopt_disk_id(d)
    assert NodeState.load(str(tmp_path / "t.json")).disk_id == d


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a: Any, b: Any) -> None:
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(node_state.os, "fsync", fsync)
    monkeypatch.setattr(node_state.os, "replace", replace)
    NodeState(str(tmp_path / "s.json")).save()
    assert events == ["fsync-file", "rename", "fsync-dir"]


# -- every corruption is reported by name, and the file is left as it is ----------------------


def write_doc(path: pathlib.Path, body: dict[str, Any], **top: Any) -> None:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = {
        "body": body,
        "format": "blockrep-node-state",
        "sha256": hashlib.sha256(raw).hexdigest(),
        "version": 1,
    }
    doc.update(top)
    path.write_bytes(json.dumps(doc).encode())


def load_error(path: pathlib.Path) -> str:
    before = path.read_bytes()
    with pytest.raises(StateFileError) as e:
        NodeState.load(str(path))
    assert path.read_bytes() == before  # never silently reset
    assert isinstance(e.value, BlockrepError)
    assert str(e.value).startswith(f"state file {path}: ")
    return e.value.problem


def test_every_truncation_of_a_valid_file_is_detected(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    data = full_state(str(path)).encode()
    for n in range(len(data) - 1):  # all but the final newline is needed
        path.write_bytes(data[:n])
        problem = load_error(path)
        assert "empty" in problem if n == 0 else ("truncated" in problem or "corrupt" in problem)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b'{"body":{"node-id":"n', "truncated"),
        (b'{"body": nonsense}', "corrupt: not JSON"),
        (b'{"a":"\xff\xfe"}', "not UTF-8"),
        (b"[1, 2]", "not a blockrep state file"),
        (b'{"format":"something-else","version":1}', "not a blockrep state file"),
    ],
)
def test_unreadable_files_are_named(tmp_path: pathlib.Path, data: bytes, problem: str) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(data)
    assert problem in load_error(path)


def test_a_flipped_value_fails_the_checksum(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    data = full_state(str(path)).encode()
    path.write_bytes(data.replace(b'"runs":[[1,2],[7,1]]', b'"runs":[[1,1],[7,1]]'))
    assert "corrupt: its sha256 is" in load_error(path)
    path.write_bytes(data.replace(b"node-a", b"node-x"))
    assert "corrupt" in load_error(path)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_an_unknown_version_is_named(tmp_path: pathlib.Path, version: Any) -> None:
    path = tmp_path / "s.json"
    body = full_state(str(path)).encode()
    write_doc(path, json.loads(body)["body"], version=version)
    assert f"has version {json.dumps(version)}; this blockrep reads 1" in load_error(path)


def good_body() -> dict[str, Any]:
    return json.loads(full_state("/x").encode())["body"]


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("node-id", 5, "field node-id should be a string, not 5"),
        ("history", "e1", "field history should be a list"),
        ("history", [U1, 7], "field history[1] should be KIND:UUID or UUID, not 7"),
        ("history", [U1, "bogus:" + U2], "field history[1]:"),
        ("history", [U1, "failover:"], "field history[1] should be KIND:UUID"),
        ("history-trimmed", 1, "field history-trimmed should be true or false, not 1"),
        ("last-role", "king", "field last-role: 'king' is not a valid Role"),
        ("clean-shutdown", "yes", "field clean-shutdown should be true or false"),
        ("disk-state", "Fine", "field disk-state: 'Fine'"),
        ("disk-id", "d1", "field disk-id should be an object"),
        ("disk-id", {"uuid": U1}, "field disk-id.size is missing"),
        ("disk-id", {"uuid": U1, "size": -1}, "field disk-id.size should be a count, not -1"),
        ("disk-id", {"uuid": U1, "size": True}, "field disk-id.size should be a count"),
        ("disk-id", {"uuid": U1, "size": MiB}, "peer-bitmap is of 8388608 bytes"),
        ("peer-bitmap", {"region-size": 3, "length": 0, "runs": []}, "field peer-bitmap:"),
        ("peer-bitmap", [], "field peer-bitmap: a bitmap is an object"),
        ("fenced-peer-at", "yesterday", "field fenced-peer-at should be a number"),
        ("fenced-peer-at", False, "field fenced-peer-at should be a number"),
        ("resync", 3, "field resync should be an object"),
    ],
)
def test_ill_typed_fields_are_named(
    tmp_path: pathlib.Path, field: str, value: Any, problem: str
) -> None:
    path = tmp_path / "s.json"
    body = good_body()
    body[field] = value
    write_doc(path, body)  # a valid checksum: the type check itself must catch it
    assert problem in load_error(path)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"direction": "Protected"}, "resync.direction is Protected, not SyncSource"),
        ({"direction": 1}, "field resync.direction: 1 is not a valid ReplicationState"),
        ({"source-generation": None}, "field resync.source-generation should be KIND:UUID"),
        ({"peer-node-id": 4}, "field resync.peer-node-id should be a string"),
        ({"extra": 1}, "field resync.extra is unknown"),
        ({"remaining": {"region-size": MiB, "length": MiB, "runs": []}}, "resync.remaining"),
    ],
)
def test_ill_typed_resync_fields_are_named(
    tmp_path: pathlib.Path, change: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "s.json"
    body = good_body()
    body["resync"].update(change)
    write_doc(path, body)
    assert problem in load_error(path)


def test_missing_and_unknown_fields_are_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    body = good_body()
    del body["disk-state"]
    write_doc(path, body)
    assert load_error(path) == "field disk-state is missing"
    body = good_body()
    body["color"] = "blue"
    write_doc(path, body)
    assert load_error(path) == "field color is unknown"
    write_doc(path, good_body(), extra=1)
    assert load_error(path) == "field extra is unknown"


# -- history ------------------------------------------------------------------------------------


def test_more_than_64_checkpoints_are_kept(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(MiB)
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(300)]
    for i in ids:
        s.new_epoch(i, save=False)
    s.save()
    t = NodeState.load(path)
    assert [e.id for e in t.history] == ids
    assert all(e.kind is EntryKind.EPOCH for e in t.history)
    assert t.history_trimmed is False


def test_history_is_trimmed_at_the_front_by_count(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    for i in range(HISTORY_KEEP + 10):
        s.new_epoch(str(i), save=False)
    s.save()
    t = NodeState.load(path)
    assert len(t.history) == HISTORY_KEEP
    assert t.history[0].id == "10" and t.current == HistoryEntry(
        EntryKind.EPOCH, str(HISTORY_KEEP + 9)
    )
    assert t.history_trimmed is True
    t.adopt_history([HistoryEntry.parse("a"), HistoryEntry.parse("b")])
    assert NodeState.load(path).history_trimmed is False
    t.adopt_history([HistoryEntry.parse("a")], trimmed=True)
    assert NodeState.load(path).history_trimmed is True


def test_typed_entries_going_alone_and_a_new_epoch(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(4 * MiB)
    s.new_epoch(U1)
    assert s.alone_since is None
    e = s.go_alone(EntryKind.FAILOVER)
    assert e.kind is EntryKind.FAILOVER and s.go_alone(EntryKind.DEGRADED) == e  # idempotent
    s.mark_before_write(0, 1)
    s.record_fence(42.0)
    t = NodeState.load(path)
    assert [str(x) for x in t.history] == [f"epoch:{U1}", f"failover:{e.id}"]
    assert t.alone_since == e and t.fenced_peer_at == 42.0 and list(t.peer_bitmap) == [0]
    t.append(HistoryEntry(EntryKind.RESYNC_FROM, U2))
    assert t.alone_since is None
    t.new_epoch(U3)
    t = NodeState.load(path)
    assert (t.alone_since, t.fenced_peer_at, t.peer_bitmap.count) == (None, None, 0)
    assert [x.kind for x in t.history] == [
        EntryKind.EPOCH,
        EntryKind.FAILOVER,
        EntryKind.RESYNC_FROM,
        EntryKind.EPOCH,
    ]
    with pytest.raises(ValueError):
        t.go_alone(EntryKind.EPOCH)


def legacy_doc(generations: list[str], chunks: list[int]) -> dict[str, Any]:
    """Exactly what blockrep/ha/state.py's save() writes."""
    return {
        "node-id": "old-node",
        "generations": generations,
        "alone-since": generations[-1] if generations[-1].startswith("failover:") else None,
        "written-chunks": chunks,
    }


def test_state_py_files_are_read(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    gens = [U1, U2, f"failover:{U3}"]
    path.write_text(json.dumps(legacy_doc(gens, [3, 0, 1])))
    s = NodeState.load(str(path))
    assert s.legacy and not s.fresh
    assert s.node_id == "old-node"
    assert s.history == [
        HistoryEntry(EntryKind.EPOCH, U1),
        HistoryEntry(EntryKind.EPOCH, U2),
        HistoryEntry(EntryKind.FAILOVER, U3),
    ]
    assert s.alone_since == HistoryEntry(EntryKind.FAILOVER, U3)
    assert (s.clean_shutdown, s.history_trimmed, s.disk_id) == (False, False, None)
    assert list(s.peer_bitmap) == [0, 1, 3] and s.peer_bitmap.region_size == MiB
    s.ensure_disk_id(10 * MiB)  # the first save writes version 1, marks kept
    t = NodeState.load(str(path))
    assert not t.legacy and t == s
    assert t.peer_bitmap.ranges() == [[0, 2 * MiB], [3 * MiB, MiB]]
    assert json.loads(path.read_bytes())["version"] == 1


def test_a_full_state_py_history_counts_as_trimmed(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(legacy_doc([f"{i}" for i in range(64)], [])))
    s = NodeState.load(str(path))
    assert s.history_trimmed and len(s.history) == 64 and s.peer_bitmap.length == 0
    s.ensure_disk_id(MiB)
    assert NodeState.load(str(path)).peer_bitmap == RegionBitmap(MiB, MiB)


def test_state_py_marks_past_the_disk_are_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(legacy_doc([U1], [9])))
    with pytest.raises(StateFileError, match="peer-bitmap does not fit the disk"):
        NodeState.load(str(path)).ensure_disk_id(4 * MiB)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"generations": "x"}, "field generations should be a list"),
        ({"generations": ["nope:" + U1]}, "field generations[0]:"),
        ({"written-chunks": [-1]}, "field written-chunks[0] should be a count"),
        ({"written-chunks": [1.5]}, "field written-chunks[0] should be a count"),
        ({"alone-since": 3}, "field alone-since should be a string"),
        ({"node-id": None}, "field node-id should be a string"),
        ({"color": 1}, "field color is unknown"),
    ],
)
def test_ill_typed_state_py_files_are_named(
    tmp_path: pathlib.Path, change: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "s.json"
    doc = legacy_doc([U1], [0])
    doc.update(change)
    path.write_text(json.dumps(doc))
    assert problem in load_error(path)


# -- mark before write, atomic updates, the resync position --------------------------------


def count_saves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    saves: list[int] = []
    real = NodeState.save

    def save(self: NodeState) -> None:
        saves.append(1)
        real(self)

    monkeypatch.setattr(NodeState, "save", save)
    return saves


def test_mark_before_write_saves_only_when_something_is_new(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(16 * MiB)
    saves = count_saves(monkeypatch)
    assert s.mark_before_write(MiB + 5, 10) is True
    assert list(NodeState.load(path).peer_bitmap) == [1]  # durable on return
    assert s.mark_before_write(MiB, 4096) is False
    assert s.mark_regions([1]) is False
    assert len(saves) == 1
    assert s.mark_regions([2, 3, 9]) is True  # a batch: one save
    assert len(saves) == 2
    assert list(NodeState.load(path).peer_bitmap) == [1, 2, 3, 9]


def test_a_failed_mark_is_saved_by_the_next_call(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(16 * MiB)
    real = os.replace

    def full(a: Any, b: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(node_state.os, "replace", full)
    with pytest.raises(StateFileError, match="cannot write: No space left on device"):
        s.mark_before_write(0, 1)
    assert not os.path.exists(path + ".tmp")
    assert list(NodeState.load(path).peer_bitmap) == []
    monkeypatch.setattr(node_state.os, "replace", real)
    # the region is marked in memory already; the caller must not take that as durable
    assert s.mark_before_write(0, 1) is True
    assert list(NodeState.load(path).peer_bitmap) == [0]
    assert s.mark_before_write(0, 1) is False


def test_a_failed_update_leaves_memory_as_it_was(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(4 * MiB)
    s.new_epoch(U1)
    s.mark_regions([2])
    before = s.encode()

    def broken(self: NodeState) -> None:
        raise StateFileError(self.path, "cannot write: No space left on device")

    monkeypatch.setattr(NodeState, "save", broken)
    with pytest.raises(StateFileError):
        s.go_alone(EntryKind.DEGRADED)
    with pytest.raises(StateFileError):
        s.new_epoch(U2)
    with pytest.raises(StateFileError):
        s.begin_resync(
            ResyncPosition(ReplicationState.SYNC_TARGET, HistoryEntry.parse(U1), s.peer_bitmap)
        )
    assert s.encode() == before
    assert s.alone_since is None and s.disk_state is DiskState.CONSISTENT


def test_resync_position_survives_a_restart(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.json")
    s = NodeState(path)
    s.ensure_disk_id(8 * MiB)
    todo = RegionBitmap(MiB, 8 * MiB, [0, 1, 2, 6])
    source = HistoryEntry(EntryKind.FAILOVER, U2)
    s.begin_resync(ResyncPosition(ReplicationState.SYNC_TARGET, source, todo, "node-b"))
    todo.clear()  # the state keeps its own copy
    assert s.resync_copied(0, 2 * MiB) == 2
    assert s.resync_copied(2 * MiB, MiB // 2) == 0  # region 2 only in part
    t = NodeState.load(path)
    assert t.disk_state is DiskState.INCONSISTENT
    assert t.resync is not None
    assert (t.resync.direction, t.resync.source_generation, t.resync.peer_node_id) == (
        ReplicationState.SYNC_TARGET,
        source,
        "node-b",
    )
    assert list(t.resync.remaining) == [2, 6]
    t.finish_resync(DiskState.UP_TO_DATE)
    t = NodeState.load(path)
    assert (t.resync, t.disk_state) == (None, DiskState.UP_TO_DATE)
    with pytest.raises(ValueError, match="SyncSource or SyncTarget"):
        t.begin_resync(ResyncPosition(ReplicationState.PROTECTED, source, t.peer_bitmap))
    with pytest.raises(ValueError, match="no resync"):
        t.resync_copied(0, MiB)


def test_a_sync_source_keeps_its_disk_state(tmp_path: pathlib.Path) -> None:
    s = NodeState(str(tmp_path / "s.json"), disk_state=DiskState.UP_TO_DATE)
    s.ensure_disk_id(2 * MiB)
    s.begin_resync(
        ResyncPosition(ReplicationState.SYNC_SOURCE, HistoryEntry.parse(U1), s.peer_bitmap)
    )
    assert NodeState.load(s.path).disk_state is DiskState.UP_TO_DATE
