"""The actions of ocf:blockrep:blockrep (PACEMAKER.md's contract, mapped to blockrep).

One ``blockrep up`` process per node, started detached (its own session, output in the
``log`` parameter's file, pid in ``pidfile``). Every answer about its role comes from the
live process (QMP ``query-ha-status``), never from a file: a pid file only says which
process to stop, and whether a silent QMP socket belongs to a process that is still
there (a hang: error) or gone (not running).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import fence, scores
from .codes import OcfExit
from .metadata import DEFAULT_FENCE_TIMEOUT, metadata_xml

STATUS_TIMEOUT = 10.0  # s for one query-ha-status: a node that does not answer is hung
ACTIONS = ("start", "stop", "monitor", "promote", "demote", "notify", "validate-all",
           "meta-data", "reload")  # fmt: skip


class AgentError(Exception):
    def __init__(self, code: OcfExit, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def say(text: str) -> None:
    """Pacemaker's executor logs an agent's stderr."""
    print(f"blockrep ocf: {os.environ.get('__OCF_ACTION', '')}: {text}", file=sys.stderr)


@dataclass(frozen=True)
class Params:
    config: str
    node: str
    resource: str
    peer: str
    qmp: str
    disks: tuple[str, ...]
    outdate: str
    on_outdate_failure: str
    fence_timeout: int
    log: str
    loglevel: str
    pidfile: str
    resync_rate: str
    resync_min_rate: str


def load_params(env: Mapping[str, str]) -> Params:
    """The OCF_RESKEY_* parameters checked against the resource file: 6 for what is wrong
    with them, 5 for a file that is not there."""
    from ..errors import OptionError
    from ..ha.resource import load_resource

    def key(name: str, default: str = "") -> str:
        return env.get(f"OCF_RESKEY_{name}", "") or default

    config = key("config")
    if not config:
        raise AgentError(
            OcfExit.ERR_CONFIGURED, "parameter 'config' (the resource file) is required"
        )
    if not os.path.isfile(config):
        raise AgentError(OcfExit.ERR_INSTALLED, f"resource file {config} does not exist")
    try:
        res = load_resource(config)
        node = res.local_node_name(key("node") or None)
        peer = res.peer_of(node).name
    except OptionError as e:
        raise AgentError(OcfExit.ERR_CONFIGURED, e.message) from e
    outdate = key("outdate", "crm")
    if outdate not in ("crm", "none"):
        raise AgentError(OcfExit.ERR_CONFIGURED, f"outdate={outdate!r}: crm or none")
    on_failure = key("on_outdate_failure", "freeze")
    if on_failure not in ("freeze", "continue"):
        raise AgentError(
            OcfExit.ERR_CONFIGURED, f"on_outdate_failure={on_failure!r}: freeze or continue"
        )
    timeout = key("fence_timeout", str(DEFAULT_FENCE_TIMEOUT))
    if not timeout.isdigit():
        raise AgentError(OcfExit.ERR_CONFIGURED, f"fence_timeout={timeout!r}: whole seconds")
    from ..ha.config import parse_rate

    for name in ("resync_rate", "resync_min_rate"):
        try:
            parse_rate(key(name, "0"))
        except Exception as e:  # noqa: BLE001 - argparse-style converter: any error is a bad value
            raise AgentError(OcfExit.ERR_CONFIGURED, f"{name}: {e}") from e
    cfg = res.node(node)
    rsctmp = env.get("HA_RSCTMP") or "/run/resource-agents"
    stem = f"{res.name}-{node}"
    return Params(
        config=os.path.abspath(config), node=node, resource=res.name, peer=peer,
        qmp=cfg.qmp, disks=tuple(cfg.disks), outdate=outdate, on_outdate_failure=on_failure,
        fence_timeout=int(timeout), log=key("log", f"/var/log/blockrep/{stem}.log"),
        loglevel=key("loglevel", "INFO").upper(), pidfile=key("pidfile", f"{rsctmp}/blockrep-{stem}.pid"),
        resync_rate=key("resync_rate", "0"), resync_min_rate=key("resync_min_rate", "0"),
    )  # fmt: skip


def validate(p: Params) -> None:
    for d in p.disks:
        if not os.path.exists(d):
            raise AgentError(OcfExit.ERR_INSTALLED, f"disk {d} of node {p.node} does not exist")


# -- the live process ------------------------------------------------------------------


def query_status(p: Params, timeout: float = STATUS_TIMEOUT) -> dict[str, Any] | None:
    """The node's status, or None when nothing answers on its QMP socket."""
    from ..cli.ha import qmp_call

    try:
        s = qmp_call(p.qmp, "query-ha-status", timeout=timeout)
    except (OSError, ConnectionError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def read_pid(p: Params) -> int | None:
    """The pid in the pid file if that process is alive and is this node's blockrep up."""
    try:
        with open(p.pidfile) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"up" in argv and p.config.encode() in argv else None


def _timeout(env: Mapping[str, str], default: float) -> float:
    """The operation's timeout (CRM_meta_timeout, ms) less a margin to answer in."""
    ms = env.get("OCF_RESKEY_CRM_meta_timeout", "")
    return max(5.0, int(ms) / 1000 - 5) if ms.isdigit() else default


def is_probe(env: Mapping[str, str]) -> bool:
    return env.get("OCF_RESKEY_CRM_meta_interval", "0") in ("0", "")


def _clone_id(env: Mapping[str, str]) -> str:
    """The promotable clone holding this primitive (the fence constraint's target)."""
    prim = env.get("OCF_RESOURCE_INSTANCE", "blockrep").split(":")[0]
    return fence.clone_of(prim) or prim


def up_argv(p: Params, clone: str) -> list[str]:
    argv = [sys.executable, "-m", "blockrep.cli", "up", p.config, "--node", p.node,
            "--log", p.loglevel, "--resync-rate", p.resync_rate,
            "--resync-min-rate", p.resync_min_rate,
            "--on-outdate-failure", p.on_outdate_failure]  # fmt: skip
    if p.outdate == "crm":
        hook = [sys.executable, "-m", "blockrep.cli", "ocf", "fence-peer", "--config", p.config,
                "--node", p.node, "--clone", clone, "--timeout", str(p.fence_timeout),
                "--log", p.log]  # fmt: skip
        argv += ["--outdate-peer-command", shlex.join(hook)]
    return argv


# -- the promotion score ----------------------------------------------------------------


def _crm_attribute(*args: str) -> None:
    try:
        r = subprocess.run(["crm_attribute", "--promotion", "-l", "reboot", *args],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        say(f"crm_attribute: {e}")
        return
    if r.returncode != 0:  # outside a cluster (ocf-tester): nothing to tell
        say(f"crm_attribute {' '.join(args)}: {r.stderr.strip()}")


def set_score(status: Mapping[str, Any]) -> None:
    score = scores.promotion_score(status)
    if score is None:
        _crm_attribute("-D")
    else:
        _crm_attribute("-v", str(score))


# -- actions ----------------------------------------------------------------------------


def monitor(p: Params, env: Mapping[str, str]) -> OcfExit:
    s = query_status(p)
    if s is None:
        if read_pid(p) is not None:
            say(f"pid {read_pid(p)} is alive but its QMP socket {p.qmp} does not answer")
            return OcfExit.ERR_GENERIC
        return OcfExit.NOT_RUNNING
    rc = scores.monitor_exit(s)
    if is_probe(env):
        return rc  # a probe changes nothing
    set_score(s)
    if (
        rc is OcfExit.RUNNING_PROMOTED
        and p.outdate == "crm"
        and s.get("replication") == "Protected"
    ):
        clone = _clone_id(env)
        try:
            if fence.placed(clone):
                fence.remove(clone)
                say(f"the pair is Protected again: removed {fence.constraint_id(clone)}")
        except (fence.FenceError, OSError, subprocess.TimeoutExpired) as e:
            say(str(e))
    return rc


def start(p: Params, env: Mapping[str, str]) -> OcfExit:
    validate(p)
    if query_status(p) is not None:
        return OcfExit.SUCCESS
    if read_pid(p) is not None:
        say("a blockrep up process is alive but does not answer: stop it first")
        return OcfExit.ERR_GENERIC
    for path in (p.log, p.pidfile):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(p.log, "ab") as log:
        proc = subprocess.Popen(up_argv(p, _clone_id(env)), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd="/")  # fmt: skip
    with open(p.pidfile + ".tmp", "w") as f:
        f.write(f"{proc.pid}\n")
    os.replace(p.pidfile + ".tmp", p.pidfile)
    deadline = time.monotonic() + _timeout(env, 110)
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            say(f"blockrep up exited with {rc}; see {p.log}")
            return OcfExit.ERR_GENERIC
        s = query_status(p, timeout=2)
        if s is not None:
            set_score(s)
            say(f"{p.resource}/{p.node} running (pid {proc.pid}, role {s.get('role')})")
            return OcfExit.SUCCESS
        time.sleep(0.2)
    say(f"blockrep up did not answer on {p.qmp} in time; see {p.log}")
    return OcfExit.ERR_GENERIC


def _wait_gone(p: Params, pid: int | None, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = pid is not None and read_pid(p) == pid
        if not alive and query_status(p, timeout=1) is None:
            return True
        time.sleep(0.2)
    return False


def stop(p: Params, env: Mapping[str, str]) -> OcfExit:
    from ..cli.ha import qmp_call

    budget = _timeout(env, 110)
    pid = read_pid(p)
    s = query_status(p)
    if s is not None:
        try:
            if s.get("role") == "primary":  # Pacemaker demotes first; never hand over here
                qmp_call(p.qmp, "ha-demote", timeout=budget / 2)
            qmp_call(p.qmp, "ha-down", timeout=budget / 2)
        except (OSError, ConnectionError, RuntimeError, ValueError) as e:
            say(f"orderly stop: {e}")
    if not _wait_gone(p, pid, budget / 2) and pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            say(f"sending {sig.name} to pid {pid}")
            os.kill(pid, sig)
            if _wait_gone(p, pid, 10):
                break
    if query_status(p, timeout=2) is not None:
        say("the node still answers after stop")
        return OcfExit.ERR_GENERIC
    try:
        os.unlink(p.pidfile)
    except FileNotFoundError:
        pass
    _crm_attribute("-D")
    return OcfExit.SUCCESS


def _verb(p: Params, env: Mapping[str, str], command: str) -> OcfExit:
    from ..cli.ha import qmp_call

    if query_status(p) is None:
        return OcfExit.NOT_RUNNING
    try:
        qmp_call(p.qmp, command, timeout=_timeout(env, 110))
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        say(f"{command}: {e}")
        return OcfExit.ERR_GENERIC
    s = query_status(p)
    if s is None:
        return OcfExit.ERR_GENERIC
    set_score(s)
    return OcfExit.SUCCESS


def promote(p: Params, env: Mapping[str, str]) -> OcfExit:
    s = query_status(p)
    if s is not None and s.get("role") == "primary":
        return OcfExit.SUCCESS
    return _verb(p, env, "ha-promote")


def demote(p: Params, env: Mapping[str, str]) -> OcfExit:
    s = query_status(p)
    if s is None:
        return OcfExit.NOT_RUNNING
    if s.get("role") != "primary":
        return OcfExit.SUCCESS
    return _verb(p, env, "ha-demote")


def notify(p: Params, env: Mapping[str, str]) -> OcfExit:
    kind = env.get("OCF_RESKEY_CRM_meta_notify_type", "")
    op = env.get("OCF_RESKEY_CRM_meta_notify_operation", "")
    say(f"{kind}-{op} (peer {p.peer})")
    return OcfExit.SUCCESS


def run(action: str, env: Mapping[str, str]) -> int:
    if action == "meta-data":
        print(metadata_xml(), end="")
        return OcfExit.SUCCESS
    if action not in ACTIONS:
        say(f"unknown action {action!r}")
        return OcfExit.UNIMPLEMENTED
    os.environ["__OCF_ACTION"] = action
    try:
        p = load_params(env)
        if action == "validate-all":
            validate(p)
            return OcfExit.SUCCESS
        if action == "reload":
            return OcfExit.SUCCESS  # every parameter is read at each action
        fn = {"start": start, "stop": stop, "monitor": monitor, "promote": promote,
              "demote": demote, "notify": notify}[action]  # fmt: skip
        return fn(p, env)
    except AgentError as e:
        say(e.message)
        # nothing runs from a resource file that is not there: not running, stopped
        if e.code is OcfExit.ERR_INSTALLED and action in ("monitor", "stop"):
            return OcfExit.NOT_RUNNING if action == "monitor" else OcfExit.SUCCESS
        return e.code
