"""Linux io-pgtable-arm selftests (facts/pgtable.md section 6), run against PageTable and checked
with the C walker (and the reference) instead of iova_to_phys.

Matrix: ARM_64_LPAE_S1 and _S2 formats x {4K|2M|1G, 16K|32M, 64K|512M} x IAS {32, 36, 40}
(every IAS that fits the 40-bit OAS), start level and stage-2 concatenation chosen as Linux does.
Plus the board's P2M geometry and nested cases (S1 leaf through an S2 block and vice versa,
S1 table page unmapped in S2 -> stage-2 fault with s1ptw).
"""
from __future__ import annotations

import math

import pytest

from vmm.memory import MachineMemory
from vmm.p2m_tables import PageTable
from vmm.walker import (
    ADDRESS_SIZE,
    F_APTABLE,
    F_CHECK_AF,
    F_NS_CHECK,
    F_S2,
    PERMISSION,
    TRANSLATION,
    Fault,
    R,
    ReferenceWalker,
    Stage,
    W,
    Walker,
)

GiB, MiB = 1 << 30, 1 << 20
OAS = 40


def linux_geometry(stage: int, ias: int, granule: int) -> int:
    """Start level as arm_64_lpae_alloc_pgtable_s1/_s2 pick it (opportunistic S2 concatenation)."""
    bpl = granule - 3
    start = 4 - math.ceil((ias - granule) / bpl)
    if stage == 2 and start == 0:
        pgd_entries = 1 << (ias - (granule + 3 * bpl))
        if pgd_entries <= 16:
            start = 1
    return start


class Harness:
    def __init__(self, stage: int, ias: int, granule: int) -> None:
        self.mem = MachineMemory(8 * MiB)
        self.stage = stage
        self.ias = ias
        self.pt = PageTable(self.mem, stage=stage, ia_bits=ias, start_level=linux_geometry(stage, ias, granule),
                            granule=granule, oa_bits=OAS, on_change=self._changed)
        flags = F_S2 | F_CHECK_AF if stage == 2 else F_CHECK_AF | F_NS_CHECK | F_APTABLE
        self.st = self.pt.walker_stage(flags)
        self.walkers = [Walker(self.mem), ReferenceWalker(self.mem)]
        for w in self.walkers:
            if stage == 1:
                w.context(0, self.st, None)
            else:
                w.context(0, None, self.st, s2_id=0)

    def _changed(self, ia: int, size: int) -> None:
        for w in self.walkers:
            if self.stage == 1:
                w.invalidate_range(0, ia, size)
            else:
                w.invalidate_ipa(0, ia, size)

    def iova_to_phys(self, iova: int, acc: int = R) -> int | Fault:
        results = [w.translate1(0, iova, acc) for w in self.walkers]
        assert results[0] == results[1]
        # and once more through the (now warm) TLB
        assert self.walkers[0].translate1(0, iova, acc) == results[0]
        return results[0]


CONFIGS = [(stage, granule, ias) for stage in (1, 2) for granule in (12, 14, 16) for ias in (32, 36, 40)]


@pytest.mark.parametrize("stage,granule,ias", CONFIGS, ids=[f"s{s}-{1 << (g - 10)}K-ias{i}" for s, g, i in CONFIGS])
def test_lpae_selftest(stage: int, granule: int, ias: int) -> None:
    h = Harness(stage, ias, granule)
    pt = h.pt
    sizes = pt.page_sizes
    assert sizes == {12: (4096, 2 * MiB, GiB), 14: (16384, 32 * MiB), 16: (65536, 512 * MiB)}[granule]

    # 1. empty table
    for iova in (42, GiB + 42, 2 * GiB + 42):
        f = h.iova_to_phys(iova)
        assert isinstance(f, Fault) and f.kind == TRANSLATION and f.stage == stage
        assert pt.lookup(iova) is None

    # 2. map each page size at k GiB, overlapping map refused, translation correct
    for k, s in enumerate(sizes):
        iova = k * GiB
        pt.map(iova, iova, s, R | W)
        with pytest.raises(ValueError):
            pt.map(iova, iova + s, s, R)
        assert h.iova_to_phys(iova + 42) == iova + 42
        assert h.iova_to_phys(iova + 42, W) == iova + 42
        assert h.iova_to_phys(iova + s - 8) == iova + s - 8
        assert pt.lookup(iova + 42) == (iova + 42, R | W, s)

    # 3. partial unmap: punch a hole in the block at 1 GiB (split), remap it read-only elsewhere
    smin = sizes[0]
    pt.unmap(GiB + smin, smin)
    f = h.iova_to_phys(GiB + smin + 42)
    assert isinstance(f, Fault) and f.kind == TRANSLATION and f.address == GiB + smin + 42
    assert h.iova_to_phys(GiB + 42) == GiB + 42                       # rest of the block intact
    assert h.iova_to_phys(GiB + 2 * smin + 42) == GiB + 2 * smin + 42
    pt.map(GiB + smin, smin, smin, R)
    assert h.iova_to_phys(GiB + smin + 42) == smin + 42
    f = h.iova_to_phys(GiB + smin + 42, W)
    assert isinstance(f, Fault) and f.kind == PERMISSION and f.level == 3

    # 4. full unmap, then remap write-only
    for k, s in enumerate(sizes):
        iova = k * GiB
        pt.unmap(iova, s)
        f = h.iova_to_phys(iova + 42)
        assert isinstance(f, Fault) and f.kind == TRANSLATION
        pt.map(iova, iova, s, W)
        assert h.iova_to_phys(iova + 42, W) == iova + 42
        if stage == 2:   # S2AP write-only: reads fault; stage 1 has no write-only (reads always allowed)
            f = h.iova_to_phys(iova + 42, R)
            assert isinstance(f, Fault) and f.kind == PERMISSION

    # 5. the last largest page of the IAS (concatenated-root indexing)
    smax = sizes[-1]
    iova = (1 << ias) - smax
    pt.map(iova, iova, smax, R | W)
    assert h.iova_to_phys(iova + smax - 8) == iova + smax - 8
    assert pt.lookup(iova + smax - 8) == (iova + smax - 8, R | W, smax)
    pt.unmap(iova, smax)
    assert isinstance(h.iova_to_phys(iova + 8), Fault)

    # what map refuses (-ERANGE, -EINVAL, bad size)
    with pytest.raises(ValueError):
        pt.map(1 << ias, 0, smin, R)
    with pytest.raises(ValueError):
        pt.map(0x100 * smin, 1 << OAS, smin, R)
    with pytest.raises(ValueError):
        pt.map(0x100 * smin, 0, smin, 0)
    with pytest.raises(ValueError):
        pt.map(0x100 * smin, 0, smin * 2, R)
    with pytest.raises(ValueError):
        pt.map(0x100 * smin + 8, 0, smin, R)
    f = h.iova_to_phys(1 << ias)
    assert isinstance(f, Fault) and (f.kind, f.level) == (TRANSLATION, 0)


def test_board_p2m_geometry() -> None:
    """The board's P2M: stage 2, 4K, 40-bit IPA, L1 start, two concatenated 8K-aligned tables."""
    mem = MachineMemory(4 * MiB)
    p2m = PageTable(mem, stage=2, ia_bits=40, start_level=1)
    assert p2m.root % 8192 == 0
    assert p2m.vtcr == 0x80023558                   # T0SZ=24, SL0=1, PS=40-bit (Xen's value)
    assert p2m.vtcr & 0x3F == 24 and (p2m.vtcr >> 6) & 3 == 1 and (p2m.vtcr >> 16) & 7 == 2
    w = Walker(mem)
    w.context(0, None, p2m.walker_stage(), s2_id=1)
    p2m.map((1 << 40) - GiB, 0x1234 * GiB // 0x1000 & ~(GiB - 1), GiB, R | W)
    assert mem.read64(p2m.root + 4096 + 511 * 8) & 1     # second concatenated table, last entry
    assert w.translate1(0, (1 << 40) - 8, R) == (0x1234 * GiB // 0x1000 & ~(GiB - 1)) + GiB - 8
    with pytest.raises(ValueError):
        PageTable(mem, stage=1, ia_bits=40, start_level=1)   # stage 1 cannot concatenate


def nested_rig():
    mem = MachineMemory(16 * MiB)
    mem.set_pool(8 * MiB, 16 * MiB)
    s2 = PageTable(mem, stage=2, ia_bits=40, start_level=1)
    # stage-1 tables live at IPA == MPA in the pool: identity 2M blocks over the pool
    for a in range(8 * MiB, 16 * MiB, 2 * MiB):
        s2.map(a, a, 2 * MiB, R | W)
    s1 = PageTable(mem, stage=1, ia_bits=32, start_level=1)
    walkers = [Walker(mem), ReferenceWalker(mem)]
    st1 = s1.walker_stage(F_CHECK_AF | F_NS_CHECK)
    for w in walkers:
        w.context(0, st1, s2.walker_stage(), s2_id=0)
    return mem, s1, s2, walkers


def both(walkers, addr, acc=R):
    r = [w.translate1(0, addr, acc) for w in walkers]
    assert r[0] == r[1]
    return r[0]


def test_nested_s1_page_through_s2_block_and_back() -> None:
    mem, s1, s2, walkers = nested_rig()
    s2.map(GiB, 4 * GiB, GiB, R | W)                 # S2 1G block
    s1.map(0x10000, GiB + 0x123000, 4096, R | W)     # S1 page into it
    assert both(walkers, 0x10008) == 4 * GiB + 0x123008
    s2.map(2 * GiB, 0x5000, 4096, R)                 # S2 page ...
    s1.map(0x200000, 2 * GiB, 2 * MiB, R | W)        # ... under an S1 2M block
    assert both(walkers, 0x200008) == 0x5008
    f = both(walkers, 0x200008, W)
    assert (f.kind, f.stage, f.level, f.s1ptw, f.address) == (PERMISSION, 2, 3, False, 2 * GiB + 8)
    f = both(walkers, 0x201008)                      # rest of the S1 block: S2 unmapped
    assert (f.kind, f.stage, f.s1ptw) == (TRANSLATION, 2, False)


def test_nested_s1_table_unmapped_in_s2() -> None:
    mem, s1, s2, walkers = nested_rig()
    s2.map(0, 0, 2 * MiB, R | W)
    s1.map(0x10000, 0x3000, 4096, R | W)
    assert both(walkers, 0x10010) == 0x3010
    l2 = mem.read64(s1.root) & ((1 << 48) - 4096)   # the L2 table (an IPA) under root entry 0
    s2.unmap(l2, 4096)                               # splits the identity block under it
    for w in walkers:
        w.invalidate_ipa(0, l2, 4096)
    f = both(walkers, 0x10010)
    assert (f.kind, f.stage, f.level, f.s1ptw, f.address) == (TRANSLATION, 2, 3, True, l2)
    # stage-2 output beyond its OA size while fetching a stage-1 table: address-size, s1ptw
    for w in walkers:
        w.context(0, s1.walker_stage(F_CHECK_AF), Stage(s2.root, 40, 1, 12, 20, F_S2 | F_CHECK_AF), s2_id=0)
    f = both(walkers, 0x10010)
    assert (f.kind, f.stage, f.s1ptw) == (ADDRESS_SIZE, 2, True)
