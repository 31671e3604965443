"""The board's interrupt sources as a CPU backend sees them: the CPU-facing interrupt controller
(the master 8259), the timers (the 8254) and the input devices (the 16550's receiver).

A backend runs the guest in slices. Between two slices (a safe point: an instruction boundary,
with the CPU stopped) it calls ``service`` -- timers give the edges that came due, input that other
threads fed is taken in -- and asks ``vector()`` for an interrupt to arm in the CPU, which takes it
at the first instruction boundary where IF allows; it runs the next slice no longer than
``slice_end`` allows. ``Alarm`` stops the CPU when a slice ends; an
interrupt controller whose INT rises while the guest runs (a device raised its line during an
MMIO access) and input from another thread stop it at once. Devices are found by what they offer
(``cpu_facing`` + ``acknowledge``, ``next_event`` + ``tick``, ``service`` + ``wake``), so a board
without them runs as before: no slices, no threads.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

POLL_NS = 1_000_000        # a slice end the CPU missed (it raced the start) is repeated every 1 ms


class Alarm:
    """One thread that calls ``fire`` once a deadline (monotonic ns) passes, and every millisecond
    after that until ``set`` moves or clears it."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self.fire = fire
        self.cond = threading.Condition()
        self.deadline: int | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="vmm-alarm", daemon=True)
        self.thread.start()

    def set(self, deadline: int | None) -> None:
        with self.cond:
            self.deadline = deadline
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=1)

    def _loop(self) -> None:
        with self.cond:
            while not self.closed:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic_ns()
                if left > 0:
                    self.cond.wait(left / 1e9)
                    continue
                self.deadline += POLL_NS      # again 1 ms later until moved: a stop that raced the
                self.fire()                   # start of a slice is not lost


class InterruptSources:
    def __init__(self, machine, stop_cpu: Callable[[], None]) -> None:
        devices = list(machine.devices.values())
        self.intc = next((d for d in devices if getattr(d, "cpu_facing", False)), None)
        self.timers = [d for d in devices
                       if callable(getattr(d, "next_event", None)) and callable(getattr(d, "tick", None))]
        self.inputs = [d for d in devices if callable(getattr(d, "service", None)) and hasattr(d, "wake")]
        self.stop_cpu = stop_cpu
        self.stopped = False              # the CPU was stopped by a slice end or an event, not by itself
        self.woken = threading.Event()
        self.alarm: Alarm | None = None
        if self.intc is not None:
            self.intc.listeners.append(self._raised)
        for d in self.inputs:
            d.wake.append(self._wake)

    @property
    def active(self) -> bool:
        return self.intc is not None

    def close(self) -> None:
        if self.intc is not None and self._raised in self.intc.listeners:
            self.intc.listeners.remove(self._raised)
        for d in self.inputs:
            if self._wake in d.wake:
                d.wake.remove(self._wake)
        if self.alarm is not None:
            self.alarm.close()
            self.alarm = None

    # -- events -----------------------------------------------------------------------------
    def _stop(self) -> None:
        self.stopped = True
        self.stop_cpu()

    def _raised(self) -> None:
        self._stop()
        self.woken.set()

    def _wake(self) -> None:              # another thread fed input
        self.woken.set()
        self._stop()

    # -- at a safe point ----------------------------------------------------------------------
    def service(self, now: int | None = None) -> None:
        now = time.monotonic_ns() if now is None else now
        for d in self.inputs:
            d.service()
        for t in self.timers:
            t.tick(now)

    def next_event(self) -> int | None:
        events = [e for e in (t.next_event() for t in self.timers) if e is not None]
        return min(events) if events else None

    def vector(self) -> int | None:
        """The vector the controller raises, acknowledged (the CPU takes it once IF allows)."""
        if self.intc is not None and self.intc.intr:
            return self.intc.acknowledge()
        return None

    def pending(self) -> bool:
        return self.intc is not None and self.intc.intr

    def expecting_input(self) -> bool:
        return any(getattr(d, "expect_input", False) for d in self.inputs)

    def slice_end(self, end: int | None) -> int | None:
        """When the next slice must stop: the run's end or the next timer edge."""
        marks = [m for m in (end, self.next_event()) if m is not None]
        return min(marks) if marks else None

    def arm_alarm(self, deadline: int | None) -> None:
        self.stopped = False
        if deadline is None and self.alarm is None:
            return
        if self.alarm is None:
            self.alarm = Alarm(self._stop)
        self.alarm.set(deadline)

    def wait(self, until: int | None) -> None:
        """A halted CPU with IF set: sleep until ``until`` (ns) or an event."""
        self.woken.clear()
        if self.pending() or any(getattr(d, "rx_waiting", False) for d in self.inputs):
            return
        left = None if until is None else max(0, until - time.monotonic_ns()) / 1e9
        self.woken.wait(left)
