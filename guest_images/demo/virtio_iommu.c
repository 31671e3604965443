/*
 * demo part: virtio-iommu (virtio-mmio slot 0).  Bring the device up, put
 * dma2 (endpoint 2) in a domain with one READ and one READ|WRITE mapping,
 * copy through it, then show that a write through the READ mapping is
 * refused and reported on the event queue.
 */
#include "demo/demo.h"
#include "virtio.h"

#define DEMO_DOM    1
#define DEMO_SRC    0x40000000ULL
#define DEMO_DST    0x50000000ULL

void demo_virtio_iommu(void)
{
    static struct viommu v;
    uint64_t base = VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT);
    uint64_t feats = ((uint64_t)VIRTIO_IOMMU_FEATURES_HI << 32) | VIRTIO_IOMMU_FEATURES_LO;
    uint64_t fa = 0;

    section("virtio-iommu");
    int rc = viommu_init(&v, base, feats);
    check(rc == 0, "virtio-iommu at 0x%llx: device 23, features negotiated, queues up (%d)",
          (unsigned long long)base, rc);
    if (rc)
        return;
    uint8_t *src = alloc_pages(1), *dst = alloc_pages(1);
    if (!src || !dst) {
        check(0, "alloc_pages");
        return;
    }
    for (unsigned i = 0; i < PAGE_SIZE; i++)
        src[i] = (uint8_t)(i ^ 0x5a);

    check(viommu_attach(&v, DEMO_DOM, DMA2_VIOMMU_ENDPOINT, 0) == VIRTIO_IOMMU_S_OK, "ATTACH endpoint 2");
    check(viommu_map(&v, DEMO_DOM, DEMO_SRC, DEMO_SRC + PAGE_SIZE - 1, (uintptr_t)src, VIRTIO_IOMMU_MAP_F_READ) == 0,
          "MAP 0x%llx -> %p READ", (unsigned long long)DEMO_SRC, (void *)src);
    check(viommu_map(&v, DEMO_DOM, DEMO_DST, DEMO_DST + PAGE_SIZE - 1, (uintptr_t)dst,
                     VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE) == 0,
          "MAP 0x%llx -> %p READ|WRITE", (unsigned long long)DEMO_DST, (void *)dst);
    uint32_t st = dma_copy(2, DEMO_SRC, DEMO_DST, PAGE_SIZE, &fa);
    check(st == DMA_STATUS_OK && memcmp(src, dst, PAGE_SIZE) == 0, "dma2 copies IOVA to IOVA (STATUS %u)", st);

    st = dma_copy(2, DEMO_DST, DEMO_SRC, 64, &fa);
    struct virtio_iommu_fault f = { 0 };
    uint32_t len = 0;
    int got = viommu_next_fault(&v, &f, &len);
    check(st == DMA_STATUS_PERM_FAULT && fa == DEMO_SRC, "write through READ mapping refused (STATUS %u)", st);
    check(got && len == 24 && f.reason == VIRTIO_IOMMU_FAULT_R_MAPPING && f.endpoint == DMA2_VIOMMU_ENDPOINT &&
          f.address == DEMO_SRC &&
          f.flags == (VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS),
          "fault event: reason %u flags 0x%x endpoint %u address 0x%llx", f.reason, f.flags, f.endpoint,
          (unsigned long long)f.address);
    check(viommu_detach(&v, DEMO_DOM, DMA2_VIOMMU_ENDPOINT) == VIRTIO_IOMMU_S_OK, "DETACH");
    vio_w32(&v, VIRTIO_MMIO_STATUS, 0);
}
