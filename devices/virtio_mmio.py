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

from devices.layout import layout
from devices.regs import RO, WO, Bank, Reg, RegisterFile
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


def _ring_half(ring: str, shift: int):
    """Write hook of QueueDesc/Driver/DeviceLow/High: one 32-bit half of a ring address of the
    selected queue, while the driver may still configure it."""
    def written(t: VirtioMmio, old: int, value: int) -> None:
        q = t._idle_queue()
        if q is not None:
            setattr(q, ring, (getattr(q, ring) & ~(0xFFFFFFFF << shift)) | (value << shift))
    return written


# Registers are 32-bit. Write-only ones read 0; QueueReset (no VIRTIO_F_RING_RESET) reads 0 and
# ignores writes; ConfigGeneration is 0 because config changes only by driver writes (never torn).


@layout
def TRANSPORT_REGS(cs):
    return cs.Struct(
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
    )


LAYOUT = Bank(TRANSPORT_REGS, [
    Reg("MagicValue", 0x000, access=RO, reset=MAGIC),
    Reg("Version", 0x004, access=RO, reset=VERSION),
    Reg("DeviceID", 0x008, access=RO, on_read="_device_id"),
    Reg("VendorID", 0x00C, access=RO, reset=VENDOR_ID),
    Reg("DeviceFeatures", 0x010, access=RO, on_read="_device_features", doc="32 bits chosen by DeviceFeaturesSel"),
    Reg("DeviceFeaturesSel", 0x014, access=WO),
    Reg("DriverFeatures", 0x020, access=WO, on_write="_driver_features_written"),
    Reg("DriverFeaturesSel", 0x024, access=WO),
    Reg("QueueSel", 0x030, access=WO),
    Reg("QueueNumMax", 0x034, access=RO, on_read="_queue_num_max"),
    Reg("QueueNum", 0x038, on_read="_queue_num", on_write="_queue_num_written"),
    Reg("QueueReady", 0x044, fields={"READY": 0}, on_read="_queue_ready", on_write="_queue_ready_written"),
    Reg("QueueNotify", 0x050, access=WO, on_write=lambda t, old, value: t._notify(value)),
    Reg("InterruptStatus", 0x060, access=RO, fields={"USED_BUFFER": 0, "CONFIG_CHANGE": 1},
        doc="set by the device; the IRQ line is high while it is non-zero"),
    Reg("InterruptACK", 0x064, access=WO, on_write="_interrupt_acked", doc="clears the bits written as 1"),
    Reg("Status", 0x070, wmask=0xFF, on_write="_status_written",
        fields={"ACKNOWLEDGE": 0, "DRIVER": 1, "DRIVER_OK": 2, "FEATURES_OK": 3, "DEVICE_NEEDS_RESET": 6,
                "FAILED": 7}),
    Reg("QueueDescLow", 0x080, access=WO, on_write=_ring_half("desc", 0)),
    Reg("QueueDescHigh", 0x084, access=WO, on_write=_ring_half("desc", 32)),
    Reg("QueueDriverLow", 0x090, access=WO, on_write=_ring_half("avail", 0)),
    Reg("QueueDriverHigh", 0x094, access=WO, on_write=_ring_half("avail", 32)),
    Reg("QueueDeviceLow", 0x0A0, access=WO, on_write=_ring_half("used", 0)),
    Reg("QueueDeviceHigh", 0x0A4, access=WO, on_write=_ring_half("used", 32)),
    Reg("SHMSel", 0x0AC, access=WO),
    *[Reg(name, 0x0B0 + 4 * i, access=RO, reset=0xFFFFFFFF, doc="no shared memory regions")
      for i, name in enumerate(("SHMLenLow", "SHMLenHigh", "SHMBaseLow", "SHMBaseHigh"))],
    Reg("QueueReset", 0x0C0, access=RO),
    Reg("ConfigGeneration", 0x0FC, access=RO),
], "virtio-mmio")
assert LAYOUT.size == CONFIG_OFFSET
STATUS = LAYOUT["Status"]
INTERRUPT = LAYOUT["InterruptStatus"]
QUEUE_READY = LAYOUT["QueueReady"]
STATUS_ACKNOWLEDGE = STATUS.ACKNOWLEDGE.mask
STATUS_DRIVER = STATUS.DRIVER.mask
STATUS_DRIVER_OK = STATUS.DRIVER_OK.mask
STATUS_FEATURES_OK = STATUS.FEATURES_OK.mask
STATUS_DEVICE_NEEDS_RESET = STATUS.DEVICE_NEEDS_RESET.mask
STATUS_FAILED = STATUS.FAILED.mask
INT_USED_BUFFER = INTERRUPT.USED_BUFFER.mask
INT_CONFIG_CHANGE = INTERRUPT.CONFIG_CHANGE.mask
_EMPTY = LAYOUT.constants()             # what a slot without a device reads


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
        self.regs = RegisterFile(LAYOUT, self, unmatched_read="_config_read", unmatched_write="_config_write")
        self.read = self.regs.read            # the bus face is the register file's: one call per access
        self.write = self.regs.write
        self.driver_features = 0            # all 64 bits, as DriverFeatures(Sel) assembled them
        self.needs_reset_reasons: deque[str] = deque(maxlen=16)     # the latest; a guest may loop on errors
        self.needs_reset_count = 0
        mem.on_private = self._private_access     # a secure guest's private page (DESIGN section 7)
        backend.attach(self)

    # -- state the backend consults ----------------------------------------------------------
    @property
    def negotiated(self) -> int:
        """Features both sides agreed on (0 until FEATURES_OK was accepted)."""
        return self.driver_features if self.regs["Status"] & STATUS_FEATURES_OK else 0

    @property
    def live(self) -> bool:
        """The device may use its queues: DRIVER_OK, not failed, not waiting for a reset."""
        s = self.regs["Status"]
        return bool(s & STATUS_DRIVER_OK) and not s & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)

    def interrupt(self, bits: int) -> None:
        regs = self.regs
        regs["InterruptStatus"] |= bits
        self.irq.set(regs["InterruptStatus"] != 0)

    def needs_reset(self, why: str) -> None:
        """An error the device cannot tie to one request: DEVICE_NEEDS_RESET (spec 2.1.2), with a
        configuration-change interrupt if the driver is already running."""
        # The first reason is the one that matters; what fails after it is its consequence.
        first = not self.regs["Status"] & STATUS_DEVICE_NEEDS_RESET
        log.log(logging.WARNING if first else logging.DEBUG, "virtio: device needs reset: %s", why)
        self.needs_reset_reasons.append(why)
        self.needs_reset_count += 1
        self.regs["Status"] |= STATUS_DEVICE_NEEDS_RESET
        if self.regs["Status"] & STATUS_DRIVER_OK:
            self.interrupt(INT_CONFIG_CHANGE)

    def _private_access(self, why: str) -> None:
        """A descriptor, ring or buffer lies in a page its secure guest has not shared: the device
        stops touching guest memory (no buffer is used, nothing more written) until a reset."""
        self.mem.block(why)
        self.needs_reset(f"{self.mem.name}: private memory: {why}")

    def reset(self) -> None:
        """Device reset (Status = 0): queues, features, interrupts and the backend's state."""
        for q in self.queues:
            q.reset()
        self.regs.reset()
        self.driver_features = 0
        self.irq.lower()
        self.mem.unblock()
        self.mem.flush()
        self.backend.reset()

    # -- bus face: ``read``/``write`` are the register file's; what no register claims lands here
    def _config_read(self, offset: int, size: int) -> int:
        if offset < CONFIG_OFFSET or size not in (1, 2, 4, 8):
            return 0
        return self.backend.config_read(offset - CONFIG_OFFSET, size)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET and size in (1, 2, 4, 8):
            self.backend.config_write(offset - CONFIG_OFFSET, size, value)

    # -- register hooks (named in LAYOUT) ---------------------------------------------------------
    def _device_id(self) -> int:
        return self.backend.device_id

    def _device_features(self) -> int:
        sel = self.regs["DeviceFeaturesSel"]
        return 0 if sel > 1 else (self.backend.features >> (32 * sel)) & 0xFFFFFFFF

    def _selected_queue(self) -> SplitQueue | None:
        sel = self.regs["QueueSel"]
        return self.queues[sel] if sel < len(self.queues) else None

    def _idle_queue(self) -> SplitQueue | None:
        """The selected queue if the driver may configure it: it MUST NOT change a live queue,
        and the device ignores such writes rather than corrupt it."""
        q = self._selected_queue()
        return None if q is None or q.ready else q

    def _queue_num_max(self) -> int:
        q = self._selected_queue()
        return q.size_max if q else 0

    def _queue_num(self) -> int:
        q = self._selected_queue()
        return q.num if q else 0

    def _queue_ready(self) -> int:
        q = self._selected_queue()
        return int(q.ready) if q else 0

    def _queue_num_written(self, old: int, value: int) -> None:
        q = self._idle_queue()
        if q is not None:
            q.num = value

    def _queue_ready_written(self, old: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            return
        if not QUEUE_READY.READY(value):
            q.ready = False
        elif not q.ready:
            if not q.valid_size():
                self.needs_reset(f"queue {q.index}: size {q.num} is not a power of 2 in 1..{q.size_max}")
                return
            q.enable(self.negotiated)

    def _driver_features_written(self, old: int, value: int) -> None:
        # Features are frozen once FEATURES_OK was accepted (spec 3.1.1).
        sel = self.regs["DriverFeaturesSel"]
        if not self.regs["Status"] & STATUS_FEATURES_OK and sel <= 1:
            shift = 32 * sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _interrupt_acked(self, old: int, value: int) -> None:
        regs = self.regs
        regs["InterruptStatus"] &= ~value
        self.irq.set(regs["InterruptStatus"] != 0)

    def _status_written(self, old: int, value: int) -> None:
        if value == 0:
            self.reset()
            return
        new = self.regs["Status"]               # the 8 bits the write latched
        if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            feats = self.driver_features
            if feats & ~self.backend.features or not feats & F_VERSION_1:
                new &= ~STATUS_FEATURES_OK      # refused: the driver reads FEATURES_OK back as 0
        # DEVICE_NEEDS_RESET belongs to the device: a driver write neither sets nor clears it.
        self.regs["Status"] = (new & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)

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
    """A transport with no device: device ID 0, which a driver must silently ignore. It reads
    the registers whose value the declaration fixes (magic, version, vendor, no SHM) and 0."""

    def read(self, offset: int, size: int) -> int:
        return _EMPTY.get((offset, size), 0)

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
