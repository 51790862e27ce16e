"""The Lab: two namespaced nodes running corosync and pacemaker, started, powered off,
fenced, partitioned and torn down from the host."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from .nodes import (
    FENCE_AGENT,
    FENCE_DIR,
    GATE_AGENT,
    NODES,
    OCF_ROOT,
    PACKAGES,
    LabError,
    LabNode,
    _run,
    corosync_conf,
    netns_pids,
    nvpairs,
    wait_until,
)


class Lab:
    """Two cluster nodes (``alpha``, ``beta``) in namespaces; see the module docstring.

    ``token_ms`` is corosync's totem token (None: corosync's default, 3000 ms).
    ``resources``/``constraints`` are XML fragments seeded into the CIB next to the
    fence devices, so the cluster starts them as soon as it has both nodes.
    """

    def __init__(
        self,
        token_ms: int | None = 1000,
        priority_fencing_delay: str = "2s",
        root: str = "/tmp",
        keep: bool | None = None,
    ) -> None:
        self.tag = secrets.token_hex(2)
        self.dir = tempfile.mkdtemp(prefix=f"pcmk-{self.tag}-", dir=root)
        self.token_ms = token_ms
        self.priority_fencing_delay = priority_fencing_delay
        self.keep = bool(os.environ.get("BLOCKREP_LAB_KEEP")) if keep is None else keep
        self.fence_type = f"fence_brlab{self.tag}"
        self.gate_provider = f"brlab{self.tag}"
        self.nodes = {
            name: LabNode(
                name,
                i + 1,
                f"169.254.77.{i + 1}",
                f"brlab{self.tag}{name[0]}",
                f"vbr{self.tag}{name[0]}",
                os.path.join(self.dir, "nodes", name),
            )
            for i, name in enumerate(NODES)
        }
        for n in self.nodes.values():
            os.makedirs(n.data)  # the caller's files (disks) may go there before setup
        self._installed: list[str] = []
        self._netns: list[str] = []

    # -- building ---------------------------------------------------------------------------

    def setup(self, resources: str = "", constraints: str = "") -> None:
        """Namespaces, veth, per-node dirs, corosync.conf, agents and the seeded CIB."""
        if os.geteuid() != 0:
            raise LabError("the Pacemaker lab needs root (network and mount namespaces)")
        for tool in ("corosync", "pacemakerd", "crm_mon", "cibadmin", "ip", "nsenter"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} missing: apt-get install -y {PACKAGES}")
        a, b = self.nodes.values()
        for n in (a, b):
            _run(["ip", "netns", "add", n.netns])
            self._netns.append(n.netns)
        _run(["ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth])
        for n in (a, b):
            _run(["ip", "link", "set", n.veth, "netns", n.netns])
            _run(["ip", "-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", n.veth])
            _run(["ip", "-n", n.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", n.netns, "link", "set", n.veth, "up"])
            self._make_node_dirs(n)
            with open(os.path.join(n.dir, "netns-inode"), "w") as f:
                f.write(f"{os.stat(f'/run/netns/{n.netns}').st_ino}\n")
        self._install(
            os.path.join(FENCE_DIR, self.fence_type), FENCE_AGENT.replace("@LAB@", self.dir)
        )
        self._install(os.path.join(OCF_ROOT, "resource.d", self.gate_provider, "gate"), GATE_AGENT)
        cib = self.seed_cib(resources, constraints)
        for n in (a, b):
            path = os.path.join(n.dir, "lib-pacemaker", "cib", "cib.xml")
            with open(path, "w") as f:
                f.write(cib)
            shutil.chown(path, "hacluster", "haclient")
            os.chmod(path, 0o600)

    def _make_node_dirs(self, n: LabNode) -> None:
        for sub in ("etc-corosync", "lib-corosync", "log-corosync", "data"):
            os.makedirs(os.path.join(n.dir, sub), exist_ok=True)
        for sub in ("cib", "pengine", "blackbox", "cores"):
            os.makedirs(os.path.join(n.dir, "lib-pacemaker", sub), exist_ok=True)
        os.makedirs(os.path.join(n.dir, "log-pacemaker", "bundles"), exist_ok=True)
        for top in ("lib-pacemaker", "log-pacemaker"):
            for root, dirs, _files in os.walk(os.path.join(n.dir, top)):
                shutil.chown(root, "hacluster", "haclient")
                for d in dirs:
                    shutil.chown(os.path.join(root, d), "hacluster", "haclient")
        for sub in ("cib", "pengine"):
            os.chmod(os.path.join(n.dir, "lib-pacemaker", sub), 0o750)
        with open(os.path.join(n.dir, "etc-corosync", "corosync.conf"), "w") as f:
            f.write(corosync_conf(list(self.nodes.values()), self.token_ms))

    def _install(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        self._installed.append(path)

    def seed_cib(self, resources: str, constraints: str) -> str:
        """The first CIB of both nodes: fast DC election, STONITH on, a fence device per
        node (never run on the node it fences), and the caller's resources."""
        cib = ET.fromstring(_run(["cibadmin", "--empty"]))
        conf = cib.find("configuration")
        assert conf is not None
        crm = conf.find("crm_config")
        assert crm is not None
        nvpairs(
            crm,
            "cluster_property_set",
            "lab-options",
            {
                "dc-deadtime": "2s",
                "stonith-enabled": "true",
                "stonith-timeout": "30s",
                # a partition: the node with the promoted instance fences first
                "priority-fencing-delay": self.priority_fencing_delay,
                "cluster-recheck-interval": "1min",
                "no-quorum-policy": "stop",
            },
        )
        res = conf.find("resources")
        cons = conf.find("constraints")
        assert res is not None and cons is not None
        for n in self.nodes.values():
            fid = f"fence-{n.name}"
            prim = ET.SubElement(res, "primitive", id=fid, type=self.fence_type)
            prim.set("class", "stonith")
            nvpairs(prim, "instance_attributes", f"{fid}-ia", {"pcmk_host_list": n.name})
            ops = ET.SubElement(prim, "operations")
            ET.SubElement(ops, "op", id=f"{fid}-mon", name="monitor", interval="60s")
            ET.SubElement(
                cons, "rsc_location", id=f"{fid}-not-self", rsc=fid, node=n.name, score="-INFINITY"
            )
        for frag, parent in ((resources, res), (constraints, cons)):
            if frag.strip():
                for el in ET.fromstring(f"<x>{frag}</x>"):
                    parent.append(el)
        return ET.tostring(cib, encoding="unicode")

    def gate_xml(self, clone: str, gate_id: str = "consumer") -> tuple[str, str]:
        """The consumer gate primitive and its constraints: with the clone's Promoted
        instance, started after the promote (so stopped before a demote)."""
        prim = (
            f'<primitive id="{gate_id}" class="ocf" provider="{self.gate_provider}" type="gate">'
            f'<instance_attributes id="{gate_id}-ia"><nvpair id="{gate_id}-dir" name="dir" '
            f'value="{self.dir}/nodes"/></instance_attributes><operations>'
            f'<op id="{gate_id}-mon" name="monitor" interval="10s" timeout="20s"/>'
            f'<op id="{gate_id}-stop" name="stop" interval="0" timeout="40s"/>'
            "</operations></primitive>"
        )
        cons = (
            f'<rsc_colocation id="{gate_id}-with-promoted" rsc="{gate_id}" with-rsc="{clone}" '
            'with-rsc-role="Promoted" score="INFINITY"/>'
            f'<rsc_order id="{gate_id}-after-promote" first="{clone}" first-action="promote" '
            f'then="{gate_id}" then-action="start" kind="Mandatory"/>'
        )
        return prim, cons

    # -- running nodes ------------------------------------------------------------------------

    def _spawn(self, n: LabNode, key: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(n.dir, log), "ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        n.procs[key] = p
        return p

    def _enter(self, n: LabNode) -> list[str]:
        a = n.anchor
        if a is None or not n.alive():
            raise LabError(f"node {n.name} is not running")
        return ["nsenter", "-t", str(a.pid), "-m", "-u", "-n", "--"]

    def start(self, name: str, timeout: float = 30) -> None:
        """Boot the node: a fresh anchor (new /run, /dev/shm), then corosync and pacemakerd."""
        n = self.nodes[name]
        if n.alive():
            raise LabError(f"node {name} is already running")
        self._reap(n)
        init = (
            f"set -e; hostname {name}; "
            + "".join(
                f"mount --bind {n.dir}/{src} {dst}; "
                for src, dst in (
                    ("etc-corosync", "/etc/corosync"),
                    ("lib-corosync", "/var/lib/corosync"),
                    ("lib-pacemaker", "/var/lib/pacemaker"),
                    ("log-pacemaker", "/var/log/pacemaker"),
                    ("log-corosync", "/var/log/corosync"),
                )
            )
            + "mount -t tmpfs -o mode=755 tmpfs /run; mount -t tmpfs -o mode=1777 tmpfs /dev/shm; "
            "touch /run/lab-ready; exec sleep infinity"
        )
        # a fence of this node still running would kill the new boot too (a power switch
        # holds the plug until it is done)
        wait_until(lambda: not self.fencing(name), 30, f"the fencing of {name} to end")
        self._forget(n)
        argv = ["ip", "netns", "exec", n.netns, "unshare", "--uts", "--mount"]
        anchor = self._spawn(
            n, "anchor", [*argv, "--propagation", "private", "sh", "-c", init], "anchor.log"
        )
        with open(os.path.join(n.dir, "anchor.pid"), "w") as f:
            f.write(f"{anchor.pid}\n")
        # ip netns exec and unshare exec in place: the anchor's pid is the Popen's
        wait_until(
            lambda: (
                anchor.poll() is None and os.path.exists(f"/proc/{anchor.pid}/root/run/lab-ready")
            ),
            10,
            f"{name}'s namespaces",
        )
        if anchor.poll() is not None:
            raise LabError(f"{name}'s anchor exited: {self.read(name, 'anchor.log')}")
        enter = self._enter(n)
        self._spawn(n, "corosync", [*enter, "corosync", "-f"], "corosync.stdout")
        wait_until(
            lambda: self.x(name, "corosync-cfgtool", "-s", check=False).returncode == 0,
            timeout,
            f"corosync on {name}",
        )
        self._spawn(n, "pacemakerd", [*enter, "pacemakerd", "-f"], "pacemakerd.stdout")

    def x(
        self,
        name: str,
        *cmd: str,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the node (its mount, UTS and network namespaces)."""
        n = self.nodes[name]
        r = subprocess.run(
            [*self._enter(n), *cmd], capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and r.returncode != 0:
            raise LabError(f"{name}: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def stop(self, name: str, timeout: float = 60) -> None:
        """Clean shutdown: pacemakerd stops its resources, then corosync, then the anchor."""
        n = self.nodes[name]
        for key in ("pacemakerd", "corosync", "anchor"):
            p = n.procs.get(key)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise LabError(f"{key} on {name} did not stop in {timeout} s") from None
        self.poweroff(name)  # anything left in the namespace

    def poweroff(self, name: str, timeout: float = 20) -> None:
        """Pull the plug: SIGKILL every process in the node's network namespace."""
        n = self.nodes[name]
        with open(os.path.join(n.dir, "netns-inode")) as f:
            ino = int(f.read())

        def gone() -> bool:
            for pid in netns_pids(ino):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            self._reap(n)
            return not netns_pids(ino) and not n.alive()

        wait_until(gone, timeout, f"{name}'s processes to die")
        self._forget(n)

    def _forget(self, n: LabNode) -> None:
        """What a reboot forgets that lives in the host-visible dir: the consumer gate."""
        try:
            os.unlink(os.path.join(n.data, "gate"))
        except FileNotFoundError:
            pass

    def _reap(self, n: LabNode) -> None:
        for p in n.procs.values():
            p.poll()

    # -- what the cluster says and is told ------------------------------------------------------

    def live(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.alive()]

    def any_live(self, prefer: str | None = None) -> str:
        names = self.live()
        if not names:
            raise LabError("no node is running")
        return prefer if prefer in names else names[0]

    def mon(self, via: str | None = None) -> ET.Element | None:
        """``crm_mon --output-as=xml`` on a running node; None when it cannot answer yet."""
        try:
            r = self.x(self.any_live(via), "crm_mon", "-1", "--output-as=xml", check=False)
        except (LabError, subprocess.TimeoutExpired):
            return None
        if r.returncode != 0:
            return None
        try:
            return ET.fromstring(r.stdout)
        except ET.ParseError:
            return None

    def online(self, via: str | None = None) -> set[str]:
        m = self.mon(via)
        if m is None:
            return set()
        return {
            e.get("name", "")
            for e in m.iter("node")
            if e.get("online") == "true" and e.get("id") is not None
        }

    def wait_online(self, names: Sequence[str] = NODES, timeout: float = 60) -> None:
        via = names[0]
        wait_until(lambda: set(names) <= self.online(via), timeout, f"{', '.join(names)} online")

    def roles(self, rsc: str, via: str | None = None) -> dict[str, str]:
        """node → role of the clone ``rsc``'s instances (active, not failed ones)."""
        m = self.mon(via)
        out: dict[str, str] = {}
        if m is None:
            return out
        for clone in m.iter("clone"):
            if clone.get("id") != rsc:
                continue
            for r in clone.iter("resource"):
                nodes = [e.get("name", "") for e in r.iter("node")]
                if r.get("active") == "true" and r.get("failed") != "true" and nodes:
                    out[nodes[0]] = r.get("role", "")
        return out

    def running_on(self, rsc: str, via: str | None = None) -> list[str]:
        m = self.mon(via)
        if m is None:
            return []
        return [
            e.get("name", "")
            for r in m.iter("resource")
            if r.get("id") == rsc and r.get("active") == "true"
            for e in r.iter("node")
        ]

    def promoted(self, rsc: str, via: str | None = None) -> list[str]:
        return sorted(n for n, role in self.roles(rsc, via).items() if role == "Promoted")

    def standby(self, name: str, on: bool = True) -> None:
        """Node standby (``crm node standby`` needs name resolution; this does not)."""
        via = self.any_live(name)
        self.x(via, "crm_attribute", "-N", name, "-n", "standby", "-v", "on" if on else "off")

    def partition(self) -> None:
        """Cut the link between the nodes (both ends down); fencing still works (power)."""
        for n in self.nodes.values():
            _run(["ip", "-n", n.netns, "link", "set", n.veth, "down"])

    def heal(self) -> None:
        for n in self.nodes.values():
            _run(["ip", "-n", n.netns, "link", "set", n.veth, "up"])

    def cleanup(self, rsc: str) -> None:
        self.x(self.any_live(), "crm_resource", "--cleanup", "-r", rsc, check=False)

    def set_meta(self, rsc: str, name: str, value: str) -> None:
        self.x(self.any_live(), "crm_resource", "-r", rsc, "--meta", "-p", name, "-v", value)

    def fencings(self, name: str) -> int:
        """How many times the fence agent has powered ``name`` off (completed)."""
        return self.fence_log().count(f" done target={name} rc=0")

    def fencing(self, name: str) -> bool:
        """A fence action on ``name`` has started and not finished."""
        log = self.fence_log()
        started = log.count(f"action=reboot target={name}\n") + log.count(
            f"action=off target={name}\n"
        )
        return started > log.count(f" done target={name} ")

    def fence_log(self) -> str:
        return self.read(None, "fence.log")

    def read(self, name: str | None, rel: str) -> str:
        path = os.path.join(self.nodes[name].dir if name else self.dir, rel)
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logs(self, tail: int = 60) -> str:
        """The last lines of every node log (for assertion messages)."""
        out = []
        for n in self.nodes.values():
            for rel in ("log-pacemaker/pacemaker.log", "corosync.stdout", "pacemakerd.stdout"):
                lines = self.read(n.name, rel).splitlines()[-tail:]
                if lines:
                    out.append(f"--- {n.name}/{rel}\n" + "\n".join(lines))
        return "\n".join(out) + "\n--- fence.log\n" + self.fence_log()

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Always safe: kills by namespace and pid, deletes namespaces and agents."""
        errors = []
        for n in self.nodes.values():
            if os.path.exists(os.path.join(n.dir, "netns-inode")):
                try:
                    self.poweroff(n.name)
                except LabError as e:
                    errors.append(str(e))
            for p in n.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
        for ns in self._netns:
            _run(["ip", "netns", "del", ns], check=False)
        for path in self._installed:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            parent = os.path.dirname(path)
            if parent.startswith(os.path.join(OCF_ROOT, "resource.d", "brlab")):
                shutil.rmtree(parent, ignore_errors=True)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise LabError("; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


# -- blockrep under the lab: ocf:blockrep:blockrep as a promotable clone --------------------
