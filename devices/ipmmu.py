"""Placeholder until the IPMMU-VMSA model lands: a latch register file whose masters are refused."""
from __future__ import annotations

from vmm.dma import Refuse


class IpmmuPlaceholder:
    def __init__(self) -> None:
        self.regs: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        return self.regs.get(offset, 0) if size == 4 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self.regs[offset] = value

    def translator(self, master: int, domain):
        return Refuse("the IPMMU model is not wired yet")


def build(ctx, spec: dict):
    return IpmmuPlaceholder(), 0x1000
