"""The emulated CPU as an x86-64 machine: exceptions through the guest IDT (error codes, CR2, IST
and RSP0 stacks, #DF), privilege changes by IRETQ, SYSCALL and SYSRET, interrupts that honour IF
and the STI shadow, CPUID edits, the PVH entry state -- and the unicorn internals they rest on."""
from __future__ import annotations

import ctypes
import struct

import pytest
import unicorn
from unicorn.x86_const import (
    UC_X86_REG_CS,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_MSR,
    UC_X86_REG_R12,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
)
from x86rig import (
    CODE,
    IST1,
    KCS,
    KDS,
    KSTACK,
    RSP0,
    SMALL,
    UCS,
    UDS,
    USTACK,
    P,
    Rig,
    U,
    W,
    assemble,
    have_as,
)

from vmm.backends import x86cpu

pytestmark = pytest.mark.skipif(not have_as(), reason="needs binutils (as, objcopy) to assemble test code")


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def frame(r, error_code: bool):
    """(error code or None, RIP, CS, RFLAGS, RSP, SS) of the frame the stub found."""
    f = r.state()["frame"]
    return (f[0], *f[1:6]) if error_code else (None, *f[0:5])


def test_unicorn_is_the_pinned_release():
    assert unicorn.__version__ == x86cpu.UNICORN_VERSION


def test_page_faults_carry_error_code_and_cr2(rig):
    rig.pte(SMALL + 0x2000, 0)                                  # not present
    s = rig.run(f"mov rax, {SMALL + 0x2008}\nmov rbx, [rax]")
    assert (s["vector"], s["cr2"]) == (14, SMALL + 0x2008)
    assert frame(rig, True) == (0, CODE + 7, KCS, 2, KSTACK, KDS)
    rig.pte(SMALL + 0x1000, P | U)                              # read-only: a write is P|W
    s = rig.run(f"mov rax, {SMALL + 0x1010}\nmov qword ptr [rax], 5")
    assert (s["vector"], s["cr2"], frame(rig, True)[0]) == (14, SMALL + 0x1010, 0b11)
    rig.pte(SMALL + 0x3000, P | W | U | (1 << 63))              # no-execute: an instruction fetch, I/D set
    s = rig.run(f"mov rax, {SMALL + 0x3000}\njmp rax")
    assert (s["vector"], s["cr2"], frame(rig, True)[0]) == (14, SMALL + 0x3000, 0b10001)


def test_a_new_run_leaves_cr2_and_the_double_fault_state_alone(rig):
    """unicorn's `until` probe page-faulted at every start (CR2 = until - 1, the next fault a #DF)."""
    rig.pte(SMALL + 0x2000, 0)
    for _ in range(3):
        s = rig.run(f"mov rax, {SMALL + 0x2008}\nmov rbx, [rax]")
        assert (s["vector"], s["cr2"]) == (14, SMALL + 0x2008)
        rig.run("nop")
        assert rig.state()["vector"] == 0xFFFF


def test_gp_ud_and_int3(rig):
    rig.run("mov ax, 0x1234\nmov ds, ax")                         # beyond the GDT limit: #GP(selector)
    assert rig.state()["vector"] == 13 and frame(rig, True)[:2] == (0x1234 & 0xFFFC, CODE + 4)
    rig.run("mov rax, 0x8000000000000000\nmov rbx, [rax]")       # non-canonical: #GP(0)
    assert rig.state()["vector"] == 13 and frame(rig, True)[0] == 0
    rig.run("nop\nud2")
    assert rig.state()["vector"] == 6 and frame(rig, False)[1] == CODE + 1
    rig.run("nop\nint3\nnop")
    assert rig.state()["vector"] == 3 and frame(rig, False)[1] == CODE + 2      # a trap: after int3
    assert rig.cpu.x86.counts()["vector6"] == 1


def test_ist_stack(rig):
    rig.set_gates(ist={3: 1})
    rig.run("int3")
    assert rig.state()["vector"] == 3 and rig.state()["rsp"] == IST1 - 40


def test_double_fault_when_the_page_fault_gate_is_missing(rig):
    gate = rig.m.read_guest(0x16000 + 14 * 16, 16)
    rig.m.write_guest(0x16000 + 14 * 16, bytes(16))             # #PF gate not present: #NP while delivering
    rig.pte(SMALL, 0)
    rig.run(f"mov rax, {SMALL}\nmov rbx, [rax]")
    assert rig.state()["vector"] == 8 and frame(rig, True)[0] == 0
    rig.m.write_guest(0x16000 + 14 * 16, gate)


def enter_ring3(user: str) -> str:
    """Kernel code that IRETQs to ``user`` (assembled after it) in ring 3."""
    return (f"push {UDS}\npush {USTACK}\npush 0x202\npush {UCS}\nlea rax, [rip + user]\npush rax\niretq\n"
            f"user:\n{user}")


def test_iretq_to_ring3_and_back_through_rsp0(rig):
    rig.run(enter_ring3("nop\nmov rax, [0x16000]\n"))              # a user read of a user page, then HLT
    assert rig.state()["vector"] == 13                            # HLT in ring 3 is #GP(0)
    err, rip, cs, rflags, rsp, ss = frame(rig, True)
    assert (cs, ss, rsp) == (UCS, UDS, USTACK) and rflags & 0x200
    assert rig.state()["rsp"] == RSP0 - 48                        # the kernel stack from TSS.RSP0
    rig.pte(SMALL + 0x5000, P | W)                                # a supervisor page
    rig.run(enter_ring3(f"mov rax, {SMALL + 0x5000}\nmov rbx, [rax]\n"))
    assert rig.state()["vector"] == 14 and frame(rig, True)[0] == 0b101      # P | U


def test_syscall_and_sysret(rig):
    kernel = assemble("mov r12, rcx\nmov r11, r11\nmov rax, cs\nmov rbx, ss\npushfq\npop rdx\nhlt", SMALL)
    rig.m.write_guest(SMALL, kernel)
    rig.uc.reg_write(UC_X86_REG_MSR, (0xC0000082, SMALL))         # LSTAR
    rig.run(enter_ring3("mov rax, 0x1234\nsyscall\nnop\n"))
    uc = rig.uc
    assert (uc.reg_read(UC_X86_REG_RAX), uc.reg_read(UC_X86_REG_RBX)) == (KCS, KDS)
    user_rip = uc.reg_read(UC_X86_REG_R12)
    assert rig.m.read_guest(user_rip - 2, 3) == b"\x0f\x05\x90"    # RCX: the instruction after syscall
    assert not uc.reg_read(UC_X86_REG_RDX) & 0x200                 # FMASK cleared IF
    assert uc.reg_read(UC_X86_REG_CS) == KCS and rig.cpu.x86.counts()["syscalls"] == 1
    # SYSRET: back to ring 3 at RCX with R11 as RFLAGS, CS/SS from STAR[63:48]
    rig.set_gates(dpl={3: 3})                                    # int3 from ring 3
    back = assemble(f"lea rcx, [rip + done]\nmov r11, 0x202\nsysretq\ndone:\nmov rax, {0x42}\nint3", SMALL)
    rig.m.write_guest(SMALL, back)
    rig.run(f"mov rax, {SMALL}\njmp rax")
    err, rip, cs, rflags, rsp, ss = frame(rig, False)
    assert rig.state()["vector"] == 3 and (cs, ss) == (UCS, UDS) and rflags & 0x200


def test_syscall_without_efer_sce_is_ud(rig):
    rig.uc.reg_write(UC_X86_REG_MSR, (0xC0000080, 0xD00))
    rig.run("syscall")
    assert rig.state()["vector"] == 6 and frame(rig, False)[1] == CODE


def test_cpuid_comes_from_the_table(rig):
    rig.run("mov eax, 1\ncpuid")
    assert not rig.uc.reg_read(UC_X86_REG_RDX) & (1 << 9)             # no local APIC
    assert rig.uc.reg_read(UC_X86_REG_RDX) & 1                        # still an FPU
    assert not rig.uc.reg_read(UC_X86_REG_RCX) & (1 << 21)            # no x2APIC


def test_external_interrupt_waits_for_if_and_the_sti_shadow(rig):
    x86 = rig.cpu.x86
    x86.arm_interrupt(0x30)
    rig.run("cli\nmov rax, 2\nnop\nnop")
    assert rig.state()["vector"] == 0xFFFF and x86.armed == 0x30    # IF=0: never taken
    rig.run("cli\nsti\nmov rax, 1\nnop")
    s = rig.state()
    assert s["vector"] == 0x30 and x86.armed is None
    assert frame(rig, False)[1] == CODE + 1 + 1 + 7               # after the instruction the shadow covers
    assert rig.uc.reg_read(UC_X86_REG_RAX) == 1 and x86.counts()["irqs"] == 1


def test_pvh_entry_state_and_layout():
    r = Rig()
    try:
        cpu = r.cpu
        cpu._enter_pvh(0x100000, 0x6000)
        uc = cpu.uc
        env = cpu.x86.env
        cs_cache = struct.unpack("<IxxxxQII", ctypes.string_at(env + x86cpu.ENV_SEGS + 24, 24))
        assert cs_cache == (0x08, 0, 0xFFFFFFFF, 0x00CF9B00)
        hflags = cpu.x86.hflags()
        assert not hflags & (x86cpu.HF_LMA_MASK | x86cpu.HF_CS64_MASK) and hflags & (1 << 4)   # CS32
        assert uc.reg_read(UC_X86_REG_MSR, 0xC0000080) == 0
        assert uc.reg_read(UC_X86_REG_EFLAGS) == 2
        x86cpu.check_layout(uc, env)
    finally:
        r.close()
