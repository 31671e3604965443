"""A domain's P2M: the one stage-2 table that the CPU, the IOMMUs and the harness all obey.

The table lives in hypervisor-owned machine frames (VMSAv8-64 stage 2, 4 KiB granule, 40-bit
IPA, start level 1 with two concatenated level-1 tables: VTCR T0SZ=24, SL0=1). Every change
goes through ``map``/``unmap``/``protect`` and is then pushed to everything that derived state
from it: the walker's IOTLB (by IPA range), the CPU's RAM view, and registered listeners such
as an IPMMU context whose TTBR is this root (Xen's ``iommu_iotlb_flush`` on ``__p2m_set_entry``).
"""
from __future__ import annotations

from array import array
from collections.abc import Callable

from vmm.memory import PAGE, MachineMemory
from vmm.p2m_tables import PageTable
from vmm.walker import F_S2, PERMISSION, R, Stage, W, Walker

IPA_BITS = 40
START_LEVEL = 1
GIB = 1 << 30
MIB2 = 2 << 20

Listener = Callable[[int, int], None]


class P2M:
    def __init__(self, memory: MachineMemory, walker: Walker, ctx_id: int, s2_id: int) -> None:
        self.memory = memory
        self.walker = walker
        self.ctx_id = ctx_id
        self.s2_id = s2_id
        self.listeners: list[Listener] = []
        self._quiet = True
        self.table = PageTable(memory, stage=2, ia_bits=IPA_BITS, start_level=START_LEVEL, on_change=self._changed)
        self.root = self.table.root
        self.vtcr = self.table.vtcr
        self.stage = Stage(ttbr=self.root, ia_bits=IPA_BITS, start_level=START_LEVEL, oa_bits=40, flags=F_S2)
        walker.context(ctx_id, None, self.stage, s2_id=s2_id)
        self.ram = None      # GuestRam, attached by the machine once the initial layout is built

    # -- building ---------------------------------------------------------------------------
    def populate(self, gpa: int, mpa: int, size: int, perms: int = R | W) -> None:
        """Map a contiguous run with the largest blocks that fit (used to lay out RAM)."""
        end = gpa + size
        while gpa < end:
            for block in (GIB, MIB2, PAGE):
                if gpa % block == 0 and mpa % block == 0 and gpa + block <= end:
                    break
            self.table.map(gpa, mpa, block, perms)
            gpa += block
            mpa += block

    def go_live(self) -> None:
        """From now on every change is propagated."""
        self._quiet = False
        self.walker.invalidate_ipa(self.s2_id, 0, 1 << IPA_BITS)

    # -- the API ----------------------------------------------------------------------------
    def map(self, gpa: int, mpa: int, size: int, perms: int = R | W) -> None:
        self.table.map(gpa, mpa, size, perms)

    def unmap(self, gpa: int, size: int) -> None:
        self.table.unmap(gpa, size)

    def protect(self, gpa: int, size: int, perms: int) -> None:
        self.table.protect(gpa, size, perms)

    def lookup(self, gpa: int) -> tuple[int, int, int] | None:
        """(mpa, perms, block size) of the page holding gpa, or None."""
        return self.table.lookup(gpa)

    def translate(self, gpa: int, access: int = R) -> int | None:
        res = self.walker.translate1(self.ctx_id, gpa, access)
        return res if isinstance(res, int) else None

    def lookup_pages(self, gpa: int, count: int) -> list[int | None]:
        """Machine page of each of ``count`` guest pages from gpa (the CPU view's source)."""
        addrs = array("Q", range(gpa, gpa + count * PAGE, PAGE))
        out, faults = self.walker.translate(self.ctx_id, addrs, R)
        result: list[int | None] = list(out)
        for i, f in enumerate(faults):
            if f:
                if f & 0xF == PERMISSION:
                    hit = self.table.lookup(addrs[i])
                    result[i] = (hit[0] & ~(PAGE - 1)) if hit else None
                else:
                    result[i] = None
        return result

    def _changed(self, gpa: int, size: int) -> None:
        if self._quiet:
            return
        self.walker.invalidate_ipa(self.s2_id, gpa, size)
        if self.ram is not None:
            self.ram.remap(gpa, size)
        for listener in self.listeners:
            listener(gpa, size)
