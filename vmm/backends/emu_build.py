"""cffi (API mode) builder for the emulated backend's memory hooks: unicorn calls C, C calls Python once.

Unicorn's Python binding, and even a bare ctypes callback, convert six arguments into Python
objects on every guest access to a device page; that conversion cost more than the device. Here
the hook unicorn calls is C (registered through its C API by vmm/backends/emulated.py), one hook
for every device page and gap (unicorn walks its hook list on each access, so a hook per range
costs a little on every access): a device access becomes one ``extern "Python"`` call with
(slot, address or offset, width[, value]), and a read's reply is stored into the device page's
backing memory by C, where the guest's load finds it. The split halves unicorn asks of the
``mmio_map``-ed gaps (an 8-byte access arrives as two 4-byte callbacks) are answered in C from the
value the memory hook fetched.

No link against unicorn: the hooks only take its callback signatures (unicorn.h).
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct ex_window {
    uint64_t start, end;      /* guest-physical [start, end) of a device page span or a gap */
    uint8_t *backing;         /* host memory behind a device span; NULL for a gap */
    uint64_t dev_start, dev_end;   /* the one bus device filling part of the span, or 0, 0 */
    uint32_t dev_slot;        /* its read/write in Python (0: go through the machine) */
};
struct ex_map {
    uint32_t n;               /* windows, sorted by start, disjoint */
    uint32_t slot;            /* the machine's accessors in Python */
    uint64_t pending;         /* gap: the value the memory hook read, handed back in halves */
    struct ex_window w[];
};
extern "Python" uint64_t ex_read(uint32_t slot, uint64_t addr, uint32_t size);
extern "Python" void ex_write(uint32_t slot, uint64_t addr, uint32_t size, uint64_t value);
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *map);
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *map);
void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *map);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define UC_MEM_WRITE 17

struct ex_window {
    uint64_t start, end;
    uint8_t *backing;
    uint64_t dev_start, dev_end;
    uint32_t dev_slot;
};
struct ex_map {
    uint32_t n;
    uint32_t slot;
    uint64_t pending;
    struct ex_window w[];
};

static uint64_t ex_read(uint32_t slot, uint64_t addr, uint32_t size);
static void ex_write(uint32_t slot, uint64_t addr, uint32_t size, uint64_t value);

/* The window holding addr, or NULL (RAM inside the hook's range). */
static struct ex_window *find(struct ex_map *m, uint64_t addr)
{
    uint32_t lo = 0, hi = m->n;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (addr < m->w[mid].start)
            hi = mid;
        else if (addr >= m->w[mid].end)
            lo = mid + 1;
        else
            return &m->w[mid];
    }
    return NULL;
}

/*
 * unicorn's uc_cb_hookmem_t, one hook over every device span and gap: it runs before the access,
 * with its real width (up to 8 bytes). An access that lies inside the span's one device goes to
 * that device (offset from its base, the value masked to the width: what the bus does); any other
 * goes to the machine, which finds the device or reports the access unclaimed.
 */
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *map)
{
    struct ex_map *m = map;
    struct ex_window *w = find(m, addr);
    const uint32_t n = size > 0 && size <= 8 ? (uint32_t)size : 8;
    const uint64_t mask = n < 8 ? (1ull << (8 * n)) - 1ull : ~0ull;
    const int direct = w && w->dev_slot && addr >= w->dev_start && addr + n <= w->dev_end;
    uint64_t v;
    (void)uc;
    if (!w)
        return;
    if (type == UC_MEM_WRITE) {
        if (direct)
            ex_write(w->dev_slot, addr - w->dev_start, n, (uint64_t)value & mask);
        else
            ex_write(m->slot, addr, n, (uint64_t)value & mask);
        return;
    }
    v = (direct ? ex_read(w->dev_slot, addr - w->dev_start, n) : ex_read(m->slot, addr, n)) & mask;
    if (w->backing)
        memcpy(w->backing + (addr - w->start), &v, n);     /* little-endian host, as the guest */
    else
        m->pending = v;
}

/* unicorn's uc_cb_mmio_read_t for the gaps: the low bytes first, as unicorn asks for them. */
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *map)
{
    struct ex_map *m = map;
    uint64_t v = m->pending;
    (void)uc;
    (void)offset;
    if (size >= 8) {
        m->pending = 0;
        return v;
    }
    m->pending = v >> (8 * size);
    return v & ((1ull << (8 * size)) - 1ull);
}

void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *map)
{
    (void)uc;
    (void)offset;
    (void)size;
    (void)value;
    (void)map;          /* the memory hook already did the write, whole */
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm.backends._emu", SOURCE, extra_compile_args=["-O2", "-Wall"])


def compile_in_place() -> None:
    """Build ``vmm/backends/_emu*.so`` in the source tree (what the editable install does)."""
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=False)
    obj = os.path.join(_HERE, "_emu.o")
    if os.path.exists(obj):
        os.remove(obj)


if __name__ == "__main__":
    compile_in_place()
