"""Shared test helpers: backend parametrisation that says why KVM is skipped, payloads built on
demand, one-shot payload runs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmm.backends.kvm import kvm_usable
from vmm.machine import Machine

GUESTS = Path(__file__).resolve().parent.parent / "guest_images"

KVM_OK, KVM_WHY = kvm_usable()
KVM = pytest.param("kvm", marks=pytest.mark.skipif(not KVM_OK, reason=f"KVM unusable here: {KVM_WHY}"))
BACKENDS = [KVM, "emulated"]


def ensure_payloads(*names: str) -> None:
    """Build the named payloads when a toolchain is there (a no-op when they are up to date); skip
    the calling module, saying why, when one cannot be had."""
    if shutil.which("make") and shutil.which("gcc"):
        subprocess.run(["make", "-s", "-C", str(GUESTS), *(f"out/{n}.elf" for n in names)], check=True)
    for name in names:
        if not (GUESTS / "out" / f"{name}.elf").is_file():
            pytest.skip(f"{name}.elf not built and no toolchain to build it")


def run_payload(image: str, backend: str, p2m: str = "direct", timeout: float = 60):
    """Boot ``image`` on a fresh rcar-virt machine; the RunResult."""
    with Machine.from_board("rcar-virt", p2m=p2m) as m:
        return m.run(image, backend=backend, timeout=timeout)


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
