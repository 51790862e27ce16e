"""HA manager with a state file it cannot use (issue 11, Why 6): `blockrep primary|secondary`
exits 1 with one line naming the file and what is wrong, no traceback, and the file is
left as it was (a state file is never silently reset)."""

from __future__ import annotations

import json
import subprocess

import pytest

from blockrep.ha.node_state import NodeState
from blockrep.testing import MiB, blockrep_argv
from tests.harness.ha import HA, REPO

pytestmark = pytest.mark.timeout(120)

SIZE = 2 * MiB

OLD = {"node-id": "n", "generations": [], "alone-since": None, "written-chunks": []}
BAD = {
    "corrupt": b'{"body": nonsense}\n',
    "truncated": b'{"body": {"node-id": "x", "history": ["epoch:',
    "empty": b"",
    # the old format (state.py's), with a field of the wrong type
    "ill-typed": json.dumps({**OLD, "generations": 5}).encode(),
    "ill-typed-entry": json.dumps({**OLD, "generations": ["bogus:1"]}).encode(),
}


@pytest.fixture
def ha():
    h = HA()
    try:
        yield h
    finally:
        h.close()


def _run(ha: HA, role: str, state: str) -> subprocess.CompletedProcess[str]:
    peer = ["--secondary", f"unix:{ha.path('none.ctl')}", "--connect-timeout", "1"]
    if role == "secondary":
        peer = ["--listen", f"unix:{ha.path('s.ctl')}", "--buffer-dir", ha.dir]
    argv = blockrep_argv(
        role,
        "--disk",
        ha.disk("p.raw"),
        *peer,
        "--export",
        f"unix:{ha.path('x.nbd')}",
        "--state-file",
        state,
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


def _check(r: subprocess.CompletedProcess[str], role: str, state: str, problem: str) -> None:
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"blockrep {role}: state file {state}: "), lines
    assert problem in lines[0], lines


@pytest.mark.parametrize("role", ["primary", "secondary"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_unusable_state_file_is_one_clear_line(ha, role: str, kind: str) -> None:
    ha.make_disks(SIZE, names=("p.raw",))
    state = ha.path("node.state")
    with open(state, "wb") as f:
        f.write(BAD[kind])
    r = _run(ha, role, state)
    problem = {
        "corrupt": "corrupt",
        "truncated": "truncated",
        "empty": "empty",
        "ill-typed": "field generations should be a list",
        "ill-typed-entry": "field generations[0]",
    }[kind]
    _check(r, role, state, problem)
    with open(state, "rb") as f:
        assert f.read() == BAD[kind]  # never reset


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_checksum_mismatch_and_another_disk_are_refused(ha, role: str) -> None:
    ha.make_disks(SIZE, names=("p.raw",))
    state = ha.path("node.state")
    st = NodeState(state)
    st.ensure_disk_id(SIZE)  # saves a valid file
    good = open(state, "rb").read()
    # a flipped byte in the body: the checksum catches it
    bad = good.replace(b'"clean-shutdown":true', b'"clean-shutdown":false')
    assert bad != good
    open(state, "wb").write(bad)
    _check(_run(ha, role, state), role, state, "is corrupt: its sha256 is")
    assert open(state, "rb").read() == bad

    # a valid file of a disk of another size
    st2 = NodeState(state)
    st2.ensure_disk_id(SIZE * 2)
    other = open(state, "rb").read()
    _check(_run(ha, role, state), role, state, f"not of {SIZE} bytes")
    assert open(state, "rb").read() == other
