"""sysinfo and the dma engines, driven through the bus with no CPU (DESIGN.md section 3)."""
from __future__ import annotations

import pytest

from vmm import Machine
from vmm.board import load_board

SYSINFO = 0x0C000000
DMA3 = 0x0B003000


@pytest.fixture(params=["direct", "scattered"])
def m(request):
    m = Machine.from_board("rcar-virt", p2m=request.param)
    yield m
    m.close()


def test_sysinfo_registers(m):
    assert m.mmio_read(SYSINFO, 4) == 0x4F464E49
    assert m.mmio_read(SYSINFO + 0x08, 8) == 128 << 20
    assert m.mmio_read(SYSINFO + 0x08, 4) | m.mmio_read(SYSINFO + 0x0C, 4) << 32 == 128 << 20
    root = m.mmio_read(SYSINFO + 0x10, 8)
    assert root == m.dom0.p2m.root and root % 8192 == 0                 # two concatenated L1 tables
    vtcr = m.mmio_read(SYSINFO + 0x18, 4)
    assert vtcr & 0x3F == 24 and (vtcr >> 6) & 3 == 1                   # T0SZ 24, SL0 1
    assert m.mmio_read(SYSINFO + 0x1C, 4) == 40
    flags = m.mmio_read(SYSINFO + 0x20, 4)
    assert flags == (1 if m.board.p2m == "direct" else 2)
    m.mmio_write(SYSINFO, 4, 0)                                          # read-only
    assert m.mmio_read(SYSINFO, 4) == 0x4F464E49


def test_prr_reads_h3_es30(m):
    assert m.mmio_read(0xFFF00044, 4) == 0x4F20


def test_dma_engine_ids_and_masters(m):
    for n, master in enumerate([32, 33, 2, 3, 0]):
        base = 0x0B000000 + 0x1000 * n
        assert m.mmio_read(base, 4) == 0x31414D44
        assert m.mmio_read(base + 0x30, 4) == master


def test_bypass_copy_moves_machine_bytes(m):
    m.memory.write(0x10_0000, bytes(range(256)) * 16)
    assert m.dma("dma3", 0x10_0000, 0x20_0800, 4096) == (0, 0)
    assert m.memory.read(0x20_0800, 4096) == bytes(range(256)) * 16


def test_src_and_dst_as_32bit_halves(m):
    m.memory.write(0x30_0000, b"halves!!")
    m.mmio_write(DMA3 + 0x08, 4, 0x30_0000)
    m.mmio_write(DMA3 + 0x0C, 4, 0)
    m.mmio_write(DMA3 + 0x10, 4, 0x31_0000)
    m.mmio_write(DMA3 + 0x14, 4, 0)
    m.mmio_write(DMA3 + 0x18, 4, 8)
    assert m.mmio_read(DMA3 + 0x10, 8) == 0x31_0000
    m.mmio_write(DMA3 + 0x1C, 4, 1)
    assert m.mmio_read(DMA3 + 0x20, 4) == 0
    assert m.memory.read(0x31_0000, 8) == b"halves!!"


@pytest.mark.parametrize("length", [0, (1 << 20) + 1, 0xFFFFFFFF])
def test_bad_length_status_4_writes_nothing(m, length):
    m.memory.write(0x40_0000, b"\xAA" * 16)
    assert m.dma("dma3", 0x50_0000, 0x40_0000, length)[0] == 4
    assert m.memory.read(0x40_0000, 16) == b"\xAA" * 16


def test_outside_memory_is_status_2_with_first_failing_page(m):
    end = m.memory.size
    m.memory.write(end - 4096, b"\x11" * 4096)
    m.memory.write(0x1000, b"\x22" * 8192)
    status, fault = m.dma("dma3", end - 4096, 0x1000, 8192)      # second source page is beyond memory
    assert (status, fault) == (2, end)
    assert m.memory.read(0x1000, 8192) == b"\x22" * 8192          # a failed copy writes nothing
    status, fault = m.dma("dma3", 0x1000, (1 << 48) + 0x123, 16)
    assert (status, fault) == (6, (1 << 48) + 0x123)            # dma3 drives 32 address lines: beyond its mask
    status, fault = m.dma("dma2", (1 << 48) + 0x123, 0x1000, 16)     # dma2 drives 64: the IOMMU decides
    assert (status, fault) == (2, (1 << 48) + 0x123)              # unattached endpoint, bypass off


def test_irq_raise_and_clear(m):
    edges = []
    m.irqs.listeners.append(lambda line, level: edges.append((line, level)))
    assert m.dma("dma3", 0x1000, 0x2000, 64, irq=True) == (0, 0)
    assert m.mmio_read(DMA3 + 0x34, 4) == 1 and m.irqs.lines[11].level
    m.mmio_write(DMA3 + 0x34, 4, 1)
    assert m.mmio_read(DMA3 + 0x34, 4) == 0
    assert edges == [(11, True), (11, False)]


def test_unprotected_fault_policy_refuses_with_status_5():
    spec = load_board("rcar-virt")
    spec.unprotected = "fault"
    m = Machine(spec)
    m.memory.write(0x2000, b"\x77" * 64)
    assert m.dma("dma3", 0x1000, 0x2000, 64) == (5, 0x1000)
    assert m.dma("dma3", 0x2010, 0x3000, 64) == (5, 0x2010)       # the first byte the copy touches
    assert m.memory.read(0x2000, 64) == b"\x77" * 64
    m.close()


@pytest.mark.parametrize("src, dst", [(0x10000, 0x10010), (0x10010, 0x10000), (0x10000, 0x30000)])
def test_copies_behave_as_read_whole_then_write(m, src, dst):
    """Overlapping or not, one run or many (scattered), a copy equals reading the source whole
    and then writing it."""
    pattern = bytes(range(256)) * 48
    m.write_guest(0x10000, pattern)
    m.write_guest(0x30000, bytes(len(pattern)))
    want = bytearray(m.read_guest(0, 0x40000))
    want[dst:dst + 0x2345] = want[src:src + 0x2345]
    spec = next(d for d in m.board.devices if d["name"] == "dma2")
    assert spec["dma_bits"] == 64
    # dma3 is unprotected (bypass): machine addresses; on scattered use the virtio bypass of dma2
    if m.board.p2m == "direct":
        assert m.dma("dma3", src, dst, 0x2345) == (0, 0)
    else:
        m.devices["virtio0"].backend.bypass = 1
        assert m.dma("dma2", src, dst, 0x2345) == (0, 0)
    assert m.read_guest(0, 0x40000) == bytes(want)
