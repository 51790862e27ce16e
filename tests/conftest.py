"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

from tests.harness.ha import HA


@pytest.fixture
def workdir(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


@pytest.fixture
async def ha():
    """An HA test bed (tests/harness/ha.py); every process it started is stopped after."""
    h = HA()
    try:
        yield h
    finally:
        await h.aclose()
