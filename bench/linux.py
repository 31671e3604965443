"""Boot-to-init of a stock Debian kernel: the emulated backend against QEMU TCG, same run.

Both boot the kernel and initramfs of `make linux-guest` with the same command line; the clock
runs from starting the process to the line /init prints first ("iommu-lab: linux init reached"),
and on to the exit through port 0xF4 (QEMU: isa-debug-exit, status (42 << 1) | 1). QEMU is
`qemu-system-x86_64 -M pc -accel tcg` (its BIOS loads the bzImage); ours is `vmm run --backend
emulated` (the PVH entry of the vmlinux inside). Best of REPS wall times each. Goal: <= 2x QEMU.

Usage: python bench/linux.py   (about a minute; needs `make linux-guest` and qemu-system-x86_64)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "guest_images" / "linux" / "out"
KERNEL, INITRD = OUT / "vmlinuz", OUT / "initramfs.cpio.gz"
CMDLINE = "console=ttyS0 lpj=4000000 tsc_early_khz=2400000 tsc=reliable clocksource=tsc acpi=off"
MARKER = b"iommu-lab: linux init reached"
REPS = 2
GOAL = 2.0


def timed(cmd: list[str], ok_status: int) -> tuple[float, float]:
    """(seconds to the marker, seconds to exit) of one run of ``cmd``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen, marker_at = b"", None
    for line in p.stdout:
        seen = (seen + line)[-4096:]
        if marker_at is None and MARKER in line:
            marker_at = time.perf_counter() - t0
    status = p.wait(timeout=600)
    total = time.perf_counter() - t0
    if marker_at is None or status != ok_status:
        raise RuntimeError(f"{cmd[0]}: status {status}, marker {'seen' if marker_at else 'missing'}: "
                           f"{seen[-300:].decode(errors='replace')}")
    return marker_at, total


def ours() -> tuple[float, float]:
    return timed([sys.executable, "-m", "vmm.cli", "run", str(KERNEL), "--initrd", str(INITRD), "--backend",
                  "emulated", "--cmdline", CMDLINE, "--timeout", "300"], 42)


def qemu() -> tuple[float, float]:
    return timed(["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "128M", "-nodefaults", "-display", "none",
                  "-monitor", "none", "-serial", "stdio", "-no-reboot",
                  "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                  "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", CMDLINE], (42 << 1) | 1)


def main() -> int:
    if not (KERNEL.is_file() and INITRD.is_file()):
        print("linux: skipped (no kernel and initramfs: run `make linux-guest`)")
        return 0
    rows = [("emulated", ours)]
    if shutil.which("qemu-system-x86_64"):
        rows.append(("qemu tcg", qemu))
    else:
        print("qemu tcg: skipped (qemu-system-x86_64 not installed; Debian: apt-get install qemu-system-x86)")
    best = {}
    for name, fn in rows:
        runs = [fn() for _ in range(REPS)]
        best[name] = (min(r[0] for r in runs), min(r[1] for r in runs))
    print(f"{'backend':10} {'to /init s':>11} {'to exit s':>10}")
    for name, (init, total) in best.items():
        print(f"{name:10} {init:11.2f} {total:10.2f}")
    if "qemu tcg" in best:
        ratio = best["emulated"][0] / best["qemu tcg"][0]
        print(f"boot-to-init ratio emulated / qemu tcg: {ratio:.2f} (goal <= {GOAL:.1f})  "
              f"{'ok' if ratio <= GOAL else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
