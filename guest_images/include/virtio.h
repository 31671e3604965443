/*
 * virtio-mmio v2 + split virtqueues + virtio-iommu (v0.12 / virtio 1.2
 * layout), and a tiny synchronous driver for the rcar-virt virtio-iommu.
 *
 * Everything here works in guest-physical addresses: the runtime maps
 * 0..8 GiB identity, so a pointer is its GPA, and the device reads rings
 * through the P2M -- the same code passes on direct and scattered layouts.
 *
 * Header-only (static functions) so any payload can include it.
 */
#ifndef IOMMU_LAB_VIRTIO_H
#define IOMMU_LAB_VIRTIO_H

#include "runtime.h"
#include "board.h"
#include "dma.h"

/* ---- virtio-mmio registers (32-bit) ---------------------------------------- */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976u      /* "virt" */

#define VIRTIO_STATUS_ACKNOWLEDGE       1
#define VIRTIO_STATUS_DRIVER            2
#define VIRTIO_STATUS_DRIVER_OK         4
#define VIRTIO_STATUS_FEATURES_OK       8
#define VIRTIO_STATUS_NEEDS_RESET       64
#define VIRTIO_STATUS_FAILED            128

#define VIRTIO_INT_USED_BUFFER          (1u << 0)
#define VIRTIO_INT_CONFIG_CHANGE        (1u << 1)

#define VIRTIO_F_INDIRECT_DESC          28
#define VIRTIO_F_EVENT_IDX              29
#define VIRTIO_F_VERSION_1              32

/* ---- split virtqueue ------------------------------------------------------- */
#define VRING_DESC_F_NEXT               1
#define VRING_DESC_F_WRITE              2
#define VRING_DESC_F_INDIRECT           4
#define VRING_AVAIL_F_NO_INTERRUPT      1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];        /* then used_event (EVENT_IDX) */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];   /* then avail_event (EVENT_IDX) */
};

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem layout");

/* ---- virtio-iommu ---------------------------------------------------------- */
#define VIRTIO_IOMMU_F_INPUT_RANGE      0
#define VIRTIO_IOMMU_F_DOMAIN_RANGE     1
#define VIRTIO_IOMMU_F_MAP_UNMAP        2
#define VIRTIO_IOMMU_F_BYPASS           3       /* legacy, never offered here */
#define VIRTIO_IOMMU_F_PROBE            4
#define VIRTIO_IOMMU_F_MMIO             5
#define VIRTIO_IOMMU_F_BYPASS_CONFIG    6
#define VIRTIO_IOMMU_F_ATTACH_TABLE     7       /* PASID tables (DESIGN section 6); see pasid.h */

/* The spec device's feature words (what a driver without F_ATTACH_TABLE negotiates); the
 * device also offers F_ATTACH_TABLE. */
#define VIRTIO_IOMMU_FEATURES_LO        0x30000077u
#define VIRTIO_IOMMU_FEATURES_HI        0x00000001u

struct virtio_iommu_config {
    uint64_t page_size_mask;
    uint64_t input_start;
    uint64_t input_end;
    uint32_t domain_start;
    uint32_t domain_end;
    uint32_t probe_size;
    uint8_t bypass;
    uint8_t reserved[3];
};
#define VIRTIO_IOMMU_CFG_PAGE_SIZE_MASK 0x00
#define VIRTIO_IOMMU_CFG_INPUT_START    0x08
#define VIRTIO_IOMMU_CFG_INPUT_END      0x10
#define VIRTIO_IOMMU_CFG_DOMAIN_START   0x18
#define VIRTIO_IOMMU_CFG_DOMAIN_END     0x1c
#define VIRTIO_IOMMU_CFG_PROBE_SIZE     0x20
#define VIRTIO_IOMMU_CFG_BYPASS         0x24

#define VIRTIO_IOMMU_T_ATTACH           1
#define VIRTIO_IOMMU_T_DETACH           2
#define VIRTIO_IOMMU_T_MAP              3
#define VIRTIO_IOMMU_T_UNMAP            4
#define VIRTIO_IOMMU_T_PROBE            5

#define VIRTIO_IOMMU_S_OK               0
#define VIRTIO_IOMMU_S_IOERR            1
#define VIRTIO_IOMMU_S_UNSUPP           2
#define VIRTIO_IOMMU_S_DEVERR           3
#define VIRTIO_IOMMU_S_INVAL            4
#define VIRTIO_IOMMU_S_RANGE            5
#define VIRTIO_IOMMU_S_NOENT            6
#define VIRTIO_IOMMU_S_FAULT            7
#define VIRTIO_IOMMU_S_NOMEM            8

#define VIRTIO_IOMMU_ATTACH_F_BYPASS    (1u << 0)
#define VIRTIO_IOMMU_MAP_F_READ         (1u << 0)
#define VIRTIO_IOMMU_MAP_F_WRITE        (1u << 1)
#define VIRTIO_IOMMU_MAP_F_MMIO         (1u << 2)

#define VIRTIO_IOMMU_PROBE_T_NONE       0
#define VIRTIO_IOMMU_PROBE_T_RESV_MEM   1
#define VIRTIO_IOMMU_RESV_MEM_T_RESERVED 0
#define VIRTIO_IOMMU_RESV_MEM_T_MSI     1

#define VIRTIO_IOMMU_FAULT_R_UNKNOWN    0
#define VIRTIO_IOMMU_FAULT_R_DOMAIN     1
#define VIRTIO_IOMMU_FAULT_R_MAPPING    2
#define VIRTIO_IOMMU_FAULT_F_READ       (1u << 0)
#define VIRTIO_IOMMU_FAULT_F_WRITE      (1u << 1)
#define VIRTIO_IOMMU_FAULT_F_ADDRESS    (1u << 8)

struct virtio_iommu_req_head {
    uint8_t type;
    uint8_t reserved[3];
};

struct virtio_iommu_req_tail {
    uint8_t status;
    uint8_t reserved[3];
};

struct virtio_iommu_req_attach {
    struct virtio_iommu_req_head head;
    uint32_t domain;
    uint32_t endpoint;
    uint32_t flags;
    uint8_t reserved[4];
    struct virtio_iommu_req_tail tail;
};

struct virtio_iommu_req_detach {
    struct virtio_iommu_req_head head;
    uint32_t domain;
    uint32_t endpoint;
    uint8_t reserved[8];
    struct virtio_iommu_req_tail tail;
};

struct virtio_iommu_req_map {
    struct virtio_iommu_req_head head;
    uint32_t domain;
    uint64_t virt_start;
    uint64_t virt_end;
    uint64_t phys_start;
    uint32_t flags;
    struct virtio_iommu_req_tail tail;
} __attribute__((packed));

struct virtio_iommu_req_unmap {
    struct virtio_iommu_req_head head;
    uint32_t domain;
    uint64_t virt_start;
    uint64_t virt_end;
    uint8_t reserved[4];
    struct virtio_iommu_req_tail tail;
} __attribute__((packed));

struct virtio_iommu_req_probe {
    struct virtio_iommu_req_head head;
    uint32_t endpoint;
    uint8_t reserved[64];
    /* then properties[probe_size], then a tail */
};

struct virtio_iommu_probe_resv_mem {
    uint16_t type;
    uint16_t length;
    uint8_t subtype;
    uint8_t reserved[3];
    uint64_t start;
    uint64_t end;
};

struct virtio_iommu_fault {
    uint8_t reason;
    uint8_t reserved[3];
    uint32_t flags;
    uint32_t endpoint;
    uint8_t reserved1[4];
    uint64_t address;
};

_Static_assert(sizeof(struct virtio_iommu_config) == 40, "config layout");
_Static_assert(sizeof(struct virtio_iommu_req_attach) == 24, "attach layout");
_Static_assert(sizeof(struct virtio_iommu_req_detach) == 24, "detach layout");
_Static_assert(sizeof(struct virtio_iommu_req_map) == 40, "map layout");
_Static_assert(sizeof(struct virtio_iommu_req_unmap) == 32, "unmap layout");
_Static_assert(sizeof(struct virtio_iommu_req_probe) == 72, "probe layout");
_Static_assert(sizeof(struct virtio_iommu_probe_resv_mem) == 24, "resv_mem layout");
_Static_assert(sizeof(struct virtio_iommu_fault) == 24, "fault layout");

/* ---- a minimal synchronous driver ------------------------------------------ */

/* Where the driver's rings and buffers come from. A secure guest (dma_api.h) defines it to give
 * pages it has shared, as Linux's virtio_ring allocates with dma_alloc_coherent. */
#ifndef VIRTIO_ALLOC_PAGES
#define VIRTIO_ALLOC_PAGES(n)   alloc_pages(n)
#endif

#ifndef VIOMMU_QNUM
#define VIOMMU_QNUM         128     /* our queue size (device max is 256) */
#endif
#define VIOMMU_EVBUFS       16      /* event buffers kept posted */

struct vq {
    uint16_t num;
    uint16_t avail_idx;             /* next free avail slot (free running) */
    uint16_t last_used;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
};

struct viommu {
    uint64_t base;
    struct vq req;
    struct vq evt;
    struct virtio_iommu_fault *evbuf;   /* VIOMMU_EVBUFS records */
    uint8_t *probe_buf;                 /* scratch for PROBE */
    uint8_t *bounce;                    /* non-NULL: requests go through this shared page (secure guests) */
};

static inline uint32_t vio_r32(struct viommu *v, uint32_t off) { return mmio_read32(v->base + off); }
static inline void vio_w32(struct viommu *v, uint32_t off, uint32_t val) { mmio_write32(v->base + off, val); }

static inline void vio_barrier(void) { __asm__ volatile("mfence" : : : "memory"); }

static inline int vq_alloc(struct vq *q, uint16_t num)
{
    /* One page-aligned block: desc (16 N), avail (6 + 2 N), used (6 + 8 N), 4 KiB aligned parts. */
    size_t dpages = (16u * num + PAGE_SIZE - 1) / PAGE_SIZE;
    size_t apages = (6u + 2u * num + PAGE_SIZE - 1) / PAGE_SIZE;
    size_t upages = (6u + 8u * num + PAGE_SIZE - 1) / PAGE_SIZE;
    uint8_t *mem = VIRTIO_ALLOC_PAGES(dpages + apages + upages);
    if (!mem)
        return -1;
    q->num = num;
    q->avail_idx = 0;
    q->last_used = 0;
    q->desc = (struct vring_desc *)mem;
    q->avail = (struct vring_avail *)(mem + dpages * PAGE_SIZE);
    q->used = (struct vring_used *)(mem + (dpages + apages) * PAGE_SIZE);
    return 0;
}

static inline void vq_setup(struct viommu *v, unsigned index, struct vq *q)
{
    vio_w32(v, VIRTIO_MMIO_QUEUE_SEL, index);
    vio_w32(v, VIRTIO_MMIO_QUEUE_NUM, q->num);
    vio_w32(v, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uintptr_t)q->desc);
    vio_w32(v, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->desc >> 32));
    vio_w32(v, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uintptr_t)q->avail);
    vio_w32(v, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->avail >> 32));
    vio_w32(v, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uintptr_t)q->used);
    vio_w32(v, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->used >> 32));
    vio_w32(v, VIRTIO_MMIO_QUEUE_READY, 1);
}

static inline void vq_publish(struct vq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->num] = head;
    q->avail_idx++;
    vio_barrier();
    q->avail->idx = q->avail_idx;
    vio_barrier();
}

/* Post (or re-post) event buffer i. */
static inline void viommu_post_event(struct viommu *v, uint16_t i)
{
    struct vq *q = &v->evt;
    memset(&v->evbuf[i], 0xee, sizeof(v->evbuf[i]));
    q->desc[i].addr = (uint64_t)(uintptr_t)&v->evbuf[i];
    q->desc[i].len = sizeof(struct virtio_iommu_fault);
    q->desc[i].flags = VRING_DESC_F_WRITE;
    q->desc[i].next = 0;
    vq_publish(q, i);
}

/* Probe the transport, negotiate every offered feature, set up both queues,
 * DRIVER_OK, then post the event buffers.  0 on success. */
static inline int viommu_init(struct viommu *v, uint64_t base, uint64_t features)
{
    v->base = base;
    v->bounce = 0;
    if (vio_r32(v, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC || vio_r32(v, VIRTIO_MMIO_VERSION) != 2 ||
        vio_r32(v, VIRTIO_MMIO_DEVICE_ID) != VIRTIO_ID_IOMMU)
        return -1;
    vio_w32(v, VIRTIO_MMIO_STATUS, 0);
    vio_w32(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_w32(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_w32(v, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    vio_w32(v, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)features);
    vio_w32(v, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    vio_w32(v, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(features >> 32));
    vio_w32(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(vio_r32(v, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK))
        return -2;
    if (vq_alloc(&v->req, VIOMMU_QNUM) || vq_alloc(&v->evt, VIOMMU_QNUM))
        return -3;
    v->evbuf = VIRTIO_ALLOC_PAGES(1);
    v->probe_buf = VIRTIO_ALLOC_PAGES(1);
    if (!v->evbuf || !v->probe_buf)
        return -3;
    /* The request queue is polled: ask for no interrupts (as Linux, which has no callback). */
    v->req.avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
    vq_setup(v, 0, &v->req);
    vq_setup(v, 1, &v->evt);
    vio_w32(v, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
            VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
    for (uint16_t i = 0; i < VIOMMU_EVBUFS; i++)
        viommu_post_event(v, i);
    vio_w32(v, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    return 0;
}

/* Queue one request as two descriptors at slot `slot` (descs 2*slot, 2*slot+1):
 * device-readable [req, req+rlen), device-writable [wbuf, wbuf+wlen). */
static inline void viommu_queue(struct viommu *v, uint16_t slot, const void *req, uint32_t rlen,
                                void *wbuf, uint32_t wlen)
{
    struct vq *q = &v->req;
    uint16_t d = (uint16_t)(2 * slot);
    q->desc[d].addr = (uint64_t)(uintptr_t)req;
    q->desc[d].len = rlen;
    q->desc[d].flags = VRING_DESC_F_NEXT;
    q->desc[d].next = (uint16_t)(d + 1);
    q->desc[d + 1].addr = (uint64_t)(uintptr_t)wbuf;
    q->desc[d + 1].len = wlen;
    q->desc[d + 1].flags = VRING_DESC_F_WRITE;
    q->desc[d + 1].next = 0;
    q->avail->ring[q->avail_idx % q->num] = d;
    q->avail_idx++;
}

/* Kick the request queue; the device answers synchronously.  Returns the
 * number of used entries collected (== queued when all went well) and the
 * used length of the last one in *last_len. */
static inline unsigned viommu_kick(struct viommu *v, uint32_t *last_len)
{
    struct vq *q = &v->req;
    vio_barrier();
    q->avail->idx = q->avail_idx;
    vio_barrier();
    vio_w32(v, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    vio_barrier();
    uint16_t idx = *(volatile uint16_t *)&q->used->idx;
    unsigned n = (uint16_t)(idx - q->last_used);
    if (n && last_len)
        *last_len = q->used->ring[(uint16_t)(idx - 1) % q->num].len;
    q->last_used = idx;
    return n;
}

/* One synchronous request: returns the used length (0 = not answered). */
static inline uint32_t viommu_send(struct viommu *v, const void *req, uint32_t rlen, void *wbuf, uint32_t wlen)
{
    uint32_t len = 0;
    uint8_t *b = v->bounce;
    if (b && rlen + wlen <= PAGE_SIZE) {
        /* A secure guest's device reads and writes shared pages only: bounce the request. */
        memcpy(b, req, rlen);
        viommu_queue(v, 0, b, rlen, b + rlen, wlen);
    } else {
        viommu_queue(v, 0, req, rlen, wbuf, wlen);
        b = 0;
    }
    if (viommu_kick(v, &len) != 1)
        return 0;
    if (b)
        memcpy(wbuf, b + rlen, wlen);
    return len;
}

static inline int viommu_attach(struct viommu *v, uint32_t domain, uint32_t endpoint, uint32_t flags)
{
    struct virtio_iommu_req_attach r = { .head.type = VIRTIO_IOMMU_T_ATTACH, .domain = domain,
                                         .endpoint = endpoint, .flags = flags };
    r.tail.status = 0xff;
    if (viommu_send(v, &r, sizeof(r) - sizeof(r.tail), &r.tail, sizeof(r.tail)) != sizeof(r.tail))
        return -1;
    return r.tail.status;
}

static inline int viommu_detach(struct viommu *v, uint32_t domain, uint32_t endpoint)
{
    struct virtio_iommu_req_detach r = { .head.type = VIRTIO_IOMMU_T_DETACH, .domain = domain,
                                         .endpoint = endpoint };
    r.tail.status = 0xff;
    if (viommu_send(v, &r, sizeof(r) - sizeof(r.tail), &r.tail, sizeof(r.tail)) != sizeof(r.tail))
        return -1;
    return r.tail.status;
}

static inline int viommu_map(struct viommu *v, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps,
                             uint32_t flags)
{
    struct virtio_iommu_req_map r = { .head.type = VIRTIO_IOMMU_T_MAP, .domain = domain, .virt_start = vs,
                                      .virt_end = ve, .phys_start = ps, .flags = flags };
    r.tail.status = 0xff;
    if (viommu_send(v, &r, sizeof(r) - sizeof(r.tail), &r.tail, sizeof(r.tail)) != sizeof(r.tail))
        return -1;
    return r.tail.status;
}

static inline int viommu_unmap(struct viommu *v, uint32_t domain, uint64_t vs, uint64_t ve)
{
    struct virtio_iommu_req_unmap r = { .head.type = VIRTIO_IOMMU_T_UNMAP, .domain = domain, .virt_start = vs,
                                        .virt_end = ve };
    r.tail.status = 0xff;
    if (viommu_send(v, &r, sizeof(r) - sizeof(r.tail), &r.tail, sizeof(r.tail)) != sizeof(r.tail))
        return -1;
    return r.tail.status;
}

/* Collect one delivered fault record (1 if one was there), re-posting its buffer. */
static inline int viommu_next_fault(struct viommu *v, struct virtio_iommu_fault *out, uint32_t *len)
{
    struct vq *q = &v->evt;
    vio_barrier();
    uint16_t idx = *(volatile uint16_t *)&q->used->idx;
    if (q->last_used == idx)
        return 0;
    struct vring_used_elem e = q->used->ring[q->last_used % q->num];
    q->last_used++;
    *len = e.len;
    *out = v->evbuf[e.id];
    viommu_post_event(v, (uint16_t)e.id);
    vio_w32(v, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    return 1;
}

#endif
