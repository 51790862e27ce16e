"""The agent's meta-data: XML valid against resource-agents' ra-api-1.dtd.

``blockrep ocf install`` writes it into the shell wrapper, so ``meta-data`` answers
without starting Python (it cannot fail, and any user may run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from .. import __version__

DEFAULT_LOG = "/var/log/blockrep/RESOURCE-NODE.log"
DEFAULT_PIDFILE = "$HA_RSCTMP/blockrep-RESOURCE-NODE.pid"
DEFAULT_FENCE_TIMEOUT = 50  # s; under blockrep's 60 s limit for an outdate command


@dataclass(frozen=True)
class Param:
    name: str
    short: str
    long: str
    default: str | None = None
    required: bool = False
    type: str = "string"


PARAMS = (
    Param("config", "resource file", "The blockrep resource file (TOML) naming both nodes: "
          "their control addresses, QMP sockets, disks and consumer exports. The same "
          "file on both nodes; its node names are the cluster's node names.",
          required=True),
    Param("node", "this node's name", "This node's name in the resource file "
          "(default: the host name, uname -n)."),
    Param("outdate", "crm | none", "crm: a primary that loses its peer places a location "
          "constraint that forbids promoting the peer until the pair is Protected again "
          "(blockrep ocf fence-peer, DRBD's crm-fence-peer); none: no hook.", "crm"),
    Param("on_outdate_failure", "freeze | continue", "What a primary does when the "
          "peer cannot be outdated: freeze acknowledgements (no acknowledged write lost) "
          "or continue alone (a failover may lose writes).", "freeze"),
    Param("fence_timeout", "seconds fence-peer waits", "Seconds fence-peer waits for an "
          "unreachable peer to be fenced by Pacemaker before it fails (blockrep retries).",
          str(DEFAULT_FENCE_TIMEOUT), type="integer"),
    Param("log", "the node's log file", "Where blockrep up writes its log (default "
          f"{DEFAULT_LOG}).", ""),
    Param("loglevel", "log level", "blockrep up's log level (DEBUG, INFO, WARNING).", "INFO"),
    Param("pidfile", "pid file", f"The blockrep up process's pid (default {DEFAULT_PIDFILE};"
          " HA_RSCTMP defaults to /run/resource-agents).", ""),
    Param("resync_rate", "resync cap", "blockrep up --resync-rate (bytes/s, 50M; 0: no cap).",
          "0"),
    Param("resync_min_rate", "resync floor", "blockrep up --resync-min-rate (bytes/s kept "
          "while the consumer writes).", "0"),
)  # fmt: skip

# (action, timeout s, interval s, role); two monitors with distinct intervals, one per role
ACTIONS = (
    ("start", 120, None, None),
    ("stop", 120, None, None),
    ("promote", 120, None, None),
    ("demote", 120, None, None),
    ("monitor", 30, 10, "Promoted"),
    ("monitor", 30, 20, "Unpromoted"),
    ("notify", 30, None, None),
    ("meta-data", 5, None, None),
    ("validate-all", 30, None, None),
)


def metadata_xml() -> str:
    out = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">',
        f'<resource-agent name="blockrep" version="{escape(__version__)}">',
        "<version>1.0</version>",
        '<longdesc lang="en">Runs one node of a blockrep resource (COLO-style block '
        "replication) as a promotable clone: Promoted is blockrep's primary (it serves the "
        "consumer exports), Unpromoted its secondary. Roles change in-process (no restart, "
        "exports stay up). Promotion scores follow DRBD's policy; an Outdated, "
        "Inconsistent, split-brain or unrelated disk gets none.</longdesc>",
        '<shortdesc lang="en">blockrep replicated block device</shortdesc>',
        "<parameters>",
    ]
    for p in PARAMS:
        default = "" if p.default is None else f" default={quoteattr(p.default)}"
        out += [
            f'<parameter name="{p.name}" unique="0" required="{int(p.required)}">',
            f'<longdesc lang="en">{escape(p.long)}</longdesc>',
            f'<shortdesc lang="en">{escape(p.short)}</shortdesc>',
            f'<content type="{p.type}"{default}/>',
            "</parameter>",
        ]
    out += ["</parameters>", "<actions>"]
    for name, timeout, interval, role in ACTIONS:
        extra = "" if interval is None else f' interval="{interval}s"'
        extra += "" if role is None else f' role="{role}"'
        out.append(f'<action name="{name}" timeout="{timeout}s"{extra}/>')
    out += ["</actions>", "</resource-agent>"]
    return "\n".join(out) + "\n"
