/* hello: the smallest payload — greet, show what PVH handed us, exit 0. */
#include "runtime.h"

int main(struct hvm_start_info *si)
{
    puts("Hello from iommu-lab");
    printf("start_info at %p: magic 0x%08x version %u\n", (void *)si, si->magic, si->version);
    if (si->magic == HVM_START_MAGIC && si->version >= 1) {
        const struct hvm_memmap_entry *m =
            (const struct hvm_memmap_entry *)(uintptr_t)si->memmap_paddr;

        printf("memmap: %u entries\n", si->memmap_entries);
        for (uint32_t i = 0; i < si->memmap_entries; i++)
            printf("  %016llx-%016llx type %u\n", (unsigned long long)m[i].addr,
                   (unsigned long long)(m[i].addr + m[i].size), m[i].type);
    }
    return 0;
}
