"""What unicorn's x86-64 CPU lacks to run an operating system, given back from QEMU's own code.

Unicorn 2.1.4 (pinned) is QEMU 5.0's TCG with three things taken out that a kernel needs:
exceptions and ``INT n`` go to a hook instead of through the guest's IDT (and #UD stops the run),
``SYSCALL`` runs a hook instead of entering the kernel, and there is no interrupt controller. libunicorn still carries
QEMU's x86 code and exports it, so C hooks (vmm/backends/emu_build.py) call it:

- exceptions and software interrupts: ``x86_cpu_do_interrupt`` -- delivery through the long-mode
  (or protected-mode) IDT with error codes, CR2, IST and RSP0 stacks, privilege checks, and #DF /
  triple-fault escalation by QEMU's ``check_exception``;
- external interrupts: ``do_interrupt_x86_hardirq`` at the start of a translation block (an
  instruction boundary) where ``x86_cpu_pending_interrupt`` says IF is set and no STI/MOV SS
  shadow holds;
- SYSCALL: the SDM transition written here (SYSRET and IRETQ are QEMU's, untouched);
- CPUID: QEMU's answer for the CPU model with this module's ``CPUID_EDITS`` applied, and the MSRs a
  kernel reads set from ``MSR_RESET`` -- one table each.

The hooks need QEMU's ``CPUState`` (``qemu_get_cpu``) and ``CPUX86State``. The env is found by
its register file and checked field by field against the register API (``check_layout``), so an
unicorn upgrade that moves a field fails loudly here, and in tests/test_x86cpu.py, never in a guest.
"""
from __future__ import annotations

import ctypes
import struct

import unicorn
from unicorn import UC_HOOK_BLOCK, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UcError
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_SYSCALL,
    UC_X86_REG_CR0,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_GDTR,
    UC_X86_REG_MSR,
    UC_X86_REG_R11,
    UC_X86_REG_RAX,
    UC_X86_REG_RCX,
    UC_X86_REG_RIP,
)

from vmm.backends import load_compiled

UNICORN_VERSION = "2.1.4"          # the release whose internals the hooks rely on (pyproject pins it)
_ex = load_compiled("_emu")
_SUFFIX = "_x86_64"
_ENV_SCAN = 1 << 17               # CPUX86State lies within the X86CPU object after its CPUState
ENV_HFLAGS, ENV_SEGS = 176, 184
HF_CPL_MASK, HF_CS32_MASK, HF_SS32_MASK, HF_ADDSEG_MASK = 3, 1 << 4, 1 << 5, 1 << 6
HF_LMA_MASK, HF_CS64_MASK = 1 << 14, 1 << 15
ES, CS, SS, DS, FS, GS = range(6)

MSR_EFER = 0xC0000080
CR0_PE, CR0_ET, CR0_PG = 1, 1 << 4, 1 << 31
CR4_PAE = 1 << 5

# CPUID: (leaf, sub-leaf or None for any, register index 0..3 = EAX EBX ECX EDX, AND mask, OR bits).
# The harness models no local APIC, so a kernel must not look for one (it then uses the 8259 pair
# and the 8254 the board provides); it has no TSC-deadline timer, x2APIC or MONITOR either.
CPUID_EDITS: tuple[tuple[int, int | None, int, int, int], ...] = (
    (1, None, 3, ~(1 << 9), 0),                            # EDX.APIC
    (1, None, 2, ~((1 << 21) | (1 << 24) | (1 << 3)), 0),  # ECX.x2APIC, TSC_DEADLINE, MONITOR
    (6, None, 0, ~(1 << 2), 0),                            # EAX.ARAT: no APIC timer to be always running
)

# MSRs a kernel reads, at reset (QEMU answers the rest: 0 for the ones it does not model).
MSR_RESET: dict[int, int] = {
    MSR_EFER: 0,                    # the PVH entry: no long mode, no SYSCALL
    0xC0000081: 0,                  # STAR
    0xC0000082: 0,                  # LSTAR
    0xC0000084: 0,                  # FMASK
    0x277: 0x0007040600070406,      # IA32_PAT, its power-on value
}


class LayoutError(RuntimeError):
    """This unicorn's internals are not the ones the hooks were written for."""


def _symbol(name: str) -> int:
    try:
        return ctypes.cast(getattr(uclib, name + _SUFFIX), ctypes.c_void_p).value
    except AttributeError:
        raise LayoutError(f"libunicorn {unicorn.__version__} does not export {name}{_SUFFIX} "
                          f"(written for unicorn {UNICORN_VERSION})") from None


def _find_env(uc, cs: int) -> int:
    """The CPUX86State of ``cs``: the register file, written through the API just before."""
    marks = (0x5A17_1E55_0000_0001, 0x5A17_1E55_0000_0002)
    saved = uc.reg_read(UC_X86_REG_RAX), uc.reg_read(UC_X86_REG_RCX)
    uc.reg_write(UC_X86_REG_RAX, marks[0])
    uc.reg_write(UC_X86_REG_RCX, marks[1])
    blob = ctypes.string_at(cs, _ENV_SCAN)
    at = blob.find(struct.pack("<QQ", *marks))
    uc.reg_write(UC_X86_REG_RAX, saved[0])
    uc.reg_write(UC_X86_REG_RCX, saved[1])
    if at < 0 or at % 8:
        raise LayoutError(f"CPUX86State not found after CPUState (unicorn {unicorn.__version__}, "
                          f"written for {UNICORN_VERSION})")
    return cs + at


def check_layout(uc, env: int) -> None:
    """The CPUX86State fields the hooks touch hold what the register API says they do."""
    def u(fmt: str, off: int):
        return struct.unpack_from(fmt, ctypes.string_at(env + off, struct.calcsize(fmt)))

    problems = []
    for reg, off in ((UC_X86_REG_R11, 88), (UC_X86_REG_RIP, 128)):
        probe = 0x0123_4567_89AB_CD00 | off
        saved = uc.reg_read(reg)
        uc.reg_write(reg, probe)
        if u("<Q", off)[0] != probe:
            problems.append(f"register at +{off}")
        uc.reg_write(reg, saved)
    if u("<I", ENV_SEGS + 24)[0] != uc.reg_read(UC_X86_REG_CS):
        problems.append("segs[CS]")
    if u("<Q", ENV_SEGS + 24 * 10)[0] != uc.reg_read(UC_X86_REG_CR0):
        problems.append("cr[0]")
    hflags = u("<I", ENV_HFLAGS)[0]
    lma = bool(uc.reg_read(UC_X86_REG_MSR, MSR_EFER) & (1 << 10))
    if bool(hflags & HF_LMA_MASK) != lma:
        problems.append("hflags")
    if problems:
        raise LayoutError(f"unicorn {unicorn.__version__}: CPUX86State differs from {UNICORN_VERSION}'s at "
                          f"{', '.join(problems)}; the x86 hooks cannot run on it")


class X86Cpu:
    """The C hook state of one unicorn x86-64 CPU, and the hooks, registered on ``uc``."""

    def __init__(self, uc) -> None:
        self.uc = uc
        get_cpu = uclib["qemu_get_cpu" + _SUFFIX]
        get_cpu.restype, get_cpu.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
        uc.reg_write(UC_X86_REG_RAX, 0)            # unicorn builds its CPU on first use
        cs = get_cpu(uc._uch, -1)                  # unicorn never numbers its one CPU
        if not cs:
            raise LayoutError(f"qemu_get_cpu found no CPU (unicorn {unicorn.__version__})")
        self.env = _find_env(uc, cs)
        check_layout(uc, self.env)
        c = self.c = _ex.ffi.new("struct ex_cpu *")
        c.uc = _ex.ffi.cast("void *", ctypes.cast(uc._uch, ctypes.c_void_p).value)
        c.cs = _ex.ffi.cast("void *", cs)
        c.env = _ex.ffi.cast("uint8_t *", self.env)
        for field, name in (("do_interrupt", "x86_cpu_do_interrupt"), ("hardirq", "do_interrupt_x86_hardirq"),
                            ("pending", "x86_cpu_pending_interrupt"), ("loop_exit", "cpu_loop_exit"),
                            ("loop_exit_noexc", "cpu_loop_exit_noexc"),
                            ("raise_exception", "raise_exception"), ("cpuid", "cpu_x86_cpuid")):
            setattr(c, field, _ex.ffi.cast("void *", _symbol(name)))
        for field, name in (("reg_read", "uc_reg_read"), ("reg_write", "uc_reg_write"), ("emu_stop", "uc_emu_stop")):
            setattr(c, field, _ex.ffi.cast("void *", ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value))
        c.reg_rflags, c.reg_msr = UC_X86_REG_EFLAGS, UC_X86_REG_MSR
        c.delivering = c.irq_vector = -1
        self._load_cpuid(CPUID_EDITS)
        self._ud = int(_ex.ffi.cast("uintptr_t", c))
        fn = {f: int(_ex.ffi.cast("uintptr_t", _ex.ffi.addressof(_ex.lib, f)))
              for f in ("ex_intr_hook", "ex_syscall_hook", "ex_irq_hook", "ex_cpuid_hook", "ex_invalid_hook")}
        self._fn = fn
        self._hook(UC_HOOK_INTR, fn["ex_intr_hook"], 1, 0)
        self._hook(UC_HOOK_INSN_INVALID, fn["ex_invalid_hook"], 1, 0)
        self._hook(UC_HOOK_INSN, fn["ex_syscall_hook"], 1, 0, UC_X86_INS_SYSCALL)
        self._hook(UC_HOOK_INSN, fn["ex_cpuid_hook"], 1, 0, UC_X86_INS_CPUID)
        self._irq_hook = 0

    def _load_cpuid(self, edits) -> None:
        rows: dict[tuple[int, int], list[list[int]]] = {}
        for leaf, sub, reg, and_mask, or_bits in edits:
            row = rows.setdefault((leaf, 0xFFFFFFFF if sub is None else sub), [[0xFFFFFFFF] * 4, [0] * 4])
            row[0][reg] &= and_mask & 0xFFFFFFFF
            row[1][reg] |= or_bits & 0xFFFFFFFF
        if len(rows) > len(self.c.cpuid_leaf):
            raise ValueError(f"at most {len(self.c.cpuid_leaf)} CPUID leaves can be edited")
        for i, ((leaf, sub), (ands, ors)) in enumerate(sorted(rows.items())):
            self.c.cpuid_leaf[i], self.c.cpuid_sub[i] = leaf, sub
            for k in range(4):
                self.c.cpuid_and[i][k], self.c.cpuid_or[i][k] = ands[k], ors[k]
        self.c.n_cpuid = len(rows)

    def _hook(self, kind: int, fn: int, begin: int, end: int, *insn: int) -> int:
        handle = ctypes.c_size_t()
        extra = [ctypes.c_int(i) for i in insn]
        err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), kind, ctypes.c_void_p(fn),
                                ctypes.c_void_p(self._ud), ctypes.c_uint64(begin), ctypes.c_uint64(end), *extra)
        if err:
            raise UcError(err)
        return handle.value

    # -- the PVH entry state ------------------------------------------------------------------
    def enter_protected_mode(self, gdt_base: int, gdt_limit: int, code: int, data: int) -> None:
        """From unicorn's 64-bit reset state (long mode with paging off, which no real CPU has) to
        the PVH entry state: leave long mode the architected way (CR0.PG from 1 to 0 clears
        EFER.LMA), then EFER, CR4 and the segments as pvh.pandoc asks. The caller loads the GDT."""
        uc = self.uc
        uc.reg_write(UC_X86_REG_CR4, CR4_PAE)
        uc.reg_write(UC_X86_REG_CR0, CR0_PE | CR0_ET | CR0_PG)
        uc.reg_write(UC_X86_REG_CR0, CR0_PE | CR0_ET)
        for msr, value in MSR_RESET.items():
            uc.reg_write(UC_X86_REG_MSR, (msr, value))
        uc.reg_write(UC_X86_REG_CR4, 0)
        uc.reg_write(UC_X86_REG_GDTR, (0, gdt_base, gdt_limit, 0))

    def hflags(self) -> int:
        return struct.unpack("<I", ctypes.string_at(self.env + ENV_HFLAGS, 4))[0]

    def load_flat_32bit(self, code: int, data: int) -> None:
        """CS = ``code`` as flat 32-bit execute/read code, DS/ES/FS/GS/SS = ``data`` as flat 32-bit
        read/write data, CPL 0: the descriptor caches and hidden flags of the PVH entry, written as
        QEMU's cpu_x86_load_seg_cache does (unicorn's register API, in 64-bit mode, sets only the
        selector of a segment register)."""
        for seg in (ES, CS, SS, DS, FS, GS):
            sel, flags = (code, 0x00CF9B00) if seg == CS else (data, 0x00CF9300)
            ctypes.memmove(self.env + ENV_SEGS + 24 * seg, struct.pack("<IIQII", sel, 0, 0, 0xFFFFFFFF, flags), 24)
        h = self.hflags() & ~(HF_CPL_MASK | HF_CS32_MASK | HF_SS32_MASK | HF_ADDSEG_MASK | HF_CS64_MASK)
        ctypes.memmove(self.env + ENV_HFLAGS, struct.pack("<I", h | HF_CS32_MASK | HF_SS32_MASK), 4)

    # -- external interrupts -----------------------------------------------------------------
    def enable_interrupts(self) -> None:
        """Register the block hook that delivers external interrupts (boards with a controller).
        It must be there before the first block is translated: a hook added later reaches only
        blocks translated after it, and deleting a hook makes unicorn re-translate the addresses
        it covered through the guest's page tables from whatever mode the CPU is in then, which
        can raise a page fault no handler sees (CR2 and QEMU's double-fault state change)."""
        if not self._irq_hook:
            self._irq_hook = self._hook(UC_HOOK_BLOCK, self._fn["ex_irq_hook"], 1, 0)

    def arm_interrupt(self, vector: int) -> None:
        """Deliver external interrupt ``vector`` at the first block start where IF is set and no
        STI/MOV SS shadow holds."""
        if not self._irq_hook:
            raise RuntimeError("enable_interrupts() first")
        self.c.irq_vector = vector & 0xFF

    def stop_after_delivery(self) -> None:
        """End the run once the armed interrupt is taken (the controller holds the next one)."""
        self.c.stop_after_irq = 1

    @property
    def armed(self) -> int | None:
        """The armed vector not delivered yet."""
        v = self.c.irq_vector
        return None if v < 0 else v

    # -- what happened ------------------------------------------------------------------------
    @property
    def delivering(self) -> int | None:
        """The vector whose delivery never completed when the CPU stopped (8: a triple fault)."""
        v = self.c.delivering
        return None if v < 0 else v

    def counts(self) -> dict[str, int]:
        c = self.c
        out = {"irqs": c.irqs, "syscalls": c.syscalls, "irq_blocked": c.irq_blocked}
        out.update({f"vector{v}": c.exceptions[v] for v in range(256) if c.exceptions[v]})
        return out
