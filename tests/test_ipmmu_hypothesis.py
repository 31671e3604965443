"""Random stage-1 tables and IOVAs: the IPMMU (C walker behind the register model) gives the same
answer as the pure-Python ReferenceWalker configured the way facts/ipmmu.md section 10 reads the
registers (long descriptors, NS quirk, AP[2] only, no AF check, 40-bit output)."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ipmmu_support import DS1, MM, PAGE, Rig, wide_machine

from vmm.dma import DmaFault
from vmm.walker import ADDRESS_SIZE, F_NS_CHECK, NS, PERMISSION, TRANSLATION, WALK_ABORT, R, Stage, W, range_pages
from vmm.walker.reference import ReferenceWalker

# (IMCTR, IMTTBCR, input bits, start level): Linux's value, a 30-bit level-2 start, VA64 39-bit
MODES = [(0x7, 0x80000080, 32, 1), (0x7, 0x80000042, 30, 2), (0x20000007, 0x80000099, 39, 1)]
# walker fault kind -> (IMSTR fault bit, ERRCODE, dma status), spelled out from section 10
EXPECT = {TRANSLATION: (1, 1, 2), ADDRESS_SIZE: (1, 1, 2), PERMISSION: (2, 4, 3), NS: (2, 5, 3),
          WALK_ABORT: (4, 0, 2)}
TABLE_PAGES = 64


@pytest.fixture(scope="module")
def env():
    m = wide_machine()
    pool = m.memory.alloc(TABLE_PAGES * PAGE, PAGE)
    yield Rig(m), pool, ReferenceWalker(m.memory)
    m.close()


def shift(level: int) -> int:
    return 12 + 9 * (3 - level)


@settings(max_examples=int(os.environ.get("IOMMU_LAB_HYPOTHESIS_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ipmmu_matches_reference_walker(env, data):
    rig, pool, ref = env
    m, mem = rig.m, rig.m.memory
    imctr, ttbcr, ia_bits, start = data.draw(st.sampled_from(MODES))
    m.memory.view[pool:pool + TABLE_PAGES * PAGE] = bytes(TABLE_PAGES * PAGE)
    next_page = [pool + PAGE]

    def new_table() -> int:
        if next_page[0] >= pool + TABLE_PAGES * PAGE:
            return 0xF0_0000_0000                                   # out of pages: outside memory
        a = next_page[0]
        next_page[0] += PAGE
        return a

    def slot(table: int, level: int, iova: int) -> int:
        bits = ia_bits - shift(level) if level == start else 9
        return table + 8 * ((iova >> shift(level)) & ((1 << bits) - 1))

    def build_path(iova: int) -> None:
        table, level = pool, start
        while table < mem.size:
            a = slot(table, level, iova)
            d = mem.read64(a)
            if d == 0:
                kinds = ["table", "invalid"] + (["block"] if level in (1, 2) else []) if level < 3 \
                    else ["page", "page", "invalid", "reserved"]
                kind = data.draw(st.sampled_from(kinds))
                ns = data.draw(st.booleans()) or data.draw(st.booleans())       # mostly set
                if kind == "table":
                    nxt = new_table() if data.draw(st.integers(0, 15)) else 0xF0_0000_0000
                    d = nxt | 3 | (1 << 63 if ns else 0)
                elif kind == "invalid":
                    d = (data.draw(st.integers(0, (1 << 64) - 1)) & ~1) | 2
                else:
                    size = 1 << shift(level)
                    oa_bits = 41 if data.draw(st.integers(0, 19)) == 0 else 40
                    oa = data.draw(st.integers(0, (1 << oa_bits) - 1)) & ~(size - 1)
                    attrs = (1 << 10) | (1 << 6) | (2 << 8) | (0x20 if ns else 0)
                    attrs |= (1 << 7) if data.draw(st.booleans()) else 0           # AP[2] read-only
                    d = oa | attrs | (3 if kind == "page" else 1)
                mem.write64(a, d)
            if not d & 1 or level == 3 or not d & 2:
                return
            table, level = d & 0xFF_FFFF_F000, level + 1

    limit = 1 << ia_bits
    accesses = data.draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(1, 3 * PAGE), st.booleans()),
                                  min_size=1, max_size=6))
    for iova, _, _ in accesses:
        build_path(iova)
        build_path(min(iova + PAGE, limit - 1))

    rig.linux_context(1, pool, ttbcr=ttbcr, imctr=imctr, utlbs=(32,))
    rig.flush(1)
    ref.context(0, Stage(ttbr=pool, ia_bits=ia_bits, start_level=start, oa_bits=40, flags=F_NS_CHECK), None)
    port = m.devices["ipmmu_ds1"].translator(32, m.dom0)
    for iova, length, write in accesses:
        want = ref.translate_range(0, iova, length, W if write else R)
        # Pages are taken in order: a page translating outside machine memory fails in its turn,
        # before a later page's walk fault, with STATUS 2 and no IPMMU record (facts section 10).
        pages = range_pages(iova, length, 12)
        outs, faults = ref.translate(0, pages, W if write else R)
        first_fault = next((i for i, f in enumerate(faults) if f), len(pages))
        beyond = next((i for i in range(first_fault) if outs[i] >= m.memory.size), None)
        if beyond is not None:
            with pytest.raises(DmaFault) as e:
                port.translate(iova, length, write)
            assert (e.value.status, e.value.address) == (2, max(pages[beyond] & ~0xFFF, iova))
            assert rig.fault_record(1) == (0, 0)
            continue
        try:
            got = port.translate(iova, length, write)
        except DmaFault as e:
            got = e
        status, addr = rig.fault_record(1)
        rig.clear(1)
        if isinstance(want, list):
            assert got == want, (hex(iova), length)
            assert status == 0
            continue
        assert isinstance(got, DmaFault), (hex(iova), length, want)
        page = max(want.address & ~0xFFF, iova)      # the first byte of the failing page touched
        if want.kind == TRANSLATION and want.level == 0:               # beyond the input space
            bit, errcode, dma_status, level = 1, 0, 2, 0
        else:
            (bit, errcode, dma_status), level = EXPECT[want.kind], want.level
        assert (got.status, got.address) == (dma_status, page), (hex(iova), length, str(want))
        assert status == bit | errcode << 8 | level << 12, (hex(iova), str(want), hex(status))
        assert addr == page
    assert rig.rd(MM, 1, "IMSTR") == 0 and not m.irqs.lines[0].level
    rig.imuctr(DS1, 32, 0)
