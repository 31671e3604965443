"""Malformed descriptor chains and a fuzz run: whatever the driver puts in the rings, the device
answers with used length 0 (or DEVICE_NEEDS_RESET for a broken ring), nothing escapes as a
Python exception, and the next good request still works."""
from __future__ import annotations

import random
import struct
import time

import pytest
from virtio_driver import (
    INDIRECT,
    NEEDS_RESET,
    NEXT,
    QUEUE_NOTIFY,
    WRITE,
    VirtioDriver,
    attach_req,
    detach_req,
    map_req,
    probe_req,
    unmap_req,
)

from devices import virtio_iommu as vi
from vmm.machine import Machine

EP = 2
NOT_RAM = (0x0A000000, 0x0C000000, 1 << 40, 1 << 63, (1 << 64) - 16, (1 << 64) - 1)


@pytest.fixture(scope="module")
def m():
    machine = Machine.from_board("rcar-virt", p2m="scattered")
    yield machine
    machine.close()


@pytest.fixture
def d(m):
    drv = VirtioDriver(m)
    drv.init(events=4)
    yield drv
    drv.reset()


def alive(d) -> None:
    """The device answers a good request and never asked for a reset."""
    assert not d.status & NEEDS_RESET
    assert d.attach(1, EP) == 0
    assert not [r for r in d.m.devices["virtio0"].needs_reset_reasons if "internal" in r]


def body(d, data: bytes, off: int = 0) -> int:
    d.mem_write(d.buf + off, data)
    return d.buf + off


def test_loop(d):
    a = body(d, attach_req(1, EP))
    assert d.raw_chain([(a, 20, NEXT, 1), (a + 64, 4, NEXT | WRITE, 1)]) == [(0, 0)]
    assert d.raw_chain([(a, 20, NEXT, 0)]) == [(0, 0)]
    alive(d)


def test_next_out_of_range_and_head_out_of_range(d):
    a = body(d, attach_req(1, EP))
    assert d.raw_chain([(a, 20, NEXT, 200)]) == [(0, 0)]
    assert d.raw_chain([(a, 20, NEXT, 1), (a + 64, 4, WRITE, 0)], head=100) == [(100, 0)]
    alive(d)


def test_readable_after_writable(d, m):
    a = body(d, attach_req(1, EP))
    d.mem_write(a + 64, b"\xaa" * 4)
    assert d.raw_chain([(a + 64, 4, NEXT | WRITE, 1), (a, 20, 0, 0)]) == [(0, 0)]
    assert d.mem_read(a + 64, 4) == b"\xaa" * 4
    assert m.devices["virtio0"].backend.attached == {}
    alive(d)


def test_buffers_outside_ram(d, m):
    a = body(d, attach_req(1, EP))
    for bad in NOT_RAM:
        assert d.raw_chain([(bad, 20, NEXT, 1), (a + 64, 4, WRITE, 0)]) == [(0, 0)]
        assert d.raw_chain([(a, 20, NEXT, 1), (bad, 4, WRITE, 0)]) == [(0, 0)]
        assert m.devices["virtio0"].backend.attached == {}        # refused before any effect
    alive(d)


def test_oversize_chain(d):
    a = body(d, attach_req(1, EP))
    assert d.raw_chain([(a, 0xFFFFFFFF, NEXT, 1), (a, 0xFFFFFFFF, NEXT, 2), (a + 64, 4, WRITE, 0)]) == [(0, 0)]
    alive(d)


def test_indirect_rules(d):
    a = body(d, attach_req(1, EP))
    t = d.ind
    q = d.reqq
    q.write_desc(0, a, 20, NEXT, 1, table=t)
    q.write_desc(1, a + 64, 4, WRITE, 0, table=t)
    assert d.raw_chain([(t, 32, INDIRECT, 0)]) == [(0, 4)]                      # good
    assert d.raw_chain([(t, 32, INDIRECT | NEXT, 1), (a + 64, 4, WRITE, 0)]) == [(0, 0)]
    for bad_len in (0, 24, 16 * 65):                                              # queue size is 64
        assert d.raw_chain([(t, bad_len, INDIRECT, 0)]) == [(0, 0)]
    # nested indirect
    q.write_desc(0, t, 32, INDIRECT, 0, table=t + 0x100)
    assert d.raw_chain([(t + 0x100, 16, INDIRECT, 0)]) == [(0, 0)]
    # indirect table that loops
    q.write_desc(0, a, 20, NEXT, 1, table=t + 0x200)
    q.write_desc(1, a + 64, 4, WRITE | NEXT, 0, table=t + 0x200)
    assert d.raw_chain([(t + 0x200, 32, INDIRECT, 0)]) == [(0, 0)]
    # indirect table outside RAM
    assert d.raw_chain([(0x0A000000, 32, INDIRECT, 0)]) == [(0, 0)]
    # direct descriptors followed by one indirect descriptor: allowed
    q.write_desc(0, a + 64, 4, WRITE, 0, table=t + 0x300)
    assert d.raw_chain([(a, 20, NEXT, 1), (t + 0x300, 16, INDIRECT, 0)]) == [(0, 4)]
    alive(d)


def test_used_ring_outside_ram_needs_reset_and_recovers(d):
    d.reqq.used = 0x0A000000
    d.reset()
    d.reqq.used = 0x0A000000
    assert d.negotiate()
    d.setup_queue(d.reqq)
    d.w(0x70, 15)
    body(d, attach_req(1, EP))
    d.reqq.write_desc(0, d.buf, 20, NEXT, 1)
    d.reqq.write_desc(1, d.buf + 64, 4, WRITE, 0)
    d.reqq.make_available(0)
    d.w(QUEUE_NOTIFY, 0)
    assert d.status & NEEDS_RESET
    d2 = VirtioDriver(d.m).init(events=1)
    alive(d2)


# -- fuzz ------------------------------------------------------------------------------------------------

def _random_request(rng: random.Random) -> bytes:
    kind = rng.random()
    dom = rng.choice((0, 1, 2, 0xFFFFFFFF, rng.getrandbits(32)))
    ep = rng.choice((EP, EP, 0, 444, rng.getrandbits(32)))
    addr = lambda: rng.choice((0, 0x1000, 0xFEE00000, 1 << 47, (1 << 48) - 0x1000, rng.getrandbits(64),  # noqa: E731
                               rng.getrandbits(20) << 12, rng.getrandbits(64) & ~0xFFF))
    if kind < 0.15:
        return attach_req(dom, ep, rng.choice((0, 0, 1, rng.getrandbits(32))), rng.choice((0, 0, 1)))
    if kind < 0.25:
        return detach_req(dom, ep)
    if kind < 0.55:
        vs = addr()
        ve = rng.choice((vs + 0xFFF, vs + rng.getrandbits(24), addr(), vs - 1)) & ((1 << 64) - 1)
        return map_req(dom, vs, ve, addr(), rng.choice((1, 2, 3, 4, 7, 0, rng.getrandbits(32))))
    if kind < 0.75:
        vs = addr()
        return unmap_req(dom, vs, rng.choice((vs + 0xFFF, addr(), (1 << 64) - 1)) & ((1 << 64) - 1))
    if kind < 0.85:
        return probe_req(ep)
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))


def _fuzz_case(d: VirtioDriver, rng: random.Random, ram_bufs: list[int]) -> None:
    q = d.reqq
    num = q.num
    n_desc = rng.randrange(1, 6)
    descs = []
    for i in range(n_desc):
        r = rng.random()
        if r < 0.75:
            addr = rng.choice(ram_bufs)
        elif r < 0.9:
            addr = rng.choice(NOT_RAM)
        else:
            addr = rng.getrandbits(64)
        length = rng.choice((0, 1, 3, 4, 20, 24, 28, 36, 72, 516, 600, rng.getrandbits(32)))
        flags = rng.choice((NEXT, NEXT, WRITE, WRITE | NEXT, 0, INDIRECT, INDIRECT | NEXT, rng.getrandbits(16)))
        nxt = rng.choice((i + 1, i + 1, i, 0, rng.randrange(num + 8), rng.getrandbits(16)))
        descs.append((addr, length, flags, nxt))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        q.write_desc(i, addr, length, flags, nxt)
    # An indirect table somewhere in RAM with random content
    if rng.random() < 0.3:
        tbl = rng.choice(ram_bufs)
        for i in range(rng.randrange(1, 4)):
            q.write_desc(i, rng.choice(ram_bufs), rng.choice((4, 20, 36, 516)),
                         rng.choice((NEXT, WRITE, NEXT | WRITE, INDIRECT)), rng.randrange(5), table=tbl)
    for b in ram_bufs[:4]:
        d.mem_write(b, _random_request(rng))
    heads = [rng.choice((0, 0, 0, 1, rng.randrange(num), rng.getrandbits(16)))
             for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    for h in heads:
        q.make_available(h)
    if rng.random() < 0.02:                               # a driver that lies about avail idx
        d.mem_write(q.avail + 2, struct.pack("<H", rng.getrandbits(16)))
    d.w(QUEUE_NOTIFY, rng.choice((0, 0, 0, 1, 2, rng.getrandbits(32))))
    if rng.random() < 0.2:                                # DMA through whatever is mapped now
        d.dma(rng.choice((0x100000, 0x600000, 0, rng.getrandbits(64))),
              rng.choice((0x700000, 0x1000, rng.getrandbits(48))), rng.choice((1, 64, 0x1000, 0x10001)))
    if rng.random() < 0.05:
        d.w(0x100 + rng.randrange(48), rng.getrandbits(32), rng.choice((1, 2, 4, 8)))


def test_fuzz_random_chains_and_requests(m):
    """20,000 random chains and bodies (seeded, one machine, device reset between cases)."""
    rng = random.Random(0x5EED)
    d = VirtioDriver(m)
    dev = m.devices["virtio0"]
    ram_bufs = [d.buf + 0x400 * i for i in range(8)]
    cases = 20_000
    t0 = time.perf_counter()
    resets = 0
    for _ in range(cases):
        d.reset()
        d.w(0x100 + 0x24, 0, 1)
        d.init(events=rng.choice((0, 1, 4)))
        if rng.random() < 0.5:
            d.attach(1, EP)                                  # a domain for MAPs to land in
        _fuzz_case(d, rng, ram_bufs)
        resets += bool(d.status & NEEDS_RESET)
    elapsed = time.perf_counter() - t0
    internal = [r for r in dev.needs_reset_reasons if "internal" in r]
    assert internal == []
    dev.needs_reset_reasons.clear()
    d.init(events=1)
    alive(d)
    print(f"fuzz: {cases} cases in {elapsed:.1f} s, {resets} ended in DEVICE_NEEDS_RESET, "
          f"{dev.backend.requests} requests seen")
    assert dev.backend.requests > cases // 2


def test_fuzz_translate_never_raises_other_than_dmafault(m):
    """Random MAPs then random translations straight through the endpoint translator."""
    from vmm.dma import DmaFault

    rng = random.Random(7)
    d = VirtioDriver(m).init(events=2)
    d.attach(1, EP)
    tr = m.devices["virtio0"].translator(EP, m.dom0)
    other = m.devices["virtio0"].translator(99, m.dom0)     # an endpoint the board does not have
    for _ in range(300):
        vs = rng.getrandbits(rng.choice((20, 32, 48))) & ~0xFFF
        d.map(1, vs, vs + (rng.randrange(1, 16) << 12) - 1, rng.getrandbits(27) & ~0xFFF, rng.randrange(4))
    for _ in range(3000):
        t = rng.choice((tr, other))
        iova = rng.choice((rng.getrandbits(64), rng.getrandbits(32), (1 << 64) - 1, 0xFEE00000))
        try:
            runs = t.translate(iova, rng.choice((1, 4096, 1 << 20)), rng.random() < 0.5)
            assert all(n > 0 for _, n in runs)
        except DmaFault as e:
            assert e.status in (2, 3)
    d.reset()
    assert vi.FEATURES == 0x1_3000_0077
