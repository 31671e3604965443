"""The KVM vCPU under a debugger (vmm/gdbstub.py): KVM_SET_GUEST_DEBUG, registers, breakpoints.

A step is KVM_GUESTDBG_SINGLESTEP; a software breakpoint is an int3 planted in guest memory
only while the vCPU runs (so the debugger reads the original bytes) with KVM_GUESTDBG_USE_SW_BP,
which turns the #BP into a KVM_EXIT_DEBUG; a hardware breakpoint is a debug address register
(KVM_GUESTDBG_USE_HW_BP). With nothing armed, guest debugging is off and the vCPU runs exactly as
without a debugger.

kvm_pvm (software virtualisation) steps and takes hardware breakpoints, but does not intercept
int3: it stops with an emulation failure (KVM_EXIT_INTERNAL_ERROR) with RIP on the int3. Such
a failure at an address where we planted one is that breakpoint; anywhere else it is the error.
A software breakpoint whose address is not mapped to guest RAM when the vCPU resumes is not
planted (it cannot fire before the guest maps it); hardware breakpoints need no mapping.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading

from vmm.backends import DEBUG_WRITABLE, HW_BREAKPOINTS, BackendUnavailable, DebugStop, RunResult

KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_SET_GUEST_DEBUG = 0x4048AE9B
KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP = 0x1, 0x2
KVM_GUESTDBG_USE_SW_BP, KVM_GUESTDBG_USE_HW_BP = 0x10000, 0x20000
EXIT_DEBUG, EXIT_INTERNAL_ERROR = 4, 17
DR6_BS = 1 << 14            # single-step trap
INT3 = b"\xcc"


class KvmGuestDebug(ctypes.Structure):
    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("debugreg", ctypes.c_uint64 * 8)]


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
         "r13", "r14", "r15", "rip")
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")


def debug_control(step: bool, sw: bool, hw: list[int]) -> KvmGuestDebug:
    """The KVM_SET_GUEST_DEBUG argument: off when nothing is armed."""
    dbg = KvmGuestDebug()
    if not (step or sw or hw):
        return dbg
    dbg.control = KVM_GUESTDBG_ENABLE
    if step:
        dbg.control |= KVM_GUESTDBG_SINGLESTEP
    if sw:
        dbg.control |= KVM_GUESTDBG_USE_SW_BP
    if hw:
        dbg.control |= KVM_GUESTDBG_USE_HW_BP
        for i, addr in enumerate(hw):
            dbg.debugreg[i] = addr
            dbg.debugreg[7] |= 1 << (2 * i)      # Li: enabled, R/W 00 (execute), LEN 00
    return dbg


class KvmDebug:
    """Mixed into KvmBackend, whose vCPU, run page, ``_loop`` and ``_kick`` it uses."""

    def _debug_init(self) -> None:
        self._interrupted = False         # set by debug_interrupt (any thread)
        self._debug_armed = False
        self._vcpu_thread: int | None = None

    def _set_guest_debug(self, dbg: KvmGuestDebug) -> None:
        from vmm.backends.kvm import _ioctl
        _ioctl(self.vcpu, KVM_SET_GUEST_DEBUG, dbg)
        self._debug_armed = bool(dbg.control)

    def debug_begin(self, entry: int, start_info: int) -> None:
        """The vCPU at the PVH entry; refuses (BackendUnavailable, one line) when this KVM cannot
        debug a guest: no KVM_CAP_SET_GUEST_DEBUG, or KVM_SET_GUEST_DEBUG fails."""
        from vmm.backends.kvm import _ioctl
        if _ioctl(self.kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG) <= 0:
            raise BackendUnavailable("this KVM cannot debug guests (no KVM_CAP_SET_GUEST_DEBUG); "
                                     "use --backend emulated")
        self._enter_pvh(entry, start_info)
        try:
            self._set_guest_debug(debug_control(True, False, []))
            self._set_guest_debug(KvmGuestDebug())
        except OSError as e:
            raise BackendUnavailable(f"KVM_SET_GUEST_DEBUG failed ({e.strerror}); use --backend emulated") from None

    def debug_interrupt(self) -> None:
        """From any thread: the vCPU leaves KVM_RUN now (a kick, as for a timeout) or, when it is
        not in the guest, the next ``debug_resume`` returns at once."""
        from vmm.backends.kvm import KICK_SIGNAL, _kx
        self._interrupted = True
        self._timed_out = True            # what makes _loop return on the kick
        _kx.lib.kx_kick(self._exit)
        thread = self._vcpu_thread
        if thread is not None:
            try:
                signal.pthread_kill(thread, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def debug_memory_written(self) -> None:
        pass                              # KVM runs guest memory as it is

    def debug_get_regs(self) -> dict[str, int]:
        r, s = self.regs(), self.sregs()
        regs = {name: getattr(r, name) for name in _GPRS}
        regs["eflags"] = r.rflags
        for name in _SEGS:
            regs[name] = getattr(s, name).selector
        regs.update(fs_base=s.fs.base, gs_base=s.gs.base, cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4,
                    cr8=s.cr8, efer=s.efer)
        return regs

    def debug_set_regs(self, values: dict[str, int]) -> None:
        from vmm.backends.kvm import KVM_SET_REGS, _ioctl
        r = self.regs()
        for name, value in values.items():
            if name in DEBUG_WRITABLE:
                setattr(r, "rflags" if name == "eflags" else name, value)
        _ioctl(self.vcpu, KVM_SET_REGS, r)

    def debug_resume(self, step: bool, breakpoints: dict[int, int | None], hw: frozenset[int],
                     timeout: float) -> RunResult | DebugStop:
        from vmm.backends.kvm import _kx
        if len(hw) > HW_BREAKPOINTS:
            raise ValueError(f"at most {HW_BREAKPOINTS} hardware breakpoints")
        mem = self.machine
        planted: dict[int, tuple[int, bytes]] = {}
        for vaddr, paddr in breakpoints.items():
            if paddr is not None:
                planted[vaddr] = (paddr, mem.read_guest(paddr, 1))
                mem.write_guest(paddr, INT3)
        dbg = debug_control(step, bool(planted), sorted(hw))
        if dbg.control or self._debug_armed:
            self._set_guest_debug(dbg)
        self._vcpu_thread = threading.get_ident()
        _kx.lib.kx_clear_kick(self._exit)
        self._timed_out = False
        timer = None
        if timeout and not step:
            timer = threading.Timer(timeout, self._kick, (self._vcpu_thread,))
            timer.daemon = True
            timer.start()
        try:
            if self._interrupted:         # asked before the kick was cleared: it is not lost
                result = None
            else:
                result = self._loop()
        finally:
            self._vcpu_thread = None
            if timer is not None:
                timer.cancel()
                timer.join()
            for paddr, byte in reversed(planted.values()):    # two aliases of one byte: the first saved wins
                mem.write_guest(paddr, byte)
        return self._debug_outcome(result, planted, timeout)

    def _debug_outcome(self, result: RunResult | None, planted: dict, timeout: float) -> RunResult | DebugStop:
        if result is None:                # kicked: the debugger's interrupt or the time ran out
            if self._interrupted:
                self._interrupted = False
                return DebugStop("interrupt")
            return self._timeout_result(timeout)
        if result.reason == "exit":
            return result
        exit_reason = struct.unpack_from("<I", self.run_map, 8)[0]
        if exit_reason == EXIT_DEBUG:
            exception, _, pc, dr6 = struct.unpack_from("<IIQQ", self.run_map, 32)
            if exception == 1 and dr6 & DR6_BS:
                return DebugStop("step")
            return DebugStop("breakpoint", pc)
        if exit_reason == EXIT_INTERNAL_ERROR and self.regs().rip in planted:
            return DebugStop("breakpoint", self.regs().rip)
        return result


_usable: tuple[bool, str] | None = None


def kvm_debug_usable() -> tuple[bool, str]:
    """Whether KVM here can debug a guest (cached), and why not: a scratch VM and vCPU are asked
    for KVM_CAP_SET_GUEST_DEBUG and to turn single-stepping on."""
    global _usable
    if _usable is None:
        from vmm.backends.kvm import KVM_CREATE_VCPU, KVM_CREATE_VM, _ioctl, kvm_usable
        ok, why = kvm_usable()
        if not ok:
            _usable = (False, why)
            return _usable
        fds: list[int] = []
        try:
            fds.append(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
            if _ioctl(fds[0], KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG) <= 0:
                _usable = (False, "this KVM cannot debug guests (no KVM_CAP_SET_GUEST_DEBUG)")
            else:
                fds.append(_ioctl(fds[0], KVM_CREATE_VM))
                fds.append(_ioctl(fds[1], KVM_CREATE_VCPU, 0))
                _ioctl(fds[2], KVM_SET_GUEST_DEBUG, debug_control(True, True, []))
                _usable = (True, "")
        except OSError as e:
            _usable = (False, f"KVM_SET_GUEST_DEBUG failed: {e.strerror}")
        finally:
            for fd in reversed(fds):
                os.close(fd)
    return _usable
