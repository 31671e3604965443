"""The emulated backend: unicorn x86-64 (64-bit mode), entered in the PVH 32-bit state.

Exceptions, INT n, SYSCALL and CPUID are completed by vmm/backends/x86cpu.py, from QEMU's own code
inside libunicorn, so the guest's IDT, stacks and privilege changes work as on hardware.

Unicorn splits an 8-byte MMIO access into two 4-byte callbacks while KVM delivers one 8-byte
exit, but its memory hook sees every access whole, before it happens. So the pages of bus
devices are backed by host memory of our own: the memory hook performs the access on the bus
with its real width and, for a read, drops the value into the backing page, from which the
guest's load then reads it. One Python call per access, and devices see the same accesses on
both backends. The rest of the physical space (40 bits) is ``mmio_map``-ed (unclaimed accesses:
reads 0), where the hook does the access and the split callbacks only hand back the halves.

The hooks unicorn calls are C (vmm/backends/emu_build.py): a ctypes or binding callback spends
more converting its six arguments than the bus and a device spend on the access.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import struct
import time
from collections.abc import Callable

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_INSN,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn.unicorn_py3.unicorn import HOOK_MEM_ACCESS_CFUNC, uclib
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_EBX,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_MSR,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
    UC_X86_REG_TR,
)

from vmm.backends import EXIT_CRASHED, EXIT_HALTED, EXIT_TIMEOUT, DebugStop, RunResult, load_compiled
from vmm.backends.emu_debug import EmulatedDebug
from vmm.backends.irqloop import InterruptSources
from vmm.backends.x86cpu import X86Cpu
from vmm.memory import PAGE

_ex = load_compiled("_emu")
_MEM_HOOK, _GAP_READ, _GAP_WRITE = (int(_ex.ffi.cast("uintptr_t", _ex.ffi.addressof(_ex.lib, f)))
                                     for f in ("ex_mem_hook", "ex_gap_read", "ex_gap_write"))


BOOT_GDT = 0x5000        # below hvm_start_info; the payload loads its own GDT at once
PHYS_LIMIT = 1 << 40        # unclaimed accesses anywhere below read 0, as on KVM
ADDR_MASK = 0x000FFFFFFFFFF000     # physical address bits of a page-table entry
_U64 = (1 << 64) - 1
_UNMAPPED = (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED)
# What the C hook calls, by slot: a machine's mmio_read/mmio_write, or one device's read/write.
_reads: dict[int, Callable[[int, int], int]] = {}
_writes: dict[int, Callable[[int, int, int], None]] = {}
_owners: dict[int, EmulatedBackend] = {}
_slots = itertools.count(1)


@_ex.ffi.def_extern()
def ex_read(slot: int, addr: int, size: int) -> int:
    """A read from the C memory hook (an address, or an offset into one device); C masks it to
    ``size`` and hands it to the guest."""
    try:
        return _reads[slot](addr, size) & _U64
    except BaseException as e:        # noqa: BLE001 - re-raised once emu_start returns
        _owners[slot]._fail(e)
        return 0


@_ex.ffi.def_extern()
def ex_write(slot: int, addr: int, size: int, value: int) -> None:
    """A write from the C memory hook (the value already masked to ``size``)."""
    try:
        _writes[slot](addr, size, value)
    except BaseException as e:        # noqa: BLE001 - re-raised once emu_start returns
        _owners[slot]._fail(e)


def _page_cover(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge ranges into page-aligned, non-overlapping (start, size) spans."""
    spans: list[list[int]] = []
    for start, size in sorted(ranges):
        lo, hi = start & ~(PAGE - 1), (start + size + PAGE - 1) & ~(PAGE - 1)
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in spans]


def _gaps(taken: list[tuple[int, int]], limit: int = PHYS_LIMIT) -> list[tuple[int, int]]:
    """What is left of [0, limit) once the (sorted, disjoint) taken spans are removed."""
    gaps, cursor = [], 0
    for start, size in sorted(taken):
        if start >= limit:
            break
        if start > cursor:
            gaps.append((cursor, start - cursor))
        cursor = max(cursor, start + size)
    if cursor < limit:
        gaps.append((cursor, limit - cursor))
    return gaps


class EmulatedBackend(EmulatedDebug):
    name = "emulated"

    def __init__(self, machine, track_dirty: bool = False) -> None:
        self.machine = machine
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        ram = [(r.gpa, r.size) for r in machine.dom0.ram.ranges]
        for r in machine.dom0.ram.ranges:
            uc.mem_map_ptr(r.gpa, r.size, UC_PROT_ALL, r.host)
        self._hook_error: BaseException | None = None
        self._cfuncs: list = []     # keep the ctypes trampolines alive (dirty tracking)
        devices = [s for s in _page_cover([(start, size) for start, size, _ in machine.mmio.ranges()])
                   if s[0] + s[1] <= PHYS_LIMIT and not any(r[0] < s[0] + s[1] and s[0] < r[0] + r[1] for r in ram)]
        self._backing = []
        windows = []                # (start, size, host address of the backing or 0 for a gap)
        for base, size in devices:
            backing = mmap.mmap(-1, size)
            self._backing.append(backing)
            windows.append((base, size, ctypes.addressof(ctypes.c_char.from_buffer(backing))))
        self._gaps = _gaps(sorted(ram + devices))
        windows = sorted(windows + [(base, size, 0) for base, size in self._gaps])
        self._map = _ex.ffi.new("struct ex_map *", {"w": len(windows)})
        self._map.n = len(windows)
        self._slot_list: list[int] = []
        self._dev_slots: dict[tuple[int, int], int] = {}
        self._map.slot = self._new_slot(None, None)
        for w, (base, size, host) in zip(self._map.w, windows, strict=True):
            w.start, w.end, w.backing = base, base + size, _ex.ffi.cast("uint8_t *", host)
        self._windows = windows
        self._devices_mapped = False
        if track_dirty or machine.observers:
            self._map_devices()
        self._route()
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        self.x86 = X86Cpu(uc)
        # No `until` address: unicorn 2.1.4 looks one up through the guest's page tables at every
        # start, and the page fault that raises sets CR2 and QEMU's double-fault state behind the
        # guest's back (tests/test_x86cpu.py). Runs end by emu_stop only.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self.irq = InterruptSources(machine, uc.emu_stop)
        if self.irq.active:
            self.x86.enable_interrupts()
        machine.on_stop.append(self._stop)
        # Only while a trace is recorded: a Python callback on every guest store is slow.
        self._dirty: set[int] = set()       # page numbers (gpa >> 12) stored to since dirty_pages()
        self._mark = self._dirty.add
        self._tables: set[int] = set()      # pages of the guest's current x86 paging structures
        self._tables_cr3: int | None = None
        if track_dirty:
            self._add_dirty_hooks(machine.dom0.ram.ranges)
        self._debug_init()

    # -- dirty tracking (trace recording only) ------------------------------------------------
    def dirty_pages(self) -> list[int]:
        """Guest-physical addresses of the pages the CPU wrote since the previous call (recording).

        Unicorn's MMU sets Accessed/Dirty bits in the guest's page tables without calling the write
        hook, so the pages of the current paging structures are always reported too (a handful).
        """
        dirty = {n << 12 for n in self._dirty}
        self._dirty.clear()
        if dirty & self._tables:
            self._tables_cr3 = None         # the guest edited its page tables: walk them again
        return sorted(dirty | self._table_pages())

    def _add_dirty_hooks(self, ranges) -> None:
        """A write hook over RAM. It runs for every guest store, so it is a bare C-API callback."""
        mark = self._mark

        def hook(uch, access, addr, size, value, ud):
            mark(addr >> 12)
            if (addr & 0xFFF) + size > PAGE:
                mark((addr + size - 1) >> 12)

        cfunc = HOOK_MEM_ACCESS_CFUNC(hook)
        self._cfuncs.append(cfunc)
        for r in ranges:
            self._raw_mem_hook(ctypes.cast(cfunc, ctypes.c_void_p).value, r.gpa, r.gpa + r.size - 1,
                               types=UC_HOOK_MEM_WRITE)

    def _table_pages(self) -> set[int]:
        uc = self.uc
        if not uc.reg_read(UC_X86_REG_CR0) & (1 << 31) or not uc.reg_read(UC_X86_REG_MSR, 0xC0000080) & (1 << 10):
            return set()                    # paging off, or not long mode (the payloads' start code only)
        cr3 = uc.reg_read(UC_X86_REG_CR3) & ADDR_MASK
        if cr3 != self._tables_cr3:
            self._tables = set()
            self._walk_tables(cr3, 4)
            self._tables_cr3 = cr3
        return self._tables

    def _walk_tables(self, table: int, level: int) -> None:
        """Collect the pages of a 4-level table tree (large pages end the walk)."""
        self._tables.add(table)
        if level == 1:
            return
        try:
            entries = struct.unpack("<512Q", self.machine.dom0.read(table, PAGE))
        except ValueError:
            return                          # not RAM: nothing a device could see
        for e in entries:
            if e & 1 and not (level < 4 and e & 0x80):
                self._walk_tables(e & ADDR_MASK, level - 1)

    def close(self) -> None:
        self.irq.close()
        if self._stop in self.machine.on_stop:
            self.machine.on_stop.remove(self._stop)
        for slot in self._slot_list:
            _reads.pop(slot, None)
            _writes.pop(slot, None)
            _owners.pop(slot, None)
        self._slot_list = []

    # -- device windows, mapped at the first access --------------------------------------------
    def _map_devices(self) -> None:
        """Map the device pages and the gaps and register the memory hook that dispatches them.

        Any unicorn memory hook sends every guest load and store through its slow path (a
        helper call instead of the inlined TLB hit: a kernel runs about half as fast). So until the
        guest first touches a device page or a gap -- which unicorn then reports as an unmapped
        access, with RIP back on that instruction (``_start``) -- only RAM is mapped and no hook
        is there; the access is then retried with everything in place and the run stays so."""
        if self._devices_mapped:
            return
        uc = self.uc
        self._devices_mapped = True
        map_addr = int(_ex.ffi.cast("uintptr_t", self._map))
        for base, size, host in self._windows:
            if host:
                uc.mem_map_ptr(base, size, UC_PROT_READ | UC_PROT_WRITE, host)
        for base, size in self._gaps:
            err = uclib.uc_mmio_map(uc._uch, base, size, _GAP_READ, map_addr, _GAP_WRITE, map_addr)
            if err:
                raise UcError(err)
        w = self._windows
        if w:
            self._raw_mem_hook(_MEM_HOOK, w[0][0], w[-1][0] + w[-1][1] - 1, map_addr)
        uc.ctl_flush_tb()                   # blocks translated before have the fast path inlined

    def _start(self, begin: int, timeout_us: int = 0, count: int = 0) -> None:
        """``emu_start`` from ``begin`` (at most ``count`` instructions when given); an access to an
        unmapped device page or gap maps them all (``_map_devices``) and runs on from the
        instruction that made it."""
        while True:
            try:
                self.uc.emu_start(begin, 0xFFFFFFFFFFFFFFFF, timeout=timeout_us, count=count)
                return
            except UcError as e:
                if self._devices_mapped or e.errno not in _UNMAPPED:
                    raise
                self._map_devices()
                begin = self.uc.reg_read(UC_X86_REG_RIP)

    # -- hooks ------------------------------------------------------------------------------
    def _new_slot(self, read, write) -> int:
        slot = next(_slots)
        _reads[slot], _writes[slot], _owners[slot] = read, write, self
        self._slot_list.append(slot)
        return slot

    def _route(self) -> None:
        """Point the hook at what each access reaches. With no trace recorder attached, an access
        inside the one device of a span goes straight to that device (the bus, asked here, picks
        the same device for it: two Python calls fewer an access, the bulk of the cost). While the
        machine has access observers (a trace recorder), every access goes through the machine."""
        m = self.machine
        _reads[self._map.slot], _writes[self._map.slot] = m.mmio_read, m.mmio_write
        bus = [(start, start + size) for start, size, _ in m.mmio.ranges()]
        for w in self._map.w:
            w.dev_slot = 0
            if m.observers or w.backing == _ex.ffi.NULL:
                continue
            inside = [(lo, hi) for lo, hi in bus if w.start <= lo and hi <= w.end]
            if len(inside) != 1:
                continue
            lo, hi = inside[0]
            dev = m.mmio.find(lo)[2]
            if (lo, hi) not in self._dev_slots:
                self._dev_slots[(lo, hi)] = self._new_slot(dev.read, dev.write)
            slot = self._dev_slots[(lo, hi)]
            _reads[slot], _writes[slot] = dev.read, dev.write
            w.dev_start, w.dev_end, w.dev_slot = lo, hi, slot

    def _raw_mem_hook(self, callback: int, begin: int, end: int, user_data: int = 0,
                      types: int = UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE) -> None:
        """A memory hook registered through unicorn's C API with a C function address: the Python
        binding's wrapper layers double the cost of every MMIO access. Python code the hooks reach
        keeps its exceptions (``_fail``) and they are re-raised after the run, as the binding does."""
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), types, int(callback), user_data or None,
                                ctypes.c_uint64(begin), ctypes.c_uint64(end))
        if err:
            raise UcError(err)

    def _fail(self, e: BaseException) -> None:
        if self._hook_error is None:
            self._hook_error = e
        self.uc.emu_stop()

    def _in(self, uc, port, size, ud):
        return self.machine.pio_read(port, size)

    def _out(self, uc, port, size, value, ud):
        self.machine.pio_write(port, size, value)

    def _stop(self) -> None:
        self.uc.emu_stop()

    # -- running ----------------------------------------------------------------------------
    def _enter_pvh(self, entry: int, start_info: int) -> None:
        uc, m = self.uc, self.machine
        gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        m.write_guest(BOOT_GDT, gdt)
        self.x86.enter_protected_mode(BOOT_GDT, len(gdt) - 1, 0x08, 0x10)
        self.x86.load_flat_32bit(0x08, 0x10)
        uc.reg_write(UC_X86_REG_TR, (0, 0, 0x67, 0x8B00))      # a 32-bit busy TSS, base 0, limit 0x67
        uc.reg_write(UC_X86_REG_EBX, start_info)
        uc.reg_write(UC_X86_REG_EFLAGS, 2)

    def describe_cpu(self) -> str:
        uc = self.uc
        return (f"RIP={uc.reg_read(UC_X86_REG_RIP):#x} RSP={uc.reg_read(UC_X86_REG_RSP):#x} "

                f"CR0={uc.reg_read(UC_X86_REG_CR0):#x} CR3={uc.reg_read(UC_X86_REG_CR3):#x} "
                f"CR4={uc.reg_read(UC_X86_REG_CR4):#x} EFER={uc.reg_read(UC_X86_REG_MSR, 0xC0000080):#x}")

    def run(self, entry: int, start_info: int, timeout: float) -> RunResult:
        self._route()
        self._enter_pvh(entry, start_info)
        return self._emulate(entry, timeout)

    def _emulate(self, begin: int, timeout: float, count: int = 0,
                 debug: Callable[[], DebugStop | None] | None = None) -> RunResult | DebugStop:
        """Run from ``begin`` until the guest ends or ``timeout`` seconds pass: on a board without an
        interrupt controller one slice, as fast as unicorn goes; with one, slices between safe points
        (``_run_with_interrupts``). Under a debugger (vmm/backends/emu_debug.py) also until a
        breakpoint or interrupt stopped it, which ``debug`` tells (None: the guest's own doing); a
        single step (``count``) runs one instruction and services nothing."""
        if self.irq.active and not count:
            return self._run_with_interrupts(begin, timeout, debug)
        if self.irq.active:
            self.irq.arm_alarm(None)        # no slice alarm may stop the one instruction
        try:
            self._start(begin, int(timeout * 1e6) if timeout else 0, count)
            if self._hook_error is not None:
                raise self._hook_error
        except UcError as e:
            return self._emulator_error(e)
        done = self._finished()
        if done is not None:
            return done
        stop = debug() if debug is not None else None
        if stop is not None:
            return stop
        if self._halted_at(self.uc.reg_read(UC_X86_REG_RIP)):
            return self._halt_result()
        return self._timeout_result(timeout)

    def _finished(self) -> RunResult | None:
        """The run's end when the guest wrote the exit port or triple-faulted."""
        if self.machine.stop_status is not None:
            return RunResult(self.machine.stop_status, "exit", self.name)
        if self.x86.delivering == 8:
            return RunResult(EXIT_CRASHED, "triple-fault", self.name, "guest triple-faulted: a fault while "
                             f"delivering a double fault ({self.describe_cpu()})")
        return None

    def _emulator_error(self, e: UcError) -> RunResult:
        if self.machine.stop_status is not None:
            return RunResult(self.machine.stop_status, "exit", self.name)
        return RunResult(EXIT_CRASHED, "error", self.name, f"emulator stopped: {e} ({self.describe_cpu()})")

    def _halt_result(self) -> RunResult:
        iflag = self.uc.reg_read(UC_X86_REG_EFLAGS) & (1 << 9)
        why = "with interrupts off" if not iflag else "waiting for an interrupt that never comes"
        return RunResult(EXIT_HALTED, "halt", self.name,
                         f"guest halted {why} without writing the debug-exit port ({self.describe_cpu()})")

    def _timeout_result(self, timeout: float) -> RunResult:
        return RunResult(EXIT_TIMEOUT, "timeout", self.name,
                         f"guest still running after {timeout:g} s; stopped ({self.describe_cpu()})")

    # -- running with the board's interrupt controller and timers ------------------------------
    def _run_with_interrupts(self, entry: int, timeout: float,
                             debug: Callable[[], DebugStop | None] | None = None) -> RunResult | DebugStop:
        """Slices between safe points (vmm/backends/irqloop.py): at each, timers and input are
        serviced and an interrupt the controller raises is armed for the first instruction of the
        next slice, which takes it if IF and no STI/MOV SS shadow forbid (x86cpu.X86Cpu)."""
        uc, irq, x86 = self.uc, self.irq, self.x86
        end = time.monotonic_ns() + int(timeout * 1e9) if timeout else None
        rip = entry
        try:
            while True:
                irq.service()
                if x86.armed is None:
                    vector = irq.vector()
                    if vector is not None:
                        x86.arm_interrupt(vector)
                if x86.armed is not None and irq.pending():
                    x86.stop_after_delivery()           # a safe point to take the next one
                irq.arm_alarm(irq.slice_end(end))
                stops = x86.c.stops
                try:
                    self._start(rip)
                    if self._hook_error is not None:
                        raise self._hook_error
                except UcError as e:
                    return self._emulator_error(e)
                done = self._finished()
                if done is not None:
                    return done
                if debug is not None:
                    stop = debug()
                    if stop is not None:
                        return stop
                rip = uc.reg_read(UC_X86_REG_RIP)
                now = time.monotonic_ns()
                if end is not None and now >= end:
                    return self._timeout_result(timeout)
                if irq.stopped or x86.c.stops != stops:
                    continue
                # the CPU stopped by itself: HLT
                if not uc.reg_read(UC_X86_REG_EFLAGS) & (1 << 9):
                    return self._halt_result()
                if irq.next_event() is None and x86.armed is None and not irq.pending() \
                        and not irq.expecting_input():
                    return self._halt_result()
                if x86.armed is not None:
                    continue                            # taken once the CPU runs on
                irq.wait(min(x for x in (end, irq.next_event()) if x is not None)
                         if end is not None or irq.next_event() is not None else None)
        finally:
            irq.arm_alarm(None)

    def _halted_at(self, rip: int) -> bool:
        try:
            return self.uc.mem_read(rip - 1, 1) == b"\xf4"
        except UcError:
            return False
