"""Placeholder until the virtio-mmio transport lands: every slot reads as an empty slot."""
from __future__ import annotations

from vmm.dma import Refuse

MAGIC = 0x74726976


class EmptySlot:
    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        return {0x000: MAGIC, 0x004: 2}.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def translator(self, master: int, domain):
        return Refuse("no virtio-iommu model yet")


def build(ctx, spec: dict):
    return EmptySlot(), 0x200
