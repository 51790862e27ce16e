"""The HA manager's typed config (from the real argv parsers), its enums against the
README status schema, and the shape of blockrep/ha/ (one concern per module, none long)."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest

from blockrep.cli.ha import primary_parser, secondary_parser
from blockrep.ha import metrics
from blockrep.ha.config import (
    BufferPages,
    Mode,
    PrimaryConfig,
    SecondaryConfig,
    qmp_socket_path,
)
from blockrep.ha.resync import SyncKind, SyncProgress
from blockrep.ha.role import PeerStatus
from tests.harness.ha import PEER_STATES

HA = pathlib.Path(__file__).resolve().parents[2] / "blockrep" / "ha"


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    ("parser", "cls"), [(primary_parser, PrimaryConfig), (secondary_parser, SecondaryConfig)]
)
def test_every_option_reaches_the_config(parser, cls) -> None:
    # an option added to the parser but not to the config would be silently dropped
    dests = {a.dest for a in parser()._actions if a.dest != "help"}
    dests -= {"log"}  # logging is set up by the CLI itself
    dests = (dests - {"shared"}) | {"mode"}
    if "no_activity_log" in dests:  # the flag is the negation of the field
        dests = (dests - {"no_activity_log"}) | {"activity_log"}
    # the export name and the volumes come from a resource file (`blockrep up`)
    assert dests | {"export_name", "volumes"} == _field_names(cls)


def test_primary_config_from_argv(tmp_path) -> None:
    disk = tmp_path / "p.raw"
    ns = primary_parser().parse_args(
        ["--disk", str(disk), "--export", "unix:/x", "--secondary", "h:1", "--shared"]
        + ["--checkpoint-interval", "0", "--reconnect"]
    )
    cfg = PrimaryConfig.from_args(ns)
    assert cfg.disk == str(disk) and os.path.isabs(cfg.disk)
    assert cfg.state_file == str(disk) + ".blockrep-state.json"
    assert cfg.mode is Mode.SHARED and cfg.shared
    assert cfg.checkpoint_interval == 0.0 and cfg.reconnect and not cfg.initial_sync
    assert cfg.heartbeat_timeout == 3.0 and cfg.connect_timeout == 30.0
    assert cfg.qmp is None and cfg.metrics is None and cfg.tls_dir is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.reconnect = False  # type: ignore[misc]


def test_secondary_config_relative_disk_and_explicit_state_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = secondary_parser().parse_args(
        ["--disk", "s.raw", "--export", "h:2", "--listen", "h:3", "--state-file", "st.json"]
        + ["--auto-failover", "--fence-command", "", "--qmp", "unix:/q"]
    )
    cfg = SecondaryConfig.from_args(ns)
    assert cfg.disk == str(tmp_path / "s.raw")
    assert cfg.state_file == "st.json"  # as given, like before
    assert cfg.mode is Mode.SEPARATE and not cfg.shared
    assert cfg.auto_failover and cfg.fence_command is None  # empty: no fence command
    assert cfg.buffer_dir is None and cfg.failover_timeout == 5.0
    assert cfg.keep_buffer_pages is BufferPages.AUTO
    ns = secondary_parser().parse_args(
        ["--disk", "s", "--export", "h:2", "--listen", "h:3", "--keep-buffer-pages", "off"]
    )
    assert SecondaryConfig.from_args(ns).keep_buffer_pages is BufferPages.OFF
    assert qmp_socket_path(cfg.qmp or "") == "/q" and qmp_socket_path("/r") == "/r"


def test_peer_status_values_are_the_documented_ones() -> None:
    assert {p.value for p in PeerStatus} == PEER_STATES


def test_status_fragments_are_plain_json_values() -> None:
    p = SyncProgress(SyncKind.INITIAL, total=3 << 20, current=1 << 20)
    d = p.as_dict()
    assert d == {"what": "initial sync", "current": 1 << 20, "total": 3 << 20}
    assert type(d["what"]) is str  # the enum does not leak into the JSON


def test_metrics_values_cover_every_gauge() -> None:
    s = {
        "epoch": 4,
        "epoch-age": 1.5,
        "hidden-bytes": 1,
        "active-bytes": 2,
        "unacked-bytes": 3,
        "checkpoints": 5,
        "last-checkpoint-pause-ms": 0.7,
        "peer": "connected",
        "errors": ["a", "b"],
        "role": "primary",
    }
    v = metrics.values(s)
    assert set(v) == {k for k, _ in metrics.GAUGES}
    assert v["peer_connected"] == 1 and v["errors"] == 2 and v["epoch_age_seconds"] == 1.5
    assert metrics.values({**s, "peer": "peer-lost"})["peer_connected"] == 0
    assert v["role_primary"] == 1 and v["resync_percent"] == 0 and v["last_handshake_bytes"] == 0
    r = {"done-bytes": 5, "total-bytes": 10, "percent": 50.0, "saved-by-checksums": 2}
    v = metrics.values({**s, "role": "none", "resync": r, "last-handshake": {"bytes": 7}})
    assert v["role_primary"] == 0 and v["resync_percent"] == 50.0 and v["resync_done_bytes"] == 5
    assert v["resync_total_bytes"] == 10 and v["resync_saved_bytes"] == 2
    assert v["last_handshake_bytes"] == 7


def test_no_ha_module_over_400_lines() -> None:
    long = [
        f"{p.name}: {n}"
        for p in sorted(HA.glob("*.py"))
        if (n := len(p.read_text().splitlines())) > 400
    ]
    assert long == []


def test_the_manager_is_split() -> None:
    assert not (HA / "manager.py").exists()
    for m in ("config", "role", "primary", "secondary", "pairing", "resync", "watchdog"):
        assert (HA / f"{m}.py").exists(), m
    assert (HA / "metrics.py").exists() and (HA / "qmp.py").exists()
