"""cffi (API mode) builder for the emulated backend's memory hooks: unicorn calls C, C calls Python once.

Unicorn's Python binding, and even a bare ctypes callback, convert six arguments into Python
objects on every guest access to a device page; that conversion cost more than the device. Here
the hook unicorn calls is C (registered through its C API by vmm/backends/emulated.py), one hook
for every device page and gap (unicorn walks its hook list on each access, so a hook per range
costs a little on every access): a device access becomes one ``extern "Python"`` call with
(slot, address or offset, width[, value]), and a read's reply is stored into the device page's
backing memory by C, where the guest's load finds it. The split halves unicorn asks of the
``mmio_map``-ed gaps (an 8-byte access arrives as two 4-byte callbacks) are answered in C from the
value the memory hook fetched.

No link against unicorn: the hooks only take its callback signatures (unicorn.h).
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct ex_window {
    uint64_t start, end;      /* guest-physical [start, end) of a device page span or a gap */
    uint8_t *backing;         /* host memory behind a device span; NULL for a gap */
    uint64_t dev_start, dev_end;   /* the one bus device filling part of the span, or 0, 0 */
    uint32_t dev_slot;        /* its read/write in Python (0: go through the machine) */
};
struct ex_map {
    uint32_t n;               /* windows, sorted by start, disjoint */
    uint32_t slot;            /* the machine's accessors in Python */
    uint64_t pending;         /* gap: the value the memory hook read, handed back in halves */
    struct ex_window w[];
};
extern "Python" uint64_t ex_read(uint32_t slot, uint64_t addr, uint32_t size);
extern "Python" void ex_write(uint32_t slot, uint64_t addr, uint32_t size, uint64_t value);
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *map);
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *map);
void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *map);

/* -- the x86-64 CPU's missing pieces (vmm/backends/x86cpu.py) -- */
struct ex_cpu {
    void *uc;                 /* uc_engine * */
    void *cs;                 /* QEMU CPUState * */
    uint8_t *env;             /* QEMU CPUX86State * */
    void *do_interrupt;       /* x86_cpu_do_interrupt(CPUState *) */
    void *hardirq;            /* do_interrupt_x86_hardirq(CPUX86State *, int intno, int is_hw) */
    void *pending;            /* x86_cpu_pending_interrupt(CPUState *, int request) */
    void *loop_exit;          /* cpu_loop_exit(CPUState *) */
    void *loop_exit_noexc;    /* cpu_loop_exit_noexc(CPUState *): the same, no exception pending */
    void *raise_exception;    /* raise_exception(CPUX86State *, int) */
    void *cpuid;              /* cpu_x86_cpuid(CPUX86State *, u32 leaf, u32 sub, u32 *a, *b, *c, *d) */
    void *reg_read;           /* uc_reg_read */
    void *reg_write;          /* uc_reg_write */
    void *emu_stop;           /* uc_emu_stop */
    int32_t reg_rflags, reg_msr;    /* unicorn's register ids */
    int32_t delivering;       /* vector being delivered through the IDT now, -1: none */
    int32_t irq_vector;       /* external interrupt armed for the next instruction boundary, -1: none */
    int32_t stop_after_irq;   /* another one waits at the controller: stop once this one is taken */
    uint32_t stops;           /* runs these hooks ended (emu_stop), so a runner can tell them from HLT */
    uint32_t irq_blocked;     /* block starts where the armed interrupt met IF=0 or a shadow */
    uint64_t irqs;            /* external interrupts delivered */
    uint64_t syscalls;
    uint64_t exceptions[256]; /* deliveries through the IDT per vector (exceptions and INT n) */
    uint32_t n_cpuid;
    uint32_t cpuid_leaf[64], cpuid_sub[64];   /* sub 0xFFFFFFFF: any sub-leaf */
    uint32_t cpuid_and[64][4], cpuid_or[64][4];
};
void ex_intr_hook(void *uc, uint32_t intno, void *ud);
void ex_syscall_hook(void *uc, void *ud);
bool ex_invalid_hook(void *uc, void *ud);
void ex_irq_hook(void *uc, uint64_t addr, uint32_t size, void *ud);
int ex_cpuid_hook(void *uc, void *ud);
"""

SOURCE = r"""
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define UC_MEM_WRITE 17

struct ex_window {
    uint64_t start, end;
    uint8_t *backing;
    uint64_t dev_start, dev_end;
    uint32_t dev_slot;
};
struct ex_map {
    uint32_t n;
    uint32_t slot;
    uint64_t pending;
    struct ex_window w[];
};

static uint64_t ex_read(uint32_t slot, uint64_t addr, uint32_t size);
static void ex_write(uint32_t slot, uint64_t addr, uint32_t size, uint64_t value);

/* The window holding addr, or NULL (RAM inside the hook's range). */
static struct ex_window *find(struct ex_map *m, uint64_t addr)
{
    uint32_t lo = 0, hi = m->n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (addr < m->w[mid].start)
            hi = mid;
        else if (addr >= m->w[mid].end)
            lo = mid + 1;
        else
            return &m->w[mid];
    }
    return NULL;
}

/*
 * unicorn's uc_cb_hookmem_t, one hook over every device span and gap: it runs before the access,
 * with its real width (up to 8 bytes). An access that lies inside the span's one device goes to
 * that device (offset from its base, the value masked to the width: what the bus does); any other
 * goes to the machine, which finds the device or reports the access unclaimed.
 */
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *map)
{
    struct ex_map *m = map;
    struct ex_window *w = find(m, addr);
    const uint32_t n = size > 0 && size <= 8 ? (uint32_t)size : 8;
    const uint64_t mask = n < 8 ? (1ull << (8 * n)) - 1ull : ~0ull;
    const int direct = w && w->dev_slot && addr >= w->dev_start && addr + n <= w->dev_end;
    uint64_t v;
    (void)uc;
    if (!w)
        return;
    if (type == UC_MEM_WRITE) {
        if (direct)
            ex_write(w->dev_slot, addr - w->dev_start, n, (uint64_t)value & mask);
        else
            ex_write(m->slot, addr, n, (uint64_t)value & mask);
        return;
    }
    v = (direct ? ex_read(w->dev_slot, addr - w->dev_start, n) : ex_read(m->slot, addr, n)) & mask;
    if (w->backing)
        memcpy(w->backing + (addr - w->start), &v, n);     /* little-endian host, as the guest */
    else
        m->pending = v;
}

/* unicorn's uc_cb_mmio_read_t for the gaps: the low bytes first, as unicorn asks for them. */
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *map)
{
    struct ex_map *m = map;
    uint64_t v = m->pending;
    (void)uc;
    (void)offset;
    if (size >= 8) {
        m->pending = 0;
        return v;
    }
    m->pending = v >> (8 * size);
    return v & ((1ull << (8 * size)) - 1ull);
}

void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *map)
{
    (void)uc;
    (void)offset;
    (void)size;
    (void)value;
    (void)map;          /* the memory hook already did the write, whole */
}


/* ------------------------------------------------------------------------------------------ */
/* The x86-64 CPU's missing pieces. Unicorn 2.1.4 hands exceptions to a hook instead of
 * delivering them, replaces SYSCALL by a hook, and has no interrupt controller. The hooks below
 * give those back to QEMU's own code inside libunicorn (exported symbols, looked up by
 * vmm/backends/x86cpu.py), so delivery through the IDT, IST and RSP0 stacks, #DF and the triple
 * fault follow QEMU's x86 model. Layout facts about CPUX86State used here (the head of the
 * struct: regs, eip, eflags, hflags, segs) are checked against the register API when a CPU is
 * built, so an unicorn upgrade that moves them fails there and in tests/test_x86cpu.py. */

struct ex_cpu {
    void *uc, *cs;
    uint8_t *env;
    void *do_interrupt, *hardirq, *pending, *loop_exit, *loop_exit_noexc, *raise_exception, *cpuid;
    void *reg_read, *reg_write, *emu_stop;
    int32_t reg_rflags, reg_msr;
    int32_t delivering, irq_vector, stop_after_irq;
    uint32_t stops;
    uint32_t irq_blocked;
    uint64_t irqs, syscalls;
    uint64_t exceptions[256];
    uint32_t n_cpuid;
    uint32_t cpuid_leaf[64], cpuid_sub[64];
    uint32_t cpuid_and[64][4], cpuid_or[64][4];
};

typedef void (*do_interrupt_fn)(void *cs);
typedef void (*hardirq_fn)(void *env, int intno, int is_hw);
typedef int (*pending_fn)(void *cs, int request);
typedef void (*loop_exit_fn)(void *cs);
typedef void (*raise_fn)(void *env, int intno);
typedef void (*cpuid_fn)(void *env, uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c,
                         uint32_t *d);
typedef int (*reg_fn)(void *uc, int regid, void *value);
typedef int (*stop_fn)(void *uc);

struct ex_msr { uint32_t rid; uint64_t value; };

/* CPUX86State (QEMU 5.0 as in unicorn 2.1.4) */
#define ENV_REGS 0
#define ENV_EIP 128
#define ENV_HFLAGS 176
#define ENV_SEGS 184            /* SegmentCache {u32 selector; u64 base; u32 limit; u32 flags;}: 24 bytes */
#define ENV_CR0 (ENV_SEGS + 24 * 10)
#define R_ECX 1
#define R_R11 11
#define R_CS 1
#define R_SS 2
#define R_DS 3
#define R_ES 0
#define HF_CPL_MASK 3u
#define HF_CS32_MASK (1u << 4)
#define HF_SS32_MASK (1u << 5)
#define HF_ADDSEG_MASK (1u << 6)
#define HF_LMA_MASK (1u << 14)
#define HF_CS64_MASK (1u << 15)
#define DESC_G (1u << 23)
#define DESC_B (1u << 22)
#define DESC_L (1u << 21)
#define DESC_P (1u << 15)
#define DESC_S (1u << 12)
#define DESC_CS (1u << 11)
#define DESC_RW (1u << 9)
#define DESC_A (1u << 8)
#define CPU_INTERRUPT_HARD 0x0002
#define EXCP06_ILLOP 6
#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_FMASK 0xC0000084u

#define U64(env, off) (*(uint64_t *)((env) + (off)))
#define U32(env, off) (*(uint32_t *)((env) + (off)))

/* UC_HOOK_INTR: deliver the pending exception or INT n as QEMU's x86_cpu_do_interrupt does. A
 * fault while delivering (a bad gate, an unmapped stack) longjmps back into cpu_exec with that
 * fault pending (made #DF or a triple fault by QEMU's check_exception), and unicorn calls this
 * hook again for it; a triple fault stops the run with `delivering` still set to 8. */
void ex_intr_hook(void *uc, uint32_t intno, void *ud)
{
    struct ex_cpu *c = ud;
    (void)uc;
    c->delivering = (int32_t)intno;
    c->exceptions[intno & 0xFF]++;
    ((do_interrupt_fn)c->do_interrupt)(c->cs);
    c->delivering = -1;
}

/* UC_HOOK_INSN_INVALID: unicorn 2.1.4 stops the run on #UD instead of raising it (its
 * stop_interrupt), calling this hook first with the exception pending. Deliver it like any other
 * and go on in the handler: cpu_loop_exit_noexc clears the pending exception and re-enters the
 * CPU loop, which otherwise would stop and see #UD again when the next run starts. */
bool ex_invalid_hook(void *uc, void *ud)
{
    struct ex_cpu *c = ud;
    (void)uc;
    c->delivering = 6;
    c->exceptions[6]++;
    ((do_interrupt_fn)c->do_interrupt)(c->cs);
    c->delivering = -1;
    ((loop_exit_fn)c->loop_exit_noexc)(c->cs);
    return true;
}

static uint64_t msr(struct ex_cpu *c, uint32_t rid)
{
    struct ex_msr m = { rid, 0 };
    ((reg_fn)c->reg_read)(c->uc, c->reg_msr, &m);
    return m.value;
}

/* The SegmentCache load of QEMU's cpu_x86_load_seg_cache for CS/SS in long mode. */
static void load_seg(uint8_t *env, int seg, uint32_t sel, uint32_t flags)
{
    uint8_t *sc = env + ENV_SEGS + 24 * seg;
    uint32_t hflags = U32(env, ENV_HFLAGS);
    U32(sc, 0) = sel;
    U64(sc, 8) = 0;
    U32(sc, 16) = 0xFFFFFFFFu;
    U32(sc, 20) = flags;
    if (seg == R_CS && (hflags & HF_LMA_MASK) && (flags & DESC_L))
        hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK;
    if (seg == R_SS)
        hflags = (hflags & ~HF_CPL_MASK) | ((flags >> 13) & 3);
    hflags = (hflags & ~HF_SS32_MASK) | ((U32(env, ENV_SEGS + 24 * R_SS + 20) & DESC_B) ? HF_SS32_MASK : 0);
    if (!(hflags & HF_CS64_MASK))
        hflags |= HF_ADDSEG_MASK;       /* never reached from long mode; keeps QEMU's rule simple */
    else
        hflags &= ~HF_ADDSEG_MASK;
    U32(env, ENV_HFLAGS) = hflags;
}

/* UC_HOOK_INSN SYSCALL: the SDM's 64-bit SYSCALL (unicorn 2.1.4 runs this hook instead). RCX gets
 * the next RIP, R11 RFLAGS; RFLAGS &= ~FMASK; CS/SS from STAR[47:32] as flat ring-0 64-bit code and
 * data; RIP = LSTAR. Unicorn adds the instruction's length to RIP after the hook, so RIP is set
 * 2 short of LSTAR. Outside long mode, or with EFER.SCE clear: #UD, as on Intel. */
void ex_syscall_hook(void *uc, void *ud)
{
    struct ex_cpu *c = ud;
    uint8_t *env = c->env;
    uint64_t rflags = 0, star, rip = U64(env, ENV_EIP);
    (void)uc;
    if (!(msr(c, MSR_EFER) & 1) || !(U32(env, ENV_HFLAGS) & HF_LMA_MASK))
        ((raise_fn)c->raise_exception)(env, EXCP06_ILLOP);
    c->syscalls++;
    star = msr(c, MSR_STAR);
    ((reg_fn)c->reg_read)(c->uc, c->reg_rflags, &rflags);
    U64(env, ENV_REGS + 8 * R_ECX) = rip + 2;
    U64(env, ENV_REGS + 8 * R_R11) = rflags & ~(1ull << 16);            /* RF reads 0 */
    rflags &= ~(msr(c, MSR_FMASK) | (1ull << 16));
    ((reg_fn)c->reg_write)(c->uc, c->reg_rflags, &rflags);
    load_seg(env, R_CS, (uint32_t)(star >> 32) & 0xFFFC,
             DESC_G | DESC_P | DESC_S | DESC_CS | DESC_RW | DESC_A | DESC_L);
    load_seg(env, R_SS, ((uint32_t)(star >> 32) + 8) & 0xFFFC,
             DESC_G | DESC_B | DESC_P | DESC_S | DESC_RW | DESC_A);
    U64(env, ENV_EIP) = msr(c, MSR_LSTAR) - 2;
}

/* UC_HOOK_BLOCK, at the start of every translation block (an instruction boundary where QEMU keeps
 * RIP and the lazy flags in the CPU state): deliver the armed external interrupt once IF is set
 * and no STI/MOV SS shadow holds (QEMU's own test; the block after STI is one instruction long, so
 * the shadow ends at the next block), then leave the block so execution goes on in the handler.
 * One compare when nothing is armed. */
void ex_irq_hook(void *uc, uint64_t addr, uint32_t size, void *ud)
{
    struct ex_cpu *c = ud;
    int vec = c->irq_vector;
    (void)addr;
    (void)size;
    if (vec < 0)
        return;
    if (!(((pending_fn)c->pending)(c->cs, CPU_INTERRUPT_HARD) & CPU_INTERRUPT_HARD)) {
        c->irq_blocked++;
        return;
    }
    c->irq_vector = -1;
    c->irqs++;
    c->delivering = 0x100 | vec;
    ((hardirq_fn)c->hardirq)(c->env, vec, 1);
    c->delivering = -1;
    if (c->stop_after_irq) {
        c->stop_after_irq = 0;
        c->stops++;
        ((stop_fn)c->emu_stop)(uc);
    }
    ((loop_exit_fn)c->loop_exit)(c->cs);
}

/* UC_HOOK_INSN CPUID: QEMU's answer for the CPU model, then the table's AND/OR masks. */
int ex_cpuid_hook(void *uc, void *ud)
{
    struct ex_cpu *c = ud;
    uint8_t *env = c->env;
    uint32_t leaf = (uint32_t)U64(env, ENV_REGS), sub = (uint32_t)U64(env, ENV_REGS + 8);
    uint32_t r[4];
    uint32_t i, k;
    (void)uc;
    ((cpuid_fn)c->cpuid)(env, leaf, sub, &r[0], &r[1], &r[2], &r[3]);
    for (i = 0; i < c->n_cpuid; i++) {
        if (c->cpuid_leaf[i] != leaf || (c->cpuid_sub[i] != 0xFFFFFFFFu && c->cpuid_sub[i] != sub))
            continue;
        for (k = 0; k < 4; k++)
            r[k] = (r[k] & c->cpuid_and[i][k]) | c->cpuid_or[i][k];
    }
    U64(env, ENV_REGS + 0) = r[0];      /* RAX, RBX, RCX, RDX: CPUID zero-extends */
    U64(env, ENV_REGS + 24) = r[1];
    U64(env, ENV_REGS + 8) = r[2];
    U64(env, ENV_REGS + 16) = r[3];
    return 1;                           /* skip unicorn's own CPUID */
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm.backends._emu", SOURCE, extra_compile_args=["-O2", "-Wall"])


def compile_in_place() -> None:
    """Build ``vmm/backends/_emu*.so`` in the source tree (what the editable install does)."""
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=False)
    obj = os.path.join(_HERE, "_emu.o")
    if os.path.exists(obj):
        os.remove(obj)


if __name__ == "__main__":
    compile_in_place()
