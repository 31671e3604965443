"""How board entries become devices: the builders for the simple models, and the context every
builder gets. The context is the only door from a device to the machine: interrupt lines,
DMA ports, domains and walker contexts. Devices never see the CPU backend."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from devices.constreg import ConstRegister
from devices.dma_engine import DmaEngine
from devices.sysinfo import SysInfo
from vmm.dma import Bypass, DmaPort, Refuse, Translator
from vmm.irq import IrqLine

if TYPE_CHECKING:
    from vmm.machine import Domain, Machine

log = logging.getLogger("vmm")


class BuildContext:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.walker = machine.walker
        self.board = machine.board

    def irq(self, number: int) -> IrqLine:
        return self.machine.irqs.line(number)

    def domain(self, name: str = "dom0") -> Domain:
        return self.machine.domains[name]

    def device(self, name: str):
        return self.machine.devices[name]

    def alloc_ctx_id(self) -> int:
        return self.machine.alloc_ctx_id()

    def gpa_port(self, domain: Domain, name: str) -> DmaPort:
        """A port that reaches a domain's guest-physical memory through its P2M (for device-side
        structures such as virtqueues, which a VMM reads the way the CPU sees them)."""
        return DmaPort(self.memory, lambda: domain.p2m_translator, name)

    def dma_port(self, spec: dict) -> DmaPort:
        """The DMA port of a bus master: its IOMMU's translator, or the board's unprotected policy."""
        return DmaPort(self.memory, lambda: self.translator_for(spec), spec["name"])

    def translator_for(self, spec: dict) -> Translator:
        iommu_name = spec.get("iommu")
        if iommu_name is None:
            if self.board.unprotected == "bypass":
                return Bypass()
            return Refuse(f"{spec['name']} is behind no IOMMU and the board refuses unprotected DMA")
        iommu = self.machine.devices[iommu_name]
        make = getattr(iommu, "translator", None)
        if make is None:
            return Refuse(f"{iommu_name} does not translate for masters")
        return make(int(spec.get("master", 0)), self.domain(spec.get("domain", "dom0")))


def build_sysinfo(ctx: BuildContext, spec: dict):
    dom = ctx.domain(spec.get("domain", "dom0"))
    dev = SysInfo(ram_size=dom.ram_size, p2m_root=dom.p2m.root, vtcr=dom.p2m.vtcr, ipa_bits=40,
                  direct=dom.direct)
    return dev, spec.get("size", 0x1000)


def build_const(ctx: BuildContext, spec: dict):
    size = int(spec.get("size", 4))
    return ConstRegister(int(spec.get("value", 0)), size), size


def build_dma(ctx: BuildContext, spec: dict):
    dev = DmaEngine(ctx.dma_port(spec), ctx.irq(int(spec["irq"])), int(spec.get("master", 0)))
    return dev, spec.get("size", 0x1000)
