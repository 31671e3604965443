"""A minimal DMA engine: the bus master through which payloads and traces exercise IOMMUs.

Semantics are the board contract (DESIGN.md sections 3 and 7): the DMA mask first, then a copy
translates every page it touches -- source pages, then destination pages, ascending -- and stops
at the first page that fails, writing nothing; only then are the machine frames judged (a secure
domain's private page: STATUS 7; isolation). So exactly one IOMMU fault is reported per failed copy, and a copy
that translates is carried out whole, synchronously inside the CTRL write.
"""
from __future__ import annotations

import logging

from devices.layout import layout
from devices.regs import RO, W1C, Bank, Reg, RegisterFile
from vmm.dma import ADDR_LIMIT, STATUS_BAD_LENGTH, STATUS_DMA_MASK, STATUS_OK, DeviceMemory, DmaFault
from vmm.irq import IrqLine
from vmm.registry import DeviceType, Key

log = logging.getLogger("vmm.dma")

ID_VALUE = 0x31414D44   # "DMA1"
MAX_LEN = 1 << 20


@layout
def DMA_REGS(cs):
    return cs.Struct(
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
        "PASID" / cs.Int32ul,
        "DMA_BITS" / cs.Int32ul,
    )


LAYOUT = Bank(DMA_REGS, [
    Reg("ID", 0x00, access=RO, reset=ID_VALUE, doc='"DMA1"'),
    Reg("SRC", 0x08, width=8, doc="IOVA to read from"),
    Reg("DST", 0x10, width=8, doc="IOVA to write to"),
    Reg("LEN", 0x18, doc="bytes, 1 .. 1 MiB"),
    Reg("CTRL", 0x1C, fields={"RUN": 0, "IRQ": 1}, wmask=0b11, self_clearing=["RUN"],
        on_write="_ctrl_written", doc="RUN: copy now, synchronously; IRQ: raise the IRQ when done"),
    Reg("STATUS", 0x20, access=RO, doc="0 done/idle, else a vmm.dma STATUS_* code"),
    Reg("FAULT_ADDR", 0x28, width=8, access=RO, doc="first failing IOVA"),
    Reg("MASTER_ID", 0x30, access=RO, doc="uTLB or endpoint ID"),
    Reg("IRQ_STATUS", 0x34, access=W1C, fields={"RAISED": 0}, wmask=0b1, on_write="_irq_acked",
        doc="set when the IRQ is raised; write 1 to clear and lower it"),
    Reg("PASID", 0x38, fields={"PASID": (0, 20), "VALID": 31}, wmask=0x800FFFFF,
        doc="the PASID the engine's accesses carry while VALID is set (DESIGN section 6)"),
    Reg("DMA_BITS", 0x3C, access=RO, doc="address lines the engine drives (DESIGN section 7)"),
], "dma engine")
PASID = LAYOUT["PASID"]
CTRL = LAYOUT["CTRL"]
IRQ_STATUS = LAYOUT["IRQ_STATUS"]


class DmaEngine:
    LAYOUT = LAYOUT

    def __init__(self, port: DeviceMemory, irq: IrqLine, master_id: int, dma_bits: int = 64) -> None:
        self.port = port
        self.irq = irq
        self.regs = RegisterFile(LAYOUT, self, MASTER_ID=master_id, DMA_BITS=dma_bits)
        self.limit = 1 << dma_bits
        self.read = self.regs.read            # the bus face is the register file's: one call per access
        self.write = self.regs.write
        self.copies = 0

    def _ctrl_written(self, old: int, value: int) -> None:
        if CTRL.RUN(value):
            self.run(bool(CTRL.IRQ(value)))

    def _irq_acked(self, old: int, value: int) -> None:
        if IRQ_STATUS.RAISED(value):
            self.irq.lower()

    def run(self, irq: bool) -> None:
        src, dst, length = self.regs["SRC"], self.regs["DST"], self.regs["LEN"]
        status, fault_addr = STATUS_OK, 0
        if not 1 <= length <= MAX_LEN or src + length > ADDR_LIMIT or dst + length > ADDR_LIMIT:
            status = STATUS_BAD_LENGTH
        elif src + length > self.limit or dst + length > self.limit:
            # Hardware would drop the high address bits and hit low memory: refuse, loudly.
            status = STATUS_DMA_MASK
            fault_addr = max(src if src + length > self.limit else dst, self.limit)
            log.warning("%s drives %d address lines but was programmed to touch %#x (copy [%#x, +%#x) -> "
                        "[%#x, +%#x)); refused with STATUS 6: hardware would have truncated the address",
                        self.port.name, self.regs["DMA_BITS"], fault_addr, src, length, dst, length)
        else:
            pasid_reg = self.regs["PASID"]
            pasid = PASID.PASID(pasid_reg) if PASID.VALID(pasid_reg) else None
            try:
                src_runs = self.port.map(src, length, False, pasid)
                dst_runs = self.port.map(dst, length, True, pasid)
                # frames are judged once every page translated: private (STATUS 7), then isolation
                self.port.check_all([(src, src_runs), (dst, dst_runs)])
            except DmaFault as fault:
                status, fault_addr = fault.status, fault.address
            else:
                self.port.copy(src_runs, dst_runs)
                self.copies += 1
        self.regs["STATUS"] = status
        self.regs["FAULT_ADDR"] = fault_addr
        if irq:
            self.regs["IRQ_STATUS"] = IRQ_STATUS.RAISED.mask
            self.irq.raise_()


def build(ctx, spec: dict) -> tuple[DmaEngine, int]:
    if not 1 <= spec["dma_bits"] <= 64:
        raise ValueError("dma_bits must be 1..64")
    return DmaEngine(ctx.dma_memory(spec), ctx.irq(spec["irq"]), spec["master"], spec["dma_bits"]), spec["size"]


DEVICE = DeviceType(
    "dma", build, master=True, doc="a memory-to-memory DMA engine: the bus master payloads and traces drive",
    keys=(Key("irq", int, doc="interrupt line raised when a copy with CTRL bit 1 ends"),
          Key("dma_bits", int, 64, "address lines the engine drives (its DMA mask), 1..64"),
          Key("size", int, 0x1000, "window size")))
