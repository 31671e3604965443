/*
 * pasid.h: PASID tables on the virtio-iommu (DESIGN.md section 6), guest side.
 *
 * Three pieces, shaped like the Linux code the 2021 RFC "iommu: Add a simple PASID table
 * library" was written against:
 *   - the ATTACH_TABLE / INVALIDATE requests and the PASID fault record (the lab's numbers);
 *   - a tiny io-pgtable-arm style stage-1 table (4 KiB granule, 39-bit VA, 4 KiB pages and
 *     2 MiB blocks) whose TTBR goes into a context descriptor;
 *   - the PASID-table library: ops alloc / free / prepare(pgtbl_cfg, asid) / write(ssid) /
 *     sync(ssid, leaf) over an SMMUv3 CD table (linear, or two-level with 4 KiB or 64 KiB
 *     leaves allocated on first use), like arm-smmu-v3-cd-lib.c of the RFC. The table lives in
 *     guest RAM at guest-physical addresses; sync sends INVALIDATE, as the driver's CFGI_CD.
 */
#ifndef IOMMU_LAB_PASID_H
#define IOMMU_LAB_PASID_H

#include "virtio.h"

/* ---- requests, properties, fault flag ---------------------------------------------------- */
#define VIRTIO_IOMMU_T_ATTACH_TABLE     6
#define VIRTIO_IOMMU_T_INVALIDATE       7

#define VIRTIO_IOMMU_PROBE_T_OUTPUT_SIZE     4
#define VIRTIO_IOMMU_PROBE_T_PASID_SIZE      5
#define VIRTIO_IOMMU_PROBE_T_PAGE_TABLE_FMT  6
#define VIRTIO_IOMMU_PROBE_T_PASID_TABLE_FMT 7
#define VIRTIO_IOMMU_PGTF_ARM_LPAE      1
#define VIRTIO_IOMMU_PSTF_ARM_SMMU_V3   2

#define VIRTIO_IOMMU_S1FMT_LINEAR       0
#define VIRTIO_IOMMU_S1FMT_4KL2         1
#define VIRTIO_IOMMU_S1FMT_64KL2        2
#define VIRTIO_IOMMU_S1DSS_TERMINATE    0
#define VIRTIO_IOMMU_S1DSS_BYPASS       1
#define VIRTIO_IOMMU_S1DSS_SSID0        2

#define VIRTIO_IOMMU_INV_G_DOMAIN       (1u << 0)
#define VIRTIO_IOMMU_INV_G_PASID        (1u << 1)
#define VIRTIO_IOMMU_INV_G_VA           (1u << 2)
#define VIRTIO_IOMMU_INVAL_T_IOTLB      (1u << 0)
#define VIRTIO_IOMMU_INVAL_T_DEV_IOTLB  (1u << 1)
#define VIRTIO_IOMMU_INVAL_T_PASID      (1u << 2)
#define VIRTIO_IOMMU_INVAL_F_PASID      (1u << 0)
#define VIRTIO_IOMMU_INVAL_F_ARCHID     (1u << 1)
#define VIRTIO_IOMMU_INVAL_F_LEAF       (1u << 2)

#define VIRTIO_IOMMU_FAULT_F_PASID      (1u << 9)

struct virtio_iommu_req_attach_table {
    struct virtio_iommu_req_head head;
    uint32_t domain;
    uint32_t endpoint;
    uint16_t format;
    uint8_t s1fmt;
    uint8_t s1dss;
    uint64_t s1contextptr;
    uint32_t s1cdmax;
    uint8_t reserved[48];
    struct virtio_iommu_req_tail tail;
} __attribute__((packed));

struct virtio_iommu_req_invalidate {
    struct virtio_iommu_req_head head;
    uint16_t inv_gran;
    uint16_t inv_type;
    uint16_t flags;
    uint8_t reserved[2];
    uint32_t domain;
    uint32_t pasid;
    uint8_t reserved2[4];
    uint64_t archid;
    uint64_t virt_start;
    uint64_t nr_pages;
    uint8_t granule;
    uint8_t reserved3[11];
    struct virtio_iommu_req_tail tail;
} __attribute__((packed));

struct virtio_iommu_fault_pasid {          /* struct virtio_iommu_fault with the PASID at 12 */
    uint8_t reason;
    uint8_t reserved[3];
    uint32_t flags;
    uint32_t endpoint;
    uint32_t pasid;
    uint64_t address;
};

_Static_assert(sizeof(struct virtio_iommu_req_attach_table) == 80, "attach_table layout");
_Static_assert(sizeof(struct virtio_iommu_req_invalidate) == 64, "invalidate layout");
_Static_assert(sizeof(struct virtio_iommu_fault_pasid) == 24, "fault layout");

static inline int viommu_attach_table(struct viommu *v, uint32_t domain, uint32_t endpoint, uint8_t s1fmt,
                                      uint8_t s1dss, uint64_t ptr, uint32_t cdmax)
{
    struct virtio_iommu_req_attach_table r = { .head.type = VIRTIO_IOMMU_T_ATTACH_TABLE, .domain = domain,
                                               .endpoint = endpoint, .format = VIRTIO_IOMMU_PSTF_ARM_SMMU_V3,
                                               .s1fmt = s1fmt, .s1dss = s1dss, .s1contextptr = ptr,
                                               .s1cdmax = cdmax };
    r.tail.status = 0xff;
    if (viommu_send(v, &r, sizeof(r) - sizeof(r.tail), &r.tail, sizeof(r.tail)) != sizeof(r.tail))
        return -1;
    return r.tail.status;
}

static inline int viommu_send_raw(struct viommu *v, void *req, uint32_t size)
{
    uint8_t *tail = (uint8_t *)req + size - 4;
    tail[0] = 0xff;
    if (viommu_send(v, req, size - 4, tail, 4) != 4)
        return -1;
    return tail[0];
}

static inline int viommu_invalidate(struct viommu *v, struct virtio_iommu_req_invalidate *r)
{
    r->head.type = VIRTIO_IOMMU_T_INVALIDATE;
    return viommu_send_raw(v, r, sizeof(*r));
}

/* ---- an io-pgtable-arm style stage 1: 4 KiB granule, 39-bit VA (levels 1..3) ---------------- */
#define S1_IAS              39
#define ARM_LPAE_PTE_VALID  (1ull << 0)
#define ARM_LPAE_PTE_TABLE  (1ull << 1)           /* table at L1/L2, page at L3 */
#define ARM_LPAE_PTE_AF     (1ull << 10)
#define ARM_LPAE_PTE_SH_IS  (3ull << 8)
#define ARM_LPAE_PTE_AP_UNPRIV (1ull << 6)
#define ARM_LPAE_PTE_AP_RDONLY (1ull << 7)
#define ARM_LPAE_PTE_nG     (1ull << 11)
#define ARM_LPAE_PTE_ADDR   0x0000FFFFFFFFF000ull
#define IOMMU_READ          1
#define IOMMU_WRITE         2
#define SZ_4K               0x1000ull
#define SZ_2M               0x200000ull

struct io_pgtable_cfg {                        /* what prepare() needs of a stage-1 table */
    uint64_t ttbr;
    uint32_t ias, oas;
};

struct io_pgtable {
    struct io_pgtable_cfg cfg;
    uint64_t *pgd;                             /* level 1: 512 entries */
};

static inline uint64_t *s1_table(void)
{
    return alloc_pages(1);                     /* zeroed by the runtime's allocator contract */
}

static inline int s1_init(struct io_pgtable *pt)
{
    pt->pgd = s1_table();
    if (!pt->pgd)
        return -1;
    memset(pt->pgd, 0, PAGE_SIZE);
    pt->cfg.ttbr = (uintptr_t)pt->pgd;
    pt->cfg.ias = S1_IAS;
    pt->cfg.oas = 40;
    return 0;
}

static inline uint64_t s1_prot(int prot)
{
    uint64_t pte = ARM_LPAE_PTE_AF | ARM_LPAE_PTE_SH_IS | ARM_LPAE_PTE_nG | ARM_LPAE_PTE_AP_UNPRIV;
    if (!(prot & IOMMU_WRITE))
        pte |= ARM_LPAE_PTE_AP_RDONLY;
    return pte;
}

/* The entry for iova at level lvl (1..3), creating tables on the way. */
static inline uint64_t *s1_entry(struct io_pgtable *pt, uint64_t iova, int lvl)
{
    uint64_t *table = pt->pgd;
    for (int l = 1; l < lvl; l++) {
        uint64_t *e = &table[(iova >> (39 - 9 * l)) & 511];
        if (!(*e & ARM_LPAE_PTE_VALID)) {
            uint64_t *next = s1_table();
            if (!next)
                return 0;
            memset(next, 0, PAGE_SIZE);
            *e = (uintptr_t)next | ARM_LPAE_PTE_VALID | ARM_LPAE_PTE_TABLE;
        }
        table = (uint64_t *)(uintptr_t)(*e & ARM_LPAE_PTE_ADDR);
    }
    return &table[(iova >> (39 - 9 * lvl)) & 511];
}

/* map one 4 KiB page or 2 MiB block */
static inline int s1_map(struct io_pgtable *pt, uint64_t iova, uint64_t pa, uint64_t size, int prot)
{
    uint64_t *e = s1_entry(pt, iova, size == SZ_2M ? 2 : 3);
    if (!e || (*e & ARM_LPAE_PTE_VALID))
        return -1;
    *e = (pa & ARM_LPAE_PTE_ADDR) | s1_prot(prot) | ARM_LPAE_PTE_VALID | (size == SZ_2M ? 0 : ARM_LPAE_PTE_TABLE);
    return 0;
}

static inline void s1_unmap(struct io_pgtable *pt, uint64_t iova, uint64_t size)
{
    uint64_t *e = s1_entry(pt, iova, size == SZ_2M ? 2 : 3);
    if (e)
        *e = 0;
}

/* ---- the PASID-table library over an SMMUv3 CD table -------------------------------------- */
#define CTXDESC_CD_DWORDS       8
#define CTXDESC_CD_0_TCR_T0SZ(x) ((uint64_t)(x) & 0x3f)
#define CTXDESC_CD_0_TCR_TG0_4K (0ull << 6)
#define CTXDESC_CD_0_TCR_EPD0   (1ull << 14)
#define CTXDESC_CD_0_ENDI       (1ull << 15)
#define CTXDESC_CD_0_V          (1ull << 31)
#define CTXDESC_CD_0_TCR_IPS(x) ((uint64_t)(x) << 32)
#define CTXDESC_CD_0_AFFD       (1ull << 35)
#define CTXDESC_CD_0_AA64       (1ull << 41)
#define CTXDESC_CD_0_ASID(x)    ((uint64_t)(x) << 48)
#define CTXDESC_CD_1_TTB0_MASK  0x000FFFFFFFFFFFF0ull
#define CTXDESC_L1_DESC_V       1ull
#define CTXDESC_L1_DESC_L2PTR_MASK 0x000FFFFFFFFFF000ull
#define PASID_MAX_L1            1024

enum pasid_table_fmt { PASID_TABLE_ARM_SMMU_V3 };

struct arm_smmu_s1_cfg {                       /* what prepare() fills and write() copies into a CD */
    uint64_t cd0, cd1;
};

struct iommu_vendor_psdtable_cfg {
    enum pasid_table_fmt fmt;
    uint64_t base;                              /* the table's guest-physical ("DMA") address */
    uint8_t s1fmt;
    uint32_t s1cdmax;
    uint64_t *linear;                           /* 2^s1cdmax CDs */
    uint64_t *l1;                               /* two-level: L1 descriptors */
    uint64_t *l2[PASID_MAX_L1];                 /* leaves, allocated on first write */
    struct arm_smmu_s1_cfg s1_cfg;
};

struct iommu_pasid_table;
struct iommu_vendor_psdtable_ops {
    int (*alloc)(struct iommu_vendor_psdtable_cfg *cfg);
    void (*free)(struct iommu_vendor_psdtable_cfg *cfg);
    void (*prepare)(struct iommu_vendor_psdtable_cfg *cfg, struct io_pgtable_cfg *pgtbl_cfg, uint32_t asid);
    int (*write)(struct iommu_vendor_psdtable_cfg *cfg, int ssid, void *cookie);
    void (*sync)(void *cookie, int ssid, int leaf);
};

struct iommu_pasid_table {                      /* the cookie the ops get back */
    struct viommu *v;
    uint32_t domain;
    struct iommu_vendor_psdtable_cfg cfg;
    const struct iommu_vendor_psdtable_ops *ops;
    int last_sync;                              /* status of the last INVALIDATE sync() sent */
};

static inline unsigned cd_split(const struct iommu_vendor_psdtable_cfg *cfg)
{
    return cfg->s1fmt == VIRTIO_IOMMU_S1FMT_4KL2 ? 6 : 10;
}

/* n pages aligned to align bytes (the runtime hands out 4 KiB-aligned pages) */
static inline void *alloc_aligned(size_t bytes, size_t align)
{
    size_t pages = (bytes + PAGE_SIZE - 1) / PAGE_SIZE + (align > PAGE_SIZE ? align / PAGE_SIZE - 1 : 0);
    uint8_t *p = alloc_pages(pages);
    if (!p)
        return 0;
    uintptr_t a = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    memset((void *)a, 0, bytes);
    return (void *)a;
}

static inline int arm_smmu_cd_alloc(struct iommu_vendor_psdtable_cfg *cfg)
{
    if (cfg->s1fmt == VIRTIO_IOMMU_S1FMT_LINEAR) {
        size_t size = 64ull << cfg->s1cdmax;
        cfg->linear = alloc_aligned(size, size < 64 ? 64 : size);
        cfg->base = (uintptr_t)cfg->linear;
        return cfg->linear ? 0 : -1;
    }
    unsigned split = cd_split(cfg);
    size_t n = cfg->s1cdmax > split ? 1ull << (cfg->s1cdmax - split) : 1;
    if (n > PASID_MAX_L1)
        return -1;
    cfg->l1 = alloc_aligned(8 * n, 8 * n < 64 ? 64 : 8 * n);
    cfg->base = (uintptr_t)cfg->l1;
    return cfg->l1 ? 0 : -1;
}

static inline void arm_smmu_cd_free(struct iommu_vendor_psdtable_cfg *cfg)
{
    cfg->linear = 0;                            /* the runtime never frees pages */
    cfg->l1 = 0;
}

/* The CD fields for a stage-1 table, as arm_smmu_write_ctx_desc builds them. */
static inline void arm_smmu_cd_prepare(struct iommu_vendor_psdtable_cfg *cfg, struct io_pgtable_cfg *pgtbl_cfg,
                                       uint32_t asid)
{
    cfg->s1_cfg.cd0 = CTXDESC_CD_0_TCR_T0SZ(64 - pgtbl_cfg->ias) | CTXDESC_CD_0_TCR_TG0_4K | CTXDESC_CD_0_V |
                      CTXDESC_CD_0_TCR_IPS(2) | CTXDESC_CD_0_AA64 | CTXDESC_CD_0_ASID(asid);
    cfg->s1_cfg.cd1 = pgtbl_cfg->ttbr & CTXDESC_CD_1_TTB0_MASK;
}

static inline uint64_t *arm_smmu_cd_ptr(struct iommu_vendor_psdtable_cfg *cfg, int ssid)
{
    if (cfg->s1fmt == VIRTIO_IOMMU_S1FMT_LINEAR)
        return cfg->linear + (size_t)ssid * CTXDESC_CD_DWORDS;
    unsigned split = cd_split(cfg), idx = (unsigned)ssid >> split;
    if (!cfg->l2[idx]) {
        size_t leaf = 64ull << split;
        cfg->l2[idx] = alloc_aligned(leaf, leaf);
        if (!cfg->l2[idx])
            return 0;
        __asm__ volatile("" : : : "memory");     /* the leaf is zero before the L1 entry points at it */
        cfg->l1[idx] = ((uintptr_t)cfg->l2[idx] & CTXDESC_L1_DESC_L2PTR_MASK) | CTXDESC_L1_DESC_V;
    }
    return cfg->l2[idx] + (size_t)(ssid & ((1 << split) - 1)) * CTXDESC_CD_DWORDS;
}

/* Write the prepared CD at ssid (cookie NULL: clear it), dword 0 (with V) last. */
static inline int arm_smmu_cd_write(struct iommu_vendor_psdtable_cfg *cfg, int ssid, void *cookie)
{
    if (ssid < 0 || (uint32_t)ssid >= (1u << cfg->s1cdmax))
        return -1;
    uint64_t *cd = arm_smmu_cd_ptr(cfg, ssid);
    if (!cd)
        return -1;
    volatile uint64_t *vcd = cd;
    if (!cookie) {
        vcd[0] = 0;
        return 0;
    }
    vcd[1] = cfg->s1_cfg.cd1;
    for (int i = 2; i < CTXDESC_CD_DWORDS; i++)
        vcd[i] = 0;
    __asm__ volatile("mfence" : : : "memory");
    vcd[0] = cfg->s1_cfg.cd0;
    return 0;
}

/* CFGI_CD: the device drops its cached CD of ssid (and, not leaf, the ASID's translations). */
static inline void arm_smmu_cd_sync(void *cookie, int ssid, int leaf)
{
    struct iommu_pasid_table *tbl = cookie;
    struct virtio_iommu_req_invalidate r = { .inv_gran = VIRTIO_IOMMU_INV_G_PASID,
                                             .inv_type = VIRTIO_IOMMU_INVAL_T_PASID |
                                                         (leaf ? 0 : VIRTIO_IOMMU_INVAL_T_IOTLB),
                                             .flags = VIRTIO_IOMMU_INVAL_F_PASID |
                                                      (leaf ? VIRTIO_IOMMU_INVAL_F_LEAF : 0),
                                             .domain = tbl->domain, .pasid = (uint32_t)ssid };
    tbl->last_sync = viommu_invalidate(tbl->v, &r);
}

static const struct iommu_vendor_psdtable_ops arm_cd_table_ops = {
    .alloc = arm_smmu_cd_alloc, .free = arm_smmu_cd_free, .prepare = arm_smmu_cd_prepare,
    .write = arm_smmu_cd_write, .sync = arm_smmu_cd_sync,
};

/* The library's wrappers (iommu-pasid-table.h of the RFC). */
static inline int iommu_psdtable_alloc(struct iommu_pasid_table *tbl, struct iommu_vendor_psdtable_cfg *cfg)
{
    return tbl->ops->alloc ? tbl->ops->alloc(cfg) : -1;
}

static inline void iommu_psdtable_free(struct iommu_pasid_table *tbl, struct iommu_vendor_psdtable_cfg *cfg)
{
    if (tbl->ops->free)
        tbl->ops->free(cfg);
}

static inline int iommu_psdtable_prepare(struct iommu_pasid_table *tbl, struct iommu_vendor_psdtable_cfg *cfg,
                                         struct io_pgtable_cfg *pgtbl_cfg, uint32_t asid)
{
    if (!tbl->ops->prepare)
        return -1;
    tbl->ops->prepare(cfg, pgtbl_cfg, asid);
    return 0;
}

static inline int iommu_psdtable_write(struct iommu_pasid_table *tbl, struct iommu_vendor_psdtable_cfg *cfg,
                                       int ssid, void *cookie)
{
    return tbl->ops->write ? tbl->ops->write(cfg, ssid, cookie) : -1;
}

static inline int iommu_psdtable_sync(struct iommu_pasid_table *tbl, void *cookie, int ssid, int leaf)
{
    if (!tbl->ops->sync)
        return -1;
    tbl->ops->sync(cookie, ssid, leaf);
    return 0;
}

/* TLB maintenance for a stage-1 edit (io-pgtable's tlb_flush_walk / tlb_add_page). */
static inline int pasid_tlb_inv_range(struct iommu_pasid_table *tbl, uint32_t asid, uint64_t iova, uint64_t size)
{
    struct virtio_iommu_req_invalidate r = { .inv_gran = VIRTIO_IOMMU_INV_G_VA,
                                             .inv_type = VIRTIO_IOMMU_INVAL_T_IOTLB,
                                             .flags = VIRTIO_IOMMU_INVAL_F_ARCHID | VIRTIO_IOMMU_INVAL_F_LEAF,
                                             .domain = tbl->domain, .archid = asid, .virt_start = iova,
                                             .nr_pages = size >> 12, .granule = 12 };
    return viommu_invalidate(tbl->v, &r);
}

/* ---- the master's PASID ------------------------------------------------------------------- */
static inline void dma_set_pasid(unsigned n, int pasid)
{
    mmio_write32(DMA_ENGINE(n) + DMA_PASID, pasid < 0 ? 0 : (DMA_PASID_VALID | (uint32_t)pasid));
}

#endif
