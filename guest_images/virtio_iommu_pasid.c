/*
 * virtio_iommu_pasid: PASID tables on the virtio-iommu (DESIGN.md section 6).
 *
 * The guest negotiates F_ATTACH_TABLE, builds SMMUv3 CD tables with the PASID-table library
 * of include/pasid.h (linear, two-level with 4 KiB leaves, two-level with 64 KiB leaves), gives
 * four PASIDs their own io-pgtable-style stage-1 tables (4 KiB pages and 2 MiB blocks), hands the
 * table over with ATTACH_TABLE and drives dma2 with and without a PASID under each s1dss. It
 * checks isolation between PASIDs, fault events carrying their PASID, that a stage-1 edit stays
 * invisible until INVALIDATE, and the error statuses. Exit status = failed checks.
 */
#include "runtime.h"
#include "board.h"
#include "dma.h"
#include "pasid.h"

#define EP          DMA2_VIOMMU_ENDPOINT
#define DMA         2
#define DOM         5
#define NPASID      4
#define IOVA_SRC    0x40000000ULL            /* 4 KiB pages, read-only */
#define IOVA_DST    0x80000000ULL            /* one 2 MiB block, read-write */
#define LEN         0x2000u

static struct viommu v;
static uint8_t *block;                       /* 2 MiB aligned, shared destination of every PASID */

static int next_fault(struct virtio_iommu_fault_pasid *f)
{
    uint32_t len = 0;
    int got = viommu_next_fault(&v, (struct virtio_iommu_fault *)f, &len);
    return got && len == sizeof(*f);
}

static void expect_fault(uint8_t reason, uint32_t flags, uint32_t pasid, uint64_t addr, const char *what)
{
    struct virtio_iommu_fault_pasid f;
    int got = next_fault(&f);
    check(got && f.reason == reason && f.flags == flags && f.endpoint == EP && f.pasid == pasid && f.address == addr,
          "%s: event reason %u flags 0x%x pasid %u addr 0x%llx", what, got ? f.reason : 0xff, got ? f.flags : 0,
          got ? f.pasid : 0, got ? (unsigned long long)f.address : 0ULL);
    check(!next_fault(&f), "%s: exactly one event", what);
}

static uint32_t copy(int pasid, uint64_t src, uint64_t dst, uint32_t len, uint64_t *fa)
{
    dma_set_pasid(DMA, pasid);
    uint32_t st = dma_copy(DMA, src, dst, len, fa);
    dma_set_pasid(DMA, -1);
    return st;
}

static void probe(void)
{
    section("PROBE with F_ATTACH_TABLE");
    struct virtio_iommu_req_probe r = { .head.type = VIRTIO_IOMMU_T_PROBE, .endpoint = EP };
    uint8_t *out = v.probe_buf;
    uint32_t len = viommu_send(&v, &r, sizeof(r), out, 512 + 4);
    check(len == 516 && out[512] == VIRTIO_IOMMU_S_OK, "PROBE: used length %u, status %u", len, out[512]);
    static const uint8_t want[32] = { 4, 0, 4, 0, 40, 0, 0, 0,   5, 0, 4, 0, 20, 0, 0, 0,
                                      6, 0, 4, 0, 1, 0, 0, 0,    7, 0, 4, 0, 2, 0, 0, 0 };
    check(out[0] == VIRTIO_IOMMU_PROBE_T_RESV_MEM, "RESV_MEM first");
    check(memcmp(out + 24, want, sizeof(want)) == 0, "OUTPUT_SIZE 40, PASID_SIZE 20, PAGE_TABLE_FMT 1, "
          "PASID_TABLE_FMT 2");
    unsigned nz = 0;
    for (unsigned i = 56; i < 512; i++)
        nz += out[i] != 0;
    check(nz == 0, "nothing after them (%u non-zero)", nz);
}

/* One CD-table format end to end. */
static void table_format(uint8_t s1fmt, uint32_t cdmax, const int pasids[NPASID], const char *name)
{
    static struct iommu_pasid_table tbl;
    static struct io_pgtable pt[NPASID];
    uint8_t *src[NPASID];
    uint64_t fa = 0;
    uint32_t st;

    section(name);
    memset(&tbl, 0, sizeof(tbl));
    tbl.v = &v;
    tbl.domain = DOM;
    tbl.ops = &arm_cd_table_ops;
    tbl.cfg.fmt = PASID_TABLE_ARM_SMMU_V3;
    tbl.cfg.s1fmt = s1fmt;
    tbl.cfg.s1cdmax = cdmax;
    int allocated = iommu_psdtable_alloc(&tbl, &tbl.cfg) == 0;
    check(allocated, "alloc: table at 0x%llx", (unsigned long long)tbl.cfg.base);

    for (int k = 0; k < NPASID; k++) {
        src[k] = alloc_pages(LEN / PAGE_SIZE);
        for (unsigned i = 0; i < LEN; i++)
            src[k][i] = (uint8_t)(i * 13 + 29 * k + 1);
        int ok = s1_init(&pt[k]) == 0;
        for (uint64_t off = 0; ok && off < LEN; off += SZ_4K)
            ok = s1_map(&pt[k], IOVA_SRC + off, (uintptr_t)src[k] + off, SZ_4K, IOMMU_READ) == 0;
        ok = ok && s1_map(&pt[k], IOVA_DST, (uintptr_t)block, SZ_2M, IOMMU_READ | IOMMU_WRITE) == 0;
        ok = ok && iommu_psdtable_prepare(&tbl, &tbl.cfg, &pt[k].cfg, 100 + k) == 0;
        ok = ok && iommu_psdtable_write(&tbl, &tbl.cfg, pasids[k], &tbl) == 0;
        check(ok, "PASID %d: stage-1 table at 0x%llx (4 KiB pages + a 2 MiB block), CD written, ASID %d",
              pasids[k], (unsigned long long)pt[k].cfg.ttbr, 100 + k);
    }

    /* s1dss terminate: DMA without a PASID is a DOMAIN fault, no PASID flag */
    check(viommu_attach_table(&v, DOM, EP, s1fmt, VIRTIO_IOMMU_S1DSS_TERMINATE, tbl.cfg.base, cdmax) ==
          VIRTIO_IOMMU_S_OK, "ATTACH_TABLE s1fmt %u s1cdmax %u s1dss terminate", s1fmt, cdmax);
    st = copy(-1, IOVA_SRC, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT && fa == IOVA_SRC, "no PASID, terminate: STATUS %u at 0x%llx", st,
          (unsigned long long)fa);
    expect_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS, 0, IOVA_SRC,
                 "terminate");

    /* every PASID reads its own source and writes its slice of the shared 2 MiB block */
    for (int k = 0; k < NPASID; k++) {
        uint64_t dst = IOVA_DST + 0x10000ULL * (uint64_t)k + 0x100000;
        st = copy(pasids[k], IOVA_SRC + 8, dst, LEN - 8, &fa);
        check(st == DMA_STATUS_OK && memcmp(block + (dst - IOVA_DST), src[k] + 8, LEN - 8) == 0,
              "PASID %d: copy %u bytes through CD -> stage 1 -> P2M (STATUS %u)", pasids[k], LEN - 8, st);
    }

    /* isolation: an IOVA only PASID 0 maps is a MAPPING fault for PASID 1, reported with PASID 1 */
    check(s1_map(&pt[0], IOVA_SRC + 0x100000, (uintptr_t)src[0], SZ_4K, IOMMU_READ) == 0, "PASID %d maps one more page",
          pasids[0]);
    st = copy(pasids[0], IOVA_SRC + 0x100000, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_OK, "PASID %d reads it (STATUS %u)", pasids[0], st);
    st = copy(pasids[1], IOVA_SRC + 0x100000, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT && fa == IOVA_SRC + 0x100000, "PASID %d does not: STATUS %u at 0x%llx",
          pasids[1], st, (unsigned long long)fa);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS |
                 VIRTIO_IOMMU_FAULT_F_PASID, (uint32_t)pasids[1], IOVA_SRC + 0x100000, "isolation");
    st = copy(pasids[2], IOVA_DST, IOVA_SRC, 64, &fa);
    check(st == DMA_STATUS_PERM_FAULT && fa == IOVA_SRC, "write to a read-only page: STATUS %u", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS |
                 VIRTIO_IOMMU_FAULT_F_PASID, (uint32_t)pasids[2], IOVA_SRC, "read-only");

    /* stale until INVALIDATE: re-point PASID 3's first source page without telling the device */
    uint64_t probe_dst = IOVA_DST + 0x1F0000;
    st = copy(pasids[3], IOVA_SRC, probe_dst, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block + 0x1F0000, src[3], 64) == 0, "PASID %d: translation cached",
          pasids[3]);
    s1_unmap(&pt[3], IOVA_SRC, SZ_4K);
    check(s1_map(&pt[3], IOVA_SRC, (uintptr_t)src[0], SZ_4K, IOMMU_READ) == 0, "stage-1 PTE re-pointed");
    st = copy(pasids[3], IOVA_SRC, probe_dst, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block + 0x1F0000, src[3], 64) == 0,
          "without INVALIDATE the old translation is still used (as on SMMUv3)");
    check(pasid_tlb_inv_range(&tbl, 103, IOVA_SRC, SZ_4K) == VIRTIO_IOMMU_S_OK, "INVALIDATE VA (ASID 103)");
    st = copy(pasids[3], IOVA_SRC, probe_dst, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block + 0x1F0000, src[0], 64) == 0, "after INVALIDATE the new one");

    /* a CD rewritten (other stage 1, other ASID) counts only after sync(), i.e. INVALIDATE PASID */
    iommu_psdtable_prepare(&tbl, &tbl.cfg, &pt[1].cfg, 201);
    iommu_psdtable_write(&tbl, &tbl.cfg, pasids[3], &tbl);
    st = copy(pasids[3], IOVA_SRC + 0x100000, probe_dst, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT, "the cached CD still rules (STATUS %u)", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS |
                 VIRTIO_IOMMU_FAULT_F_PASID, (uint32_t)pasids[3], IOVA_SRC + 0x100000, "stale CD");
    iommu_psdtable_sync(&tbl, &tbl, pasids[3], 1);
    check(tbl.last_sync == VIRTIO_IOMMU_S_OK, "sync(ssid %d, leaf): INVALIDATE PASID", pasids[3]);
    st = copy(pasids[3], IOVA_SRC + 8, probe_dst, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block + 0x1F0000, src[1] + 8, 64) == 0, "now PASID %d uses PASID %d's table",
          pasids[3], pasids[1]);

    /* configuration faults: a PASID beyond s1cdmax, a cleared CD */
    st = copy((int)(1u << cdmax), IOVA_SRC, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT, "PASID 2^s1cdmax: STATUS %u", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS |
                 VIRTIO_IOMMU_FAULT_F_PASID, 1u << cdmax, IOVA_SRC, "PASID out of range");
    iommu_psdtable_write(&tbl, &tbl.cfg, pasids[2], 0);
    iommu_psdtable_sync(&tbl, &tbl, pasids[2], 0);
    st = copy(pasids[2], IOVA_SRC, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT, "cleared CD: STATUS %u", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS |
                 VIRTIO_IOMMU_FAULT_F_PASID, (uint32_t)pasids[2], IOVA_SRC, "invalid CD");

    /* s1dss bypass: no PASID means the IOVA is a guest-physical address */
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH (the domain goes)");
    check(viommu_attach_table(&v, DOM, EP, s1fmt, VIRTIO_IOMMU_S1DSS_BYPASS, tbl.cfg.base, cdmax) ==
          VIRTIO_IOMMU_S_OK, "ATTACH_TABLE s1dss bypass");
    memset(block, 0, 64);
    st = copy(-1, (uintptr_t)src[2], (uintptr_t)block, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block, src[2], 64) == 0, "no PASID, bypass: GPA copy (STATUS %u)", st);
    st = copy(pasids[0], IOVA_SRC, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block, src[0], 64) == 0, "with a PASID: still translated");

    /* s1dss SSID0: no PASID means CD 0 */
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH");
    iommu_psdtable_prepare(&tbl, &tbl.cfg, &pt[1].cfg, 300);
    iommu_psdtable_write(&tbl, &tbl.cfg, 0, &tbl);
    check(viommu_attach_table(&v, DOM, EP, s1fmt, VIRTIO_IOMMU_S1DSS_SSID0, tbl.cfg.base, cdmax) ==
          VIRTIO_IOMMU_S_OK, "ATTACH_TABLE s1dss CD 0");
    memset(block, 0, 64);
    st = copy(-1, IOVA_SRC + 16, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_OK && memcmp(block, src[1] + 16, 64) == 0, "no PASID: CD 0's stage 1 (STATUS %u)", st);
    st = copy(-1, IOVA_SRC + 0x100000, IOVA_DST, 64, &fa);
    check(st == DMA_STATUS_XLATE_FAULT, "no PASID, unmapped in CD 0: STATUS %u", st);
    expect_fault(VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS, 0,
                 IOVA_SRC + 0x100000, "CD 0, no PASID flag");
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH");
    iommu_psdtable_free(&tbl, &tbl.cfg);
}

static void errors(void)
{
    static uint64_t table[8] __attribute__((aligned(4096)));
    uint64_t t = (uintptr_t)table;
    struct virtio_iommu_req_invalidate inv;

    section("request statuses");
    check(viommu_attach_table(&v, DOM, EP, 3, 0, t, 2) == VIRTIO_IOMMU_S_INVAL, "s1fmt 3: INVAL");
    check(viommu_attach_table(&v, DOM, EP, 0, 3, t, 2) == VIRTIO_IOMMU_S_INVAL, "s1dss 3: INVAL");
    check(viommu_attach_table(&v, DOM, EP, 0, 0, t, 21) == VIRTIO_IOMMU_S_INVAL, "s1cdmax 21: INVAL");
    check(viommu_attach_table(&v, DOM, EP, 0, 0, t + 128, 2) == VIRTIO_IOMMU_S_INVAL, "unaligned table: INVAL");
    check(viommu_attach_table(&v, DOM, EP, 0, 0, VIRTIO_MMIO_BASE, 2) == VIRTIO_IOMMU_S_INVAL,
          "table outside RAM: INVAL");
    check(viommu_attach_table(&v, DOM, 444, 0, 0, t, 2) == VIRTIO_IOMMU_S_NOENT, "unknown endpoint: NOENT");
    {
        struct virtio_iommu_req_attach_table r = { .head.type = VIRTIO_IOMMU_T_ATTACH_TABLE, .domain = DOM,
                                                   .endpoint = EP, .format = 1, .s1contextptr = t, .s1cdmax = 2 };
        check(viommu_send_raw(&v, &r, sizeof(r)) == VIRTIO_IOMMU_S_INVAL, "format 1: INVAL");
        r.format = VIRTIO_IOMMU_PSTF_ARM_SMMU_V3;
        r.reserved[47] = 1;
        check(viommu_send_raw(&v, &r, sizeof(r)) == VIRTIO_IOMMU_S_INVAL, "reserved byte: INVAL");
    }
    check(viommu_attach(&v, DOM + 1, EP, 0) == VIRTIO_IOMMU_S_OK, "ATTACH a normal domain");
    check(viommu_attach_table(&v, DOM + 1, EP, 0, 0, t, 2) == VIRTIO_IOMMU_S_INVAL, "ATTACH_TABLE to it: INVAL");
    memset(&inv, 0, sizeof(inv));
    inv.inv_gran = VIRTIO_IOMMU_INV_G_DOMAIN;
    inv.domain = DOM + 1;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_INVAL, "INVALIDATE a normal domain: INVAL");
    check(viommu_attach_table(&v, DOM, EP, 0, 0, t, 2) == VIRTIO_IOMMU_S_OK, "ATTACH_TABLE moves the endpoint");
    check(viommu_attach_table(&v, DOM, EP, 0, 0, t, 2) == VIRTIO_IOMMU_S_OK, "the same table again: OK");
    check(viommu_attach_table(&v, DOM, EP, 0, 1, t, 2) == VIRTIO_IOMMU_S_INVAL, "another table: INVAL");
    check(viommu_attach(&v, DOM, EP, 0) == VIRTIO_IOMMU_S_INVAL, "ATTACH to a table domain: INVAL");
    check(viommu_map(&v, DOM, 0, PAGE_SIZE - 1, 0, VIRTIO_IOMMU_MAP_F_READ) == VIRTIO_IOMMU_S_INVAL, "MAP: INVAL");
    check(viommu_unmap(&v, DOM, 0, PAGE_SIZE - 1) == VIRTIO_IOMMU_S_INVAL, "UNMAP: INVAL");
    inv.domain = DOM;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_OK, "INVALIDATE domain: OK");
    inv.inv_gran = VIRTIO_IOMMU_INV_G_DOMAIN | VIRTIO_IOMMU_INV_G_PASID;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_INVAL, "two granularities: INVAL");
    inv.inv_gran = VIRTIO_IOMMU_INV_G_PASID;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_INVAL, "granule PASID without a PASID: INVAL");
    inv.inv_gran = VIRTIO_IOMMU_INV_G_VA;
    inv.flags = VIRTIO_IOMMU_INVAL_F_ARCHID;
    inv.nr_pages = 1;
    inv.granule = 31;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_INVAL, "granule 2^31: INVAL");
    inv.granule = 12;
    inv.inv_type = 1u << 5;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_INVAL, "unknown type bit: INVAL");
    inv.inv_type = VIRTIO_IOMMU_INVAL_T_IOTLB;
    inv.domain = 999;
    check(viommu_invalidate(&v, &inv) == VIRTIO_IOMMU_S_NOENT, "unknown domain: NOENT");
    check(viommu_detach(&v, DOM, EP) == VIRTIO_IOMMU_S_OK, "DETACH");
    check(viommu_detach(&v, DOM + 1, EP) == VIRTIO_IOMMU_S_INVAL, "the normal domain went when the endpoint left");
}

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("virtio_iommu_pasid: PASID tables on virtio-iommu endpoint 2 (dma2)");
    uint64_t feats = ((uint64_t)VIRTIO_IOMMU_FEATURES_HI << 32) | VIRTIO_IOMMU_FEATURES_LO |
                     (1u << VIRTIO_IOMMU_F_ATTACH_TABLE);
    int rc = viommu_init(&v, VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT), feats);
    check(rc == 0, "virtio-iommu up with F_ATTACH_TABLE (%d)", rc);
    if (rc)
        return finish();
    block = alloc_aligned(SZ_2M, SZ_2M);
    check(block != 0, "a 2 MiB-aligned block at %p", (void *)block);
    if (!block)
        return finish();
    probe();
    static const int linear[NPASID] = { 1, 2, 5, 9 };
    static const int l2_4k[NPASID] = { 1, 63, 64, 200 };
    static const int l2_64k[NPASID] = { 1, 1023, 1024, 3000 };
    table_format(VIRTIO_IOMMU_S1FMT_LINEAR, 4, linear, "linear CD table (16 CDs)");
    table_format(VIRTIO_IOMMU_S1FMT_4KL2, 8, l2_4k, "two-level CD table, 4 KiB leaves (256 CDs)");
    table_format(VIRTIO_IOMMU_S1FMT_64KL2, 12, l2_64k, "two-level CD table, 64 KiB leaves (4096 CDs)");
    errors();
    check(!(vio_r32(&v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET), "device never asked for a reset");
    vio_w32(&v, VIRTIO_MMIO_STATUS, 0);
    return finish();
}
