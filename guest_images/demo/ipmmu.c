/*
 * demo part: the IPMMU-VMSA in two short scenes, with dma4 (ipmmu_ds0 uTLB 0).
 *
 *  1. Linux style (stage 1, only on a direct-mapped board, where physical
 *     addresses are machine addresses): one page mapped at an IOVA, a copy
 *     through it, then a copy to an unmapped IOVA and the fault it records.
 *  2. Xen style (stage 2 over the domain's own P2M, any board): DMA by
 *     guest-physical address.
 */
#include "demo/demo.h"
#include "ipmmu.h"

#define ROOT    IPMMU_MM_BASE
#define CACHE   IPMMU_DS0_BASE
#define UTLB    DMA4_IPMMU_DS0_UTLB
#define ENGINE  4

static void attach(unsigned c)
{
    ctx_write(CACHE, c, IMCTR, ctx_read(ROOT, c, IMCTR) | IMCTR_FLUSH);
    ipmmu_write(CACHE, IMUASID(UTLB), 0);
    ipmmu_write(CACHE, IMUCTR(UTLB), IMUCTR_TTSEL_MMU(c) | IMUCTR_FLUSH | IMUCTR_MMUEN);
}

static void detach(unsigned c)
{
    ipmmu_write(CACHE, IMUCTR(UTLB), 0);
    ctx_write(CACHE, c, IMCTR, IMCTR_FLUSH);
    ctx_write(ROOT, c, IMCTR, IMCTR_FLUSH);
}

static void stage1_scene(void)
{
    const unsigned c = 1;
    const uint64_t IOVA = 0x80000000, HOLE = 0x80001000;
    struct lpae_pgtable pt = { .pgd = alloc_pages(1) };
    char *src = alloc_pages(1), *dst = alloc_pages(1);

    if (!pt.pgd || !src || !dst || lpae_map(&pt, IOVA, (uintptr_t)dst, PAGE_SIZE, IOMMU_READ | IOMMU_WRITE)) {
        check(0, "allocate tables and buffers");
        return;
    }
    ctx_write(ROOT, c, IMTTLBR0, (uint32_t)(uintptr_t)pt.pgd);
    ctx_write(ROOT, c, IMTTUBR0, 0);
    ctx_write(ROOT, c, IMTTBCR, IMTTBCR_EAE | IMTTBCR_SL0_TWOBIT_LVL_1);
    ctx_write(ROOT, c, IMMAIR0, ARM_LPAE_MAIR);
    ctx_write(ROOT, c, IMCTR, IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);
    attach(c);

    /* the source goes by machine address: a 1G identity block at IOVA 0 */
    lpae_map(&pt, 0, 0, 0x40000000ull, IOMMU_READ);
    memcpy(src, "translated by the IPMMU", 24);
    uint64_t fault = 0;
    uint32_t st = dma_copy(ENGINE, (uintptr_t)src, IOVA + 0x100, 24, &fault);
    printf("stage 1: IOVA 0x%llx -> PA %p\n", (unsigned long long)IOVA, (void *)dst);
    check(st == DMA_STATUS_OK && memcmp(dst + 0x100, src, 24) == 0, "dma4 wrote through IOVA 0x%llx: \"%s\"",
          (unsigned long long)IOVA + 0x100, dst + 0x100);

    st = dma_copy(ENGINE, (uintptr_t)src, HOLE, 24, &fault);
    uint32_t status = ctx_read(ROOT, c, IMSTR);
    uint32_t elar = ctx_read(ROOT, c, IMELAR);
    printf("fault: STATUS %u FAULT_ADDR 0x%llx, IMSTR 0x%x (ERRCODE %u, ERRLVL %u), IMELAR 0x%x\n", st,
           (unsigned long long)fault, status, IMSTR_ERRCODE(status), IMSTR_ERRLVL(status), elar);
    check(st == DMA_STATUS_XLATE_FAULT && (status & IMSTR_TF) && elar == (uint32_t)HOLE,
          "a copy to unmapped IOVA 0x%llx is refused and recorded in context %u", (unsigned long long)HOLE, c);
    ctx_write(ROOT, c, IMSTR, 0);
    check(ctx_read(ROOT, c, IMSTR) == 0, "IMSTR = 0 clears the record");
    detach(c);
}

static void stage2_scene(void)
{
    const unsigned c = 2;
    uint64_t p2m = mmio_read64_halves(SYSINFO_BASE + SYSINFO_P2M_ROOT);
    char *src = alloc_pages(1), *dst = alloc_pages(1);

    if (!src || !dst) {
        check(0, "allocate buffers");
        return;
    }
    ipmmu_write(ROOT, IMSAUXCTLR, ipmmu_read(ROOT, IMSAUXCTLR) | IMSAUXCTLR_S2PTE);
    ctx_write(ROOT, c, IMTTLBR0, (uint32_t)p2m & 0xFFFFF000u);
    ctx_write(ROOT, c, IMTTUBR0, (uint32_t)(p2m >> 32) & 0xFF);
    ctx_write(ROOT, c, IMTTBCR, IMTTBCR_EAE | IMTTBCR_PMB | IMTTBCR_SL0_LVL_1 | (64 - 40));
    ctx_write(ROOT, c, IMCTR, IMCTR_VA64 | IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);
    attach(c);
    memcpy(src, "by guest-physical address", 26);
    uint32_t st = dma_copy(ENGINE, (uintptr_t)src, (uintptr_t)dst, 26, 0);
    printf("stage 2: TTBR = P2M root 0x%llx, dma4 copies GPA %p -> %p\n", (unsigned long long)p2m, src, dst);
    check(st == DMA_STATUS_OK && memcmp(src, dst, 26) == 0, "dma4 through the shared P2M: \"%s\"", dst);
    detach(c);
}

void demo_ipmmu(void)
{
    section("ipmmu");
    if (board_is_direct())
        stage1_scene();
    else
        check(1, "not direct-mapped: the Linux-style stage-1 scene is skipped (PAs are not machine addresses)");
    stage2_scene();
}
