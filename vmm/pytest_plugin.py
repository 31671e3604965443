"""pytest plugin (entry point ``pytest11``): fixtures that give a test a fresh board machine."""
from __future__ import annotations

import pytest


@pytest.fixture
def machine():
    """A fresh ``rcar-virt`` machine, closed after the test."""
    from vmm.machine import Machine
    m = Machine.from_board("rcar-virt")
    yield m
    m.close()
