"""The device-access map under hypothesis: whatever a secure guest shares, unshares and exchanges,
no device access ever reaches a private frame, and every copy over shared pages goes through.

The oracle keeps only guest-page facts (which pages the guest shared, what the CPU wrote); the
machine's frame map, P2M and IOTLBs are what is being tested. Copies go through dma0 behind an
IPMMU stage-2 context (IOVA = GPA, the P2M translates), so exchanges must be seen by the IOTLB too.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ipmmu_support import PAGE, Rig, wide_machine
from test_secure import Hyp

BASE = 0x10_0000                 # the guest pages the test plays with
PAGES = 24

page = st.integers(0, PAGES - 1)
op = st.one_of(
    st.tuples(st.just("share"), page, st.integers(1, 4)),
    st.tuples(st.just("unshare"), page, st.integers(1, 4)),
    st.tuples(st.just("exchange"), page, st.integers(1, 4)),
    st.tuples(st.just("copy"), st.integers(0, PAGES * PAGE - 1), st.integers(0, PAGES * PAGE - 1),
              st.integers(1, 3 * PAGE)),
)


@pytest.mark.parametrize("p2m", ["direct", "scattered"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_no_device_access_reaches_a_private_frame(p2m, ops):
    m = wide_machine(p2m=p2m, secure=True, cpu=False, quiet=True)
    try:
        Rig(m).xen_context(1, m.dom0.p2m.root)
        h = Hyp(m)
        shared: set[int] = set()
        image = bytearray((i * 31 + 7) & 0xFF for i in range(PAGES * PAGE))
        m.write_guest(BASE, bytes(image))
        for kind, *args in ops:
            if kind in ("share", "unshare", "exchange"):
                first, n = args
                n = min(n, PAGES - first)
                if kind == "exchange":
                    assert h.exchange(BASE + first * PAGE, n)[0] == 0
                else:
                    assert (h.share if kind == "share" else h.unshare)(BASE + first * PAGE, n) == 0
                    pages = set(range(first, first + n))
                    shared = shared | pages if kind == "share" else shared - pages
                continue
            src, dst, length = args
            length = min(length, PAGES * PAGE - src, PAGES * PAGE - dst)
            touched = [(src, p) for p in range(src // PAGE, (src + length - 1) // PAGE + 1)] + \
                      [(dst, p) for p in range(dst // PAGE, (dst + length - 1) // PAGE + 1)]
            private = next(((start, p) for start, p in touched if p not in shared), None)
            status, fault = m.dma("dma0", BASE + src, BASE + dst, length)
            if private is None:
                assert (status, fault) == (0, 0)
                image[dst:dst + length] = image[src:src + length]
            else:
                start, p = private
                assert (status, fault) == (7, BASE + max(start, p * PAGE))
            assert m.read_guest(BASE, len(image)) == bytes(image)          # nothing else ever changed
        assert h.shared == len(shared)
    finally:
        m.close()
