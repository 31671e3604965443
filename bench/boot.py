"""Start-up: boot-to-exit of a trivial payload, whole process and in-process, against QEMU microvm.

Measured in one run, best of REPS each:

- ``vmm run PAYLOAD`` as a new process (``python -m vmm.cli``, byte-code caching on: the
  environment's PYTHONDONTWRITEBYTECODE is dropped, and a first unmeasured run fills the cache);
- ``qemu-system-x86_64 -M microvm -accel kvm`` booting the same ELF (the command
  tests/test_qemu_boot.py uses, with our machine's 128 MiB); skipped with the reason when QEMU is
  missing or /dev/kvm is unusable;
- in this process, imports done: ``Machine.from_board("rcar-virt")`` + ``run(PAYLOAD)`` + ``close()``.

Goals (issue 13): whole process <= 1.0x QEMU; in-process build + run <= 0.1x QEMU's whole process.
Usage: python bench/boot.py [exitcode|hello] [--reps N]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vmm import Machine  # noqa: E402
from vmm.images import find_image  # noqa: E402


def best(fn, reps: int) -> float:
    return min(fn() for _ in range(reps))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def timed(cmd: list[str], env: dict[str, str] | None, expect: int) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    dt = time.perf_counter() - t
    if p.returncode != expect:
        err = p.stderr.decode(errors="replace")[-400:]
        raise SystemExit(f"{cmd[0]} exited {p.returncode}, expected {expect}: {err}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("payload", nargs="?", default="exitcode", choices=["exitcode", "hello"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    status = 42 if args.payload == "exitcode" else 0
    logging.getLogger("vmm").setLevel(logging.ERROR)

    from vmm.backends.kvm import kvm_usable
    kvm_ok, why = kvm_usable()
    backend = "kvm" if kvm_ok else "emulated"
    elf = find_image(args.payload)

    env = child_env()
    vmm_cmd = [sys.executable, "-m", "vmm.cli", "run", args.payload, "--backend", backend]
    timed(vmm_cmd, env, status)                                   # fills the byte-code cache
    whole = best(lambda: timed(vmm_cmd, env, status), args.reps)

    qemu = None
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu: skipped (qemu-system-x86_64 not installed; Debian: apt-get install qemu-system-x86)")
    elif not kvm_ok:
        print(f"qemu: skipped (/dev/kvm unusable: {why})")
    else:
        qemu_cmd = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", "128M", "-nodefaults",
                    "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot",
                    "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", elf]
        qemu = best(lambda: timed(qemu_cmd, None, (status << 1) | 1), args.reps)

    def in_process() -> float:
        t = time.perf_counter()
        m = Machine.from_board("rcar-virt")
        try:
            r = m.run(args.payload, backend=backend, timeout=30)
        finally:
            m.close()
        dt = time.perf_counter() - t
        assert r.status == status, r
        return dt

    in_process()                                                  # imports and first-use set-up
    inproc = best(in_process, args.reps)

    print(f"payload {args.payload}, backend {backend}, best of {args.reps}")
    print(f"{'what':34} {'ms':>8} {'x qemu':>8} {'goal':>6}")
    print(f"{'vmm run (whole process)':34} {whole * 1e3:8.1f} " + (
        f"{whole / qemu:8.2f} {1.0:6.1f}  {'ok' if whole <= qemu else 'OVER'}" if qemu else f"{'-':>8}"))
    if qemu:
        print(f"{'qemu microvm (whole process)':34} {qemu * 1e3:8.1f} {1.0:8.2f}")
    print(f"{'in-process from_board + run':34} {inproc * 1e3:8.1f} " + (
        f"{inproc / qemu:8.2f} {0.1:6.1f}  {'ok' if inproc <= 0.1 * qemu else 'OVER'}" if qemu else f"{'-':>8}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
