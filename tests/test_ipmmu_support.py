"""Helpers shared by the IPMMU tests (no tests here): board addresses, register offsets from the
model's own layout declaration, and a Linux io-pgtable-style stage-1 table builder in machine
memory. Expected values in the tests are spelled out there, not derived from the model."""
from __future__ import annotations

from devices.ipmmu_regs import ctx_offset, utlb_reg_offset
from vmm import Machine

MM, DS0, DS1 = 0xE67B0000, 0xE6740000, 0xE7740000
DMA = {f"dma{n}": 0x0B000000 + 0x1000 * n for n in range(5)}
PAGE = 0x1000

# io-pgtable ARM_32_LPAE_S1 with the NS quirk
NSTABLE = 1 << 63
NS = 1 << 5
AP_RDONLY = 1 << 7
LEAF = NS | (1 << 6) | (2 << 8) | (1 << 10) | (1 << 11)      # NS, AP[1], SH OS, AF, nG
TABLE = 3
LINUX_TTBCR = 0x80000080
XEN_TTBCR = 0xC0000058


def ctx_reg(base: int, c: int, name: str) -> int:
    return base + ctx_offset(c, name)


def utlb_reg(base: int, u: int, name: str) -> int:
    return base + utlb_reg_offset(u, name)


def wide_machine(**kw) -> Machine:
    """rcar-virt with every dma engine driving 64 address lines, so any input address the tests
    choose reaches the IOMMU (on the real board dma0/dma1 drive 32 and dma4 40: DESIGN section 7)."""
    from vmm.board import load_board
    spec = load_board("rcar-virt")
    for d in spec.devices:
        if d["type"] == "dma":
            d["dma_bits"] = 64
    return Machine(spec, **kw)


class Rig:
    """A machine plus the driver-level moves the tests repeat."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.edges: list[tuple[int, bool]] = []
        m.irqs.listeners.append(lambda line, level: self.edges.append((line, level)))

    def rd(self, base: int, c: int, name: str) -> int:
        return self.m.mmio_read(ctx_reg(base, c, name), 4)

    def wr(self, base: int, c: int, name: str, value: int) -> None:
        self.m.mmio_write(ctx_reg(base, c, name), 4, value)

    def imuctr(self, base: int, u: int, value: int | None = None) -> int:
        if value is not None:
            self.m.mmio_write(utlb_reg(base, u, "IMUCTR"), 4, value)
        return self.m.mmio_read(utlb_reg(base, u, "IMUCTR"), 4)

    def linux_context(self, c: int, ttbr: int, ttbcr: int = LINUX_TTBCR, imctr: int = 0x7,
                      cache: int = DS1, utlbs: tuple[int, ...] = (32, 33)) -> None:
        """ipmmu_domain_setup_context + ipmmu_utlb_enable (facts section 3.3)."""
        self.wr(MM, c, "IMTTLBR0", ttbr & 0xFFFFFFFF)
        self.wr(MM, c, "IMTTUBR0", ttbr >> 32)
        self.wr(MM, c, "IMTTBCR", ttbcr)
        self.wr(MM, c, "IMMAIR0", 0xF404FF44)
        self.wr(MM, c, "IMSTR", self.rd(MM, c, "IMSTR"))
        self.wr(cache, c, "IMCTR", imctr)
        self.wr(MM, c, "IMCTR", imctr)
        for u in utlbs:
            self.m.mmio_write(utlb_reg(cache, u, "IMUASID"), 4, 0)
            self.imuctr(cache, u, c << 4 | 3)

    def xen_context(self, c: int, p2m_root: int, cache: int = DS1, utlbs: tuple[int, ...] = (32, 33),
                    s2pte: bool = True) -> None:
        """ipmmu_probe's IMSAUXCTLR + ipmmu_domain_init_context + attach (facts section 4)."""
        aux = self.m.mmio_read(MM + 0x504, 4)
        self.m.mmio_write(MM + 0x504, 4, (aux | 8) if s2pte else (aux & ~8))
        self.wr(MM, c, "IMTTLBR0", p2m_root & 0xFFFFF000)
        self.wr(MM, c, "IMTTUBR0", (p2m_root >> 32) & 0xFF)
        self.wr(MM, c, "IMTTBCR", XEN_TTBCR)
        self.wr(MM, c, "IMSTR", self.rd(MM, c, "IMSTR"))
        self.wr(MM, c, "IMCTR", 0x20000007)
        self.wr(cache, c, "IMCTR", (self.rd(MM, c, "IMCTR") | 2) & 7)
        for u in utlbs:
            old = self.imuctr(cache, u)
            self.m.mmio_write(utlb_reg(cache, u, "IMUASID"), 4, 0)
            self.imuctr(cache, u, old | c << 4 | 1)

    def flush(self, c: int, cache: int = DS1) -> None:
        """ipmmu_tlb_invalidate: RMW FLUSH on the cache copy then the root."""
        v = self.rd(MM, c, "IMCTR") | 2
        self.wr(cache, c, "IMCTR", v)
        self.wr(MM, c, "IMCTR", v)
        assert not self.rd(MM, c, "IMCTR") & 2

    def fault_record(self, c: int) -> tuple[int, int]:
        """(IMSTR, IMEUAR:IMELAR) of a root context."""
        return self.rd(MM, c, "IMSTR"), self.rd(MM, c, "IMELAR") | self.rd(MM, c, "IMEUAR") << 32

    def clear(self, c: int) -> None:
        self.wr(MM, c, "IMSTR", 0)


class Tables:
    """Stage-1 tables in hypervisor pool frames (machine addresses), Linux geometry by default."""

    def __init__(self, m: Machine, ia_bits: int = 32, start_level: int = 1) -> None:
        self.mem = m.memory
        self.ia_bits = ia_bits
        self.start = start_level
        self.root = self.mem.alloc(PAGE, PAGE)

    @staticmethod
    def shift(level: int) -> int:
        return 12 + 9 * (3 - level)

    def _slot(self, table: int, level: int, iova: int) -> int:
        bits = self.ia_bits - self.shift(level) if level == self.start else 9
        return table + 8 * ((iova >> self.shift(level)) & ((1 << bits) - 1))

    def slot(self, iova: int, level: int, nstable: bool = True) -> int:
        """The descriptor address for iova at ``level``, creating tables on the way."""
        table, lvl = self.root, self.start
        while lvl < level:
            a = self._slot(table, lvl, iova)
            d = self.mem.read64(a)
            if not d & 1:
                nxt = self.mem.alloc(PAGE, PAGE)
                d = nxt | TABLE | (NSTABLE if nstable else 0)
                self.mem.write64(a, d)
            table, lvl = d & 0xFFFFFFF000, lvl + 1
        return self._slot(table, lvl, iova)

    def map(self, iova: int, pa: int, size: int = PAGE, ro: bool = False, attrs: int = LEAF) -> int:
        level = {PAGE: 3, 2 << 20: 2, 1 << 30: 1}[size]
        a = self.slot(iova, level)
        self.mem.write64(a, pa | attrs | (AP_RDONLY if ro else 0) | (3 if level == 3 else 1))
        return a

    def unmap(self, iova: int, size: int = PAGE) -> None:
        self.mem.write64(self.slot(iova, {PAGE: 3, 2 << 20: 2, 1 << 30: 1}[size]), 0)
