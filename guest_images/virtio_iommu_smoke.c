/*
 * virtio_iommu_smoke: a small guest driver for rcar-virt's virtio-iommu
 * (virtio-mmio slot 0, endpoint 2 = dma2).  It probes the transport,
 * negotiates, sets up both queues, runs PROBE/ATTACH/MAP/UNMAP/DETACH and
 * DMA through dma2, and checks the fault records on the event queue.
 * Works in guest-physical addresses only, so it passes on direct and
 * scattered P2M layouts.  Exit status = failed checks.
 */
#include "virtio.h"

#define EP          DMA2_VIOMMU_ENDPOINT
#define DOM         7
#define IOVA_SRC    0x10000000ULL
#define IOVA_DST    0x20000000ULL
#define IOVA_RO     0x30000000ULL
#define PAGES       4
#define LEN         (PAGES * PAGE_SIZE)

static struct viommu v;

static uint64_t cfg64(uint32_t off)
{
    /* 64-bit config fields as two 32-bit accesses, as the spec allows for mmio. */
    uint64_t lo = mmio_read32(v.base + VIRTIO_MMIO_CONFIG + off);
    uint64_t hi = mmio_read32(v.base + VIRTIO_MMIO_CONFIG + off + 4);
    return lo | (hi << 32);
}

static uint32_t cfg32(uint32_t off) { return mmio_read32(v.base + VIRTIO_MMIO_CONFIG + off); }

static void transport(void)
{
    section("virtio-mmio transport");
    uint64_t base = VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT);
    check(mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC, "magic");
    check(mmio_read32(base + VIRTIO_MMIO_VERSION) == 2, "version 2");
    check(mmio_read32(base + VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_IOMMU, "slot 0 is device 23");
    unsigned empty = 0;
    for (unsigned s = 1; s < VIRTIO_MMIO_SLOTS; s++)
        empty += mmio_read32(VIRTIO_MMIO_SLOT(s) + VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC &&
                 mmio_read32(VIRTIO_MMIO_SLOT(s) + VIRTIO_MMIO_DEVICE_ID) == 0;
    check(empty == VIRTIO_MMIO_SLOTS - 1, "slots 1..7 read device ID 0 (%u)", empty);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint32_t lo = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    mmio_write32(base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    uint32_t hi = mmio_read32(base + VIRTIO_MMIO_DEVICE_FEATURES);
    check(lo == (VIRTIO_IOMMU_FEATURES_LO | 1u << VIRTIO_IOMMU_F_ATTACH_TABLE) && hi == VIRTIO_IOMMU_FEATURES_HI,
          "features 0x%08x_%08x", hi, lo);
    lo &= ~(1u << VIRTIO_IOMMU_F_ATTACH_TABLE);     /* this driver checks the spec device: no PASID tables */
    check(!(lo & (1u << VIRTIO_IOMMU_F_BYPASS)), "legacy F_BYPASS not offered");
    for (unsigned q = 0; q < 2; q++) {
        mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, q);
        check(mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX) == 256, "queue %u: QueueNumMax 256", q);
    }
    mmio_write32(base + VIRTIO_MMIO_QUEUE_SEL, 2);
    check(mmio_read32(base + VIRTIO_MMIO_QUEUE_NUM_MAX) == 0, "queue 2 does not exist");

    uint64_t feats = ((uint64_t)hi << 32) | lo;
    int rc = viommu_init(&v, base, feats);
    check(rc == 0, "driver init (features, queues, DRIVER_OK): %d", rc);
    check(vio_r32(&v, VIRTIO_MMIO_STATUS) == 15, "status ACK|DRIVER|FEATURES_OK|DRIVER_OK (0x%x)",
          vio_r32(&v, VIRTIO_MMIO_STATUS));
}

static void config(void)
{
    section("virtio-iommu config");
    check(cfg64(VIRTIO_IOMMU_CFG_PAGE_SIZE_MASK) == 0xFFFFFFFFFFFFF000ULL, "page_size_mask");
    check(cfg64(VIRTIO_IOMMU_CFG_INPUT_START) == 0, "input_range.start 0");
    check(cfg64(VIRTIO_IOMMU_CFG_INPUT_END) == (1ULL << 48) - 1, "input_range.end 2^48-1");
    check(cfg32(VIRTIO_IOMMU_CFG_DOMAIN_START) == 0, "domain_range.start 0");
    check(cfg32(VIRTIO_IOMMU_CFG_DOMAIN_END) == 0xFFFFFFFFu, "domain_range.end 2^32-1");
    check(cfg32(VIRTIO_IOMMU_CFG_PROBE_SIZE) == 512, "probe_size 512");
    check(mmio_read8(v.base + VIRTIO_MMIO_CONFIG + VIRTIO_IOMMU_CFG_BYPASS) == 0, "bypass 0 at reset");
}

static void probe(void)
{
    section("PROBE");
    struct virtio_iommu_req_probe r = { .head.type = VIRTIO_IOMMU_T_PROBE, .endpoint = EP };
    uint8_t *out = v.probe_buf;
    memset(out, 0xaa, 512 + 4);
    uint32_t len = viommu_send(&v, &r, sizeof(r), out, 512 + 4);
    check(len == 516, "PROBE ep %u: used length %u", EP, len);
    struct virtio_iommu_probe_resv_mem *p = (void *)out;
    check(out[512] == VIRTIO_IOMMU_S_OK, "PROBE status OK (%u)", out[512]);
    check(p->type == VIRTIO_IOMMU_PROBE_T_RESV_MEM && p->length == 20 && p->subtype == VIRTIO_IOMMU_RESV_MEM_T_MSI,
          "RESV_MEM MSI property (type %u len %u subtype %u)", p->type, p->length, p->subtype);
    check(p->start == 0xFEE00000ULL && p->end == 0xFEEFFFFFULL, "MSI window [0x%llx, 0x%llx]",
          (unsigned long long)p->start, (unsigned long long)p->end);
    unsigned nz = 0;
    for (unsigned i = 24; i < 512; i++)
        nz += out[i] != 0;
    check(nz == 0, "rest of properties zero (%u non-zero)", nz);

    r.endpoint = 444;
    memset(out, 0xaa, 512 + 4);
    len = viommu_send(&v, &r, sizeof(r), out, 512 + 4);
    check(len == 516 && out[512] == VIRTIO_IOMMU_S_NOENT, "PROBE unknown endpoint: NOENT, len %u", len);
}

static int expect_fault(uint8_t reason, uint32_t flags, uint64_t addr, const char *what)
{
    struct virtio_iommu_fault f;
    uint32_t len = 0;
    int got = viommu_next_fault(&v, &f, &len);
    check(got && len == 24, "%s: one fault event (len %u)", what, len);
    if (!got)
        return 0;
    check(f.reason == reason && f.flags == flags && f.endpoint == EP && f.address == addr,
          "%s: reason %u flags 0x%x ep %u addr 0x%llx", what, f.reason, f.flags, f.endpoint,
          (unsigned long long)f.address);
    struct virtio_iommu_fault extra;
    check(!viommu_next_fault(&v, &extra, &len), "%s: no second event", what);
    return 1;
}

static void dma(void)
{
    uint8_t *src = alloc_pages(PAGES), *dst = alloc_pages(PAGES), *ro = alloc_pages(1);
    uint64_t fa = 0;
    section("DMA through endpoint 2");
    if (!src || !dst || !ro) {
        check(0, "alloc");
        return;
    }
    for (unsigned i = 0; i < LEN; i++)
        src[i] = (uint8_t)(i * 7 + 3);

    /* Unattached, bypass 0: no access, fault DOMAIN. */
    uint32_t st = dma_copy(2, (uintptr_t)src, (uintptr_t)dst, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT && fa == (uintptr_t)src, "unattached: STATUS %u at 0x%llx", st,
          (unsigned long long)fa);
    expect_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                 (uintptr_t)src, "unattached");
    uint32_t isr = vio_r32(&v, VIRTIO_MMIO_INTERRUPT_STATUS);
    check(isr & VIRTIO_INT_USED_BUFFER, "event raised InterruptStatus bit 0 (0x%x)", isr);
    vio_w32(&v, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    check(vio_r32(&v, VIRTIO_MMIO_INTERRUPT_STATUS) == 0, "InterruptACK clears it");

    check(viommu_attach(&v, DOM, EP, 0) == VIRTIO_IOMMU_S_OK, "ATTACH dom %u ep %u", DOM, EP);
    check(viommu_map(&v, DOM, IOVA_SRC, IOVA_SRC + LEN - 1, (uintptr_t)src, VIRTIO_IOMMU_MAP_F_READ) == 0,
          "MAP src READ");
    check(viommu_map(&v, DOM, IOVA_DST, IOVA_DST + LEN - 1, (uintptr_t)dst,
                     VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE) == 0, "MAP dst READ|WRITE");
    check(viommu_map(&v, DOM, IOVA_RO, IOVA_RO + PAGE_SIZE - 1, (uintptr_t)ro, VIRTIO_IOMMU_MAP_F_READ) == 0,
          "MAP ro READ");

    st = dma_copy(2, IOVA_SRC, IOVA_DST, LEN, &fa);
    check(st == DMA_STATUS_OK, "copy %u bytes through the IOMMU: STATUS %u", (unsigned)LEN, st);
    check(memcmp(src, dst, LEN) == 0, "destination holds the source bytes");

    st = dma_copy(2, IOVA_SRC, IOVA_RO + 16, 32, &fa);
    check(st == DMA_STATUS_PERM_FAULT && fa == IOVA_RO + 16, "write to READ-only mapping: STATUS %u at 0x%llx", st,
          (unsigned long long)fa);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                 IOVA_RO + 16, "read-only");

    /* Source runs off the end of its mapping: the first unmapped page faults. */
    st = dma_copy(2, IOVA_SRC + LEN - 8, IOVA_DST, 16, &fa);
    check(st == DMA_STATUS_XLATE_FAULT && fa == IOVA_SRC + LEN, "past the mapping: STATUS %u at 0x%llx", st,
          (unsigned long long)fa);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                 IOVA_SRC + LEN, "unmapped");
    vio_w32(&v, VIRTIO_MMIO_INTERRUPT_ACK, vio_r32(&v, VIRTIO_MMIO_INTERRUPT_STATUS));

    section("request statuses");
    check(viommu_map(&v, DOM, IOVA_SRC + 1, IOVA_SRC + PAGE_SIZE, 0, 1) == VIRTIO_IOMMU_S_RANGE, "unaligned: RANGE");
    check(viommu_map(&v, DOM, IOVA_SRC, IOVA_SRC + PAGE_SIZE - 1, 0, 1) == VIRTIO_IOMMU_S_INVAL, "overlap: INVAL");
    check(viommu_map(&v, DOM, 0, PAGE_SIZE - 1, 0, 1 << 3) == VIRTIO_IOMMU_S_INVAL, "unknown flag: INVAL");
    check(viommu_map(&v, DOM, 1ULL << 48, (1ULL << 48) + PAGE_SIZE - 1, 0, 1) == VIRTIO_IOMMU_S_RANGE,
          "outside input_range: RANGE");
    check(viommu_map(&v, DOM + 1, 0, PAGE_SIZE - 1, 0, 1) == VIRTIO_IOMMU_S_NOENT, "unknown domain: NOENT");
    check(viommu_unmap(&v, DOM, IOVA_SRC, IOVA_SRC + PAGE_SIZE - 1) == VIRTIO_IOMMU_S_RANGE, "split: RANGE");
    check(viommu_attach(&v, DOM, 444, 0) == VIRTIO_IOMMU_S_NOENT, "ATTACH unknown endpoint: NOENT");
    check(viommu_detach(&v, DOM + 1, EP) == VIRTIO_IOMMU_S_INVAL, "DETACH wrong domain: INVAL");
    {
        uint8_t bad[8] = { 42 }, tail[4] = { 0xaa, 0xaa, 0xaa, 0xaa };
        uint32_t len = viommu_send(&v, bad, sizeof(bad), tail, sizeof(tail));
        check(len == 0 && tail[0] == 0xaa, "unknown request type: used length %u, buffer untouched", len);
    }

    check(viommu_unmap(&v, DOM, IOVA_SRC, IOVA_SRC + LEN - 1) == VIRTIO_IOMMU_S_OK, "UNMAP src");
    st = dma_copy(2, IOVA_SRC, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT && fa == IOVA_SRC, "after UNMAP: STATUS %u", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                 IOVA_SRC, "after UNMAP");

    section("bypass");
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH");
    mmio_write8(v.base + VIRTIO_MMIO_CONFIG + VIRTIO_IOMMU_CFG_BYPASS, 1);
    check(mmio_read8(v.base + VIRTIO_MMIO_CONFIG + VIRTIO_IOMMU_CFG_BYPASS) == 1, "bypass written to 1");
    memset(dst, 0, LEN);
    st = dma_copy(2, (uintptr_t)src, (uintptr_t)dst, LEN, &fa);
    check(st == DMA_STATUS_OK && memcmp(src, dst, LEN) == 0, "unattached + bypass: identity copy (STATUS %u)", st);
    check(viommu_attach(&v, DOM, EP, VIRTIO_IOMMU_ATTACH_F_BYPASS) == 0, "ATTACH bypass domain");
    check(viommu_map(&v, DOM, 0, PAGE_SIZE - 1, 0, 1) == VIRTIO_IOMMU_S_INVAL, "MAP on bypass domain: INVAL");
    mmio_write8(v.base + VIRTIO_MMIO_CONFIG + VIRTIO_IOMMU_CFG_BYPASS, 0);
    memset(dst, 0, LEN);
    st = dma_copy(2, (uintptr_t)src, (uintptr_t)dst, LEN, &fa);
    check(st == DMA_STATUS_OK && memcmp(src, dst, LEN) == 0, "bypass domain: identity copy (STATUS %u)", st);
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH bypass domain");
    st = dma_copy(2, (uintptr_t)src, (uintptr_t)dst, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT, "detached, bypass 0: refused (STATUS %u)", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                 (uintptr_t)src, "detached");
    check(!(vio_r32(&v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET), "device never asked for a reset");
}

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("virtio_iommu_smoke: virtio-mmio slot 0, endpoint 2 (dma2)");
    transport();
    config();
    probe();
    dma();
    vio_w32(&v, VIRTIO_MMIO_STATUS, 0);
    return finish();
}
