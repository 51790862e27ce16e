"""``blockrep demo --failover-point latest``: the default and latest side by side, and
what the consumer lost in each (issue 13, Deliver 4)."""

from __future__ import annotations

import re
import subprocess

from blockrep.testing import blockrep_argv


def test_demo_shows_what_each_failover_point_loses():
    r = subprocess.run(
        blockrep_argv("demo", "--failover-point", "latest", "--size-mib", "8"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lost = dict(re.findall(r"failover-point (\w+)\s+(\d+) bytes  PASS", r.stdout))
    assert set(lost) == {"checkpoint", "latest"}, r.stdout
    assert int(lost["latest"]) == 0  # every acknowledged write survived
    assert int(lost["checkpoint"]) > 0  # COLO rolled P's last writes back
    assert r.stdout.count("RESULT: PASS") == 2
