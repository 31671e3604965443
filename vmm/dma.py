"""The DMA path every bus master takes: its IOMMU (or the board's policy), then machine memory.

A master never sees machine memory directly. It gets a ``DmaPort`` from the machine; the port
asks the master's ``Translator`` (an IPMMU micro-TLB, a virtio-iommu endpoint, or the policy
for a master behind no IOMMU) for the machine-address runs of a transfer, checks them against
machine memory, and only then moves bytes. A failed translation raises ``DmaFault`` carrying
the master-visible status and the faulting address; the IOMMU has already recorded its fault.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vmm.memory import PAGE, MachineMemory

STATUS_OK = 0
STATUS_TRANSLATION = 2
STATUS_PERMISSION = 3
STATUS_BAD_LENGTH = 4
STATUS_REFUSED = 5

Runs = list[tuple[int, int]]          # (machine address, length) in transfer order


class DmaFault(Exception):
    def __init__(self, status: int, address: int, why: str = "") -> None:
        super().__init__(f"DMA fault status {status} at {address:#x}{': ' + why if why else ''}")
        self.status = status
        self.address = address
        self.why = why


class Translator(Protocol):
    """What an IOMMU gives each of its masters."""

    def translate(self, iova: int, length: int, write: bool) -> Runs:
        """Machine runs covering [iova, iova + length), or raise DmaFault (recording the fault)."""
        ...


class Bypass:
    """A master behind no IOMMU under ``unprotected = "bypass"``: bus address = machine address."""

    def translate(self, iova: int, length: int, write: bool) -> Runs:
        return [(iova, length)]


class Refuse:
    """A master behind no IOMMU under ``unprotected = "fault"``, or one not yet wired."""

    def __init__(self, why: str) -> None:
        self.why = why

    def translate(self, iova: int, length: int, write: bool) -> Runs:
        raise DmaFault(STATUS_REFUSED, iova & ~(PAGE - 1), self.why)


class DmaPort:
    """One master's window on memory. ``observers`` see every byte read (trace recording)."""

    def __init__(self, memory: MachineMemory, resolve: Callable[[], Translator], name: str) -> None:
        self.memory = memory
        self.name = name
        self._resolve = resolve
        self._translator: Translator | None = None
        self.observers: list[Callable[[int, bytes], None]] = []

    @property
    def translator(self) -> Translator:
        if self._translator is None:
            self._translator = self._resolve()
        return self._translator

    def map(self, iova: int, length: int, write: bool) -> Runs:
        """Translate a transfer and check that it stays inside machine memory."""
        runs = self.translator.translate(iova, length, write)
        size = self.memory.size
        cursor = iova
        for mpa, n in runs:
            if mpa < 0 or mpa + n > size:
                bad = cursor + max(0, min(n, size - mpa)) if mpa < size else cursor
                page = max(bad & ~(PAGE - 1), iova & ~(PAGE - 1))
                raise DmaFault(STATUS_TRANSLATION, page, "outside machine memory")
            cursor += n
        return runs

    def gather(self, runs: Runs) -> bytes:
        view = self.memory.view
        if len(runs) == 1:
            mpa, n = runs[0]
            data = bytes(view[mpa:mpa + n])
        else:
            data = b"".join(view[mpa:mpa + n] for mpa, n in runs)
        if self.observers:
            off = 0
            for mpa, n in runs:
                for obs in self.observers:
                    obs(mpa, data[off:off + n])
                off += n
        return data

    def scatter(self, runs: Runs, data: bytes | memoryview) -> None:
        view = self.memory.view
        off = 0
        for mpa, n in runs:
            view[mpa:mpa + n] = data[off:off + n]
            off += n

    def read(self, iova: int, length: int) -> bytes:
        return self.gather(self.map(iova, length, False))

    def write(self, iova: int, data: bytes) -> None:
        self.scatter(self.map(iova, len(data), True), data)
