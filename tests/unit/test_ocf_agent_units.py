"""The pure parts of ocf:blockrep:blockrep: promotion scores row by row, monitor's exit,
the fence constraint byte for byte, the verdict on the peer, the installed wrapper."""

from __future__ import annotations

import pytest

from blockrep.ocf import fence, scores
from blockrep.ocf.codes import OcfExit
from blockrep.ocf.install import wrapper_script


def st(role: str, disk: str, replication: str, peer: str = "connected") -> dict[str, str]:
    return {"role": role, "disk-state": disk, "replication": replication, "peer": peer}


@pytest.mark.parametrize(
    ("status", "score"),
    [
        (st("primary", "UpToDate", "Protected"), 10000),
        (st("primary", "UpToDate", "SyncSource", "syncing"), 10000),
        (st("primary", "UpToDate", "Connecting", "degraded"), 10000),  # the survivor
        (st("secondary", "UpToDate", "Protected"), 1000),
        (st("secondary", "UpToDate", "Connecting", "peer-lost"), 1000),  # bereaved: next
        (st("none", "UpToDate", "Connecting", "connecting"), 5),  # never paired since start
        (st("none", "Consistent", "Connecting", "connecting"), 5),
        (st("secondary", "Consistent", "Established"), 5),
        (st("secondary", "Outdated", "Connecting", "peer-lost"), None),
        (st("none", "Outdated", "Connecting"), None),
        (st("secondary", "Inconsistent", "SyncTarget"), None),
        (st("primary", "Outdated", "StandAlone", "stale"), None),  # a stale primary
        (st("primary", "UpToDate", "SplitBrain", "split-brain"), None),
        (st("none", "UpToDate", "SplitBrain", "split-brain"), None),
        (st("primary", "UpToDate", "Unrelated", "refused"), None),
    ],
)
def test_promotion_score_follows_drbd_policy(status: dict[str, str], score: int | None) -> None:
    assert scores.promotion_score(status) == score


@pytest.mark.parametrize(
    ("role", "code"),
    [("primary", OcfExit.RUNNING_PROMOTED), ("secondary", OcfExit.SUCCESS),
     ("none", OcfExit.SUCCESS)],
)  # fmt: skip
def test_monitor_exit_is_the_live_role(role: str, code: OcfExit) -> None:
    assert scores.monitor_exit(st(role, "UpToDate", "Protected")) is code


def test_fence_constraint_xml_byte_for_byte() -> None:
    assert fence.constraint_xml("ms_r0", "alpha") == (
        '<rsc_location rsc="ms_r0" id="blockrep-fence-ms_r0">'
        '<rule role="Promoted" score="-INFINITY" id="blockrep-fence-ms_r0-rule">'
        '<expression attribute="#uname" operation="ne" value="alpha"'
        ' id="blockrep-fence-ms_r0-expr"/>'
        "</rule></rsc_location>"
    )
    # a name that is not plain XML is escaped, never breaks the element
    assert 'value="a&amp;b&lt;"' in fence.constraint_xml("c", "a&b<")


def node_state(**attrs: str) -> str:
    return "<node_state " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"


@pytest.mark.parametrize(
    ("xml", "verdict"),
    [
        (node_state(uname="b", in_ccm="true", crmd="online", join="member", expected="member"),
         fence.PeerState.MEMBER),
        # Pacemaker ≥ 2.1.7 writes join timestamps instead of true/online
        (node_state(uname="b", in_ccm="1733100000", crmd="1733100001", join="member",
                    expected="member"), fence.PeerState.MEMBER),
        # fenced (or stopped cleanly): what the controller records after stonith
        (node_state(uname="b", in_ccm="false", crmd="offline", join="down", expected="down"),
         fence.PeerState.DOWN),
        (node_state(uname="b", in_ccm="0", crmd="0", join="down", expected="down"),
         fence.PeerState.DOWN),
        # lost and not fenced yet: it may be a partition of its own
        (node_state(uname="b", in_ccm="false", crmd="offline", join="member", expected="member"),
         fence.PeerState.UNKNOWN),
        # in the membership but its controller is gone: not yet
        (node_state(uname="b", in_ccm="true", crmd="offline", join="down", expected="member"),
         fence.PeerState.UNKNOWN),
        (None, fence.PeerState.UNKNOWN),  # never seen
        ("<not xml", fence.PeerState.UNKNOWN),
        ("<status>" + node_state(uname="b", in_ccm="true", crmd="online", join="member")
         + "</status>", fence.PeerState.MEMBER),
    ],
)  # fmt: skip
def test_peer_verdict_from_node_state(xml: str | None, verdict: fence.PeerState) -> None:
    assert fence.peer_state(xml) is verdict


def test_wrapper_answers_meta_data_itself_and_execs_this_python() -> None:
    text = wrapper_script("/opt/my venv/bin/python", "/src", "<resource-agent/>\n")
    assert text.startswith("#!/bin/sh\n")
    assert (
        "cat <<'BLOCKREP_OCF_METADATA'\n<resource-agent/>\nBLOCKREP_OCF_METADATA\nexit 0\n" in text
    )
    assert "PYTHONPATH=/src${PYTHONPATH:+:$PYTHONPATH}\nexport PYTHONPATH\n" in text
    assert text.endswith("exec '/opt/my venv/bin/python' -m blockrep.cli ocf agent \"$@\"\n")
    assert "PYTHONPATH" not in wrapper_script("/usr/bin/python3", None, "<x/>")
