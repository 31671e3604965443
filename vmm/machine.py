"""The machine: memory, domains and their P2Ms, buses, interrupt lines and devices of one board.

It is the same object for every job: a CPU backend runs a payload on it, the trace replayer
drives it with no CPU, and tests poke it directly. It knows address ranges and wiring, never a
register name.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vmm import board as boards
from vmm.bus import Bus, BusError
from vmm.debugports import DebugConsole, DebugExit
from vmm.dma import DmaFault, P2MTranslator, TransferListener
from vmm.explain import FaultExplanation
from vmm.frames import HYPERVISOR, FrameOwners, Isolation
from vmm.guestram import GuestRam, check_mappings
from vmm.irq import IrqController
from vmm.memory import PAGE, MachineMemory
from vmm.p2m import P2M
from vmm.registry import RegistryError
from vmm.walker import R, W, Walker
from vmm.wiring import BuildContext

log = logging.getLogger("vmm")

LOW_RAM_END = 0x0A000000        # RAM stops below the device window (160 MiB) ...
HIGH_RAM_BASE = 1 << 32         # ... and continues at 4 GiB
POOL_SIZE = 32 << 20            # hypervisor frames: P2M tables, harness-built tables
EXCHANGE_RESERVE = 16 << 20     # free machine memory kept below 4 GiB for `hyp` exchanges (section 7)
MIB2 = 2 << 20


def ram_ranges(size: int) -> list[tuple[int, int]]:
    low = min(size, LOW_RAM_END)
    ranges = [(0, low)]
    if size > low:
        ranges.append((HIGH_RAM_BASE, size - low))
    return ranges


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class MachineError(Exception):
    """A machine used in a way its life cycle does not allow (a second run, use after close)."""


class AccessObserver(Protocol):
    """Sees every CPU-side bus access (MMIO and port I/O) the machine dispatches: trace recording.

    ``before_access`` runs first (the recorder writes the guest memory the CPU changed, which the
    access may DMA); ``after_access`` gets the access and its value (the one read, or written).
    ``kind`` is ``"mmio_read"``, ``"mmio_write"``, ``"pio_read"`` or ``"pio_write"``.
    """

    needs_dirty_pages: bool     # the CPU backend must track the guest pages it writes

    def before_access(self) -> None: ...
    def after_access(self, kind: str, addr: int, size: int, value: int) -> None: ...
    def attach_cpu(self, cpu) -> None: ...
    def detach_cpu(self, cpu) -> None: ...


@dataclass
class Domain:
    name: str
    id: int
    p2m: P2M
    ram_ranges: list[tuple[int, int]]
    direct: bool
    secure: bool = False                 # memory private unless shared (DESIGN section 7)
    ram: GuestRam | None = None
    owner: int = 0                       # its id in the machine's frame-ownership map
    p2m_translator: P2MTranslator = field(init=False)

    def __post_init__(self) -> None:
        self.p2m_translator = P2MTranslator(self.p2m)

    @property
    def ram_size(self) -> int:
        return sum(size for _, size in self.ram_ranges)

    def _check(self, gpa: int, length: int) -> None:
        for start, size in self.ram_ranges:
            if start <= gpa and gpa + length <= start + size:
                return
        raise ValueError(f"[{gpa:#x}, +{length:#x}) is not guest RAM of {self.name}")

    def _frames(self, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """(offset in the access, machine address, length) of each guest page the access touches,
        through the P2M: the way to guest memory of a machine built without a CPU view."""
        self._check(gpa, length)
        first = gpa & ~(PAGE - 1)
        count = (gpa + length - first + PAGE - 1) // PAGE
        out, pos = [], 0
        for i, mpa in enumerate(self.p2m.lookup_pages(first, count)):
            lo = max(gpa, first + i * PAGE)
            hi = min(gpa + length, first + (i + 1) * PAGE)
            if mpa is None:
                raise ValueError(f"guest page {first + i * PAGE:#x} of {self.name} is not in its P2M")
            out.append((pos, mpa + (lo & (PAGE - 1)), hi - lo))
            pos += hi - lo
        return out

    def read(self, gpa: int, length: int) -> bytes:
        """Guest memory as the domain's CPU sees it."""
        if self.ram is None:
            view = self.p2m.memory.view
            return b"".join(bytes(view[m:m + n]) for _, m, n in self._frames(gpa, length))
        self._check(gpa, length)
        r = self.ram.find(gpa)
        off = gpa - r.gpa
        return bytes(r.view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        if self.ram is None:
            view = self.p2m.memory.view
            for pos, m, n in self._frames(gpa, len(data)):
                view[m:m + n] = data[pos:pos + n]
            return
        self._check(gpa, len(data))
        r = self.ram.find(gpa)
        off = gpa - r.gpa
        r.view[off:off + len(data)] = data


class Machine:
    """One board's machine.

    ``cpu=False`` builds it without the CPU's view of guest RAM (host mappings, one per guest page
    on a scattered P2M): for replay and recording twins, which reach guest memory through the P2M.
    ``quiet=True`` keeps its start-up and unclaimed-access warnings to itself (a twin repeats what
    the real machine already said). ``secure`` overrides the board's ``secure`` key (dom0's memory
    private unless its guest shares it, DESIGN section 7).
    """

    def __init__(self, spec: boards.BoardSpec, *, p2m: str | None = None, ram: int | str | None = None,
                 cpu: bool = True, quiet: bool = False, secure: bool | None = None) -> None:
        if secure is not None:
            spec.secure = bool(secure)
        if p2m is not None:
            spec.p2m = p2m
        if ram is not None:
            spec.ram = boards.parse_size(ram)
        boards.validate(spec)
        self.board = spec
        self.cpu_view = cpu
        self.quiet = quiet
        self.console = bytearray()
        self.console_sinks: list[Callable[[bytes], None]] = [self.console.extend]
        self.stop_status: int | None = None
        self.on_stop: list[Callable[[], None]] = []
        self.observers: list[AccessObserver] = []
        self._next_ctx = 0
        self.irqs = IrqController()
        self.mmio = Bus("mmio", log_unclaimed=not quiet)
        self.pio = Bus("pio", log_unclaimed=not quiet)
        self.devices: dict = {}
        self.masters: list[dict] = []
        self.crossings: dict[tuple[str, str], int] = {}     # (device, owner) -> isolation crossings
        self.fault_log: deque[FaultExplanation] = deque(maxlen=256)     # the latest explained faults
        self.fault_count = 0
        self.fault_listeners: list[Callable[[FaultExplanation], None]] = []
        self.transfer_listeners: list[TransferListener] = []     # every translated device transfer
        self._closed = False
        self._ran = False
        self._select_access()
        self._build_memory()
        self._build_devices()

    @classmethod
    def from_board(cls, name: str = "rcar-virt", **kw) -> Machine:
        return cls(boards.load_board(name), **kw)

    # -- construction -----------------------------------------------------------------------
    def alloc_ctx_id(self) -> int:
        ctx = self._next_ctx
        self._next_ctx += 1
        return ctx

    def _build_memory(self) -> None:
        spec = self.board
        ranges = ram_ranges(spec.ram)
        if spec.p2m == "direct":
            guest_end = ranges[-1][0] + ranges[-1][1]
        else:
            guest_end = 2 * spec.ram
        pool_start = _align(guest_end, MIB2)
        extra_start = pool_start + POOL_SIZE
        extra_total = sum(_align(d["ram"], MIB2) for d in spec.domains)
        end = extra_start + extra_total
        # Exchanges need machine-contiguous free frames below 4 GiB: keep 16 MiB of them at the end,
        # or (a direct layout reaching past 4 GiB) in the hole below 4 GiB that no guest page uses.
        self.exchange_reserve = (end, EXCHANGE_RESERVE) if end + EXCHANGE_RESERVE <= HIGH_RAM_BASE else None
        self.memory = MachineMemory(end + (EXCHANGE_RESERVE if self.exchange_reserve else 0))
        self.memory.set_pool(pool_start, extra_start)
        self.frames = FrameOwners(self.memory.size)
        self.frames.assign(pool_start, extra_start - pool_start, HYPERVISOR)
        self.walker = Walker(self.memory)
        self.domains: dict[str, Domain] = {}

        dom0 = self._new_domain("dom0", ranges, direct=spec.p2m == "direct", secure=spec.secure)
        if spec.p2m == "direct":
            for gpa, size in ranges:
                dom0.p2m.populate(gpa, gpa, size)
                self.frames.assign(gpa, size, dom0.owner, private=dom0.secure)
        else:
            self.frames.assign(PAGE, spec.ram, dom0.owner, step=2, private=dom0.secure)
            # Cache-colouring style: guest page i lives on machine frame 2i+1, so no two guest
            # pages are machine-adjacent and no GPA equals its MPA.
            i = 0
            for gpa, size in ranges:
                for off in range(0, size, PAGE):
                    dom0.p2m.table.map(gpa + off, (2 * i + 1) * PAGE, PAGE, R | W)
                    i += 1
        mpa = extra_start
        for d in spec.domains:
            dom = self._new_domain(d["name"], [(0, d["ram"])], direct=False, secure=d.get("secure", False))
            dom.p2m.populate(0, mpa, d["ram"])
            self.frames.assign(mpa, d["ram"], dom.owner, private=dom.secure)
            mpa += _align(d["ram"], MIB2)
        if self.cpu_view and spec.p2m == "scattered":
            why = check_mappings(spec.ram // PAGE)
            if why is not None:
                raise boards.BoardError(f"{spec.source}: scattered RAM of {spec.ram >> 20} MiB: {why}")
        for dom in self.domains.values():
            dom.p2m.go_live()
            if self.cpu_view:
                dom.ram = GuestRam(self.memory.fd, dom.ram_ranges, dom.p2m.lookup_pages)
                dom.p2m.ram = dom.ram

    def _new_domain(self, name: str, ranges: list[tuple[int, int]], direct: bool, secure: bool = False) -> Domain:
        ctx = self.alloc_ctx_id()
        dom = Domain(name, len(self.domains), P2M(self.memory, self.walker, ctx, s2_id=len(self.domains)),
                     ranges, direct, secure)
        dom.owner = self.frames.add_owner(f"domain {name}")
        self.domains[name] = dom
        return dom

    def _build_devices(self) -> None:
        self.pio.add(0xE9, 1, DebugConsole(self._console_out), "debugcon")
        self.pio.add(0xF4, 4, DebugExit(self.request_stop), "debug-exit")
        ctx = BuildContext(self)
        where = self.board.source
        for spec in self.board.devices:
            dtype = boards.device_type(where, spec["type"], spec["name"])
            try:
                dev, size = dtype.build(ctx, spec)
                (self.pio if spec.get("bus") == "pio" else self.mmio).add(spec["base"], size, dev, spec["name"])
            except BusError as e:
                raise boards.BoardError(f"{where}: {e}") from None
            except KeyError as e:
                raise boards.BoardError(f"{where}: device {spec['name']!r} needs a value for "
                                        f"{e.args[0]!r}") from None
            except (ValueError, TypeError, RegistryError) as e:
                raise boards.BoardError(f"{where}: device {spec['name']!r}: {e}") from None
            self.devices[spec["name"]] = dev
            if dtype.master:
                self.masters.append(spec)
        if not self.quiet:
            self._report_wiring()

    def _report_wiring(self) -> None:
        shared: dict[tuple[str, int], list[dict]] = {}
        for m in self.masters:
            if m.get("iommu") is None:
                what = ("reaches machine memory untranslated (bypass)" if self.board.unprotected == "bypass"
                        else "is refused (STATUS 5)")
                if self.board.unprotected == "bypass":
                    reach = [f"domain {d}" for d in self.domains if d != m.get("domain", "dom0")]
                    reach += ["the hypervisor's P2M tables and free memory"]
                    what += f": it can reach {', '.join(reach)}"
                    if self.board.isolation != "off":
                        what += f" (isolation watchdog: {self.board.isolation})"
                log.warning("unprotected master: %s (master %s) is behind no IOMMU; its DMA %s",
                            m["name"], m.get("master", 0), what)
            else:
                shared.setdefault((m["iommu"], int(m.get("master", 0))), []).append(m)
        for (iommu, mid), ms in shared.items():
            doms = sorted({m.get("domain", "dom0") for m in ms})
            if len(doms) > 1:
                log.warning("%s micro-TLB/endpoint %d is shared by domains %s (masters %s): one context "
                            "translates for all of them, so they are not isolated",
                            iommu, mid, " and ".join(doms), ", ".join(m["name"] for m in ms))

    # -- the isolation watchdog --------------------------------------------------------------
    def isolation_for(self, domain: str) -> Isolation | None:
        """The frame checks a device acting for ``domain`` gets: the private check on a machine with
        a secure domain, the isolation watchdog unless ``isolation = "off"`` (None: neither)."""
        if self.board.isolation == "off" and not any(d.secure for d in self.domains.values()):
            return None
        return Isolation(self.frames, self.domains[domain].owner, domain, self.board.isolation, self._crossed)

    def _crossed(self, device: str, domain: str, at: int, mpa: int, owner: str) -> None:
        key = (device, owner)
        n = self.crossings.get(key, 0)
        self.crossings[key] = n + 1
        if n == 0 and not self.quiet:
            log.warning("isolation: %s (domain %s) reached %s: device address %#x is machine address %#x%s",
                        device, domain, owner, at, mpa,
                        "; refused (STATUS 8)" if self.board.isolation == "fault" else "")

    # -- fault explanations -----------------------------------------------------------------
    def report_fault(self, device: str, fault: DmaFault, write: bool | None) -> None:
        """A device's access was refused: keep its explanation (``fault_log``, listeners)."""
        expl = fault.explanation
        if expl is None:
            spec = next((m for m in self.masters if m["name"] == device), None)
            iommu = (spec.get("iommu") or "no IOMMU (the board's unprotected policy)") if spec else "guest memory"
            access = "read" if write is False else "write" if write else "access"
            expl = FaultExplanation(iommu, fault.address, access, fault.status, fault.why or str(fault))
        elif expl.master and expl.master != device:
            return                        # already reported by the device that raised it
        expl.master = device
        self.fault_count += 1
        self.fault_log.append(expl)
        for listener in self.fault_listeners:
            listener(expl)

    def faults(self) -> list[dict]:
        """The latest explained faults as data (what ``vmm run --json`` reports)."""
        return [e.as_dict() for e in self.fault_log]

    # -- access observers -------------------------------------------------------------------
    def add_observer(self, observer: AccessObserver) -> None:
        """Let ``observer`` see every CPU-side bus access from now on (until ``remove_observer``)."""
        self.observers.append(observer)
        self._select_access()

    def remove_observer(self, observer: AccessObserver) -> None:
        if observer in self.observers:
            self.observers.remove(observer)
        self._select_access()

    def _select_access(self) -> None:
        """Point the four access entry points the backends and replay call at the buses directly,
        or, while anyone observes, at the observed path. Callers fetch them when a run starts."""
        if self.observers:
            self.mmio_read = self._observed_read(self.mmio, "mmio_read")
            self.mmio_write = self._observed_write(self.mmio, "mmio_write")
            self.pio_read = self._observed_read(self.pio, "pio_read")
            self.pio_write = self._observed_write(self.pio, "pio_write")
        else:
            self.mmio_read, self.mmio_write = self.mmio.read, self.mmio.write
            self.pio_read, self.pio_write = self.pio.read, self.pio.write

    def _observed_read(self, bus: Bus, kind: str) -> Callable[[int, int], int]:
        observers = self.observers

        def read(addr: int, size: int) -> int:
            for o in observers:
                o.before_access()
            value = bus.read(addr, size)
            for o in observers:
                o.after_access(kind, addr, size, value)
            return value
        return read

    def _observed_write(self, bus: Bus, kind: str) -> Callable[[int, int, int], None]:
        observers = self.observers

        def write(addr: int, size: int, value: int) -> None:
            for o in observers:
                o.before_access()
            bus.write(addr, size, value)
            for o in observers:
                o.after_access(kind, addr, size, value)
        return write

    # -- what backends and devices call -----------------------------------------------------
    def _console_out(self, data: bytes) -> None:
        for sink in self.console_sinks:
            sink(data)

    def request_stop(self, status: int) -> None:
        if self.stop_status is None:
            self.stop_status = status
        for cb in self.on_stop:
            cb()

    @property
    def dom0(self) -> Domain:
        return self.domains["dom0"]

    def read_guest(self, gpa: int, length: int, domain: str = "dom0") -> bytes:
        if self._closed:
            raise MachineError("this machine is closed")
        return self.domains[domain].read(gpa, length)

    def write_guest(self, gpa: int, data: bytes, domain: str = "dom0") -> None:
        if self._closed:
            raise MachineError("this machine is closed")
        self.domains[domain].write(gpa, data)

    def dma(self, engine: str, src: int, dst: int, length: int, irq: bool = False) -> tuple[int, int]:
        """Program a DMA engine through the bus, as a driver would; returns (STATUS, FAULT_ADDR).
        Register offsets come from the engine's own declared layout."""
        spec = next((m for m in self.masters if m["name"] == engine), None)
        layout = getattr(self.devices.get(engine), "LAYOUT", None)
        if spec is None or layout is None:
            engines = [m["name"] for m in self.masters if hasattr(self.devices[m["name"]], "LAYOUT")]
            raise ValueError(f"no dma engine {engine!r} on {self.board.name} (engines: {', '.join(engines)})")
        base, off = spec["base"], layout.offset
        self.mmio_write(base + off("SRC"), 8, src)
        self.mmio_write(base + off("DST"), 8, dst)
        self.mmio_write(base + off("LEN"), 4, length)
        self.mmio_write(base + off("CTRL"), 4, 1 | (2 if irq else 0))
        return self.mmio_read(base + off("STATUS"), 4), self.mmio_read(base + off("FAULT_ADDR"), 8)

    # -- jobs -------------------------------------------------------------------------------
    def run(self, image: str | None = None, backend: str = "auto", timeout: float = 10.0, **boot):
        """Boot a payload. ``boot`` is what ``vmm.runner.run_image`` takes besides: ``cmdline`` and
        ``initrd`` (a bzImage's command line and initramfs), ``gdb`` (a ``vmm.gdbstub.GdbServer`` to
        run under). A machine runs once: its RAM, devices and P2M carry the first run's state, so a
        second run would not start from a reset machine; build a new one."""
        if self._closed:
            raise MachineError("this machine is closed")
        if self._ran:
            raise MachineError("this machine already ran a payload; build a new Machine for the next run")
        self._ran = True
        from vmm.runner import run_image
        return run_image(self, image, backend=backend, timeout=timeout, **boot)

    def replay(self, trace: str):
        from vmm.trace import replay_file
        return replay_file(self, trace)

    def close(self) -> None:
        """Release the CPU views, the walker and the machine memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.mmio_read = self.mmio_write = self.pio_read = self.pio_write = self._closed_access
        for dom in self.domains.values():
            if dom.ram is not None:
                dom.ram.close()
                dom.ram = None
        self.memory.close()

    def _closed_access(self, *args) -> int:
        raise MachineError("this machine is closed")

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
