"""The lab's nodes: names, addresses, the fence and gate agents, corosync.conf."""

from __future__ import annotations

import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NODES = ("alpha", "beta")
PACKAGES = "pacemaker corosync pacemaker-cli-utils resource-agents"
FENCE_DIR = "/usr/sbin"  # where pacemaker-fenced looks for fence_* agents
OCF_ROOT = "/usr/lib/ocf"


class LabError(RuntimeError):
    """The lab cannot be built or did not reach a state in time."""


@dataclass
class LabNode:
    name: str
    nodeid: int
    addr: str
    netns: str
    veth: str
    dir: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def data(self) -> str:
        """The node's own files that the host reaches too: disks, sockets, the gate."""
        return os.path.join(self.dir, "data")

    @property
    def anchor(self) -> subprocess.Popen[bytes] | None:
        return self.procs.get("anchor")

    def alive(self) -> bool:
        """The node's mount namespace is up (a zombie anchor has no namespaces)."""
        a = self.anchor
        return a is not None and a.poll() is None and os.path.exists(f"/proc/{a.pid}/ns/mnt")


def _run(argv: Sequence[str], timeout: float = 30, check: bool = True) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """``pred()``'s first truthy value, polled until ``timeout`` (then LabError naming it)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_pids(inode: int) -> list[int]:
    """Every process whose network namespace is ``inode``."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and _netns_inode(int(p)) == inode:
            out.append(int(p))
    return out


# the fence agent: stdin key=value (Pacemaker) or -o ACTION -n NODE; off/reboot SIGKILLs the
# node's processes by network namespace and waits (bounded) until its anchor is gone
FENCE_AGENT = r"""#!/bin/bash
LAB=@LAB@
action=reboot; target=""
if [ ! -t 0 ]; then
  while IFS= read -r -t 2 line; do case "$line" in
    action=*|option=*) action=${line#*=} ;;
    port=*|plug=*) target=${line#*=} ;;
  esac; done
fi
while [ $# -gt 0 ]; do case "$1" in
  -o) action=$2; shift ;; --action=*) action=${1#*=} ;;
  -n) target=$2; shift ;; --plug=*|--port=*) target=${1#*=} ;;
esac; shift; done
echo "$(date +%T.%N) $(uname -n) action=$action target=$target" >> $LAB/fence.log
case "$action" in
  metadata) cat <<'X'
<?xml version="1.0" ?>
<resource-agent name="fence_lab" shortdesc="lab power switch: kill a namespace node">
<longdesc>SIGKILLs every process of a lab node (its network namespace).</longdesc>
<parameters>
 <parameter name="action" unique="0" required="1"><getopt mixed="-o, --action=[action]" />
  <content type="string" default="reboot" /><shortdesc lang="en">Fencing action</shortdesc></parameter>
 <parameter name="port" unique="0" required="0"><getopt mixed="-n, --plug=[id]" />
  <content type="string" /><shortdesc lang="en">the node</shortdesc></parameter>
</parameters>
<actions><action name="on" /><action name="off" /><action name="reboot" />
<action name="status" /><action name="list" /><action name="monitor" />
<action name="metadata" /></actions>
</resource-agent>
X
    exit 0 ;;
  monitor|status|on) exit 0 ;;
  list) ls $LAB/nodes; exit 0 ;;
  off|reboot)
    f=$LAB/nodes/$target
    [ -f $f/netns-inode ] || exit 1
    ino=$(cat $f/netns-inode); anchor=$(cat $f/anchor.pid 2>/dev/null)
    for i in $(seq 200); do
      left=0
      for p in /proc/[0-9]*; do p=${p#/proc/}
        if [ "$(stat -L -c %i /proc/$p/ns/net 2>/dev/null)" = "$ino" ]; then
          kill -9 $p 2>/dev/null; left=1
        fi
      done
      if [ $left = 0 ] && { [ -z "$anchor" ] || [ ! -e /proc/$anchor/ns/mnt ]; }; then
        rm -f $f/data/gate   # the consumer gate is forgotten with the power
        echo "$(date +%T.%N) $(uname -n) done target=$target rc=0" >> $LAB/fence.log; exit 0
      fi
      sleep 0.1
    done
    echo "$(date +%T.%N) $(uname -n) done target=$target rc=1" >> $LAB/fence.log; exit 1 ;;
  *) exit 1 ;;
esac
"""

# the consumer gate (module docstring); the node's data dir is DIR/NODE/data
GATE_AGENT = r"""#!/bin/sh
d=${OCF_RESKEY_dir}/$(uname -n)/data
case "$1" in
  start) touch $d/gate; exit 0 ;;
  stop) rm -f $d/gate; flock -w 30 $d/gate.lock true || exit 1; exit 0 ;;
  monitor) [ -e $d/gate ] && exit 0; exit 7 ;;
  validate-all) exit 0 ;;
  meta-data) cat <<'X'
<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="gate" version="1.0">
<version>1.0</version>
<longdesc lang="en">Lab consumer gate: the test consumer writes to this node while it runs.</longdesc>
<shortdesc lang="en">consumer gate</shortdesc>
<parameters>
<parameter name="dir" required="1"><longdesc lang="en">the lab's nodes dir</longdesc>
<shortdesc lang="en">dir</shortdesc><content type="string"/></parameter>
</parameters>
<actions>
<action name="start" timeout="20s"/><action name="stop" timeout="40s"/>
<action name="monitor" timeout="20s" interval="10s"/><action name="meta-data" timeout="5s"/>
<action name="validate-all" timeout="5s"/>
</actions>
</resource-agent>
X
    exit 0 ;;
  *) exit 3 ;;
esac
"""


def corosync_conf(nodes: Sequence[LabNode], token_ms: int | None) -> str:
    token = f"  token: {token_ms}\n" if token_ms is not None else ""
    nodelist = "".join(
        f"  node {{\n    name: {n.name}\n    nodeid: {n.nodeid}\n    ring0_addr: {n.addr}\n  }}\n"
        for n in nodes
    )
    return (
        "totem {\n  version: 2\n  cluster_name: lab\n  transport: knet\n"
        f"  crypto_cipher: none\n  crypto_hash: none\n{token}}}\n"
        "logging {\n  to_stderr: yes\n  to_logfile: yes\n"
        "  logfile: /var/log/corosync/corosync.log\n  to_syslog: no\n  timestamp: on\n}\n"
        # two_node implies wait_for_all: both must be seen once before quorum
        "quorum {\n  provider: corosync_votequorum\n  two_node: 1\n}\n"
        f"nodelist {{\n{nodelist}}}\n"
    )


def nvpairs(parent: ET.Element, tag: str, pid: str, values: dict[str, str]) -> ET.Element:
    """``<tag id=pid><nvpair …/>…</tag>`` under parent (instance/meta attributes)."""
    el = ET.SubElement(parent, tag, id=pid)
    for k, v in values.items():
        ET.SubElement(el, "nvpair", id=f"{pid}-{k}", name=k, value=v)
    return el
