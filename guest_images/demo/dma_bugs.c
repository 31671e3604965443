/*
 * demo part: quiet DMA bugs made loud (DESIGN.md section 7).  Real hardware would let each of
 * these through without a sound; the lab refuses them with a STATUS the driver can see.
 *
 *   mask     dma3 drives 32 address lines: handed an address above 4 GiB it would drop the high
 *            bits and copy from low memory; here: STATUS 6, nothing written
 *   private  in a secure guest (`vmm run --secure`) a page the guest has not shared through the
 *            hyp window is off limits to every device: STATUS 7; once shared, the copy works
 */
#include "demo/demo.h"
#include "dma.h"

static uint32_t hyp(uint32_t cmd, uint64_t gpa, uint32_t pages, uint64_t *result)
{
    mmio_write64(HYP_BASE + HYP_GPA, gpa);
    mmio_write32(HYP_BASE + HYP_PAGES, pages);
    mmio_write32(HYP_BASE + HYP_CMD, cmd);
    if (result)
        *result = mmio_read64(HYP_BASE + HYP_RESULT);
    return mmio_read32(HYP_BASE + HYP_STATUS);
}

void demo_dma_bugs(void)
{
    section("quiet DMA bugs, made loud");
    uint8_t *buf = alloc_pages(2);
    uint64_t src = 0, dst = 0, fa = 0;
    if (!buf || hyp(HYP_CMD_TRANSLATE, (uintptr_t)buf, 1, &src) || hyp(HYP_CMD_TRANSLATE, (uintptr_t)buf + PAGE_SIZE, 1, &dst)) {
        check(0, "alloc_pages and hyp translate");
        return;
    }
    memset(buf, 0xab, PAGE_SIZE);
    uint64_t high = RAM_HIGH_BASE + src;            /* truncated to 32 bits it would be src */
    uint32_t st = dma_copy(3, high, dst, 64, &fa);
    check(st == DMA_STATUS_DMA_MASK && fa == high && buf[PAGE_SIZE] == 0,
          "mask: dma3 (32 address lines) given 0x%llx: STATUS %u, FAULT_ADDR 0x%llx, nothing written",
          (unsigned long long)high, st, (unsigned long long)fa);

    if (!(mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS) & SYSINFO_F_SECURE)) {
        check(hyp(HYP_CMD_SHARE, (uintptr_t)buf, 2, 0) == HYP_STATUS_NOT_SECURE,
              "private: not a secure guest, share answers 2 (boot with --secure to see a private page refused)");
        return;
    }
    st = dma_copy(3, src, dst, 64, &fa);
    check(st == DMA_STATUS_PRIVATE && fa == src && buf[PAGE_SIZE] == 0,
          "private: dma3 given a page the guest never shared: STATUS %u, FAULT_ADDR 0x%llx, nothing written", st,
          (unsigned long long)fa);
    uint32_t sh = hyp(HYP_CMD_SHARE, (uintptr_t)buf, 2, 0);
    st = dma_copy(3, src, dst, 64, &fa);
    check(sh == 0 && st == DMA_STATUS_OK && buf[PAGE_SIZE] == 0xab, "shared through hyp, the same copy works (STATUS %u)",
          st);
    hyp(HYP_CMD_UNSHARE, (uintptr_t)buf, 2, 0);
}
