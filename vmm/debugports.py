"""The Bochs/QEMU debug ports every payload reports through.

Port 0xE9 is the debug console (a byte written is printed; a read returns 0xE9, so a guest can
detect it). Port 0xF4 is the debug exit: writing V ends the run with status V.
"""
from __future__ import annotations

from collections.abc import Callable


class DebugConsole:
    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self._emit = emit

    def read(self, offset: int, size: int) -> int:
        return 0xE9

    def write(self, offset: int, size: int, value: int) -> None:
        self._emit(value.to_bytes(size, "little")[:1] if size == 1 else value.to_bytes(size, "little"))


class DebugExit:
    def __init__(self, stop: Callable[[int], None]) -> None:
        self._stop = stop

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._stop(value)
