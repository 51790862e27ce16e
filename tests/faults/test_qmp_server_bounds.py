"""A QMP client pipelining without end (issue 12, Deliver 4): the daemon reads its input
only as fast as it answers, so its memory stays bounded while the client reads nothing;
every command is then answered, in order, whatever read boundary it was cut at; and
another client is answered meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.harness.processes import daemon

COMMANDS = 150_000
STEP = 20.0  # bound on each wait: a hang fails the test, no timing passes it


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(path: str) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(STEP)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def test_pipelined_commands_are_held_back_answered_in_order_and_others_served(tmp_path):
    with daemon(tmp_path) as d:
        assert d.qmp_sock is not None
        base = rss_kib(d.pid)
        a, fa = connect(d.qmp_sock)
        # ids of varied length, so commands straddle every kind of read boundary
        lines = b"".join(
            b'{"execute": "query-version", "id": "c%d"}\n' % i for i in range(COMMANDS)
        )
        sent = threading.Event()

        def send() -> None:
            a.sendall(lines)  # blocks while the daemon holds the pipeline back
            sent.set()

        t = threading.Thread(target=send, daemon=True)
        t.start()
        time.sleep(1.0)
        # the daemon stopped reading: the whole pipeline cannot have been taken in
        assert not sent.is_set()
        peak = rss_kib(d.pid)
        # another client is served while A's pipeline is pending
        b, fb = connect(d.qmp_sock)
        b.sendall(b'{"execute": "query-version", "id": "b"}\n')
        rb = json.loads(fb.readline())
        assert rb["id"] == "b" and rb["return"]["qemu"]["major"] == 7, rb
        b.close()
        # A reads: every command answered, in order, none misparsed
        for i in range(COMMANDS):
            msg = json.loads(fa.readline())
            assert msg.get("id") == f"c{i}" and "return" in msg, (i, msg)
            if i % 10_000 == 0:
                peak = max(peak, rss_kib(d.pid))
        t.join(STEP)
        assert sent.is_set()
        a.close()
        assert peak - base < 64 * 1024, (base, peak)
        assert "Traceback" not in d.output()
