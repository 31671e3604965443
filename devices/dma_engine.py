"""A minimal DMA engine: the bus master through which payloads and traces exercise IOMMUs.

Semantics are the board contract (DESIGN.md section 3): a copy translates every page it
touches -- source pages, then destination pages, ascending -- and stops at the first page that
fails, writing nothing. So exactly one IOMMU fault is reported per failed copy, and a copy
that translates is carried out whole, synchronously inside the CTRL write.
"""
from __future__ import annotations

import construct as cs

from devices.regs import RegisterMap, merge
from vmm.dma import STATUS_BAD_LENGTH, STATUS_OK, DeviceMemory, DmaFault
from vmm.irq import IrqLine
from vmm.registry import DeviceType, Key

ID_VALUE = 0x31414D44   # "DMA1"
MAX_LEN = 1 << 20
CTRL_RUN = 1 << 0
CTRL_IRQ = 1 << 1

LAYOUT = RegisterMap(cs.Struct(
    "ID" / cs.Int32ul,
    "_pad0" / cs.Padding(4),
    "SRC" / cs.Int64ul,
    "DST" / cs.Int64ul,
    "LEN" / cs.Int32ul,
    "CTRL" / cs.Int32ul,
    "STATUS" / cs.Int32ul,
    "_pad1" / cs.Padding(4),
    "FAULT_ADDR" / cs.Int64ul,
    "MASTER_ID" / cs.Int32ul,
    "IRQ_STATUS" / cs.Int32ul,
))
WRITABLE = {"SRC", "DST", "LEN"}


class DmaEngine:
    LAYOUT = LAYOUT

    def __init__(self, port: DeviceMemory, irq: IrqLine, master_id: int) -> None:
        self.port = port
        self.irq = irq
        self.regs = {name: 0 for name in LAYOUT.fields}
        self.regs["ID"] = ID_VALUE
        self.regs["MASTER_ID"] = master_id
        self.copies = 0

    def read(self, offset: int, size: int) -> int:
        return LAYOUT.read(self.regs, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        hit = LAYOUT.decode.get((offset, size))
        if hit is None:
            return
        name, shift, _ = hit
        if name in WRITABLE:
            self.regs[name] = merge(self.regs[name], value, shift, size)
        elif name == "CTRL":
            self.regs["CTRL"] = value & (CTRL_RUN | CTRL_IRQ)
            if value & CTRL_RUN:
                self.run(bool(value & CTRL_IRQ))
        elif name == "IRQ_STATUS" and value & 1:
            self.regs["IRQ_STATUS"] = 0
            self.irq.lower()

    def run(self, irq: bool) -> None:
        src, dst, length = self.regs["SRC"], self.regs["DST"], self.regs["LEN"]
        status, fault_addr = STATUS_OK, 0
        if not 1 <= length <= MAX_LEN:
            status = STATUS_BAD_LENGTH
        else:
            try:
                src_runs = self.port.map(src, length, False)
                dst_runs = self.port.map(dst, length, True)
                self.port.check(src, src_runs)          # frames are judged once every page translated
                self.port.check(dst, dst_runs)
            except DmaFault as fault:
                status, fault_addr = fault.status, fault.address
            else:
                self.port.scatter(dst_runs, self.port.gather(src_runs))
                self.copies += 1
        self.regs["STATUS"] = status
        self.regs["FAULT_ADDR"] = fault_addr
        self.regs["CTRL"] &= ~CTRL_RUN
        if irq:
            self.regs["IRQ_STATUS"] = 1
            self.irq.raise_()


def build(ctx, spec: dict) -> tuple[DmaEngine, int]:
    return DmaEngine(ctx.dma_memory(spec), ctx.irq(spec["irq"]), spec["master"]), spec["size"]


DEVICE = DeviceType(
    "dma", build, master=True, doc="a memory-to-memory DMA engine: the bus master payloads and traces drive",
    keys=(Key("irq", int, doc="interrupt line raised when a copy with CTRL bit 1 ends"),
          Key("size", int, 0x1000, "window size")))
