"""Register layouts declared once with ``construct`` and compiled to offset tables.

A device declares its registers as a ``construct.Struct`` of fixed-size little-endian fields.
``RegisterMap`` turns that declaration into a dict keyed by ``(offset, size)`` at import time,
so an access costs one dict lookup and never a ``construct`` parse. 8-byte registers also
answer 4-byte accesses to either half (low half at the lower address), as 32-bit code needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import construct as cs


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int


class RegisterMap:
    def __init__(self, layout: cs.Construct) -> None:
        self.layout = layout
        self.fields: dict[str, Field] = {}
        # (offset, access size) -> (register name, bit shift into the register, register size)
        self.decode: dict[tuple[int, int], tuple[str, int, int]] = {}
        offset = 0
        for sub in layout.subcons:
            size = sub.sizeof()
            if sub.name and not sub.name.startswith("_"):
                self.fields[sub.name] = Field(sub.name, offset, size)
                self.decode[(offset, size)] = (sub.name, 0, size)
                if size == 8:
                    self.decode[(offset, 4)] = (sub.name, 0, 8)
                    self.decode[(offset + 4, 4)] = (sub.name, 32, 8)
            offset += size
        self.size = offset

    def read(self, values: dict[str, int], offset: int, size: int) -> int:
        """The bytes an access at (offset, size) sees of a register file held as {name: value};
        0 for anything that is not a register or a register half."""
        hit = self.decode.get((offset, size))
        if hit is None:
            return 0
        name, shift, _ = hit
        return (values[name] >> shift) & ((1 << (size * 8)) - 1)

    def offset(self, name: str) -> int:
        return self.fields[name].offset

    def build(self, values: dict[str, int]) -> bytes:
        """The register block as bytes (for tests and documentation)."""
        full = {name: values.get(name, 0) for name in self.fields}
        return self.layout.build(full)


def merge(old: int, value: int, shift: int, access_size: int) -> int:
    """Store ``value`` into the ``access_size`` bytes of ``old`` that start at bit ``shift``."""
    mask = ((1 << (access_size * 8)) - 1) << shift
    return (old & ~mask) | ((value << shift) & mask)
