"""A long-mode test rig on the emulated backend's CPU: page tables, GDT, TSS and IDT written into
guest RAM from Python, snippets assembled with the host's ``as``, exceptions caught by IDT stubs.

Every IDT vector v points at a stub that records v in R15, the handler's RSP in R14 and CR2 in
R13, then halts; the test reads the frame the CPU pushed from guest memory. Memory is identity-
mapped, the first GiB with 2 MiB user-accessible pages, 0x400000-0x5FFFFF with 4 KiB pages whose
flags a test sets (``pte``). The GDT holds kernel code/data, user data/code (the SYSRET order) and
a 64-bit TSS with RSP0 and IST1.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_DS,
    UC_X86_REG_ES,
    UC_X86_REG_GDTR,
    UC_X86_REG_IDTR,
    UC_X86_REG_MSR,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
    UC_X86_REG_SS,
    UC_X86_REG_TR,
)

from vmm import Machine
from vmm.backends.emulated import EmulatedBackend

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
GDT, TSS, IDT = 0x14000, 0x15000, 0x16000
STUBS = 0x200000                 # 16 bytes per vector
CODE = 0x300000
SMALL = 0x400000                 # 4 KiB pages from here (PT)
RSP0, IST1, KSTACK, USTACK = 0x90000, 0xA0000, 0x80000, 0x70000
KCS, KDS, UDS, UCS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
P, W, U, PS = 1, 2, 4, 0x80


def have_as() -> bool:
    return shutil.which("as") is not None and shutil.which("objcopy") is not None


def assemble(text: str, base: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, out = Path(tmp, "s.S"), Path(tmp, "s.o"), Path(tmp, "s.bin")
        src.write_text(".intel_syntax noprefix\n.code64\n" + text + "\n")
        subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", f"--change-section-address=.text={base:#x}", str(obj), str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()


def seg(base: int, limit: int, access: int, flags: int) -> int:
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40) | (((limit >> 16) & 0xF) << 48)
            | (flags << 52) | ((base >> 24) << 56))


class Rig:
    def __init__(self) -> None:
        self.m = Machine.from_board("rcar-virt")
        self.cpu = EmulatedBackend(self.m)
        self.uc = self.cpu.uc
        w = self.m.write_guest
        w(PML4, struct.pack("<Q", PDPT | P | W | U))
        w(PDPT, struct.pack("<Q", PD | P | W | U))
        w(PD, b"".join(struct.pack("<Q", (i << 21) | P | W | U | PS) for i in range(512)))
        w(PD + 2 * 8, struct.pack("<Q", PT | P | W | U))
        w(PT, b"".join(struct.pack("<Q", (SMALL + (i << 12)) | P | W | U) for i in range(512)))
        gdt = [0, seg(0, 0xFFFFF, 0x9A, 0xA), seg(0, 0xFFFFF, 0x92, 0xC), seg(0, 0xFFFFF, 0xF2, 0xC),
               seg(0, 0xFFFFF, 0xFA, 0xA), seg(TSS, 0x67, 0x89, 0), TSS >> 32]
        w(GDT, struct.pack(f"<{len(gdt)}Q", *gdt))
        w(TSS, struct.pack("<IQQQQQQ", 0, RSP0, 0, 0, 0, IST1, 0))
        w(STUBS, assemble("".join(f".balign 16\nmov r15, {v}\nmov r14, rsp\nmov r13, cr2\nhlt\n" for v in range(256)),
                          STUBS))
        self.set_gates()
        uc = self.uc
        uc.reg_write(UC_X86_REG_CR3, PML4)
        uc.reg_write(UC_X86_REG_CR4, 0x20)
        uc.reg_write(UC_X86_REG_CR0, 0x80010011)                              # PG | WP | ET | PE
        uc.reg_write(UC_X86_REG_GDTR, (0, GDT, len(gdt) * 8 - 1, 0))
        uc.reg_write(UC_X86_REG_IDTR, (0, IDT, 256 * 16 - 1, 0))
        uc.reg_write(UC_X86_REG_CS, KCS)
        for r in (UC_X86_REG_SS, UC_X86_REG_DS, UC_X86_REG_ES):
            uc.reg_write(r, KDS)
        uc.reg_write(UC_X86_REG_TR, (TSS_SEL, TSS, 0x67, 0x8B00))
        uc.reg_write(UC_X86_REG_MSR, (0xC0000080, 0xD01))                    # SCE | LME | LMA | NXE
        uc.reg_write(UC_X86_REG_MSR, (0xC0000081, (0x10 << 48) | (KCS << 32)))  # STAR: SYSRET base 0x10
        uc.reg_write(UC_X86_REG_MSR, (0xC0000084, 0x200))                     # FMASK: IF

    def set_gates(self, ist: dict[int, int] | None = None, dpl: dict[int, int] | None = None) -> None:
        ist, dpl = ist or {}, dpl or {}
        gates = b""
        for v in range(256):
            off = STUBS + 16 * v
            attr = 0x8E00 | (dpl.get(v, 0) << 13) | ist.get(v, 0)
            gates += struct.pack("<HHHHII", off & 0xFFFF, KCS, attr, (off >> 16) & 0xFFFF, off >> 32, 0)
        self.m.write_guest(IDT, gates)

    def run(self, asm: str, rsp: int = KSTACK) -> dict:
        """Run ``asm`` in ring 0 until a halt; what the stub recorded."""
        code = assemble(asm + "\nhlt", CODE)
        self.m.write_guest(CODE, code)
        uc = self.uc
        uc.ctl_flush_tb()                       # the code was written behind the translator's back
        uc.reg_write(UC_X86_REG_CR3, PML4)      # and so were page tables: flush the TLB
        uc.reg_write(UC_X86_REG_R15, 0xFFFF)
        uc.reg_write(UC_X86_REG_R13, 0)
        uc.reg_write(UC_X86_REG_RSP, rsp)
        uc.emu_start(CODE, 0xFFFFFFFFFFFFFFFF, timeout=5_000_000)
        return self.state()

    def state(self) -> dict:
        uc = self.uc
        frame_at = uc.reg_read(UC_X86_REG_R14)
        return {"vector": uc.reg_read(UC_X86_REG_R15), "rsp": frame_at, "rip": uc.reg_read(UC_X86_REG_RIP),
                "cr2": uc.reg_read(UC_X86_REG_R13),
                "frame": struct.unpack("<6Q", self.m.read_guest(frame_at, 48)) if frame_at < 0x8000000 - 48 else ()}

    def pte(self, addr: int, flags: int) -> None:
        """Set the 4 KiB PTE of ``addr`` (in the SMALL window) to its identity frame with ``flags``."""
        i = (addr - SMALL) >> 12
        self.m.write_guest(PT + 8 * i, struct.pack("<Q", (addr & ~0xFFF) | flags))

    def close(self) -> None:
        self.cpu.close()
        self.m.close()
