/*
 * Renesas IPMMU-VMSA (R-Car Gen3) register offsets and bits, as the Linux
 * and Xen drivers name them (docs: facts/ipmmu.md sections 1 and 10), plus
 * small helpers the IPMMU payloads share: 32-bit register access, a DMA
 * copy through one engine, and an io-pgtable-style ARM_32_LPAE_S1 builder.
 */
#ifndef IOMMU_LAB_IPMMU_H
#define IOMMU_LAB_IPMMU_H

#include "runtime.h"
#include "board.h"
#include "dma.h"

/* ---- context registers (context c at c * 0x40; root holds them) -------- */
#define IM_CTX_SIZE             0x40
#define IMCTR                   0x0000
#define IMTTBCR                 0x0008
#define IMTTLBR0                0x0010
#define IMTTUBR0                0x0014
#define IMSTR                   0x0020
#define IMMAIR0                 0x0028
#define IMELAR                  0x0030
#define IMEUAR                  0x0034

#define IMCTR_VA64              (1u << 29)
#define IMCTR_INTEN             (1u << 2)
#define IMCTR_FLUSH             (1u << 1)
#define IMCTR_MMUEN             (1u << 0)
#define IMCTR_COMMON_MASK       (7u << 0)

#define IMTTBCR_EAE             (1u << 31)
#define IMTTBCR_PMB             (1u << 30)
#define IMTTBCR_SL0_TWOBIT_LVL_1 (2u << 6)    /* stage-1 (Linux) encoding */
#define IMTTBCR_SL0_LVL_1       (1u << 6)     /* stage-2 (Xen) encoding */
#define IMTTBCR_TSZ0_MASK       0x3fu

#define IMSTR_MHIT              (1u << 4)
#define IMSTR_ABORT             (1u << 2)
#define IMSTR_PF                (1u << 1)
#define IMSTR_TF                (1u << 0)
#define IMSTR_ERR_MASK          (IMSTR_MHIT | IMSTR_ABORT | IMSTR_PF | IMSTR_TF)
#define IMSTR_ERRCODE(v)        (((v) >> 8) & 7u)
#define IMSTR_ERRLVL(v)         (((v) >> 12) & 3u)
#define IMSTR_ERRCODE_TLB_FORMAT    1
#define IMSTR_ERRCODE_ACCESS_PERM   4
#define IMSTR_ERRCODE_SECURE_ACCESS 5

/* ---- uTLB registers (cache instances) ----------------------------------- */
#define IMUCTR(u)   ((u) < 32 ? 0x0300 + (u) * 16 : 0x0600 + ((u) - 32) * 16)
#define IMUASID(u)  ((u) < 32 ? 0x0308 + (u) * 16 : 0x0608 + ((u) - 32) * 16)
#define IMUCTR_TTSEL_MMU(c)     ((uint32_t)(c) << 4)
#define IMUCTR_TTSEL_MASK       (15u << 4)
#define IMUCTR_FLUSH            (1u << 1)
#define IMUCTR_MMUEN            (1u << 0)

/* ---- control registers -------------------------------------------------- */
#define IMSCTLR                 0x0500
#define IMSCTLR_USE_SECGRP      (1u << 28)
#define IMSAUXCTLR              0x0504
#define IMSAUXCTLR_S2PTE        (1u << 3)

#define IPMMU_CTX_REG(c, reg)   ((uint64_t)(c) * IM_CTX_SIZE + (reg))

static inline uint32_t ipmmu_read(uint64_t base, uint32_t off) { return mmio_read32(base + off); }
static inline void ipmmu_write(uint64_t base, uint32_t off, uint32_t v) { mmio_write32(base + off, v); }

static inline uint32_t ctx_read(uint64_t base, unsigned c, uint32_t reg)
{
    return mmio_read32(base + IPMMU_CTX_REG(c, reg));
}

static inline void ctx_write(uint64_t base, unsigned c, uint32_t reg, uint32_t v)
{
    mmio_write32(base + IPMMU_CTX_REG(c, reg), v);
}

/* Both drivers' fault handler for one context: IMSTR (0 when no fault bit is set); the faulting
 * address from IMELAR/IMEUAR, read before IMSTR is cleared by writing 0 (clearing zeroes them). */
static inline uint32_t ipmmu_domain_irq(uint64_t root, unsigned c, uint64_t *iova)
{
    uint32_t status = ctx_read(root, c, IMSTR);
    if (!(status & IMSTR_ERR_MASK))
        return 0;
    *iova = ctx_read(root, c, IMELAR) | (uint64_t)ctx_read(root, c, IMEUAR) << 32;
    ctx_write(root, c, IMSTR, 0);
    return status;
}

/* ---- sysinfo and the DMA engines ---------------------------------------- */
static inline int board_is_direct(void)
{
    return (mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS) & SYSINFO_F_DIRECT) != 0;
}

/* ---- io-pgtable ARM_32_LPAE_S1 with IO_PGTABLE_QUIRK_ARM_NS (Linux) ----- */
#define ARM_LPAE_PTE_TYPE_TABLE   3ull
#define ARM_LPAE_PTE_TYPE_PAGE    3ull
#define ARM_LPAE_PTE_TYPE_BLOCK   1ull
#define ARM_LPAE_PTE_NSTABLE      (1ull << 63)
#define ARM_LPAE_PTE_XN           (3ull << 53)
#define ARM_LPAE_PTE_NG           (1ull << 11)
#define ARM_LPAE_PTE_AF           (1ull << 10)
#define ARM_LPAE_PTE_SH_OS        (2ull << 8)
#define ARM_LPAE_PTE_AP_RDONLY    (2ull << 6)   /* AP[2] */
#define ARM_LPAE_PTE_AP_UNPRIV    (1ull << 6)   /* AP[1] */
#define ARM_LPAE_PTE_NS           (1ull << 5)
#define ARM_LPAE_ADDR_MASK        0x000000fffffff000ull
#define ARM_LPAE_MAIR             0xF404FF44u   /* Attr0 NC, 1 WBRWA, 2 device, 3 INC_OWBRWA */

#define IOMMU_READ   1
#define IOMMU_WRITE  2

#define SZ_4K   0x1000ull
#define SZ_2M   0x200000ull
#define SZ_1G   0x40000000ull

struct lpae_pgtable {
    uint64_t *pgd;          /* level 1: 4 entries for a 32-bit IOVA space */
    /* Where the IPMMU finds the tables: the machine address of a table is its guest address +
     * bus_offset (0 on a direct-mapped board; an exchanged, machine-contiguous arena otherwise),
     * and new tables come from alloc_table (NULL: alloc_pages). Zero-initialised: as before. */
    uint64_t bus_offset;
    void *(*alloc_table)(void);
};

/* The leaf attributes arm_lpae_prot_to_pte() gives a non-cacheable mapping
 * with the NS quirk: AttrIndx 0, outer shareable, NS, AF, nG, unprivileged. */
static inline uint64_t lpae_prot(int prot)
{
    uint64_t pte = ARM_LPAE_PTE_NS | ARM_LPAE_PTE_AF | ARM_LPAE_PTE_NG | ARM_LPAE_PTE_SH_OS |
                   ARM_LPAE_PTE_AP_UNPRIV;
    if (!(prot & IOMMU_WRITE))
        pte |= ARM_LPAE_PTE_AP_RDONLY;
    return pte;
}

/* Map one 4K page, 2M block or 1G block, allocating tables as needed
 * (tables get NSTable, as __arm_lpae_init_pte/arm_lpae_install_table do). */
static inline int lpae_map(struct lpae_pgtable *pt, uint64_t iova, uint64_t paddr, uint64_t size, int prot)
{
    uint64_t *table = pt->pgd;
    int lvl;
    int leaf_lvl = size == SZ_1G ? 1 : size == SZ_2M ? 2 : 3;

    for (lvl = 1; lvl < leaf_lvl; lvl++) {
        unsigned shift = 12 + 9 * (3 - lvl);
        unsigned idx = (iova >> shift) & (lvl == 1 ? 3 : 511);
        uint64_t pte = table[idx];
        if (!(pte & 1)) {
            uint64_t *next = pt->alloc_table ? pt->alloc_table() : alloc_pages(1);
            if (!next)
                return -1;
            pte = (((uint64_t)(uintptr_t)next + pt->bus_offset) & ARM_LPAE_ADDR_MASK) | ARM_LPAE_PTE_NSTABLE |
                  ARM_LPAE_PTE_TYPE_TABLE;
            table[idx] = pte;
        } else if ((pte & 3) != ARM_LPAE_PTE_TYPE_TABLE) {
            return -1;          /* a block is in the way */
        }
        table = (uint64_t *)(uintptr_t)((pte & ARM_LPAE_ADDR_MASK) - pt->bus_offset);
    }
    unsigned shift = 12 + 9 * (3 - leaf_lvl);
    unsigned idx = (iova >> shift) & (leaf_lvl == 1 ? 3 : 511);
    table[idx] = (paddr & ARM_LPAE_ADDR_MASK) | lpae_prot(prot) |
                 (leaf_lvl == 3 ? ARM_LPAE_PTE_TYPE_PAGE : ARM_LPAE_PTE_TYPE_BLOCK);
    return 0;
}

/* Clear the leaf that maps iova (io-pgtable unmap, without freeing tables). */
static inline int lpae_unmap(struct lpae_pgtable *pt, uint64_t iova)
{
    uint64_t *table = pt->pgd;
    for (int lvl = 1; lvl <= 3; lvl++) {
        unsigned shift = 12 + 9 * (3 - lvl);
        unsigned idx = (iova >> shift) & (lvl == 1 ? 3 : 511);
        uint64_t pte = table[idx];
        if (!(pte & 1))
            return -1;
        if (lvl == 3 || (pte & 3) == ARM_LPAE_PTE_TYPE_BLOCK) {
            table[idx] = 0;
            return 0;
        }
        table = (uint64_t *)(uintptr_t)((pte & ARM_LPAE_ADDR_MASK) - pt->bus_offset);
    }
    return -1;
}

#endif
