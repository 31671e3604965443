"""IOTLB behaviour of the C walker (and the reference's dict TLB): hits, exact faults, and no stale
entry surviving the invalidation that matches an edit (by range, by IPA, by context, all)."""
from __future__ import annotations

import os
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.memory import MachineMemory
from vmm.p2m_tables import PageTable
from vmm.walker import ADDRESS_SIZE, F_S2, PERMISSION, TRANSLATION, Fault, R, ReferenceWalker, Stage, W, Walker

MiB = 1 << 20
EXAMPLES = int(os.environ.get("IOMMU_LAB_HYPOTHESIS_EXAMPLES", "200"))


class Rig:
    """16 MiB machine; tables in the upper half; identity P2M (2 MiB blocks) over all of it.

    Contexts: 1 = stage 1 only, 2 = stage 2 only (s2_id 3), 3 = nested (s1 over the P2M)."""

    def __init__(self, walkers=None, wire: bool = True) -> None:
        self.mem = MachineMemory(16 * MiB)
        self.mem.set_pool(8 * MiB, 16 * MiB)
        self.walkers = walkers(self.mem) if walkers else [Walker(self.mem)]
        self.p2m = PageTable(self.mem, stage=2, ia_bits=40, start_level=1)
        for a in range(0, 16 * MiB, 2 * MiB):
            self.p2m.map(a, a, 2 * MiB, R | W)
        self.s1 = PageTable(self.mem, stage=1, ia_bits=32, start_level=1)
        if wire:
            self.p2m.on_change = self._p2m_changed
            self.s1.on_change = self._s1_changed
        for w in self.walkers:
            w.context(1, self.s1.walker_stage(), None)
            w.context(2, None, self.p2m.walker_stage(), s2_id=3)
            w.context(3, self.s1.walker_stage(), self.p2m.walker_stage(), s2_id=3)

    def _p2m_changed(self, ia: int, size: int) -> None:
        for w in self.walkers:
            w.invalidate_ipa(3, ia, size)

    def _s1_changed(self, ia: int, size: int) -> None:
        for w in self.walkers:
            w.invalidate_range(1, ia, size)
            w.invalidate_range(3, ia, size)


def t1(w, ctx, addr, acc=R):
    return w.translate1(ctx, addr, acc)


def test_hits_and_stats() -> None:
    rig = Rig()
    w = rig.walkers[0]
    rig.s1.map(0x10000, 0x200000, 4096, R | W)
    addrs = array("Q", [0x10000 + i for i in range(0, 4096, 64)])
    w.reset_stats()
    o1, f1 = w.translate(3, addrs, R)
    o2, f2 = w.translate(3, addrs, R)
    assert list(f1) == list(f2) == [0] * len(addrs)
    assert list(o1) == list(o2) == [0x200000 + i for i in range(0, 4096, 64)]
    s = w.stats()
    assert s["misses"] == 1 and s["walks"] == 1 and s["hits"] == 2 * len(addrs) - 1


def test_stale_until_invalidated() -> None:
    """Proves the TLB caches (an unannounced edit is not seen) and each invalidation clears it."""
    rig = Rig(wire=False)
    w = rig.walkers[0]
    rig.s1.map(0x10000, 0x200000, 4096, R | W)
    for ctx, inval in ((1, lambda: w.invalidate_range(1, 0x10000, 4096)),
                       (1, lambda: w.invalidate_context(1)),
                       (1, w.invalidate_all),
                       (1, lambda: w.context(1, rig.s1.walker_stage(), None))):
        before = t1(w, ctx, 0x10008)
        rig.s1.unmap(0x10000, 4096)
        rig.s1.map(0x10000, before + 0x100000 - 8, 4096, R | W)
        assert t1(w, ctx, 0x10008) == before              # stale: nobody invalidated
        inval()
        assert t1(w, ctx, 0x10008) == before + 0x100000    # fresh


def test_invalidating_one_page_drops_the_whole_block() -> None:
    rig = Rig(wire=False)
    w = rig.walkers[0]
    rig.s1.map(0x200000, 0x400000, 2 * MiB, R | W)
    pages = array("Q", range(0x200000, 0x400000, 0x10000))
    w.translate(1, pages, R)
    rig.s1.unmap(0x200000, 2 * MiB)
    rig.s1.map(0x200000, 0x600000, 2 * MiB, R | W)
    w.invalidate_range(1, 0x3FF000, 1)   # one byte of the block: architecturally the whole entry
    out, fault = w.translate(1, pages, R)
    assert list(fault) == [0] * len(pages)
    assert list(out) == [p + 0x400000 for p in pages]


def test_invalidating_one_ipa_drops_the_whole_stage2_block() -> None:
    rig = Rig(wire=False)
    w = rig.walkers[0]
    for i in range(16):
        rig.s1.map(i << 12, 0x400000 + (i << 16), 4096, R | W)     # IPAs spread over the 2M block
    iovas = array("Q", [i << 12 for i in range(16)])
    ipas = array("Q", [0x400000 + (i << 16) for i in range(16)])
    w.translate(3, iovas, R)
    w.translate(2, ipas, R)
    rig.p2m.unmap(0x400000, 2 * MiB)
    rig.p2m.map(0x400000, 0xC00000, 2 * MiB, R | W)
    w.invalidate_ipa(3, 0x400000 + 0x1000, 8)     # a few bytes of the block: the whole entry goes
    for ctx, addrs in ((3, iovas), (2, ipas)):
        out, fault = w.translate(ctx, addrs, R)
        assert list(fault) == [0] * 16
        assert list(out) == [0xC00000 + (i << 16) for i in range(16)]


def test_invalidate_ipa_drops_combined_and_s2_entries() -> None:
    rig = Rig(wire=False)
    w = rig.walkers[0]
    rig.s1.map(0x10000, 0x300000, 4096, R | W)
    assert t1(w, 3, 0x10010) == 0x300010
    assert t1(w, 2, 0x300010) == 0x300010
    rig.p2m.unmap(0x300000, 4096)                 # splits the 2 MiB identity block
    rig.p2m.map(0x300000, 0x900000, 4096, R | W)
    assert t1(w, 3, 0x10010) == 0x300010          # stale until the IPA is invalidated
    w.invalidate_ipa(4, 0x300000, 4096)           # another stage 2: no effect
    assert t1(w, 2, 0x300010) == 0x300010
    w.invalidate_ipa(3, 0x300000, 4096)
    assert t1(w, 3, 0x10010) == 0x900010
    assert t1(w, 2, 0x300010) == 0x900010


def test_invalidate_ipa_of_a_stage1_table_page() -> None:
    """A combined entry depends on the stage-2 translation of the stage-1 tables it walked."""
    rig = Rig(wire=False)
    w = rig.walkers[0]
    rig.s1.map(0x10000, 0x300000, 4096, R | W)
    assert t1(w, 3, 0x10010) == 0x300010
    # the level-3 table of that IOVA: move its stage-2 backing to a copy that maps elsewhere
    l1 = rig.mem.read64(rig.s1.root) & ((1 << 48) - 4096)
    l3 = rig.mem.read64(l1) & ((1 << 48) - 4096)
    copy = rig.mem.alloc(4096)
    rig.mem.write(copy, rig.mem.read(l3, 4096))
    rig.mem.write64(copy + 8 * 0x10, (rig.mem.read64(l3 + 8 * 0x10) & ~((1 << 48) - 4096)) | 0x500000)
    rig.p2m.unmap(l3, 4096)
    rig.p2m.map(l3, copy, 4096, R | W)
    assert t1(w, 3, 0x10010) == 0x300010          # stale
    w.invalidate_ipa(3, l3, 4096)
    assert t1(w, 3, 0x10010) == 0x500010


def test_permission_miss_walks_and_faults_exactly() -> None:
    rig = Rig()
    w = rig.walkers[0]
    rig.s1.map(0x20000, 0x300000, 4096, R)
    assert t1(w, 3, 0x20000, R) == 0x300000
    w.reset_stats()
    f = t1(w, 3, 0x20008, W)
    assert (f.kind, f.stage, f.level, f.address) == (PERMISSION, 1, 3, 0x20008)
    assert w.stats()["walks"] == 1
    rig.p2m.protect(0x300000, 4096, R)
    rig.s1.protect(0x20000, 4096, R | W)
    f = t1(w, 3, 0x20008, W)
    assert (f.kind, f.stage, f.level, f.address, f.s1ptw) == (PERMISSION, 2, 3, 0x300008, False)


def test_faults_are_not_cached() -> None:
    rig = Rig(wire=False)
    w = rig.walkers[0]
    f = t1(w, 1, 0x40000)
    assert f.kind == TRANSLATION
    rig.s1.map(0x40000, 0x123000, 4096, R)        # invalid -> valid needs no invalidation
    assert t1(w, 1, 0x40000) == 0x123000


def test_tlb_disabled_always_walks() -> None:
    rig = Rig()
    w = rig.walkers[0]
    w.tlb_enabled = False
    rig.s1.map(0x10000, 0x200000, 4096, R | W)
    w.reset_stats()
    w.translate(1, array("Q", [0x10000] * 10), R)
    assert w.stats() == {"hits": 0, "misses": 0, "walks": 10}


def test_translate_range_coalesces_and_reports_first_fault() -> None:
    rig = Rig()
    w = rig.walkers[0]
    rig.s1.map(0x10000, 0x200000, 4096, R | W)
    rig.s1.map(0x11000, 0x201000, 4096, R | W)
    rig.s1.map(0x12000, 0x500000, 4096, R)
    assert w.translate_range(1, 0x10ff0, 0x1010, R) == [(0x200ff0, 0x1010)]
    assert w.translate_range(1, 0x10800, 0x2000, R) == [(0x200800, 0x1800), (0x500000, 0x800)]
    f = w.translate_range(1, 0x10800, 0x2000, W)
    assert (f.kind, f.address) == (PERMISSION, 0x12000)
    f = w.translate_range(1, 0x12800, 0x2000, R)
    assert (f.kind, f.address) == (TRANSLATION, 0x13000)
    assert w.translate_range(1, 0x10000, 0, R) == []


OPS = st.lists(st.tuples(st.sampled_from(["s1", "s1", "s2"]), st.sampled_from(["map", "map", "unmap", "protect"]),
                         st.integers(0, 47), st.sampled_from([4096, 4096, 4096, 2 * MiB, 1 << 30]),
                         st.sampled_from([R, W, R | W]), st.integers(0, 31)), min_size=1, max_size=12)


@settings(max_examples=max(20, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_random_edits_never_leave_stale_entries(ops) -> None:
    """TLB-on C walker == TLB-off C walker == reference (with its dict TLB) after every edit."""
    rig = Rig(walkers=lambda mem: [Walker(mem), Walker(mem), ReferenceWalker(mem)])
    on, off, ref = rig.walkers
    off.tlb_enabled = False
    probe = [i * (MiB // 4) + 0x18 for i in range(16 * 4)] + [1 << 30 | 0x18, 3 << 30]
    for target, op, slot, size, perms, oslot in ops:
        pt = rig.s1 if target == "s1" else rig.p2m
        if size == 1 << 30 and target == "s2":
            size = 2 * MiB
        # stage-2 edits also reach the pool at 8 MiB+, where the stage-1 tables live
        stride = 4096 * (37 if target == "s1" else 79)
        ia = (slot * stride) & ~(size - 1) if size < 1 << 30 else (slot % 3) << 30
        oa = ((oslot * 0x53000) & ~(size - 1)) % (32 * MiB) if size < 1 << 30 else 1 << 30
        try:
            if op == "map":
                pt.map(ia, oa, size, perms)
            elif op == "unmap":
                pt.unmap(ia, size)
            else:
                pt.protect(ia, size, perms)
        except ValueError:
            continue
        probe += [ia + 8, ia + size - 8]
        addrs = array("Q", probe)
        for ctx in (1, 2, 3):
            for acc in (R, W):
                results = [w.translate(ctx, addrs, acc) for w in (on, off, ref)]
                results.append(on.translate(ctx, addrs, acc))      # second pass: hits
                base = (list(results[1][0]), list(results[1][1]))
                for out, fault in results:
                    assert (list(out), list(fault)) == base, (ctx, acc, target, op, hex(ia), hex(size))


@pytest.mark.parametrize("entries", [1, 64])
def test_tiny_tlb_conflicts(entries: int) -> None:
    rig = Rig(walkers=lambda mem: [Walker(mem, tlb_entries=entries)])
    w = rig.walkers[0]
    for i in range(8):
        rig.s1.map(i << 12, (0x100 + 7 * i) << 12, 4096, R | W)
    addrs = array("Q", [(i % 8) << 12 | i for i in range(100)])
    out, fault = w.translate(3, addrs, R)
    assert list(fault) == [0] * 100
    assert list(out) == [(0x100 + 7 * (i % 8)) << 12 | i for i in range(100)]


@pytest.mark.parametrize("ia_bits, level, granule, ok", [
    (40, 1, 12, True),     # the P2M: T0SZ 24, SL0 1, two concatenated tables
    (30, 1, 12, False),    # a one-entry root: level 2 would do (S2InconsistentSL)
    (31, 1, 12, True),
    (24, 2, 12, False),    # T0SZ 40 > 39
    (25, 2, 12, True),
    (21, 3, 12, False),    # 4 KiB never starts at level 3 at stage 2 (S2InvalidSL)
    (48, 0, 14, False),    # 16 KiB starting at level 0 needs 52-bit support
    (36, 1, 14, False),    # 16 KiB, level 1: one entry
    (37, 1, 14, True),
    (40, 0, 12, True),
    (39, 0, 12, False),
])
def test_stage2_geometry_follows_the_arm_rules(ia_bits, level, granule, ok):
    """Both walkers make an inconsistent stage-2 SL0/T0SZ pair a level-0 translation fault; a
    consistent one reads its root (whose entry 0 names a table above the output size)."""
    mem = MachineMemory(16 * MiB)
    mem.set_pool(8 * MiB, 16 * MiB)
    root = mem.alloc(16 << granule, 16 << granule)
    mem.write64(root, (1 << 44) | 3)
    for w in (Walker(mem), ReferenceWalker(mem)):
        w.context(0, None, Stage(ttbr=root, ia_bits=ia_bits, start_level=level, granule=granule, flags=F_S2))
        res = w.translate1(0, 0, R)
        assert isinstance(res, Fault) and res.stage == 2, (w, res)
        if ok:
            assert (res.kind, res.level) == (ADDRESS_SIZE, level), (w, str(res))
        else:
            assert (res.kind, res.level) == (TRANSLATION, 0), (w, str(res))
