"""virtio-mmio version 2 transport (virtio 1.x section 4.2), one 0x200 slot per board entry.

The transport is device-agnostic: registers, feature negotiation, status, split virtqueues and
the interrupt line. A backend (``backend = "virtio-iommu"`` on the board entry) supplies the
device ID, its features, its queue sizes, its config space and what a notification means. A
slot without a backend is the placeholder the spec describes: magic and version, device ID 0.

Every access is synchronous (DESIGN.md "Timing"): a QueueNotify write returns after the backend
consumed the queue and the used ring and InterruptStatus are updated. The IRQ line (16 + slot on
rcar-virt) is held high exactly while InterruptStatus is non-zero. Nothing a driver writes makes
``read``/``write`` raise: a broken queue or ring sets DEVICE_NEEDS_RESET instead.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

import construct as cs

from devices.regs import RegisterMap
from devices.virtqueue import F_VERSION_1, SplitQueue
from vmm.dma import DeviceMemory, Refuse, Translator
from vmm.irq import IrqLine
from vmm.registry import REGISTRY, DeviceType, Key

if TYPE_CHECKING:
    from vmm.machine import Domain
    from vmm.wiring import BuildContext

log = logging.getLogger("vmm.virtio")

MAGIC = 0x74726976              # "virt"
VERSION = 2
VENDOR_ID = 0x42414C49          # "ILAB"
SLOT_SIZE = 0x200
CONFIG_OFFSET = 0x100

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

INT_USED_BUFFER = 1 << 0
INT_CONFIG_CHANGE = 1 << 1

LAYOUT = RegisterMap(cs.Struct(
    "MagicValue" / cs.Int32ul,          # 0x000
    "Version" / cs.Int32ul,             # 0x004
    "DeviceID" / cs.Int32ul,            # 0x008
    "VendorID" / cs.Int32ul,            # 0x00c
    "DeviceFeatures" / cs.Int32ul,      # 0x010
    "DeviceFeaturesSel" / cs.Int32ul,   # 0x014
    "_pad0" / cs.Padding(8),
    "DriverFeatures" / cs.Int32ul,      # 0x020
    "DriverFeaturesSel" / cs.Int32ul,   # 0x024
    "_legacy0" / cs.Padding(8),         # GuestPageSize (legacy only)
    "QueueSel" / cs.Int32ul,            # 0x030
    "QueueNumMax" / cs.Int32ul,         # 0x034
    "QueueNum" / cs.Int32ul,            # 0x038
    "_legacy1" / cs.Padding(8),         # QueueAlign, QueuePFN (legacy only)
    "QueueReady" / cs.Int32ul,          # 0x044
    "_pad1" / cs.Padding(8),
    "QueueNotify" / cs.Int32ul,         # 0x050
    "_pad2" / cs.Padding(12),
    "InterruptStatus" / cs.Int32ul,     # 0x060
    "InterruptACK" / cs.Int32ul,        # 0x064
    "_pad3" / cs.Padding(8),
    "Status" / cs.Int32ul,              # 0x070
    "_pad4" / cs.Padding(12),
    "QueueDescLow" / cs.Int32ul,        # 0x080
    "QueueDescHigh" / cs.Int32ul,       # 0x084
    "_pad5" / cs.Padding(8),
    "QueueDriverLow" / cs.Int32ul,      # 0x090
    "QueueDriverHigh" / cs.Int32ul,     # 0x094
    "_pad6" / cs.Padding(8),
    "QueueDeviceLow" / cs.Int32ul,      # 0x0a0
    "QueueDeviceHigh" / cs.Int32ul,     # 0x0a4
    "_pad7" / cs.Padding(4),
    "SHMSel" / cs.Int32ul,              # 0x0ac
    "SHMLenLow" / cs.Int32ul,           # 0x0b0
    "SHMLenHigh" / cs.Int32ul,          # 0x0b4
    "SHMBaseLow" / cs.Int32ul,          # 0x0b8
    "SHMBaseHigh" / cs.Int32ul,         # 0x0bc
    "QueueReset" / cs.Int32ul,          # 0x0c0
    "_pad8" / cs.Padding(0xFC - 0xC4),
    "ConfigGeneration" / cs.Int32ul,    # 0x0fc
))
assert LAYOUT.size == CONFIG_OFFSET
REG = {name: f.offset for name, f in LAYOUT.fields.items()}
# Registers are 32-bit only: the decode table keyed by offset alone.
_DECODE32 = {off: name for (off, size), (name, _, _) in LAYOUT.decode.items() if size == 4}


class Backend(Protocol):
    """What a virtio device model gives the transport."""

    device_id: int
    features: int
    queue_sizes: tuple[int, ...]

    def attach(self, transport: VirtioMmio) -> None: ...
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, value: int) -> None: ...
    def reset(self) -> None: ...
    def notify(self, queue: int) -> None: ...


class VirtioMmio:
    """One virtio-mmio v2 slot with a device behind it."""

    def __init__(self, backend: Backend, irq: IrqLine, mem: DeviceMemory) -> None:
        self.backend = backend
        self.irq = irq
        self.mem = mem
        self.queues = [SplitQueue(i, n) for i, n in enumerate(backend.queue_sizes)]
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.status = 0
        self.interrupt_status = 0
        self.shm_sel = 0
        self.needs_reset_reasons: deque[str] = deque(maxlen=16)     # the latest; a guest may loop on errors
        self.needs_reset_count = 0
        backend.attach(self)

    # -- state the backend consults ----------------------------------------------------------
    @property
    def negotiated(self) -> int:
        """Features both sides agreed on (0 until FEATURES_OK was accepted)."""
        return self.driver_features if self.status & STATUS_FEATURES_OK else 0

    @property
    def live(self) -> bool:
        """The device may use its queues: DRIVER_OK, not failed, not waiting for a reset."""
        s = self.status
        return bool(s & STATUS_DRIVER_OK) and not s & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)

    def interrupt(self, bits: int) -> None:
        self.interrupt_status |= bits
        self.irq.set(self.interrupt_status != 0)

    def needs_reset(self, why: str) -> None:
        """An error the device cannot tie to one request: DEVICE_NEEDS_RESET (spec 2.1.2), with a
        configuration-change interrupt if the driver is already running."""
        log.warning("virtio: device needs reset: %s", why)
        self.needs_reset_reasons.append(why)
        self.needs_reset_count += 1
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.interrupt(INT_CONFIG_CHANGE)

    def reset(self) -> None:
        """Device reset (Status = 0): queues, features, interrupts and the backend's state."""
        for q in self.queues:
            q.reset()
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.status = 0
        self.interrupt_status = 0
        self.irq.lower()
        self.mem.flush()
        self.backend.reset()

    # -- bus face ------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                return 0
            return self.backend.config_read(offset - CONFIG_OFFSET, size)
        if size != 4:
            return 0
        name = _DECODE32.get(offset)
        if name is None:
            return 0
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if name == "MagicValue":
            return MAGIC
        if name == "Version":
            return VERSION
        if name == "DeviceID":
            return self.backend.device_id
        if name == "VendorID":
            return VENDOR_ID
        if name == "DeviceFeatures":
            if self.device_features_sel > 1:
                return 0
            return (self.backend.features >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        if name == "QueueNumMax":
            return q.size_max if q else 0
        if name == "QueueNum":
            return q.num if q else 0
        if name == "QueueReady":
            return int(q.ready) if q else 0
        if name == "InterruptStatus":
            return self.interrupt_status
        if name == "Status":
            return self.status
        if name in ("SHMLenLow", "SHMLenHigh", "SHMBaseLow", "SHMBaseHigh"):
            return 0xFFFFFFFF            # no shared memory regions
        if name == "ConfigGeneration":
            return 0                     # config changes only by driver writes: never torn
        return 0                         # write-only registers and QueueReset (no RING_RESET) read 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            if size in (1, 2, 4, 8):
                self.backend.config_write(offset - CONFIG_OFFSET, size, value)
            return
        if size != 4:
            return
        name = _DECODE32.get(offset)
        if name is None:
            return
        if name == "QueueNotify":
            self._notify(value)
        elif name == "InterruptACK":
            self.interrupt_status &= ~value
            self.irq.set(self.interrupt_status != 0)
        elif name == "Status":
            self._write_status(value)
        elif name == "DeviceFeaturesSel":
            self.device_features_sel = value
        elif name == "DriverFeaturesSel":
            self.driver_features_sel = value
        elif name == "DriverFeatures":
            # Features are frozen once FEATURES_OK was accepted (spec 3.1.1).
            if not self.status & STATUS_FEATURES_OK and self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "QueueSel":
            self.queue_sel = value
        elif name == "SHMSel":
            self.shm_sel = value
        elif self.queue_sel < len(self.queues):
            self._write_queue(self.queues[self.queue_sel], name, value)

    def _write_queue(self, q: SplitQueue, name: str, value: int) -> None:
        if name == "QueueReady":
            if not value & 1:
                q.ready = False
            elif not q.ready:
                if not q.valid_size():
                    self.needs_reset(f"queue {q.index}: size {q.num} is not a power of 2 in 1..{q.size_max}")
                    return
                q.enable(self.negotiated)
            return
        if q.ready:
            return          # the driver MUST NOT change a live queue; ignore rather than corrupt it
        if name == "QueueNum":
            q.num = value
        elif name == "QueueDescLow":
            q.desc = (q.desc & ~0xFFFFFFFF) | value
        elif name == "QueueDescHigh":
            q.desc = (q.desc & 0xFFFFFFFF) | (value << 32)
        elif name == "QueueDriverLow":
            q.avail = (q.avail & ~0xFFFFFFFF) | value
        elif name == "QueueDriverHigh":
            q.avail = (q.avail & 0xFFFFFFFF) | (value << 32)
        elif name == "QueueDeviceLow":
            q.used = (q.used & ~0xFFFFFFFF) | value
        elif name == "QueueDeviceHigh":
            q.used = (q.used & 0xFFFFFFFF) | (value << 32)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF
        old = self.status
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            feats = self.driver_features
            if feats & ~self.backend.features or not feats & F_VERSION_1:
                value &= ~STATUS_FEATURES_OK      # refused: the driver reads FEATURES_OK back as 0
        # DEVICE_NEEDS_RESET belongs to the device: a driver write neither sets nor clears it.
        self.status = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)

    def translator(self, master: int, domain: Domain) -> Translator:
        """The DMA face of an IOMMU backend (``vmm.wiring`` asks the bus device for it)."""
        make = getattr(self.backend, "translator", None)
        if make is None:
            return Refuse(f"virtio device {self.backend.device_id} does not translate for masters")
        return make(master, domain)

    def _notify(self, index: int) -> None:
        if index >= len(self.queues) or not self.live or not self.queues[index].ready:
            return
        try:
            self.backend.notify(index)
        except Exception as e:  # noqa: BLE001 - last line of defence: a device bug must not kill the VMM
            log.exception("virtio: internal error on queue %d notify", index)
            self.needs_reset(f"internal error: {e!r}")


class EmptySlot:
    """A transport with no device: device ID 0, which a driver must silently ignore."""

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset == REG["MagicValue"]:
            return MAGIC
        if offset == REG["Version"]:
            return VERSION
        if offset == REG["VendorID"]:
            return VENDOR_ID
        if offset in (REG["SHMLenLow"], REG["SHMLenHigh"], REG["SHMBaseLow"], REG["SHMBaseHigh"]):
            return 0xFFFFFFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def build(ctx: BuildContext, spec: dict) -> tuple[VirtioMmio | EmptySlot, int]:
    """Board entry ``type = "virtio-mmio"``: an empty slot, or a transport with ``backend``, a
    registered virtio device type (``kind = "virtio"``) whose keys the entry also carries."""
    kind = spec.get("backend")
    if kind is None:
        return EmptySlot(), SLOT_SIZE
    backend = REGISTRY.get(kind).build(ctx, spec)
    dom = ctx.domain(spec["domain"])
    transport = VirtioMmio(backend, ctx.irq(spec["irq"]), ctx.guest_memory(dom, spec["name"]))
    return transport, SLOT_SIZE


DEVICE = DeviceType(
    "virtio-mmio", build, subtype_key="backend",
    doc="a virtio-mmio v2 slot; an empty one reads device ID 0",
    keys=(Key("irq", int, doc="the slot's interrupt line"),
          Key("backend", str, None, "the virtio device type behind it (e.g. virtio-iommu)"),
          Key("domain", str, "dom0", "the domain whose guest-physical memory holds its queues", ref="domain")))
