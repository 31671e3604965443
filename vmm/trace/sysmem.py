"""System memory as a trace addresses it: guest RAM of dom0 by GPA and the device windows.

qtest's ``readl``/``writel``/``read``/``write``/``memset``/``b64*`` all address the board's system
memory, whatever is there (DESIGN.md section 4). This module decides, once per request (the
replayer caches the result), what an address range holds, using only the machine's public face:
``machine.domains["dom0"].ram_ranges``, ``machine.mmio.find``, ``read_guest``/``write_guest`` and
``mmio_read``/``mmio_write``.

- A width access (``readl`` ...) wholly inside guest RAM reads or writes RAM, little-endian, as
  the CPU would; anywhere else it goes to the MMIO bus, which answers holes as hardware does
  (reads 0, writes dropped, logged once) -- so a trace recorded from a run that touched a hole
  replays the same.
- A bulk request (``read``/``write``/``memset``/``b64*``) must lie wholly inside one RAM range or
  one device window; anything else is refused before a byte is allocated. In a device window it
  becomes naturally aligned accesses of at most 4 bytes, low address first (every register of the
  board takes 4-byte halves).
- Nothing allocates in proportion to a request's size beyond ``CHUNK`` at a time, except a
  ``read`` whose result must be returned (bounded by the language's ``MAX_READ``).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmm.machine import Machine

CHUNK = 1 << 20


class Refused(Exception):
    """A bulk request whose range is neither guest RAM nor one device window."""


class SystemMemory:
    """What each address of the machine's system memory holds, and requests bound to it."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.ram = sorted(machine.domains["dom0"].ram_ranges)

    # -- where --------------------------------------------------------------------------------
    def in_ram(self, addr: int, size: int) -> bool:
        for start, length in self.ram:
            if start <= addr and addr + size <= start + length:
                return True
        return False

    def device(self, addr: int, size: int) -> bool:
        hit = self.machine.mmio.find(addr)
        return hit is not None and addr + size <= hit[1]

    def why_not(self, addr: int, size: int) -> str:
        """The one-line reason a bulk range is refused."""
        what = f"[{addr:#x}, {addr + size:#x})"
        for start, length in self.ram:
            if start <= addr < start + length:
                return f"{what} runs past the end of guest RAM at {start + length:#x}"
        hit = self.machine.mmio.find(addr)
        if hit is not None:
            return f"{what} runs past the end of device window {hit[3]} at {hit[1]:#x}"
        ram = ", ".join(f"[{s:#x}, {s + n:#x})" for s, n in self.ram)
        return f"{what} is neither guest RAM of dom0 ({ram}) nor a device window"

    # -- width accesses (readb..q / writeb..q) ---------------------------------------------------
    def load(self, addr: int, size: int) -> Callable[[], int]:
        if self.in_ram(addr, size):
            return partial(self._ram_load, addr, size)
        return partial(self.machine.mmio_read, addr, size)

    def store(self, addr: int, size: int, value: int) -> Callable[[], None]:
        if self.in_ram(addr, size):
            return partial(self.machine.write_guest, addr, value.to_bytes(size, "little"))
        return partial(self.machine.mmio_write, addr, size, value)

    def _ram_load(self, addr: int, size: int) -> int:
        return int.from_bytes(self.machine.read_guest(addr, size), "little")

    # -- bulk requests ------------------------------------------------------------------------
    def reader(self, addr: int, size: int) -> Callable[[], bytes]:
        """``read``/``b64read``: the bytes at [addr, addr + size)."""
        if size == 0:
            return bytes
        if self.in_ram(addr, size):
            return partial(self.machine.read_guest, addr, size)
        if self.device(addr, size):
            return partial(self._device_read, addr, size)
        return partial(_refuse, self.why_not(addr, size))

    def writer(self, addr: int, size: int, data: bytes, fill: int = 0) -> Callable[[], None]:
        """``write``/``b64write``/``memset``: ``data`` then ``fill`` bytes up to ``size``."""
        if size == 0:
            return _nothing
        if self.in_ram(addr, size):
            if len(data) == size:
                return partial(self.machine.write_guest, addr, data)
            return partial(self._ram_fill, addr, size, data, fill)
        if self.device(addr, size):
            return partial(self._device_write, addr, size, data, fill)
        return partial(_refuse, self.why_not(addr, size))

    def _ram_fill(self, addr: int, size: int, data: bytes, fill: int) -> None:
        write = self.machine.write_guest
        if data:
            write(addr, data)
        done = len(data)
        pattern = bytes([fill]) * min(CHUNK, size - done)
        while done < size:
            n = min(CHUNK, size - done)
            write(addr + done, pattern if n == len(pattern) else pattern[:n])
            done += n

    def _device_read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        read = self.machine.mmio_read
        for a, n in _pieces(addr, size):
            out += read(a, n).to_bytes(n, "little")
        return bytes(out)

    def _device_write(self, addr: int, size: int, data: bytes, fill: int) -> None:
        write = self.machine.mmio_write
        padded = data + bytes([fill]) * (size - len(data))     # a device window is a few KiB at most
        for a, n in _pieces(addr, size):
            o = a - addr
            write(a, n, int.from_bytes(padded[o:o + n], "little"))


def _pieces(addr: int, size: int) -> list[tuple[int, int]]:
    """[addr, addr + size) as naturally aligned accesses of 4, 2 or 1 bytes."""
    out = []
    end = addr + size
    while addr < end:
        n = 4
        while n > 1 and (addr % n or addr + n > end):
            n //= 2
        out.append((addr, n))
        addr += n
    return out


def _refuse(why: str) -> None:
    raise Refused(why)


def _nothing() -> None:
    return None
