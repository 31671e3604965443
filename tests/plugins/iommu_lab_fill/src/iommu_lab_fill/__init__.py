"""pattern-fill: a second kind of bus master, written as an out-of-tree iommu-lab plugin.

It fills ``LEN`` bytes at the bus address ``ADDR`` with a repeated 32-bit ``PATTERN`` when the
driver writes 1 to ``GO``, through whatever IOMMU the board wires it behind. ``STATUS`` is 0 or the
machine's DMA fault status (2 translation, 3 permission, 5 refused); ``FILLED`` counts fills.
Everything it needs from iommu-lab is the registry (``DeviceType``, ``Key``) and the memory
window the build context hands a master: it never sees the CPU, the bus or machine memory.
"""
from __future__ import annotations

from vmm.dma import DeviceMemory, DmaFault
from vmm.registry import DeviceType, Key

ID, ADDR, LEN, PATTERN, GO, STATUS, FILLED = 0x00, 0x08, 0x10, 0x14, 0x18, 0x1C, 0x20
ID_VALUE = 0x4C4C4946            # "FILL"
MAX_LEN = 1 << 20


class PatternFill:
    def __init__(self, mem: DeviceMemory) -> None:
        self.mem = mem
        self.regs = {ADDR: 0, LEN: 0, PATTERN: 0, STATUS: 0, FILLED: 0}

    def read(self, offset: int, size: int) -> int:
        if offset == ID:
            return ID_VALUE
        return self.regs.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset in (ADDR, LEN, PATTERN):
            self.regs[offset] = value
        elif offset == GO and value & 1:
            self.fill()

    def fill(self) -> None:
        length = self.regs[LEN]
        if not 1 <= length <= MAX_LEN:
            self.regs[STATUS] = 4
            return
        data = (self.regs[PATTERN] & 0xFFFFFFFF).to_bytes(4, "little") * (length // 4 + 1)
        try:
            self.mem.write(self.regs[ADDR], data[:length])
        except DmaFault as fault:
            self.regs[STATUS] = fault.status
            return
        self.regs[STATUS] = 0
        self.regs[FILLED] += 1


def build(ctx, spec: dict) -> tuple[PatternFill, int]:
    return PatternFill(ctx.dma_memory(spec)), spec["size"]


DEVICE = DeviceType(
    "pattern-fill", build, master=True, doc="fills memory with a 32-bit pattern by DMA (plugin example)",
    keys=(Key("size", int, 0x100, "window size"),))
