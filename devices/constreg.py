"""A read-only register block with fixed contents (the R-Car PRR and the like)."""
from __future__ import annotations

from vmm.registry import DeviceType, Key


class ConstRegister:
    def __init__(self, value: int, size: int = 4) -> None:
        self.value = value
        self.size = size

    def read(self, offset: int, size: int) -> int:
        return (self.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def build(ctx, spec: dict) -> tuple[ConstRegister, int]:
    if not 1 <= spec["size"] <= 8:
        raise ValueError("size must be 1..8 bytes")
    return ConstRegister(spec["value"], spec["size"]), spec["size"]


DEVICE = DeviceType(
    "const", build, doc="a read-only register with a fixed value (the R-Car PRR and the like)",
    keys=(Key("value", int, 0, "what it reads"), Key("size", int, 4, "bytes, 1..8")))
