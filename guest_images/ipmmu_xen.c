/*
 * ipmmu_xen: the Xen ipmmu-vmsa driver's register sequence (facts/ipmmu.md
 * section 4), replayed against the model with checks.  Xen shares the CPU's
 * P2M with the IPMMU (stage-2 mode), so masters DMA by IPA = guest-physical
 * address and this works whether or not the domain is direct-mapped.
 *
 *   probe        PRR >= H3 ES3.0; root IMCTR(i) = 0; IMSAUXCTLR |= S2PTE (root);
 *                IMSCTLR &= ~USE_SECGRP (every instance)
 *   init_context TTBR = P2M root (sysinfo), IMTTBCR = EAE|PMB|SL0_LVL_1|(64-40),
 *                IMSTR write-back, root IMCTR = VA64|INTEN|FLUSH|MMUEN
 *   attach       cache IMCTR = (root IMCTR | FLUSH) & 7; per uTLB: read IMUCTR,
 *                refuse one owned by another context, IMUASID = 0,
 *                IMUCTR = old | TTSEL | MMUEN
 *   DMA by IPA, faults for an unmapped IPA and an IPA >= 2^40, teardown
 */
#include "runtime.h"
#include "board.h"
#include "ipmmu.h"

#define ROOT    IPMMU_MM_BASE
#define CACHE   IPMMU_DS1_BASE
#define TLB_LOOP_TIMEOUT 100

static const uint64_t instances[] = { IPMMU_DS0_BASE, IPMMU_DS1_BASE, IPMMU_MM_BASE };
static unsigned ctx_id;

static int stage2_supported(void)
{
    uint32_t v = mmio_read32(PRR_ADDR);
    uint32_t product = v & 0x7F00, cut = v & 0xFF;
    return (product == 0x4F00 || product == 0x5200) && cut >= 0x20;
}

static int tlb_sync(unsigned c)
{
    int count = 0;
    while (ctx_read(ROOT, c, IMCTR) & IMCTR_FLUSH)
        if (++count == TLB_LOOP_TIMEOUT)
            return -1;
    return count;
}

/* ipmmu_utlb_enable: 0 or -1 (already assigned to another context). */
static int utlb_enable(uint64_t cache, unsigned u, unsigned c)
{
    uint32_t old = ipmmu_read(cache, IMUCTR(u));
    if ((old & IMUCTR_MMUEN) && ((old & IMUCTR_TTSEL_MASK) >> 4) != c) {
        printf("Micro-TLB %u already assigned to IPMMU context %u\n", u, (old & IMUCTR_TTSEL_MASK) >> 4);
        return -1;
    }
    ipmmu_write(cache, IMUASID(u), 0);
    ipmmu_write(cache, IMUCTR(u), old | IMUCTR_TTSEL_MMU(c) | IMUCTR_MMUEN);
    return 0;
}

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("ipmmu_xen: the Xen ipmmu-vmsa register sequence (stage 2 over the shared P2M)");
    printf("domain is %s\n", board_is_direct() ? "direct-mapped" : "not direct-mapped");

    section("probe");
    uint32_t prr = mmio_read32(PRR_ADDR);
    check(stage2_supported(), "PRR 0x%08x: H3 ES3.0+ supports P2M sharing", prr);
    for (unsigned i = 0; i < IPMMU_NUM_CTX; i++)
        ctx_write(ROOT, i, IMCTR, 0);
    ipmmu_write(ROOT, IMSAUXCTLR, ipmmu_read(ROOT, IMSAUXCTLR) | IMSAUXCTLR_S2PTE);
    for (unsigned i = 0; i < ARRAY_SIZE(instances); i++)
        ipmmu_write(instances[i], IMSCTLR, ipmmu_read(instances[i], IMSCTLR) & ~IMSCTLR_USE_SECGRP);
    check(ipmmu_read(ROOT, IMSAUXCTLR) == IMSAUXCTLR_S2PTE, "root IMSAUXCTLR = 0x%x (S2PTE)",
          ipmmu_read(ROOT, IMSAUXCTLR));
    check(ipmmu_read(CACHE, IMSCTLR) == 0 && ipmmu_read(ROOT, IMSCTLR) == 0, "IMSCTLR.USE_SECGRP clear everywhere");

    section("init_context (root)");
    uint64_t ttbr = mmio_read64_halves(SYSINFO_BASE + SYSINFO_P2M_ROOT);
    uint32_t ipa_bits = mmio_read32(SYSINFO_BASE + SYSINFO_IPA_BITS);
    ctx_id = 1;
    ctx_write(ROOT, ctx_id, IMTTLBR0, (uint32_t)ttbr & 0xFFFFF000u);
    ctx_write(ROOT, ctx_id, IMTTUBR0, (uint32_t)(ttbr >> 32) & 0xFFu);
    ctx_write(ROOT, ctx_id, IMTTBCR, IMTTBCR_EAE | IMTTBCR_PMB | IMTTBCR_SL0_LVL_1 | (64 - ipa_bits));
    ctx_write(ROOT, ctx_id, IMSTR, ctx_read(ROOT, ctx_id, IMSTR));
    ctx_write(ROOT, ctx_id, IMCTR, IMCTR_VA64 | IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);
    check(ctx_read(ROOT, ctx_id, IMTTBCR) == 0xC0000058, "IMTTBCR = 0x%08x", ctx_read(ROOT, ctx_id, IMTTBCR));
    check(ctx_read(ROOT, ctx_id, IMCTR) == 0x20000005, "root IMCTR = 0x%08x (VA64 latched, FLUSH cleared)",
          ctx_read(ROOT, ctx_id, IMCTR));
    uint64_t back = ctx_read(ROOT, ctx_id, IMTTLBR0) | (uint64_t)ctx_read(ROOT, ctx_id, IMTTUBR0) << 32;
    check(back == ttbr, "TTBR = P2M root 0x%llx", (unsigned long long)back);

    section("attach dma0/dma1 (ds1 uTLB 32/33)");
    ctx_write(CACHE, ctx_id, IMCTR, (ctx_read(ROOT, ctx_id, IMCTR) | IMCTR_FLUSH) & IMCTR_COMMON_MASK);
    check(ctx_read(CACHE, ctx_id, IMCTR) == 0x5, "cache IMCTR copy = 0x%x", ctx_read(CACHE, ctx_id, IMCTR));
    check(utlb_enable(CACHE, DMA0_IPMMU_DS1_UTLB, ctx_id) == 0, "uTLB 32 attached");
    check(utlb_enable(CACHE, DMA1_IPMMU_DS1_UTLB, ctx_id) == 0, "uTLB 33 attached");
    check(ipmmu_read(CACHE, IMUCTR(32)) == 0x11, "IMUCTR32 = 0x%x", ipmmu_read(CACHE, IMUCTR(32)));
    /* uTLB 34 as another domain left it (context 2): Xen refuses to share it. */
    ipmmu_write(CACHE, IMUCTR(34), IMUCTR_TTSEL_MMU(2) | IMUCTR_MMUEN);
    check(utlb_enable(CACHE, 34, ctx_id) == -1, "a uTLB enabled for context 2 is refused (read-or-refuse)");
    check(ipmmu_read(CACHE, IMUCTR(34)) == 0x21, "and left untouched (IMUCTR34 = 0x%x)", ipmmu_read(CACHE, IMUCTR(34)));
    ipmmu_write(CACHE, IMUCTR(34), 0);
    check(utlb_enable(CACHE, 33, ctx_id) == 0, "re-attaching uTLB 33 to its own context is fine");

    section("DMA by IPA");
    uint8_t *src = alloc_pages(8), *dst = alloc_pages(8);
    for (unsigned i = 0; i < 8 * PAGE_SIZE; i++)
        src[i] = (uint8_t)(i * 13 + (i >> 12));
    uint64_t fault = 0;
    uint32_t st = dma_copy(0, (uintptr_t)src, (uintptr_t)dst, 8 * PAGE_SIZE, &fault);
    check(st == DMA_STATUS_OK, "dma0: 32 KiB by IPA, STATUS %u", st);
    check(memcmp(src, dst, 8 * PAGE_SIZE) == 0, "dma0: the CPU sees the copy at the same GPAs");
    memset(dst, 0, 8 * PAGE_SIZE);
    st = dma_copy(1, (uintptr_t)src + 0x123, (uintptr_t)dst + 0x456, 3 * PAGE_SIZE, &fault);
    check(st == DMA_STATUS_OK && memcmp(src + 0x123, dst + 0x456, 3 * PAGE_SIZE) == 0,
          "dma1: unaligned 12 KiB by IPA, STATUS %u", st);

    section("faults");
    uint64_t iova = 0;
    const uint64_t HOLE = 0x0B000000;           /* the device window: not RAM, not in the P2M */
    st = dma_copy(0, HOLE + 0x10, (uintptr_t)dst, 64, &fault);
    check(st == DMA_STATUS_XLATE_FAULT && fault == HOLE + 0x10, "unmapped IPA: STATUS %u FAULT_ADDR 0x%llx", st,
          (unsigned long long)fault);
    uint32_t status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
    check((status & IMSTR_TF) && IMSTR_ERRCODE(status) == IMSTR_ERRCODE_TLB_FORMAT,
          "IMSTR 0x%x: TF, ERRCODE 1, ERRLVL %u", status, IMSTR_ERRLVL(status));
    check(iova == HOLE + 0x10, "IMELAR/IMEUAR = 0x%llx", (unsigned long long)iova);

    const uint64_t BEYOND = 1ull << 40;
    uint32_t bits = mmio_read32(DMA_ENGINE(1) + DMA_DMA_BITS);
    st = dma_copy(1, (uintptr_t)src, BEYOND + 0x2000, 64, &fault);
    if (bits <= 40) {
        /* A master with fewer address lines never reaches the IPMMU with this IPA (DESIGN section 7). */
        check(st == DMA_STATUS_DMA_MASK && fault == BEYOND + 0x2000,
              "IPA 2^40 + 0x2000 on a %u-bit master: STATUS %u (6, beyond its mask) FAULT_ADDR 0x%llx", bits, st,
              (unsigned long long)fault);
        status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
        check(status == 0, "no IPMMU record for a refused address (IMSTR 0x%x)", status);
    } else {
        check(st == DMA_STATUS_XLATE_FAULT && fault == BEYOND + 0x2000, "IPA 2^40 + 0x2000: STATUS %u FAULT_ADDR 0x%llx",
              st, (unsigned long long)fault);
        status = ipmmu_domain_irq(ROOT, ctx_id, &iova);
        check((status & IMSTR_TF) && IMSTR_ERRCODE(status) == 0 && IMSTR_ERRLVL(status) == 0,
              "IMSTR 0x%x: TF, ERRCODE 0, ERRLVL 0 (input too large)", status);
        check(iova == BEYOND + 0x2000 && ctx_read(ROOT, ctx_id, IMEUAR) == 0, "IMEUAR carried bit 40: 0x%llx, cleared",
              (unsigned long long)iova);
    }

    section("teardown");
    ipmmu_write(CACHE, IMUCTR(DMA0_IPMMU_DS1_UTLB), 0);
    ipmmu_write(CACHE, IMUCTR(DMA1_IPMMU_DS1_UTLB), 0);
    ctx_write(CACHE, ctx_id, IMCTR, IMCTR_FLUSH & IMCTR_COMMON_MASK);
    ctx_write(ROOT, ctx_id, IMCTR, IMCTR_FLUSH);
    int polls = tlb_sync(ctx_id);
    check(polls == 0 && ctx_read(ROOT, ctx_id, IMCTR) == 0 && ctx_read(CACHE, ctx_id, IMCTR) == 0,
          "contexts disabled (%d polls)", polls);
    check(ipmmu_read(CACHE, IMUCTR(32)) == 0 && ipmmu_read(CACHE, IMUCTR(33)) == 0, "uTLBs released");
    return finish();
}
