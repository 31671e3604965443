"""IPMMU-VMSA translation: stage 1 (Linux), stage 2 (Xen), faults, IRQ, TLB (facts/ipmmu.md section 10).

Everything is driven through the bus (m.mmio_write / m.dma) as a driver would, and results are read
back from registers, the dma engines and memory."""
from __future__ import annotations

import pytest
from test_ipmmu_support import DS0, DS1, LEAF, MM, NSTABLE, PAGE, TABLE, Rig, Tables, wide_machine

from vmm import Machine
from vmm.walker import F_S2, R, Stage, W

MIB = 1 << 20
TF, PF, ABORT = 1, 2, 4


def imstr(bit: int, errcode: int, errlvl: int) -> int:
    return bit | errcode << 8 | errlvl << 12


@pytest.fixture
def rig():
    m = wide_machine()
    yield Rig(m)
    m.close()


@pytest.fixture
def linux(rig):
    """Context 1 in Linux stage-1 mode for dma0/dma1, with a few pages mapped."""
    t = Tables(rig.m)
    rig.linux_context(1, t.root)
    rig.t = t
    t.map(0x1000_0000, 0x20_0000, ro=True)           # src, read-only
    t.map(0x1000_1000, 0x20_1000)                    # dst, read-write
    t.map(0x1000_2000, 0x20_2000)
    rig.m.memory.write(0x20_0000, bytes(range(256)) * 16)
    return rig


# -- stage 1 ----------------------------------------------------------------------------------------

def test_linux_copy_goes_through_the_tables(linux):
    m = linux.m
    assert m.dma("dma0", 0x1000_0010, 0x1000_1F00, 0x200) == (0, 0)     # crosses into 0x1000_2000
    src = m.memory.read(0x20_0010, 0x200)
    assert m.memory.read(0x20_1F00, 0x100) + m.memory.read(0x20_2000, 0x100) == src
    assert m.dma("dma1", 0x1000_0000, 0x1000_2000, 16) == (0, 0)         # uTLB 33, same context
    assert linux.fault_record(1) == (0, 0) and linux.edges == []


def test_blocks_2m_and_1g(linux):
    m, t = linux.m, linux.t
    t.map(0x2000_0000, 0x40_0000, 2 * MIB)
    t.map(0x4000_0000, 0, 1 << 30)
    m.memory.write(0x40_0000 + 0x1F_F000, b"2M block tail")
    assert m.dma("dma0", 0x2000_0000 + 0x1F_F000, 0x4000_0000 + 0x30_0000, 13) == (0, 0)
    assert m.memory.read(0x30_0000, 13) == b"2M block tail"


def test_va64_stage1_variant(rig):
    """IMCTR.VA64 = 1: TSZ0[5:0] is a T0SZ; a 39-bit space from level 1 (512-entry root)."""
    t = Tables(rig.m, ia_bits=39, start_level=1)
    rig.linux_context(2, t.root, ttbcr=0x80000080 | 25, imctr=0x20000007)
    t.map(0x40_0000_0000 + 0x5000, 0x21_0000)                  # IOVA bit 38 set: L1 index 256
    rig.m.memory.write(0x21_0000, b"va64")
    assert rig.m.dma("dma0", 0x40_0000_5000, 0x40_0000_5800, 4) == (0, 0)
    assert rig.m.memory.read(0x21_0800, 4) == b"va64"
    assert rig.m.dma("dma0", 1 << 39, 0x40_0000_5800, 4) == (2, 1 << 39)
    assert rig.fault_record(2) == (imstr(TF, 0, 0), 1 << 39)


def test_stage1_with_level2_start(rig):
    """SL0 = 1 (level 2) with VA64 = 0, TSZ0 = 2: a 30-bit space, 512-entry level-2 root."""
    t = Tables(rig.m, ia_bits=30, start_level=2)
    rig.linux_context(1, t.root, ttbcr=0x80000040 | 2)
    t.map(0x3FFF_F000, 0x22_0000)
    assert rig.m.dma("dma0", 0x3FFF_F000, 0x3FFF_F800, 8) == (0, 0)
    assert rig.m.dma("dma0", 0x4000_0000, 0x3FFF_F800, 8) == (2, 0x4000_0000)
    assert rig.fault_record(1)[0] == imstr(TF, 0, 0)


# -- faults ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["perm", "l3-invalid", "l2-invalid", "l1-invalid", "l3-reserved", "ns-leaf",
                                  "nstable", "oa-40bit", "abort-root", "abort-l3"])
def test_fault_kinds(linux, case):
    m, t, mem = linux.m, linux.t, linux.m.memory
    src, dst = 0x1000_0000, 0x1000_1000
    if case == "perm":
        dst, want, status = 0x1000_0000, imstr(PF, 4, 3), 3
    elif case == "l3-invalid":
        dst, want, status = 0x1000_5000, imstr(TF, 1, 3), 2
    elif case == "l2-invalid":
        dst, want, status = 0x1020_0000, imstr(TF, 1, 2), 2
    elif case == "l1-invalid":
        dst, want, status = 0xC000_0000, imstr(TF, 1, 1), 2
    elif case == "l3-reserved":
        mem.write64(t.slot(dst, 3), 0x20_1000 | LEAF | 1)          # block encoding at level 3
        want, status = imstr(TF, 1, 3), 2
    elif case == "ns-leaf":
        mem.write64(t.slot(dst, 3), 0x20_1000 | (LEAF & ~(1 << 5)) | 3)
        want, status = imstr(PF, 5, 3), 3
    elif case == "nstable":
        mem.write64(t.root, mem.read64(t.root) & ~NSTABLE)        # L1[0] table without NSTable
        src, want, status = 0x1000_0000, imstr(PF, 5, 1), 3
        dst = src
    elif case == "oa-40bit":
        mem.write64(t.slot(dst, 3), (1 << 40) | LEAF | 3)
        want, status = imstr(TF, 1, 3), 2
    elif case == "abort-root":
        linux.wr(MM, 1, "IMTTUBR0", 0xFF)                          # TTBR far outside machine memory
        linux.flush(1)
        dst = src
        want, status = imstr(ABORT, 0, 1), 2
    else:                                                          # abort-l3: L2 points outside memory
        dst = 0x1040_0000
        mem.write64(t.slot(dst, 2), 0xF0_0000_0000 | NSTABLE | TABLE)
        want, status = imstr(ABORT, 0, 3), 2
    page = dst if case not in ("nstable", "abort-root") else src      # the copy's first byte
    assert m.dma("dma0", src, dst, 64) == (status, page)
    assert linux.fault_record(1) == (want, page)
    assert linux.edges == [(0, True)]
    linux.clear(1)
    assert linux.edges == [(0, True), (0, False)] and linux.fault_record(1) == (0, 0)


def test_write_zero_to_clear_and_first_fault_kept(linux):
    m = linux.m
    assert m.dma("dma0", 0x1000_0000, 0x1000_0000, 8)[0] == 3        # PF at level 3
    assert m.dma("dma1", 0x1000_9000, 0x1000_1000, 8)[0] == 2        # TF: only ORs its bit in
    status, addr = linux.fault_record(1)
    assert status == imstr(PF | TF, 4, 3) and addr == 0x1000_0000
    linux.wr(MM, 1, "IMSTR", status)                                 # write-back: no change
    assert linux.fault_record(1) == (status, addr)
    linux.wr(MM, 1, "IMSTR", status & ~PF)                           # TF remains: record kept
    assert linux.fault_record(1) == (imstr(TF, 4, 3), addr)
    assert linux.edges == [(0, True)]
    linux.wr(MM, 1, "IMSTR", ~TF & 0xFFFFFFFF)                       # no fault bit left: all gone
    assert linux.fault_record(1) == (0, 0) and linux.edges == [(0, True), (0, False)]


def test_irq_follows_inten(linux):
    linux.wr(MM, 1, "IMCTR", 0x1)                                    # MMUEN without INTEN
    assert linux.m.dma("dma0", 0x1000_0000, 0x1000_0000, 8)[0] == 3
    assert linux.edges == [] and linux.rd(MM, 1, "IMSTR") & PF
    linux.wr(MM, 1, "IMCTR", 0x5)                                    # INTEN with a fault pending
    assert linux.edges == [(0, True)]
    assert linux.m.irqs.lines[0].level
    linux.wr(MM, 1, "IMCTR", 0x1)
    assert linux.edges == [(0, True), (0, False)]
    linux.wr(MM, 1, "IMCTR", 0x5)
    linux.clear(1)
    assert linux.edges[-2:] == [(0, True), (0, False)] and not linux.m.irqs.lines[0].level


@pytest.mark.parametrize("how", ["context-off", "eae-0", "pmb-without-va64", "sl0-reserved", "beyond-input",
                                 "crossing-limit", "tsz-too-small"])
def test_configuration_faults_have_errcode_0(linux, how):
    m, t = linux.m, linux.t
    src, dst, fault_at = 0x1000_0000, 0x1000_1000, 0x1000_0000
    if how == "context-off":
        linux.wr(MM, 1, "IMCTR", 0x2)
    elif how == "eae-0":
        linux.wr(MM, 1, "IMTTBCR", 0x00000080)
    elif how == "pmb-without-va64":
        linux.wr(MM, 1, "IMTTBCR", 0xC0000058)
    elif how == "sl0-reserved":
        linux.wr(MM, 1, "IMTTBCR", 0x800000C0)
    elif how == "beyond-input":
        dst = fault_at = 1 << 32
    elif how == "crossing-limit":
        t.map(0xFFFF_F000, 0x20_3000)
        dst, fault_at = 0xFFFF_F800, 1 << 32
    else:
        linux.wr(MM, 1, "IMCTR", 0x20000005)                         # VA64, T0SZ 63: 1-bit input space
        linux.wr(MM, 1, "IMTTBCR", 0x8000008F | 0x30)
    if how != "context-off":
        linux.flush(1)
    status, fault = m.dma("dma0", src, dst, 0x1000)
    assert (status, fault) == (2, fault_at)
    assert linux.fault_record(1) == (imstr(TF, 0, 0), fault_at)


def test_ttsel_beyond_contexts_aborts_without_record(linux):
    linux.imuctr(DS1, 32, 9 << 4 | 1)
    assert linux.m.dma("dma0", 0x1000_0000, 0x1000_1000, 8) == (2, 0x1000_0000)
    assert all(linux.fault_record(c) == (0, 0) for c in range(8)) and linux.edges == []


def test_outside_machine_memory_aborts_without_record(linux):
    m, t = linux.m, linux.t
    t.map(0x1000_3000, 0xFF_FFFF_F000)                               # a 40-bit OA with no memory
    assert m.dma("dma0", 0x1000_0000, 0x1000_3000, 8) == (2, 0x1000_3000)
    linux.imuctr(DS1, 32, 0)                                         # pass-through beyond memory
    assert m.dma("dma0", 0x10_0000_0000, 0x1000, 8) == (2, 0x10_0000_0000)
    assert linux.fault_record(1) == (0, 0) and linux.edges == []


def test_pass_through_when_utlb_off(rig):
    rig.m.memory.write(0x50_0000, b"untranslated")
    assert rig.m.dma("dma4", 0x50_0000, 0x51_0000, 12) == (0, 0)
    assert rig.m.memory.read(0x51_0000, 12) == b"untranslated"


def test_garbage_registers_never_raise(rig):
    """Nonsense values everywhere: every access ends in a status, never a Python exception."""
    import random

    rnd = random.Random(5)
    for _ in range(400):
        base = rnd.choice([MM, DS0, DS1])
        off = rnd.randrange(0, 0x1000, 4) if rnd.random() < 0.5 else rnd.choice([0x300, 0x600, 0x610, 0x40, 0x48,
                                                                                  0x50, 0x54, 0x504])
        rig.m.mmio_write(base + off, rnd.choice([1, 2, 4, 8]), rnd.getrandbits(64))
        if rnd.random() < 0.2:
            eng = rnd.choice(["dma0", "dma1", "dma4"])
            status, _ = rig.m.dma(eng, rnd.getrandbits(rnd.choice([12, 32, 48, 64])),
                                  rnd.getrandbits(rnd.choice([12, 32, 40, 64])), rnd.randrange(1, 0x3000))
            assert status in (0, 2, 3)


# -- TLB ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flush", ["root-imctr", "cache-imctr", "imuctr"])
def test_no_stale_translation_after_flush(linux, flush):
    m, t = linux.m, linux.t
    m.memory.write(0x20_5000, b"old frame!")
    m.memory.write(0x20_6000, b"new frame!")
    t.map(0x1000_4000, 0x20_5000)
    assert m.dma("dma0", 0x1000_4000, 0x1000_1000, 10) == (0, 0)     # warm the TLB
    t.map(0x1000_4000, 0x20_6000)                                    # retarget, as unmap + map would
    if flush == "root-imctr":
        linux.wr(MM, 1, "IMCTR", linux.rd(MM, 1, "IMCTR") | 2)
    elif flush == "cache-imctr":
        linux.wr(DS1, 1, "IMCTR", linux.rd(DS1, 1, "IMCTR") | 2)
    else:
        linux.imuctr(DS1, 32, 1 << 4 | 3)
    assert m.dma("dma0", 0x1000_4000, 0x1000_1000, 10) == (0, 0)
    assert m.memory.read(0x20_1000, 10) == b"new frame!"
    t.unmap(0x1000_4000)
    linux.flush(1)
    assert m.dma("dma0", 0x1000_4000, 0x1000_1000, 10) == (2, 0x1000_4000)


def test_map_without_flush_is_seen(linux):
    """Linux does not flush after map: a faulting lookup must not be cached."""
    m, t = linux.m, linux.t
    assert m.dma("dma0", 0x1000_0000, 0x1000_7000, 8)[0] == 2
    linux.clear(1)
    t.map(0x1000_7000, 0x20_7000)
    assert m.dma("dma0", 0x1000_0000, 0x1000_7000, 8) == (0, 0)


def test_translations_are_cached_per_context(linux):
    m = linux.m
    m.dma("dma0", 0x1000_0000, 0x1000_1000, 8)
    m.walker.reset_stats()
    m.dma("dma0", 0x1000_0000, 0x1000_1000, 8)
    assert m.walker.stats()["walks"] == 0


# -- stage 2 -----------------------------------------------------------------------------------------

@pytest.fixture(params=["direct", "scattered"])
def xen(request):
    m = wide_machine(p2m=request.param)
    rig = Rig(m)
    rig.xen_context(1, m.dom0.p2m.root)
    yield rig
    m.close()


def test_stage2_dma_by_ipa_matches_the_cpu_view(xen):
    m = xen.m
    data = bytes((i * 37 + 11) & 0xFF for i in range(5 * PAGE))
    m.dom0.write(0x40_0123, data)
    assert m.dma("dma0", 0x40_0123, 0x60_0F00, len(data)) == (0, 0)
    assert m.dom0.read(0x60_0F00, len(data)) == data
    port = m.devices["ipmmu_ds1"].translator(32, m.dom0)
    for gpa in range(0, 128 * MIB, 3 * MIB + 0x5000):
        assert port.translate(gpa, 1, False) == [(m.dom0.p2m.translate(gpa), 1)]


def test_stage2_faults(xen):
    m = xen.m
    assert m.dma("dma0", 0xB00_0010, 0x1000, 8) == (2, 0xB00_0010)  # outside RAM: not in the P2M
    assert xen.fault_record(1) == (imstr(TF, 1, 2), 0xB00_0010)
    xen.clear(1)
    assert m.dma("dma1", 0x1000, (1 << 40) + 0x3000, 8) == (2, (1 << 40) + 0x3000)
    assert xen.fault_record(1) == (imstr(TF, 0, 0), (1 << 40) + 0x3000)
    xen.clear(1)
    m.dom0.p2m.protect(0x70_0000, PAGE, R)                           # read-only in the P2M
    assert m.dma("dma0", 0x1000, 0x70_0000, 8) == (3, 0x70_0000)
    status, _ = xen.fault_record(1)
    assert status & PF and (status >> 8) & 7 == 4


def test_stage2_without_s2pte_decodes_stage1_descriptors(xen):
    """Forgetting IMSAUXCTLR.S2PTE is a visible bug: S2AP write permission reads as AP[2] = RO."""
    m = xen.m
    m.mmio_write(MM + 0x504, 4, 0)
    xen.flush(1)
    assert m.dma("dma0", 0x1000, 0x2000, 8)[0] == 3
    assert xen.fault_record(1)[0] == imstr(PF, 4, 3 if m.board.p2m == "scattered" else 2)


def test_p2m_change_flushes_contexts_on_that_root(xen):
    """The machine flushes the context whose TTBR is the changed P2M's root (Xen's iommu_iotlb_flush):
    a cached read-write translation must not outlive a protect, an unmap or a remap."""
    m, p2m = xen.m, xen.m.dom0.p2m
    m.dom0.write(0x80_0000, b"first frame")
    assert m.dma("dma0", 0x80_0000, 0x90_0000, 11) == (0, 0)         # warm both pages (RW)
    p2m.protect(0x90_0000, PAGE, R)
    assert m.dma("dma0", 0x80_0000, 0x90_0000, 11) == (3, 0x90_0000)
    xen.clear(1)
    p2m.unmap(0x80_0000, PAGE)
    assert m.dma("dma0", 0x80_0000, 0xA0_0000, 11) == (2, 0x80_0000)
    xen.clear(1)
    frame = m.memory.alloc(PAGE, PAGE)
    m.memory.write(frame, b"moved frame")
    p2m.map(0x80_0000, frame, PAGE)
    assert m.dma("dma0", 0x80_0000, 0xA0_0000, 11) == (0, 0)
    assert m.dom0.read(0xA0_0000, 11) == b"moved frame"


def test_p2m_change_leaves_other_contexts_cached(xen):
    m = xen.m
    t = Tables(m)
    t.map(0x1000, 0x20_0000)
    t.map(0x2000, 0x20_1000)
    xen.linux_context(2, t.root, cache=DS0, utlbs=(0,))              # stage 1, TTBR not a P2M root
    assert m.dma("dma4", 0x1000, 0x2000, 8) == (0, 0)
    m.dom0.p2m.protect(0x90_0000, PAGE, R)
    m.walker.reset_stats()
    assert m.dma("dma4", 0x1000, 0x2000, 8) == (0, 0)
    assert m.walker.stats()["walks"] == 0


def test_stage2_walks_the_live_p2m_like_the_reference(xen):
    """The IPMMU context is Xen's VTTBR view: same answers as a reference stage-2 walk of the P2M."""
    from vmm.walker.reference import ReferenceWalker

    m = xen.m
    ref = ReferenceWalker(m.memory)
    ref.context(0, None, Stage(ttbr=m.dom0.p2m.root, ia_bits=40, start_level=1, oa_bits=40, flags=F_S2))
    port = m.devices["ipmmu_ds1"].translator(32, m.dom0)
    for gpa in (0, 0x1234, 0x7FF_F000, 0x800_0000, 0xFF_FFFF_F000):
        want = ref.translate_range(0, gpa, 0x1800, W)
        try:
            got = port.translate(gpa, 0x1800, True)
        except Exception as e:                                     # DmaFault
            got = e
        if isinstance(want, list):
            assert got == want
        else:
            assert got.address == max(want.address & ~0xFFF, gpa)
            xen.clear(1)


# -- the uTLB-sharing hazard --------------------------------------------------------------------------

def _two_domain_board():
    import tomllib
    from importlib import resources

    from vmm.board import parse_board

    data = tomllib.loads((resources.files("vmm") / "boards" / "rcar-virt.toml").read_text())
    data["domain"] = [{"name": "dom1", "ram": "16M"}]
    data["device"].append({"type": "dma", "name": "dma5", "base": 0x0B005000, "irq": 13,
                           "iommu": "ipmmu_ds1", "master": 32, "domain": "dom1"})
    return parse_board(data, "two-domains")


def test_shared_utlb_breaks_isolation(caplog):
    """dom1's dma5 sits on dom0's uTLB (ds1 uTLB 32). The harness warns; and the IPMMU translates
    dom1's DMA with the context IMUCTR32 names -- dom0's stage-2 context over dom0's P2M. Xen's
    driver prevents exactly this by reading IMUCTR before enabling a uTLB."""
    with caplog.at_level("WARNING", logger="vmm"):
        m = Machine(_two_domain_board())
    try:
        warn = [r.getMessage() for r in caplog.records if "shared" in r.getMessage()]
        assert len(warn) == 1
        assert "ipmmu_ds1" in warn[0] and " 32 " in warn[0] and "dom0" in warn[0] and "dom1" in warn[0]
        dom0, dom1 = m.domains["dom0"], m.domains["dom1"]
        rig = Rig(m)
        rig.xen_context(1, dom0.p2m.root, utlbs=(32,))              # dom0 attaches dma0
        # Xen would refuse to attach dom1's master now: the uTLB already points at context 1
        assert rig.imuctr(DS1, 32) == 0x11
        dom0.write(0x10_0000, b"dom0 secret")
        dom1.write(0x10_0000, b"dom1 public")
        assert m.dma("dma5", 0x10_0000, 0x20_0000, 11) == (0, 0)     # dom1 programs IPAs of its own...
        assert dom0.read(0x20_0000, 11) == b"dom0 secret"            # ...and moves dom0's memory
        assert dom1.read(0x20_0000, 11) == bytes(11)
        # the isolation watchdog saw it: one warning naming the master and whose frames it reached
        assert m.crossings == {("dma5", "domain dom0"): 2}          # the source and the destination
        iso = [r.getMessage() for r in caplog.records if r.getMessage().startswith("isolation:")]
        assert iso == ["isolation: dma5 (domain dom1) reached domain dom0: device address 0x100000 is machine "
                       f"address {dom0.p2m.lookup(0x10_0000)[0]:#x}"]
    finally:
        m.close()


def test_dom0_context_on_ds0_does_not_affect_ds1(rig):
    """Contexts are global, uTLBs are per instance: enabling ds0 uTLB 0 leaves ds1 masters alone."""
    t = Tables(rig.m)
    rig.linux_context(1, t.root, cache=DS0, utlbs=(0,))
    rig.m.memory.write(0x50_0000, b"x")
    assert rig.m.dma("dma0", 0x50_0000, 0x50_1000, 1) == (0, 0)      # ds1 uTLB 32 still pass-through
    assert rig.m.dma("dma4", 0x50_0000, 0x50_1000, 1) == (2, 0x50_0000)


def test_a_page_outside_machine_memory_fails_in_its_turn(linux):
    """facts/ipmmu.md section 10: pages are taken in order; page 1 translating outside machine memory
    fails before page 2's translation fault would, with STATUS 2, FAULT_ADDR at page 1 and no IPMMU
    record or IRQ (the walk itself succeeded)."""
    m = linux.m
    t = Tables(m)
    linux.linux_context(1, t.root)
    beyond = m.memory.size + 0x10_0000                             # below 2^40, above machine memory
    t.map(0x2000_0000, 0x30_0000)
    t.map(0x2000_1000, beyond)                                     # page 2 (0x2000_2000) stays unmapped
    linux.edges.clear()
    assert m.dma("dma0", 0x2000_0010, 0x40_0000, 3 * PAGE) == (2, 0x2000_1000)
    assert linux.fault_record(1) == (0, 0) and linux.edges == []
    t.map(0x2000_1000, 0x31_0000)                                  # now page 2's walk faults first
    linux.flush(1)
    assert m.dma("dma0", 0x2000_0010, 0x40_0000, 3 * PAGE) == (2, 0x2000_2000)
    assert linux.fault_record(1) == (imstr(TF, 1, 3), 0x2000_2000)


@pytest.mark.parametrize("ttbcr, ok", [
    (0xC0000058, True),      # Xen's: SL0 1 (level 1), T0SZ 24
    (0xC0000062, False),     # SL0 1, T0SZ 34: a one-entry root (only T0SZ 21-33 pair with level 1)
    (0xC0000055, True),      # SL0 1, T0SZ 21
    (0xC0000054, False),     # SL0 1, T0SZ 20
    (0xC0000027, True),      # SL0 0 (level 2), T0SZ 39
    (0xC0000028, False),     # SL0 0, T0SZ 40
    (0xC0000098, True),      # SL0 2 (level 0), T0SZ 24
    (0xC0000099, False),     # SL0 2, T0SZ 25
    (0xC00000D8, False),     # SL0 3: reserved
])
def test_stage2_geometry_is_the_arm_pairs(ttbcr, ok):
    """facts section 10: only the Arm SL0/T0SZ pairs are consistent; others fault every access
    with TF, ERRCODE 0, ERRLVL 0."""
    with Machine.from_board("rcar-virt", quiet=True) as m:
        rig = Rig(m)
        rig.xen_context(1, m.dom0.p2m.root)
        rig.wr(MM, 1, "IMTTBCR", ttbcr)
        rig.flush(1)
        status, addr = m.dma("dma0", 0x1010, 0x2000, 8)
        if ok:
            assert rig.fault_record(1)[0] != imstr(TF, 0, 0)            # a walk ran: no configuration fault
            assert status == 0 or rig.fault_record(1)[0] & 0x17
        else:
            assert (status, addr) == (2, 0x1010)
            assert rig.fault_record(1) == (imstr(TF, 0, 0), 0x1010)
