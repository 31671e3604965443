/*
 * dma_api: the guest DMA API (include/dma_api.h) on the machine it boots on, secure or not,
 * direct-mapped or not (DESIGN.md section 7).
 *
 *   hyp window     translate, bad ranges, share answers 2 unless secure, SHARED, exchange
 *   round trips    dma0 (IPMMU), dma2 (virtio-iommu), dma3 (no IOMMU), dma4 (IPMMU): buffers above
 *                  4 GiB when there is RAM there (`--ram 192M`), to-device, from-device,
 *                  bidirectional and coherent; data checked and the path each mapping took
 *   refusals       dma_set_mask below the pool / IOVA window; a mapping that would have to bounce
 *                  asked not to (private page, beyond the mask)
 *   buggy drivers  a CPU address above 4 GiB handed to dma3 (STATUS 6); a private page handed to
 *                  dma3 and, through its IPMMU, to dma0 (STATUS 7); a private virtio request
 *                  (DEVICE_NEEDS_RESET and a configuration interrupt)
 *
 * Exit status: the number of failed checks.
 */
#include "runtime.h"
#include "board.h"
#include "dma.h"
#include "dma_api.h"
#include "ipmmu.h"
#include "virtio.h"

static const unsigned ENGINES[] = { 0, 2, 3, 4 };
static int secure, direct;
static uint64_t high_next, high_end;        /* RAM above 4 GiB, if any */

/* Buffers from RAM above 4 GiB when the machine has some, else from low RAM. */
static uint8_t *buffer(size_t pages)
{
    if (high_next && high_next + pages * PAGE_SIZE <= high_end) {
        uint8_t *p = (uint8_t *)(uintptr_t)high_next;
        high_next += pages * PAGE_SIZE;
        return memset(p, 0, pages * PAGE_SIZE);
    }
    return alloc_pages(pages);
}

static void find_high_ram(struct hvm_start_info *si)
{
    if (si->version < 1)
        return;
    struct hvm_memmap_entry *e = (struct hvm_memmap_entry *)(uintptr_t)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        if (e[i].type == HVM_MEMMAP_RAM && e[i].addr >= RAM_HIGH_BASE && e[i].size >= 64 * PAGE_SIZE) {
            high_next = e[i].addr;
            high_end = e[i].addr + e[i].size;
        }
}

static void fill(uint8_t *p, size_t n, uint8_t seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(seed + i * 13 + (i >> 8));
}

static uint64_t dma_bits(unsigned n)
{
    return mmio_read32(DMA_ENGINE(n) + DMA_DMA_BITS);
}

/* The path a streaming mapping of `buf` (size bytes) should take on this machine. */
static enum dma_path expected_path(struct device *dev, const uint8_t *buf, size_t size)
{
    if (dev->ops->translates)
        return secure ? DMA_PATH_BOUNCED_IOMMU : DMA_PATH_IOMMU;
    if (secure)
        return DMA_PATH_BOUNCED;
    uint64_t phys = (uintptr_t)buf;
    uint64_t bus = dma_phys_to_bus(phys);
    int contiguous = 1;
    for (uint64_t off = PAGE_SIZE - (phys & (PAGE_SIZE - 1)); off < size; off += PAGE_SIZE)
        contiguous &= dma_phys_to_bus(phys + off) == bus + off;
    return contiguous && bus + size - 1 <= dev->dma_mask ? DMA_PATH_DIRECT : DMA_PATH_BOUNCED;
}

static void hyp_window(void)
{
    uint64_t r = 0;
    section("hyp window");
    uint8_t *page = alloc_pages(4);
    uint32_t st = hyp_call(HYP_CMD_TRANSLATE, (uintptr_t)page, 1, &r);
    check(st == HYP_STATUS_OK && (r & (PAGE_SIZE - 1)) == 0 && (!direct || r == (uintptr_t)page),
          "translate %p -> machine 0x%llx (STATUS %u)", (void *)page, (unsigned long long)r, st);
    check(hyp_call(HYP_CMD_TRANSLATE, (uintptr_t)page + 8, 1, 0) == HYP_STATUS_BAD_RANGE, "unaligned GPA: STATUS 1");
    check(hyp_call(HYP_CMD_TRANSLATE, (uintptr_t)page, 0, 0) == HYP_STATUS_BAD_RANGE, "PAGES 0: STATUS 1");
    check(hyp_call(HYP_CMD_TRANSLATE, RAM_LOW_LIMIT, 1, 0) == HYP_STATUS_BAD_RANGE, "not guest RAM: STATUS 1");
    check(hyp_call(7, (uintptr_t)page, 1, 0) == HYP_STATUS_BAD_COMMAND, "unknown command: STATUS 4");
    uint64_t shared = mmio_read64(HYP_BASE + HYP_SHARED);
    if (!secure) {
        check(hyp_call(HYP_CMD_SHARE, (uintptr_t)page, 1, 0) == HYP_STATUS_NOT_SECURE &&
              hyp_call(HYP_CMD_UNSHARE, RAM_LOW_LIMIT, 0, 0) == HYP_STATUS_NOT_SECURE && shared == 0,
              "not a secure guest: share and unshare answer 2 (before the range), SHARED 0");
    } else {
        st = hyp_call(HYP_CMD_SHARE, (uintptr_t)page, 2, 0);
        uint64_t after = mmio_read64(HYP_BASE + HYP_SHARED);
        hyp_call(HYP_CMD_SHARE, (uintptr_t)page, 2, 0);
        check(st == 0 && after == shared + 2 && mmio_read64(HYP_BASE + HYP_SHARED) == after,
              "share 2 pages: SHARED %llu -> %llu, sharing again changes nothing", (unsigned long long)shared,
              (unsigned long long)after);
        st = hyp_call(HYP_CMD_UNSHARE, (uintptr_t)page, 4, 0);
        check(st == 0 && mmio_read64(HYP_BASE + HYP_SHARED) == shared, "unshare 4 (2 shared): SHARED back to %llu",
              (unsigned long long)shared);
    }
    /* exchange: 4 pages with data become machine-contiguous below 4 GiB, contents kept */
    fill(page, 4 * PAGE_SIZE, 0x42);
    mmio_write32(HYP_BASE + HYP_ADDR_BITS, 32);
    st = hyp_call(HYP_CMD_EXCHANGE, (uintptr_t)page, 4, &r);
    int contiguous = 1, same = 1;
    for (unsigned i = 0; i < 4; i++)
        contiguous &= dma_phys_to_bus((uintptr_t)page + i * PAGE_SIZE) == r + i * PAGE_SIZE;
    uint8_t expect[64];
    fill(expect, sizeof(expect), 0x42);
    same = memcmp(page, expect, sizeof(expect)) == 0;
    check(st == 0 && contiguous && same && r + 4 * PAGE_SIZE <= (1ULL << 32) && (!direct || r == (uintptr_t)page),
          "exchange 4 pages: machine 0x%llx, contiguous, below 4 GiB, contents kept%s", (unsigned long long)r,
          direct ? " (direct-mapped: nothing moved)" : "");
    if (high_next) {
        st = hyp_call(HYP_CMD_EXCHANGE, high_end - PAGE_SIZE, 1, &r);
        check(direct ? st == HYP_STATUS_NO_MEMORY : st == HYP_STATUS_OK && r < (1ULL << 32),
              "exchange of a page above 4 GiB: STATUS %u%s", st,
              direct ? " (direct-mapped pages never move: 3)" : ", moved below 4 GiB");
    }
}

static void round_trips(struct device *dev)
{
    /* above 4 GiB: 64 bytes in a page, 12 KiB across four pages; low RAM: 256 bytes in a page */
    static const struct { size_t off, len; int low; } cases[] = {
        { 0x123, 64, 0 }, { 0x10, 3 * PAGE_SIZE, 0 }, { 0x80, 256, 1 } };
    uint64_t fa = 0;
    printf("-- %s (%s, %llu-bit mask)\n", dev->name, dev->ops->name, (unsigned long long)dma_bits(dev->engine));
    for (unsigned c = 0; c < ARRAY_SIZE(cases); c++) {
        size_t len = cases[c].len;
        uint8_t *src = (cases[c].low ? alloc_pages(5) : buffer(5)) + cases[c].off;
        uint8_t *dst = (cases[c].low ? alloc_pages(5) : buffer(5)) + cases[c].off;
        fill(src, len, (uint8_t)(dev->engine * 16 + c));
        enum dma_path want = expected_path(dev, src, len);
        dma_addr_t a = dma_map_single(dev, src, len, DMA_TO_DEVICE);
        enum dma_path got_a = dev->last_path;
        dma_addr_t b = dma_map_single(dev, dst, len, DMA_FROM_DEVICE);
        enum dma_path got_b = dev->last_path;
        if (dma_mapping_error(dev, a) || dma_mapping_error(dev, b)) {
            check(0, "%s: mapping %zu bytes at %p failed", dev->name, len, (void *)src);
            continue;
        }
        uint32_t st = dma_copy(dev->engine, a, b, (uint32_t)len, &fa);
        memset(src, 0, len);                    /* the device must not need the CPU copy any more */
        dma_unmap_single(dev, b, len, DMA_FROM_DEVICE);
        dma_unmap_single(dev, a, len, DMA_TO_DEVICE);
        uint8_t seed = (uint8_t)(dev->engine * 16 + c);
        fill(src, len, seed);
        check(st == DMA_STATUS_OK && memcmp(src, dst, len) == 0 && got_a == want && got_b == expected_path(dev, dst, len),
              "%s: %zu bytes %p -> %p via 0x%llx -> 0x%llx: STATUS %u, path %s/%s (expected %s)", dev->name, len,
              (void *)src, (void *)dst, (unsigned long long)a, (unsigned long long)b, st, dma_path_name(got_a),
              dma_path_name(got_b), dma_path_name(want));
    }
    /* bidirectional: the device copies the first half of one buffer onto its second half */
    size_t half = 2 * PAGE_SIZE;
    uint8_t *buf = buffer(4);
    fill(buf, half, 0x77);
    dma_addr_t m = dma_map_single(dev, buf, 2 * half, DMA_BIDIRECTIONAL);
    uint32_t st = dma_mapping_error(dev, m) ? 0xff : dma_copy(dev->engine, m, m + half, (uint32_t)half, &fa);
    if (!dma_mapping_error(dev, m))
        dma_unmap_single(dev, m, 2 * half, DMA_BIDIRECTIONAL);
    check(st == DMA_STATUS_OK && memcmp(buf, buf + half, half) == 0, "%s: bidirectional 16 KiB, STATUS %u, path %s",
          dev->name, st, dma_path_name(dev->last_path));
    /* coherent: CPU writes, the device reads it into a streaming buffer */
    dma_addr_t h = 0;
    uint8_t *coh = dma_alloc_coherent(dev, 2 * PAGE_SIZE, &h);
    uint8_t *out = buffer(2);
    if (!coh) {
        check(0, "%s: dma_alloc_coherent", dev->name);
        return;
    }
    fill(coh, 2 * PAGE_SIZE, 0x99);
    dma_addr_t o = dma_map_single(dev, out, 2 * PAGE_SIZE, DMA_FROM_DEVICE);
    st = dma_copy(dev->engine, h, o, 2 * PAGE_SIZE, &fa);
    dma_unmap_single(dev, o, 2 * PAGE_SIZE, DMA_FROM_DEVICE);
    check(st == DMA_STATUS_OK && memcmp(coh, out, 2 * PAGE_SIZE) == 0 && h + 2 * PAGE_SIZE - 1 <= dev->dma_mask,
          "%s: coherent 8 KiB at bus 0x%llx read by the device, STATUS %u", dev->name, (unsigned long long)h, st);
    dma_free_coherent(dev, 2 * PAGE_SIZE, coh, h);
}

static void refusals(void)
{
    section("refusals");
    struct device *d3 = dma_device(3), *d0 = dma_device(0);
    uint64_t old = d3->dma_mask;
    check(dma_set_mask(d3, DMA_BIT_MASK(20)) < 0 && d3->dma_mask == old,
          "dma3: a 20-bit mask cannot reach the bounce pool: refused, mask kept");
    old = d0->dma_mask;
    check(dma_set_mask(d0, DMA_BIT_MASK(24)) < 0 && d0->dma_mask == old,
          "dma0: a 24-bit mask cannot reach the IOVA window: refused, mask kept");
    uint8_t *buf = buffer(1);
    if (secure) {
        check(dma_map_single_attrs(d0, buf, 64, DMA_TO_DEVICE, DMA_ATTR_NO_BOUNCE) == DMA_MAPPING_ERROR &&
              dma_map_single_attrs(d3, buf, 64, DMA_TO_DEVICE, DMA_ATTR_NO_BOUNCE) == DMA_MAPPING_ERROR,
              "secure: a private page is never mapped as it is (dma0, dma3 refuse without bouncing)");
    } else if ((uintptr_t)buf >= RAM_HIGH_BASE || !direct) {
        uint8_t *two = buffer(2);
        dma_addr_t a = dma_map_single_attrs(d3, direct ? buf : two, direct ? 64 : 2 * PAGE_SIZE, DMA_TO_DEVICE,
                                            DMA_ATTR_NO_BOUNCE);
        check(a == DMA_MAPPING_ERROR || (!direct && expected_path(d3, two, 2 * PAGE_SIZE) == DMA_PATH_DIRECT),
              "dma3: a buffer it cannot reach as it is (%s) is refused without bouncing",
              direct ? "above its 32-bit mask" : "not machine-contiguous");
        if (a != DMA_MAPPING_ERROR)
            dma_unmap_single(d3, a, 2 * PAGE_SIZE, DMA_TO_DEVICE);
    }
}

static void buggy_drivers(void)
{
    uint64_t fa = 0;
    section("buggy drivers, caught by the hardware");
    /* A driver that hands dma3 (32 address lines) the CPU address of a buffer above 4 GiB. */
    uint8_t *dst = alloc_pages(1);
    dma_addr_t good = dma_map_single(dma_device(3), dst, 64, DMA_FROM_DEVICE);
    uint64_t high = high_next ? high_next : RAM_HIGH_BASE;
    uint32_t st = dma_copy(3, high, good, 64, &fa);
    dma_unmap_single(dma_device(3), good, 64, DMA_FROM_DEVICE);
    check(st == DMA_STATUS_DMA_MASK && fa == high, "dma3 given 0x%llx (above its mask): STATUS %u, FAULT_ADDR 0x%llx",
          (unsigned long long)high, st, (unsigned long long)fa);
    if (!secure) {
        puts("not a secure guest: no private pages to hand a device (run with --secure)");
        return;
    }
    /* A driver that skips the DMA API and hands a device a private page. */
    uint8_t *secret = alloc_pages(1), *out = alloc_pages(1);
    memset(secret, 0x5e, PAGE_SIZE);
    dma_addr_t to = dma_map_single(dma_device(3), out, 64, DMA_FROM_DEVICE);
    uint64_t bus = dma_phys_to_bus((uintptr_t)secret);
    st = dma_copy(3, bus + 0x40, to, 64, &fa);
    dma_unmap_single(dma_device(3), to, 64, DMA_FROM_DEVICE);
    check(st == DMA_STATUS_PRIVATE && fa == bus + 0x40 && out[0] == 0,
          "dma3 given private page 0x%llx: STATUS %u, FAULT_ADDR 0x%llx, nothing written", (unsigned long long)bus, st,
          (unsigned long long)fa);
    struct device *d0 = dma_device(0);
    dma_addr_t iova = d0->ops->map(d0, (uintptr_t)secret, PAGE_SIZE, 0);    /* mapped, not bounced */
    to = dma_map_single(d0, out, 64, DMA_FROM_DEVICE);
    st = dma_copy(0, iova, to, 64, &fa);
    dma_unmap_single(d0, to, 64, DMA_FROM_DEVICE);
    d0->ops->unmap(d0, iova, PAGE_SIZE);
    check(st == DMA_STATUS_PRIVATE && fa == iova && ctx_read(IPMMU_MM_BASE, d0->ctx, IMSTR) == 0 && out[0] == 0,
          "dma0 given private page %p through its IPMMU at 0x%llx: STATUS %u, no IPMMU fault", (void *)secret,
          (unsigned long long)iova, st);
    /* A virtio driver that posts a request from private memory: the device stops and asks for a reset. */
    struct viommu *v = dma_viommu();
    uint8_t *bounce = v->bounce;
    v->bounce = 0;                          /* the request now goes from the (private) stack */
    int rc = viommu_attach(v, 9, DMA2_VIOMMU_ENDPOINT, 0);
    v->bounce = bounce;
    uint32_t status = vio_r32(v, VIRTIO_MMIO_STATUS), isr = vio_r32(v, VIRTIO_MMIO_INTERRUPT_STATUS);
    check(rc != 0 && (status & VIRTIO_STATUS_NEEDS_RESET) && (isr & VIRTIO_INT_CONFIG_CHANGE),
          "virtio-iommu given a private request: DEVICE_NEEDS_RESET (Status 0x%x), configuration interrupt (0x%x)",
          status, isr);
    vio_w32(v, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    vio_w32(v, VIRTIO_MMIO_STATUS, 0);
}

int main(struct hvm_start_info *si)
{
    secure = dma_domain_secure();
    direct = dma_domain_direct();
    find_high_ram(si);
    printf("dma_api: %s, %s guest; %s\n", direct ? "direct-mapped" : "not direct-mapped",
           secure ? "secure" : "normal",
           high_next ? "buffers above 4 GiB" : "no RAM above 4 GiB (--ram 192M gives some): buffers in low RAM");
    hyp_window();

    section("set-up");
    uint64_t shared0 = mmio_read64(HYP_BASE + HYP_SHARED);
    int rc = dma_api_init();
    uint64_t pphys, pbus, psize;
    dma_pool_info(&pphys, &pbus, &psize);
    check(rc == 0, "dma_api_init: bounce pool %p (bus 0x%llx, %llu KiB) (%d)", (void *)(uintptr_t)pphys,
          (unsigned long long)pbus, (unsigned long long)(psize >> 10), rc);
    if (rc)
        return finish();
    uint64_t shared = mmio_read64(HYP_BASE + HYP_SHARED);
    check(secure ? shared >= shared0 + DMA_POOL_PAGES : shared == 0,
          "SHARED %llu pages (the pool and the virtio rings when secure)", (unsigned long long)shared);
    for (unsigned i = 0; i < ARRAY_SIZE(ENGINES); i++) {
        struct device *dev = dma_device(ENGINES[i]);
        uint64_t bits = dma_bits(dev->engine);
        int r = dma_set_mask(dev, DMA_BIT_MASK(bits));
        check(r == 0 && dev->dma_mask == DMA_BIT_MASK(bits), "%s: dma_set_mask(DMA_BIT_MASK(%llu)) = %d", dev->name,
              (unsigned long long)bits, r);
    }

    section("round trips");
    for (unsigned i = 0; i < ARRAY_SIZE(ENGINES); i++)
        round_trips(dma_device(ENGINES[i]));

    refusals();
    buggy_drivers();
    return finish();
}
