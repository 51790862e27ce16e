"""The collector of long-running commands (issue 15): tuned by ``eventloop.run`` unless
``BLOCKREP_GC=python``; startup objects frozen out of collections."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blockrep.eventloop import GC_THRESHOLD

PROBE = """
import gc, json
from blockrep import eventloop
async def main():
    return {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
print(json.dumps(eventloop.run(main())))
"""


@pytest.mark.parametrize("setting", ["", "python"])
def test_run_tunes_the_collector_unless_told_not_to(setting: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BLOCKREP_GC"}
    if setting:
        env["BLOCKREP_GC"] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    if setting == "python":
        assert got == {"threshold": 700, "frozen": 0}
    else:
        assert got["threshold"] == GC_THRESHOLD and got["frozen"] > 1000, got
