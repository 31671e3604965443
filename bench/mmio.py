"""How much the harness adds to a guest MMIO read, per backend, against a floor measured in the same run.

The guest (guest_images/mmio_bench.c) makes N 4-byte reads of a trivial device. The cost of
one read is the slope between a run of N1 and one of N2 reads, so boot time cancels out.

- kvm: the harness's Python run loop + bus + device, against a bare KVM run loop in C
  (compiled here with cffi) that answers the same exits on the same vCPU setup.
- emulated: the harness's unicorn backend (memory hook + split-access callbacks + bus + device),
  against a bare unicorn MMIO callback that returns the value directly.
Goals: kvm <= 1.6x its floor, emulated <= 2x.
"""
from __future__ import annotations

import ctypes
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm import Machine  # noqa: E402
from vmm.elfload import load_image, place  # noqa: E402
from vmm.images import find_image  # noqa: E402

TESTDEV = 0x0D000000
N1, N2 = 2_000, 20_000


class Trivial:
    def __init__(self, n: int) -> None:
        self.n = n

    def read(self, offset: int, size: int) -> int:
        return self.n if offset == 8 else 0x1234

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def machine(n: int):
    m = Machine.from_board("rcar-virt")
    m.mmio.add(TESTDEV, 0x1000, Trivial(n), "trivial")
    img = load_image(find_image("mmio_bench"), m.dom0.ram_ranges)
    return m, img, place(img, m.dom0.write, m.dom0.ram_ranges)


def harness(backend: str, n: int) -> float:
    from vmm.runner import choose_backend
    m, img, si = machine(n)
    cpu = choose_backend(backend)(m)
    t = time.perf_counter()
    r = cpu.run(img.entry, si, 60)
    dt = time.perf_counter() - t
    cpu.close()
    m.close()
    assert r.status == 0, r
    return dt


FLOOR_C = r"""
#include <errno.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
int floor_loop(int vcpu, void *runp, uint32_t n) {
    struct kvm_run *run = runp;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) { if (errno == EINTR) continue; return -1; }
        switch (run->exit_reason) {
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write) {
                uint32_t v = run->mmio.phys_addr == 0x0D000008 ? n : 0x1234;
                memcpy(run->mmio.data, &v, 4);
            }
            break;
        case KVM_EXIT_IO:
            if (run->io.port == 0xF4 && run->io.direction == KVM_EXIT_IO_OUT)
                return *(uint32_t *)((char *)run + run->io.data_offset);
            break;
        default:
            return -1000 - (int)run->exit_reason;
        }
    }
}
"""


def build_floor():
    from cffi import FFI
    ffi = FFI()
    ffi.cdef("int floor_loop(int vcpu, void *runp, uint32_t n);")
    ffi.set_source("_mmio_floor", FLOOR_C)
    tmp = tempfile.mkdtemp(prefix="iommu-lab-bench-")
    lib_path = ffi.compile(tmpdir=tmp, verbose=False)
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mmio_floor", lib_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


def kvm_floor(n: int, floor) -> float:
    from vmm.backends.kvm import KvmBackend
    ffi, lib = floor
    m, img, si = machine(n)
    cpu = KvmBackend(m)
    cpu._enter_pvh(img.entry, si)
    anchor = ctypes.c_char.from_buffer(cpu.run_map)
    t = time.perf_counter()
    rc = lib.floor_loop(cpu.vcpu, ffi.cast("void *", ctypes.addressof(anchor)), n)
    dt = time.perf_counter() - t
    del anchor
    cpu.close()
    m.close()
    assert rc == 0, rc
    return dt


def emulated_floor(n: int) -> float:
    import struct

    from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32, UC_PROT_ALL, Uc
    from unicorn.x86_const import (
        UC_X86_INS_OUT,
        UC_X86_REG_CS,
        UC_X86_REG_DS,
        UC_X86_REG_EBX,
        UC_X86_REG_ES,
        UC_X86_REG_GDTR,
        UC_X86_REG_SS,
    )
    m, img, si = machine(n)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    for r in m.dom0.ram.ranges:
        uc.mem_map_ptr(r.gpa, r.size, UC_PROT_ALL, r.host)
    uc.mmio_map(TESTDEV, 0x1000, lambda uc, off, size, ud: n if off == 8 else 0x1234, None,
                lambda uc, off, size, value, ud: None, None)
    status = []

    def out(uc, port, size, value, ud):
        if port == 0xF4:
            status.append(value)
            uc.emu_stop()
    uc.hook_add(UC_HOOK_INSN, out, None, 1, 0, UC_X86_INS_OUT)
    m.write_guest(0x5000, struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF))
    uc.reg_write(UC_X86_REG_GDTR, (0, 0x5000, 23, 0))
    uc.reg_write(UC_X86_REG_CS, 0x08)
    for reg in (UC_X86_REG_DS, UC_X86_REG_ES, UC_X86_REG_SS):
        uc.reg_write(reg, 0x10)
    uc.reg_write(UC_X86_REG_EBX, si)
    t = time.perf_counter()
    uc.emu_start(img.entry, 0xFFFFFFFF)
    dt = time.perf_counter() - t
    m.close()
    assert status == [0], status
    return dt


def per_read(fn, *args) -> float:
    """Best-of-3 slope between N1 and N2 reads, in microseconds per read."""
    best = []
    for _ in range(3):
        best.append((fn(*args, N2) - fn(*args, N1)) / (N2 - N1))
    return min(best) * 1e6


def main() -> int:
    from vmm.backends.kvm import kvm_usable
    rows = []
    ok, why = kvm_usable()
    if ok:
        floor = build_floor()
        h = per_read(lambda n: harness("kvm", n))
        f = per_read(lambda n: kvm_floor(n, floor))
        rows.append(("kvm", h, f, 1.6))
    else:
        print(f"kvm: skipped ({why})")
    h = per_read(lambda n: harness("emulated", n))
    f = per_read(emulated_floor)
    rows.append(("emulated", h, f, 2.0))
    print(f"{'backend':10} {'harness us/read':>16} {'floor us/read':>14} {'ratio':>7} {'goal':>6}")
    for name, h, f, goal in rows:
        print(f"{name:10} {h:16.2f} {f:14.2f} {h / f:7.2f} {goal:6.1f}  {'ok' if h / f <= goal else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
