/*
 * demo: the payload `vmm run` boots by default.  A short tour of the board,
 * reported as PASS/FAIL checks; the exit status is the number of failures.
 * More sections (IPMMU, virtio-iommu) live in demo/<part>.c; see demo/demo.h.
 */
#include "demo/demo.h"

/* The sysinfo block tells the guest how its memory is mapped. */
void demo_sysinfo(void)
{
    section("sysinfo");

    uint32_t magic = mmio_read32(SYSINFO_BASE + SYSINFO_MAGIC);
    uint64_t ram = mmio_read64_halves(SYSINFO_BASE + SYSINFO_RAM_SIZE);
    uint64_t p2m = mmio_read64_halves(SYSINFO_BASE + SYSINFO_P2M_ROOT);
    uint32_t vtcr = mmio_read32(SYSINFO_BASE + SYSINFO_VTCR);
    uint32_t ipa = mmio_read32(SYSINFO_BASE + SYSINFO_IPA_BITS);
    uint32_t flags = mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS);
    uint32_t mode = flags & (SYSINFO_F_DIRECT | SYSINFO_F_NOT_DIRECT);

    printf("ram 0x%llx p2m root 0x%llx vtcr 0x%08x ipa bits %u flags 0x%x (%s)\n",
           (unsigned long long)ram, (unsigned long long)p2m, vtcr, ipa, flags,
           mode == SYSINFO_F_DIRECT ? "direct-mapped"
           : mode == SYSINFO_F_NOT_DIRECT ? "not direct-mapped" : "?");

    check(magic == SYSINFO_MAGIC_VALUE, "sysinfo magic 0x%08x", magic);
    check(mode == SYSINFO_F_DIRECT || mode == SYSINFO_F_NOT_DIRECT,
          "exactly one of direct/not-direct set (flags 0x%x)", flags);
    check(ipa == SYSINFO_IPA_BITS_VALUE, "IPA bits %u", ipa);
    check(ram != 0 && (ram & (PAGE_SIZE - 1)) == 0, "RAM size 0x%llx is whole pages",
          (unsigned long long)ram);
}

/* Guest RAM behaves as memory: fresh pages are zero and keep what we write. */
void demo_ram(void)
{
    enum { PAGES = 4 };
    const size_t words = PAGES * PAGE_SIZE / sizeof(uint64_t);

    section("ram");

    volatile uint64_t *buf = alloc_pages(PAGES);
    check(buf != 0, "alloc_pages(%d) = %p (RAM ends at 0x%llx)", PAGES, (void *)buf,
          (unsigned long long)ram_end());
    if (!buf)
        return;
    check(((uintptr_t)buf & (PAGE_SIZE - 1)) == 0, "allocation is page aligned");

    size_t nonzero = 0;
    for (size_t i = 0; i < words; i++)
        nonzero += buf[i] != 0;
    check(nonzero == 0, "fresh pages are zero (%zu non-zero words)", nonzero);

    /* A pattern that differs in every word and every page, so a page mapped
     * twice or at the wrong place shows up as a mismatch. */
    for (size_t i = 0; i < words; i++)
        buf[i] = ((uint64_t)(uintptr_t)&buf[i] * 0x9E3779B97F4A7C15ULL) ^ i;
    size_t bad = 0;
    for (size_t i = 0; i < words; i++)
        bad += buf[i] != (((uint64_t)(uintptr_t)&buf[i] * 0x9E3779B97F4A7C15ULL) ^ i);
    check(bad == 0, "pattern over %d pages reads back (%zu mismatches)", PAGES, bad);
}

int main(struct hvm_start_info *si)
{
    puts("iommu-lab demo: rcar-virt tour");
    printf("start_info magic 0x%08x version %u, %u memmap entries\n", si->magic,
           si->version, si->version >= 1 ? si->memmap_entries : 0);

    demo_sysinfo();
    demo_ram();
    if (mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS) & SYSINFO_F_SECURE) {
        /* Their buffers and rings are private in a secure guest: payload dma_api shows the way. */
        puts("secure guest: the IPMMU, virtio-iommu and PASID tours use unshared memory; skipped (see payload dma_api)");
    } else {
        if (demo_ipmmu)
            demo_ipmmu();
        if (demo_virtio_iommu)
            demo_virtio_iommu();
        if (demo_pasid)
            demo_pasid();
    }
    if (demo_dma_bugs)
        demo_dma_bugs();

    return finish();
}
