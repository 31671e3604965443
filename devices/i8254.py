"""The 8254 programmable interval timer (ports 0x40-0x43), channel 0 wired to a board IRQ line.

The programming model is QEMU's hw/timer/i8254.c: control words (channel, access LSB/MSB/word,
mode, BCD), counter latch, counts loaded LSB then MSB, reads of the running count, modes 0-5. Its
clock is the host's monotonic clock at 1.193182 MHz, so a guest's timer ticks in real time.

The CPU backend drives it: ``next_event()`` says when channel 0's output next rises (the edge the
8259 latches), ``tick(now)`` raises the line for each edge that has come due -- a pulse for the
periodic modes 2 and 3, a level that stays for the terminal count of modes 0 and 4 (until the
count is written again). Edges missed between two ticks coalesce into one, as a late interrupt
would on hardware. After reset a counter does not count until the guest programs it (the data
sheet leaves its state undefined; there is no BIOS here to program it).
"""
from __future__ import annotations

import time
from collections.abc import Callable

from vmm.registry import DeviceType, Key

PIT_HZ = 1_193_182
NS = 1_000_000_000
RW_LATCH, RW_LSB, RW_MSB, RW_WORD0, RW_WORD1 = 0, 1, 2, 3, 4


class Channel:
    def __init__(self) -> None:
        self.count = 0x10000
        self.load_time: int | None = None       # ns; None: not counting
        self.mode = 0
        self.bcd = False
        self.rw_mode = RW_WORD0
        self.read_state = self.write_state = RW_WORD0
        self.write_latch = 0
        self.latched: int | None = None
        self.latch_state = 0
        self.status: int | None = None
        self.fired = False                      # modes 0/4: the one edge has been given

    def ticks(self, now: int) -> int:
        return (now - self.load_time) * PIT_HZ // NS

    def get_count(self, now: int) -> int:
        if self.load_time is None:
            return self.count & 0xFFFF
        d = self.ticks(now)
        if self.mode in (0, 1, 4, 5):
            return (self.count - d) & 0xFFFF
        if self.mode == 3:
            return self.count - ((2 * d) % self.count)
        return self.count - (d % self.count)

    def edge_at(self, k: int) -> int:
        """The time (ns) of the k-th rising edge after the load (k >= 1)."""
        if self.mode in (2, 3):
            ticks = k * self.count
        else:
            ticks = self.count + (1 if self.mode == 0 else 0)
        return self.load_time + -(-ticks * NS // PIT_HZ)


class Pit8254:
    def __init__(self, irq, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.irq = irq
        self.clock = clock
        self.ch = [Channel(), Channel(), Channel()]
        self.edges = 0                          # channel 0 rising edges delivered to the line
        self._next_k = 1                        # the next periodic edge number of channel 0

    # -- the backend's clock -----------------------------------------------------------------
    def next_event(self) -> int | None:
        """When (monotonic ns) channel 0's output next rises, or None."""
        c = self.ch[0]
        if c.load_time is None or c.mode in (1, 5):
            return None
        if c.mode in (2, 3):
            return c.edge_at(self._next_k)
        return None if c.fired else c.edge_at(1)

    def tick(self, now: int | None = None) -> None:
        """Give the line the edges that are due at ``now``."""
        now = self.clock() if now is None else now
        at = self.next_event()
        if at is None or at > now:
            return
        c = self.ch[0]
        self.edges += 1
        if c.mode in (2, 3):
            self._next_k = c.ticks(now) // c.count + 1
            self.irq.set(True)
            self.irq.set(False)
        else:
            c.fired = True
            self.irq.set(True)

    # -- ports 0x40..0x43 -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0xFF
        c = self.ch[offset]
        if c.status is not None:
            value, c.status = c.status, None
            return value
        if c.latched is not None:
            if c.latch_state == RW_MSB or (c.latch_state == RW_WORD1):
                value = (c.latched >> 8) & 0xFF
                c.latched = None
            elif c.latch_state == RW_LSB:
                value = c.latched & 0xFF
                c.latched = None
            else:
                value = c.latched & 0xFF
                c.latch_state = RW_WORD1
            return value
        count = c.get_count(self.clock())
        if c.read_state == RW_LSB:
            return count & 0xFF
        if c.read_state == RW_MSB:
            return (count >> 8) & 0xFF
        if c.read_state == RW_WORD0:
            c.read_state = RW_WORD1
            return count & 0xFF
        c.read_state = RW_WORD0
        return (count >> 8) & 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 3:
            self._control(value)
            return
        c = self.ch[offset]
        if c.write_state == RW_LSB:
            self._load(offset, value)
        elif c.write_state == RW_MSB:
            self._load(offset, value << 8)
        elif c.write_state == RW_WORD0:
            c.write_latch = value
            c.write_state = RW_WORD1
        else:
            self._load(offset, c.write_latch | (value << 8))
            c.write_state = RW_WORD0

    def _control(self, value: int) -> None:
        channel = value >> 6
        now = self.clock()
        if channel == 3:                            # read-back: latch count and/or status
            for n in range(3):
                if value & (2 << n):
                    c = self.ch[n]
                    if not value & 0x20 and c.latched is None:
                        c.latched, c.latch_state = c.get_count(now), c.rw_mode
                    if not value & 0x10 and c.status is None:
                        out = 1 if c.load_time is not None and c.fired else 0
                        c.status = (out << 7) | (c.rw_mode << 4) | (c.mode << 1) | int(c.bcd)
            return
        c = self.ch[channel]
        access = (value >> 4) & 3
        if access == RW_LATCH:
            if c.latched is None:
                c.latched, c.latch_state = c.get_count(now), c.rw_mode
            return
        c.rw_mode = c.read_state = c.write_state = access
        mode = (value >> 1) & 7
        c.mode = mode - 4 if mode >= 6 else mode
        c.bcd = bool(value & 1)
        c.load_time = None                          # a control word stops the counter until its count
        c.fired = False
        if channel == 0:
            self.irq.set(False)                     # the line rests low; an edge is a rise

    def _load(self, channel: int, value: int) -> None:
        c = self.ch[channel]
        c.count = value or 0x10000
        c.load_time = self.clock()
        c.fired = False
        if channel == 0:
            self._next_k = 1
            self.irq.set(False)


def build(ctx, spec: dict):
    return Pit8254(ctx.irq(spec["irq"])), 4


DEVICE = DeviceType(
    "i8254", build, doc="8254 interval timer (4 ports), channel 0 on a board IRQ line, real-time clock",
    keys=(Key("irq", int, 32, "the board IRQ line channel 0's output drives"),))
