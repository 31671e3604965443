"""How much the harness adds to a guest MMIO read, per backend, against floors measured in the same run.

The guest (guest_images/mmio_bench.c) makes N 4-byte reads of a trivial device. The cost of
one read is the slope between a run of N1 and one of N2 reads, so boot time cancels out.

- kvm: the harness's run loop (C exit path, Python dispatch) + bus + device, against a bare KVM
  run loop in C (compiled here with cffi) that answers the same exits on the same vCPU setup.
- kvm vs qemu: the same, against ``qemu-system-x86_64 -M microvm -accel kvm`` (whole process,
  slope between two payloads). QEMU has no device to tell the payload N, so both sides boot the
  same two ELFs built here from the guest runtime with N fixed at compile time (QEMU answers the
  unassigned reads with 0; our machine with the trivial device). Skipped when QEMU or gcc is missing.
- emulated (long mode, the PVH payload) and emulated 32-bit (a paging-off protected-mode loop
  written straight into RAM): the harness's unicorn backend (C memory hook, one Python call, bus,
  device) against a bare unicorn ``mmio_map`` Python callback that returns the value directly.
  Timed in CPU time of the thread (the machine is shared; unicorn runs in the calling thread).
Goals: kvm <= 1.6x its floor and <= 1.3x QEMU; emulated <= 1.5x its floor in both modes.

Usage: python bench/mmio.py   (about a minute with QEMU)
"""
from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
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
QN1, QN2 = 2_000, 60_000       # fixed-N payloads for the QEMU comparison
CODE32 = 0x100000              # where the 32-bit loop is written
REPO = Path(__file__).resolve().parents[1]


class Trivial:
    def __init__(self, n: int) -> None:
        self.n = n

    def read(self, offset: int, size: int) -> int:
        return self.n if offset == 8 else 0x1234

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def code32(n: int) -> bytes:
    """32-bit protected mode, paging off: ``n`` x ``mov eax, [TESTDEV]``, then ``out 0xf4, eax`` (0)."""
    return (b"\xb9" + struct.pack("<I", n)                  # mov ecx, n
            + b"\xa1" + struct.pack("<I", TESTDEV)          # 1: mov eax, [TESTDEV]
            + b"\x49\x75\xf8"                               # dec ecx; jnz 1b
            + b"\x31\xc0\xe7\xf4\xf4")                       # xor eax, eax; out 0xf4, eax; hlt


def machine(n: int, image: str = "mmio_bench"):
    """A board with the trivial device; ``image`` a payload name or path, or "code32"."""
    m = Machine.from_board("rcar-virt")
    m.mmio.add(TESTDEV, 0x1000, Trivial(n), "trivial")
    if image == "code32":
        m.write_guest(CODE32, code32(n))
        return m, CODE32, 0
    img = load_image(find_image(image), m.dom0.ram_ranges)
    return m, img.entry, place(img, m.dom0.write, m.dom0.ram_ranges)


def harness(backend: str, n: int, image: str = "mmio_bench", clock=time.perf_counter) -> float:
    from vmm.runner import choose_backend
    m, entry, si = machine(n, image)
    cpu = choose_backend(backend)(m)
    t = clock()
    r = cpu.run(entry, si, 60)
    dt = clock() - t
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
    m, entry, si = machine(n)
    cpu = KvmBackend(m)
    cpu._enter_pvh(entry, si)
    anchor = ctypes.c_char.from_buffer(cpu.run_map)
    t = time.perf_counter()
    rc = lib.floor_loop(cpu.vcpu, ffi.cast("void *", ctypes.addressof(anchor)), n)
    dt = time.perf_counter() - t
    del anchor
    cpu.close()
    m.close()
    assert rc == 0, rc
    return dt


def emulated_floor(n: int, image: str = "mmio_bench") -> float:
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
    m, entry, si = machine(n, image)
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
    t = time.thread_time()
    uc.emu_start(entry, 0xFFFFFFFF)
    dt = time.thread_time() - t
    m.close()
    assert status == [0], status
    return dt


def per_read(fn, n1: int = N1, n2: int = N2, reps: int = 3) -> float:
    """Best-of-``reps`` slope between n1 and n2 reads, in microseconds per read."""
    return min((fn(n2) - fn(n1)) / (n2 - n1) for _ in range(reps)) * 1e6


def fixed_n_images(tmp: Path) -> dict[int, Path] | str:
    """mmio_bench with N compiled in (QN1 and QN2), built with the guest runtime; or why not."""
    if not (shutil.which("gcc") and shutil.which("make")):
        return "gcc/make missing"
    gi = REPO / "guest_images"
    if subprocess.run(["make", "-s", "-C", str(gi)], capture_output=True).returncode:
        return "guest_images do not build"
    flags = subprocess.run(["make", "-s", "-C", str(gi), "--eval", "print-%:;@echo $($*)",
                            "print-CFLAGS", "print-LDFLAGS", "print-RUNTIME_OBJS"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    cflags, ldflags, objs = (line.split() for line in flags)
    src = tmp / "mmio_fixed.c"
    src.write_text('#include "runtime.h"\n'
                   "int main(struct hvm_start_info *si)\n{\n    uint32_t sum = 0;\n    (void)si;\n"
                   f"    for (uint32_t i = 0; i < BENCH_N; i++)\n        sum += mmio_read32({TESTDEV:#x}ULL);\n"
                   "    return sum == BENCH_N * 0x1234u ? 0 : 1;\n}\n")
    out = {}
    for n in (QN1, QN2):
        obj, elf = tmp / f"mmio_{n}.o", tmp / f"mmio_{n}.elf"
        subprocess.run(["gcc", *cflags, f"-DBENCH_N={n}", "-c", "-o", str(obj), str(src)], cwd=gi, check=True)
        subprocess.run(["gcc", *ldflags, "-o", str(elf), str(obj), *objs, "-lgcc"], cwd=gi, check=True)
        out[n] = elf
    return out


def qemu_run(elf: Path) -> float:
    """Wall time of one QEMU microvm boot-to-exit of ``elf`` (the command tests/test_qemu_boot.py uses,
    with our machine's 128 MiB: with more, QEMU's RAM would cover the device address and no read exits)."""
    cmd = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", "128M", "-nodefaults",
           "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot", "-debugcon", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(elf)]
    t = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    dt = time.perf_counter() - t
    assert p.returncode in (1, 3), (p.returncode, p.stderr[-300:])     # guest status 0 or 1, via debug-exit
    return dt


def kvm_vs_qemu(rows: list) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        print("kvm vs qemu: skipped (qemu-system-x86_64 not installed; Debian: apt-get install qemu-system-x86)")
        return
    with tempfile.TemporaryDirectory(prefix="iommu-lab-bench-") as tmp:
        elfs = fixed_n_images(Path(tmp))
        if isinstance(elfs, str):
            print(f"kvm vs qemu: skipped ({elfs})")
            return
        h = per_read(lambda n: harness("kvm", n, str(elfs[n])), QN1, QN2)
        q = per_read(lambda n: qemu_run(elfs[n]), QN1, QN2)
    rows.append(("kvm vs qemu", h, q, 1.3))


def main() -> int:
    import logging

    from vmm.backends.kvm import kvm_usable
    logging.getLogger("vmm").setLevel(logging.ERROR)       # one start-up warning per machine otherwise
    rows = []
    ok, why = kvm_usable()
    if ok:
        floor = build_floor()
        h = per_read(lambda n: harness("kvm", n))
        f = per_read(lambda n: kvm_floor(n, floor))
        rows.append(("kvm", h, f, 1.6))
        kvm_vs_qemu(rows)
    else:
        print(f"kvm: skipped ({why})")
    for label, image in (("emulated", "mmio_bench"), ("emulated 32-bit", "code32")):
        h = per_read(lambda n, image=image: harness("emulated", n, image, time.thread_time), reps=5)
        f = per_read(lambda n, image=image: emulated_floor(n, image), reps=5)
        rows.append((label, h, f, 1.5))
    print(f"{'backend':16} {'harness us/read':>16} {'floor us/read':>14} {'ratio':>7} {'goal':>6}")
    for name, h, f, goal in rows:
        print(f"{name:16} {h:16.2f} {f:14.2f} {h / f:7.2f} {goal:6.1f}  {'ok' if h / f <= goal else 'OVER'}")
    print("(floors: kvm, a C run loop; kvm vs qemu, QEMU microvm's whole process; emulated, a bare unicorn "
          "mmio_map callback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
