"""A 16550A UART on the port bus: transmit to the console stream, receive from ``feed``.

The register model follows QEMU's hw/char/serial.c, which Linux's 8250 driver is known to drive
(its autoconfig probes the scratch register, the FIFO bits of IIR and loopback through MSR):
transmission is instant (THR empty at once, a THRE interrupt when enabled), received bytes wait in
a FIFO, and the interrupt line is level (IIR bit 0 clear) with the 16550's priorities: line status,
received data, THR empty, modem status. ``feed`` (the Python API, and stdin in ``vmm run``) may be
called from any thread: the bytes wait in an inbox that the CPU's thread takes in (``service``,
or the next read of the receiver), and ``wake`` listeners hear of them so a halted CPU resumes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from vmm.registry import DeviceType, Key

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_FIFO = 0x01, 0x00, 0x02, 0x04, 0x06, 0xC0
LCR_DLAB = 0x80
MCR_RTS, MCR_LOOP = 0x02, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD, MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = (1 << i for i in range(8))
FCR_FIFO, FCR_CLEAR_RX = 0x01, 0x02
RX_LIMIT = 1 << 16          # bytes fed but not yet read (more is dropped, as an overrun)


class Uart16550:
    def __init__(self, irq, emit: Callable[[bytes], None]) -> None:
        self.irq = irq
        self.emit = emit
        self.rx: deque[int] = deque()
        self.inbox: deque[bytes] = deque()     # fed from any thread, taken in by the CPU's
        self.wake: list[Callable[[], None]] = []
        self.expect_input = False              # someone (stdin in `vmm run`) may feed: a halted guest waits
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.dll, self.dlm = 12, 0              # 9600 baud
        self.thr_ipending = False
        self.overruns = 0

    # -- the host side ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue ``data`` as received bytes (any thread); empty data only wakes the listeners."""
        if data:
            self.inbox.append(bytes(data))
        for wake in self.wake:
            wake()

    @property
    def rx_waiting(self) -> bool:
        return bool(self.inbox)

    def service(self) -> None:
        """Take fed bytes into the receive FIFO (the CPU's thread); beyond ``RX_LIMIT`` they overrun.
        The sender honours hardware flow control: nothing is sent while the guest holds RTS low
        (a driver raises it when its port is opened, after it has flushed the FIFO), so input typed
        before the guest listens waits instead of being lost."""
        if not self.inbox or not self.mcr & MCR_RTS:
            return
        while self.inbox:
            data = self.inbox.popleft()
            room = max(0, RX_LIMIT - len(self.rx))
            self.rx.extend(data[:room])
            if len(data) > room:
                self.overruns += 1
                self.lsr |= LSR_OE
        self._update()

    # -- the guest side -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if self.inbox and offset in (RBR_THR, LSR, IIR_FCR):
            self.service()
        return self._read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, value & 0xFF)

    def _read(self, off: int) -> int:
        if off == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._update()
            return value
        if off == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_ipending = False          # reading IIR that reports THRE clears it
                self._update()
            return iir | (IIR_FIFO if self.fcr & FCR_FIFO else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            value = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE
            self._update()
            return value
        if off == MSR:
            if self.mcr & MCR_LOOP:             # the outputs wired back: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4)
            value = self.msr
            self.msr &= 0xF0                    # reading clears the delta bits
            self._update()
            return value
        return self.scr

    def _write(self, off: int, value: int) -> None:
        if off == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self.rx.append(value)
            else:
                self.emit(bytes((value,)))
            self.thr_ipending = True            # sent at once: the holding register is empty again
        elif off == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            changed = (self.ier ^ value) & IER_THRI
            self.ier = value & 0x0F
            if changed and self.ier & IER_THRI:
                self.thr_ipending = True        # THRE is already true: that is an interrupt
        elif off == IIR_FCR:
            self.fcr = value & 0xC9
            if value & FCR_CLEAR_RX:
                self.rx.clear()
        elif off == LCR:
            self.lcr = value
        elif off == MCR:
            self.mcr = value & 0x1F
            self.service()
        elif off == SCR:
            self.scr = value
        self._update()

    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr & 0x0F:
            return IIR_MSI
        return IIR_NO_INT

    def _update(self) -> None:
        self.irq.set(self._iir() != IIR_NO_INT)


def build(ctx, spec: dict):
    dev = Uart16550(ctx.irq(spec["irq"]), ctx.console())
    return dev, 8


DEVICE = DeviceType(
    "uart16550", build, doc="16550A UART (8 ports): transmit to the console, receive from stdin / feed()",
    keys=(Key("irq", int, 36, "the board IRQ line it drives"),))
