"""The context every device builder gets: the only door from a device model to the machine.

Through it a model asks for interrupt lines, memory windows (its own DMA as a bus master, or a
domain's guest-physical memory), domains, other devices and walker contexts. Devices never see
the CPU backend, and the machine never sees a register.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmm.dma import Bypass, DeviceMemory, P2MTranslator, Refuse, Translator
from vmm.irq import IrqLine

if TYPE_CHECKING:
    from vmm.bus import BusDevice
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

    def console(self):
        """The machine's console stream (a callable taking bytes), for a UART's transmitter."""
        return self.machine._console_out

    def domain(self, name: str = "dom0") -> Domain:
        return self.machine.domains[name]

    def device(self, name: str) -> BusDevice:
        return self.machine.devices[name]

    def alloc_ctx_id(self) -> int:
        return self.machine.alloc_ctx_id()

    def guest_memory(self, domain: Domain, name: str) -> DeviceMemory:
        """A device's window on a domain's guest-physical memory, through its P2M (virtqueues and
        request buffers, which a VMM reads the way the domain's CPU sees them)."""
        translator = P2MTranslator(domain.p2m)
        return DeviceMemory(self.memory, lambda: translator, name, p2m=domain.p2m,
                            isolation=self.machine.isolation_for(domain.name), report=self.machine.report_fault,
                            transfers=self.machine.transfer_listeners)

    def dma_memory(self, spec: dict) -> DeviceMemory:
        """A bus master's window on memory: its IOMMU's translator, or the board's policy."""
        return DeviceMemory(self.memory, lambda: self.translator_for(spec), spec["name"],
                            isolation=self.machine.isolation_for(spec.get("domain", "dom0")),
                            report=self.machine.report_fault, transfers=self.machine.transfer_listeners)

    def translator_for(self, spec: dict) -> Translator:
        iommu_name = spec.get("iommu")
        if iommu_name is None:
            if self.board.unprotected == "bypass":
                return Bypass()
            return Refuse(f"{spec['name']} is behind no IOMMU and the board refuses unprotected DMA")
        iommu = self.machine.devices[iommu_name]
        make = getattr(iommu, "translator", None)
        if make is None:
            log.warning("%s sits behind %s, which does not translate for masters; its DMA is refused",
                        spec["name"], iommu_name)
            return Refuse(f"{iommu_name} does not translate for masters")
        return make(int(spec.get("master", 0)), self.domain(spec.get("domain", "dom0")))
