"""The CPU's view of a domain's RAM, assembled page by page from machine memory.

Each RAM range gets one reserved host address range; every guest page in it is an
``mmap(MAP_FIXED | MAP_SHARED)`` of the machine frame the P2M names, with contiguous runs
coalesced into one mapping. KVM memslots and unicorn ``mem_map_ptr`` point at these host
ranges, so the CPU writes exactly the frame that DMA reads. When the P2M changes, ``remap``
replaces just the affected pages; the host address stays put, so neither backend needs to
re-register anything (KVM follows through its MMU notifiers, unicorn through the same pointer).
"""
from __future__ import annotations

import ctypes
import mmap
import weakref
from collections.abc import Callable

from vmm.memory import PAGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_RW = mmap.PROT_READ | mmap.PROT_WRITE

Lookup = Callable[[int, int], list[int | None]]   # (gpa, pages) -> each page's mpa, None when unmapped


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    res = _libc.mmap(addr, length, prot, flags, fd, offset)
    if res == _MAP_FAILED or res is None:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length:#x} bytes failed")
    return res


class RamRange:
    def __init__(self, gpa: int, size: int) -> None:
        self.gpa = gpa
        self.size = size
        self.host = _mmap(0, size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        self.view = memoryview((ctypes.c_char * size).from_address(self.host)).cast("B")
        # A scattered layout costs one mapping per page; give them back with the object.
        self._finalizer = weakref.finalize(self, _libc.munmap, self.host, size)


MAP_MARGIN = 4096          # mappings left for everything else the process maps (libraries, KVM, unicorn)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def mapping_budget() -> tuple[int, int] | None:
    """(vm.max_map_count, mappings this process holds now), or None where the kernel does not say."""
    limit = _read_int("/proc/sys/vm/max_map_count")
    if limit is None:
        return None
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
    except OSError:
        return None
    return limit, used


def check_mappings(needed: int) -> str | None:
    """Why ``needed`` more host mappings would exceed the kernel's per-process limit, or None.

    A scattered P2M costs one mapping per guest page; past ``vm.max_map_count`` mmap fails half way
    through building the machine, so the machine refuses up front with a line saying what to do."""
    budget = mapping_budget()
    if budget is None:
        return None
    limit, used = budget
    if needed + used + MAP_MARGIN <= limit:
        return None
    return (f"this layout needs {needed} host mappings of guest RAM (one per machine-contiguous run), but "
            f"vm.max_map_count is {limit} with {used} in use; use less RAM, --p2m direct, or raise the limit "
            f"(sysctl -w vm.max_map_count={max(262144, 2 * (needed + used + MAP_MARGIN))})")


class GuestRam:
    """Host mappings of a domain's RAM ranges, kept equal to what its P2M says."""

    def __init__(self, memfd: int, ranges: list[tuple[int, int]], lookup: Lookup) -> None:
        self.memfd = memfd
        self.lookup = lookup
        self.ranges = [RamRange(gpa, size) for gpa, size in ranges]
        for r in self.ranges:
            self.remap(r.gpa, r.size)

    def find(self, gpa: int) -> RamRange | None:
        for r in self.ranges:
            if r.gpa <= gpa < r.gpa + r.size:
                return r
        return None

    def remap(self, gpa: int, size: int) -> None:
        """Rebuild the host mapping of [gpa, gpa + size) from the P2M."""
        start = gpa & ~(PAGE - 1)
        end = (gpa + size + PAGE - 1) & ~(PAGE - 1)
        for r in self.ranges:
            lo, hi = max(start, r.gpa), min(end, r.gpa + r.size)
            if lo < hi:
                self._remap_range(r, lo, hi)

    def _remap_range(self, r: RamRange, lo: int, hi: int) -> None:
        run: list | None = None          # [gpa, mpa or None, length]: one mmap call
        for i, mpa in enumerate(self.lookup(lo, (hi - lo) // PAGE)):
            page = lo + i * PAGE
            if run is not None and (mpa is None) == (run[1] is None) and (mpa is None or mpa == run[1] + run[2]):
                run[2] += PAGE
                continue
            if run is not None:
                self._place(r, *run)
            run = [page, mpa, PAGE]
        if run is not None:
            self._place(r, *run)

    def _place(self, r: RamRange, gpa: int, mpa: int | None, length: int) -> None:
        host = r.host + (gpa - r.gpa)
        if mpa is None:
            # Unmapped in the P2M: private zero page, invisible to every DMA.
            _mmap(host, length, _RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
        else:
            _mmap(host, length, _RW, mmap.MAP_SHARED | _MAP_FIXED, self.memfd, mpa)

    def close(self) -> None:
        for r in self.ranges:
            r.view.release()
            r._finalizer()
        self.ranges = []
