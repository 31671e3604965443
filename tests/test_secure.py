"""Secure domains and the hyp window (DESIGN section 7): the private check after translation, every
dma engine STATUS, every hyp command and error, exchange (contents, P2M, frame map, IOTLBs), and
virtio devices that meet private memory."""
from __future__ import annotations

import logging

import pytest
from test_ipmmu_support import PAGE, Rig, Tables, wide_machine
from virtio_driver import NEEDS_RESET, QUEUE_NOTIFY, REQ_Q, VirtioDriver

from devices import hyp
from vmm.board import BoardError, load_board, parse_board
from vmm.frames import FREE, PRIVATE
from vmm.machine import Machine
from vmm.walker import R

HYP = 0x0C001000
SYSINFO_FLAGS = 0x0C000020
G4 = 1 << 32
OFF = hyp.LAYOUT.offset


class Hyp:
    """A guest's moves on the hyp window, through the bus."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def __call__(self, cmd: int, gpa: int, pages: int = 1) -> tuple[int, int]:
        self.m.mmio_write(HYP + OFF("GPA"), 8, gpa)
        self.m.mmio_write(HYP + OFF("PAGES"), 4, pages)
        self.m.mmio_write(HYP + OFF("CMD"), 4, cmd)
        return self.m.mmio_read(HYP + OFF("STATUS"), 4), self.m.mmio_read(HYP + OFF("RESULT"), 8)

    def share(self, gpa: int, pages: int = 1) -> int:
        return self(hyp.CMD_SHARE, gpa, pages)[0]

    def unshare(self, gpa: int, pages: int = 1) -> int:
        return self(hyp.CMD_UNSHARE, gpa, pages)[0]

    def translate(self, gpa: int) -> int:
        status, mpa = self(hyp.CMD_TRANSLATE, gpa)
        assert status == 0
        return mpa

    def exchange(self, gpa: int, pages: int, bits: int = 32) -> tuple[int, int]:
        self.m.mmio_write(HYP + OFF("ADDR_BITS"), 4, bits)
        return self(hyp.CMD_EXCHANGE, gpa, pages)

    @property
    def shared(self) -> int:
        return self.m.mmio_read(HYP + OFF("SHARED"), 8)


@pytest.fixture(params=["direct", "scattered"])
def sm(request):
    with Machine.from_board("rcar-virt", p2m=request.param, secure=True, quiet=True) as m:
        yield m


# -- the board key, sysinfo ---------------------------------------------------------------------------

@pytest.mark.parametrize("p2m, secure, flags", [("direct", False, 1), ("direct", True, 5),
                                                 ("scattered", False, 2), ("scattered", True, 6)])
def test_sysinfo_flags_bit_2(p2m, secure, flags):
    with Machine.from_board("rcar-virt", p2m=p2m, secure=secure, quiet=True) as m:
        assert m.mmio_read(SYSINFO_FLAGS, 4) == flags


def test_board_key_secure():
    spec = load_board("rcar-virt")
    assert spec.secure is False
    data = {"secure": True, "device": [{"type": "sysinfo", "base": 0x0C000000}]}
    with Machine(parse_board(data, "s.toml"), quiet=True) as m:
        assert m.dom0.secure and m.mmio_read(SYSINFO_FLAGS, 4) == 5
    with pytest.raises(BoardError, match="secure must be true or false"):
        parse_board({"secure": "yes"}, "s.toml")
    with pytest.raises(BoardError, match=r"domain 'd1': unknown key\(s\) secur"):
        parse_board({"domain": [{"name": "d1", "secur": True}]}, "s.toml")


# -- the private check ----------------------------------------------------------------------------------

def test_private_pages_are_refused_after_translation(sm):
    h = Hyp(sm)
    sm.write_guest(0x10_0000, b"secret" * 100)                            # the CPU is never refused
    src, dst = h.translate(0x10_0000), h.translate(0x20_0000)
    assert sm.dma("dma3", src, dst, 64) == (7, src)
    assert sm.read_guest(0x20_0000, 6) == bytes(6)                        # nothing written
    assert h.share(0x10_0000) == 0
    assert sm.dma("dma3", src, dst, 64) == (7, dst)                       # then the destination
    assert h.share(0x20_0000) == 0
    assert sm.dma("dma3", src + 8, dst, 64) == (0, 0)
    assert sm.read_guest(0x20_0000, 64) == (b"secret" * 100)[8:72]
    assert h.unshare(0x20_0000) == 0
    assert sm.dma("dma3", src, dst, 64) == (7, dst)
    assert sm.fault_log[-1].status == 7 and "private page of domain dom0" in sm.fault_log[-1].reason


def test_first_private_page_of_a_multi_page_copy():
    with Machine.from_board("rcar-virt", secure=True, quiet=True) as m:
        h = Hyp(m)
        h.share(0x10_0000, 3)
        h.share(0x20_0000, 3)
        h.unshare(0x10_1000)
        assert m.dma("dma3", 0x10_0800, 0x20_0800, 0x2000) == (7, 0x10_1000)      # the page base
        h.share(0x10_1000)
        h.unshare(0x20_0000)
        assert m.dma("dma3", 0x10_0800, 0x20_0800, 0x2000) == (7, 0x20_0800)      # the copy's start


def test_iommu_table_walks_are_exempt_and_the_iommu_records_nothing():
    """Stage-1 tables in private guest pages walk fine; the data page's privacy is judged after."""
    m = wide_machine(secure=True, quiet=True)
    try:
        rig, h = Rig(m), Hyp(m)
        t = Tables(m)                                                   # tables in hypervisor frames
        rig.linux_context(1, t.root, utlbs=(32,))
        t.map(0x1000_0000, 0x30_0000)
        t.map(0x1000_1000, 0x31_0000)
        h.share(0x31_0000)
        assert m.dma("dma0", 0x1000_0000, 0x1000_1000, 16) == (7, 0x1000_0000)
        assert rig.fault_record(1) == (0, 0) and m.devices["ipmmu_mm"].faults == 0
        h.share(0x30_0000)
        assert m.dma("dma0", 0x1000_0000, 0x1000_1000, 16) == (0, 0)
        # a Xen stage-2 context walks the P2M, which lives in hypervisor frames: exempt as well
        rig.xen_context(2, m.dom0.p2m.root, utlbs=(33,))
        assert m.dma("dma1", 0x30_0000, 0x31_0000, 16) == (0, 0)
        assert m.dma("dma1", 0x40_0000, 0x31_0000, 16) == (7, 0x40_0000)
    finally:
        m.close()


def _stage2(m: Machine) -> Rig:
    rig = Rig(m)
    rig.xen_context(1, m.dom0.p2m.root)
    return rig


@pytest.mark.parametrize("status", [0, 2, 3, 4, 5, 6, 7, 8])
def test_every_status_code_on_a_secure_machine(status):
    """Each STATUS the dma engine reports, with private pages around to show the order of checks:
    length, mask, translation (2, 3), then the private check (7), then isolation (8)."""
    spec = load_board("rcar-virt")
    spec.unprotected = "fault" if status == 5 else "bypass"
    spec.isolation = "fault" if status == 8 else "warn"
    with Machine(spec, secure=True, quiet=True) as m:
        h = Hyp(m)
        h.share(0x10_0000)
        h.share(0x20_0000)
        m.write_guest(0x10_0000, b"x" * 64)
        if status == 0:
            assert m.dma("dma3", 0x10_0000, 0x20_0000, 64) == (0, 0)
        elif status == 2:                          # not in the P2M beats private
            _stage2(m)
            assert m.dma("dma0", 0x30_0000, 0xB00_0000, 8) == (2, 0xB00_0000)
        elif status == 3:                          # read-only in the P2M beats a private source
            _stage2(m)
            m.dom0.p2m.protect(0x20_0000, PAGE, R)
            assert m.dma("dma0", 0x30_0000, 0x20_0000, 8) == (3, 0x20_0000)
        elif status == 4:
            assert m.dma("dma3", 0x30_0000, 0x20_0000, 0) == (4, 0)
        elif status == 5:
            assert m.dma("dma3", 0x30_0000, 0x20_0000, 8) == (5, 0x30_0000)
        elif status == 6:                          # the mask comes first of all
            assert m.dma("dma3", 0x30_0000, G4, 8) == (6, G4)
        elif status == 7:
            assert m.dma("dma3", 0x10_0000, 0x30_0000, 8) == (7, 0x30_0000)
        else:                                      # the hypervisor's pool: a crossing, refused
            pool = m.dom0.p2m.root
            assert m.dma("dma3", pool, 0x20_0000, 8) == (8, pool)
            # a private page anywhere in the copy is judged before any crossing
            assert m.dma("dma3", pool, 0x30_0000, 8) == (7, 0x30_0000)
        if status:
            assert m.read_guest(0x20_0000, 8) == bytes(8)


def test_not_secure_machines_have_no_private_frames():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        assert not m.frames.secure and m.dma("dma3", 0x10_0000, 0x20_0000, 64) == (0, 0)


# -- the hyp window ---------------------------------------------------------------------------------------

def test_hyp_registers():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        assert m.mmio_read(HYP + OFF("ADDR_BITS"), 4) == 32
        m.mmio_write(HYP + OFF("ADDR_BITS"), 4, 40)
        assert m.mmio_read(HYP + OFF("ADDR_BITS"), 4) == 40
        m.mmio_write(HYP + OFF("GPA"), 4, 0x1234_5000)                  # 8-byte registers in halves
        m.mmio_write(HYP + OFF("GPA") + 4, 4, 0x1)
        assert m.mmio_read(HYP + OFF("GPA"), 8) == 0x1_1234_5000
        assert m.mmio_read(HYP + OFF("CMD"), 4) == 0                   # write-only
        for ro in ("STATUS", "RESULT", "SHARED"):
            m.mmio_write(HYP + OFF(ro), 4, 0x55)
            assert m.mmio_read(HYP + OFF(ro), 4) == 0
        assert m.devices["hyp"].domain is m.dom0


@pytest.mark.parametrize("gpa, pages", [
    (0x10_0010, 1),                    # unaligned
    (0x10_0000, 0),                    # PAGES 0
    (0x0A00_0000, 1),                  # the device window: not RAM
    (0x7FF_F000, 2),                   # runs past the end of 128 MiB
    ((1 << 64) - PAGE, 0xFFFF_FFFF),   # wraps
    (G4, 1),                           # no RAM above 4 GiB with 128 MiB
])
def test_bad_ranges_answer_1_for_every_command(gpa, pages):
    with Machine.from_board("rcar-virt", secure=True, quiet=True) as m:
        h = Hyp(m)
        for cmd in (hyp.CMD_SHARE, hyp.CMD_UNSHARE, hyp.CMD_TRANSLATE, hyp.CMD_EXCHANGE):
            assert h(cmd, gpa, pages) == (1, 0)
        assert h.shared == 0


def test_share_and_unshare_answer_2_when_not_secure_before_the_range():
    with Machine.from_board("rcar-virt", p2m="scattered", quiet=True) as m:
        h = Hyp(m)
        assert h.share(0x10_0000) == 2 and h.unshare(0x10_0000) == 2
        assert h.share(0x10_0010, 0) == 2                                # a bad range, still 2
        assert h.shared == 0
        assert h(hyp.CMD_TRANSLATE, 0x10_0000) == (0, 0x20_1000)          # frame 2i + 1
        assert h(9, 0x10_0000)[0] == hyp.STATUS_BAD_COMMAND


def test_shared_counts_distinct_pages_and_sharing_twice_changes_nothing(sm):
    h = Hyp(sm)
    assert h.shared == 0
    assert h.share(0x10_0000, 4) == 0 and h.shared == 4
    assert h.share(0x10_2000, 4) == 0 and h.shared == 6                  # overlap counted once
    assert h.unshare(0x10_0000, 1) == 0 and h.shared == 5
    assert h.unshare(0x10_0000, 1) == 0 and h.shared == 5                # unsharing a private page
    assert h.unshare(0x0, 16 << 8) == 0 and h.shared == 0
    sm.write_guest(0x10_0000, b"kept")
    h.share(0x10_0000)
    assert sm.read_guest(0x10_0000, 4) == b"kept"                         # contents are kept


def test_translate(sm):
    h = Hyp(sm)
    for gpa in (0, 0x10_0000, 0x7FF_F000):
        assert h.translate(gpa) == sm.dom0.p2m.translate(gpa)


# -- exchange ----------------------------------------------------------------------------------------------

def test_exchange_on_a_direct_mapped_domain_never_moves():
    with Machine.from_board("rcar-virt", ram="192M", quiet=True) as m:
        h = Hyp(m)
        assert h.exchange(0x10_0000, 8) == (0, 0x10_0000)
        assert h.exchange(G4, 8) == (3, 0)                               # above 2^32: cannot move
        assert h.exchange(G4, 8, bits=33) == (0, G4)


@pytest.mark.parametrize("secure", [False, True])
def test_exchange_moves_pages_keeps_contents_and_sharing(secure):
    with Machine.from_board("rcar-virt", p2m="scattered", secure=secure, quiet=True) as m:
        h = Hyp(m)
        data = bytes((i * 7 + 3) & 0xFF for i in range(8 * PAGE))
        m.write_guest(0x10_0000, data)
        if secure:
            h.share(0x10_0000, 4)                                         # half shared
        old = [h.translate(0x10_0000 + i * PAGE) for i in range(8)]
        status, base = h.exchange(0x10_0000, 8)
        assert status == 0 and base + 8 * PAGE <= G4 and base % PAGE == 0
        assert [h.translate(0x10_0000 + i * PAGE) for i in range(8)] == [base + i * PAGE for i in range(8)]
        assert m.read_guest(0x10_0000, len(data)) == data                 # the CPU sees the same bytes
        assert m.memory.read(base, len(data)) == data                      # ... in the new frames
        owner = m.dom0.owner
        for i, f in enumerate(range(base // PAGE, base // PAGE + 8)):
            assert m.frames.map[f] == owner | (PRIVATE if secure and i >= 4 else 0)
        for mpa in old:
            assert m.frames.map[mpa // PAGE] == FREE and m.memory.read(mpa, PAGE) == bytes(PAGE)   # scrubbed
        if secure:
            assert h.shared == 4
            assert m.dma("dma3", base, base + 4 * PAGE, 16) == (7, base + 4 * PAGE)
            assert m.dma("dma3", base, base + PAGE, 16) == (0, 0)
        assert h.exchange(0x10_0000, 8) == (0, base)                      # already contiguous: stays


def test_exchange_flushes_an_ipmmu_stage2_context():
    """A warm IPMMU stage-2 context over the pages sees the new frames after the exchange."""
    m = wide_machine(p2m="scattered", quiet=True)
    try:
        rig, h = _stage2(m), Hyp(m)
        m.write_guest(0x40_0000, b"A" * PAGE + b"B" * PAGE)
        assert m.dma("dma0", 0x40_0000, 0x50_0000, 16) == (0, 0)          # warm: IOTLB holds the old frames
        old = h.translate(0x40_0000)
        status, base = h.exchange(0x40_0000, 2)
        assert status == 0 and base != old
        m.memory.write(base, b"N" * 16)                                    # only the new frame says N
        assert m.dma("dma0", 0x40_0000, 0x50_0000, 16) == (0, 0)
        assert m.read_guest(0x50_0000, 16) == b"N" * 16
        assert m.dma("dma0", 0x50_0000, 0x40_1000, 16) == (0, 0)          # writes land in the new frame
        assert m.memory.read(base + PAGE, 16) == b"N" * 16
        assert rig.fault_record(1) == (0, 0)
    finally:
        m.close()


def test_exchanges_of_4096_pages_never_run_out():
    with Machine.from_board("rcar-virt", p2m="scattered", ram="64M", cpu=False, quiet=True) as m:
        h = Hyp(m)
        for k in range(16):
            status, base = h.exchange(k * 256 * PAGE, 256)
            assert status == 0 and base + 256 * PAGE <= G4
        assert h.exchange(0x200_0000, 4, bits=13) == (3, 0)               # nothing that low is free


# -- virtio devices and private memory ------------------------------------------------------------------

def test_virtio_device_needs_reset_on_a_private_buffer(caplog):
    with Machine.from_board("rcar-virt", p2m="scattered", secure=True, quiet=True) as m:
        h = Hyp(m)
        drv = VirtioDriver(m)
        assert h.share(drv.area, 0x80) == 0                               # rings and buffers shared
        drv.init()
        assert drv.attach(1) == 0
        drv.mem_write(0x60_0000, bytes(8))
        used = drv.reqq.used_idx()
        with caplog.at_level(logging.WARNING, logger="vmm"):
            drv.raw_chain([(0x60_0000, 24, 1, 1), (drv.buf, 4, 2, 0)])   # body in a private page
        assert drv.status & NEEDS_RESET and drv.r(0x060) & 2               # config interrupt
        assert [r.getMessage() for r in caplog.records if "needs reset" in r.getMessage()][0].startswith(
            "virtio: device needs reset: virtio0: private memory: touches private memory")
        assert drv.reqq.used_idx() == used                                 # no buffer used
        before = drv.mem_read(drv.buf, 4)
        drv.mem_write(drv.buf + 0x100, bytes(24))
        drv.reqq.write_desc(2, drv.buf + 0x100, 24, 1, 3)
        drv.reqq.write_desc(3, drv.buf, 4, 2, 0)
        drv.reqq.make_available(2)
        drv.w(QUEUE_NOTIFY, REQ_Q)
        assert drv.reqq.used_idx() == used and drv.mem_read(drv.buf, 4) == before
        drv.init()                                                         # a reset brings it back
        assert drv.attach(1) == 0 and not drv.status & NEEDS_RESET
