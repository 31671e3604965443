"""Interrupt lines: an injected capability, so a device never knows who listens.

The harness has no interrupt controller model; guests poll. Edges are what matters: traces
record and check them (``IRQ raise N`` / ``IRQ lower N``), tests read ``level``.
"""
from __future__ import annotations

from collections.abc import Callable

EdgeListener = Callable[[int, bool], None]


class IrqLine:
    """One level-sensitive line; listeners hear every change of level, never a repeat."""

    __slots__ = ("number", "level", "_listeners")

    def __init__(self, number: int, listeners: list[EdgeListener] | None = None) -> None:
        self.number = number
        self.level = False
        self._listeners = listeners if listeners is not None else []

    def set(self, level: bool) -> None:
        level = bool(level)
        if level != self.level:
            self.level = level
            for listener in self._listeners:
                listener(self.number, level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)


class IrqController:
    """Hands out numbered lines that share one list of edge listeners."""

    def __init__(self) -> None:
        self.listeners: list[EdgeListener] = []
        self.lines: dict[int, IrqLine] = {}

    def line(self, number: int) -> IrqLine:
        if number not in self.lines:
            self.lines[number] = IrqLine(number, self.listeners)
        return self.lines[number]

    def levels(self) -> dict[int, bool]:
        return {n: line.level for n, line in sorted(self.lines.items())}
