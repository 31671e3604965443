"""Differential tests: the C walker against the pure-Python reference on random tables.

Tables are random descriptor soups written straight into machine memory (not built with
PageTable): every level, blocks where allowed and where not, pages, reserved encodings, AF 0/1,
permission bits, NS/NSTable/APTable, invalid entries with garbage, table pointers outside memory
and output addresses above the OA size. The two walkers must agree on every (out, fault) pair.
Each example also checks the IOTLB: translating twice with the TLB on gives what a TLB-off walk
gives.

Examples per mode: env IOMMU_LAB_HYPOTHESIS_EXAMPLES (default 200; CI uses 2000).
"""
from __future__ import annotations

import os
import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.memory import MachineMemory
from vmm.walker import F_APTABLE, F_CHECK_AF, F_NS_CHECK, F_S2, ReferenceWalker, Stage, Walker

EXAMPLES = int(os.environ.get("IOMMU_LAB_HYPOTHESIS_EXAMPLES", "200"))
MEM_SIZE = 8 << 20
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (granule, ia_bits, start_level) -- the standard start levels (facts 2.1/2.3)
S1_MODES = [(12, 32, 1), (12, 39, 1), (12, 48, 0), (12, 36, 1), (14, 36, 2), (14, 47, 1), (14, 48, 0),
            (16, 42, 2), (16, 48, 1), (16, 32, 2)]
S2_MODES = [(12, 40, 1), (12, 40, 1), (12, 32, 1), (12, 36, 1), (12, 41, 1), (12, 42, 1), (12, 35, 2),
            (14, 40, 2), (16, 40, 2), (16, 42, 2)]
OA_CHOICES = [40, 40, 40, 32, 36, 44, 48, 24]


@pytest.fixture(scope="module")
def env():
    mem = MachineMemory(MEM_SIZE)
    return mem, Walker(mem), ReferenceWalker(mem)


class Soup:
    """Random table builder over a bump pool in low memory (zeroed again after each example)."""

    def __init__(self, mem: MachineMemory, rng: random.Random) -> None:
        self.mem = mem
        self.rng = rng
        self.next = 0
        self.tables = 0

    def alloc(self, nbytes: int, align: int) -> int | None:
        a = (self.next + align - 1) & ~(align - 1)
        if a + nbytes > self.mem.size or self.tables >= 40:
            return None
        self.next = a + nbytes
        self.tables += 1
        return a

    def wipe(self) -> None:
        self.mem.view[0:self.next] = bytes(self.next)

    def out_addr(self, align: int, oa_bits: int, ident: int, targets: list[int]) -> int:
        r = self.rng.random()
        if r < 0.3:
            a = ident
        elif r < 0.55 and targets:
            a = self.rng.choice(targets)
        elif r < 0.8:
            a = self.rng.randrange(self.mem.size)
        elif r < 0.9:
            a = (1 << oa_bits) - align * self.rng.randrange(1, 3)
        else:
            a = self.rng.randrange(1 << 48)
        return max(a, 0) & ~(align - 1) & ((1 << 48) - 1)

    def build(self, granule: int, ia_bits: int, sl: int, oa_bits: int, s2fmt: bool, stage2: bool,
              ident_hi: int = 0, targets: list[int] | None = None) -> tuple[int, list[int]]:
        """Random tables for one stage; returns (ttbr, interesting input addresses).

        ``ident_hi``: make [0, ident_hi) mostly identity-mapped (stage 2 under nested stage-1 tables).
        """
        rng = self.rng
        targets = targets or []
        bpl = granule - 3
        shift = [granule + (3 - lvl) * bpl for lvl in range(4)]
        root_bits = max(0, min(ia_bits - shift[sl], bpl + (4 if stage2 else 0)))
        root_bytes = 8 << root_bits
        root = self.alloc(max(root_bytes, 1 << granule), max(root_bytes, 1 << granule))
        hints: list[int] = []
        if root is None:
            return rng.randrange(1 << 40), hints

        def attrs_leaf(level: int) -> int:
            d = rng.getrandbits(64) & (0xFFC | (0xFFF << 52))
            d &= ~((1 << 10) | (1 << 5) | (1 << 7) | (1 << 6))
            if rng.random() < 0.85:
                d |= 1 << 10
            if rng.random() < 0.85:
                d |= 1 << 5
            if s2fmt:
                d |= rng.choice([3, 3, 3, 1, 2, 0]) << 6
            else:
                d |= (1 << 7 if rng.random() < 0.3 else 0) | (1 << 6 if rng.random() < 0.5 else 0)
            return d

        def attrs_table() -> int:
            d = rng.getrandbits(64) & ((0x3FF << 2) | (0x1FF << 51))
            d &= ~(0xF << 59)
            if rng.random() < 0.85:
                d |= 1 << 63
            if rng.random() < 0.2:
                d |= 1 << 62
            return d

        def fill(table: int, level: int, base: int, nbits: int, depth_budget: int) -> None:
            esize = 1 << shift[level]
            idxs = set()
            if ident_hi:
                idxs.update(i for i in range(min(1 << nbits, (ident_hi + esize - 1) // esize + 1))
                            if base + i * esize < ident_hi)
            for _ in range(rng.randint(1, 5)):
                idxs.add(rng.randrange(1 << nbits) if rng.random() < 0.6 else rng.randrange(min(4, 1 << nbits)))
            for i in sorted(idxs):
                ia = base + i * esize
                in_ident = ia < ident_hi
                hints.append(ia + rng.randrange(esize))
                hints.append(ia)
                r = rng.random()
                if in_ident and level < 3 and (esize > ident_hi or rng.random() < 0.5) and depth_budget > 0:
                    r = 0.5        # table, to reach identity pages
                elif in_ident and rng.random() < 0.9:
                    r = 0.2        # leaf
                ent = table + 8 * i
                if r < 0.08:
                    self.mem.write64(ent, rng.getrandbits(64) & ~1)
                elif r < 0.42:
                    # leaf: page at L3 (or reserved 01), block elsewhere (reserved where not allowed)
                    ident = ia if in_ident else ia & ~(esize - 1)
                    oa = self.out_addr(esize, oa_bits, ident, targets)
                    if in_ident and rng.random() < 0.95:
                        oa = ia
                    kind = 3 if level == 3 else 1
                    if level == 3 and rng.random() < 0.1:
                        kind = 1
                    d = oa | kind | attrs_leaf(level)
                    if in_ident and rng.random() < 0.9:
                        d |= (1 << 10) | (1 << 5) | (3 << 6 if s2fmt else 0)
                        if level < 3 and not (level == 2 or (granule == 12 and level == 1)):
                            d = 0
                    self.mem.write64(ent, d)
                elif r < 0.9 and level < 3 and depth_budget > 0:
                    child = self.alloc(1 << granule, 1 << granule)
                    if child is None:
                        continue
                    self.mem.write64(ent, child | 3 | attrs_table())
                    fill(child, level + 1, ia, bpl, depth_budget - 1)
                else:
                    # bogus table pointer: outside memory, above the OA size, or at a random frame
                    p = rng.choice([self.mem.size + (rng.randrange(1 << 20) << 12), (1 << oa_bits),
                                    rng.randrange(1 << 48), rng.randrange(self.mem.size), self.mem.size - 4096])
                    p &= ((1 << 48) - 1) & ~((1 << granule) - 1)
                    self.mem.write64(ent, p | 3 | attrs_table())

        fill(root, sl, 0, root_bits, 4)
        ttbr = root
        r = rng.random()
        if r < 0.03:
            ttbr = 1 << oa_bits
        elif r < 0.06:
            ttbr = self.mem.size + 4096
        return ttbr, hints


def random_flags(rng: random.Random, s2: bool) -> int:
    if s2:
        return F_S2 | (F_CHECK_AF if rng.random() < 0.8 else 0) | (rng.choice([0, F_NS_CHECK, F_APTABLE])
                                                                     if rng.random() < 0.1 else 0)
    f = 0
    for bit, p in ((F_CHECK_AF, 0.7), (F_NS_CHECK, 0.5), (F_APTABLE, 0.5), (F_S2, 0.05)):
        if rng.random() < p:
            f |= bit
    return f


def addresses(rng: random.Random, hints: list[int], ia_bits: int) -> list[int]:
    out = list(hints)
    out += [h ^ rng.randrange(1 << 12) for h in hints[:20]]
    out += [rng.randrange(1 << ia_bits) for _ in range(8)]
    out += [(1 << ia_bits) + rng.randrange(1 << 20), rng.getrandbits(64), (1 << 64) - 1, 0]
    rng.shuffle(out)
    return out[:160]


def compare(env, ctx_args: tuple, addrs: list[int], rng: random.Random) -> None:
    mem, cw, rw = env
    cw.context(5, *ctx_args)
    rw.context(5, *ctx_args)
    acc = array("B", (rng.choice([1, 1, 2, 3, 0]) for _ in addrs))
    a = array("Q", addrs)
    cw.tlb_enabled = False
    rw.tlb_enabled = False
    c_out, c_f = cw.translate(5, a, acc)
    r_out, r_f = rw.translate(5, a, acc)
    for i, addr in enumerate(addrs):
        assert (c_f[i], c_out[i]) == (r_f[i], r_out[i]), (
            f"addr {addr:#x} acc {acc[i]}: C {cw.decode(c_f[i], c_out[i]) if c_f[i] else hex(c_out[i])} "
            f"ref {rw.decode(r_f[i], r_out[i]) if r_f[i] else hex(r_out[i])}")
    # IOTLB: twice with the TLB on (second pass mostly hits) == TLB off
    cw.tlb_enabled = True
    for _ in range(2):
        t_out, t_f = cw.translate(5, a, acc)
        assert list(t_f) == list(c_f)
        assert list(t_out) == list(c_out)
    # a different access pattern through the warm TLB (permission fallbacks must stay exact)
    acc2 = array("B", (3 - x if x in (1, 2) else x for x in acc))
    t_out, t_f = cw.translate(5, a, acc2)
    cw.tlb_enabled = False
    o_out, o_f = cw.translate(5, a, acc2)
    assert list(t_f) == list(o_f) and list(t_out) == list(o_out)
    # whole transfers (the DMA path): C walks and coalesces in one call, the reference in Python
    cw.tlb_enabled = True
    for addr in addrs[:4]:
        length = rng.choice([1, 8, 4096, rng.randrange(1, 1 << 16), rng.randrange(1, 3 << 20)])
        access = rng.choice([1, 2])
        c_runs = cw.translate_range(5, addr, length, access)
        r_runs = rw.translate_range(5, addr, length, access)
        assert c_runs == r_runs, f"range {addr:#x}+{length:#x} acc {access}: C {c_runs} ref {r_runs}"


def pick_stage(rng: random.Random, modes: list, stage2: bool, mode_idx: int) -> tuple[int, int, int]:
    g, ia, sl = modes[mode_idx % len(modes)]
    if rng.random() < 0.05:
        sl = rng.randrange(4)          # inconsistent configs too: level-0 translation faults
    return g, ia, sl


@SETTINGS
@given(seed=st.integers(0, 2**64 - 1), mode=st.integers(0, 1000))
def test_stage1_only(env, seed: int, mode: int) -> None:
    mem = env[0]
    rng = random.Random(seed)
    soup = Soup(mem, rng)
    try:
        g, ia, sl = pick_stage(rng, S1_MODES, False, mode)
        oa = rng.choice(OA_CHOICES)
        flags = random_flags(rng, False)
        ttbr, hints = soup.build(g, ia, sl, oa, bool(flags & F_S2), False)
        s1 = Stage(ttbr, ia, sl, g, oa, flags)
        compare(env, (s1, None, 0), addresses(rng, hints, ia), rng)
    finally:
        soup.wipe()


@SETTINGS
@given(seed=st.integers(0, 2**64 - 1), mode=st.integers(0, 1000))
def test_stage2_only(env, seed: int, mode: int) -> None:
    mem = env[0]
    rng = random.Random(seed)
    soup = Soup(mem, rng)
    try:
        g, ia, sl = pick_stage(rng, S2_MODES, True, mode)
        oa = rng.choice(OA_CHOICES)
        flags = random_flags(rng, True)
        ttbr, hints = soup.build(g, ia, sl, oa, bool(flags & F_S2), True)
        s2 = Stage(ttbr, ia, sl, g, oa, flags)
        compare(env, (None, s2, 7), addresses(rng, hints, ia), rng)
    finally:
        soup.wipe()


@SETTINGS
@given(seed=st.integers(0, 2**64 - 1), mode=st.integers(0, 1000))
def test_nested(env, seed: int, mode: int) -> None:
    mem = env[0]
    rng = random.Random(seed)
    soup = Soup(mem, rng)
    try:
        g2, ia2, sl2 = pick_stage(rng, S2_MODES, True, mode)
        oa2 = rng.choice([40, 40, 36, 44])
        f2 = random_flags(rng, True)
        # stage 2 first: identity over the low memory where the stage-1 tables (IPAs) will live
        ttbr2, hints2 = soup.build(g2, ia2, sl2, oa2, bool(f2 & F_S2), True, ident_hi=2 << 20)
        g1, ia1, sl1 = pick_stage(rng, S1_MODES, False, mode // 7)
        f1 = random_flags(rng, False)
        # stage-1 tables (IPAs) follow in the pool: mostly inside the identity window, the rest fault
        ttbr1, hints1 = soup.build(g1, ia1, sl1, ia2 if rng.random() < 0.8 else 48, bool(f1 & F_S2), False,
                                   targets=[h & ~0xFFF for h in hints2])
        s1 = Stage(ttbr1, ia1, sl1, g1, ia2 if rng.random() < 0.9 else 40, f1)
        s2 = Stage(ttbr2, ia2, sl2, g2, oa2, f2)
        compare(env, (s1, s2, 9), addresses(rng, hints1, ia1), rng)
    finally:
        soup.wipe()
