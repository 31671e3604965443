"""CPU backends. Both boot the same PVH ELF and hand every MMIO and port access to the machine's
buses with the same widths, so a device cannot tell which CPU drove it."""
from __future__ import annotations

from dataclasses import dataclass

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
