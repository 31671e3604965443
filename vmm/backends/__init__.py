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


def load_compiled(stem: str):
    """Import the cffi module ``vmm.backends.<stem>`` (``_kvm``, ``_emu``), compiling it in place
    once from ``vmm/backends/<stem without _>_build.py`` in a source checkout that lacks it, as the
    walker does. Raises ImportError saying why when it can be neither imported nor built."""
    import importlib

    name = f"vmm.backends.{stem}"
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    import fcntl
    import os
    import tempfile

    try:
        with open(os.path.join(tempfile.gettempdir(), f"iommu-lab-{stem}-build.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return importlib.import_module(name)
            except ImportError:
                pass
            importlib.import_module(f"vmm.backends.{stem.lstrip('_')}_build").compile_in_place()
            importlib.invalidate_caches()
            return importlib.import_module(name)
    except Exception as e:      # noqa: BLE001 - no compiler, read-only tree, ...: say so
        raise ImportError(f"{name} is not built and cannot be built here ({e}); run `make setup`") from None


@dataclass
class DebugStop:
    """Why a guest under a debugger stopped short of ending (vmm/gdbstub.py): ``step`` (one
    instruction ran), ``breakpoint`` (about to run the one at ``address``) or ``interrupt``."""
    kind: str
    address: int = 0


# What a debugger may change (``debug_set_regs``); the rest of the register set it reads only.
DEBUG_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
DEBUG_WRITABLE = frozenset(DEBUG_GPRS + ("rip", "eflags"))
HW_BREAKPOINTS = 4          # x86 has four debug address registers


@runtime_checkable
class DebugCpu(Protocol):
    """What the GDB stub needs of a CPU on top of CpuBackend; both backends provide it.

    ``debug_begin`` puts the vCPU at the PVH entry without running it; ``debug_resume`` runs it
    (one instruction when ``step``) with software breakpoints at the given guest-virtual addresses
    (mapped to their guest-physical addresses, None when unmapped, for a backend that plants int3)
    and hardware ones at ``hw`` (at most HW_BREAKPOINTS), and returns the RunResult when the guest
    ended or a DebugStop (the stub steps off a breakpoint at the resume address itself).
    ``debug_interrupt`` may be called from any thread and stops the current or next ``debug_resume``.
    Registers are named as in GDB's amd64 description.
    """

    def debug_begin(self, entry: int, start_info: int) -> None: ...

    def debug_resume(self, step: bool, breakpoints: dict[int, int | None], hw: frozenset[int],
                     timeout: float) -> RunResult | DebugStop: ...

    def debug_interrupt(self) -> None: ...

    def debug_get_regs(self) -> dict[str, int]: ...

    def debug_set_regs(self, values: dict[str, int]) -> None: ...

    def debug_memory_written(self) -> None: ...
