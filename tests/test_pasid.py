"""PASID tables on the virtio-iommu (DESIGN section 6), driven from Python with no CPU.

Every rule is checked by its effect: statuses and used lengths of ATTACH_TABLE / INVALIDATE,
PROBE bytes, bytes moved by dma2 through PASIDs of linear and two-level CD tables whose stage-1
tables (4 KiB pages, 2 MiB blocks) the test builds in guest memory with the io-pgtable-style
editor, fault records with their PASID, stale translations that live until INVALIDATE, and the
fault explanations. On both P2M layouts.
"""
from __future__ import annotations

import struct

import pytest
from virtio_driver import VirtioDriver

from devices import virtio_iommu as vi
from devices.virtio_iommu import S_INVAL, S_NOENT, S_OK
from vmm.machine import Machine
from vmm.p2m_tables import PageTable

EP = 2
DMA2 = 0x0B002000
PASID_REG, PASID_VALID = 0x38, 1 << 31
POOL = 0x02000000                      # guest RAM where the test builds its tables
BUF = 0x01000000                       # guest buffers
CD_LINEAR, CD_4K, CD_64K = 0, 1, 2


@pytest.fixture(scope="module", params=["direct", "scattered"])
def m(request):
    machine = Machine.from_board("rcar-virt", p2m=request.param)
    yield machine
    machine.close()


class GuestMem:
    """The guest's RAM as a table editor's memory (writes go through the P2M like the CPU's)."""

    def __init__(self, m: Machine) -> None:
        self.dom = m.dom0
        self.next = POOL

    def read(self, gpa: int, n: int) -> bytes:
        return self.dom.read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.dom.write(gpa, data)

    def read64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.dom.read(gpa, 8))[0]

    def write64(self, gpa: int, value: int) -> None:
        self.dom.write(gpa, struct.pack("<Q", value))

    def alloc(self, nbytes: int, align: int = 4096) -> int:
        gpa = (self.next + align - 1) & ~(align - 1)
        self.next = gpa + nbytes
        self.write(gpa, bytes(nbytes))
        return gpa


def stage1(g: GuestMem, ia_bits: int = 39) -> PageTable:
    """An io-pgtable-style stage-1 table (4 KiB granule) at guest-physical addresses."""
    sl = 4 - (ia_bits - 4) // 9
    return PageTable(g, stage=1, ia_bits=ia_bits, start_level=sl, oa_bits=40, alloc=g.alloc,
                     free=lambda a, n: None)


def cd_words(pt: PageTable | None, asid: int, *, valid: bool = True, epd0: bool = False, t0sz: int | None = None,
             affd: bool = True, endi: bool = False, aa64: bool = True, ips: int = 2, tg0: int = 0) -> tuple[int, int]:
    """Dwords 0 and 1 of an SMMUv3 CD as Linux's arm_smmu_write_ctx_desc fills them."""
    t0sz = (64 - pt.ia_bits) if t0sz is None else t0sz
    d0 = t0sz | tg0 << 6 | epd0 << 14 | endi << 15 | valid << 31 | ips << 32 | affd << 35 | aa64 << 41 | asid << 48
    return d0, (pt.root if pt is not None else 0)


def write_cd(g: GuestMem, gpa: int, words: tuple[int, int]) -> None:
    g.write(gpa, struct.pack("<QQ", *words) + bytes(48))


def attach_table_req(domain: int, ptr: int, cdmax: int, s1fmt: int = CD_LINEAR, s1dss: int = 0, ep: int = EP,
                     fmt: int = 2, reserved: bytes = bytes(48)) -> bytes:
    return vi.ATTACH_TABLE_REQ.pack(vi.T_ATTACH_TABLE, domain, ep, fmt, s1fmt, s1dss, ptr, cdmax, reserved)


def inv_req(domain: int, gran: int = vi.INV_G_DOMAIN, itype: int = vi.INV_T_IOTLB | vi.INV_T_PASID, flags: int = 0,
            pasid: int = 0, archid: int = 0, vs: int = 0, nr: int = 0, granule: int = 12, res0: int = 0,
            res1: int = 0, res2: bytes = bytes(11)) -> bytes:
    return vi.INVALIDATE_REQ.pack(vi.T_INVALIDATE, gran, itype, flags, res0, domain, pasid, res1, archid, vs, nr,
                                  granule, res2)


@pytest.fixture
def d(m):
    drv = VirtioDriver(m)
    drv.reset()
    drv.init(features=vi.OFFERED, events=8)
    yield drv
    drv.reset()
    set_pasid(m, None)


def set_pasid(m: Machine, pasid: int | None) -> None:
    m.mmio_write(DMA2 + PASID_REG, 4, 0 if pasid is None else PASID_VALID | pasid)


def dma(m: Machine, src: int, dst: int, n: int, pasid: int | None) -> tuple[int, int]:
    set_pasid(m, pasid)
    return m.dma("dma2", src, dst, n)


def pasid_of(ev) -> int:
    return int.from_bytes(ev.raw[12:16], "little")


class Setup:
    """A table domain with a CD table and a few PASIDs, each with its own stage-1 table."""

    def __init__(self, m: Machine, d: VirtioDriver, s1fmt: int = CD_LINEAR, cdmax: int = 4, domain: int = 7,
                 s1dss: int = 0) -> None:
        self.m, self.d, self.g = m, d, GuestMem(m)
        self.g.next = POOL
        self.domain = domain
        if s1fmt == CD_LINEAR:
            self.ptr = self.g.alloc(max(64 << cdmax, 4096), max(64 << cdmax, 64))
        else:
            split = 6 if s1fmt == CD_4K else 10
            self.split = split
            n = 1 << max(0, cdmax - split)
            self.ptr = self.g.alloc(max(8 * n, 64), max(8 * n, 64))
        self.s1fmt, self.cdmax = s1fmt, cdmax
        self.l2: dict[int, int] = {}
        self.tables: dict[int, PageTable] = {}
        self.status = d.status_of(attach_table_req(domain, self.ptr, cdmax, s1fmt, s1dss))

    def cd_addr(self, pasid: int) -> int:
        if self.s1fmt == CD_LINEAR:
            return self.ptr + 64 * pasid
        i = pasid >> self.split
        if i not in self.l2:
            leaf = 64 << self.split
            self.l2[i] = self.g.alloc(leaf, leaf)
            self.g.write64(self.ptr + 8 * i, self.l2[i] | 1)
        return self.l2[i] + 64 * (pasid & ((1 << self.split) - 1))

    def pasid(self, pasid: int, asid: int, **kw) -> PageTable:
        pt = stage1(self.g, kw.pop("ia_bits", 39))
        self.tables[pasid] = pt
        write_cd(self.g, self.cd_addr(pasid), cd_words(pt, asid, **kw))
        return pt


def fill(m: Machine, gpa: int, n: int, seed: int) -> bytes:
    data = bytes((i * 7 + seed) & 0xFF for i in range(n))
    m.dom0.write(gpa, data)
    return data


# -- feature, PROBE, request types ----------------------------------------------------------------

def test_without_the_feature_nothing_changes(m):
    drv = VirtioDriver(m)
    drv.reset()
    drv.init(features=vi.FEATURES, events=0)
    try:
        assert drv.r(0x010) & vi.F_ATTACH_TABLE                  # offered ...
        used, out = drv.probe()
        assert used == 516 and out[24:512] == bytes(488)        # ... but PROBE is the spec's
        assert drv.request(attach_table_req(1, POOL, 0), 4)[0] == 0      # types 6 and 7 unknown: used length 0
        assert drv.request(inv_req(1), 4)[0] == 0
    finally:
        drv.reset()


def test_probe_properties_with_the_feature(d):
    used, out = d.probe()
    assert used == 516 and out[512] == S_OK
    assert out[0:4] == struct.pack("<HH", 1, 20)               # RESV_MEM first, as before
    props = out[24:56]
    assert props == (struct.pack("<HHB3x", 4, 4, 40) + struct.pack("<HHB3x", 5, 4, 20)
                     + struct.pack("<HHH2x", 6, 4, 1) + struct.pack("<HHH2x", 7, 4, 2))
    assert out[56:512] == bytes(456)


# -- ATTACH_TABLE validation ---------------------------------------------------------------------

@pytest.mark.parametrize("what, req, want", [
    ("format 1", attach_table_req(1, POOL, 4, fmt=1), S_INVAL),
    ("s1fmt 3", attach_table_req(1, POOL, 4, s1fmt=3), S_INVAL),
    ("s1dss 3", attach_table_req(1, POOL, 4, s1dss=3), S_INVAL),
    ("s1cdmax 21", attach_table_req(1, POOL, 21), S_INVAL),
    ("reserved", attach_table_req(1, POOL, 4, reserved=b"\1" + bytes(47)), S_INVAL),
    ("linear unaligned", attach_table_req(1, POOL + 512, 4), S_INVAL),        # 16 CDs: 1 KiB alignment
    ("linear min 64", attach_table_req(1, POOL + 32, 0), S_INVAL),
    ("two-level unaligned", attach_table_req(1, POOL + 64, 16, s1fmt=CD_4K), S_INVAL),   # 1024 L1 entries: 8 KiB
    ("outside RAM", attach_table_req(1, 0x0A000000, 4), S_INVAL),
    ("straddles RAM end", attach_table_req(1, (128 << 20) - 1024, 6), S_INVAL),
    ("unknown endpoint", attach_table_req(1, POOL, 4, ep=99), S_NOENT),
    ("ok linear", attach_table_req(1, POOL, 4), S_OK),
    ("ok 64K leaves", attach_table_req(1, POOL + 64, 0, s1fmt=CD_64K), S_OK),
])
def test_attach_table_checks(d, what, req, want):
    assert d.status_of(req) == want, what


def test_attach_table_interactions(d, m):
    dev = m.devices["virtio0"].backend
    assert d.attach(3, EP) == S_OK
    assert d.status_of(attach_table_req(3, POOL, 4)) == S_INVAL           # a normal domain
    assert d.status_of(attach_table_req(1, POOL, 4)) == S_OK              # moves the endpoint; domain 3 dies
    assert 3 not in dev.domains and dev.attached[EP].id == 1
    assert d.status_of(attach_table_req(1, POOL, 4)) == S_OK              # the same table again: no change
    for other in (attach_table_req(1, POOL, 5), attach_table_req(1, POOL, 4, s1dss=1),
                  attach_table_req(1, POOL + 0x1000, 4), attach_table_req(1, POOL, 4, s1fmt=CD_4K)):
        assert d.status_of(other) == S_INVAL                               # a different table
    assert d.attach(1, EP) == S_INVAL                                      # ATTACH to a table domain
    assert d.map(1, 0, 0xFFF, 0x1000) == S_INVAL and d.unmap(1, 0, 0xFFF) == S_INVAL
    assert d.status_of(inv_req(1)) == S_OK
    assert d.detach(1, EP) == S_OK and 1 not in dev.domains
    assert d.status_of(inv_req(1)) == S_NOENT
    assert d.attach(1, EP) == S_OK                                         # the id is free again
    assert d.status_of(inv_req(1)) == S_INVAL                              # not a table domain


def test_table_domains_reuse_walker_contexts(d, m):
    """A guest that creates and destroys table domains forever never runs out of contexts."""
    for i in range(1500):
        assert d.status_of(attach_table_req(100 + i, POOL, 2)) == S_OK
    dev = m.devices["virtio0"].backend
    assert len(dev._free_ctx) <= 1 and len(dev.domains) == 1


# -- INVALIDATE validation -----------------------------------------------------------------------

@pytest.mark.parametrize("what, kw, want", [
    ("gran 0", dict(gran=0), S_INVAL),
    ("gran 3", dict(gran=3), S_INVAL),
    ("type bit 3", dict(itype=8), S_INVAL),
    ("flags bit 3", dict(flags=8), S_INVAL),
    ("reserved @10", dict(res0=1), S_INVAL),
    ("reserved @20", dict(res1=1), S_INVAL),
    ("reserved @49", dict(res2=b"\0" * 10 + b"\1"), S_INVAL),
    ("pasid 2^20", dict(gran=vi.INV_G_PASID, flags=vi.INV_F_PASID, pasid=1 << 20), S_INVAL),
    ("granule PASID without PASID", dict(gran=vi.INV_G_PASID), S_INVAL),
    ("granule VA without PASID/ARCHID", dict(gran=vi.INV_G_VA, nr=1), S_INVAL),
    ("VA granule 11", dict(gran=vi.INV_G_VA, flags=vi.INV_F_ARCHID, nr=1, granule=11), S_INVAL),
    ("VA granule 31", dict(gran=vi.INV_G_VA, flags=vi.INV_F_ARCHID, nr=1, granule=31), S_INVAL),
    ("VA nr 0", dict(gran=vi.INV_G_VA, flags=vi.INV_F_ARCHID, nr=0), S_INVAL),
    ("VA past 2^64", dict(gran=vi.INV_G_VA, flags=vi.INV_F_ARCHID, vs=(1 << 64) - 4096, nr=2), S_INVAL),
    ("VA to 2^64", dict(gran=vi.INV_G_VA, flags=vi.INV_F_ARCHID, vs=(1 << 64) - 4096, nr=1), S_OK),
    ("unknown domain", dict(), S_NOENT),
    ("dev iotlb", dict(domain=7, itype=vi.INV_T_DEV_IOTLB), S_OK),
    ("leaf", dict(domain=7, gran=vi.INV_G_PASID, flags=vi.INV_F_PASID | vi.INV_F_LEAF, pasid=3), S_OK),
])
def test_invalidate_checks(d, m, what, kw, want):
    Setup(m, d)
    if want != S_NOENT and "domain" not in kw:
        kw["domain"] = 7
    assert d.status_of(inv_req(kw.pop("domain", 99), **kw)) == want, what


# -- DMA through PASIDs --------------------------------------------------------------------------

@pytest.mark.parametrize("s1fmt, cdmax, pasids", [
    (CD_LINEAR, 4, (0, 1, 2, 15)),
    (CD_4K, 8, (0, 63, 64, 255)),
    (CD_64K, 12, (1, 1023, 1024, 4095)),
])
def test_dma_through_pasids_is_isolated(d, m, s1fmt, cdmax, pasids):
    s = Setup(m, d, s1fmt, cdmax)
    assert s.status == S_OK
    iova = 0x40000000
    srcs = {}
    for k, p in enumerate(pasids):
        pt = s.pasid(p, asid=10 + k)
        src = BUF + k * 0x10000
        srcs[p] = fill(m, src, 0x3000, k)
        pt.map(iova, src, 0x1000, 1)                         # read-only source page
        pt.map(iova + 0x1000, src + 0x1000, 0x1000, 1)
        pt.map(iova + 0x2000, src + 0x2000, 0x1000, 1)
        dst_block = 0x00800000 + k * 0x200000                 # a 2 MiB block, writable
        pt.map(0x80000000, dst_block, 0x200000, 3)
        m.dom0.write(dst_block, bytes(0x3000))
    for k, p in enumerate(pasids):
        assert dma(m, iova + 0x10, 0x80000000 + 0x100, 0x2ff0, p) == (0, 0)
        assert m.dom0.read(0x00800000 + k * 0x200000 + 0x100, 0x2ff0) == srcs[p][0x10:0x3000]
    # isolation: PASID a's IOVA beyond its mappings faults, and a read-only page refuses writes
    a = pasids[0]
    s.tables[a].unmap(iova + 0x2000, 0x1000)
    d.status_of(inv_req(7, vi.INV_G_PASID, vi.INV_T_IOTLB, vi.INV_F_PASID, pasid=a))
    d.events()
    assert dma(m, iova, 0x80000000, 0x3000, a) == (2, iova + 0x2000)
    assert dma(m, 0x80000000, iova, 0x100, pasids[1]) == (3, iova)
    assert dma(m, iova, 0x80000000, 0x1000, pasids[1]) == (0, 0)          # the other PASID still maps it
    evs = d.events()
    assert [(e.reason, e.flags, pasid_of(e), e.address) for e in evs] == [
        (vi.FAULT_R_MAPPING, vi.FAULT_F_READ | vi.FAULT_F_ADDRESS | vi.FAULT_F_PASID, a, iova + 0x2000),
        (vi.FAULT_R_MAPPING, vi.FAULT_F_WRITE | vi.FAULT_F_ADDRESS | vi.FAULT_F_PASID, pasids[1], iova)]


def test_s1dss_decides_dma_without_a_pasid(d, m):
    s = Setup(m, d, s1dss=0)
    pt = s.pasid(0, asid=1)
    src = fill(m, BUF, 0x100, 3)
    pt.map(0x1000, BUF, 0x1000, 3)
    assert dma(m, 0x1000, BUF + 0x800, 0x100, None) == (2, 0x1000)        # terminate
    (ev,) = d.events()
    assert (ev.reason, ev.flags, pasid_of(ev)) == (vi.FAULT_R_DOMAIN, vi.FAULT_F_READ | vi.FAULT_F_ADDRESS, 0)
    d.detach(7, EP)
    s = Setup(m, d, s1dss=1)                                                # bypass: IOVA = GPA
    assert dma(m, BUF, BUF + 0x800, 0x100, None) == (0, 0)
    assert m.dom0.read(BUF + 0x800, 0x100) == src
    d.detach(7, EP)
    s = Setup(m, d, s1dss=2)                                                # CD 0
    s.pasid(0, asid=1).map(0x5000, BUF, 0x1000, 3)
    m.dom0.write(BUF + 0x800, bytes(0x100))
    assert dma(m, 0x5000, 0x5800, 0x100, None) == (0, 0)
    assert m.dom0.read(BUF + 0x800, 0x100) == src
    assert dma(m, 0x9000, 0x5800, 0x100, None) == (2, 0x9000)
    (ev,) = d.events()
    assert ev.reason == vi.FAULT_R_MAPPING and not ev.flags & vi.FAULT_F_PASID


def test_configuration_faults_are_domain_faults_with_their_pasid(d, m):
    s = Setup(m, d, CD_4K, 8)
    s.pasid(1, asid=5, valid=False)
    s.pasid(2, asid=5, t0sz=40)
    s.pasid(3, asid=5, endi=True)
    s.pasid(4, asid=5, aa64=False)
    s.pasid(5, asid=5, tg0=3)
    s.pasid(6, asid=5, epd0=True)
    for p in (1, 2, 3, 4, 5, 300, 64):                      # 300: >= 2^8; 64: L1[1] has V = 0
        assert dma(m, 0x1000, 0x2000, 8, p) == (2, 0x1000), p
    assert dma(m, 0x1000, 0x2000, 8, 6) == (2, 0x1000)       # EPD0: a walk fault
    evs = d.events()
    assert [(e.reason, pasid_of(e)) for e in evs] == [(vi.FAULT_R_DOMAIN, p) for p in (1, 2, 3, 4, 5, 300, 64)] + [
        (vi.FAULT_R_MAPPING, 6)]
    assert all(e.flags & vi.FAULT_F_PASID for e in evs)
    # a CD table the P2M refuses: an L1 entry pointing outside guest RAM
    d.post_events(2)
    s.g.write64(s.ptr + 8 * 2, 0x0A000000 | 1)
    assert dma(m, 0x1000, 0x2000, 8, 130) == (2, 0x1000)
    (ev,) = d.events()
    assert (ev.reason, pasid_of(ev)) == (vi.FAULT_R_DOMAIN, 130)


def test_fault_explanations_follow_the_cd_fetch(d, m):
    s = Setup(m, d, CD_4K, 8)
    s.pasid(2, asid=5, t0sz=40)
    dma(m, 0x1000, 0x2000, 8, 2)
    expl = m.fault_log[-1]
    text = expl.text()
    assert "PASID 2" in text and "T0SZ 40 is outside 16..39" in text
    assert "L1 CD descriptor" in text and "context descriptor" in text
    assert any(st.get("what") == "cd" and st["fields"]["T0SZ"] == 40 for st in expl.steps)
    pt = s.pasid(3, asid=6)
    pt.map(0x1000, BUF, 0x1000, 1)
    dma(m, 0x1000, 0x1000, 8, 3)                             # write to a read-only page
    text = m.fault_log[-1].text()
    assert "permission fault, stage 1 level 3" in text and "AP[2] read-only 1" in text


# -- caches like hardware ------------------------------------------------------------------------

def test_stale_translation_until_invalidate(d, m):
    s = Setup(m, d)
    pt = s.pasid(1, asid=9)
    old, new = BUF, BUF + 0x1000
    a, b = fill(m, old, 0x100, 1), fill(m, new, 0x100, 2)
    pt.map(0x7000, old, 0x1000, 1)
    pt.map(0x9000, BUF + 0x8000, 0x1000, 3)
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == a
    # the guest re-points the PTE without invalidating: the device keeps the old translation
    pt.unmap(0x7000, 0x1000)
    pt.map(0x7000, new, 0x1000, 1)
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == a
    # another ASID's invalidation, or a VA range that misses, changes nothing
    assert d.status_of(inv_req(7, vi.INV_G_VA, vi.INV_T_IOTLB, vi.INV_F_ARCHID, archid=10, vs=0x7000, nr=1)) == S_OK
    assert d.status_of(inv_req(7, vi.INV_G_VA, vi.INV_T_IOTLB, vi.INV_F_PASID, pasid=1, vs=0x8000, nr=1)) == S_OK
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == a
    # INVALIDATE VA (ASID from the cached CD of PASID 1) drops it
    assert d.status_of(inv_req(7, vi.INV_G_VA, vi.INV_T_IOTLB, vi.INV_F_PASID | vi.INV_F_LEAF, pasid=1,
                               vs=0x7000, nr=1)) == S_OK
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == b
    # a new CD (other stage 1, other ASID) is ignored until INVALIDATE PASID, then used
    pt2 = stage1(s.g)
    pt2.map(0x7000, old, 0x1000, 1)
    pt2.map(0x9000, BUF + 0x8000, 0x1000, 3)
    write_cd(s.g, s.cd_addr(1), cd_words(pt2, 11))
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == b
    assert d.status_of(inv_req(7, vi.INV_G_PASID, vi.INV_T_PASID, vi.INV_F_PASID, pasid=1)) == S_OK
    assert dma(m, 0x7000, 0x9000, 0x100, 1) == (0, 0) and m.dom0.read(BUF + 0x8000, 0x100) == a
    # granule DOMAIN drops every ASID's translations and every CD
    w, ctx = m.walker, m.devices["virtio0"].backend.domains[7].table.ctx
    assert w.table_counts(ctx)[0] == 1 and w.table_counts(ctx)[1] >= 2
    assert d.status_of(inv_req(7)) == S_OK
    assert w.table_counts(ctx) == (0, 0)


def test_block_invalidation_drops_the_whole_block(d, m):
    s = Setup(m, d)
    pt = s.pasid(1, asid=3)
    pt.map(0x40000000, 0x00800000, 0x200000, 3)
    for off in (0, 0x1000, 0x1FF000):
        assert dma(m, 0x40000000 + off, 0x40000000 + off + 8, 8, 1) == (0, 0)
    ctx = m.devices["virtio0"].backend.domains[7].table.ctx
    assert m.walker.table_counts(ctx)[1] == 3
    assert d.status_of(inv_req(7, vi.INV_G_VA, vi.INV_T_IOTLB, vi.INV_F_ARCHID, archid=3, vs=0x40100000,
                               nr=1)) == S_OK
    assert m.walker.table_counts(ctx)[1] == 0


def test_device_reset_and_p2m_changes_drop_table_state(d, m):
    s = Setup(m, d)
    s.pasid(1, asid=3).map(0x1000, BUF, 0x1000, 3)
    assert dma(m, 0x1000, 0x1800, 8, 1) == (0, 0)
    dev = m.devices["virtio0"].backend
    ctx = dev.domains[7].table.ctx
    m.dom0.p2m.protect(BUF + 0x100000, 0x1000, 1)            # any P2M change flushes what came through it
    assert m.walker.table_counts(ctx) == (0, 0)
    m.dom0.p2m.protect(BUF + 0x100000, 0x1000, 3)
    d.reset()
    assert not dev.domains and ctx in dev._free_ctx
