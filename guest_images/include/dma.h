/*
 * dma.h: one copy through a board DMA engine, the way every payload drives one.
 * Registers and STATUS codes are in board.h (DESIGN.md section 3).
 */
#ifndef IOMMU_LAB_DMA_H
#define IOMMU_LAB_DMA_H

#include "runtime.h"
#include "board.h"

/* Copy len bytes from src to dst (IOVAs as engine n's IOMMU sees them). Returns STATUS; when
 * fault is not NULL it gets FAULT_ADDR (the lowest address of the failing page). */
static inline uint32_t dma_copy(unsigned n, uint64_t src, uint64_t dst, uint32_t len, uint64_t *fault)
{
    uint64_t base = DMA_ENGINE(n);
    mmio_write64_halves(base + DMA_SRC, src);
    mmio_write64_halves(base + DMA_DST, dst);
    mmio_write32(base + DMA_LEN, len);
    mmio_write32(base + DMA_CTRL, DMA_CTRL_RUN);
    if (fault)
        *fault = mmio_read64_halves(base + DMA_FAULT_ADDR);
    return mmio_read32(base + DMA_STATUS);
}

#endif
