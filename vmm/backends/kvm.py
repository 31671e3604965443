"""The KVM backend: one vCPU, no in-kernel irqchip; set-up ioctls through ctypes, the exit path in C.

``KVM_RUN`` and the exit decoding are a small cffi module (vmm/backends/kvm_build.py): per exit
the Python loop makes one C call and reads the decoded access through one memoryview.

No irqchip means HLT comes back to us as an exit, so a halted guest ends the run instead of
blocking forever. The guest enters in 32-bit protected mode at its PVH entry with paging off
and EBX pointing at hvm_start_info; ``KVM_SET_CPUID2`` is required or its own switch to long
mode triple-faults (facts/vmm.md section 1.4).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import threading

from vmm.backends import EXIT_CRASHED, EXIT_HALTED, EXIT_TIMEOUT, BackendUnavailable, RunResult, load_compiled
from vmm.backends.kvm_debug import KvmDebug
from vmm.memory import PAGE

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_CREATE_VCPU = 0xAE41
KVM_SET_TSS_ADDR = 0xAE47
KVM_SET_IDENTITY_MAP_ADDR = 0x4008AE48
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_SET_MSRS = 0x4008AE89
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE_WB = (1 << 11) | 6      # MTRRs enabled, default type write-back
KVM_GET_DIRTY_LOG = 0x4010AE42
KVM_MEM_LOG_DIRTY_PAGES = 1

EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY = 2, 5, 6, 8, 9
EXIT_INTR, EXIT_INTERNAL_ERROR, EXIT_SYSTEM_EVENT = 10, 17, 24
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

KICK_SIGNAL = signal.SIGRTMIN + 2     # interrupts KVM_RUN for a timeout; a no-op handler is installed for it


_kx_error = ""
try:
    _kx = load_compiled("_kvm")
except ImportError as e:        # kvm_usable() reports it; auto then picks the emulated backend
    _kx, _kx_error = None, str(e)
if _kx is not None:
    KX_MMIO_READ, KX_MMIO_WRITE = _kx.lib.KX_MMIO_READ, _kx.lib.KX_MMIO_WRITE
    KX_PIO_IN, KX_PIO_OUT = _kx.lib.KX_PIO_IN, _kx.lib.KX_PIO_OUT
    KX_INTR, KX_BAD_IO, KX_OTHER = _kx.lib.KX_INTR, _kx.lib.KX_BAD_IO, _kx.lib.KX_OTHER

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmRegs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
                ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
                ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
                ("gdt", KvmDtable), ("idt", KvmDtable), ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64),
                ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class KvmMsrs1(ctypes.Structure):
    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entries", KvmMsrEntry * 1)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")] + [
        ("padding", ctypes.c_uint32 * 3)]


class KvmCpuid2(ctypes.Structure):
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("entries", KvmCpuidEntry2 * 256)]


assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312


def _ioctl(fd: int, req: int, arg=None) -> int:
    """ioctl with a pointer or unsigned integer argument (fcntl.ioctl takes a signed int)."""
    if arg is None:
        arg = 0
    ptr = arg if isinstance(arg, int) else ctypes.addressof(arg)
    res = _libc.ioctl(fd, req, ptr)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"KVM ioctl {req:#x}: {os.strerror(err)}")
    return res


_usable: tuple[bool, str] | None = None


def kvm_usable() -> tuple[bool, str]:
    """Whether /dev/kvm opens and can create a VM with a vCPU (cached), and why not."""
    global _usable
    if _usable is None and _kx is None:
        _usable = (False, _kx_error)
    if _usable is None:
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            _usable = (False, f"/dev/kvm: {e.strerror}")
        else:
            try:
                if _ioctl(fd, KVM_GET_API_VERSION) != 12:
                    _usable = (False, "KVM API version is not 12")
                else:
                    vm = _ioctl(fd, KVM_CREATE_VM)
                    vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0)
                    os.close(vcpu)
                    os.close(vm)
                    _usable = (True, "")
            except OSError as e:
                _usable = (False, f"KVM refused to create a VM/vCPU: {e}")
            finally:
                os.close(fd)
    return _usable


def _flat32(selector: int, code: bool) -> KvmSegment:
    return KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1,
                      dpl=0, db=1, s=1, l=0, g=1, avl=0, unusable=0)


class KvmBackend(KvmDebug):
    name = "kvm"

    def __init__(self, machine, track_dirty: bool = False) -> None:
        ok, why = kvm_usable()
        if not ok:
            raise BackendUnavailable(why)
        self.machine = machine
        self.fds: list[int] = []
        self.kvm = self._keep(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        self.vm = self._keep(_ioctl(self.kvm, KVM_CREATE_VM))
        _ioctl(self.vm, KVM_SET_TSS_ADDR, TSS_ADDR)
        _ioctl(self.vm, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(IDENTITY_MAP_ADDR))
        # Dirty logging only while a trace is recorded: it write-protects guest RAM, so it costs a
        # fault on the first write to each page after every dirty_pages() call.
        self._dirty_logs: list[tuple[int, KvmDirtyLog, ctypes.Array, int, bytes]] = []
        for slot, r in enumerate(machine.dom0.ram.ranges):
            flags = KVM_MEM_LOG_DIRTY_PAGES if track_dirty else 0
            region = KvmMemoryRegion(slot=slot, flags=flags, guest_phys_addr=r.gpa, memory_size=r.size,
                                     userspace_addr=r.host)
            _ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
            if track_dirty:
                words = (r.size // PAGE + 63) // 64
                bitmap = (ctypes.c_uint64 * words)()
                log = KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
                self._dirty_logs.append((r.gpa, log, bitmap, words * 8, bytes(words * 8)))
        self.vcpu = self._keep(_ioctl(self.vm, KVM_CREATE_VCPU, 0))
        size = _ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
        self.run_map = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ffi = _kx.ffi
        self._run_ptr = ffi.from_buffer(self.run_map)
        self._exit = ffi.new("struct kx_exit *")
        if _kx.lib.kx_init(self._exit, self.vcpu, self._run_ptr, size) < 0:
            raise BackendUnavailable(f"KVM run page of {size} bytes is smaller than struct kvm_run")
        self._view = memoryview(ffi.buffer(self._exit, 24)).cast("Q")   # addr, size, value
        self._timed_out = False
        if _kx.lib.kx_install_kick_handler(KICK_SIGNAL) < 0:
            raise BackendUnavailable("cannot install the vCPU kick signal handler")
        cpuid = KvmCpuid2(nent=256)
        _ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, cpuid)
        _ioctl(self.vcpu, KVM_SET_CPUID2, cpuid)
        # At reset MTRRdefType is 0, i.e. every guest page uncacheable wherever the host honours
        # guest MTRRs; a PVH guest never programs them. Firecracker sets the same default.
        msrs = KvmMsrs1(nmsrs=1)
        msrs.entries[0] = KvmMsrEntry(index=MSR_MTRR_DEF_TYPE, data=MTRR_ENABLE_WB)
        _ioctl(self.vcpu, KVM_SET_MSRS, msrs)
        self._debug_init()

    def dirty_pages(self) -> list[int]:
        """Guest-physical addresses of the pages the vCPU wrote since the previous call.

        For the trace recorder (``track_dirty=True``): it diffs only these pages against what a
        CPU-less replay holds, instead of all of guest RAM before every access. KVM_GET_DIRTY_LOG
        also resets the log, so each call reports one interval.
        """
        pages: list[int] = []
        for gpa, log, bitmap, nbytes, zero in self._dirty_logs:
            _ioctl(self.vm, KVM_GET_DIRTY_LOG, log)
            raw = ctypes.string_at(bitmap, nbytes)
            if raw == zero:
                continue
            bits = int.from_bytes(raw, "little")
            while bits:
                low = bits & -bits
                pages.append(gpa + (low.bit_length() - 1) * PAGE)
                bits ^= low
        return pages

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        if self.run_map.closed:
            return
        self._view.release()
        _kx.ffi.release(self._run_ptr)
        self.run_map.close()
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []

    def regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.vcpu, KVM_GET_REGS, regs)
        return regs

    def sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        return sregs

    def _enter_pvh(self, entry: int, start_info: int) -> None:
        sregs = self.sregs()
        sregs.cs = _flat32(0x08, True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat32(0x10, False))
        sregs.tr = KvmSegment(base=0, limit=0x67, selector=0x18, type=11, present=1, s=0)
        sregs.ldt = KvmSegment(unusable=1, type=2, present=1)
        sregs.cr0 = 0x11             # PE | ET; paging off
        sregs.cr4 = 0
        sregs.efer = 0
        _ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        _ioctl(self.vcpu, KVM_SET_REGS, KvmRegs(rip=entry, rbx=start_info, rflags=2))

    def describe_cpu(self) -> str:
        r, s = self.regs(), self.sregs()
        return (f"RIP={r.rip:#x} RSP={r.rsp:#x} RFLAGS={r.rflags:#x} CR0={s.cr0:#x} CR2={s.cr2:#x} "
                f"CR3={s.cr3:#x} CR4={s.cr4:#x} EFER={s.efer:#x}")

    def run(self, entry: int, start_info: int, timeout: float) -> RunResult:
        """Run the guest until it stops or ``timeout`` seconds pass (0: no limit).

        The timeout is a timer thread that kicks the vCPU the way VMMs do: it sets the run page's
        ``immediate_exit`` and signals the thread in ``KVM_RUN``, so it works from any thread
        (SIGALRM reaches only the main one) and leaves the process's signal handlers alone.
        """
        self._enter_pvh(entry, start_info)
        exit_ = self._exit
        _kx.lib.kx_clear_kick(exit_)
        self._timed_out = False
        timer = None
        if timeout:
            timer = threading.Timer(timeout, self._kick, (threading.get_ident(),))
            timer.daemon = True
            timer.start()
        try:
            result = self._loop()
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
        return self._timeout_result(timeout) if result is None else result

    def _timeout_result(self, timeout: float) -> RunResult:
        return RunResult(EXIT_TIMEOUT, "timeout", self.name,
                         f"guest still running after {timeout:g} s; stopped ({self.describe_cpu()})")

    def _kick(self, thread_id: int) -> None:
        """Timer thread: stop the vCPU thread's KVM_RUN now, or its next one."""
        self._timed_out = True
        _kx.lib.kx_kick(self._exit)
        signal.pthread_kill(thread_id, KICK_SIGNAL)

    def _loop(self) -> RunResult | None:
        """The VMM loop: one C call per exit (enter the guest, decode the exit), then the bus.

        ``x`` views the decoded exit: x[0] address or port, x[1] width, x[2] value (written for
        writes; for reads the reply goes there and the next ``kx_run`` hands it to the guest).
        Returns None when the timeout kicked the vCPU.
        """
        m = self.machine
        x = self._view
        kx_run = _kx.lib.kx_run
        exit_ = self._exit
        mmio_read, mmio_write, pio_read, pio_write = m.mmio_read, m.mmio_write, m.pio_read, m.pio_write
        while m.stop_status is None:
            kind = kx_run(exit_)
            if kind == KX_MMIO_READ:
                x[2] = mmio_read(x[0], x[1])
            elif kind == KX_MMIO_WRITE:
                mmio_write(x[0], x[1], x[2])
            elif kind == KX_PIO_OUT:
                pio_write(x[0], x[1], x[2])
            elif kind == KX_PIO_IN:
                x[2] = pio_read(x[0], x[1])
            elif kind == KX_INTR:
                if self._timed_out:
                    return None
            elif kind < 0:
                raise OSError(-kind, f"KVM_RUN: {os.strerror(-kind)}")
            elif kind == KX_BAD_IO:
                return RunResult(EXIT_CRASHED, "error", self.name,
                                 f"KVM I/O exit with its data outside the run page ({self.describe_cpu()})")
            else:
                return self._stopped(kind - KX_OTHER)
        return RunResult(m.stop_status, "exit", self.name)

    def _stopped(self, reason: int) -> RunResult:
        cpu = self.describe_cpu()
        if reason == EXIT_HLT:
            iflag = self.regs().rflags & (1 << 9)
            why = "with interrupts off" if not iflag else "waiting for an interrupt that never comes (no irqchip)"
            return RunResult(EXIT_HALTED, "halt", self.name,
                             f"guest halted {why} without writing the debug-exit port ({cpu})")
        if reason == EXIT_SHUTDOWN:
            return RunResult(EXIT_CRASHED, "triple-fault", self.name, f"guest triple-faulted ({cpu})")
        if reason == EXIT_FAIL_ENTRY:
            code = struct.unpack_from("<Q", self.run_map, 32)[0]
            return RunResult(EXIT_CRASHED, "error", self.name, f"KVM entry failed, reason {code:#x} ({cpu})")
        if reason == EXIT_INTERNAL_ERROR:
            sub = struct.unpack_from("<I", self.run_map, 32)[0]
            return RunResult(EXIT_CRASHED, "error", self.name, f"KVM internal error, suberror {sub} ({cpu})")
        if reason == EXIT_SYSTEM_EVENT:
            kind = struct.unpack_from("<I", self.run_map, 32)[0]
            what = {1: "shutdown", 2: "reset", 3: "crash"}.get(kind, f"event {kind}")
            return RunResult(EXIT_CRASHED, "triple-fault" if kind == 1 else "error", self.name,
                             f"guest system event: {what} ({cpu})")
        return RunResult(EXIT_CRASHED, "error", self.name, f"unexpected KVM exit reason {reason} ({cpu})")
