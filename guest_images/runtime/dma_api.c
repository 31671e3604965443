/*
 * The DMA API of include/dma_api.h: a bounce pool (swiotlb), per-master ops (IPMMU stage-1,
 * virtio-iommu MAP/UNMAP, direct) and the hyp calls that make them work on secure and
 * not-direct-mapped domains (DESIGN.md section 7).  Linked into a payload only if it uses it.
 */
#include "dma_api.h"

#define VIRTIO_ALLOC_PAGES(n)   dma_shared_pages(n)
#include "ipmmu.h"
#include "virtio.h"

#define TABLE_PAGES     32      /* IPMMU stage-1 tables (machine-contiguous, not shared) */
#define MAX_MAPPINGS    64
#define VIOMMU_DOMAIN   1
#define EIO             5

static int secure, direct, ready;

/* A machine-contiguous run of guest pages: guest-physical base, bus base, pages, allocation map. */
struct arena {
    uint8_t *phys;
    uint64_t bus;
    unsigned pages;
    uint8_t used[DMA_POOL_PAGES / 8];
};
static struct arena pool, tables;

struct mapping {
    struct device *dev;
    dma_addr_t addr;
    size_t size;
    void *orig;                 /* the CPU buffer (bounced mappings) */
    uint8_t *slot;              /* its pool pages, or NULL */
    unsigned slot_pages;
    int dir;
    int used;
};
static struct mapping maps[MAX_MAPPINGS];

static struct device devs[DMA_COUNT];
static struct lpae_pgtable pgtables[DMA_COUNT];
static struct viommu viommu;
static int viommu_up;

/* ---- small helpers ------------------------------------------------------------------------ */

static unsigned pages_of(uint64_t phys, size_t size)
{
    return (unsigned)(((phys & (PAGE_SIZE - 1)) + size + PAGE_SIZE - 1) / PAGE_SIZE);
}

/* First fit of n clear bits in a bitmap of total bits; -1 when none. */
static long bits_alloc(uint8_t *map, unsigned total, unsigned n)
{
    unsigned run = 0;
    for (unsigned i = 0; i < total; i++) {
        run = (map[i / 8] >> (i % 8)) & 1 ? 0 : run + 1;
        if (run == n) {
            unsigned first = i + 1 - n;
            for (unsigned j = first; j <= i; j++)
                map[j / 8] |= (uint8_t)(1u << (j % 8));
            return first;
        }
    }
    return -1;
}

static void bits_free(uint8_t *map, unsigned first, unsigned n)
{
    for (unsigned j = first; j < first + n; j++)
        map[j / 8] &= (uint8_t)~(1u << (j % 8));
}

uint32_t hyp_call(uint32_t cmd, uint64_t gpa, uint32_t pages, uint64_t *result)
{
    mmio_write64(HYP_BASE + HYP_GPA, gpa);
    mmio_write32(HYP_BASE + HYP_PAGES, pages);
    mmio_write32(HYP_BASE + HYP_CMD, cmd);
    if (result)
        *result = mmio_read64(HYP_BASE + HYP_RESULT);
    return mmio_read32(HYP_BASE + HYP_STATUS);
}

int dma_domain_secure(void)
{
    return (mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS) & SYSINFO_F_SECURE) != 0;
}

int dma_domain_direct(void)
{
    return (mmio_read32(SYSINFO_BASE + SYSINFO_FLAGS) & SYSINFO_F_DIRECT) != 0;
}

static int in_arena(const struct arena *a, uint64_t phys)
{
    return a->phys && phys >= (uintptr_t)a->phys && phys < (uintptr_t)a->phys + (uint64_t)a->pages * PAGE_SIZE;
}

uint64_t dma_phys_to_bus(uint64_t phys)
{
    uint64_t mpa = 0;
    if (direct)
        return phys;
    if (in_arena(&pool, phys))
        return pool.bus + (phys - (uintptr_t)pool.phys);
    if (in_arena(&tables, phys))
        return tables.bus + (phys - (uintptr_t)tables.phys);
    if (hyp_call(HYP_CMD_TRANSLATE, phys & ~(PAGE_SIZE - 1), 1, &mpa) != HYP_STATUS_OK)
        return DMA_MAPPING_ERROR;
    return mpa + (phys & (PAGE_SIZE - 1));
}

void *dma_shared_pages(size_t n)
{
    void *p = alloc_pages(n);
    if (p && secure && hyp_call(HYP_CMD_SHARE, (uintptr_t)p, (uint32_t)n, 0) != HYP_STATUS_OK)
        return 0;
    return p;
}

/* n pages, machine-contiguous below 4 GiB (exchanged when not direct-mapped), shared if asked. */
static int arena_init(struct arena *a, unsigned n, int share)
{
    a->phys = alloc_pages(n);
    a->pages = n;
    if (!a->phys)
        return -1;
    a->bus = (uintptr_t)a->phys;
    if (!direct) {
        mmio_write32(HYP_BASE + HYP_ADDR_BITS, 32);
        if (hyp_call(HYP_CMD_EXCHANGE, (uintptr_t)a->phys, n, &a->bus) != HYP_STATUS_OK)
            return -2;
    }
    if (share && secure && hyp_call(HYP_CMD_SHARE, (uintptr_t)a->phys, n, 0) != HYP_STATUS_OK)
        return -3;
    return 0;
}

static uint8_t *arena_alloc(struct arena *a, unsigned n)
{
    long first = bits_alloc(a->used, a->pages, n);
    if (first < 0)
        return 0;
    return memset(a->phys + (uint64_t)first * PAGE_SIZE, 0, (size_t)n * PAGE_SIZE);
}

static void arena_free(struct arena *a, uint8_t *p, unsigned n)
{
    bits_free(a->used, (unsigned)(((uintptr_t)p - (uintptr_t)a->phys) / PAGE_SIZE), n);
}

static void *table_alloc(void)
{
    return arena_alloc(&tables, 1);
}

static long iova_alloc(struct device *dev, unsigned n)
{
    long first = bits_alloc(dev->iova_used, DMA_IOVA_PAGES, n);
    return first < 0 ? -1 : (long)(dev->iova_base + (uint64_t)first * PAGE_SIZE);
}

static void iova_free(struct device *dev, uint64_t iova, unsigned n)
{
    bits_free(dev->iova_used, (unsigned)((iova - dev->iova_base) / PAGE_SIZE), n);
}

/* ---- ops: IPMMU stage 1 (the Linux ipmmu-vmsa driver's context and uTLB set-up) ---------- */

static void ipmmu_flush(struct device *dev)
{
    uint32_t v = ctx_read(IPMMU_MM_BASE, dev->ctx, IMCTR) | IMCTR_FLUSH;
    ctx_write(dev->cache, dev->ctx, IMCTR, v);
    ctx_write(IPMMU_MM_BASE, dev->ctx, IMCTR, v);
    for (int i = 0; i < 100 && (ctx_read(IPMMU_MM_BASE, dev->ctx, IMCTR) & IMCTR_FLUSH); i++)
        ;
}

static dma_addr_t ipmmu_map(struct device *dev, uint64_t phys, size_t size, int write)
{
    struct lpae_pgtable *pt = dev->pgtable;
    unsigned n = pages_of(phys, size);
    long iova = iova_alloc(dev, n);
    if (iova < 0)
        return DMA_MAPPING_ERROR;
    for (unsigned i = 0; i < n; i++) {
        uint64_t bus = dma_phys_to_bus((phys & ~(PAGE_SIZE - 1)) + (uint64_t)i * PAGE_SIZE);
        if (bus == DMA_MAPPING_ERROR ||
            lpae_map(pt, (uint64_t)iova + (uint64_t)i * PAGE_SIZE, bus, SZ_4K, IOMMU_READ | (write ? IOMMU_WRITE : 0))) {
            for (unsigned j = 0; j < i; j++)
                lpae_unmap(pt, (uint64_t)iova + (uint64_t)j * PAGE_SIZE);
            iova_free(dev, (uint64_t)iova, n);
            return DMA_MAPPING_ERROR;
        }
    }
    return (uint64_t)iova + (phys & (PAGE_SIZE - 1));
}

static void ipmmu_unmap(struct device *dev, dma_addr_t addr, size_t size)
{
    unsigned n = pages_of(addr, size);
    uint64_t iova = addr & ~(PAGE_SIZE - 1);
    for (unsigned i = 0; i < n; i++)
        lpae_unmap(dev->pgtable, iova + (uint64_t)i * PAGE_SIZE);
    ipmmu_flush(dev);
    iova_free(dev, iova, n);
}

static const struct dma_map_ops ipmmu_ops = { "iommu-ipmmu", ipmmu_map, ipmmu_unmap, 1 };

static int ipmmu_attach(struct device *dev)
{
    struct lpae_pgtable *pt = dev->pgtable;
    unsigned c = dev->ctx;
    pt->bus_offset = tables.bus - (uintptr_t)tables.phys;
    pt->alloc_table = table_alloc;
    pt->pgd = table_alloc();
    if (!pt->pgd)
        return -1;
    uint64_t ttbr = dma_phys_to_bus((uintptr_t)pt->pgd);
    ctx_write(IPMMU_MM_BASE, c, IMTTLBR0, (uint32_t)ttbr);
    ctx_write(IPMMU_MM_BASE, c, IMTTUBR0, (uint32_t)(ttbr >> 32));
    ctx_write(IPMMU_MM_BASE, c, IMTTBCR, IMTTBCR_EAE | IMTTBCR_SL0_TWOBIT_LVL_1);
    ctx_write(IPMMU_MM_BASE, c, IMMAIR0, ARM_LPAE_MAIR);
    ctx_write(IPMMU_MM_BASE, c, IMSTR, ctx_read(IPMMU_MM_BASE, c, IMSTR));
    ctx_write(dev->cache, c, IMCTR, IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);
    ctx_write(IPMMU_MM_BASE, c, IMCTR, IMCTR_INTEN | IMCTR_FLUSH | IMCTR_MMUEN);
    ipmmu_write(dev->cache, IMUASID(dev->utlb), 0);
    ipmmu_write(dev->cache, IMUCTR(dev->utlb), IMUCTR_TTSEL_MMU(c) | IMUCTR_FLUSH | IMUCTR_MMUEN);
    return 0;
}

/* ---- ops: virtio-iommu MAP/UNMAP (outputs are guest-physical: the P2M is behind it) ------- */

static dma_addr_t viommu_ops_map(struct device *dev, uint64_t phys, size_t size, int write)
{
    unsigned n = pages_of(phys, size);
    long iova = iova_alloc(dev, n);
    if (iova < 0)
        return DMA_MAPPING_ERROR;
    uint32_t flags = VIRTIO_IOMMU_MAP_F_READ | (write ? VIRTIO_IOMMU_MAP_F_WRITE : 0);
    if (viommu_map(&viommu, dev->ctx, (uint64_t)iova, (uint64_t)iova + (uint64_t)n * PAGE_SIZE - 1,
                   phys & ~(PAGE_SIZE - 1), flags) != VIRTIO_IOMMU_S_OK) {
        iova_free(dev, (uint64_t)iova, n);
        return DMA_MAPPING_ERROR;
    }
    return (uint64_t)iova + (phys & (PAGE_SIZE - 1));
}

static void viommu_ops_unmap(struct device *dev, dma_addr_t addr, size_t size)
{
    unsigned n = pages_of(addr, size);
    uint64_t iova = addr & ~(PAGE_SIZE - 1);
    viommu_unmap(&viommu, dev->ctx, iova, iova + (uint64_t)n * PAGE_SIZE - 1);
    iova_free(dev, iova, n);
}

static const struct dma_map_ops viommu_ops = { "iommu-virtio", viommu_ops_map, viommu_ops_unmap, 1 };

static int viommu_attach_dev(struct device *dev)
{
    if (!viommu_up) {
        uint64_t feats = ((uint64_t)VIRTIO_IOMMU_FEATURES_HI << 32) | VIRTIO_IOMMU_FEATURES_LO;
        if (viommu_init(&viommu, VIRTIO_MMIO_SLOT(VIRTIO_IOMMU_SLOT), feats))
            return -1;
        if (secure && !(viommu.bounce = dma_shared_pages(1)))
            return -2;
        viommu_up = 1;
    }
    return viommu_attach(&viommu, dev->ctx, DMA2_VIOMMU_ENDPOINT, 0) == VIRTIO_IOMMU_S_OK ? 0 : -3;
}

void *dma_viommu(void)
{
    return viommu_up ? &viommu : 0;
}

/* ---- ops: direct (no IOMMU: the bus address is the machine address) --------------------- */

static dma_addr_t direct_map(struct device *dev, uint64_t phys, size_t size, int write)
{
    (void)dev;
    (void)write;
    uint64_t bus = dma_phys_to_bus(phys);
    if (bus == DMA_MAPPING_ERROR)
        return bus;
    for (unsigned i = 1; !direct && i < pages_of(phys, size); i++) {      /* machine-contiguous? */
        uint64_t page = (phys & ~(PAGE_SIZE - 1)) + (uint64_t)i * PAGE_SIZE;
        if (dma_phys_to_bus(page) != (bus & ~(PAGE_SIZE - 1)) + (uint64_t)i * PAGE_SIZE)
            return DMA_MAPPING_ERROR;
    }
    return bus;
}

static void direct_unmap(struct device *dev, dma_addr_t addr, size_t size)
{
    (void)dev;
    (void)addr;
    (void)size;
}

static const struct dma_map_ops direct_ops = { "direct", direct_map, direct_unmap, 0 };

/* ---- set-up ---------------------------------------------------------------------------- */

int dma_api_init(void)
{
    if (ready)
        return 0;
    secure = dma_domain_secure();
    direct = dma_domain_direct();
    if (arena_init(&pool, DMA_POOL_PAGES, 1) || arena_init(&tables, TABLE_PAGES, 0))
        return -1;
    static const struct { const char *name; uint64_t cache; unsigned utlb; } ipmmu_wiring[DMA_COUNT] = {
        [0] = { "dma0", IPMMU_DS1_BASE, DMA0_IPMMU_DS1_UTLB },
        [1] = { "dma1", IPMMU_DS1_BASE, DMA1_IPMMU_DS1_UTLB },
        [2] = { "dma2", 0, 0 },
        [3] = { "dma3", 0, 0 },
        [4] = { "dma4", IPMMU_DS0_BASE, DMA4_IPMMU_DS0_UTLB },
    };
    for (unsigned n = 0; n < DMA_COUNT; n++) {
        struct device *dev = &devs[n];
        dev->name = ipmmu_wiring[n].name;
        dev->engine = n;
        dev->dma_mask = DMA_BIT_MASK(32);           /* Linux's default for a platform device */
        dev->iova_base = DMA_IOVA_BASE;
        if (n == 2) {
            dev->ops = &viommu_ops;
            dev->ctx = VIOMMU_DOMAIN;
            if (viommu_attach_dev(dev))
                return -2;
        } else if (n == 3) {
            dev->ops = &direct_ops;
        } else {
            dev->ops = &ipmmu_ops;
            dev->ctx = 1 + (n == 4 ? 2 : n);            /* contexts 1..3; 0 stays reserved */
            dev->cache = ipmmu_wiring[n].cache;
            dev->utlb = ipmmu_wiring[n].utlb;
            dev->pgtable = &pgtables[n];
            if (ipmmu_attach(dev))
                return -3;
        }
    }
    ready = 1;
    return 0;
}

struct device *dma_device(unsigned n)
{
    return ready && n < DMA_COUNT ? &devs[n] : 0;
}

void dma_pool_info(uint64_t *phys, uint64_t *bus, uint64_t *size)
{
    *phys = (uintptr_t)pool.phys;
    *bus = pool.bus;
    *size = (uint64_t)pool.pages * PAGE_SIZE;
}

const char *dma_path_name(enum dma_path p)
{
    static const char *const names[] = { "none", "direct", "IOMMU", "bounced", "bounced+IOMMU" };
    return p <= DMA_PATH_BOUNCED_IOMMU ? names[p] : "?";
}

/* ---- the API ---------------------------------------------------------------------------- */

int dma_set_mask(struct device *dev, uint64_t mask)
{
    /* What the master's mappings need to reach: its IOVA window behind an IOMMU, else the pool. */
    uint64_t lo = dev->ops->translates ? dev->iova_base : pool.bus;
    uint64_t hi = lo + (dev->ops->translates ? (uint64_t)DMA_IOVA_PAGES : pool.pages) * PAGE_SIZE - 1;
    if (hi > mask) {
        printf("dma_api: %s: dma_set_mask(0x%llx) refused: a %u-bit mask cannot reach the %s at bus "
               "[0x%llx, 0x%llx]\n", dev->name, (unsigned long long)mask,
               (unsigned)(64 - __builtin_clzll(mask | 1)), dev->ops->translates ? "IOVA window" : "bounce pool",
               (unsigned long long)lo, (unsigned long long)hi);
        return -EIO;
    }
    dev->dma_mask = mask;
    return 0;
}

static struct mapping *record(struct device *dev, dma_addr_t addr, size_t size)
{
    for (unsigned i = 0; i < MAX_MAPPINGS; i++)
        if (!maps[i].used) {
            maps[i] = (struct mapping){ .dev = dev, .addr = addr, .size = size, .used = 1 };
            return &maps[i];
        }
    return 0;
}

static struct mapping *lookup(struct device *dev, dma_addr_t addr)
{
    for (unsigned i = 0; i < MAX_MAPPINGS; i++)
        if (maps[i].used && maps[i].dev == dev && maps[i].addr == addr)
            return &maps[i];
    return 0;
}

dma_addr_t dma_map_single_attrs(struct device *dev, void *ptr, size_t size, enum dma_data_direction dir,
                                unsigned attrs)
{
    uint64_t phys = (uintptr_t)ptr;
    int write = dir != DMA_TO_DEVICE;
    const char *why = 0;
    dma_addr_t addr = DMA_MAPPING_ERROR;

    if (!ready || size == 0)
        return DMA_MAPPING_ERROR;
    if (secure) {
        why = "it is private memory of a secure guest (devices see shared pages only)";
    } else if (!dev->ops->translates) {
        addr = dev->ops->map(dev, phys, size, write);
        if (addr == DMA_MAPPING_ERROR)
            why = "it is not machine-contiguous";
        else if (addr + size - 1 > dev->dma_mask)
            why = "it lies beyond the device's DMA mask";
    } else {
        addr = dev->ops->map(dev, phys, size, write);
        if (addr == DMA_MAPPING_ERROR || addr + size - 1 > dev->dma_mask) {
            if (addr != DMA_MAPPING_ERROR)
                dev->ops->unmap(dev, addr, size);
            return DMA_MAPPING_ERROR;
        }
    }
    if (!why) {
        struct mapping *m = record(dev, addr, size);
        if (!m) {
            dev->ops->unmap(dev, addr, size);
            return DMA_MAPPING_ERROR;
        }
        dev->last_path = dev->ops->translates ? DMA_PATH_IOMMU : DMA_PATH_DIRECT;
        return addr;
    }
    if (attrs & DMA_ATTR_NO_BOUNCE) {
        printf("dma_api: %s: refusing to map [0x%llx, +0x%llx) without bouncing: %s\n", dev->name,
               (unsigned long long)phys, (unsigned long long)size, why);
        return DMA_MAPPING_ERROR;
    }
    /* swiotlb: pool pages with the buffer's page offset, mapped for the master. */
    unsigned n = pages_of(phys, size);
    uint8_t *slot = arena_alloc(&pool, n);
    if (!slot)
        return DMA_MAPPING_ERROR;
    uint8_t *data = slot + (phys & (PAGE_SIZE - 1));
    if (dir != DMA_FROM_DEVICE)
        memcpy(data, ptr, size);
    addr = dev->ops->map(dev, (uintptr_t)data, size, write);
    struct mapping *m = addr == DMA_MAPPING_ERROR || addr + size - 1 > dev->dma_mask ? 0 : record(dev, addr, size);
    if (!m) {
        if (addr != DMA_MAPPING_ERROR)
            dev->ops->unmap(dev, addr, size);
        arena_free(&pool, slot, n);
        return DMA_MAPPING_ERROR;
    }
    m->orig = ptr;
    m->slot = slot;
    m->slot_pages = n;
    m->dir = dir;
    dev->last_path = dev->ops->translates ? DMA_PATH_BOUNCED_IOMMU : DMA_PATH_BOUNCED;
    return addr;
}

void dma_unmap_single(struct device *dev, dma_addr_t addr, size_t size, enum dma_data_direction dir)
{
    struct mapping *m = lookup(dev, addr);
    if (!m) {
        printf("dma_api: %s: dma_unmap_single of 0x%llx, which is not mapped\n", dev->name,
               (unsigned long long)addr);
        return;
    }
    dev->ops->unmap(dev, addr, size);
    if (m->slot) {
        if (dir != DMA_TO_DEVICE)
            memcpy(m->orig, m->slot + ((uintptr_t)m->orig & (PAGE_SIZE - 1)), size);
        arena_free(&pool, m->slot, m->slot_pages);
    }
    m->used = 0;
}

void *dma_alloc_coherent(struct device *dev, size_t size, dma_addr_t *handle)
{
    unsigned n = pages_of(0, size);
    uint8_t *cpu = ready && size ? arena_alloc(&pool, n) : 0;
    if (!cpu)
        return 0;
    dma_addr_t addr = dev->ops->map(dev, (uintptr_t)cpu, size, 1);
    struct mapping *m = addr == DMA_MAPPING_ERROR || addr + size - 1 > dev->dma_mask ? 0 : record(dev, addr, size);
    if (!m) {
        if (addr != DMA_MAPPING_ERROR)
            dev->ops->unmap(dev, addr, size);
        arena_free(&pool, cpu, n);
        return 0;
    }
    *handle = addr;
    return cpu;
}

void dma_free_coherent(struct device *dev, size_t size, void *cpu, dma_addr_t handle)
{
    struct mapping *m = lookup(dev, handle);
    if (!m)
        return;
    dev->ops->unmap(dev, handle, size);
    arena_free(&pool, cpu, pages_of(0, size));
    m->used = 0;
}
