"""Split virtqueues (virtio 1.x, section 2.7) as a device sees them, over guest-physical memory.

Why a module of its own: the transport owns the queue registers, the device backend owns the
meaning of the buffers, and everything in between -- walking descriptor chains (direct and
indirect), refusing malformed ones, writing used entries and deciding whether the driver wants
an interrupt (EVENT_IDX or NO_INTERRUPT) -- is the same for every virtio device.

Rings live in guest-physical memory, which the device reaches through the ``DeviceMemory`` the
machine gives it over the domain's P2M (it caches the machine frame of each page it touched,
because a request costs half a dozen small ring accesses).

Layouts are declared once with ``construct`` (compiled once and cached by ``devices.layout``) and
turned into ``struct.Struct`` at import time; no ``construct`` parse runs per access.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from devices.layout import Layout, layout
from vmm.dma import DmaFault
from vmm.memory import PAGE

if TYPE_CHECKING:
    from vmm.dma import DeviceMemory



# -- layouts ---------------------------------------------------------------------------------


def compile_layout(declared: Layout) -> tuple[struct.Struct, dict[str, int]]:
    """A declared layout of fixed little-endian fields -> (``struct.Struct``, offsets). Fields whose
    name starts with ``_`` are padding the device ignores (``Nx``); named byte strings become
    ``Ns``; integers keep their format character. The offsets table lets hot code address one
    field without packing the whole structure."""
    return declared.struct()


@layout
def VRING_DESC_LAYOUT(cs):
    return cs.Struct("addr" / cs.Int64ul, "len" / cs.Int32ul, "flags" / cs.Int16ul, "next" / cs.Int16ul)


@layout
def VRING_AVAIL_HEADER_LAYOUT(cs):          # then u16 ring[N], used_event
    return cs.Struct("flags" / cs.Int16ul, "idx" / cs.Int16ul)


@layout
def VRING_USED_HEADER_LAYOUT(cs):           # then elem[N], avail_event
    return cs.Struct("flags" / cs.Int16ul, "idx" / cs.Int16ul)


@layout
def VRING_USED_ELEM_LAYOUT(cs):
    return cs.Struct("id" / cs.Int32ul, "len" / cs.Int32ul)


DESC, _ = compile_layout(VRING_DESC_LAYOUT)
AVAIL_HEADER, AVAIL_OFF = compile_layout(VRING_AVAIL_HEADER_LAYOUT)
USED_HEADER, USED_OFF = compile_layout(VRING_USED_HEADER_LAYOUT)
USED_ELEM, _ = compile_layout(VRING_USED_ELEM_LAYOUT)
U16 = struct.Struct("<H")
DESC_PAIR = struct.Struct("<" + DESC.format.lstrip("<") * 2)      # two adjacent descriptors
DESC_SIZE = DESC.size                       # 16
AVAIL_RING = AVAIL_HEADER.size              # ring[] starts at +4
USED_RING = USED_HEADER.size                # elem[] starts at +4

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

MAX_CHAIN_BYTES = 1 << 32


class RingError(Exception):
    """The ring itself (not one request) is unusable: the device must ask for a reset."""


# -- queues ----------------------------------------------------------------------------------


class Chain:
    """One available buffer: its head index and its device-readable / device-writable parts.
    ``error`` says why it is malformed (then the device answers it with used length 0)."""

    __slots__ = ("head", "readable", "writable", "rlen", "wlen", "error")

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []
        self.rlen = 0
        self.wlen = 0
        self.error: str | None = None


class SplitQueue:
    """One split virtqueue: the transport fills in size and addresses, the device pops chains."""

    def __init__(self, index: int, size_max: int) -> None:
        self.index = index
        self.size_max = size_max
        self.reset()

    def reset(self) -> None:
        self.num = self.size_max
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.ready = False
        self.last_avail = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = False

    def valid_size(self) -> bool:
        n = self.num
        return 0 < n <= self.size_max and n & (n - 1) == 0

    def enable(self, features: int) -> None:
        """QueueReady = 1: the ring starts fresh (indices 0), with the negotiated ring features."""
        self.ready = True
        self.last_avail = 0
        self.used_idx = 0
        self.event_idx = bool(features & F_EVENT_IDX)
        self.indirect = bool(features & F_INDIRECT_DESC)

    # -- available side ------------------------------------------------------------------------
    def pending(self, mem: DeviceMemory) -> int:
        """How many chains the driver has made available; RingError if the ring is unreadable
        or claims more than the queue can hold (a driver bug the device cannot recover from)."""
        try:
            idx = mem.unpack(U16, self.avail + AVAIL_OFF["idx"])[0]
        except DmaFault as e:
            raise RingError(f"available ring unreadable: {e}") from None
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.num:
            raise RingError(f"avail idx {idx} is {n} ahead of {self.last_avail} (queue size {self.num})")
        return n

    def pop(self, mem: DeviceMemory) -> Chain:
        """Take the next available chain (the caller checked ``pending``)."""
        return self.walk(mem, self.pop_heads(mem, 1)[0])

    def pop_heads(self, mem: DeviceMemory, n: int) -> list[int]:
        """Take the next ``n`` available head indices (the caller checked ``pending``): one read
        of the avail ring per contiguous stretch rather than one per request."""
        out: list[int] = []
        try:
            while n:
                slot = self.last_avail % self.num
                k = min(n, self.num - slot)
                data = mem.read(self.avail + AVAIL_RING + 2 * slot, 2 * k)
                out.extend(struct.unpack(f"<{k}H", data))
                self.last_avail = (self.last_avail + k) & 0xFFFF
                n -= k
        except DmaFault as e:
            raise RingError(f"available ring unreadable: {e}") from None
        return out

    def walk(self, mem: DeviceMemory, head: int) -> Chain:
        """The chain starting at descriptor ``head``; a malformed one comes back with ``error``."""
        chain = Chain(head)
        try:
            self._walk(mem, chain)
        except DmaFault as e:
            chain.error = f"descriptor table unreadable: {e}"
        return chain

    def _walk(self, mem: DeviceMemory, chain: Chain) -> None:
        num = self.num
        i = chain.head
        if i >= num:
            chain.error = f"head {i} >= queue size {num}"
            return
        table, table_n = self.desc, num
        at = table + DESC_SIZE * i
        if i + 1 < num and at & (PAGE - 1) <= PAGE - 2 * DESC_SIZE:
            # Fast path for what Linux sends: readable descriptor i -> writable descriptor i + 1.
            a0, l0, f0, n0, a1, l1, f1, _ = mem.unpack(DESC_PAIR, at)
            if (f0 == VRING_DESC_F_NEXT and n0 == i + 1 and f1 == VRING_DESC_F_WRITE and l0 and l1
                    and l0 + l1 <= MAX_CHAIN_BYTES):
                chain.readable.append((a0, l0))
                chain.writable.append((a1, l1))
                chain.rlen, chain.wlen = l0, l1
                return
        in_indirect = False
        budget = num                  # a chain never has more descriptors than the queue size
        total = 0
        readable, writable = chain.readable, chain.writable
        unpack = mem.unpack
        ahead = None                  # the descriptor after i, when read together with i
        while True:
            budget -= 1
            if budget < 0:
                chain.error = "chain longer than the queue (loop?)"
                return
            if ahead is not None and ahead[0] == i:
                addr, length, flags, nxt = ahead[1]
                ahead = None
            elif i + 1 < table_n and (table + DESC_SIZE * i) & (PAGE - 1) <= PAGE - 2 * DESC_SIZE:
                # Chains are usually consecutive descriptors: fetch i and i + 1 in one go.
                pair = unpack(DESC_PAIR, table + DESC_SIZE * i)
                addr, length, flags, nxt = pair[:4]
                ahead = (i + 1, pair[4:])
            else:
                addr, length, flags, nxt = unpack(DESC, table + DESC_SIZE * i)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    chain.error = "INDIRECT not negotiated"
                    return
                if in_indirect:
                    chain.error = "nested indirect table"
                    return
                if flags & VRING_DESC_F_NEXT:
                    chain.error = "INDIRECT with NEXT"
                    return
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > num:
                    chain.error = f"bad indirect table length {length}"
                    return
                table, table_n, i, in_indirect = addr, length // DESC_SIZE, 0, True
                ahead = None
                budget = table_n
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                chain.error = "chain larger than 4 GiB"
                return
            if flags & VRING_DESC_F_WRITE:
                if length:
                    writable.append((addr, length))
                chain.wlen += length
            else:
                if chain.wlen or writable:
                    chain.error = "readable descriptor after a writable one"
                    return
                if length:
                    readable.append((addr, length))
                chain.rlen += length
            if not flags & VRING_DESC_F_NEXT:
                return
            i = nxt
            if i >= table_n:
                chain.error = f"next {i} outside a table of {table_n}"
                return

    # -- used side -----------------------------------------------------------------------------
    def push(self, mem: DeviceMemory, head: int, length: int) -> None:
        """Write one used element (not yet published: see ``publish``)."""
        self.push_many(mem, [(head, length)])

    def push_many(self, mem: DeviceMemory, elems: list[tuple[int, int]]) -> None:
        """Write used elements (id, len) in order, one write per contiguous stretch of the ring."""
        i, total = 0, len(elems)
        try:
            while i < total:
                slot = self.used_idx % self.num
                k = min(total - i, self.num - slot)
                flat = [v & 0xFFFFFFFF for e in elems[i:i + k] for v in e]
                mem.write(self.used + USED_RING + USED_ELEM.size * slot, struct.pack(f"<{2 * k}I", *flat))
                self.used_idx = (self.used_idx + k) & 0xFFFF
                i += k
        except DmaFault as e:
            raise RingError(f"used ring unwritable: {e}") from None

    def publish(self, mem: DeviceMemory, old_idx: int) -> bool:
        """Make the used elements since ``old_idx`` visible; True if the driver wants an interrupt."""
        try:
            mem.pack(U16, self.used + USED_OFF["idx"], self.used_idx)
            if self.event_idx:
                # Ask to be notified of every new buffer: we consume synchronously anyway.
                mem.pack(U16, self.used + USED_RING + USED_ELEM.size * self.num, self.last_avail)
        except DmaFault as e:
            raise RingError(f"used ring unwritable: {e}") from None
        new = self.used_idx
        if new == old_idx:
            return False
        try:
            if self.event_idx:
                event = mem.unpack(U16, self.avail + AVAIL_RING + 2 * self.num)[0]
                return ((new - event - 1) & 0xFFFF) < ((new - old_idx) & 0xFFFF)
            return not mem.unpack(U16, self.avail + AVAIL_OFF["flags"])[0] & VRING_AVAIL_F_NO_INTERRUPT
        except DmaFault:
            return True
