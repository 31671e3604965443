/*
 * iommu-lab guest runtime: a tiny freestanding x86_64 environment for test
 * payloads booted through PVH (see start.S).
 *
 * Console:   port 0xE9, one byte per outb (QEMU debugcon, our harness).
 * Exit:      port 0xF4, one 4-byte outl of the status (QEMU isa-debug-exit
 *            reports (status << 1) | 1; `vmm run` exits with the status).
 * Memory:    identity-mapped 0..8 GiB, 2 MiB pages, everything RW.
 */
#ifndef IOMMU_LAB_RUNTIME_H
#define IOMMU_LAB_RUNTIME_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define DEBUGCON_PORT   0xE9
#define DEBUG_EXIT_PORT 0xF4

/* Status exit() uses when an unexpected exception/interrupt arrives. */
#define EXIT_TRAP       0xFE

#define PAGE_SIZE       4096UL

#define ARRAY_SIZE(a)   (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------------ */
/* PVH start info (Xen public/arch-x86/hvm/start_info.h), version 0 or 1. */

#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
    uint32_t magic;           /* HVM_START_MAGIC */
    uint32_t version;         /* 0 or 1; memmap fields exist from 1 */
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;   /* struct hvm_modlist_entry[nr_modules] */
    uint64_t cmdline_paddr;   /* NUL-terminated, 0 = none */
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;    /* struct hvm_memmap_entry[memmap_entries] */
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr;
    uint64_t size;
    uint64_t cmdline_paddr;
    uint64_t reserved;
};

/* E820-style types. */
#define HVM_MEMMAP_RAM      1
#define HVM_MEMMAP_RESERVED 2
#define HVM_MEMMAP_ACPI     3
#define HVM_MEMMAP_NVS      4
#define HVM_MEMMAP_UNUSABLE 5
#define HVM_MEMMAP_DISABLED 6
#define HVM_MEMMAP_PMEM     7

struct hvm_memmap_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

_Static_assert(sizeof(struct hvm_start_info) == 56, "start_info layout");
_Static_assert(offsetof(struct hvm_start_info, memmap_paddr) == 40, "start_info layout");
_Static_assert(sizeof(struct hvm_modlist_entry) == 32, "modlist layout");
_Static_assert(sizeof(struct hvm_memmap_entry) == 24, "memmap layout");

/* The start_info pointer main() received (also kept here for libraries). */
extern struct hvm_start_info *start_info;

/* ------------------------------------------------------------------------ */
/* Port I/O. */

static inline void outb(uint16_t port, uint8_t v)  { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

/* ------------------------------------------------------------------------ */
/* Exact-width MMIO.  Each accessor is one `mov` of exactly that width through
 * a volatile pointer, written in asm so the compiler can neither split a
 * 64-bit access into halves nor merge neighbouring narrow ones, nor reorder
 * them against other memory accesses ("memory" clobber).  Devices and traces
 * depend on seeing the very accesses the payload wrote. */

#define MMIO_PTR(type, addr) ((volatile type *)(uintptr_t)(addr))

static inline uint8_t mmio_read8(uint64_t addr)
{
    uint8_t v;
    __asm__ volatile("movb %1, %0" : "=q"(v) : "m"(*MMIO_PTR(uint8_t, addr)) : "memory");
    return v;
}

static inline uint16_t mmio_read16(uint64_t addr)
{
    uint16_t v;
    __asm__ volatile("movw %1, %0" : "=r"(v) : "m"(*MMIO_PTR(uint16_t, addr)) : "memory");
    return v;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
    uint32_t v;
    __asm__ volatile("movl %1, %0" : "=r"(v) : "m"(*MMIO_PTR(uint32_t, addr)) : "memory");
    return v;
}

static inline uint64_t mmio_read64(uint64_t addr)
{
    uint64_t v;
    __asm__ volatile("movq %1, %0" : "=r"(v) : "m"(*MMIO_PTR(uint64_t, addr)) : "memory");
    return v;
}

static inline void mmio_write8(uint64_t addr, uint8_t v)
{
    __asm__ volatile("movb %1, %0" : "=m"(*MMIO_PTR(uint8_t, addr)) : "q"(v) : "memory");
}

static inline void mmio_write16(uint64_t addr, uint16_t v)
{
    __asm__ volatile("movw %1, %0" : "=m"(*MMIO_PTR(uint16_t, addr)) : "r"(v) : "memory");
}

static inline void mmio_write32(uint64_t addr, uint32_t v)
{
    __asm__ volatile("movl %1, %0" : "=m"(*MMIO_PTR(uint32_t, addr)) : "r"(v) : "memory");
}

static inline void mmio_write64(uint64_t addr, uint64_t v)
{
    __asm__ volatile("movq %1, %0" : "=m"(*MMIO_PTR(uint64_t, addr)) : "r"(v) : "memory");
}

/* A u64 device register as two 32-bit accesses, low half at the lower address, as DESIGN.md
 * allows and as 32-bit guest code has to. */
static inline uint64_t mmio_read64_halves(uint64_t addr)
{
    uint64_t lo = mmio_read32(addr);
    return lo | ((uint64_t)mmio_read32(addr + 4) << 32);
}

static inline void mmio_write64_halves(uint64_t addr, uint64_t v)
{
    mmio_write32(addr, (uint32_t)v);
    mmio_write32(addr + 4, (uint32_t)(v >> 32));
}

/* ------------------------------------------------------------------------ */
/* CPU control. */

static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" : : : "memory"); }

/* Write `code` to the debug-exit port, then stop for good. */
__attribute__((noreturn)) void exit(int code);

/* Load a zero-limit IDT and divide by zero: #DE -> #GP -> #DF -> shutdown
 * (start.S).  Never returns; the VMM sees a CPU shutdown. */
__attribute__((noreturn)) void triple_fault(void);

/* What isr_common (start.S) pushes, lowest address first. */
struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;      /* pushed by the CPU */
};

/* ------------------------------------------------------------------------ */
/* Console (port 0xE9). */

int putchar(int c);
int puts(const char *s);                    /* appends '\n' like libc */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

/* ------------------------------------------------------------------------ */
/* Memory and strings. */

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* n zeroed, 4 KiB-aligned pages from a bump allocator that starts after the
 * image (_end) and stops at the end of the RAM region holding the image, as
 * the start_info memmap reports it.  Returns 0 when that is exhausted (or
 * when the VMM gave no memmap).  Never freed. */
void *alloc_pages(size_t n);

/* End (exclusive) of the RAM region alloc_pages() draws from; 0 if unknown. */
uint64_t ram_end(void);

/* ------------------------------------------------------------------------ */
/* Test reporting.  Lines are `PASS: msg` / `FAIL: msg`; finish() prints
 * `done: N checks, M failures` and returns M, so `return finish();` from
 * main makes the exit status the failure count. */

void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int checks_failed(void);
void section(const char *name);
int finish(void);

/* The payload's entry point, called by start.S. */
int main(struct hvm_start_info *si);

#endif
