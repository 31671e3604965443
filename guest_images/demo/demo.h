/*
 * The demo payload (`vmm run` with no image) is demo.c plus every
 * demo/<part>.c.  Each part is one section of checks, a function taking no
 * arguments; demo.c runs them in the order below.  Parts living in their
 * own files are declared weak, so the demo builds and runs whether or not
 * that file exists yet: main() skips a part that is not linked in.
 */
#ifndef IOMMU_LAB_DEMO_H
#define IOMMU_LAB_DEMO_H

#include "runtime.h"
#include "board.h"

/* demo.c */
void demo_sysinfo(void);
void demo_ram(void);

/* demo/ipmmu.c, demo/virtio_iommu.c (optional) */
void demo_ipmmu(void) __attribute__((weak));
void demo_virtio_iommu(void) __attribute__((weak));

/* A u64 device register read as two 32-bit halves, low half at the lower
 * address, as DESIGN.md allows (and as 32-bit guest code has to). */
static inline uint64_t mmio_read64_halves(uint64_t addr)
{
    uint64_t lo = mmio_read32(addr);
    uint64_t hi = mmio_read32(addr + 4);
    return lo | (hi << 32);
}

static inline void mmio_write64_halves(uint64_t addr, uint64_t v)
{
    mmio_write32(addr, (uint32_t)v);
    mmio_write32(addr + 4, (uint32_t)(v >> 32));
}

#endif
