/*
 * demo part: PASID tables on the virtio-iommu (DESIGN.md section 6).  Negotiate
 * F_ATTACH_TABLE, build a linear SMMUv3 CD table with the PASID-table library
 * (include/pasid.h), give PASID 7 an io-pgtable-style stage-1 table, hand the
 * table over with ATTACH_TABLE and copy through dma2 tagged with PASID 7; then a
 * fault event that carries the PASID.
 */
#include "demo/demo.h"
#include "dma.h"
#include "pasid.h"

#define DEMO_PASID      7
#define DEMO_DOM        2
#define DEMO_IOVA       0x40000000ULL

void demo_pasid(void)
{
    static struct viommu v;
    static struct iommu_pasid_table tbl;
    static struct io_pgtable pt;
    uint64_t feats = ((uint64_t)VIRTIO_IOMMU_FEATURES_HI << 32) | VIRTIO_IOMMU_FEATURES_LO |
                     (1u << VIRTIO_IOMMU_F_ATTACH_TABLE);
    uint64_t fa = 0;

    section("virtio-iommu PASID tables");
    int rc = viommu_init(&v, VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT), feats);
    check(rc == 0, "virtio-iommu up with F_ATTACH_TABLE (%d)", rc);
    uint8_t *src = alloc_pages(1), *dst = alloc_pages(1);
    if (rc || !src || !dst || s1_init(&pt)) {
        check(0, "set-up");
        return;
    }
    for (unsigned i = 0; i < PAGE_SIZE; i++)
        src[i] = (uint8_t)(i * 3 + 1);
    tbl.v = &v;
    tbl.domain = DEMO_DOM;
    tbl.ops = &arm_cd_table_ops;
    tbl.cfg.s1fmt = VIRTIO_IOMMU_S1FMT_LINEAR;
    tbl.cfg.s1cdmax = 4;
    int ok = iommu_psdtable_alloc(&tbl, &tbl.cfg) == 0;
    ok = ok && s1_map(&pt, DEMO_IOVA, (uintptr_t)src, SZ_4K, IOMMU_READ) == 0 &&
          s1_map(&pt, DEMO_IOVA + SZ_4K, (uintptr_t)dst, SZ_4K, IOMMU_READ | IOMMU_WRITE) == 0 &&
          iommu_psdtable_prepare(&tbl, &tbl.cfg, &pt.cfg, 42) == 0 &&
          iommu_psdtable_write(&tbl, &tbl.cfg, DEMO_PASID, &tbl) == 0;
    check(ok, "CD table (16 CDs) at 0x%llx; pasid %d -> stage 1 at 0x%llx, ASID 42", (unsigned long long)tbl.cfg.base,
          DEMO_PASID, (unsigned long long)pt.cfg.ttbr);
    check(viommu_attach_table(&v, DEMO_DOM, DMA2_VIOMMU_ENDPOINT, VIRTIO_IOMMU_S1FMT_LINEAR,
                              VIRTIO_IOMMU_S1DSS_TERMINATE, tbl.cfg.base, 4) == VIRTIO_IOMMU_S_OK,
          "ATTACH_TABLE endpoint 2 -> domain %d", DEMO_DOM);
    dma_set_pasid(2, DEMO_PASID);
    uint32_t st = dma_copy(2, DEMO_IOVA, DEMO_IOVA + SZ_4K, PAGE_SIZE, &fa);
    check(st == DMA_STATUS_OK && memcmp(src, dst, PAGE_SIZE) == 0,
          "dma2 with pasid %d: CD -> stage 1 -> P2M, 4 KiB copied (STATUS %u)", DEMO_PASID, st);
    st = dma_copy(2, DEMO_IOVA + 2 * SZ_4K, DEMO_IOVA + SZ_4K, 64, &fa);
    dma_set_pasid(2, -1);
    struct virtio_iommu_fault_pasid f = { 0 };
    uint32_t len = 0;
    int got = viommu_next_fault(&v, (struct virtio_iommu_fault *)&f, &len);
    check(st == DMA_STATUS_XLATE_FAULT && got && f.reason == VIRTIO_IOMMU_FAULT_R_MAPPING &&
          (f.flags & VIRTIO_IOMMU_FAULT_F_PASID) && f.pasid == DEMO_PASID,
          "unmapped IOVA: fault event reason %u flags 0x%x pasid %u", f.reason, f.flags, f.pasid);
    check(viommu_detach(&v, DEMO_DOM, DMA2_VIOMMU_ENDPOINT) == VIRTIO_IOMMU_S_OK, "DETACH");
    vio_w32(&v, VIRTIO_MMIO_STATUS, 0);
}
