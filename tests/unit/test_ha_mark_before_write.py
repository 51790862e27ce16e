"""I1 for a node alone (issue 11): the consumer export marks a write's regions durably in
the state file before the write is issued to the disk, and a write whose mark cannot be
saved is refused with EIO and never reaches the disk."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest

from blockrep.block.graph import Graph
from blockrep.errors import BlockError
from blockrep.ha.bitmap import REGION_SIZE
from blockrep.ha.consumer import ConsumerExport
from blockrep.ha.node_state import NodeState
from blockrep.ha.role import BaseRole
from blockrep.ha.states import EntryKind

SIZE = 4 * REGION_SIZE


async def _setup(tmp_path, state_path: str):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(SIZE))
    g = Graph()
    node = await g.add({"driver": "file", "filename": str(disk)})
    st = NodeState(str(tmp_path / "seed.state"))
    st.ensure_disk_id(SIZE)
    st.go_alone(EntryKind.DEGRADED)
    st.path = state_path
    role = SimpleNamespace(state=st, errors=[])
    role.error = role.errors.append
    seen: list[tuple[bytes, set[int]]] = []

    def before_write(offset: int, nbytes: int) -> None:
        BaseRole._mark_before_write(role, offset, nbytes)  # type: ignore[arg-type]
        # what the disk and the state file hold when the mark is done
        seen.append(
            (
                disk.read_bytes()[offset : offset + nbytes],
                set(NodeState.load(state_path).peer_bitmap),
            )
        )

    return g, disk, ConsumerExport(node, before_write), role, seen


async def test_alone_write_is_marked_in_the_file_before_it_reaches_the_disk(tmp_path) -> None:
    state = str(tmp_path / "node.state")
    g, disk, exp, role, seen = await _setup(tmp_path, state)
    try:
        await exp.write(2 * REGION_SIZE + 100, b"x" * 4096, False)
        await exp.write_zeroes(3 * REGION_SIZE, 512, False, False)
        assert seen[0] == (bytes(4096), {2})  # marked, not yet written
        assert seen[1][1] == {2, 3}
        assert disk.read_bytes()[2 * REGION_SIZE + 100 : 2 * REGION_SIZE + 4196] == b"x" * 4096
        assert exp.in_flight == {} and role.errors == []
    finally:
        await g.close_all()


async def test_a_write_whose_mark_cannot_be_saved_is_refused_and_not_issued(tmp_path) -> None:
    state = str(tmp_path / "missing-dir" / "node.state")  # every save fails
    g, disk, exp, role, _ = await _setup(tmp_path, state)
    exp.before_write = lambda o, n: BaseRole._mark_before_write(role, o, n)  # type: ignore[arg-type]
    try:
        with pytest.raises(BlockError) as e:
            await exp.write(REGION_SIZE, b"y" * 512, False)
        assert e.value.errno == errno.EIO
        assert disk.read_bytes() == bytes(SIZE)  # never issued
        assert role.errors and "could not be marked" in role.errors[0]
        assert not os.path.exists(state)
    finally:
        await g.close_all()
