"""A read-only register block with fixed contents (the R-Car PRR and the like)."""
from __future__ import annotations


class ConstRegister:
    def __init__(self, value: int, size: int = 4) -> None:
        self.value = value
        self.size = size

    def read(self, offset: int, size: int) -> int:
        return (self.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass
