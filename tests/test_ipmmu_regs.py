"""IPMMU-VMSA registers: reset values, read-back rules and access widths (facts/ipmmu.md section 10)."""
from __future__ import annotations

import logging

import pytest
from test_ipmmu_support import DS0, DS1, MM, Rig, ctx_reg, utlb_reg

from devices import ipmmu_regs as regs
from vmm import Machine

INSTANCES = {"ipmmu_mm": MM, "ipmmu_ds0": DS0, "ipmmu_ds1": DS1}
PATTERN = 0xA5C3_5A3C


@pytest.fixture
def rig():
    m = Machine.from_board("rcar-virt")
    yield Rig(m)
    m.close()


def test_layout_is_declared_once_and_compiled():
    # spot checks against facts section 1: offsets, the 0x300/0x600 uTLB split, control block
    assert regs.ctx_offset(0, "IMCTR") == 0x00 and regs.ctx_offset(7, "IMEUAR") == 7 * 0x40 + 0x34
    assert regs.ctx_offset(1, "IMTTBCR") == 0x48 and regs.ctx_offset(1, "IMMAIR0") == 0x68
    assert regs.utlb_reg_offset(0, "IMUCTR") == 0x300 and regs.utlb_reg_offset(31, "IMUASID") == 0x4F8
    assert regs.utlb_reg_offset(32, "IMUCTR") == 0x600 and regs.utlb_reg_offset(47, "IMUASID") == 0x6F8
    assert regs.OFFSETS["IMSCTLR"] == 0x500 and regs.OFFSETS["IMSAUXCTLR"] == 0x504
    assert regs.OFFSETS["IMSSTR"] == 0x540 and regs.OFFSETS["IMPMBD15"] == 0x2FC
    assert regs.IMSTR_ERR_MASK == 0x17 and regs.IMCTR.VA64.mask == 1 << 29 and regs.IMSAUXCTLR.S2PTE.mask == 8
    assert regs.FIELDS["IMTTBCR"]["SL0"] == (6, 2) and regs.FIELDS["IMUCTR"]["TTSEL"] == (4, 4)
    assert regs.HOLDER["IMTTBCR"] == "root" and regs.HOLDER["IMCTR"] == "both" and regs.HOLDER["IMUCTR"] == "cache"
    assert all(v == 0 for v in regs.RESET.values())
    # the field declarations decode real driver values
    tcr = regs.IMTTBCR.decode(0xC0000058)
    assert (tcr["EAE"], tcr["PMB"], tcr["SL0"], tcr["TSZ0"]) == (1, 1, 1, 24)
    assert regs.IMTTBCR.TSZ0_VA32(0x80000080 | 0x3D) == 5 and regs.IMUCTR.TTSEL(0x31) == 3
    assert regs.IMSTR.ERRCODE.encode(4) | regs.IMSTR.ERRLVL.encode(7) == 0x3400      # ERRLVL keeps 2 bits


@pytest.mark.parametrize("name", INSTANCES)
def test_every_offset_resets_to_zero(rig, name):
    base = INSTANCES[name]
    assert [off for off in range(0, 0x1000, 4) if rig.m.mmio_read(base + off, 4)] == []


def _latches():
    """(register, offset in an instance) for every plain read/write latch."""
    special = {"IMCTR", "IMSTR", "IMELAR", "IMEUAR", "IMUCTR"}
    for off, (block, idx, name) in sorted(regs.DECODE.items()):
        if name in special or (block == regs.UTLB and idx >= 48):
            continue
        yield name, off


@pytest.mark.parametrize("name", INSTANCES)
def test_latches_read_back_what_was_written(rig, name):
    base = INSTANCES[name]
    for i, (reg, off) in enumerate(_latches()):
        value = (PATTERN ^ (i * 0x01010101)) & 0xFFFFFFFF
        rig.m.mmio_write(base + off, 4, value)
        assert rig.m.mmio_read(base + off, 4) == value, (reg, hex(off))


@pytest.mark.parametrize("base", [MM, DS1])
def test_imctr_latches_everything_but_flush(rig, base):
    rig.wr(base, 3, "IMCTR", 0x20000007)              # Xen's root value, VA64 latched in the cache too
    assert rig.rd(base, 3, "IMCTR") == 0x20000005
    rig.wr(base, 3, "IMCTR", 0xFFFFFFFF)
    assert rig.rd(base, 3, "IMCTR") == 0xFFFFFFFD
    rig.wr(base, 3, "IMCTR", 0x2)                     # FLUSH alone: disable and flush
    assert rig.rd(base, 3, "IMCTR") == 0


def test_imuctr_flush_self_clears_other_fields_latch(rig):
    assert rig.imuctr(DS1, 32, 0x13) == 0x11
    assert rig.imuctr(DS1, 47, 0xFFFFFFFF) == 0xFFFFFFFD     # FIXADDEN, FIXADD, TTSEL 15, MMUEN
    assert rig.imuctr(DS0, 0, 0x2) == 0
    # uTLBs beyond 48 do not exist on Gen3: read 0, writes ignored
    rig.m.mmio_write(DS1 + 0x600 + 16 * 16, 4, 0x11)
    assert rig.m.mmio_read(DS1 + 0x600 + 16 * 16, 4) == 0


def test_imstr_elar_euar_are_hardware_owned(rig):
    rig.wr(MM, 1, "IMSTR", 0x17)                      # W0C: software cannot set bits
    rig.wr(MM, 1, "IMELAR", 0x1234)
    rig.wr(MM, 1, "IMEUAR", 0x5678)
    assert rig.fault_record(1) == (0, 0)


def test_narrow_accesses_read_zero_are_ignored_and_logged_once(rig, caplog):
    addr = ctx_reg(MM, 2, "IMMAIR0")
    rig.m.mmio_write(addr, 4, 0x11223344)
    with caplog.at_level(logging.WARNING, logger="vmm.ipmmu"):
        assert rig.m.mmio_read(addr, 1) == 0
        assert rig.m.mmio_read(addr, 2) == 0
        rig.m.mmio_write(addr, 2, 0xFFFF)
        rig.m.mmio_write(addr, 1, 0xFF)
    assert rig.m.mmio_read(addr, 4) == 0x11223344
    msgs = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(msgs) == 1 and "0xa8" in msgs[0] and "ipmmu_mm" in msgs[0]


def test_64bit_access_is_two_32bit_accesses_low_first(rig):
    rig.m.mmio_write(ctx_reg(MM, 1, "IMTTLBR0"), 8, 0x0000_0012_3456_7000)
    assert rig.rd(MM, 1, "IMTTLBR0") == 0x3456_7000 and rig.rd(MM, 1, "IMTTUBR0") == 0x12
    assert rig.m.mmio_read(ctx_reg(MM, 1, "IMTTLBR0"), 8) == 0x0000_0012_3456_7000
    # IMCTR (low) then IMCAAR (high): FLUSH in the low word still self-clears
    rig.m.mmio_write(ctx_reg(MM, 2, "IMCTR"), 8, 0xABCD_0000_0000_0007)
    assert rig.m.mmio_read(ctx_reg(MM, 2, "IMCTR"), 8) == 0xABCD_0000_0000_0005
    # a 64-bit read of IMUCTR covers IMUCTR and the gap after it
    rig.imuctr(DS1, 33, 0x11)
    assert rig.m.mmio_read(utlb_reg(DS1, 33, "IMUCTR"), 8) == 0x11


def test_unnamed_offsets_read_zero_and_ignore_writes(rig):
    for off in (0x24, 0x3C, 0x204, 0x304, 0x508, 0x800, 0xFFC):
        rig.m.mmio_write(MM + off, 4, 0xFFFFFFFF)
        assert rig.m.mmio_read(MM + off, 4) == 0, hex(off)


def test_xen_probe_rmw_and_linux_reset_read_back(rig):
    aux = rig.m.mmio_read(MM + 0x504, 4)
    rig.m.mmio_write(MM + 0x504, 4, aux | 8)
    assert rig.m.mmio_read(MM + 0x504, 4) == 8
    for base in (MM, DS0, DS1):
        rig.m.mmio_write(base + 0x500, 4, 0x1000_0001)
        rig.m.mmio_write(base + 0x500, 4, rig.m.mmio_read(base + 0x500, 4) & ~(1 << 28))
        assert rig.m.mmio_read(base + 0x500, 4) == 1
    for c in range(8):
        rig.wr(MM, c, "IMCTR", 0)
    assert all(rig.rd(MM, c, "IMCTR") == 0 for c in range(8))
