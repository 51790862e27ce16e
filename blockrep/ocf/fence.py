"""Resource-level fencing under Pacemaker: DRBD's crm-fence-peer / crm-unfence-peer.

A primary that loses its peer (failover-point latest) freezes acknowledgements until its
``--outdate-peer-command`` exits 0. Under Pacemaker that command is ``blockrep ocf
fence-peer``: it places a location constraint on the promotable clone that forbids the
Promoted role on every node but this one, so the peer — whose disk lacks what this node
acknowledges from now on — is never promoted; ``unfence-peer`` (or the promoted node's
monitor once the pair is Protected again) removes it.

A constraint only binds the nodes whose CIB holds it. It is enough when the peer is a
member of this node's partition (the CIB is shared) or down (fenced or stopped: it
rejoins through a CIB that holds it). A peer that is merely unreachable may be in a
partition of its own that promotes it, so fence-peer then waits for Pacemaker to fence
it, and fails (acknowledgements stay frozen, blockrep retries) if that does not happen in
time: this node may be the one being fenced, and nothing it acknowledged is lost.

The XML and the verdict on the peer are pure functions (tested byte for byte); placing,
querying and removing run ``cibadmin`` (``CIB_file`` in the environment works too).
"""

from __future__ import annotations

import enum
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from xml.sax.saxutils import quoteattr

CIBADMIN_TIMEOUT = 30.0  # seconds one cibadmin call may take
CIB_NO_SUCH_OBJECT = 105  # cibadmin: the object or xpath matched nothing


class PeerState(enum.Enum):
    MEMBER = "member"  # in this node's partition: the constraint reaches its CIB
    DOWN = "down"  # fenced or stopped cleanly: it rejoins through a CIB with the constraint
    UNKNOWN = "unknown"  # lost and not (yet) fenced, or never seen: wait


def constraint_id(clone: str) -> str:
    return f"blockrep-fence-{clone}"


def constraint_xml(clone: str, node: str) -> str:
    """The ``rsc_location``: -INFINITY for the Promoted role where ``#uname`` is not NODE."""
    cid = constraint_id(clone)
    return (
        f"<rsc_location rsc={quoteattr(clone)} id={quoteattr(cid)}>"
        f'<rule role="Promoted" score="-INFINITY" id={quoteattr(cid + "-rule")}>'
        f'<expression attribute="#uname" operation="ne" value={quoteattr(node)}'
        f" id={quoteattr(cid + '-expr')}/>"
        "</rule></rsc_location>"
    )


def _on(value: str | None, word: str) -> bool:
    """Pacemaker 2.1 writes ``true``/``online``; later ones a join timestamp (0: not)."""
    if value is None:
        return False
    if value.isdigit():
        return int(value) > 0
    return value == word


def peer_state(node_state: str | None) -> PeerState:
    """The verdict on the peer from its ``node_state`` element in the CIB's status (None:
    no such element, a node never seen)."""
    if not node_state:
        return PeerState.UNKNOWN
    try:
        el = ET.fromstring(node_state)
    except ET.ParseError:
        return PeerState.UNKNOWN
    if el.tag != "node_state":
        found = el.find(".//node_state")
        if found is None:
            return PeerState.UNKNOWN
        el = found
    in_ccm, crmd = _on(el.get("in_ccm"), "true"), _on(el.get("crmd"), "online")
    if in_ccm and crmd and el.get("join") == "member":
        return PeerState.MEMBER
    if not in_ccm and not crmd and el.get("expected") == "down":
        return PeerState.DOWN
    return PeerState.UNKNOWN


def _cibadmin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cibadmin", *args],
        capture_output=True,
        text=True,
        timeout=CIBADMIN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


class FenceError(Exception):
    """cibadmin failed: the message says how."""


def place(clone: str, node: str) -> None:
    """Create the constraint, or update it to name NODE (``cibadmin -M -c``)."""
    r = _cibadmin("--modify", "--allow-create", "--scope", "constraints", "--xml-text",
                  constraint_xml(clone, node))  # fmt: skip
    if r.returncode != 0:
        raise FenceError(f"cibadmin could not place {constraint_id(clone)}: {r.stderr.strip()}")


def remove(clone: str) -> None:
    """Delete the constraint (cibadmin succeeds when there is none)."""
    r = _cibadmin("--delete", "--xml-text", f"<rsc_location id={quoteattr(constraint_id(clone))}/>")
    if r.returncode not in (0, CIB_NO_SUCH_OBJECT):
        raise FenceError(f"cibadmin could not remove {constraint_id(clone)}: {r.stderr.strip()}")


def placed(clone: str) -> bool:
    xpath = f"//rsc_location[@id={quoteattr(constraint_id(clone))}]"
    r = _cibadmin("--query", "--xpath", xpath)
    if r.returncode == CIB_NO_SUCH_OBJECT:
        return False
    if r.returncode != 0:
        raise FenceError(f"cibadmin could not query {constraint_id(clone)}: {r.stderr.strip()}")
    return True


def query_node_state(node: str) -> str | None:
    r = _cibadmin("--query", "--xpath", f"//node_state[@uname={quoteattr(node)}]")
    if r.returncode == CIB_NO_SUCH_OBJECT:
        return None
    if r.returncode != 0:
        raise FenceError(f"cibadmin could not query node {node}: {r.stderr.strip()}")
    return r.stdout


def clone_of(primitive: str) -> str | None:
    """The id of the clone holding PRIMITIVE (``cibadmin``), None if it cannot be found."""
    r = _cibadmin("--query", "--xpath", f"//clone[primitive[@id={quoteattr(primitive)}]]")
    if r.returncode != 0:
        return None
    try:
        return ET.fromstring(r.stdout).get("id")
    except ET.ParseError:
        return None


def fence_peer(
    clone: str,
    node: str,
    peer: str,
    timeout: float,
    log: Callable[[str], None],
    poll: float = 1.0,
) -> bool:
    """Place the constraint, then wait until it binds the peer (see the module's doc)."""
    place(clone, node)
    log(f"placed {constraint_id(clone)}: the Promoted role only on {node}")
    deadline = time.monotonic() + timeout
    while True:
        state = peer_state(query_node_state(peer))
        if state is not PeerState.UNKNOWN:
            log(f"peer {peer} is {state.value}: the constraint binds it")
            return True
        if time.monotonic() >= deadline:
            log(f"peer {peer} neither a member nor fenced after {timeout:.0f} s")
            return False
        time.sleep(poll)
