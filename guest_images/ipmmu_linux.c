/*
 * ipmmu_linux: the Linux ipmmu-vmsa driver's register sequence on R-Car Gen3
 * (facts/ipmmu.md section 3), replayed against the model with checks.
 *
 *   probe        root: IMCTR(i) = 0 for every context; context 0 reserved
 *   init_context io-pgtable ARM_32_LPAE_S1 (NS quirk), TTBR, IMTTBCR 0x80000080,
 *                IMMAIR0, IMSTR write-back, IMCTR 0x7 on cache then root
 *   utlb_enable  IMUASID = 0, IMUCTR = TTSEL | FLUSH | MMUEN (dma0 u32, dma1 u33)
 *   map          4K pages, a 2M block and a 1G block; DMA through dma0 and dma1
 *   faults       a write to a read-only page (PF), an unmapped IOVA (TF), the
 *                IRQ handler's IMSTR/IMELAR/IMEUAR reads and IMSTR = 0
 *   unmap        clear the PTE, IMCTR |= FLUSH (cache, root), poll FLUSH
 *   detach       IMUCTR = 0: the master is back to pass-through
 *   destroy      IMCTR = FLUSH on cache and root, poll
 *
 * Linux hands the IPMMU physical addresses, which only works where they are
 * machine addresses: the direct-mapped board (sysinfo flags bit 0).
 */
#include "runtime.h"
#include "board.h"
#include "ipmmu.h"

#define ROOT    IPMMU_MM_BASE
#define CACHE   IPMMU_DS1_BASE
#define TLB_LOOP_TIMEOUT 100

static unsigned ctx_id;
static struct lpae_pgtable pgtbl;

/* ipmmu_ctx_write_all: the cache copy first, then the root. */
static void ctx_write_all(unsigned c, uint32_t reg, uint32_t v)
{
    ctx_write(CACHE, c, reg, v);
    ctx_write(ROOT, c, reg, v);
}

/* ipmmu_tlb_sync: poll the root's IMCTR.FLUSH; returns the polls it took. */
static int tlb_sync(unsigned c)
{
    int count = 0;
    while (ctx_read(ROOT, c, IMCTR) & IMCTR_FLUSH) {
        if (++count == TLB_LOOP_TIMEOUT) {
            printf("TLB sync timed out -- MMU may be deadlocked\n");
            return -1;
        }
    }
    return count;
}

/* ipmmu_tlb_invalidate + sync (the unmap path's flush_all). */
static int tlb_flush_all(unsigned c)
{
    uint32_t v = ctx_read(ROOT, c, IMCTR) | IMCTR_FLUSH;
    ctx_write_all(c, IMCTR, v);
    return tlb_sync(c);
}

static void probe(void)
{
    section("probe (ipmmu_device_reset)");
    for (unsigned i = 0; i < IPMMU_NUM_CTX; i++)
        ctx_write(ROOT, i, IMCTR, 0);
    int zero = 1;
    for (unsigned i = 0; i < IPMMU_NUM_CTX; i++)
        zero &= ctx_read(ROOT, i, IMCTR) == 0 && ctx_read(ROOT, i, IMSTR) == 0;
    check(zero, "every root context reads IMCTR = 0, IMSTR = 0 after reset");
    check(ipmmu_read(CACHE, IMUCTR(DMA0_IPMMU_DS1_UTLB)) == 0 && ipmmu_read(CACHE, IMUCTR(DMA1_IPMMU_DS1_UTLB)) == 0,
          "IMUCTR32/33 reset to 0 (uTLBs pass-through)");
    check(ipmmu_read(ROOT, IMSAUXCTLR) == 0, "IMSAUXCTLR.S2PTE resets to 0 (stage-1 descriptors)");
}

static void init_context(void)
{
    section("init_context");
    pgtbl.pgd = alloc_pages(1);           /* older kernels: a whole page for the 4-entry pgd */
    check(pgtbl.pgd != 0, "pgd allocated at %p", (void *)pgtbl.pgd);
    uint64_t ttbr = (uint64_t)(uintptr_t)pgtbl.pgd;

    ctx_id = 1;                           /* first free bit >= 1 (context 0 reserved) */
    ctx_write(ROOT, ctx_id, IMTTLBR0, (uint32_t)ttbr);
    ctx_write(ROOT, ctx_id, IMTTUBR0, (uint32_t)(ttbr >> 32));
    ctx_write(ROOT, ctx_id, IMTTBCR, IMTTBCR_EAE | IMTTBCR_SL0_TWOBIT_LVL_1);
    ctx_write(ROOT, ctx_id, IMMAIR0, ARM_LPAE_MAIR);
    ctx_write(ROOT, ctx_id, IMSTR, ctx_read(ROOT, ctx_id, IMSTR));
    ctx_write_all(ctx_id, IMCTR, IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);

    check(ctx_read(ROOT, ctx_id, IMTTLBR0) == (uint32_t)ttbr, "IMTTLBR0 reads back 0x%08x",
          ctx_read(ROOT, ctx_id, IMTTLBR0));
    check(ctx_read(ROOT, ctx_id, IMTTBCR) == 0x80000080, "IMTTBCR = 0x%08x (EAE | SL0 level 1)",
          ctx_read(ROOT, ctx_id, IMTTBCR));
    check(ctx_read(ROOT, ctx_id, IMMAIR0) == ARM_LPAE_MAIR, "IMMAIR0 = 0x%08x", ctx_read(ROOT, ctx_id, IMMAIR0));
    check(ctx_read(ROOT, ctx_id, IMCTR) == (IMCTR_INTEN | IMCTR_MMUEN), "root IMCTR = 0x%x (FLUSH self-cleared)",
          ctx_read(ROOT, ctx_id, IMCTR));
    check(ctx_read(CACHE, ctx_id, IMCTR) == (IMCTR_INTEN | IMCTR_MMUEN), "cache IMCTR copy = 0x%x",
          ctx_read(CACHE, ctx_id, IMCTR));
}

static void utlb_enable(unsigned u)
{
    ipmmu_write(CACHE, IMUASID(u), 0);
    ipmmu_write(CACHE, IMUCTR(u), IMUCTR_TTSEL_MMU(ctx_id) | IMUCTR_FLUSH | IMUCTR_MMUEN);
    uint32_t v = ipmmu_read(CACHE, IMUCTR(u));
    check(v == (IMUCTR_TTSEL_MMU(ctx_id) | IMUCTR_MMUEN), "uTLB %u: IMUCTR reads 0x%x (TTSEL %u, MMUEN)", u, v,
          ctx_id);
}

static int fill_check(volatile uint8_t *p, size_t n, uint8_t seed, int verify)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t v = (uint8_t)(seed + i * 7 + (i >> 9));
        if (verify)
            bad += p[i] != v;
        else
            p[i] = v;
    }
    return bad;
}

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("ipmmu_linux: the Linux ipmmu-vmsa register sequence");
    if (!board_is_direct()) {
        puts("not direct-mapped: Linux programs the IPMMU with physical addresses, which are not machine "
             "addresses here; nothing to replay");
        return finish();
    }
    probe();
    init_context();

    section("utlb_enable");
    utlb_enable(DMA0_IPMMU_DS1_UTLB);
    utlb_enable(DMA1_IPMMU_DS1_UTLB);

    section("map 4K pages, DMA through dma0 and dma1");
    uint8_t *src = alloc_pages(4), *dst = alloc_pages(4), *ro = alloc_pages(1);
    const uint64_t IOVA_SRC = 0x10000000, IOVA_DST = 0x10100000, IOVA_RO = 0x10200000;
    int err = 0;
    for (int i = 0; i < 4; i++) {
        err |= lpae_map(&pgtbl, IOVA_SRC + i * SZ_4K, (uintptr_t)src + i * SZ_4K, SZ_4K, IOMMU_READ);
        err |= lpae_map(&pgtbl, IOVA_DST + i * SZ_4K, (uintptr_t)dst + i * SZ_4K, SZ_4K, IOMMU_READ | IOMMU_WRITE);
    }
    err |= lpae_map(&pgtbl, IOVA_RO, (uintptr_t)ro, SZ_4K, IOMMU_READ);
    check(err == 0, "io-pgtable maps: 4 RO + 4 RW + 1 RO pages (L1 -> L2 -> L3 with NSTable)");
    fill_check(src, 4 * SZ_4K, 0x11, 0);
    uint64_t fault = 0;
    uint32_t st = dma_copy(0, IOVA_SRC + 0x10, IOVA_DST + 0x10, 4 * SZ_4K - 0x20, &fault);
    check(st == DMA_STATUS_OK, "dma0: 16 KiB copy across 4 pages, STATUS %u", st);
    check(memcmp(src + 0x10, dst + 0x10, 4 * SZ_4K - 0x20) == 0, "dma0: the bytes arrived at the mapped pages");
    memset(dst, 0, 4 * SZ_4K);
    st = dma_copy(1, IOVA_SRC, IOVA_DST + SZ_4K, SZ_4K, &fault);
    check(st == DMA_STATUS_OK && memcmp(src, dst + SZ_4K, SZ_4K) == 0, "dma1 (uTLB 33, same context): STATUS %u",
          st);

    section("2M and 1G blocks");
    uint8_t *big = alloc_pages(1024);    /* 4 MiB: holds one 2 MiB-aligned block */
    uint64_t pa2m = ((uint64_t)(uintptr_t)big + SZ_2M - 1) & ~(SZ_2M - 1);
    const uint64_t IOVA_2M = 0x20000000, IOVA_1G = 0x40000000;
    err = lpae_map(&pgtbl, IOVA_2M, pa2m, SZ_2M, IOMMU_READ | IOMMU_WRITE);
    err |= lpae_map(&pgtbl, IOVA_1G, 0, SZ_1G, IOMMU_READ | IOMMU_WRITE);    /* PA 0..1G: all of RAM */
    check(err == 0, "2M block at IOVA 0x%llx -> PA 0x%llx, 1G block at IOVA 0x%llx -> PA 0",
          (unsigned long long)IOVA_2M, (unsigned long long)pa2m, (unsigned long long)IOVA_1G);
    st = dma_copy(0, IOVA_SRC, IOVA_2M + SZ_2M - 2 * SZ_4K, 2 * SZ_4K, &fault);
    check(st == DMA_STATUS_OK && memcmp(src, (void *)(uintptr_t)(pa2m + SZ_2M - 2 * SZ_4K), 2 * SZ_4K) == 0,
          "dma0 into the last two pages of the 2M block: STATUS %u", st);
    fill_check(dst, SZ_4K, 0x5A, 0);
    st = dma_copy(0, IOVA_1G + (uintptr_t)dst, IOVA_2M + 0x123, 0x800, &fault);
    check(st == DMA_STATUS_OK && memcmp(dst, (void *)(uintptr_t)(pa2m + 0x123), 0x800) == 0,
          "dma0 from the 1G block (IOVA 1G + PA) into the 2M block: STATUS %u", st);

    section("permission fault (write to a read-only page)");
    st = dma_copy(0, IOVA_DST, IOVA_RO + 0x40, 64, &fault);
    check(st == DMA_STATUS_PERM_FAULT, "dma0 STATUS %u (3 = permission)", st);
    check(fault == IOVA_RO + 0x40, "FAULT_ADDR (the copy's first byte) 0x%llx", (unsigned long long)fault);
    uint64_t iova = 0;
    uint32_t status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
    check(status & IMSTR_PF, "IMSTR 0x%x has PF", status);
    check(IMSTR_ERRCODE(status) == IMSTR_ERRCODE_ACCESS_PERM && IMSTR_ERRLVL(status) == 3,
          "ERRCODE %u (4 ACCESS_PERM), ERRLVL %u", IMSTR_ERRCODE(status), IMSTR_ERRLVL(status));
    check(iova == IOVA_RO + 0x40, "IMELAR/IMEUAR = 0x%llx", (unsigned long long)iova);
    check(ctx_read(ROOT, ctx_id, IMSTR) == 0 && ctx_read(ROOT, ctx_id, IMELAR) == 0,
          "IMSTR = 0 clears the record");

    section("translation fault (unmapped IOVA)");
    const uint64_t IOVA_HOLE = 0x10004000;              /* just past the 4 source pages */
    st = dma_copy(1, IOVA_SRC + 3 * SZ_4K, IOVA_DST, 2 * SZ_4K, &fault);
    check(st == DMA_STATUS_XLATE_FAULT && fault == IOVA_HOLE, "dma1 STATUS %u FAULT_ADDR 0x%llx", st,
          (unsigned long long)fault);
    status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
    check((status & IMSTR_TF) && IMSTR_ERRCODE(status) == IMSTR_ERRCODE_TLB_FORMAT && IMSTR_ERRLVL(status) == 3,
          "IMSTR 0x%x: TF, ERRCODE 1, ERRLVL 3", status);
    check(iova == IOVA_HOLE, "IMELAR = 0x%llx", (unsigned long long)iova);
    status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
    check(status == 0, "handler finds nothing more (IMSTR 0x%x)", status);

    section("unmap + flush");
    check(lpae_unmap(&pgtbl, IOVA_DST) == 0, "unmap IOVA 0x%llx", (unsigned long long)IOVA_DST);
    int polls = tlb_flush_all(ctx_id);
    check(polls == 0, "flush: IMCTR.FLUSH read back 0 at once (%d polls)", polls);
    check(ctx_read(ROOT, ctx_id, IMCTR) == (IMCTR_INTEN | IMCTR_MMUEN), "IMCTR still 0x%x after the RMW flush",
          ctx_read(ROOT, ctx_id, IMCTR));
    st = dma_copy(0, IOVA_SRC, IOVA_DST, 64, &fault);
    check(st == DMA_STATUS_XLATE_FAULT && fault == IOVA_DST, "the unmapped page faults now (STATUS %u)", st);
    ipmmu_domain_irq(ROOT, ctx_id, &iova);
    st = dma_copy(0, IOVA_SRC, IOVA_DST + SZ_4K, 64, &fault);
    check(st == DMA_STATUS_OK, "its neighbour still translates (STATUS %u)", st);

    section("detach + destroy");
    ipmmu_write(CACHE, IMUCTR(DMA0_IPMMU_DS1_UTLB), 0);
    ipmmu_write(CACHE, IMUCTR(DMA1_IPMMU_DS1_UTLB), 0);
    memset(dst, 0, SZ_4K);
    st = dma_copy(0, (uintptr_t)src, (uintptr_t)dst, 256, &fault);
    check(st == DMA_STATUS_OK && memcmp(src, dst, 256) == 0, "uTLB off: dma0 passes physical addresses through");
    ctx_write_all(ctx_id, IMCTR, IMCTR_FLUSH);
    polls = tlb_sync(ctx_id);
    check(polls == 0 && ctx_read(ROOT, ctx_id, IMCTR) == 0 && ctx_read(CACHE, ctx_id, IMCTR) == 0,
          "IMCTR = FLUSH disables the context (root 0x%x, cache 0x%x)", ctx_read(ROOT, ctx_id, IMCTR),
          ctx_read(CACHE, ctx_id, IMCTR));
    return finish();
}
