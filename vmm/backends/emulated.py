"""The emulated backend: unicorn x86-64, started in 32-bit mode at the PVH entry.

Unicorn splits an 8-byte MMIO access into two 4-byte callbacks while KVM delivers one 8-byte
exit. The memory hook sees the whole access first, so it dispatches to the bus with the real
width; the split MMIO callbacks then only hand back the halves of the value already read
(writes are dropped there). Devices therefore see the same accesses on both backends.
"""
from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_MODE_32
from unicorn import UC_MEM_WRITE, UC_PROT_ALL, Uc, UcError
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_DS,
    UC_X86_REG_EBX,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_ES,
    UC_X86_REG_FS,
    UC_X86_REG_GDTR,
    UC_X86_REG_GS,
    UC_X86_REG_IDTR,
    UC_X86_REG_MSR,
    UC_X86_REG_EIP,
    UC_X86_REG_ESP,
    UC_X86_REG_SS,
)

from vmm.backends import EXIT_CRASHED, EXIT_HALTED, EXIT_TIMEOUT, RunResult

BOOT_GDT = 0x5000        # below hvm_start_info; the payload loads its own GDT at once
FOUR_GIB = 1 << 32
PAGE = 4096


def _mmio_windows(ram: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Everything below 4 GiB that is not RAM goes to the MMIO bus (which answers unclaimed)."""
    windows, cursor = [], 0
    for start, size in sorted(ram):
        if start >= FOUR_GIB:
            break
        if start > cursor:
            windows.append((cursor, start - cursor))
        cursor = max(cursor, start + size)
    if cursor < FOUR_GIB:
        windows.append((cursor, FOUR_GIB - cursor))
    return windows


class EmulatedBackend:
    name = "emulated"

    def __init__(self, machine) -> None:
        self.machine = machine
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        ram = [(r.gpa, r.size) for r in machine.dom0.ram.ranges]
        for r in machine.dom0.ram.ranges:
            uc.mem_map_ptr(r.gpa, r.size, UC_PROT_ALL, r.host)
        self._pending = 0           # value of the access the memory hook already performed
        self.exception: int | None = None
        for base, size in _mmio_windows(ram):
            uc.mmio_map(base, size, self._mmio_read_half, None, self._mmio_write_half, None)
            uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._mem_hook, None, base, base + size - 1)
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INTR, self._intr)
        machine.on_stop.append(self._stop)

    def close(self) -> None:
        if self._stop in self.machine.on_stop:
            self.machine.on_stop.remove(self._stop)

    # -- hooks ------------------------------------------------------------------------------
    def _mem_hook(self, uc, access, addr, size, value, ud):
        if access == UC_MEM_WRITE:
            self.machine.mmio_write(addr, size, value)
        else:
            self._pending = self.machine.mmio_read(addr, size)

    def _mmio_read_half(self, uc, offset, size, ud):
        # The memory hook performed the whole access; hand back the bytes this callback covers,
        # low half first, as unicorn asks for them.
        value = self._pending
        self._pending >>= 8 * size
        return value & ((1 << (8 * size)) - 1)

    def _mmio_write_half(self, uc, offset, size, value, ud):
        pass

    def _in(self, uc, port, size, ud):
        return self.machine.pio_read(port, size)

    def _out(self, uc, port, size, value, ud):
        self.machine.pio_write(port, size, value)

    def _intr(self, uc, intno, ud):
        self.exception = intno
        uc.emu_stop()

    def _stop(self) -> None:
        self.uc.emu_stop()

    # -- running ----------------------------------------------------------------------------
    def _enter_pvh(self, entry: int, start_info: int) -> None:
        uc, m = self.uc, self.machine
        gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        m.write_guest(BOOT_GDT, gdt)
        uc.reg_write(UC_X86_REG_GDTR, (0, BOOT_GDT, len(gdt) - 1, 0))
        uc.reg_write(UC_X86_REG_CS, 0x08)
        for reg in (UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_FS, UC_X86_REG_GS, UC_X86_REG_SS):
            uc.reg_write(reg, 0x10)
        uc.reg_write(UC_X86_REG_EBX, start_info)
        uc.reg_write(UC_X86_REG_EFLAGS, 2)

    def describe_cpu(self) -> str:
        uc = self.uc
        return (f"RIP={uc.reg_read(UC_X86_REG_EIP):#x} RSP={uc.reg_read(UC_X86_REG_ESP):#x} "  # low 32 bits: unicorn in 32-bit mode

                f"CR0={uc.reg_read(UC_X86_REG_CR0):#x} CR3={uc.reg_read(UC_X86_REG_CR3):#x} "
                f"CR4={uc.reg_read(UC_X86_REG_CR4):#x} EFER={uc.reg_read(UC_X86_REG_MSR, 0xC0000080):#x}")

    def run(self, entry: int, start_info: int, timeout: float) -> RunResult:
        m = self.machine
        self._enter_pvh(entry, start_info)
        try:
            self.uc.emu_start(entry, 0xFFFFFFFFFFFFFFFF, timeout=int(timeout * 1e6) if timeout else 0)
        except UcError as e:
            if m.stop_status is not None:
                return RunResult(m.stop_status, "exit", self.name)
            return RunResult(EXIT_CRASHED, "error", self.name, f"emulator stopped: {e} ({self.describe_cpu()})")
        if m.stop_status is not None:
            return RunResult(m.stop_status, "exit", self.name)
        if self.exception is not None:
            return self._exception()
        rip = self.uc.reg_read(UC_X86_REG_EIP)
        if self._halted_at(rip):
            iflag = self.uc.reg_read(UC_X86_REG_EFLAGS) & (1 << 9)
            why = "with interrupts off" if not iflag else "waiting for an interrupt that never comes"
            return RunResult(EXIT_HALTED, "halt", self.name,
                             f"guest halted {why} without writing the debug-exit port ({self.describe_cpu()})")
        return RunResult(EXIT_TIMEOUT, "timeout", self.name,
                         f"guest still running after {timeout:g} s; stopped ({self.describe_cpu()})")

    def _halted_at(self, rip: int) -> bool:
        try:
            return self.uc.mem_read(rip - 1, 1) == b"\xf4"
        except UcError:
            return False

    def _exception(self) -> RunResult:
        """Unicorn stops on a CPU exception instead of delivering it. Decide what real hardware
        would have done: a vector the IDT cannot deliver escalates to a triple fault."""
        vec = self.exception
        _, idt_base, idt_limit, _ = self.uc.reg_read(UC_X86_REG_IDTR)
        cpu = self.describe_cpu()
        if vec * 16 + 15 > idt_limit:
            return RunResult(EXIT_CRASHED, "triple-fault", self.name,
                             f"guest triple-faulted: exception {vec} with no IDT entry (IDT limit {idt_limit:#x}) ({cpu})")
        return RunResult(EXIT_CRASHED, "error", self.name, f"guest took CPU exception {vec} ({cpu})")
