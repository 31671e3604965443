"""virtio-iommu (device 23) behind the virtio-mmio transport: a spec-strict model.

Shape follows QEMU's hw/virtio/virtio-iommu.c: one function per request type and a dispatch
table keyed by the request type; the transport (devices/virtio_mmio.py) and the split queues
(devices/virtqueue.py) are generic. Where QEMU is lax (no alignment, input-range or RESV_MEM
checks on MAP, UNSUPP written for unknown requests, NOENT for DETACH of a never-attached
endpoint) this model follows the spec text and the issue's contract instead; see the docstrings
of the handlers. Every reply is a status in the tail, or used length 0 when the request cannot
be answered: no guest input makes this module raise.

DMA: each endpoint's master gets an ``EndpointTranslator``. IOVA -> (domain mapping) -> GPA ->
(the domain's P2M) -> machine address, permissions checked per access, bypass per spec 1.7.
A refused access queues one fault record on the event queue (or counts it dropped when the
driver posted no buffer) and raises ``DmaFault``.

PASID tables (DESIGN section 6, the lab's numbering of the 2021 ATTACH_TABLE drafts): with
F_ATTACH_TABLE (bit 7) negotiated, PROBE adds four properties and ATTACH_TABLE / INVALIDATE exist.
ATTACH_TABLE makes a domain a *table domain*: the guest owns an SMMUv3 CD table and the stage-1
tables at guest-physical addresses, and the C walker (``Walker.table_context``) looks CDs up and
walks them nested over the P2M of the domain whose driver owns this device, caching CDs per
PASID and translations per ASID until INVALIDATE. A driver that does not negotiate the feature
sees the device exactly as before (same config, PROBE reply and fault records; types 6 and 7
unknown).
"""
from __future__ import annotations

import logging
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from devices.layout import layout
from devices.virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, Chain, RingError, compile_layout
from vmm.dma import STATUS_PERMISSION, STATUS_TRANSLATION, DmaFault, Runs, Translator
from vmm.explain import FaultExplanation, explain_pasid_walk
from vmm.memory import PAGE
from vmm.registry import DeviceType, Key
from vmm.walker import MAX_CDMAX, PERMISSION, CdTable, Fault, R, W

if TYPE_CHECKING:
    from devices.virtio_mmio import VirtioMmio
    from vmm.machine import Domain
    from vmm.walker import Walker
    from vmm.wiring import BuildContext

log = logging.getLogger("vmm.virtio.iommu")

DEVICE_ID = 23
REQUEST_Q, EVENT_Q = 0, 1
QUEUE_SIZE = 256

# -- feature bits, config --------------------------------------------------------------------
F_INPUT_RANGE = 1 << 0
F_DOMAIN_RANGE = 1 << 1
F_MAP_UNMAP = 1 << 2
F_BYPASS = 1 << 3            # legacy: never offered
F_PROBE = 1 << 4
F_MMIO = 1 << 5
F_BYPASS_CONFIG = 1 << 6
F_ATTACH_TABLE = 1 << 7      # the lab's number (the drafts used 6 and 7): DESIGN section 6
# FEATURES: the spec device, what a driver without F_ATTACH_TABLE negotiates; OFFERED adds bit 7.
FEATURES = (F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_MMIO | F_BYPASS_CONFIG
            | F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1)
OFFERED = FEATURES | F_ATTACH_TABLE
assert FEATURES == 0x1_3000_0077 and OFFERED == 0x1_3000_00F7

GRANULE = PAGE
PAGE_SIZE_MASK = 0xFFFFFFFFFFFFF000
INPUT_START, INPUT_END = 0, (1 << 48) - 1
DOMAIN_START, DOMAIN_END = 0, (1 << 32) - 1
PROBE_SIZE = 512
DEFAULT_MAX_MAPPINGS = 1_000_000
MSI_START, MSI_END = 0xFEE00000, 0xFEEFFFFF       # the one RESV_MEM (MSI) region of every endpoint

@layout
def CONFIG_LAYOUT(cs):
    return cs.Struct(
        "page_size_mask" / cs.Int64ul,
        "input_start" / cs.Int64ul,
        "input_end" / cs.Int64ul,
        "domain_start" / cs.Int32ul,
        "domain_end" / cs.Int32ul,
        "probe_size" / cs.Int32ul,
        "bypass" / cs.Int8ul,
        "_reserved" / cs.Padding(3),
    )


CONFIG, CONFIG_OFF = compile_layout(CONFIG_LAYOUT)
assert CONFIG.size == 40 and CONFIG_OFF["bypass"] == 0x24

# -- requests ----------------------------------------------------------------------------------
T_ATTACH, T_DETACH, T_MAP, T_UNMAP, T_PROBE = 1, 2, 3, 4, 5
T_ATTACH_TABLE, T_INVALIDATE = 6, 7      # only with F_ATTACH_TABLE negotiated
S_OK, S_IOERR, S_UNSUPP, S_DEVERR, S_INVAL, S_RANGE, S_NOENT, S_FAULT, S_NOMEM = range(9)
ATTACH_F_BYPASS = 1 << 0
MAP_F_READ, MAP_F_WRITE, MAP_F_MMIO = 1 << 0, 1 << 1, 1 << 2

def _head(cs) -> tuple:
    return ("type" / cs.Int8ul, "_head_reserved" / cs.Padding(3))


@layout
def ATTACH_LAYOUT(cs):
    return cs.Struct(*_head(cs), "domain" / cs.Int32ul, "endpoint" / cs.Int32ul, "flags" / cs.Int32ul,
                     "reserved" / cs.Int32ul)


@layout
def DETACH_LAYOUT(cs):
    return cs.Struct(*_head(cs), "domain" / cs.Int32ul, "endpoint" / cs.Int32ul, "_reserved" / cs.Padding(8))


@layout
def MAP_LAYOUT(cs):
    return cs.Struct(*_head(cs), "domain" / cs.Int32ul, "virt_start" / cs.Int64ul, "virt_end" / cs.Int64ul,
                     "phys_start" / cs.Int64ul, "flags" / cs.Int32ul)


@layout
def UNMAP_LAYOUT(cs):
    return cs.Struct(*_head(cs), "domain" / cs.Int32ul, "virt_start" / cs.Int64ul, "virt_end" / cs.Int64ul,
                     "_reserved" / cs.Padding(4))


@layout
def PROBE_LAYOUT(cs):
    return cs.Struct(*_head(cs), "endpoint" / cs.Int32ul, "_reserved" / cs.Padding(64))


@layout
def ATTACH_TABLE_LAYOUT(cs):
    return cs.Struct(*_head(cs), "domain" / cs.Int32ul, "endpoint" / cs.Int32ul, "format" / cs.Int16ul,
                     "s1fmt" / cs.Int8ul, "s1dss" / cs.Int8ul, "s1contextptr" / cs.Int64ul, "s1cdmax" / cs.Int32ul,
                     "reserved" / cs.Bytes(48))


@layout
def INVALIDATE_LAYOUT(cs):
    return cs.Struct(*_head(cs), "inv_gran" / cs.Int16ul, "inv_type" / cs.Int16ul, "flags" / cs.Int16ul,
                     "reserved0" / cs.Int16ul, "domain" / cs.Int32ul, "pasid" / cs.Int32ul,
                     "reserved1" / cs.Int32ul, "archid" / cs.Int64ul, "virt_start" / cs.Int64ul,
                     "nr_pages" / cs.Int64ul, "granule" / cs.Int8ul, "reserved2" / cs.Bytes(11))


@layout
def PROP_U8_LAYOUT(cs):           # OUTPUT_SIZE, PASID_SIZE: u8 bits, reserved[3]
    return cs.Struct("type" / cs.Int16ul, "length" / cs.Int16ul, "value" / cs.Int8ul, "_reserved" / cs.Padding(3))


@layout
def PROP_U16_LAYOUT(cs):          # PAGE_TABLE_FMT, PASID_TABLE_FMT: le16 format, reserved[2]
    return cs.Struct("type" / cs.Int16ul, "length" / cs.Int16ul, "value" / cs.Int16ul, "_reserved" / cs.Padding(2))


@layout
def TAIL_LAYOUT(cs):
    return cs.Struct("status" / cs.Int8ul, "_reserved" / cs.Padding(3))


@layout
def RESV_MEM_LAYOUT(cs):
    return cs.Struct("type" / cs.Int16ul, "length" / cs.Int16ul, "subtype" / cs.Int8ul,
                     "_reserved" / cs.Padding(3), "start" / cs.Int64ul, "end" / cs.Int64ul)


@layout
def FAULT_LAYOUT(cs):
    return cs.Struct("reason" / cs.Int8ul, "_reserved" / cs.Padding(3), "flags" / cs.Int32ul,
                     "endpoint" / cs.Int32ul, "_reserved1" / cs.Padding(4), "address" / cs.Int64ul)


@layout
def FAULT_PASID_LAYOUT(cs):       # the same record with the drafts' le32 PASID at offset 12
    return cs.Struct("reason" / cs.Int8ul, "_reserved" / cs.Padding(3), "flags" / cs.Int32ul,
                     "endpoint" / cs.Int32ul, "pasid" / cs.Int32ul, "address" / cs.Int64ul)


ATTACH_REQ, _ = compile_layout(ATTACH_LAYOUT)
ATTACH_TABLE_REQ, _ = compile_layout(ATTACH_TABLE_LAYOUT)
INVALIDATE_REQ, _ = compile_layout(INVALIDATE_LAYOUT)
PROP_U8, _ = compile_layout(PROP_U8_LAYOUT)
PROP_U16, _ = compile_layout(PROP_U16_LAYOUT)
FAULT_PASID, _ = compile_layout(FAULT_PASID_LAYOUT)
DETACH_REQ, _ = compile_layout(DETACH_LAYOUT)
MAP_REQ, _ = compile_layout(MAP_LAYOUT)
UNMAP_REQ, _ = compile_layout(UNMAP_LAYOUT)
PROBE_REQ, _ = compile_layout(PROBE_LAYOUT)
TAIL, _ = compile_layout(TAIL_LAYOUT)
RESV_MEM, _ = compile_layout(RESV_MEM_LAYOUT)
FAULT, _ = compile_layout(FAULT_LAYOUT)
assert (ATTACH_REQ.size, DETACH_REQ.size, MAP_REQ.size, UNMAP_REQ.size, PROBE_REQ.size) == (20, 20, 36, 28, 72)
assert (TAIL.size, RESV_MEM.size, FAULT.size) == (4, 24, 24)
assert (ATTACH_TABLE_REQ.size, INVALIDATE_REQ.size, PROP_U8.size, PROP_U16.size, FAULT_PASID.size) == (76, 60, 8, 8, 24)
_TAILS = [TAIL.pack(s) for s in range(256)]
TAIL_SIZE = TAIL.size      # tail.reserved always zero

PROBE_T_RESV_MEM = 1
PROBE_T_OUTPUT_SIZE, PROBE_T_PASID_SIZE, PROBE_T_PAGE_TABLE_FMT, PROBE_T_PASID_TABLE_FMT = 4, 5, 6, 7
OUTPUT_BITS, PASID_BITS = 40, 20
PGTF_ARM_LPAE, PSTF_ARM_SMMU_V3 = 1, 2
S1DSS_TERMINATE, S1DSS_BYPASS, S1DSS_SSID0 = 0, 1, 2
INV_G_DOMAIN, INV_G_PASID, INV_G_VA = 1 << 0, 1 << 1, 1 << 2
INV_T_IOTLB, INV_T_DEV_IOTLB, INV_T_PASID = 1 << 0, 1 << 1, 1 << 2
INV_F_PASID, INV_F_ARCHID, INV_F_LEAF = 1 << 0, 1 << 1, 1 << 2
RESV_MEM_T_RESERVED, RESV_MEM_T_MSI = 0, 1

FAULT_R_UNKNOWN, FAULT_R_DOMAIN, FAULT_R_MAPPING = 0, 1, 2
FAULT_F_READ, FAULT_F_WRITE, FAULT_F_ADDRESS = 1 << 0, 1 << 1, 1 << 8
FAULT_F_PASID = 1 << 9

INT_USED_BUFFER = 1 << 0


# -- mappings ----------------------------------------------------------------------------------


class IntervalMap:
    """Non-overlapping closed intervals [start, end] -> (phys, flags), sorted by start.

    A MAP is one entry whatever its size (a 1 GiB MAP costs O(1) memory). Entries sit in
    chunks of parallel ``array('Q')`` columns (a two-level sorted list), so lookups are two
    bisections (O(log n)), inserts and deletes move at most one chunk, and a million mappings
    cost ~25 bytes each rather than a tuple of Python ints. Because intervals never overlap,
    ends are sorted too, which is what makes "the entry with the largest start <= x" enough
    to answer both containment and overlap questions.
    """

    CHUNK = 1024

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._starts: list[array] = []
        self._ends: list[array] = []
        self._phys: list[array] = []
        self._flags: list[array] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        for st, en, ph, fl in zip(self._starts, self._ends, self._phys, self._flags, strict=True):
            yield from zip(st, en, ph, fl, strict=True)

    def floor(self, addr: int) -> tuple[int, int, int, int] | None:
        """The entry with the largest start <= addr, or None."""
        ci = bisect_right(self._firsts, addr) - 1
        if ci < 0:
            return None
        i = bisect_right(self._starts[ci], addr) - 1
        return self._starts[ci][i], self._ends[ci][i], self._phys[ci][i], self._flags[ci][i]

    def above(self, addr: int) -> tuple[int, int, int, int] | None:
        """The entry with the smallest start > addr, or None."""
        ci = max(bisect_right(self._firsts, addr) - 1, 0)
        while ci < len(self._firsts):
            st = self._starts[ci]
            i = bisect_right(st, addr)
            if i < len(st):
                return st[i], self._ends[ci][i], self._phys[ci][i], self._flags[ci][i]
            ci += 1
        return None

    def find(self, addr: int) -> tuple[int, int, int, int] | None:
        """The entry containing addr, or None."""
        e = self.floor(addr)
        return e if e is not None and e[1] >= addr else None

    def overlaps(self, start: int, end: int) -> bool:
        e = self.floor(end)
        return e is not None and e[1] >= start

    def insert(self, start: int, end: int, phys: int, flags: int) -> None:
        """Add an entry (the caller checked it overlaps nothing)."""
        self._n += 1
        if not self._firsts:
            self._firsts.append(start)
            self._starts.append(array("Q", [start]))
            self._ends.append(array("Q", [end]))
            self._phys.append(array("Q", [phys]))
            self._flags.append(array("B", [flags]))
            return
        ci = max(bisect_right(self._firsts, start) - 1, 0)
        st = self._starts[ci]
        i = bisect_right(st, start)
        st.insert(i, start)
        self._ends[ci].insert(i, end)
        self._phys[ci].insert(i, phys)
        self._flags[ci].insert(i, flags)
        self._firsts[ci] = st[0]
        if len(st) > 2 * self.CHUNK:
            h = self.CHUNK
            for cols in (self._starts, self._ends, self._phys, self._flags):
                col = cols[ci]
                cols.insert(ci + 1, col[h:])
                del col[h:]
            self._firsts.insert(ci + 1, self._starts[ci + 1][0])

    def remove_range(self, start: int, end: int) -> int:
        """Remove every entry whose start lies in [start, end]; returns how many."""
        removed = 0
        ci = max(bisect_right(self._firsts, start) - 1, 0)
        while ci < len(self._firsts) and self._firsts[ci] <= end:
            st = self._starts[ci]
            i0, i1 = bisect_left(st, start), bisect_right(st, end)
            if i1 > i0:
                for cols in (self._starts, self._ends, self._phys, self._flags):
                    del cols[ci][i0:i1]
                removed += i1 - i0
            if not st:
                for cols in (self._firsts, self._starts, self._ends, self._phys, self._flags):
                    del cols[ci]
                continue
            self._firsts[ci] = st[0]
            ci += 1
        self._n -= removed
        return removed


@dataclass(frozen=True)
class TableConfig:
    """What ATTACH_TABLE said (equality decides "the same table") and the walker context that
    holds the table, its CD cache and its translations."""

    s1fmt: int
    s1dss: int
    ptr: int
    cdmax: int
    ctx: int = field(compare=False)


@dataclass(eq=False)
class IommuDomain:
    id: int
    bypass: bool
    mappings: IntervalMap = field(default_factory=IntervalMap)
    endpoints: set[int] = field(default_factory=set)
    table: TableConfig | None = None          # a table domain (ATTACH_TABLE)


# -- the device ----------------------------------------------------------------------------------


class VirtioIommu:
    """The virtio-iommu backend: config space, request handlers, endpoints and domains."""

    device_id = DEVICE_ID
    features = OFFERED
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, endpoints: list[int], boot_bypass: bool = False,
                 max_mappings: int = DEFAULT_MAX_MAPPINGS, probe_size: int = PROBE_SIZE,
                 name: str = "virtio-iommu", guest: Domain | None = None, walker: Walker | None = None,
                 alloc_ctx: Callable[[], int] | None = None) -> None:
        self.name = name
        self.endpoints = frozenset(int(e) for e in endpoints)
        self.boot_bypass = int(bool(boot_bypass))
        self.bypass = self.boot_bypass           # system reset value; survives device reset
        self.max_mappings = int(max_mappings)
        self.probe_size = int(probe_size)
        self.domains: dict[int, IommuDomain] = {}
        self.attached: dict[int, IommuDomain] = {}     # endpoint -> domain
        self.transport = None
        self.mem = None
        self._neg = 0                                 # negotiated features, cached per notification
        # Counters for tests and logs.
        self.requests = 0
        self.faults = 0
        self.events_delivered = 0
        self.events_dropped = 0
        resv = RESV_MEM.pack(PROBE_T_RESV_MEM, RESV_MEM.size - 4, RESV_MEM_T_MSI, MSI_START, MSI_END)
        self._probe_props = resv.ljust(self.probe_size, b"\0")[:self.probe_size]
        self._probe_props_table = (resv + PROP_U8.pack(PROBE_T_OUTPUT_SIZE, 4, OUTPUT_BITS)
                                   + PROP_U8.pack(PROBE_T_PASID_SIZE, 4, PASID_BITS)
                                   + PROP_U16.pack(PROBE_T_PAGE_TABLE_FMT, 4, PGTF_ARM_LPAE)
                                   + PROP_U16.pack(PROBE_T_PASID_TABLE_FMT, 4, PSTF_ARM_SMMU_V3)
                                   ).ljust(self.probe_size, b"\0")[:self.probe_size]
        self._probe_empty = bytes(self.probe_size)
        # PASID tables: the domain whose driver owns the device (its RAM holds the tables, its
        # P2M translates every table access) and walker contexts for table domains
        self.guest = guest
        self.walker = walker
        self._alloc_ctx = alloc_ctx
        self._free_ctx: list[int] = []
        self._dispatch = DISPATCH
        self._max_request = MAX_REQUEST

    # -- transport hooks -----------------------------------------------------------------------
    def attach(self, transport: VirtioMmio) -> None:
        self.transport = transport
        self.mem = transport.mem

    def config_bytes(self) -> bytes:
        return CONFIG.pack(PAGE_SIZE_MASK, INPUT_START, INPUT_END, DOMAIN_START, DOMAIN_END, self.probe_size,
                           self.bypass)

    def config_read(self, offset: int, size: int) -> int:
        data = self.config_bytes()[offset:offset + size]
        return int.from_bytes(data, "little")          # bytes beyond the 40-byte config read 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Only ``bypass`` is writable, and only with 0 or 1 (the device must never present any
        other value); writes to any other field or of any other value are ignored."""
        if offset == CONFIG_OFF["bypass"] and value in (0, 1):
            self.bypass = value

    def reset(self) -> None:
        """Device reset: every endpoint detached, every domain gone; ``bypass`` is kept."""
        for dom in self.domains.values():
            self._release_table(dom)
        self.domains.clear()
        self.attached.clear()

    def system_reset(self) -> None:
        self.reset()
        self.bypass = self.boot_bypass

    @property
    def negotiated(self) -> int:
        return self.transport.negotiated if self.transport is not None else 0


    def notify(self, queue: int) -> None:
        """requestq: answer every available request now. eventq: nothing to do; its buffers are
        taken when a fault needs one."""
        if queue == REQUEST_Q:
            self._drain_requests()

    # -- request queue ---------------------------------------------------------------------------
    def _drain_requests(self) -> None:
        t = self.transport
        q, mem = t.queues[REQUEST_Q], self.mem
        old = q.used_idx
        self._neg = t.negotiated
        if self._neg & F_ATTACH_TABLE:
            self._dispatch, self._max_request = TABLE_DISPATCH, MAX_TABLE_REQUEST
        else:
            self._dispatch, self._max_request = DISPATCH, MAX_REQUEST
        try:
            n = q.pending(mem)
            if n:
                walk, handle = q.walk, self._handle
                used = []
                for head in q.pop_heads(mem, n):
                    chain = walk(mem, head)
                    used.append((head, handle(chain) if chain.error is None else 0))
                q.push_many(mem, used)
            if q.publish(mem, old):
                t.interrupt(INT_USED_BUFFER)
        except RingError as e:
            t.needs_reset(f"requestq: {e}")

    def _handle(self, chain: Chain) -> int:
        """One request -> the used length. 0 = not answered (unknown type, no room for a tail --
        for PROBE that means fewer than probe_size + 4 writable bytes --, buffers outside RAM):
        the buffer is then left unwritten. A tail that can be located always gets a status."""
        self.requests += 1
        rlen, wlen = chain.rlen, chain.wlen
        if rlen < 4 or wlen < TAIL_SIZE:
            return 0
        mem = self.mem
        try:
            req = mem.gather_segments(chain.readable, min(rlen, self._max_request))
        except DmaFault:
            return 0
        rtype = self._dispatch.get(req[0])
        if rtype is None:
            return 0
        # The tail sits after the reply's properties (PROBE: probe_size bytes): a writable part
        # too small for both cannot hold it, so the request goes back unanswered (used length 0).
        out = TAIL_SIZE if rtype.reply_size is None else rtype.reply_size(self) + TAIL_SIZE
        if wlen < out:
            return 0
        try:
            runs = mem.map_segments(chain.writable, out)
        except DmaFault:
            return 0
        layout = rtype.layout
        if len(req) < layout.size:
            status, extra = S_INVAL, b""              # body too short to hold the request
        else:
            status, extra = rtype.handler(self, layout.unpack_from(req))
        if out == TAIL_SIZE and len(runs) == 1:
            mpa = runs[0][0]
            mem.view[mpa:mpa + TAIL_SIZE] = _TAILS[status]
        else:
            mem.scatter(runs, extra.ljust(out - TAIL_SIZE, b"\0") + _TAILS[status])
        return out

    # -- handlers (one per request type; QEMU style) -------------------------------------------
    def _attach(self, req: tuple) -> tuple[int, bytes]:
        """ATTACH: reserved != 0 or unknown flags -> INVAL (MUST); unknown endpoint -> NOENT;
        a domain of the other type (bypass vs paging) -> INVAL, checked before anything moves;
        already attached elsewhere -> implicit DETACH (the old domain dies when empty).
        Re-attaching to the domain it is already in is a no-op that keeps the mappings."""
        _, domain_id, ep, flags, reserved = req
        known = ATTACH_F_BYPASS if self._neg & F_BYPASS_CONFIG else 0
        if reserved or flags & ~known:
            return S_INVAL, b""
        if ep not in self.endpoints:
            return S_NOENT, b""
        bypass = bool(flags & ATTACH_F_BYPASS)
        dom = self.domains.get(domain_id)
        if dom is not None and (dom.bypass != bypass or dom.table is not None):
            return S_INVAL, b""
        old = self.attached.get(ep)
        if old is not None:
            if old is dom:
                return S_OK, b""
            self._detach_endpoint(ep, old)
        if dom is None:
            dom = self.domains[domain_id] = IommuDomain(domain_id, bypass)
        dom.endpoints.add(ep)
        self.attached[ep] = dom
        return S_OK, b""

    def _detach(self, req: tuple) -> tuple[int, bytes]:
        """DETACH: unknown endpoint -> NOENT; unknown domain, or one the endpoint is not attached
        to (never-attached included) -> INVAL. Reserved bytes are ignored (MUST)."""
        _, domain_id, ep = req
        if ep not in self.endpoints:
            return S_NOENT, b""
        dom = self.domains.get(domain_id)
        if dom is None or self.attached.get(ep) is not dom:
            return S_INVAL, b""
        self._detach_endpoint(ep, dom)
        return S_OK, b""

    def _detach_endpoint(self, ep: int, dom: IommuDomain) -> None:
        dom.endpoints.discard(ep)
        self.attached.pop(ep, None)
        if not dom.endpoints:
            del self.domains[dom.id]          # the domain and its mappings cease to exist
            self._release_table(dom)

    def _map(self, req: tuple) -> tuple[int, bytes]:
        """MAP, checks in this order: unknown flags -> INVAL (MMIO is known only when F_MMIO was
        negotiated); no domain -> NOENT; bypass domain -> INVAL; virt_start, phys_start or
        virt_end + 1 off the granule -> RANGE; virt_end < virt_start -> INVAL; outside
        input_range, or phys wrapping 2^64 -> RANGE; overlapping a mapping or the RESV_MEM MSI
        region -> INVAL; the domain already holds max_mappings -> NOMEM."""
        _, domain_id, vs, ve, ps, flags = req
        known = MAP_F_READ | MAP_F_WRITE | (MAP_F_MMIO if self._neg & F_MMIO else 0)
        if flags & ~known:
            return S_INVAL, b""
        dom = self.domains.get(domain_id)
        if dom is None:
            return S_NOENT, b""
        if dom.bypass or dom.table is not None:
            return S_INVAL, b""
        if (vs | ps | (ve + 1)) & (GRANULE - 1):
            return S_RANGE, b""
        if ve < vs:
            return S_INVAL, b""
        if vs < INPUT_START or ve > INPUT_END or ps + (ve - vs) >= 1 << 64:
            return S_RANGE, b""
        maps = dom.mappings
        if maps.overlaps(vs, ve) or (vs <= MSI_END and ve >= MSI_START):
            return S_INVAL, b""
        if len(maps) >= self.max_mappings:
            return S_NOMEM, b""
        maps.insert(vs, ve, ps, flags)
        return S_OK, b""

    def _unmap(self, req: tuple) -> tuple[int, bytes]:
        """UNMAP: no domain -> NOENT; bypass domain -> INVAL; virt_end < virt_start -> INVAL;
        a mapping that straddles either end -> RANGE with nothing removed; otherwise every
        mapping inside [virt_start, virt_end] goes (unmapped gaps are fine). Reserved ignored."""
        _, domain_id, vs, ve = req
        dom = self.domains.get(domain_id)
        if dom is None:
            return S_NOENT, b""
        if dom.bypass or dom.table is not None:
            return S_INVAL, b""
        if ve < vs:
            return S_INVAL, b""
        maps = dom.mappings
        before = maps.floor(vs - 1) if vs > 0 else None
        if before is not None and before[1] >= vs:
            return S_RANGE, b""
        last = maps.floor(ve)
        if last is not None and last[0] >= vs and last[1] > ve:
            return S_RANGE, b""
        maps.remove_range(vs, ve)
        return S_OK, b""

    def _probe(self, req: tuple) -> tuple[int, bytes]:
        """PROBE: one RESV_MEM (MSI, [0xFEE00000, 0xFEEFFFFF]) then zeros; unknown endpoint ->
        NOENT with the properties zeroed. Used length is probe_size + 4 either way."""
        _, ep = req
        if ep not in self.endpoints:
            return S_NOENT, self._probe_empty
        return S_OK, self._probe_props_table if self._neg & F_ATTACH_TABLE else self._probe_props

    # -- PASID tables (F_ATTACH_TABLE) -----------------------------------------------------------
    def _in_guest_ram(self, gpa: int, size: int) -> bool:
        return self.guest is not None and any(
            start <= gpa and gpa + size <= start + n for start, n in self.guest.ram_ranges)

    def _attach_table(self, req: tuple) -> tuple[int, bytes]:
        """ATTACH_TABLE (DESIGN section 6), checks in this order: non-zero reserved bytes, format
        != 2 (SMMUv3), s1fmt > 2, s1dss > 2, s1cdmax > 20 -> INVAL; s1contextptr not aligned to
        the table (linear: 64 * 2^s1cdmax; two-level: the L1 table, 8 per entry; at least 64)
        or the table not wholly in guest RAM -> INVAL; unknown endpoint -> NOENT; an existing
        domain that is not a table domain, or one with a different table -> INVAL. Then it
        attaches like ATTACH (implicit detach from the old domain, a new id creates the domain);
        the same table for an endpoint already in the domain changes nothing (caches kept)."""
        _, domain_id, ep, fmt, s1fmt, s1dss, ptr, cdmax, reserved = req
        if reserved.count(0) != len(reserved) or fmt != PSTF_ARM_SMMU_V3 or s1fmt > 2 or s1dss > 2 \
                or cdmax > MAX_CDMAX:
            return S_INVAL, b""
        shape = CdTable(ptr, s1fmt, cdmax, 0)
        if ptr % shape.alignment() or not self._in_guest_ram(ptr, shape.size()):
            return S_INVAL, b""
        if ep not in self.endpoints:
            return S_NOENT, b""
        dom = self.domains.get(domain_id)
        want = TableConfig(s1fmt, s1dss, ptr, cdmax, -1)
        if dom is not None and dom.table != want:
            return S_INVAL, b""           # a normal or bypass domain, or another table
        old = self.attached.get(ep)
        if old is not None and old is dom:
            return S_OK, b""
        if dom is None:
            ctx = self._table_ctx(shape)
            if ctx is None:
                return S_NOMEM, b""
            dom = IommuDomain(domain_id, False, table=TableConfig(s1fmt, s1dss, ptr, cdmax, ctx))
        if old is not None:
            self._detach_endpoint(ep, old)
        self.domains[domain_id] = dom
        dom.endpoints.add(ep)
        self.attached[ep] = dom
        return S_OK, b""

    def _table_ctx(self, shape: CdTable) -> int | None:
        """A walker context holding ``shape`` over the guest's P2M (reused after a table domain
        dies, so a guest cannot exhaust the walker's contexts); None when there is none left."""
        if self.walker is None or self.guest is None:
            return None
        try:
            ctx = self._free_ctx.pop() if self._free_ctx else self._alloc_ctx()
            self.walker.table_context(ctx, CdTable(shape.ptr, shape.fmt, shape.cdmax, self.guest.p2m.ctx_id))
        except (ValueError, MemoryError, TypeError) as e:
            log.warning("%s: no walker context for a table domain: %s", self.name, e)
            return None
        return ctx

    def _release_table(self, dom: IommuDomain) -> None:
        """A table domain ceased to exist: its CDs and translations go with it."""
        if dom.table is not None and self.walker is not None:
            self.walker.context(dom.table.ctx, None, None)
            self._free_ctx.append(dom.table.ctx)

    def _invalidate(self, req: tuple) -> tuple[int, bytes]:
        """INVALIDATE (DESIGN section 6). INVAL for non-zero reserved fields, an inv_gran that is
        not exactly one of DOMAIN/PASID/VA, unknown inv_type or flags bits, a valid PASID >= 2^20,
        granule PASID without PASID, granule VA without PASID or ARCHID, and for granule VA a
        granule outside 12..30, nr_pages 0 or a range past 2^64; then NOENT for an unknown
        domain and INVAL for one that is not a table domain. IOTLB drops the translations of
        one ASID (ARCHID, else the ASID of the PASID's cached CD, else nothing) or of every ASID
        (granule DOMAIN), in [virt_start, + nr_pages << granule) for granule VA; PASID drops that
        PASID's cached CD (every cached CD for granule DOMAIN); DEV_IOTLB has nothing to do."""
        (_, gran, itype, flags, res0, domain_id, pasid, res1, archid, vs, nr, granule, res2) = req
        if res0 or res1 or res2.count(0) != len(res2) or gran not in (INV_G_DOMAIN, INV_G_PASID, INV_G_VA) \
                or itype & ~(INV_T_IOTLB | INV_T_DEV_IOTLB | INV_T_PASID) \
                or flags & ~(INV_F_PASID | INV_F_ARCHID | INV_F_LEAF):
            return S_INVAL, b""
        if flags & INV_F_PASID and pasid >> PASID_BITS:
            return S_INVAL, b""
        if gran == INV_G_PASID and not flags & INV_F_PASID:
            return S_INVAL, b""
        if gran == INV_G_VA and (not flags & (INV_F_PASID | INV_F_ARCHID) or not 12 <= granule <= 30 or nr == 0
                                 or vs + (nr << granule) > 1 << 64):
            return S_INVAL, b""
        dom = self.domains.get(domain_id)
        if dom is None:
            return S_NOENT, b""
        if dom.table is None:
            return S_INVAL, b""
        w, ctx = self.walker, dom.table.ctx
        if itype & INV_T_IOTLB:
            if gran == INV_G_DOMAIN:
                w.table_invalidate_tlb(ctx)
            else:
                if flags & INV_F_ARCHID:
                    asid = archid if archid < 1 << 16 else None      # ASIDs are 16 bits: nothing matches
                else:
                    asid = w.table_cached_asid(ctx, pasid)           # nothing when no CD is cached
                if asid is not None:
                    if gran == INV_G_VA:
                        w.table_invalidate_tlb(ctx, asid, vs, nr << granule)
                    else:
                        w.table_invalidate_tlb(ctx, asid)
        if itype & INV_T_PASID:
            if gran == INV_G_DOMAIN:
                w.table_invalidate_cd(ctx)
            elif flags & INV_F_PASID:
                w.table_invalidate_cd(ctx, pasid)
        return S_OK, b""

    # -- DMA and faults --------------------------------------------------------------------------
    def translator(self, master: int, domain: Domain) -> EndpointTranslator:
        return EndpointTranslator(self, int(master), domain.p2m_translator)

    def report_fault(self, reason: int, flags: int, endpoint: int, address: int, pasid: int = 0) -> None:
        """Queue one fault record on the event queue, taking the next buffer the driver posted
        (notified or not); with no usable buffer the event is dropped and counted."""
        self.faults += 1
        t = self.transport
        if t is None or not t.live or not t.queues[EVENT_Q].ready:
            self.events_dropped += 1
            return
        q, mem = t.queues[EVENT_Q], self.mem
        record = FAULT_PASID.pack(reason, flags, endpoint & 0xFFFFFFFF, pasid, address & ((1 << 64) - 1))
        try:
            if not q.pending(mem):
                self.events_dropped += 1
                return
            old = q.used_idx
            chain = q.pop(mem)
            used = 0
            if chain.error is None and chain.wlen >= FAULT.size:
                try:
                    mem.scatter(mem.map_segments(chain.writable, FAULT.size), record)
                    used = FAULT.size
                except DmaFault:
                    pass
            if used:
                self.events_delivered += 1
            else:
                self.events_dropped += 1      # malformed or too small: returned unwritten
            q.push(mem, chain.head, used)
            if q.publish(mem, old):
                t.interrupt(INT_USED_BUFFER)
        except RingError as e:
            self.events_dropped += 1
            t.needs_reset(f"eventq: {e}")


class EndpointTranslator:
    """What a master behind virtio-iommu endpoint ``endpoint`` gets from ``vmm.wiring``.

    Looks the endpoint's state up on every call (attach/detach take effect at once). A refusal
    by the IOMMU (no domain, no mapping, missing permission) reports one fault event and raises
    DmaFault(2 or 3, the first byte of the failing page the access touches). A GPA the P2M refuses raises DmaFault
    with the IOVA of that page but reports no virtio-iommu event: the IOMMU translated fine,
    the stage-2 owner refused (like DmaPort's "outside machine memory").
    """

    def __init__(self, dev: VirtioIommu, endpoint: int, p2m: Translator) -> None:
        self.dev = dev
        self.endpoint = endpoint
        self.p2m = p2m

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        try:
            return self._translate(iova, length, write, pasid)
        except DmaFault:
            raise
        except Exception as e:  # noqa: BLE001 - never let a model bug escape into the bus
            log.exception("virtio-iommu: internal error translating %#x", iova)
            raise DmaFault(STATUS_TRANSLATION, iova & ~(PAGE - 1), f"internal error: {e!r}") from None

    def _fault(self, reason: int, status: int, addr: int, write: bool, why: str, pasid: int | None = None,
               steps: list | None = None) -> DmaFault:
        """``addr`` is the first byte of the failing page the access touches (its start, or the
        page base where a later page fails): the event and the master's FAULT_ADDR carry it. An
        access with a PASID (table domains only) sets FAULT_F_PASID and carries it at offset 12."""
        flags = (FAULT_F_WRITE if write else FAULT_F_READ) | FAULT_F_ADDRESS
        if pasid is not None:
            flags |= FAULT_F_PASID
        self.dev.report_fault(reason, flags, self.endpoint, addr, pasid or 0)
        name = {FAULT_R_UNKNOWN: "UNKNOWN", FAULT_R_DOMAIN: "DOMAIN", FAULT_R_MAPPING: "MAPPING"}[reason]
        context = f"endpoint {self.endpoint}" + (f" PASID {pasid}" if pasid is not None else "")
        expl = FaultExplanation(self.dev.name, addr, "write" if write else "read", status,
                                f"{why}; fault event reason {name}", context=context, steps=steps or [])
        return DmaFault(status, addr, "virtio-iommu refused the access", expl)

    @staticmethod
    def _near(maps: IntervalMap, addr: int) -> str:
        before, after = maps.floor(addr), maps.above(addr)
        parts = []
        if before is not None:
            parts.append(f"the nearest below is [{before[0]:#x}, {before[1]:#x}]")
        if after is not None and after[0] > addr:
            parts.append(f"the next is [{after[0]:#x}, {after[1]:#x}]")
        return "; ".join(parts) or "the domain maps nothing"

    def _gpa(self, iova: int, gpa: int, length: int, write: bool) -> Runs:
        """GPA -> machine runs through the P2M; a P2M fault is reported at the matching IOVA."""
        try:
            if gpa + length > 1 << 64:
                raise DmaFault(STATUS_TRANSLATION, gpa, "beyond the address space")
            return self.p2m.translate(gpa, length, write)
        except DmaFault as e:
            delta = max(e.address, gpa) - gpa           # both first bytes of the failing page touched
            raise DmaFault(e.status, iova + delta, e.why, e.explanation) from None

    def _table(self, dom: IommuDomain, iova: int, length: int, write: bool, pasid: int | None) -> Runs:
        """A table domain: PASID -> CD -> stage 1 -> stage 2, all in the C walker. No PASID:
        s1dss says terminate (a DOMAIN fault), bypass (the IOVA is a GPA) or use CD 0."""
        t = dom.table
        if pasid is None:
            if t.s1dss == S1DSS_BYPASS:
                return self._gpa(iova, iova, length, write)
            if t.s1dss == S1DSS_TERMINATE:
                raise self._fault(FAULT_R_DOMAIN, STATUS_TRANSLATION, iova, write,
                                  f"table domain {dom.id}: a DMA without a PASID and s1dss = 0 (terminate)")
        walk_pasid = 0 if pasid is None else pasid
        dev = self.dev
        res = dev.walker.translate_range_pasid(t.ctx, walk_pasid, iova, length, W if write else R)
        if isinstance(res, list):
            return res
        fault, at = res
        return self._table_fault(dom, fault, at, write, pasid, walk_pasid)

    def _table_fault(self, dom: IommuDomain, fault: Fault, at: int, write: bool, pasid: int | None,
                     walk_pasid: int):
        """Raise the fault of a table walk: DOMAIN for the configuration (PASID out of range, L1
        descriptor, CD, or a CD table the P2M refuses), MAPPING for stage-1 / stage-2 walks."""
        t = dom.table
        config = fault.configuration
        status = STATUS_PERMISSION if fault.kind == PERMISSION and not config else STATUS_TRANSLATION
        where = f"table domain {dom.id} PASID {walk_pasid}" + (" (s1dss: CD 0)" if pasid is None else "")
        steps, reason = explain_pasid_walk(self.dev.guest.p2m.memory, CdTable(t.ptr, t.s1fmt, t.cdmax, 0),
                                           self.dev.guest.p2m.stage, walk_pasid, at, write)
        raise self._fault(FAULT_R_DOMAIN if config else FAULT_R_MAPPING, status, at, write,
                          f"{where}: {reason}", pasid, steps)

    def _translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        dev = self.dev
        ep = self.endpoint
        if length <= 0:
            return []
        if ep not in dev.endpoints:
            if dev.bypass:
                return self._gpa(iova, iova, length, write)
            raise self._fault(FAULT_R_UNKNOWN, STATUS_TRANSLATION, iova, write,
                              f"endpoint {ep} is not one of this device's endpoints and bypass is off")
        dom = dev.attached.get(ep)
        if dom is None:
            # Spec 1.7 (a): BYPASS_CONFIG is offered, so config.bypass alone decides.
            if dev.bypass:
                return self._gpa(iova, iova, length, write)
            raise self._fault(FAULT_R_DOMAIN, STATUS_TRANSLATION, iova, write,
                              f"endpoint {ep} is attached to no domain and config.bypass is 0")
        if dom.table is not None:
            return self._table(dom, iova, length, write, pasid)
        if dom.bypass:
            return self._gpa(iova, iova, length, write)
        need = MAP_F_WRITE if write else MAP_F_READ
        maps = dom.mappings
        runs: Runs = []
        cursor, end = iova, iova + length
        while cursor < end:
            if MSI_START <= cursor <= MSI_END:
                # The MSI doorbell window bypasses translation (identity), as QEMU does.
                seg_end = min(MSI_END + 1, end)
                runs.extend(self._gpa(cursor, cursor, seg_end - cursor, write))
                cursor = seg_end
                continue
            hit = maps.find(cursor)
            if hit is None:
                raise self._fault(FAULT_R_MAPPING, STATUS_TRANSLATION, cursor, write,
                                  f"no mapping of domain {dom.id} covers IOVA {cursor:#x} ({self._near(maps, cursor)})")
            vs, ve, ps, flags = hit
            if not flags & need:
                raise self._fault(FAULT_R_MAPPING, STATUS_PERMISSION, cursor, write,
                                  f"mapping [{vs:#x}, {ve:#x}] -> {ps:#x} of domain {dom.id} has flags {flags:#x} "
                                  f"({'READ' if flags & MAP_F_READ else 'no READ'}, "
                                  f"{'WRITE' if flags & MAP_F_WRITE else 'no WRITE'}): a {'write' if write else 'read'}"
                                  " is not allowed")
            seg_end = min(ve + 1, end)
            runs.extend(self._gpa(cursor, ps + (cursor - vs), seg_end - cursor, write))
            cursor = seg_end
        return runs


Handler = Callable[[VirtioIommu, tuple], tuple[int, bytes]]


@dataclass(frozen=True)
class RequestType:
    """One row of the request table: the request's layout (what the device reads), its handler,
    and how many reply bytes precede the tail (what the device writes)."""

    layout: struct.Struct
    handler: Handler
    reply_size: Callable[[VirtioIommu], int] | None = None     # None: no reply bytes before the tail

    @property
    def size(self) -> int:
        return self.layout.size


DISPATCH: dict[int, RequestType] = {
    T_ATTACH: RequestType(ATTACH_REQ, VirtioIommu._attach),
    T_DETACH: RequestType(DETACH_REQ, VirtioIommu._detach),
    T_MAP: RequestType(MAP_REQ, VirtioIommu._map),
    T_UNMAP: RequestType(UNMAP_REQ, VirtioIommu._unmap),
    T_PROBE: RequestType(PROBE_REQ, VirtioIommu._probe, lambda dev: dev.probe_size),
}
MAX_REQUEST = max(r.layout.size for r in DISPATCH.values())     # no request reads more than its largest layout
# With F_ATTACH_TABLE negotiated (and only then) types 6 and 7 exist.
TABLE_DISPATCH: dict[int, RequestType] = {
    **DISPATCH,
    T_ATTACH_TABLE: RequestType(ATTACH_TABLE_REQ, VirtioIommu._attach_table),
    T_INVALIDATE: RequestType(INVALIDATE_REQ, VirtioIommu._invalidate),
}
MAX_TABLE_REQUEST = max(r.layout.size for r in TABLE_DISPATCH.values())


def build_backend(ctx: BuildContext, spec: dict) -> VirtioIommu:
    """``backend = "virtio-iommu"``: endpoints from the board entry (or, failing that, the master
    IDs of the bus masters wired to it), ``max_mappings`` per domain, bypass at system reset from
    the board's ``boot_bypass``."""
    endpoints = spec.get("endpoints")
    if endpoints is None:
        endpoints = [d.get("master", 0) for d in ctx.board.devices if d.get("iommu") == spec["name"]]
    if spec["max_mappings"] < 0:
        raise ValueError("max_mappings must be >= 0")
    return VirtioIommu(endpoints, bool(ctx.board.boot_bypass), spec["max_mappings"], name=spec["name"],
                       guest=ctx.domain(spec.get("domain", "dom0")), walker=ctx.walker, alloc_ctx=ctx.alloc_ctx_id)


DEVICE = DeviceType(
    "virtio-iommu", build_backend, kind="virtio", doc="virtio-iommu (device 23), spec-strict",
    keys=(Key("endpoints", list, None, "endpoint IDs (default: the masters wired to it)", items=int),
          Key("max_mappings", int, DEFAULT_MAX_MAPPINGS, "MAP requests a domain may hold before NOMEM")))
