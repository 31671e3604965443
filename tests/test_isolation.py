"""The isolation watchdog: every device access is checked against the owner of the machine frames
it lands in. Hardware lets these DMAs through; the lab makes them loud (warn), or refuses them
(fault, STATUS 8), and keeps silent for DMA that stays inside its domain."""
from __future__ import annotations

import logging
import random

import pytest
from test_ipmmu_support import DS0, DS1, Rig

from vmm.board import load_board
from vmm.machine import Machine
from vmm.memory import PAGE

HYP = "the hypervisor (P2M tables, pools)"


def machine(isolation: str = "warn", p2m: str = "direct") -> Machine:
    spec = load_board("rcar-virt")
    spec.isolation = isolation
    return Machine(spec, p2m=p2m)


def test_bypass_dma_into_the_p2m_tables_is_reported_once(caplog):
    with machine() as m, caplog.at_level(logging.WARNING, logger="vmm"):
        root = m.dom0.p2m.root
        before = m.memory.read(root, 16)
        m.write_guest(0x1000, b"\xAA" * 16)
        assert m.dma("dma3", 0x1000, root, 16) == (0, 0)              # the hardware lets it through
        assert m.memory.read(root, 16) == b"\xAA" * 16 != before
        assert m.dma("dma3", 0x1000, root + 0x20, 16) == (0, 0)
        assert m.crossings == {("dma3", HYP): 2}
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("isolation:")]
        assert lines == [f"isolation: dma3 (domain dom0) reached {HYP}: device address {root:#x} is machine "
                         f"address {root:#x}"]


def test_fault_policy_refuses_with_status_8_and_the_first_crossing_byte():
    with machine("fault") as m:
        root = m.dom0.p2m.root
        before = m.memory.read(root, 0x2000)
        status, fault = m.dma("dma3", 0x1000, root + 0x123, 0x20)
        assert (status, fault) == (8, root + 0x123)
        assert m.memory.read(root, 0x2000) == before                     # nothing written
        status, fault = m.dma("dma3", root + 0x10, 0x2000, 0x20)         # the source is judged first
        assert (status, fault) == (8, root + 0x10)
        # translation of every page comes first: an untranslatable destination wins over a crossing source
        assert m.dma("dma3", root, m.memory.size + 0x40, 0x20) == (2, m.memory.size + 0x40)


def test_a_copy_that_crosses_part_way_reports_the_crossing_page():
    with machine("fault") as m:
        pool = m.dom0.p2m.root & ~0x1FFFFF          # the pool starts 2 MiB-aligned right above dom0's RAM
        ram_top = 128 << 20
        if pool != ram_top:
            pytest.skip("the pool does not follow RAM directly on this layout")
        status, fault = m.dma("dma3", 0x1000, ram_top - 0x800, 0x1000)
        assert (status, fault) == (8, ram_top)                           # the second page, at its base


def test_scattered_bypass_into_free_frames():
    with machine(p2m="scattered") as m:
        # guest page i lives on machine frame 2i+1: the even frames belong to nobody
        assert m.dma("dma3", PAGE, 2 * PAGE, 16) == (0, 0)
        assert m.crossings == {("dma3", "free machine memory"): 1}


def test_off_checks_nothing():
    with machine("off") as m:
        assert m.dma("dma3", 0x1000, m.dom0.p2m.root, 16) == (0, 0)
        assert m.crossings == {}


@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_xen_style_stage2_contexts_never_cross(p2m):
    """Every IPMMU master behind a stage-2 context over its own domain's P2M, random copies by IPA,
    in and out of RAM: translation faults are allowed, leaving the domain is not."""
    with machine("fault", p2m=p2m) as m:
        rig = Rig(m)
        rig.xen_context(1, m.dom0.p2m.root, cache=DS1, utlbs=(32, 33))
        rig.xen_context(2, m.dom0.p2m.root, cache=DS0, utlbs=(0,))
        rng = random.Random(7)
        statuses = set()
        for _ in range(3000):
            src = rng.choice((rng.randrange(0, 128 << 20), rng.randrange(0, 1 << 40), 0x7FF_F800))
            dst = rng.choice((rng.randrange(0, 128 << 20), rng.randrange(0, 1 << 40), 0x7FF_F000))
            n = rng.choice((1, 64, PAGE, 3 * PAGE + 5, 1 << 16))
            status, _ = m.dma(rng.choice(("dma0", "dma1", "dma4")), src, dst, n)
            statuses.add(status)
            for c in (1, 2):
                rig.clear(c)
        assert 8 not in statuses and {0, 2} <= statuses
        assert m.crossings == {}
