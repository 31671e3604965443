"""virtio-iommu requests, probe, bypass, DMA through endpoint 2 and fault events: every rule of
the issue-6 contract with the values read back (statuses, used lengths, fault records, bytes).
Driven from Python with no CPU (tests/virtio_driver.py)."""
from __future__ import annotations

import pytest
from virtio_driver import (
    VirtioDriver,
    attach_req,
    detach_req,
    map_req,
    probe_req,
    unmap_req,
)

from devices import virtio_iommu as vi
from devices.virtio_iommu import (
    S_INVAL,
    S_NOENT,
    S_NOMEM,
    S_OK,
    S_RANGE,
    IntervalMap,
)
from vmm import board as boards
from vmm.machine import Machine

G = 0x1000
EP = 2
R, W, RW = vi.MAP_F_READ, vi.MAP_F_WRITE, vi.MAP_F_READ | vi.MAP_F_WRITE
F_ADDR = vi.FAULT_F_ADDRESS
SRC, DST = 0x00600000, 0x00700000          # guest buffers for DMA tests (GPAs)


@pytest.fixture(scope="module", params=["direct", "scattered"])
def m(request):
    machine = Machine.from_board("rcar-virt", p2m=request.param)
    yield machine
    machine.close()


@pytest.fixture
def d(m):
    drv = VirtioDriver(m)
    drv.reset()
    drv.w(0x100 + 0x24, 0, 1)
    drv.init(events=8)
    yield drv
    drv.reset()


def dev(m) -> vi.VirtioIommu:
    return m.devices["virtio0"].backend


def smap(d, dom, a, b, phys):
    """A map of QEMU's qtest scaled by the granule: map(a, b) -> [a*G, (b+1)*G - 1]."""
    return d.map(dom, a * G, (b + 1) * G - 1, phys, R)


def sunmap(d, dom, a, b):
    return d.unmap(dom, a * G, (b + 1) * G - 1)


# -- QEMU qtest sequences ------------------------------------------------------------------------

def test_qtest_attach_detach(d, m):
    assert d.attach(0, EP) == S_OK
    assert d.attach(0, 444) == S_NOENT
    assert d.detach(0, 1) == S_NOENT
    assert d.attach(1, EP) == S_OK                      # implicit move 0 -> 1
    assert 0 not in dev(m).domains                      # old domain died when empty
    assert d.map(0, 0, 0xFFF, 0xA1000, R) == S_NOENT
    assert d.detach(0, EP) == S_INVAL                   # wrong domain
    assert d.detach(1, EP) == S_OK
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x0, 0xFFF, 0xA1000, R) == S_OK
    assert d.map(1, 0x2000, 0x2FFF, 0xB1000, R) == S_OK
    assert d.detach(1, EP) == S_OK                      # domain with live mappings destroyed
    assert dev(m).domains == {}
    assert d.map(1, 0x0, 0xFFF, 0xA1000, R) == S_NOENT


def test_qtest_map_unmap(d):
    assert d.attach(1, EP) == S_OK
    assert d.map(0, 0, 0xFFF, 0xA1000, R) == S_NOENT
    assert d.map(1, 0, 0xFFF, 0xA1000, R) == S_OK
    assert d.map(1, 0, 0xFFFF, 0xB1000, R) == S_INVAL   # overlap
    assert d.unmap(4, 0x10, 0xFFF) == S_NOENT
    assert d.unmap(1, 0x10, 0xFFF) == S_RANGE           # would split
    assert d.unmap(1, 0, 0x1000) == S_OK                # spills over, removes [0, 0xFFF]
    # spec examples, scaled by the granule
    assert sunmap(d, 1, 0, 4) == S_OK                                               # ex.1
    assert smap(d, 1, 0, 9, 0xA1000) == S_OK and sunmap(d, 1, 0, 9) == S_OK         # ex.2
    assert smap(d, 1, 0, 4, 0xB1000) == S_OK and smap(d, 1, 5, 9, 0xB2000) == S_OK  # ex.3
    assert sunmap(d, 1, 0, 9) == S_OK
    assert smap(d, 1, 0, 9, 0xC1000) == S_OK                                        # ex.4
    assert sunmap(d, 1, 0, 4) == S_RANGE
    assert sunmap(d, 1, 0, 10) == S_OK
    assert smap(d, 1, 0, 4, 0xD1000) == S_OK and smap(d, 1, 5, 9, 0xD2000) == S_OK  # ex.5
    assert sunmap(d, 1, 0, 4) == S_OK and sunmap(d, 1, 5, 9) == S_OK
    assert smap(d, 1, 0, 4, 0xE2000) == S_OK and sunmap(d, 1, 0, 9) == S_OK         # ex.6
    assert smap(d, 1, 0, 4, 0xF2000) == S_OK and smap(d, 1, 10, 14, 0xF3000) == S_OK  # ex.7
    assert sunmap(d, 1, 0, 14) == S_OK
    assert smap(d, 1, 10, 14, 0xF3000) == S_OK and smap(d, 1, 0, 4, 0xF2000) == S_OK
    assert sunmap(d, 1, 0, 4) == S_OK
    assert smap(d, 1, 10, 14, 0xF3000) == S_INVAL       # still mapped
    assert d.map(1, 0, 4, 0xA1000, R) == S_RANGE        # QEMU's unscaled byte ranges: off the granule


# -- ATTACH / DETACH ---------------------------------------------------------------------------------

def test_attach_rules(d, m):
    assert d.attach(1, EP, reserved=1) == S_INVAL
    assert d.attach(1, EP, flags=2) == S_INVAL           # unknown flag
    assert d.attach(1, EP, flags=1 << 31) == S_INVAL
    assert dev(m).attached == {}
    assert d.attach(1, 7) == S_NOENT                     # only endpoint 2 exists on rcar-virt
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0, G - 1, 0x1000, R) == S_OK
    assert d.attach(1, EP) == S_OK                       # already there: nothing changes
    assert len(dev(m).domains[1].mappings) == 1
    assert d.attach(2, EP, flags=vi.ATTACH_F_BYPASS) == S_OK   # move into a bypass domain
    assert set(dev(m).domains) == {2} and dev(m).domains[2].bypass
    assert d.attach(2, EP, flags=0) == S_INVAL           # type mismatch with the existing domain
    assert dev(m).attached[EP].id == 2                   # ... and nothing moved


def test_attach_bypass_flag_needs_bypass_config(d):
    d.init(features=vi.FEATURES & ~vi.F_BYPASS_CONFIG, events=0)
    assert d.attach(1, EP, flags=vi.ATTACH_F_BYPASS) == S_INVAL
    assert d.attach(1, EP) == S_OK


def test_detach_rules(d):
    assert d.detach(1, 444) == S_NOENT                   # unknown endpoint
    assert d.detach(1, EP) == S_INVAL                    # unknown domain / never attached
    assert d.attach(1, EP) == S_OK
    assert d.detach(5, EP) == S_INVAL                    # unknown domain
    assert d.attach(1, EP) == S_OK
    # reserved bytes are ignored
    body = bytearray(detach_req(1, EP))
    body[12:20] = b"\xff" * 8
    used, tail = d.request(bytes(body))
    assert (used, tail) == (4, b"\0\0\0\0")
    assert d.detach(1, EP) == S_INVAL                    # now not attached


def test_device_reset_detaches_everything(d, m):
    assert d.attach(3, EP) == S_OK
    assert d.map(3, 0, G - 1, 0, R) == S_OK
    d.init(events=0)
    assert dev(m).domains == {} and dev(m).attached == {}
    assert d.map(3, 0, G - 1, 0, R) == S_NOENT


# -- MAP / UNMAP ----------------------------------------------------------------------------------------

def test_map_rules(d):
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x1001, 0x1FFF, 0x1000, R) == S_RANGE          # virt_start off granule
    assert d.map(1, 0x1000, 0x1FFE, 0x1000, R) == S_RANGE          # virt_end + 1 off granule
    assert d.map(1, 0x1000, 0x1FFF, 0x1800, R) == S_RANGE          # phys off granule
    assert d.map(1, 0x2000, 0x1FFF, 0x1000, R) == S_INVAL          # end before start
    assert d.map(1, 1 << 48, (1 << 48) + G - 1, 0, R) == S_RANGE   # outside input_range
    assert d.map(1, (1 << 48) - G, (1 << 48) + G - 1, 0, R) == S_RANGE
    assert d.map(1, 0, G - 1, (1 << 64) - G, R) == S_OK            # last phys page is fine
    assert d.map(1, G, 2 * G - 1, (1 << 64) - G, R) == S_OK
    assert d.map(1, 2 * G, 4 * G - 1, (1 << 64) - G, R) == S_RANGE  # phys wraps 2^64
    for bad in (1 << 3, 1 << 4, 1 << 31):
        assert d.map(1, 0x10000, 0x10FFF, 0, bad | R) == S_INVAL   # unknown flag
    assert d.map(1, 0x10000, 0x10FFF, 0, vi.MAP_F_MMIO | R) == S_OK  # F_MMIO negotiated
    assert d.map(1, 0x10000, 0x10FFF, 0, R) == S_INVAL             # overlap
    assert d.map(1, 0xF000, 0x10FFF, 0, R) == S_INVAL              # partial overlap
    assert d.map(1, 0xFEE00000, 0xFEE00FFF, 0, R) == S_INVAL       # RESV_MEM MSI window
    assert d.map(1, 0, G - 1, 0, 0) == S_INVAL                     # overlaps [0, G-1]
    assert d.map(2, 0x20000, 0x20FFF, 0, R) == S_NOENT             # unknown domain
    assert d.map(1, 0x20000, 0x20FFF, 0, 0) == S_OK                # no permission at all is legal


def test_map_mmio_flag_needs_f_mmio(d):
    d.init(features=vi.FEATURES & ~vi.F_MMIO, events=0)
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0, G - 1, 0, vi.MAP_F_MMIO | R) == S_INVAL


def test_map_unmap_on_bypass_domain(d):
    assert d.attach(9, EP, flags=vi.ATTACH_F_BYPASS) == S_OK
    assert d.map(9, 0, G - 1, 0, R) == S_INVAL
    assert d.unmap(9, 0, G - 1) == S_INVAL


def test_unmap_rules(d, m):
    assert d.attach(1, EP) == S_OK
    assert d.unmap(2, 0, G - 1) == S_NOENT
    assert d.map(1, 0x10000, 0x13FFF, 0x10000, R) == S_OK
    assert d.map(1, 0x20000, 0x20FFF, 0x20000, R) == S_OK
    assert d.unmap(1, 0x11000, 0x30000) == S_RANGE                 # would split the first
    assert d.unmap(1, 0x0, 0x12FFF) == S_RANGE                     # would split at the end
    assert len(dev(m).domains[1].mappings) == 2                    # nothing removed
    assert d.unmap(1, 0x0, 0x1FFFF) == S_OK                        # removes only the first
    assert [e[0] for e in dev(m).domains[1].mappings] == [0x20000]
    assert d.unmap(1, 0x21000, 0x20000) == S_INVAL                 # end before start
    assert d.unmap(1, 0, (1 << 64) - 1) == S_OK                    # everything
    assert len(dev(m).domains[1].mappings) == 0


def test_one_gib_map_is_one_entry(d, m):
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 1 << 30, (2 << 30) - 1, 0, RW) == S_OK
    maps = dev(m).domains[1].mappings
    assert len(maps) == 1 and list(maps) == [(1 << 30, (2 << 30) - 1, 0, RW)]
    assert d.map(1, (2 << 30) - G, (2 << 30) - 1, 0, R) == S_INVAL
    assert d.unmap(1, 1 << 30, (2 << 30) - 2) == S_RANGE


def test_the_default_cap_is_a_million_mappings_per_domain():
    """The real cap: 999,999 mappings put in place inside the device (a request each would take
    minutes), then the driver's requests find the 1,000,000th accepted and the next refused."""
    m = Machine.from_board("rcar-virt")
    try:
        d = VirtioDriver(m).init()
        assert d.attach(1, EP) == S_OK
        maps = dev(m).domains[1].mappings
        assert dev(m).max_mappings == 1_000_000
        for i in range(999_999):
            maps.insert(i * 0x2000, i * 0x2000 + 0xFFF, 0, vi.MAP_F_READ)
        assert len(maps) == 999_999
        top = 999_999 * 0x2000
        assert d.map(1, top, top + 0xFFF, 0, R) == S_OK            # the millionth
        assert d.map(1, top + 0x2000, top + 0x2FFF, 0, R) == S_NOMEM
        assert d.unmap(1, 0, 0xFFF) == S_OK
        assert d.map(1, top + 0x2000, top + 0x2FFF, 0, R) == S_OK
        assert len(maps) == 1_000_000
    finally:
        m.close()


def test_max_mappings_nomem():
    spec = boards.load_board("rcar-virt")
    next(dv for dv in spec.devices if dv["name"] == "virtio0")["max_mappings"] = 3
    m = Machine(spec)
    try:
        d = VirtioDriver(m).init()
        assert d.attach(1, EP) == S_OK
        for i in range(3):
            assert d.map(1, i * G, i * G + G - 1, 0, R) == S_OK
        assert d.map(1, 8 * G, 9 * G - 1, 0, R) == S_NOMEM
        assert d.unmap(1, 0, G - 1) == S_OK
        assert d.map(1, 8 * G, 9 * G - 1, 0, R) == S_OK
    finally:
        m.close()


def test_interval_map_many_entries():
    """Chunk splits and range removal across chunks keep the structure exact."""
    im = IntervalMap()
    n = 5000
    for i in reversed(range(n)):                      # worst order for a plain list
        im.insert(2 * i * G, (2 * i + 1) * G - 1, i, 1)
    assert len(im) == n and len(im._firsts) > 2
    assert im.find(2 * 1234 * G + 5)[2] == 1234
    assert im.find((2 * 1234 + 1) * G) is None
    assert im.overlaps((2 * 10 + 1) * G, (2 * 11) * G) and not im.overlaps((2 * 10 + 1) * G, (2 * 11) * G - 1)
    assert im.remove_range(2 * 100 * G, 2 * 3000 * G - 1) == 2900
    assert len(im) == n - 2900
    assert [e[2] for e in im][:101] == list(range(100)) + [3000]
    assert im.remove_range(0, (1 << 64) - 1) == n - 2900
    assert len(im) == 0 and im.floor(1 << 40) is None


# -- PROBE ---------------------------------------------------------------------------------------------

def test_probe_endpoint(d):
    used, buf = d.probe(EP)
    assert used == 512 + 4
    assert vi.RESV_MEM.unpack(buf[:24]) == (1, 20, 1, 0xFEE00000, 0xFEEFFFFF)
    assert buf[24:512] == bytes(488)
    assert buf[512:] == b"\0\0\0\0"


def test_probe_unknown_endpoint_noent_full_length(d):
    used, buf = d.probe(444)
    assert used == 516 and buf[:512] == bytes(512) and buf[512:] == bytes([S_NOENT, 0, 0, 0])


def test_probe_buffer_shapes(d):
    # larger writable part: only probe_size + 4 used
    used, buf = d.probe(EP, wlen=600)
    assert used == 516 and buf[512] == S_OK and buf[516:] == b"\xaa" * 84
    # the tail follows probe_size bytes of properties: a smaller writable part cannot hold it,
    # so the request is unanswered (used length 0, nothing written), for any endpoint
    for wlen in (3, 4, 100, 515):
        for ep in (EP, 444):
            used, buf = d.probe(ep, wlen=wlen)
            assert used == 0 and buf == b"\xaa" * wlen
    # body too short (reserved[64] missing) but the tail can be located: INVAL, full length
    used, buf = d.request(probe_req(EP)[:8], 516)
    assert used == 516 and buf[512] == S_INVAL and buf[:512] == bytes(512)
    # reserved bytes are ignored
    body = bytearray(probe_req(EP))
    body[8:72] = b"\x5a" * 64
    used, buf = d.request(bytes(body), 516)
    assert used == 516 and buf[512] == S_OK and buf[0] == 1


# -- request framing -------------------------------------------------------------------------------------

def test_unknown_request_type(d):
    for t in (0, 6, 7, 0x80, 0xFF):
        used, tail = d.request(bytes([t]) + bytes(35), 4)
        assert used == 0 and tail == b"\xaa" * 4


def test_request_too_small_for_tail(d, m):
    used, tail = d.request(attach_req(1, EP), 3)
    assert used == 0 and tail == b"\xaa" * 3
    used, _ = d.request(attach_req(1, EP), 0)
    assert used == 0
    assert dev(m).attached == {}                          # not executed either
    used, tail = d.request(b"\x01\0", 4)                  # head incomplete
    assert used == 0 and tail == b"\xaa" * 4


def test_short_body_is_inval(d, m):
    used, tail = d.request(attach_req(1, EP)[:12], 4)
    assert (used, tail) == (4, bytes([S_INVAL, 0, 0, 0]))
    used, tail = d.request(map_req(1, 0, G - 1, 0)[:35], 4)
    assert (used, tail) == (4, bytes([S_INVAL, 0, 0, 0]))
    assert dev(m).attached == {}


def test_head_reserved_ignored_and_tail_reserved_zeroed(d):
    body = bytearray(attach_req(1, EP))
    body[1:4] = b"\xff\xff\xff"
    assert d.request(bytes(body), 4) == (4, b"\0\0\0\0")


def test_larger_writable_part_uses_first_four_bytes(d):
    used, buf = d.request(attach_req(1, EP), 16)
    assert used == 4 and buf[:4] == b"\0\0\0\0" and buf[4:] == b"\xaa" * 12


def test_framing_independent_of_descriptor_boundaries(d, m):
    """A MAP split over three readable descriptors and a tail split over two writable ones."""
    assert d.attach(1, EP) == S_OK
    body = map_req(1, 0x5000, 0x5FFF, 0x9000, R)
    b = d.buf
    d.mem_write(b, body[:5])
    d.mem_write(b + 0x100, body[5:20])
    d.mem_write(b + 0x200, body[20:])
    d.mem_write(b + 0x300, b"\xaa" * 8)
    used = d.raw_chain([(b, 5, 1, 1), (b + 0x100, 15, 1, 2), (b + 0x200, 16, 1, 3),
                        (b + 0x300, 1, 3, 4), (b + 0x301, 3, 2, 0)])
    assert used == [(0, 4)]
    assert d.mem_read(b + 0x300, 5) == b"\0\0\0\0\xaa"
    assert list(dev(m).domains[1].mappings) == [(0x5000, 0x5FFF, 0x9000, R)]


def test_batch_of_requests_one_notification(d, m):
    reqs = [(attach_req(1, EP), 4)] + [(map_req(1, i * G, i * G + G - 1, i * G, R), 4) for i in range(20)]
    reqs += [(unmap_req(1, 0, 10 * G - 1), 4), (detach_req(1, EP), 4), (probe_req(EP), 516)]
    res = d.submit(reqs, indirect=True)
    assert [u for u, _ in res] == [4] * 23 + [516]
    assert all(buf[-4:] == b"\0\0\0\0" for _, buf in res)


# -- DMA, bypass and faults ----------------------------------------------------------------------------

def fill(m, gpa, n, seed):
    data = bytes((seed + 7 * i) & 0xFF for i in range(n))
    m.dom0.write(gpa, data)
    return data


def test_unattached_no_bypass_domain_fault(d, m):
    assert d.dma(SRC, DST, 64) == (2, SRC)
    ev = d.events()
    assert len(ev) == 1
    f = ev[0]
    assert (f.reason, f.flags, f.endpoint, f.address) == (vi.FAULT_R_DOMAIN, vi.FAULT_F_READ | F_ADDR, EP, SRC)
    assert f.raw[1:4] == b"\0\0\0" and f.raw[12:16] == b"\0\0\0\0"


def test_bypass_config_identity(d, m):
    data = fill(m, SRC, 256, 3)
    d.w(0x100 + 0x24, 1, 1)
    try:
        assert d.dma(SRC, DST, 256) == (0, 0)
        assert m.dom0.read(DST, 256) == data
        assert d.events() == []
        assert d.attach(1, EP) == S_OK                       # attached: bypass no longer applies
        assert d.dma(SRC, DST, 16) == (2, SRC)
        assert d.events()[0].reason == vi.FAULT_R_MAPPING
    finally:
        d.w(0x100 + 0x24, 0, 1)


def test_bypass_domain_identity(d, m):
    data = fill(m, SRC, 300, 9)
    assert d.attach(4, EP, flags=vi.ATTACH_F_BYPASS) == S_OK
    assert d.dma(SRC, DST + 8, 300) == (0, 0)
    assert m.dom0.read(DST + 8, 300) == data
    assert d.detach(4, EP) == S_OK
    assert d.dma(SRC, DST, 1) == (2, SRC)                   # detached, bypass 0: no access
    assert d.events()[0].reason == vi.FAULT_R_DOMAIN


def test_dma_through_mappings(d, m):
    """IOVA -> GPA via the domain, then GPA -> machine via the P2M (scattered included): a copy
    spanning several mappings and pages lands byte-exact."""
    data = fill(m, SRC, 3 * G, 1)
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x100000, 0x101FFF, SRC, R) == S_OK            # two mappings back to back
    assert d.map(1, 0x102000, 0x102FFF, SRC + 2 * G, R) == S_OK
    assert d.map(1, 0x200000, 0x203FFF, DST, RW) == S_OK
    assert d.dma(0x100010, 0x200020, 3 * G - 16) == (0, 0)
    assert m.dom0.read(DST + 0x20, 3 * G - 16) == data[0x10:]
    assert d.events() == []


def test_permission_faults(d, m):
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x100000, 0x100FFF, SRC, R) == S_OK
    assert d.map(1, 0x200000, 0x200FFF, DST, W) == S_OK            # write-only
    assert d.map(1, 0x300000, 0x300FFF, DST, 0) == S_OK            # no access
    before = m.dom0.read(SRC, 64)
    assert d.dma(0x200000, 0x100000, 64) == (3, 0x200000)         # read of a WRITE-only mapping
    assert d.dma(0x100000, 0x100000, 64) == (3, 0x100000)         # write to a READ-only mapping
    assert d.dma(0x300000, 0x200000, 64) == (3, 0x300000)
    assert m.dom0.read(SRC, 64) == before
    ev = d.events()
    assert [(e.reason, e.flags, e.endpoint, e.address) for e in ev] == [
        (2, vi.FAULT_F_READ | F_ADDR, EP, 0x200000),
        (2, vi.FAULT_F_WRITE | F_ADDR, EP, 0x100000),
        (2, vi.FAULT_F_READ | F_ADDR, EP, 0x300000)]


def test_one_fault_per_failed_copy_first_failing_page(d, m):
    """The engine translates the source then the destination and stops at the first failing
    page: one event, at the first byte of that page the copy touches; nothing is written."""
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x100000, 0x101FFF, SRC, R) == S_OK
    assert d.map(1, 0x200000, 0x200FFF, DST, RW) == S_OK
    m.dom0.write(DST, b"\x11" * 0x1000)
    assert d.dma(0x101800, 0x200000, 0x1000) == (2, 0x102000)     # source runs off its mapping
    assert d.dma(0x100000, 0x200800, 0x1000) == (2, 0x201000)     # destination runs off
    assert d.dma(0x500123, 0x700000, 0x10) == (2, 0x500123)       # both bad: source reported, its first byte
    assert m.dom0.read(DST, 0x1000) == b"\x11" * 0x1000
    ev = d.events()
    assert [(e.flags, e.address) for e in ev] == [
        (vi.FAULT_F_READ | F_ADDR, 0x102000), (vi.FAULT_F_WRITE | F_ADDR, 0x201000),
        (vi.FAULT_F_READ | F_ADDR, 0x500123)]


def test_unmap_takes_effect_immediately(d, m):
    fill(m, SRC, 64, 5)
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x100000, 0x100FFF, SRC, RW) == S_OK
    assert d.dma(0x100000, 0x100800, 64) == (0, 0)
    assert d.unmap(1, 0x100000, 0x100FFF) == S_OK
    assert d.dma(0x100000, 0x100800, 64) == (2, 0x100000)
    assert len(d.events()) == 1


def test_mapping_to_non_ram_gpa(d, m):
    """The IOMMU translates, the P2M refuses: STATUS 2 at the IOVA, no virtio-iommu event."""
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0x100000, 0x100FFF, 0x0C000000, RW) == S_OK   # sysinfo MMIO, not RAM
    assert d.map(1, 0x200000, 0x200FFF, DST, RW) == S_OK
    assert d.dma(0x100000, 0x200000, 16) == (2, 0x100000)
    assert d.events() == []


def test_fault_events_dropped_without_buffers(d, m):
    d.init(events=0)
    before = dev(m).events_dropped
    assert d.dma(SRC, DST, 8) == (2, SRC)
    assert dev(m).events_dropped == before + 1
    d.post_events(1)
    assert d.dma(SRC, DST, 8) == (2, SRC)                # buffer taken though it was posted earlier
    assert len(d.events()) == 1
    assert d.dma(SRC, DST, 8) == (2, SRC)                # none left again
    assert dev(m).events_dropped == before + 2 and d.events() == []


def test_event_buffer_taken_without_notify(d, m):
    d.init(events=0)
    q = d.evtq
    q.write_desc(0, d.evbuf, 24, 2)
    q.make_available(0)                                   # no QueueNotify
    assert d.dma(SRC, DST, 8) == (2, SRC)
    ev = d.events()
    assert len(ev) == 1 and ev[0].address == SRC


def test_too_small_event_buffer(d, m):
    d.init(events=0)
    d.post_events(1, size=16)
    before = dev(m).events_dropped
    assert d.dma(SRC, DST, 8) == (2, SRC)
    assert [e.raw for e in d.events()] == [b""]           # returned with used length 0
    assert dev(m).events_dropped == before + 1


def test_event_interrupt(d, m):
    d.ack()
    assert d.dma(SRC, DST, 8) == (2, SRC)
    assert d.r(0x60) & 1 and m.irqs.lines[16].level
    d.ack()
    assert not m.irqs.lines[16].level


def test_events_before_driver_ok_are_dropped(d, m):
    d.reset()
    before = dev(m).events_dropped
    assert d.dma(SRC, DST, 8) == (2, SRC)
    assert dev(m).events_dropped == before + 1


def test_msi_window_is_identity(d, m):
    """DMA to the RESV_MEM MSI window bypasses translation; on rcar-virt nothing is there, so
    the P2M refuses it (STATUS 2) without a virtio-iommu fault event."""
    assert d.attach(1, EP) == S_OK
    assert d.map(1, 0, G - 1, SRC, R) == S_OK
    assert d.dma(0, 0xFEE00000, 4) == (2, 0xFEE00000)
    assert d.events() == []
