"""The descriptor budget's arithmetic and the rate-limited log (blockrep.limits)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from blockrep import limits
from blockrep.limits import DescriptorBudget, RateLimitedLog, Share


class Fds:
    """A process's open descriptors as the budget sees them, under the test's control."""

    def __init__(self, base: int) -> None:
        self.base = base  # descriptors that are not connections
        self.conns = 0
        self.counts = 0

    def count(self) -> int:
        self.counts += 1
        return self.base + self.conns


def fill(budget: DescriptorBudget, fds: Fds, share: Share) -> int:
    """Accept connections until the budget refuses one; how many it admitted."""
    n = 0
    while True:
        fds.conns += 1  # accept() has opened the descriptor before admission
        if not budget.admit(share):
            fds.conns -= 1
            return n
        n += 1


@pytest.mark.parametrize("limit, reserve", [(256, 64), (1024, 128), (65536, 8192), (100, 64)])
def test_reserve_is_64_and_never_under_an_eighth(limit, reserve):
    assert limits.reserve_for(limit) == reserve


def test_data_connections_stop_at_the_reserve_and_qmp_gets_half_of_it():
    fds = Fds(base=20)
    b = DescriptorBudget(soft_limit=lambda: 256, count_open=fds.count)
    data = fill(b, fds, Share.DATA)
    assert data == 256 - 64 - 20  # exactly RESERVE stays free
    assert b.refused == 1
    qmp = fill(b, fds, Share.OPERATOR)
    assert qmp == 32  # the operator may use half of the reserve, not all of it
    assert 256 - (fds.base + fds.conns) == 32
    # releasing data connections makes room for data again
    for _ in range(10):
        fds.conns -= 1
        b.release()
    assert fill(b, fds, Share.DATA) == 0  # operator connections still hold the reserve
    for _ in range(40):
        fds.conns -= 1
        b.release()
    assert fill(b, fds, Share.DATA) == 40 - 32 + 10


def test_files_opened_meanwhile_are_seen_near_the_limit():
    fds = Fds(base=20)
    b = DescriptorBudget(soft_limit=lambda: 256, count_open=fds.count)
    for _ in range(100):
        fds.conns += 1
        assert b.admit()
    fds.base += 60  # the process opened files (a checkpoint, a state file) since
    admitted = fill(b, fds, Share.DATA)
    assert fds.base + fds.conns + 64 <= 256
    assert admitted == 256 - 64 - 80 - 100


def test_far_from_the_limit_admission_does_not_count_every_time():
    fds = Fds(base=10)
    b = DescriptorBudget(soft_limit=lambda: 65536, count_open=fds.count)
    for _ in range(1000):
        fds.conns += 1
        assert b.admit()
    assert fds.counts <= 1000 // limits.RECOUNT_EVERY + 1


def test_without_proc_only_admitted_connections_count():
    b = DescriptorBudget(soft_limit=lambda: 256, count_open=lambda: -1)
    n = 0
    while b.admit():
        n += 1
    assert n == 256 - 64


def test_connection_slot_releases_what_it_admitted():
    before = limits.BUDGET.admitted
    with limits.connection_slot(Share.DATA) as ok:
        assert ok
        assert limits.BUDGET.admitted == before + 1
    assert limits.BUDGET.admitted == before


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limited_log_logs_once_per_interval_with_the_suppressed_count(caplog):
    clock = Clock()
    logger = logging.getLogger("test.limits.ratelimit")
    r = RateLimitedLog(logger, interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert r("accept failed: %s", "EMFILE")
        for _ in range(5000):
            clock.t += 0.001
            assert not r("accept failed: %s", "EMFILE")
        clock.t += 10.0
        assert r("accept failed: %s", "EMFILE")
        assert not r("accept failed: %s", "EMFILE")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == logger.name]
    assert lines == [
        "accept failed: EMFILE",
        "accept failed: EMFILE (5000 similar messages suppressed)",
    ]


def test_accept_errors_become_one_line_and_other_errors_pass_through(caplog):
    seen: list[dict] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _lp, ctx: seen.append(ctx))
        limits.install_accept_error_filter(loop, interval=60.0)
        with caplog.at_level(logging.DEBUG):
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    }
                )
            loop.call_exception_handler({"message": "something else"})
        accept_lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert len(accept_lines) == 1
        assert accept_lines[0].exc_info is None  # no traceback
        assert [c["message"] for c in seen] == ["something else"]
    finally:
        loop.close()
