"""Walker bench: ns per translation for an IOTLB hit, a stage-2 miss walk and a nested miss walk,
against the Python reference and against a floor (a C chain of the same number of dependent
loads, ``wk_bench_chase`` in walker.c).

Setup: a scattered P2M (stage 2, 4K, 40-bit IPA, L1 x2: 3 loads per walk) over 32 MiB and a
stage-1 table (4K, 32-bit IOVA, L1 start: 3 levels, tables in IPA space) mapping 16 MiB of 4K
pages, so a nested walk is 3 x (3 + 1) + 3 = 15 dependent loads.

Usage: python bench/walker.py  (about 10 s)
"""
from __future__ import annotations

import os
import random
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm.memory import MachineMemory  # noqa: E402
from vmm.p2m_tables import PageTable  # noqa: E402
from vmm.walker import R, ReferenceWalker, W, Walker  # noqa: E402

MiB = 1 << 20
BATCH = 4096


class IpaSpace:
    """Reads/writes guest-physical addresses through the P2M (stage-1 tables live there)."""

    def __init__(self, mem: MachineMemory, p2m: PageTable, lo: int, hi: int) -> None:
        self.mem, self.p2m, self.next, self.hi = mem, p2m, lo, hi

    def _mpa(self, ipa: int) -> int:
        hit = self.p2m.lookup(ipa)
        assert hit is not None
        return hit[0]

    def read(self, ipa: int, n: int) -> bytes:
        return self.mem.read(self._mpa(ipa), n)

    def write(self, ipa: int, data: bytes) -> None:
        self.mem.write(self._mpa(ipa), data)

    def read64(self, ipa: int) -> int:
        return self.mem.read64(self._mpa(ipa))

    def write64(self, ipa: int, v: int) -> None:
        self.mem.write64(self._mpa(ipa), v)

    def alloc(self, nbytes: int, align: int) -> int:
        ipa = (self.next + align - 1) & ~(align - 1)
        assert ipa + nbytes <= self.hi
        self.next = ipa + nbytes
        for off in range(0, nbytes, 4096):
            self.write(ipa + off, bytes(4096))
        return ipa

    def free(self, ipa: int, nbytes: int) -> None:
        pass


def build():
    rng = random.Random(1)
    mem = MachineMemory(64 * MiB)
    mem.set_pool(32 * MiB, 64 * MiB)
    p2m = PageTable(mem, stage=2, ia_bits=40, start_level=1)
    frames = list(range(0, 32 * MiB, 4096))
    rng.shuffle(frames)
    for i, mpa in enumerate(frames):                       # scattered: every page elsewhere
        p2m.map(i * 4096, mpa, 4096, R | W)
    ipas = IpaSpace(mem, p2m, 24 * MiB, 32 * MiB)
    s1 = PageTable(ipas, stage=1, ia_bits=32, start_level=1, alloc=ipas.alloc, free=ipas.free)
    targets = list(range(0, 16 * MiB, 4096))
    rng.shuffle(targets)
    for i, ipa in enumerate(targets):
        s1.map(i * 4096, ipa, 4096, R | W)
    return mem, p2m, s1


def loop(fn, n: int):
    """``n`` calls of ``fn`` (results dropped at once: keeping them would time the allocator)."""
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def per_op(fn, nops: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` ns per operation."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e9 / nops


def floor_chain(w: Walker, mem: MachineMemory, loads: int, region: int) -> float:
    """ns for ``loads`` dependent loads, each in its own 4K frame (like table pages)."""
    base = region
    nodes = [base + k * 4096 + (k * 200 % 4096 & ~7) for k in range(loads)]
    for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True):     # a cycle: every load depends on the last
        mem.write64(a, b)
    reps = 200_000
    return per_op(lambda: w._bench_chase(nodes[0], loads, reps), reps)


def main() -> None:
    t_start = time.perf_counter()
    mem, p2m, s1 = build()
    w, ref = Walker(mem), ReferenceWalker(mem)
    for x in (w, ref):
        x.context(1, None, p2m.walker_stage(), s2_id=1)
        x.context(2, s1.walker_stage(), p2m.walker_stage(), s2_id=1)
    rng = random.Random(2)
    iovas = array("Q", (p * 4096 + rng.randrange(4096) for p in range(BATCH)))
    ipas = array("Q", (rng.randrange(32 * MiB) for _ in range(BATCH)))
    small = 512
    iovas_small, ipas_small = iovas[:small], ipas[:small]

    # sanity: both walkers agree on the bench workload
    assert w.translate(2, iovas_small, R) == ref.translate(2, iovas_small, R)

    rows = []
    # IOTLB hit: warm the TLB, then batches of 4096 hits (nested context)
    w.tlb_enabled = True
    w.translate(2, iovas, R)
    w.reset_stats()
    calls = 50
    c_hit = per_op(loop(lambda: w.translate(2, iovas, R), calls), calls * BATCH)
    st = w.stats()
    assert st["walks"] == 0 and st["hits"] == 5 * calls * BATCH, st
    ref.tlb_enabled = True
    ref.translate(2, iovas_small, R)
    r_hit = per_op(lambda: ref.translate(2, iovas_small, R), small, repeat=3)
    rows.append(("IOTLB hit (nested ctx)", 1, c_hit, r_hit, 10.0))

    # miss walks: TLB off
    w.tlb_enabled = False
    ref.tlb_enabled = False
    c_s2 = per_op(loop(lambda: w.translate(1, ipas, W), 20), 20 * BATCH)
    r_s2 = per_op(lambda: ref.translate(1, ipas_small, W), small, repeat=3)
    rows.append(("stage-2 miss walk", 3, c_s2, r_s2, None))
    c_n = per_op(loop(lambda: w.translate(2, iovas, R), 10), 10 * BATCH)
    r_n = per_op(lambda: ref.translate(2, iovas_small, R), small, repeat=3)
    rows.append(("nested miss walk", 15, c_n, r_n, 80.0))

    floor_region = 40 * MiB    # pool frames not used by the tables above
    print(f"{'operation':26s} {'loads':>5s} {'C ns/op':>9s} {'ref ns/op':>10s} {'ref/C':>8s} "
          f"{'floor ns':>9s} {'C/floor':>8s} {'goal':>10s}")
    ok = True
    for name, loads, c, r, goal in rows:
        fl = floor_chain(w, mem, loads, floor_region)
        verdict = ""
        if goal is not None:
            verdict = f"<= {goal:.0f} ns " + ("ok" if c <= goal else "MISSED")
            ok &= c <= goal
        ok &= r / c >= 100
        print(f"{name:26s} {loads:5d} {c:9.1f} {r:10.0f} {r / c:7.0f}x {fl:9.1f} {c / fl:7.1f}x {verdict:>10s}")
    print(f"(ref/C goal >= 100x; batches of {BATCH}; best of 5; total {time.perf_counter() - t_start:.1f} s)")
    print("all goals met" if ok else "SOME GOALS MISSED")


if __name__ == "__main__":
    main()
