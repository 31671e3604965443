"""cffi (API mode) builder for the frame check of every DMA (``vmm.frames``): one C loop over a
transfer's machine runs instead of a Python slice and scan per run.

A copy through an IOMMU on a scattered P2M has one machine run per page (256 for 1 MiB, per side);
judging each in Python cost 15% of the copy, in C it is a few microseconds. Kept beside the other
compiled helpers so ``vmm.backends.load_compiled`` builds it in place in a source checkout.
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
long fc_first_other(const uint8_t *map, uint64_t nframes, const uint64_t *runs, size_t n, uint8_t own);
"""

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* The index of the first run (pairs of machine address, length) touching a frame whose byte is
 * not `own` (or lying beyond the map), else -1. Zero-length runs touch nothing. */
long fc_first_other(const uint8_t *map, uint64_t nframes, const uint64_t *runs, size_t n, uint8_t own)
{
    for (size_t k = 0; k < n; k++) {
        uint64_t mpa = runs[2 * k], len = runs[2 * k + 1];
        if (!len)
            continue;
        uint64_t f0 = mpa >> 12, f1 = (mpa + len - 1) >> 12;
        if (f1 >= nframes || f1 < f0)
            return (long)k;
        for (uint64_t f = f0; f <= f1; f++)
            if (map[f] != own)
                return (long)k;
    }
    return -1;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm.backends._frames", SOURCE, extra_compile_args=["-O2", "-Wall"])


def compile_in_place() -> None:
    """Build ``vmm/backends/_frames*.so`` in the source tree (what the editable install does)."""
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=False)
    obj = os.path.join(_HERE, "_frames.o")
    if os.path.exists(obj):
        os.remove(obj)


if __name__ == "__main__":
    compile_in_place()
