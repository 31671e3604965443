"""cffi (API mode) builder for the C walker.

Works as a setuptools ``cffi_modules=["vmm/walker/build.py:ffibuilder"]`` entry and when run
directly (``python vmm/walker/build.py``), which compiles in place so that
``vmm/walker/_walker*.so`` is importable from a source checkout.
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

CDEF = """
struct wk_stage {
    uint64_t ttbr;
    uint32_t ia_bits;
    uint32_t start_level;
    uint32_t granule;
    uint32_t oa_bits;
    uint32_t flags;
};
struct wk_walker;
struct wk_walker *wk_new(uintptr_t mem, uint64_t size, uint64_t tlb_entries);
void wk_free(struct wk_walker *w);
int wk_set_context(struct wk_walker *w, uint32_t ctx_id, const struct wk_stage *s1, const struct wk_stage *s2,
                   uint32_t s2_id);
void wk_translate(struct wk_walker *w, uint32_t ctx_id, const uint64_t *addrs, const uint8_t *accs,
                  uint32_t acc_all, uint64_t n, uint64_t *out, uint32_t *fault);
int64_t wk_translate_range(struct wk_walker *w, uint32_t ctx_id, uint64_t addr, uint64_t len, uint32_t acc,
                           uint32_t gran, uint64_t *runs, uint64_t max_runs, uint32_t *fault, uint64_t *faddr);
void wk_invalidate_all(struct wk_walker *w);
void wk_invalidate_context(struct wk_walker *w, uint32_t ctx_id);
void wk_invalidate_range(struct wk_walker *w, uint32_t ctx_id, uint64_t start, uint64_t end);
void wk_invalidate_ipa(struct wk_walker *w, uint32_t s2_id, uint64_t start, uint64_t end);
void wk_stats(const struct wk_walker *w, uint64_t *out3);
void wk_reset_stats(struct wk_walker *w);
void wk_set_tlb(struct wk_walker *w, int on);
int wk_get_tlb(const struct wk_walker *w);
struct wk_cdtable {
    uint64_t ptr;
    uint32_t fmt;
    uint32_t cdmax;
    uint32_t s2_ctx;
};
int wk_set_table(struct wk_walker *w, uint32_t ctx_id, const struct wk_cdtable *cfg);
void wk_table_translate(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid, const uint64_t *addrs,
                        const uint8_t *accs, uint32_t acc_all, uint64_t n, uint64_t *out, uint32_t *fault);
int64_t wk_table_translate_range(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid, uint64_t addr, uint64_t len,
                                 uint32_t acc, uint64_t *runs, uint64_t max_runs, uint32_t *fault, uint64_t *faddr,
                                 uint64_t *fiova);
void wk_table_inv_cd(struct wk_walker *w, uint32_t ctx_id, int64_t pasid);
void wk_table_inv_tlb(struct wk_walker *w, uint32_t ctx_id, int64_t asid, uint64_t start, uint64_t end);
int64_t wk_table_cached_asid(struct wk_walker *w, uint32_t ctx_id, uint32_t pasid);
void wk_table_counts(const struct wk_walker *w, uint32_t ctx_id, uint64_t *out2);
uint64_t wk_bench_chase(const struct wk_walker *w, uint64_t start, uint64_t loads, uint64_t reps);
"""

with open(os.path.join(_HERE, "walker.c"), encoding="utf-8") as _f:
    _SOURCE = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm.walker._walker", _SOURCE, extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=_ROOT, verbose=False)
    _obj = os.path.join(_HERE, "_walker.o")
    if os.path.exists(_obj):
        os.remove(_obj)
