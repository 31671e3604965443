"""The 8259A programmable interrupt controller, as a master/slave pair on the port bus.

The programming model is QEMU's hw/intc/i8259.c (itself the 8259A data sheet): ICW1..ICW4
initialisation, OCW1 (the mask), OCW2 (EOI, specific EOI, rotation), OCW3 (IRR/ISR read select,
poll, special mask), edge-triggered inputs (a rising edge sets IRR), fixed priority with rotation,
and the slave cascaded on master input 2. Each chip's eight inputs are board IRQ lines
(``inputs``: -1 for none), so any device line of the board can be routed to a pin, and a kernel
can ``request_irq`` it. The CPU asks the master: ``intr`` (its INT output) and ``acknowledge()``
(the INTA cycle, which returns the vector); ``listeners`` hear INT rise.
"""
from __future__ import annotations

from collections.abc import Callable

from vmm.registry import DeviceType, Key

CASCADE = 2


def _priority(chip: Pic8259, mask: int) -> int:
    """The highest-priority (lowest number after rotation) set bit of ``mask``, or 8."""
    if not mask:
        return 8
    p = 0
    while not mask & (1 << ((p + chip.priority_add) & 7)):
        p += 1
    return p


class Pic8259:
    def __init__(self, name: str) -> None:
        self.name = name
        self.master: Pic8259 | None = None       # set on a slave
        self.slave: Pic8259 | None = None        # set on a master
        self.listeners: list[Callable[[], None]] = []
        self.elcr = 0
        self.int_out = False
        self.spurious = 0
        self.irr = 0
        self._reset()

    def _reset(self) -> None:
        self.last_irr = 0
        self.irr &= self.elcr
        self.imr = self.isr = self.priority_add = self.irq_base = 0
        self.read_isr = self.poll = self.special_mask = False
        self.init_state = 0
        self.auto_eoi = self.rotate_on_auto_eoi = self.special_fully_nested = False
        self.init4 = self.single = False

    # -- inputs -------------------------------------------------------------------------------
    def set_pin(self, pin: int, level: bool) -> None:
        mask = 1 << pin
        if self.elcr & mask:
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        self._update()

    def _get_irq(self) -> int:
        priority = _priority(self, self.irr & ~self.imr)
        if priority == 8:
            return -1
        mask = self.isr
        if self.special_mask:
            mask &= ~self.imr
        if self.special_fully_nested and self.slave is not None:
            mask &= ~(1 << CASCADE)
        return (priority + self.priority_add) & 7 if priority < _priority(self, mask) else -1

    def _update(self) -> None:
        out = self._get_irq() >= 0
        rose = out and not self.int_out
        self.int_out = out
        if self.master is not None:
            self.master.set_pin(CASCADE, out)
        elif rose:
            for listener in self.listeners:
                listener()

    def _intack(self, irq: int) -> None:
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)
        self._update()

    # -- the CPU side (master) -----------------------------------------------------------------
    @property
    def cpu_facing(self) -> bool:
        """A master (or a lone chip): its INT goes to the CPU."""
        return self.master is None

    @property
    def intr(self) -> bool:
        return self.int_out

    def acknowledge(self) -> int:
        """The INTA cycle: the vector of the highest-priority request (IRQ 7's, spurious, if the
        request went away), which moves to the in-service register."""
        irq = self._get_irq()
        if irq < 0:
            self.spurious += 1
            return self.irq_base + 7
        if irq == CASCADE and self.slave is not None:
            s = self.slave
            irq2 = s._get_irq()
            if irq2 >= 0:
                s._intack(irq2)
            else:
                irq2 = 7
                self.spurious += 1
            vector = s.irq_base + irq2
        else:
            vector = self.irq_base + irq
        self._intack(irq)
        return vector

    # -- ports ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if self.poll:
            self.poll = False
            irq = self._get_irq()
            if irq < 0:
                return 0
            self._intack(irq)
            return irq | 0x80
        if offset == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            if value & 0x10:                            # ICW1
                self._reset()
                self.init_state = 1
                self.init4 = bool(value & 1)
                self.single = bool(value & 2)
                self._update()
            elif value & 0x08:                          # OCW3
                if value & 0x04:
                    self.poll = True
                if value & 0x02:
                    self.read_isr = bool(value & 1)
                if value & 0x40:
                    self.special_mask = bool((value >> 5) & 1)
            else:                                       # OCW2
                self._ocw2(value)
            return
        if self.init_state == 0:                        # OCW1: the mask
            self.imr = value
            self._update()
        elif self.init_state == 1:                      # ICW2: the vector base
            self.irq_base = value & 0xF8
            self.init_state = (3 if self.init4 else 0) if self.single else 2
        elif self.init_state == 2:                      # ICW3: cascade wiring (fixed here)
            self.init_state = 3 if self.init4 else 0
        else:                                           # ICW4
            self.special_fully_nested = bool((value >> 4) & 1)
            self.auto_eoi = bool((value >> 1) & 1)
            self.init_state = 0

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5
        if cmd in (0, 4):
            self.rotate_on_auto_eoi = bool(cmd >> 2)
        elif cmd in (1, 5):                             # non-specific EOI (and rotate)
            priority = _priority(self, self.isr)
            if priority != 8:
                irq = (priority + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if cmd == 5:
                    self.priority_add = (irq + 1) & 7
                self._update()
        elif cmd == 3:                                  # specific EOI
            self.isr &= ~(1 << (value & 7))
            self._update()
        elif cmd == 6:                                  # set priority
            self.priority_add = (value + 1) & 7
            self._update()
        elif cmd == 7:                                  # rotate on specific EOI
            irq = value & 7
            self.isr &= ~(1 << irq)
            self.priority_add = (irq + 1) & 7
            self._update()


def build(ctx, spec: dict):
    chip = Pic8259(spec["name"])
    inputs = list(spec["inputs"])
    if len(inputs) != 8 or any(n < -1 for n in inputs):
        raise ValueError(f"inputs must list 8 board IRQ lines (-1 for none), not {inputs!r}")
    if spec.get("cascade_to"):
        master = ctx.device(spec["cascade_to"])
        if not isinstance(master, Pic8259) or master.master is not None:
            raise ValueError(f"cascade_to {spec['cascade_to']!r} is not a master i8259")
        chip.master, master.slave = master, chip
    elif inputs[CASCADE] != -1:
        raise ValueError("input 2 of a master is the cascade from its slave; give -1 there")
    pins = {line: pin for pin, line in enumerate(inputs) if line >= 0}
    for line, pin in pins.items():
        if ctx.irq(line).level:
            chip.set_pin(pin, True)

    def edge(line: int, level: bool) -> None:
        pin = pins.get(line)
        if pin is not None:
            chip.set_pin(pin, level)
    ctx.machine.irqs.listeners.append(edge)
    return chip, 2


DEVICE = DeviceType(
    "i8259", build, doc="8259A interrupt controller (2 ports); a master, or a slave cascaded to one",
    keys=(Key("inputs", list, [-1] * 8, "the board IRQ line wired to each of the 8 pins (-1: none)", items=int),
          Key("cascade_to", str, None, "the master this slave is cascaded to (on its input 2)", ref="device")))
