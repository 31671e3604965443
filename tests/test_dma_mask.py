"""DMA masks (DESIGN section 7): a copy that touches an address at or above 2^DMA_BITS is refused
before any translation with STATUS 6, loudly, instead of wrapping into low memory."""
from __future__ import annotations

import logging

import pytest

from vmm.machine import Machine

DMA = {f"dma{n}": 0x0B000000 + 0x1000 * n for n in range(5)}
G4 = 1 << 32


@pytest.fixture
def m():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        yield m


def test_dma_bits_register_holds_the_board_widths(m):
    assert [m.mmio_read(DMA[f"dma{n}"] + 0x3C, 4) for n in range(5)] == [32, 32, 64, 32, 40]
    m.mmio_write(DMA["dma0"] + 0x3C, 4, 64)                              # read-only
    assert m.mmio_read(DMA["dma0"] + 0x3C, 4) == 32


def test_beyond_the_mask_is_status_6_with_the_first_address_above(m, caplog):
    m.write_guest(0x2000, b"\x11" * 64)
    with caplog.at_level(logging.WARNING, logger="vmm"):
        assert m.dma("dma3", G4 - 0x10, 0x2000, 0x20) == (6, G4)          # source crosses 2^32
    assert m.read_guest(0x2000, 64) == b"\x11" * 64                         # nothing written
    assert m.dma("dma3", 0x1000, G4 + 0x500, 0x20) == (6, G4 + 0x500)       # destination above
    assert m.dma("dma3", G4 + 0x40, G4 + 0x500, 0x20) == (6, G4 + 0x40)     # the source is looked at first
    # ending exactly at 2^32 is within the mask: it is translated (bypass) and then lies outside
    # machine memory, STATUS 2, not 6
    assert m.dma("dma3", G4 - 0x20, 0x3000, 0x20) == (2, G4 - 0x20)
    msgs = [r.getMessage() for r in caplog.records if "address lines" in r.getMessage()]
    assert msgs and msgs[0].startswith("dma3 drives 32 address lines but was programmed to touch 0x100000000")


def test_the_mask_comes_before_the_iommu(m):
    """dma4 (40 bits) behind an IPMMU cache: refused with no IPMMU record; dma2 (64 bits) reaches
    its virtio-iommu, which faults."""
    assert m.dma("dma4", 1 << 40, 0x1000, 8) == (6, 1 << 40)
    assert m.mmio_read(0xE67B0000 + 0x20, 4) == 0 and m.devices["ipmmu_mm"].faults == 0
    assert m.dma("dma2", 1 << 40, 0x1000, 8) == (2, 1 << 40)
    assert m.devices["virtio0"].backend.faults == 1


def test_wrapping_ranges_are_bad_length(m):
    assert m.dma("dma2", (1 << 64) - 0x10, 0x1000, 0x20) == (4, 0)
    assert m.dma("dma2", 0x1000, (1 << 64) - 8, 0x20) == (4, 0)


def test_board_key_is_validated():
    from vmm.board import BoardError, load_board
    spec = load_board("rcar-virt")
    spec.devices[-1]["dma_bits"] = 0
    with pytest.raises(BoardError, match="dma_bits must be 1..64"):
        Machine(spec, quiet=True)
