"""Differential tests for PASID tables: the C walker against the Python reference.

Each example builds, at random, a stage 2 (direct with 2 MiB blocks, or scattered 4 KiB pages,
with holes and read-only / write-only / no-access pages), then a CD table in guest-physical
space (linear, two-level with 4 KiB leaves, two-level with 64 KiB leaves; valid and invalid L1
descriptors and CDs of every kind) and random stage-1 descriptor soups under the CDs, all
written through that stage 2. Both walkers must agree on every (out, fault) pair with caches
off and on, on whole transfers, and after random edits of CDs and stage-1 descriptors followed
by random invalidations (the caches must go stale, and recover, identically).

Examples: env IOMMU_LAB_HYPOTHESIS_EXAMPLES (default 200; CI uses 2000).
"""
from __future__ import annotations

import os
import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.memory import MachineMemory
from vmm.p2m_tables import PageTable
from vmm.walker import CD_64K_LEAVES, CD_LINEAR, F_S2, CdTable, ReferenceWalker, Stage, Walker

EXAMPLES = int(os.environ.get("IOMMU_LAB_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEM = 24 << 20
GUEST = 8 << 20              # IPA [0, 8 MiB) is guest RAM, mostly mapped
POOL = (16 << 20, MEM)       # stage-2 tables
S2_CTX, T_CTX = 1, 2
MODES = [(12, 25), (12, 30), (12, 39), (12, 48), (14, 36), (14, 47), (16, 34), (16, 42), (16, 48), (12, 40)]


@pytest.fixture(scope="module")
def env():
    mem = MachineMemory(MEM)
    return mem, Walker(mem), ReferenceWalker(mem)


class Guest:
    """A random stage 2 and an IPA bump allocator whose writes go through it."""

    def __init__(self, mem: MachineMemory, rng: random.Random) -> None:
        self.mem, self.rng = mem, rng
        mem.set_pool(*POOL)
        self.s2 = PageTable(mem, stage=2, ia_bits=40, start_level=1)
        self.frames: dict[int, int] = {}
        scattered = rng.random() < 0.5
        order = list(range(0, 16 << 20, 4096))
        rng.shuffle(order)
        for i, ipa in enumerate(range(0, GUEST, 4096)):
            r = rng.random()
            if r < 0.03:
                continue                                        # a hole
            perms = 3 if r > 0.08 else rng.choice([1, 2])
            mpa = order[i] if scattered else ipa
            self.s2.map(ipa, mpa, 4096, perms)
            self.frames[ipa] = mpa
        self.next = 0

    def stage(self) -> Stage:
        return self.s2.walker_stage(F_S2 | (2 if self.rng.random() < 0.9 else 0))

    def alloc(self, nbytes: int, align: int) -> int:
        a = (self.next + align - 1) & ~(align - 1)
        if a + nbytes > GUEST - (1 << 20):
            a = self.rng.randrange(0, GUEST - nbytes) & ~(align - 1)
        else:
            self.next = a + nbytes
        return a

    def write64(self, ipa: int, value: int) -> None:
        mpa = self.frames.get(ipa & ~0xFFF)
        if mpa is not None:
            self.mem.write64(mpa + (ipa & 0xFFF), value & ((1 << 64) - 1))

    def out_ipa(self, align: int) -> int:
        r = self.rng.random()
        a = self.rng.randrange(GUEST) if r < 0.85 else self.rng.choice([GUEST, 1 << 40, 1 << 36, 3 << 30])
        return a & ~(align - 1)

    def soup(self, granule: int, ia_bits: int) -> tuple[int, list[int]]:
        """A random stage-1 table (descriptor soup) for this geometry: (TTB0, input hints)."""
        rng = self.rng
        bpl = granule - 3
        sl = 4 - (ia_bits - 4) // bpl
        shift = [granule + (3 - lvl) * bpl for lvl in range(4)]
        root_bits = ia_bits - shift[sl]
        root = self.alloc(max(8 << root_bits, 64), max(8 << root_bits, 64))
        hints: list[int] = []

        def fill(table: int, level: int, base: int, nbits: int) -> None:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(1 << nbits) if rng.random() < 0.6 else rng.randrange(min(4, 1 << nbits))
                ia = base + (i << shift[level])
                hints.extend((ia, ia + rng.randrange(1 << shift[level])))
                ent = table + 8 * i
                r = rng.random()
                attrs = (1 << 10 if rng.random() < 0.85 else 0) | (1 << 7 if rng.random() < 0.3 else 0) \
                    | (rng.getrandbits(8) << 2 & 0x37C)
                if r < 0.1:
                    self.write64(ent, rng.getrandbits(64) & ~1)
                elif r < 0.5 or level == 3:
                    kind = 3 if level == 3 else 1
                    if rng.random() < 0.05:
                        kind ^= 2
                    self.write64(ent, self.out_ipa(1 << shift[level]) | kind | attrs)
                else:
                    child = self.alloc(1 << granule, 1 << granule) if rng.random() < 0.9 else self.out_ipa(1 << granule)
                    self.write64(ent, child | 3 | (1 << 62 if rng.random() < 0.2 else 0))
                    if child < GUEST:
                        fill(child, level + 1, ia, bpl)

        fill(root, sl, 0, root_bits)
        return root, hints

    def cd(self, asids: list[int]) -> tuple[int, int, list[int]]:
        """A random CD (dwords 0 and 1), usually valid, with a stage-1 soup under it."""
        rng = self.rng
        granule, ia_bits = rng.choice(MODES)
        ttb0, hints = self.soup(granule, ia_bits)
        t0sz = 64 - ia_bits
        if rng.random() < 0.05:
            t0sz = rng.choice([15, 40, 63, 0])
        tg0 = {12: 0, 16: 1, 14: 2}[granule] if rng.random() < 0.97 else 3
        d0 = t0sz | tg0 << 6 | rng.getrandbits(6) << 8
        d0 |= (1 << 14 if rng.random() < 0.04 else 0) | (1 << 15 if rng.random() < 0.03 else 0)
        d0 |= (1 << 31 if rng.random() < 0.95 else 0) | rng.randrange(8) << 32
        d0 |= (1 << 35 if rng.random() < 0.3 else 0) | (1 << 41 if rng.random() < 0.97 else 0)
        d0 |= rng.choice(asids) << 48
        d1 = ttb0 | (2 if rng.random() < 0.3 else 0)
        if rng.random() < 0.03:
            d1 = rng.getrandbits(56) & ~0xF
        return d0, d1, hints

    def table(self, asids: list[int]) -> tuple[CdTable, list[int], dict[int, int], list[int]]:
        """A random CD table: (its configuration, the PASIDs worth trying, PASID -> CD IPA, hints)."""
        rng = self.rng
        fmt = rng.choice([0, 1, 2])
        cdmax = rng.choice([0, 1, 3, 6, 7, 10, 12, 20] if fmt else [0, 1, 3, 6, 9])
        split = {1: 6, 2: 10}.get(fmt, 0)
        cfg = CdTable(0, fmt, cdmax, S2_CTX)
        size, align = cfg.size(), cfg.alignment()
        ptr = self.alloc(size, align)
        cfg = CdTable(ptr, fmt, cdmax, S2_CTX)
        pasids = sorted({rng.randrange(1 << cdmax) for _ in range(6)} | {0, (1 << cdmax) - 1})
        cds: dict[int, int] = {}
        l2: dict[int, int] = {}
        hints: list[int] = []
        for p in pasids:
            if fmt == CD_LINEAR:
                cd_ipa = ptr + 64 * p
            else:
                i = p >> split
                if i not in l2:
                    leaf = 64 << split
                    l2[i] = self.alloc(leaf, leaf) if rng.random() < 0.9 else self.out_ipa(4096)
                    v = 1 if rng.random() < 0.9 else 0
                    junk = rng.getrandbits(12) & 0xFFE if rng.random() < 0.2 else 0
                    extra = rng.randrange(16) << 12 if fmt == CD_64K_LEAVES and rng.random() < 0.1 else 0
                    self.write64(ptr + 8 * i, l2[i] | extra | v | junk)
                cd_ipa = l2[i] + 64 * (p & ((1 << split) - 1))
            d0, d1, h = self.cd(asids)
            self.write64(cd_ipa, d0)
            self.write64(cd_ipa + 8, d1)
            cds[p] = cd_ipa
            hints += h
        return cfg, pasids + [1 << cdmax, (1 << 20) - 1], cds, hints


def check_same(cw: Walker, rw: ReferenceWalker, pasid: int, addrs: array, acc: array, what: str) -> None:
    c_out, c_f = cw.translate_pasid(T_CTX, pasid, addrs, acc)
    r_out, r_f = rw.translate_pasid(T_CTX, pasid, addrs, acc)
    for i, a in enumerate(addrs):
        assert (c_f[i], c_out[i]) == (r_f[i], r_out[i]), (
            f"{what}: pasid {pasid} addr {a:#x} acc {acc[i]}: "
            f"C {cw.decode(c_f[i], c_out[i]) if c_f[i] else hex(c_out[i])} "
            f"ref {rw.decode(r_f[i], r_out[i]) if r_f[i] else hex(r_out[i])}")


@SETTINGS
@given(seed=st.integers(0, 2**64 - 1))
def test_cd_tables_nested_over_random_p2m(env, seed: int) -> None:
    mem, cw, rw = env
    rng = random.Random(seed)
    mem.view[:] = bytes(MEM)
    g = Guest(mem, rng)
    s2 = g.stage()
    asids = [rng.randrange(1 << 16) for _ in range(3)]
    cfg, pasids, cds, hints = g.table(asids)
    for w in (cw, rw):
        w.context(T_CTX, None, None)
        w.context(S2_CTX, None, s2, s2_id=3)
        w.table_context(T_CTX, cfg)
    addrs = array("Q", (hints + [rng.getrandbits(rng.choice([12, 30, 39, 48, 64])) for _ in range(10)])[:120])
    acc = array("B", (rng.choice([1, 1, 2, 3]) for _ in addrs))
    for w in (cw, rw):
        w.tlb_enabled = False
    for p in pasids:
        check_same(cw, rw, p, addrs, acc, "cold")
    for w in (cw, rw):
        w.tlb_enabled = True
    for p in pasids:
        check_same(cw, rw, p, addrs, acc, "caches filling")
        check_same(cw, rw, p, addrs, acc, "caches warm")
        acc2 = array("B", (3 - x if x in (1, 2) else x for x in acc))
        check_same(cw, rw, p, addrs, acc2, "warm, other accesses")
    assert cw.table_counts(T_CTX) == rw.table_counts(T_CTX)
    for p in pasids[:3]:
        for a in addrs[:3]:
            n = rng.choice([1, 4096, rng.randrange(1, 1 << 18)])
            access = rng.choice([1, 2])
            assert cw.translate_range_pasid(T_CTX, p, a, n, access) == rw.translate_range_pasid(T_CTX, p, a, n, access)
    # edit CDs and stage-1 descriptors behind the caches: both must stay equally stale ...
    for _ in range(rng.randint(1, 6)):
        p = rng.choice(list(cds))
        if rng.random() < 0.5:
            d0, d1, _ = g.cd(asids)
            g.write64(cds[p], d0)
            g.write64(cds[p] + 8, d1)
        else:
            g.write64(rng.randrange(0, g.next or 8, 8), rng.getrandbits(64))
    for p in pasids:
        check_same(cw, rw, p, addrs, acc, "stale")
    # ... until invalidations drop what they cover
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        p = rng.choice(pasids)
        if r < 0.3:
            which = p if rng.random() < 0.7 else None
            for w in (cw, rw):
                w.table_invalidate_cd(T_CTX, which)
        elif r < 0.6:
            asid = cw.table_cached_asid(T_CTX, p)
            assert asid == rw.table_cached_asid(T_CTX, p)
            for w in (cw, rw):
                w.table_invalidate_tlb(T_CTX, asid)
        elif r < 0.9:
            a, n = rng.choice(addrs), rng.choice([4096, 1 << 21, rng.randrange(1, 1 << 30)])
            asid = rng.choice(asids + [None])
            for w in (cw, rw):
                w.table_invalidate_tlb(T_CTX, asid, a, n)
        else:
            gpa = rng.randrange(GUEST) & ~0xFFF
            for w in (cw, rw):
                w.invalidate_ipa(3, gpa, 4096)
        for q in pasids:
            check_same(cw, rw, q, addrs, acc, "after invalidation")
        assert cw.table_counts(T_CTX) == rw.table_counts(T_CTX)


def test_cd_fetch_faults_name_their_step(env) -> None:
    """Each configuration failure has its own fault: PASID out of range, L1 V = 0, a CD outside
    the stage 2, an invalid CD; and EPD0 is a stage-1 walk fault, not a configuration one."""
    mem, cw, rw = env
    mem.view[:] = bytes(MEM)
    mem.set_pool(*POOL)
    s2t = PageTable(mem, stage=2, ia_bits=40, start_level=1)
    s2t.map(0, 0x200000, 0x200000, 3)                      # IPA [0, 2 MiB) -> MPA 2 MiB
    for w in (cw, rw):
        w.context(T_CTX, None, None)
        w.context(S2_CTX, None, s2t.walker_stage(F_S2 | 2), s2_id=3)
        w.table_context(T_CTX, CdTable(0x1000, 1, 8, S2_CTX))      # two-level, 4 KiB leaves, 256 CDs
    mem.write64(0x201000, 0x3000 | 1)                      # L1[0] -> L2 at IPA 0x3000
    mem.write64(0x201008, 0x400000 | 1)                    # L1[1] -> beyond the stage 2
    # L1[2..] invalid; CD 0 valid (T0SZ 25, 4K, AA64, V, IPS 40 bits, AFFD) with TTB0 0x5000; CD 1 V = 0
    mem.write64(0x203000, 25 | 1 << 31 | 2 << 32 | 1 << 35 | 1 << 41 | 7 << 48)
    mem.write64(0x203008, 0x5000)
    mem.write64(0x203040, 25 | 1 << 41)
    mem.write64(0x203080, 25 | 1 << 31 | 1 << 41 | 1 << 14)           # CD 2: EPD0
    for w in (cw, rw):
        out, f = w.translate_pasid(T_CTX, 300, [0], 1)
        fault = w.decode(f[0], out[0])
        assert (fault.kind, fault.address, fault.fetch) == (7, 300, 0)          # PASID >= 2^8
        out, f = w.translate_pasid(T_CTX, 64, [0], 1)
        fault = w.decode(f[0], out[0])
        assert (fault.kind, fault.stage, fault.address, fault.fetch) == (1, 2, 0x400000, 2)   # CD outside the P2M
        out, f = w.translate_pasid(T_CTX, 64 * 2, [0], 1)
        fault = w.decode(f[0], out[0])
        assert (fault.kind, fault.address, fault.fetch) == (7, 0x1010, 1)       # L1 V = 0
        out, f = w.translate_pasid(T_CTX, 1, [0], 1)
        fault = w.decode(f[0], out[0])
        assert (fault.kind, fault.address, fault.fetch) == (8, 0x3040, 2)       # bad CD
        out, f = w.translate_pasid(T_CTX, 2, [0x1234], 1)
        fault = w.decode(f[0], out[0])
        assert (fault.kind, fault.stage, fault.level, fault.fetch) == (1, 1, 0, 0) and fault.address == 0x1234
        out, f = w.translate_pasid(T_CTX, 0, [0x1234], 1)
        fault = w.decode(f[0], out[0])          # CD 0 valid, its stage-1 root (IPA 0x5000) is empty
        assert (fault.kind, fault.stage, fault.level, fault.fetch) == (1, 1, 1, 0)
