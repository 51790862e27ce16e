"""contrib/systemd/blockrep@.service: the unit template that runs a pair without a
cluster manager (README "Running a pair without a cluster manager").

`systemd-analyze verify` checks it as systemd would load it (systemd need not be
running). It needs the ExecStart binary to exist, so the unit is checked in a
temporary copy whose ExecStart points at this interpreter's `blockrep`; everything
else is the shipped text. A clean verify exits 0 *and* prints nothing: systemd only
warns (exit 0) about an unknown key or a value it cannot parse. Broken copies prove
the check is real: an unknown key and an unparsable value make it print, a missing
binary makes it exit non-zero.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.harness.ha import REPO

pytestmark = pytest.mark.timeout(120)

UNIT = os.path.join(REPO, "contrib", "systemd", "blockrep@.service")
SHIPPED_EXEC = "/usr/local/bin/blockrep"


def _blockrep_binary() -> str:
    b = os.path.join(os.path.dirname(sys.executable), "blockrep")
    if not os.access(b, os.X_OK):
        b = shutil.which("blockrep") or ""
    assert b and os.access(b, os.X_OK), "no blockrep console script next to the interpreter"
    return os.path.abspath(b)


def _unit_text() -> str:
    with open(UNIT) as f:
        return f.read()


def _verify(tmp_path, text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on ``text`` as blockrep@.service in a fresh directory."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed; `make test` installs it (package systemd)")
    d = tmp_path / f"unit{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    path = d / "blockrep@.service"
    path.write_text(text)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"}
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(d),
    )


def _runnable(text: str) -> str:
    assert text.count(SHIPPED_EXEC) == 1, text
    return text.replace(SHIPPED_EXEC, _blockrep_binary())


def _clean(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode == 0 and not (r.stdout.strip() or r.stderr.strip())


def test_unit_says_what_the_readme_says():
    text = _unit_text()
    lines = {ln.strip() for ln in text.splitlines()}
    assert f"ExecStart={SHIPPED_EXEC} up /etc/blockrep/%i.toml" in lines
    for want in (
        "Type=simple",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "After=network-online.target",
        "Wants=network-online.target",
    ):
        assert want in lines, want
    stop = [ln for ln in lines if ln.startswith("TimeoutStopSec=")]
    assert len(stop) == 1 and 10 <= int(stop[0].split("=", 1)[1]) <= 300, stop
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "Running a pair without a cluster manager" in readme
    assert "contrib/systemd/blockrep@.service" in readme


def test_systemd_analyze_verify_is_clean(tmp_path):
    r = _verify(tmp_path, _runnable(_unit_text()))
    assert _clean(r), (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize(
    "old, new, why",
    [
        ("Restart=on-failure", "Restart=on-failure\nRestartEvery=5", "Unknown key"),
        ("KillSignal=SIGTERM", "KillSignal=SIGNOPE", "signal"),
        ("Type=simple", "Type=simplest", "type"),
    ],
)
def test_a_broken_copy_is_caught(tmp_path, old, new, why):
    text = _runnable(_unit_text())
    assert old in text
    r = _verify(tmp_path, text.replace(old, new, 1))
    assert not _clean(r), (old, new, r)
    assert why.lower() in (r.stdout + r.stderr).lower(), (why, r.stdout, r.stderr)


def test_a_missing_binary_fails_verify(tmp_path):
    text = _unit_text().replace(SHIPPED_EXEC, str(tmp_path / "no-such-blockrep"))
    r = _verify(tmp_path, text)
    assert r.returncode != 0, r
    assert "no-such-blockrep" in r.stdout + r.stderr, r
