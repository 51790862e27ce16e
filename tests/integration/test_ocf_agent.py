"""ocf:blockrep:blockrep without a cluster (issue 14): the installed agent's meta-data
against ra-api-1.dtd, ocf-tester, validate-all's exit codes, monitor's 7/0/8 and
in-process promote/demote on a real `blockrep up` pair. Every data test ends by
comparing both disks with the model of what was written."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

from tests.harness.ha import REPO

MiB = 1 << 20
SIZE = 16 * MiB
DTD = "/usr/share/resource-agents/ra-api-1.dtd"


def install(ha) -> str:
    os.chmod(ha.dir, 0o755)  # ocf-tester runs meta-data as nobody: the path must be open
    r = subprocess.run(
        [sys.executable, "-m", "blockrep.cli", "ocf", "install", "--prefix", ha.path("ocf")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    path = ha.path("ocf/resource.d/blockrep/blockrep")
    assert os.access(path, os.X_OK) and f"as {path}" in r.stdout
    return path


def params(ha, res: str, node: str, **extra: str) -> dict[str, str]:
    """What Pacemaker puts in the agent's environment (the files under the test's dir)."""
    p = {"config": res, "node": node, "log": ha.path(f"{node}.agent.log"),
         "pidfile": ha.path(f"{node}.pid")}  # fmt: skip
    p.update(extra)
    return p


def run_agent(agent: str, action: str, p: dict[str, str], interval: int = 10000):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env.update({f"OCF_RESKEY_{k}": v for k, v in p.items()})
    env.update(OCF_ROOT="/usr/lib/ocf", OCF_RESOURCE_INSTANCE="p_r0",
               OCF_RESKEY_CRM_meta_interval=str(interval),
               OCF_RESKEY_CRM_meta_timeout="60000")  # fmt: skip
    return subprocess.run([agent, action], capture_output=True, text=True, timeout=120, env=env)


def rc(agent: str, action: str, p: dict[str, str], interval: int = 10000) -> int:
    return run_agent(agent, action, p, interval).returncode


def kill_pidfile(path: str) -> None:
    """The agent's `blockrep up` (not the harness's): killed by its pid if still there."""
    try:
        pid = int(open(path).read())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def test_meta_data_is_valid_against_ra_api_dtd(ha) -> None:
    agent = install(ha)
    r = subprocess.run([agent, "meta-data"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    with open(ha.path("md.xml"), "w") as f:
        f.write(r.stdout)
    v = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=r.stdout, text=True,
                       capture_output=True, cwd=os.path.dirname(DTD), timeout=30)  # fmt: skip
    assert v.returncode == 0, v.stderr
    v = subprocess.run(["xmllint", "--noout", "--dtdvalid", DTD, ha.path("md.xml")],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert v.returncode == 0 and "validity error" not in v.stderr, v.stderr
    root = ET.fromstring(r.stdout.split("\n", 2)[2])  # past the XML and DOCTYPE lines
    assert [c.tag for c in root][:3] == ["version", "longdesc", "shortdesc"]
    monitors = {a.get("role"): a.get("interval") for a in root.iter("action")
                if a.get("name") == "monitor"}  # fmt: skip
    assert set(monitors) == {"Promoted", "Unpromoted"}
    assert len(set(monitors.values())) == 2  # distinct intervals: Pacemaker needs them
    req = [p.get("name") for p in root.iter("parameter") if p.get("required") == "1"]
    assert req == ["config"]
    # the wrapper's copy is the agent's own (Python) answer
    py = subprocess.run([sys.executable, "-m", "blockrep.cli", "ocf", "agent", "meta-data"],
                        capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert py.returncode == 0 and py.stdout == r.stdout


async def test_validate_all_exit_codes(ha) -> None:
    agent = install(ha)
    ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    assert rc(agent, "validate-all", params(ha, res, "a")) == 0
    # 6: a parameter is missing or wrong
    p = params(ha, res, "a")
    del p["config"]
    assert rc(agent, "validate-all", p) == 6
    assert rc(agent, "validate-all", params(ha, res, "nosuch")) == 6
    assert rc(agent, "validate-all", params(ha, res, "a", outdate="sometimes")) == 6
    assert rc(agent, "validate-all", params(ha, res, "a", resync_rate="fast")) == 6
    with open(ha.path("bad.toml"), "w") as f:
        f.write("[resource\n")
    assert rc(agent, "validate-all", params(ha, ha.path("bad.toml"), "a")) == 6
    # 5: something this node needs is not installed here
    assert rc(agent, "validate-all", params(ha, ha.path("missing.toml"), "a")) == 5
    os.rename(ha.disk("a.raw"), ha.disk("a.moved"))
    assert rc(agent, "validate-all", params(ha, res, "a")) == 5
    assert rc(agent, "start", params(ha, res, "a")) == 5
    # a probe and a stop of a resource whose file is missing: not running, stopped
    assert rc(agent, "monitor", params(ha, ha.path("missing.toml"), "a"), interval=0) == 7
    assert rc(agent, "stop", params(ha, ha.path("missing.toml"), "a")) == 0
    assert rc(agent, "frobnicate", params(ha, res, "a")) == 3
    assert not os.path.exists(ha.path("a.pid"))  # nothing was started


async def test_ocf_tester_passes_on_the_installed_agent(ha) -> None:
    agent = install(ha)
    data = ha.make_disks(SIZE, names=("a.raw", "b.raw"))
    res = ha.resource()
    b = ha.up(res, "b")  # the peer, running as Pacemaker would keep it on the other node
    await b.wait_ready()
    p = params(ha, res, "a")
    args = ["ocf-tester", "-n", "p_r0"]
    for k, v in p.items():
        args += ["-o", f"{k}={v}"]
    try:
        r = await asyncio.to_thread(subprocess.run, [*args, agent], capture_output=True,
                                    text=True, timeout=280)  # fmt: skip
    finally:
        kill_pidfile(p["pidfile"])
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "passed all tests" in out, out + open(p["log"]).read()
    # ocf-tester promoted and demoted a (pairing with b) and stopped it: nothing written
    b.quit()
    assert await b.wait_exit(30) == 0
    assert read_disk(ha.disk("a.raw")) == data
    assert read_disk(ha.disk("b.raw")) == data


async def test_monitor_promote_demote_in_process_export_stays_up(ha) -> None:
    agent = install(ha)
    model = bytearray(ha.make_disks(SIZE, names=("a.raw", "b.raw")))
    res = ha.resource()
    b = ha.up(res, "b")
    await b.wait_ready()
    p = params(ha, res, "a")
    try:
        assert rc(agent, "monitor", p, interval=0) == 7  # probe of a stopped node
        assert not os.path.exists(p["pidfile"])  # ...changes nothing
        assert rc(agent, "monitor", p) == 7
        assert rc(agent, "demote", p) == 7
        r = run_agent(agent, "start", p)
        assert r.returncode == 0, r.stderr + open(p["log"]).read()
        pid = int(open(p["pidfile"]).read())
        assert rc(agent, "start", p) == 0  # started twice: still one process
        assert int(open(p["pidfile"]).read()) == pid
        assert rc(agent, "monitor", p) == 0
        assert rc(agent, "monitor", p, interval=0) == 0

        # a consumer connected to a's export before the promotion
        from tests.harness.ha import Node

        a = Node("up", "a", b.process, ha.disk("a.raw"), ha.path("a.qmp"), ha.path("a.nbd"),
                 ha.disk("a.raw") + ".blockrep-state.json")  # fmt: skip
        c = await ha.client(a)  # connected while a is unpromoted (its I/O is refused then)

        assert rc(agent, "promote", p) == 0
        assert rc(agent, "monitor", p) == 8
        assert rc(agent, "monitor", p, interval=0) == 8
        assert rc(agent, "promote", p) == 0  # promoting a promoted node succeeds
        assert int(open(p["pidfile"]).read()) == pid and os.path.exists(f"/proc/{pid}")
        assert await c.read(0, 4096) == bytes(model[:4096])
        await c.write(MiB, b"\x5a" * MiB)
        await c.flush()
        model[MiB : 2 * MiB] = b"\x5a" * MiB
        assert await c.read(MiB, MiB) == b"\x5a" * MiB
        await a.wait_status(lambda s: s["replication"] == "Protected", 30, "Protected")
        await a.qmp_async("replication-checkpoint")

        assert rc(agent, "demote", p) == 0
        assert rc(agent, "monitor", p) == 0
        assert rc(agent, "demote", p) == 0  # demoting a demoted node succeeds
        assert int(open(p["pidfile"]).read()) == pid

        assert rc(agent, "promote", p) == 0
        assert rc(agent, "monitor", p) == 8
        assert await c.read(MiB, MiB) == b"\x5a" * MiB  # the same connection serves again
        await c.write(5 * MiB, b"\xa5" * (2 * MiB))
        await c.flush()
        model[5 * MiB : 7 * MiB] = b"\xa5" * (2 * MiB)
        await a.wait_status(lambda s: s["replication"] == "Protected", 30, "Protected")
        await a.qmp_async("replication-checkpoint")
        assert int(open(p["pidfile"]).read()) == pid

        # stop a promoted node: demoted first, then an orderly stop
        assert rc(agent, "stop", p) == 0
        assert (
            not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        )
        assert rc(agent, "monitor", p) == 7
        assert rc(agent, "stop", p) == 0
    finally:
        kill_pidfile(p["pidfile"])
    b.quit()
    assert await b.wait_exit(30) == 0
    assert read_disk(ha.disk("a.raw")) == bytes(model)
    assert read_disk(ha.disk("b.raw")) == bytes(model)


def cib_with_peer(path: str, peer_state: str) -> None:
    """A CIB file (``CIB_file``: cibadmin works on it without a cluster) holding the
    promotable clone and the peer's node_state."""
    with open(path, "w") as f:
        f.write(
            '<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" '
            'num_updates="0" admin_epoch="0"><configuration><crm_config/><nodes/>'
            '<resources><clone id="ms_r0"><primitive id="p_r0" class="ocf" '
            'provider="blockrep" type="blockrep"/></clone></resources><constraints/>'
            f"</configuration><status>{peer_state}</status></cib>"
        )


def ocf_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockrep.cli", "ocf", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


async def test_fence_peer_places_the_constraint_and_unfence_removes_it(ha) -> None:
    ha.make_disks(MiB, names=("a.raw", "b.raw"))
    res = ha.resource()
    cib = ha.path("cib.xml")
    env = {**os.environ, "CIB_file": cib}
    query = ["cibadmin", "--query", "--xpath", "//rsc_location[@id='blockrep-fence-ms_r0']"]
    # the peer is a member of this partition: the constraint binds it at once
    cib_with_peer(cib, '<node_state id="2" uname="b" in_ccm="true" crmd="online" '
                  'join="member" expected="member"/>')  # fmt: skip
    fp = ["fence-peer", "--config", res, "--node", "a", "--clone", "ms_r0", "--timeout", "1"]
    r = ocf_cli(env, *fp, "--log", ha.path("fence.log"))
    assert r.returncode == 0, r.stderr
    q = subprocess.run(query, env=env, capture_output=True, text=True, timeout=30)
    assert q.returncode == 0 and 'value="a"' in q.stdout and 'role="Promoted"' in q.stdout
    assert "placed blockrep-fence-ms_r0" in open(ha.path("fence.log")).read()
    r = ocf_cli(env, "unfence-peer", "--clone", "ms_r0")
    assert r.returncode == 0, r.stderr
    assert subprocess.run(query, env=env, capture_output=True, timeout=30).returncode != 0
    assert ocf_cli(env, "unfence-peer", "--clone", "ms_r0").returncode == 0  # idempotent
    # lost but not fenced: the constraint is placed, yet fence-peer fails (acks stay frozen)
    cib_with_peer(cib, '<node_state id="2" uname="b" in_ccm="false" crmd="offline" '
                  'join="member" expected="member"/>')  # fmt: skip
    r = ocf_cli(env, *fp)
    assert r.returncode == 1 and "neither a member nor fenced" in r.stderr, r.stderr
    assert subprocess.run(query, env=env, capture_output=True, timeout=30).returncode == 0
    # ...and succeeds once Pacemaker recorded the fencing
    cib_with_peer(cib, '<node_state id="2" uname="b" in_ccm="false" crmd="offline" '
                  'join="down" expected="down"/>')  # fmt: skip
    assert ocf_cli(env, *fp).returncode == 0
