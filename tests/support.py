"""Shared test helpers: backend parametrisation that says why KVM is skipped."""
from __future__ import annotations

import pytest

from vmm.backends.kvm import kvm_usable

KVM_OK, KVM_WHY = kvm_usable()
KVM = pytest.param("kvm", marks=pytest.mark.skipif(not KVM_OK, reason=f"KVM unusable here: {KVM_WHY}"))
BACKENDS = [KVM, "emulated"]


class RecordingDevice:
    """A device that remembers every access and reads back what was written at that (offset, size)."""

    def __init__(self, reads: dict[int, int] | None = None) -> None:
        self.log: list[tuple[str, int, int, int]] = []
        self.regs: dict[tuple[int, int], int] = {}
        self.fixed = reads or {}

    def read(self, offset: int, size: int) -> int:
        value = self.fixed.get(offset, self.regs.get((offset, size), 0))
        self.log.append(("r", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.regs[(offset, size)] = value
