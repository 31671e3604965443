"""The 8259 pair, the 8254 and the 16550 driven through the port bus as Linux drives them, and the
board's device lines reaching the PIC, with no CPU."""
from __future__ import annotations

import pytest

from devices.i8254 import NS, PIT_HZ, Pit8254
from devices.uart16550 import RX_LIMIT
from vmm import Machine
from vmm.irq import IrqLine


@pytest.fixture
def m():
    machine = Machine.from_board("rcar-virt", quiet=True)
    yield machine
    machine.close()


def init_pics(m, unmask_master=0x00, unmask_slave=0x00) -> None:
    """Linux's init_8259A: ICW1..ICW4 with vectors 0x30 / 0x38, then the masks."""
    out = m.pio_write
    for port, base, icw3 in ((0x20, 0x30, 0x04), (0xA0, 0x38, 0x02)):
        out(port, 1, 0x11)
        out(port + 1, 1, base)
        out(port + 1, 1, icw3)
        out(port + 1, 1, 0x01)
    out(0x21, 1, unmask_master)
    out(0xA1, 1, unmask_slave)


def test_pic_probe_and_vectors(m):
    pic = m.devices["pic_master"]
    m.pio_write(0x21, 1, 0xFB)
    assert m.pio_read(0x21, 1) == 0xFB                   # Linux's probe_8259A reads the mask back
    init_pics(m, unmask_master=0xFA)                     # IRQ 0 and the cascade unmasked
    assert not pic.intr
    m.irqs.line(32).raise_()                              # the PIT's line: pin 0
    assert pic.intr and pic.acknowledge() == 0x30
    assert not pic.intr
    m.pio_write(0x20, 1, 0x0B)                            # OCW3: read ISR
    assert m.pio_read(0x20, 1) == 0x01
    m.pio_write(0x20, 1, 0x20)                            # non-specific EOI
    assert m.pio_read(0x20, 1) == 0x00
    m.irqs.line(32).lower()


def test_pic_edge_priority_mask_and_cascade(m):
    pic = m.devices["pic_master"]
    init_pics(m, unmask_master=0x00, unmask_slave=0x00)
    m.irqs.line(36).raise_()                              # UART: pin 4
    m.irqs.line(16).raise_()                              # virtio0 (virtio-iommu): slave pin 3 = IRQ 11
    assert pic.acknowledge() == 0x3B                      # the cascade (pin 2) outranks pin 4: IRQ 11
    m.pio_write(0xA0, 1, 0x20)
    m.pio_write(0x20, 1, 0x20)
    assert pic.acknowledge() == 0x34
    m.pio_write(0x20, 1, 0x20)
    assert not pic.intr                                   # edge-triggered: a held line asks once
    m.irqs.line(36).lower()
    m.pio_write(0x21, 1, 0x10)                            # mask pin 4
    m.irqs.line(36).raise_()
    assert not pic.intr
    m.pio_write(0x21, 1, 0x00)
    assert pic.intr and pic.acknowledge() == 0x34         # latched in IRR while masked
    assert pic.acknowledge() == 0x37 and pic.spurious == 1   # nothing left: the spurious IRQ 7


def test_board_lines_reach_their_pins(m):
    """Every routed device line of rcar-virt lands on the pin the board file documents."""
    pic = m.devices["pic_master"]
    init_pics(m)
    routes = {32: 0x30, 0: 0x33, 36: 0x34, 8: 0x35, 9: 0x36, 10: 0x37,
              11: 0x39, 12: 0x3A, 16: 0x3B, 17: 0x3C, 18: 0x3E, 19: 0x3F}
    for line, vector in routes.items():
        m.irqs.line(line).raise_()
        assert pic.acknowledge() == vector, line
        if vector >= 0x38:
            m.pio_write(0xA0, 1, 0x20)
        m.pio_write(0x20, 1, 0x20)
        m.irqs.line(line).lower()


def test_dma_engine_irq_reaches_the_cpu_side(m):
    pic = m.devices["pic_master"]
    init_pics(m)
    heard = []
    pic.listeners.append(lambda: heard.append(True))
    m.write_guest(0x100000, b"x" * 64)
    assert m.dma("dma3", src=0x100000, dst=0x200000, length=64, irq=True) == (0, 0)
    assert heard and pic.acknowledge() == 0x39           # dma3: IRQ 11 on the slave


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def test_pit_periodic_and_oneshot_edges():
    clock = Clock()
    line = IrqLine(0)
    edges = []
    line._listeners.append(lambda n, level: edges.append(level))
    pit = Pit8254(line, clock)
    assert pit.next_event() is None                      # not counting until programmed
    pit.write(3, 1, 0x34)                                # channel 0, LSB/MSB, mode 2 (Linux periodic)
    pit.write(0, 1, 0xA9)
    pit.write(0, 1, 0x04)                                # 1193 ticks: 1 ms
    period = 1193 * NS // PIT_HZ
    assert abs(pit.next_event() - (clock.now + period)) <= 1
    clock.now += period // 2
    pit.tick()
    assert edges == []
    clock.now += period
    pit.tick()
    assert edges == [True, False] and pit.edges == 1
    assert pit.next_event() > clock.now
    clock.now += 10 * period                             # missed edges coalesce
    pit.tick()
    assert pit.edges == 2 and pit.next_event() > clock.now
    edges.clear()
    pit.write(3, 1, 0x38)                                # mode 4, Linux's oneshot
    pit.write(0, 1, 100)
    pit.write(0, 1, 0)
    clock.now += 100 * NS // PIT_HZ + 1000
    pit.tick()
    pit.tick()
    assert edges == [True] and pit.next_event() is None  # one edge only


def test_pit_counter_latch_and_read():
    clock = Clock()
    pit = Pit8254(IrqLine(0), clock)
    pit.write(3, 1, 0x34)
    pit.write(0, 1, 0x00)
    pit.write(0, 1, 0x10)                                # 0x1000
    clock.now += 0x100 * NS // PIT_HZ + 10
    pit.write(3, 1, 0x00)                                # latch channel 0
    clock.now += NS
    lo, hi = pit.read(0, 1), pit.read(0, 1)
    assert (hi << 8 | lo) == 0x1000 - 0x100


def test_uart_transmit_loopback_and_receive(m):
    uart = m.devices["com1"]
    out, inp = m.pio_write, m.pio_read
    out(0x3FF, 1, 0x5A)
    assert inp(0x3FF, 1) == 0x5A                         # scratch register
    out(0x3FC, 1, 0x1F)                                  # loopback, as 8250 autoconfig tests it
    assert inp(0x3FE, 1) & 0xF0 == 0xF0
    out(0x3FC, 1, 0x1A)
    assert inp(0x3FE, 1) & 0xF0 == 0x90
    out(0x3FC, 1, 0x0B)                                  # DTR | RTS | OUT2
    out(0x3FA, 1, 0xC7)                                  # FIFO on
    assert inp(0x3FA, 1) & 0xC0 == 0xC0
    for ch in b"hi\n":
        out(0x3F8, 1, ch)
    assert bytes(m.console).endswith(b"hi\n")
    line = m.irqs.line(36)
    out(0x3F9, 1, 0x01)                                  # IER: received data
    assert not line.level and inp(0x3FD, 1) & 0x61 == 0x60
    uart.feed(b"ok")
    uart.service()
    assert line.level and inp(0x3FA, 1) & 0x0F == 0x04
    assert (inp(0x3F8, 1), inp(0x3F8, 1)) == (ord("o"), ord("k"))
    assert not line.level and not inp(0x3FD, 1) & 1
    out(0x3F9, 1, 0x02)                                  # IER: THR empty -> at once
    assert line.level and inp(0x3FA, 1) & 0x0F == 0x02
    assert not line.level                                 # reading IIR cleared it


def test_uart_holds_input_until_rts_and_bounds_it(m):
    uart = m.devices["com1"]
    uart.feed(b"early")
    assert not m.pio_read(0x3FD, 1) & 1                  # RTS low: the sender waits
    m.pio_write(0x3FC, 1, 0x02)
    assert m.pio_read(0x3FD, 1) & 1
    uart.feed(b"x" * (RX_LIMIT + 10))
    uart.service()
    assert len(uart.rx) == RX_LIMIT and uart.overruns == 1
    assert m.pio_read(0x3FD, 1) & 0x02                   # overrun error, then cleared by the read
    assert not m.pio_read(0x3FD, 1) & 0x02


def test_bus_key_rejects_other_buses():
    from vmm.board import BoardError, parse_board
    with pytest.raises(BoardError, match="bus.*must be one of 'mmio', 'pio'"):
        parse_board({"device": [{"type": "uart16550", "name": "u", "base": 0x2F8, "bus": "isa"}]})
