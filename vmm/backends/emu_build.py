"""cffi (API mode) builder for the emulated backend's memory hooks: unicorn calls C, C calls Python once.

Unicorn's Python binding, and even a bare ctypes callback, convert six arguments into Python
objects on every guest access to a device page; that conversion cost more than the device. Here
the hooks unicorn calls are C (registered through its C API by vmm/backends/emulated.py): a
device access becomes one ``extern "Python"`` call with (window, address, width[, value]), and a
read's reply is stored into the device page's backing memory by C, where the guest's load finds
it. The split halves unicorn asks of the ``mmio_map``-ed gaps (an 8-byte access arrives as two
4-byte callbacks) are answered in C from the value the memory hook fetched.

No link against unicorn: the hooks only take its callback signatures (unicorn.h).
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct ex_window {
    uint8_t *backing;     /* host memory behind a device page span; NULL for a gap */
    uint64_t base;        /* guest-physical base of the span */
    void *owner;          /* cffi handle of the backend */
    uint64_t pending;     /* gap: the value the memory hook read, handed back in halves */
};
extern "Python" uint64_t ex_read(void *owner, uint64_t addr, uint32_t size);
extern "Python" void ex_write(void *owner, uint64_t addr, uint32_t size, uint64_t value);
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *window);
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *window);
void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *window);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define UC_MEM_WRITE 17

struct ex_window {
    uint8_t *backing;
    uint64_t base;
    void *owner;
    uint64_t pending;
};

static uint64_t ex_read(void *owner, uint64_t addr, uint32_t size);
static void ex_write(void *owner, uint64_t addr, uint32_t size, uint64_t value);

/* unicorn's uc_cb_hookmem_t: runs before the access, with its real width (up to 8 bytes). */
void ex_mem_hook(void *uc, int type, uint64_t addr, int size, int64_t value, void *window)
{
    struct ex_window *w = window;
    uint32_t n = size > 0 && size <= 8 ? (uint32_t)size : 8;
    (void)uc;
    if (type == UC_MEM_WRITE) {
        uint64_t v = (uint64_t)value;
        if (n < 8)
            v &= (1ull << (8 * n)) - 1ull;
        ex_write(w->owner, addr, n, v);
        return;
    }
    {
        uint64_t v = ex_read(w->owner, addr, n);
        if (w->backing)
            memcpy(w->backing + (addr - w->base), &v, n);     /* little-endian host, as the guest */
        else
            w->pending = v;
    }
}

/* unicorn's uc_cb_mmio_read_t for the gaps: the low bytes first, as unicorn asks for them. */
uint64_t ex_gap_read(void *uc, uint64_t offset, unsigned size, void *window)
{
    struct ex_window *w = window;
    uint64_t v = w->pending;
    (void)uc;
    (void)offset;
    if (size >= 8) {
        w->pending = 0;
        return v;
    }
    w->pending = v >> (8 * size);
    return v & ((1ull << (8 * size)) - 1ull);
}

void ex_gap_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *window)
{
    (void)uc;
    (void)offset;
    (void)size;
    (void)value;
    (void)window;       /* the memory hook already did the write, whole */
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
