"""Machine memory: one memfd whose offsets are machine physical addresses (MPA).

Everything that touches memory -- the CPU backends (through the guest RAM view), DMA, the
table walkers -- reads the same memfd, so no copy can ever disagree with another.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

PAGE = 4096
PAGE_MASK = ~(PAGE - 1)

_Q = struct.Struct("<Q")


class MemoryError_(Exception):
    """An access outside machine memory."""


class MachineMemory:
    """The machine's physical memory.

    ``view`` is a writable memoryview over the whole memfd and ``address`` its host address
    (for C code). ``alloc`` hands out zeroed hypervisor frames (P2M tables and the like) from a
    pool above the regions that were reserved for guest RAM.
    """

    def __init__(self, size: int, name: str = "iommu-lab") -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"machine memory size must be a positive multiple of 4 KiB, not {size:#x}")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._pool_next = 0
        self._pool_end = size
        self._free: list[int] = []

    # -- hypervisor frame pool -------------------------------------------------------------
    def set_pool(self, start: int, end: int) -> None:
        """Frames in [start, end) belong to the hypervisor pool used by ``alloc``."""
        self._pool_next = (start + PAGE - 1) & PAGE_MASK
        self._pool_end = min(end, self.size)

    def alloc(self, nbytes: int = PAGE, align: int = PAGE) -> int:
        """Allocate zeroed machine memory for hypervisor structures; returns its MPA."""
        nbytes = (nbytes + PAGE - 1) & PAGE_MASK
        if nbytes == PAGE and align <= PAGE and self._free:
            mpa = self._free.pop()
        else:
            mpa = (self._pool_next + align - 1) & ~(align - 1)
            if mpa + nbytes > self._pool_end:
                raise MemoryError_("hypervisor frame pool exhausted")
            self._pool_next = mpa + nbytes
        self.view[mpa:mpa + nbytes] = bytes(nbytes)
        return mpa

    def free(self, mpa: int, nbytes: int = PAGE) -> None:
        for off in range(0, nbytes, PAGE):
            self._free.append(mpa + off)

    # -- accessors ------------------------------------------------------------------------
    def contains(self, mpa: int, length: int = 1) -> bool:
        return 0 <= mpa and length >= 0 and mpa + length <= self.size

    def read(self, mpa: int, length: int) -> bytes:
        if not self.contains(mpa, length):
            raise MemoryError_(f"machine read [{mpa:#x}, +{length:#x}) outside memory")
        return self.map[mpa:mpa + length]

    def write(self, mpa: int, data: bytes) -> None:
        if not self.contains(mpa, len(data)):
            raise MemoryError_(f"machine write [{mpa:#x}, +{len(data):#x}) outside memory")
        self.view[mpa:mpa + len(data)] = data

    def read64(self, mpa: int) -> int:
        return _Q.unpack_from(self.map, mpa)[0]

    def write64(self, mpa: int, value: int) -> None:
        _Q.pack_into(self.map, mpa, value)

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            # A C module or a ctypes object still holds the buffer; the fd goes with the process.
            return
        os.close(self.fd)
