"""The resource file (blockrep/ha/resource.py): what it accepts, to the field, and every
refusal, to the word. A typo in a resource file must be refused by name, never fall back
to a default, so the messages are asserted exactly.
"""

from __future__ import annotations

import pathlib

import pytest

from blockrep.address import SocketAddress
from blockrep.cli.ha import primary_parser
from blockrep.errors import OptionError
from blockrep.ha.config import BufferPages
from blockrep.ha.resource import (
    ExportSpec,
    FailoverPoint,
    Mode,
    NodeConfig,
    Resource,
    Security,
    Volume,
    load_resource,
    parse_resource,
)

# every key there is, two nodes, two volumes, each address spelling
FULL = """\
[resource]
name = "r0"
mode = "shared"
checkpoint-interval = 0.5
region-size = 65536
failover-point = "latest"

[security]
psk-file = "/etc/blockrep/r0.psk"
tls-dir = "/etc/blockrep/tls"

[nodes.alpha]
address = "10.0.0.1:7789"
qmp = "unix:/run/blockrep/alpha.qmp"
buffer-dir = "/dev/shm/r0"
keep-buffer-pages = "off"
disks = ["/srv/root.raw", "/srv/data.raw"]
exports = ["127.0.0.1:10809", "nbd+unix:///data?socket=/run/blockrep/data.sock"]

[nodes.beta]
address = "[fe80::2]:7789"
qmp = "/run/blockrep/beta.qmp"
disks = ["/srv/b-root.raw", "/srv/b-data.raw"]
exports = ["unix:/run/blockrep/root.sock", "nbd://127.0.0.1:10810/data"]
"""

# only what is required
MINIMAL = """\
[resource]
name = "r0"
mode = "separate"

[nodes.alpha]
address = "unix:/run/a.ctl"
qmp = "/run/a.qmp"
disks = ["/srv/a.raw"]
exports = ["unix:/run/a.nbd"]

[nodes.beta]
address = "unix:/run/b.ctl"
qmp = "/run/b.qmp"
disks = ["/srv/b.raw"]
exports = ["unix:/run/b.nbd"]
"""


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the base file"
    return text.replace(old, new)


def refusal(text: str) -> str:
    with pytest.raises(OptionError) as info:
        parse_resource(text, "r0.toml")
    return info.value.message


# -- what a valid file becomes -----------------------------------------------------------------


def test_full_file_round_trips_to_the_dataclasses() -> None:
    unix = SocketAddress.unix
    inet = SocketAddress.inet
    expected = Resource(
        name="r0",
        mode=Mode.SHARED,
        checkpoint_interval=0.5,
        region_size=65536,
        failover_point=FailoverPoint.LATEST,
        security=Security(psk_file="/etc/blockrep/r0.psk", tls_dir="/etc/blockrep/tls"),
        nodes=(
            NodeConfig(
                name="alpha",
                address=inet("10.0.0.1", 7789),
                qmp="/run/blockrep/alpha.qmp",
                buffer_dir="/dev/shm/r0",
                volumes=(
                    Volume(0, "/srv/root.raw", ExportSpec(inet("127.0.0.1", 10809), "disk")),
                    Volume(1, "/srv/data.raw", ExportSpec(unix("/run/blockrep/data.sock"), "data")),
                ),
                keep_buffer_pages=BufferPages.OFF,
            ),
            NodeConfig(
                name="beta",
                address=inet("fe80::2", 7789),
                qmp="/run/blockrep/beta.qmp",
                buffer_dir=None,
                volumes=(
                    Volume(0, "/srv/b-root.raw", ExportSpec(unix("/run/blockrep/root.sock"))),
                    Volume(1, "/srv/b-data.raw", ExportSpec(inet("127.0.0.1", 10810), "data")),
                ),
            ),
        ),
    )
    r = parse_resource(FULL, "r0.toml")
    assert r == expected
    assert r.source == "r0.toml"
    assert r.volume_count == 2
    assert r.node_names == ("alpha", "beta")
    assert r.nodes[0].disks == ("/srv/root.raw", "/srv/data.raw")
    assert r.nodes[1].exports[1].describe() == "127.0.0.1:10810 (export 'data')"
    # the enums carry the names users write and see
    assert (str(r.mode), str(r.failover_point)) == ("shared", "latest")


def test_load_resource_reads_the_file_and_names_it(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r0.toml"
    path.write_text(FULL)
    r = load_resource(str(path))
    assert r == parse_resource(FULL, "x")
    assert r.source == str(path)


def test_defaults() -> None:
    r = parse_resource(MINIMAL, "r0.toml")
    assert r.checkpoint_interval == 2.0
    assert r.region_size == 1 << 20
    assert r.failover_point is FailoverPoint.CHECKPOINT
    assert r.security == Security(None, None)
    assert r.mode is Mode.SEPARATE
    assert [n.buffer_dir for n in r.nodes] == [None, None]
    assert [n.keep_buffer_pages for n in r.nodes] == [BufferPages.AUTO, BufferPages.AUTO]
    # a bare address exports the volume as 'disk', as `blockrep primary --export` does
    assert r.nodes[0].volumes == (
        Volume(0, "/srv/a.raw", ExportSpec(SocketAddress.unix("/run/a.nbd"), "disk")),
    )


def test_default_interval_is_blockrep_primarys() -> None:
    """One default for the same knob, whichever way a pair is started."""
    primary = primary_parser().parse_args(["--disk", "d", "--export", "e", "--secondary", "s"])
    assert parse_resource(MINIMAL, "r0.toml").checkpoint_interval == primary.checkpoint_interval


def test_integers_and_other_spellings_accepted() -> None:
    text = edit(MINIMAL, 'mode = "separate"', 'mode = "separate"\ncheckpoint-interval = 3')
    text = edit(text, '"unix:/run/a.ctl"', '"tcp:node-a.example:7000"')
    text = edit(text, 'qmp = "/run/a.qmp"', 'qmp = "unix:/run/a.qmp"')
    r = parse_resource(text, "r0.toml")
    assert r.checkpoint_interval == 3.0 and isinstance(r.checkpoint_interval, float)
    assert r.nodes[0].address == SocketAddress.inet("node-a.example", 7000)
    assert r.nodes[0].qmp == "/run/a.qmp"


@pytest.mark.parametrize("size", [4096, 1 << 20, 1 << 26])
def test_region_size_powers_of_two(size: int) -> None:
    text = edit(MINIMAL, 'mode = "separate"', f'mode = "separate"\nregion-size = {size}')
    assert parse_resource(text, "r0.toml").region_size == size


def test_node_and_peer_of() -> None:
    r = parse_resource(FULL, "r0.toml")
    assert r.node("alpha") is r.nodes[0]
    assert r.node("beta") is r.nodes[1]
    assert r.peer_of("alpha") is r.nodes[1]
    assert r.peer_of("beta") is r.nodes[0]
    for call in (r.node, r.peer_of):
        with pytest.raises(OptionError) as info:
            call("gamma")
        assert info.value.message == (
            "resource file r0.toml: no node 'gamma' in resource r0 (nodes: alpha, beta)"
        )


# -- which node this is ------------------------------------------------------------------------


def test_local_node_from_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    r = parse_resource(FULL, "r0.toml")
    monkeypatch.setattr("socket.gethostname", lambda: "beta")
    assert r.local_node_name() == "beta"
    # a host that reports its FQDN is still the node named by its first label
    assert r.local_node_name(hostname="alpha.example.com") == "alpha"
    assert r.local_node_name(hostname="beta") == "beta"


def test_local_node_prefers_the_full_host_name() -> None:
    text = edit(MINIMAL, "[nodes.alpha]", '[nodes."db.example"]')
    text = edit(text, "[nodes.beta]", "[nodes.db]")
    r = parse_resource(text, "r0.toml")
    assert r.local_node_name(hostname="db.example") == "db.example"
    assert r.local_node_name(hostname="db.other") == "db"


def test_node_option_overrides_the_host_name() -> None:
    r = parse_resource(FULL, "r0.toml")
    assert r.local_node_name("alpha", hostname="beta") == "alpha"
    with pytest.raises(OptionError) as info:
        r.local_node_name("gamma", hostname="alpha")
    assert info.value.message == (
        "resource file r0.toml: no node 'gamma' in resource r0 (nodes: alpha, beta)"
    )


def test_host_not_in_the_file_is_refused_naming_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    r = parse_resource(FULL, "r0.toml")
    monkeypatch.setattr("socket.gethostname", lambda: "gamma.example.com")
    with pytest.raises(OptionError) as info:
        r.local_node_name()
    assert info.value.message == (
        "resource file r0.toml: this host 'gamma.example.com' is not a node of resource r0"
        " (nodes: alpha, beta); name one with --node"
    )


# -- refusals, each by name --------------------------------------------------------------------

P = "resource file r0.toml: "
RES_KNOWN = "(known: name, mode, checkpoint-interval, region-size, failover-point)"
NODE_KNOWN = (
    "(known: address, qmp, buffer-dir, keep-buffer-pages, disks, exports, link-port,"
    " export-tls-dir)"
)

REFUSALS: list[tuple[str, str, str, str]] = [
    # (id, old, new, message) applied to FULL
    (
        "unknown-resource-key",
        "checkpoint-interval = 0.5",
        "checkpoint_interval = 0.5",
        f"unknown key 'checkpoint_interval' in [resource] {RES_KNOWN}",
    ),
    (
        "unknown-node-key",
        'buffer-dir = "/dev/shm/r0"',
        'buffer_dir = "/dev/shm/r0"',
        f"unknown key 'buffer_dir' in [nodes.alpha] {NODE_KNOWN}",
    ),
    (
        "unknown-security-key",
        'tls-dir = "/etc/blockrep/tls"',
        'tls-creds = "x"',
        "unknown key 'tls-creds' in [security] (known: psk-file, tls-dir, insecure)",
    ),
    (
        "unknown-top-key",
        "[security]",
        "[handlers]\nx = 1\n[security]",
        "unknown key 'handlers' at the top level (known: resource, security, nodes)",
    ),
    (
        "resource-key-at-top-level",
        "[resource]\n",
        "region-size = 4096\n[resource]\n",
        "unknown key 'region-size' at the top level (known: resource, security, nodes);"
        " 'region-size' belongs in [resource]",
    ),
    (
        "node-key-at-top-level",
        "[resource]\n",
        "disks = []\n[resource]\n",
        "unknown key 'disks' at the top level (known: resource, security, nodes);"
        " 'disks' belongs in a [nodes.NAME] table",
    ),
    (
        "unknown-table",
        "[resource]\n",
        "[x]\n",
        "unknown key 'x' at the top level (known: resource, security, nodes)",
    ),
    ("missing-name", 'name = "r0"\n', "", "missing key 'name' in [resource]"),
    ("missing-mode", 'mode = "shared"\n', "", "missing key 'mode' in [resource]"),
    (
        "missing-address",
        'address = "10.0.0.1:7789"\n',
        "",
        "missing key 'address' in [nodes.alpha]",
    ),
    ("missing-qmp", 'qmp = "/run/blockrep/beta.qmp"\n', "", "missing key 'qmp' in [nodes.beta]"),
    (
        "missing-disks",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]\n',
        "",
        "missing key 'disks' in [nodes.beta]",
    ),
    (
        "missing-exports",
        'exports = ["127.0.0.1:10809", "nbd+unix:///data?socket=/run/blockrep/data.sock"]\n',
        "",
        "missing key 'exports' in [nodes.alpha]",
    ),
    (
        "name-not-a-string",
        'name = "r0"',
        "name = 7",
        "key 'name' in [resource] must be a name of letters, digits, '.', '-' and '_'"
        " (starting with a letter or digit), not 7",
    ),
    (
        "name-with-a-slash",
        'name = "r0"',
        'name = "../r0"',
        "key 'name' in [resource] must be a name of letters, digits, '.', '-' and '_'"
        " (starting with a letter or digit), not '../r0'",
    ),
    (
        "name-a-date",
        'name = "r0"',
        "name = 1979-05-27",
        "key 'name' in [resource] must be a name of letters, digits, '.', '-' and '_'"
        " (starting with a letter or digit), not a date or time",
    ),
    (
        "mode-unknown",
        'mode = "shared"',
        'mode = "both"',
        "key 'mode' in [resource] must be one of 'separate', 'shared', not 'both'",
    ),
    (
        "interval-string",
        "checkpoint-interval = 0.5",
        'checkpoint-interval = "2s"',
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not '2s'",
    ),
    (
        "interval-zero",
        "checkpoint-interval = 0.5",
        "checkpoint-interval = 0",
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not 0",
    ),
    (
        "interval-negative",
        "checkpoint-interval = 0.5",
        "checkpoint-interval = -1.5",
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not -1.5",
    ),
    (
        "interval-bool",
        "checkpoint-interval = 0.5",
        "checkpoint-interval = true",
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not true",
    ),
    (
        "interval-inf",
        "checkpoint-interval = 0.5",
        "checkpoint-interval = inf",
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not inf",
    ),
    (
        "interval-nan",
        "checkpoint-interval = 0.5",
        "checkpoint-interval = nan",
        "key 'checkpoint-interval' in [resource] must be a number of seconds > 0, not nan",
    ),
    (
        "region-size-not-power-of-two",
        "region-size = 65536",
        "region-size = 1000000",
        "key 'region-size' in [resource] must be a power of two >= 4096 (bytes), not 1000000",
    ),
    (
        "region-size-too-small",
        "region-size = 65536",
        "region-size = 512",
        "key 'region-size' in [resource] must be a power of two >= 4096 (bytes), not 512",
    ),
    (
        "region-size-string",
        "region-size = 65536",
        'region-size = "1M"',
        "key 'region-size' in [resource] must be a power of two >= 4096 (bytes), not '1M'",
    ),
    (
        "region-size-float",
        "region-size = 65536",
        "region-size = 65536.0",
        "key 'region-size' in [resource] must be a power of two >= 4096 (bytes), not 65536.0",
    ),
    (
        "failover-point-unknown",
        'failover-point = "latest"',
        'failover-point = "newest"',
        "key 'failover-point' in [resource] must be one of 'checkpoint', 'latest', not 'newest'",
    ),
    (
        "psk-file-not-a-string",
        'psk-file = "/etc/blockrep/r0.psk"',
        "psk-file = 1",
        "key 'psk-file' in [security] must be a non-empty string, not 1",
    ),
    (
        "tls-dir-empty",
        'tls-dir = "/etc/blockrep/tls"',
        'tls-dir = ""',
        "key 'tls-dir' in [security] must be a non-empty string, not ''",
    ),
    (
        "address-without-port",
        'address = "10.0.0.1:7789"',
        'address = "10.0.0.1"',
        "key 'address' in [nodes.alpha] must be an address (HOST:PORT, [v6]:PORT or"
        " unix:PATH), not '10.0.0.1'",
    ),
    (
        "address-port-out-of-range",
        'address = "10.0.0.1:7789"',
        'address = "10.0.0.1:70000"',
        "key 'address' in [nodes.alpha] must be an address (HOST:PORT, [v6]:PORT or"
        " unix:PATH), not '10.0.0.1:70000'",
    ),
    (
        "address-empty-unix",
        'address = "10.0.0.1:7789"',
        'address = "unix:"',
        "key 'address' in [nodes.alpha] must be an address (HOST:PORT, [v6]:PORT or"
        " unix:PATH), not 'unix:'",
    ),
    (
        "address-a-table",
        'address = "10.0.0.1:7789"',
        'address = {host = "10.0.0.1", port = 7789}',
        "key 'address' in [nodes.alpha] must be an address (HOST:PORT, [v6]:PORT or"
        " unix:PATH), not a table",
    ),
    (
        "qmp-not-a-string",
        'qmp = "/run/blockrep/beta.qmp"',
        "qmp = 4444",
        "key 'qmp' in [nodes.beta] must be a unix socket (unix:PATH or PATH), not 4444",
    ),
    (
        "qmp-empty-unix",
        'qmp = "/run/blockrep/beta.qmp"',
        'qmp = "unix:"',
        "key 'qmp' in [nodes.beta] must be a unix socket (unix:PATH or PATH), not 'unix:'",
    ),
    (
        "buffer-dir-a-list",
        'buffer-dir = "/dev/shm/r0"',
        'buffer-dir = ["/dev/shm"]',
        "key 'buffer-dir' in [nodes.alpha] must be a non-empty string, not ['/dev/shm']",
    ),
    (
        "keep-buffer-pages-a-boolean",
        'keep-buffer-pages = "off"',
        "keep-buffer-pages = false",
        "key 'keep-buffer-pages' in [nodes.alpha] must be one of 'auto', 'on', 'off', not false",
    ),
    (
        "keep-buffer-pages-misspelt",
        'keep-buffer-pages = "off"',
        'keep-buffer-pages = "of"',
        "key 'keep-buffer-pages' in [nodes.alpha] must be one of 'auto', 'on', 'off', not 'of'",
    ),
    (
        "disks-a-string",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]',
        'disks = "/srv/b-root.raw"',
        "key 'disks' in [nodes.beta] must be a non-empty array of paths, not '/srv/b-root.raw'",
    ),
    (
        "disks-empty",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]',
        "disks = []",
        "key 'disks' in [nodes.beta] must be a non-empty array of paths, not []",
    ),
    (
        "disks-holding-a-number",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]',
        'disks = ["/srv/b-root.raw", 2]',
        "key 'disks' in [nodes.beta] must be a non-empty array of paths,"
        " not ['/srv/b-root.raw', 2]",
    ),
    (
        "disk-twice",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]',
        'disks = ["/srv/b-root.raw", "/srv/b-root.raw"]',
        "disk '/srv/b-root.raw' appears twice in 'disks' in [nodes.beta]",
    ),
    (
        "exports-fewer-than-disks",
        'exports = ["unix:/run/blockrep/root.sock", "nbd://127.0.0.1:10810/data"]',
        'exports = ["unix:/run/blockrep/root.sock"]',
        "[nodes.beta] has 2 disks but 1 exports (one export per disk)",
    ),
    (
        "export-a-bare-name",
        'exports = ["unix:/run/blockrep/root.sock", "nbd://127.0.0.1:10810/data"]',
        'exports = ["unix:/run/blockrep/root.sock", "data"]',
        "export 'data' in 'exports' in [nodes.beta] is neither an address (HOST:PORT,"
        " [v6]:PORT or unix:PATH) nor an NBD URI (nbd://HOST:PORT/NAME,"
        " nbd+unix:///NAME?socket=PATH)",
    ),
    (
        "export-uri-without-a-name",
        "nbd://127.0.0.1:10810/data",
        "nbd://127.0.0.1:10810/",
        "export 'nbd://127.0.0.1:10810/' in 'exports' in [nodes.beta] is neither an address"
        " (HOST:PORT, [v6]:PORT or unix:PATH) nor an NBD URI (nbd://HOST:PORT/NAME,"
        " nbd+unix:///NAME?socket=PATH)",
    ),
    (
        "export-uri-with-tls",
        "nbd://127.0.0.1:10810/data",
        "nbds://127.0.0.1:10810/data",
        "export 'nbds://127.0.0.1:10810/data' in 'exports' in [nodes.beta] is neither an"
        " address (HOST:PORT, [v6]:PORT or unix:PATH) nor an NBD URI (nbd://HOST:PORT/NAME,"
        " nbd+unix:///NAME?socket=PATH)",
    ),
    (
        "unix-uri-without-socket",
        "nbd+unix:///data?socket=/run/blockrep/data.sock",
        "nbd+unix:///data",
        "export 'nbd+unix:///data' in 'exports' in [nodes.alpha] is neither an address"
        " (HOST:PORT, [v6]:PORT or unix:PATH) nor an NBD URI (nbd://HOST:PORT/NAME,"
        " nbd+unix:///NAME?socket=PATH)",
    ),
    (
        "two-volumes-one-export",
        'exports = ["unix:/run/blockrep/root.sock", "nbd://127.0.0.1:10810/data"]',
        'exports = ["unix:/run/blockrep/root.sock",'
        ' "nbd+unix:///disk?socket=/run/blockrep/root.sock"]',
        "two volumes in [nodes.beta] are both exported at /run/blockrep/root.sock"
        " (export 'disk'); give each its own address or name it with an NBD URI",
    ),
    (
        "volume-count-differs",
        'disks = ["/srv/b-root.raw", "/srv/b-data.raw"]\n'
        'exports = ["unix:/run/blockrep/root.sock", "nbd://127.0.0.1:10810/data"]',
        'disks = ["/srv/b-root.raw"]\nexports = ["unix:/run/blockrep/root.sock"]',
        "node 'alpha' has 2 disks and node 'beta' has 1; every node needs one disk per volume",
    ),
    (
        "one-node",
        FULL[FULL.index("[nodes.beta]") :],
        "",
        "[nodes] must describe exactly two nodes, not 1 (alpha)",
    ),
    (
        "three-nodes",
        "[nodes.beta]",
        '[nodes.gamma]\naddress = "unix:/g"\nqmp = "/g.qmp"\ndisks = ["/a", "/b"]\n'
        'exports = ["unix:/g1", "unix:/g2"]\n[nodes.beta]',
        "[nodes] must describe exactly two nodes, not 3 (alpha, gamma, beta)",
    ),
    (
        "same-address",
        'address = "[fe80::2]:7789"',
        'address = "tcp:10.0.0.1:7789"',
        "nodes 'alpha' and 'beta' have the same address 10.0.0.1:7789",
    ),
    (
        "bad-node-name",
        "[nodes.beta]",
        '[nodes."beta gamma"]',
        "node name 'beta gamma' in [nodes] must be a name of letters, digits, '.', '-' and '_'"
        " (starting with a letter or digit)",
    ),
    (
        "node-not-a-table",
        FULL[FULL.index("[nodes.beta]") :],
        '[nodes]\nbeta = "10.0.0.2:7789"\n',
        "key 'beta' in [nodes] must be a table [nodes.beta], not '10.0.0.2:7789'",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusal(old: str, new: str, message: str) -> None:
    assert refusal(edit(FULL, old, new)) == P + message


def test_tables_missing_or_not_tables() -> None:
    no_nodes = FULL[: FULL.index("[nodes.alpha]")]
    assert refusal(no_nodes) == P + "missing table [nodes]"
    no_resource = FULL[FULL.index("[security]") :]
    assert refusal(no_resource) == P + "missing table [resource]"
    assert refusal("resource = 1\n" + no_resource) == (
        P + "key 'resource' at the top level must be a table [resource], not 1"
    )
    text = 'security = "x"\n' + edit(
        FULL, '[security]\npsk-file = "/etc/blockrep/r0.psk"\ntls-dir = "/etc/blockrep/tls"\n', ""
    )
    assert (
        refusal(text) == P + "key 'security' at the top level must be a table [security], not 'x'"
    )
    # a key after [security] would land in it: a top-level key goes before any table
    text = "nodes = []\n" + no_nodes
    assert refusal(text) == P + "key 'nodes' at the top level must be a table [nodes], not []"
    text = edit(FULL, FULL[FULL.index("[nodes.alpha]") :], "[nodes]\n")
    assert refusal(text) == P + "[nodes] must describe exactly two nodes, not 0"


def test_dotted_node_name_is_shown_quoted() -> None:
    text = edit(FULL, "[nodes.beta]", '[nodes."beta.example.com"]')
    text = edit(text, 'qmp = "/run/blockrep/beta.qmp"\n', "")
    assert refusal(text) == P + "missing key 'qmp' in [nodes.\"beta.example.com\"]"


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("[resource]\nname = \n", "line 2, column 8", "Invalid value"),
        ('[resource]\nname = "r0"\nname = "r1"\n', "line 3, column 12", "Cannot overwrite a value"),
        ('[resource]\nmode = "sep', "line 2, column 12", "Unterminated string"),
        ("[resource]\n[resource]\n", "line 2, column 10", "Cannot declare ('resource',) twice"),
    ],
    ids=["no-value", "key-twice", "unterminated-at-end", "table-twice"],
)
def test_syntax_error_names_file_line_and_column(text: str, where: str, what: str) -> None:
    assert refusal(text) == f"resource file r0.toml, {where}: {what}"


def test_unreadable_and_non_utf8_files(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(OptionError) as info:
        load_resource(str(missing))
    assert info.value.message == f"resource file {missing}: No such file or directory"
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'[resource]\nname = "\xff"\n')
    with pytest.raises(OptionError) as info:
        load_resource(str(binary))
    assert info.value.message == f"resource file {binary}: not UTF-8 text (byte 19)"


def test_a_syntax_error_in_a_loaded_file_names_its_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "r0.toml"
    path.write_text("[resource\n")
    with pytest.raises(OptionError) as info:
        load_resource(str(path))
    assert info.value.message.startswith(f"resource file {path}, line 1, column 10: ")
