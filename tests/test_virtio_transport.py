"""virtio-mmio v2 transport and split virtqueues: registers, negotiation, queues, interrupts,
notification suppression and DEVICE_NEEDS_RESET, driven from Python with no CPU."""
from __future__ import annotations

import struct

import pytest
from virtio_driver import (
    ACK,
    BASE,
    CONFIG,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DEVICE_ID,
    DRIVER,
    DRIVER_OK,
    F_EVENT_IDX,
    F_INDIRECT,
    F_VERSION_1,
    FEATURES_OK,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    MAGIC,
    NEEDS_RESET,
    QUEUE_NOTIFY,
    QUEUE_NUM,
    QUEUE_NUM_MAX,
    QUEUE_READY,
    QUEUE_SEL,
    STATUS,
    VENDOR_ID,
    VERSION,
    VirtioDriver,
    attach_req,
)

from devices import virtio_iommu as vi
from vmm import board as boards
from vmm.machine import Machine

IRQ = 16


@pytest.fixture(scope="module")
def m():
    machine = Machine.from_board("rcar-virt")
    yield machine
    machine.close()


@pytest.fixture
def drv(m):
    d = VirtioDriver(m)
    d.reset()
    d.w(CONFIG + 0x24, 0, 1)
    yield d
    d.reset()


def test_identity_registers(m):
    for slot in range(8):
        base = BASE + 0x200 * slot
        assert m.mmio_read(base + MAGIC, 4) == 0x74726976
        assert m.mmio_read(base + VERSION, 4) == 2
        assert m.mmio_read(base + DEVICE_ID, 4) == (23 if slot == 0 else 0)
    # An empty slot offers no queue and no feature.
    assert m.mmio_read(BASE + 0x200 + QUEUE_NUM_MAX, 4) == 0
    assert m.mmio_read(BASE + 0x200 + DEVICE_FEATURES, 4) == 0
    assert m.mmio_read(BASE + VENDOR_ID, 4) != 0


def test_features_words(drv):
    drv.w(DEVICE_FEATURES_SEL, 0)
    assert drv.r(DEVICE_FEATURES) == 0x300000F7          # bit 7: F_ATTACH_TABLE (DESIGN section 6)
    drv.w(DEVICE_FEATURES_SEL, 1)
    assert drv.r(DEVICE_FEATURES) == 0x1
    drv.w(DEVICE_FEATURES_SEL, 2)
    assert drv.r(DEVICE_FEATURES) == 0
    drv.w(DEVICE_FEATURES_SEL, 0)
    assert not drv.r(DEVICE_FEATURES) & (1 << vi.F_BYPASS.bit_length() - 1)   # never legacy F_BYPASS


def test_queue_num_max(drv):
    for q, expect in ((0, 256), (1, 256), (2, 0), (7, 0)):
        drv.w(QUEUE_SEL, q)
        assert drv.r(QUEUE_NUM_MAX) == expect


def test_non_32bit_register_access_is_harmless(drv):
    assert drv.r(MAGIC, 2) == 0
    drv.w(STATUS, ACK, 1)
    assert drv.r(STATUS) == 0


def test_features_ok_refused_without_version_1_or_with_unknown_bits(drv):
    assert not drv.negotiate(vi.FEATURES & ~F_VERSION_1)
    assert drv.status == ACK | DRIVER
    drv.reset()
    assert not drv.negotiate(vi.FEATURES | (1 << 3))            # legacy F_BYPASS is not offered
    drv.reset()
    assert drv.negotiate(F_VERSION_1 | vi.F_MAP_UNMAP)
    assert drv.status == ACK | DRIVER | FEATURES_OK


def test_status_zero_resets_everything(drv, m):
    drv.init(events=2)
    assert drv.attach(1) == 0
    assert m.devices["virtio0"].backend.attached
    drv.w(STATUS, 0)
    assert drv.status == 0
    for q in (0, 1):
        drv.w(QUEUE_SEL, q)
        assert drv.r(QUEUE_READY) == 0
    assert drv.r(INTERRUPT_STATUS) == 0
    assert not m.devices["virtio0"].backend.attached and not m.devices["virtio0"].backend.domains


def test_requests_ignored_before_driver_ok(drv):
    drv.reset()
    assert drv.negotiate()
    drv.setup_queue(drv.reqq)
    drv.setup_queue(drv.evtq)
    drv.reqq.write_desc(0, drv.buf, 20, 1, 1)
    drv.reqq.write_desc(1, drv.buf + 32, 4, 2, 0)
    drv.mem_write(drv.buf, attach_req(1, 2))
    drv.reqq.make_available(0)
    drv.w(QUEUE_NOTIFY, 0)
    assert drv.reqq.used_idx() == 0                     # nothing consumed before DRIVER_OK
    drv.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    drv.w(QUEUE_NOTIFY, 0)
    assert drv.reqq.take_used() == [(0, 4)]


def test_invalid_queue_size_needs_reset(drv):
    drv.reset()
    assert drv.negotiate()
    for bad in (0, 3, 512):
        drv.w(QUEUE_SEL, 0)
        drv.w(QUEUE_NUM, bad)
        drv.w(QUEUE_READY, 1)
        assert drv.r(QUEUE_READY) == 0
        assert drv.status & NEEDS_RESET
        drv.reset()
        assert drv.negotiate()


def test_used_buffer_interrupt_and_ack(drv, m):
    """A request answered on a queue whose driver did not suppress interrupts sets bit 0 and
    raises IRQ 16; INTERRUPT_ACK lowers it."""
    drv.init()
    edges = []
    m.irqs.listeners.append(lambda n, lvl: edges.append((n, lvl)))
    try:
        assert drv.attach(1) == 0
        assert drv.r(INTERRUPT_STATUS) == 1 and m.irqs.lines[IRQ].level
        drv.w(INTERRUPT_ACK, 1)
        assert drv.r(INTERRUPT_STATUS) == 0 and not m.irqs.lines[IRQ].level
        assert edges == [(IRQ, True), (IRQ, False)]
    finally:
        m.irqs.listeners.pop()


def test_no_interrupt_flag_suppresses(drv, m):
    drv.init(features=vi.FEATURES & ~F_EVENT_IDX)
    assert drv.attach(1) == 0
    assert drv.ack() == 1
    drv.reqq.set_avail_flags(1)                          # VRING_AVAIL_F_NO_INTERRUPT
    assert drv.attach(1) == 0
    assert drv.r(INTERRUPT_STATUS) == 0 and not m.irqs.lines[IRQ].level


def test_event_idx_suppression(drv, m):
    """With EVENT_IDX the device interrupts only when used idx crosses used_event, ignores
    NO_INTERRUPT, and publishes avail_event = its next avail index."""
    drv.init(features=vi.FEATURES)
    q = drv.reqq
    q.set_avail_flags(1)                                 # ignored under EVENT_IDX
    q.set_used_event(0)                                  # interrupt after the 1st buffer
    assert drv.attach(1) == 0
    assert drv.ack() == 1
    assert q.avail_event() == 1
    q.set_used_event(2)                                  # wants an interrupt when used idx passes 2
    assert drv.attach(1) == 0                            # used idx 1 -> 2: no
    assert drv.r(INTERRUPT_STATUS) == 0
    assert drv.attach(1) == 0                            # 2 -> 3: crosses 2 -> yes
    assert drv.ack() == 1
    q.set_used_event(100)
    res = drv.submit([(attach_req(1, 2), 4)] * 4)        # 3 -> 7: no
    assert [r[0] for r in res] == [4] * 4 and drv.r(INTERRUPT_STATUS) == 0
    q.set_used_event(8)
    res = drv.submit([(attach_req(1, 2), 4)] * 4)        # 7 -> 11 crosses 8 in one batch
    assert drv.ack() == 1
    assert q.avail_event() == 11


def test_indirect_requires_negotiation(drv):
    drv.init(features=vi.FEATURES & ~F_INDIRECT)
    used, tail = drv.request(attach_req(1, 2), 4, indirect=True)
    assert used == 0 and tail == b"\xaa" * 4
    drv.init(features=vi.FEATURES)
    used, tail = drv.request(attach_req(1, 2), 4, indirect=True)
    assert (used, tail) == (4, b"\0\0\0\0")


def test_avail_index_too_far_ahead_needs_reset(drv, m):
    drv.init()
    drv.mem_write(drv.reqq.avail + 2, struct.pack("<H", 1000))
    drv.w(QUEUE_NOTIFY, 0)
    assert drv.status & NEEDS_RESET
    assert drv.r(INTERRUPT_STATUS) & 2 and m.irqs.lines[IRQ].level     # config-change interrupt
    drv.w(QUEUE_NOTIFY, 0)                               # ignored until reset
    drv.init()
    assert drv.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert drv.attach(1) == 0


def test_ring_outside_ram_needs_reset(drv):
    drv.reset()
    assert drv.negotiate()
    drv.reqq.avail = 0x0A000000                           # the device window, not RAM
    drv.setup_queue(drv.reqq)
    drv.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    drv.w(QUEUE_NOTIFY, 0)
    assert drv.status & NEEDS_RESET


def test_config_space_reads(drv):
    c = drv.config
    assert c(0x00, 8) == 0xFFFFFFFFFFFFF000
    assert (c(0x00, 4), c(0x04, 4)) == (0xFFFFF000, 0xFFFFFFFF)
    assert c(0x08, 8) == 0 and c(0x10, 8) == (1 << 48) - 1
    assert (c(0x10, 4), c(0x14, 4)) == (0xFFFFFFFF, 0xFFFF)
    assert c(0x18, 4) == 0 and c(0x1C, 4) == 0xFFFFFFFF
    assert c(0x20, 4) == 512
    assert c(0x24, 1) == 0
    assert c(0x28, 4) == 0                               # beyond the 40-byte config
    # ConfigGeneration: config changes only by driver writes, so it never moves (never torn)
    before = drv.r(0x0FC)
    drv.w(CONFIG + 0x24, 1, 1)
    assert c(0x24, 1) == 1
    assert drv.r(0x0FC) == before == 0


def test_bypass_config_writes(drv):
    drv.w(CONFIG + 0x24, 1, 1)
    assert drv.config(0x24, 1) == 1
    drv.w(CONFIG + 0x24, 2, 1)                           # only 0/1 are ever presented
    assert drv.config(0x24, 1) == 1
    drv.w(CONFIG + 0x20, 7, 4)                           # probe_size is read-only
    assert drv.config(0x20, 4) == 512
    drv.w(STATUS, 0)                                     # device reset keeps bypass
    assert drv.config(0x24, 1) == 1
    drv.w(CONFIG + 0x24, 0, 1)
    assert drv.config(0x24, 1) == 0


def test_boot_bypass_board_option():
    spec = boards.load_board("rcar-virt")
    spec.boot_bypass = True
    m = Machine(spec)
    try:
        d = VirtioDriver(m)
        assert d.config(0x24, 1) == 1
        d.init(events=2)
        m.dom0.write(0x300000, b"identity")
        assert d.dma(0x300000, 0x301000, 8) == (0, 0)     # unattached + bypass: identity
        assert m.dom0.read(0x301000, 8) == b"identity"
        assert d.events() == []
    finally:
        m.close()
