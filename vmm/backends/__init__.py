"""CPU backends. Both boot the same PVH ELF and hand every MMIO and port access to the machine's
buses with the same widths, so a device cannot tell which CPU drove it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

EXIT_TIMEOUT = 124      # the guest ran past --timeout
EXIT_HALTED = 125       # the guest halted without writing the debug-exit port
EXIT_CRASHED = 126      # triple fault, entry failure, emulator error


@dataclass
class RunResult:
    status: int          # what `vmm run` exits with
    reason: str          # "exit", "timeout", "halt", "triple-fault", "error"
    backend: str
    message: str = ""
    console: bytes = b""


class BackendUnavailable(Exception):
    pass


@runtime_checkable
class CpuBackend(Protocol):
    """What the runner and the trace recorder need of a CPU: both backends satisfy it.

    A backend is built as ``cls(machine, track_dirty=False)`` (``track_dirty`` only while a trace is
    recorded), runs one payload and is closed; ``dirty_pages`` returns the guest-physical pages the
    CPU wrote since the previous call (recording only).
    """

    name: str

    def run(self, entry: int, start_info: int, timeout: float) -> RunResult: ...

    def close(self) -> None: ...

    def dirty_pages(self) -> list[int]: ...

    def describe_cpu(self) -> str: ...
