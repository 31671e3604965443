"""The machine: memory, domains and their P2Ms, buses, interrupt lines and devices of one board.

It is the same object for every job: a CPU backend runs a payload on it, the trace replayer
drives it with no CPU, and tests poke it directly. It knows address ranges and wiring, never a
register name.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from vmm import board as boards
from vmm.bus import Bus, BusError
from vmm.dma import STATUS_PERMISSION, STATUS_TRANSLATION, DmaFault, Runs
from vmm.guestram import GuestRam
from vmm.irq import IrqController
from vmm.memory import PAGE, MachineMemory
from vmm.p2m import P2M
from vmm.walker import PERMISSION, Fault, R, W, Walker
from vmm.wiring import BuildContext

log = logging.getLogger("vmm")

LOW_RAM_END = 0x0A000000        # RAM stops below the device window (160 MiB) ...
HIGH_RAM_BASE = 1 << 32         # ... and continues at 4 GiB
POOL_SIZE = 32 << 20            # hypervisor frames: P2M tables, harness-built tables
MIB2 = 2 << 20


def ram_ranges(size: int) -> list[tuple[int, int]]:
    low = min(size, LOW_RAM_END)
    ranges = [(0, low)]
    if size > low:
        ranges.append((HIGH_RAM_BASE, size - low))
    return ranges


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class P2MTranslator:
    """GPA -> MPA through a domain's P2M, for device-side accesses to guest memory."""

    def __init__(self, p2m: P2M) -> None:
        self.p2m = p2m

    def translate(self, iova: int, length: int, write: bool) -> Runs:
        res = self.p2m.walker.translate_range(self.p2m.ctx_id, iova, length, W if write else R)
        if isinstance(res, Fault):
            status = STATUS_PERMISSION if res.kind == PERMISSION else STATUS_TRANSLATION
            raise DmaFault(status, max(res.address & ~(PAGE - 1), iova & ~(PAGE - 1)), "not in the P2M")
        return res


@dataclass
class Domain:
    name: str
    id: int
    p2m: P2M
    ram_ranges: list[tuple[int, int]]
    direct: bool
    ram: GuestRam | None = None
    p2m_translator: P2MTranslator = field(init=False)

    def __post_init__(self) -> None:
        self.p2m_translator = P2MTranslator(self.p2m)

    @property
    def ram_size(self) -> int:
        return sum(size for _, size in self.ram_ranges)

    def _view(self, gpa: int, length: int) -> tuple[memoryview, int]:
        for start, size in self.ram_ranges:
            if start <= gpa and gpa + length <= start + size:
                r = self.ram.find(start)
                return r.view, gpa - start
        raise ValueError(f"[{gpa:#x}, +{length:#x}) is not guest RAM of {self.name}")

    def read(self, gpa: int, length: int) -> bytes:
        """Guest memory as the domain's CPU sees it."""
        view, off = self._view(gpa, length)
        return bytes(view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        view, off = self._view(gpa, len(data))
        view[off:off + len(data)] = data


class Machine:
    def __init__(self, spec: boards.BoardSpec, *, p2m: str | None = None, ram: int | str | None = None) -> None:
        if p2m is not None:
            spec.p2m = p2m
        if ram is not None:
            spec.ram = boards.parse_size(ram)
        boards.validate(spec)
        self.board = spec
        self.console = bytearray()
        self.console_sinks: list[Callable[[bytes], None]] = [self.console.extend]
        self.stop_status: int | None = None
        self.recorder = None        # a vmm.trace.Recorder while a run is being recorded
        self.on_stop: list[Callable[[], None]] = []
        self._next_ctx = 0
        self.irqs = IrqController()
        self.mmio = Bus("mmio")
        self.pio = Bus("pio")
        self.devices: dict = {}
        self.masters: list[dict] = []
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
        self.memory = MachineMemory(extra_start + extra_total)
        self.memory.set_pool(pool_start, extra_start)
        self.walker = Walker(self.memory)
        self.domains: dict[str, Domain] = {}

        dom0 = self._new_domain("dom0", ranges, direct=spec.p2m == "direct")
        if spec.p2m == "direct":
            for gpa, size in ranges:
                dom0.p2m.populate(gpa, gpa, size)
        else:
            # Cache-colouring style: guest page i lives on machine frame 2i+1, so no two guest
            # pages are machine-adjacent and no GPA equals its MPA.
            i = 0
            for gpa, size in ranges:
                for off in range(0, size, PAGE):
                    dom0.p2m.table.map(gpa + off, (2 * i + 1) * PAGE, PAGE, R | W)
                    i += 1
        mpa = extra_start
        for d in spec.domains:
            dom = self._new_domain(d["name"], [(0, d["ram"])], direct=False)
            dom.p2m.populate(0, mpa, d["ram"])
            mpa += _align(d["ram"], MIB2)
        for dom in self.domains.values():
            dom.p2m.go_live()
            dom.ram = GuestRam(self.memory.fd, dom.ram_ranges, dom.p2m.lookup_pages)
            dom.p2m.ram = dom.ram

    def _new_domain(self, name: str, ranges: list[tuple[int, int]], direct: bool) -> Domain:
        ctx = self.alloc_ctx_id()
        dom = Domain(name, len(self.domains), P2M(self.memory, self.walker, ctx, s2_id=len(self.domains)),
                     ranges, direct)
        self.domains[name] = dom
        return dom

    def _build_devices(self) -> None:
        from devices.debugport import DebugConsole, DebugExit

        self.pio.add(0xE9, 1, DebugConsole(self._console_out), "debugcon")
        self.pio.add(0xF4, 4, DebugExit(self.request_stop), "debug-exit")
        ctx = BuildContext(self)
        for spec in self.board.devices:
            try:
                dev, size = boards.builder(spec["type"])(ctx, spec)
                self.mmio.add(spec["base"], size, dev, spec["name"])
            except BusError as e:
                raise boards.BoardError(f"{self.board.source}: {e}") from None
            except KeyError as e:
                raise boards.BoardError(f"{self.board.source}: device {spec['name']!r} needs a value for "
                                        f"{e.args[0]!r}") from None
            except (ValueError, TypeError) as e:
                raise boards.BoardError(f"{self.board.source}: device {spec['name']!r}: {e}") from None
            self.devices[spec["name"]] = dev
            if spec["type"] == "dma":
                self.masters.append(spec)
        self._report_wiring()

    def _report_wiring(self) -> None:
        shared: dict[tuple[str, int], list[dict]] = {}
        for m in self.masters:
            if "iommu" not in m:
                what = ("reaches machine memory untranslated (bypass)" if self.board.unprotected == "bypass"
                        else "is refused (STATUS 5)")
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

    def mmio_read(self, addr: int, size: int) -> int:
        return self.mmio.read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.mmio.write(addr, size, value)

    def pio_read(self, port: int, size: int) -> int:
        return self.pio.read(port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.pio.write(port, size, value)

    def read_guest(self, gpa: int, length: int, domain: str = "dom0") -> bytes:
        return self.domains[domain].read(gpa, length)

    def write_guest(self, gpa: int, data: bytes, domain: str = "dom0") -> None:
        self.domains[domain].write(gpa, data)

    def dma(self, engine: str, src: int, dst: int, length: int, irq: bool = False) -> tuple[int, int]:
        """Program a DMA engine through the bus, as a driver would; returns (STATUS, FAULT_ADDR)."""
        base = next(d["base"] for d in self.board.devices if d["name"] == engine)
        self.mmio_write(base + 0x08, 8, src)
        self.mmio_write(base + 0x10, 8, dst)
        self.mmio_write(base + 0x18, 4, length)
        self.mmio_write(base + 0x1C, 4, 1 | (2 if irq else 0))
        return self.mmio_read(base + 0x20, 4), self.mmio_read(base + 0x28, 8)

    # -- jobs -------------------------------------------------------------------------------
    def run(self, image: str | None = None, backend: str = "auto", timeout: float = 10.0):
        from vmm.runner import run_image
        return run_image(self, image, backend=backend, timeout=timeout)

    def replay(self, trace: str):
        from vmm.trace import replay_file
        return replay_file(self, trace)

    def close(self) -> None:
        for dom in self.domains.values():
            if dom.ram is not None:
                dom.ram.close()
