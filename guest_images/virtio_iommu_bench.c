/*
 * virtio_iommu_bench: MAP+UNMAP throughput of the virtio-iommu from a guest,
 * for bench/virtio_iommu.py.  Descriptors are built once; each batch makes
 * 64 requests available and kicks once (64 requests per notification):
 * a batch of 64 MAPs of distinct 4 KiB pages, then a batch of 64 UNMAPs of
 * the same pages.  The console markers "BENCH begin" / "BENCH end" let the
 * harness time the loop; the payload checks every status itself.
 */
#define VIOMMU_QNUM 256
#include "virtio.h"

#define BATCH       64
#define BATCHES     2048            /* 131072 requests */
#define DOM         1
#define IOVA_BASE   0x100000000ULL

static struct viommu v;

int main(struct hvm_start_info *si)
{
    (void)si;
    uint64_t base = VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT);
    uint64_t feats = ((uint64_t)VIRTIO_IOMMU_FEATURES_HI << 32) | VIRTIO_IOMMU_FEATURES_LO;
    check(viommu_init(&v, base, feats) == 0, "virtio-iommu up");
    check(viommu_attach(&v, DOM, DMA2_VIOMMU_ENDPOINT, 0) == 0, "ATTACH");

    struct virtio_iommu_req_map *maps = alloc_pages(1);        /* 64 x 40 bytes */
    struct virtio_iommu_req_unmap *unmaps = alloc_pages(1);    /* 64 x 32 bytes */
    uint8_t *target = alloc_pages(1);
    if (!maps || !unmaps || !target)
        return finish() + 1;
    struct vq *q = &v.req;
    for (unsigned i = 0; i < BATCH; i++) {
        uint64_t iova = IOVA_BASE + (uint64_t)i * PAGE_SIZE;
        maps[i] = (struct virtio_iommu_req_map){ .head.type = VIRTIO_IOMMU_T_MAP, .domain = DOM,
            .virt_start = iova, .virt_end = iova + PAGE_SIZE - 1, .phys_start = (uintptr_t)target,
            .flags = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE };
        unmaps[i] = (struct virtio_iommu_req_unmap){ .head.type = VIRTIO_IOMMU_T_UNMAP, .domain = DOM,
            .virt_start = iova, .virt_end = iova + PAGE_SIZE - 1 };
        /* descs 2i, 2i+1: MAP i; descs 128+2i, 129+2i: UNMAP i */
        q->desc[2 * i] = (struct vring_desc){ (uintptr_t)&maps[i], sizeof(maps[i]) - 4, VRING_DESC_F_NEXT,
                                              (uint16_t)(2 * i + 1) };
        q->desc[2 * i + 1] = (struct vring_desc){ (uintptr_t)&maps[i].tail, 4, VRING_DESC_F_WRITE, 0 };
        q->desc[128 + 2 * i] = (struct vring_desc){ (uintptr_t)&unmaps[i], sizeof(unmaps[i]) - 4,
                                                    VRING_DESC_F_NEXT, (uint16_t)(129 + 2 * i) };
        q->desc[129 + 2 * i] = (struct vring_desc){ (uintptr_t)&unmaps[i].tail, 4, VRING_DESC_F_WRITE, 0 };
    }

    /* With 256 slots and 64 requests per batch, batch b uses avail slots
     * start + 64*(b%4) .. +63 (start = where the ring stands after ATTACH):
     * even batches (MAP) and odd ones (UNMAP) always land on the same slots.  Fill the ring once; a batch is then
     * one store of avail->idx and one QueueNotify, like a driver that reuses
     * its descriptors.  Statuses are reset and checked on every 8th batch
     * pair (Linux never checks MAP/UNMAP statuses from the DMA API at all);
     * the used-ring count is checked on every batch. */
    for (unsigned s = 0; s < 256; s++)
        q->avail->ring[(uint16_t)(q->avail_idx + s) % 256] = (uint16_t)((((s / BATCH) & 1) ? 128 : 0) + 2 * (s % BATCH));

    unsigned bad_status = 0, bad_used = 0;
    puts("BENCH begin");
    for (unsigned b = 0; b < BATCHES; b++) {
        int unmap = b & 1, checked = (b & 15) < 2;
        if (checked)
            for (unsigned i = 0; i < BATCH; i++) {
                if (unmap)
                    unmaps[i].tail.status = 0xff;
                else
                    maps[i].tail.status = 0xff;
            }
        q->avail_idx += BATCH;
        unsigned n = viommu_kick(&v, 0);
        bad_used += n != BATCH;
        if (checked)
            for (unsigned i = 0; i < BATCH; i++)
                bad_status += (unmap ? unmaps[i].tail.status : maps[i].tail.status) != 0;
    }
    puts("BENCH end");
    printf("BENCH requests %u batch %u\n", BATCHES * BATCH, BATCH);
    check(bad_used == 0, "every kick answered all %u requests (%u short)", BATCH, bad_used);
    check(bad_status == 0, "every MAP/UNMAP returned OK (%u failed)", bad_status);
    vio_w32(&v, VIRTIO_MMIO_STATUS, 0);
    return finish();
}
