"""Address buses: sorted, non-overlapping ranges that dispatch ``(offset, size[, value])``.

The bus owns absolute addresses; devices see only offsets into their window. Accesses that
hit no device read 0 and drop writes, logged once per address so a typo in a payload or a
trace is visible without flooding the console.
"""
from __future__ import annotations

import bisect
import logging
from typing import Protocol

log = logging.getLogger("vmm.bus")


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """A board asked for overlapping or empty ranges."""


class Bus:
    def __init__(self, kind: str, log_unclaimed: bool = True) -> None:
        self.kind = kind
        self.log_unclaimed = log_unclaimed
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice, str]] = []   # (start, end, device, name)
        self._unclaimed_logged: set[tuple[str, int]] = set()     # bounded: a guest may try every address
        self.unclaimed = 0

    def add(self, base: int, size: int, device: BusDevice, name: str) -> None:
        if size <= 0:
            raise BusError(f"{self.kind} range for {name} is empty")
        end = base + size
        i = bisect.bisect_right(self._starts, base)
        if i > 0 and self._ranges[i - 1][1] > base:
            other = self._ranges[i - 1]
            raise BusError(f"{self.kind} range {name} [{base:#x}, {end:#x}) overlaps {other[3]} "
                           f"[{other[0]:#x}, {other[1]:#x})")
        if i < len(self._ranges) and self._ranges[i][0] < end:
            other = self._ranges[i]
            raise BusError(f"{self.kind} range {name} [{base:#x}, {end:#x}) overlaps {other[3]} "
                           f"[{other[0]:#x}, {other[1]:#x})")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, end, device, name))

    def ranges(self) -> list[tuple[int, int, str]]:
        return [(s, e - s, n) for s, e, _, n in self._ranges]

    def find(self, addr: int) -> tuple[int, int, BusDevice, str] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r[1]:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, dev, _ = self._ranges[i]
            if addr + size <= end:
                return dev.read(addr - start, size) & ((1 << (size * 8)) - 1)
        self._unclaimed(addr, size, "read")
        return 0

    def write(self, addr: int, size: int, value: int) -> None:
        value &= (1 << (size * 8)) - 1
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, dev, _ = self._ranges[i]
            if addr + size <= end:
                dev.write(addr - start, size, value)
                return
        self._unclaimed(addr, size, "write")

    def _unclaimed(self, addr: int, size: int, what: str) -> None:
        self.unclaimed += 1
        key = (what, addr)
        if self.log_unclaimed and key not in self._unclaimed_logged and len(self._unclaimed_logged) < 4096:
            self._unclaimed_logged.add(key)
            log.warning("unclaimed %s %s of %d bytes at %#x (%s)", self.kind, what, size, addr,
                        "reads 0" if what == "read" else "dropped")
