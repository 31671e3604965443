"""DMA throughput through the IPMMU-VMSA model, against the same copies with the uTLB off.

Drives the machine from Python with no CPU (m.mmio_write / m.dma), in one run:
- pass-through: ds1 uTLB 32 off, dma0 copies machine addresses;
- stage 1 (Linux): context 1, 4 KiB pages (the io-pgtable case that walks the most);
- stage 2 (Xen): context 2 over dom0's P2M;
each for 4 KiB and 1 MiB copies, cold (IMCTR FLUSH before every copy) and warm (TLB filled).
Goal: warm 1 MiB copies at least 0.5x pass-through.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm import Machine  # noqa: E402

MM, DS1 = 0xE67B0000, 0xE7740000
PAGE = 0x1000
MIB = 1 << 20
IOVA = 0x1000_0000
SRC, DST = 0x100_0000, 0x200_0000                 # machine = guest-physical on the direct board
LEAF = (1 << 5) | (1 << 6) | (2 << 8) | (1 << 10) | (1 << 11) | 3
GOAL = 0.5


def setup(m: Machine) -> None:
    mem = m.memory
    l1 = mem.alloc(PAGE, PAGE)
    l2 = mem.alloc(PAGE, PAGE)
    mem.write64(l1, l2 | (1 << 63) | 3)
    for region, pa in ((0, SRC), (1, DST)):          # IOVA 0x1000_0000 + region * 2 MiB
        l3 = mem.alloc(PAGE, PAGE)
        mem.write64(l2 + 8 * (0x80 + region), l3 | (1 << 63) | 3)
        for i in range(512):
            mem.write64(l3 + 8 * i, (pa + i * PAGE) | LEAF)
    w = m.mmio_write
    w(MM + 0x40 + 0x10, 4, l1)
    w(MM + 0x40 + 0x14, 4, 0)
    w(MM + 0x40 + 0x08, 4, 0x80000080)
    w(MM + 0x40, 4, 0x7)
    root = m.dom0.p2m.root
    w(MM + 0x504, 4, 0x8)
    w(MM + 0x80 + 0x10, 4, root & 0xFFFFF000)
    w(MM + 0x80 + 0x14, 4, root >> 32)
    w(MM + 0x80 + 0x08, 4, 0xC0000058)
    w(MM + 0x80, 4, 0x20000007)
    mem.write(SRC, bytes(range(256)) * (MIB // 256))


def mode(m: Machine, name: str) -> tuple[int, int, int | None]:
    """Point uTLB 32 at the mode; returns (src, dst, context or None)."""
    if name == "pass-through":
        m.mmio_write(DS1 + 0x600, 4, 0)
        return SRC, DST, None
    ctx = 1 if name == "stage 1" else 2
    m.mmio_write(DS1 + 0x600, 4, ctx << 4 | 3)
    return (IOVA, IOVA + 2 * MIB, ctx) if ctx == 1 else (SRC, DST, ctx)


def measure(m: Machine, name: str, length: int, cold: bool, reps: int) -> float:
    src, dst, ctx = mode(m, name)
    assert m.dma("dma0", src, dst, length) == (0, 0), name
    times = []
    for _ in range(reps):
        if cold and ctx is not None:
            m.mmio_write(MM + 0x40 * ctx, 4, m.mmio_read(MM + 0x40 * ctx, 4) | 2)
        t0 = time.perf_counter()
        m.dma("dma0", src, dst, length)
        times.append(time.perf_counter() - t0)
    return length / statistics.median(times) / MIB


def main() -> int:
    m = Machine.from_board("rcar-virt")
    try:
        setup(m)
        assert m.memory.read(DST, 64) == bytes(64)
        results = {}
        for length, reps in ((4 * 1024, 3000), (MIB, 150)):
            for name in ("pass-through", "stage 1", "stage 2"):
                for cold in (True, False):
                    if name == "pass-through" and not cold:
                        continue
                    results[(name, length, cold)] = measure(m, name, length, cold, reps)
        assert m.memory.read(DST, MIB) == m.memory.read(SRC, MIB)
    finally:
        m.close()
    print("IPMMU DMA throughput (dma0 on ipmmu_ds1 uTLB 32, MiB/s, median of a run)")
    print(f"{'mode':<14}{'size':>8}{'TLB':>7}{'MiB/s':>11}{'vs pass-through':>18}")
    ok = True
    for (name, length, cold), mbs in results.items():
        base = results[("pass-through", length, True)]
        ratio = mbs / base
        tlb = "-" if name == "pass-through" else ("cold" if cold else "warm")
        size = "4 KiB" if length < MIB else "1 MiB"
        print(f"{name:<14}{size:>8}{tlb:>7}{mbs:>11.1f}{ratio:>17.2f}x")
        if length == MIB and not cold and name != "pass-through":
            ok &= ratio >= GOAL
    print(f"goal: warm 1 MiB copies >= {GOAL}x pass-through: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
