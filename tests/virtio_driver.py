"""A tiny virtio-mmio driver in Python for tests: no CPU, rings built in guest memory.

It does what a guest driver does, through the same doors: ``m.mmio_read``/``m.mmio_write`` for
registers and ``m.dom0.read``/``m.dom0.write`` for guest RAM (so it works on direct and
scattered P2M layouts alike). Requests go out as two-descriptor chains (readable body, writable
tail), optionally through an indirect table, like Linux does; ``raw_chain`` builds anything else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from devices import virtio_iommu as vi

BASE = 0x0A000000
RING_AREA = 0x00400000           # GPA where the driver puts its rings and buffers (4 MiB)
REQ_Q, EVT_Q = 0, 1

# virtio-mmio register offsets
MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL, DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x010, 0x014, 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x080, 0x084, 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, CONFIG_GENERATION, CONFIG = 0x0A0, 0x0A4, 0x0FC, 0x100

ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 1 << 28, 1 << 29, 1 << 32
NEXT, WRITE, INDIRECT = 1, 2, 4

DEFAULT_FEATURES = vi.FEATURES


def attach_req(domain: int, endpoint: int, flags: int = 0, reserved: int = 0) -> bytes:
    return vi.ATTACH_REQ.pack(vi.T_ATTACH, domain, endpoint, flags, reserved)


def detach_req(domain: int, endpoint: int) -> bytes:
    return vi.DETACH_REQ.pack(vi.T_DETACH, domain, endpoint)


def map_req(domain: int, vs: int, ve: int, ps: int, flags: int = vi.MAP_F_READ | vi.MAP_F_WRITE) -> bytes:
    return vi.MAP_REQ.pack(vi.T_MAP, domain, vs, ve, ps, flags)


def unmap_req(domain: int, vs: int, ve: int) -> bytes:
    return vi.UNMAP_REQ.pack(vi.T_UNMAP, domain, vs, ve)


def probe_req(endpoint: int) -> bytes:
    return vi.PROBE_REQ.pack(vi.T_PROBE, endpoint)


@dataclass
class Fault:
    reason: int
    flags: int
    endpoint: int
    address: int
    raw: bytes


class Ring:
    """Driver side of one split queue laid out at ``base`` (desc, avail, used)."""

    def __init__(self, drv: VirtioDriver, index: int, num: int, base: int) -> None:
        self.drv, self.index, self.num = drv, index, num
        self.desc = base
        self.avail = base + 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) & ~3
        self.end = self.used + 6 + 8 * num
        self.avail_idx = 0
        self.last_used = 0

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.drv.mem_write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def make_available(self, head: int) -> None:
        self.drv.mem_write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.drv.mem_write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.drv.mem_write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.drv.mem_write(self.avail + 4 + 2 * self.num, struct.pack("<H", value))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.drv.mem_read(self.used + 2, 2))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.drv.mem_read(self.used + 4 + 8 * self.num, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            out.append(struct.unpack("<II", self.drv.mem_read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class VirtioDriver:
    """Drive the virtio-iommu at ``base`` of machine ``m``."""

    def __init__(self, m, base: int = BASE, area: int = RING_AREA, num: int = 64) -> None:
        self.m = m
        self.base = base
        self.area = area
        self.num = num
        self.reqq = Ring(self, REQ_Q, num, area)
        self.evtq = Ring(self, EVT_Q, num, (self.reqq.end + 0xFFF) & ~0xFFF)
        self.buf = (self.evtq.end + 0xFFF) & ~0xFFF          # request buffers
        self.ind = self.buf + 0x40000                        # indirect tables
        self.evbuf = self.ind + 0x10000                      # event buffers
        self.features = 0

    # -- plumbing ------------------------------------------------------------------------------
    def r(self, off: int, size: int = 4) -> int:
        return self.m.mmio_read(self.base + off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.m.mmio_write(self.base + off, size, value)

    def mem_write(self, gpa: int, data: bytes) -> None:
        self.m.dom0.write(gpa, data)

    def mem_read(self, gpa: int, n: int) -> bytes:
        return self.m.dom0.read(gpa, n)

    def config(self, off: int, size: int) -> int:
        return self.r(CONFIG + off, size)

    @property
    def status(self) -> int:
        return self.r(STATUS)

    # -- bring-up ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.w(STATUS, 0)
        self.reqq = Ring(self, REQ_Q, self.num, self.reqq.desc)
        self.evtq = Ring(self, EVT_Q, self.num, self.evtq.desc)
        self.mem_write(self.area, bytes(self.buf - self.area))

    def negotiate(self, features: int = DEFAULT_FEATURES) -> bool:
        self.w(STATUS, ACK)
        self.w(STATUS, ACK | DRIVER)
        self.w(DRIVER_FEATURES_SEL, 0)
        self.w(DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.w(DRIVER_FEATURES_SEL, 1)
        self.w(DRIVER_FEATURES, features >> 32)
        self.w(STATUS, ACK | DRIVER | FEATURES_OK)
        self.features = features
        return bool(self.status & FEATURES_OK)

    def setup_queue(self, ring: Ring) -> None:
        self.w(QUEUE_SEL, ring.index)
        assert self.r(QUEUE_READY) == 0
        self.w(QUEUE_NUM, ring.num)
        self.w(QUEUE_DESC_LOW, ring.desc & 0xFFFFFFFF)
        self.w(QUEUE_DESC_HIGH, ring.desc >> 32)
        self.w(QUEUE_DRIVER_LOW, ring.avail & 0xFFFFFFFF)
        self.w(QUEUE_DRIVER_HIGH, ring.avail >> 32)
        self.w(QUEUE_DEVICE_LOW, ring.used & 0xFFFFFFFF)
        self.w(QUEUE_DEVICE_HIGH, ring.used >> 32)
        self.w(QUEUE_READY, 1)

    def init(self, features: int = DEFAULT_FEATURES, events: int = 0) -> VirtioDriver:
        """Reset, negotiate, both queues, DRIVER_OK, then post ``events`` event buffers."""
        self.reset()
        assert self.negotiate(features), "FEATURES_OK refused"
        self.setup_queue(self.reqq)
        self.setup_queue(self.evtq)
        self.w(STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
        if events:
            self.post_events(events)
        return self

    # -- requests ------------------------------------------------------------------------------
    def submit(self, reqs: list[tuple[bytes, int]], indirect: bool = False, kick: bool = True
               ) -> list[tuple[int, bytes]]:
        """Queue (readable bytes, writable length) requests as 2-descriptor chains, kick once,
        return (used length, writable bytes) per request. Writable buffers start filled with
        0xAA so an unwritten buffer shows."""
        q = self.reqq
        heads = []
        cursor = self.buf
        for n, (body, wlen) in enumerate(reqs):
            rd, wr = cursor, cursor + ((len(body) + 15) & ~15)
            cursor = wr + ((wlen + 15) & ~15) + 16
            self.mem_write(rd, body)
            self.mem_write(wr, b"\xaa" * wlen)
            if indirect:
                table = self.ind + 32 * n
                q.write_desc(0, rd, len(body), NEXT, 1, table=table)
                q.write_desc(1, wr, wlen, WRITE, 0, table=table)
                head = n % q.num
                q.write_desc(head, table, 32, INDIRECT)
            else:
                head = (2 * n) % q.num
                q.write_desc(head, rd, len(body), NEXT, head + 1)
                q.write_desc(head + 1, wr, wlen, WRITE, 0)
            heads.append((head, wr, wlen))
            q.make_available(head)
        if kick:
            self.w(QUEUE_NOTIFY, REQ_Q)
        used = dict()
        for hid, length in q.take_used():
            used.setdefault(hid, []).append(length)
        out = []
        for head, wr, wlen in heads:
            length = used[head].pop(0)
            out.append((length, self.mem_read(wr, wlen) if wlen else b""))
        return out

    def request(self, body: bytes, wlen: int = 4, indirect: bool = False) -> tuple[int, bytes]:
        return self.submit([(body, wlen)], indirect=indirect)[0]

    def status_of(self, body: bytes, indirect: bool = False) -> int:
        """Send one request with a 4-byte tail; the status (asserting used length 4 and a
        zeroed tail.reserved, as QEMU's qtest helper does)."""
        used, tail = self.request(body, 4, indirect)
        assert used == 4, f"used length {used}"
        assert tail[1:4] == b"\0\0\0", tail
        return tail[0]

    def attach(self, domain: int, endpoint: int = 2, flags: int = 0, reserved: int = 0) -> int:
        return self.status_of(attach_req(domain, endpoint, flags, reserved))

    def detach(self, domain: int, endpoint: int = 2) -> int:
        return self.status_of(detach_req(domain, endpoint))

    def map(self, domain: int, vs: int, ve: int, ps: int, flags: int = vi.MAP_F_READ | vi.MAP_F_WRITE) -> int:
        return self.status_of(map_req(domain, vs, ve, ps, flags))

    def unmap(self, domain: int, vs: int, ve: int) -> int:
        return self.status_of(unmap_req(domain, vs, ve))

    def probe(self, endpoint: int = 2, wlen: int | None = None) -> tuple[int, bytes]:
        return self.request(probe_req(endpoint), vi.PROBE_SIZE + 4 if wlen is None else wlen)

    # -- raw chains (for malformed-input tests) ---------------------------------------------------
    def raw_chain(self, descs: list[tuple[int, int, int, int]], head: int = 0, kick: bool = True
                  ) -> list[tuple[int, int]]:
        """Write descriptors verbatim at index 0.., make ``head`` available, kick; used entries."""
        q = self.reqq
        for i, (addr, length, flags, nxt) in enumerate(descs):
            q.write_desc(i, addr, length, flags, nxt)
        q.make_available(head)
        if kick:
            self.w(QUEUE_NOTIFY, REQ_Q)
        return q.take_used()

    # -- events --------------------------------------------------------------------------------
    def post_events(self, n: int, size: int = 24) -> None:
        q = self.evtq
        for _ in range(n):
            i = q.avail_idx % q.num
            q.write_desc(i, self.evbuf + 32 * i, size, WRITE)
            self.mem_write(self.evbuf + 32 * i, b"\xee" * size)
            q.make_available(i)
        self.w(QUEUE_NOTIFY, EVT_Q)

    def events(self) -> list[Fault]:
        out = []
        for head, length in self.evtq.take_used():
            raw = self.mem_read(self.evbuf + 32 * head, length) if length else b""
            if length >= 24:
                reason, flags, ep, addr = vi.FAULT.unpack(raw[:24])
                out.append(Fault(reason, flags, ep, addr, raw))
            else:
                out.append(Fault(-1, 0, 0, 0, raw))
        return out

    def ack(self) -> int:
        st = self.r(INTERRUPT_STATUS)
        self.w(INTERRUPT_ACK, st)
        return st

    # -- DMA through dma2 ------------------------------------------------------------------------
    def dma(self, src: int, dst: int, length: int) -> tuple[int, int]:
        return self.m.dma("dma2", src, dst, length)
