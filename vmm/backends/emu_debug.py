"""The emulated CPU under a debugger (vmm/gdbstub.py): registers, breakpoints, single steps.

Breakpoints are one unicorn code hook over every address, added when the first breakpoint is set
and kept for the rest of the run: unicorn 2.1.4 re-translates an address when a hook bound to it
is deleted, from whatever mode the CPU is in, and the page fault that can raise reaches the guest
through its IDT (vmm/backends/x86cpu.py), so hooks are never deleted. A step is
``emu_start(count=1)``. Unicorn keeps translated blocks across runs and only generates hook calls
when it translates, so its block cache is flushed when the hook arrives, when stepping starts or
stops, and after the debugger writes guest memory.
"""
from __future__ import annotations

from unicorn import UC_HOOK_CODE
from unicorn import x86_const as X

from vmm.backends import DEBUG_WRITABLE, DebugStop, RunResult

_REGS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base",
    "cr0", "cr2", "cr3", "cr4")}
MSR_EFER = 0xC0000080


class EmulatedDebug:
    """Mixed into EmulatedBackend, whose ``uc``, ``_route``, ``_enter_pvh`` and ``_emulate`` it uses."""

    def _debug_init(self) -> None:
        self._bp_hook: int | None = None         # the one code hook, once a breakpoint was set
        self._bps: frozenset[int] = frozenset()  # guest-virtual addresses it stops at
        self._bp_hit: int | None = None
        self._interrupted = False                # set from the stub's socket thread
        self._stepped = False                    # the cached blocks carry the step counter's hook

    def debug_begin(self, entry: int, start_info: int) -> None:
        self._route()
        self._enter_pvh(entry, start_info)
        self.uc.reg_write(X.UC_X86_REG_RIP, entry)

    def debug_interrupt(self) -> None:
        self._interrupted = True
        self.uc.emu_stop()          # thread-safe in unicorn (its own timeout thread calls it)

    def debug_memory_written(self) -> None:
        self.uc.ctl_flush_tb()

    def debug_get_regs(self) -> dict[str, int]:
        uc = self.uc
        regs = {name: uc.reg_read(reg) for name, reg in _REGS.items()}
        regs["efer"] = uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)
        return regs

    def debug_set_regs(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            if name in DEBUG_WRITABLE:
                self.uc.reg_write(_REGS[name], value)

    def debug_resume(self, step: bool, breakpoints: dict[int, int | None], hw: frozenset[int],
                     timeout: float) -> RunResult | DebugStop:
        uc = self.uc
        if self._interrupted:
            self._interrupted = False
            return DebugStop("interrupt")
        self._bps = frozenset(breakpoints) | frozenset(hw)
        changed = False
        if self._bps and self._bp_hook is None:
            self._bp_hook = uc.hook_add(UC_HOOK_CODE, self._breakpoint, None, 1, 0)
            changed = True
        if changed or step or self._stepped:
            uc.ctl_flush_tb()
        self._stepped = step
        start = uc.reg_read(X.UC_X86_REG_RIP)
        self._bp_hit = None

        def why() -> DebugStop | None:
            if step and not self._ran_hlt(start):
                return DebugStop("step")
            if self._bp_hit is not None:
                return DebugStop("breakpoint", self._bp_hit)
            if self._interrupted:
                self._interrupted = False
                return DebugStop("interrupt")
            return None         # the guest halted, or the time ran out: as without a debugger
        return self._emulate(start, timeout, count=1 if step else 0, debug=why)

    def _breakpoint(self, uc, address: int, size: int, user_data) -> None:
        if address in self._bps:
            self._bp_hit = address
            uc.emu_stop()           # before the instruction at address runs

    def _ran_hlt(self, start: int) -> bool:
        """Whether the one instruction stepped from ``start`` was HLT (unicorn stops after it)."""
        return self.uc.reg_read(X.UC_X86_REG_RIP) == start + 1 and self._halted_at(start + 1)
