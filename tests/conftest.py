"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def workdir(tmp_path):
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)
