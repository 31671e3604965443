/*
 * dma_api.h: a DMA API for payloads, modelled on Linux's (Documentation/core-api/dma-api.rst),
 * over the rcar-virt masters (DESIGN.md sections 3 and 7).  Implementation: runtime/dma_api.c.
 *
 *   dma_set_mask          refuses (naming the device and the mask) a mask that cannot reach the
 *                         bounce pool or the IOVA window the master's mappings use
 *   dma_map_single        bus address for a CPU buffer, or DMA_MAPPING_ERROR
 *   dma_unmap_single      ... and back (bounced data copied to the buffer for FROM_DEVICE/BIDI)
 *   dma_alloc_coherent    memory both sides see, from the pool
 *
 * Per-master ops ("dma_map_ops"), chosen from the board's topology:
 *   iommu-ipmmu    dma0, dma1 (ipmmu_ds1), dma4 (ipmmu_ds0): io-pgtable ARM_32_LPAE_S1 tables,
 *                  one IPMMU context per master, IOVAs from a window; outputs are machine
 *                  addresses (identity on a direct-mapped domain, hyp `translate` otherwise)
 *   iommu-virtio   dma2 (virtio-iommu endpoint 2): MAP/UNMAP in domain 1, outputs are GPAs
 *   direct         dma3 (no IOMMU): the bus address is the machine address: identity when
 *                  direct-mapped, hyp `translate` of a machine-contiguous buffer otherwise
 *
 * The bounce pool (swiotlb) is low RAM, made machine-contiguous below 4 GiB by a hyp `exchange`
 * on a domain that is not direct-mapped (xen_create_contiguous_region), and shared with devices in
 * a secure guest (UV_SHARE_PAGE). A mapping bounces when the master cannot reach the buffer (above
 * its mask, not machine-contiguous, behind no IOMMU) and, in a secure guest, always: the device then
 * sees only shared pool pages, which the master's IOMMU maps.
 */
#ifndef IOMMU_LAB_DMA_API_H
#define IOMMU_LAB_DMA_API_H

#include "runtime.h"
#include "board.h"

typedef uint64_t dma_addr_t;

enum dma_data_direction {
    DMA_BIDIRECTIONAL = 0,
    DMA_TO_DEVICE = 1,
    DMA_FROM_DEVICE = 2,
};

#define DMA_MAPPING_ERROR       (~(dma_addr_t)0)
#define DMA_BIT_MASK(n)         ((n) >= 64 ? ~0ULL : ((1ULL << (n)) - 1))

/* dma_map_single_attrs: refuse where the mapping would have to bounce (the lab's way to ask "can
 * the device reach this buffer as it is?"): a private page of a secure guest, a buffer beyond the
 * mask of a master behind no IOMMU. */
#define DMA_ATTR_NO_BOUNCE      (1u << 0)

/* How the last mapping of a device reached memory. */
enum dma_path {
    DMA_PATH_NONE = 0,
    DMA_PATH_DIRECT,            /* bus address = machine address of the buffer */
    DMA_PATH_IOMMU,             /* the master's IOMMU maps the buffer */
    DMA_PATH_BOUNCED,           /* through pool pages, bus address = their machine address */
    DMA_PATH_BOUNCED_IOMMU,     /* through pool pages that the master's IOMMU maps */
};

#define DMA_IOVA_BASE           0x10000000ULL     /* IOMMU masters' IOVA window ... */
#define DMA_IOVA_PAGES          1024              /* ... of 4 MiB */
#define DMA_POOL_PAGES          256               /* the bounce pool: 1 MiB */

struct device;

struct dma_map_ops {
    const char *name;
    /* Make [phys, phys + size) (guest-physical) visible to the master; its device address or
     * DMA_MAPPING_ERROR. For "direct" that fails unless the range is machine-contiguous. */
    dma_addr_t (*map)(struct device *dev, uint64_t phys, size_t size, int write);
    void (*unmap)(struct device *dev, dma_addr_t addr, size_t size);
    int translates;             /* an IOMMU: any page can be mapped at an IOVA below the mask */
};

struct device {
    const char *name;           /* "dma0" .. "dma4" */
    unsigned engine;            /* dma engine index (board.h DMA_ENGINE) */
    uint64_t dma_mask;
    const struct dma_map_ops *ops;
    unsigned ctx;               /* iommu-ipmmu: IPMMU context; iommu-virtio: domain */
    uint64_t cache;             /* iommu-ipmmu: base of the IPMMU cache the master sits behind */
    unsigned utlb;
    void *pgtable;              /* iommu-ipmmu: struct lpae_pgtable */
    uint64_t iova_base;         /* IOMMU masters: the IOVA window */
    uint8_t iova_used[DMA_IOVA_PAGES / 8];
    enum dma_path last_path;
};

/* Facts of the running domain (sysinfo). */
int dma_domain_secure(void);
int dma_domain_direct(void);

/* hyp window: one command on [gpa, gpa + 4 KiB * pages); returns STATUS, RESULT in *result. */
uint32_t hyp_call(uint32_t cmd, uint64_t gpa, uint32_t pages, uint64_t *result);

/* Set up the pool (exchange, share) and the IOMMUs' domains; 0 on success. Call once. */
int dma_api_init(void);
/* The device behind dma engine n (0..4); NULL for an engine the board does not have. */
struct device *dma_device(unsigned n);

int dma_set_mask(struct device *dev, uint64_t mask);
dma_addr_t dma_map_single_attrs(struct device *dev, void *ptr, size_t size, enum dma_data_direction dir,
                                unsigned attrs);
static inline dma_addr_t dma_map_single(struct device *dev, void *ptr, size_t size, enum dma_data_direction dir)
{
    return dma_map_single_attrs(dev, ptr, size, dir, 0);
}
void dma_unmap_single(struct device *dev, dma_addr_t addr, size_t size, enum dma_data_direction dir);
static inline int dma_mapping_error(struct device *dev, dma_addr_t addr)
{
    (void)dev;
    return addr == DMA_MAPPING_ERROR;
}
void *dma_alloc_coherent(struct device *dev, size_t size, dma_addr_t *handle);
void dma_free_coherent(struct device *dev, size_t size, void *cpu, dma_addr_t handle);

/* Pages devices may use in a secure guest (shared through hyp; plain pages otherwise): what the
 * virtio driver's rings come from (VIRTIO_ALLOC_PAGES). */
void *dma_shared_pages(size_t n);
/* The machine address of a guest-physical address (identity when direct-mapped). */
uint64_t dma_phys_to_bus(uint64_t phys);
/* The pool: guest-physical base, machine (bus) base and size in bytes. */
void dma_pool_info(uint64_t *phys, uint64_t *bus, uint64_t *size);
/* The virtio-iommu driver state of dma2 (struct viommu *), for payloads that poke it. */
void *dma_viommu(void);

const char *dma_path_name(enum dma_path p);

#endif
